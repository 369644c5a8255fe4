//! The monitoring kit in `deploy/` checked against the real tools: promtool runs the alert rules'
//! own checks and unit tests, and a real Prometheus scrapes the built proxy (demo mode, in front
//! of its simulator, with the shared tier on a real redis-server) under a short scripted load,
//! then answers every PromQL expression of the Grafana dashboard and evaluates every alert rule.
//!
//! Without `promtool`/`prometheus` these tests skip with a message, except in CI (`CI=true`),
//! where they fail: scripts/setup.sh installs Debian's `prometheus` package.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{http, wait_for_port, within, ChildGuard, Resp, ALL};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use posthog_sim::serve::free_port;
use serde_json::Value;

const RULES: &str = "deploy/prometheus/rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/rules.test.yml";
const DASHBOARD: &str = "deploy/grafana/insights-proxy.json";
const RUNBOOKS: &str = "docs/operations.md";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Whether `tools` are installed. Missing ones skip the test outside CI and fail it in CI.
fn installed(tools: &[&str]) -> bool {
    let missing: Vec<_> = tools.iter().filter(|t| !on_path(t)).collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{missing:?} not installed: CI must run the monitoring checks (scripts/setup.sh installs Debian's prometheus)"
    );
    eprintln!("SKIPPED: {missing:?} not installed (scripts/setup.sh installs Debian's prometheus package; CI=true fails instead)");
    false
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    if !installed(&["promtool"]) {
        return;
    }
    let dir = repo("deploy/prometheus");
    let checked = run(Command::new("promtool").args(["check", "rules", "rules.yml"]).current_dir(&dir));
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = run(Command::new("promtool").args(["test", "rules", "rules.test.yml"]).current_dir(&dir));
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let d = std::env::temp_dir().join(format!("ipx-monitoring-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> ChildGuard {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    ChildGuard(cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}")))
}

/// The proxy, its simulator, Redis and Prometheus, each on its own loopback port, stopped when
/// dropped (fields drop in order: Prometheus first).
struct Stack {
    _prometheus: ChildGuard,
    _proxy: ChildGuard,
    _redis: ChildGuard,
    dir: TempDir,
    proxy_port: u16,
    admin_port: u16,
    sim_port: u16,
    prom_port: u16,
}

impl Stack {
    fn start() -> Stack {
        let dir = TempDir::new();
        let d = &dir.0;
        let (proxy_port, admin_port, sim_port, redis_port, prom_port) =
            (free_port(), free_port(), free_port(), free_port(), free_port());
        let redis = spawn(
            Command::new("redis-server").args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"]).args([
                "--save",
                "",
                "--appendonly",
                "no",
            ]),
            &d.join("redis.log"),
        );
        wait_for_port(redis_port);
        // Small limits so a short load reaches them: a 1 MiB cache evicts, one calculation slot
        // per project makes a burst wait, two failures open the breaker.
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:{proxy_port}"
grace_period_ms = 0
[cache]
max_bytes = 1048576
partition_secret = "monitoring-test-partition-secret"
[budget]
project_concurrency = 1
per_minute = 0
per_hour = 0
[security]
breaker_failures = 2
breaker_cooldown_ms = 200
breaker_max_cooldown_ms = 400
[l2]
url = "redis://127.0.0.1:{redis_port}/0"
[admin]
listen = "127.0.0.1:{admin_port}"
[simulator]
listen = "127.0.0.1:{sim_port}"
calc_delay_ms = 5
"#
        );
        std::fs::write(d.join("proxy.toml"), config).unwrap();
        let proxy = spawn(
            Command::new(env!("CARGO_BIN_EXE_insights-proxy")).arg("--config").arg(d.join("proxy.toml")),
            &d.join("proxy.log"),
        );
        for port in [sim_port, proxy_port, admin_port] {
            wait_for_port(port);
        }
        let prom_config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - \
             job_name: insights-proxy\n    static_configs:\n      - targets: ['127.0.0.1:{admin_port}']\n",
            repo(RULES).display()
        );
        std::fs::write(d.join("prometheus.yml"), prom_config).unwrap();
        let prometheus = spawn(
            Command::new("prometheus")
                .arg(format!("--config.file={}", d.join("prometheus.yml").display()))
                .arg(format!("--storage.tsdb.path={}", d.join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{prom_port}")),
            &d.join("prometheus.log"),
        );
        wait_for_port(prom_port);
        let stack = Stack {
            _prometheus: prometheus,
            _proxy: proxy,
            _redis: redis,
            dir,
            proxy_port,
            admin_port,
            sim_port,
            prom_port,
        };
        // Its API answers 503 until the storage is open.
        let ready = within(Duration::from_secs(60), || http(prom_port, "GET", "/-/ready", &[], None).status == 200);
        assert!(ready, "Prometheus never became ready\n{}", stack.logs());
        stack
    }

    fn get(&self, path: &str, token: &str) -> Resp {
        http(self.proxy_port, "GET", path, &[("Authorization", &format!("Bearer {token}"))], None)
    }

    fn metrics(&self) -> String {
        http(self.admin_port, "GET", "/metrics", &[], None).text()
    }

    /// The Prometheus HTTP API's `data` for `path` (a status other than success fails the test).
    fn api(&self, path: &str) -> Value {
        let r = http(self.prom_port, "GET", path, &[], None);
        let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|_| panic!("{path}: {}", r.text()));
        assert_eq!(v["status"], "success", "{path}: {v}");
        v["data"].clone()
    }

    fn query(&self, promql: &str) -> Vec<Value> {
        let data = self.api(&format!("/api/v1/query?query={}", utf8_percent_encode(promql, NON_ALPHANUMERIC)));
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// What the processes wrote, for a failure message.
    fn logs(&self) -> String {
        ["proxy.log", "prometheus.log"]
            .iter()
            .map(|f| format!("--- {f}\n{}", std::fs::read_to_string(self.dir.0.join(f)).unwrap_or_default()))
            .collect()
    }
}

/// A dashboard's load, bounded in count: hits, misses, list pages, several refresh modes, an
/// async calculation polled to completion, a burst that waits for budget, a refused credential,
/// enough variants to evict for size, and an upstream failing until the breaker opens.
fn scripted_load(s: &Stack) {
    let insight = |id: u64, query: &str| format!("/api/environments/1/insights/{id}/?{query}");
    assert_eq!(s.get("/api/environments/1/insights/?limit=10", ALL).status, 200);
    for id in 1..=6 {
        assert_eq!(s.get(&insight(id, "refresh=blocking"), ALL).status, 200);
        for _ in 0..3 {
            assert_eq!(s.get(&insight(id, ""), ALL).status, 200);
        }
    }
    for mode in ["force_cache", "lazy_async", "async_except_on_cache_miss", "force_blocking"] {
        s.get(&insight(13, &format!("refresh={mode}")), ALL);
    }
    let started = s.get(&insight(7, "refresh=async"), ALL).json();
    let id = started["query_status"]["id"].as_str().expect("an async miss answers with a query_status").to_string();
    common::eventually("the async calculation completes", || {
        s.get(&format!("/api/environments/1/query/{id}/"), ALL).status == 200
    });
    // One slot per project: three concurrent misses wait for one another.
    std::thread::scope(|scope| {
        for id in 8..=10 {
            scope.spawn(move || assert_eq!(s.get(&insight(id, "refresh=blocking"), ALL).status, 200));
        }
    });
    for _ in 0..2 {
        assert_eq!(s.get(&insight(1, ""), "phx_not_a_key").status, 401);
    }
    // Each unknown parameter is its own cache key: ~6 KB variants until the 1 MiB cache evicts.
    let mut variants = 0;
    while !s.metrics().contains("insights_proxy_cache_evictions_total{cause=\"size\"}") {
        assert!(variants < 600, "no size eviction after {variants} variants");
        for _ in 0..20 {
            assert_eq!(s.get(&insight(11, &format!("refresh=blocking&variant={variants}")), ALL).status, 200);
            variants += 1;
        }
    }
    let fault = |q: &str| assert_eq!(http(s.sim_port, "POST", &format!("/_sim/fault?{q}"), &[], None).status, 200);
    fault("kind=status&status=500");
    for _ in 0..3 {
        s.get(&insight(2, "refresh=force_blocking"), ALL);
    }
    assert!(s.metrics().contains("insights_proxy_upstream_circuit_open 1"), "the breaker opened");
    fault("kind=none");
    common::eventually("the breaker closes once the upstream answers", || {
        s.get(&insight(3, "refresh=force_blocking"), ALL);
        s.metrics().contains("insights_proxy_upstream_circuit_open 0")
    });
}

/// `expr` with Grafana's variables replaced as a dashboard would send it: time globals by a
/// window that holds several 1 s scrapes, template variables by their "All" value.
fn substitute(expr: &str, template_vars: &BTreeSet<String>) -> String {
    let mut e = expr.to_string();
    for (var, value) in [("$__rate_interval", "30s"), ("$__interval", "5s"), ("$__range", "5m")] {
        e = e.replace(var, value);
    }
    for var in template_vars {
        for form in [format!("${{{var}}}"), format!("${var}")] {
            assert!(
                !e.contains(&format!("=\"{form}\"")),
                "{expr}: ${var} must be matched with =~ (its All value is a regex)"
            );
            e = e.replace(&form, ".+");
        }
    }
    assert!(!e.contains('$'), "{expr}: a variable the checker does not know");
    e
}

/// Every panel's PromQL and every template variable's `label_values(metric, label)`, after
/// checking the dashboard imports with its datasource as the `DS_PROMETHEUS` input.
fn dashboard_queries(d: &Value) -> (Vec<String>, Vec<(String, String)>, BTreeSet<String>) {
    let ds = "${DS_PROMETHEUS}";
    assert!(d["__inputs"].as_array().unwrap().iter().any(|i| i["name"] == "DS_PROMETHEUS"), "DS_PROMETHEUS input");
    let mut panels: Vec<&Value> = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        panels.push(p);
        panels.extend(p["panels"].as_array().into_iter().flatten());
    }
    let ids: BTreeSet<_> = panels.iter().map(|p| p["id"].as_u64().expect("a panel id")).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    let mut exprs = Vec::new();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        let targets = targets.unwrap_or_else(|| panic!("panel {} has no query", p["title"]));
        assert_eq!(p["datasource"]["uid"], ds, "panel {}", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], ds, "panel {}", p["title"]);
            exprs.push(
                t["expr"].as_str().unwrap_or_else(|| panic!("panel {}: a target without expr", p["title"])).into(),
            );
        }
    }
    let mut names = BTreeSet::new();
    let mut label_values = Vec::new();
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        names.insert(v["name"].as_str().unwrap().to_string());
        assert_eq!(v["datasource"]["uid"], ds, "variable {}", v["name"]);
        let q = v["query"]["query"].as_str().or(v["query"].as_str()).unwrap_or_default();
        let args = q.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')'));
        let (metric, label) = args.and_then(|a| a.split_once(',')).unwrap_or_else(|| panic!("variable query {q}"));
        label_values.push((metric.trim().to_string(), label.trim().to_string()));
    }
    (exprs, label_values, names)
}

/// GitHub's anchor of a Markdown heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every alert rule loaded and evaluated without error, with a runbook section that exists and
/// unit tests that name it at least twice (a firing and a quiet evaluation).
fn check_alert_rules(s: &Stack) {
    let docs = std::fs::read_to_string(repo(RUNBOOKS)).unwrap();
    let anchors: BTreeSet<String> =
        docs.lines().filter_map(|l| l.strip_prefix("##")).map(|h| slug(h.trim_start_matches('#'))).collect();
    let tests = std::fs::read_to_string(repo(RULE_TESTS)).unwrap();
    let mut rules = Vec::new();
    common::eventually("every rule evaluated", || {
        rules = s.api("/api/v1/rules")["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        !rules.is_empty() && rules.iter().all(|r| r["health"] == "ok")
    });
    let alerts: Vec<_> = rules.iter().filter(|r| r["type"] == "alerting").collect();
    assert_eq!(alerts.len(), 7, "{alerts:?}");
    for a in alerts {
        let name = a["name"].as_str().unwrap();
        let runbook = a["annotations"]["runbook_url"].as_str().unwrap_or_default();
        let anchor = runbook.strip_prefix(&format!("{RUNBOOKS}#")).unwrap_or_else(|| panic!("{name}: {runbook}"));
        assert!(anchors.contains(anchor), "{name}: no section #{anchor} in {RUNBOOKS}");
        assert!(tests.matches(&format!("alertname: {name}\n")).count() >= 2, "{name}: firing and quiet cases");
    }
}

#[test]
fn every_dashboard_query_returns_series_from_prometheus_scraping_a_loaded_proxy() {
    if !installed(&["prometheus", "promtool"]) {
        return;
    }
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(repo(DASHBOARD)).unwrap()).unwrap();
    let (exprs, label_values, vars) = dashboard_queries(&dashboard);
    let s = Stack::start();
    let scraped = within(Duration::from_secs(60), || {
        s.api("/api/v1/targets")["activeTargets"].as_array().is_some_and(|t| t.iter().any(|t| t["health"] == "up"))
    });
    assert!(scraped, "Prometheus never scraped the proxy\n{}", s.logs());
    scripted_load(&s);
    let loaded = Instant::now();

    // A series appears once a scrape after the load saw it; wait for all, up to a deadline.
    let mut missing: Vec<String> = exprs.iter().map(|e| substitute(e, &vars)).collect();
    let mut missing_labels = label_values.clone();
    within(Duration::from_secs(60), || {
        missing.retain(|e| s.query(e).is_empty());
        missing_labels.retain(|(metric, label)| {
            let series = s.api(&format!("/api/v1/series?match[]={}", utf8_percent_encode(metric, NON_ALPHANUMERIC)));
            !series.as_array().is_some_and(|a| a.iter().any(|x| x.get(label).is_some()))
        });
        missing.is_empty() && missing_labels.is_empty()
    });
    assert!(
        missing.is_empty() && missing_labels.is_empty(),
        "{}s after the load, no series for:\n{}\n{missing_labels:?}\n{}",
        loaded.elapsed().as_secs(),
        missing.join("\n"),
        s.logs()
    );
    check_alert_rules(&s);
}
