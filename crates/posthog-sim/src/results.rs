//! Demo result payloads shaped like PostHog's trends/funnels responses, plus generated HogQL.
//!
//! Numbers are a pure function of (seed, query content, bucket time), so a recalculation gives
//! the same data; only `calculation_number` in every series/step object changes, which lets
//! tests tell a recalculation from a cache hit.

use crate::dates;
use crate::query::{data_seed, Kind, Plan, Series};
use crate::staleness::Interval;
use serde_json::{json, Value};
use time::OffsetDateTime;

pub(crate) struct Computed {
    /// The serialized `results` array.
    pub results: String,
    pub hogql: String,
}

pub(crate) fn compute(seed: u64, plan: &Plan, calculation_number: u64) -> Computed {
    let ds = data_seed(seed, plan);
    let results = match plan.kind {
        Kind::Trends => trends(ds, plan, calculation_number),
        Kind::Funnels => funnels(ds, plan, calculation_number),
        Kind::Other => Value::Array(Vec::new()),
    };
    Computed { results: results.to_string(), hogql: hogql(plan) }
}

/// SplitMix64: a tiny, well-mixed deterministic hash.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn mix3(a: u64, b: u64, c: u64) -> u64 {
    mix(a ^ mix(b ^ mix(c)))
}

/// Share of a day's events that fall in one bucket.
fn bucket_scale(interval: Interval) -> f64 {
    match interval {
        Interval::Second => 1.0 / 86_400.0,
        Interval::Minute => 1.0 / 1440.0,
        Interval::Hour => 1.0 / 24.0,
        Interval::Day => 1.0,
        Interval::Week => 7.0,
        Interval::Month => 30.0,
        Interval::Quarter => 91.0,
        Interval::Year => 365.0,
    }
}

fn default_series() -> Vec<Series> {
    vec![Series { event: "$pageview".into(), math: "total".into(), custom_name: None }]
}

fn trends(ds: u64, plan: &Plan, calculation_number: u64) -> Value {
    let buckets = dates::buckets(&plan.range, plan.interval);
    let labels: Vec<String> = buckets.iter().map(|t| dates::label(*t, plan.interval)).collect();
    let days: Vec<String> = buckets.iter().map(|t| dates::day(*t, plan.interval)).collect();
    let series = if plan.series.is_empty() { default_series() } else { plan.series.clone() };
    let filter = json!({
        "insight": "TRENDS",
        "interval": plan.interval.name(),
        "date_from": crate::datetime::format_datetime(plan.range.from),
        "date_to": crate::datetime::format_datetime(plan.range.to),
        "display": plan.source.pointer("/trendsFilter/display").cloned().unwrap_or("ActionsLineGraph".into()),
        "entity_type": "events",
        "filter_test_accounts": plan.source.get("filterTestAccounts").cloned().unwrap_or(false.into()),
    });
    let out: Vec<Value> = series
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let level = 200.0 + (mix3(ds, i as u64, 0) % 4000) as f64;
            let level = if s.math == "total" { level } else { level * 0.35 };
            let data: Vec<u64> = buckets.iter().map(|t| bucket_value(ds, i as u64, *t, level, plan.interval)).collect();
            let count: u64 = data.iter().sum();
            json!({
                "action": {
                    "id": s.event, "type": "events", "order": i, "name": s.event,
                    "custom_name": s.custom_name, "math": s.math, "math_property": null,
                    "math_hogql": null, "math_group_type_index": null, "properties": {},
                },
                "label": s.event,
                "count": count,
                "data": data,
                "labels": labels,
                "days": days,
                "filter": filter,
                "calculation_number": calculation_number,
            })
        })
        .collect();
    Value::Array(out)
}

fn bucket_value(ds: u64, series: u64, t: OffsetDateTime, level: f64, interval: Interval) -> u64 {
    let h = mix3(ds, series.wrapping_add(1), t.unix_timestamp() as u64);
    let weekend = if interval == Interval::Day && t.weekday().number_days_from_monday() >= 5 { 0.6 } else { 1.0 };
    let noise = 0.7 + (h % 600) as f64 / 1000.0;
    (level * bucket_scale(interval) * weekend * noise).round() as u64
}

fn funnels(ds: u64, plan: &Plan, calculation_number: u64) -> Value {
    let steps = if plan.series.len() >= 2 {
        plan.series.clone()
    } else {
        let mut s = if plan.series.is_empty() { default_series() } else { plan.series.clone() };
        s.push(Series { event: "signed_up".into(), math: "total".into(), custom_name: None });
        s
    };
    let days = plan.range.span().whole_days().clamp(0, 3650) as f64;
    let from_day = plan.range.from.unix_timestamp() as u64 / 86_400;
    let to_day = plan.range.to.unix_timestamp() as u64 / 86_400;
    let mut count = ((300 + mix3(ds, from_day, to_day) % 900) as f64 * (days + 1.0).sqrt()).round() as u64;
    let date_from = dates::day(plan.range.from, Interval::Day);
    let date_to = dates::day(plan.range.to, Interval::Day);
    let out: Vec<Value> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let h = mix3(ds, i as u64 + 100, from_day ^ (to_day << 20));
            if i > 0 {
                count = (count as f64 * (0.35 + (h % 55) as f64 / 100.0)).round() as u64;
            }
            let (avg, median) = if i == 0 {
                (Value::Null, Value::Null)
            } else {
                let avg = 60.0 + (h % 86_000) as f64 + 0.25;
                (json!(avg), json!((avg * 0.6).round()))
            };
            let people_url = |kind: &str| {
                format!(
                    "/api/person/funnel/?funnel_step={}&date_from={date_from}&date_to={date_to}&funnel_window_interval=14&funnel_window_interval_unit=day&insight=FUNNELS&{kind}",
                    if kind == "dropped" { -(i as i64 + 1) } else { i as i64 + 1 },
                )
            };
            json!({
                "action_id": s.event, "name": s.event, "custom_name": s.custom_name, "order": i,
                "type": "events", "count": count, "people": [],
                "average_conversion_time": avg, "median_conversion_time": median,
                "converted_people_url": people_url("converted"),
                "dropped_people_url": if i == 0 { Value::Null } else { people_url("dropped").into() },
                "calculation_number": calculation_number,
            })
        })
        .collect();
    Value::Array(out)
}

fn sql_string(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn hogql(plan: &Plan) -> String {
    let (start_fn, interval_fn) = match plan.interval {
        Interval::Second => ("toStartOfSecond", "toIntervalSecond"),
        Interval::Minute => ("toStartOfMinute", "toIntervalMinute"),
        Interval::Hour => ("toStartOfHour", "toIntervalHour"),
        Interval::Day => ("toStartOfDay", "toIntervalDay"),
        Interval::Week => ("toStartOfWeek", "toIntervalWeek"),
        Interval::Month => ("toStartOfMonth", "toIntervalMonth"),
        Interval::Quarter => ("toStartOfQuarter", "toIntervalQuarter"),
        Interval::Year => ("toStartOfYear", "toIntervalYear"),
    };
    let from = dates::sql_datetime(plan.range.from);
    let to = dates::sql_datetime(plan.range.to);
    let range = format!(
        "greaterOrEquals(timestamp, {start_fn}(assumeNotNull(toDateTime('{from}')))), lessOrEquals(timestamp, assumeNotNull(toDateTime('{to}')))"
    );
    match plan.kind {
        Kind::Other => plan.source.get("query").and_then(Value::as_str).unwrap_or("SELECT 1").to_owned(),
        Kind::Funnels => {
            let events: Vec<String> = plan.series.iter().map(|s| sql_string(&s.event)).collect();
            format!(
                "SELECT countIf(ifNull(equals(steps, 1), 0)) AS step_1, countIf(ifNull(equals(steps, 2), 0)) AS step_2 FROM (SELECT aggregation_target, steps FROM (SELECT person_id AS aggregation_target, timestamp, event FROM events AS e WHERE and({range}, in(event, tuple({}))))) LIMIT 100 SETTINGS readonly=2, max_execution_time=60",
                events.join(", ")
            )
        }
        Kind::Trends => {
            let series = if plan.series.is_empty() { default_series() } else { plan.series.clone() };
            series
                .iter()
                .map(|s| {
                    format!(
                        "SELECT arrayMap(number -> plus({start_fn}(assumeNotNull(toDateTime('{from}'))), {interval_fn}(number)), range(0, plus(coalesce(dateDiff('{}', {start_fn}(assumeNotNull(toDateTime('{from}'))), {start_fn}(assumeNotNull(toDateTime('{to}'))))), 1))) AS date, groupArray(count) AS total FROM (SELECT count() AS count, {start_fn}(timestamp) AS day_start FROM events AS e WHERE and({range}, equals(event, {})) GROUP BY day_start ORDER BY day_start ASC) LIMIT 50000",
                        plan.interval.name(),
                        sql_string(&s.event),
                    )
                })
                .collect::<Vec<_>>()
                .join(" UNION ALL ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::plan;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2024-03-13 15:42:10 UTC);

    #[test]
    fn deterministic_except_calculation_number() {
        let q = json!({"kind": "TrendsQuery", "interval": "day", "dateRange": {"date_from": "-7d"},
            "series": [{"kind": "EventsNode", "event": "it's"}]});
        let p = plan(&q, NOW);
        let a: Value = serde_json::from_str(&compute(42, &p, 1).results).unwrap();
        let b: Value = serde_json::from_str(&compute(42, &p, 2).results).unwrap();
        let c: Value = serde_json::from_str(&compute(43, &p, 1).results).unwrap();
        assert_eq!(a[0]["data"], b[0]["data"]);
        assert_ne!(a[0]["data"], c[0]["data"]);
        assert_eq!((a[0]["calculation_number"].as_u64(), b[0]["calculation_number"].as_u64()), (Some(1), Some(2)));
        assert_eq!(a[0]["data"].as_array().unwrap().len(), 8);
        assert!(compute(42, &p, 1).hogql.contains("'it\\'s'"));
    }

    #[test]
    fn funnel_counts_decrease() {
        let q = json!({"kind": "FunnelsQuery", "series": [{"event": "a"}, {"event": "b"}, {"event": "c"}]});
        let r: Value = serde_json::from_str(&compute(1, &plan(&q, NOW), 1).results).unwrap();
        let counts: Vec<u64> = r.as_array().unwrap().iter().map(|s| s["count"].as_u64().unwrap()).collect();
        assert_eq!(counts.len(), 3);
        assert!(counts.windows(2).all(|w| w[0] >= w[1]), "{counts:?}");
    }
}
