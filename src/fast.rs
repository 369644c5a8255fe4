//! The proxy's own answers (cache hits above all) without pingora_proxy's per-request session.
//!
//! [`FastPath`] is the `HttpServerApp` of the listening service and wraps pingora's proxy
//! (`HttpProxy<InsightsProxy>`). For an HTTP/1 request whose header arrived whole in one read it
//! parses the request with pingora's own HTTP/1 session and runs [`InsightsProxy::serve`], the same
//! decision `request_filter` makes. When that answers the request, the answer, keep-alive,
//! metrics and access log are exactly those of the proxy's path (same session type, same writes,
//! same `log_request`), without building pingora_proxy's `Session` (its HTTP cache state, module
//! contexts, boxed downstream session) and running its phase machine, which moves that state
//! between futures several times per request.
//!
//! Everything else goes to pingora's proxy unchanged: the bytes read so far are handed to a fresh
//! session as its pipelined prefix, so the proxy parses the same request as if it had read it
//! itself. `serve(.., fast = true)` returns before anything the client could see (and before a
//! request body is read) for every request the proxy forwards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::protocols::http::v2::server::H2Options;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use crate::proxy::{answer_with, reply_head, InsightsProxy, RequestCtx};

/// pingora's first read of a request header (`INIT_HEADER_BUF_SIZE`).
const HEADER_BUF: usize = 4096;
/// pingora's read timeout for a request on a connection without keep-alive.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

pub struct FastPath {
    proxy: Arc<HttpProxy<InsightsProxy>>,
    /// The same decision code as the proxy's `request_filter` (a second handle on the same `App`).
    insights: InsightsProxy,
    /// Set (and waiters woken) when the service stops listening, as pingora's proxy does for
    /// requests it waits for on idle keep-alive connections.
    closing: AtomicBool,
    closed: Notify,
}

enum Read {
    /// A whole request header (and whatever followed it in the same read).
    Head(Stream, BytesMut),
    /// Not a whole header in the first read: pingora's proxy continues from these bytes.
    Partial(Stream, BytesMut),
    /// The client closed the connection or stayed idle past the keep-alive timeout.
    Closed,
}

impl FastPath {
    pub fn new(proxy: HttpProxy<InsightsProxy>, insights: InsightsProxy) -> FastPath {
        FastPath { proxy: Arc::new(proxy), insights, closing: AtomicBool::new(false), closed: Notify::new() }
    }

    async fn closing(&self) {
        let notified = self.closed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }

    /// Reads the first bytes of the next request the way pingora's HTTP/1 session does: the wait
    /// is bounded by the connection's keep-alive timeout (`Some(0)`: none), or by pingora's read
    /// timeout when keep-alive is off.
    async fn read_head(mut stream: Stream, keepalive: Option<u64>) -> Read {
        let mut buf = BytesMut::with_capacity(HEADER_BUF);
        let read = match keepalive {
            Some(0) => stream.read_buf(&mut buf).await,
            Some(secs) => match tokio::time::timeout(Duration::from_secs(secs), stream.read_buf(&mut buf)).await {
                Ok(r) => r,
                Err(_) => return Read::Closed,
            },
            None => match tokio::time::timeout(READ_TIMEOUT, stream.read_buf(&mut buf)).await {
                Ok(r) => r,
                Err(_) => return Read::Closed,
            },
        };
        match read {
            Ok(0) | Err(_) => Read::Closed,
            Ok(_) if buf.ends_with(b"\r\n\r\n") => Read::Head(stream, buf),
            Ok(_) => Read::Partial(stream, buf),
        }
    }

    /// A new HTTP/1 session on `stream` that parses `prefix` before reading the socket, with the
    /// connection's settings.
    fn session(stream: Stream, prefix: BytesMut, settings: &Settings) -> ServerSession {
        let mut session = ServerSession::new_http1(stream);
        session.set_keepalive(settings.keepalive);
        session.set_keepalive_reuses_remaining(settings.reuses_remaining);
        session.set_pipelined_prefix(prefix);
        session
    }

    /// After the proxy's answer went through pingora's session (`answered`), or deciding failed: as
    /// pingora's proxy ends a request that `request_filter` answered or failed.
    async fn finish(
        &self,
        mut session: ServerSession,
        mut ctx: RequestCtx,
        answered: pingora::Result<bool>,
    ) -> Option<ReusedHttpStream> {
        let status = |s: &ServerSession| s.response_written().map_or(0, |r| r.status.as_u16());
        match answered {
            Ok(_) => {
                let req = session.req_header();
                self.insights.log_request(&req.method, req.uri.path(), status(&session), &ctx);
                let persistent = HttpPersistentSettings::for_session(&session);
                session.finish().await.ok().flatten().map(|s| ReusedHttpStream::from_reusable_stream(s, persistent))
            }
            Err(e) => {
                let res = self.insights.fail(&mut session, &e, &mut ctx).await;
                let req = session.req_header();
                tracing::error!(
                    "Fail to filter request: {e}, status: {}, {} {}",
                    res.error_code,
                    req.method,
                    req.uri.path()
                );
                self.insights.log_request(&req.method, req.uri.path(), status(&session), &ctx);
                None
            }
        }
    }

    /// Hands the request (its bytes read so far in `prefix`) to pingora's proxy.
    async fn delegate(
        self: &Arc<Self>,
        stream: Stream,
        prefix: BytesMut,
        settings: Settings,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let mut session = Self::session(stream, prefix, &settings);
        session.set_connection_user_context(settings.user_context);
        self.proxy.process_new_http(session, shutdown).await
    }
}

/// What pingora carries from one request to the next on a connection
/// (`HttpPersistentSettings::apply_to_session`).
struct Settings {
    keepalive: Option<u64>,
    reuses_remaining: Option<u32>,
    user_context: Option<Box<dyn std::any::Any + Send + Sync>>,
}

#[async_trait]
impl HttpServerApp for FastPath {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if session.is_http2() || session.as_http1().is_none() || session.pipelining_enabled() {
            return self.proxy.process_new_http(session, shutdown).await;
        }
        let settings = Settings {
            keepalive: session.get_keepalive(),
            reuses_remaining: session.get_keepalive_reuses_remaining(),
            user_context: session.take_connection_user_context(),
        };
        let ServerSession::H1(h1) = session else { unreachable!("checked above") };
        let stream = h1.into_inner();
        let read = tokio::select! {
            biased;
            r = Self::read_head(stream, settings.keepalive) => r,
            _ = self.closing() => return None,
        };
        let (stream, buf) = match read {
            Read::Closed => return None,
            Read::Partial(stream, buf) => return self.delegate(stream, buf, settings, shutdown).await,
            Read::Head(stream, buf) => (stream, buf),
        };
        // Kept to hand the request to the proxy unchanged if it is not answered here.
        let copy = BytesMut::from(&buf[..]);
        let mut session = Self::session(stream, buf, &settings);
        let parsed = matches!(session.read_request().await, Ok(true));
        let delegate = !parsed
            || session.req_header().method != http::Method::GET
            || session.as_http1().is_none_or(|h1| h1.get_headers_raw_bytes().len() != copy.len())
            || !session.is_body_empty();
        if delegate {
            // Malformed, not a GET, or more than a header (a body, pipelined requests): the proxy
            // answers exactly as it does when it reads the request itself.
            let ServerSession::H1(h1) = session else { unreachable!("an HTTP/1 session") };
            return self.delegate(h1.into_inner(), copy, settings, shutdown).await;
        }
        if *shutdown.borrow() {
            // stop downstream from reusing if this service is shutting down soon (as pingora does)
            session.set_keepalive(None);
        }
        let mut ctx = RequestCtx::new();
        let reply = match self.insights.decide(&mut session, &mut ctx, true).await {
            Ok(Some(reply)) => reply,
            Ok(None) => {
                let ServerSession::H1(h1) = session else { unreachable!("an HTTP/1 session") };
                return self.delegate(h1.into_inner(), copy, settings, shutdown).await;
            }
            Err(e) => return self.finish(session, ctx, Err(e)).await,
        };
        let keep_alive = session.as_http1().is_some_and(|h1| h1.will_keepalive());
        let Some(head) = reply_head(&reply, keep_alive) else {
            // pingora's writer refuses it: as on the proxy's path.
            let answered = answer_with(&mut session, &mut ctx, reply).await;
            return self.finish(session, ctx, answered).await;
        };
        // What pingora's session would write (`reply_head`), written to the connection's buffered
        // stream directly and flushed once, as pingora does at the end of a response with a length.
        let persistent = HttpPersistentSettings::for_session(&session);
        let (method, uri) = {
            let req = session.req_header();
            (req.method.clone(), req.uri.clone())
        };
        let ServerSession::H1(h1) = session else { unreachable!("an HTTP/1 session") };
        let mut stream = h1.into_inner();
        let mut status = 0;
        let mut written = stream.write_all(&head).await;
        if written.is_ok() {
            status = reply.status;
            written = stream.write_all(&reply.body).await;
        }
        if written.is_ok() {
            written = stream.flush().await;
        }
        ctx.cache_status = Some(reply.cache_status);
        if let Err(e) = written {
            tracing::error!("Fail to filter request: Downstream WriteError: {e}, status: 0, {method} {}", uri.path());
            self.insights.log_request(&method, uri.path(), status, &ctx);
            return None;
        }
        self.insights.log_request(&method, uri.path(), status, &ctx);
        if keep_alive {
            Some(ReusedHttpStream::new(stream, Some(persistent)))
        } else {
            let _ = stream.shutdown().await;
            None
        }
    }

    async fn http_cleanup(&self) {
        self.closing.store(true, Ordering::Release);
        self.closed.notify_waiters();
        self.proxy.http_cleanup().await;
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.proxy.server_options()
    }

    fn h2_options(&self) -> Option<H2Options> {
        self.proxy.h2_options()
    }
}
