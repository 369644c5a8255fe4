//! Prometheus metrics, rendered by the admin listener's `/metrics`. Names follow Prometheus
//! conventions (`_total` counters, `_seconds` histograms); label values come from `as_str()`-style
//! constants, never from request data, so cardinality is bounded.

use std::sync::OnceLock;

use parking_lot::Mutex;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Per-request handles of `requests` and `request_seconds`, resolved once per label set.
    per_request: PerRequest,
    /// Requests answered, by route, refresh mode and cache outcome.
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    /// Upstream calculations started, by reason (miss, stale, forced, background, ahead).
    pub calculations: IntCounterVec,
    /// Upstream reads that never calculate, by reason (peek, revalidation, list, ahead).
    pub upstream_reads: IntCounterVec,
    pub upstream_seconds: Histogram,
    /// Requests that joined a calculation another request started.
    pub coalesced: IntCounter,
    /// Results a variant took from another variant of the same upstream cache key instead of
    /// asking the upstream.
    pub adopted: IntCounter,
    pub upstream_errors: IntCounterVec,
    /// Insight requests the proxy refused without an upstream call, by reason: `unconfirmed` (the
    /// allowance for unknown credentials was spent), `refused` (the upstream's remembered 401/403).
    pub trust_refusals: IntCounterVec,
    /// Query parameters on insight reads that the proxy does not know (each is part of the key).
    pub unknown_params: IntCounter,
    pub revalidations: IntCounter,
    /// Async requests answered with concurrency_limit_exceeded (queue or status registry full).
    pub async_refused: IntCounter,
    pub evictions: IntCounterVec,
    // Gauges set at scrape time from the components that own the numbers.
    pub queue_depth: IntGauge,
    pub busy_workers: IntGauge,
    pub cache_entries: IntGauge,
    pub cache_bytes: IntGauge,
    pub sendfile_bodies: IntGauge,
    pub status_records: IntGauge,
    pub status_running: IntGauge,
    pub purge_records: IntGauge,
    pub status_bytes: IntGauge,
    pub in_flight: IntGaugeVec,
    pub circuit_open: IntGauge,
    /// The shared tier's metrics, registered on first use ([`Metrics::l2`]).
    l2: OnceLock<L2Metrics>,
    /// How long the oldest query_status record still running has been running.
    pub status_oldest_running_seconds: IntGauge,
    // The configured limits, so dashboards and alerts compare against them.
    pub cache_max_bytes: IntGauge,
    pub queue_capacity: IntGauge,
    pub workers: IntGauge,
    /// Calculations and reads that waited for budget, by limit (`rate`, `slot`); mirrored from
    /// the budget's own counts ([`Metrics::mirror`]).
    pub budget_waits: IntCounterVec,
    /// Calculations and reads that gave up waiting for budget, by limit.
    pub budget_exhausted: IntCounterVec,
    /// Held while mirrored counters are brought up to date, so two scrapes cannot both add.
    mirroring: Mutex<()>,
    /// With `[budget] shared`: 1 on the cluster's budget, 0 on this replica's share (Redis down).
    pub budget_shared: IntGauge,
    /// With `[budget] shared`: the live replicas last seen (each one's share while Redis is down).
    pub budget_replicas: IntGauge,
}

pub struct L2Metrics {
    pub up: IntGauge,
    /// Failed shared-tier calls, mirrored from the tier's own count.
    pub errors: IntCounter,
    /// Shared-tier values dropped because their MAC failed, by kind (entry, status, purge,
    /// confirmation, refusal, event).
    pub rejected: IntCounterVec,
}

/// The `limit` label values of the budget counters.
pub const BUDGET_LIMITS: [&str; 2] = ["rate", "slot"];

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

/// Buckets from 0.1 ms (a hit) to 3 min (PostHog's longest query).
const SECONDS_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 180.0];

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new_custom(Some("insights_proxy".into()), None).expect("valid registry");
        let request_seconds = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "Time to answer a request, by route.")
                .buckets(SECONDS_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        r.register(Box::new(request_seconds.clone())).expect("unique metric");
        let upstream_seconds = Histogram::with_opts(
            HistogramOpts::new("upstream_duration_seconds", "Time of the proxy's own upstream calls.")
                .buckets(SECONDS_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        r.register(Box::new(upstream_seconds.clone())).expect("unique metric");
        let in_flight = IntGaugeVec::new(Opts::new("in_flight", "Upstream calls in flight, by kind."), &["kind"])
            .expect("valid metric");
        r.register(Box::new(in_flight.clone())).expect("unique metric");
        let budget_waits =
            counter_vec(&r, "budget_waits_total", "Upstream calls that waited for budget, by limit.", &["limit"]);
        let budget_exhausted = counter_vec(
            &r,
            "budget_exhausted_total",
            "Upstream calls refused because the budget did not come in time, by limit.",
            &["limit"],
        );
        // Exported at 0 from the start, so rates and alerts see a series before the first wait.
        for limit in BUDGET_LIMITS {
            budget_waits.with_label_values(&[limit]);
            budget_exhausted.with_label_values(&[limit]);
        }
        Self {
            requests: counter_vec(&r, "requests_total", "Requests answered.", &["route", "mode", "cache"]),
            request_seconds,
            calculations: counter_vec(&r, "upstream_calculations_total", "Upstream calculations started.", &["reason"]),
            upstream_reads: counter_vec(
                &r,
                "upstream_reads_total",
                "Upstream reads that never calculate (refresh=force_cache).",
                &["reason"],
            ),
            upstream_seconds,
            coalesced: gauge_free_counter(&r, "coalesced_total", "Requests that shared another request's calculation."),
            adopted: gauge_free_counter(
                &r,
                "adopted_total",
                "Results taken from another variant of the same upstream cache key (same credential).",
            ),
            upstream_errors: counter_vec(&r, "upstream_errors_total", "Failed upstream calls, by kind.", &["kind"]),
            unknown_params: gauge_free_counter(
                &r,
                "unknown_query_params_total",
                "Query parameters on insight reads that the proxy does not know; each is part of the cache key.",
            ),
            trust_refusals: counter_vec(
                &r,
                "trust_refusals_total",
                "Insight requests refused without an upstream call: unconfirmed (the allowance for unknown credentials \
                 was spent) or refused (the upstream's remembered 401/403).",
                &["reason"],
            ),
            revalidations: gauge_free_counter(
                &r,
                "revalidations_total",
                "Credential revalidations (cached data older than the revalidation window).",
            ),
            async_refused: gauge_free_counter(
                &r,
                "async_refused_total",
                "Async requests answered with concurrency_limit_exceeded (queue or status registry full).",
            ),
            evictions: counter_vec(
                &r,
                "cache_evictions_total",
                "Entries removed from the cache, by cause.",
                &["cause"],
            ),
            queue_depth: gauge(&r, "queue_depth", "Background calculations waiting for a worker."),
            busy_workers: gauge(&r, "busy_workers", "Background workers running a calculation."),
            cache_entries: gauge(&r, "cache_entries", "Entries in the cache."),
            cache_bytes: gauge(&r, "cache_bytes", "Bytes the cache's entries weigh (bodies and keys)."),
            sendfile_bodies: gauge(
                &r,
                "sendfile_bodies",
                "Large cached bodies held in sealed files, sent to cleartext HTTP/1 clients with sendfile.",
            ),
            status_records: gauge(&r, "query_status_records", "query_status records kept."),
            status_running: gauge(&r, "query_status_running", "query_status records still running."),
            purge_records: gauge(&r, "purge_records", "Purge records kept (insights, projects, credentials purged)."),
            status_bytes: gauge(&r, "query_status_bytes", "Bytes charged to completed query_status records."),
            in_flight,
            circuit_open: gauge(&r, "upstream_circuit_open", "1 while the upstream circuit breaker is open."),
            l2: OnceLock::new(),
            status_oldest_running_seconds: gauge(
                &r,
                "query_status_oldest_running_seconds",
                "Age of the oldest query_status record still running (0 when none runs).",
            ),
            cache_max_bytes: gauge(&r, "cache_max_bytes", "Configured [cache] max_bytes."),
            queue_capacity: gauge(&r, "queue_capacity", "Configured [refresh] queue_capacity."),
            workers: gauge(&r, "workers", "Configured [refresh] workers."),
            budget_waits,
            budget_exhausted,
            mirroring: Mutex::new(()),
            budget_shared: gauge(
                &r,
                "budget_shared",
                "1 while the upstream budget is the cluster's (Redis); 0 while this replica uses its share.",
            ),
            budget_replicas: gauge(&r, "budget_replicas", "Live replicas sharing the upstream budget, as last seen."),
            per_request: PerRequest::default(),
            registry: r,
        }
    }

    /// Counts one answered request and its duration. The label values are looked up once per
    /// combination and the handles kept (a label lookup hashes the values and takes a lock); a
    /// value outside the known sets falls back to the lookup.
    pub fn observe_request(&self, route: &'static str, mode: &'static str, cache: &'static str, seconds: f64) {
        let p = &self.per_request;
        match (pos(&ROUTE_LABELS, route), pos(&MODE_LABELS, mode), pos(&CACHE_LABELS, cache)) {
            (Some(r), Some(m), Some(c)) => {
                let i = (r * MODE_LABELS.len() + m) * CACHE_LABELS.len() + c;
                p.counters[i].get_or_init(|| self.requests.with_label_values(&[route, mode, cache])).inc();
                p.durations[r].get_or_init(|| self.request_seconds.with_label_values(&[route])).observe(seconds);
            }
            _ => {
                self.requests.with_label_values(&[route, mode, cache]).inc();
                self.request_seconds.with_label_values(&[route]).observe(seconds);
            }
        }
    }

    /// Brings each counter up to `total`, a count kept since start by the component that owns
    /// it (so that component needs no metrics handle).
    pub fn mirror(&self, totals: &[(IntCounter, u64)]) {
        let _one_scrape_at_a_time = self.mirroring.lock();
        for (c, total) in totals {
            c.inc_by(total.saturating_sub(c.get()));
        }
    }

    /// The shared tier's metrics, registered the first time they are asked for: a proxy without
    /// `[l2]` exports none, so an "L2 down" alert cannot fire on it.
    pub fn l2(&self) -> &L2Metrics {
        self.l2.get_or_init(|| L2Metrics {
            up: gauge(&self.registry, "l2_up", "1 while the shared tier (Redis) answers; 0 while its breaker is open."),
            errors: gauge_free_counter(&self.registry, "l2_errors_total", "Failed shared-tier calls."),
            rejected: counter_vec(
                &self.registry,
                "l2_rejected_total",
                "Shared-tier values dropped because their MAC failed (forged, moved or tampered), by kind.",
                &["kind"],
            ),
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        out
    }
}

/// The `route` label values the proxy uses.
pub const ROUTE_LABELS: [&str; 6] =
    ["insight", "insight_list", "insight_write", "query_status", "passthrough", "rejected"];
/// The `mode` label values: the refresh modes and "-" (none).
const MODE_LABELS: [&str; 8] = [
    "-",
    "force_cache",
    "blocking",
    "async",
    "lazy_async",
    "force_blocking",
    "force_async",
    "async_except_on_cache_miss",
];
/// Every value [`crate::cache_status::CacheStatus::label`] returns (and `none`).
const CACHE_LABELS: [&str; 8] = ["hit", "stale", "stale_if_error", "miss", "refresh", "forced", "none", "bypass"];

fn pos(list: &[&str], v: &str) -> Option<usize> {
    list.iter().position(|x| *x == v)
}

struct PerRequest {
    counters: Box<[OnceLock<IntCounter>]>,
    durations: [OnceLock<Histogram>; ROUTE_LABELS.len()],
}

impl Default for PerRequest {
    fn default() -> Self {
        let n = ROUTE_LABELS.len() * MODE_LABELS.len() * CACHE_LABELS.len();
        Self { counters: (0..n).map(|_| OnceLock::new()).collect(), durations: Default::default() }
    }
}

fn gauge_free_counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.requests.with_label_values(&["insight", "blocking", "hit"]).inc();
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("insights_proxy_requests_total{cache=\"hit\",mode=\"blocking\",route=\"insight\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn mirrored_counters_follow_their_totals_and_never_go_back() {
        let m = Metrics::new();
        let text = || String::from_utf8(m.render()).unwrap();
        assert!(text().contains("insights_proxy_budget_exhausted_total{limit=\"slot\"} 0"), "{}", text());
        let slot = m.budget_exhausted.with_label_values(&["slot"]);
        m.mirror(&[(slot.clone(), 3), (m.budget_waits.with_label_values(&["rate"]), 5)]);
        m.mirror(&[(slot, 2)]);
        assert!(text().contains("insights_proxy_budget_exhausted_total{limit=\"slot\"} 3"), "{}", text());
        assert!(text().contains("insights_proxy_budget_waits_total{limit=\"rate\"} 5"), "{}", text());
    }

    #[test]
    fn the_shared_tier_is_exported_only_once_asked_for() {
        let m = Metrics::new();
        assert!(!String::from_utf8(m.render()).unwrap().contains("l2_"));
        m.l2().up.set(1);
        m.l2().up.set(1);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("insights_proxy_l2_up 1") && text.contains("insights_proxy_l2_errors_total 0"), "{text}");
    }

    #[test]
    fn cached_handles_count_like_label_lookups() {
        let m = Metrics::new();
        m.observe_request("insight", "-", "hit", 0.001);
        m.observe_request("insight", "-", "hit", 0.001);
        m.observe_request("passthrough", "-", "none", 0.001);
        m.observe_request("somewhere", "-", "hit", 0.001);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("insights_proxy_requests_total{cache=\"hit\",mode=\"-\",route=\"insight\"} 2"), "{text}");
        assert!(text.contains("insights_proxy_requests_total{cache=\"none\",mode=\"-\",route=\"passthrough\"} 1"));
        assert!(text.contains("insights_proxy_requests_total{cache=\"hit\",mode=\"-\",route=\"somewhere\"} 1"));
        assert!(text.contains("insights_proxy_request_duration_seconds_count{route=\"insight\"} 2"), "{text}");
        for mode in crate::refresh::RefreshMode::ALL {
            assert!(MODE_LABELS.contains(&mode.as_str()));
        }
    }
}
