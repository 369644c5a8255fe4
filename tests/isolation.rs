//! Principal isolation through the real proxy, as a property over random interleavings.
//!
//! Four principals (three personal API keys and one session) ask for insights, list pages and
//! query statuses in every carrier form PostHog accepts (bearer header, `personal_api_key` query
//! parameter, the same field in a JSON body on GET, the `sessionid` cookie), sometimes with extra
//! carriers beside the real one (junk credentials, or another principal's), in every refresh mode,
//! through both URL aliases, for a few insights and variants; two of them are revoked mid-run.
//!
//! The upstream is a small fake PostHog in this file: it authenticates in PostHog's order and
//! embeds the credential it authenticated in every result it calculates (`"marker"`), so a leak is
//! visible in any answer. The property: no answer ever carries a marker other than the requesting
//! principal's own (the principal is PostHog's first carrier), and once the revalidation window
//! has passed after a revocation the revoked principal gets no data at all. Every upstream call
//! the proxy makes carries exactly one credential, as one bearer header or one session cookie,
//! and only ever for a credential some request was authenticated as. Answers' statuses are
//! checked too, against what the principal's standing allows (see `Run::check_answer`).
//!
//! Time is the proxy's own clock, moved forward instead of slept; every case brings fresh
//! credentials, so nothing one case revokes or caches reaches another.
//!
//! Two regressions it found are pinned by their own tests at the end of this file: a query-status
//! poll's principal is the key in its JSON body before a session cookie, and the "nothing cached"
//! note never answers a principal past its revalidation window.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{eventually, http, start_proxy, test_config, Resp};
use insights_proxy::app::App;
use insights_proxy::clock::{format_datetime, Clock};
use insights_proxy::query::{encode, QueryParams};
use posthog_sim::serve::free_port;
use posthog_sim::testing::Running;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use serde_json::{json, Value};
use time::OffsetDateTime;

/// The proxy's revalidation window: cached data reaches a principal only while the upstream
/// accepted it this recently.
const WINDOW: Duration = Duration::from_secs(1);
/// The insights of project 1 the fake upstream knows.
const INSIGHTS: [u64; 4] = [1, 2, 3, 4];
/// An insight id the upstream does not know (404).
const MISSING_INSIGHT: u64 = 99;
/// The principals: 0..=2 are personal API keys, 3 is a session.
const PRINCIPALS: usize = 4;
const SESSION: usize = 3;
/// The third key may not see insight 3: the upstream answers 403.
const RESTRICTED: (usize, u64) = (2, 3);
/// Trends by day go stale after 6 h (PostHog's table, which the proxy uses too).
const STALE_AFTER: time::Duration = time::Duration::hours(6);
/// `filters_override` values of the variants.
const FILTERS: [&str; 2] = [r#"{"date_from":"-7d"}"#, r#"{"date_from":"-30d","properties":[]}"#];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Key,
    Session,
}

/// Where a credential travels in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Form {
    Bearer,
    Query,
    Body,
    Cookie,
}

impl Form {
    /// PostHog's order: the first carrier present is the one it authenticates.
    const ORDER: [Form; 4] = [Form::Bearer, Form::Query, Form::Body, Form::Cookie];

    fn kind(self) -> Kind {
        match self {
            Form::Cookie => Kind::Session,
            _ => Kind::Key,
        }
    }
}

/// Who a request is, as PostHog would authenticate it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Identity {
    kind: Kind,
    credential: String,
}

/// The first carrier of `placed` in `order`, as an identity.
fn first_in(placed: &[(Form, String)], order: &[Form]) -> Option<Identity> {
    order.iter().find_map(|f| {
        placed.iter().find(|(pf, _)| pf == f).map(|(f, v)| Identity { kind: f.kind(), credential: v.clone() })
    })
}

// ---------------------------------------------------------------------------------------------
// The fake PostHog upstream.
// ---------------------------------------------------------------------------------------------

/// One request the upstream received: the credentials it carried, in PostHog's order.
#[derive(Debug, Clone)]
struct Seen {
    target: String,
    carriers: Vec<(Form, String)>,
    /// A `Cookie` header carried something besides `sessionid`.
    other_cookies: bool,
}

#[derive(Default)]
struct Upstream {
    keys: HashSet<String>,
    sessions: HashSet<String>,
    revoked: HashSet<String>,
    /// Credential → the insight it may not see.
    restricted: HashMap<String, u64>,
    /// (credential, insight, filters_hash) → (calculation number, when): the upstream's cache,
    /// per credential so that every result is its principal's own.
    results: HashMap<(String, u64, String), (u64, OffsetDateTime)>,
    calculations: u64,
    /// Calculation number → the credential it was calculated for.
    issued: HashMap<u64, String>,
    seen: Vec<Seen>,
}

struct Request {
    method: String,
    target: String,
    /// Lower-case names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn error_body(kind: &str, code: &str, detail: &str) -> String {
    json!({"type": kind, "code": code, "detail": detail, "attr": null}).to_string()
}

fn filters_hash(insight: u64, filters: Option<&str>) -> String {
    match filters.filter(|f| !f.is_empty()) {
        None => format!("h_{insight}"),
        Some(f) => format!("h_{insight}_{}", f.bytes().map(u64::from).sum::<u64>()),
    }
}

fn insight_body(
    insight: u64,
    credential: &str,
    result: Option<(u64, OffsetDateTime)>,
    cached: bool,
    hash: &str,
) -> Value {
    json!({
        "id": insight,
        "name": format!("insight {insight}"),
        "result": result.map(|(n, _)| json!([{"marker": credential, "n": n}])),
        "last_refresh": result.map(|(_, at)| format_datetime(at)),
        "is_cached": cached,
        "timezone": "UTC",
        "query": {"kind": "InsightVizNode", "source": {"kind": "TrendsQuery", "interval": "day", "dateRange": {"date_to": null}}},
        "filters_hash": hash,
    })
}

impl Upstream {
    fn answer(&mut self, req: &Request, now: OffsetDateTime) -> (u16, String) {
        let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
        let q = QueryParams::parse(Some(query)).unwrap_or_default();
        // Every carrier present, in PostHog's order.
        let mut carriers = Vec::new();
        let mut other_cookies = false;
        for (k, v) in &req.headers {
            if let Some(key) = v.strip_prefix("Bearer ").filter(|_| k == "authorization") {
                carriers.push((Form::Bearer, key.trim().to_string()));
            }
        }
        if let Some(k) = q.get("personal_api_key").filter(|k| !k.is_empty()) {
            carriers.push((Form::Query, k.to_string()));
        }
        if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(&req.body) {
            if let Some(k) = m.get("personal_api_key").and_then(Value::as_str) {
                carriers.push((Form::Body, k.to_string()));
            }
        }
        for (_, v) in req.headers.iter().filter(|(k, _)| k == "cookie") {
            for c in v.split(';').map(str::trim).filter(|c| !c.is_empty()) {
                match c.split_once('=') {
                    Some(("sessionid", id)) if !id.is_empty() => carriers.push((Form::Cookie, id.to_string())),
                    _ => other_cookies = true,
                }
            }
        }
        self.seen.push(Seen { target: req.target.clone(), carriers: carriers.clone(), other_cookies });
        let Some((form, credential)) = carriers.into_iter().next() else {
            let body = error_body(
                "authentication_error",
                "not_authenticated",
                "Authentication credentials were not provided.",
            );
            return (401, body);
        };
        let known = match form.kind() {
            Kind::Key => self.keys.contains(&credential),
            Kind::Session => self.sessions.contains(&credential),
        };
        if !known || self.revoked.contains(&credential) {
            let detail = match form.kind() {
                Kind::Key => "Personal API key found in request Authorization header is invalid.",
                Kind::Session => "Session is invalid or has expired.",
            };
            return (401, error_body("authentication_error", "authentication_failed", detail));
        }
        let not_found = || (404, error_body("invalid_request", "not_found", "Not found."));
        if req.method != "GET" {
            return (405, error_body("invalid_request", "method_not_allowed", "Method not allowed."));
        }
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match segments.as_slice() {
            ["api", "environments" | "projects", "1", "insights"] => (200, self.list(&credential, &q).to_string()),
            ["api", "environments" | "projects", "1", "insights", id] => {
                let Some(insight) = id.parse::<u64>().ok().filter(|i| INSIGHTS.contains(i)) else {
                    return not_found();
                };
                if self.restricted.get(&credential) == Some(&insight) {
                    let detail = "You don't have access to this insight.";
                    return (403, error_body("authentication_error", "permission_denied", detail));
                }
                (200, self.insight(&credential, insight, &q, now).to_string())
            }
            _ => not_found(),
        }
    }

    /// `GET .../insights/:id/`: `force_cache` answers what is cached (no result if nothing),
    /// `blocking` calculates when nothing fresh is cached, `force_blocking` always calculates.
    fn insight(&mut self, credential: &str, insight: u64, q: &QueryParams, now: OffsetDateTime) -> Value {
        let hash = filters_hash(insight, q.get("filters_override"));
        let key = (credential.to_string(), insight, hash.clone());
        let cached = self.results.get(&key).copied();
        let calculate = match q.get("refresh").unwrap_or("force_cache") {
            "force_blocking" | "true" => true,
            "blocking" => cached.is_none_or(|(_, at)| now - at > STALE_AFTER),
            _ => false,
        };
        if !calculate {
            return insight_body(insight, credential, cached, cached.is_some(), &hash);
        }
        self.calculations += 1;
        let n = self.calculations;
        self.results.insert(key, (n, now));
        self.issued.insert(n, credential.to_string());
        insight_body(insight, credential, Some((n, now)), false, &hash)
    }

    /// `GET .../insights/`: a DRF page of the insights the credential may see, as cached.
    fn list(&self, credential: &str, q: &QueryParams) -> Value {
        let visible: Vec<u64> = INSIGHTS.into_iter().filter(|i| self.restricted.get(credential) != Some(i)).collect();
        let limit = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(100usize);
        let offset = q.get("offset").and_then(|l| l.parse().ok()).unwrap_or(0usize);
        let results: Vec<Value> = visible
            .iter()
            .skip(offset)
            .take(limit)
            .map(|&id| {
                let hash = filters_hash(id, None);
                let cached = self.results.get(&(credential.to_string(), id, hash.clone())).copied();
                insight_body(id, credential, cached, cached.is_some(), &hash)
            })
            .collect();
        json!({"count": visible.len(), "next": null, "previous": null, "results": results})
    }
}

/// A fake PostHog on 127.0.0.1:0: HTTP/1.1 keep-alive with `Content-Length` framing, a thread per
/// connection, all stopped (and joined) when dropped.
struct FakePostHog {
    port: u16,
    state: Arc<Mutex<Upstream>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    handlers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl FakePostHog {
    fn start(clock: Clock) -> FakePostHog {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = listener.local_addr().unwrap().port();
        let state: Arc<Mutex<Upstream>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let handlers: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (state2, stop2, handlers2) = (state.clone(), stop.clone(), handlers.clone());
        let accept = std::thread::spawn(move || {
            for s in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(s) = s else { continue };
                let (state, stop, clock) = (state2.clone(), stop2.clone(), clock.clone());
                handlers2.lock().unwrap().push(std::thread::spawn(move || serve(s, &state, &clock, &stop)));
            }
        });
        FakePostHog { port, state, stop, accept: Some(accept), handlers }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Upstream> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FakePostHog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for t in self.handlers.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = t.join();
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Serves requests on one connection until the client closes it or the fake stops.
fn serve(mut s: TcpStream, state: &Mutex<Upstream>, clock: &Clock, stop: &AtomicBool) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let (head_len, body_len) = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0usize);
                if buf.len() >= end + 4 + len {
                    break (end, len);
                }
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
            match s.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
        let body = buf[head_len + 4..head_len + 4 + body_len].to_vec();
        buf.drain(..head_len + 4 + body_len);
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or("").split(' ');
        let method = request_line.next().unwrap_or("").to_string();
        let target = request_line.next().unwrap_or("/").to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let close = headers.iter().any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case("close"));
        let req = Request { method, target, headers, body };
        let (status, body) = state.lock().unwrap_or_else(|e| e.into_inner()).answer(&req, clock.now());
        let reason = match status {
            200 => "OK",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            _ => "Method Not Allowed",
        };
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if s.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Operations.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Cred {
    /// One of the case's principals (in whatever form the carrier gives it).
    Principal(usize),
    /// A credential the upstream never accepts.
    Junk,
}

#[derive(Debug, Clone)]
struct Carriers {
    /// The principal meant, and its form (a session travels as a cookie, a key in any other,
    /// except when the case means to cross them).
    primary: (usize, Form),
    /// More carriers beside it; one carrier per form (a form already used is skipped).
    extras: Vec<(Form, Cred)>,
}

#[derive(Debug, Clone, Copy)]
enum Alias {
    Environments,
    Projects,
}

impl Alias {
    fn path(self) -> &'static str {
        match self {
            Alias::Environments => "/api/environments/1",
            Alias::Projects => "/api/projects/1",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Variant {
    Plain,
    Dashboard(u8),
    Filters(usize),
}

#[derive(Debug, Clone, Copy)]
enum Refresh {
    Absent,
    Flag(bool),
    Mode(&'static str),
}

const REFRESHES: [Refresh; 10] = [
    Refresh::Absent,
    Refresh::Flag(true),
    Refresh::Flag(false),
    Refresh::Mode("force_cache"),
    Refresh::Mode("blocking"),
    Refresh::Mode("async"),
    Refresh::Mode("lazy_async"),
    Refresh::Mode("force_blocking"),
    Refresh::Mode("force_async"),
    Refresh::Mode("async_except_on_cache_miss"),
];

/// How far the shared clock moves.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Less than the revalidation window.
    Short,
    /// Past the revalidation window.
    Window,
    /// Into the refresh-ahead window of a result calculated just now (90–95 % of 6 h).
    Ahead,
    /// Past the staleness threshold of day trends (6 h).
    Stale,
    /// Past the lazy threshold (12 h).
    Lazy,
}

impl Step {
    fn duration(self) -> Duration {
        match self {
            Step::Short => Duration::from_millis(400),
            Step::Window => WINDOW + Duration::from_millis(100),
            Step::Ahead => Duration::from_secs(5 * 3600 + 33 * 60),
            Step::Stale => Duration::from_secs(6 * 3600 + 30 * 60),
            Step::Lazy => Duration::from_secs(12 * 3600 + 30 * 60),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Retrieve {
        carriers: Carriers,
        alias: Alias,
        insight: u64,
        variant: Variant,
        refresh: Refresh,
        in_body: bool,
    },
    List {
        carriers: Carriers,
        alias: Alias,
        limit: u8,
        offset: u8,
        dashboard: bool,
        refresh: Refresh,
        in_body: bool,
    },
    /// Polls one of the status ids issued so far in the case (to anyone), as anyone.
    Poll {
        carriers: Carriers,
        alias: Alias,
        pick: Index,
    },
    Advance(Step),
    /// Waits until no background work is running.
    Settle,
}

/// One run: operations, a revocation, more operations, a second revocation, more operations.
#[derive(Debug, Clone)]
struct Case {
    before: Vec<Op>,
    first_revoked: usize,
    middle: Vec<Op>,
    second_revoked: usize,
    after: Vec<Op>,
}

fn carriers() -> impl Strategy<Value = Carriers> {
    // Mostly the principal's own form; sometimes any form, so a key's text also arrives as a
    // session cookie and a session id as a key (other principals, which the upstream refuses).
    let any_form = prop::option::weighted(0.15, prop::sample::select(Form::ORDER.to_vec()));
    let primary = (0..PRINCIPALS, prop::sample::select(vec![Form::Bearer, Form::Query, Form::Body]), any_form)
        .prop_map(|(p, f, any)| (p, any.unwrap_or(if p == SESSION { Form::Cookie } else { f })));
    let cred = prop_oneof![3 => Just(Cred::Junk), 2 => (0..PRINCIPALS).prop_map(Cred::Principal)];
    let extra = (prop::sample::select(Form::ORDER.to_vec()), cred);
    let extras = prop_oneof![3 => Just(Vec::new()), 2 => prop::collection::vec(extra, 1..=2)];
    (primary, extras).prop_map(|(primary, extras)| Carriers { primary, extras })
}

fn op() -> impl Strategy<Value = Op> {
    let alias = any::<bool>().prop_map(|b| if b { Alias::Environments } else { Alias::Projects });
    let insight = prop_oneof![8 => prop::sample::select(INSIGHTS.to_vec()), 1 => Just(MISSING_INSIGHT)];
    let variant = prop_oneof![
        4 => Just(Variant::Plain),
        1 => (1..=2u8).prop_map(Variant::Dashboard),
        1 => (0..FILTERS.len()).prop_map(Variant::Filters),
    ];
    let refresh = (prop::sample::select(REFRESHES.to_vec()), prop::bool::weighted(0.2));
    let step =
        prop::sample::select(vec![Step::Short, Step::Window, Step::Window, Step::Ahead, Step::Stale, Step::Lazy]);
    prop_oneof![
        6 => (carriers(), alias.clone(), insight, variant, refresh.clone()).prop_map(
            |(carriers, alias, insight, variant, (refresh, in_body))| Op::Retrieve {
                carriers, alias, insight, variant, refresh, in_body
            }
        ),
        2 => (carriers(), alias.clone(), 1..=3u8, 0..4u8, any::<bool>(), refresh).prop_map(
            |(carriers, alias, limit, offset, dashboard, (refresh, in_body))| Op::List {
                carriers, alias, limit, offset, dashboard, refresh, in_body
            }
        ),
        3 => (carriers(), alias, any::<Index>()).prop_map(|(carriers, alias, pick)| Op::Poll { carriers, alias, pick }),
        2 => step.prop_map(Op::Advance),
        1 => Just(Op::Settle),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let ops = || prop::collection::vec(op(), 10..20);
    (ops(), 0..PRINCIPALS, ops(), 1..PRINCIPALS, ops()).prop_map(|(before, first, middle, offset, after)| Case {
        before,
        first_revoked: first,
        middle,
        second_revoked: (first + offset) % PRINCIPALS,
        after,
    })
}

// ---------------------------------------------------------------------------------------------
// The proxy in front of the fake, and one case's run.
// ---------------------------------------------------------------------------------------------

#[derive(Default, Debug)]
struct Stats {
    requests: u64,
    statuses: BTreeMap<u16, u64>,
    /// Answers that carried a principal's data (a marker).
    with_data: u64,
    /// Polls answered with a completed status carrying results.
    polls_with_results: u64,
    /// Requests by a revoked principal after its window passed.
    revoked_after_window: u64,
    upstream_calls: u64,
}

struct World {
    clock: Clock,
    app: Arc<App>,
    port: u16,
    cases: AtomicU64,
    stats: Mutex<Stats>,
    // Dropped in field order: the proxy stops before the fake upstream.
    proxy: Option<Running>,
    fake: FakePostHog,
}

impl World {
    fn start() -> World {
        let clock = Clock::new();
        let fake = FakePostHog::start(clock.clone());
        let port = free_port();
        let mut config = test_config(port, fake.port);
        config.revalidate_after = WINDOW;
        config.budget.per_minute = None;
        config.budget.per_hour = None;
        // Every case brings fresh credentials, unknown to the proxy until the upstream accepts
        // them: their shared allowance must not be what answers.
        config.unconfirmed_calls_per_second = 100_000;
        let (proxy, app) = start_proxy(config, clock.clone());
        World { clock, app, port, cases: AtomicU64::new(0), stats: Mutex::default(), proxy: Some(proxy), fake }
    }

    /// Waits until no background work is queued or running (so nothing started before this point
    /// can still reach the upstream or confirm a principal).
    fn settle(&self) {
        let app = &self.app;
        let idle = || app.engine.is_idle() && app.metrics.busy_workers.get() == 0;
        eventually("background work settles", || {
            (0..3).all(|_| {
                let quiet = idle();
                std::thread::sleep(Duration::from_millis(2));
                quiet
            })
        });
    }

    fn run_case(&self, case: &Case) -> Result<(), TestCaseError> {
        self.settle();
        let mut run = Run::new(self);
        for op in &case.before {
            run.op(op)?;
        }
        run.revoke(case.first_revoked)?;
        for op in &case.middle {
            run.op(op)?;
        }
        run.revoke(case.second_revoked)?;
        for op in &case.after {
            run.op(op)?;
        }
        run.epilogue()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(p) = self.proxy.take() {
            p.stop(false);
        }
    }
}

/// Where a principal stands with the upstream at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Not one of the case's principals: junk, or a principal's text in the other kind's carrier.
    Stranger,
    Active(usize),
    /// Revoked; `strict` once the revalidation window has passed since.
    Revoked {
        principal: usize,
        strict: bool,
    },
}

#[derive(Debug, Clone)]
enum Target {
    Insight(u64),
    List,
    /// A status id, and whom it was issued to (`None`: one the proxy never issued).
    Poll(Option<Identity>),
}

struct Run<'w> {
    world: &'w World,
    names: [String; PRINCIPALS],
    junk: String,
    revoked_at: [Option<OffsetDateTime>; PRINCIPALS],
    /// Status ids issued in this case, and to whom.
    issued: Vec<(Identity, String)>,
    /// Identities the proxy was asked to act for: the only credentials it may send upstream.
    presented: HashSet<Identity>,
    seen_from: usize,
    log: Vec<String>,
}

impl<'w> Run<'w> {
    fn new(world: &'w World) -> Run<'w> {
        let n = world.cases.fetch_add(1, Ordering::SeqCst);
        let names =
            [format!("phx_{n}_alpha"), format!("phx_{n}_beta"), format!("phx_{n}_gamma"), format!("sess_{n}_delta")];
        {
            let mut up = world.fake.state();
            for (p, name) in names.iter().enumerate() {
                if p == SESSION {
                    up.sessions.insert(name.clone());
                } else {
                    up.keys.insert(name.clone());
                }
            }
            up.restricted.insert(names[RESTRICTED.0].clone(), RESTRICTED.1);
        }
        let seen_from = world.fake.state().seen.len();
        Run {
            world,
            names,
            junk: format!("junk_{n}_x"),
            revoked_at: [None; PRINCIPALS],
            issued: Vec::new(),
            presented: HashSet::new(),
            seen_from,
            log: Vec::new(),
        }
    }

    fn fail(&self, msg: String) -> TestCaseError {
        let tail = self.log.iter().rev().take(12).rev().cloned().collect::<Vec<_>>().join("\n  ");
        TestCaseError::fail(format!("{msg}\n principals {:?}, junk {}\n recent:\n  {tail}", self.names, self.junk))
    }

    fn principal_of(&self, id: &Identity) -> Option<usize> {
        self.names.iter().position(|n| *n == id.credential).filter(|&p| (p == SESSION) == (id.kind == Kind::Session))
    }

    fn standing(&self, id: Option<&Identity>, now: OffsetDateTime) -> Standing {
        let Some(p) = id.and_then(|id| self.principal_of(id)) else { return Standing::Stranger };
        match self.revoked_at[p] {
            None => Standing::Active(p),
            Some(at) => Standing::Revoked { principal: p, strict: now > at + WINDOW },
        }
    }

    fn revoke(&mut self, p: usize) -> Result<(), TestCaseError> {
        self.world.fake.state().revoked.insert(self.names[p].clone());
        // Whatever was under way when the upstream revoked it has landed: no confirmation of it
        // can be stamped later than now.
        self.world.settle();
        self.revoked_at[p] = Some(self.world.clock.now());
        self.log.push(format!("revoke {}", self.names[p]));
        self.check_upstream()
    }

    fn place(&self, carriers: &Carriers) -> Vec<(Form, String)> {
        let (p, form) = carriers.primary;
        let mut placed = vec![(form, self.names[p].clone())];
        for (form, cred) in &carriers.extras {
            if placed.iter().any(|(f, _)| f == form) {
                continue;
            }
            let value = match cred {
                Cred::Principal(p) => self.names[*p].clone(),
                Cred::Junk => self.junk.clone(),
            };
            placed.push((*form, value));
        }
        placed
    }

    fn op(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Retrieve { carriers, alias, insight, variant, refresh, in_body } => {
                let mut params = Vec::new();
                match variant {
                    Variant::Plain => {}
                    Variant::Dashboard(d) => params.push(("from_dashboard".to_string(), d.to_string())),
                    Variant::Filters(i) => params.push(("filters_override".to_string(), FILTERS[*i].to_string())),
                }
                let path = format!("{}/insights/{insight}/", alias.path());
                self.send(Target::Insight(*insight), path, params, carriers, Some((*refresh, *in_body)))
            }
            Op::List { carriers, alias, limit, offset, dashboard, refresh, in_body } => {
                let mut params =
                    vec![("limit".to_string(), limit.to_string()), ("offset".to_string(), offset.to_string())];
                if *dashboard {
                    params.push(("from_dashboard".to_string(), "1".to_string()));
                }
                let path = format!("{}/insights/", alias.path());
                self.send(Target::List, path, params, carriers, Some((*refresh, *in_body)))
            }
            Op::Poll { carriers, alias, pick } => {
                let (issuer, id) = match self.issued.is_empty() {
                    true => (None, format!("ipx_1_{:032x}", 7)),
                    false => {
                        let (issuer, id) = &self.issued[pick.index(self.issued.len())];
                        (Some(issuer.clone()), id.clone())
                    }
                };
                let path = format!("{}/query/{id}/", alias.path());
                self.send(Target::Poll(issuer), path, Vec::new(), carriers, None)
            }
            Op::Advance(step) => {
                self.world.clock.advance(step.duration());
                self.log.push(format!("advance {step:?}"));
                Ok(())
            }
            Op::Settle => {
                self.world.settle();
                self.log.push("settle".into());
                self.check_upstream()
            }
        }
    }

    /// Sends one request, then checks its answer and what reached the upstream meanwhile.
    fn send(
        &mut self,
        target: Target,
        path: String,
        mut params: Vec<(String, String)>,
        carriers: &Carriers,
        refresh: Option<(Refresh, bool)>,
    ) -> Result<(), TestCaseError> {
        let placed = self.place(carriers);
        // Whom PostHog would authenticate: the first carrier in its order.
        let identity = first_in(&placed, &Form::ORDER);
        let mut headers: Vec<(String, String)> = Vec::new();
        let mut body = serde_json::Map::new();
        for (i, (form, v)) in placed.iter().enumerate() {
            match form {
                Form::Bearer => headers.push(("Authorization".into(), format!("Bearer {v}"))),
                Form::Query => params.push(("personal_api_key".into(), v.clone())),
                Form::Body => {
                    body.insert("personal_api_key".into(), Value::String(v.clone()));
                }
                // Beside another carrier the cookie header holds other cookies too.
                Form::Cookie if i == 0 => headers.push(("Cookie".into(), format!("sessionid={v}"))),
                Form::Cookie => headers.push(("Cookie".into(), format!("ph_theme=dark; sessionid={v}; csrftoken=c"))),
            }
        }
        match refresh {
            None | Some((Refresh::Absent, _)) => {}
            Some((Refresh::Flag(b), true)) => {
                body.insert("refresh".into(), Value::Bool(b));
            }
            Some((Refresh::Mode(m), true)) => {
                body.insert("refresh".into(), Value::String(m.into()));
            }
            Some((Refresh::Flag(b), false)) => params.push(("refresh".into(), b.to_string())),
            Some((Refresh::Mode(m), false)) => params.push(("refresh".into(), m.into())),
        }
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
        let uri = if query.is_empty() { path } else { format!("{path}?{}", query.join("&")) };
        let body = (!body.is_empty()).then(|| Value::Object(body).to_string());
        // The proxy acts for the request's principal, polls included.
        let acting = identity.clone();
        if let Some(a) = &acting {
            self.presented.insert(a.clone());
        }
        let now = self.world.clock.now();
        let header_refs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let r = http(self.world.port, "GET", &uri, &header_refs, body.as_deref());
        let carried: Vec<String> = placed.iter().map(|(f, v)| format!("{f:?}:{v}")).collect();
        self.log.push(format!(
            "GET {uri} [{}]{} -> {} ({}) {}",
            carried.join(", "),
            body.as_deref().map(|b| format!(" body {b}")).unwrap_or_default(),
            r.status,
            r.cache_status(),
            truncate(&r.text(), 300),
        ));
        self.check_answer(&target, identity.as_ref(), acting.as_ref(), now, &r)?;
        self.check_upstream()
    }

    fn check_answer(
        &mut self,
        target: &Target,
        identity: Option<&Identity>,
        acting: Option<&Identity>,
        now: OffsetDateTime,
        r: &Resp,
    ) -> Result<(), TestCaseError> {
        let text = r.text();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let (mut markers, mut ids) = (Vec::new(), Vec::new());
        scan(&value, &mut markers, &mut ids);
        if text.matches("\"marker\"").count() != markers.len() {
            return Err(self.fail(format!("an answer that is not JSON carries data: {text}")));
        }
        let standing = self.standing(identity, now);
        {
            let mut stats = self.world.stats.lock().unwrap();
            stats.requests += 1;
            *stats.statuses.entry(r.status).or_default() += 1;
            stats.with_data += u64::from(!markers.is_empty());
            if matches!(standing, Standing::Revoked { strict: true, .. }) {
                stats.revoked_after_window += 1;
            }
            if matches!(target, Target::Poll(_)) && value.pointer("/query_status/results").is_some_and(|v| !v.is_null())
            {
                stats.polls_with_results += 1;
            }
        }

        // 1. Nothing but the requesting principal's own data.
        let own = identity.and_then(|id| self.principal_of(id)).map(|p| self.names[p].clone());
        for (marker, n) in &markers {
            if own.as_ref() != Some(marker) {
                return Err(self
                    .fail(format!("LEAK: an answer to {identity:?} carries data calculated for {marker:?}: {text}")));
            }
            let calculated_for = n.and_then(|n| self.world.fake.state().issued.get(&n).cloned());
            if calculated_for.as_ref() != Some(marker) {
                return Err(
                    self.fail(format!("result #{n:?} marked {marker:?} was calculated for {calculated_for:?}: {text}"))
                );
            }
        }

        // 2. A revoked principal gets nothing once the window has passed: no result, no results,
        // no status carrying results.
        let strict = matches!(standing, Standing::Revoked { strict: true, .. });
        if strict {
            let results = ["/result", "/results", "/query_status/results"]
                .iter()
                .any(|p| value.pointer(p).is_some_and(|v| !v.is_null()));
            if results || !markers.is_empty() {
                return Err(self.fail(format!("revoked {identity:?} got data after the window: {text}")));
            }
        }

        // 3. Statuses: only those the principal's standing allows.
        let allowed: &[u16] = match target {
            // A stranger is refused by the upstream; a revoked principal within the window may
            // still be answered from the cache (or be refused, once the proxy asked again).
            Target::Insight(_) | Target::List if standing == Standing::Stranger => &[401],
            // The upstream's 403 for the one insight the third key may not see is remembered
            // (`rejected_ttl`) and may still answer after the key was revoked.
            Target::Insight(i) if strict && *i == RESTRICTED.1 && standing_is(standing, RESTRICTED.0) => &[401, 403],
            Target::Insight(_) | Target::List if strict => &[401],
            Target::Insight(_) if matches!(standing, Standing::Revoked { .. }) => &[200, 401, 403, 404],
            Target::List if matches!(standing, Standing::Revoked { .. }) => &[200, 401],
            Target::Insight(i) if *i == MISSING_INSIGHT => &[404],
            Target::Insight(i) if standing == Standing::Active(RESTRICTED.0) && *i == RESTRICTED.1 => &[403],
            Target::Insight(_) | Target::List => &[200],
            // Polls: 202 running, 200 complete, 400 failed; for an id that is not the caller's,
            // the upstream's own answer (404, or 401 for a credential it refuses); 404 for an id
            // dropped when the upstream refused its owner; 401 without a credential.
            Target::Poll(_) if acting.is_none() => &[401],
            Target::Poll(issuer) if issuer.as_ref() != acting => match self.standing(acting, now) {
                Standing::Revoked { .. } | Standing::Stranger => &[401, 404],
                _ => &[404],
            },
            Target::Poll(_) => match self.standing(acting, now) {
                Standing::Revoked { strict: true, .. } => &[401, 404],
                Standing::Revoked { .. } => &[200, 202, 400, 401, 404],
                _ => &[200, 202, 400, 404],
            },
        };
        if !allowed.contains(&r.status) {
            return Err(self.fail(format!(
                "{target:?} as {identity:?} ({standing:?}): status {} not in {allowed:?}: {text}",
                r.status
            )));
        }

        // 4. Status ids are issued only to a principal the upstream accepts, and noted.
        if !matches!(target, Target::Poll(_)) {
            for id in ids {
                let accepted = !strict;
                let Some(issuer) = identity.filter(|_| accepted && standing != Standing::Stranger) else {
                    return Err(self.fail(format!("a query status was issued to {identity:?} ({standing:?}): {text}")));
                };
                if !self.issued.iter().any(|(_, known)| *known == id) {
                    self.issued.push((issuer.clone(), id));
                }
            }
        }
        Ok(())
    }

    /// Every upstream call of the proxy's own since the last check carried exactly one credential,
    /// as one bearer header or one session cookie alone, of an identity some request was
    /// authenticated as. (A poll of an id the proxy did not issue is the client's own request,
    /// passed on as it came.)
    fn check_upstream(&mut self) -> Result<(), TestCaseError> {
        let seen: Vec<Seen> = self.world.fake.state().seen[self.seen_from..].to_vec();
        self.seen_from += seen.len();
        self.world.stats.lock().unwrap().upstream_calls += seen.len() as u64;
        for s in seen.into_iter().filter(|s| !s.target.contains("/query/")) {
            let [(form, credential)] = s.carriers.as_slice() else {
                return Err(self.fail(format!(
                    "an upstream call ({}) carried {} credentials: {s:?}",
                    s.target,
                    s.carriers.len()
                )));
            };
            if !matches!(form, Form::Bearer | Form::Cookie) || s.other_cookies {
                return Err(self.fail(format!("an upstream call carried its credential unlike the proxy's own: {s:?}")));
            }
            let id = Identity { kind: form.kind(), credential: credential.clone() };
            if !self.presented.contains(&id) {
                return Err(
                    self.fail(format!("an upstream call for {id:?}, which no request was authenticated as: {s:?}"))
                );
            }
        }
        Ok(())
    }

    /// Past the window after both revocations: each principal reads, lists and polls its own
    /// statuses; the revoked ones must get nothing.
    fn epilogue(&mut self) -> Result<(), TestCaseError> {
        self.world.settle();
        self.world.clock.advance(Step::Window.duration());
        self.log.push("epilogue".into());
        for p in 0..PRINCIPALS {
            let form = if p == SESSION { Form::Cookie } else { Form::Bearer };
            let carriers = Carriers { primary: (p, form), extras: Vec::new() };
            for (insight, refresh) in
                [(1, Refresh::Absent), (2, Refresh::Mode("blocking")), (4, Refresh::Mode("async"))]
            {
                let op = Op::Retrieve {
                    carriers: carriers.clone(),
                    alias: Alias::Environments,
                    insight,
                    variant: Variant::Plain,
                    refresh,
                    in_body: false,
                };
                self.op(&op)?;
            }
            let list = Op::List {
                carriers: carriers.clone(),
                alias: Alias::Projects,
                limit: 3,
                offset: 0,
                dashboard: false,
                refresh: Refresh::Absent,
                in_body: false,
            };
            self.op(&list)?;
            let me = Identity { kind: form.kind(), credential: self.names[p].clone() };
            let own: Vec<String> = self.issued.iter().filter(|(who, _)| *who == me).map(|(_, id)| id.clone()).collect();
            for id in own.into_iter().take(3) {
                let path = format!("{}/query/{id}/", Alias::Environments.path());
                self.send(Target::Poll(Some(me.clone())), path, Vec::new(), &carriers, None)?;
            }
        }
        self.world.settle();
        self.check_upstream()
    }
}

fn standing_is(standing: Standing, principal: usize) -> bool {
    match standing {
        Standing::Active(p) | Standing::Revoked { principal: p, .. } => p == principal,
        Standing::Stranger => false,
    }
}

fn truncate(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Every `{"marker":..,"n":..}` in an answer, and every query status id.
fn scan(v: &Value, markers: &mut Vec<(String, Option<u64>)>, ids: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(marker) = m.get("marker") {
                markers.push((marker.as_str().unwrap_or("?").to_string(), m.get("n").and_then(Value::as_u64)));
            }
            if let Some(id) = m.get("query_status").and_then(|qs| qs.get("id")).and_then(Value::as_str) {
                ids.push(id.to_string());
            }
            m.values().for_each(|v| scan(v, markers, ids));
        }
        Value::Array(a) => a.iter().for_each(|v| scan(v, markers, ids)),
        _ => {}
    }
}

#[test]
fn no_answer_carries_another_principals_data_and_a_revoked_principal_gets_none_after_the_window() {
    let started = Instant::now();
    let world = World::start();
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(48);
    let config = RunnerConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2_000,
        max_shrink_time: 90_000,
        ..RunnerConfig::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&case(), |case| world.run_case(&case));
    eprintln!("isolation: {cases} cases in {:?}: {:?}", started.elapsed(), world.stats.lock().unwrap());
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Reproduces a divergence the property leaves out (see `Run::send`): PostHog authenticates a
/// `personal_api_key` in a GET's JSON body before the `sessionid` cookie, and the proxy does so
/// for insights and lists, but on a query-status poll it reads no body, so the poll is answered as
/// the session, with the session's results.
#[test]
fn a_polls_principal_is_the_key_in_its_json_body_not_a_session_cookie_beside_it() {
    let world = World::start();
    let run = Run::new(&world);
    let (key, session) = (run.names[0].clone(), run.names[SESSION].clone());
    let cookie = format!("sessionid={session}");
    // The session queues a calculation: a status id of its own, completed with its results.
    let r =
        http(world.port, "GET", "/api/environments/1/insights/1/?refresh=force_async", &[("Cookie", &cookie)], None);
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["query_status"]["id"].as_str().expect("a query status").to_string();
    world.settle();
    let poll = format!("/api/environments/1/query/{id}/");
    let own = http(world.port, "GET", &poll, &[("Cookie", &cookie)], None);
    assert_eq!(own.status, 200, "{}", own.text());
    assert!(own.text().contains(&format!("\"marker\":\"{session}\"")), "{}", own.text());
    // The same poll with the first key in a JSON body beside the cookie: PostHog authenticates
    // the key, and the id is not one of the key's (as the proxy answers a poll with the key as a
    // bearer header or query parameter beside the same cookie).
    let as_query = http(world.port, "GET", &format!("{poll}?personal_api_key={key}"), &[("Cookie", &cookie)], None);
    assert_eq!(as_query.status, 404, "{}", as_query.text());
    let body = json!({ "personal_api_key": key }).to_string();
    let r = http(world.port, "GET", &poll, &[("Cookie", &cookie)], Some(&body));
    assert!(
        !r.text().contains(&session),
        "a poll authenticated by the key in its body was answered with the session's results: {} {}",
        r.status,
        r.text()
    );
    assert_eq!(r.status, 404, "{}", r.text());
}

/// Reproduces a divergence the property tolerates (see `Run::check_answer`), in real time only:
/// with a revalidation window shorter than the "the upstream has nothing cached" note's 10 s, a
/// key revoked more than a window ago still gets the insight's metadata from the note on a miss,
/// and `async` queues work and issues a query status in its name, instead of the upstream's 401.
#[test]
fn the_nothing_cached_note_does_not_answer_a_key_revoked_longer_than_the_window_ago() {
    let world = World::start();
    let run = Run::new(&world);
    let key = run.names[0].clone();
    let auth = format!("Bearer {key}");
    let url = "/api/environments/1/insights/1/";
    // A read of an insight the upstream has not calculated: 200 with no result (and the note).
    let r = http(world.port, "GET", url, &[("Authorization", &auth)], None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["result"].is_null(), "{}", r.text());
    world.fake.state().revoked.insert(key.clone());
    // Real time past the window (1 s), still within the note's life.
    std::thread::sleep(WINDOW + Duration::from_millis(500));
    let answers: Vec<(&str, u16, String)> = ["force_cache", "async"]
        .into_iter()
        .map(|mode| {
            let r = http(world.port, "GET", &format!("{url}?refresh={mode}"), &[("Authorization", &auth)], None);
            (mode, r.status, truncate(&r.text(), 200))
        })
        .collect();
    assert!(
        answers.iter().all(|(_, status, _)| *status == 401),
        "a key revoked {WINDOW:?}+ ago, past its window, was answered: {answers:#?}"
    );
}
