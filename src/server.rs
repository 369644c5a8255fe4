//! Assembling pingora services (proxy, background workers, optional simulated backend) and running
//! them until a shutdown signal. Tests use [`Running`] to start servers in-process on ephemeral
//! ports and stop them through a channel instead of process signals.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use pingora::prelude::background_service;
use pingora::proxy::http_proxy;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};

use crate::admin::AdminApp;
use crate::app::App;
use crate::clock::Clock;
use crate::config::{Config, UpstreamTarget, UpstreamUrl};
use crate::engine::workers::Workers;
use crate::fast::FastPath;
use crate::proxy::InsightsProxy;
use crate::simulate::{SimConfig, Simulator};
use crate::upstream::{UpstreamClient, UpstreamSettings};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
}

/// pingora's defaults would make a SIGTERM take 5 minutes (docs/design.md, "pingora facts" 2): set both.
pub fn server_conf(config: &Config) -> ServerConf {
    ServerConf {
        threads: config.threads,
        grace_period_seconds: Some(config.grace_period.as_secs_f64().ceil() as u64),
        graceful_shutdown_timeout_seconds: Some(config.shutdown_timeout.as_secs_f64().ceil().max(1.0) as u64),
        ..Default::default()
    }
}

/// pingora retries a busy port for 30 s and then panics inside its runtime, leaving a process with
/// no listener (docs/design.md, "pingora facts" 3): check first and fail clearly.
pub fn check_bind(addr: &str) -> Result<SocketAddr, StartError> {
    let l = TcpListener::bind(addr).map_err(|source| StartError::Bind { addr: addr.to_string(), source })?;
    l.local_addr().map_err(|source| StartError::Bind { addr: addr.to_string(), source })
}

/// A free loopback port for the demo backend and tests. Taken below Linux's ephemeral range
/// (32768+), where the kernel never hands a released port to an outgoing connection, and never the
/// same one twice in a process; checked free when handed out (another process may still take it).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        // A different starting point per process, so concurrent test binaries rarely meet.
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let _ = NEXT.compare_exchange(
            u32::MAX,
            (seed ^ std::process::id().wrapping_mul(7919)) % SPAN,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

pub struct Built {
    pub server: Server,
    pub app: Arc<App>,
    /// The built-in simulated backend, when no upstream was configured.
    pub simulator: Option<Simulator>,
    pub upstream: UpstreamUrl,
}

/// Builds the proxy. `upgrade`: take over the listening sockets of a running instance that was sent
/// SIGQUIT (pingora's zero-downtime upgrade) instead of binding them.
pub fn build(config: Config, clock: Clock) -> Result<Built, StartError> {
    build_with(config, clock, false)
}

pub fn build_with(config: Config, clock: Clock, upgrade: bool) -> Result<Built, StartError> {
    if !upgrade {
        check_bind(&config.listen)?;
        if let Some(admin) = &config.admin_listen {
            check_bind(admin)?;
        }
    }
    let (upstream, simulator) = match &config.upstream {
        UpstreamTarget::Remote(u) => (u.clone(), None),
        UpstreamTarget::Simulated { listen } => {
            let mut addr = check_bind(listen)?;
            if addr.port() == 0 || listen.ends_with(":0") {
                // Not yet bound, so a free port could be one of the proxy's own: skip those.
                let own: Vec<u16> = [Some(config.listen.as_str()), config.admin_listen.as_deref()]
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a.parse::<SocketAddr>().ok().map(|a| a.port()))
                    .collect();
                let port = std::iter::repeat_with(free_port).find(|p| !own.contains(p)).expect("a free port");
                addr.set_port(port);
            }
            let sim_cfg = SimConfig {
                calc_delay: config.sim_calc_delay,
                seed: config.sim_seed,
                // The demo backend goes stale on the proxy's schedule, so configured staleness
                // tables are visible end to end.
                thresholds: config.thresholds.clone(),
                ..SimConfig::default()
            };
            let sim = Simulator::new(sim_cfg, clock.clone());
            let url = UpstreamUrl { tls: false, host: addr.ip().to_string(), port: addr.port(), addr };
            (url, Some(sim))
        }
    };
    let settings = UpstreamSettings {
        url: upstream.clone(),
        connect_timeout: config.connect_timeout,
        read_timeout: config.read_timeout,
        max_response_bytes: config.max_response_bytes,
    };
    let opt = pingora::server::configuration::Opt { upgrade, ..Default::default() };
    let mut server = Server::new_with_opt_and_conf(Some(opt), server_conf(&config));
    server.bootstrap();
    let listen = config.listen.clone();
    let breaker = config.breaker;
    let app = App::new(Arc::new(config), clock, UpstreamClient::new(settings.clone(), breaker));
    let insights = || InsightsProxy { app: app.clone(), peer: settings.peer() };
    // Requests the proxy answers itself skip pingora_proxy's per-request session (`fast`); the
    // rest go through pingora's proxy as before.
    let fast = FastPath::new(http_proxy(&server.configuration, insights()), insights());
    let mut proxy = pingora::services::listening::Service::new("Pingora HTTP Proxy Service".into(), fast);
    // A 16 KB write buffer sends a cached answer's header and body in one write.
    proxy.add_listener(
        pingora::listeners::ListenerConfig::tcp(listen.as_str())
            .l4_buffer(pingora::listeners::L4BufferSettings::default().write(16 * 1024)),
    );
    server.add_service(proxy);
    server.add_service(background_service("refresh workers", Workers { engine: app.engine.clone() }));
    if app.cache.l2().is_some() {
        server.add_service(background_service("l2 events", L2Events { app: app.clone() }));
    }
    if let Some(admin) = &app.config.admin_listen {
        let mut svc = pingora::services::listening::Service::new("admin".into(), AdminApp { app: app.clone() });
        svc.add_tcp(admin);
        server.add_service(svc);
    }
    if let Some(sim) = &simulator {
        server.add_service(sim.service(&upstream.addr.to_string()));
    }
    Ok(Built { server, app, simulator, upstream })
}

/// Applies other replicas' purges and refusals and wakes waits on their calculations (the shared
/// tier's pub/sub channel).
struct L2Events {
    app: Arc<App>,
}

#[async_trait]
impl pingora::services::background::BackgroundService for L2Events {
    async fn start(&self, shutdown: pingora::server::ShutdownWatch) {
        let Some(l2) = self.app.cache.l2().cloned() else { return };
        let app = self.app.clone();
        l2.listen(move |event| app.engine.apply_shared(event), shutdown).await;
    }
}

/// A server running only the simulated backend on `listen` (the `simulate` subcommand, tests,
/// benchmarks).
pub fn simulator_server(sim: &Simulator, listen: &str, threads: usize) -> Server {
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    server.add_service(sim.service(listen));
    server
}

/// A shutdown signal sent through a channel: `Some(true)` graceful, `Some(false)` fast.
pub struct ChannelShutdown(pub tokio::sync::watch::Receiver<Option<bool>>);

#[async_trait]
impl ShutdownSignalWatch for ChannelShutdown {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.0.clone();
        let graceful = loop {
            if let Some(g) = *rx.borrow_and_update() {
                break g;
            }
            if rx.changed().await.is_err() {
                break false;
            }
        };
        if graceful {
            ShutdownSignal::GracefulTerminate
        } else {
            ShutdownSignal::FastShutdown
        }
    }
}

/// A pingora server running on its own thread until [`Running::stop`] (or drop).
pub struct Running {
    stop: tokio::sync::watch::Sender<Option<bool>>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    pub fn start(server: Server) -> Running {
        let (stop, rx) = tokio::sync::watch::channel(None);
        let thread = std::thread::spawn(move || server.run(RunArgs { shutdown_signal: Box::new(ChannelShutdown(rx)) }));
        Running { stop, thread: Some(thread) }
    }

    /// Stops the server: `graceful` drains for the grace period first.
    pub fn stop(mut self, graceful: bool) {
        self.shutdown(graceful);
    }

    fn shutdown(&mut self, graceful: bool) {
        let _ = self.stop.send(Some(graceful));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown(false);
    }
}
