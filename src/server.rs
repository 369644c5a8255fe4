//! Assembling pingora services (proxy, background workers, with the `demo` feature the simulated
//! backend) into a pingora server.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::prelude::background_service;
use pingora::protocols::http::v2::server::default_h2_options;
use pingora::proxy::http_proxy;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;

use crate::admin::AdminApp;
use crate::app::App;
use crate::clock::Clock;
use crate::config::{Config, UpstreamTarget, UpstreamUrl};
use crate::engine::workers::Workers;
use crate::http::{FastPath, InsightsProxy, Listening};
use crate::upstream::{UpstreamClient, UpstreamSettings};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[cfg(feature = "tls")]
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
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

pub struct Built {
    pub server: Server,
    pub app: Arc<App>,
    /// The built-in simulated backend, when no upstream was configured.
    #[cfg(feature = "demo")]
    pub simulator: Option<posthog_sim::Simulator>,
    pub upstream: UpstreamUrl,
    /// The listener's certificate, when it serves TLS.
    #[cfg(feature = "tls")]
    pub tls: Option<Arc<crate::tls::Tls>>,
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
    #[cfg(feature = "demo")]
    let mut simulator = None;
    let upstream = match &config.upstream {
        UpstreamTarget::Remote(u) => u.clone(),
        #[cfg(feature = "demo")]
        UpstreamTarget::Simulated(demo) => {
            let own: Vec<&str> =
                [Some(config.listen.as_str()), config.admin_listen.as_deref()].into_iter().flatten().collect();
            let (addr, sim) = crate::demo::start(demo, check_bind(&demo.listen)?, &own, &config.thresholds, &clock);
            simulator = Some(sim);
            UpstreamUrl { tls: false, host: addr.ip().to_string(), port: addr.port(), addr }
        }
    };
    let settings = UpstreamSettings {
        url: upstream.clone(),
        connect_timeout: config.connect_timeout,
        read_timeout: config.read_timeout,
        max_response_bytes: config.max_response_bytes,
    };
    // A certificate that does not load stops the start, before anything listens.
    #[cfg(feature = "tls")]
    let tls = config.tls.clone().map(crate::tls::Tls::new).transpose()?;
    let opt = pingora::server::configuration::Opt { upgrade, ..Default::default() };
    let mut server = Server::new_with_opt_and_conf(Some(opt), server_conf(&config));
    server.bootstrap();
    let listen = config.listen.clone();
    let breaker = config.breaker;
    let app = App::new(Arc::new(config), clock, UpstreamClient::new(settings.clone(), breaker));
    let insights = || InsightsProxy { app: app.clone(), peer: settings.peer() };
    // Requests the proxy answers itself skip pingora_proxy's per-request session (`fast`); the
    // rest go through pingora's proxy as before.
    let mut http = http_proxy(&server.configuration, insights());
    let mut options = HttpServerOptions::default();
    options.h2c = app.config.h2c;
    http.server_options = Some(options);
    let mut h2 = default_h2_options();
    h2.max_concurrent_streams(app.config.h2_max_concurrent_streams);
    http.h2_options = Some(h2);
    let fast = FastPath::new(http, insights());
    #[cfg(feature = "tls")]
    let fast = match &tls {
        Some(tls) => fast.with_tls(tls.clone()),
        None => fast,
    };
    let listening = Listening::new(listen, fast);
    // The demo backend listens before the proxy does, so no first request meets a closed port.
    #[cfg(feature = "demo")]
    let listening = match &simulator {
        Some(_) => listening.after(upstream.addr),
        None => listening,
    };
    server.add_service(listening);
    server.add_service(background_service("refresh workers", Workers { engine: app.engine.clone() }));
    #[cfg(feature = "tls")]
    if let Some(tls) = &tls {
        server.add_service(background_service("tls reload", crate::tls::Watch { tls: tls.clone() }));
    }
    if app.cache.l2().is_some() {
        server.add_service(background_service("l2 events", L2Events { app: app.clone() }));
    }
    if let Some(admin) = &app.config.admin_listen {
        let mut svc = pingora::services::listening::Service::new("admin".into(), AdminApp { app: app.clone() });
        svc.add_tcp(admin);
        server.add_service(svc);
    }
    #[cfg(feature = "demo")]
    if let Some(sim) = &simulator {
        server.add_service(sim.service(&upstream.addr.to_string()));
    }
    Ok(Built {
        server,
        app,
        #[cfg(feature = "demo")]
        simulator,
        upstream,
        #[cfg(feature = "tls")]
        tls,
    })
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
