//! JSON bodies: the insight serializers (full and basic, §4, §8), query statuses (§5) and the
//! cached query response stored in a finished status.
//!
//! Results are kept serialized and spliced in, so a cache hit never re-serializes 50 KB.

use crate::data::{DataSet, Insight, Project, Tile, User};
use crate::datetime::format_datetime;
use crate::engine::{Entry, Outcome, QueryStatus};
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use time::OffsetDateTime;

/// Inserts `"key": raw` (raw JSON) at the front of a serialized JSON object.
pub(crate) fn splice(object: &str, key: &str, raw: &str) -> String {
    let rest = object.strip_prefix('{').unwrap_or("}");
    let mut out = String::with_capacity(object.len() + key.len() + raw.len() + 4);
    out.push('{');
    out.push_str(&Value::String(key.to_owned()).to_string());
    out.push(':');
    out.push_str(raw);
    if rest != "}" {
        out.push(',');
    }
    out.push_str(rest);
    out
}

fn dt(t: Option<OffsetDateTime>) -> Value {
    t.map_or(Value::Null, |t| Value::String(format_datetime(t)))
}

/// Django's `DjangoJSONEncoder` (used by the polling endpoint): milliseconds, `Z`.
fn django_dt(t: Option<OffsetDateTime>) -> Value {
    t.map_or(Value::Null, |t| {
        let ms = t.millisecond();
        let s = format_datetime(t.replace_nanosecond(u32::from(ms) * 1_000_000).unwrap_or(t));
        Value::String(s)
    })
}

/// `UserBasicSerializer`.
pub(crate) fn user(u: Option<&User>) -> Value {
    u.map_or(Value::Null, |u| {
        json!({
            "id": u.id, "uuid": u.uuid, "distinct_id": u.distinct_id, "first_name": u.first_name,
            "last_name": u.last_name, "email": u.email, "is_email_verified": true,
            "hedgehog_config": null, "role_at_organization": null,
        })
    })
}

/// How datetimes in a status are written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum DateStyle {
    /// orjson inside insight bodies.
    Orjson,
    /// Django's encoder on `/query/:id/`.
    Django,
}

/// A `QueryStatus` with every field, as `model_dump` gives it.
pub(crate) fn status(s: &QueryStatus, style: DateStyle, progress: Option<Value>) -> String {
    let d = |t| {
        if style == DateStyle::Django {
            django_dt(t)
        } else {
            dt(t)
        }
    };
    let map = json!({
        "id": s.id, "team_id": s.team_id, "insight_id": s.insight_id, "dashboard_id": s.dashboard_id,
        "complete": s.complete, "error": s.error, "error_message": s.error_message,
        "start_time": d(s.start_time), "pickup_time": d(s.pickup_time), "end_time": d(s.end_time),
        "expiration_time": d(s.expiration_time), "task_id": s.task_id, "query_async": true,
        "query_progress": progress, "labels": null,
    });
    splice(&map.to_string(), "results", s.results.as_deref().unwrap_or("null"))
}

/// The `Cached*QueryResponse` a finished async task stores as `query_status.results`.
pub(crate) fn query_response(e: &Entry) -> String {
    let map = json!({
        "cache_key": e.cache_key, "cache_target_age": dt(e.cache_target_age), "calculation_trigger": null,
        "columns": null, "error": null, "hasMore": null, "hogql": e.hogql, "is_cached": false,
        "last_refresh": dt(Some(e.last_refresh)), "modifiers": {},
        "next_allowed_client_refresh": dt(Some(e.next_allowed_client_refresh)), "query_metadata": null,
        "query_status": null, "resolved_date_range": resolved(e), "timezone": e.timezone, "timings": [],
        "types": null,
    });
    splice(&map.to_string(), "results", &e.results)
}

fn resolved(e: &Entry) -> Value {
    json!({"date_from": format_datetime(e.resolved.from), "date_to": format_datetime(e.resolved.to)})
}

/// Fields shared by the basic and the full serializer.
fn model_fields(data: &DataSet, ins: &Insight, tiles: &[Tile], query: &Value) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("id".into(), ins.id.into());
    m.insert("short_id".into(), ins.short_id.clone().into());
    m.insert("name".into(), ins.name.clone().into());
    m.insert("derived_name".into(), ins.derived_name.clone().into());
    m.insert("filters".into(), json!({}));
    m.insert("query".into(), query.clone());
    m.insert("dashboards".into(), tiles.iter().map(|t| t.dashboard_id).collect::<Vec<_>>().into());
    m.insert(
        "dashboard_tiles".into(),
        tiles.iter().map(|t| json!({"id": t.id, "dashboard_id": t.dashboard_id, "deleted": t.deleted})).collect(),
    );
    m.insert("description".into(), ins.description.clone().into());
    m.insert("saved".into(), ins.saved.into());
    m.insert("tags".into(), ins.tags.clone().into());
    m.insert("updated_at".into(), dt(Some(ins.updated_at)));
    m.insert("created_by".into(), user(data.user(ins.created_by)));
    m.insert("created_at".into(), dt(Some(ins.created_at)));
    m.insert("last_modified_at".into(), dt(Some(ins.last_modified_at)));
    m.insert("favorited".into(), ins.favorited.into());
    m.insert("user_access_level".into(), "editor".into());
    m.insert("last_viewed_at".into(), Value::Null);
    m
}

/// `InsightBasicSerializer` (`?basic=true`): no results or caching fields.
pub(crate) fn insight_basic(data: &DataSet, ins: &Insight, tiles: &[Tile]) -> String {
    let mut m = model_fields(data, ins, tiles, &ins.query);
    m.insert("last_refresh".into(), Value::Null);
    m.insert("refreshing".into(), false.into());
    Value::Object(m).to_string()
}

/// Request-level inputs to the full serializer.
pub(crate) struct Render<'a> {
    pub data: &'a DataSet,
    pub project: &'a Project,
    /// A truthy `refresh` makes `timezone` the team's (INS `get_timezone`).
    pub refresh_truthy: bool,
    /// `client_query_id`, echoed in error statuses.
    pub client_query_id: Option<&'a str>,
    /// `Fault::NullResult`.
    pub null_result: bool,
}

/// One insight in full: model fields, the runner outcome mapped per §2.4, `filters_hash`, and
/// `color`/`layouts` when rendered through a dashboard tile.
pub(crate) fn insight_full(
    r: &Render<'_>,
    ins: &Insight,
    tiles: &[Tile],
    query: &Value,
    outcome: &Outcome,
    current_names: &[Option<String>],
    via_tile: Option<&Tile>,
) -> String {
    let mut m = model_fields(r.data, ins, tiles, query);
    m.insert("order".into(), ins.order.into());
    m.insert("deleted".into(), ins.deleted.into());
    m.insert("last_modified_by".into(), user(r.data.user(ins.last_modified_by)));
    m.insert("is_sample".into(), ins.is_sample.into());
    m.insert("effective_restriction_level".into(), 21.into());
    m.insert("effective_privilege_level".into(), 37.into());
    m.insert("alerts".into(), json!([]));
    m.insert("hasMore".into(), Value::Null);
    m.insert("columns".into(), Value::Null);
    m.insert("types".into(), Value::Null);
    if let Some(tile) = via_tile {
        m.insert("color".into(), tile.color.into());
        m.insert("layouts".into(), tile.layouts.clone());
    }
    let team_tz = Value::from(r.project.timezone);
    let error_status = |message: &str| QueryStatus {
        id: r.client_query_id.map(str::to_owned),
        team_id: r.project.id,
        insight_id: Some(ins.id),
        dashboard_id: via_tile.map(|t| t.dashboard_id),
        error: true,
        error_message: Some(message.to_owned()),
        ..QueryStatus::default()
    };
    let (result, status, timezone): (Option<Cow<'_, str>>, Option<QueryStatus>, Value) = match outcome {
        Outcome::Result { entry, is_cached, status } => {
            m.insert("last_refresh".into(), dt(Some(entry.last_refresh)));
            m.insert("cache_target_age".into(), dt(entry.cache_target_age));
            m.insert("next_allowed_client_refresh".into(), dt(Some(entry.next_allowed_client_refresh)));
            m.insert("is_cached".into(), (*is_cached).into());
            m.insert("hogql".into(), entry.hogql.clone().into());
            m.insert("resolved_date_range".into(), resolved(entry));
            m.insert("filters_hash".into(), entry.cache_key.clone().into());
            let results = match entry.custom_names.as_slice() == current_names {
                true => Cow::Borrowed(&*entry.results),
                false => {
                    with_custom_names(&entry.results, current_names).map_or(Cow::Borrowed(&*entry.results), Cow::Owned)
                }
            };
            (Some(results), status.clone(), entry.timezone.clone().into())
        }
        Outcome::Miss { cache_key, status } => {
            nothing_cached(&mut m, None);
            m.insert("filters_hash".into(), cache_key.clone().into());
            (None, status.clone(), Value::Null)
        }
        Outcome::Enqueued { status } => {
            nothing_cached(&mut m, None);
            m.insert("filters_hash".into(), Value::Null);
            (None, Some(status.clone()), Value::Null)
        }
        Outcome::Concurrency { at } => {
            nothing_cached(&mut m, Some(*at));
            m.insert("filters_hash".into(), Value::Null);
            (None, Some(error_status("concurrency_limit_exceeded")), team_tz.clone())
        }
        Outcome::Failed { message } => {
            nothing_cached(&mut m, None);
            m.insert("filters_hash".into(), Value::Null);
            (None, Some(error_status(message)), team_tz.clone())
        }
    };
    m.insert("timezone".into(), if r.refresh_truthy { team_tz } else { timezone });
    let object = Value::Object(m).to_string();
    let object = splice(
        &object,
        "query_status",
        &status.map_or_else(|| "null".to_owned(), |s| self::status(&s, DateStyle::Orjson, None)),
    );
    let result = if r.null_result { None } else { result };
    splice(&object, "result", result.as_deref().unwrap_or("null"))
}

fn nothing_cached(m: &mut Map<String, Value>, last_refresh: Option<OffsetDateTime>) {
    m.insert("last_refresh".into(), dt(last_refresh));
    m.insert("cache_target_age".into(), Value::Null);
    m.insert("next_allowed_client_refresh".into(), Value::Null);
    m.insert("is_cached".into(), false.into());
    m.insert("hogql".into(), Value::Null);
    m.insert("resolved_date_range".into(), Value::Null);
}

/// QR26 re-applies each series' `custom_name` from the current query on a cache hit.
fn with_custom_names(results: &str, names: &[Option<String>]) -> Option<String> {
    let mut v: Value = serde_json::from_str(results).ok()?;
    for (i, item) in v.as_array_mut()?.iter_mut().enumerate() {
        let name: Value = names.get(i).cloned().flatten().into();
        if let Some(action) = item.get_mut("action").and_then(Value::as_object_mut) {
            action.insert("custom_name".into(), name.clone());
        }
        if let Some(step) = item.as_object_mut().filter(|o| o.contains_key("action_id")) {
            step.insert("custom_name".into(), name);
        }
    }
    Some(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splices() {
        assert_eq!(splice("{\"a\":1}", "r", "[1]"), "{\"r\":[1],\"a\":1}");
        assert_eq!(splice("{}", "r", "null"), "{\"r\":null}");
    }

    #[test]
    fn custom_names_are_patched() {
        let r = r#"[{"action":{"custom_name":null}},{"action_id":"a","custom_name":"x"}]"#;
        let out: Value = serde_json::from_str(&with_custom_names(r, &[Some("A".into())]).unwrap()).unwrap();
        assert_eq!(out[0]["action"]["custom_name"], "A");
        assert_eq!(out[1]["custom_name"], Value::Null);
    }

    #[test]
    fn django_dates_have_milliseconds() {
        let t = time::macros::datetime!(2024-01-02 03:04:05.123456 UTC);
        assert_eq!(django_dt(Some(t)), "2024-01-02T03:04:05.123Z");
        assert_eq!(dt(Some(t)), "2024-01-02T03:04:05.123456Z");
    }
}
