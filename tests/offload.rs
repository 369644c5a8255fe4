//! The calculation budget (per-project concurrency by priority, per-key rates) and
//! refresh-ahead for hot insights.

mod common;

use std::time::Duration;

use common::*;
use insights_proxy::config::ForcedMinInterval;

fn project1_ids(h: &Harness) -> Vec<u64> {
    h.project1_insights().iter().filter_map(|i| i["id"].as_u64()).collect()
}

#[test]
fn a_burst_of_cold_tiles_never_trips_the_upstream_concurrency_limit() {
    // The simulator answers concurrency_limit_exceeded beyond 3 concurrent calculations per team.
    let h = Harness::with(|c, sim| {
        c.budget.project_concurrency = 3;
        sim.calc_delay = Duration::from_millis(150);
    });
    let port = h.proxy_port;
    let threads: Vec<_> = project1_ids(&h)
        .into_iter()
        .take(12)
        .map(|id| {
            std::thread::spawn(move || {
                let path = format!("/api/environments/1/insights/{id}/?refresh=blocking");
                http(port, "GET", &path, &[("Authorization", "Bearer phx_demo_all")], None)
            })
        })
        .collect();
    for t in threads {
        let r = t.join().unwrap();
        assert_eq!(r.status, 200);
        let v = r.json();
        assert!(v["query_status"].is_null(), "no limit error: {}", v["query_status"]);
        assert!(!v["result"].is_null());
    }
    assert_eq!(h.sim.total_calculations(), 12);
}

#[test]
fn a_spent_budget_serves_stale_or_posthogs_concurrency_error() {
    let h = Harness::with(|c, sim| {
        c.budget.project_concurrency = 1;
        c.budget.wait = Duration::from_millis(100);
        sim.calc_delay = Duration::from_millis(50);
    });
    let ids = project1_ids(&h);
    let (busy, cold, cached) = (ids[0], ids[1], ids[2]);
    let url = |id: u64| format!("/api/environments/1/insights/{id}/");
    assert_eq!(h.get(&format!("{}?refresh=blocking", url(cached)), ALL).status, 200);
    h.clock.advance(Duration::from_secs(8 * 86400)); // everything stale
    h.sim.set_calc_delay(Duration::from_millis(1500));
    let port = h.proxy_port;
    let slow = std::thread::spawn(move || {
        http(
            port,
            "GET",
            &format!("/api/environments/1/insights/{busy}/?refresh=blocking"),
            &[("Authorization", "Bearer phx_demo_all")],
            None,
        )
    });
    // The simulator counts a calculation when it starts: then the slot is surely held.
    let before = h.sim.total_calculations() + 1;
    eventually("the slow calculation holds the project's only slot", || {
        h.app.engine.slots_taken(1) == 1 && h.sim.total_calculations() == before
    });
    let r = h.get(&format!("{}?refresh=blocking", url(cold)), ALL);
    assert_eq!(r.status, 200);
    let v = r.json();
    assert!(v["result"].is_null());
    assert_eq!(v["query_status"]["error_message"], "concurrency_limit_exceeded");
    assert!(r.cache_status().contains("detail=budget"), "{}", r.cache_status());
    let r = h.get(&format!("{}?refresh=blocking", url(cached)), ALL);
    assert_eq!(r.status, 200);
    assert!(!r.json()["result"].is_null(), "the stale entry stands in");
    assert!(r.cache_status().contains("detail=budget"), "{}", r.cache_status());
    assert_eq!(h.sim.total_calculations(), before, "no calculation went out over budget");
    assert_eq!(slow.join().unwrap().status, 200);
}

#[test]
fn the_per_key_rate_is_never_exceeded() {
    let h = Harness::with(|c, sim| {
        c.budget.per_minute = Some(8); // a burst of 2, then 6 per minute
        c.budget.wait = Duration::ZERO;
        sim.rate_limit = Some((8, 1000));
    });
    let ids = project1_ids(&h);
    let mut limited = 0;
    for id in ids.iter().take(6) {
        let r = h.get(&format!("/api/environments/1/insights/{id}/?refresh=blocking"), ALL);
        assert_ne!(r.status, 429, "the upstream never throttles the proxy");
        if r.json()["query_status"]["error_message"] == "concurrency_limit_exceeded" {
            limited += 1;
        }
    }
    assert_eq!(limited, 4, "2 calls within the burst, the rest refused by the proxy itself");
    assert_eq!(h.sim.total_calculations(), 2);
}

#[test]
fn forced_recalculations_leave_the_reserve_to_misses() {
    let h = Harness::with(|c, _| {
        c.budget.per_minute = Some(40); // a burst of 10, then 0.5 per second
        c.budget.wait = Duration::ZERO;
        c.budget.forced_reserve_percent = 50;
        // With no wait, a slot still busy with another calculation would refuse a miss too: only
        // the rate's reserve is under test here.
        c.budget.project_concurrency = 64;
    });
    let ids = project1_ids(&h);
    let forced_url = format!("/api/environments/1/insights/{}/?refresh=force_blocking", ids[0]);
    h.get(&format!("/api/environments/1/insights/{}/?refresh=blocking", ids[0]), ALL);
    let mut from_cache = 0;
    for _ in 0..10 {
        let r = h.get(&forced_url, ALL);
        assert_eq!(r.status, 200);
        if r.cache_status().contains("detail=budget") {
            from_cache += 1;
        }
    }
    // 9 tokens were left; forced calls stop when 5 (half the burst) would remain.
    let forced = h.calcs(1, ids[0]) - 1;
    assert!((4..=5).contains(&forced), "{forced} forced calculations");
    assert_eq!(from_cache, 10 - forced, "the rest got the cached entry");
    for id in &ids[1..3] {
        let r = h.get(&format!("/api/environments/1/insights/{id}/?refresh=blocking"), ALL);
        let v = r.json();
        assert!(v["query_status"].is_null() && !v["result"].is_null(), "a miss still calculates: {v}");
        assert_eq!(h.calcs(1, *id), 1);
    }
}

#[test]
fn a_blocking_request_joining_queued_work_waits_only_the_budget_wait() {
    let h = Harness::with(|c, sim| {
        c.budget.project_concurrency = 1;
        c.budget.wait = Duration::from_millis(300);
        sim.calc_delay = Duration::from_secs(3);
    });
    let ids = project1_ids(&h);
    let port = h.proxy_port;
    // Holds the project's only slot for 3 s.
    let holder = std::thread::spawn(move || {
        let path = format!("/api/environments/1/insights/{}/?refresh=blocking", ids[0]);
        http(port, "GET", &path, &[("Authorization", "Bearer phx_demo_all")], None)
    });
    eventually("the first calculation runs", || h.sim.total_calculations() == 1);
    // A cold async read queues background work, which waits behind the running calculation.
    let url = format!("/api/environments/1/insights/{}/", project1_ids(&h)[1]);
    let queued = h.get(&format!("{url}?refresh=async"), ALL).json();
    assert_eq!(queued["query_status"]["complete"], false, "{}", queued["query_status"]);
    // A blocking reader joins that queued work: it gets the concurrency error after the budget
    // wait, not the answer 3 s later (before: the queued work's 60 s budget wait plus the upstream's).
    let joined = h.get(&format!("{url}?refresh=blocking"), ALL);
    assert_eq!(joined.status, 200);
    let v = joined.json();
    assert_eq!(v["query_status"]["error_message"], "concurrency_limit_exceeded", "{}", joined.cache_status());
    assert!(joined.cache_status().contains("detail=budget"), "{}", joined.cache_status());
    assert_eq!(holder.join().unwrap().status, 200);
    // The queued work still runs once, and its result is what the next read gets.
    eventually("the queued calculation lands", || {
        !h.get(&format!("{url}?refresh=force_cache"), ALL).json()["result"].is_null()
    });
    assert_eq!(h.sim.total_calculations(), 2);
}

#[test]
fn hot_entries_are_recalculated_before_they_go_stale() {
    let h = Harness::start();
    let (id, url) = h.day_insight(); // stale after 6 h
    let first = h.get(&format!("{url}?refresh=blocking"), ALL).json();
    h.get(&url, ALL);
    h.clock.advance(Duration::from_secs(5 * 3600 + 45 * 60)); // 96 % of the threshold
    let r = h.get(&url, ALL);
    assert!(r.cache_status().contains("; hit"), "still fresh: {}", r.cache_status());
    eventually("the refresh-ahead result lands in the cache", || {
        let v = h.admin("GET", &format!("/admin/entries?project=1&insight={id}"), true).json();
        v["entries"][0]["last_refresh"] != first["last_refresh"]
    });
    assert_eq!(h.calcs(1, id), 2);
    h.clock.advance(Duration::from_secs(3600)); // past the original entry's staleness
    let r = h.get(&url, ALL);
    assert!(r.cache_status().contains("; hit") && !r.cache_status().contains("stale"), "{}", r.cache_status());
    assert_ne!(r.json()["last_refresh"], first["last_refresh"]);
    assert_eq!(h.metric("insights_proxy_upstream_calculations_total{reason=\"ahead\"}"), 1.0);
}

#[test]
fn idle_entries_just_age_out() {
    let h = Harness::start();
    let (id, url) = h.day_insight();
    h.get(&format!("{url}?refresh=blocking"), ALL); // calculated, never read since
    h.clock.advance(Duration::from_secs(5 * 3600 + 45 * 60));
    assert!(h.get(&url, ALL).cache_status().contains("; hit")); // one read: not hot
    h.clock.advance(Duration::from_secs(3600));
    assert!(h.get(&url, ALL).cache_status().contains("detail=stale"));
    assert_eq!(h.calcs(1, id), 1);
}

#[test]
fn refresh_ahead_can_be_turned_off() {
    let h = Harness::with(|c, _| c.refresh_ahead.enabled = false);
    let (id, url) = h.day_insight();
    h.get(&format!("{url}?refresh=blocking"), ALL);
    for _ in 0..3 {
        h.get(&url, ALL);
    }
    h.clock.advance(Duration::from_secs(5 * 3600 + 45 * 60));
    h.get(&url, ALL);
    h.clock.advance(Duration::from_secs(3600));
    assert!(h.get(&url, ALL).cache_status().contains("detail=stale"));
    assert_eq!(h.calcs(1, id), 1);
}

/// An insight of project 1 on dashboard 1 (which has no filters), with a day interval and a
/// relative range: the upstream computes it under one cache key standalone and via dashboard 1.
/// Returns its id, its URL and the URL through the dashboard.
fn insight_on_unfiltered_dashboard(h: &Harness) -> (u64, String, String) {
    let id = h
        .project1_insights()
        .iter()
        .find(|i| {
            let source = &i["query"]["source"];
            let on_dashboard_1 =
                i["dashboard_tiles"].as_array().is_some_and(|t| t.iter().any(|t| t["dashboard_id"] == 1));
            on_dashboard_1
                && source["kind"] == "TrendsQuery"
                && source["interval"] == "day"
                && source["dateRange"]["date_to"].is_null()
        })
        .and_then(|i| i["id"].as_u64())
        .expect("a day-interval trends insight on dashboard 1");
    let url = format!("/api/environments/1/insights/{id}/");
    let via_dashboard = format!("{url}?from_dashboard=1");
    // What makes them one: the upstream's cache key (never calculates with force_cache).
    let hash = |u: &str| {
        let sep = if u.contains('?') { '&' } else { '?' };
        let r =
            h.direct("GET", &format!("{u}{sep}refresh=force_cache"), &[("Authorization", "Bearer phx_demo_all")], None);
        r.json()["filters_hash"].clone()
    };
    assert!(hash(&url).is_string());
    assert_eq!(hash(&url), hash(&via_dashboard), "the upstream keys both variants identically");
    (id, url, via_dashboard)
}

/// No background work queued or running.
fn idle(h: &Harness) -> bool {
    h.app.engine.is_idle() && h.app.metrics.busy_workers.get() == 0
}

#[test]
fn variants_the_upstream_keys_identically_share_one_refresh_ahead() {
    let h = Harness::start();
    let (id, url, dash) = insight_on_unfiltered_dashboard(&h);
    let first = h.get(&format!("{url}?refresh=blocking"), ALL).json();
    // The upstream's cache is fresh: the dashboard variant costs no calculation.
    let tile = h.get(&format!("{dash}&refresh=blocking"), ALL).json();
    assert!(tile["color"].is_string(), "answered through the dashboard tile");
    assert_eq!(h.calcs(1, id), 1);
    for _ in 0..2 {
        h.get(&url, ALL);
        h.get(&dash, ALL);
    }
    h.clock.advance(Duration::from_secs(5 * 3600 + 45 * 60)); // 96 % of the threshold
    assert!(h.get(&url, ALL).cache_status().contains("; hit"));
    assert!(h.get(&dash, ALL).cache_status().contains("; hit"));
    eventually("a refresh-ahead lands and nothing else is pending", || h.calcs(1, id) >= 2 && idle(&h));
    assert_eq!(h.calcs(1, id), 2, "one refresh-ahead for both variants");
    h.clock.advance(Duration::from_secs(3600)); // past the first result's staleness
    for u in [&url, &dash] {
        let r = h.get(u, ALL);
        assert!(r.cache_status().contains("; hit") && !r.cache_status().contains("stale"), "{}", r.cache_status());
        assert_ne!(r.json()["last_refresh"], first["last_refresh"]);
    }
    let r = h.get(&dash, ALL).json();
    assert_eq!(r["color"], tile["color"], "the tile's own fields stay");
    assert_eq!(r["layouts"], tile["layouts"]);
    assert_eq!(r["filters_hash"], first["filters_hash"]);
    assert_eq!(h.calcs(1, id), 2);
    assert_eq!(h.metric("insights_proxy_upstream_calculations_total{reason=\"ahead\"}"), 1.0);
}

#[test]
fn stale_variants_the_upstream_keys_identically_share_one_calculation() {
    let h = Harness::start();
    let (id, url, dash) = insight_on_unfiltered_dashboard(&h);
    h.get(&format!("{url}?refresh=blocking"), ALL);
    let tile = h.get(&format!("{dash}&refresh=blocking"), ALL).json();
    assert_eq!(h.calcs(1, id), 1);
    h.clock.advance(Duration::from_secs(7 * 3600)); // stale (6 h), not lazily stale (12 h)
    h.sim.set_calc_delay(Duration::from_millis(800));
    let (port, standalone) = (h.proxy_port, format!("{url}?refresh=blocking"));
    let first =
        std::thread::spawn(move || http(port, "GET", &standalone, &[("Authorization", "Bearer phx_demo_all")], None));
    eventually("the standalone variant's calculation is running", || h.app.engine.flights_running() == 1);
    let r = h.get(&format!("{dash}&refresh=blocking"), ALL);
    assert!(r.cache_status().contains("collapsed"), "{}", r.cache_status());
    let first = first.join().unwrap().json();
    let r = r.json();
    assert_eq!(r["last_refresh"], first["last_refresh"]);
    assert_eq!(r["result"], first["result"]);
    assert_eq!(r["color"], tile["color"], "the tile's own fields stay");
    assert_eq!(h.calcs(1, id), 2, "one calculation for both variants");
}

#[test]
fn refresh_ahead_runs_once_per_upstream_key_across_credentials() {
    let h = Harness::start();
    let (id, url) = h.day_insight();
    let first = h.get(&format!("{url}?refresh=blocking"), ALL).json();
    h.get(&format!("{url}?refresh=blocking"), P1); // the upstream's cache is fresh
    assert_eq!(h.calcs(1, id), 1);
    for _ in 0..2 {
        h.get(&url, ALL);
        h.get(&url, P1);
    }
    h.clock.advance(Duration::from_secs(5 * 3600 + 45 * 60));
    h.get(&url, ALL);
    h.get(&url, P1);
    eventually("both credentials' entries are refreshed", || {
        let v = h.admin("GET", &format!("/admin/entries?project=1&insight={id}"), true).json();
        let entries = v["entries"].as_array().cloned().unwrap_or_default();
        entries.len() == 2 && entries.iter().all(|e| e["last_refresh"] != first["last_refresh"]) && idle(&h)
    });
    // Each credential got its result with its own credential; only one was calculated.
    assert_eq!(h.calcs(1, id), 2);
    assert_eq!(h.metric("insights_proxy_upstream_calculations_total{reason=\"ahead\"}"), 1.0);
    assert_eq!(h.metric("insights_proxy_upstream_reads_total{reason=\"ahead\"}"), 1.0);
}

#[test]
fn a_variant_whose_alias_was_not_confirmed_lately_never_calculates_beside_its_group() {
    let h = Harness::start();
    let (id, url, dash) = insight_on_unfiltered_dashboard(&h);
    h.get(&format!("{url}?refresh=blocking"), ALL);
    h.get(&format!("{dash}&refresh=blocking"), ALL);
    assert_eq!(h.calcs(1, id), 1);
    // Stale, and past the alias's lazy threshold (12 h): neither variant's alias is confirmed.
    h.clock.advance(Duration::from_secs(13 * 3600));
    h.sim.set_calc_delay(Duration::from_millis(800));
    let (port, standalone) = (h.proxy_port, format!("{url}?refresh=blocking"));
    let first =
        std::thread::spawn(move || http(port, "GET", &standalone, &[("Authorization", "Bearer phx_demo_all")], None));
    eventually("the standalone variant's calculation is running", || h.calcs(1, id) == 2);
    let r = h.get(&format!("{dash}&refresh=blocking"), ALL);
    let first = first.join().unwrap().json();
    assert_eq!(h.calcs(1, id), 2, "the dashboard variant waited for the group's calculation");
    // Then it asked the upstream itself, which answered from the cache that calculation filled.
    assert!(r.cache_status().contains("fwd=stale; fwd-status=200"), "{}", r.cache_status());
    assert_eq!(r.json()["last_refresh"], first["last_refresh"]);
    assert!(h.metric("insights_proxy_upstream_calculations_total{reason=\"stale\"}") >= 2.0);
}

#[test]
fn queued_work_a_client_recalculation_answered_meanwhile_does_not_ask_the_upstream_again() {
    let h = Harness::with(|c, sim| {
        c.budget.project_concurrency = 1;
        sim.calc_delay = Duration::from_millis(50);
    });
    let (id, url) = h.day_insight();
    let other = project1_ids(&h).into_iter().find(|&i| i != id).unwrap();
    h.get(&format!("{url}?refresh=blocking"), ALL);
    h.clock.advance(Duration::from_secs(7 * 3600)); // stale (6 h), not lazily stale (12 h)
    h.sim.set_calc_delay(Duration::from_millis(800));
    let port = h.proxy_port;
    let get = move |path: String| {
        std::thread::spawn(move || http(port, "GET", &path, &[("Authorization", "Bearer phx_demo_all")], None))
    };
    // Another insight's calculation holds the project's only slot.
    let holder = get(format!("/api/environments/1/insights/{other}/?refresh=blocking"));
    eventually("the other calculation holds the slot", || h.calcs(1, other) == 1);
    // A stale async read queues background work; a blocking read then recalculates first (it has
    // the higher priority), while the background work waits for the slot.
    let queued = h.get(&format!("{url}?refresh=async"), ALL).json();
    let status = queued["query_status"]["id"].as_str().expect("a status").to_string();
    let blocking = get(format!("{url}?refresh=blocking"));
    eventually("the blocking read waits for the slot", || h.app.engine.flights_running() == 2);
    let fresh = blocking.join().unwrap().json();
    assert_eq!(holder.join().unwrap().status, 200);
    assert_eq!(h.calcs(1, id), 2);
    let mut polled = serde_json::Value::Null;
    eventually("the queued work completes", || {
        polled = h.get(&format!("/api/environments/1/query/{status}/"), ALL).json();
        polled["query_status"]["complete"] == true
    });
    assert_eq!(polled["query_status"]["results"]["last_refresh"], fresh["last_refresh"], "{polled}");
    eventually("nothing is pending", || idle(&h));
    let asked = h.metric("insights_proxy_upstream_calculations_total{reason=\"background\"}");
    assert_eq!(asked, 0.0, "the background work asked the upstream although the answer had landed");
    assert_eq!(h.calcs(1, id), 2);
}

#[test]
fn a_force_queued_behind_a_running_force_of_the_same_key_shares_its_calculation() {
    let h = Harness::with(|c, _| c.budget.project_concurrency = 1);
    let (id, url) = h.day_insight();
    h.get(&format!("{url}?refresh=blocking"), ALL);
    h.sim.set_calc_delay(Duration::from_millis(800));
    let first = h.get(&format!("{url}?refresh=force_async"), ALL).json();
    eventually("the forced calculation runs", || h.calcs(1, id) == 2);
    // The second force waits for the project's only slot, which the first holds.
    let second = h.get(&format!("{url}?refresh=force_async"), ALL).json();
    let status = second["query_status"]["id"].as_str().expect("a status").to_string();
    assert_eq!(first["query_status"]["id"], second["query_status"]["id"]);
    let mut polled = serde_json::Value::Null;
    eventually("the forced work completes", || {
        polled = h.get(&format!("/api/environments/1/query/{status}/"), ALL).json();
        polled["query_status"]["complete"] == true && idle(&h)
    });
    assert_eq!(h.calcs(1, id), 2, "one calculation for both forces");
    let stored = h.get(&url, ALL).json();
    assert_eq!(polled["query_status"]["results"]["last_refresh"], stored["last_refresh"], "{polled}");
    // A force asked once that result was there calculates again.
    h.get(&format!("{url}?refresh=force_async"), ALL);
    eventually("a later force recalculates", || h.calcs(1, id) == 3 && idle(&h));
}

#[test]
fn a_forced_read_the_budget_cannot_serve_within_a_second_gets_the_cached_entry_at_once() {
    let h = Harness::with(|c, _| {
        // A burst of 1, then a token every 20 s: well within `wait`, far beyond a second.
        c.budget.per_minute = Some(4);
        c.budget.wait = Duration::from_secs(60);
    });
    let (id, url) = h.day_insight();
    assert_eq!(h.get(&format!("{url}?refresh=blocking"), ALL).status, 200);
    assert_eq!(h.calcs(1, id), 1);
    let r = h.get(&format!("{url}?refresh=force_blocking"), ALL);
    assert_eq!(r.status, 200);
    assert!(r.cache_status().contains("detail=budget"), "{}", r.cache_status());
    assert_eq!(r.json()["is_cached"], true);
    assert!(!r.json()["result"].is_null());
    assert_eq!(h.calcs(1, id), 1, "no calculation after waiting for the next token");
}

#[test]
fn forced_reads_within_the_minimum_interval_are_answered_from_the_entry() {
    let h = Harness::with(|c, _| c.forced_min_interval = ForcedMinInterval::NextAllowedClientRefresh);
    let (id, url) = h.day_insight();
    let first = h.get(&format!("{url}?refresh=blocking"), ALL).json();
    let next_allowed = first["next_allowed_client_refresh"].as_str().expect("a next allowed refresh").to_string();
    for mode in ["force_blocking", "force_async"] {
        let r = h.get(&format!("{url}?refresh={mode}"), ALL);
        assert_eq!(r.status, 200);
        assert!(r.cache_status().contains("detail=too-soon-to-force"), "{mode}: {}", r.cache_status());
        let v = r.json();
        assert_eq!(v["is_cached"], true, "{mode}");
        assert_eq!(v["next_allowed_client_refresh"], next_allowed.as_str(), "{mode}");
        assert!(v["query_status"].is_null(), "{mode}: no work queued");
    }
    assert_eq!(h.calcs(1, id), 1);
    // Past the entry's own next_allowed_client_refresh (at most 15 minutes), forcing recalculates.
    h.clock.advance(Duration::from_secs(15 * 60 + 1));
    let r = h.get(&format!("{url}?refresh=force_blocking"), ALL);
    assert!(r.cache_status().contains("fwd=request"), "{}", r.cache_status());
    assert_eq!(h.calcs(1, id), 2);
}

#[test]
fn a_minimum_interval_in_seconds_counts_from_the_last_calculation() {
    let h = Harness::with(|c, _| c.forced_min_interval = ForcedMinInterval::After(Duration::from_secs(60)));
    let (id, url) = h.day_insight();
    h.get(&format!("{url}?refresh=blocking"), ALL);
    h.clock.advance(Duration::from_secs(59));
    let r = h.get(&format!("{url}?refresh=force_blocking"), ALL);
    assert!(r.cache_status().contains("detail=too-soon-to-force"), "{}", r.cache_status());
    assert_eq!(h.calcs(1, id), 1);
    h.clock.advance(Duration::from_secs(2));
    let r = h.get(&format!("{url}?refresh=force_blocking"), ALL);
    assert!(r.cache_status().contains("fwd=request"), "{}", r.cache_status());
    assert_eq!(h.calcs(1, id), 2);
}
