//! A cached insight: its body pre-rendered once, plus the facts staleness needs.
//!
//! The body keeps the upstream's key order. The per-response fields (`is_cached`, `query_status`)
//! stay where the upstream put them (or lead, if it had none), and the byte ranges of their values
//! are kept, so an answer never parses or re-serialises JSON: it splices two values in. The common
//! answer (a hit with no `query_status`) is kept rendered: serving it is a reference-count
//! increment, not a copy.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::sealed::{self, SealedFile};
use crate::clock::parse_datetime;
use crate::refresh::{Interval, StaleInfo};

#[derive(Debug)]
pub struct Entry {
    /// The insight with `"is_cached":true` and `"query_status":null`: the answer to a hit, as it
    /// is sent, and the stored body.
    hit: Bytes,
    /// The sealed file `hit` is a mapping of, for a large body (`sealed`): sent without copying.
    file: Option<SealedFile>,
    /// Where the values of `is_cached` and `query_status` are in `hit`, in that order of fields.
    slots: [std::ops::Range<usize>; 2],
    pub stale: StaleInfo,
    /// The cache epoch at which the calculation that produced this entry started (see `Epochs`).
    pub epoch: u64,
    /// Wall-clock millisecond at which the calculation started: orders it against purges made on
    /// other replicas (the shared tier's purge markers).
    pub started_ms: i64,
    /// The shared tier's version when the calculation started (`None` without the shared tier,
    /// or when it could not say): orders it against purges made on any replica, without clocks.
    /// Only a versioned entry is written to the shared tier.
    pub version: Option<u64>,
    /// Reads served from this entry, for refresh-ahead.
    reads: AtomicU32,
    /// Set once a refresh-ahead was scheduled for this entry, so it is scheduled once.
    ahead: AtomicBool,
    /// The upstream's cache key for this result (`filters_hash`, hashed; 0 when the body has
    /// none): variants of an insight with the same one are computed identically upstream.
    pub group: u128,
    /// Wall-clock millisecond at which the upstream last confirmed, for this very variant, that
    /// its cache key is `group`. A result adopted from another variant of the group keeps the
    /// variant's own confirmation time, so an alias is trusted only for a bounded time.
    pub confirmed_ms: i64,
    /// The upstream answered from its own cache (`is_cached: true`) when it gave this result: the
    /// request that fetched it is told so, as PostHog tells it.
    upstream_cached: bool,
}

/// The fields of an insight body that come from the calculation (docs/refresh-semantics.md §2.4:
/// the ones copied from the runner's response), as opposed to the insight's and the tile's own fields
/// (`name`, `color`, `layouts`, `dashboards`, ...); `query_status` is never stored. A variant adopting another variant's result
/// takes exactly these.
pub const RESULT_FIELDS: [&str; 15] = [
    "result",
    "hasMore",
    "columns",
    "last_refresh",
    "cache_key",
    "timezone",
    "next_allowed_client_refresh",
    "cache_target_age",
    "timings",
    "hogql",
    "types",
    "resolved_date_range",
    "filters_hash",
    "query_metadata",
    "calculation_trigger",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("the upstream body is not a JSON object")]
    NotAnObject,
    #[error("the upstream body has no result")]
    NoResult,
    #[error("the upstream body reports an error in query_status")]
    StatusError,
    #[error("the upstream body has no valid last_refresh")]
    NoLastRefresh,
    #[error("the upstream body is for insight {0}, not the one asked for")]
    WrongInsight(String),
}

impl Entry {
    /// Accepts only a well-formed insight with a non-null result and no error: anything else is
    /// never cached (docs/refresh-semantics.md §2.4: errors come back with HTTP 200).
    pub fn from_upstream(body: &[u8], insight: u64, epoch: u64) -> Result<Entry, EntryError> {
        let value: Value = serde_json::from_slice(body).map_err(|_| EntryError::NotAnObject)?;
        Self::from_value(value, insight, epoch)
    }

    pub fn from_value(value: Value, insight: u64, epoch: u64) -> Result<Entry, EntryError> {
        let Value::Object(map) = value else {
            return Err(EntryError::NotAnObject);
        };
        if map.get("result").is_none_or(Value::is_null) {
            return Err(EntryError::NoResult);
        }
        if let Some(Value::Object(qs)) = map.get("query_status") {
            if qs.get("error").and_then(Value::as_bool) == Some(true) {
                return Err(EntryError::StatusError);
            }
        }
        match map.get("id") {
            Some(Value::Number(n)) if n.as_u64() == Some(insight) => {}
            Some(other) => return Err(EntryError::WrongInsight(other.to_string())),
            None => {}
        }
        let last_refresh = map
            .get("last_refresh")
            .and_then(Value::as_str)
            .and_then(parse_datetime)
            .ok_or(EntryError::NoLastRefresh)?;
        let (interval, date_to) = interval_and_date_to(&map);
        let group = group_of(map.get("filters_hash"));
        let upstream_cached = map.get("is_cached").and_then(Value::as_bool).unwrap_or(false);
        let mut entry = Entry::with_group(&map, StaleInfo { last_refresh, interval, date_to }, epoch, 0, group);
        entry.upstream_cached = upstream_cached;
        Ok(entry)
    }

    /// An entry from its stored parts (the shared tier's format: [`Entry::body`]).
    pub fn from_parts(body: Bytes, stale: StaleInfo, epoch: u64, started_ms: i64) -> Entry {
        let map = match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        };
        let group = group_of(map.get("filters_hash"));
        Entry::with_group(&map, stale, epoch, started_ms, group)
    }

    /// Renders `map` in its order, `is_cached` and `query_status` as the hit has them, noting
    /// where their values are (both lead when the map has neither).
    fn with_group(map: &Map<String, Value>, stale: StaleInfo, epoch: u64, started_ms: i64, group: u128) -> Entry {
        let mut hit = Vec::with_capacity(256);
        let mut slots = [0..0, 0..0];
        let mut field = |hit: &mut Vec<u8>, key: &str, value: Option<&Value>| {
            if hit.len() > 1 {
                hit.push(b',');
            }
            serde_json::to_writer(&mut *hit, key).expect("a key serialises");
            hit.push(b':');
            let start = hit.len();
            match (key, value) {
                ("is_cached", _) => hit.extend_from_slice(b"true"),
                ("query_status", _) => hit.extend_from_slice(b"null"),
                (_, Some(v)) => serde_json::to_writer(&mut *hit, v).expect("a value serialises"),
                (_, None) => hit.extend_from_slice(b"null"),
            }
            match key {
                "is_cached" => slots[0] = start..hit.len(),
                "query_status" => slots[1] = start..hit.len(),
                _ => {}
            }
        };
        hit.push(b'{');
        for key in ["is_cached", "query_status"] {
            if !map.contains_key(key) {
                field(&mut hit, key, None);
            }
        }
        for (k, v) in map {
            field(&mut hit, k, Some(v));
        }
        hit.push(b'}');
        // A large body goes to a sealed file (sent without copying), any other to an allocation
        // of the exact size: the writer's spare capacity would otherwise be cached with every body
        // (up to 2x the bytes).
        let (hit, file) = match sealed::seal(&hit) {
            Some((hit, file)) => (hit, Some(file)),
            None => (Bytes::copy_from_slice(&hit), None),
        };
        Entry {
            hit,
            file,
            slots,
            stale,
            epoch,
            started_ms,
            version: None,
            reads: AtomicU32::new(0),
            ahead: AtomicBool::new(false),
            group,
            confirmed_ms: started_ms,
            upstream_cached: false,
        }
    }

    /// Whether the upstream answered this result from its own cache.
    pub fn upstream_cached(&self) -> bool {
        self.upstream_cached
    }

    /// Sets when the calculation (or the read of the upstream's cache) started, wall clock in ms;
    /// that is also when the upstream confirmed this variant's cache key.
    pub fn stamped(mut self, started_ms: i64) -> Entry {
        self.started_ms = started_ms;
        self.confirmed_ms = started_ms;
        self
    }

    /// Sets the shared tier's version taken before the calculation started.
    pub fn versioned(mut self, version: Option<u64>) -> Entry {
        self.version = version;
        self
    }

    /// This variant's entry with the result of `fresh`, another variant of the same upstream cache
    /// key: the calculation's fields from `fresh`, everything else (tile colour, layouts, the
    /// insight's own fields) from `self`. `None` if either body is not a JSON object.
    pub fn adopt(&self, fresh: &Entry) -> Option<Entry> {
        let Ok(Value::Object(mut own)) = serde_json::from_slice::<Value>(&self.body()) else { return None };
        let Ok(Value::Object(theirs)) = serde_json::from_slice::<Value>(&fresh.body()) else { return None };
        for field in RESULT_FIELDS {
            match theirs.get(field) {
                Some(v) => own.insert(field.into(), v.clone()),
                None => own.remove(field),
            };
        }
        let mut e = Entry::with_group(&own, fresh.stale, fresh.epoch, fresh.started_ms, fresh.group);
        e.confirmed_ms = self.confirmed_ms;
        e.version = fresh.version;
        Some(e)
    }

    /// The stored body (the shared tier keeps it): the hit's rendering.
    pub fn body(&self) -> Bytes {
        self.hit.clone()
    }

    /// The sealed file the hit's rendering is a mapping of (large bodies only).
    pub fn file(&self) -> Option<&SealedFile> {
        self.file.as_ref()
    }

    /// The answer body: the stored fields with `is_cached` and `query_status` spliced in.
    pub fn render(&self, is_cached: bool, query_status: Option<&[u8]>) -> Bytes {
        if is_cached && query_status.is_none() {
            return self.hit.clone();
        }
        let cached: &[u8] = if is_cached { b"true" } else { b"false" };
        let mut values = [(&self.slots[0], cached), (&self.slots[1], query_status.unwrap_or(b"null"))];
        values.sort_by_key(|(at, _)| at.start);
        let mut out = BytesMut::with_capacity(self.hit.len() + values[1].1.len() + 1);
        let mut from = 0;
        for (at, value) in values {
            out.put_slice(&self.hit[from..at.start]);
            out.put_slice(value);
            from = at.end;
        }
        out.put_slice(&self.hit[from..]);
        out.freeze()
    }

    /// The stored body as a JSON value (for list pages and status results, not the hit path).
    pub fn to_value(&self, is_cached: bool) -> Value {
        let mut v: Value = serde_json::from_slice(&self.body()).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.insert("is_cached".into(), Value::Bool(is_cached));
            m.insert("query_status".into(), Value::Null);
        }
        v
    }

    /// Counts a read; returns the reads so far, this one included.
    pub fn note_read(&self) -> u32 {
        self.reads.fetch_add(1, Ordering::Relaxed).saturating_add(1)
    }

    /// True for the first caller only: that caller schedules the refresh-ahead.
    pub fn claim_refresh_ahead(&self) -> bool {
        !self.ahead.swap(true, Ordering::Relaxed)
    }

    /// Lets a later read schedule the refresh-ahead again (the scheduled one could not run).
    pub fn unclaim_refresh_ahead(&self) {
        self.ahead.store(false, Ordering::Relaxed);
    }

    /// Bytes this entry holds, for the cache's weigher.
    pub fn weight(&self) -> usize {
        sealed::footprint(self.hit.len(), self.file.is_some()) + std::mem::size_of::<Entry>()
    }

    pub fn last_refresh(&self) -> OffsetDateTime {
        self.stale.last_refresh
    }

    /// The result's `next_allowed_client_refresh`, read from the body when asked (only forced
    /// reads ask, under `[refresh] forced_min_interval`).
    pub fn next_allowed_refresh(&self) -> Option<OffsetDateTime> {
        #[derive(serde::Deserialize)]
        struct Field<'a> {
            #[serde(borrow)]
            next_allowed_client_refresh: Option<&'a str>,
        }
        let field: Field = serde_json::from_slice(&self.hit).ok()?;
        parse_datetime(field.next_allowed_client_refresh?)
    }
}

/// The hash of the upstream's cache key (`filters_hash`); 0 when there is none.
fn group_of(filters_hash: Option<&Value>) -> u128 {
    match filters_hash {
        Some(Value::String(s)) if !s.is_empty() => {
            let h = blake3::hash(s.as_bytes());
            u128::from_le_bytes(h.as_bytes()[..16].try_into().expect("16 bytes")).max(1)
        }
        _ => 0,
    }
}

/// The query's interval and the end of a fixed date range, from `query` (which upstream returns
/// with dashboard filters and overrides applied). No interval but a date range: PostHog's default
/// `day`; neither: `minute`, as for runners without a date range (docs/refresh-semantics.md §3.1).
fn interval_and_date_to(map: &Map<String, Value>) -> (Interval, Option<OffsetDateTime>) {
    let query = map.get("query");
    let source = query.and_then(|q| q.get("source")).or(query);
    let Some(source) = source else {
        return (Interval::Minute, None);
    };
    let date_range = source.get("dateRange");
    let interval = match source.get("interval").and_then(Value::as_str).and_then(|s| s.parse().ok()) {
        Some(i) => i,
        None if date_range.is_some() => Interval::Day,
        None => Interval::Minute,
    };
    let date_to = date_range.and_then(|d| d.get("date_to")).and_then(Value::as_str).and_then(parse_fixed_date);
    (interval, date_to)
}

/// An absolute `date_to` ("2024-01-31" → the end of that day, or a full datetime); relative values
/// such as "-1d" are not fixed and yield `None`.
fn parse_fixed_date(s: &str) -> Option<OffsetDateTime> {
    if let Some(t) = parse_datetime(s) {
        return Some(t);
    }
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(s.get(..10)?, &fmt).ok()?;
    Some(date.with_hms(23, 59, 59).ok()?.assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn accepts_a_good_insight_and_renders_it() {
        let b = body(json!({"id": 7, "result": [1], "last_refresh": "2026-01-01T00:00:00Z", "is_cached": false,
            "query_status": null, "query": {"kind":"InsightVizNode","source":{"interval":"hour","dateRange":{"date_to":null}}}}));
        let e = Entry::from_upstream(&b, 7, 1).unwrap();
        assert_eq!(e.stale.interval, Interval::Hour);
        assert_eq!(e.stale.date_to, None);
        let out: Value = serde_json::from_slice(&e.render(true, Some(b"{\"id\":\"x\"}"))).unwrap();
        assert_eq!(out["is_cached"], json!(true));
        assert_eq!(out["query_status"], json!({"id":"x"}));
        assert_eq!(out["result"], json!([1]));
        let out: Value = serde_json::from_slice(&e.render(false, None)).unwrap();
        assert_eq!(out["is_cached"], json!(false));
        assert_eq!(out["query_status"], Value::Null);
        let out: Value = serde_json::from_slice(&e.render(true, None)).unwrap();
        assert_eq!(out["is_cached"], json!(true));
        assert_eq!(out["query_status"], Value::Null);
        assert_eq!(out["result"], json!([1]));
        let stored: Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(stored["result"], json!([1]));
        assert_eq!(stored["query_status"], Value::Null, "a status is never stored");
    }

    #[test]
    fn numbers_are_rendered_as_the_upstream_wrote_them() {
        let b = br#"{"id":7,"result":[18446744073709551617,1.10,-0.0],"last_refresh":"2026-01-01T00:00:00Z"}"#;
        let e = Entry::from_upstream(b, 7, 1).unwrap();
        let out = String::from_utf8(e.render(true, None).to_vec()).unwrap();
        assert!(out.contains("[18446744073709551617,1.10,-0.0]"), "{out}");
    }

    #[test]
    fn an_empty_object_renders_valid_json() {
        let stale = StaleInfo { last_refresh: OffsetDateTime::UNIX_EPOCH, interval: Interval::Day, date_to: None };
        let e = Entry::from_parts(Bytes::from_static(b"{}"), stale, 1, 0);
        assert_eq!(&e.render(true, None)[..], b"{\"is_cached\":true,\"query_status\":null}");
        assert_eq!(&e.render(false, Some(b"{}"))[..], b"{\"is_cached\":false,\"query_status\":{}}");
        assert_eq!(Entry::from_parts(e.body(), stale, 1, 0).render(false, None), e.render(false, None));
    }

    #[test]
    fn the_upstreams_key_order_is_kept_with_the_per_response_fields_in_place() {
        let b = br#"{"result":[1],"id":7,"is_cached":false,"last_refresh":"2026-01-01T00:00:00Z","query_status":null,"b":1,"a":2}"#;
        let e = Entry::from_upstream(b, 7, 1).unwrap();
        let hit = String::from_utf8(e.render(true, None).to_vec()).unwrap();
        assert_eq!(
            hit,
            r#"{"result":[1],"id":7,"is_cached":true,"last_refresh":"2026-01-01T00:00:00Z","query_status":null,"b":1,"a":2}"#
        );
        let miss = String::from_utf8(e.render(false, Some(br#"{"id":"q"}"#)).to_vec()).unwrap();
        assert_eq!(
            miss,
            r#"{"result":[1],"id":7,"is_cached":false,"last_refresh":"2026-01-01T00:00:00Z","query_status":{"id":"q"},"b":1,"a":2}"#
        );
        let again = Entry::from_parts(e.body(), e.stale, 1, 0);
        assert_eq!(again.render(false, None), e.render(false, None), "the shared tier keeps the layout");
    }

    #[test]
    fn refuses_what_must_not_be_cached() {
        let lr = "2026-01-01T00:00:00Z";
        assert_eq!(Entry::from_upstream(b"nope", 1, 1).unwrap_err(), EntryError::NotAnObject);
        assert_eq!(Entry::from_upstream(b"[1]", 1, 1).unwrap_err(), EntryError::NotAnObject);
        assert_eq!(
            Entry::from_upstream(&body(json!({"id":1,"result":null,"last_refresh":lr})), 1, 1).unwrap_err(),
            EntryError::NoResult
        );
        let err = json!({"id":1,"result":[1],"last_refresh":lr,"query_status":{"error":true,"error_message":"concurrency_limit_exceeded"}});
        assert_eq!(Entry::from_upstream(&body(err), 1, 1).unwrap_err(), EntryError::StatusError);
        assert_eq!(
            Entry::from_upstream(&body(json!({"id":1,"result":[1]})), 1, 1).unwrap_err(),
            EntryError::NoLastRefresh
        );
        assert!(matches!(
            Entry::from_upstream(&body(json!({"id":2,"result":[1],"last_refresh":lr})), 1, 1),
            Err(EntryError::WrongInsight(_))
        ));
    }

    #[test]
    fn fixed_ranges_and_defaults() {
        let lr = "2026-01-01T00:00:00Z";
        let e = Entry::from_upstream(
            &body(json!({"result":[1],"last_refresh":lr,
            "query":{"source":{"dateRange":{"date_from":"2025-01-01","date_to":"2025-01-31"}}}})),
            1,
            1,
        )
        .unwrap();
        assert_eq!(e.stale.interval, Interval::Day);
        assert_eq!(e.stale.date_to, Some(time::macros::datetime!(2025-01-31 23:59:59 UTC)));
        let e =
            Entry::from_upstream(&body(json!({"result":[1],"last_refresh":lr,"query":{"kind":"HogQLQuery"}})), 1, 1)
                .unwrap();
        assert_eq!(e.stale.interval, Interval::Minute);
    }

    #[test]
    fn a_variant_adopts_only_the_calculation_fields() {
        let own = body(json!({"id": 3, "name": "Tile", "color": "blue", "layouts": {"sm": 1}, "result": [1],
            "last_refresh": "2026-01-01T00:00:00Z", "filters_hash": "cache_1_abc", "timings": [1]}));
        let fresh = body(json!({"id": 3, "name": "Tile", "result": [2], "last_refresh": "2026-01-01T01:00:00Z",
            "filters_hash": "cache_1_abc", "hogql": "SELECT 2"}));
        let own = Entry::from_upstream(&own, 3, 1).unwrap().stamped(1_000);
        let fresh = Entry::from_upstream(&fresh, 3, 2).unwrap().stamped(2_000);
        assert_eq!(own.group, fresh.group);
        assert_ne!(own.group, 0);
        let e = own.adopt(&fresh).unwrap();
        let v: Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["color"], json!("blue"));
        assert_eq!(v["layouts"], json!({"sm": 1}));
        assert_eq!(v["result"], json!([2]));
        assert_eq!(v["hogql"], json!("SELECT 2"));
        assert!(v.get("timings").is_none(), "a calculation field the fresh result lacks is dropped");
        assert_eq!(e.last_refresh(), fresh.last_refresh());
        assert_eq!((e.epoch, e.started_ms), (2, 2_000));
        assert_eq!(e.confirmed_ms, 1_000, "the variant's own confirmation is kept");
        let none = Entry::from_upstream(&body(json!({"result": [1], "last_refresh": "2026-01-01T00:00:00Z"})), 3, 1);
        assert_eq!(none.unwrap().group, 0);
    }
}
