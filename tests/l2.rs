//! The shared Redis tier with two proxy replicas in one test, against a real
//! `redis-server` started on a loopback port by the test itself.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use insights_proxy::app::App;
use insights_proxy::clock::Clock;
use insights_proxy::server::{free_port, Running};
use insights_proxy::simulate::{SimConfig, Simulator};

struct Replica {
    port: u16,
    app: Arc<App>,
    running: Option<Running>,
}

struct Cluster {
    clock: Clock,
    sim: Simulator,
    redis: Redis,
    sim_port: u16,
    replicas: Vec<Replica>,
    _backend: Running,
}

fn replica(sim_port: u16, redis_port: u16, clock: &Clock) -> Replica {
    let port = free_port();
    let mut c = test_config(port, sim_port);
    c.partition_secret = Some("a-shared-partition-secret-for-tests".into());
    c.l2 = Some(l2_settings(redis_port));
    let (running, app) = start_proxy(c, clock.clone());
    Replica { port, app, running: Some(running) }
}

impl Cluster {
    fn start(calc_delay: Duration) -> Cluster {
        let clock = Clock::new();
        let sim = Simulator::new(SimConfig { calc_delay, ..SimConfig::default() }, clock.clone());
        let sim_port = free_port();
        let backend = start_backend(&sim, sim_port);
        let redis = Redis::start();
        let replicas = (0..2).map(|_| replica(sim_port, redis.port, &clock)).collect();
        Cluster { clock, sim, redis, sim_port, replicas, _backend: backend }
    }

    fn get(&self, i: usize, path: &str) -> Resp {
        http(self.replicas[i].port, "GET", path, &[("Authorization", "Bearer phx_demo_all")], None)
    }

    fn day_insight(&self) -> (u64, String) {
        let list = http(
            self.sim_port,
            "GET",
            "/api/environments/1/insights/?basic=true&limit=100",
            &[("Authorization", "Bearer phx_demo_all")],
            None,
        )
        .json();
        let id = list["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| {
                i["query"]["source"]["interval"] == "day" && i["query"]["source"]["dateRange"]["date_to"].is_null()
            })
            .and_then(|i| i["id"].as_u64())
            .unwrap();
        (id, format!("/api/environments/1/insights/{id}/"))
    }
}

#[test]
fn one_calculation_across_replicas_for_a_cold_herd() {
    let c = Cluster::start(Duration::from_millis(400));
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
    let c = Cluster::start(Duration::from_millis(20));
    let (_, url) = c.day_insight();
    c.get(0, &format!("{url}?refresh=blocking"));
    assert!(c.get(1, &url).cache_status().contains("; hit"), "replica 1 reads the shared entry");
    let r = http(
        c.replicas[0].port,
        "PATCH",
        &url,
        &[("Authorization", "Bearer phx_demo_all")],
        Some(r#"{"name":"patched via replica 0"}"#),
    );
    assert_eq!(r.status, 200);
    eventually("the purge reaches replica 1", || !c.get(1, &url).cache_status().contains("; hit"));
    assert_eq!(c.get(1, &url).json()["name"], "patched via replica 0");
}

#[test]
fn a_status_poll_may_land_on_any_replica() {
    let c = Cluster::start(Duration::from_millis(50));
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
    let mut c = Cluster::start(Duration::from_millis(20));
    let (id, url) = c.day_insight();
    c.get(0, &format!("{url}?refresh=blocking"));
    let old = c.replicas.remove(0);
    drop(old.running);
    drop(old.app);
    let fresh = replica(c.sim_port, c.redis.port, &c.clock);
    let r = http(fresh.port, "GET", &url, &[("Authorization", "Bearer phx_demo_all")], None);
    assert!(r.cache_status().contains("; hit"), "{}", r.cache_status());
    assert!(!r.json()["result"].is_null());
    assert_eq!(c.sim.calculations(1, id), 1);
}

#[test]
fn redis_down_means_l1_and_the_upstream_alone_then_recovery() {
    let mut c = Cluster::start(Duration::from_millis(20));
    let (id, url) = c.day_insight();
    c.get(0, &format!("{url}?refresh=blocking"));
    c.get(1, &url); // replica 1 now has it in memory too
    c.redis.kill();
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
    c.redis.restart();
    // Recovery by itself: writes reach Redis again, and a new replica starts warm from them.
    c.clock.advance(Duration::from_secs(7 * 3600));
    eventually("the shared tier is back", || {
        c.get(0, &format!("{url}?refresh=force_blocking"));
        c.replicas[0].app.cache.l2().is_some_and(|l2| l2.is_up())
    });
    c.get(0, &format!("{url}?refresh=force_blocking"));
    let fresh = replica(c.sim_port, c.redis.port, &c.clock);
    let r = http(fresh.port, "GET", &url, &[("Authorization", "Bearer phx_demo_all")], None);
    assert!(r.cache_status().contains("; hit"), "{}", r.cache_status());
}
