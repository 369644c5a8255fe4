//! Answering insight requests: retrieve ([`retrieve`]), list pages ([`list`]) and polls of the
//! proxy's own query statuses ([`query_status`]). Each handler turns a request into a [`Reply`];
//! what a request does is decided by [`crate::refresh::plan`] and carried out by
//! [`crate::engine::Engine`]; the HTTP glue only parses and writes.

mod answer;
mod body;
mod list;
mod poll;

use std::sync::Arc;

use bytes::Bytes;

use crate::app::App;
use crate::auth::Principal;
use crate::cache::{CacheKey, Partition};
use crate::cache_status::{CacheStatus, Detail, Fwd};
use crate::engine::{CalcSpec, Outcome};
use crate::error::ApiError;
use crate::failure::{Failure, CONCURRENCY_LIMIT_EXCEEDED};
use crate::query::QueryParams;
use crate::refresh::RefreshMode;

pub use list::{client_page_link, list, rewrite_origin, ListCall};
pub use poll::{is_own_query_id, query_status};

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    pub content_type: Option<String>,
    /// How it was produced: its `Cache-Status` header and metric label.
    pub cache_status: CacheStatus,
    /// The upstream's headers relayed with its answer (`Retry-After`, `WWW-Authenticate`).
    pub relayed: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl Reply {
    pub fn json(status: u16, body: Bytes, cache_status: CacheStatus) -> Self {
        Self { status, body, content_type: None, cache_status, relayed: Vec::new() }
    }

    pub fn error(e: &ApiError, cache_status: CacheStatus) -> Self {
        Self::json(e.status, e.body(), cache_status)
    }

    fn relay(resp: &crate::upstream::UpstreamResponse, cache_status: CacheStatus) -> Self {
        Self {
            status: resp.status,
            body: resp.body.clone(),
            content_type: resp.content_type.clone(),
            cache_status,
            relayed: resp.relayed.clone(),
        }
    }
}

/// What the client asked of one insight: the execution mode, and whether its `refresh` counts as
/// one at all (it decides the answer's `timezone`).
#[derive(Debug, Clone, Copy)]
struct Ask {
    mode: RefreshMode,
    truthy: bool,
}

/// One insight request, already routed and parsed.
#[derive(Debug, Clone)]
pub struct InsightCall {
    pub project: u64,
    pub insight: u64,
    pub path: String,
    pub query: QueryParams,
    pub principal: Principal,
    pub mode: RefreshMode,
    /// Whether the client's `refresh` counts as one ([`crate::refresh::RefreshParam::truthy`]).
    pub truthy: bool,
}

pub async fn retrieve(app: &Arc<App>, call: InsightCall) -> Reply {
    let unknown = crate::cache::key::unknown_params(&call.query);
    if unknown > 0 {
        app.metrics.unknown_params.inc_by(unknown as u64);
    }
    let key = CacheKey::new(call.principal.partition(), call.project, call.insight, &call.query);
    let spec = Arc::new(CalcSpec {
        key,
        project: call.project,
        insight: call.insight,
        path: call.path,
        query: call.query,
        principal: call.principal,
    });
    answer::answer(app, &spec, Ask { mode: call.mode, truthy: call.truthy }, None).await
}

/// The upstream's refusal of this principal, answered from memory while it is remembered.
fn remembered_refusal(app: &App, partition: Partition, project: u64, insight: Option<u64>) -> Option<Reply> {
    let r = app.engine.refusal(partition, project, insight)?;
    app.metrics.trust_refusals.with_label_values(&["refused"]).inc();
    Some(Reply::relay(&r, CacheStatus::fwd(Fwd::Bypass).fwd_status(r.status).detail(Detail::Refused)))
}

/// Cached data reaches a principal only while the upstream recently confirmed its access: this
/// asks again with a read that never calculates. `Ok` when cached data may reach it (with the
/// entry the read stored, if any): the upstream accepted it, or the upstream is down, the one
/// failure that lets what we have stand without its word. Otherwise the answer to give instead:
/// the upstream's refusal, or the proxy's own failure (docs/trust.md).
async fn revalidate(app: &Arc<App>, spec: &Arc<CalcSpec>) -> Result<Option<Arc<crate::cache::Entry>>, Reply> {
    match app.engine.revalidate(spec).await {
        Outcome::Stored(e) => Ok(Some(e)),
        Outcome::Relay(r) if r.status == 200 => Ok(None),
        Outcome::Relay(r) => {
            Err(Reply::relay(&r, CacheStatus::fwd(Fwd::Request).fwd_status(r.status).detail(Detail::Revalidated)))
        }
        Outcome::Failed(f) if f.is_upstream_outage() => Ok(None),
        Outcome::Failed(f) => {
            Err(failure_reply(app, spec, &f, CacheStatus::fwd(Fwd::Request).detail(Detail::Failure(f.as_str()))))
        }
    }
}

/// The answer when nothing cached can stand in for a failed upstream call. Over budget it is what
/// PostHog answers when a team runs too many queries: HTTP 200, no result, an error status
/// (docs/refresh-semantics.md §6).
fn failure_reply(app: &App, spec: &CalcSpec, f: &Failure, cache_status: CacheStatus) -> Reply {
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
