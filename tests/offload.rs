//! Issue 6: the calculation budget (per-project concurrency by priority, per-key rates) and
//! refresh-ahead for hot insights.

mod common;

use std::time::Duration;

use common::*;

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
    eventually("the slow calculation holds the project's only slot", || h.app.budget.running(1) == 1);
    let before = h.sim.total_calculations();
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
