//! Insight queries: dashboard/override filters (§8), the runnable "plan" of a query and its
//! cache key (`cache_{team_id}_{hex}`, a content hash that ignores the principal).

use crate::dates::{self, DateRange};
use crate::staleness::{Interval, StaleInfo};
use serde_json::{json, Map, Value};
use std::fmt::Write as _;
use time::OffsetDateTime;

/// The query kinds the simulator calculates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Trends,
    Funnels,
    /// Any other query kind: it still gets a cache key, a status and an (empty) result.
    Other,
}

/// One series (trends) or step (funnels).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Series {
    pub event: String,
    pub math: String,
    pub custom_name: Option<String>,
}

/// Everything a calculation needs, resolved at request time.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub kind: Kind,
    /// `TrendsQueryRunner` and so on; part of the cache key.
    pub runner: String,
    /// The effective source query (filters applied).
    pub source: Value,
    pub interval: Interval,
    pub range: DateRange,
    pub series: Vec<Series>,
}

impl Plan {
    /// What staleness needs to know about a result of this plan calculated at `last_refresh`.
    pub fn stale_info(&self, last_refresh: OffsetDateTime) -> StaleInfo {
        StaleInfo { last_refresh, interval: self.interval, date_to: Some(self.range.to) }
    }

    pub fn custom_names(&self) -> Vec<Option<String>> {
        self.series.iter().map(|s| s.custom_name.clone()).collect()
    }
}

/// `{"kind":"InsightVizNode","source":{…}}` → the source; a bare source is its own source.
pub(crate) fn source_of(query: &Value) -> Option<&Value> {
    match query.get("kind").and_then(Value::as_str) {
        Some("InsightVizNode" | "DataVisualizationNode" | "DataTableNode") => query.get("source"),
        Some(_) => Some(query),
        None => None,
    }
}

fn source_of_mut(query: &mut Value) -> Option<&mut Value> {
    let wrapped = matches!(
        query.get("kind").and_then(Value::as_str),
        Some("InsightVizNode" | "DataVisualizationNode" | "DataTableNode")
    );
    if wrapped {
        query.get_mut("source").filter(|s| s.is_object())
    } else if query.get("kind").is_some_and(Value::is_string) {
        Some(query)
    } else {
        None
    }
}

/// What a legacy insight without a query is calculated as (`filter_to_query` of empty filters).
pub(crate) fn default_query() -> Value {
    json!({
        "kind": "InsightVizNode",
        "source": {
            "kind": "TrendsQuery",
            "interval": "day",
            "dateRange": {"date_from": "-7d"},
            "series": [{"kind": "EventsNode", "event": "$pageview", "name": "$pageview", "math": "total"}]
        }
    })
}

fn truthy_str<'a>(filters: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    filters.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// `apply_dashboard_filters` (QR26): merges dashboard-style `filters` (`date_from`, `date_to`,
/// `explicitDate`, `properties`, `interval`, `breakdown_filter`, `filterTestAccounts`) into the
/// query's source. Unknown keys and wrongly typed values are ignored.
pub(crate) fn apply_filters(query: &Value, filters: &Map<String, Value>) -> Value {
    let mut query = query.clone();
    if filters.is_empty() {
        return query;
    }
    let Some(Value::Object(source)) = source_of_mut(&mut query) else {
        return query;
    };

    if let Some(Value::Array(props)) = filters.get("properties").filter(|p| p.as_array().is_some_and(|a| !a.is_empty()))
    {
        let dash = json!({"type": "AND", "values": props});
        let merged = match source.get("properties") {
            Some(Value::Array(own)) if !own.is_empty() => {
                json!({"type": "AND", "values": [{"type": "AND", "values": own}, dash]})
            }
            Some(own @ Value::Object(_)) => json!({"type": "AND", "values": [own, dash]}),
            _ => Value::Array(props.clone()),
        };
        source.insert("properties".into(), merged);
    }

    let date_from = truthy_str(filters, "date_from");
    let date_to = truthy_str(filters, "date_to");
    if date_from.is_some() || date_to.is_some() {
        let range = source.entry("dateRange").or_insert_with(|| json!({}));
        if !range.is_object() {
            *range = json!({});
        }
        if let Value::Object(range) = range {
            for (key, value) in [("date_from", date_from), ("date_to", date_to)] {
                match value {
                    Some(v) => range.insert(key.into(), v.into()),
                    None => range.remove(key),
                };
            }
            if let Some(explicit) = filters.get("explicitDate").and_then(Value::as_bool) {
                range.insert("explicitDate".into(), explicit.into());
            }
        }
    }

    if let Some(interval) = truthy_str(filters, "interval").filter(|i| i.parse::<Interval>().is_ok()) {
        if matches!(source.get("kind").and_then(Value::as_str), Some("TrendsQuery" | "FunnelsQuery")) {
            source.insert("interval".into(), interval.into());
        }
    }
    if let Some(breakdown @ Value::Object(_)) = filters.get("breakdown_filter") {
        source.insert("breakdownFilter".into(), breakdown.clone());
    }
    if let Some(test_accounts @ Value::Bool(_)) = filters.get("filterTestAccounts") {
        source.insert("filterTestAccounts".into(), test_accounts.clone());
    }
    query
}

/// Resolves a (filters-applied) insight query into what a calculation needs.
pub(crate) fn plan(query: &Value, now: OffsetDateTime) -> Plan {
    let Some(source) = source_of(query).filter(|s| s.is_object()) else {
        return plan(&default_query(), now);
    };
    let kind_name = source.get("kind").and_then(Value::as_str).unwrap_or("TrendsQuery");
    let kind = match kind_name {
        "TrendsQuery" => Kind::Trends,
        "FunnelsQuery" => Kind::Funnels,
        _ => Kind::Other,
    };
    let range_obj = source.get("dateRange");
    // Runners without a date range use "minute" for staleness (§3.1).
    let interval = match source.get("interval").and_then(Value::as_str).and_then(|i| i.parse::<Interval>().ok()) {
        Some(i) => i,
        None if kind != Kind::Other || range_obj.is_some() => Interval::Day,
        None => Interval::Minute,
    };
    let str_field = |k: &str| range_obj.and_then(|r| r.get(k)).and_then(Value::as_str);
    let explicit = range_obj.and_then(|r| r.get("explicitDate")).and_then(Value::as_bool).unwrap_or(false);
    let range = dates::resolve(str_field("date_from"), str_field("date_to"), explicit, interval, now);
    let series = source
        .get("series")
        .and_then(Value::as_array)
        .map(|all| all.iter().take(50).map(parse_series).collect())
        .unwrap_or_default();
    Plan { kind, runner: format!("{kind_name}Runner"), source: source.clone(), interval, range, series }
}

fn parse_series(node: &Value) -> Series {
    let s = |k: &str| node.get(k).and_then(Value::as_str);
    Series {
        event: s("event").or(s("name")).unwrap_or("All events").to_owned(),
        math: s("math").unwrap_or("total").to_owned(),
        custom_name: s("custom_name").map(str::to_owned),
    }
}

/// The source as hashed: without `tags` and per-series `custom_name` (QR26 `get_cache_payload`).
fn hashed_source(source: &Value) -> Value {
    let mut source = source.clone();
    if let Value::Object(map) = &mut source {
        map.remove("tags");
        if let Some(Value::Array(series)) = map.get_mut("series") {
            for node in series.iter_mut() {
                if let Value::Object(node) = node {
                    node.remove("custom_name");
                }
            }
        }
    }
    source
}

/// `cache_{team_id}_{blake3 hex}` of the runner, the effective source, the team and its timezone
/// (and the variables, when any). The principal is not part of it, as upstream.
pub(crate) fn cache_key(team_id: u64, timezone: &str, plan: &Plan, variables: &Map<String, Value>) -> String {
    let mut payload = json!({
        "query_runner": plan.runner,
        "query": hashed_source(&plan.source),
        "team_id": team_id,
        "hogql_modifiers": {},
        "limit_context": "query",
        "timezone": timezone,
        "version": 2,
    });
    if !variables.is_empty() {
        payload["variables"] = Value::Object(variables.clone());
    }
    let mut canonical = String::new();
    write_canonical(&payload, &mut canonical);
    format!("cache_{team_id}_{}", blake3::hash(canonical.as_bytes()).to_hex())
}

/// A seed for the demo numbers of a query: everything but the date range, interval and names,
/// so overlapping ranges agree on a bucket's value.
pub(crate) fn data_seed(seed: u64, plan: &Plan) -> u64 {
    let mut source = hashed_source(&plan.source);
    if let Value::Object(map) = &mut source {
        map.remove("dateRange");
        map.remove("interval");
    }
    let mut canonical = seed.to_string();
    write_canonical(&source, &mut canonical);
    let hash = blake3::hash(canonical.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(bytes)
}

/// JSON with object keys sorted at every level (orjson `OPT_SORT_KEYS`), independent of
/// serde_json's map feature flags.
pub(crate) fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{}", Value::String(k.clone()));
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => {
            let _ = write!(out, "{other}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2024-03-13 15:42:10 UTC);

    fn trends() -> Value {
        json!({"kind": "InsightVizNode", "source": {
            "kind": "TrendsQuery", "interval": "day", "dateRange": {"date_from": "-7d", "date_to": null},
            "series": [{"kind": "EventsNode", "event": "$pageview", "math": "total", "custom_name": "Views"}],
            "properties": [{"key": "$os", "value": ["Mac OS X"], "operator": "exact", "type": "event"}]
        }})
    }

    fn filters(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn dashboard_filters_are_applied() {
        let q = apply_filters(
            &trends(),
            &filters(json!({"date_from": "-30d", "interval": "week", "filterTestAccounts": true,
                "properties": [{"key": "$browser", "value": ["Chrome"], "operator": "exact", "type": "event"}],
                "breakdown_filter": {"breakdown": "$browser", "breakdown_type": "event"}, "unknown": 1})),
        );
        let s = &q["source"];
        assert_eq!(s["dateRange"], json!({"date_from": "-30d"}));
        assert_eq!(s["interval"], "week");
        assert_eq!(s["filterTestAccounts"], true);
        assert_eq!(s["breakdownFilter"]["breakdown"], "$browser");
        assert_eq!(s["properties"]["type"], "AND");
        assert_eq!(s["properties"]["values"].as_array().unwrap().len(), 2);
        // empty filters and junk leave the query alone
        assert_eq!(apply_filters(&trends(), &Map::new()), trends());
        assert_eq!(apply_filters(&trends(), &filters(json!({"date_from": "", "interval": "fortnight"}))), trends());
        assert_eq!(apply_filters(&json!([1]), &filters(json!({"date_from": "-1d"}))), json!([1]));
    }

    #[test]
    fn cache_key_is_a_content_hash() {
        let base = plan(&trends(), NOW);
        let key = cache_key(1, "UTC", &base, &Map::new());
        assert!(key.starts_with("cache_1_") && key.len() == "cache_1_".len() + 64);
        assert_eq!(key, cache_key(1, "UTC", &plan(&trends(), NOW), &Map::new()));
        // custom_name and tags do not change it; team, timezone, query, variables do
        let mut renamed = trends();
        renamed["source"]["series"][0]["custom_name"] = "Other".into();
        renamed["source"]["tags"] = json!({"productKey": "x"});
        assert_eq!(key, cache_key(1, "UTC", &plan(&renamed, NOW), &Map::new()));
        assert_ne!(key, cache_key(2, "UTC", &base, &Map::new()));
        assert_ne!(key, cache_key(1, "Europe/Berlin", &base, &Map::new()));
        let dashboard = plan(&apply_filters(&trends(), &filters(json!({"date_from": "-30d"}))), NOW);
        assert_ne!(key, cache_key(1, "UTC", &dashboard, &Map::new()));
        assert_ne!(key, cache_key(1, "UTC", &base, &filters(json!({"v": {"code": "x", "value": 1}}))));
    }

    #[test]
    fn plans() {
        let p = plan(&trends(), NOW);
        assert_eq!((p.kind, p.interval, p.runner.as_str()), (Kind::Trends, Interval::Day, "TrendsQueryRunner"));
        assert_eq!(p.series[0].custom_name.as_deref(), Some("Views"));
        let other = plan(&json!({"kind": "HogQLQuery", "query": "select 1"}), NOW);
        assert_eq!((other.kind, other.interval), (Kind::Other, Interval::Minute));
        let fallback = plan(&Value::Null, NOW);
        assert_eq!((fallback.kind, fallback.series.len()), (Kind::Trends, 1));
    }
}
