//! A request's state from the front door to the end of its answer, and what is recorded when it
//! ends (metrics and the access log line), the same on the fast path and pingora's.

use std::time::Instant;

use crate::cache_status::CacheStatus;
use crate::config::AccessLog;
use crate::refresh::RefreshMode;
use crate::routes::Route;

use super::InsightsProxy;

#[derive(Debug)]
pub struct RequestCtx {
    pub(super) started: Instant,
    /// Where the request went (`None` until routed: refused at the front door).
    pub(super) route: Option<Route>,
    pub(super) mode: Option<RefreshMode>,
    pub(crate) cache_status: Option<CacheStatus>,
    /// A write to this insight is being passed through: purge it once the upstream accepts it.
    pub(super) purge_on_success: Option<(u64, u64)>,
    pub(super) body_bytes: usize,
    /// For a passed-through JSON answer: the upstream's origin and the proxy's, and the body so far.
    pub(super) relink: Option<Relink>,
    /// For `POST insights/cancel`: whose status its body's `client_query_id` may drop.
    pub(super) cancel: Option<Cancel>,
    /// When a passed-through request's answer must be complete: the proxy's own upstream calls
    /// get `connect_timeout + read_timeout` in total, and so does a pass-through.
    pub(super) upstream_deadline: Option<Instant>,
}

impl RequestCtx {
    pub(crate) fn new() -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            route: None,
            mode: None,
            cache_status: None,
            purge_on_success: None,
            body_bytes: 0,
            relink: None,
            cancel: None,
            upstream_deadline: None,
        }
    }
}

/// Absolute links the upstream builds from its own host (a list's `next`/`previous`) are pointed
/// back at the proxy, so clients never leave it. Needs the whole body, so it is buffered (bounded).
#[derive(Debug)]
pub(super) struct Relink {
    pub(super) from: Vec<u8>,
    pub(super) to: Vec<u8>,
    pub(super) body: Vec<u8>,
    pub(super) overflowed: bool,
}

/// A cancel request's body as it passes, to find the `client_query_id` it names.
#[derive(Debug)]
pub(super) struct Cancel {
    pub(super) owner: crate::cache::Partition,
    pub(super) body: Vec<u8>,
}

impl InsightsProxy {
    /// Metrics and the access log line of a finished request.
    pub(crate) fn log_request(&self, method: &http::Method, path: &str, status: u16, ctx: &RequestCtx) {
        let elapsed = ctx.started.elapsed().as_secs_f64();
        let label = ctx.cache_status.as_ref().map_or("none", CacheStatus::label);
        let route = ctx.route.as_ref().map_or("passthrough", Route::label);
        let mode = ctx.mode.map_or("-", RefreshMode::as_str);
        self.app.metrics.observe_request(route, mode, label, elapsed);
        let from_cache = matches!(label, "hit" | "stale");
        match self.app.config.access_log {
            AccessLog::All => {}
            AccessLog::Misses if !from_cache => {}
            AccessLog::Misses | AccessLog::None => return,
        }
        // The path only: a query string may carry `personal_api_key`.
        tracing::info!(
            // The target operators filter on (`config/example.toml`), kept when the module moved.
            target: "insights_proxy::proxy",
            method = %method,
            path,
            route,
            mode,
            status,
            cache = %ctx.cache_status.as_ref().map_or_else(|| "-".to_string(), ToString::to_string),
            ms = elapsed * 1000.0,
            "request"
        );
    }
}
