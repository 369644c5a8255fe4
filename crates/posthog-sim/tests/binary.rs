//! The `posthog-sim` binary serves the simulator on the address it is given.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Kills the child when the test ends, even on a failed assertion.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serves_insights_and_the_control_api_on_the_given_address() {
    let port = posthog_sim::serve::free_port();
    let mut child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_posthog-sim"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--calc-delay-ms", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The banner is printed before the server starts; then the port opens (bounded wait).
    let mut banner = String::new();
    BufReader::new(child.0.stdout.take().unwrap()).read_line(&mut banner).unwrap();
    assert!(banner.contains(&format!("http://127.0.0.1:{port}")), "{banner}");
    let mut conn = (0..500)
        .find_map(|_| {
            TcpStream::connect(("127.0.0.1", port)).ok().or_else(|| {
                std::thread::sleep(Duration::from_millis(10));
                None
            })
        })
        .expect("the simulator listens");
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    conn.write_all(
        b"GET /api/projects/1/insights/1/?refresh=blocking HTTP/1.1\r\nHost: x\r\n\
          Authorization: Bearer phx_demo_all\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"is_cached\":false"), "{answer}");
}

#[test]
fn a_busy_address_is_refused_at_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_posthog-sim")).args(["--listen", &addr]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen"), "{out:?}");
}
