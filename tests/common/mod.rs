//! Test harness: the simulated backend and the real proxy, each a pingora server on an ephemeral
//! loopback port in this process, sharing one clock so tests move time instead of sleeping.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use insights_proxy::app::App;
use insights_proxy::clock::Clock;
use insights_proxy::config::{parse_upstream_url, Config, UpstreamTarget};
use insights_proxy::server;
use posthog_sim::serve::free_port;
use posthog_sim::testing::Running;
use posthog_sim::{SimConfig, Simulator};
use serde_json::Value;

pub const ALL: &str = "phx_demo_all";
pub const P1: &str = "phx_demo_p1";
pub const P2: &str = "phx_demo_p2";

pub struct Harness {
    pub clock: Clock,
    pub sim: Simulator,
    pub sim_port: u16,
    pub proxy_port: u16,
    pub admin_port: u16,
    pub app: Arc<App>,
    // Dropped in field order: the proxy stops before the backend.
    proxy: Option<Running>,
    backend: Option<Running>,
}

pub fn test_config(listen_port: u16, upstream_port: u16) -> Config {
    let mut c = Config::defaults();
    c.listen = format!("127.0.0.1:{listen_port}");
    c.upstream = UpstreamTarget::Remote(parse_upstream_url(&format!("http://127.0.0.1:{upstream_port}")).unwrap());
    c.threads = 2;
    c.grace_period = Duration::ZERO;
    c.shutdown_timeout = Duration::from_secs(1);
    c.connect_timeout = Duration::from_millis(500);
    c.read_timeout = Duration::from_secs(10);
    c.admin_listen = Some(format!("127.0.0.1:{}", free_port()));
    c.admin_token = Some(ADMIN_TOKEN.into());
    // The simulator enforces no rate limit unless a test asks; tests that exercise the proxy's
    // own rate budget turn it back on.
    c.budget.per_minute = None;
    c.budget.per_hour = None;
    c
}

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

pub fn start_backend(sim: &Simulator, port: u16) -> Running {
    let r = Running::start(posthog_sim::serve::server(sim, &format!("127.0.0.1:{port}"), 2));
    wait_for_port(port);
    r
}

pub fn start_proxy(config: Config, clock: Clock) -> (Running, Arc<App>) {
    let port: u16 = config.listen.rsplit(':').next().unwrap().parse().unwrap();
    let built = server::build(config, clock).expect("proxy builds");
    let app = built.app.clone();
    let r = Running::start(built.server);
    wait_for_port(port);
    (r, app)
}

pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `cond` until it holds (bounded: a hang check, generous for a loaded 2-core machine): for
/// effects that land after a response.
pub fn eventually(what: &str, cond: impl FnMut() -> bool) {
    assert!(within(Duration::from_secs(30), cond), "timed out waiting for: {what}");
}

/// Whether `cond` holds within `limit` (polled).
pub fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

impl Harness {
    pub fn start() -> Harness {
        Harness::with(|_, _| {})
    }

    pub fn with(tweak: impl FnOnce(&mut Config, &mut SimConfig)) -> Harness {
        let clock = Clock::new();
        let mut sim_cfg = SimConfig { calc_delay: Duration::from_millis(50), ..SimConfig::default() };
        let (sim_port, proxy_port) = (free_port(), free_port());
        let mut config = test_config(proxy_port, sim_port);
        tweak(&mut config, &mut sim_cfg);
        let admin_port = config.admin_listen.as_deref().and_then(|a| a.rsplit(':').next()?.parse().ok()).unwrap_or(0);
        let sim = Simulator::new(sim_cfg, clock.clone());
        let backend = start_backend(&sim, sim_port);
        let (proxy, app) = start_proxy(config, clock.clone());
        if admin_port != 0 {
            wait_for_port(admin_port);
        }
        Harness { clock, sim, sim_port, proxy_port, admin_port, app, proxy: Some(proxy), backend: Some(backend) }
    }

    pub fn get(&self, path: &str, token: &str) -> Resp {
        self.request("GET", path, &[("Authorization", &format!("Bearer {token}"))], None)
    }

    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Resp {
        http(self.proxy_port, method, path, headers, body)
    }

    /// A request to the admin listener, with the admin token when `authorized`.
    pub fn admin(&self, method: &str, path: &str, authorized: bool) -> Resp {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let headers: Vec<(&str, &str)> = if authorized { vec![("Authorization", &auth)] } else { vec![] };
        http(self.admin_port, method, path, &headers, None)
    }

    /// The value of one sample in `/metrics` (0 when absent). `series` is the name with labels in
    /// Prometheus' sorted order, e.g. `insights_proxy_requests_total{cache="hit",mode="blocking",route="insight"}`.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.admin("GET", "/metrics", false).text();
        text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
    }

    /// The same request straight to the simulated backend, bypassing the proxy.
    pub fn direct(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Resp {
        http(self.sim_port, method, path, headers, body)
    }

    /// The insights of project 1 as the upstream lists them (basic fields, straight from it).
    pub fn project1_insights(&self) -> Vec<Value> {
        let list = self.direct(
            "GET",
            "/api/environments/1/insights/?basic=true&limit=100",
            &[("Authorization", "Bearer phx_demo_all")],
            None,
        );
        list.json()["results"].as_array().cloned().unwrap_or_default()
    }

    /// A trends insight of project 1 with a `day` interval and a relative date range (stale after
    /// 6 h, lazily stale after 12 h), and its URL.
    pub fn day_insight(&self) -> (u64, String) {
        let id = self
            .project1_insights()
            .iter()
            .find(|i| {
                let source = &i["query"]["source"];
                source["kind"] == "TrendsQuery"
                    && source["interval"] == "day"
                    && source["dateRange"]["date_to"].is_null()
            })
            .and_then(|i| i["id"].as_u64())
            .expect("a trends insight with a day interval and a relative range");
        (id, format!("/api/environments/1/insights/{id}/"))
    }

    pub fn calcs(&self, project: u64, insight: u64) -> u64 {
        self.sim.calculations(project, insight)
    }

    /// Stops the proxy (`graceful`: pingora's shutdown signal, then its grace period); returns once
    /// its server has exited.
    pub fn stop_proxy(&mut self, graceful: bool) {
        if let Some(p) = self.proxy.take() {
            p.stop(graceful);
        }
    }

    /// Stops the backend (the proxy keeps running) to simulate an upstream outage.
    pub fn stop_backend(&mut self) {
        if let Some(b) = self.backend.take() {
            b.stop(false);
        }
    }

    pub fn start_backend_again(&mut self) {
        assert!(self.backend.is_none());
        self.backend = Some(start_backend(&self.sim, self.sim_port));
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(p) = self.proxy.take() {
            p.stop(false);
        }
        if let Some(b) = self.backend.take() {
            b.stop(false);
        }
    }
}

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn cache_status(&self) -> &str {
        self.header("cache-status").unwrap_or("")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTP/1.1 request's bytes: `Host`, then `headers`, then (with a body) its JSON type and length.
pub fn request_bytes(method: &str, path: &str, host: &str, headers: &[(&str, &str)], body: Option<&str>) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    req.into_bytes()
}

/// A plain HTTP/1.1 request on a fresh connection (`Connection: close`), read to the end.
pub fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Resp {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let headers: Vec<(&str, &str)> = [("Connection", "close")].into_iter().chain(headers.iter().copied()).collect();
    let req = request_bytes(method, path, &format!("127.0.0.1:{port}"), &headers, body);
    s.write_all(&req).expect("write");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in response: {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Resp { status, headers, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let line = String::from_utf8_lossy(&b[..eol]).into_owned();
        let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
    out
}

/// One keep-alive connection that reads responses by their framing.
pub struct Conn {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn open(port: u16) -> Conn {
        Conn::over(TcpStream::connect(("127.0.0.1", port)).expect("connect"))
    }

    /// A connection over a socket the test connected itself.
    pub fn over(s: TcpStream) -> Conn {
        // A hang guard, not a timing assertion.
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Conn { s, buf: Vec::new() }
    }

    pub fn send_raw(&mut self, raw: &[u8]) {
        self.s.write_all(raw).expect("write");
    }

    pub fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) {
        self.send_raw(&request_bytes(method, path, "127.0.0.1", headers, body));
    }

    /// Reads more; false when the server closed the connection (or reset it).
    pub fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match self.s.read(&mut chunk) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                panic!("no answer and no close within the hang guard")
            }
            Err(_) => false,
        }
    }

    /// Reads until the next response's head has arrived (its body may still be on its way).
    pub fn await_head(&mut self) {
        while !self.buf.windows(4).any(|w| w == b"\r\n\r\n") {
            assert!(self.fill(), "connection closed before a response head");
        }
    }

    /// The next response, or `None` when the server closed the connection first.
    pub fn response(&mut self) -> Option<Resp> {
        self.response_raw().map(|raw| parse_response(&raw))
    }

    /// The next response's bytes as sent.
    pub fn response_raw(&mut self) -> Option<Vec<u8>> {
        let head_end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if !self.fill() {
                assert!(
                    self.buf.is_empty(),
                    "connection closed mid-response: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
                return None;
            }
        };
        let head = parse_response(&self.buf[..head_end]);
        let total = if let Some(len) = head.header("content-length") {
            head_end + len.parse::<usize>().unwrap()
        } else if head.header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                if let Some(p) = self.buf[head_end..].windows(5).position(|w| w == b"0\r\n\r\n") {
                    break head_end + p + 5;
                }
                assert!(self.fill(), "connection closed mid-body");
            }
        } else {
            while self.fill() {}
            self.buf.len()
        };
        while self.buf.len() < total {
            assert!(self.fill(), "connection closed mid-body");
        }
        Some(self.buf.drain(..total).collect())
    }

    pub fn exchange(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Resp {
        self.send(method, path, headers, body);
        self.response().unwrap_or_else(|| panic!("{method} {path}: connection closed without an answer"))
    }

    /// Whether the server has closed the connection (nothing more to read).
    pub fn closed(&mut self) -> bool {
        !self.fill()
    }
}

/// A child process killed when dropped, so a failing test never leaves one holding its pipes.
/// A `redis-server` of the test's own on a loopback port (scripts/setup.sh installs it), without
/// persistence: a restart starts empty, as a replacement Redis would.
pub struct Redis {
    pub port: u16,
    child: Option<ChildGuard>,
}

impl Redis {
    pub fn start() -> Redis {
        let mut r = Redis { port: free_port(), child: None };
        r.restart();
        r
    }

    pub fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/setup.sh installs it)");
        self.child = Some(ChildGuard(child));
        wait_for_port(self.port);
    }

    /// Stops it (the port stays the same for [`Redis::restart`]).
    pub fn kill(&mut self) {
        self.child = None;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A direct client, for what a writer to Redis could do behind the proxy's back.
    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url()).unwrap().get_connection().unwrap()
    }
}

/// The shared tier on the test's Redis at `redis_port`, with short timeouts and leases.
pub fn l2_settings(redis_port: u16) -> insights_proxy::config::L2Settings {
    insights_proxy::config::L2Settings {
        url: format!("redis://127.0.0.1:{redis_port}/0"),
        prefix: "ipx:".into(),
        timeout: Duration::from_millis(200),
        ttl: Duration::from_secs(600),
        lease: Duration::from_secs(5),
        wait_poll: Duration::from_millis(200),
    }
}

pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One request a [`Capture`] upstream framed, with its body decoded.
#[derive(Debug, Clone)]
pub struct Captured {
    /// Which upstream connection it came on (in accept order).
    pub conn: usize,
    pub head: String,
    pub body: Vec<u8>,
}

impl Captured {
    /// The values of one header, by name (case-insensitive), in order.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }
}

#[derive(Default)]
struct CaptureState {
    /// Every byte each connection sent, in accept order.
    raw: Vec<Vec<u8>>,
    /// Whether the proxy closed that connection.
    closed: Vec<bool>,
    requests: Vec<Captured>,
}

/// A raw TCP upstream on a loopback port that keeps every byte it receives and answers each request
/// it can frame (by `Transfer-Encoding: chunked`, else `Content-Length`) with a small JSON answer
/// that names its own origin, on a keep-alive connection.
pub struct Capture {
    pub port: u16,
    state: Arc<std::sync::Mutex<CaptureState>>,
}

impl Capture {
    pub fn start() -> Capture {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a capture upstream");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(std::sync::Mutex::new(CaptureState::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let id = {
                    let mut s = shared.lock().unwrap();
                    s.raw.push(Vec::new());
                    s.closed.push(false);
                    s.raw.len() - 1
                };
                let shared = shared.clone();
                std::thread::spawn(move || Capture::serve(stream, id, port, &shared));
            }
        });
        Capture { port, state }
    }

    /// The JSON every request is answered with: the upstream's own absolute link, which the proxy
    /// points back at itself.
    pub fn answer_body(port: u16) -> String {
        format!(r#"{{"ok":true,"next":"http://127.0.0.1:{port}/api/environments/1/insights/?offset=1"}}"#)
    }

    fn serve(mut stream: TcpStream, id: usize, port: u16, state: &std::sync::Mutex<CaptureState>) {
        let body = Capture::answer_body(port);
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut pending = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = match stream.read(&mut chunk) {
                Ok(0) | Err(_) => {
                    state.lock().unwrap().closed[id] = true;
                    return;
                }
                Ok(n) => n,
            };
            pending.extend_from_slice(&chunk[..n]);
            state.lock().unwrap().raw[id].extend_from_slice(&chunk[..n]);
            while let Some((used, head, body)) = frame_request(&pending) {
                pending.drain(..used);
                state.lock().unwrap().requests.push(Captured { conn: id, head, body });
                if stream.write_all(answer.as_bytes()).is_err() {
                    return;
                }
            }
        }
    }

    /// The requests framed so far.
    pub fn requests(&self) -> Vec<Captured> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Every byte received so far, all connections in accept order.
    pub fn bytes(&self) -> Vec<u8> {
        self.state.lock().unwrap().raw.concat()
    }

    /// Connections that received bytes the upstream could not frame as whole requests: which, their
    /// bytes and whether the proxy closed them.
    pub fn unframed(&self) -> Vec<(usize, String, bool)> {
        let s = self.state.lock().unwrap();
        (0..s.raw.len())
            .filter_map(|id| {
                let mut rest: &[u8] = &s.raw[id];
                while let Some((used, _, _)) = frame_request(rest) {
                    rest = &rest[used..];
                }
                (!rest.is_empty()).then(|| (id, String::from_utf8_lossy(rest).into_owned(), s.closed[id]))
            })
            .collect()
    }

    /// Forgets everything received so far (connections stay open).
    pub fn clear(&self) {
        let mut s = self.state.lock().unwrap();
        s.requests.clear();
        for raw in &mut s.raw {
            raw.clear();
        }
    }
}

/// One whole request at the start of `buf`: its length, head and decoded body.
fn frame_request(buf: &[u8]) -> Option<(usize, String, Vec<u8>)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let value = |name: &str| {
        head.split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_ascii_lowercase())
    };
    if value("transfer-encoding").is_some_and(|v| v.ends_with("chunked")) {
        let (used, body) = dechunk_complete(&buf[head_end..])?;
        return Some((head_end + used, head, body));
    }
    let len = value("content-length").and_then(|v| v.split(',').next()?.trim().parse::<usize>().ok()).unwrap_or(0);
    let body = buf.get(head_end..head_end + len)?.to_vec();
    Some((head_end + len, head, body))
}

/// A whole chunked body at the start of `b` (up to its last chunk and trailer): bytes used, data.
fn dechunk_complete(b: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut at = 0;
    let mut out = Vec::new();
    loop {
        let eol = at + b[at..].windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&b[at..eol]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        at = eol + 2;
        if size == 0 {
            // Trailer fields, then the empty line.
            loop {
                let eol = at + b[at..].windows(2).position(|w| w == b"\r\n")?;
                let empty = eol == at;
                at = eol + 2;
                if empty {
                    return Some((at, out));
                }
            }
        }
        out.extend_from_slice(b.get(at..at + size)?);
        at += size + 2;
        if at > b.len() {
            return None;
        }
    }
}
