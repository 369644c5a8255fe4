//! What the shared budget (`[budget] shared`) adds to an upstream call: a miss takes a rate token
//! (one script, one round trip to Redis) and a calculation slot (one round trip to claim; the
//! release and renewals run in the background), next to the same steps on the per-replica budget.
//! Cache hits never touch the budget.
//!
//! Starts its own `redis-server` on a loopback port (scripts/setup.sh installs it).
//! Run: `CARGO_INCREMENTAL=0 cargo bench --bench shared_budget` (about 30 s).
// The budget's Redis connection (one node, a Cluster or a Sentinel) makes deep future types.
#![recursion_limit = "256"]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};

use insights_proxy::auth::Principal;
use insights_proxy::budget::{Budget, Priority};
use insights_proxy::cache::PartitionKeyer;
use insights_proxy::config::{BudgetSettings, L2Settings};
use posthog_sim::serve::free_port;

struct RedisServer(Child);

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_server(port: u16) -> RedisServer {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed (scripts/setup.sh installs it)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    RedisServer(child)
}

fn settings(shared: bool) -> BudgetSettings {
    BudgetSettings {
        project_concurrency: 3,
        // Limits no benchmark loop reaches: every call is taken, none waits.
        per_minute: Some(u32::MAX / 2),
        per_hour: Some(u32::MAX / 2),
        wait: Duration::from_secs(1),
        forced_reserve_percent: 25,
        shared,
        slot_lease: Duration::from_secs(30),
        assumed_replicas: 1,
    }
}

fn bench(c: &mut Criterion) {
    let port = free_port();
    let _redis = redis_server(port);
    let l2 = L2Settings {
        url: format!("redis://127.0.0.1:{port}/0"),
        prefix: "bench:".into(),
        timeout: Duration::from_millis(200),
        ttl: Duration::from_secs(600),
        lease: Duration::from_secs(5),
        wait_poll: Duration::from_millis(200),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let key = Principal::api_key(&PartitionKeyer::new(Some("bench-partition-secret")), "phx_bench");
    let mut g = c.benchmark_group("budget");
    for (name, shared) in [("local", false), ("shared", true)] {
        let budget = Budget::new(settings(shared), Some(&l2)).unwrap();
        g.bench_function(format!("{name}/rate_token"), |b| {
            b.iter(|| rt.block_on(budget.rate_token(&key, Duration::ZERO, false)).unwrap())
        });
        // A project per iteration: a slot's release runs in the background and must not make the
        // next claim wait for it.
        let mut project = 0;
        g.bench_function(format!("{name}/slot"), |b| {
            b.iter(|| {
                project += 1;
                drop(rt.block_on(budget.slot(project, Priority::Blocking, Duration::from_secs(1))).unwrap())
            })
        });
        g.bench_function(format!("{name}/miss"), |b| {
            b.iter(|| {
                project += 1;
                rt.block_on(async {
                    budget.rate_token(&key, Duration::ZERO, false).await.unwrap();
                    drop(budget.slot(project, Priority::Blocking, Duration::from_secs(1)).await.unwrap());
                })
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = shared_budget;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(shared_budget);
