//! The shared Redis tier with proxy replicas in one test, against a real `redis-server` started
//! on a loopback port by the test itself.

mod common;
mod l2_support;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use insights_proxy::clock::Clock;
use insights_proxy::config::Config;
use l2_support::*;

fn cluster(calc_delay: Duration) -> (Redis, Replicas) {
    let redis = Redis::start();
    let replicas = Replicas::start(redis.url(), calc_delay);
    (redis, replicas)
}

#[test]
fn one_calculation_across_replicas_for_a_cold_herd() {
    let (_redis, c) = cluster(Duration::from_millis(400));
    let (id, url) = c.day_insight();
    let ports: Vec<u16> = c.replicas.iter().map(|r| r.port).collect();
    let barrier = Arc::new(std::sync::Barrier::new(100));
    let threads: Vec<_> = (0..100)
        .map(|i| {
            let (url, barrier, port) = (url.clone(), barrier.clone(), ports[i % 2]);
            std::thread::spawn(move || {
                barrier.wait();
                http(port, "GET", &format!("{url}?refresh=blocking"), &[("Authorization", "Bearer phx_demo_all")], None)
            })
        })
        .collect();
    let replies: Vec<Resp> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(c.sim.calculations(1, id), 1, "exactly one upstream calculation across both replicas");
    let first = replies[0].json()["last_refresh"].clone();
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["last_refresh"], first);
    }
}

#[test]
fn a_patch_through_one_replica_is_a_miss_on_the_other() {
    let (_redis, c) = cluster(Duration::from_millis(20));
    let (_, url) = c.day_insight();
    c.get(0, &format!("{url}?refresh=blocking"));
    assert!(c.get(1, &url).cache_status().contains("; hit"), "replica 1 reads the shared entry");
    assert_eq!(c.patch(0, &url, "patched via replica 0").status, 200);
    eventually("the purge reaches replica 1", || !c.get(1, &url).cache_status().contains("; hit"));
    assert_eq!(c.get(1, &url).json()["name"], "patched via replica 0");
}

#[test]
fn a_status_poll_may_land_on_any_replica() {
    let (_redis, c) = cluster(Duration::from_millis(50));
    let (_, url) = c.day_insight();
    let v = c.get(0, &format!("{url}?refresh=async")).json();
    let id = v["query_status"]["id"].as_str().unwrap().to_string();
    eventually("the other replica reports it complete", || {
        let r = c.get(1, &format!("/api/environments/1/query/{id}/"));
        r.status == 200 && r.json()["query_status"]["complete"] == true
    });
}

#[test]
fn a_restarted_replica_serves_hits_from_the_shared_tier_at_once() {
    let (_redis, mut c) = cluster(Duration::from_millis(20));
    let (id, url) = c.day_insight();
    c.get(0, &format!("{url}?refresh=blocking"));
    let old = c.replicas.remove(0);
    drop(old.running);
    drop(old.app);
    let fresh = c.replica(&c.clock);
    let r = http(fresh.port, "GET", &url, &[("Authorization", "Bearer phx_demo_all")], None);
    assert!(r.cache_status().contains("; hit"), "{}", r.cache_status());
    assert!(!r.json()["result"].is_null());
    assert_eq!(c.sim.calculations(1, id), 1);
}

#[test]
fn redis_down_means_l1_and_the_upstream_alone_then_recovery() {
    // The cache tier alone: with the shared budget, misses pause for a third of the slot lease
    // when Redis goes away (tests/shared_budget.rs covers that).
    let mut redis = Redis::start();
    let clock = insights_proxy::clock::Clock::new();
    let per_replica_budget: fn(&mut Config) = |c| c.budget.shared = false;
    let c = Replicas::with(
        redis.url(),
        Duration::from_millis(20),
        clock.clone(),
        vec![clock.clone(), clock],
        per_replica_budget,
    );
    let (id, url) = c.day_insight();
    c.get(0, &format!("{url}?refresh=blocking"));
    c.get(1, &url); // replica 1 now has it in memory too
    redis.kill();
    for i in 0..2 {
        let r = c.get(i, &url);
        assert_eq!(r.status, 200);
        assert!(r.cache_status().contains("; hit"), "{}", r.cache_status());
    }
    // Misses still work, straight from the upstream.
    let other = format!("/api/environments/1/insights/{}/", if id == 1 { 2 } else { 1 });
    for i in 0..2 {
        let r = c.get(i, &format!("{other}?refresh=blocking"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(!r.json()["result"].is_null());
    }
    let admin_port =
        c.replicas[0].app.config.admin_listen.as_deref().unwrap().rsplit(':').next().unwrap().parse().unwrap();
    let ready = http(admin_port, "GET", "/readyz", &[], None);
    assert_eq!(ready.status, 200, "Redis down degrades, it does not make the proxy unready");
    redis.restart();
    // Recovery by itself: writes reach Redis again, and a new replica starts warm from them.
    c.clock.advance(Duration::from_secs(7 * 3600));
    eventually("the shared tier is back", || {
        c.get(0, &format!("{url}?refresh=force_blocking"));
        c.replicas[0].app.cache.l2().is_some_and(|l2| l2.is_up())
    });
    c.get(0, &format!("{url}?refresh=force_blocking"));
    let fresh = c.replica(&c.clock);
    let r = http(fresh.port, "GET", &url, &[("Authorization", "Bearer phx_demo_all")], None);
    assert!(r.cache_status().contains("; hit"), "{}", r.cache_status());
}

/// The one stored entry of `insight` (project 1) in Redis: its key and its value.
fn stored_entry(redis: &mut redis::Connection, insight: u64) -> (String, Vec<u8>) {
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("ipx:{{i1.{insight}}}:e:*")).query(redis).unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let value: Vec<u8> = redis::cmd("GET").arg(&keys[0]).query(redis).unwrap();
    (keys[0].clone(), value)
}

fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = haystack.windows(from.len()).position(|w| w == from).expect("the pattern is in the value");
    [&haystack[..at], to, &haystack[at + from.len()..]].concat()
}

#[test]
fn a_value_written_straight_into_redis_is_never_served() {
    let (redis, c) = cluster(Duration::from_millis(20));
    let insights = c.day_insights();
    let ((x, x_url), (y, y_url)) = (insights[0].clone(), insights[1].clone());
    c.get(0, &format!("{x_url}?refresh=blocking"));
    c.get(0, &format!("{y_url}?refresh=blocking"));
    let mut r = redis.client();
    let (x_key, x_value) = stored_entry(&mut r, x);
    let (y_key, _) = stored_entry(&mut r, y);
    // A forged entry: a real one whose name a writer to Redis changed.
    let name = c.get(0, &x_url).json()["name"].as_str().unwrap().to_string();
    let forged_name = "F".repeat(name.len());
    let forged = replace(&x_value, name.as_bytes(), forged_name.as_bytes());
    let _: () = redis::cmd("SET").arg(&x_key).arg(forged).query(&mut r).unwrap();
    // A real entry moved to another key.
    let _: () = redis::cmd("SET").arg(&y_key).arg(&x_value).query(&mut r).unwrap();

    // Replica 1 never read either: both are misses, answered from the upstream.
    let before = c.sim.requests();
    let rx = c.get(1, &x_url);
    assert_eq!(rx.status, 200, "{}", rx.text());
    assert_eq!(rx.json()["name"], name.as_str(), "never the forged entry");
    assert!(!rx.cache_status().contains("; hit"), "{}", rx.cache_status());
    let ry = c.get(1, &y_url);
    assert_eq!(ry.json()["id"], y, "never another insight's entry: {}", ry.text());
    assert!(!ry.cache_status().contains("; hit"), "{}", ry.cache_status());
    assert_eq!(c.replicas[1].metric_rejected("entry"), 2);
    assert!(c.sim.requests() >= before + 2, "the upstream was asked again for each");
    // A forged purge marker fails closed: a miss, never a resurrection.
    let _: () = redis::cmd("SET")
        .arg(format!("ipx:{{i1.{x}}}:purge"))
        .arg("IPX200000000000000000000junk")
        .query(&mut r)
        .unwrap();
    let fresh = c.replica(&c.clock);
    let r = http(fresh.port, "GET", &x_url, &[("Authorization", "Bearer phx_demo_all")], None);
    assert!(!r.cache_status().contains("; hit"), "{}", r.cache_status());
    assert_eq!(fresh.metric_rejected("purge"), 1);
}

/// A clock `skew_s` seconds away from the upstream's (which runs 10 s ahead of real time, so a
/// replica may lag it).
fn skewed(skew_s: i64) -> Clock {
    let c = Clock::new();
    c.advance(Duration::from_secs((10 + skew_s) as u64));
    c
}

#[test]
fn clock_skew_between_replicas_never_resurrects_a_purged_entry() {
    for skew in [5, -5] {
        let redis = Redis::start();
        let c =
            Replicas::with(redis.url(), Duration::from_millis(20), skewed(0), vec![skewed(skew), skewed(0)], no_tweak);
        let insights = c.day_insights();
        // Both directions: the skewed replica writes and the other purges, then the reverse.
        for (round, (writer, purger)) in [(0, 1), (1, 0)].into_iter().enumerate() {
            let (_, url) = &insights[round];
            c.get(writer, &format!("{url}?refresh=blocking"));
            assert!(c.get(purger, url).cache_status().contains("; hit"), "the entry is shared");
            let name = format!("renamed {skew} {round}");
            assert_eq!(c.patch(purger, url, &name).status, 200);
            eventually("the purge reaches the writer", || !c.get(writer, url).cache_status().contains("; hit"));
            for i in [purger, writer] {
                assert_eq!(c.get(i, url).json()["name"], name.as_str(), "skew {skew}: replica {i} after the purge");
            }
            // A replica that starts now reads only the shared tier: the write after the purge
            // counts, the one before it never comes back.
            let fresh = c.replica(&skewed(-skew));
            let r = http(fresh.port, "GET", url, &[("Authorization", "Bearer phx_demo_all")], None);
            assert_eq!(r.json()["name"], name.as_str(), "skew {skew}");
            assert!(
                r.cache_status().contains("; hit"),
                "the entry written after the purge is shared: {}",
                r.cache_status()
            );
        }
    }
}

fn trust_window(c: &mut Config) {
    c.revalidate_after = Duration::from_secs(60);
}

#[test]
fn one_replicas_word_on_a_credential_counts_for_every_replica() {
    let redis = Redis::start();
    let clock = Clock::new();
    let c =
        Replicas::with(redis.url(), Duration::from_millis(20), clock.clone(), vec![clock.clone(), clock], trust_window);
    let key = "phx_l2_shared_trust";
    c.sim.set_project_access(key, 1, true);
    let insights = c.day_insights();
    let ((_, url), (_, other)) = (insights[0].clone(), insights[1].clone());
    assert_eq!(c.get_as(0, &format!("{url}?refresh=blocking"), key).status, 200);
    // Past replica 0's own confirmation window as far as replica 1's memory goes: it never
    // confirmed this key itself, and the shared confirmation stands in for a revalidation.
    let before = c.sim.requests();
    let r = c.get_as(1, &url, key);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.cache_status().contains("; hit"), "{}", r.cache_status());
    assert_eq!(c.sim.requests(), before, "replica 1 served without asking the upstream");
    assert_eq!(c.replicas[1].revalidations(), 0);

    // Revoked upstream; replica 0 learns it from a miss.
    c.sim.revoke_token(key);
    assert_eq!(c.get_as(0, &format!("{other}?refresh=blocking"), key).status, 401);
    let before = c.sim.requests();
    eventually("replica 1 refuses the revoked key", || {
        let r = c.get_as(1, &url, key);
        r.status == 401 && r.json().get("result").is_none()
    });
    assert_eq!(c.sim.requests(), before, "replica 1 refused from what replica 0 heard");
}
