//! A simulated PostHog insights backend: deterministic, in-memory and fast, for demos, tests
//! and benchmarks of the proxy. It reproduces PostHog's `refresh` modes, caching, staleness,
//! async query statuses, auth and error shapes as described in
//! the proxy repository's `docs/refresh-semantics.md` (the § numbers in this crate's comments are
//! its sections); only the numbers in results are made up. It shares no code with the proxy: its
//! staleness rule, `refresh` parsing, error bodies and datetimes are its own.
//!
//! # Serving
//! [`Simulator::service`] returns a pingora listening service; [`serve::server`] a whole pingora
//! server; [`Simulator::handle`] is the same handler without sockets, for unit tests. The
//! `posthog-sim` binary ([`cli`]) runs one on its own. [`testing`] runs pingora servers in-process
//! (tests stop them through a channel rather than a signal).
//!
//! # Time
//! The simulator reads time through a [`SimClock`], fed by any [`TimeSource`]: tests hand it the
//! clock they also give the proxy, and move both with one `advance`.
//!
//! # Endpoints
//! Under `/api/projects/:id/` and its alias `/api/environments/:id/` (trailing slash optional):
//! `insights/` (GET list, POST create), `insights/:id/` (GET, PATCH/PUT, DELETE → 405; `:id` may
//! also be a `short_id`), `insights/:id/sharing/`, `insights/:id/activity/`, `insights/activity/`,
//! `insights/:id/viewed/` (POST), `insights/cancel` (POST) and `query/:query_id/` (GET polls,
//! DELETE cancels). `GET /api/projects/` lists the projects the credential can see; `:id` may be
//! `@current`. Anything else is a PostHog-shaped 404.
//!
//! # Demo credentials
//! | credential | user | projects |
//! |---|---|---|
//! | `Authorization: Bearer phx_demo_all` | 1 Ada | all |
//! | `Authorization: Bearer phx_demo_p1` | 2 Grace | 1 only |
//! | `Authorization: Bearer phx_demo_p2` | 3 Alan | 2 only |
//! | `Cookie: sessionid=demo_session_all` | 1 Ada | all (writes need `csrftoken` cookie = `X-CSRFToken`) |
//!
//! A key may also come as the `personal_api_key` query parameter or JSON body field.
//!
//! # Demo data (the shape is fixed; the seed picks events, names, owners and numbers)
//! * Projects 1 "Hedgebox (production)" (UTC), 2 "Hedgebox (staging)" (Europe/Berlin),
//!   3 "Burrow mobile" (America/New_York).
//! * Insights 1–50: 1–20 in project 1, 21–35 in project 2, 36–50 in project 3. Insight `id` has
//!   shape `(id - 1) % 10`: 0 trends day `-7d`, 1 trends day `-30d`, 2 trends hour `-24h`,
//!   3 trends minute `-1h`, 4 trends week `-90d`, 5 trends month `-1y`, 6 funnel `-14d`,
//!   7 trends day fixed `2024-01-01`–`2024-01-31` (never stale), 8 funnel `-30d`, 9 trends day `-14d`.
//! * Dashboards 3k+1..3k+3 for project k+1: 3k+1 without filters (first six insights), 3k+2
//!   `date_from: -30d` (even positions), 3k+3 `-90d` by week for Chrome (odd positions; its first
//!   tile stores `filters_overrides: {"date_from": "-180d"}`).
//!
//! Every series/step object carries `calculation_number`, which changes on each recalculation.
//!
//! # Control API (no auth; not counted in `requests`)
//! `GET /_sim/stats`, `POST /_sim/revoke?token=T`, `POST /_sim/access?token=T&project=P&allowed=false`,
//! `POST /_sim/fault?kind=none|status&status=500|garbage|hang|null_result|concurrency`,
//! `POST /_sim/clock/advance?seconds=N`, `POST /_sim/calc_delay?ms=N`.

mod auth;
mod body;
pub mod cli;
pub mod clock;
mod control;
mod data;
mod dates;
pub mod datetime;
mod engine;
pub mod error;
mod handler;
mod http;
mod insights;
mod params;
mod query;
mod refresh;
mod results;
pub mod serve;
pub mod staleness;
pub mod testing;
#[cfg(test)]
mod tests;

pub use self::http::SimApp;
use bytes::Bytes;
pub use clock::{ManualClock, SimClock, TimeSource};
use parking_lot::RwLock;
pub use refresh::{next_allowed_refresh_delay, parse_refresh, RefreshMode, RefreshParam};
pub use staleness::{Interval, ThresholdMode, Thresholds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Simulator settings. `Default` is the documented behaviour of each field.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// How long one calculation takes. Default 200 ms.
    pub calc_delay: Duration,
    /// Seed of the demo data. Default 42.
    pub seed: u64,
    /// Concurrent calculations per team; beyond it insights answer HTTP 200 with
    /// `query_status.error_message: "concurrency_limit_exceeded"` (§2.4, §6). Default `Some(3)`.
    pub concurrency_limit: Option<usize>,
    /// Per personal API key `(per minute, per hour)` on the insights endpoints; beyond it a 429.
    /// Default `None` (off, like `RATE_LIMIT_ENABLED` off).
    pub rate_limit: Option<(u32, u32)>,
    /// DEFAULT and LAZY staleness per interval (§2.2). Default PostHog's tables
    /// ([`Thresholds::posthog`]).
    pub thresholds: Thresholds,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            calc_delay: Duration::from_millis(200),
            seed: 42,
            concurrency_limit: Some(3),
            rate_limit: None,
            thresholds: Thresholds::posthog(),
        }
    }
}

/// Injected failures for `/api/…` requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Every `/api` request answers this status with a PostHog-shaped JSON error.
    Status(u16),
    /// 200 with a body that is not JSON (a truncated JSON document).
    Garbage,
    /// Never answers while the fault is set (the request resumes when it is cleared; pingora
    /// drops it on shutdown).
    Hang,
    /// Insight bodies carry `result: null`.
    NullResult,
    /// Every calculation answers `concurrency_limit_exceeded`.
    Concurrency,
}

/// A response of [`Simulator::handle`]. `Content-Length` is added by the pingora adapter.
#[derive(Clone, Debug)]
pub struct SimResponse {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
}

/// State shared by all handles, requests and background tasks.
pub(crate) struct Inner {
    pub clock: SimClock,
    pub seed: u64,
    calc_delay_us: AtomicU64,
    pub concurrency_limit: Option<usize>,
    pub thresholds: Thresholds,
    fault: RwLock<Fault>,
    requests: AtomicU64,
    /// Requests answered 429 by the rate limit, and calculations refused by the concurrency limit.
    pub throttled: AtomicU64,
    pub limit_errors: AtomicU64,
    pub data: data::DataSet,
    pub engine: engine::Engine,
    pub auth: auth::Auth,
}

impl Inner {
    pub fn fault(&self) -> Fault {
        self.fault.read().clone()
    }

    pub fn calc_delay(&self) -> Duration {
        Duration::from_micros(self.calc_delay_us.load(Ordering::Relaxed))
    }

    fn set_calc_delay(&self, d: Duration) {
        self.calc_delay_us.store(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// The simulated backend. Cheap to clone; clones share all state.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

impl Simulator {
    /// A simulator reading `clock`: a [`SimClock`], or any [`TimeSource`] shared with others.
    pub fn new(cfg: SimConfig, clock: impl Into<SimClock>) -> Self {
        let clock = clock.into();
        let inner = Inner {
            clock,
            seed: cfg.seed,
            calc_delay_us: AtomicU64::new(0),
            concurrency_limit: cfg.concurrency_limit,
            thresholds: cfg.thresholds,
            fault: RwLock::new(Fault::None),
            requests: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            limit_errors: AtomicU64::new(0),
            data: data::build(cfg.seed),
            engine: engine::Engine::default(),
            auth: auth::Auth::new(cfg.rate_limit),
        };
        inner.set_calc_delay(cfg.calc_delay);
        Self { inner: Arc::new(inner) }
    }

    /// The clock this simulator reads (shared with whoever passed it in).
    pub fn clock(&self) -> &SimClock {
        &self.inner.clock
    }

    /// How many times this insight was calculated (any dashboard/override variant).
    pub fn calculations(&self, project: u64, insight: u64) -> u64 {
        self.inner.engine.calculations(project, insight)
    }

    pub fn total_calculations(&self) -> u64 {
        self.inner.engine.total_calculations()
    }

    /// HTTP requests handled, excluding the `/_sim/` control API.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Requests answered 429 by the per-key rate limit.
    pub fn throttled(&self) -> u64 {
        self.inner.throttled.load(Ordering::Relaxed)
    }

    /// Calculations answered `concurrency_limit_exceeded` (the per-team concurrency limit).
    pub fn limit_errors(&self) -> u64 {
        self.inner.limit_errors.load(Ordering::Relaxed)
    }

    /// The key or session id then gets 401.
    pub fn revoke_token(&self, token: &str) {
        self.inner.auth.revoke(token);
    }

    /// Grants or denies one project (403 when denied). An unknown token becomes a new
    /// personal API key with just this grant.
    pub fn set_project_access(&self, token: &str, project: u64, allowed: bool) {
        self.inner.auth.set_access(token, project, allowed);
    }

    /// Restricts (403) or restores one insight for a token, as PostHog's access control on a
    /// single insight does.
    pub fn set_insight_access(&self, token: &str, insight: u64, allowed: bool) {
        self.inner.auth.set_insight_access(token, insight, allowed);
    }

    pub fn set_fault(&self, fault: Fault) {
        *self.inner.fault.write() = fault;
    }

    pub fn set_calc_delay(&self, d: Duration) {
        self.inner.set_calc_delay(d);
    }

    /// A pingora listening service on `listen` (e.g. `127.0.0.1:8010`) serving this simulator.
    pub fn service(&self, listen: &str) -> pingora::services::listening::Service<SimApp> {
        let mut service =
            pingora::services::listening::Service::new("simulated posthog".to_owned(), SimApp::new(self.clone()));
        service.add_tcp(listen);
        service
    }

    /// Handles one request without sockets. `path_and_query` is the request target
    /// (`/api/projects/1/insights/?refresh=blocking`); `Host` comes from `headers`.
    pub async fn handle(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &::http::HeaderMap,
        body: &[u8],
    ) -> SimResponse {
        handler::handle(&self.inner, method, path_and_query, headers, body).await
    }
}
