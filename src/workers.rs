//! Background calculations: a bounded queue, deduplicated per key, drained by a fixed pool of
//! workers that run as a pingora background service and stop on shutdown.

use std::collections::{BinaryHeap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::app::{App, CalcSpec, Failure, Outcome};
use crate::cache::{CacheKey, Entry};
use crate::refresh::UpstreamRefresh;

#[derive(Debug)]
pub struct Job {
    pub spec: Arc<CalcSpec>,
    /// The flight it runs under ([`App::flight_key`]): jobs are deduplicated by it.
    pub flight: CacheKey,
    pub refresh: UpstreamRefresh,
    /// The status a client polls; refresh-ahead has none.
    pub status_id: Option<String>,
    /// Set for refresh-ahead.
    pub ahead: Option<Ahead>,
}

/// What a refresh-ahead job knows about the entry it refreshes.
#[derive(Debug)]
pub struct Ahead {
    /// The entry whose refresh-ahead claim this job holds (released if the job cannot run).
    pub claimed: Arc<Entry>,
    /// The `last_refresh` it replaces: anything newer makes the job moot.
    pub base: time::OffsetDateTime,
    /// The upstream cache key (0 if unknown).
    pub group: u128,
    /// Reads per minute of the variant since its result was calculated: the hottest go first.
    pub heat: u64,
}

/// A refresh-ahead job in the heap, hottest first, then oldest first.
struct ByHeat {
    heat: u64,
    seq: u64,
    job: Job,
}

impl PartialEq for ByHeat {
    fn eq(&self, other: &Self) -> bool {
        (self.heat, self.seq) == (other.heat, other.seq)
    }
}
impl Eq for ByHeat {}
impl PartialOrd for ByHeat {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ByHeat {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.heat.cmp(&other.heat).then(other.seq.cmp(&self.seq))
    }
}

#[derive(Default)]
struct AheadLane {
    heap: BinaryHeap<ByHeat>,
    seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the background queue is full")]
pub struct QueueFull;

/// Two lanes: work a client asked for (first in, first out), and refresh-ahead (hottest first).
/// Workers always drain the first before the second, so refresh-ahead only uses capacity nobody
/// is waiting for, and when the budget cannot cover every hot entry the hottest are refreshed.
pub struct JobQueue {
    client: mpsc::Sender<Job>,
    client_rx: tokio::sync::Mutex<mpsc::Receiver<Job>>,
    ahead: Mutex<AheadLane>,
    ahead_ready: tokio::sync::Notify,
    capacity: usize,
    /// Flights with a job waiting in the queue: a second job for the same flight is not queued.
    queued: Mutex<HashSet<CacheKey>>,
}

impl JobQueue {
    pub fn new(capacity: usize) -> Self {
        let (client, client_rx) = mpsc::channel(capacity);
        Self {
            client,
            client_rx: tokio::sync::Mutex::new(client_rx),
            ahead: Mutex::new(AheadLane::default()),
            ahead_ready: tokio::sync::Notify::new(),
            capacity,
            queued: Mutex::new(HashSet::new()),
        }
    }

    /// Queues `job` unless one for the same flight is already waiting. Jobs with a status go in
    /// the client lane, refresh-ahead in the ahead lane; a full ahead lane drops its coldest job
    /// for a hotter one (the dropped entry may be scheduled again by its next read).
    pub fn push(&self, job: Job) -> Result<(), QueueFull> {
        let key = job.flight;
        let mut queued = self.queued.lock();
        if queued.contains(&key) {
            return Ok(());
        }
        let Some(ahead) = &job.ahead else {
            self.client.try_send(job).map_err(|_| QueueFull)?;
            queued.insert(key);
            return Ok(());
        };
        let heat = ahead.heat;
        let mut lane = self.ahead.lock();
        if lane.heap.len() >= self.capacity {
            // The coldest waiting job: a linear scan, only when the lane is full.
            let coldest = lane.heap.iter().min().map(|c| (c.heat, c.seq));
            match coldest {
                Some((h, seq)) if h < heat => {
                    let mut jobs = std::mem::take(&mut lane.heap).into_vec();
                    let at = jobs.iter().position(|c| c.seq == seq).expect("the coldest job is queued");
                    let dropped = jobs.swap_remove(at);
                    queued.remove(&dropped.job.flight);
                    if let Some(a) = &dropped.job.ahead {
                        a.claimed.unclaim_refresh_ahead();
                    }
                    lane.heap = jobs.into();
                }
                _ => return Err(QueueFull),
            }
        }
        lane.seq += 1;
        let seq = lane.seq;
        lane.heap.push(ByHeat { heat, seq, job });
        queued.insert(key);
        drop(lane);
        self.ahead_ready.notify_one();
        Ok(())
    }

    async fn pop(&self) -> Option<Job> {
        let job = {
            // One worker at a time looks; the others wait their turn here.
            let mut client = self.client_rx.lock().await;
            loop {
                let ready = self.ahead_ready.notified();
                tokio::pin!(ready);
                ready.as_mut().enable();
                match client.try_recv() {
                    Ok(job) => break job,
                    Err(mpsc::error::TryRecvError::Disconnected) => return None,
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
                if let Some(next) = self.ahead.lock().heap.pop() {
                    break next.job;
                }
                tokio::select! {
                    biased;
                    job = client.recv() => match job {
                        Some(job) => break job,
                        None => return None,
                    },
                    _ = ready => {}
                }
            }
        };
        self.queued.lock().remove(&job.flight);
        Some(job)
    }

    /// Jobs waiting, counted from the lanes themselves (the key set briefly holds one more while
    /// a worker takes a job).
    pub fn len(&self) -> usize {
        (self.client.max_capacity() - self.client.capacity()) + self.ahead.lock().heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Refresh-ahead: nobody polls it; the result simply lands in the cache. One partition at a time
/// refreshes an upstream cache key: the others wait for it, then read the upstream's fresh cache
/// with their own credential (no calculation). If it could not run (budget), the next read may
/// schedule it again.
async fn run_ahead(app: &Arc<App>, job: &Job, ahead: &Ahead) {
    let spec = &job.spec;
    let ahead_of = Some((ahead.base, ahead.group));
    let key = match ahead.group {
        0 => (spec.project, spec.insight, spec.key.variant, false),
        g => (spec.project, spec.insight, g, true),
    };
    let run = {
        let (app, spec, flight, refresh) = (app.clone(), spec.clone(), job.flight, job.refresh);
        move || {
            let (app, spec) = (app.clone(), spec.clone());
            async move { app.calculation(&spec, flight, refresh, "ahead", ahead_of).0.wait().await }
        }
    };
    let (first, started) = app.ahead_flights.join_or_start(key, || {
        let run = run.clone();
        async move { run().await.unwrap_or(Outcome::Failed(Failure::Interrupted)) }
    });
    let mut outcome = first.wait().await;
    if !started {
        // Another partition's refresh of the same upstream key: its result is not ours to use;
        // ours now reads the upstream's cache (or calculates if that did not happen).
        outcome = run().await;
    }
    let ours = job.flight == spec.key;
    let taken = match outcome {
        // Another variant's result whose upstream key changed meanwhile is not taken (`None`):
        // this variant's next read schedules it again.
        Some(o @ Outcome::Stored(_)) => app.adopt(spec, Some(&ahead.claimed), o, ours).await.is_some(),
        _ => false,
    };
    if !taken {
        ahead.claimed.unclaim_refresh_ahead();
    }
}

/// Runs one job to completion and records the outcome in its status.
pub async fn run_job(app: &Arc<App>, job: Job) {
    if let Some(ahead) = &job.ahead {
        return run_ahead(app, &job, ahead).await;
    }
    let Some(status_id) = job.status_id.clone() else { return };
    app.statuses.picked_up(&status_id, app.clock.now());
    app.share_status(&status_id, job.spec.key.partition);
    let own = app.cache.get_local(&job.spec.key).await;
    let wait = |flight: Arc<crate::flights::Flight<Outcome>>| async move { flight.wait().await };
    let (outcome, _) = app.calculate_for(&job.spec, own.as_ref(), job.flight, job.refresh, "background", wait).await;
    let result = match outcome {
        Some(Outcome::Stored(entry)) => Ok(crate::status::query_response(&entry)),
        Some(Outcome::Relay(resp)) => Err(relay_message(&resp.body)),
        Some(Outcome::Failed(f)) => Err(f.to_api_error().detail),
        None => Err("The calculation was interrupted.".into()),
    };
    app.statuses.finish(&status_id, app.clock.now(), result);
    app.share_status(&status_id, job.spec.key.partition);
}

/// The upstream's own error message for a relayed answer, e.g. `concurrency_limit_exceeded`.
fn relay_message(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    v.pointer("/query_status/error_message")
        .or_else(|| v.get("detail"))
        .and_then(Value::as_str)
        .unwrap_or("The upstream did not return a result.")
        .to_string()
}

pub struct Workers {
    pub app: Arc<App>,
}

#[async_trait]
impl BackgroundService for Workers {
    async fn start(&self, shutdown: ShutdownWatch) {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..self.app.config.workers {
            let (app, mut shutdown) = (self.app.clone(), shutdown.clone());
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        job = app.jobs.pop() => match job {
                            Some(job) => {
                                app.metrics.busy_workers.inc();
                                run_job(&app, job).await;
                                app.metrics.busy_workers.dec();
                            }
                            None => return,
                        },
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Principal;
    use crate::cache::Partition;
    use crate::query::QueryParams;
    use bytes::Bytes;

    fn ahead_job(insight: u64, heat: u64) -> (Job, Arc<Entry>) {
        let key = CacheKey::new(Partition([1; 16]), 1, insight, &QueryParams::default());
        let spec = Arc::new(CalcSpec {
            key,
            project: 1,
            insight,
            path: format!("/api/environments/1/insights/{insight}/"),
            query: QueryParams::default(),
            principal: Principal::api_key(&crate::cache::PartitionKeyer::new(None), "k"),
        });
        let body = Bytes::from(format!(r#"{{"id":{insight},"result":[1],"last_refresh":"2026-01-01T00:00:00Z"}}"#));
        let entry = Arc::new(Entry::from_upstream(&body, insight, 1).unwrap());
        assert!(entry.claim_refresh_ahead());
        let ahead = Ahead { claimed: entry.clone(), base: entry.last_refresh(), group: 0, heat };
        let job =
            Job { spec, flight: key, refresh: UpstreamRefresh::ForceBlocking, status_id: None, ahead: Some(ahead) };
        (job, entry)
    }

    #[tokio::test]
    async fn refresh_ahead_goes_hottest_first_and_a_full_lane_drops_the_coldest() {
        let q = JobQueue::new(3);
        let mut entries = Vec::new();
        for (insight, heat) in [(1, 5), (2, 50), (3, 1)] {
            let (job, e) = ahead_job(insight, heat);
            q.push(job).unwrap();
            entries.push(e);
        }
        let (again, _) = ahead_job(2, 99);
        q.push(again).unwrap(); // the same flight is queued once
        assert_eq!(q.len(), 3);
        let (colder, _) = ahead_job(4, 0);
        assert!(q.push(colder).is_err(), "full, and colder than everything queued");
        let (hotter, _) = ahead_job(5, 20);
        q.push(hotter).unwrap();
        assert!(entries[2].claim_refresh_ahead(), "the dropped job released its claim");
        let order: Vec<u64> =
            [q.pop().await, q.pop().await, q.pop().await].into_iter().flatten().map(|j| j.spec.insight).collect();
        assert_eq!(order, vec![2, 5, 1]);
        assert!(q.is_empty());
    }
}
