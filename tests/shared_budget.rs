//! One upstream budget for the whole cluster (`[budget] shared`): replicas take the same rate
//! tokens and the same calculation slots from one Redis, fall back to their share while it is
//! down, and get a crashed replica's slots back within the lease. Against a real `redis-server`
//! the test starts on a loopback port, and the simulator's own throttle and concurrency counters.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use insights_proxy::app::App;
use insights_proxy::auth::Principal;
use insights_proxy::budget::{Budget, Priority};
use insights_proxy::cache::PartitionKeyer;
use insights_proxy::clock::Clock;
use insights_proxy::config::{BudgetSettings, Config};
use posthog_sim::serve::free_port;
use posthog_sim::testing::Running;
use posthog_sim::{SimConfig, Simulator};

/// PostHog's limits: 3 calculations per project, 240/minute and 1200/hour per key.
fn posthog_budget(lease: Duration) -> BudgetSettings {
    BudgetSettings {
        project_concurrency: 3,
        per_minute: Some(240),
        per_hour: Some(1200),
        wait: Duration::from_millis(300),
        forced_reserve_percent: 25,
        shared: true,
        slot_lease: lease,
        assumed_replicas: 1,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Takes tokens without waiting until the key has none: how many it got.
async fn drain(b: &Budget, key: &Principal) -> usize {
    let mut n = 0;
    while n < 1000 && b.rate_token(key, Duration::ZERO, false).await.is_ok() {
        n += 1;
    }
    n
}

const LEASE: Duration = Duration::from_millis(1500);

/// Two replicas' budgets on the Redis at `port` (slot lease [`LEASE`]), and an API key.
fn two_replicas(port: u16) -> (Arc<Budget>, Arc<Budget>, Principal) {
    let settings = posthog_budget(LEASE);
    let budget = || Budget::new(settings, Some(&l2_settings(port))).unwrap();
    let keyer = PartitionKeyer::new(Some("a-shared-partition-secret-for-tests"));
    (budget(), budget(), Principal::api_key(&keyer, "phx_k"))
}

#[test]
fn replicas_take_from_one_bucket_per_key() {
    let redis = Redis::start();
    let rt = runtime();
    rt.block_on(async {
        let (a, b, key) = two_replicas(redis.port);
        let started = Instant::now();
        let (from_a, from_b) = (drain(&a, &key).await, drain(&b, &key).await);
        // The burst is a quarter of 240/minute; refill is 3/s while the test runs.
        let refill = (started.elapsed().as_secs_f64() * 3.0).ceil() as usize;
        assert!((60..=60 + refill).contains(&(from_a + from_b)), "{from_a} + {from_b}");
        assert!(from_b <= refill, "the second replica found the bucket the first one spent: {from_b}");
        assert_eq!(a.shared_up(), Some(true));
        // Another key has its own bucket.
        let keyer = PartitionKeyer::new(Some("a-shared-partition-secret-for-tests"));
        assert!(drain(&b, &Principal::api_key(&keyer, "phx_other")).await >= 60);
    });
}

#[test]
fn slots_go_by_priority_across_replicas_and_a_crashed_replicas_come_back_within_the_lease() {
    let redis = Redis::start();
    let lease = Duration::from_secs(1);
    let settings = posthog_budget(lease);
    // Replica A takes two slots and crashes: its runtime (and the task renewing them) is gone,
    // the slots never released.
    {
        let rt = runtime();
        rt.block_on(async {
            let a = Budget::new(settings, Some(&l2_settings(redis.port))).unwrap();
            for _ in 0..2 {
                std::mem::forget(a.slot(1, Priority::Blocking, Duration::ZERO).await.unwrap());
            }
        });
    }
    let rt = runtime();
    rt.block_on(async {
        let b = Budget::new(settings, Some(&l2_settings(redis.port))).unwrap();
        // Two of three held: refresh-ahead may bring the cluster to 1, async work to 2, clients to 3.
        assert!(b.slot(1, Priority::Ahead, Duration::ZERO).await.is_err());
        assert!(b.slot(1, Priority::Async, Duration::ZERO).await.is_err());
        let third = b.slot(1, Priority::Blocking, Duration::ZERO).await.unwrap();
        assert!(b.slot(1, Priority::Blocking, Duration::ZERO).await.is_err(), "3 across the cluster");
        assert!(b.slot(2, Priority::Ahead, Duration::ZERO).await.is_ok(), "another project's slots are its own");
        let started = Instant::now();
        let back = b.slot(1, Priority::Blocking, lease * 3).await;
        assert!(back.is_ok(), "the crashed replica's slot came back");
        assert!(started.elapsed() <= lease + Duration::from_millis(500), "within the lease: {:?}", started.elapsed());
        drop(third);
        drop(back);
    });
}

#[test]
fn without_redis_each_replica_has_its_share_and_the_outage_is_charged_when_it_is_back() {
    let mut redis = Redis::start();
    let rt = runtime();
    rt.block_on(async {
        let (a, b, key) = two_replicas(redis.port);
        // Both heartbeats: each sees 2 live replicas.
        let beats = |a: Arc<Budget>, b: Arc<Budget>| async move {
            for _ in 0..2 {
                tokio::select! { _ = a.membership() => {}, _ = tokio::time::sleep(Duration::from_millis(50)) => {} }
                tokio::select! { _ = b.membership() => {}, _ = tokio::time::sleep(Duration::from_millis(50)) => {} }
            }
        };
        beats(a.clone(), b.clone()).await;
        redis.kill();
        // Each replica: half of the key's rate (a burst of 30), and of the project's 3 slots 2 for
        // one, 1 for the other.
        let outage = Instant::now();
        let (from_a, from_b) = (drain(&a, &key).await, drain(&b, &key).await);
        assert_eq!(a.shared_up(), Some(false));
        let refill = (outage.elapsed().as_secs_f64() * 1.5).ceil() as usize;
        assert!((30..=30 + refill).contains(&from_a) && (30..=30 + refill).contains(&from_b), "{from_a}, {from_b}");
        // No slot at first: what other replicas ran when Redis went down is unknown for a third
        // of the lease.
        assert!(a.slot(1, Priority::Blocking, Duration::ZERO).await.is_err());
        let mut slots = Vec::new();
        for budget in [&a, &b] {
            slots.push(budget.slot(1, Priority::Blocking, LEASE).await.expect("a slot after a third of the lease"));
            while let Ok(s) = budget.slot(1, Priority::Blocking, Duration::ZERO).await {
                slots.push(s);
                assert!(slots.len() <= 3, "never more than the cluster's slots");
            }
        }
        assert_eq!(slots.len(), 3, "the shares add up to the cluster's slots");
        drop(slots);
        redis.restart();
        let back = Instant::now();
        beats(a.clone(), b.clone()).await;
        assert_eq!(a.shared_up(), Some(true), "back on the shared budget");
        // The fresh bucket (60) is charged the 60 spent during the outage: only the refill since is left.
        let after = drain(&a, &key).await + drain(&b, &key).await;
        let refill = (back.elapsed().as_secs_f64() * 3.0).ceil() as usize;
        assert!(after <= refill, "{after} calls after the outage, {refill} refilled");
    });
}

struct Replica {
    port: u16,
    app: Arc<App>,
    running: Option<Running>,
}

fn replica(sim_port: u16, redis_port: u16, clock: &Clock, shared: bool, lease: Duration) -> Replica {
    let port = free_port();
    let mut c: Config = test_config(port, sim_port);
    c.partition_secret = Some("a-shared-partition-secret-for-tests".into());
    c.l2 = Some(l2_settings(redis_port));
    c.budget = BudgetSettings { shared, ..posthog_budget(lease) };
    let (running, app) = start_proxy(c, clock.clone());
    Replica { port, app, running: Some(running) }
}

struct Cluster {
    sim: Simulator,
    redis: std::sync::Mutex<Redis>,
    replicas: Vec<Replica>,
    _backend: Running,
}

impl Cluster {
    /// Three replicas, one Redis, one simulator with PostHog's limits.
    fn start(shared: bool, calc_delay: Duration, lease: Duration) -> Cluster {
        let clock = Clock::new();
        let sim_cfg =
            SimConfig { calc_delay, concurrency_limit: Some(3), rate_limit: Some((240, 1200)), ..SimConfig::default() };
        let sim = Simulator::new(sim_cfg, clock.clone());
        let sim_port = free_port();
        let backend = start_backend(&sim, sim_port);
        let redis = Redis::start();
        let replicas = (0..3).map(|_| replica(sim_port, redis.port, &clock, shared, lease)).collect();
        Cluster { sim, redis: std::sync::Mutex::new(redis), replicas, _backend: backend }
    }

    fn get(&self, i: usize, path: &str) -> Resp {
        http(self.replicas[i].port, "GET", path, &[("Authorization", "Bearer phx_demo_all")], None)
    }
}

/// The balancer: 70 % of requests to replica 0, 20 % to 1, 10 % to 2.
fn skewed(n: usize) -> usize {
    match n % 10 {
        0..=6 => 0,
        7 | 8 => 1,
        _ => 2,
    }
}

const INSIGHTS: u64 = 12;
const CLIENTS: usize = 8;

/// Forced recalculations of 12 insights from 8 clients through the skewed balancer, `total`
/// requests at most and 60 s at most; `during(n)` runs on one client before request n. With
/// `strict`, every answer must be 200 with a result (cached ones stand in when the budget is spent).
fn load(c: &Cluster, total: usize, strict: bool, during: impl Fn(usize) + Sync) {
    // Every replica holds every insight (the shared tier's, and its own copy once read): what
    // stands in when the budget is spent, also after Redis restarts empty.
    for i in 0..c.replicas.len() {
        for insight in 1..=INSIGHTS {
            let r = c.get(i, &format!("/api/environments/1/insights/{insight}/?refresh=blocking"));
            assert!(!r.json()["result"].is_null(), "{}", r.text());
        }
    }
    let next = AtomicUsize::new(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let failed = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..CLIENTS {
            s.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total || Instant::now() > deadline || failed.load(Ordering::Relaxed) {
                    return;
                }
                during(n);
                let insight = 1 + (n as u64 * 7) % INSIGHTS;
                let r = c.get(skewed(n), &format!("/api/environments/1/insights/{insight}/?refresh=force_blocking"));
                if strict && (r.status != 200 || r.json()["result"].is_null()) {
                    failed.store(true, Ordering::Relaxed);
                    panic!("request {n}: {} {} {}", r.status, r.cache_status(), r.text());
                }
            });
        }
    });
    assert!(next.load(Ordering::Relaxed) >= total, "the load finished within its time bound");
}

#[test]
fn a_skewed_cluster_stays_inside_posthogs_limits_through_a_redis_outage() {
    let c = Cluster::start(true, Duration::from_millis(100), Duration::from_secs(5));
    load(&c, 240, true, |n| match n {
        80 => c.redis.lock().unwrap().kill(),
        160 => c.redis.lock().unwrap().restart(),
        _ => {}
    });
    eventually("every replica is back on the shared budget", || {
        c.replicas.iter().all(|r| r.app.engine.budget_shared_up() == Some(true))
    });
    assert_eq!(c.sim.throttled(), 0, "never throttled by the upstream");
    assert_eq!(c.sim.limit_errors(), 0, "never over the upstream's concurrency limit");
    // The shared budget resumed: the key's bucket is in the restarted Redis again.
    let port = c.redis.lock().unwrap().port;
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap().get_connection().unwrap();
    eventually("the key's bucket is back in Redis", || {
        c.get(1, "/api/environments/1/insights/3/?refresh=force_blocking");
        let keys: Vec<String> = redis::cmd("KEYS").arg("ipx:budget:rate:*").query(&mut conn).unwrap();
        !keys.is_empty()
    });
}

#[test]
fn the_busy_replica_uses_the_budget_its_idle_peers_do_not() {
    let c = Cluster::start(true, Duration::from_millis(50), Duration::from_secs(5));
    let started = Instant::now();
    load(&c, 150, true, |_| {});
    let secs = started.elapsed().as_secs_f64();
    let forced = |i: usize| c.replicas[i].app.metrics.calculations.with_label_values(&["forced"]).get();
    // A third of the key's rate per replica (the old advice) would have given replica 0 a burst
    // of 20 (15 for forced calls, the reserve left) and 1 more a second.
    let a_third = 15.0 + secs;
    assert!(forced(0) as f64 > a_third, "replica 0 calculated {} times in {secs:.1} s", forced(0));
    assert_eq!((c.sim.throttled(), c.sim.limit_errors()), (0, 0));
}

#[test]
fn per_replica_budgets_overrun_the_upstreams_concurrency_limit() {
    // The same load without `shared`: three replicas with three slots each make the upstream
    // refuse calculations (what the shared budget's test above asserts never happens).
    let c = Cluster::start(false, Duration::from_millis(100), Duration::from_secs(5));
    load(&c, 120, false, |_| {});
    assert!(c.sim.limit_errors() > 0, "nine slots for a project whose limit is three");
}

#[test]
fn a_stopped_replicas_slots_come_back_within_the_lease() {
    let lease = Duration::from_secs(2);
    let mut c = Cluster::start(true, Duration::from_millis(500), lease);
    // Replica 2 runs three calculations (every slot of project 1), then stops mid-way, as a
    // crash would: its calculations go on upstream, its slots are never given back.
    let port = c.replicas[2].port;
    let busy: Vec<_> = (1..=3)
        .map(|insight| {
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                let req = request_bytes(
                    "GET",
                    &format!("/api/environments/1/insights/{insight}/?refresh=blocking"),
                    "127.0.0.1",
                    &[("Authorization", "Bearer phx_demo_all"), ("Connection", "close")],
                    None,
                );
                std::io::Write::write_all(&mut s, &req).unwrap();
                let _ = std::io::Read::read_to_end(&mut s, &mut Vec::new());
            })
        })
        .collect();
    eventually("replica 2 holds every slot", || c.replicas[2].app.engine.slots_taken(1) == 3);
    let stopped = Instant::now();
    let gone = c.replicas.remove(2);
    drop(gone.running);
    drop(gone.app);
    for t in busy {
        t.join().unwrap();
    }
    let port = c.redis.lock().unwrap().port;
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap().get_connection().unwrap();
    let held = |conn: &mut redis::Connection| -> usize {
        let now: (u64, u64) = redis::cmd("TIME").query(conn).unwrap();
        let now_ms = now.0 * 1000 + now.1 / 1000;
        redis::cmd("ZCOUNT").arg("ipx:budget:slots:1").arg(now_ms).arg("+inf").query(conn).unwrap()
    };
    assert!(within(lease * 3, || held(&mut conn) == 0), "the stopped replica's slots came back");
    let at = stopped.elapsed();
    assert!(at <= lease + Duration::from_millis(500), "within the lease: {at:?}");
    // A blocking client on replica 0 now gets a slot and calculates.
    let r = c.get(0, "/api/environments/1/insights/4/?refresh=blocking");
    assert!(!r.json()["result"].is_null(), "{}", r.text());
    // An async calculation on a live replica completes: no status stays running.
    let v = c.get(1, "/api/environments/1/insights/5/?refresh=async").json();
    let id = v["query_status"]["id"].as_str().expect("an async status").to_string();
    eventually("the async status completes", || {
        let r = c.get(0, &format!("/api/environments/1/query/{id}/"));
        r.status == 200 && r.json()["query_status"]["complete"] == true
    });
    assert_eq!(c.sim.limit_errors(), 0);
}
