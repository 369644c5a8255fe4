//! Per-credential isolation, revocation, hostile input and upstream misbehaviour.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use posthog_sim::Fault;

#[test]
fn a_token_for_another_project_never_sees_the_data_even_while_racing() {
    let h = Harness::with(|_, sim| sim.calc_delay = Duration::from_millis(100));
    let (id, url) = h.day_insight();
    let port = h.proxy_port;
    for round in 0..5 {
        h.clock.advance(Duration::from_secs(7 * 3600)); // stale: every round recalculates
        let barrier = Arc::new(std::sync::Barrier::new(20));
        let threads: Vec<_> = (0..20)
            .map(|i| {
                let (url, barrier) = (url.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let token = if i % 2 == 0 { P1 } else { P2 };
                    let mode = ["blocking", "force_cache", "async", "force_blocking"][i % 4];
                    barrier.wait();
                    let r = http(
                        port,
                        "GET",
                        &format!("{url}?refresh={mode}"),
                        &[("Authorization", &format!("Bearer {token}"))],
                        None,
                    );
                    (token, r)
                })
            })
            .collect();
        for t in threads {
            let (token, r) = t.join().unwrap();
            if token == P2 {
                assert_eq!(r.status, 403, "round {round}: project 2's token got {}: {}", r.status, r.text());
                assert!(r.json().get("result").is_none());
            } else {
                assert_eq!(r.status, 200, "round {round}: {}", r.text());
            }
        }
    }
    assert!(h.calcs(1, id) >= 1);
}

#[test]
fn a_revoked_token_stops_getting_cached_data_within_the_window() {
    let h = Harness::with(|c, _| c.revalidate_after = Duration::from_secs(60));
    let (_, url) = h.day_insight();
    let r = h.get(&format!("{url}?refresh=blocking"), P1);
    assert_eq!(r.status, 200);
    h.sim.revoke_token(P1);
    // Within the window the proxy does not ask again.
    assert_eq!(h.get(&url, P1).status, 200);
    // Past it, it revalidates, learns of the revocation, and drops the partition.
    h.clock.advance(Duration::from_secs(61));
    let r = h.get(&url, P1);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["type"], "authentication_error");
    let again = h.get(&url, P1);
    assert_eq!(again.status, 401);
    // Other credentials are unaffected.
    assert_eq!(h.get(&format!("{url}?refresh=blocking"), ALL).status, 200);
}

#[test]
fn losing_access_to_a_project_stops_cached_data_too() {
    let h = Harness::start();
    let (_, url) = h.day_insight();
    assert_eq!(h.get(&format!("{url}?refresh=blocking"), P1).status, 200);
    h.sim.set_project_access(P1, 1, false);
    h.clock.advance(Duration::from_secs(61));
    let r = h.get(&url, P1);
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["code"], "permission_denied");
}

#[test]
fn background_refresh_with_a_revoked_token_drops_the_entry() {
    let h = Harness::start();
    let (_, url) = h.day_insight();
    assert_eq!(h.get(&format!("{url}?refresh=blocking"), P1).status, 200);
    h.clock.advance(Duration::from_secs(7 * 3600));
    h.sim.revoke_token(P1);
    // Still confirmed (the clock moved past the window, so this revalidates and fails).
    let r = h.get(&format!("{url}?refresh=async"), P1);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(h.get(&url, P1).status, 401);
}

#[test]
fn hostile_requests_get_posthog_shaped_errors() {
    let h = Harness::start();
    let auth = ("Authorization", "Bearer phx_demo_all");
    // Too many headers.
    let many: Vec<(String, String)> = (0..150).map(|i| (format!("X-H{i}"), "v".into())).collect();
    let mut hs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    hs.push(auth);
    let r = h.request("GET", "/api/environments/1/insights/1/", &hs, None);
    assert_eq!(r.status, 431);
    assert_eq!(r.json()["code"], "headers_too_large");
    // A huge header: refused, and the proxy keeps serving.
    let huge = "a".repeat(200 * 1024);
    let r = h.request("GET", "/api/environments/1/insights/1/", &[auth, ("X-Huge", &huge)], None);
    assert!(r.status >= 400 && r.status < 500, "{}", r.status);
    assert_eq!(h.get("/api/projects/", ALL).status, 200);
    // Repeated parameters: the last one wins, as Django's QueryDict.get.
    let (id, url) = h.day_insight();
    h.get(&format!("{url}?refresh=blocking&refresh=force_cache"), ALL);
    assert_eq!(h.calcs(1, id), 0, "the last refresh value (force_cache) applied");
    // Bad percent-encoding and invalid UTF-8.
    for q in ["refresh=%zz", "filters_override=%ff%fe", "a=%"] {
        let r = h.get(&format!("{url}?{q}"), ALL);
        assert_eq!(r.status, 400, "{q}");
        assert_eq!(r.json()["type"], "validation_error");
    }
    // Malformed JSON in a write passes to the upstream, which refuses it; nothing is cached.
    let r = h.request("PATCH", &url, &[auth], Some("{nope"));
    assert_eq!(r.status, 400, "{}", r.text());
    // Non-numeric and huge ids, dot-segments.
    assert_eq!(h.get("/api/environments/1/insights/abc/", ALL).status, 404);
    assert_eq!(h.get("/api/environments/1/insights/184467440737095516160/", ALL).status, 404);
    let r = h.get("/api/environments/1/insights/../../x", ALL);
    assert_eq!(r.status, 400);
    // Unknown refresh values are force_cache: never calculate.
    h.get(&format!("{url}?refresh=%00%01"), ALL);
    assert_eq!(h.calcs(1, id), 0);
}

#[test]
fn a_hung_upstream_times_out_and_stale_entries_survive() {
    let h = Harness::with(|c, _| c.read_timeout = Duration::from_millis(400));
    let (_, url) = h.day_insight();
    let v = h.get(&format!("{url}?refresh=blocking"), ALL).json();
    let other = h
        .project1_insights()
        .iter()
        .filter_map(|i| i["id"].as_u64())
        .find(|i| !url.ends_with(&format!("/{i}/")))
        .unwrap();
    let other_url = format!("/api/environments/1/insights/{other}/");
    h.sim.set_fault(Fault::Hang);
    h.clock.advance(Duration::from_secs(7 * 3600));
    let r = h.get(&format!("{url}?refresh=blocking"), ALL);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["last_refresh"], v["last_refresh"]);
    assert!(r.cache_status().contains("stale-if-error"), "{}", r.cache_status());
    let r = h.get(&format!("{other_url}?refresh=blocking"), ALL);
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["code"], "gateway_timeout");
    h.sim.set_fault(Fault::None);
}

#[test]
fn oversized_upstream_answers_are_refused_not_cached() {
    let h = Harness::with(|c, _| c.max_response_bytes = 1024);
    let (_, url) = h.day_insight();
    let r = h.get(&format!("{url}?refresh=blocking"), ALL);
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["type"], "server_error");
}

#[test]
fn a_dead_upstream_is_not_hammered() {
    let h = Harness::with(|c, _| {
        c.breaker.failures = 3;
        c.breaker.cooldown = Duration::from_secs(60);
    });
    let (_, url) = h.day_insight();
    h.sim.set_fault(Fault::Status(500));
    for _ in 0..3 {
        assert_eq!(h.get(&format!("{url}?refresh=force_blocking"), ALL).status, 500, "the upstream's own answer");
    }
    let seen = h.sim.requests();
    for _ in 0..10 {
        let r = h.get(&format!("{url}?refresh=force_blocking"), ALL);
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["code"], "service_unavailable");
        assert_eq!(h.get("/api/projects/", ALL).status, 503, "pass-through is held back too");
    }
    assert_eq!(h.sim.requests(), seen, "no request reached the failing upstream while open");
}
