//! Request framing and authority at the front door, through the real proxy to a raw upstream that
//! keeps every byte it receives ([`Capture`]). Each vector says what the client gets (the proxy's
//! own 400, pingora's parser refusal, or the upstream's answer) and what reached the upstream.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use insights_proxy::app::App;
use insights_proxy::clock::Clock;
use posthog_sim::serve::free_port;
use posthog_sim::testing::Running;

/// A pass-through route (list writes go straight to the upstream).
const PASS: &str = "POST /api/environments/1/insights/ HTTP/1.1";
/// An insight the proxy answers itself (from its cache or its own upstream calls).
const INSIGHT: &str = "GET /api/environments/1/insights/5/ HTTP/1.1";
const HOST: Option<&str> = Some("127.0.0.1");
/// A request hidden in another's bytes: it must never reach the upstream.
const SMUGGLED: &str = "GET /api/smuggled/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

/// A request's bytes: `line`, `Host` (unless `None`), a credential, `headers` (each ending in CRLF),
/// the blank line and `body`.
fn raw(line: &str, host: Option<&str>, headers: &str, body: &[u8]) -> Vec<u8> {
    let host = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
    let mut r = format!("{line}\r\n{host}Authorization: Bearer phx_demo_all\r\n{headers}\r\n").into_bytes();
    r.extend_from_slice(body);
    r
}

fn post(headers: &str, body: &[u8]) -> Vec<u8> {
    raw(PASS, HOST, headers, body)
}

fn get(headers: &str) -> Vec<u8> {
    raw(INSIGHT, HOST, headers, b"")
}

fn cat(a: Vec<u8>, b: &str) -> Vec<u8> {
    [a, b.as_bytes().to_vec()].concat()
}

struct Proxy {
    port: u16,
    app: Arc<App>,
    upstream: Capture,
    _running: Running,
}

fn start() -> Proxy {
    let upstream = Capture::start();
    let port = free_port();
    let mut c = test_config(port, upstream.port);
    c.admin_listen = None;
    c.max_body_bytes = 1024;
    // Anything counted against the upstream opens the breaker at once.
    c.breaker.failures = 1;
    let (running, app) = start_proxy(c, Clock::new());
    Proxy { port, app, upstream, _running: running }
}

/// How a vector's bytes are written.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Write {
    /// One write: a GET whose head arrives in one read takes the fast path.
    Once,
    /// The first bytes, a pause, then the rest: always pingora's path.
    Split,
    /// One write, then the client's side is shut (a body that never ends).
    HalfClose,
}

/// What a vector does.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// The proxy's own PostHog-shaped 400 with `Connection: close`, then the connection closes;
    /// nothing reaches the upstream.
    Refused,
    /// The proxy's own answer with this status and `Connection: close`, then the connection closes
    /// (the body is left unread); nothing reaches the upstream.
    Answered(u16),
    /// pingora's HTTP/1 parser refuses the head before any hook runs: its own 400 (empty body,
    /// `Connection: close`), then the connection closes; nothing reaches the upstream.
    ParserRefused,
    /// Forwarded as one request with exactly one framing header (`Content-Length: n`, or `None`
    /// for chunked) and this body; the client gets the upstream's answer.
    Forwarded(Option<usize>, &'static str),
    /// The body cannot be read to its end: the client gets a 400 or nothing, the connection
    /// closes, and the upstream (which may have seen the head and part of the body) never gets a
    /// whole request and its connection is closed, never reused.
    BodyUnreadable,
    /// Pipelined requests: only the first is answered (with this status; pingora's head still says
    /// `keep-alive`), then the connection closes; only the first reaches the upstream (an insight
    /// the proxy already holds, none).
    FirstOnly(u16),
}

struct Vector {
    name: &'static str,
    bytes: Vec<u8>,
    expect: Expect,
    writes: &'static [Write],
}

const BOTH: &[Write] = &[Write::Once, Write::Split];
const HALF: &[Write] = &[Write::HalfClose];

fn v(name: &'static str, bytes: Vec<u8>, expect: Expect) -> Vector {
    Vector { name, bytes, expect, writes: BOTH }
}

fn vectors() -> Vec<Vector> {
    use Expect::*;
    let chunked_hello = b"5\r\nhello\r\n0\r\n\r\n";
    vec![
        // Content-Length given more than once, or not as a plain number.
        v("cl_list_equal", post("Content-Length: 5, 5\r\n", b"hello"), Refused),
        v("cl_list_differs", post("Content-Length: 5, 6\r\n", b"hello"), ParserRefused),
        v("cl_twice_equal", post("Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"), Refused),
        v("cl_twice_differs", post("Content-Length: 5\r\nContent-Length: 6\r\n", b"hello"), ParserRefused),
        v("cl_non_digit", post("Content-Length: abc\r\n", b"hello"), ParserRefused),
        v("cl_plus_sign", post("Content-Length: +5\r\n", b"hello"), ParserRefused),
        v("cl_negative", post("Content-Length: -5\r\n", b"hello"), ParserRefused),
        v("cl_overflow", post("Content-Length: 184467440737095516160\r\n", b"hello"), ParserRefused),
        v("cl_hex", post("Content-Length: 0x5\r\n", b"hello"), ParserRefused),
        v("cl_empty", post("Content-Length: \r\n", b""), ParserRefused),
        // Zero-length lists on a bodiless GET: the fast path decides these itself.
        v("get_cl_list_zero", get("Content-Length: 0, 0\r\n"), Refused),
        v("get_cl_twice_zero", get("Content-Length: 0\r\nContent-Length: 0\r\n"), Refused),
        // Content-Length with Transfer-Encoding, in either order, and the classic smuggles.
        v("cl_then_te", post("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", chunked_hello), Refused),
        v("te_then_cl", post("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", chunked_hello), Refused),
        v("te_chunked_cl_zero", post("Transfer-Encoding: chunked\r\nContent-Length: 0\r\n", b"0\r\n\r\n"), Refused),
        v(
            "cl_te_smuggle",
            cat(post("Content-Length: 52\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"), SMUGGLED),
            Refused,
        ),
        v(
            "te_cl_smuggle",
            cat(
                post("Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", b"2f\r\n"),
                &format!("{SMUGGLED}\r\n0\r\n\r\n"),
            ),
            Refused,
        ),
        v(
            "get_cl_te",
            raw(INSIGHT, HOST, "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
            Refused,
        ),
        // Transfer-Encoding other than exactly `chunked`.
        v("te_gzip_chunked", post("Transfer-Encoding: gzip, chunked\r\n", chunked_hello), Refused),
        v("te_chunked_chunked", post("Transfer-Encoding: chunked, chunked\r\n", chunked_hello), Refused),
        v("te_two_headers", post("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", chunked_hello), Refused),
        v(
            "te_chunked_twice",
            post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", chunked_hello),
            Refused,
        ),
        v("te_chunked_identity", post("Transfer-Encoding: chunked, identity\r\n", chunked_hello), ParserRefused),
        v("te_xchunked", post("Transfer-Encoding: xchunked\r\n", chunked_hello), ParserRefused),
        v("te_identity", post("Transfer-Encoding: identity\r\n", b"hello"), ParserRefused),
        v(
            "te_on_http10",
            raw("POST /api/environments/1/insights/ HTTP/1.0", HOST, "Transfer-Encoding: chunked\r\n", chunked_hello),
            ParserRefused,
        ),
        v("te_space_before_colon", post("Transfer-Encoding : chunked\r\n", chunked_hello), ParserRefused),
        v("te_obs_fold", post("Transfer-Encoding: gzip,\r\n chunked\r\n", chunked_hello), ParserRefused),
        v("te_vertical_tab", post("Transfer-Encoding: \x0bchunked\r\n", chunked_hello), ParserRefused),
        v("te_upper_case", post("Transfer-Encoding: CHUNKED\r\n", chunked_hello), Forwarded(None, "hello")),
        v("te_trailing_space", post("Transfer-Encoding: chunked \r\n", chunked_hello), Forwarded(None, "hello")),
        // Field syntax.
        v("get_nul_in_value", get("X-A: a\0b\r\n"), ParserRefused),
        v("get_ctl_in_value", get("X-A: a\x01b\r\n"), ParserRefused),
        v("get_cr_in_value", get("X-A: a\rb\r\n"), ParserRefused),
        v("get_del_in_value", get("X-A: a\x7fb\r\n"), ParserRefused),
        v("get_space_before_colon", get("X-A : b\r\n"), ParserRefused),
        v("get_obs_fold", get("X-A: a\r\n b\r\n"), ParserRefused),
        v(
            "bare_lf_head",
            b"POST /api/environments/1/insights/ HTTP/1.1\nHost: 127.0.0.1\nContent-Length: 5\n\nhello".to_vec(),
            Forwarded(Some(5), "hello"),
        ),
        v("plain_length", post("Content-Length: 5\r\n", b"hello"), Forwarded(Some(5), "hello")),
        v("plain_chunked", post("Transfer-Encoding: chunked\r\n", chunked_hello), Forwarded(None, "hello")),
        // A length named in Connection is dropped on the way: the body then goes chunked.
        v(
            "connection_names_length",
            post("Connection: Content-Length\r\nContent-Length: 5\r\n", b"hello"),
            Forwarded(None, "hello"),
        ),
        // Chunked bodies.
        v(
            "chunk_extension",
            post("Transfer-Encoding: chunked\r\n", b"5;a=b\r\nhello\r\n0\r\n\r\n"),
            Forwarded(None, "hello"),
        ),
        v(
            "chunk_size_huge",
            post("Transfer-Encoding: chunked\r\n", b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
            BodyUnreadable,
        ),
        v("chunk_size_junk", post("Transfer-Encoding: chunked\r\n", b"5zz\r\nhello\r\n0\r\n\r\n"), BodyUnreadable),
        v("chunk_data_longer", post("Transfer-Encoding: chunked\r\n", b"3\r\nhello\r\n0\r\n\r\n"), BodyUnreadable),
        v("chunk_bare_lf", post("Transfer-Encoding: chunked\r\n", b"5\nhello\n0\n\n"), BodyUnreadable),
        Vector {
            name: "chunk_missing_last",
            bytes: post("Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n"),
            expect: BodyUnreadable,
            writes: HALF,
        },
        Vector {
            name: "cl_body_short",
            bytes: post("Content-Length: 10\r\n", b"hello"),
            expect: BodyUnreadable,
            writes: HALF,
        },
        // Pipelined requests and bodies that look like requests.
        v("pipelined_after_post", cat(post("Content-Length: 5\r\n", b"hello"), SMUGGLED), FirstOnly(200)),
        v(
            "pipelined_after_chunked",
            cat(post("Transfer-Encoding: chunked\r\n", chunked_hello), SMUGGLED),
            FirstOnly(200),
        ),
        v("pipelined_after_get", cat(get(""), SMUGGLED), FirstOnly(200)),
        v(
            "upgrade_then_smuggle",
            cat(
                raw("GET /api/projects/ HTTP/1.1", HOST, "Connection: Upgrade\r\nUpgrade: websocket\r\n", b""),
                SMUGGLED,
            ),
            FirstOnly(200),
        ),
        v(
            "refused_route_with_body",
            raw(
                "GET /api/environments/1/insights/../x HTTP/1.1",
                HOST,
                &format!("Content-Length: {}\r\n", SMUGGLED.len()),
                SMUGGLED.as_bytes(),
            ),
            Refused,
        ),
        v("declared_too_large", cat(post("Content-Length: 100000\r\n", b""), SMUGGLED), Answered(413)),
        // Authority.
        v("host_json_injection", post("Content-Length: 5\r\n", b"hello").replace_host("x\",\"injected\":\"1"), Refused),
        v("get_host_json_injection", get("").replace_host("x\",\"injected\":\"1"), Refused),
        v("host_with_path", get("").replace_host("evil.example/x"), Refused),
        v("host_with_space", get("").replace_host("a b"), Refused),
        v("host_empty", get("").replace_host(""), Refused),
        v("host_bad_port", get("").replace_host("example.com:80x"), Refused),
        v("host_unbracketed_ipv6", get("").replace_host("::1"), Refused),
        v("host_twice", get("Host: other.example\r\n"), ParserRefused),
        v("host_userinfo", get("").replace_host("user@example.com"), ParserRefused),
        v("host_ipv6", post("Content-Length: 5\r\n", b"hello").replace_host("[::1]:8080"), Forwarded(Some(5), "hello")),
        v(
            "absolute_target_bad_authority",
            raw("GET http://example.com:99999/api/projects/ HTTP/1.1", None, "", b""),
            Refused,
        ),
    ]
}

trait ReplaceHost {
    fn replace_host(self, host: &str) -> Vec<u8>;
}

impl ReplaceHost for Vec<u8> {
    fn replace_host(self, host: &str) -> Vec<u8> {
        let text = String::from_utf8(self).unwrap();
        text.replacen("Host: 127.0.0.1\r\n", &format!("Host: {host}\r\n"), 1).into_bytes()
    }
}

struct Seen {
    response: Option<Resp>,
    connection: Option<String>,
    closed: bool,
}

/// Sends `bytes` on a fresh connection, reads one response and whether the connection then closed
/// (waiting `linger` for a close).
fn send(p: &Proxy, bytes: &[u8], how: Write, linger: Duration) -> Seen {
    let mut c = Conn::open(p.port);
    match how {
        Write::Once => c.send_raw(bytes),
        Write::Split => {
            c.send_raw(&bytes[..10]);
            std::thread::sleep(Duration::from_millis(30));
            c.send_raw(&bytes[10..]);
        }
        Write::HalfClose => {
            c.send_raw(bytes);
            c.s.shutdown(std::net::Shutdown::Write).unwrap();
        }
    }
    let response = c.response();
    c.s.set_read_timeout(Some(linger)).unwrap();
    let closed = match std::io::Read::read(&mut c.s, &mut [0u8; 1024]) {
        Ok(n) => n == 0,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    };
    let connection = response.as_ref().and_then(|r| r.header("connection")).map(str::to_string);
    Seen { response, connection, closed }
}

fn check(p: &Proxy, vector: &Vector, how: Write) -> Result<(), String> {
    p.upstream.clear();
    let linger = match vector.expect {
        Expect::Forwarded(..) => Duration::from_millis(100),
        // A hang guard: the proxy closes right after its answer.
        _ => Duration::from_secs(2),
    };
    let seen = send(p, &vector.bytes, how, linger);
    // Whatever the proxy sent upstream for this request has arrived.
    std::thread::sleep(Duration::from_millis(50));
    let status = seen.response.as_ref().map(|r| r.status);
    let body = seen.response.as_ref().map(Resp::text).unwrap_or_default();
    let requests = p.upstream.requests();
    let ensure = |ok: bool, what: &str| -> Result<(), String> {
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{what}: status {status:?}, connection {:?}, closed {}, body {body:?}, upstream {requests:?}, unframed {:?}",
                seen.connection,
                seen.closed,
                p.upstream.unframed()
            ))
        }
    };
    match vector.expect {
        Expect::Refused => {
            let json = seen.response.as_ref().map(Resp::json).unwrap_or_default();
            ensure(status == Some(400), "the proxy's own 400")?;
            ensure(json["type"] == "validation_error" && json["code"] == "invalid_input", "PostHog's shape")?;
            ensure(json["detail"].as_str().is_some_and(|d| !d.is_empty()) && json["attr"].is_null(), "a detail")?;
            ensure(seen.connection.as_deref() == Some("close") && seen.closed, "Connection: close, then closed")?;
            ensure(p.upstream.bytes().is_empty(), "nothing upstream")?;
        }
        Expect::Answered(expected) => {
            ensure(
                status == Some(expected) && seen.response.as_ref().is_some_and(|r| r.json()["type"].is_string()),
                "the proxy's own answer",
            )?;
            ensure(seen.connection.as_deref() == Some("close") && seen.closed, "Connection: close, then closed")?;
            ensure(p.upstream.bytes().is_empty(), "nothing upstream")?;
        }
        Expect::ParserRefused => {
            let r = seen.response.as_ref();
            ensure(status == Some(400) && body.is_empty(), "pingora's own empty 400")?;
            ensure(r.is_some_and(|r| r.header("cache-status").is_none()), "no hook ran")?;
            ensure(seen.connection.as_deref() == Some("close") && seen.closed, "Connection: close, then closed")?;
            ensure(p.upstream.bytes().is_empty(), "nothing upstream")?;
        }
        Expect::Forwarded(length, sent) => {
            ensure(status == Some(200), "the upstream's answer")?;
            let relinked = seen.response.as_ref().map(Resp::json).unwrap_or_default();
            ensure(relinked["next"].as_str().is_some_and(|n| !n.contains(&p.upstream.port.to_string())), "relinked")?;
            let requests = p.upstream.requests();
            ensure(requests.len() == 1, "one request upstream")?;
            let r = &requests[0];
            let lengths = r.header_values("content-length");
            let codings = r.header_values("transfer-encoding");
            let framing_ok = match length {
                Some(n) => lengths == [n.to_string()] && codings.is_empty(),
                None => codings == ["chunked"] && lengths.is_empty(),
            };
            ensure(framing_ok, "exactly one framing header upstream")?;
            ensure(r.body == sent.as_bytes(), "the body upstream")?;
        }
        Expect::BodyUnreadable => {
            let json = seen.response.as_ref().map(Resp::json);
            ensure(status.is_none_or(|s| s == 400), "a 400 or nothing")?;
            ensure(json.is_none_or(|j| j["type"] == "validation_error"), "PostHog's shape")?;
            ensure(seen.connection.as_deref().is_none_or(|c| c == "close") && seen.closed, "closed")?;
            ensure(requests.is_empty(), "no whole request upstream")?;
            let unframed_closed = || p.upstream.unframed().iter().all(|(_, _, closed)| *closed);
            ensure(within(Duration::from_secs(5), unframed_closed), "the upstream connection closed")?;
        }
        Expect::FirstOnly(first) => {
            ensure(status == Some(first), "the first request answered")?;
            ensure(seen.closed, "closed after the first answer")?;
            ensure(requests.len() <= 1, "at most the first upstream")?;
        }
    }
    Ok(())
}

/// Every vector, through both paths where they differ; then: no hidden request ever reached the
/// upstream, no forwarded request carried two framing headers, and nothing was counted against
/// the upstream.
#[test]
fn framing_vectors() {
    let p = start();
    let vectors = vectors();
    assert!(vectors.len() >= 30);
    let mut failures = Vec::new();
    for vector in &vectors {
        for &how in vector.writes {
            if let Err(e) = check(&p, vector, how) {
                failures.push(format!("{} ({how:?}): {e}", vector.name));
            }
            let bytes = p.upstream.bytes();
            if String::from_utf8_lossy(&bytes).contains("smuggled") {
                failures.push(format!("{} ({how:?}): a hidden request reached the upstream", vector.name));
            }
            for r in p.upstream.requests() {
                if r.header_values("content-length").len() + r.header_values("transfer-encoding").len() > 1 {
                    failures.push(format!("{} ({how:?}): two framing headers upstream: {:?}", vector.name, r.head));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} failing:\n{}", failures.len(), failures.join("\n"));
    assert!(!p.app.engine.upstream().breaker().is_open(), "nothing counted against the upstream");
}

/// The Host the proxy writes into links (here the absolute links of a passed-through JSON answer)
/// is refused at the door unless it is a host: `x","injected":"1` would add a key to the JSON.
#[test]
fn a_hostile_host_never_reaches_a_link() {
    let p = start();
    let answer = |host: &str, proto: &str| -> Resp {
        let mut c = Conn::open(p.port);
        let headers = format!("X-Forwarded-Proto: {proto}\r\nContent-Length: 2\r\n");
        c.send_raw(&raw(PASS, Some(host), &headers, b"{}"));
        c.response().expect("an answer")
    };
    p.upstream.clear();
    let refused = answer("x\",\"injected\":\"1", "http");
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert_eq!(refused.json()["code"], "invalid_input");
    assert!(refused.json()["detail"].as_str().unwrap().contains("Host"));
    assert!(p.upstream.bytes().is_empty(), "the upstream saw nothing");

    let link = "example.com:8080/api/environments/1/insights/?offset=1";
    let ok = answer("example.com:8080", "http");
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.json()["next"], format!("http://{link}"));
    assert_eq!(answer("example.com:8080", "https").json()["next"], format!("https://{link}"));
    // Only http or https ever becomes a link's scheme.
    assert_eq!(answer("example.com:8080", "javascript").json()["next"], format!("http://{link}"));
    let requests = p.upstream.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests.iter().all(|r| r.header_values("x-forwarded-host") == ["example.com:8080"]));
}

/// pingora sends a request's head upstream before its body arrives. When the body then never ends,
/// that upstream connection (which holds part of a request) is closed, and the next request goes
/// on a fresh one.
#[test]
fn an_upstream_connection_with_an_unfinished_request_is_never_reused() {
    let p = start();
    // A pooled connection first, so that reusing it would be the easy thing to do.
    let mut c = Conn::open(p.port);
    c.send_raw(&post("Content-Length: 5\r\n", b"hello"));
    assert_eq!(c.response().expect("an answer").status, 200);

    let mut c = Conn::open(p.port);
    c.send_raw(&post("Content-Length: 10\r\n", b"hello"));
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(c.response().is_none(), "no answer to a request whose body stops short");
    eventually("the unfinished request upstream", || !p.upstream.unframed().is_empty());
    let (unfinished, bytes, _) = p.upstream.unframed().remove(0);
    assert!(bytes.contains("Content-Length: 10"), "{bytes:?}");
    eventually("that connection closed", || p.upstream.unframed().iter().all(|(_, _, closed)| *closed));

    let mut c = Conn::open(p.port);
    c.send_raw(&post("Content-Length: 5\r\n", b"hello"));
    assert_eq!(c.response().expect("an answer").status, 200);
    let last = p.upstream.requests().last().unwrap().conn;
    assert_ne!(last, unfinished, "the next request went on a fresh connection");
    assert!(!p.app.engine.upstream().breaker().is_open());
}
