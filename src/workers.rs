//! Background calculations: a bounded queue, deduplicated per key, drained by a fixed pool of
//! workers that run as a pingora background service and stop on shutdown.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::app::{App, CalcSpec, Outcome};
use crate::cache::{CacheKey, Entry};
use crate::refresh::UpstreamRefresh;

#[derive(Debug)]
pub struct Job {
    pub spec: Arc<CalcSpec>,
    pub refresh: UpstreamRefresh,
    /// The status a client polls; refresh-ahead has none.
    pub status_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the background queue is full")]
pub struct QueueFull;

/// Two lanes: work a client asked for, and refresh-ahead. Workers always drain the first before
/// the second, so refresh-ahead only uses capacity nobody is waiting for.
pub struct JobQueue {
    client: mpsc::Sender<Job>,
    ahead: mpsc::Sender<Job>,
    rx: tokio::sync::Mutex<(mpsc::Receiver<Job>, mpsc::Receiver<Job>)>,
    /// Keys with a job waiting in the queue: a second job for the same key is not queued.
    queued: Mutex<HashSet<CacheKey>>,
}

impl JobQueue {
    pub fn new(capacity: usize) -> Self {
        let (client, client_rx) = mpsc::channel(capacity);
        let (ahead, ahead_rx) = mpsc::channel(capacity);
        Self { client, ahead, rx: tokio::sync::Mutex::new((client_rx, ahead_rx)), queued: Mutex::new(HashSet::new()) }
    }

    /// Queues `job` unless one for the same key is already waiting. Jobs with a status go in the
    /// client lane, the others (refresh-ahead) in the ahead lane.
    pub fn push(&self, job: Job) -> Result<(), QueueFull> {
        let key = job.spec.key;
        let mut queued = self.queued.lock();
        if queued.contains(&key) {
            return Ok(());
        }
        let lane = if job.status_id.is_some() { &self.client } else { &self.ahead };
        lane.try_send(job).map_err(|_| QueueFull)?;
        queued.insert(key);
        Ok(())
    }

    async fn pop(&self) -> Option<Job> {
        let job = {
            let mut rx = self.rx.lock().await;
            let (client, ahead) = &mut *rx;
            tokio::select! {
                biased;
                Some(job) = client.recv() => job,
                Some(job) = ahead.recv() => job,
                else => return None,
            }
        };
        self.queued.lock().remove(&job.spec.key);
        Some(job)
    }

    /// Jobs waiting, counted from the lanes themselves (the key set briefly holds one more while
    /// a worker takes a job).
    pub fn len(&self) -> usize {
        let waiting = |lane: &mpsc::Sender<Job>| lane.max_capacity() - lane.capacity();
        waiting(&self.client) + waiting(&self.ahead)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a completed status carries in `results`: the query response fields of the insight.
pub fn status_results(entry: &Entry) -> Value {
    let Value::Object(insight) = entry.to_value(false) else {
        return Value::Null;
    };
    let mut out = serde_json::Map::new();
    for (from, to) in [
        ("result", "results"),
        ("last_refresh", "last_refresh"),
        ("cache_target_age", "cache_target_age"),
        ("next_allowed_client_refresh", "next_allowed_client_refresh"),
        ("timezone", "timezone"),
        ("columns", "columns"),
        ("hasMore", "hasMore"),
        ("types", "types"),
        ("hogql", "hogql"),
        ("resolved_date_range", "resolved_date_range"),
        ("filters_hash", "cache_key"),
    ] {
        if let Some(v) = insight.get(from) {
            out.insert(to.into(), v.clone());
        }
    }
    out.insert("is_cached".into(), Value::Bool(false));
    Value::Object(out)
}

/// Runs one job to completion and records the outcome in its status.
pub async fn run_job(app: &Arc<App>, job: Job) {
    let Some(status_id) = job.status_id else {
        // Refresh-ahead: nobody polls it; the result simply lands in the cache. If it could not
        // run (budget), the next read may schedule it again.
        let outcome = app.calculation(&job.spec, job.refresh, "ahead").0.wait().await;
        if !matches!(outcome, Some(Outcome::Stored(_))) {
            if let Some(e) = app.cache.get_local(&job.spec.key).await {
                e.unclaim_refresh_ahead();
            }
        }
        return;
    };
    app.statuses.picked_up(&status_id, app.clock.now());
    app.share_status(&status_id, job.spec.key.partition);
    let (flight, _) = app.calculation(&job.spec, job.refresh, "background");
    let result = match flight.wait().await {
        Some(Outcome::Stored(entry)) => Ok(status_results(&entry)),
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
