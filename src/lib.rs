//! insights-proxy: a caching reverse proxy for PostHog's insights API.
//!
//! # Layout
//! - [`config`]: file + flags + environment → one validated [`config::Config`].
//! - [`http`]: the front door: connections ([`http::conn`]), framing checks ([`http::framing`]),
//!   the decision about each request, the proxy's own answers and pingora's pass-through hooks.
//! - [`routes`]: the only place that knows URL shapes; a pure `route()`. [`query`] parses query strings strictly.
//! - [`fields`]: a request's header fields, read the same way from either HTTP/1 parser.
//! - [`auth`]: the request's one [`auth::Principal`], built at the front door; its partition is in
//!   every key. [`trust`]: confirmations and refusals of principals. [`failure`]: failures by origin.
//! - [`refresh`]: parsing `refresh`, staleness, and [`refresh::plan`], the one decision of what a
//!   request does.
//! - [`cache`]: entries and [`cache::InsightCache`], the one type the rest talks to.
//! - [`budget`]: the calculation budget (per-project slots by priority, per-key rates).
//! - [`engine`]: every upstream call about an insight (calculations, reads, the background queue
//!   and its workers), behind a narrow API; [`flights`]: single flight; [`status`]: query statuses.
//! - [`app`]: the shared state (configuration, clock, cache, statuses, metrics, the engine).
//! - [`cache_status`]: how an answer was produced (the `Cache-Status` header, as a type).
//! - [`insights`]: answering retrieve, list and status polls by carrying out the plan.
//! - [`upstream`]: the client for the proxy's own upstream calls.
//! - `demo` (cargo feature `demo`): the demo mode, the proxy in front of the simulated PostHog of
//!   the `posthog-sim` crate when no upstream is configured.
//! - [`admin`]: the admin listener (metrics, health, purge/inspect); [`metrics`]: Prometheus metrics.
//! - `tls` (with the `tls` feature): the listener's certificate, its handshake and reloads.
//! - [`server`]: assembling pingora services and running them until a shutdown signal.

// The connection loop's futures (TLS, HTTP/1 and HTTP/2, the engine's calls, the shared tier's
// Cluster and Sentinel connections) nest deeper than the default limit of 128 allows.
#![recursion_limit = "256"]

pub mod admin;
pub mod app;
pub mod auth;
pub mod budget;
pub mod cache;
pub mod cache_status;
pub mod clock;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod engine;
pub mod error;
pub mod failure;
pub mod fields;
pub mod flights;
pub mod http;
pub mod insights;
pub mod metrics;
pub mod query;
pub mod redis_target;
pub mod refresh;
pub mod routes;
pub mod server;
pub mod status;
#[cfg(feature = "tls")]
pub mod tls;
pub mod trust;
pub mod upstream;
