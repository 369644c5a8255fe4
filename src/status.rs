//! Query statuses for async work the proxy started, in PostHog's QueryStatus shape
//! (refresh-semantics.md §4). Records expire (PostHog's 20 min) and are bounded in number; an id is
//! only ever answered to the partition that created it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;

use crate::cache::Partition;
use crate::clock::format_datetime;

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct QueryStatus {
    pub id: String,
    pub team_id: u64,
    pub insight_id: Option<u64>,
    pub dashboard_id: Option<u64>,
    pub query_async: bool,
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
    pub results: Option<Value>,
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
    pub fn to_json(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("a status serialises"))
    }
}

struct Record {
    owner: Partition,
    status: QueryStatus,
}

pub struct StatusRegistry {
    records: moka::sync::Cache<String, Arc<Mutex<Record>>>,
    ttl: Duration,
}

impl StatusRegistry {
    pub fn new(ttl: Duration, max_records: u64) -> Self {
        Self { records: moka::sync::Cache::builder().max_capacity(max_records).time_to_live(ttl).build(), ttl }
    }

    fn expiration(&self, now: OffsetDateTime) -> OffsetDateTime {
        now + self.ttl
    }

    /// Writes a new, incomplete record (replacing any under the same id).
    pub fn start(
        &self,
        owner: Partition,
        id: String,
        team_id: u64,
        insight_id: u64,
        dashboard_id: Option<u64>,
        now: OffsetDateTime,
    ) -> QueryStatus {
        let status = QueryStatus {
            id: id.clone(),
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
            task_id: None,
            results: None,
        };
        self.records.insert(id, Arc::new(Mutex::new(Record { owner, status: status.clone() })));
        status
    }

    /// The record, if it exists and belongs to `owner`.
    pub fn get(&self, owner: Partition, id: &str) -> Option<QueryStatus> {
        let r = self.records.get(id)?;
        let r = r.lock();
        (r.owner == owner).then(|| r.status.clone())
    }

    /// The record only while it is still running (PostHog's `get_async_query_status`).
    pub fn running(&self, owner: Partition, id: &str) -> Option<QueryStatus> {
        self.get(owner, id).filter(|s| !s.complete)
    }

    pub fn picked_up(&self, id: &str, now: OffsetDateTime) {
        self.update(id, now, |s| s.pickup_time = Some(now));
    }

    pub fn finish(&self, id: &str, now: OffsetDateTime, outcome: Result<Value, String>) {
        self.update(id, now, |s| {
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
        });
    }

    /// Re-stores the record so its TTL restarts, as PostHog resets it on every store.
    fn update(&self, id: &str, now: OffsetDateTime, f: impl FnOnce(&mut QueryStatus)) {
        if let Some(r) = self.records.get(id) {
            {
                let mut rec = r.lock();
                f(&mut rec.status);
                rec.status.expiration_time = self.expiration(now);
            }
            self.records.insert(id.to_string(), r);
        }
    }

    pub fn len(&self) -> u64 {
        self.records.run_pending_tasks();
        self.records.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_and_ownership() {
        let reg = StatusRegistry::new(Duration::from_secs(60), 10);
        let now = OffsetDateTime::now_utc();
        let (a, b) = (Partition([1; 16]), Partition([2; 16]));
        reg.start(a, "q1".into(), 1, 5, None, now);
        assert!(reg.running(a, "q1").is_some());
        assert!(reg.get(b, "q1").is_none(), "another partition cannot see it");
        reg.picked_up("q1", now);
        reg.finish("q1", now, Ok(serde_json::json!({"results": [1]})));
        let s = reg.get(a, "q1").unwrap();
        assert!(s.complete && !s.error && s.pickup_time.is_some() && s.end_time.is_some());
        assert!(reg.running(a, "q1").is_none());
        let v: Value = serde_json::from_slice(&s.to_json()).unwrap();
        assert_eq!(v["query_async"], Value::Bool(true));
        assert!(v["start_time"].as_str().unwrap().ends_with('Z'));
    }
}
