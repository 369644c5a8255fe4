//! The proxy's own answers (cache hits above all) without pingora_proxy's per-request session.
//!
//! [`FastPath`] is the `ServerApp` of the listening service and wraps pingora's proxy
//! (`HttpProxy<InsightsProxy>`). It runs pingora's HTTP/1 connection loop itself (pingora-core's
//! `ServerApp for HttpServerApp`, reproduced in [`FastPath::process_new`]). A GET whose head (and
//! nothing more) arrived in one read is parsed in place ([`OneRead`], the parser pingora uses, into
//! a fixed array of fields) and decided with [`InsightsProxy::decide_one_read`], the decision
//! `request_filter` makes. When the proxy answers it itself, the fast path writes the bytes
//! pingora's session would ([`Head::h1`], from the same fields as pingora's path), with the same
//! keep-alive, metrics and access log, without pingora's session (a `HeaderMap` hashing every name,
//! the `Uri`, its framing checks), pingora_proxy's `Session` and phase machine, or pingora's
//! response-header building.
//!
//! Everything else goes to pingora's proxy unchanged: the bytes read so far are handed to a fresh
//! session as its pipelined prefix, so the proxy parses the same request as if it had read it
//! itself. HTTP/2 (by ALPN, or h2c told by the connection's first bytes) runs the proxy's HTTP/2
//! loop (`super::h2`); custom protocols go to pingora's own connection handling. With TLS on the
//! listener, the handshake runs first ([`crate::tls::accept`]).

use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use http::Method;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;

use super::answer::answer_with;
use super::head::Head;
use super::request::OneRead;
use super::{InsightsProxy, RequestCtx};
use crate::cache::sealed::SealedFile;
use crate::insights::Reply;

/// What a client sends first on an HTTP/2 connection (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The first byte of a TLS ClientHello's record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// pingora's first read of a request header (`INIT_HEADER_BUF_SIZE`).
const HEADER_BUF: usize = 4096;
/// pingora's read timeout for a request on a connection without keep-alive.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

pub struct FastPath {
    pub(super) proxy: Arc<HttpProxy<InsightsProxy>>,
    /// The same decision code as the proxy's `request_filter` (a second handle on the same `App`).
    pub(super) insights: InsightsProxy,
    /// Set (and waiters woken) when the service stops listening, as pingora's proxy does for
    /// requests it waits for on idle keep-alive connections.
    closing: AtomicBool,
    closed: Notify,
    /// TLS on the listener: the handshake runs here, before anything else.
    #[cfg(feature = "tls")]
    tls: Option<Arc<crate::tls::Tls>>,
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
        FastPath {
            proxy: Arc::new(proxy),
            insights,
            closing: AtomicBool::new(false),
            closed: Notify::new(),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// Connections start with a TLS handshake with `tls`'s current certificate.
    #[cfg(feature = "tls")]
    pub fn with_tls(mut self, tls: Arc<crate::tls::Tls>) -> FastPath {
        self.tls = Some(tls);
        self
    }

    /// Whether a new cleartext connection opens with HTTP/2's preface (h2c with prior knowledge).
    /// The bytes read to tell are put back for whoever reads the connection next, and the first
    /// read takes as much as pingora's first read of a request head, so an HTTP/1 request that
    /// arrives whole is still read whole by the fast path.
    async fn opens_h2c(&self, stream: Stream) -> Option<(Stream, bool)> {
        if !stream.as_any().is::<L4Stream>() {
            return Some((stream, false));
        }
        let mut l4: L4Stream = *stream.into_any().downcast::<L4Stream>().ok()?;
        let mut buf = BytesMut::new();
        let h2 = loop {
            let read = tokio::select! {
                biased;
                r = tokio::time::timeout(READ_TIMEOUT, read_arrived(&mut l4)) => r,
                _ = self.closing() => return None,
            };
            match read {
                Ok(Ok(chunk)) if !chunk.is_empty() && buf.is_empty() => buf = chunk,
                Ok(Ok(chunk)) if !chunk.is_empty() => buf.extend_from_slice(&chunk),
                _ => return None,
            }
            let seen = buf.len().min(H2_PREFACE.len());
            if buf[..seen] != H2_PREFACE[..seen] {
                break false;
            }
            if seen == H2_PREFACE.len() {
                break true;
            }
        };
        l4.rewind(&buf);
        Some((Box::new(l4), h2))
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
        let read = match keepalive {
            Some(0) => read_arrived(&mut stream).await,
            Some(secs) => match tokio::time::timeout(Duration::from_secs(secs), read_arrived(&mut stream)).await {
                Ok(r) => r,
                Err(_) => return Read::Closed,
            },
            None => match tokio::time::timeout(READ_TIMEOUT, read_arrived(&mut stream)).await {
                Ok(r) => r,
                Err(_) => return Read::Closed,
            },
        };
        match read {
            Err(_) => Read::Closed,
            Ok(buf) if buf.is_empty() => Read::Closed,
            // A request line, and the header's end at the end of the read: parsing it needs no
            // further read, so every byte of the request is in `buf`.
            Ok(buf) if buf[0].is_ascii_alphabetic() && buf.ends_with(b"\r\n\r\n") => Read::Head(stream, buf),
            Ok(buf) => Read::Partial(stream, buf),
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
    pub(super) async fn finish(
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

/// Where a connection stands between two requests.
enum Next {
    /// After an answer of the fast path: the stream and the settings for the next request.
    Fresh(Stream, Settings),
    /// After pingora's proxy handled a request: the session pingora's loop would start with.
    Session(Box<ServerSession>),
}

impl Next {
    /// What pingora's loop does with a reusable stream the proxy returned.
    fn reused(reused: Option<ReusedHttpStream>) -> Option<Next> {
        let (stream, persistent) = reused?.consume();
        let mut session = ServerSession::new_http1(stream);
        if let Some(persistent) = persistent {
            persistent.apply_to_session(&mut session);
        }
        Some(Next::Session(Box::new(session)))
    }
}

impl FastPath {
    /// One request on an HTTP/1 connection; `None` when the connection is done.
    async fn request(self: &Arc<Self>, stream: Stream, settings: Settings, shutdown: &ShutdownWatch) -> Option<Next> {
        let read = tokio::select! {
            biased;
            r = Self::read_head(stream, settings.keepalive) => r,
            _ = self.closing() => return None,
        };
        let (stream, buf) = match read {
            Read::Closed => return None,
            Read::Partial(_, buf) if buf.first() == Some(&TLS_HANDSHAKE_RECORD) => {
                // pingora would answer an HTTP 400 the client cannot read: say what happened.
                tracing::info!("a TLS handshake on the cleartext port: connection closed");
                return None;
            }
            Read::Partial(stream, buf) => {
                return Next::reused(Box::pin(self.delegate(stream, buf, settings, shutdown)).await)
            }
            Read::Head(stream, buf) => (stream, buf),
        };
        Box::pin(self.one_read(stream, buf, settings, shutdown)).await
    }

    /// A request whose head (and nothing more) arrived in one read, in `buf`. Boxed by the caller:
    /// its state (the parsed head, the decision, the write) is this request's, not part of every
    /// connection's future (allocated whole for the connection's life, idle keep-alive ones
    /// included).
    async fn one_read(
        self: &Arc<Self>,
        mut stream: Stream,
        buf: BytesMut,
        settings: Settings,
        shutdown: &ShutdownWatch,
    ) -> Option<Next> {
        let Some(head) = OneRead::parse(&buf) else {
            // Not a plain GET (a body, pipelined requests, anything malformed): the proxy reads
            // it from the same bytes and answers exactly as when it reads the request itself.
            return Next::reused(self.delegate(stream, buf, settings, shutdown).await);
        };
        let mut ctx = RequestCtx::new();
        let tls = stream.get_ssl_digest().is_some();
        let Some(reply) = self.insights.decide_one_read(&head, tls, &mut ctx).await else {
            return Next::reused(self.delegate(stream, buf, settings, shutdown).await);
        };
        // As pingora's session after `decide`: the connection is kept when the client keeps it
        // (HTTP/1.1 unless `close`, HTTP/1.0 with `keep-alive`), the service is not shutting down
        // (as pingora's proxy) and it has requests left.
        let idle = self.insights.idle_timeout_secs();
        let keep_alive = head.keeps_alive() && !*shutdown.borrow() && settings.reuses_remaining != Some(0);
        let Some(bytes) = Head::of(&reply).ok().and_then(|h| h.h1(keep_alive)) else {
            // pingora's writer takes it (relayed upstream fields): as on the proxy's path.
            let written = self.write_by_session(stream, buf, settings, keep_alive, ctx, reply);
            return Next::reused(Box::pin(written).await);
        };
        ctx.cache_status = Some(reply.cache_status);
        // Counted and logged before the answer is written, as on pingora's path (its `logging`
        // runs before `finish` flushes): a client that has its answer sees it counted.
        self.insights.log_request(&Method::GET, head.path(), reply.status, &ctx);
        // Head and body in one vectored write: the listener's streams have no write buffer to
        // gather them in (`listener`). A large cached body goes from its sealed file first, and
        // whatever the socket did not take then follows from the same bytes.
        let mut answer = (&bytes[..]).chain(&reply.body[..]);
        match send_sealed(&stream, &bytes, reply.file.as_ref(), &reply.body) {
            Some(Ok(sent)) => answer.advance(sent),
            Some(Err(e)) => {
                tracing::error!("Fail to filter request: Downstream WriteError: {e}, GET {}", head.path());
                return None;
            }
            None => {}
        }
        if let Err(e) = stream.write_all_buf(&mut answer).await {
            tracing::error!("Fail to filter request: Downstream WriteError: {e}, GET {}", head.path());
            return None;
        }
        if stream.flush().await.is_err() {
            return None;
        }
        if keep_alive {
            // `HttpPersistentSettings::for_session` then `apply_to_session`, as pingora's loop does.
            let reuses_remaining = settings.reuses_remaining.map(|n| n.saturating_sub(1));
            Some(Next::Fresh(stream, Settings { keepalive: Some(idle), reuses_remaining, user_context: None }))
        } else {
            let _ = stream.shutdown().await;
            None
        }
    }

    /// Writes `reply`, decided for the request in `buf`, through a pingora session that parses
    /// the same bytes: for answers only pingora's writer takes.
    async fn write_by_session(
        &self,
        stream: Stream,
        buf: BytesMut,
        settings: Settings,
        keep_alive: bool,
        mut ctx: RequestCtx,
        reply: Reply,
    ) -> Option<ReusedHttpStream> {
        let mut session = Self::session(stream, buf, &settings);
        if !matches!(session.read_request().await, Ok(true)) {
            // pingora's parser accepts every head `OneRead` does (same parser, same settings).
            tracing::error!("a fast-path request could not be read again by pingora's session");
            return None;
        }
        session.set_keepalive(keep_alive.then(|| self.insights.idle_timeout_secs()));
        let answered = answer_with(&mut session, &mut ctx, reply).await;
        self.finish(session, ctx, answered).await
    }
}

/// Sends `head` and then a large cached body from its sealed file, on a cleartext TCP stream, as
/// far as the socket takes them now: how many bytes went. `None` (nothing sent) when the body has
/// no sealed file or the stream is not plain TCP (TLS encrypts in the process).
fn send_sealed(stream: &Stream, head: &[u8], file: Option<&SealedFile>, body: &[u8]) -> Option<std::io::Result<usize>> {
    let file = file?;
    let offset = file.offset_of(body)?;
    // The listener's streams have no write buffer (`listener`), so nothing written earlier waits
    // in the process behind these bytes.
    let tcp = stream.as_any().downcast_ref::<L4Stream>()?;
    Some(file.send(tcp.as_raw_fd(), head, offset, body.len()))
}

thread_local! {
    /// Where a connection's next bytes are read before they are copied to a buffer of their own.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0; HEADER_BUF].into_boxed_slice());
}

/// The stream's next bytes (up to pingora's first header read; empty at the end of the stream),
/// in a buffer allocated once they arrived: an idle keep-alive connection holds no read buffer.
/// Each poll reads into this thread's scratch space and copies out what arrived in that poll.
async fn read_arrived<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<BytesMut> {
    std::future::poll_fn(|cx| {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut read = ReadBuf::new(scratch);
            std::task::ready!(Pin::new(&mut *stream).poll_read(cx, &mut read))?;
            let mut buf = BytesMut::with_capacity(HEADER_BUF);
            buf.extend_from_slice(read.filled());
            Poll::Ready(Ok(buf))
        })
    })
    .await
}

#[async_trait]
impl ServerApp for FastPath {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        #[cfg(feature = "tls")]
        let stream = match &self.tls {
            Some(tls) => Box::pin(crate::tls::accept(tls, stream)).await?,
            None => stream,
        };
        // As pingora-core's `ServerApp for HttpServerApp`: HTTP/2 (h2c or ALPN) goes to the HTTP/2
        // loop, custom protocols to pingora; the HTTP/1 loop is this one. pingora tells h2c by
        // waiting for 24 bytes, which stalls a shorter HTTP/1 request: here the first read decides.
        let options = self.proxy.server_options();
        let custom = options.is_some_and(|o| o.force_custom);
        let (stream, h2c) = if options.is_some_and(|o| o.h2c) && !custom && stream.get_ssl_digest().is_none() {
            self.opens_h2c(stream).await?
        } else {
            (stream, false)
        };
        if !custom && (h2c || matches!(stream.selected_alpn_proto(), Some(ALPN::H2))) {
            // Boxed: an HTTP/2 connection's state is not part of every HTTP/1 connection's future.
            return Box::pin(self.serve_h2(stream, shutdown)).await;
        }
        if h2c || custom || matches!(stream.selected_alpn_proto(), Some(ALPN::H2 | ALPN::Custom(_))) {
            return ServerApp::process_new(&self.proxy, stream, shutdown).await;
        }
        let settings = Settings {
            // pingora's default for a new connection (60 s), or none when shutting down.
            keepalive: if *shutdown.borrow() { None } else { Some(60) },
            reuses_remaining: options.and_then(|o| o.keepalive_request_limit),
            user_context: None,
        };
        let mut next = Next::Fresh(stream, settings);
        loop {
            next = match next {
                Next::Fresh(stream, settings) => self.request(stream, settings, shutdown).await?,
                Next::Session(mut session) => {
                    if session.pipelining_enabled() {
                        // Never on here; pingora's proxy keeps such a connection.
                        Next::reused(Box::pin(self.proxy.process_new_http(*session, shutdown)).await)?
                    } else {
                        let settings = Settings {
                            keepalive: session.get_keepalive(),
                            reuses_remaining: session.get_keepalive_reuses_remaining(),
                            user_context: session.take_connection_user_context(),
                        };
                        let ServerSession::H1(h1) = *session else { unreachable!("an HTTP/1 session") };
                        self.request(h1.into_inner(), settings, shutdown).await?
                    }
                }
            };
        }
    }

    async fn cleanup(&self) {
        self.closing.store(true, Ordering::Release);
        self.closed.notify_waiters();
        self.proxy.http_cleanup().await;
    }
}
