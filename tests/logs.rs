//! No credential ever reaches the logs, at any level: the real binary at RUST_LOG=trace, in front of
//! a raw upstream and in front of its built-in simulated backend.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use posthog_sim::serve::free_port;

const BEARER: &str = "phx_secret_canary_123";
const API_KEY: &str = "phx_secret_canary_456";
const SESSION: &str = "canary789";

/// Runs the binary (`upstream`: `--upstream`, else its simulated backend) at RUST_LOG=trace, sends
/// requests carrying the three canaries through every path, and returns everything it printed.
fn output_with_canaries(upstream: Option<&str>) -> String {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("ipx-log-canaries-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_insights-proxy"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--admin-listen", "off"]);
    if let Some(u) = upstream {
        cmd.args(["--upstream", u]);
    }
    let child = ChildGuard(
        cmd.env("RUST_LOG", "trace")
            .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(&err).unwrap()))
            .spawn()
            .unwrap(),
    );
    wait_for_port(port);
    let bearer = format!("Bearer {BEARER}");
    let cookie = format!("sessionid={SESSION}");
    let headers = [("Authorization", bearer.as_str()), ("Cookie", cookie.as_str())];
    let key = format!("personal_api_key={API_KEY}");
    let key_body = format!(r#"{{"personal_api_key":"{API_KEY}"}}"#);
    let insight = "/api/environments/1/insights/5/";
    // Pass-through, the fast path, pingora's path (a GET with a body), a write.
    http(port, "GET", &format!("/api/projects/?{key}"), &headers, None);
    http(port, "GET", &format!("{insight}?{key}&refresh=blocking"), &headers, None);
    http(port, "GET", insight, &headers, Some(&key_body));
    http(port, "PATCH", &format!("{insight}?{key}"), &headers, Some(&key_body));
    // Refused at the door, and refused by pingora's parser (whose error carries the raw head).
    let refused =
        format!("GET /api/projects/?{key} HTTP/1.1\r\nHost: a\r\nAuthorization: {bearer}\r\nCookie: {cookie}\r\n");
    for extra in ["Content-Length: 0, 0\r\n", "X-Nul: a\0b\r\n"] {
        let mut c = Conn::open(port);
        c.send_raw(format!("{refused}{extra}\r\n").as_bytes());
        let r = c.response().expect("an answer");
        assert_eq!(r.status, 400);
    }
    // The access log line of the last request the proxy handled itself is written after its answer.
    let written = || std::fs::read_to_string(&out).unwrap_or_default();
    eventually("the access log lines", || written().matches(" request ").count() >= 5);
    std::thread::sleep(Duration::from_millis(200));
    drop(child);
    let text = format!("{}{}", written(), std::fs::read_to_string(&err).unwrap_or_default());
    let _ = std::fs::remove_dir_all(&dir);
    text
}

fn assert_no_canary(text: &str) {
    // Trace logging was on: pingora's own debug lines are there (just not the ones with heads).
    assert!(text.contains("DEBUG") || text.contains("TRACE"), "no debug logging at all:\n{text}");
    for canary in [BEARER, API_KEY, SESSION] {
        let line = text.lines().find(|l| l.contains(canary));
        assert!(line.is_none(), "{canary} in the logs: {}", line.unwrap_or_default());
    }
}

#[test]
fn no_credential_in_trace_logs_in_front_of_an_upstream() {
    let upstream = Capture::start();
    let text = output_with_canaries(Some(&format!("http://127.0.0.1:{}", upstream.port)));
    assert!(!upstream.requests().is_empty(), "requests reached the upstream");
    assert!(String::from_utf8_lossy(&upstream.bytes()).contains(BEARER), "the credential went upstream");
    assert_no_canary(&text);
}

#[test]
fn no_credential_in_trace_logs_in_front_of_the_simulated_backend() {
    assert_no_canary(&output_with_canaries(None));
}
