//! The shared tier on a real three-node Redis Cluster and on a master found through a Sentinel,
//! each started on loopback ports by the test and torn down after it.

mod common;
mod l2_support;

use std::time::Duration;

use common::*;
use l2_support::*;

/// What replicas share, whatever the topology: one calculation for a herd on both replicas, a
/// purge through one seen by the other (pub/sub and markers), a status polled on either, and a
/// new replica warm from the shared tier.
fn replicas_share_the_tier(c: &Replicas) {
    let insights = c.day_insights();
    let (id, url) = insights[0].clone();
    let threads: Vec<_> = (0..20)
        .map(|i| {
            let (url, port) = (url.clone(), c.replicas[i % 2].port);
            std::thread::spawn(move || {
                http(port, "GET", &format!("{url}?refresh=blocking"), &[("Authorization", "Bearer phx_demo_all")], None)
            })
        })
        .collect();
    for t in threads {
        let r = t.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(c.sim.calculations(1, id), 1, "one calculation across both replicas");
    assert!(c.get(1, &url).cache_status().contains("; hit"));
    assert_eq!(c.patch(0, &url, "patched on one replica").status, 200);
    eventually("the purge reaches replica 1", || !c.get(1, &url).cache_status().contains("; hit"));
    assert_eq!(c.get(1, &url).json()["name"], "patched on one replica");

    let (_, other) = insights[1].clone();
    let v = c.get(0, &format!("{other}?refresh=async")).json();
    let status = v["query_status"]["id"].as_str().unwrap().to_string();
    eventually("the other replica reports it complete", || {
        let r = c.get(1, &format!("/api/environments/1/query/{status}/"));
        r.status == 200 && r.json()["query_status"]["complete"] == true
    });

    let fresh = c.replica(&c.clock);
    let r = http(fresh.port, "GET", &other, &[("Authorization", "Bearer phx_demo_all")], None);
    assert!(r.cache_status().contains("; hit"), "{}", r.cache_status());
    for r in c.replicas.iter().chain([&fresh]) {
        assert!(r.app.cache.l2().unwrap().is_up());
        assert_eq!(r.app.cache.l2().unwrap().errors.load(std::sync::atomic::Ordering::Relaxed), 0, "no failed call");
    }
    // The replicas that calculated took their budget from the same Redis, not a local share.
    for r in &c.replicas {
        let (up, _) = r.app.engine.budget_sharing().expect("the shared budget with [l2]");
        assert!(up, "the budget is the cluster's, through the same connection");
    }
}

#[test]
fn replicas_share_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let c = Replicas::start(cluster.url(), Duration::from_millis(300));
    replicas_share_the_tier(&c);
    // The keys really are spread over the nodes.
    let holding = cluster.ports.iter().filter(|p| cli(**p, &["dbsize"]).trim() != "0").count();
    assert!(holding >= 2, "keys on {holding} node(s)");
}

#[test]
fn replicas_share_the_master_a_sentinel_names() {
    let sentinel = RedisSentinel::start();
    let c = Replicas::start(sentinel.url(), Duration::from_millis(300));
    replicas_share_the_tier(&c);
    assert_ne!(cli(sentinel.master.port, &["dbsize"]).trim(), "0", "the data is on the master");
}
