//! Pass-through of every endpoint of the insights API, the 502 shape when the upstream is
//! down, and configuration errors from the real binary.

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};

const AUTH: (&str, &str) = ("Authorization", "Bearer phx_demo_all");

#[test]
fn every_endpoint_passes_through() {
    let h = Harness::start();
    // Create → 201.
    let created = h.request("POST", "/api/environments/1/insights/", &[AUTH], Some(r#"{"name":"From the proxy test","query":{"kind":"InsightVizNode","source":{"kind":"TrendsQuery","interval":"day","dateRange":{"date_from":"-7d"},"series":[{"kind":"EventsNode","event":"$pageview"}]}}}"#));
    assert_eq!(created.status, 201, "{}", created.text());
    let id = created.json()["id"].as_u64().unwrap();
    assert!(created.json()["result"].is_null());
    let url = format!("/api/environments/1/insights/{id}/");

    // Retrieve, through the proxy, equals the upstream's body.
    let via = h.get(&url, ALL);
    assert_eq!(via.status, 200);
    assert_eq!(via.json()["name"], "From the proxy test");
    assert!(via.header("content-type").unwrap().starts_with("application/json"));

    // PATCH, soft delete → 404, restore.
    let p = h.request("PATCH", &url, &[AUTH], Some(r#"{"description":"patched"}"#));
    assert_eq!((p.status, p.json()["description"].clone()), (200, json!("patched")));
    assert_eq!(h.request("PATCH", &url, &[AUTH], Some(r#"{"deleted":true}"#)).status, 200);
    assert_eq!(h.get(&url, ALL).status, 404);
    assert_eq!(h.request("PATCH", &url, &[AUTH], Some(r#"{"deleted":false}"#)).status, 200);
    assert_eq!(h.get(&url, ALL).status, 200);

    // DELETE → 405.
    assert_eq!(h.request("DELETE", &url, &[AUTH], None).status, 405);

    // Sharing, activity, viewed, activity list.
    let sharing = h.get(&format!("{url}sharing/"), ALL);
    assert_eq!(sharing.status, 200);
    assert!(sharing.json().get("enabled").is_some());
    assert_eq!(h.get(&format!("{url}activity/"), ALL).status, 200);
    assert_eq!(h.request("POST", &format!("{url}viewed/"), &[AUTH], Some("{}")).status, 200);
    assert_eq!(h.get("/api/environments/1/insights/activity/", ALL).status, 200);

    // The /api/projects/ alias, and the project list.
    assert_eq!(h.get(&format!("/api/projects/1/insights/{id}/"), ALL).status, 200);
    let projects = h.get("/api/projects/", ALL);
    assert_eq!(projects.status, 200);
    assert!(projects.json()["results"].as_array().is_some_and(|r| !r.is_empty()));

    // basic=true lists pass through; next/previous, which the upstream builds from its own host,
    // lead back through the proxy.
    let basic = h.get("/api/environments/1/insights/?basic=true&limit=2", ALL);
    assert_eq!(basic.status, 200);
    let next = basic.json()["next"].as_str().expect("a second page").to_string();
    assert!(next.starts_with(&format!("http://127.0.0.1:{}/api/", h.proxy_port)), "{next}");
    assert_eq!(h.get(next.split_once(&format!("{}", h.proxy_port)).unwrap().1, ALL).status, 200);
}

#[test]
fn headers_and_status_are_preserved() {
    let h = Harness::start();
    // Upstream errors come through as they are, in PostHog's shape.
    let unauth = h.request("GET", "/api/environments/1/insights/activity/", &[], None);
    assert_eq!(unauth.status, 401);
    assert_eq!(unauth.json()["type"], "authentication_error");
    let missing = h.get("/api/environments/1/insights/999999/", ALL);
    assert_eq!(missing.status, 404);
    // Hop-by-hop headers are not forwarded; the request still works.
    let r =
        h.request("GET", "/api/projects/", &[AUTH, ("Connection", "close, X-Secret-Hop"), ("X-Secret-Hop", "1")], None);
    assert_eq!(r.status, 200);
}

#[test]
fn upstream_down_gives_posthog_shaped_502() {
    let mut h = Harness::start();
    h.stop_backend();
    for path in ["/api/projects/", "/api/environments/1/insights/1/?refresh=blocking", "/anything/else"] {
        let r = h.get(path, ALL);
        assert_eq!(r.status, 502, "{path}: {}", r.text());
        let v: Value = r.json();
        assert_eq!(v["type"], "server_error", "{v}");
        assert!(v.get("code").is_some() && v.get("detail").is_some() && v.get("attr").is_some());
        let text = r.text();
        assert!(!text.contains("127.0.0.1") && !text.to_lowercase().contains("pingora"), "{text}");
    }
    h.start_backend_again();
    assert_eq!(h.get("/api/projects/", ALL).status, 200);
}

#[test]
fn bad_input_is_refused_in_posthogs_shape() {
    let h = Harness::start();
    for path in [
        "/api/environments/1/insights/99999999999999999999999/",
        "/api/environments/1/insights/../../x",
        "/api/environments/1/insights/1/?refresh=%zz",
        "/api/environments/1/insights/1/?x=%ff",
    ] {
        let r = h.get(path, ALL);
        assert!(r.status == 400 || r.status == 404, "{path}: {}", r.status);
        let v = r.json();
        assert!(v.get("type").is_some() && v.get("code").is_some(), "{path}: {v}");
    }
    let big = "x".repeat(2 * 1024 * 1024);
    let r = h.request("POST", "/api/environments/1/insights/", &[AUTH], Some(&big));
    assert_eq!(r.status, 413);
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_insights-proxy"))
}

#[test]
fn config_errors_are_all_reported() {
    let dir = std::env::temp_dir().join(format!("ipx-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[server]\nlisten = \"nowhere\"\nthreads = 0\n[upstream]\nurl = \"ftp://x\"\n").unwrap();
    let out = bin().args(["--check-config", "--config"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for key in ["server.listen", "server.threads", "upstream.url"] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
    let unknown = dir.join("unknown.toml");
    std::fs::write(&unknown, "[server]\nlistn = \"x\"\n").unwrap();
    let out = bin().args(["--check-config", "--config"]).arg(&unknown).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listn"));

    let good = bin()
        .args(["--check-config", "--config", concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml")])
        .output()
        .unwrap();
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
    // Flags override the file.
    let out = bin().args(["--check-config", "--listen", "bogus"]).output().unwrap();
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_binary_starts_the_simulated_backend_and_prints_a_working_curl() {
    use std::io::{BufRead, BufReader};
    let port = posthog_sim::serve::free_port();
    let mut child = ChildGuard(
        bin()
            .args(["--listen", &format!("127.0.0.1:{port}"), "--admin-listen", "off"])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    while let Some(Ok(l)) = lines.next() {
        printed.push_str(&l);
        printed.push('\n');
        if l.contains("curl") {
            break;
        }
    }
    assert!(printed.contains("simulated"), "{printed}");
    wait_for_port(port);
    let r = http(
        port,
        "GET",
        "/api/environments/1/insights/1/?refresh=blocking",
        &[("Authorization", "Bearer phx_demo_all")],
        None,
    );
    drop(child);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!r.json()["result"].is_null());
}

/// A new instance started with `--upgrade` takes the listening socket over from one sent SIGQUIT
/// (pingora's zero-downtime upgrade, through the proxy's own accept loop): the port answers before
/// and after, and once the old instance has exited, the new one answers on it.
#[test]
fn a_zero_downtime_upgrade_hands_the_port_over() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let h = Harness::start();
    let port = posthog_sim::serve::free_port();
    let (listen, upstream) = (format!("127.0.0.1:{port}"), format!("http://127.0.0.1:{}", h.sim_port));
    let start = |upgrade: bool| {
        let mut c = bin();
        c.args(["--listen", &listen, "--upstream", &upstream, "--admin-listen", "off"]);
        c.env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::null());
        if upgrade {
            c.arg("--upgrade");
        }
        ChildGuard(c.spawn().unwrap())
    };
    let insight = "/api/environments/1/insights/1/?refresh=blocking";
    let answered = || http(port, "GET", insight, &[("Authorization", "Bearer phx_demo_all")], None).status;
    let mut old = start(false);
    wait_for_port(port);
    assert_eq!(answered(), 200);

    // pingora's default hand-over socket: the new instance binds it and waits there.
    let handover = std::path::Path::new("/tmp/pingora_upgrade.sock");
    let _ = std::fs::remove_file(handover);
    let mut new = start(true);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !handover.exists() {
        assert!(Instant::now() < deadline, "the new instance never waited for the sockets");
        assert!(new.0.try_wait().unwrap().is_none(), "the new instance exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The shell's own `kill`: no procps needed.
    let quit = Command::new("sh").args(["-c", &format!("kill -QUIT {}", old.0.id())]).status().unwrap();
    assert!(quit.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while old.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the old instance did not exit after handing over");
        assert_eq!(answered(), 200, "the port stopped answering during the hand-over");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(new.0.try_wait().unwrap().is_none(), "the new instance exited");
    for _ in 0..3 {
        assert_eq!(answered(), 200);
    }
}
