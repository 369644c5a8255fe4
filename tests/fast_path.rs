//! Requests the proxy answers itself take a path in front of pingora's proxy (`src/http/conn.rs`);
//! everything else is handed to the proxy on the same connection. These tests
//! drive one keep-alive connection through both paths and the edges between them.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Vec<u8> {
    request_bytes(method, path, "127.0.0.1", headers, body)
}

const AUTH: (&str, &str) = ("Authorization", "Bearer phx_demo_all");

/// Insight hits counted in `insights_proxy_requests_total`, over all modes.
fn hits(h: &Harness) -> f64 {
    let text = h.admin("GET", "/metrics", false).text();
    text.lines()
        .filter(|l| l.starts_with("insights_proxy_requests_total{") && l.contains(r#"cache="hit""#))
        .filter(|l| l.contains(r#"route="insight""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn one_connection_through_both_paths() {
    let h = Harness::start();
    let (id, url) = h.day_insight();
    let mut c = Conn::open(h.proxy_port);

    let miss = c.exchange("GET", &format!("{url}?refresh=blocking"), &[AUTH], None);
    assert_eq!(miss.status, 200, "{}", miss.text());
    let before = hits(&h);
    let hit = c.exchange("GET", &url, &[AUTH], None);
    assert_eq!(hit.status, 200);
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert_eq!(hit.header("vary"), Some("Authorization, Cookie"));
    assert_eq!(hit.header("content-length").map(|l| l.parse::<usize>().unwrap()), Some(hit.body.len()));
    assert_eq!(hit.json()["id"].as_u64(), Some(id));
    assert_eq!(hits(&h), before + 1.0, "one hit counted once");

    // Pass-through on the same connection: the upstream's own answer, saying it was passed on.
    let projects = c.exchange("GET", "/api/projects/", &[AUTH], None);
    assert_eq!(projects.status, 200);
    assert_eq!(projects.header("cache-status"), Some("insights-proxy; fwd=bypass"));

    // A write with a body after a hit: forwarded with its body, then the entry is purged.
    let patched = c.exchange("PATCH", &url, &[AUTH], Some(r#"{"description":"fast path"}"#));
    assert_eq!(patched.status, 200, "{}", patched.text());
    assert_eq!(patched.json()["description"], "fast path");
    let after_write = c.exchange("GET", &format!("{url}?refresh=blocking"), &[AUTH], None);
    assert_eq!(after_write.status, 200);
    assert!(!after_write.cache_status().contains("; hit"), "purged by the write: {}", after_write.cache_status());
    assert_eq!(after_write.json()["description"], "fast path");

    // A GET with a JSON body is decided by the proxy (it reads the body): `refresh` in the body.
    let body_get = c.exchange("GET", &url, &[AUTH], Some(r#"{"refresh":"force_cache"}"#));
    assert_eq!(body_get.status, 200, "{}", body_get.text());
    assert!(body_get.cache_status().contains("hit"), "{}", body_get.cache_status());

    // No credential: the upstream says 401, and the proxy marks it as bypassed.
    let anon = c.exchange("GET", &url, &[], None);
    assert_eq!(anon.status, 401);
    assert!(anon.cache_status().contains("no-credential"), "{}", anon.cache_status());

    // Refused by the proxy itself: too many headers, on the same connection.
    let many: Vec<(String, String)> = (0..101).map(|i| (format!("x-h{i}"), "v".to_string())).collect();
    let mut headers: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    headers.push(AUTH);
    let refused = c.exchange("GET", &url, &headers, None);
    assert_eq!(refused.status, 431, "{}", refused.text());

    // A header larger than one read (a 20 KB cookie) still reaches the same decision.
    let cookie = format!("other={}", "c".repeat(20_000));
    let big = c.exchange("GET", &url, &[AUTH, ("Cookie", &cookie)], None);
    assert_eq!(big.status, 200);
    assert!(big.cache_status().contains("hit"), "{}", big.cache_status());

    // A header sent in two pieces.
    let raw = request("GET", &url, &[AUTH], None);
    let (a, b) = raw.split_at(20);
    c.send_raw(a);
    c.s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    c.send_raw(b);
    let split = c.response().expect("an answer to a header sent in two writes");
    assert_eq!(split.status, 200);
    assert!(split.cache_status().contains("hit"), "{}", split.cache_status());

    // Still the same connection, still a hit.
    let last = c.exchange("GET", &url, &[AUTH], None);
    assert!(last.cache_status().contains("hit"), "{}", last.cache_status());
    assert_ne!(last.header("connection"), Some("close"));
}

#[test]
fn connection_close_ends_the_connection_and_http10_is_answered() {
    let h = Harness::start();
    let (_, url) = h.day_insight();
    assert_eq!(h.get(&format!("{url}?refresh=blocking"), ALL).status, 200);

    let mut c = Conn::open(h.proxy_port);
    let r = c.exchange("GET", &url, &[AUTH, ("Connection", "close")], None);
    assert!(r.cache_status().contains("hit"), "{}", r.cache_status());
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed(), "Connection: close is honoured");

    let mut c = Conn::open(h.proxy_port);
    c.send_raw(format!("GET {url} HTTP/1.0\r\nAuthorization: Bearer {ALL}\r\n\r\n").as_bytes());
    let r = c.response().expect("an answer");
    assert_eq!(r.status, 200);
    assert!(r.cache_status().contains("hit"), "{}", r.cache_status());
}

/// HTTP/1.0 keeps a connection only when the client asks (`Connection: keep-alive`), on the fast
/// path (a plain head with `Host`) and on pingora's (no `Host`: the fast path leaves it) alike.
#[test]
fn http10_closes_unless_the_client_keeps_the_connection() {
    let h = Harness::start();
    let (_, url) = h.day_insight();
    assert_eq!(h.get(&format!("{url}?refresh=blocking"), ALL).status, 200);
    for host in ["Host: 127.0.0.1\r\n", ""] {
        let mut c = Conn::open(h.proxy_port);
        c.send_raw(format!("GET {url} HTTP/1.0\r\n{host}Authorization: Bearer {ALL}\r\n\r\n").as_bytes());
        let r = c.response().expect("an answer");
        assert!(r.cache_status().contains("hit"), "{}", r.cache_status());
        assert_eq!(r.header("connection"), Some("close"), "{host:?}");
        assert!(c.closed(), "HTTP/1.0 without keep-alive is closed ({host:?})");

        let mut c = Conn::open(h.proxy_port);
        let keep = format!("GET {url} HTTP/1.0\r\n{host}Authorization: Bearer {ALL}\r\nConnection: keep-alive\r\n\r\n");
        c.send_raw(keep.as_bytes());
        let r = c.response().expect("an answer");
        assert_eq!(r.header("connection"), Some("keep-alive"), "{host:?}");
        c.send_raw(keep.as_bytes());
        assert_eq!(c.response().expect("a second answer on the kept connection").status, 200);
    }
}

/// Two requests in one write. pingora 0.9 does not pipeline by default: it answers the first and
/// closes the connection (bytes read past a request end it). The fast path does the same, whichever
/// path the first request takes.
#[test]
fn pipelined_requests_are_answered_as_pingora_does() {
    let h = Harness::start();
    let (_, url) = h.day_insight();
    assert_eq!(h.get(&format!("{url}?refresh=blocking"), ALL).status, 200);

    for first in [url.as_str(), "/api/projects/"] {
        let mut c = Conn::open(h.proxy_port);
        let mut both = request("GET", first, &[AUTH], None);
        both.extend_from_slice(&request("GET", &url, &[AUTH], None));
        c.send_raw(&both);
        let r = c.response().expect("the first request is answered");
        assert_eq!(r.status, 200, "{first}");
        assert!(c.response().is_none(), "{first}: the pipelined request is not answered");
    }
}

/// Malformed and unusual requests the fast path hands to pingora unchanged.
#[test]
fn malformed_and_other_methods_go_to_pingora() {
    let h = Harness::start();
    let (_, url) = h.day_insight();
    assert_eq!(h.get(&format!("{url}?refresh=blocking"), ALL).status, 200);

    let mut c = Conn::open(h.proxy_port);
    c.send_raw(b"GET /api/ HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n");
    let r = c.response().expect("an answer to conflicting lengths");
    assert_eq!(r.status, 400);

    let mut c = Conn::open(h.proxy_port);
    c.send_raw(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n");
    let r = c.response().expect("an answer to CONNECT");
    assert_eq!(r.status, 405);
}

/// The head of the proxy's own answer, with the parts that change between two answers (the date,
/// the entry's remaining freshness) blanked.
fn head_of(raw: &[u8]) -> String {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    head.lines()
        .map(|l| {
            if l.starts_with("Date: ") {
                "Date: -".to_string()
            } else if let Some(i) = l.find("ttl=") {
                format!("{}ttl=-", &l[..i])
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The fast path writes its answers' heads itself: byte for byte what pingora's session writes for
/// the same reply on the proxy's path (taken here by a GET with an empty JSON body, which the fast
/// path leaves to the proxy).
#[test]
fn answers_are_byte_identical_on_both_paths() {
    let h = Harness::start();
    let (_, url) = h.day_insight();
    assert_eq!(h.get(&format!("{url}?refresh=blocking"), ALL).status, 200);
    let many: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let cases = [
        (url.clone(), String::new()),
        (url.clone(), "Connection: close\r\n".to_string()),
        (url.clone(), many),
        (format!("{url}?a=%zz"), String::new()),
        ("/api/environments/1/../insights/".to_string(), String::new()),
    ];
    for (path, extra) in cases {
        let mut heads = Vec::new();
        for body in ["", "{}"] {
            let len = if body.is_empty() { String::new() } else { format!("Content-Length: {}\r\n", body.len()) };
            let raw = format!(
                "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ALL}\r\n{extra}{len}\r\n{body}"
            );
            let mut c = Conn::open(h.proxy_port);
            c.send_raw(raw.as_bytes());
            let all = c.response_raw().expect("an answer");
            heads.push(head_of(&all));
        }
        if heads[0].starts_with("HTTP/1.1 200") {
            assert_eq!(heads[0], heads[1], "{path} {extra:?}");
        } else {
            // Refused without reading the body: pingora closes a connection whose request body is
            // unread; without a body the connection stays open on both paths.
            let without_connection =
                |h: &str| h.lines().filter(|l| !l.starts_with("Connection:")).collect::<Vec<_>>().join("\n");
            assert_eq!(without_connection(&heads[0]), without_connection(&heads[1]), "{path}");
            assert!(heads[0].contains("Connection: keep-alive"), "{}", heads[0]);
        }
    }
}

/// A client whose socket takes a few kilobytes at a time.
fn slow_reader(port: u16) -> Conn {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into()).unwrap();
    Conn::over(socket.into())
}

/// Large cached bodies (an insight, a kept list page) go out from a sealed file on cleartext HTTP/1
/// (`src/cache/sealed.rs`): the bytes equal pingora's answer to the same request, for a client that
/// reads as fast as it can and one that takes a few kilobytes at a time, hit after hit on one
/// connection.
#[test]
fn large_bodies_are_the_same_bytes_on_both_paths() {
    let h = Harness::start();
    // About 1.3 MB.
    let series: Vec<String> = ["$pageview", "$autocapture", "$pageleave", "signed_up"]
        .iter()
        .cycle()
        .take(40)
        .map(|e| format!(r#"{{"kind":"EventsNode","event":"{e}","math":"total"}}"#))
        .collect();
    let query = format!(
        r#"{{"name":"Ten years of forty series","saved":true,"query":{{"kind":"InsightVizNode","source":{{"kind":"TrendsQuery","interval":"day","dateRange":{{"date_from":"-3650d"}},"series":[{}]}}}}}}"#,
        series.join(",")
    );
    let created = h.request("POST", "/api/projects/1/insights/", &[AUTH], Some(&query));
    assert_eq!(created.status, 201, "{}", created.text());
    let url = format!("/api/environments/1/insights/{}/", created.json()["id"]);
    let first = h.get(&format!("{url}?refresh=blocking"), ALL);
    assert_eq!(first.status, 200);
    assert!(first.body.len() > 1_000_000, "a large body: {} bytes", first.body.len());
    assert!(h.metric("insights_proxy_sendfile_bodies") >= 1.0, "the body is held in a file");

    let auth = format!("Authorization: Bearer {ALL}\r\n");
    let body_of = |raw: &[u8]| raw[raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..].to_vec();
    // The insight, and a list page holding it (the list is in order of ids, the new one last):
    // kept once read.
    let id = created.json()["id"].as_u64().unwrap();
    let count = h.get("/api/environments/1/insights/?limit=1", ALL).json()["count"].as_u64().unwrap();
    let list = format!("/api/environments/1/insights/?limit=1&offset={}", count - 1);
    assert!(h.get(&list, ALL).body.len() > 1_000_000, "the list page holds the large insight");
    for path in [url.clone(), list] {
        let fast = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n");
        // An empty JSON body: the fast path leaves the request to pingora's proxy.
        let by_pingora = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: 2\r\n\r\n{{}}");
        let mut reference = Conn::open(h.proxy_port);
        reference.send_raw(by_pingora.as_bytes());
        let expected = reference.response_raw().expect("pingora's answer");
        assert!(head_of(&expected).contains("cache-status: insights-proxy; hit"), "{}", head_of(&expected));
        for mut conn in [Conn::open(h.proxy_port), slow_reader(h.proxy_port)] {
            conn.send_raw(fast.as_bytes());
            for round in 0..8 {
                // The next request goes once this answer has begun (its request was read), so the
                // proxy reads it alone (a pipelined pair would go to pingora's proxy) and writes its
                // answer behind this one's.
                conn.await_head();
                if round < 7 {
                    conn.send_raw(fast.as_bytes());
                }
                let got = conn.response_raw().expect("an answer");
                assert_eq!(head_of(&got), head_of(&expected), "{path}");
                assert!(body_of(&got) == body_of(&expected), "{path}: the body differs from pingora's");
            }
        }
    }
    assert!(h.metric("insights_proxy_sendfile_bodies") >= 2.0, "the insight and the kept page");
    // By default they live in unnamed files in /var/tmp (the proxy runs in this process).
    let unnamed = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|l| l.starts_with("/var/tmp") && l.to_string_lossy().ends_with(" (deleted)"))
        .count();
    assert!(unnamed >= 2, "{unnamed} unnamed files in /var/tmp");
    assert_eq!(h.calcs(1, id), 1);
}

/// Whether the proxy's end of `client`'s connection has `TCP_NODELAY`, found among this process's
/// descriptors (the proxy runs in the test's process) by its two addresses.
fn server_nodelay(client: &std::net::TcpStream, proxy_port: u16) -> Option<bool> {
    let client_addr = client.local_addr().ok()?;
    std::fs::read_dir("/proc/self/fd").ok()?.flatten().find_map(|entry| {
        let fd: i32 = entry.file_name().to_str()?.parse().ok()?;
        // SAFETY: only addresses and an option are read; a descriptor closed meanwhile makes those
        // reads fail.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let local = sock.local_addr().ok()?.as_socket()?;
        let peer = sock.peer_addr().ok()?.as_socket()?;
        (local.port() == proxy_port && peer == client_addr).then(|| sock.tcp_nodelay().ok()).flatten()
    })
}

/// The proxy's connections send each segment at once (`TCP_NODELAY`, as pingora's listener sets
/// it): an answer in several writes never waits for the client's delayed ACK.
#[test]
fn accepted_connections_send_without_nagle() {
    let h = Harness::start();
    let (_, url) = h.day_insight();
    let mut conn = Conn::open(h.proxy_port);
    assert_eq!(conn.exchange("GET", &url, &[AUTH], None).status, 200);
    assert_eq!(server_nodelay(&conn.s, h.proxy_port), Some(true), "TCP_NODELAY on the proxy's end");
}
