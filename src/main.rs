//! The `insights-proxy` binary: command line → configuration → logging → server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use insights_proxy::clock::Clock;
use insights_proxy::config::{Config, ConfigError, FileConfig, LogFormat, Overrides, UpstreamTarget};
use insights_proxy::server;
use tracing_subscriber::filter::{filter_fn, FilterFn};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc's malloc: the hit path makes a few dozen small allocations per request
/// (pingora's request and response headers, boxes, the key), and glibc's malloc/free were ~22 % of
/// a hit's user-space instructions (benches/profile.sh).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A caching reverse proxy for PostHog's insights API.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML). Without one, every key has its default.
    #[arg(short, long, env = "INSIGHTS_PROXY_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:8080 (overrides server.listen).
    #[arg(long, env = "INSIGHTS_PROXY_LISTEN")]
    listen: Option<String>,
    /// Upstream PostHog, e.g. https://us.posthog.com (overrides upstream.url). Without one, demo
    /// builds start the built-in simulated backend.
    #[arg(long, env = "INSIGHTS_PROXY_UPSTREAM")]
    upstream: Option<String>,
    /// Admin listener for /metrics, /healthz, /readyz and the admin API, or "off"
    /// (overrides admin.listen).
    #[arg(long, env = "INSIGHTS_PROXY_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// Log format (overrides log.format).
    #[arg(long, env = "INSIGHTS_PROXY_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Zero-downtime upgrade: take over the listening sockets from a running instance that is sent
    /// SIGQUIT right after this one starts.
    #[arg(long)]
    upgrade: bool,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run only the simulated PostHog insights backend (demo builds; also the `posthog-sim` binary).
    #[cfg(feature = "demo")]
    Simulate(posthog_sim::cli::Args),
}

fn load(cli: &Cli) -> Result<Config, ConfigError> {
    let file = match &cli.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let overrides = Overrides {
        listen: cli.listen.clone(),
        upstream: cli.upstream.clone(),
        admin_listen: cli.admin_listen.clone(),
        log_format: cli.log_format,
    };
    Config::from_file_config(file, &overrides)
}

/// pingora's connection pool logs "failed to acquire reusable stream" at ERROR when its idle watcher
/// still holds a pooled upstream connection; it then opens a new one, so nothing failed. That module
/// is silenced by default (its submodules, which report real connect errors, are not).
const DEFAULT_LOG_FILTER: &str = "info,pingora_core=warn,pingora_proxy=warn,pingora_core::connectors=off,\
     pingora_core::connectors::l4=warn,pingora_core::connectors::http=warn,pingora_core::connectors::tls=warn";

/// Targets that log request or response heads (`Authorization`, cookies, a target's
/// `personal_api_key`) or raw request bytes at debug and trace: pingora's proxy ("Sending header to
/// upstream", "Request header"), its HTTP protocols (raw heads of refused requests, "Writing request
/// header") and apps (the simulated backend's requests), its cache, and the HTTP/2 and hyper crates.
const HEAD_LOGGING_TARGETS: [&str; 7] =
    ["pingora_proxy", "pingora_core::protocols", "pingora_core::apps", "pingora_cache", "pingora_http", "h2", "hyper"];

/// [`HEAD_LOGGING_TARGETS`] (and their submodules) never log below info, whatever RUST_LOG says: a
/// second filter after the one RUST_LOG (or [`DEFAULT_LOG_FILTER`]) builds, which only ever removes
/// events, so a more specific RUST_LOG directive cannot lift it and a quieter one still applies. It
/// gives no level hint: the most verbose level enabled (which also gates the `log` records pingora
/// emits before they are even built) stays RUST_LOG's.
fn head_logging_cap() -> FilterFn<impl Fn(&tracing::Metadata<'_>) -> bool> {
    filter_fn(|meta| {
        let names_head_logger =
            |t: &&str| meta.target().strip_prefix(t).is_some_and(|r| r.is_empty() || r.starts_with("::"));
        *meta.level() <= tracing::Level::INFO || !HEAD_LOGGING_TARGETS.iter().any(names_head_logger)
    })
}

/// The log subscriber: `rust_log` (RUST_LOG) or [`DEFAULT_LOG_FILTER`], then [`head_logging_cap`].
fn subscriber<W>(rust_log: Option<&str>, format: LogFormat, writer: W) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter =
        rust_log.and_then(|f| EnvFilter::try_new(f).ok()).unwrap_or_else(|| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match format {
        LogFormat::Json => Box::new(builder.json().finish().with(head_logging_cap())),
        LogFormat::Text => Box::new(builder.finish().with(head_logging_cap())),
    }
}

fn init_logging(format: LogFormat) {
    let rust_log = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    subscriber(rust_log.as_deref(), format, std::io::stdout).init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    #[cfg(feature = "demo")]
    if let Some(Command::Simulate(args)) = &cli.command {
        init_logging(LogFormat::Text);
        return posthog_sim::cli::run("insights-proxy simulate", args);
    }
    let config = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("insights-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        #[cfg(feature = "tls")]
        if let Some(tls) = &config.tls {
            match insights_proxy::tls::load(tls) {
                Ok(loaded) => {
                    if let Some(w) = loaded.expiry_warning() {
                        eprintln!("insights-proxy: warning: server.tls: {w}");
                    }
                }
                Err(e) => {
                    eprintln!("insights-proxy: server.tls: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    init_logging(config.log_format);
    let listen = config.listen.clone();
    let simulated = !matches!(config.upstream, UpstreamTarget::Remote(_));
    let (max_bytes, ttl) = (config.cache_max_bytes, config.cache_ttl);
    let admin = config.admin_listen.clone().unwrap_or_else(|| "off".into());
    let built = match server::build_with(config, Clock::new(), cli.upgrade) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("insights-proxy: {e}");
            return ExitCode::from(1);
        }
    };
    tracing::info!(
        listen = %listen,
        admin = %admin,
        upstream = %built.upstream.origin(),
        cache_max_bytes = max_bytes,
        cache_ttl_s = ttl.as_secs(),
        "insights-proxy starting"
    );
    if simulated {
        println!("No upstream configured: proxying to the built-in simulated PostHog at {}", built.upstream.origin());
        println!("Try:  curl -H 'Authorization: Bearer phx_demo_all' 'http://{listen}/api/environments/1/insights/1/?refresh=blocking'");
    }
    built.server.run_forever()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What `subscriber` writes when `emit` runs under it, with `rust_log` as RUST_LOG.
    fn logged(rust_log: Option<&str>, format: LogFormat, emit: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        tracing::subscriber::with_default(subscriber(rust_log, format, move || writer.clone()), emit);
        let out = buf.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    fn emit_all() {
        tracing::debug!(target: "pingora_proxy::proxy_h1", "Sending header to upstream authorization: secret-1");
        tracing::trace!(target: "pingora_proxy", "Request header: secret-2");
        tracing::trace!(target: "pingora_core::protocols::http::v1::client", "Writing request header: secret-3");
        tracing::debug!(target: "pingora_core::protocols::http::v1::server", "buf: secret-4");
        tracing::trace!(target: "pingora_core::apps::http_app", "secret-5");
        tracing::trace!(target: "h2::codec", "secret-6");
        tracing::warn!(target: "pingora_proxy", "shown: pingora warning");
        tracing::debug!(target: "insights_proxy::proxy", "shown: own debug");
        tracing::debug!(target: "pingora_core::connectors::http", "shown: connector debug");
    }

    #[test]
    fn targets_that_log_request_heads_stay_at_info_whatever_rust_log_says() {
        for rust_log in
            ["trace", "debug", "pingora_proxy::proxy_h1=trace,pingora_core::protocols::http::v1=trace,trace"]
        {
            for format in [LogFormat::Text, LogFormat::Json] {
                let out = logged(Some(rust_log), format, emit_all);
                assert!(!out.contains("secret-"), "{rust_log}: {out}");
                for shown in ["pingora warning", "own debug", "connector debug"] {
                    assert!(out.contains(shown), "{rust_log}: {shown} missing from {out}");
                }
            }
        }
        // A target that only starts like one of them is not capped.
        let out = logged(Some("trace"), LogFormat::Text, || tracing::debug!(target: "h2x", "shown: h2x"));
        assert!(out.contains("shown: h2x"), "{out}");
        // A quieter RUST_LOG still applies, and without one the default filter does.
        let out = logged(Some("error"), LogFormat::Text, emit_all);
        assert!(!out.contains("shown"), "{out}");
        let out = logged(None, LogFormat::Text, emit_all);
        assert!(out.contains("pingora warning") && !out.contains("own debug") && !out.contains("secret-"), "{out}");
    }

    #[test]
    fn the_cap_leaves_the_most_verbose_level_to_rust_log() {
        use tracing::level_filters::LevelFilter;
        let hint = |rust_log| subscriber(rust_log, LogFormat::Text, std::io::sink).max_level_hint();
        assert_eq!(hint(None), Some(LevelFilter::INFO));
        assert_eq!(hint(Some("warn")), Some(LevelFilter::WARN));
        assert_eq!(hint(Some("trace")), Some(LevelFilter::TRACE));
    }

    #[test]
    fn the_default_log_filter_parses() {
        let filter = tracing_subscriber::EnvFilter::try_new(super::DEFAULT_LOG_FILTER).unwrap();
        let shown = filter.to_string();
        assert!(shown.contains("pingora_core::connectors=off") && shown.contains("pingora_core::connectors::l4=warn"));
    }
}
