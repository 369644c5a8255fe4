//! Reliability under load and abuse, small bounded CI versions of `benches/flood.py` and
//! `benches/soak.py`: many idle keep-alive connections, slowloris clients, a key flood against a
//! small cache, an async flood against a small queue, a credential flood, and a failing upstream
//! (stopped and restarted, silent, dripping, closing mid-body).
//!
//! Every loop is bounded in count and time, every socket is on 127.0.0.1, every thread is joined.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use insights_proxy::auth::Principal;
use insights_proxy::cache::CacheKey;
use insights_proxy::clock::Clock;
use insights_proxy::query::QueryParams;
use posthog_sim::serve::free_port;

// ---------------------------------------------------------------------------------------------
// Helpers: keep-alive connections, raw responses, the fd limit, a fake upstream.
// ---------------------------------------------------------------------------------------------

/// The insights of project 1 in the simulator: ids 1–20.
const PROJECT1_INSIGHTS: u64 = 20;

fn insight_url(id: u64) -> String {
    format!("/api/environments/1/insights/{id}/")
}

/// A distinct cache variant of an insight for the proxy: `filters_override={"x":n}`. The simulator
/// ignores unknown filters, so upstream it is one (cached) query per insight: cheap.
fn variant_url(id: u64, n: u64, refresh: &str) -> String {
    format!("{}?refresh={refresh}&filters_override=%7B%22x%22%3A{n}%7D", insight_url(id))
}

/// A distinct variant for the proxy *and* the simulator (whose cache key hashes variables): every
/// one is a real calculation upstream.
fn calculated_variant_url(id: u64, n: u64, refresh: &str) -> String {
    format!("{}?refresh={refresh}&variables_override=%7B%22x%22%3A{n}%7D", insight_url(id))
}

fn request_text(port: u16, method: &str, path: &str, token: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n\r\n")
}

/// Reads one HTTP/1.1 response (Content-Length, chunked, or to EOF) from a keep-alive stream.
/// An error when the peer closes before the response is complete.
fn read_response(s: &mut TcpStream) -> std::io::Result<Resp> {
    let mut raw = Vec::with_capacity(8192);
    let mut chunk = [0u8; 16 * 1024];
    let mut head_end = None;
    loop {
        if head_end.is_none() {
            head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
        }
        if let Some(end) = head_end {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            let done = match length {
                Some(n) => raw.len() >= end + n,
                None if head.contains("transfer-encoding: chunked") => raw[end..].ends_with(b"0\r\n\r\n"),
                None => false,
            };
            if done {
                return Ok(parse_response(&raw));
            }
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed after {} bytes: {:?}", raw.len(), String::from_utf8_lossy(&raw)),
            ));
        }
        raw.extend_from_slice(&chunk[..n]);
    }
}

/// One keep-alive client connection to the proxy; reconnects when the proxy closed it.
struct Conn {
    port: u16,
    s: Option<TcpStream>,
}

impl Conn {
    fn new(port: u16) -> Conn {
        Conn { port, s: None }
    }

    fn stream(&mut self) -> &mut TcpStream {
        let port = self.port;
        self.s.get_or_insert_with(|| {
            let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s.set_nodelay(true).unwrap();
            s
        })
    }

    fn get(&mut self, path: &str, token: &str) -> Resp {
        let req = request_text(self.port, "GET", path, token);
        // A connection the proxy closed after the previous answer is retried once on a new one.
        for attempt in 0..2 {
            let s = self.stream();
            let r = s.write_all(req.as_bytes()).and_then(|()| read_response(s));
            match r {
                Ok(resp) => {
                    if resp.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
                        self.s = None;
                    }
                    return resp;
                }
                Err(e) => {
                    self.s = None;
                    assert!(attempt == 0, "GET {path}: {e}");
                }
            }
        }
        unreachable!()
    }
}

/// Raises this process's soft open-files limit to `want` (capped at the hard limit) and returns the
/// limit now in force. The proxy runs in this process, so both ends of every connection count.
#[cfg(target_os = "linux")]
fn raise_fd_limit(want: u64) -> u64 {
    #[repr(C)]
    struct RLimit {
        cur: u64,
        max: u64,
    }
    extern "C" {
        fn getrlimit(resource: i32, rlim: *mut RLimit) -> i32;
        fn setrlimit(resource: i32, rlim: *const RLimit) -> i32;
    }
    const RLIMIT_NOFILE: i32 = 7;
    let mut l = RLimit { cur: 0, max: 0 };
    // SAFETY: plain libc calls on a stack value of the kernel's `struct rlimit` layout.
    unsafe {
        if getrlimit(RLIMIT_NOFILE, &mut l) != 0 {
            return 1024;
        }
        if l.cur < want {
            let raised = RLimit { cur: want.min(l.max), max: l.max };
            if setrlimit(RLIMIT_NOFILE, &raised) == 0 {
                l.cur = raised.cur;
            }
        }
    }
    l.cur
}

#[cfg(not(target_os = "linux"))]
fn raise_fd_limit(_want: u64) -> u64 {
    1024
}

/// The proxy's ends of its client connections: sockets in `/proc/net/tcp{,6}` whose local port is
/// `port`, in ESTABLISHED (01) or CLOSE_WAIT (08; the client closed, the proxy has not yet).
/// Unlike a count of this process's fds, other tests running in parallel do not disturb it.
fn proxy_side_connections(port: u16) -> usize {
    let local = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| t.lines().skip(1).map(str::to_string).collect::<Vec<_>>())
        .filter(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() > 3 && cols[1].ends_with(&local) && matches!(cols[3], "01" | "08")
        })
        .count()
}

/// The PostHog error shape: exactly `type`, `code`, `detail`, `attr`.
fn assert_posthog_error(r: &Resp, status: &[u16], what: &str) {
    assert!(status.contains(&r.status), "{what}: expected one of {status:?}, got {}: {}", r.status, r.text());
    let v = r.json();
    let keys: Vec<&str> = v.as_object().map(|m| m.keys().map(String::as_str).collect()).unwrap_or_default();
    assert_eq!(keys.len(), 4, "{what}: not PostHog's error shape: {v}");
    for k in ["type", "code", "detail", "attr"] {
        assert!(v.get(k).is_some(), "{what}: no `{k}` in {v}");
    }
    assert!(v.get("result").is_none(), "{what}: an error carried a result: {v}");
}

/// How a fake upstream misbehaves.
#[derive(Clone, Copy, Debug)]
enum Misbehaviour {
    /// Accepts, reads the request, never answers.
    Silent,
    /// Answers a valid insight one byte every `interval`.
    Drip { interval: Duration },
    /// Sends the headers of a valid insight at once, then its body one byte every `interval`.
    DripBody { interval: Duration },
    /// Sends the headers and half of the body of a valid insight, then closes.
    CloseMidBody,
}

/// A raw-TCP fake upstream on 127.0.0.1:0, for failure modes the simulator cannot produce.
/// Each connection lives on its own thread, bounded by a stop flag and `MAX_LIFE`.
struct FakeUpstream {
    port: u16,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicU64>,
    accept: Option<JoinHandle<()>>,
    handlers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

const FAKE_MAX_LIFE: Duration = Duration::from_secs(15);
const FAKE_MAX_CONNECTIONS: u64 = 200;

/// A body the proxy accepts as insight 1: `{"id":1,"result":[…],"last_refresh":…}`.
fn fake_insight_body() -> String {
    let filler: Vec<String> = (0..40).map(|i| format!("{{\"count\":{i},\"data\":[1,2,3]}}")).collect();
    format!(
        "{{\"id\":1,\"short_id\":\"abc\",\"name\":\"fake\",\"result\":[{}],\"last_refresh\":\"2026-01-01T00:00:00Z\",\
         \"is_cached\":true,\"timezone\":\"UTC\"}}",
        filler.join(",")
    )
}

impl FakeUpstream {
    fn start(how: Misbehaviour) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicU64::new(0));
        let handlers: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (stop2, conns2, handlers2) = (stop.clone(), connections.clone(), handlers.clone());
        let accept = std::thread::spawn(move || {
            for s in listener.incoming() {
                if stop2.load(Ordering::SeqCst) || conns2.fetch_add(1, Ordering::SeqCst) >= FAKE_MAX_CONNECTIONS {
                    return;
                }
                let Ok(s) = s else { continue };
                let stop = stop2.clone();
                handlers2.lock().unwrap().push(std::thread::spawn(move || serve_badly(s, how, &stop)));
            }
        });
        FakeUpstream { port, stop, connections, accept: Some(accept), handlers }
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for t in self.handlers.lock().unwrap().drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_badly(mut s: TcpStream, how: Misbehaviour, stop: &AtomicBool) {
    let born = Instant::now();
    let alive = || !stop.load(Ordering::SeqCst) && born.elapsed() < FAKE_MAX_LIFE;
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    // Read the request head.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while alive() && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
    let body = fake_insight_body();
    let response =
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    match how {
        Misbehaviour::Silent => {
            // Hold the connection, never answer; drain whatever comes.
            while alive() {
                match s.read(&mut chunk) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Err(_) => return,
                }
            }
        }
        Misbehaviour::Drip { interval } => {
            for b in response.as_bytes() {
                if !alive() || s.write_all(&[*b]).is_err() {
                    return;
                }
                // The point of this upstream is its pace.
                std::thread::sleep(interval);
            }
        }
        Misbehaviour::DripBody { interval } => {
            let head = response.len() - body.len();
            if s.write_all(&response.as_bytes()[..head]).is_err() {
                return;
            }
            for b in body.as_bytes() {
                if !alive() || s.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(interval);
            }
        }
        Misbehaviour::CloseMidBody => {
            let cut = response.len() - body.len() / 2;
            let _ = s.write_all(&response.as_bytes()[..cut]);
            let _ = s.flush();
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Runs `threads` client threads, each with its own keep-alive connection, over `jobs` items
/// (`work(conn, item)`), and returns every result in item order.
fn parallel<T: Send + 'static>(
    port: u16,
    threads: usize,
    jobs: u64,
    work: impl Fn(&mut Conn, u64) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let next = Arc::new(AtomicU64::new(0));
    let work = Arc::new(work);
    let handles: Vec<JoinHandle<Vec<(u64, T)>>> = (0..threads)
        .map(|_| {
            let (next, work) = (next.clone(), work.clone());
            std::thread::spawn(move || {
                let mut conn = Conn::new(port);
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= jobs {
                        return out;
                    }
                    out.push((i, work(&mut conn, i)));
                }
            })
        })
        .collect();
    let mut all: Vec<(u64, T)> =
        handles.into_iter().flat_map(|h| h.join().expect("a client thread panicked")).collect();
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, t)| t).collect()
}

/// Samples a few gauges of the admin `/metrics` until `done`, keeping each one's maximum.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<f64>>>,
}

impl Sampler {
    fn start(admin_port: u16, series: &'static [&'static str]) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut max = vec![0f64; series.len()];
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
                let text = http(admin_port, "GET", "/metrics", &[], None).text();
                for (i, s) in series.iter().enumerate() {
                    let v = text
                        .lines()
                        .find_map(|l| l.strip_prefix(s).and_then(|rest| rest.trim().parse::<f64>().ok()))
                        .unwrap_or(0.0);
                    max[i] = max[i].max(v);
                }
                // Sampling, not awaiting a condition: a scrape every 100 ms is plenty.
                std::thread::sleep(Duration::from_millis(100));
            }
            max
        });
        Sampler { stop, handle: Some(handle) }
    }

    fn finish(mut self) -> Vec<f64> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().unwrap().join().unwrap()
    }
}

/// The query-status id the proxy issues for `path` (with its query string) under `token`.
fn status_id_for(app: &insights_proxy::app::App, token: &str, project: u64, insight: u64, query: &str) -> String {
    let key = CacheKey::new(
        Principal::api_key(&app.keyer, token).partition(),
        project,
        insight,
        &QueryParams::parse(Some(query)).unwrap(),
    );
    app.keyer.status_id(&key)
}

// ---------------------------------------------------------------------------------------------
// (a) Many idle keep-alive connections.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_thousand_idle_keep_alive_connections_do_not_stop_hits() {
    const HELD: usize = 1000;
    // Both ends of each connection live in this process (the proxy runs in-process).
    let limit = raise_fd_limit(4 * HELD as u64 + 1024);
    assert!(limit >= 2 * HELD as u64 + 256, "open-files limit {limit} is too low for {HELD} connections");
    let h = Harness::start();
    for id in 1..=PROJECT1_INSIGHTS {
        assert_eq!(h.get(&format!("{}?refresh=blocking", insight_url(id)), ALL).status, 200);
    }
    let before = proxy_side_connections(h.proxy_port);

    // Open them all, one request each, then leave them idle (keep-alive).
    let mut held: Vec<TcpStream> = Vec::with_capacity(HELD);
    for i in 0..HELD {
        let mut s = TcpStream::connect(("127.0.0.1", h.proxy_port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let id = 1 + i as u64 % PROJECT1_INSIGHTS;
        s.write_all(request_text(h.proxy_port, "GET", &insight_url(id), ALL).as_bytes()).unwrap();
        let r = read_response(&mut s).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(r.status, 200, "connection {i}: {}", r.text());
        held.push(s);
    }
    // The proxy holds its end of every one of them.
    let open = proxy_side_connections(h.proxy_port);
    assert!(open >= before + HELD, "the proxy holds {open} client connections, expected ≥ {}", before + HELD);

    // Meanwhile other clients get correct hits, promptly.
    let port = h.proxy_port;
    let results = parallel(port, 4, 400, move |conn, i| {
        let id = 1 + i % PROJECT1_INSIGHTS;
        let t = Instant::now();
        let r = conn.get(&insight_url(id), ALL);
        (id, r, t.elapsed())
    });
    let mut slowest = Duration::ZERO;
    for (id, r, took) in &results {
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.cache_status().contains("; hit"), "{}", r.cache_status());
        assert_eq!(r.json()["id"], *id, "the answer is the insight asked for");
        slowest = slowest.max(*took);
    }
    assert!(slowest < Duration::from_secs(2), "a hit took {slowest:?} with {HELD} idle connections open");

    // Every held connection is still alive: all of them ask again at once, then read.
    for (i, s) in held.iter_mut().enumerate() {
        let id = 1 + i as u64 % PROJECT1_INSIGHTS;
        s.write_all(request_text(port, "GET", &insight_url(id), ALL).as_bytes()).unwrap();
    }
    for (i, s) in held.iter_mut().enumerate() {
        let r = read_response(s).unwrap_or_else(|e| panic!("held connection {i} was dropped: {e}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["id"], 1 + i as u64 % PROJECT1_INSIGHTS);
    }
    drop(held);
    eventually("the proxy closes its ends", || proxy_side_connections(port) <= before + 8);
}

// ---------------------------------------------------------------------------------------------
// (b) Slowloris.
// ---------------------------------------------------------------------------------------------

/// Bounded by pingora, not by the proxy: on a new connection each read of the request head waits at
/// most the keep-alive timeout pingora's HTTP app sets (60 s; after the first request it becomes
/// infinite, see `an_idle_keep_alive_connection_is_closed_after_the_idle_timeout`), each read of a
/// request body at most the downstream read timeout (60 s, `v1/server.rs`). Both are per read, with
/// no total deadline, so a client that sends a byte more often than that keeps its connection; what
/// protects other clients is that each connection is one cheap task, never a worker.
#[test]
fn slowloris_clients_do_not_block_other_clients() {
    let h = Harness::start();
    let url = insight_url(1);
    assert_eq!(h.get(&format!("{url}?refresh=blocking"), ALL).status, 200);
    let port = h.proxy_port;
    const TRICKLE_FOR: Duration = Duration::from_millis(2500);
    let started = Arc::new(std::sync::Barrier::new(3));

    // Trickles its request head, a byte every 25 ms.
    let head = {
        let (url, started) = (url.clone(), started.clone());
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_nodelay(true).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s.write_all(format!("GET {url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALL}\r\nX-Slow: ").as_bytes())
                .unwrap();
            started.wait();
            let t = Instant::now();
            for _ in 0..1000 {
                if t.elapsed() >= TRICKLE_FOR {
                    break;
                }
                s.write_all(b"a").unwrap();
                std::thread::sleep(Duration::from_millis(25));
            }
            s.write_all(b"\r\n\r\n").unwrap();
            read_response(&mut s)
        })
    };
    // Trickles a (GET) JSON body, a byte every 25 ms.
    let body = {
        let (url, started) = (url.clone(), started.clone());
        std::thread::spawn(move || {
            let payload = format!("{{\"refresh\": \"force_cache\"{}}}", " ".repeat(100));
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_nodelay(true).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let head = format!(
                "GET {url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALL}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n",
                payload.len()
            );
            s.write_all(head.as_bytes()).unwrap();
            started.wait();
            let t = Instant::now();
            let mut bytes = payload.as_bytes().iter();
            // Everything but the last byte is trickled over TRICKLE_FOR.
            let pace = TRICKLE_FOR / payload.len() as u32;
            for b in bytes.by_ref().take(payload.len() - 1) {
                s.write_all(&[*b]).unwrap();
                std::thread::sleep(pace);
            }
            assert!(t.elapsed() < TRICKLE_FOR * 3, "bounded");
            s.write_all(&[*bytes.next().unwrap()]).unwrap();
            read_response(&mut s)
        })
    };
    started.wait();
    // While both trickle, other clients are answered at once.
    let t = Instant::now();
    let mut conn = Conn::new(port);
    let mut served = 0;
    let mut slowest = Duration::ZERO;
    while t.elapsed() < TRICKLE_FOR && served < 5000 {
        let one = Instant::now();
        let r = conn.get(&url, ALL);
        slowest = slowest.max(one.elapsed());
        assert_eq!(r.status, 200);
        assert!(r.cache_status().contains("; hit"));
        served += 1;
    }
    assert!(served >= 20, "only {served} hits in {TRICKLE_FOR:?} while two slowloris clients trickled");
    assert!(slowest < Duration::from_millis(1000), "a hit took {slowest:?} during slowloris");
    // The trickling clients were waited for, not cut off (no total deadline), and are answered.
    let r = head.join().unwrap().expect("the head trickler is answered");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = body.join().unwrap().expect("the body trickler is answered");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.cache_status().contains("; hit"), "{}", r.cache_status());
}

/// Regression: pingora 0.9.1's `read_request` calls `respect_keepalive()`, which for an HTTP/1.1
/// request makes the connection's idle timeout infinite, so after one request a connection was
/// never closed for idleness (~38 KB and a file descriptor each, without bound). The proxy now sets
/// `server.idle_timeout_seconds` on every request.
#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let h = Harness::with(|c, _| c.idle_timeout = Duration::from_secs(1));
    let url = insight_url(1);
    assert_eq!(h.get(&format!("{url}?refresh=blocking"), ALL).status, 200);
    let mut s = TcpStream::connect(("127.0.0.1", h.proxy_port)).unwrap();
    for _ in 0..2 {
        s.write_all(request_text(h.proxy_port, "GET", &url, ALL).as_bytes()).unwrap();
        assert_eq!(read_response(&mut s).unwrap().status, 200, "kept alive between requests");
    }
    // Generous bound for a noisy machine; an unbounded wait shows as the 30 s read timeout.
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let t = Instant::now();
    let mut byte = [0u8; 1];
    let closed = matches!(s.read(&mut byte), Ok(0));
    assert!(closed, "an idle keep-alive connection was still open after {:?}", t.elapsed());
    eprintln!("idle connection closed after {:?} (idle timeout 1 s)", t.elapsed());
}

// ---------------------------------------------------------------------------------------------
// (c) A key flood against a small cache.
// ---------------------------------------------------------------------------------------------

#[test]
fn ten_thousand_distinct_keys_stay_within_the_cache_size() {
    const MAX_BYTES: u64 = 2 * 1024 * 1024;
    const KEYS: u64 = 10_000;
    let h = Harness::with(|c, sim| {
        c.cache_max_bytes = MAX_BYTES;
        c.budget.project_concurrency = 8;
        c.refresh_ahead.enabled = false;
        sim.calc_delay = Duration::ZERO;
        sim.concurrency_limit = None;
    });
    h.sim.set_calc_delay(Duration::ZERO);
    let sampler = Sampler::start(h.admin_port, &["insights_proxy_cache_bytes ", "insights_proxy_cache_entries "]);
    let t = Instant::now();
    let results = parallel(h.proxy_port, 4, KEYS, |conn, i| {
        let id = 1 + i % PROJECT1_INSIGHTS;
        let r = conn.get(&variant_url(id, i, "blocking"), ALL);
        let ok = r.status == 200 && r.cache_status().contains("fwd=miss") && !r.json()["result"].is_null();
        (ok, r.status, r.cache_status().to_string(), r.body.len())
    });
    let took = t.elapsed();
    let max = sampler.finish();
    let bad: Vec<_> = results.iter().filter(|r| !r.0).take(3).collect();
    assert!(bad.is_empty(), "{} of {KEYS} answers were not calculated results, e.g. {bad:?}", bad.len());
    let payload: usize = results.iter().map(|r| r.3).sum();
    eprintln!(
        "{KEYS} keys in {took:?}; payload {payload} B; max cache_bytes {} (limit {MAX_BYTES}); max entries {}",
        max[0], max[1]
    );
    assert!(payload as u64 > 4 * MAX_BYTES, "the flood must be several times the cache size");
    assert!(max[0] <= MAX_BYTES as f64, "cache_bytes reached {} > {MAX_BYTES}", max[0]);
    eventually("size evictions are counted", || h.metric("insights_proxy_cache_evictions_total{cause=\"size\"}") > 0.0);
    let bytes = h.metric("insights_proxy_cache_bytes");
    let entries = h.metric("insights_proxy_cache_entries");
    assert!(bytes > 0.0 && bytes <= MAX_BYTES as f64, "cache_bytes {bytes}");
    assert!(entries > 0.0 && entries < KEYS as f64, "entries {entries}");
    let evicted = h.metric("insights_proxy_cache_evictions_total{cause=\"size\"}");
    assert!(evicted + entries >= KEYS as f64 * 0.9, "evicted {evicted} + kept {entries} ≈ {KEYS} stored");
    // It keeps answering: a new key is calculated, then hit.
    let url = variant_url(3, KEYS + 1, "blocking");
    assert!(h.get(&url, ALL).cache_status().contains("stored"));
    let r = h.get(&url, ALL);
    assert_eq!(r.status, 200);
    assert!(r.cache_status().contains("; hit"), "{}", r.cache_status());
}

// ---------------------------------------------------------------------------------------------
// (d) An async flood against a small queue and a small status registry.
// ---------------------------------------------------------------------------------------------

/// The async flood of (d): `REQUESTS` `refresh=async` requests for distinct keys against a queue of
/// `QUEUE` and `RECORDS` status records. Checks everything but the count of calculations run, and
/// returns the harness with (statuses acknowledged as queued, background calculations run).
fn async_flood() -> (Harness, f64, f64) {
    const QUEUE: usize = 16;
    const RECORDS: u64 = 300;
    const STATUS_BYTES: u64 = 256 * 1024;
    const REQUESTS: u64 = 2000;
    let h = Harness::with(|c, sim| {
        c.queue_capacity = QUEUE;
        c.status_max_records = RECORDS;
        c.status_max_bytes = STATUS_BYTES;
        c.workers = 2;
        c.budget.project_concurrency = 2;
        c.refresh_ahead.enabled = false;
        sim.calc_delay = Duration::from_millis(5);
        sim.concurrency_limit = None;
    });
    let sampler = Sampler::start(
        h.admin_port,
        &["insights_proxy_queue_depth ", "insights_proxy_query_status_running ", "insights_proxy_query_status_bytes "],
    );
    let results = parallel(h.proxy_port, 6, REQUESTS, |conn, i| {
        let id = 1 + i % PROJECT1_INSIGHTS;
        let t = Instant::now();
        let r = conn.get(&calculated_variant_url(id, i, "async"), ALL);
        (r, t.elapsed())
    });
    let max = sampler.finish();
    let (mut overflow, mut slowest, mut ids) = (0, Duration::ZERO, Vec::new());
    for (r, took) in &results {
        assert_eq!(r.status, 200, "{}", r.text());
        slowest = slowest.max(*took);
        let v = r.json();
        let qs = &v["query_status"];
        assert!(qs.is_object(), "no query_status: {v}");
        assert!(v["result"].is_null(), "a miss has no result yet");
        if qs["error_message"] == "concurrency_limit_exceeded" {
            overflow += 1;
            assert_eq!(qs["complete"], true, "{qs}");
            assert_eq!(qs["error"], true, "{qs}");
        } else {
            assert_eq!(qs["complete"], false, "an accepted status starts incomplete: {qs}");
            assert!(qs["error_message"].is_null(), "{qs}");
        }
        ids.push(qs["id"].as_str().expect("a status id").to_string());
    }
    eprintln!(
        "{REQUESTS} async requests: {overflow} overflowed; slowest answer {slowest:?}; max queue depth {}; \
         max running statuses {}; max bytes of completed statuses {}",
        max[0], max[1], max[2]
    );
    assert!(overflow > 0, "a queue of {QUEUE} must overflow under {REQUESTS} requests");
    assert!(overflow < REQUESTS as usize, "some work must have been accepted");
    // A hang check, not a speed check (benches/flood.py measures latency under a full-size flood).
    assert!(slowest < Duration::from_secs(30), "an async answer took {slowest:?}");
    assert!(max[0] <= QUEUE as f64, "queue depth reached {}", max[0]);
    assert!(max[1] <= RECORDS as f64, "running statuses reached {}", max[1]);
    assert!(max[2] <= STATUS_BYTES as f64, "completed statuses reached {} bytes", max[2]);
    // Every acknowledged status ends: complete (200 result / 400 error) or gone (404, evicted).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut pending: Vec<String> = ids;
    let (mut complete, mut gone) = (0, 0);
    while !pending.is_empty() {
        assert!(Instant::now() < deadline, "{} statuses still running, e.g. {}", pending.len(), pending[0]);
        let mut still = Vec::new();
        for id in pending {
            let r = h.get(&format!("/api/environments/1/query/{id}/"), ALL);
            match r.status {
                200 | 400 => {
                    assert_eq!(r.json()["query_status"]["complete"], true);
                    complete += 1;
                }
                404 => gone += 1,
                202 => still.push(id),
                s => panic!("polling {id}: {s} {}", r.text()),
            }
        }
        pending = still;
    }
    eprintln!("statuses: {complete} complete, {gone} gone");
    eventually("the queue drains", || {
        h.metric("insights_proxy_queue_depth") == 0.0 && h.metric("insights_proxy_busy_workers") == 0.0
    });
    assert!(h.metric("insights_proxy_query_status_bytes") <= STATUS_BYTES as f64);
    // Still answering normally.
    assert_eq!(h.get(&format!("{}?refresh=blocking", insight_url(2)), ALL).status, 200);
    let accepted = REQUESTS as f64 - overflow as f64;
    let background = h.metric("insights_proxy_upstream_calculations_total{reason=\"background\"}");
    (h, accepted, background)
}

#[test]
fn an_async_flood_is_answered_promptly_and_every_status_completes_or_expires() {
    let (_h, accepted, background) = async_flood();
    assert!(background <= accepted, "{background} background calculations for {accepted} acknowledged statuses");
}

/// Regression: with the registry at its bound, moka could drop a new record (TinyLFU admission)
/// so an overflowed request was told its work was queued (`complete: false`) and got 404 at the
/// first poll. Running records now live outside any cache that may evict them, and a refusal is a
/// completed `concurrency_limit_exceeded` status: every acknowledged status has a calculation.
#[test]
fn an_overflowed_async_request_is_never_acknowledged_as_queued() {
    let (_h, accepted, background) = async_flood();
    assert_eq!(background, accepted, "{accepted} statuses were acknowledged as queued, {background} ran");
}

// ---------------------------------------------------------------------------------------------
// (e) A credential flood.
// ---------------------------------------------------------------------------------------------

fn random_token(i: u64) -> String {
    format!("phx_flood_{:016x}_{i}", rand::random::<u64>())
}

/// Sends `requests` requests, each with a made-up key, and returns how many upstream calls they
/// may have caused at most: the allowance for unknown credentials over the flood's duration.
/// Each is answered the upstream's 401, or 429 once that allowance is spent; none gets data.
fn credential_flood(h: &Harness, requests: u64, modes: &'static [&'static str]) -> u64 {
    let started = Instant::now();
    let results = parallel(h.proxy_port, 6, requests, move |conn, i| {
        let mode = modes[i as usize % modes.len()];
        let token = random_token(i);
        let r = conn.get(&format!("{}?refresh={mode}", insight_url(1 + i % PROJECT1_INSIGHTS)), &token);
        (mode, r)
    });
    let allowance = u64::from(h.app.config.unconfirmed_calls_per_second);
    let bound = allowance * (started.elapsed().as_secs() + 2);
    for (mode, r) in &results {
        assert!(matches!(r.status, 401 | 429), "refresh={mode}: {} {}", r.status, r.text());
        assert!(!r.cache_status().contains("; hit"), "refresh={mode}: {}", r.cache_status());
        let v = r.json();
        assert!(v.get("result").is_none(), "refresh={mode}: a result reached a rejected credential: {v}");
        let kind = if r.status == 401 { "authentication_error" } else { "throttled_error" };
        assert_eq!(v["type"], kind, "{v}");
    }
    assert!(results.iter().any(|(_, r)| r.status == 401), "the upstream's own answer reaches some");
    bound
}

#[test]
fn a_credential_flood_gets_no_data_and_leaves_no_state() {
    let h = Harness::with(|_, sim| sim.calc_delay = Duration::from_millis(1));
    for id in 1..=PROJECT1_INSIGHTS {
        assert_eq!(h.get(&format!("{}?refresh=blocking", insight_url(id)), ALL).status, 200);
    }
    h.app.cache.run_pending_tasks().await_blocking();
    let entries = h.app.cache.entry_count();
    let statuses = h.app.statuses.len();
    let purges = h.metric("insights_proxy_purge_records");
    let requests_before = h.sim.requests();
    const FLOOD: u64 = 1500;
    let bound = credential_flood(&h, FLOOD, &["force_cache", "blocking", "force_blocking"]);
    // Unknown credentials share a bounded allowance of upstream calls.
    let upstream = h.sim.requests() - requests_before;
    assert!(upstream <= bound, "{FLOOD} made-up keys caused {upstream} upstream requests (bound {bound})");
    eventually("no calculation left in flight", || h.app.engine.flights_running() == 0 && h.app.engine.queued() == 0);
    h.app.cache.run_pending_tasks().await_blocking();
    assert_eq!(h.app.cache.entry_count(), entries, "nothing cached for rejected credentials");
    assert_eq!(h.app.statuses.len(), statuses, "no status records for rejected credentials");
    // Past the purge records' bound, each new record would raise the floor and hide every entry.
    assert_eq!(h.metric("insights_proxy_purge_records"), purges, "purge records for credentials that own nothing");
    // The legitimate partition still hits.
    for id in 1..=PROJECT1_INSIGHTS {
        let r = h.get(&insight_url(id), ALL);
        assert_eq!(r.status, 200);
        assert!(r.cache_status().contains("; hit"), "{}", r.cache_status());
    }
}

/// Regression: on a miss, `refresh=async` used to enqueue the background calculation and write a
/// `query_status` before looking at the upstream's answer to the peek, so a rejected credential
/// cost a status record, a queue slot and a second upstream call, and a flood of them filled the
/// queue for everyone.
#[test]
fn a_credential_flood_with_async_requests_leaves_no_state() {
    let h = Harness::with(|c, sim| {
        c.queue_capacity = 64;
        c.workers = 1;
        sim.calc_delay = Duration::from_millis(1);
    });
    // A tenant the upstream accepted before the flood is not held to the unknown keys' allowance.
    assert_eq!(h.get(&format!("{}?refresh=blocking", insight_url(2)), ALL).status, 200);
    let statuses = h.app.statuses.len();
    let requests_before = h.sim.requests();
    const FLOOD: u64 = 600;
    let bound = credential_flood(&h, FLOOD, &["async", "lazy_async"]);
    let upstream = h.sim.requests() - requests_before;
    let queued = h.app.engine.queued();
    let legit = h.get(&calculated_variant_url(1, 1, "async"), ALL).json();
    eventually("no calculation left in flight", || h.app.engine.flights_running() == 0 && h.app.engine.queued() == 0);
    assert_eq!(queued, 0, "rejected credentials' work was queued");
    assert!(legit["query_status"]["error_message"].is_null(), "a legitimate request overflowed: {legit}");
    assert!(upstream <= bound, "{FLOOD} made-up keys caused {upstream} upstream requests (bound {bound})");
    // (moka's counts catch up with a completion asynchronously.)
    eventually("one status record, the legitimate one's", || h.app.statuses.len() == statuses + 1);
}

/// Regression (found by the credential flood): the purge records' moka eviction listener raised
/// the global epoch floor on *every* removal, `RemovalCause::Replaced` included, so the second
/// purge of one scope (an insight PATCHed twice, the same rejected key seen twice, an admin purge
/// repeated, or one rejected `refresh=async` request: the peek and the background job both get a
/// 401) made every entry of every partition invisible: a full cache wipe.
#[test]
fn a_repeated_purge_or_a_repeated_rejected_key_does_not_drop_other_entries() {
    let h = Harness::start();
    let warm = |h: &Harness| {
        for id in 2..=PROJECT1_INSIGHTS {
            assert_eq!(h.get(&format!("{}?refresh=blocking", insight_url(id)), ALL).status, 200);
        }
    };
    let all_hit =
        |h: &Harness| (2..=PROJECT1_INSIGHTS).all(|id| h.get(&insight_url(id), ALL).cache_status().contains("; hit"));
    warm(&h);
    assert!(all_hit(&h));
    // The same insight purged twice (two PATCHes, or the admin API twice).
    for _ in 0..2 {
        assert_eq!(h.admin("POST", "/admin/purge?project=1&insight=1", true).status, 200);
    }
    assert!(all_hit(&h), "purging insight 1 twice dropped the entries of insights 2–20");
    // The same rejected key, twice.
    warm(&h);
    for _ in 0..2 {
        assert_eq!(h.get(&insight_url(1), "phx_not_a_real_key").status, 401);
    }
    assert!(all_hit(&h), "one rejected key seen twice dropped another user's entries");
}

/// Blocking on the moka future cache's housekeeping from a test thread.
trait AwaitBlocking {
    fn await_blocking(self);
}

impl<F: std::future::Future<Output = ()>> AwaitBlocking for F {
    fn await_blocking(self) {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(self);
    }
}

// ---------------------------------------------------------------------------------------------
// (f) Chaos: the upstream stopped and restarted under load; silent, dripping, broken upstreams.
// ---------------------------------------------------------------------------------------------

#[test]
fn the_upstream_stopped_and_restarted_under_load_is_survived() {
    let mut h = Harness::with(|c, _| {
        c.breaker.failures = 3;
        c.breaker.cooldown = Duration::from_millis(200);
        c.breaker.max_cooldown = Duration::from_millis(800);
        c.read_timeout = Duration::from_secs(2);
    });
    for id in 1..=PROJECT1_INSIGHTS {
        assert_eq!(h.get(&format!("{}?refresh=blocking", insight_url(id)), ALL).status, 200);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let port = h.proxy_port;
    // Load: cached reads of every insight (blocking: recalculated once stale).
    let load: Vec<JoinHandle<Vec<(u16, String, bool)>>> = (0..3)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut conn = Conn::new(port);
                let mut seen = Vec::new();
                for i in 0..100_000u64 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let id = 1 + (i * 3 + t) % PROJECT1_INSIGHTS;
                    let r = conn.get(&format!("{}?refresh=blocking", insight_url(id)), ALL);
                    let has_result = r.status == 200 && !r.json()["result"].is_null();
                    seen.push((r.status, r.cache_status().to_string(), has_result));
                }
                seen
            })
        })
        .collect();
    eventually("load is flowing", || {
        h.metric("insights_proxy_request_duration_seconds_count{route=\"insight\"}") > 60.0
    });
    h.stop_backend();
    // Everything is stale now: blocking requests want a recalculation the upstream cannot give.
    h.clock.advance(Duration::from_secs(2 * 86_400));
    let during = h.metric("insights_proxy_request_duration_seconds_count{route=\"insight\"}");
    eventually("load keeps being answered during the outage", || {
        h.metric("insights_proxy_request_duration_seconds_count{route=\"insight\"}") > during + 100.0
    });
    eventually("the circuit opens", || h.metric("insights_proxy_upstream_circuit_open") == 1.0);
    // A key that was never cached: a PostHog-shaped error, not a hang or a reset.
    let r = h.get(&variant_url(1, 99, "blocking"), ALL);
    assert_posthog_error(&r, &[502, 503, 504], "uncached key during the outage");
    h.start_backend_again();
    let restarted = Instant::now();
    // Full recovery: a forced calculation goes through and the readiness probe is green.
    eventually("a forced calculation succeeds after the restart", || {
        let r = h.get(&format!("{}?refresh=force_blocking", insight_url(1)), ALL);
        r.status == 200 && r.cache_status().contains("fwd=request")
    });
    let recovery = restarted.elapsed();
    eventually("ready", || h.admin("GET", "/readyz", false).status == 200);
    stop.store(true, Ordering::SeqCst);
    let seen: Vec<(u16, String, bool)> = load.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let ok = seen.iter().filter(|(s, _, has)| *s == 200 && *has).count();
    let stale_if_error = seen.iter().filter(|(_, cs, _)| cs.contains("stale-if-error")).count();
    let errors: Vec<_> = seen.iter().filter(|(s, _, has)| *s != 200 || !*has).collect();
    eprintln!(
        "{} answers under load: {ok} with a result ({stale_if_error} stale-if-error), {} without; recovery {recovery:?}",
        seen.len(),
        errors.len()
    );
    assert!(stale_if_error > 0, "cached entries were served while the upstream was down");
    assert!(errors.is_empty(), "every cached insight kept being served, but: {:?}", &errors[..errors.len().min(5)]);
    assert!(recovery < Duration::from_secs(5), "recovery took {recovery:?}");
    // After recovery, stale entries are recalculated again.
    let r = h.get(&format!("{}?refresh=blocking", insight_url(2)), ALL);
    assert_eq!(r.status, 200);
    assert!(!r.cache_status().contains("stale-if-error"), "{}", r.cache_status());
}

/// A proxy in front of a fake upstream: short timeouts, a breaker that never opens (every request
/// really reaches the upstream).
fn proxy_in_front_of(fake: &FakeUpstream) -> (posthog_sim::testing::Running, Arc<insights_proxy::app::App>, u16) {
    let port = free_port();
    let mut config = test_config(port, fake.port);
    config.read_timeout = Duration::from_millis(400);
    config.connect_timeout = Duration::from_millis(300);
    config.breaker.failures = 1_000_000;
    config.budget.per_minute = None;
    let (running, app) = start_proxy(config, Clock::new());
    (running, app, port)
}

/// Every kind of request the proxy sends upstream, against a misbehaving upstream: each answered
/// with `expect` in PostHog's shape within the timeouts; nothing cached; no status left running.
fn broken_upstream_is_contained(how: Misbehaviour, expect: &[u16]) {
    let fake = FakeUpstream::start(how);
    let (running, app, port) = proxy_in_front_of(&fake);
    // connect (300 ms) + read (400 ms) bound the proxy's own calls; debug builds and a busy CI
    // machine get a generous margin.
    let bound = Duration::from_millis(300 + 400) + Duration::from_millis(1500);
    let url = insight_url(1);
    let cases = [
        format!("{url}?refresh=blocking"),
        format!("{url}?refresh=force_blocking"),
        format!("{url}?refresh=async"),
        format!("{url}?refresh=lazy_async"),
        url.clone(),
        format!("{url}?refresh=blocking&from_dashboard=1"),
    ];
    for path in &cases {
        let t = Instant::now();
        let r = http(port, "GET", path, &[("Authorization", &format!("Bearer {ALL}"))], None);
        let took = t.elapsed();
        assert_posthog_error(&r, expect, &format!("{how:?} {path}"));
        assert!(took < bound, "{how:?} {path}: answered after {took:?}");
        assert!(!r.cache_status().contains("; hit"), "{}", r.cache_status());
    }
    // force_async answers with a status first; its background calculation must end in an error.
    let t = Instant::now();
    let r =
        http(port, "GET", &format!("{url}?refresh=force_async"), &[("Authorization", &format!("Bearer {ALL}"))], None);
    assert!(t.elapsed() < bound, "{how:?} force_async: answered after {:?}", t.elapsed());
    assert!(r.status == 200 || expect.contains(&r.status), "{how:?} force_async: {} {}", r.status, r.text());
    let id = status_id_for(&app, ALL, 1, 1, "");
    let owner = Principal::api_key(&app.keyer, ALL).partition();
    eventually("the force_async status is not left running", || {
        app.statuses.get(owner, &id).is_none_or(|s| s.complete && s.error)
    });
    eventually("no background work left", || app.engine.is_idle());
    // Pass-through: pingora's proxy path, with the peer's per-read timeout. (An upstream that
    // breaks off mid-body after the head was relayed: see the ignored test below.)
    if !matches!(how, Misbehaviour::CloseMidBody) {
        let t = Instant::now();
        let r = http(port, "GET", "/api/projects/", &[("Authorization", &format!("Bearer {ALL}"))], None);
        assert!(t.elapsed() < bound, "{how:?} pass-through: answered after {:?}", t.elapsed());
        assert_posthog_error(&r, expect, &format!("{how:?} pass-through"));
    }
    h_cache_is_empty(&app);
    assert!(fake.connections() >= 1, "the fake upstream was reached");
    drop(running);
}

fn h_cache_is_empty(app: &insights_proxy::app::App) {
    app.cache.run_pending_tasks().await_blocking();
    assert_eq!(app.cache.entry_count(), 0, "nothing from a broken upstream is cached");
}

#[test]
fn an_upstream_that_never_answers_gets_504_within_the_read_timeout() {
    broken_upstream_is_contained(Misbehaviour::Silent, &[504]);
}

#[test]
fn an_upstream_that_answers_at_one_byte_per_second_gets_504_within_the_read_timeout() {
    broken_upstream_is_contained(Misbehaviour::Drip { interval: Duration::from_secs(1) }, &[504]);
}

#[test]
fn an_upstream_that_closes_mid_body_gets_502_and_nothing_is_cached() {
    broken_upstream_is_contained(Misbehaviour::CloseMidBody, &[502]);
}

/// Regression: a passed-through JSON answer under `/api/` has its `Content-Length` removed (the
/// body is buffered to rewrite absolute links) after pingora chose the framing, so it went out with
/// neither `Content-Length` nor `Transfer-Encoding: chunked`: close-delimited although it said
/// `Connection: keep-alive`. Every such answer cost the client its connection, and when the
/// upstream broke off mid-body the client got a 200 with an empty body it could not tell from a
/// complete one.
#[test]
fn a_passed_through_json_answer_is_framed_and_a_broken_one_is_detectable() {
    let h = Harness::start();
    let r = h.get("/api/projects/", ALL);
    assert_eq!(r.status, 200);
    let framed =
        r.header("content-length").is_some() || r.header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
    assert!(framed, "no framing on a pass-through answer: {:?}", r.headers);
    drop(h);
    let fake = FakeUpstream::start(Misbehaviour::CloseMidBody);
    let (running, _app, port) = proxy_in_front_of(&fake);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request_text(port, "GET", "/api/projects/", ALL).as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let r = parse_response(&raw);
    let declared = r.header("content-length").and_then(|v| v.parse::<usize>().ok());
    let chunked_unfinished =
        r.header("transfer-encoding").is_some_and(|v| v.contains("chunked")) && !raw.ends_with(b"0\r\n\r\n");
    let detectable = r.status >= 500 || declared.is_some_and(|n| r.body.len() < n) || chunked_unfinished;
    assert!(
        detectable,
        "a truncated pass-through looked complete: {} {:?} {} body bytes",
        r.status,
        r.headers,
        r.body.len()
    );
    drop(running);
}

/// Regression: pass-through requests had pingora's per-read upstream timeout only, so an upstream
/// that sent a byte more often than `read_timeout_ms` held the request as long as it liked. They now
/// get the proxy's own total deadline, `connect_timeout_ms + read_timeout_ms`.
#[test]
fn a_dripping_upstream_cannot_hold_a_pass_through_request_past_the_deadline() {
    let fake = FakeUpstream::start(Misbehaviour::DripBody { interval: Duration::from_millis(100) });
    let (running, _app, port) = proxy_in_front_of(&fake);
    let full = fake_insight_body().len();
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request_text(port, "GET", "/api/projects/", ALL).as_bytes()).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let took = t.elapsed();
    let text = String::from_utf8_lossy(&got);
    eprintln!(
        "pass-through against an upstream dripping its body at 10 B/s ({full} B): {} B after {took:?}",
        got.len()
    );
    // Without a deadline it lasts until the fake upstream gives up (FAKE_MAX_LIFE, 15 s).
    assert!(took < Duration::from_secs(5), "a pass-through request was held {took:?}, deadline 700 ms");
    // Cut off, not passed as complete: the head promised more than arrived (or the answer is an error).
    assert!(
        text.starts_with("HTTP/1.1 50") || !text.contains(&fake_insight_body()),
        "a cut-off answer looked complete: {text}"
    );
    drop(running);
}
