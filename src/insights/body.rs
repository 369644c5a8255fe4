//! Answer bodies the proxy builds itself: a cache miss with a query status, the stored timezone
//! of an answer to the proxy's own read, and the answer to a failure nothing cached stands in for.

use bytes::Bytes;
use serde_json::Value;

use super::Reply;
use crate::app::App;
use crate::cache_status::CacheStatus;
use crate::engine::CalcSpec;
use crate::failure::{Failure, CONCURRENCY_LIMIT_EXCEEDED};

/// A cache-miss answer built from the upstream's insight body (PostHog's `NothingInCacheResult`):
/// the insight's metadata with nothing of a calculation, carrying our `query_status`. For
/// `force_async` the cache key is null too. `timezone` is the team's (as the body has it) for a
/// truthy `refresh`, else the stored one: none. Keys keep the upstream's order.
pub(super) fn overlay_miss(body: &[u8], query_status: Option<&[u8]>, force_async: bool, truthy: bool) -> Bytes {
    let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(body) else {
        return Bytes::copy_from_slice(body);
    };
    let qs = query_status.and_then(|q| serde_json::from_slice(q).ok()).unwrap_or(Value::Null);
    let nulled = ["result", "last_refresh", "next_allowed_client_refresh", "cache_target_age", "columns", "hogql"];
    for k in nulled.into_iter().chain(["resolved_date_range", "hasMore"]) {
        if k == "hasMore" && !m.contains_key(k) {
            continue;
        }
        m.insert(k.into(), Value::Null);
    }
    if !truthy {
        m.insert("timezone".into(), Value::Null);
    }
    if force_async {
        m.insert("filters_hash".into(), Value::Null);
    }
    m.insert("is_cached".into(), Value::Bool(false));
    m.insert("query_status".into(), qs);
    Bytes::from(Value::Object(m).to_string())
}

/// The upstream's miss answer to the proxy's truthy `refresh=force_cache`, as a client whose
/// `refresh` is absent or false-ish gets it: the stored timezone, which for nothing stored is none.
pub(super) fn stored_timezone(body: &[u8]) -> Bytes {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut m)) if m.get("result").is_none_or(Value::is_null) => {
            m.insert("timezone".into(), Value::Null);
            Bytes::from(Value::Object(m).to_string())
        }
        _ => Bytes::copy_from_slice(body),
    }
}

/// The insight with nothing calculated, for a miss the proxy answers without the upstream's
/// body (no budget left even for a read).
pub(super) fn nothing_cached(insight: u64) -> Bytes {
    let body = serde_json::json!({
        "id": insight, "result": null, "last_refresh": null, "is_cached": false,
        "timezone": null, "next_allowed_client_refresh": null, "cache_target_age": null,
    });
    Bytes::from(body.to_string())
}

/// The answer when nothing cached can stand in for a failed upstream call. Over budget it is what
/// PostHog answers when a team runs too many queries: HTTP 200, no result, an error status
/// (docs/refresh-semantics.md §6).
pub(super) fn failure_reply(app: &App, spec: &CalcSpec, f: &Failure, cache_status: CacheStatus) -> Reply {
    match f {
        Failure::Budget => {}
        // The upstream's own error answer, as PostHog gave it (status, body, `Retry-After`).
        Failure::Status(answer) => return Reply::relay(answer, cache_status),
        _ => return Reply::error(&f.to_api_error(), cache_status),
    }
    let now = crate::clock::format_datetime(app.clock.now());
    let body = serde_json::json!({
        "id": spec.insight,
        "result": null,
        "last_refresh": now,
        "is_cached": false,
        "query_status": {
            "id": null,
            "team_id": spec.project,
            "insight_id": spec.insight,
            "dashboard_id": spec.dashboard_id(),
            "query_async": true,
            "complete": true,
            "error": true,
            "error_message": CONCURRENCY_LIMIT_EXCEEDED,
        },
    });
    Reply::json(200, Bytes::from(body.to_string()), cache_status)
}
