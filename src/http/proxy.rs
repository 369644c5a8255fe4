//! The pingora `ProxyHttp` implementation: the front door's decision in `request_filter`, then the
//! pass-through hooks (hop-by-hop headers, the upstream deadline, relinking, purges after writes).

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorType, Result};
use serde_json::Value;

use crate::app::App;
use crate::cache_status::{CacheStatus, Fwd};

use super::answer::answer_with;
use super::ctx::{Relink, RequestCtx};
use super::decide::session_public_base;

/// Hop-by-hop headers (RFC 9110 §7.6.1) are never forwarded. pingora manages `Connection` and
/// keep-alive for each side itself.
const HOP_BY_HOP: [&str; 7] =
    ["connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "proxy-authorization"];

/// The proxy's HTTP side: the front door, its own answers and pass-through, over one [`App`].
pub struct InsightsProxy {
    pub app: Arc<App>,
    pub peer: HttpPeer,
}

/// Passed-through JSON bodies larger than this are streamed without rewriting.
const MAX_RELINK_BYTES: usize = 8 * 1024 * 1024;

fn replace_all(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

/// Fails a pass-through whose upstream answer is taking longer than its total deadline.
fn within_deadline(ctx: &RequestCtx) -> Result<()> {
    if ctx.upstream_deadline.is_some_and(|d| Instant::now() > d) {
        let e = Error::explain(ErrorType::ReadTimedout, "the upstream's answer took longer than its deadline");
        return Err(e.into_up());
    }
    Ok(())
}

#[async_trait]
impl ProxyHttp for InsightsProxy {
    type CTX = RequestCtx;

    /// No downstream modules: pingora's default adds a response-compression module (disabled, level
    /// 0) that is built and consulted on every request for nothing.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        match self.decide(session.as_downstream_mut(), ctx, false).await? {
            Some(reply) => answer_with(session.as_downstream_mut(), ctx, reply).await,
            None => Ok(false),
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Chunked bodies declare no length: count what passes through.
        ctx.body_bytes += body.as_ref().map_or(0, Bytes::len);
        if ctx.body_bytes > self.max_body() {
            return Err(Error::explain(ErrorType::HTTPStatus(413), "request body too large"));
        }
        if let Some(cancel) = ctx.cancel.as_mut() {
            cancel.body.extend_from_slice(body.as_deref().unwrap_or_default());
            if end_of_stream {
                let id = serde_json::from_slice::<Value>(&cancel.body)
                    .ok()
                    .and_then(|v| v.get("client_query_id").and_then(Value::as_str).map(str::to_owned));
                if let Some(id) = id {
                    self.app.statuses.remove(cancel.owner, &id);
                }
            }
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        // A failing upstream is not hammered by pass-through traffic either.
        if !self.app.engine.upstream().breaker().allow() {
            return Err(Error::explain(ErrorType::HTTPStatus(503), "upstream circuit open"));
        }
        Ok(Box::new(self.peer.clone()))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_deadline = Some(Instant::now() + self.app.config.connect_timeout + self.app.config.read_timeout);
        let client_host = upstream_request.headers.get(header::HOST).cloned();
        for h in HOP_BY_HOP {
            upstream_request.remove_header(h);
        }
        // Headers named in `Connection` are hop-by-hop too.
        let named: Vec<String> = session
            .req_header()
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        for h in named {
            upstream_request.remove_header(&h);
        }
        upstream_request.insert_header(header::HOST, self.app.engine.upstream().settings().url.host_header())?;
        if let Some(h) = client_host {
            upstream_request.insert_header("x-forwarded-host", h)?;
        }
        if let Some(addr) = session.client_addr().and_then(|a| a.as_inet()) {
            let ip = addr.ip().to_string();
            let xff = match upstream_request.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
                Some(prev) => format!("{prev}, {ip}"),
                None => ip,
            };
            upstream_request.insert_header("x-forwarded-for", xff)?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let is_json = upstream_response
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let encoded = upstream_response.headers.contains_key(header::CONTENT_ENCODING);
        if is_json && !encoded && session.req_header().uri.path().starts_with("/api/") {
            let origin = self.app.engine.upstream().settings().url.origin();
            let base = session_public_base(&self.app, session.as_downstream());
            if origin != base {
                ctx.relink = Some(Relink {
                    from: format!("\"{origin}/").into_bytes(),
                    to: format!("\"{base}/").into_bytes(),
                    body: Vec::new(),
                    overflowed: false,
                });
                // The length changes: chunked framing keeps the connection reusable (without it
                // the body would be close-delimited).
                upstream_response.remove_header(&header::CONTENT_LENGTH);
                if session.req_header().version != http::Version::HTTP_10 {
                    upstream_response.insert_header(header::TRANSFER_ENCODING, "chunked")?;
                }
            }
        }
        if let Some(loc) = upstream_response.headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) {
            let origin = self.app.engine.upstream().settings().url.origin();
            if let Some(rest) = loc.strip_prefix(&origin) {
                let rewritten = format!("{}{rest}", session_public_base(&self.app, session.as_downstream()));
                upstream_response.insert_header(header::LOCATION, rewritten)?;
            }
        }
        self.app.engine.upstream().breaker().record(upstream_response.status.as_u16() < 500);
        if let Some((project, insight)) = ctx.purge_on_success {
            if upstream_response.status.is_success() {
                self.app.cache.purge_insight(project, insight);
            }
        }
        // Every answer says how it was produced, a passed-through one too.
        let cs = ctx.cache_status.get_or_insert_with(|| CacheStatus::fwd(Fwd::Bypass));
        upstream_response.insert_header("cache-status", cs.to_string())?;
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        _upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A head that arrived after the deadline (dripped a byte per read timeout) is not relayed.
        within_deadline(ctx)
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        // The upstream's per-read timeout alone lets one that drips bytes hold a request forever.
        if !end_of_stream {
            within_deadline(ctx)?;
        }
        Ok(None)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        let Some(relink) = ctx.relink.as_mut() else {
            return Ok(None);
        };
        if relink.overflowed {
            return Ok(None);
        }
        if let Some(chunk) = body.take() {
            relink.body.extend_from_slice(&chunk);
        }
        if relink.body.len() > MAX_RELINK_BYTES {
            relink.overflowed = true;
            *body = Some(Bytes::from(std::mem::take(&mut relink.body)));
        } else if end_of_stream {
            *body = Some(Bytes::from(replace_all(&relink.body, &relink.from, &relink.to)));
        }
        Ok(None)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        self.fail(session.as_downstream_mut(), e, ctx).await
    }

    /// What pingora's own error lines say about a request: method and path only, since a query
    /// string may carry `personal_api_key`.
    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        let req = session.req_header();
        format!("{} {}", req.method, req.uri.path())
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let req = session.req_header();
        self.log_request(&req.method, req.uri.path(), status, ctx);
    }
}
