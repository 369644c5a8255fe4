//! The front door's decision: what the proxy does with a request before pingora may forward it
//! (refuse it, answer it itself, or pass it through), the same on the fast path and pingora's.

use bytes::Bytes;
use http::{header, HeaderName};
use pingora::protocols::http::ServerSession;
use pingora::{Error, ErrorType, Result};
use serde_json::Value;

use crate::app::App;
use crate::auth::{Principal, PrincipalError};
use crate::cache_status::{CacheStatus, Detail, Fwd};
use crate::error::ApiError;
use crate::fields::HeaderFields;
use crate::insights::{self, InsightCall, ListCall, Reply};
use crate::query::QueryParams;
use crate::refresh::RefreshParam;
use crate::routes::{route, Route};

use super::ctx::{Cancel, RequestCtx};
use super::request::{OneRead, Request};
use super::InsightsProxy;

/// More request headers than this, or more header bytes, is refused (431) before any work.
pub const MAX_REQUEST_HEADERS: usize = 100;
pub const MAX_REQUEST_HEADER_BYTES: usize = 64 * 1024;
/// A longer request target is refused (414) before any work: the proxy re-encodes the query of
/// its own upstream calls (up to three bytes per byte), and this keeps every such call within what
/// an HTTP request line may carry, so a request the proxy accepts is one it can forward.
pub const MAX_URI_BYTES: usize = 16 * 1024;

impl InsightsProxy {
    pub(super) fn max_body(&self) -> usize {
        self.app.config.max_body_bytes
    }

    /// How long a connection may wait idle for its next request.
    pub(super) fn idle_timeout_secs(&self) -> u64 {
        self.app.config.idle_timeout.as_secs().max(1)
    }

    /// Everything the proxy decides about a request before pingora may forward it: `Some(reply)`
    /// when the proxy answers it itself (the caller writes `reply`), `None` when the request goes to
    /// the upstream. `request_filter` decides here; the fast path decides a one-read GET with
    /// [`Self::decide_one_read`], the same steps after the checks its parser already made.
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
        if let Err(e) = super::framing::admit(session) {
            return Ok(Some(rejected(&e)));
        }
        // pingora makes an HTTP/1.1 connection's idle wait infinite once a request was read; this
        // bounds the wait before the next request (carried to the reused connection). A connection
        // the client does not keep (`close`, or HTTP/1.0 without `keep-alive`) stays closing.
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(self.idle_timeout_secs()));
        }
        let tls = is_tls(session);
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
        let (route, query) = match self.route_request(&Request::of(req, tls), ctx) {
            Routed::Answer(route, query) => (route, query),
            Routed::Settled(settled) => return Ok(settled),
        };
        let body_read = !session.is_body_empty();
        let fields = match self.body_fields(session, fast).await? {
            Fields::Read(f) => f,
            Fields::Refused(reply) => return Ok(Some(reply)),
            Fields::Later => return Ok(None),
        };
        let req = Request::of(session.req_header(), tls);
        Ok(self.respond(&req, route, query, fields, body_read, ctx).await)
    }

    /// [`Self::decide`] for a GET that [`OneRead::parse`] accepted: its framing, authority and
    /// sizes are within what `decide` checks, and it has no body.
    pub(crate) async fn decide_one_read(&self, head: &OneRead<'_>, tls: bool, ctx: &mut RequestCtx) -> Option<Reply> {
        let req = head.request(tls);
        match self.route_request(&req, ctx) {
            Routed::Answer(route, query) => self.respond(&req, route, query, BodyFields::default(), false, ctx).await,
            Routed::Settled(settled) => settled,
        }
    }

    /// The request's route and query, or what routing alone settles.
    fn route_request<F: HeaderFields + ?Sized>(&self, req: &Request<'_, F>, ctx: &mut RequestCtx) -> Routed {
        let query = match QueryParams::parse(req.query) {
            Ok(q) => q,
            Err(e) => return Routed::Settled(Some(rejected(&ApiError::bad_request(e.to_string())))),
        };
        let route = route(req.method, req.path, &query);
        ctx.route = Some(route.clone());
        match route {
            Route::Reject(e) => Routed::Settled(Some(rejected(&e))),
            Route::Passthrough => Routed::Settled(None),
            Route::InsightWrite { project, insight } => {
                ctx.purge_on_success = Some((project, insight));
                Routed::Settled(None)
            }
            Route::QueryCancel { query_id, .. } => {
                // The upstream answers as it does; a status the proxy issued goes with it.
                let key = query.get("personal_api_key");
                if let Ok(Some(principal)) = Principal::from_request(&self.app.keyer, req.headers, key, None) {
                    match query_id {
                        Some(id) => self.app.statuses.remove(principal.partition(), &id),
                        None => ctx.cancel = Some(Cancel { owner: principal.partition(), body: Vec::new() }),
                    }
                }
                Routed::Settled(None)
            }
            Route::QueryStatus { ref query_id, .. } if !insights::is_own_query_id(query_id) => Routed::Settled(None),
            Route::QueryStatus { .. } | Route::InsightRetrieve { .. } | Route::InsightList { .. } => {
                Routed::Answer(route, query)
            }
        }
    }

    /// The answer to a routed request, with its body's `fields` (`body_read`: it had a body).
    async fn respond<F: HeaderFields + ?Sized>(
        &self,
        req: &Request<'_, F>,
        route: Route,
        query: QueryParams,
        fields: BodyFields,
        body_read: bool,
        ctx: &mut RequestCtx,
    ) -> Option<Reply> {
        let query_key = query.get("personal_api_key");
        let principal =
            match Principal::from_request(&self.app.keyer, req.headers, query_key, fields.api_key.as_deref()) {
                Ok(p) => p,
                Err(e) => return Some(refused_principal(&e)),
            };
        if let Route::QueryStatus { project, query_id } = route {
            let anonymous = principal.is_none();
            return match insights::query_status(&self.app, project, &query_id, principal).await {
                Some(reply) => Some(reply),
                // A read body cannot be passed on: PostHog's answers for an id it does not know.
                None if body_read && anonymous => Some(rejected(&ApiError::not_authenticated())),
                None if body_read => Some(rejected(&ApiError::not_found())),
                None => None,
            };
        }
        let Some(principal) = principal else {
            // Never answered from the cache: the upstream says what it says (401).
            ctx.cache_status = Some(CacheStatus::fwd(Fwd::Bypass).detail(Detail::NoCredential));
            return None;
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
        let path = req.path.to_string();
        Some(match route {
            Route::InsightRetrieve { project, insight } => {
                let call = InsightCall { project, insight, path, query, principal, mode, truthy };
                insights::retrieve(&self.app, call).await
            }
            Route::InsightList { project } => {
                let public_base = public_base(&self.app, req);
                let call = ListCall { project, path, query, principal, mode, truthy, public_base };
                insights::list(&self.app, call).await
            }
            _ => unreachable!("routed to an answer"),
        })
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
}

/// What routing a request comes to.
enum Routed {
    /// Answered from its route, its query and (once read) its body's fields.
    Answer(Route, QueryParams),
    /// Settled by routing alone: a refusal, or `None` for the upstream.
    Settled(Option<Reply>),
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

/// The origin clients reach the proxy at: `public_url`, else the request's authority, with `https`
/// when the connection is TLS or a balancer in front says so (`X-Forwarded-Proto`).
fn public_base<F: HeaderFields + ?Sized>(app: &App, req: &Request<'_, F>) -> String {
    if let Some(u) = &app.config.public_url {
        return u.clone();
    }
    let host = req
        .headers
        .first(&header::HOST)
        .and_then(|h| std::str::from_utf8(h).ok())
        .or(req.authority)
        .filter(|h| super::framing::is_valid_authority(h.as_bytes()))
        .unwrap_or("localhost");
    let proto = match req.headers.first(&X_FORWARDED_PROTO) {
        _ if req.tls => "https",
        Some(b"https") => "https",
        _ => "http",
    };
    format!("{proto}://{host}")
}

/// [`public_base`] of a request read by pingora's session.
pub(super) fn session_public_base(app: &App, session: &ServerSession) -> String {
    public_base(app, &Request::of(session.req_header(), is_tls(session)))
}

fn is_tls(session: &ServerSession) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// A credential that can never authenticate: PostHog's answer for an invalid key.
fn refused_principal(e: &PrincipalError) -> Reply {
    rejected(&ApiError::authentication_failed(e.to_string()))
}

/// A request the proxy refuses itself.
pub(super) fn rejected(e: &ApiError) -> Reply {
    Reply::error(e, CacheStatus::fwd(Fwd::Bypass).detail(Detail::Rejected))
}
