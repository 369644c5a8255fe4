//! Metrics after a scripted workload, purge then a miss, inspection, health and
//! readiness, and JSON request logs without credentials.

mod common;

use common::*;

#[test]
fn metrics_move_with_the_workload() {
    let h = Harness::start();
    let (id, url) = h.day_insight();
    let series = |cache: &str, mode: &str| {
        format!("insights_proxy_requests_total{{cache=\"{cache}\",mode=\"{mode}\",route=\"insight\"}}")
    };
    assert_eq!(h.metric(&series("hit", "blocking")), 0.0);
    h.get(&format!("{url}?refresh=blocking"), ALL); // miss → 1 calculation
    h.get(&format!("{url}?refresh=blocking"), ALL); // hit
    h.get(&format!("{url}?refresh=blocking"), ALL); // hit
    h.get(&format!("{url}?refresh=force_blocking"), ALL); // forced calculation
    h.get("/api/projects/", ALL); // pass-through
    assert_eq!(h.calcs(1, id), 2);
    // The log line and its counters are written after the response: wait for them.
    eventually("request counters", || h.metric(&series("hit", "blocking")) == 2.0);
    assert_eq!(h.metric(&series("miss", "blocking")), 1.0);
    assert_eq!(h.metric(&series("forced", "force_blocking")), 1.0);
    assert_eq!(h.metric("insights_proxy_upstream_calculations_total{reason=\"miss\"}"), 1.0);
    assert_eq!(h.metric("insights_proxy_upstream_calculations_total{reason=\"forced\"}"), 1.0);
    assert!(h.metric("insights_proxy_request_duration_seconds_count{route=\"insight\"}") >= 4.0);
    assert!(h.metric("insights_proxy_cache_entries") >= 1.0);
    assert!(h.metric("insights_proxy_cache_bytes") > 1000.0);
    assert_eq!(h.metric("insights_proxy_upstream_circuit_open"), 0.0);
    // Async work shows up as a background calculation and a status record.
    let other = h.project1_insights().iter().filter_map(|i| i["id"].as_u64()).find(|i| *i != id).unwrap();
    let r = h.get(&format!("/api/environments/1/insights/{other}/?refresh=async"), ALL).json();
    let qid = r["query_status"]["id"].as_str().unwrap().to_string();
    eventually("the background calculation", || h.get(&format!("/api/environments/1/query/{qid}/"), ALL).status == 200);
    assert_eq!(h.metric("insights_proxy_upstream_calculations_total{reason=\"background\"}"), 1.0);
    assert!(h.metric("insights_proxy_query_status_records") >= 1.0);
    assert_eq!(h.metric("insights_proxy_queue_depth"), 0.0);
    // Failures are counted by kind.
    h.sim.set_fault(posthog_sim::Fault::Status(500));
    h.get(&format!("{url}?refresh=force_blocking"), ALL);
    assert_eq!(h.metric("insights_proxy_upstream_errors_total{kind=\"status_5xx\"}"), 1.0);
}

#[test]
fn purge_then_a_miss_and_inspection_without_bodies() {
    let h = Harness::start();
    let (id, url) = h.day_insight();
    h.get(&format!("{url}?refresh=blocking"), ALL);
    h.get(&format!("{url}?refresh=blocking"), P1);
    assert!(h.get(&format!("{url}?refresh=blocking"), ALL).cache_status().contains("; hit"));

    let entries = h.admin("GET", &format!("/admin/entries?project=1&insight={id}"), true);
    assert_eq!(entries.status, 200, "{}", entries.text());
    let v = entries.json();
    let list = v["entries"].as_array().unwrap();
    assert_eq!(list.len(), 2, "one entry per credential: {v}");
    assert!(list.iter().all(|e| e["stale"] == false && e["age_seconds"].as_i64().unwrap() >= 0));
    assert!(!entries.text().contains("\"result\"") && !entries.text().contains("phx_demo"), "metadata only");

    assert_eq!(h.admin("POST", &format!("/admin/purge?project=1&insight={id}"), false).status, 401);
    let purged = h.admin("POST", &format!("/admin/purge?project=1&insight={id}"), true);
    assert_eq!(purged.status, 200, "{}", purged.text());
    let after = h.get(&format!("{url}?refresh=force_cache"), ALL);
    assert!(!after.cache_status().contains("; hit"), "{}", after.cache_status());
    assert_eq!(
        h.admin("GET", &format!("/admin/entries?project=1&insight={id}"), true).json()["entries"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A project purge drops everything of the project.
    h.get(&format!("{url}?refresh=blocking"), ALL);
    assert_eq!(h.admin("POST", "/admin/purge?project=1", true).status, 200);
    assert!(!h.get(&url, P1).cache_status().contains("; hit"));
    // Bad admin input.
    assert_eq!(h.admin("POST", "/admin/purge?project=abc", true).status, 400);
    assert_eq!(h.admin("GET", "/admin/nope", true).status, 404);
}

#[test]
fn admin_api_is_off_without_a_token() {
    let h = Harness::with(|c, _| c.admin_token = None);
    let r = h.admin("POST", "/admin/purge?project=1", false);
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["code"], "permission_denied");
    assert_eq!(h.admin("GET", "/healthz", false).status, 200);
    assert_eq!(h.admin("GET", "/metrics", false).status, 200);
}

#[test]
fn readiness_follows_the_upstream() {
    let mut h = Harness::start();
    assert_eq!(h.admin("GET", "/healthz", false).json()["status"], "ok");
    assert_eq!(h.admin("GET", "/readyz", false).status, 200);
    h.stop_backend();
    let r = h.admin("GET", "/readyz", false);
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["upstream"], "upstream unreachable");
    assert_eq!(h.admin("GET", "/healthz", false).status, 200, "alive even when not ready");
    h.start_backend_again();
    assert_eq!(h.admin("GET", "/readyz", false).status, 200);
}

#[test]
fn json_logs_carry_one_line_per_request_and_no_credential() {
    use std::io::{BufRead, BufReader};
    let port = posthog_sim::serve::free_port();
    let mut child = ChildGuard(
        std::process::Command::new(env!("CARGO_BIN_EXE_insights-proxy"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--admin-listen", "off", "--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_port(port);
    let secret = "phx_demo_all";
    let path = format!("/api/environments/1/insights/2/?refresh=blocking&personal_api_key={secret}");
    let r = http(port, "GET", &path, &[], None);
    assert_eq!(r.status, 200, "{}", r.text());
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let mut request_line = None;
    // Log lines are JSON; the banner (with its demo curl line) is not part of the log.
    for line in lines.by_ref().map_while(Result::ok).filter(|l| l.starts_with('{')) {
        assert!(!line.contains(secret), "a credential in the log: {line}");
        if line.contains("\"message\":\"request\"") {
            request_line = Some(line);
            break;
        }
    }
    drop(child);
    let line = request_line.expect("a request log line");
    assert!(!line.contains(secret), "a credential in the log: {line}");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["fields"]["route"], "insight");
    assert_eq!(v["fields"]["mode"], "blocking");
    assert_eq!(v["fields"]["status"], 200);
}

/// Runs the binary with JSON logs and `log_section` as its `[log]` config, sends `paths` one after
/// another with the demo credential, stops it with SIGTERM, and returns the request log lines it
/// wrote (all of them: the process has exited).
fn request_log_lines(log_section: &str, paths: &[&str]) -> Vec<serde_json::Value> {
    use std::io::Read;
    let port = posthog_sim::serve::free_port();
    let dir = std::env::temp_dir().join(format!("ipx-access-log-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!("[server]\ngrace_period_ms = 0\nshutdown_timeout_ms = 1000\n[log]\n{log_section}\n"),
    )
    .unwrap();
    let mut child = ChildGuard(
        std::process::Command::new(env!("CARGO_BIN_EXE_insights-proxy"))
            .args(["--config", config.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", "off", "--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdout = child.0.stdout.take().unwrap();
    // Read on a thread, so a process that never exits fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        let _ = tx.send(out);
    });
    wait_for_port(port);
    for path in paths {
        let r = http(port, "GET", path, &[("Authorization", "Bearer phx_demo_all")], None);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    let pid = child.0.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let out = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the proxy exits after SIGTERM");
    let _ = std::fs::remove_dir_all(&dir);
    out.lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "request")
        .collect()
}

#[test]
fn access_log_lines_per_setting() {
    let miss = "/api/environments/1/insights/2/?refresh=blocking";
    let hit = "/api/environments/1/insights/2/";
    let other = "/api/environments/1/insights/3/?refresh=blocking";
    let caches = |lines: &[serde_json::Value]| -> Vec<String> {
        lines.iter().map(|v| v["fields"]["cache"].as_str().unwrap_or("").to_string()).collect()
    };
    // The default: every request that was not answered from the cache, and no hit.
    let lines = request_log_lines("", &[miss, hit, hit, other]);
    assert_eq!(lines.len(), 2, "{:?}", caches(&lines));
    assert!(caches(&lines).iter().all(|c| c.contains("fwd=miss")), "{:?}", caches(&lines));
    // "all": one line per request, hits included.
    let lines = request_log_lines("access = \"all\"", &[miss, hit, hit, other]);
    assert_eq!(lines.len(), 4, "{:?}", caches(&lines));
    assert_eq!(caches(&lines).iter().filter(|c| c.contains("; hit")).count(), 2, "{:?}", caches(&lines));
    assert!(lines.iter().all(|v| v["fields"]["route"] == "insight" && v["fields"]["status"] == 200));
    // "none": no request lines at all.
    let lines = request_log_lines("access = \"none\"", &[miss, hit, other]);
    assert!(lines.is_empty(), "{:?}", caches(&lines));
}
