//! The trust boundary through the real proxy: cached data reaches only a principal the upstream
//! would serve; failures the proxy makes itself, or that a client's input causes, never unlock
//! cached data nor count against the upstream; the budget follows the key the upstream
//! authenticates; refusals are remembered; confirmations cover their configured scope.

mod common;

use std::time::Duration;

use common::*;
use insights_proxy::auth::Principal;
use insights_proxy::config::RevalidateScope;

fn insight_url(id: u64) -> String {
    format!("/api/environments/1/insights/{id}/")
}

/// A variant the simulator calculates on its own (its cache key hashes variables), so the
/// upstream has nothing cached for it until the proxy asks.
fn cold_variant(id: u64, n: u64) -> String {
    format!("{}?variables_override=%7B%22trust%22%3A{n}%7D", insight_url(id))
}

/// A personal API key the simulator accepts for project 1 only.
fn minted_key(h: &Harness, name: &str) -> String {
    let key = format!("phx_trust_{name}");
    h.sim.set_project_access(&key, 1, true);
    key
}

fn assert_no_data(r: &Resp) {
    let v = r.json();
    for field in ["result", "results", "query_status"] {
        assert!(v.get(field).is_none(), "cached data in a refusal: {v}");
    }
}

#[test]
fn a_request_the_proxy_cannot_forward_never_unlocks_a_revoked_keys_cache() {
    let h = Harness::with(|c, _| c.revalidate_after = Duration::from_secs(60));
    let key = minted_key(&h, "revoked");
    let (_, url) = h.day_insight();
    assert_eq!(h.get(&format!("{url}?refresh=blocking"), &key).status, 200);
    h.sim.revoke_token(&key);
    h.clock.advance(Duration::from_secs(61));
    let requests = h.sim.requests();
    // Re-encoded for the proxy's own call this query would not fit a request line.
    let r = h.get(&format!("{url}?pad={}", "!".repeat(25_000)), &key);
    assert_eq!(r.status, 414, "{}", r.text());
    assert_eq!(r.json()["type"], "invalid_request");
    assert_no_data(&r);
    assert_eq!(h.sim.requests(), requests, "refused before any upstream work");
    // A long query the proxy can forward revalidates, and the upstream's refusal stands.
    let r = h.get(&format!("{url}?pad={}", "!".repeat(5_000)), &key);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_no_data(&r);
    let r = h.get(&url, &key);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_no_data(&r);
}

#[test]
fn the_proxys_own_budget_never_stands_in_for_a_revalidation() {
    let h = Harness::with(|c, _| {
        c.revalidate_after = Duration::from_secs(60);
        c.budget.per_minute = Some(40); // a burst of 10, then one every 2 s
        c.budget.wait = Duration::ZERO;
    });
    let key = minted_key(&h, "spent");
    let (id, url) = h.day_insight();
    assert_eq!(h.get(&format!("{url}?refresh=blocking"), &key).status, 200);
    // Spend the key's rate on reads of other insights while it is still valid.
    let spent =
        (1..=20u64).filter(|i| *i != id).any(|i| h.get(&insight_url(i), &key).cache_status().contains("detail=budget"));
    assert!(spent, "the key's rate was spent");
    h.sim.revoke_token(&key);
    h.clock.advance(Duration::from_secs(61));
    // The revalidation cannot be made for want of the proxy's own budget: that is no outage.
    let r = h.get(&url, &key);
    assert!(r.json()["result"].is_null(), "cached data without the upstream's word: {}", r.text());
    assert!(r.cache_status().contains("detail=budget"), "{}", r.cache_status());
}

#[test]
fn hostile_requests_neither_open_the_breaker_nor_stop_legitimate_misses() {
    let h = Harness::start();
    let url = insight_url(1);
    // A tenant the upstream accepted before: unknown keys' allowance is not its concern.
    assert_eq!(h.get(&format!("{url}?refresh=blocking"), ALL).status, 200);
    for i in 0..100 {
        let r = h.get(&format!("{url}?refresh=blocking&pad={}", "!".repeat(25_000)), &format!("junk_{i}"));
        assert_eq!(r.status, 414, "{}", r.text());
    }
    for i in 0..20 {
        let r = h.get(&format!("{url}?refresh=blocking"), &format!("junk_key_{i}"));
        assert!(matches!(r.status, 401 | 429), "{} {}", r.status, r.text());
    }
    assert_eq!(h.metric("insights_proxy_upstream_circuit_open"), 0.0);
    assert_eq!(h.admin("GET", "/readyz", false).status, 200);
    for id in 2..=6 {
        let r = h.get(&format!("{}?refresh=blocking", insight_url(id)), ALL);
        assert_eq!(r.status, 200, "a legitimate miss after the hostile requests: {}", r.text());
        assert!(!r.json()["result"].is_null());
    }
}

#[test]
fn readiness_probes_the_upstream_itself_while_the_circuit_is_open() {
    let mut h = Harness::with(|c, _| {
        c.breaker.cooldown = Duration::from_millis(100);
        c.breaker.max_cooldown = Duration::from_millis(200);
    });
    h.stop_backend();
    for id in 1..=8 {
        let r = h.get(&format!("{}?refresh=blocking", insight_url(id)), ALL);
        assert!(r.status >= 500, "{} {}", r.status, r.text());
    }
    assert_eq!(h.metric("insights_proxy_upstream_circuit_open"), 1.0);
    assert_eq!(h.admin("GET", "/readyz", false).status, 503);
    h.start_backend_again();
    // No proxy traffic at all: readiness itself finds the upstream back.
    eventually("/readyz recovers without traffic", || h.admin("GET", "/readyz", false).status == 200);
    assert_eq!(h.metric("insights_proxy_upstream_circuit_open"), 0.0);
}

#[test]
fn a_query_status_poll_is_a_cached_read_and_obeys_revocation() {
    let h = Harness::with(|c, _| c.revalidate_after = Duration::from_secs(60));
    let key = minted_key(&h, "poller");
    let r = h.get(&format!("{}&refresh=async", cold_variant(2, 1)), &key);
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["query_status"]["id"].as_str().expect("a status").to_string();
    let poll = format!("/api/environments/1/query/{id}/");
    eventually("the status completes", || h.get(&poll, &key).status == 200);
    assert!(!h.get(&poll, &key).json()["query_status"]["results"].is_null());
    h.sim.revoke_token(&key);
    h.clock.advance(Duration::from_secs(61));
    let r = h.get(&poll, &key);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_no_data(&r);
    // The refusal dropped the principal's status records.
    let owner = Principal::api_key(&h.app.keyer, &key).partition();
    assert!(h.app.statuses.get(owner, &id).is_none());
}

#[test]
fn a_revoked_key_right_after_its_first_miss_gets_no_cached_data() {
    // The first miss leaves a short "the upstream has nothing cached" note; the background
    // calculation then stores a result. The note must neither outlive the store nor stand in for
    // the upstream's word on a revalidation.
    let h = Harness::with(|c, _| c.revalidate_after = Duration::from_secs(60));
    let key = minted_key(&h, "first_miss");
    let url = cold_variant(3, 2);
    let r = h.get(&format!("{url}&refresh=async"), &key);
    assert!(r.json()["result"].is_null(), "a miss: {}", r.text());
    eventually("the background result lands", || {
        !h.get(&format!("{url}&refresh=force_cache"), &key).json()["result"].is_null()
    });
    h.sim.revoke_token(&key);
    h.clock.advance(Duration::from_secs(61));
    let r = h.get(&url, &key);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_no_data(&r);
}

#[test]
fn junk_carriers_beside_a_key_never_buy_more_upstream_calls() {
    let h = Harness::with(|c, sim| {
        c.budget.per_minute = Some(8); // a burst of 2, then 6 per minute
        c.budget.wait = Duration::ZERO;
        sim.rate_limit = Some((8, 1000));
    });
    let before = h.sim.requests();
    for i in 0..30u64 {
        let path = format!("{}&refresh=blocking&personal_api_key=junk_param_{i}", cold_variant(1 + i % 20, i));
        let cookie = format!("sessionid=junk_session_{i}");
        let r = h.request("GET", &path, &[("Authorization", &format!("Bearer {ALL}")), ("Cookie", &cookie)], None);
        assert_ne!(r.status, 429, "the upstream throttled the key: {}", r.text());
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let calls = h.sim.requests() - before;
    assert!(calls <= 3, "30 requests with junk beside one key cost {calls} upstream calls (its budget: 2 + refill)");
}

#[test]
fn a_refused_key_costs_the_upstream_nothing_for_a_while() {
    let h = Harness::start();
    let url = insight_url(4);
    let first = h.get(&url, "phx_never_valid");
    assert_eq!(first.status, 401);
    let before = h.sim.requests();
    for _ in 0..50 {
        let r = h.get(&url, "phx_never_valid");
        assert_eq!(r.status, 401);
        assert_eq!(r.body, first.body, "the upstream's own answer, remembered");
    }
    let r = h.get(&format!("{url}?refresh=force_blocking"), "phx_never_valid");
    assert_eq!(r.status, 401);
    assert_eq!(h.sim.requests(), before, "no upstream call for a remembered refusal");
    assert!(h.metric("insights_proxy_trust_refusals_total{reason=\"refused\"}") >= 51.0);
}

#[test]
fn list_items_are_kept_as_the_standalone_results_the_list_shows() {
    let h = Harness::start();
    // Dashboard 2 of project 1 filters its tiles to the last 30 days and shows the insights at
    // even positions: the first insight is on it.
    let id = h.project1_insights()[0]["id"].as_u64().unwrap();
    let standalone = h.direct(
        "GET",
        &format!("{}?refresh=blocking", insight_url(id)),
        &[("Authorization", "Bearer phx_demo_all")],
        None,
    );
    let tile = format!("{}?from_dashboard=2", insight_url(id));
    let on_dashboard =
        h.direct("GET", &format!("{tile}&refresh=blocking"), &[("Authorization", "Bearer phx_demo_all")], None);
    assert_ne!(standalone.json()["result"], on_dashboard.json()["result"], "the dashboard's filters change the result");
    // The list ignores `from_dashboard`: its items are standalone results.
    let list = h.get("/api/environments/1/insights/?from_dashboard=2&refresh=force_cache&limit=5", ALL);
    assert_eq!(list.status, 200, "{}", list.text());
    let r = h.get(&format!("{tile}&refresh=force_cache"), ALL);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["result"], on_dashboard.json()["result"], "the tile's own result, not the list's");
}

#[test]
fn the_revalidation_scope_decides_whether_access_to_one_insight_is_honoured_within_the_window() {
    for scope in [RevalidateScope::Project, RevalidateScope::Insight] {
        let h = Harness::with(|c, _| {
            c.revalidate_after = Duration::from_secs(60);
            c.revalidate_scope = scope;
        });
        let key = minted_key(&h, "scoped");
        let (a, b) = (insight_url(5), insight_url(6));
        assert_eq!(h.get(&format!("{a}?refresh=blocking"), &key).status, 200);
        assert_eq!(h.get(&format!("{b}?refresh=blocking"), &key).status, 200);
        h.sim.set_insight_access(&key, 6, false);
        h.clock.advance(Duration::from_secs(61));
        let revalidations = h.metric("insights_proxy_revalidations_total");
        assert_eq!(h.get(&a, &key).status, 200);
        let r = h.get(&b, &key);
        let spent = h.metric("insights_proxy_revalidations_total") - revalidations;
        match scope {
            // One confirming read covers the project: the restriction is seen after the window.
            RevalidateScope::Project => {
                assert_eq!(r.status, 200, "{}", r.text());
                assert_eq!(spent, 1.0);
            }
            // One confirming read per insight: the restricted insight is refused at once.
            RevalidateScope::Insight => {
                assert_eq!(r.status, 403, "{}", r.text());
                assert_no_data(&r);
                assert_eq!(spent, 2.0);
            }
        }
    }
}
