//! Configuration: a TOML file, overridden by `INSIGHTS_PROXY_*` environment variables and flags.
//!
//! [`FileConfig`] is what the file says (every field defaulted, unknown keys rejected);
//! [`Config::from_file_config`] checks it and reports *every* problem at once, then produces the
//! validated [`Config`] the rest of the program sees. Each default lives once, in a `DEFAULT_*`
//! constant, and `config/example.toml` documents each key with its default and unit.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cache::sealed::BodyFiles;
use crate::refresh::staleness::{Interval, Thresholds};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_THREADS: usize = 2;
pub const DEFAULT_GRACE_PERIOD_MS: u64 = 1_000;
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 2_000;
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2_000;
/// PostHog lets a query run for minutes (CLICKHOUSE_MAX_EXECUTION_TIME = 180 s).
pub const DEFAULT_READ_TIMEOUT_MS: u64 = 180_000;
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// PostHog keeps results for 7 days (CACHED_RESULTS_TTL).
pub const DEFAULT_CACHE_TTL_SECONDS: u64 = 7 * 24 * 3600;
pub const DEFAULT_WORKERS: usize = 8;
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;
/// A dashboard's worth of async tiles per credential; 16 credentials fill the default queue.
pub const DEFAULT_MAX_QUEUED_PER_PRINCIPAL: usize = 64;
/// PostHog's STATUS_TTL_SECONDS.
pub const DEFAULT_STATUS_TTL_SECONDS: u64 = 20 * 60;
pub const DEFAULT_STATUS_MAX_RECORDS: u64 = 100_000;
/// nginx's keepalive_timeout is 75 s; pingora's first-request wait is 60 s.
pub const DEFAULT_IDLE_TIMEOUT_SECONDS: u64 = 60;
pub const DEFAULT_STATUS_MAX_BYTES: u64 = 32 * 1024 * 1024;
pub const DEFAULT_MAX_CONCURRENT_CALCULATIONS: usize = 16;
/// How long a (credential, project) confirmation by the upstream is trusted.
pub const DEFAULT_REVALIDATE_AFTER_SECONDS: u64 = 60;
pub const DEFAULT_UNCONFIRMED_CALLS_PER_SECOND: u32 = 20;
pub const DEFAULT_REJECTED_TTL_SECONDS: u64 = 60;
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
pub const DEFAULT_BREAKER_COOLDOWN_MS: u64 = 1_000;
/// One probe call per 4 s at most while the upstream is down: recovery is seen within seconds.
pub const DEFAULT_BREAKER_MAX_COOLDOWN_MS: u64 = 4_000;
/// pingora's own bound (`default_h2_options`).
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// How often the certificate files are looked at for a change.
pub const DEFAULT_TLS_RELOAD_CHECK: Duration = Duration::from_secs(5);

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub server: ServerSection,
    pub upstream: UpstreamSection,
    pub cache: CacheSection,
    pub staleness: StalenessSection,
    pub refresh: RefreshSection,
    pub security: SecuritySection,
    pub budget: BudgetSection,
    pub refresh_ahead: RefreshAheadSection,
    pub l2: Option<L2Section>,
    pub admin: AdminSection,
    /// The demo backend's settings (demo builds only).
    #[cfg(feature = "demo")]
    pub simulator: crate::demo::SimulatorSection,
    /// Without the `demo` feature the section is accepted and ignored (as with an upstream
    /// configured), so one file serves both builds.
    #[cfg(not(feature = "demo"))]
    pub simulator: Option<toml::Table>,
    pub log: LogSection,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    pub listen: String,
    pub threads: usize,
    pub grace_period_ms: u64,
    pub shutdown_timeout_ms: u64,
    pub max_body_bytes: usize,
    pub idle_timeout_seconds: u64,
    pub public_url: Option<String>,
    /// HTTP/2 with prior knowledge on a cleartext listener (behind a TLS-terminating balancer).
    pub h2c: bool,
    /// Streams one HTTP/2 connection may have open at once.
    pub h2_max_concurrent_streams: u32,
    pub tls: Option<TlsSection>,
}

/// `[server.tls]`: TLS on the listener.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// PEM: the certificate, then any intermediates.
    pub cert_path: String,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_path: String,
    /// "1.2" (default) or "1.3".
    pub min_version: Option<String>,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.into(),
            threads: DEFAULT_THREADS,
            grace_period_ms: DEFAULT_GRACE_PERIOD_MS,
            shutdown_timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT_MS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            idle_timeout_seconds: DEFAULT_IDLE_TIMEOUT_SECONDS,
            public_url: None,
            h2c: true,
            h2_max_concurrent_streams: DEFAULT_H2_MAX_CONCURRENT_STREAMS,
            tls: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSection {
    pub url: Option<String>,
    pub connect_timeout_ms: u64,
    pub read_timeout_ms: u64,
    pub max_response_bytes: usize,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        Self {
            url: None,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            read_timeout_ms: DEFAULT_READ_TIMEOUT_MS,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSection {
    pub max_bytes: u64,
    pub ttl_seconds: u64,
    pub partition_secret: Option<String>,
    pub list_page_seconds: u64,
    pub sendfile_min_bytes: usize,
    pub sendfile_max_files: Option<usize>,
    pub sendfile_dir: String,
}

impl Default for CacheSection {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_CACHE_MAX_BYTES,
            ttl_seconds: DEFAULT_CACHE_TTL_SECONDS,
            partition_secret: None,
            list_page_seconds: 60,
            sendfile_min_bytes: crate::cache::sealed::DEFAULT_MIN_BYTES,
            sendfile_max_files: None,
            sendfile_dir: crate::cache::sealed::DEFAULT_DIR.into(),
        }
    }
}

/// Seconds per interval name; keys not given keep PostHog's values.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StalenessSection {
    pub default: BTreeMap<String, u64>,
    pub lazy: BTreeMap<String, u64>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RefreshSection {
    /// `"off"`, `"next_allowed_client_refresh"` or a number of seconds.
    pub forced_min_interval: ForcedMinIntervalFile,
    pub workers: usize,
    pub queue_capacity: usize,
    pub max_queued_per_principal: usize,
    pub status_ttl_seconds: u64,
    pub status_max_records: u64,
    pub status_max_bytes: u64,
    pub max_concurrent_calculations: usize,
}

impl Default for RefreshSection {
    fn default() -> Self {
        Self {
            forced_min_interval: ForcedMinIntervalFile::Word("off".into()),
            workers: DEFAULT_WORKERS,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            max_queued_per_principal: DEFAULT_MAX_QUEUED_PER_PRINCIPAL,
            status_ttl_seconds: DEFAULT_STATUS_TTL_SECONDS,
            status_max_records: DEFAULT_STATUS_MAX_RECORDS,
            status_max_bytes: DEFAULT_STATUS_MAX_BYTES,
            max_concurrent_calculations: DEFAULT_MAX_CONCURRENT_CALCULATIONS,
        }
    }
}

/// `[refresh] forced_min_interval` as written: a word or a number of seconds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ForcedMinIntervalFile {
    Seconds(u64),
    Word(String),
}

/// How soon after a calculation a forced read (`force_blocking`, `force_async`) may recalculate
/// the entry again; sooner, it is answered from the entry. PostHog's legacy server-side rule: its
/// current API leaves it to clients (docs/refresh-semantics.md §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForcedMinInterval {
    /// Every forced read recalculates, as PostHog's API does.
    Off,
    /// Not before the entry's own `next_allowed_client_refresh`.
    NextAllowedClientRefresh,
    /// Not within this long of the entry's `last_refresh`.
    After(Duration),
}

/// What one upstream confirmation of a credential covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RevalidateScope {
    /// Every insight of the project: one confirming read per credential and project per window.
    Project,
    /// One insight: PostHog's object-level access control (a restricted dashboard or insight) is
    /// honoured within the window too, at one confirming read per credential and insight.
    Insight,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecuritySection {
    pub revalidate_after_seconds: u64,
    pub revalidate_scope: RevalidateScope,
    pub unconfirmed_calls_per_second: u32,
    pub rejected_ttl_seconds: u64,
    pub breaker_failures: u32,
    pub breaker_cooldown_ms: u64,
    pub breaker_max_cooldown_ms: u64,
}

impl Default for SecuritySection {
    fn default() -> Self {
        Self {
            revalidate_after_seconds: DEFAULT_REVALIDATE_AFTER_SECONDS,
            revalidate_scope: RevalidateScope::Project,
            unconfirmed_calls_per_second: DEFAULT_UNCONFIRMED_CALLS_PER_SECOND,
            rejected_ttl_seconds: DEFAULT_REJECTED_TTL_SECONDS,
            breaker_failures: DEFAULT_BREAKER_FAILURES,
            breaker_cooldown_ms: DEFAULT_BREAKER_COOLDOWN_MS,
            breaker_max_cooldown_ms: DEFAULT_BREAKER_MAX_COOLDOWN_MS,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetSection {
    pub project_concurrency: usize,
    pub per_minute: u32,
    pub per_hour: u32,
    pub wait_ms: u64,
    pub forced_reserve_percent: u8,
    /// One budget for the whole cluster in Redis; `None`: on with `[l2]`, off without.
    pub shared: Option<bool>,
    pub slot_lease_ms: u64,
    pub assumed_replicas: u32,
}

impl Default for BudgetSection {
    fn default() -> Self {
        Self {
            project_concurrency: 3,
            per_minute: 240,
            per_hour: 1200,
            wait_ms: 10_000,
            forced_reserve_percent: 25,
            shared: None,
            slot_lease_ms: 30_000,
            assumed_replicas: 1,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RefreshAheadSection {
    pub enabled: bool,
    pub min_reads: u32,
    pub start_percent: u8,
}

impl Default for RefreshAheadSection {
    fn default() -> Self {
        Self { enabled: true, min_reads: 2, start_percent: 90 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct L2Section {
    pub url: String,
    pub key_prefix: String,
    pub timeout_ms: u64,
    pub ttl_seconds: u64,
    pub lease_ms: u64,
    pub wait_poll_ms: u64,
}

impl Default for L2Section {
    fn default() -> Self {
        Self {
            url: String::new(),
            key_prefix: "ipx:".into(),
            timeout_ms: 200,
            ttl_seconds: DEFAULT_CACHE_TTL_SECONDS,
            lease_ms: 30_000,
            wait_poll_ms: 500,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    pub listen: String,
    pub token: Option<String>,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self { listen: DEFAULT_ADMIN_LISTEN.into(), token: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Which requests get an access-log line (`[log] access`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    /// One line per request.
    All,
    /// One line per request that was not answered from the cache (hits and stale hits are only
    /// counted, in `insights_proxy_requests_total`): the default, since hits are most of the traffic
    /// and a line per hit costs about as much CPU as the hit itself.
    #[default]
    Misses,
    /// No access log (errors and warnings are still logged).
    None,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    pub format: LogFormat,
    pub access: AccessLog,
}

/// Where calculations go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTarget {
    /// A real PostHog (or anything speaking its API).
    Remote(UpstreamUrl),
    /// No upstream configured: start the built-in simulated backend (demo builds only).
    #[cfg(feature = "demo")]
    Simulated(crate::demo::DemoSettings),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub addr: SocketAddr,
}

impl UpstreamUrl {
    /// The `Host` header the upstream expects: the port is omitted when it is the scheme's default.
    pub fn host_header(&self) -> String {
        let default_port = if self.tls { 443 } else { 80 };
        if self.port == default_port {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn origin(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.host_header())
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub threads: usize,
    pub grace_period: Duration,
    pub shutdown_timeout: Duration,
    pub max_body_bytes: usize,
    /// How long a keep-alive connection may sit idle between requests.
    pub idle_timeout: Duration,
    pub public_url: Option<String>,
    /// HTTP/2 with prior knowledge on the cleartext listener.
    pub h2c: bool,
    pub h2_max_concurrent_streams: u32,
    /// TLS on the listener; `None`: cleartext.
    pub tls: Option<TlsConfig>,
    pub upstream: UpstreamTarget,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub max_response_bytes: usize,
    pub cache_max_bytes: u64,
    pub cache_ttl: Duration,
    /// How long a list page's membership is reused per credential.
    pub list_page_ttl: Duration,
    /// Cached bodies from this size up are sent with `sendfile` (0: never); at most this many at
    /// once (`None`: a quarter of the descriptor limit, up to 16384). `cache::sealed`.
    pub sendfile_min_bytes: usize,
    pub sendfile_max_files: Option<usize>,
    /// Where those bodies' files live.
    pub sendfile_files: BodyFiles,
    pub partition_secret: Option<String>,
    pub thresholds: Thresholds,
    pub workers: usize,
    pub queue_capacity: usize,
    /// Async jobs one credential may have queued (across projects); at most `queue_capacity`.
    pub max_queued_per_principal: usize,
    pub forced_min_interval: ForcedMinInterval,
    pub status_ttl: Duration,
    pub status_max_records: u64,
    pub status_max_bytes: u64,
    pub max_concurrent_calculations: usize,
    /// Cached data is served to a credential only while the upstream confirmed its access to the
    /// project within this window.
    pub revalidate_after: Duration,
    pub revalidate_scope: RevalidateScope,
    /// Upstream calls per second, across all credentials, on behalf of credentials the upstream
    /// has not accepted recently (the rest are bounded by their own rate budget).
    pub unconfirmed_calls_per_second: u32,
    /// How long a credential the upstream refused is answered from memory.
    pub rejected_ttl: Duration,
    pub breaker: BreakerSettings,
    pub budget: BudgetSettings,
    pub refresh_ahead: RefreshAheadSettings,
    pub l2: Option<L2Settings>,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`, the admin API); `None` = off.
    pub admin_listen: Option<String>,
    /// Bearer token for the admin API (purge, inspect); without one the admin API is off.
    pub admin_token: Option<String>,
    pub log_format: LogFormat,
    pub access_log: AccessLog,
}

/// The listener's certificate: where it is read from, and what the handshake accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub min_version: TlsVersion,
    /// How often the files are looked at for a change (a SIGHUP reloads at once).
    pub reload_check: Duration,
}

/// The oldest TLS version the listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

impl TlsVersion {
    pub fn parse(s: &str) -> Option<TlsVersion> {
        match s.trim() {
            "1.2" => Some(TlsVersion::V1_2),
            "1.3" => Some(TlsVersion::V1_3),
            _ => None,
        }
    }
}

/// The upstream circuit breaker: after `failures` consecutive failures, calls fail fast for a
/// cooldown that doubles on each failed probe, up to `max_cooldown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    pub failures: u32,
    pub cooldown: Duration,
    pub max_cooldown: Duration,
}

/// Upstream offload: what the proxy may ask of the upstream (PostHog's limits,
/// docs/refresh-semantics.md §6, §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetSettings {
    /// Calculations running at once per project.
    pub project_concurrency: usize,
    /// Upstream calls per personal API key per minute and per hour; `None` = unlimited.
    pub per_minute: Option<u32>,
    pub per_hour: Option<u32>,
    /// How long a blocking request waits for budget.
    pub wait: Duration,
    /// Share of each key's rate that forced recalculations may not use, in percent (0–90).
    pub forced_reserve_percent: u8,
    /// The budget is the cluster's, kept in the `[l2]` Redis: one set of rate buckets per key and
    /// one set of calculation slots per project for every replica.
    pub shared: bool,
    /// How long a shared calculation slot lives without renewal (renewed while it is held), so a
    /// crashed replica's slots come back within it.
    pub slot_lease: Duration,
    /// The replica count a replica assumes while Redis is down if it never saw the membership.
    pub assumed_replicas: u32,
}

/// The shared second tier (Redis/Valkey).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2Settings {
    pub url: String,
    pub prefix: String,
    /// Each Redis call's budget; a slow Redis counts as down.
    pub timeout: Duration,
    pub ttl: Duration,
    /// How long a calculation lease lives without renewal (renewed while the calculation runs).
    pub lease: Duration,
    /// How long a replica waits for another's calculation before looking again (the fallback
    /// when an event is lost or the leader died).
    pub wait_poll: Duration,
}

/// Recalculating read entries shortly before they go stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshAheadSettings {
    pub enabled: bool,
    /// Reads within the entry's life before it counts as hot.
    pub min_reads: u32,
    /// Start at this percentage of the staleness threshold, jittered per key over the first half
    /// of the rest (90 → 90–95 %).
    pub start_percent: u8,
}

/// One thing wrong with the configuration: which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{}", format_problems(.0))]
    Invalid(Vec<Problem>),
}

fn format_problems(problems: &[Problem]) -> String {
    let mut s = format!("{} problem(s) in the configuration:", problems.len());
    for p in problems {
        s.push_str(&format!("\n  {}: {}", p.key, p.reason));
    }
    s
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Values given on the command line or in the environment; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub admin_listen: Option<String>,
    pub log_format: Option<LogFormat>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse { path: path.display().to_string(), message })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

impl Config {
    pub fn from_file_config(mut file: FileConfig, overrides: &Overrides) -> Result<Config, ConfigError> {
        if let Some(l) = &overrides.listen {
            file.server.listen = l.clone();
        }
        if let Some(u) = &overrides.upstream {
            file.upstream.url = Some(u.clone());
        }
        if let Some(a) = &overrides.admin_listen {
            file.admin.listen = a.clone();
        }
        if let Some(f) = overrides.log_format {
            file.log.format = f;
        }
        let mut problems = Vec::new();
        let mut bad = |key: &str, reason: String| problems.push(Problem { key: key.into(), reason });

        if file.server.listen.parse::<SocketAddr>().is_err() {
            bad("server.listen", format!("{:?} is not an address like 127.0.0.1:8080", file.server.listen));
        }
        if file.server.threads == 0 || file.server.threads > 1024 {
            bad("server.threads", "must be between 1 and 1024".into());
        }
        if file.server.idle_timeout_seconds == 0 {
            bad("server.idle_timeout_seconds", "must be at least 1 (idle connections must be closed some time)".into());
        }
        if file.server.max_body_bytes == 0 {
            bad("server.max_body_bytes", "must be at least 1".into());
        }
        if file.server.h2_max_concurrent_streams == 0 {
            bad("server.h2_max_concurrent_streams", "must be at least 1".into());
        }
        let tls = file.server.tls.as_ref().and_then(|t| {
            let mut ok = true;
            for (key, path) in [("server.tls.cert_path", &t.cert_path), ("server.tls.key_path", &t.key_path)] {
                if path.trim().is_empty() {
                    bad(key, "must name a PEM file".into());
                    ok = false;
                }
            }
            let min_version = match t.min_version.as_deref().map(TlsVersion::parse) {
                None => TlsVersion::V1_2,
                Some(Some(v)) => v,
                Some(None) => {
                    bad(
                        "server.tls.min_version",
                        format!("{:?} must be \"1.2\" or \"1.3\"", t.min_version.as_deref().unwrap_or("")),
                    );
                    ok = false;
                    TlsVersion::V1_2
                }
            };
            if !cfg!(feature = "tls") {
                bad("server.tls", "TLS on the listener needs the `tls` cargo feature".into());
                ok = false;
            }
            ok.then(|| TlsConfig {
                cert_path: PathBuf::from(&t.cert_path),
                key_path: PathBuf::from(&t.key_path),
                min_version,
                reload_check: DEFAULT_TLS_RELOAD_CHECK,
            })
        });
        if let Some(u) = &file.server.public_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                bad("server.public_url", format!("{u:?} must start with http:// or https://"));
            }
        }
        let upstream = match file.upstream.url.as_deref().map(str::trim) {
            #[cfg(feature = "demo")]
            None | Some("") => match file.simulator.validate() {
                Ok(demo) => Some(UpstreamTarget::Simulated(demo)),
                Err(reason) => {
                    bad("simulator.listen", reason);
                    None
                }
            },
            #[cfg(not(feature = "demo"))]
            None | Some("") => {
                bad("upstream.url", "is required (this build has no demo backend: cargo feature `demo`)".into());
                None
            }
            Some(url) => match parse_upstream_url(url) {
                Ok(u) => Some(UpstreamTarget::Remote(u)),
                Err(reason) => {
                    bad("upstream.url", reason);
                    None
                }
            },
        };
        if file.upstream.connect_timeout_ms == 0 {
            bad("upstream.connect_timeout_ms", "must be at least 1".into());
        }
        if file.upstream.read_timeout_ms == 0 {
            bad("upstream.read_timeout_ms", "must be at least 1".into());
        }
        if file.upstream.max_response_bytes < 1024 {
            bad("upstream.max_response_bytes", "must be at least 1024".into());
        }
        if file.cache.max_bytes < 1024 * 1024 {
            bad("cache.max_bytes", "must be at least 1048576 (1 MiB)".into());
        }
        if file.cache.list_page_seconds == 0 {
            bad("cache.list_page_seconds", "must be at least 1".into());
        }
        if file.cache.ttl_seconds == 0 {
            bad("cache.ttl_seconds", "must be at least 1".into());
        }
        let sendfile_files = BodyFiles::parse(&file.cache.sendfile_dir).unwrap_or_else(|e| {
            bad("cache.sendfile_dir", e);
            BodyFiles::Memory
        });
        if let Some(s) = &file.cache.partition_secret {
            if s.len() < 16 {
                bad("cache.partition_secret", "must be at least 16 characters (or left out for a random key)".into());
            }
        }
        let mut thresholds = Thresholds::posthog();
        for (table, values) in [("default", &file.staleness.default), ("lazy", &file.staleness.lazy)] {
            for (name, secs) in values {
                match name.parse::<Interval>() {
                    Ok(interval) if *secs > 0 => {
                        let d = Duration::from_secs(*secs);
                        if table == "default" {
                            thresholds.set_default(interval, Some(d));
                        } else {
                            thresholds.set_lazy(interval, Some(d));
                        }
                    }
                    Ok(_) => bad(&format!("staleness.{table}.{name}"), "must be at least 1 second".into()),
                    Err(_) => bad(
                        &format!("staleness.{table}.{name}"),
                        "unknown interval (minute, hour, day, week, month, quarter, year)".into(),
                    ),
                }
            }
        }
        if file.refresh.workers == 0 || file.refresh.workers > 1024 {
            bad("refresh.workers", "must be between 1 and 1024".into());
        }
        if file.refresh.queue_capacity == 0 {
            bad("refresh.queue_capacity", "must be at least 1".into());
        }
        let forced_min_interval = match &file.refresh.forced_min_interval {
            ForcedMinIntervalFile::Seconds(0) => ForcedMinInterval::Off,
            ForcedMinIntervalFile::Seconds(n) => ForcedMinInterval::After(Duration::from_secs(*n)),
            ForcedMinIntervalFile::Word(w) if w == "off" => ForcedMinInterval::Off,
            ForcedMinIntervalFile::Word(w) if w == "next_allowed_client_refresh" => {
                ForcedMinInterval::NextAllowedClientRefresh
            }
            ForcedMinIntervalFile::Word(w) => {
                bad(
                    "refresh.forced_min_interval",
                    format!("{w:?} must be \"off\", \"next_allowed_client_refresh\" or a number of seconds"),
                );
                ForcedMinInterval::Off
            }
        };
        if file.refresh.max_queued_per_principal == 0 {
            bad("refresh.max_queued_per_principal", "must be at least 1".into());
        }
        if file.refresh.status_ttl_seconds == 0 {
            bad("refresh.status_ttl_seconds", "must be at least 1".into());
        }
        if file.refresh.status_max_records == 0 {
            bad("refresh.status_max_records", "must be at least 1".into());
        }
        if file.refresh.status_max_bytes < 64 * 1024 {
            bad("refresh.status_max_bytes", "must be at least 65536".into());
        }
        if file.refresh.max_concurrent_calculations == 0 {
            bad("refresh.max_concurrent_calculations", "must be at least 1".into());
        }

        let admin_listen = match file.admin.listen.trim() {
            "" | "off" => None,
            l if l.parse::<SocketAddr>().is_ok() => Some(l.to_string()),
            l => {
                bad("admin.listen", format!("{l:?} is not an address like 127.0.0.1:9090 (or \"off\")"));
                None
            }
        };
        // pingora would hand both services the one socket (two owners of one descriptor).
        let clash = |a: &str, b: &str| match (a.parse::<SocketAddr>(), b.parse::<SocketAddr>()) {
            (Ok(a), Ok(b)) => {
                a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
            }
            _ => false,
        };
        if admin_listen.as_deref().is_some_and(|a| clash(a, &file.server.listen)) {
            bad("admin.listen", format!("{:?} is the proxy's own address (server.listen)", file.admin.listen));
        }
        if file.admin.token.as_ref().is_some_and(|t| t.len() < 16) {
            bad("admin.token", "must be at least 16 characters".into());
        }
        if file.security.revalidate_after_seconds == 0 {
            bad("security.revalidate_after_seconds", "must be at least 1".into());
        }
        if file.security.unconfirmed_calls_per_second == 0 {
            bad("security.unconfirmed_calls_per_second", "must be at least 1".into());
        }
        if file.security.breaker_failures == 0 {
            bad("security.breaker_failures", "must be at least 1".into());
        }
        if file.security.breaker_cooldown_ms == 0 {
            bad("security.breaker_cooldown_ms", "must be at least 1".into());
        }
        if file.security.breaker_max_cooldown_ms < file.security.breaker_cooldown_ms {
            bad("security.breaker_max_cooldown_ms", "must be at least security.breaker_cooldown_ms".into());
        }
        if file.budget.project_concurrency == 0 {
            bad("budget.project_concurrency", "must be at least 1".into());
        }
        if file.budget.forced_reserve_percent > 90 {
            bad("budget.forced_reserve_percent", "must be at most 90".into());
        }
        let shared_budget = file.budget.shared.unwrap_or(file.l2.is_some());
        if shared_budget && file.l2.is_none() {
            bad("budget.shared", "requires [l2]: the shared budget lives in its Redis".into());
        }
        if file.budget.slot_lease_ms < 1000 {
            bad("budget.slot_lease_ms", "must be at least 1000".into());
        }
        if file.budget.assumed_replicas == 0 {
            bad("budget.assumed_replicas", "must be at least 1".into());
        }
        if !(1..=95).contains(&file.refresh_ahead.start_percent) {
            bad("refresh_ahead.start_percent", "must be between 1 and 95".into());
        }
        if file.refresh_ahead.min_reads == 0 {
            bad("refresh_ahead.min_reads", "must be at least 1".into());
        }
        let l2 = match &file.l2 {
            None => None,
            Some(l2) => {
                if let Err(e) = crate::redis_target::Target::parse(&l2.url) {
                    bad("l2.url", format!("{:?} {e}", l2.url));
                }
                if file.cache.partition_secret.is_none() {
                    bad(
                        "cache.partition_secret",
                        "is required with [l2]: replicas must derive the same partitions".into(),
                    );
                }
                if l2.timeout_ms == 0 || l2.lease_ms < 1000 || l2.wait_poll_ms == 0 || l2.ttl_seconds == 0 {
                    bad(
                        "l2",
                        "timeout_ms, wait_poll_ms and ttl_seconds must be at least 1, lease_ms at least 1000".into(),
                    );
                }
                Some(L2Settings {
                    url: l2.url.replacen("valkey://", "redis://", 1),
                    prefix: l2.key_prefix.clone(),
                    timeout: Duration::from_millis(l2.timeout_ms),
                    ttl: Duration::from_secs(l2.ttl_seconds),
                    lease: Duration::from_millis(l2.lease_ms),
                    wait_poll: Duration::from_millis(l2.wait_poll_ms),
                })
            }
        };
        let Some(upstream) = upstream.filter(|_| problems.is_empty()) else {
            return Err(ConfigError::Invalid(problems));
        };
        Ok(Config {
            listen: file.server.listen,
            threads: file.server.threads,
            grace_period: Duration::from_millis(file.server.grace_period_ms),
            shutdown_timeout: Duration::from_millis(file.server.shutdown_timeout_ms),
            max_body_bytes: file.server.max_body_bytes,
            idle_timeout: Duration::from_secs(file.server.idle_timeout_seconds),
            public_url: file.server.public_url.map(|u| u.trim_end_matches('/').to_string()),
            h2c: file.server.h2c,
            h2_max_concurrent_streams: file.server.h2_max_concurrent_streams,
            tls,
            upstream,
            connect_timeout: Duration::from_millis(file.upstream.connect_timeout_ms),
            read_timeout: Duration::from_millis(file.upstream.read_timeout_ms),
            max_response_bytes: file.upstream.max_response_bytes,
            cache_max_bytes: file.cache.max_bytes,
            cache_ttl: Duration::from_secs(file.cache.ttl_seconds),
            list_page_ttl: Duration::from_secs(file.cache.list_page_seconds),
            sendfile_min_bytes: file.cache.sendfile_min_bytes,
            sendfile_max_files: file.cache.sendfile_max_files,
            sendfile_files,
            partition_secret: file.cache.partition_secret,
            thresholds,
            workers: file.refresh.workers,
            queue_capacity: file.refresh.queue_capacity,
            max_queued_per_principal: file.refresh.max_queued_per_principal.min(file.refresh.queue_capacity),
            forced_min_interval,
            status_ttl: Duration::from_secs(file.refresh.status_ttl_seconds),
            status_max_records: file.refresh.status_max_records,
            status_max_bytes: file.refresh.status_max_bytes,
            max_concurrent_calculations: file.refresh.max_concurrent_calculations,
            revalidate_after: Duration::from_secs(file.security.revalidate_after_seconds),
            revalidate_scope: file.security.revalidate_scope,
            unconfirmed_calls_per_second: file.security.unconfirmed_calls_per_second,
            rejected_ttl: Duration::from_secs(file.security.rejected_ttl_seconds),
            breaker: BreakerSettings {
                failures: file.security.breaker_failures,
                cooldown: Duration::from_millis(file.security.breaker_cooldown_ms),
                max_cooldown: Duration::from_millis(file.security.breaker_max_cooldown_ms),
            },
            budget: BudgetSettings {
                project_concurrency: file.budget.project_concurrency,
                per_minute: (file.budget.per_minute > 0).then_some(file.budget.per_minute),
                per_hour: (file.budget.per_hour > 0).then_some(file.budget.per_hour),
                wait: Duration::from_millis(file.budget.wait_ms),
                forced_reserve_percent: file.budget.forced_reserve_percent,
                shared: shared_budget,
                slot_lease: Duration::from_millis(file.budget.slot_lease_ms),
                assumed_replicas: file.budget.assumed_replicas,
            },
            refresh_ahead: RefreshAheadSettings {
                enabled: file.refresh_ahead.enabled,
                min_reads: file.refresh_ahead.min_reads,
                start_percent: file.refresh_ahead.start_percent,
            },
            l2,
            admin_listen,
            admin_token: file.admin.token,
            log_format: file.log.format,
            access_log: file.log.access,
        })
    }

    /// Defaults with nothing but the given overrides: what tests and the demo start from.
    pub fn defaults() -> Config {
        Config::from_file_config(FileConfig::default(), &Overrides::default()).expect("defaults are valid")
    }
}

/// `http(s)://host[:port][/]`; a path prefix is not supported because PostHog serves `/api` at the root.
pub fn parse_upstream_url(url: &str) -> Result<UpstreamUrl, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("{url:?} must start with http:// or https://"));
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') || authority.contains('@') || authority.contains('?') {
        return Err(format!("{url:?} must be scheme://host[:port] with no path"));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => match p.parse::<u16>() {
            Ok(p) if p > 0 => (h.to_string(), p),
            _ => return Err(format!("{url:?} has an invalid port")),
        },
        _ => (authority.to_string(), if tls { 443 } else { 80 }),
    };
    if tls && !cfg!(feature = "tls") {
        return Err("https upstreams need the `tls` cargo feature".into());
    }
    let addr = (host.trim_start_matches('[').trim_end_matches(']'), port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host:?} resolves to no address"))?;
    Ok(UpstreamUrl { tls, host, port, addr })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "demo")]
    #[test]
    fn defaults_are_valid_and_simulated() {
        let c = Config::defaults();
        assert!(matches!(c.upstream, UpstreamTarget::Simulated { .. }));
        assert_eq!(c.listen, DEFAULT_LISTEN);
    }

    #[test]
    fn reports_every_problem_at_once() {
        let file = FileConfig::parse(
            "[server]\nlisten = \"nope\"\nthreads = 0\n[cache]\nmax_bytes = 5\n[staleness.default]\nfortnight = 3\n",
        )
        .unwrap();
        let Err(ConfigError::Invalid(problems)) = Config::from_file_config(file, &Overrides::default()) else {
            panic!("expected invalid");
        };
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["server.listen", "server.threads", "cache.max_bytes", "staleness.default.fortnight"]);
    }

    #[test]
    fn the_shared_budget_is_on_with_l2_and_needs_it() {
        let l2 = "[cache]\npartition_secret = \"0123456789abcdef0\"\n[l2]\nurl = \"redis://127.0.0.1:6379\"\n";
        for (text, shared) in [
            ("", Ok(false)),
            ("[budget]\nshared = false\n", Ok(false)),
            ("[budget]\nshared = true\n", Err("budget.shared")),
            (l2, Ok(true)),
            (&format!("{l2}[budget]\nshared = false\n")[..], Ok(false)),
            (&format!("{l2}[budget]\nslot_lease_ms = 10\n")[..], Err("budget.slot_lease_ms")),
            (&format!("{l2}[budget]\nassumed_replicas = 0\n")[..], Err("budget.assumed_replicas")),
        ] {
            let result = Config::from_file_config(FileConfig::parse(text).unwrap(), &Overrides::default());
            match (result, shared) {
                (Ok(c), Ok(shared)) => assert_eq!(c.budget.shared, shared, "{text}"),
                (Err(ConfigError::Invalid(p)), Err(key)) => assert_eq!(p[0].key, key, "{text}"),
                (other, _) => panic!("{text}: {:?}", other.map(|c| c.budget)),
            }
        }
    }

    #[test]
    fn the_admin_listener_cannot_share_the_proxy_address() {
        for (listen, admin, ok) in [
            ("127.0.0.1:8080", "127.0.0.1:8080", false),
            ("0.0.0.0:8080", "127.0.0.1:8080", false),
            ("127.0.0.1:8080", "0.0.0.0:8080", false),
            ("127.0.0.1:8080", "127.0.0.1:9090", true),
            ("127.0.0.1:8080", "127.0.0.2:8080", true),
        ] {
            let file = FileConfig::parse(&format!("[server]\nlisten = \"{listen}\"\n[admin]\nlisten = \"{admin}\"\n"))
                .unwrap();
            let result = Config::from_file_config(file, &Overrides::default());
            match result {
                Ok(_) => assert!(ok, "{listen} / {admin} accepted"),
                Err(ConfigError::Invalid(p)) => {
                    assert!(!ok, "{listen} / {admin}: {p:?}");
                    assert_eq!(p[0].key, "admin.listen");
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn access_log_setting() {
        assert_eq!(Config::defaults().access_log, AccessLog::Misses);
        for (text, want) in [("all", AccessLog::All), ("misses", AccessLog::Misses), ("none", AccessLog::None)] {
            let file = FileConfig::parse(&format!("[log]\naccess = \"{text}\"\n")).unwrap();
            assert_eq!(Config::from_file_config(file, &Overrides::default()).unwrap().access_log, want);
        }
        assert!(FileConfig::parse("[log]\naccess = \"hits\"\n").is_err());
    }

    #[test]
    fn a_credentials_share_of_the_queue_is_at_least_one_and_at_most_the_queue() {
        assert_eq!(Config::defaults().max_queued_per_principal, DEFAULT_MAX_QUEUED_PER_PRINCIPAL);
        let file = FileConfig::parse("[refresh]\nqueue_capacity = 16\n").unwrap();
        assert_eq!(Config::from_file_config(file, &Overrides::default()).unwrap().max_queued_per_principal, 16);
        let file = FileConfig::parse("[refresh]\nmax_queued_per_principal = 0\n").unwrap();
        let Err(ConfigError::Invalid(problems)) = Config::from_file_config(file, &Overrides::default()) else {
            panic!("expected invalid");
        };
        assert_eq!(problems[0].key, "refresh.max_queued_per_principal");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = FileConfig::parse("[server]\nlisten_addr = \"x\"\n").unwrap_err();
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn overrides_win() {
        let file = FileConfig::parse("[server]\nlisten = \"127.0.0.1:1\"\n").unwrap();
        let o = Overrides {
            listen: Some("127.0.0.1:2".into()),
            upstream: Some("http://127.0.0.1:9".into()),
            ..Default::default()
        };
        let c = Config::from_file_config(file, &o).unwrap();
        assert_eq!(c.listen, "127.0.0.1:2");
        let u = match c.upstream {
            UpstreamTarget::Remote(u) => u,
            #[cfg(feature = "demo")]
            other => panic!("{other:?}"),
        };
        assert_eq!((u.tls, u.port, u.host_header()), (false, 9, "127.0.0.1:9".to_string()));
    }

    #[test]
    fn upstream_urls() {
        assert!(parse_upstream_url("ftp://x").is_err());
        assert!(parse_upstream_url("http://127.0.0.1:0").is_err());
        assert!(parse_upstream_url("http://127.0.0.1/api").is_err());
        let u = parse_upstream_url("http://127.0.0.1/").unwrap();
        assert_eq!((u.port, u.host_header()), (80, "127.0.0.1".to_string()));
    }
}
