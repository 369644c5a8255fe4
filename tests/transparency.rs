//! What a client sees through the proxy that is the proxy's own doing, beyond what the
//! differential harness compares field by field: the "nothing cached upstream" memory is named,
//! parameters the proxy does not know are never answered from another variant, and results that
//! can never go stale are never recalculated ahead of time.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn the_memory_that_the_upstream_has_nothing_cached_is_named() {
    let h = Harness::start();
    let url = "/api/environments/1/insights/3/?variables_override=%7B%22memo%22%3A1%7D";
    let first = h.get(url, ALL);
    assert!(first.json()["result"].is_null());
    assert!(first.cache_status().contains("fwd=miss"), "{}", first.cache_status());
    let before = h.sim.requests();
    let again = h.get(url, ALL);
    assert!(again.json()["result"].is_null());
    assert_eq!(again.cache_status(), "insights-proxy; hit; detail=upstream-empty");
    assert_eq!(h.sim.requests(), before, "answered from the proxy's memory");
}

#[test]
fn a_parameter_the_proxy_does_not_know_is_part_of_the_key() {
    let h = Harness::start();
    let url = "/api/environments/1/insights/4/";
    assert_eq!(h.get(&format!("{url}?refresh=blocking"), ALL).status, 200);
    assert!(h.get(url, ALL).cache_status().contains("; hit"));
    let unknown = h.metric("insights_proxy_unknown_query_params_total");
    let r = h.get(&format!("{url}?some_future_param=x"), ALL);
    assert!(!r.cache_status().contains("; hit"), "another variant's entry answered: {}", r.cache_status());
    assert_eq!(h.metric("insights_proxy_unknown_query_params_total"), unknown + 1.0);
    // Parameters known not to change the result still share the entry.
    let r = h.get(&format!("{url}?client_query_id=abc&session_id=s1"), ALL);
    assert!(r.cache_status().contains("; hit"), "{}", r.cache_status());
}

#[test]
fn a_result_that_can_never_go_stale_is_not_recalculated_ahead() {
    let h = Harness::start();
    // A fixed date range that ended long before the calculation: never stale.
    let id = h
        .project1_insights()
        .iter()
        .find(|i| i["query"]["source"]["dateRange"]["date_to"].as_str().is_some_and(|d| d.starts_with("2024")))
        .and_then(|i| i["id"].as_u64())
        .expect("an insight with a fixed past date range");
    let url = format!("/api/environments/1/insights/{id}/");
    assert_eq!(h.get(&format!("{url}?refresh=blocking"), ALL).status, 200);
    for _ in 0..3 {
        h.get(&url, ALL);
    }
    // Past where refresh-ahead would start for a day-interval result that can go stale.
    h.clock.advance(Duration::from_secs(5 * 3600 + 45 * 60));
    for _ in 0..3 {
        let r = h.get(&url, ALL);
        assert!(r.cache_status().contains("; hit"), "{}", r.cache_status());
    }
    eventually("no background work left", || h.app.engine.is_idle());
    let ahead = h.metric("insights_proxy_upstream_calculations_total{reason=\"ahead\"}");
    assert_eq!(ahead, 0.0, "recalculated ahead a result that can never change");
}
