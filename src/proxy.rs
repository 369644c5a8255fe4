//! The pingora `ProxyHttp` implementation. Hooks stay thin: parse, route, call `insights`, write.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::protocols::http::ServerSession;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::ErrorSource;
use pingora::{Error, ErrorType, Result};
use serde_json::Value;

use crate::app::App;
use crate::auth::{Principal, PrincipalError};
use crate::cache_status::{CacheStatus, Detail, Fwd};
use crate::config::AccessLog;
use crate::error::ApiError;
use crate::failure::Origin;
use crate::insights::{self, InsightCall, ListCall, Reply};
use crate::query::QueryParams;
use crate::refresh::{RefreshMode, RefreshParam};
use crate::routes::{route, Route};

/// More request headers than this, or more header bytes, is refused (431) before any work.
pub const MAX_REQUEST_HEADERS: usize = 100;
pub const MAX_REQUEST_HEADER_BYTES: usize = 64 * 1024;
/// A longer request target is refused (414) before any work: the proxy re-encodes the query of
/// its own upstream calls (up to three bytes per byte), and this keeps every such call within what
/// an HTTP request line may carry, so a request the proxy accepts is one it can forward.
pub const MAX_URI_BYTES: usize = 16 * 1024;

/// Hop-by-hop headers (RFC 9110 §7.6.1) are never forwarded. pingora manages `Connection` and
/// keep-alive for each side itself.
const HOP_BY_HOP: [&str; 7] =
    ["connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "proxy-authorization"];

pub struct InsightsProxy {
    pub app: Arc<App>,
    pub peer: HttpPeer,
}

#[derive(Debug)]
pub struct RequestCtx {
    started: Instant,
    /// Where the request went (`None` until routed: refused at the front door).
    route: Option<Route>,
    mode: Option<RefreshMode>,
    pub(crate) cache_status: Option<CacheStatus>,
    /// A write to this insight is being passed through: purge it once the upstream accepts it.
    purge_on_success: Option<(u64, u64)>,
    body_bytes: usize,
    /// For a passed-through JSON answer: the upstream's origin and the proxy's, and the body so far.
    relink: Option<Relink>,
    /// For `POST insights/cancel`: whose status its body's `client_query_id` may drop.
    cancel: Option<Cancel>,
    /// When a passed-through request's answer must be complete: the proxy's own upstream calls
    /// get `connect_timeout + read_timeout` in total, and so does a pass-through.
    upstream_deadline: Option<Instant>,
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
struct Relink {
    from: Vec<u8>,
    to: Vec<u8>,
    body: Vec<u8>,
    overflowed: bool,
}

/// A cancel request's body as it passes, to find the `client_query_id` it names.
#[derive(Debug)]
struct Cancel {
    owner: crate::cache::Partition,
    body: Vec<u8>,
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

impl InsightsProxy {
    fn max_body(&self) -> usize {
        self.app.config.max_body_bytes
    }

    /// Everything the proxy decides about a request before pingora may forward it: `Some(reply)`
    /// when the proxy answers it itself (the caller writes `reply`), `None` when the request goes to
    /// the upstream. Both `request_filter` and [`crate::fast::FastPath`] decide here.
    ///
    /// `fast`: the caller can still hand the request to pingora's proxy unread: then `None` is
    /// returned before a request body is read (a GET with a body is decided by `request_filter`).
    /// Nothing here is visible to the client before the caller writes the reply.
    pub(crate) async fn decide(
        &self,
        session: &mut ServerSession,
        ctx: &mut RequestCtx,
        fast: bool,
    ) -> Result<Option<Reply>> {
        // Ambiguous framing or a malformed authority: refused before anything else (and closed).
        if let Err(e) = crate::framing::admit(session) {
            return Ok(Some(rejected(&e)));
        }
        // pingora makes an HTTP/1.1 connection's idle wait infinite once a request was read; this
        // bounds the wait before the next request (carried to the reused connection).
        session.set_keepalive(Some(self.app.config.idle_timeout.as_secs().max(1)));
        let req = session.req_header();
        let header_bytes: usize = req.headers.iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
        if req.headers.len() > MAX_REQUEST_HEADERS || header_bytes > MAX_REQUEST_HEADER_BYTES {
            return Ok(Some(rejected(&ApiError::headers_too_large())));
        }
        let uri_len = req.uri.path_and_query().map_or(0, |p| p.as_str().len());
        if uri_len > MAX_URI_BYTES {
            return Ok(Some(rejected(&ApiError::uri_too_long(MAX_URI_BYTES))));
        }
        let declared_len =
            req.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
        if declared_len.is_some_and(|n| n > self.max_body()) {
            return Ok(Some(rejected(&ApiError::payload_too_large(self.max_body()))));
        }
        let query = match QueryParams::parse(req.uri.query()) {
            Ok(q) => q,
            Err(e) => return Ok(Some(rejected(&ApiError::bad_request(e.to_string())))),
        };
        let route = route(&req.method, req.uri.path(), &query);
        ctx.route = Some(route.clone());
        match route {
            Route::Reject(e) => Ok(Some(rejected(&e))),
            Route::Passthrough => Ok(None),
            Route::InsightWrite { project, insight } => {
                ctx.purge_on_success = Some((project, insight));
                Ok(None)
            }
            Route::QueryCancel { query_id, .. } => {
                // The upstream answers as it does; a status the proxy issued goes with it.
                let headers = &session.req_header().headers;
                if let Ok(Some(principal)) =
                    Principal::from_request(&self.app.keyer, headers, query.get("personal_api_key"), None)
                {
                    match query_id {
                        Some(id) => self.app.statuses.remove(principal.partition(), &id),
                        None => ctx.cancel = Some(Cancel { owner: principal.partition(), body: Vec::new() }),
                    }
                }
                Ok(None)
            }
            Route::QueryStatus { project, query_id } => {
                if !insights::is_own_query_id(&query_id) {
                    return Ok(None);
                }
                let body_read = !session.is_body_empty();
                let fields = match self.body_fields(session, fast).await? {
                    Fields::Read(f) => f,
                    Fields::Refused(reply) => return Ok(Some(reply)),
                    Fields::Later => return Ok(None),
                };
                let (headers, query_key) = (&session.req_header().headers, query.get("personal_api_key"));
                let principal =
                    match Principal::from_request(&self.app.keyer, headers, query_key, fields.api_key.as_deref()) {
                        Ok(p) => p,
                        Err(e) => return Ok(Some(refused_principal(&e))),
                    };
                let anonymous = principal.is_none();
                Ok(match insights::query_status(&self.app, project, &query_id, principal).await {
                    Some(reply) => Some(reply),
                    // A read body cannot be passed on: PostHog's answers for an id it does not know.
                    None if body_read && anonymous => Some(rejected(&ApiError::not_authenticated())),
                    None if body_read => Some(rejected(&ApiError::not_found())),
                    None => None,
                })
            }
            Route::InsightRetrieve { .. } | Route::InsightList { .. } => {
                let fields = match self.body_fields(session, fast).await? {
                    Fields::Read(f) => f,
                    Fields::Refused(reply) => return Ok(Some(reply)),
                    Fields::Later => return Ok(None),
                };
                let req = session.req_header();
                let principal = match Principal::from_request(
                    &self.app.keyer,
                    &req.headers,
                    query.get("personal_api_key"),
                    fields.api_key.as_deref(),
                ) {
                    Ok(Some(p)) => p,
                    Ok(None) => {
                        // Never answered from the cache: the upstream says what it says (401).
                        ctx.cache_status = Some(CacheStatus::fwd(Fwd::Bypass).detail(Detail::NoCredential));
                        return Ok(None);
                    }
                    Err(e) => return Ok(Some(refused_principal(&e))),
                };
                // A number in the body counts as its text, as Python's `str()` gives it.
                let number = match &fields.refresh {
                    Some(Value::Number(n)) => n.to_string(),
                    _ => String::new(),
                };
                let param = match (query.get("refresh"), &fields.refresh) {
                    (Some(q), _) => RefreshParam::Text(q),
                    (None, Some(Value::Bool(b))) => RefreshParam::Bool(*b),
                    (None, Some(Value::String(s))) => RefreshParam::Text(s.as_str()),
                    (None, Some(Value::Number(_))) => RefreshParam::Text(&number),
                    _ => RefreshParam::Absent,
                };
                let (mode, truthy) = (param.mode(), param.truthy());
                ctx.mode = Some(mode);
                let path = req.uri.path().to_string();
                let reply = match route {
                    Route::InsightRetrieve { project, insight } => {
                        let call = InsightCall { project, insight, path, query, principal, mode, truthy };
                        insights::retrieve(&self.app, call).await
                    }
                    Route::InsightList { project } => {
                        let public_base = public_base(&self.app, req);
                        let call = ListCall { project, path, query, principal, mode, truthy, public_base };
                        insights::list(&self.app, call).await
                    }
                    _ => unreachable!("matched above"),
                };
                Ok(Some(reply))
            }
        }
    }

    /// A GET may carry a JSON body with `refresh` or `personal_api_key` (PostHog reads
    /// `request.data`): read here when the proxy answers the request itself. The fast path hands
    /// such a request to pingora's proxy first ([`Fields::Later`]), which decides again.
    async fn body_fields(&self, session: &mut ServerSession, fast: bool) -> Result<Fields> {
        if session.is_body_empty() {
            return Ok(Fields::Read(BodyFields::default()));
        }
        if fast {
            return Ok(Fields::Later);
        }
        let body = match read_body(session, self.max_body()).await {
            Ok(b) => b,
            Err(BodyError::TooLarge) => {
                return Ok(Fields::Refused(rejected(&ApiError::payload_too_large(self.max_body()))))
            }
            Err(_) => return Err(Error::new(ErrorType::ReadError)),
        };
        Ok(match body_fields(&body) {
            Ok(f) => Fields::Read(f),
            Err(_) => {
                let e = ApiError::new(
                    400,
                    "validation_error",
                    "parse_error",
                    "JSON parse error - the request body is not valid JSON.",
                );
                Fields::Refused(rejected(&e))
            }
        })
    }

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

/// What the client sent in a JSON body that matters here: `refresh` and `personal_api_key`.
#[derive(Default)]
struct BodyFields {
    refresh: Option<Value>,
    api_key: Option<String>,
}

/// A request body's fields, a refusal, or (fast path) not read yet.
enum Fields {
    Read(BodyFields),
    Refused(Reply),
    Later,
}

enum BodyError {
    TooLarge,
    Malformed,
    Read,
}

/// Reads a (small, GET) request body fully, refusing more than `limit` bytes.
async fn read_body(session: &mut ServerSession, limit: usize) -> std::result::Result<Bytes, BodyError> {
    let mut buf = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > limit {
                    return Err(BodyError::TooLarge);
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(Bytes::from(buf)),
            Err(_) => return Err(BodyError::Read),
        }
    }
}

fn body_fields(body: &[u8]) -> std::result::Result<BodyFields, BodyError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(BodyFields::default());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut m)) => Ok(BodyFields {
            refresh: m.remove("refresh"),
            api_key: m.remove("personal_api_key").and_then(|v| v.as_str().map(str::to_string)),
        }),
        Ok(_) => Ok(BodyFields::default()),
        Err(_) => Err(BodyError::Malformed),
    }
}

fn public_base(app: &App, req: &RequestHeader) -> String {
    if let Some(u) = &app.config.public_url {
        return u.clone();
    }
    let host = req
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .filter(|h| crate::framing::is_valid_authority(h.as_bytes()))
        .unwrap_or("localhost");
    let proto = match req.headers.get("x-forwarded-proto").and_then(|h| h.to_str().ok()) {
        Some("https") => "https",
        _ => "http",
    };
    format!("{proto}://{host}")
}

pub async fn write_reply(session: &mut ServerSession, reply: &Reply) -> Result<()> {
    static CACHE_STATUS: header::HeaderName = header::HeaderName::from_static("cache-status");
    let invalid = |what: &'static str| Error::explain(ErrorType::InvalidHTTPHeader, what);
    // Built as plain `http` parts, then handed to pingora: no case map, and the names are not
    // re-parsed from bytes as `ResponseHeader::insert_header` does (pingora titles the standard
    // names on the wire either way).
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = http::StatusCode::from_u16(reply.status).map_err(|_| invalid("invalid status"))?;
    let h = &mut parts.headers;
    h.reserve(6);
    let content_type = match reply.content_type.as_deref() {
        Some(ct) => http::HeaderValue::from_str(ct).map_err(|_| invalid("invalid content-type"))?,
        None => http::HeaderValue::from_static("application/json"),
    };
    h.insert(header::CONTENT_TYPE, content_type);
    h.insert(header::CONTENT_LENGTH, http::HeaderValue::from(reply.body.len()));
    let cache_status =
        http::HeaderValue::try_from(reply.cache_status.to_string()).map_err(|_| invalid("invalid cache-status"))?;
    h.insert(CACHE_STATUS.clone(), cache_status);
    h.insert(header::VARY, http::HeaderValue::from_static("Authorization, Cookie"));
    for (name, value) in &reply.relayed {
        h.append(name.clone(), value.clone());
    }
    let resp = ResponseHeader::from(parts);
    // A failed write is the client's doing (it went away): say so, or fail_to_proxy counts it
    // against the upstream's circuit breaker.
    // Written to the downstream session directly: the proxy installs no downstream modules, so
    // pingora_proxy's `Session::write_response_*` would only forward to these.
    session.write_response_header(Box::new(resp)).await.map_err(|e| e.into_down())?;
    session.write_response_body(reply.body.clone(), true).await.map_err(|e| e.into_down())?;
    Ok(())
}

/// The HTTP/1.1 response head pingora's HTTP/1 session writes for `reply` through [`write_reply`]
/// (same status line, headers, order and case, then pingora's `Date` and `Connection`), built
/// without a `ResponseHeader`. `None` when `write_reply` would refuse the reply (the caller then
/// goes through it).
pub(crate) fn reply_head(reply: &Reply, keep_alive: bool) -> Option<Vec<u8>> {
    // `http::HeaderValue::from_str`'s rule.
    let valid = |v: &str| v.bytes().all(|b| b == b'\t' || (b >= 32 && b != 127));
    let status = http::StatusCode::from_u16(reply.status).ok()?;
    // Relayed upstream headers are rare (error answers): pingora's own writer takes those.
    if !reply.relayed.is_empty() {
        return None;
    }
    let content_type = reply.content_type.as_deref().unwrap_or("application/json");
    if !valid(content_type) {
        return None;
    }
    let date = pingora::protocols::http::date::get_cached_date();
    let mut head = Vec::with_capacity(256 + content_type.len());
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\nContent-Type: ");
    head.extend_from_slice(content_type.as_bytes());
    head.extend_from_slice(b"\r\nContent-Length: ");
    head.extend_from_slice(itoa(reply.body.len(), &mut [0u8; 20]));
    head.extend_from_slice(b"\r\ncache-status: ");
    let _ = write!(head, "{}", reply.cache_status);
    head.extend_from_slice(b"\r\nvary: Authorization, Cookie\r\nDate: ");
    head.extend_from_slice(date.as_bytes());
    let connection: &[u8] = if keep_alive { b"keep-alive" } else { b"close" };
    head.extend_from_slice(b"\r\nConnection: ");
    head.extend_from_slice(connection);
    head.extend_from_slice(b"\r\n\r\n");
    Some(head)
}

fn itoa(mut n: usize, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Writes `reply` and keeps its `Cache-Status` for the log and metrics (also when the write fails).
pub(crate) async fn answer_with(session: &mut ServerSession, ctx: &mut RequestCtx, reply: Reply) -> Result<bool> {
    let written = write_reply(session, &reply).await;
    ctx.cache_status = Some(reply.cache_status);
    written.map(|()| true)
}

/// Fails a pass-through whose upstream answer is taking longer than its total deadline.
fn within_deadline(ctx: &RequestCtx) -> Result<()> {
    if ctx.upstream_deadline.is_some_and(|d| Instant::now() > d) {
        let e = Error::explain(ErrorType::ReadTimedout, "the upstream's answer took longer than its deadline");
        return Err(e.into_up());
    }
    Ok(())
}

/// A credential that can never authenticate: PostHog's answer for an invalid key.
fn refused_principal(e: &PrincipalError) -> Reply {
    rejected(&ApiError::authentication_failed(e.to_string()))
}

/// A request the proxy refuses itself.
fn rejected(e: &ApiError) -> Reply {
    Reply::error(e, CacheStatus::fwd(Fwd::Bypass).detail(Detail::Rejected))
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
            let base = public_base(&self.app, session.req_header());
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
                let rewritten = format!("{}{rest}", public_base(&self.app, session.req_header()));
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
