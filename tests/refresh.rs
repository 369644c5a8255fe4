//! The refresh semantics through the real proxy, with the simulated backend's
//! calculation counter as the main observable.

mod common;

use std::time::Duration;

use common::*;
use posthog_sim::Fault;
use serde_json::Value;

fn get(h: &Harness, url: &str, refresh: Option<&str>) -> Resp {
    let path = match refresh {
        Some(r) => format!("{url}?refresh={r}"),
        None => url.to_string(),
    };
    h.get(&path, ALL)
}

/// Waits for a proxy-issued query status to complete, polling it through the proxy.
fn poll_until_complete(h: &Harness, status: &Value) -> Value {
    let id = status["id"].as_str().expect("status id");
    let mut last = Value::Null;
    eventually("the async calculation completes", || {
        let r = h.get(&format!("/api/environments/1/query/{id}/"), ALL);
        assert!(r.status == 200 || r.status == 202, "poll answered {}: {}", r.status, r.text());
        last = r.json();
        r.status == 200
    });
    last
}

/// Past the DEFAULT threshold of a `day` insight (6 h), not past its LAZY one (12 h).
fn stale(h: &Harness) {
    h.clock.advance(Duration::from_secs(7 * 3600));
}

#[test]
fn force_cache_miss_never_calculates() {
    let h = Harness::start();
    let (id, url) = h.day_insight();
    let r = get(&h, &url, None);
    assert_eq!(r.status, 200);
    let v = r.json();
    assert!(v["result"].is_null(), "{v}");
    assert_eq!(v["is_cached"], false);
    assert_eq!(h.calcs(1, id), 0);
    assert!(r.cache_status().contains("fwd=miss"), "{}", r.cache_status());
    // Unknown values and legacy false are force_cache too.
    for mode in ["false", "0", "bogus", "Blocking"] {
        get(&h, &url, Some(mode));
    }
    assert_eq!(h.calcs(1, id), 0);
}

#[test]
fn blocking_calculates_once_then_serves_from_cache() {
    let h = Harness::start();
    let (id, url) = h.day_insight();
    let first = get(&h, &url, Some("blocking"));
    assert_eq!(first.status, 200, "{}", first.text());
    let v1 = first.json();
    assert_eq!(v1["is_cached"], false);
    assert!(!v1["result"].is_null());
    assert!(first.cache_status().contains("fwd=miss") && first.cache_status().contains("stored"));
    assert_eq!(h.calcs(1, id), 1);

    let second = get(&h, &url, Some("blocking"));
    let v2 = second.json();
    assert_eq!(v2["is_cached"], true);
    assert_eq!(v2["last_refresh"], v1["last_refresh"]);
    assert_eq!(v2["result"], v1["result"]);
    assert!(second.cache_status().starts_with("insights-proxy; hit"), "{}", second.cache_status());
    for mode in [None, Some("force_cache"), Some("async"), Some("lazy_async"), Some("async_except_on_cache_miss")] {
        let r = get(&h, &url, mode);
        assert_eq!(r.json()["is_cached"], true, "{mode:?}");
        assert!(r.json()["query_status"].is_null());
    }
    assert_eq!(h.calcs(1, id), 1, "fresh hits never calculate");
    // Both URL aliases share entries.
    let alias = h.get(&format!("/api/projects/1/insights/{id}/?refresh=blocking"), ALL);
    assert_eq!(alias.json()["is_cached"], true);
    assert_eq!(h.calcs(1, id), 1);
}

#[test]
fn stale_entries_per_mode() {
    let h = Harness::start();
    let (id, url) = h.day_insight();
    let v1 = get(&h, &url, Some("blocking")).json();
    stale(&h);

    // force_cache serves stale, no calculation.
    let r = get(&h, &url, None);
    assert_eq!(r.json()["last_refresh"], v1["last_refresh"]);
    assert!(r.cache_status().contains("detail=stale"), "{}", r.cache_status());
    // lazy_async: stale by DEFAULT but fresh by LAZY for this interval → no enqueue.
    let lazy = get(&h, &url, Some("lazy_async")).json();
    assert_eq!(lazy["last_refresh"], v1["last_refresh"]);
    assert_eq!(h.calcs(1, id), 1);

    // blocking recalculates.
    let r = get(&h, &url, Some("blocking"));
    let v2 = r.json();
    assert_eq!(v2["is_cached"], false);
    assert_ne!(v2["last_refresh"], v1["last_refresh"]);
    assert!(r.cache_status().contains("fwd=stale"), "{}", r.cache_status());
    assert_eq!(h.calcs(1, id), 2);

    // async on stale: the stale answer at once, plus a status; the calculation lands later.
    stale(&h);
    let r = get(&h, &url, Some("async"));
    let v3 = r.json();
    assert_eq!(v3["is_cached"], true);
    assert_eq!(v3["last_refresh"], v2["last_refresh"]);
    assert_eq!(v3["query_status"]["query_async"], true);
    let done = poll_until_complete(&h, &v3["query_status"]);
    assert_eq!(done["query_status"]["complete"], true);
    assert_eq!(done["query_status"]["error"], false);
    assert_eq!(h.calcs(1, id), 3);
    let fresh = get(&h, &url, None).json();
    assert_ne!(fresh["last_refresh"], v2["last_refresh"], "the background result is served");

    // async_except_on_cache_miss on stale: stale answer + background calculation.
    stale(&h);
    let r = get(&h, &url, Some("async_except_on_cache_miss")).json();
    assert_eq!(r["last_refresh"], fresh["last_refresh"]);
    poll_until_complete(&h, &r["query_status"]);
    assert_eq!(h.calcs(1, id), 4);
}

#[test]
fn lazy_async_enqueues_only_when_lazily_stale() {
    let h = Harness::start();
    let (id, url) = h.day_insight();
    get(&h, &url, Some("blocking"));
    h.clock.advance(Duration::from_secs(13 * 3600)); // past the LAZY threshold too
    let r = get(&h, &url, Some("lazy_async")).json();
    assert_eq!(r["is_cached"], true);
    poll_until_complete(&h, &r["query_status"]);
    assert_eq!(h.calcs(1, id), 2);
}

#[test]
fn async_miss_then_poll_to_completion() {
    let h = Harness::start();
    let (id, url) = h.day_insight();
    let r = get(&h, &url, Some("async"));
    assert_eq!(r.status, 200);
    let v = r.json();
    assert!(v["result"].is_null());
    assert_eq!(v["query_status"]["query_async"], true);
    assert_eq!(v["query_status"]["complete"], false);
    assert_eq!(v["query_status"]["insight_id"], id);
    let done = poll_until_complete(&h, &v["query_status"]);
    assert!(!done["query_status"]["results"].is_null());
    assert_eq!(h.calcs(1, id), 1);
    let hit = get(&h, &url, None).json();
    assert_eq!(hit["is_cached"], true);
    assert!(!hit["result"].is_null());
    // Unknown or foreign status ids.
    let unknown = h.get("/api/environments/1/query/ipx_1_00000000000000000000000000000000/", ALL);
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["code"], "not_found");
    let other = h.get(&format!("/api/environments/1/query/{}/", v["query_status"]["id"].as_str().unwrap()), P1);
    assert_eq!(other.status, 404, "another credential cannot poll it");
}

#[test]
fn force_modes_always_calculate() {
    let h = Harness::start();
    let (id, url) = h.day_insight();
    for n in 1..=2 {
        let r = get(&h, &url, Some("force_blocking"));
        assert_eq!(r.json()["is_cached"], false);
        assert!(r.cache_status().contains("fwd=request"));
        assert_eq!(h.calcs(1, id), n);
    }
    // Legacy `true` and an empty value mean force_blocking.
    get(&h, &url, Some("true"));
    get(&h, &url, Some(""));
    assert_eq!(h.calcs(1, id), 4);
    let r = get(&h, &url, Some("force_async")).json();
    assert!(r["result"].is_null());
    assert_eq!(r["query_status"]["complete"], false);
    poll_until_complete(&h, &r["query_status"]);
    assert_eq!(h.calcs(1, id), 5);
}

#[test]
fn async_except_on_cache_miss_calculates_synchronously_on_miss() {
    let h = Harness::start();
    let (id, url) = h.day_insight();
    let v = get(&h, &url, Some("async_except_on_cache_miss")).json();
    assert!(!v["result"].is_null());
    assert_eq!(v["is_cached"], false);
    assert_eq!(h.calcs(1, id), 1);
}

#[test]
fn refresh_in_a_json_body_counts() {
    let h = Harness::start();
    let (id, url) = h.day_insight();
    let r = h.request("GET", &url, &[("Authorization", "Bearer phx_demo_all")], Some(r#"{"refresh":"blocking"}"#));
    assert_eq!(r.json()["is_cached"], false);
    assert_eq!(h.calcs(1, id), 1);
    let bad = h.request("GET", &url, &[("Authorization", "Bearer phx_demo_all")], Some("{not json"));
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["type"], "validation_error");
}

#[test]
fn fifty_concurrent_cold_blocking_requests_make_one_calculation() {
    let h = Harness::with(|_, sim| sim.calc_delay = Duration::from_millis(300));
    let (id, url) = h.day_insight();
    let port = h.proxy_port;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(50));
    let threads: Vec<_> = (0..50)
        .map(|_| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                http(port, "GET", &format!("{url}?refresh=blocking"), &[("Authorization", "Bearer phx_demo_all")], None)
            })
        })
        .collect();
    let replies: Vec<Resp> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(h.calcs(1, id), 1, "exactly one upstream calculation");
    let first = replies[0].json()["last_refresh"].clone();
    for r in &replies {
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["last_refresh"], first);
    }
    assert!(replies.iter().any(|r| r.cache_status().contains("collapsed")));
}

#[test]
fn upstream_faults_are_never_cached() {
    let h = Harness::start();
    let (id, url) = h.day_insight();
    // The upstream's own 5xx answer is relayed; an unusable 200 is the proxy's 502.
    for (fault, status) in [(Fault::Status(500), 500), (Fault::Garbage, 502)] {
        h.sim.set_fault(fault);
        let r = get(&h, &url, Some("blocking"));
        assert_eq!(r.status, status, "{}", r.text());
        let e = r.json();
        assert_eq!(e["type"], "server_error");
        assert!(e.get("attr").is_some());
    }
    // PostHog reports concurrency limits with HTTP 200 and an error status: relayed, not cached.
    h.sim.set_fault(Fault::Concurrency);
    let r = get(&h, &url, Some("blocking"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["query_status"]["error_message"], "concurrency_limit_exceeded");
    h.sim.set_fault(Fault::NullResult);
    let r = get(&h, &url, Some("blocking"));
    assert!(r.json()["result"].is_null());
    h.sim.set_fault(Fault::None);
    let r = get(&h, &url, Some("blocking"));
    // Nothing bad was cached by the proxy: this is fetched and stored now (the upstream kept its
    // own result from the null-result answer, so it says `is_cached: true`, as PostHog would).
    assert!(r.cache_status().contains("; stored"), "{}", r.cache_status());
    assert!(!r.json()["result"].is_null());
    let _ = id;
}

#[test]
fn stale_if_error() {
    let h = Harness::start();
    let (_, url) = h.day_insight();
    let v1 = get(&h, &url, Some("blocking")).json();
    stale(&h);
    h.sim.set_fault(Fault::Status(503));
    let r = get(&h, &url, Some("blocking"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["last_refresh"], v1["last_refresh"]);
    assert!(r.cache_status().contains("stale-if-error"), "{}", r.cache_status());
}

#[test]
fn patch_invalidates_every_entry_of_the_insight() {
    let h = Harness::start();
    let (id, url) = h.day_insight();
    get(&h, &url, Some("blocking"));
    let on_dash = h.get(&format!("{url}?refresh=blocking&filters_override=%7B%22date_from%22%3A%22-3d%22%7D"), ALL);
    assert_eq!(on_dash.status, 200);
    let r =
        h.request("PATCH", &url, &[("Authorization", "Bearer phx_demo_all")], Some(r#"{"name":"Renamed by test"}"#));
    assert_eq!(r.status, 200, "{}", r.text());
    let after = get(&h, &url, None);
    assert_eq!(after.json()["name"], "Renamed by test", "the old cached body is not served");
    assert!(!after.cache_status().contains("; hit"), "{}", after.cache_status());
    // DELETE stays the upstream's 405.
    let del = h.request("DELETE", &url, &[("Authorization", "Bearer phx_demo_all")], None);
    assert_eq!(del.status, 405);
    let _ = id;
}

#[test]
fn list_answers_each_insight_from_the_shared_entries() {
    let h = Harness::start();
    let page = h.get("/api/environments/1/insights/?limit=3&refresh=blocking", ALL);
    assert_eq!(page.status, 200, "{}", page.text());
    let v = page.json();
    let items = v["results"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    for i in items {
        assert!(!i["result"].is_null(), "{i}");
        assert_eq!(h.calcs(1, i["id"].as_u64().unwrap()), 1);
    }
    let next = v["next"].as_str().expect("a next page");
    assert!(next.starts_with(&format!("http://127.0.0.1:{}/", h.proxy_port)), "{next}");
    // The list warmed retrieve.
    let first = items[0]["id"].as_u64().unwrap();
    let r = h.get(&format!("/api/environments/1/insights/{first}/?refresh=blocking"), ALL);
    assert!(r.cache_status().contains("hit"), "{}", r.cache_status());
    assert_eq!(h.calcs(1, first), 1);
    // A plain list is served from the entries, without calculating.
    let again = h.get("/api/environments/1/insights/?limit=3", ALL).json();
    for i in again["results"].as_array().unwrap() {
        assert_eq!(i["is_cached"], true);
        assert_eq!(h.calcs(1, i["id"].as_u64().unwrap()), 1);
    }
}

#[test]
fn credentials_never_share_entries() {
    let h = Harness::start();
    let (id, url) = h.day_insight();
    get(&h, &url, Some("blocking"));
    // A token without access to project 1 gets the upstream's 403, never the cached body.
    let denied = h.get(&format!("{url}?refresh=force_cache"), P2);
    assert_eq!(denied.status, 403, "{}", denied.text());
    assert_eq!(denied.json()["code"], "permission_denied");
    // Another token with access gets its own entry (the upstream's cache answers, no calculation).
    let other = h.get(&format!("{url}?refresh=blocking"), P1);
    assert_eq!(other.status, 200);
    assert!(!other.cache_status().contains("; hit"), "{}", other.cache_status());
    assert_eq!(h.calcs(1, id), 1);
    // No credential: never from the cache; the upstream's 401.
    let anon = h.request("GET", &url, &[], None);
    assert_eq!(anon.status, 401);
    assert!(anon.cache_status().contains("bypass"));
}
