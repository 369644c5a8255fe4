//! Invariants under chaos: a mix of refresh modes from several clients while the clock moves
//! (entries go stale, refresh-ahead fires) and the upstream is killed and restarted.
//!
//! 1. Every piece of work the proxy accepted completes: each `query_status` it handed out is,
//!    shortly after the load stops, complete (200 / 400) or gone (404), never running for good.
//! 2. One calculation per stale window per upstream key, whatever mix of modes reads it, as a
//!    shared cache in front of the upstream (nginx's `proxy_cache_lock`, Varnish) does.
//!
//! Every loop is bounded in count and time, every thread is joined.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use insights_proxy::refresh::Thresholds;

/// Stale after a minute, lazily stale after two, upstream and proxy alike.
const FRESH: Duration = Duration::from_secs(60);
const LAZY: Duration = Duration::from_secs(120);
const READ_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

fn insight_url(id: u64) -> String {
    format!("/api/environments/1/insights/{id}/")
}

/// The variants of an insight the clients read: the insight itself and one with a filter the
/// simulator ignores, which the upstream therefore keys identically (one upstream cache key, two
/// entries in the proxy).
fn variant(id: u64, v: u64, refresh: &str) -> String {
    match v {
        0 => format!("{}?refresh={refresh}", insight_url(id)),
        n => format!("{}?refresh={refresh}&filters_override=%7B%22x%22%3A{n}%7D", insight_url(id)),
    }
}

/// Insights of project 1 whose results go stale (a relative date range), in id order.
fn relative_insights(h: &Harness) -> Vec<u64> {
    h.project1_insights()
        .iter()
        .filter(|i| i["query"]["source"]["dateRange"]["date_to"].is_null())
        .filter_map(|i| i["id"].as_u64())
        .collect()
}

fn harness(tweak: impl FnOnce(&mut insights_proxy::config::Config)) -> Harness {
    Harness::with(|c, sim| {
        c.thresholds = Thresholds::uniform(FRESH, LAZY);
        sim.thresholds = posthog_sim::Thresholds::uniform(FRESH, LAZY);
        c.read_timeout = READ_TIMEOUT;
        c.connect_timeout = CONNECT_TIMEOUT;
        c.breaker.failures = 3;
        c.breaker.cooldown = Duration::from_millis(200);
        c.breaker.max_cooldown = Duration::from_millis(800);
        sim.calc_delay = Duration::from_millis(40);
        tweak(c);
    })
}

/// The status id a response carries, if any.
fn status_id(r: &Resp) -> Option<String> {
    if r.status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
    v["query_status"]["id"].as_str().map(str::to_string)
}

/// What a poll of a status says: `Ok(true)` finished (complete, failed or gone), `Ok(false)`
/// still running, with the last answer for the report.
fn poll(h: &Harness, id: &str) -> (bool, String) {
    let r = h.get(&format!("/api/environments/1/query/{id}/"), ALL);
    let done = match r.status {
        200 | 400 => r.json()["query_status"]["complete"] == true,
        404 => true,
        _ => false,
    };
    (done, format!("{} {}", r.status, r.text()))
}

#[test]
fn every_status_handed_out_completes_or_is_gone_after_chaos() {
    const CLIENTS: u64 = 4;
    const REQUESTS_PER_CLIENT: u64 = 400;
    const VARIANTS: u64 = 5;
    const MODES: [&str; 5] = ["async", "lazy_async", "force_async", "async_except_on_cache_miss", "blocking"];
    let mut h = harness(|c| {
        // One slot: background work queues up behind blocking clients and refresh-ahead waits,
        // so clients keep joining queued work.
        c.budget.project_concurrency = 1;
        c.workers = 2;
    });
    let insights: Vec<u64> = relative_insights(&h).into_iter().take(8).collect();
    assert_eq!(insights.len(), 8);
    for &id in &insights {
        for v in 0..VARIANTS {
            // Calculated, then read: hot enough for refresh-ahead.
            for _ in 0..3 {
                assert_eq!(h.get(&variant(id, v, "blocking"), ALL).status, 200);
            }
        }
    }
    let ids = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let port = h.proxy_port;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let (ids, stop, sent, insights) = (ids.clone(), stop.clone(), sent.clone(), insights.clone());
            std::thread::spawn(move || {
                let auth = [("Authorization", "Bearer phx_demo_all")];
                let mut mine: Vec<String> = Vec::new();
                for i in 0..REQUESTS_PER_CLIENT {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let n = i * CLIENTS + t;
                    let id = insights[(n % insights.len() as u64) as usize];
                    let mode = MODES[((n / 3) % MODES.len() as u64) as usize];
                    let r = http(port, "GET", &variant(id, (n / 7) % VARIANTS, mode), &auth, None);
                    sent.fetch_add(1, Ordering::SeqCst);
                    if let Some(qs) = status_id(&r) {
                        mine.push(qs.clone());
                        ids.lock().unwrap().insert(qs);
                    }
                    // Now and then a poll of a status this client was given.
                    if i % 5 == 0 {
                        if let Some(qs) = mine.get(i as usize % mine.len().max(1)) {
                            http(port, "GET", &format!("/api/environments/1/query/{qs}/"), &auth, None);
                        }
                    }
                }
            })
        })
        .collect();
    // The clock moves on in steps of 7 s: entries enter their refresh-ahead window (90–95 % of a
    // minute), then go stale; meanwhile the upstream goes away for a while and comes back.
    let total = CLIENTS * REQUESTS_PER_CLIENT;
    let at = |fraction: u64| {
        let sent = sent.clone();
        move || sent.load(Ordering::SeqCst) >= total * fraction / 100
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut step = 0u64;
    let mut stopped = false;
    let mut restarted = false;
    while sent.load(Ordering::SeqCst) < total && Instant::now() < deadline {
        if clients.iter().all(|c| c.is_finished()) {
            break;
        }
        step += 1;
        h.clock.advance(Duration::from_secs(7));
        if !stopped && at(25)() {
            h.stop_backend();
            stopped = true;
        }
        if stopped && !restarted && at(50)() {
            h.start_backend_again();
            restarted = true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("a client thread panicked");
    }
    if !restarted {
        if !stopped {
            h.stop_backend();
        }
        h.start_backend_again();
    }
    let load_stopped = Instant::now();
    let ids: Vec<String> = ids.lock().unwrap().iter().cloned().collect();
    eprintln!(
        "{} requests, {step} clock steps of 7 s, {} distinct statuses handed out, {} calculations",
        sent.load(Ordering::SeqCst),
        ids.len(),
        h.sim.total_calculations()
    );
    assert!(!ids.is_empty(), "the mix hands out statuses");
    // Everything accepted completes within the upstream's time (the read timeout) once the load
    // stops; the slack covers queued work running one at a time on a loaded machine.
    let limit = CONNECT_TIMEOUT + READ_TIMEOUT + Duration::from_secs(8);
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let mut pending = ids.clone();
    while !pending.is_empty() && load_stopped.elapsed() < limit {
        pending.retain(|id| {
            let (done, answer) = poll(&h, id);
            last.insert(id.clone(), answer);
            !done
        });
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!("statuses settled {:?} after the load stopped", load_stopped.elapsed());
    let stuck: Vec<String> = pending.iter().map(|id| format!("{id}: {}", last[id])).collect();
    assert!(
        stuck.is_empty(),
        "{} of {} statuses still running {:?} after the load stopped (queue depth {}, busy workers {}):\n{}",
        stuck.len(),
        ids.len(),
        load_stopped.elapsed(),
        h.app.engine.queued(),
        h.app.metrics.busy_workers.get(),
        stuck.join("\n")
    );
}

/// No background work queued or running, and no calculation in flight.
fn idle(h: &Harness) -> bool {
    h.app.engine.is_idle() && h.app.metrics.busy_workers.get() == 0
}

#[test]
fn each_upstream_key_is_calculated_once_per_stale_window_whatever_the_mix_of_modes() {
    const READERS: u64 = 16;
    const HERD: u64 = 200;
    const MODES: [&str; 5] = ["async", "lazy_async", "async_except_on_cache_miss", "blocking", "force_cache"];
    let h = harness(|_| {});
    let insights = relative_insights(&h);
    let (keys, hot, cold) = (insights[..3].to_vec(), insights[3], insights[4]);
    // t=0: every key primed with `refresh=async` (its variant then reads the upstream's cache).
    for &id in keys.iter().chain([&hot]) {
        for v in 0..2 {
            let r = h.get(&variant(id, v, "async"), ALL);
            assert_eq!(r.status, 200, "{}", r.text());
            eventually("the primed result lands", || {
                !h.get(&variant(id, v, "force_cache"), ALL).json()["result"].is_null() && idle(&h)
            });
        }
        assert_eq!(h.calcs(1, id), 1, "one upstream key for both variants of {id}");
    }
    let port = h.proxy_port;
    let mut report = Vec::new();
    for (window, mode) in MODES.iter().enumerate() {
        let before: Vec<u64> = keys.iter().map(|&id| h.calcs(1, id)).collect();
        // Meanwhile the project is busy: a loop of hits on one insight, a herd of cold blocking
        // requests (each a calculation upstream) on another.
        let busy = Arc::new(AtomicBool::new(true));
        let hammer: Vec<_> = (0..4u64)
            .map(|t| {
                let busy = busy.clone();
                std::thread::spawn(move || {
                    let auth = [("Authorization", "Bearer phx_demo_all")];
                    let mut i = 0u64;
                    while busy.load(Ordering::SeqCst) && i < 2000 {
                        let path = if t == 0 {
                            variant(hot, i % 2, "blocking")
                        } else if i < HERD / 3 {
                            let n = (window as u64 * HERD + t * HERD / 3 + i) % 1_000_000;
                            format!("{}?refresh=blocking&variables_override=%7B%22x%22%3A{n}%7D", insight_url(cold))
                        } else {
                            break;
                        };
                        http(port, "GET", &path, &auth, None);
                        i += 1;
                    }
                })
            })
            .collect();
        // Right after the stale threshold: 16 clients read every key for ~1.5 s, half of them
        // in this window's mode, the others in every mode in turn.
        h.clock.advance(FRESH + Duration::from_secs(1));
        let readers: Vec<_> = (0..READERS)
            .map(|r| {
                let keys = keys.clone();
                let mode = *mode;
                std::thread::spawn(move || {
                    let auth = [("Authorization", "Bearer phx_demo_all")];
                    let until = Instant::now() + Duration::from_millis(1500);
                    let mut i = 0u64;
                    while Instant::now() < until && i < 500 {
                        let m = if r % 2 == 0 { mode } else { MODES[((r / 2 + i) % MODES.len() as u64) as usize] };
                        let id = keys[((r + i) % keys.len() as u64) as usize];
                        let resp = http(port, "GET", &variant(id, (r + i / 3) % 2, m), &auth, None);
                        assert_eq!(resp.status, 200, "{m}: {}", resp.text());
                        i += 1;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    i
                })
            })
            .collect();
        let reads: u64 = readers.into_iter().map(|r| r.join().expect("a reader panicked")).sum();
        busy.store(false, Ordering::SeqCst);
        for t in hammer {
            t.join().expect("a hammer thread panicked");
        }
        eventually("nothing is pending", || idle(&h));
        let per_key: Vec<u64> = keys.iter().zip(&before).map(|(&id, b)| h.calcs(1, id) - b).collect();
        eprintln!("window {window} ({mode} mix): {reads} reads, calculations per key {per_key:?}");
        report.push((*mode, per_key));
    }
    let wrong: Vec<_> = report.iter().filter(|(_, per_key)| per_key.iter().any(|&n| n != 1)).collect();
    assert!(wrong.is_empty(), "each upstream key once per stale window, but: {wrong:?}");
}
