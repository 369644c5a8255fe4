//! HTTP/2 connections: pingora's accept loop, with the proxy's own answers written without
//! pingora_proxy's per-request session.
//!
//! [`FastPath::serve_h2`] runs the loop pingora-core's `HttpServerApp::process_new` runs for an
//! HTTP/2 connection (its handshake with the listener's h2 options, `HttpSession::from_h2_conn`
//! per stream, GOAWAY on shutdown, at most 32 malformed streams per connection). A GET without a
//! body is decided here ([`InsightsProxy::decide`], the decision `request_filter` makes) and, when
//! the proxy answers it itself, answered through the stream's session with the head
//! `request_filter`'s answer has ([`answer`]), with the same metrics and access log, without
//! pingora_proxy's `Session` and phase machine. Everything else (other methods, bodies, what
//! `decide` passes through) goes to pingora's proxy unchanged (`process_new_http`), in a task of its
//! own as pingora runs every stream.
//!
//! The streams decided here are polled by the connection's task itself rather than spawned: the
//! answer is queued and flushed by the same task that reads the next frames, without a task and
//! a wake-up per stream. Their number is bounded by the connection's concurrent streams
//! (`[server] h2_max_concurrent_streams`), which h2 enforces.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::v2::server::{handshake, H2Accept, HttpSession};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Digest, Stream};
use pingora::server::ShutdownWatch;
use pingora::{Error, ErrorType, OkOrErr, OrErr, Result};

use crate::insights::Reply;

use super::answer::response_head;
use super::conn::FastPath;
use super::RequestCtx;

/// pingora's budget of streams refused while accepting them (bad target, framing or authority)
/// per connection, after which the connection is closed (`MAX_MALFORMED_STREAMS_PER_CONN`; its
/// public `from_h2_conn` counts afresh on every call, so the count is kept here).
const MAX_MALFORMED_STREAMS: usize = 32;

/// A stream decided on the connection's task: `Some(session)` when it goes to pingora's proxy.
type Decided = Pin<Box<dyn Future<Output = Option<ServerSession>> + Send>>;

impl FastPath {
    /// An HTTP/2 connection, to its end (nothing to reuse).
    pub(super) async fn serve_h2(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        if self.proxy.server_options().is_some_and(|o| o.h2_idle_timeout.is_some()) {
            // Never set by the proxy: pingora's loop keeps its idle accounting.
            return ServerApp::process_new(&self.proxy, stream, shutdown).await;
        }
        let digest = Arc::new(Digest {
            ssl_digest: stream.get_ssl_digest(),
            timing_digest: stream.get_timing_digest(),
            proxy_digest: stream.get_proxy_digest(),
            socket_digest: stream.get_socket_digest(),
        });
        let mut conn = match handshake(stream, self.proxy.h2_options()).await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::error!("H2 handshake error {e}");
                return None;
            }
        };
        let mut signal = shutdown.clone();
        // One wait for the signal for the connection's life, not one per turn of the loop.
        let signalled = signal.changed();
        tokio::pin!(signalled);
        let mut draining = false;
        let mut malformed = 0;
        let mut decided: FuturesUnordered<Decided> = FuturesUnordered::new();
        loop {
            let accepted = tokio::select! {
                // As pingora: the shutdown signal first, then (answers queued before the connection
                // is driven again) the streams being decided, then the connection.
                biased;
                _ = &mut signalled, if !draining => {
                    // GOAWAY; streams already opened are still served, the connection closes after.
                    conn.graceful_shutdown();
                    draining = true;
                    continue;
                }
                Some(delegate) = decided.next(), if !decided.is_empty() => {
                    if let Some(session) = delegate {
                        self.delegate_h2(session, shutdown);
                    }
                    continue;
                }
                accepted = HttpSession::from_h2_conn(&mut conn, digest.clone()) => accepted,
            };
            match accepted {
                // Commonly a client that closed its socket without closing HTTP/2.
                Err(e) => {
                    tracing::debug!("H2 error when accepting new stream {e}");
                    break;
                }
                Ok(None) => break,
                Ok(Some(H2Accept::Rejected)) => {
                    malformed += 1;
                    if malformed >= MAX_MALFORMED_STREAMS {
                        tracing::warn!("tearing down downstream h2 connection after {malformed} malformed requests");
                        break;
                    }
                }
                Ok(Some(H2Accept::Session(h2))) => decided.push(Box::pin(self.clone().decide_h2(h2))),
            }
        }
        if !decided.is_empty() {
            // The connection is gone, but a stream's work runs to its end as on pingora's path
            // (a calculation it leads, its log line).
            let fast = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                while let Some(delegate) = decided.next().await {
                    if let Some(session) = delegate {
                        fast.delegate_h2(session, &shutdown);
                    }
                }
            });
        }
        None
    }

    /// One stream: answered here when the proxy answers it itself; otherwise returned untouched,
    /// for pingora's proxy.
    async fn decide_h2(self: Arc<Self>, h2: HttpSession) -> Option<ServerSession> {
        let mut session = ServerSession::new_http2(h2);
        // As the HTTP/1 fast path: a GET whose request ended with its header.
        if session.req_header().method != http::Method::GET || !session.is_body_empty() {
            return Some(session);
        }
        let mut ctx = RequestCtx::new();
        let answered = match self.insights.decide(&mut session, &mut ctx, true).await {
            Ok(Some(reply)) => answer(&mut session, &mut ctx, reply),
            Ok(None) => return Some(session),
            Err(e) => Err(e),
        };
        // As pingora's proxy ends a request `request_filter` answered or failed (nothing to reuse).
        self.finish(session, ctx, answered).await;
        None
    }

    /// A stream for pingora's proxy, in a task of its own as pingora runs it.
    fn delegate_h2(self: &Arc<Self>, session: ServerSession, shutdown: &ShutdownWatch) {
        let proxy = self.proxy.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { proxy.process_new_http(session, &shutdown).await });
    }
}

/// Writes `reply` to an HTTP/2 stream as [`super::write_reply`] does (the same head; pingora's
/// session adds `Date` and drops hop-by-hop fields), and keeps its `Cache-Status` for the log and
/// metrics. The body is queued whole rather than in pieces as flow-control capacity is granted:
/// h2 sends it as the stream's window allows, and the stream's work ends here.
fn answer(session: &mut ServerSession, ctx: &mut RequestCtx, reply: Reply) -> Result<bool> {
    let written = match session {
        ServerSession::H2(h2) => response_head(&reply).and_then(|head| {
            // A failed write is the client's doing (it went away), as in `write_reply`.
            h2.write_response_header(Box::new(head), false).map_err(|e| e.into_down())?;
            let mut writer = h2
                .take_response_body_writer()
                .or_err(ErrorType::WriteError, "no h2 response body writer")
                .map_err(|e| e.into_down())?;
            writer
                .send_data(reply.body.clone(), true)
                .or_err(ErrorType::WriteError, "while writing h2 response body to downstream")
                .map_err(|e| e.into_down())
        }),
        _ => Err(Error::explain(ErrorType::InternalError, "an HTTP/2 answer on another session")),
    };
    ctx.cache_status = Some(reply.cache_status);
    written.map(|()| true)
}
