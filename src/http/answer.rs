//! The proxy's own answers written to pingora's session (HTTP/1 or HTTP/2): a [`Reply`], or the
//! answer to a request that failed. The fast path writes the same head itself ([`Head::h1`]).

use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::proxy::FailToProxy;
use pingora::ErrorSource;
use pingora::{Error, ErrorType, Result};

use crate::cache_status::{CacheStatus, Detail, Fwd};
use crate::error::ApiError;
use crate::failure::Origin;
use crate::insights::Reply;

use super::ctx::RequestCtx;
use super::head::Head;
use super::InsightsProxy;

impl InsightsProxy {
    /// What a failed request answers (if its response has not started) and whether its connection
    /// can be reused (never).
    pub(crate) async fn fail(&self, session: &mut ServerSession, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        let origin = match e.esource() {
            ErrorSource::Downstream => Origin::Client,
            ErrorSource::Upstream => Origin::Upstream,
            ErrorSource::Internal | ErrorSource::Unset => Origin::Proxy,
        };
        let api = match (e.etype(), origin) {
            (ErrorType::HTTPStatus(413), _) => ApiError::payload_too_large(self.max_body()),
            (ErrorType::HTTPStatus(503), _) => {
                ApiError::service_unavailable("The upstream is failing; the proxy is not calling it for a moment.")
            }
            // The client went away or stalled: nobody to answer.
            (
                ErrorType::ReadError
                | ErrorType::WriteError
                | ErrorType::ConnectionClosed
                | ErrorType::ReadTimedout
                | ErrorType::WriteTimedout,
                Origin::Client,
            ) => return FailToProxy { error_code: 0, can_reuse_downstream: false },
            (_, Origin::Client) | (ErrorType::HTTPStatus(400..=499), _) => {
                ApiError::bad_request("The request could not be read.")
            }
            // Only the upstream's own failures count against it.
            (ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout, Origin::Upstream) => {
                self.app.engine.upstream().breaker().record(false);
                ApiError::gateway_timeout("The upstream did not answer in time.")
            }
            (_, Origin::Upstream) => {
                self.app.engine.upstream().breaker().record(false);
                ApiError::bad_gateway("The upstream is unreachable or failed to answer.")
            }
            (_, Origin::Proxy) => {
                tracing::warn!(error_type = %e.etype().as_str(), "the proxy could not forward a request");
                ApiError::new(500, "server_error", "error", "The proxy could not forward the request.")
            }
        };
        let detail = if api.status >= 500 { Detail::UpstreamError } else { Detail::Rejected };
        let cs = CacheStatus::fwd(Fwd::Bypass).detail(detail);
        ctx.cache_status = Some(cs.clone());
        let reply = Reply::error(&api, cs);
        // The response may already have started; then there is nothing more to say.
        if session.response_written().is_none() {
            // The connection is not reused (below): the answer says so.
            session.set_keepalive(None);
            let _ = write_reply(session, &reply).await;
        }
        FailToProxy { error_code: api.status, can_reuse_downstream: false }
    }
}

/// Writes `reply` to pingora's session (HTTP/1 or HTTP/2; pingora adds `Date`, and on HTTP/1
/// `Connection`).
pub async fn write_reply(session: &mut ServerSession, reply: &Reply) -> Result<()> {
    let head = response_head(reply)?;
    // A failed write is the client's doing (it went away): say so, or fail_to_proxy counts it
    // against the upstream's circuit breaker.
    // Written to the downstream session directly: the proxy installs no downstream modules, so
    // pingora_proxy's `Session::write_response_*` would only forward to these.
    session.write_response_header(Box::new(head)).await.map_err(|e| e.into_down())?;
    session.write_response_body(reply.body.clone(), true).await.map_err(|e| e.into_down())?;
    Ok(())
}

/// The response header of `reply` for pingora's session.
pub(super) fn response_head(reply: &Reply) -> Result<ResponseHeader> {
    Head::of(reply)
        .and_then(|h| h.response_header())
        .map_err(|e| Error::explain(ErrorType::InvalidHTTPHeader, e.to_string()))
}

/// Writes `reply` and keeps its `Cache-Status` for the log and metrics (also when the write fails).
pub(crate) async fn answer_with(session: &mut ServerSession, ctx: &mut RequestCtx, reply: Reply) -> Result<bool> {
    let written = write_reply(session, &reply).await;
    ctx.cache_status = Some(reply.cache_status);
    written.map(|()| true)
}
