//! Redis on loopback ports for the shared-tier tests (a three-node Cluster, a master watched by a
//! Sentinel; one node is `common::Redis`), each torn down when dropped, and proxy
//! replicas in front of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use insights_proxy::app::App;
use insights_proxy::clock::Clock;
use insights_proxy::config::{Config, L2Settings};
use posthog_sim::serve::free_port;
use posthog_sim::testing::Running;
use posthog_sim::{SimConfig, Simulator};

pub const SECRET: &str = "a-shared-partition-secret-for-tests";

/// A scratch directory removed on drop (cluster and sentinel config files live there).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("ipx-{name}-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn redis_server(args: &[&str]) -> ChildGuard {
    let child = Command::new("redis-server")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed (scripts/setup.sh installs it)");
    ChildGuard(child)
}

pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli").arg("-p").arg(port.to_string()).args(args).output().expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A three-node Redis Cluster (no replicas), slots spread by `redis-cli --cluster create`.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    _nodes: Vec<ChildGuard>,
    _dir: Scratch,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let dir = Scratch::new("cluster");
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let nodes = ports
            .iter()
            .map(|p| {
                let conf = dir.0.join(format!("nodes-{p}.conf"));
                let (port, bus) = (p.to_string(), free_port().to_string());
                let node = redis_server(&[
                    "--port",
                    &port,
                    "--cluster-port",
                    &bus,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    conf.to_str().unwrap(),
                    "--dir",
                    dir.0.to_str().unwrap(),
                ]);
                wait_for_port(*p);
                node
            })
            .collect();
        let mut create = vec!["--cluster".to_string(), "create".to_string()];
        create.extend(ports.iter().map(|p| format!("127.0.0.1:{p}")));
        create.extend(["--cluster-replicas", "0", "--cluster-yes"].map(String::from));
        let create: Vec<&str> = create.iter().map(String::as_str).collect();
        cli(ports[0], &create);
        for p in &ports {
            eventually("the cluster is ok on every node", || {
                cli(*p, &["cluster", "info"]).contains("cluster_state:ok")
            });
        }
        RedisCluster { ports, _nodes: nodes, _dir: dir }
    }

    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("redis+cluster://{}", seeds.join(","))
    }
}

/// A Redis master watched by one Sentinel (`redis-server --sentinel`) under the name `mymaster`.
pub struct RedisSentinel {
    pub master: Redis,
    pub port: u16,
    _sentinel: ChildGuard,
    _dir: Scratch,
}

impl RedisSentinel {
    pub fn start() -> RedisSentinel {
        let master = Redis::start();
        let dir = Scratch::new("sentinel");
        let port = free_port();
        let conf = dir.0.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {} 1\n",
                dir.0.display(),
                master.port
            ),
        )
        .unwrap();
        let sentinel = redis_server(&[conf.to_str().unwrap(), "--sentinel"]);
        wait_for_port(port);
        eventually("the sentinel knows the master", || {
            cli(port, &["sentinel", "get-master-addr-by-name", "mymaster"]).contains(&master.port.to_string())
        });
        RedisSentinel { master, port, _sentinel: sentinel, _dir: dir }
    }

    pub fn url(&self) -> String {
        format!("redis+sentinel://127.0.0.1:{}/mymaster", self.port)
    }
}

pub struct Replica {
    pub port: u16,
    pub app: Arc<App>,
    pub running: Option<Running>,
}

impl Replica {
    pub fn metric_rejected(&self, kind: &str) -> u64 {
        self.app.metrics.l2().rejected.with_label_values(&[kind]).get()
    }

    pub fn revalidations(&self) -> u64 {
        self.app.metrics.revalidations.get()
    }
}

/// Proxy replicas sharing one simulated upstream and one shared tier.
pub struct Replicas {
    pub clock: Clock,
    pub sim: Simulator,
    pub sim_port: u16,
    pub url: String,
    pub replicas: Vec<Replica>,
    tweak: fn(&mut Config),
    _backend: Running,
}

pub fn no_tweak(_: &mut Config) {}

impl Replicas {
    /// Two replicas on the clock the upstream uses.
    pub fn start(url: String, calc_delay: Duration) -> Replicas {
        let clock = Clock::new();
        Replicas::with(url, calc_delay, clock.clone(), vec![clock.clone(), clock], no_tweak)
    }

    /// Replicas on their own clocks (one per replica; the upstream uses `clock`).
    pub fn with(
        url: String,
        calc_delay: Duration,
        clock: Clock,
        clocks: Vec<Clock>,
        tweak: fn(&mut Config),
    ) -> Replicas {
        let sim = Simulator::new(SimConfig { calc_delay, ..SimConfig::default() }, clock.clone());
        let sim_port = free_port();
        let backend = start_backend(&sim, sim_port);
        let mut r = Replicas { clock, sim, sim_port, url, replicas: Vec::new(), tweak, _backend: backend };
        for c in clocks {
            let replica = r.replica(&c);
            r.replicas.push(replica);
        }
        r
    }

    /// One more replica (not added to the list), on `clock`.
    pub fn replica(&self, clock: &Clock) -> Replica {
        let port = free_port();
        let mut c = test_config(port, self.sim_port);
        c.partition_secret = Some(SECRET.into());
        c.l2 = Some(L2Settings {
            url: self.url.clone(),
            prefix: "ipx:".into(),
            timeout: Duration::from_millis(200),
            ttl: Duration::from_secs(600),
            lease: Duration::from_secs(5),
            wait_poll: Duration::from_millis(200),
        });
        // As a file with [l2] configures it: the budget is the cluster's.
        c.budget.shared = true;
        (self.tweak)(&mut c);
        let (running, app) = start_proxy(c, clock.clone());
        Replica { port, app, running: Some(running) }
    }

    pub fn get(&self, i: usize, path: &str) -> Resp {
        self.get_as(i, path, ALL)
    }

    pub fn get_as(&self, i: usize, path: &str, token: &str) -> Resp {
        http(self.replicas[i].port, "GET", path, &[("Authorization", &format!("Bearer {token}"))], None)
    }

    pub fn patch(&self, i: usize, path: &str, name: &str) -> Resp {
        http(
            self.replicas[i].port,
            "PATCH",
            path,
            &[("Authorization", "Bearer phx_demo_all")],
            Some(&format!(r#"{{"name":"{name}"}}"#)),
        )
    }

    /// Insights of project 1 with a daily interval and a moving date range (fresh for hours).
    pub fn day_insights(&self) -> Vec<(u64, String)> {
        let list = http(
            self.sim_port,
            "GET",
            "/api/environments/1/insights/?basic=true&limit=100",
            &[("Authorization", "Bearer phx_demo_all")],
            None,
        )
        .json();
        list["results"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| {
                i["query"]["source"]["interval"] == "day" && i["query"]["source"]["dateRange"]["date_to"].is_null()
            })
            .filter_map(|i| i["id"].as_u64())
            .map(|id| (id, format!("/api/environments/1/insights/{id}/")))
            .collect()
    }

    pub fn day_insight(&self) -> (u64, String) {
        self.day_insights().remove(0)
    }
}
