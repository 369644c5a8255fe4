//! Query statuses for async work the proxy started, in PostHog's QueryStatus shape
//! (docs/refresh-semantics.md §5). Records expire (PostHog's 20 min) and are bounded in number; an id is
//! only ever answered to the partition that created it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;

use crate::cache::Partition;
use crate::clock::format_datetime;

/// PostHog's `QueryStatus`, every field, in the upstream's order.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct QueryStatus {
    /// The `CachedQueryResponse` of a completed calculation ([`query_response`]).
    #[serde(default)]
    pub results: Option<Value>,
    pub id: String,
    pub team_id: u64,
    pub insight_id: Option<u64>,
    pub dashboard_id: Option<u64>,
    pub complete: bool,
    pub error: bool,
    pub error_message: Option<String>,
    #[serde(serialize_with = "ser_time", deserialize_with = "de_time")]
    pub start_time: OffsetDateTime,
    #[serde(serialize_with = "ser_opt_time", deserialize_with = "de_opt_time")]
    pub pickup_time: Option<OffsetDateTime>,
    #[serde(serialize_with = "ser_opt_time", deserialize_with = "de_opt_time")]
    pub end_time: Option<OffsetDateTime>,
    #[serde(serialize_with = "ser_time", deserialize_with = "de_time")]
    pub expiration_time: OffsetDateTime,
    pub task_id: Option<String>,
    pub query_async: bool,
    /// PostHog reports ClickHouse progress here; the proxy has none to report.
    #[serde(default)]
    pub query_progress: Option<Value>,
    #[serde(default)]
    pub labels: Option<Value>,
}

/// What a completed status carries in `results`: the insight's result as PostHog's
/// `CachedQueryResponse` (its fields, in the upstream's order).
pub fn query_response(entry: &crate::cache::Entry) -> Value {
    let Value::Object(insight) = entry.to_value(false) else {
        return Value::Null;
    };
    let field = |name: &str, default: Value| insight.get(name).cloned().unwrap_or(default);
    let mut out = serde_json::Map::new();
    out.insert("results".into(), field("result", Value::Null));
    out.insert("cache_key".into(), field("filters_hash", Value::Null));
    for name in ["cache_target_age", "calculation_trigger", "columns", "error", "hasMore", "hogql"] {
        out.insert(name.into(), field(name, Value::Null));
    }
    out.insert("is_cached".into(), Value::Bool(false));
    out.insert("last_refresh".into(), field("last_refresh", Value::Null));
    out.insert("modifiers".into(), field("modifiers", Value::Object(serde_json::Map::new())));
    for name in ["next_allowed_client_refresh", "query_metadata"] {
        out.insert(name.into(), field(name, Value::Null));
    }
    out.insert("query_status".into(), Value::Null);
    for name in ["resolved_date_range", "timezone"] {
        out.insert(name.into(), field(name, Value::Null));
    }
    out.insert("timings".into(), field("timings", Value::Array(Vec::new())));
    out.insert("types".into(), field("types", Value::Null));
    Value::Object(out)
}

fn ser_time<S: serde::Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_datetime(*t))
}

fn ser_opt_time<S: serde::Serializer>(t: &Option<OffsetDateTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&format_datetime(*t)),
        None => s.serialize_none(),
    }
}

fn de_time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    crate::clock::parse_datetime(&s).ok_or_else(|| serde::de::Error::custom("not an RFC 3339 datetime"))
}

fn de_opt_time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<OffsetDateTime>, D::Error> {
    let s = <Option<String> as serde::Deserialize>::deserialize(d)?;
    s.map(|s| crate::clock::parse_datetime(&s).ok_or_else(|| serde::de::Error::custom("not an RFC 3339 datetime")))
        .transpose()
}

impl QueryStatus {
    /// The status as the polling endpoint shows it: Django's JSON encoder gives times to the
    /// millisecond (inside an insight body they come to the microsecond).
    pub fn for_polling(&self) -> QueryStatus {
        let ms = |t: OffsetDateTime| t.replace_nanosecond(u32::from(t.millisecond()) * 1_000_000).unwrap_or(t);
        QueryStatus {
            start_time: ms(self.start_time),
            pickup_time: self.pickup_time.map(ms),
            end_time: self.end_time.map(ms),
            expiration_time: ms(self.expiration_time),
            ..self.clone()
        }
    }

    pub fn to_json(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("a status serialises"))
    }
}

struct Record {
    owner: Partition,
    status: QueryStatus,
    /// Real time, not the app clock: only bounds how long a lost running record can linger.
    expires: Instant,
}

/// The registry is full of running work: the caller answers with PostHog's concurrency error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many query statuses running")]
pub struct RegistryFull;

/// Running records live in a bounded map (each has a job behind it, so the queue bounds them
/// too); completed ones in a cache bounded by bytes, since a completed status holds the insight's
/// results. A completed record may be dropped early under that byte bound, oldest first, and then
/// polls get 404 as after expiry; a running one is never dropped before it completes or expires.
pub struct StatusRegistry {
    running: Mutex<HashMap<String, Record>>,
    done: moka::sync::Cache<String, Arc<Record>>,
    max_running: usize,
    ttl: Duration,
}

/// What a completed record is charged beyond its serialised size (key, struct, cache overhead).
const RECORD_OVERHEAD: usize = 512;

impl StatusRegistry {
    pub fn new(ttl: Duration, max_running: u64, max_done_bytes: u64) -> Self {
        let done = moka::sync::Cache::builder()
            .max_capacity(max_done_bytes)
            .weigher(|_k: &String, r: &Arc<Record>| -> u32 {
                let results = r.status.results.as_ref().map_or(0, |v| v.to_string().len());
                (RECORD_OVERHEAD + results).try_into().unwrap_or(u32::MAX)
            })
            // The newest completion must always be kept: TinyLFU could refuse to admit it.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .support_invalidation_closures()
            .time_to_live(ttl)
            .build();
        Self { running: Mutex::new(HashMap::new()), done, max_running: max_running as usize, ttl }
    }

    fn expiration(&self, now: OffsetDateTime) -> OffsetDateTime {
        now + self.ttl
    }

    /// A new, incomplete status for `start` or `refuse`.
    pub fn blank(
        &self,
        id: String,
        team_id: u64,
        insight_id: u64,
        dashboard_id: Option<u64>,
        now: OffsetDateTime,
    ) -> QueryStatus {
        QueryStatus {
            id,
            team_id,
            insight_id: Some(insight_id),
            dashboard_id,
            query_async: true,
            complete: false,
            error: false,
            error_message: None,
            start_time: now,
            pickup_time: None,
            end_time: None,
            expiration_time: self.expiration(now),
            task_id: Some(task_id()),
            results: None,
            query_progress: None,
            labels: None,
        }
    }

    /// Writes a new, incomplete record (replacing any under the same id), unless as many records
    /// are already running as the registry holds.
    pub fn start(&self, owner: Partition, status: QueryStatus) -> Result<QueryStatus, RegistryFull> {
        let id = status.id.clone();
        let mut running = self.running.lock();
        if running.len() >= self.max_running && !running.contains_key(&id) {
            let t = Instant::now();
            running.retain(|_, r| r.expires > t);
            if running.len() >= self.max_running {
                return Err(RegistryFull);
            }
        }
        self.done.invalidate(&id);
        running.insert(id, Record { owner, status: status.clone(), expires: Instant::now() + self.ttl });
        Ok(status)
    }

    /// Records work refused before it started: a completed error status, pollable like any other.
    pub fn refuse(&self, owner: Partition, mut status: QueryStatus, message: &str) -> QueryStatus {
        let now = status.start_time;
        complete(&mut status, now, Err(message.to_string()));
        self.settle(&mut self.running.lock(), owner, status.clone());
        status
    }

    /// Stores a completed status. Visible as done before it stops being visible as running: a
    /// poll never falls between.
    fn settle(&self, running: &mut HashMap<String, Record>, owner: Partition, status: QueryStatus) {
        let id = status.id.clone();
        self.done.insert(id.clone(), Arc::new(Record { owner, status, expires: Instant::now() + self.ttl }));
        running.remove(&id);
    }

    /// The record, if it exists, has not expired and belongs to `owner`.
    pub fn get(&self, owner: Partition, id: &str) -> Option<QueryStatus> {
        {
            let running = self.running.lock();
            if let Some(r) = running.get(id) {
                return (r.owner == owner && r.expires > Instant::now()).then(|| r.status.clone());
            }
        }
        let r = self.done.get(id)?;
        (r.owner == owner).then(|| r.status.clone())
    }

    /// The record while its `expiration_time` has not passed on the proxy's clock (as PostHog
    /// expires it); the registry's own bound only drops records later.
    pub fn live(&self, owner: Partition, id: &str, now: OffsetDateTime) -> Option<QueryStatus> {
        self.get(owner, id).filter(|s| now <= s.expiration_time)
    }

    /// The record only while it is still running (PostHog's `get_async_query_status`).
    pub fn running(&self, owner: Partition, id: &str, now: OffsetDateTime) -> Option<QueryStatus> {
        self.live(owner, id, now).filter(|s| !s.complete)
    }

    pub fn picked_up(&self, id: &str, now: OffsetDateTime) {
        if let Some(r) = self.running.lock().get_mut(id) {
            r.status.pickup_time = Some(now);
            r.status.expiration_time = self.expiration(now);
            r.expires = Instant::now() + self.ttl;
        }
    }

    /// Completes a running record; its TTL restarts, as PostHog resets it on every store.
    pub fn finish(&self, id: &str, now: OffsetDateTime, outcome: Result<Value, String>) -> Option<QueryStatus> {
        let mut running = self.running.lock();
        let r = running.get(id)?;
        let (owner, mut status) = (r.owner, r.status.clone());
        complete(&mut status, now, outcome);
        status.expiration_time = self.expiration(now);
        self.settle(&mut running, owner, status.clone());
        Some(status)
    }

    /// Drops one record of `owner` (a cancelled query): polls then answer 404, as PostHog's do.
    pub fn remove(&self, owner: Partition, id: &str) {
        let mut running = self.running.lock();
        if running.get(id).is_some_and(|r| r.owner == owner) {
            running.remove(id);
        }
        drop(running);
        if self.done.get(id).is_some_and(|r| r.owner == owner) {
            self.done.invalidate(id);
        }
    }

    /// Drops every record of a principal the upstream refused: a poll then answers 404, as after
    /// expiry. Work still running for it completes into nothing.
    pub fn drop_owner(&self, owner: Partition) {
        self.running.lock().retain(|_, r| r.owner != owner);
        let _ = self.done.invalidate_entries_if(move |_, r| r.owner == owner);
    }

    pub fn running_count(&self) -> usize {
        self.running.lock().len()
    }

    /// When the oldest unexpired record still running started: work running this long is stuck
    /// or starved (for the metrics).
    pub fn oldest_running_start(&self) -> Option<OffsetDateTime> {
        let t = Instant::now();
        self.running.lock().values().filter(|r| r.expires > t).map(|r| r.status.start_time).min()
    }

    pub fn len(&self) -> u64 {
        self.done.run_pending_tasks();
        self.running_count() as u64 + self.done.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes charged to completed records.
    pub fn done_bytes(&self) -> u64 {
        self.done.run_pending_tasks();
        self.done.weighted_size()
    }
}

/// A task id in the shape of PostHog's (a Celery task UUID).
fn task_id() -> String {
    let b: [u8; 16] = rand::random();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

fn complete(s: &mut QueryStatus, now: OffsetDateTime, outcome: Result<Value, String>) {
    s.complete = true;
    s.end_time = Some(now);
    s.pickup_time.get_or_insert(now);
    match outcome {
        Ok(results) => {
            s.error = false;
            s.results = Some(results);
        }
        Err(message) => {
            s.error = true;
            s.error_message = Some(message);
            s.results = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u8) -> Partition {
        Partition([n; 16])
    }

    #[test]
    fn lifecycle_and_ownership() {
        let reg = StatusRegistry::new(Duration::from_secs(60), 10, 1 << 20);
        let now = OffsetDateTime::now_utc();
        let (a, b) = (p(1), p(2));
        reg.start(a, reg.blank("q1".into(), 1, 5, None, now)).unwrap();
        assert!(reg.running(a, "q1", now).is_some());
        assert!(reg.get(b, "q1").is_none(), "another partition cannot see it");
        let later = now + time::Duration::seconds(61);
        assert!(reg.live(a, "q1", later).is_none(), "past its expiration_time on the proxy's clock");
        reg.picked_up("q1", now);
        let done = reg.finish("q1", now, Ok(serde_json::json!({"results": [1]}))).unwrap();
        let s = reg.get(a, "q1").unwrap();
        assert!(s.complete && !s.error && s.pickup_time.is_some() && s.end_time.is_some());
        assert_eq!(s.to_json(), done.to_json());
        assert!(reg.running(a, "q1", now).is_none());
        assert!(reg.get(b, "q1").is_none(), "nor once it is complete");
        assert_eq!(reg.len(), 1);
        let v: Value = serde_json::from_slice(&s.to_json()).unwrap();
        assert_eq!(v["query_async"], Value::Bool(true));
        assert!(v["start_time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn running_records_are_bounded_and_never_dropped_for_new_ones() {
        let reg = StatusRegistry::new(Duration::from_secs(60), 3, 1 << 20);
        let now = OffsetDateTime::now_utc();
        for i in 0..3 {
            reg.start(p(1), reg.blank(format!("q{i}"), 1, i, None, now)).unwrap();
        }
        assert_eq!(reg.start(p(1), reg.blank("q3".into(), 1, 3, None, now)).err(), Some(RegistryFull));
        // Restarting one that exists is not a new record.
        assert!(reg.start(p(1), reg.blank("q0".into(), 1, 0, None, now)).is_ok());
        for i in 0..3 {
            assert!(reg.running(p(1), &format!("q{i}"), now).is_some(), "q{i} still running");
        }
        // A completion frees a place.
        reg.finish("q1", now, Err("boom".into()));
        assert!(reg.start(p(1), reg.blank("q3".into(), 1, 3, None, now)).is_ok());
    }

    #[test]
    fn the_oldest_running_record_is_reported_until_it_completes() {
        let reg = StatusRegistry::new(Duration::from_secs(60), 10, 1 << 20);
        let now = OffsetDateTime::now_utc();
        assert_eq!(reg.oldest_running_start(), None);
        let earlier = now - time::Duration::seconds(30);
        reg.start(p(1), reg.blank("old".into(), 1, 1, None, earlier)).unwrap();
        reg.start(p(2), reg.blank("new".into(), 1, 2, None, now)).unwrap();
        assert_eq!(reg.oldest_running_start(), Some(earlier));
        reg.finish("old", now, Ok(serde_json::json!({})));
        assert_eq!(reg.oldest_running_start(), Some(now));
    }

    #[test]
    fn a_refusal_is_a_completed_error_that_can_be_polled() {
        let reg = StatusRegistry::new(Duration::from_secs(60), 1, 1 << 20);
        let now = OffsetDateTime::now_utc();
        let s = reg.refuse(p(1), reg.blank("q".into(), 1, 2, Some(3), now), "concurrency_limit_exceeded");
        assert!(s.complete && s.error);
        let polled = reg.get(p(1), "q").unwrap();
        assert_eq!(polled.error_message.as_deref(), Some("concurrency_limit_exceeded"));
        assert_eq!(polled.dashboard_id, Some(3));
    }

    #[test]
    fn completed_records_are_bounded_by_bytes_newest_kept() {
        let reg = StatusRegistry::new(Duration::from_secs(60), 1000, 64 * 1024);
        let now = OffsetDateTime::now_utc();
        let big = serde_json::json!({"results": "x".repeat(8 * 1024)});
        for i in 0..100 {
            let id = format!("q{i}");
            reg.start(p(1), reg.blank(id.clone(), 1, i, None, now)).unwrap();
            reg.finish(&id, now, Ok(big.clone())).unwrap();
            assert!(reg.get(p(1), &id).is_some(), "the newest completion q{i} is kept");
        }
        assert!(reg.done_bytes() <= 64 * 1024, "{} bytes", reg.done_bytes());
        assert!(reg.len() < 10, "{} records", reg.len());
    }
}
