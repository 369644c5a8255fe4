//! The query engine: result cache, async query statuses, concurrency slots, calculation
//! counters, and the §2.2 mode logic tying them together.

use crate::body;
use crate::dates::DateRange;
use crate::query::Plan;
use crate::refresh::{decide, next_allowed_refresh_delay, Decision, Freshness, RefreshMode};
use crate::results;
use crate::staleness::ThresholdMode;
use crate::{Fault, Inner};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use time::OffsetDateTime;

/// `CACHED_RESULTS_TTL` (§3.4): after this even `force_cache` misses.
const CACHE_TTL: time::Duration = time::Duration::days(7);
/// `STATUS_TTL_SECONDS` (§5.2), reset on every store.
const STATUS_TTL: time::Duration = time::Duration::minutes(20);
/// Bounds memory when clients send endless override variants; the oldest half is dropped.
const MAX_ENTRIES: usize = 50_000;

/// One cached query response (the runner's `Cached*QueryResponse`).
#[derive(Debug)]
pub(crate) struct Entry {
    /// Serialized `results`, spliced into bodies without re-serializing.
    pub results: Arc<str>,
    /// Series `custom_name`s at calculation time, re-applied from the current query on hits.
    pub custom_names: Vec<Option<String>>,
    pub cache_key: String,
    pub last_refresh: OffsetDateTime,
    pub next_allowed_client_refresh: OffsetDateTime,
    pub cache_target_age: Option<OffsetDateTime>,
    pub timezone: String,
    pub hogql: String,
    pub resolved: DateRange,
}

/// PostHog's `QueryStatus` (SCH).
#[derive(Clone, Debug, Default)]
pub(crate) struct QueryStatus {
    pub id: Option<String>,
    pub team_id: u64,
    pub insight_id: Option<u64>,
    pub dashboard_id: Option<u64>,
    pub complete: bool,
    pub error: bool,
    pub error_message: Option<String>,
    pub start_time: Option<OffsetDateTime>,
    pub pickup_time: Option<OffsetDateTime>,
    pub end_time: Option<OffsetDateTime>,
    pub expiration_time: Option<OffsetDateTime>,
    pub task_id: Option<String>,
    /// The full query response once complete and successful.
    pub results: Option<Arc<str>>,
}

impl QueryStatus {
    fn expired(&self, now: OffsetDateTime) -> bool {
        self.expiration_time.is_some_and(|t| now > t)
    }
}

/// One calculation request.
#[derive(Clone, Debug)]
pub(crate) struct Job {
    pub team: u64,
    pub insight: u64,
    pub dashboard: Option<u64>,
    pub cache_key: String,
    pub plan: Arc<Plan>,
    pub timezone: String,
}

/// What the runner produced for one insight (§2.4 decides how it is rendered).
#[derive(Debug)]
pub(crate) enum Outcome {
    /// From the cache (`is_cached`) or just calculated.
    Result { entry: Arc<Entry>, is_cached: bool, status: Option<QueryStatus> },
    /// `CacheMissResponse`.
    Miss { cache_key: String, status: Option<QueryStatus> },
    /// `force_async`: only a status.
    Enqueued { status: QueryStatus },
    /// `ConcurrencyLimitExceeded`.
    Concurrency { at: OffsetDateTime },
    /// Any other failure.
    Failed { message: String },
}

#[derive(Default)]
pub(crate) struct Engine {
    cache: Mutex<HashMap<String, Arc<Entry>>>,
    statuses: Mutex<HashMap<(u64, String), QueryStatus>>,
    in_flight: Mutex<HashMap<u64, usize>>,
    counts: Mutex<HashMap<(u64, u64), u64>>,
    total: AtomicU64,
    tasks: AtomicU64,
}

impl Engine {
    pub fn calculations(&self, project: u64, insight: u64) -> u64 {
        self.counts.lock().get(&(project, insight)).copied().unwrap_or(0)
    }

    pub fn total_calculations(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn calculation_counts(&self) -> Vec<((u64, u64), u64)> {
        let mut all: Vec<_> = self.counts.lock().iter().map(|(k, v)| (*k, *v)).collect();
        all.sort_unstable();
        all
    }

    /// Counts a calculation and returns its number for this insight.
    fn count(&self, team: u64, insight: u64) -> u64 {
        self.total.fetch_add(1, Ordering::Relaxed);
        let mut counts = self.counts.lock();
        let n = counts.entry((team, insight)).or_insert(0);
        *n += 1;
        *n
    }

    fn lookup(&self, key: &str, now: OffsetDateTime) -> Option<Arc<Entry>> {
        let mut cache = self.cache.lock();
        let entry = cache.get(key)?;
        if now > entry.last_refresh + CACHE_TTL {
            cache.remove(key);
            return None;
        }
        Some(entry.clone())
    }

    fn store(&self, entry: Arc<Entry>) {
        let mut cache = self.cache.lock();
        if cache.len() >= MAX_ENTRIES {
            let mut by_age: Vec<_> = cache.iter().map(|(k, e)| (e.last_refresh, k.clone())).collect();
            by_age.sort_unstable();
            for (_, k) in by_age.into_iter().take(MAX_ENTRIES / 2) {
                cache.remove(&k);
            }
        }
        cache.insert(entry.cache_key.clone(), entry);
    }

    /// A live status record for a query id, complete or not (polling).
    pub fn status(&self, team: u64, id: &str, now: OffsetDateTime) -> Option<QueryStatus> {
        let mut statuses = self.statuses.lock();
        let key = (team, id.to_owned());
        match statuses.get(&key) {
            Some(s) if s.expired(now) => {
                statuses.remove(&key);
                None
            }
            other => other.cloned(),
        }
    }

    /// `get_async_query_status`: the status for `id` only while it is not complete.
    fn running(&self, team: u64, id: &str, now: OffsetDateTime) -> Option<QueryStatus> {
        self.status(team, id, now).filter(|s| !s.complete)
    }

    pub fn remove_status(&self, team: u64, id: &str) -> bool {
        self.statuses.lock().remove(&(team, id.to_owned())).is_some()
    }

    /// Updates a status only while it still belongs to `task_id`: a newer `rr=true` enqueue
    /// replaces the record, and the older task must not overwrite it.
    fn update_status(&self, job: &Job, task_id: &str, now: OffsetDateTime, f: impl FnOnce(&mut QueryStatus)) {
        let mut statuses = self.statuses.lock();
        if let Some(s) = statuses.get_mut(&(job.team, job.cache_key.clone())) {
            if s.task_id.as_deref() == Some(task_id) {
                f(s);
                s.expiration_time = Some(now + STATUS_TTL);
            }
        }
    }
}

/// A per-team in-flight calculation, released on drop (also when a task is cancelled).
struct Slot {
    inner: Arc<Inner>,
    team: u64,
}

impl Slot {
    fn acquire(inner: &Arc<Inner>, team: u64, limit: Option<usize>) -> Option<Slot> {
        let mut in_flight = inner.engine.in_flight.lock();
        let n = in_flight.entry(team).or_insert(0);
        if limit.is_some_and(|limit| *n >= limit) {
            return None;
        }
        *n += 1;
        Some(Slot { inner: inner.clone(), team })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut in_flight = self.inner.engine.in_flight.lock();
        if let Some(n) = in_flight.get_mut(&self.team) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                in_flight.remove(&self.team);
            }
        }
    }
}

#[derive(Debug)]
enum CalcError {
    Concurrency,
    Failed(String),
}

/// Runs one insight through the refresh mode (§2.2).
pub(crate) async fn run(inner: &Arc<Inner>, job: Job, mode: RefreshMode) -> Outcome {
    let now = inner.clock.now();
    let engine = &inner.engine;
    let hit = match mode {
        RefreshMode::ForceAsync | RefreshMode::ForceBlocking => None,
        _ => engine.lookup(&job.cache_key, now),
    };
    let freshness = hit.as_ref().map(|e| {
        let info = job.plan.stale_info(e.last_refresh);
        let t = &inner.thresholds;
        Freshness {
            fresh_default: !info.is_stale(now, t, ThresholdMode::Default),
            fresh_lazy: !info.is_stale(now, t, ThresholdMode::Lazy),
        }
    });
    match (decide(mode, freshness), hit) {
        (Decision::Serve { enqueue, status_from_enqueue }, Some(entry)) => {
            let enqueued = enqueue.map(|rr| enqueue_calculation(inner, &job, rr));
            let status = match enqueued {
                Some(s) if status_from_enqueue => Some(s),
                _ => engine.running(job.team, &job.cache_key, now),
            };
            Outcome::Result { entry, is_cached: true, status }
        }
        (Decision::Miss { enqueue }, _) | (Decision::Serve { enqueue, .. }, None) => {
            let status = match enqueue {
                Some(rr) => Some(enqueue_calculation(inner, &job, rr)),
                None => engine.running(job.team, &job.cache_key, now),
            };
            Outcome::Miss { cache_key: job.cache_key, status }
        }
        (Decision::ForceAsync, _) => Outcome::Enqueued { status: enqueue_calculation(inner, &job, true) },
        (Decision::Calculate, _) => match calculate(inner, &job).await {
            Ok(entry) => Outcome::Result { entry, is_cached: false, status: None },
            Err(CalcError::Concurrency) => {
                inner.limit_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Outcome::Concurrency { at: inner.clock.now() }
            }
            Err(CalcError::Failed(message)) => Outcome::Failed { message },
        },
    }
}

/// A synchronous calculation inside the per-team concurrency limit.
async fn calculate(inner: &Arc<Inner>, job: &Job) -> Result<Arc<Entry>, CalcError> {
    if inner.fault() == Fault::Concurrency {
        return Err(CalcError::Concurrency);
    }
    let slot = Slot::acquire(inner, job.team, inner.concurrency_limit).ok_or(CalcError::Concurrency)?;
    let (inner, job) = (inner.clone(), job.clone());
    // Spawned so a client that hangs up does not cancel it: upstream finishes and caches anyway.
    let task = tokio::spawn(async move {
        let _slot = slot;
        compute_and_store(&inner, &job).await
    });
    task.await.map_err(|e| CalcError::Failed(e.to_string()))
}

/// One calculation: count it, take `calc_delay`, build the result and cache it.
async fn compute_and_store(inner: &Arc<Inner>, job: &Job) -> Arc<Entry> {
    let number = inner.engine.count(job.team, job.insight);
    let delay = inner.calc_delay();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let now = inner.clock.now();
    let plan = &job.plan;
    let computed = results::compute(inner.seed, plan, number);
    let frequency = time::Duration::try_from(next_allowed_refresh_delay(plan.interval, plan.range.span()));
    let entry = Arc::new(Entry {
        results: computed.results.into(),
        custom_names: plan.custom_names(),
        cache_key: job.cache_key.clone(),
        last_refresh: now,
        next_allowed_client_refresh: frequency.ok().and_then(|d| now.checked_add(d)).unwrap_or(now),
        cache_target_age: plan.stale_info(now).cache_target_age(&inner.thresholds),
        timezone: job.timezone.clone(),
        hogql: computed.hogql,
        resolved: plan.range,
    });
    inner.engine.store(entry.clone());
    entry
}

/// `enqueue_process_query_task` (EA): with `refresh_requested == false` an existing status is
/// returned as is; otherwise a new status is written and a task scheduled.
fn enqueue_calculation(inner: &Arc<Inner>, job: &Job, refresh_requested: bool) -> QueryStatus {
    let now = inner.clock.now();
    let task_id = format!("sim-{:016x}", inner.engine.tasks.fetch_add(1, Ordering::Relaxed) + 1);
    let status = {
        let mut statuses = inner.engine.statuses.lock();
        let key = (job.team, job.cache_key.clone());
        if let Some(existing) = statuses.get(&key).filter(|s| !s.expired(now)) {
            if !refresh_requested {
                return existing.clone();
            }
        }
        if statuses.len() >= MAX_ENTRIES {
            statuses.retain(|_, s| !s.expired(now));
        }
        let status = QueryStatus {
            id: Some(job.cache_key.clone()),
            team_id: job.team,
            insight_id: Some(job.insight),
            dashboard_id: job.dashboard,
            start_time: Some(now),
            expiration_time: Some(now + STATUS_TTL),
            task_id: Some(task_id.clone()),
            ..QueryStatus::default()
        };
        statuses.insert(key, status.clone());
        status
    };
    tokio::spawn(run_task(inner.clone(), job.clone(), task_id));
    status
}

/// The Celery task (EA `execute_process_query`): pick up, calculate, record the outcome.
async fn run_task(inner: Arc<Inner>, job: Job, task_id: String) {
    let engine = &inner.engine;
    engine.update_status(&job, &task_id, inner.clock.now(), |s| s.pickup_time = Some(inner.clock.now()));
    if inner.fault() == Fault::Concurrency {
        let now = inner.clock.now();
        engine.update_status(&job, &task_id, now, |s| {
            s.complete = true;
            s.error = true;
            s.error_message = Some("concurrency_limit_exceeded".into());
            s.end_time = Some(now);
        });
        return;
    }
    // Workers are not bound by the API limit, but they do occupy the team's slots.
    let slot = Slot::acquire(&inner, job.team, None);
    let entry = compute_and_store(&inner, &job).await;
    drop(slot);
    let response: Arc<str> = body::query_response(&entry).into();
    let now = inner.clock.now();
    engine.update_status(&job, &task_id, now, |s| {
        s.complete = true;
        s.error = false;
        s.end_time = Some(now);
        s.results = Some(response);
    });
}
