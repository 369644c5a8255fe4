//! The client the proxy uses for its own upstream calls (calculations, cache peeks, list pages).
//! Pass-through traffic goes through pingora's proxy path instead; both share the peer settings.
//!
//! Built on pingora's `Connector`, so it pools connections with the same code as the proxy path and
//! adds no HTTP client dependency (docs/design.md, "pingora facts" 1).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Method};
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::prelude::HttpPeer;
use pingora::ErrorType;

use crate::config::{BreakerSettings, UpstreamUrl};

/// Where the upstream is and how to talk to it.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub url: UpstreamUrl,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub max_response_bytes: usize,
}

impl UpstreamSettings {
    pub fn peer(&self) -> HttpPeer {
        let mut peer = HttpPeer::new(self.url.addr, self.url.tls, self.url.host.clone());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.total_connection_timeout = Some(self.connect_timeout * 2);
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.write_timeout = Some(self.connect_timeout * 2);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        peer
    }
}

#[derive(Debug)]
pub struct UpstreamRequest {
    pub method: Method,
    pub path_and_query: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Option<Bytes>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
    /// The upstream's headers a relayed answer must keep (`Retry-After`, `WWW-Authenticate`).
    pub relayed: Vec<(HeaderName, HeaderValue)>,
}

/// Headers of an upstream answer that a client acts on, relayed with it.
const RELAYED_HEADERS: [HeaderName; 2] = [http::header::RETRY_AFTER, http::header::WWW_AUTHENTICATE];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the upstream")]
    Connect,
    #[error("the upstream did not answer in time")]
    Timeout,
    #[error("the upstream's answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the upstream closed the connection or sent an invalid answer")]
    Broken,
    #[error("the upstream is failing; calls are paused")]
    CircuitOpen,
    /// The proxy could not put the request on the wire (it is never sent).
    #[error("the request cannot be sent upstream")]
    Unsendable,
}

impl UpstreamError {
    pub fn as_str(&self) -> &'static str {
        match self {
            UpstreamError::Connect => "connect",
            UpstreamError::Timeout => "timeout",
            UpstreamError::TooLarge(_) => "too_large",
            UpstreamError::Broken => "broken",
            UpstreamError::CircuitOpen => "circuit_open",
            UpstreamError::Unsendable => "unsendable",
        }
    }

    /// The upstream is down or failing (an answer too large is the upstream's, but it is alive).
    pub fn is_outage(&self) -> bool {
        !matches!(self, UpstreamError::Unsendable | UpstreamError::TooLarge(_))
    }

    fn from_pingora(e: &pingora::Error) -> Self {
        match e.etype() {
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => UpstreamError::Timeout,
            ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::InvalidCert
            | ErrorType::HandshakeError
            | ErrorType::SocketError => UpstreamError::Connect,
            _ => UpstreamError::Broken,
        }
    }
}

/// Stops calling an upstream that keeps failing, so a dead backend is not hammered: after
/// `failures` consecutive failures it opens for a cooldown; then one probe is let through, and each
/// failed probe doubles the cooldown (up to the maximum). Any success closes it.
pub struct Breaker {
    settings: BreakerSettings,
    state: parking_lot::Mutex<BreakerState>,
}

#[derive(Debug)]
struct BreakerState {
    consecutive: u32,
    open_until: Option<Instant>,
    cooldown: Duration,
    probing: bool,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        let state = BreakerState { consecutive: 0, open_until: None, cooldown: settings.cooldown, probing: false };
        Self { settings, state: parking_lot::Mutex::new(state) }
    }

    /// Whether a call may go out now.
    pub fn allow(&self) -> bool {
        let mut s = self.state.lock();
        match s.open_until {
            None => true,
            Some(until) if Instant::now() >= until && !s.probing => {
                s.probing = true;
                true
            }
            Some(_) => false,
        }
    }

    pub fn is_open(&self) -> bool {
        self.state.lock().open_until.is_some()
    }

    pub fn record(&self, ok: bool) {
        let mut s = self.state.lock();
        if ok {
            if s.open_until.is_some() {
                tracing::info!("upstream circuit closed");
            }
            *s = BreakerState { consecutive: 0, open_until: None, cooldown: self.settings.cooldown, probing: false };
            return;
        }
        s.consecutive = s.consecutive.saturating_add(1);
        if s.probing {
            s.cooldown = (s.cooldown * 2).min(self.settings.max_cooldown);
            s.probing = false;
            s.open_until = Some(Instant::now() + s.cooldown);
        } else if s.open_until.is_none() && s.consecutive >= self.settings.failures {
            s.open_until = Some(Instant::now() + s.cooldown);
            tracing::warn!(
                failures = s.consecutive,
                cooldown_ms = s.cooldown.as_millis() as u64,
                "upstream circuit opened"
            );
        }
    }
}

#[derive(Clone)]
pub struct UpstreamClient {
    settings: Arc<UpstreamSettings>,
    peer: Arc<HttpPeer>,
    connector: Arc<Connector>,
    breaker: Arc<Breaker>,
}

impl UpstreamClient {
    pub fn new(settings: UpstreamSettings, breaker: BreakerSettings) -> Self {
        let peer = Arc::new(settings.peer());
        Self {
            settings: Arc::new(settings),
            peer,
            connector: Arc::new(Connector::new(None)),
            breaker: Arc::new(Breaker::new(breaker)),
        }
    }

    pub fn settings(&self) -> &UpstreamSettings {
        &self.settings
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Sends one request and reads the whole answer, within the read timeout and the size cap.
    /// A pooled connection the upstream closed meanwhile is retried once on a fresh one.
    pub async fn send(&self, req: &UpstreamRequest) -> Result<UpstreamResponse, UpstreamError> {
        // Built before anything else: a request the proxy cannot send never reaches the breaker.
        let header = self.request_header(req).map_err(|_| UpstreamError::Unsendable)?;
        if !self.breaker.allow() {
            return Err(UpstreamError::CircuitOpen);
        }
        let deadline = self.settings.connect_timeout + self.settings.read_timeout;
        let result = match tokio::time::timeout(deadline, self.send_once(&header, req.body.as_ref())).await {
            Ok(Err((UpstreamError::Broken, true))) => {
                tokio::time::timeout(deadline, self.send_once(&header, req.body.as_ref()))
                    .await
                    .map_err(|_| UpstreamError::Timeout)
                    .and_then(|r| r.map_err(|(e, _)| e))
            }
            Ok(r) => r.map_err(|(e, _)| e),
            Err(_) => Err(UpstreamError::Timeout),
        };
        // Only the upstream's own health moves the breaker: a request the proxy could not send
        // says nothing about it.
        self.breaker.record(match &result {
            Ok(r) => r.status < 500,
            Err(e) => !e.is_outage(),
        });
        result
    }

    fn request_header(&self, req: &UpstreamRequest) -> pingora::Result<RequestHeader> {
        let mut header = RequestHeader::build(req.method.clone(), req.path_and_query.as_bytes(), None)?;
        header.insert_header(http::header::HOST, self.settings.url.host_header())?;
        header.insert_header(http::header::ACCEPT, "application/json")?;
        header.insert_header(http::header::USER_AGENT, concat!("insights-proxy/", env!("CARGO_PKG_VERSION")))?;
        for (k, v) in &req.headers {
            header.insert_header(k.clone(), v.clone())?;
        }
        if let Some(b) = &req.body {
            header.insert_header(http::header::CONTENT_LENGTH, b.len().to_string())?;
        }
        Ok(header)
    }

    /// The error carries whether the connection was a reused one.
    async fn send_once(
        &self,
        header: &RequestHeader,
        body: Option<&Bytes>,
    ) -> Result<UpstreamResponse, (UpstreamError, bool)> {
        let peer = &*self.peer;
        let (mut session, reused) =
            self.connector.get_http_session(peer).await.map_err(|e| (UpstreamError::from_pingora(&e), false))?;
        let fail = |e: Box<pingora::Error>| (UpstreamError::from_pingora(&e), reused);
        session.set_read_timeout(Some(self.settings.read_timeout));
        session.write_request_header(Box::new(header.clone())).await.map_err(fail)?;
        if let Some(b) = body {
            session.write_request_body(b.clone(), true).await.map_err(fail)?;
        }
        session.finish_request_body().await.map_err(fail)?;
        session.read_response_header().await.map_err(fail)?;
        let (status, content_type, relayed) = match session.response_header() {
            Some(h) => (
                h.status.as_u16(),
                h.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string),
                RELAYED_HEADERS
                    .iter()
                    .flat_map(|name| h.headers.get_all(name).iter().map(|v| (name.clone(), v.clone())))
                    .collect(),
            ),
            None => return Err((UpstreamError::Broken, reused)),
        };
        let max = self.settings.max_response_bytes;
        let mut body = BytesMut::new();
        while let Some(chunk) = session.read_response_body().await.map_err(fail)? {
            if body.len() + chunk.len() > max {
                return Err((UpstreamError::TooLarge(max), false));
            }
            body.extend_from_slice(&chunk);
        }
        self.connector.release_http_session(session, peer, Some(Duration::from_secs(60))).await;
        Ok(UpstreamResponse { status, content_type, body: body.freeze(), relayed })
    }
}
