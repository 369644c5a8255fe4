//! Criterion micro-benchmarks of the cache-hit path, through the library's public API only.
//!
//! Run: `CARGO_TARGET_DIR=/work/target-bench cargo bench --bench hot_path` (about a minute).
//! Filter: `cargo bench --bench hot_path -- render` runs only the benchmarks whose name matches.
//!
//! What a hit costs in the library, step by step (in the order `http::decide` and
//! `insights::retrieve` run them), then the steps together (`hit/composite`), then the library's
//! whole answer without sockets (`hit/retrieve`: `insights::retrieve` on a filled cache), and the
//! per-request metrics work `http::ctx` `log_request` does. The body is the simulated backend's insight whose
//! answer is closest to 4.8 KB (the size used in the nginx comparisons, see `benches/compare.sh`).
//! Everything pingora does (HTTP parsing, response header serialisation, socket writes) is outside
//! these numbers; `benches/compare.sh` measures the whole thing.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method};

use insights_proxy::app::App;
use insights_proxy::auth::Principal;
use insights_proxy::cache::{CacheKey, Entry, InsightCache, PartitionKeyer};
use insights_proxy::cache_status::CacheStatus;
use insights_proxy::clock::Clock;
use insights_proxy::config::{parse_upstream_url, Config, UpstreamTarget};
use insights_proxy::insights::{self, InsightCall};
use insights_proxy::metrics::Metrics;
use insights_proxy::query::QueryParams;
use insights_proxy::refresh::{plan, CacheState, RefreshMode, RefreshParam, Thresholds, View};
use insights_proxy::routes::{route, Route};
use insights_proxy::upstream::{UpstreamClient, UpstreamSettings};
use posthog_sim::{SimConfig, Simulator};

const TOKEN: &str = "Bearer phx_demo_all";
/// A plain tile load: no query string.
const PLAIN_QUERY: Option<&str> = None;
/// A dashboard tile with an override: the variant key normalises the JSON (a serde_json parse).
const TILE_QUERY: &str = "from_dashboard=2&filters_override=%7B%22date_from%22%3A%22-30d%22%7D";
const TARGET_BODY: usize = 4_800;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

/// Headers as a dashboard client (here: wrk/curl-like) sends them.
fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(http::header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
    h.insert(http::header::USER_AGENT, HeaderValue::from_static("Mozilla/5.0 (X11; Linux x86_64) dashboard"));
    h.insert(http::header::ACCEPT, HeaderValue::from_static("application/json"));
    h.insert(http::header::ACCEPT_ENCODING, HeaderValue::from_static("gzip, deflate, br"));
    h.insert(http::header::AUTHORIZATION, HeaderValue::from_static(TOKEN));
    h
}

/// The simulated backend's insight (project 1: ids 1–20) whose upstream body is closest to 4.8 KB,
/// as `(id, body)`.
fn sample_insight(rt: &tokio::runtime::Runtime) -> (u64, Vec<u8>) {
    let sim = Simulator::new(SimConfig { calc_delay: Duration::ZERO, ..SimConfig::default() }, Clock::new());
    let mut headers = HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, HeaderValue::from_static(TOKEN));
    let mut best: Option<(u64, Vec<u8>)> = None;
    for id in 1..=20u64 {
        let path = format!("/api/environments/1/insights/{id}/?refresh=blocking");
        let resp = rt.block_on(sim.handle("GET", &path, &headers, b""));
        assert_eq!(resp.status, 200, "the simulator answers insight {id}");
        let dist = |n: usize| n.abs_diff(TARGET_BODY);
        if best.as_ref().is_none_or(|(_, b)| dist(resp.body.len()) < dist(b.len())) {
            best = Some((id, resp.body.to_vec()));
        }
    }
    best.expect("20 insights")
}

struct Fixture {
    rt: tokio::runtime::Runtime,
    insight: u64,
    path: String,
    headers: HeaderMap,
    keyer: PartitionKeyer,
    thresholds: Thresholds,
    cache: InsightCache,
    entry: Arc<Entry>,
    plain_key: CacheKey,
}

fn fixture() -> Fixture {
    let rt = runtime();
    let (insight, body) = sample_insight(&rt);
    let cache = InsightCache::new(256 << 20, Duration::from_secs(7 * 86_400), None);
    let entry = Arc::new(Entry::from_upstream(&body, insight, cache.begin()).expect("a cacheable insight"));
    let keyer = PartitionKeyer::new(Some("benchmark-partition-secret"));
    let headers = request_headers();
    let principal = Principal::from_request(&keyer, &headers, None, None).expect("valid").expect("a credential");
    let plain_key = CacheKey::new(principal.partition(), 1, insight, &QueryParams::default());
    rt.block_on(async {
        // Some neighbours, so the lookup is not in a one-entry map.
        for other in 0..1_000u64 {
            let q = QueryParams::parse(Some(&format!("filters_override=%7B%22x%22%3A{other}%7D"))).unwrap();
            let k = CacheKey::new(principal.partition(), 1, insight, &q);
            cache.insert(k, entry.clone()).await;
        }
        assert!(cache.insert(plain_key, entry.clone()).await);
        cache.run_pending_tasks().await;
    });
    let rendered = entry.render(true, None).len();
    eprintln!("hot_path: insight {insight}, upstream body {} B, rendered answer {rendered} B", body.len());
    Fixture {
        rt,
        insight,
        path: format!("/api/environments/1/insights/{insight}/"),
        headers,
        keyer,
        thresholds: Thresholds::posthog(),
        cache,
        entry,
        plain_key,
    }
}

fn steps(c: &mut Criterion, f: &Fixture) {
    let mut g = c.benchmark_group("step");

    // 1. http::decide: query string, then the router.
    g.bench_function("query_parse/plain", |b| b.iter(|| QueryParams::parse(black_box(PLAIN_QUERY))));
    g.bench_function("query_parse/tile", |b| b.iter(|| QueryParams::parse(black_box(Some(TILE_QUERY)))));
    let empty = QueryParams::default();
    g.bench_function("route", |b| b.iter(|| route(black_box(&Method::GET), black_box(&f.path), black_box(&empty))));
    g.bench_function("parse+route", |b| {
        b.iter(|| {
            let q = QueryParams::parse(black_box(PLAIN_QUERY)).unwrap();
            route(&Method::GET, black_box(&f.path), &q)
        })
    });

    // 2. The principal (its partition included) and the key.
    let principal = |h| Principal::from_request(&f.keyer, h, None, None).unwrap().unwrap();
    g.bench_function("principal", |b| b.iter(|| principal(black_box(&f.headers))));
    let p = principal(&f.headers).partition();
    g.bench_function("cache_key/plain", |b| b.iter(|| CacheKey::new(black_box(p), 1, black_box(f.insight), &empty)));
    let tile = QueryParams::parse(Some(TILE_QUERY)).unwrap();
    g.bench_function("cache_key/tile", |b| b.iter(|| CacheKey::new(black_box(p), 1, black_box(f.insight), &tile)));
    g.bench_function("principal+key", |b| {
        b.iter(|| CacheKey::new(principal(black_box(&f.headers)).partition(), 1, f.insight, &empty))
    });

    // 3. The lookup (moka, plus the epoch check), on a tokio runtime as in the proxy.
    g.bench_function("cache_get", |b| {
        b.iter_custom(|iters| {
            f.rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(f.cache.get(black_box(&f.plain_key)).await);
                }
                start.elapsed()
            })
        })
    });

    // 4. Staleness and the decision.
    let clock = Clock::new();
    g.bench_function("clock_now", |b| b.iter(|| black_box(&clock).now()));
    let now = clock.now();
    g.bench_function("cache_state", |b| {
        b.iter(|| CacheState::of(black_box(Some(&f.entry.stale)), black_box(now), &f.thresholds))
    });
    let view = View {
        state: CacheState::Fresh,
        in_flight: false,
        confirmed: true,
        upstream_empty: false,
        from_upstream: false,
        too_soon_to_force: false,
    };
    g.bench_function("plan", |b| b.iter(|| plan(black_box(RefreshMode::ForceCache), black_box(&view))));
    g.bench_function("refresh_param", |b| b.iter(|| RefreshParam::Text(black_box("blocking")).mode()));
    g.bench_function("ttl_seconds", |b| b.iter(|| f.entry.stale.ttl_seconds(black_box(now), &f.thresholds)));

    // 5. The body.
    g.bench_function("render_4.8KB", |b| b.iter(|| black_box(&f.entry).render(black_box(true), black_box(None))));
    g.bench_function("cache_status_format", |b| {
        b.iter(|| {
            let ttl = black_box(f.entry.stale.ttl_seconds(now, &f.thresholds));
            CacheStatus::hit().ttl(ttl).to_string()
        })
    });
    g.finish();
}

fn metrics(c: &mut Criterion) {
    let m = Metrics::new();
    let mut g = c.benchmark_group("step");
    // http::ctx log_request, once per request.
    g.bench_function("metrics_per_request", |b| {
        let started = Instant::now();
        b.iter(|| {
            let cs = black_box(CacheStatus::hit().ttl(Some(21_599)));
            m.requests.with_label_values(&["insight", "force_cache", cs.label()]).inc();
            m.request_seconds.with_label_values(&["insight"]).observe(started.elapsed().as_secs_f64());
        })
    });
    g.finish();
}

/// Every library step of a hit together, as `request_filter` + `retrieve` + `answer` run them.
fn composite(c: &mut Criterion, f: &Fixture) {
    let clock = Clock::new();
    let mut g = c.benchmark_group("hit");
    for (name, query) in [("composite/plain", PLAIN_QUERY), ("composite/tile", Some(TILE_QUERY))] {
        if let Some(q) = query {
            // The tile variant must be a hit too.
            let qp = QueryParams::parse(Some(q)).unwrap();
            let p = Principal::from_request(&f.keyer, &f.headers, None, None).unwrap().unwrap();
            let k = CacheKey::new(p.partition(), 1, f.insight, &qp);
            f.rt.block_on(f.cache.insert(k, f.entry.clone()));
        }
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                f.rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let q = QueryParams::parse(black_box(query)).unwrap();
                        let Route::InsightRetrieve { project, insight } = route(&Method::GET, black_box(&f.path), &q)
                        else {
                            unreachable!("an insight path")
                        };
                        let p =
                            Principal::from_request(&f.keyer, black_box(&f.headers), q.get("personal_api_key"), None)
                                .unwrap()
                                .unwrap();
                        let mode = match q.get("refresh") {
                            Some(r) => RefreshParam::Text(r),
                            None => RefreshParam::Absent,
                        }
                        .mode();
                        let key = CacheKey::new(p.partition(), project, insight, &q);
                        let entry = f.cache.get(&key).await.expect("a hit");
                        let state = CacheState::of(Some(&entry.stale), clock.now(), &f.thresholds);
                        let view = View {
                            state,
                            in_flight: false,
                            confirmed: true,
                            upstream_empty: false,
                            from_upstream: false,
                            too_soon_to_force: false,
                        };
                        black_box(plan(mode, &view));
                        black_box(entry.render(true, None));
                    }
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
}

/// `insights::retrieve` on a filled cache with a confirmed credential: the library's whole answer
/// to a hit (key, lookup, in-flight check, revalidation window, decision, Cache-Status, body),
/// without pingora.
fn retrieve(c: &mut Criterion, f: &Fixture) {
    let mut config = Config::defaults();
    config.upstream = UpstreamTarget::Remote(parse_upstream_url("http://127.0.0.1:9").expect("a URL"));
    config.revalidate_after = Duration::from_secs(86_400);
    config.partition_secret = Some("benchmark-partition-secret".into());
    let settings = UpstreamSettings {
        url: parse_upstream_url("http://127.0.0.1:9").expect("a URL"),
        connect_timeout: config.connect_timeout,
        read_timeout: config.read_timeout,
        max_response_bytes: config.max_response_bytes,
    };
    let breaker = config.breaker;
    let app = App::new(Arc::new(config), Clock::new(), UpstreamClient::new(settings, breaker));
    let principal = Principal::from_request(&app.keyer, &f.headers, None, None).unwrap().unwrap();
    let key = CacheKey::new(principal.partition(), 1, f.insight, &QueryParams::default());
    f.rt.block_on(async {
        assert!(app.cache.insert(key, f.entry.clone()).await);
        app.cache.run_pending_tasks().await;
    });
    app.engine.confirm(key.partition, 1, Some(f.insight));
    let mut g = c.benchmark_group("hit");
    g.bench_function("retrieve", |b| {
        b.iter_custom(|iters| {
            f.rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let call = InsightCall {
                        project: 1,
                        insight: f.insight,
                        path: f.path.clone(),
                        query: QueryParams::default(),
                        principal: Principal::from_request(&app.keyer, black_box(&f.headers), None, None)
                            .unwrap()
                            .unwrap(),
                        mode: RefreshMode::ForceCache,
                        truthy: true,
                    };
                    let reply = insights::retrieve(&app, call).await;
                    debug_assert!(reply.cache_status.is_hit());
                    black_box(reply);
                }
                start.elapsed()
            })
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let f = fixture();
    steps(c, &f);
    metrics(c);
    composite(c, &f);
    retrieve(c, &f);
}

criterion_group! {
    name = hot_path;
    // Small and quick: ~25 benchmarks × (0.5 s warm-up + 1.5 s measurement) ≈ 1 minute.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(30)
        .noise_threshold(0.05);
    targets = benches
}
criterion_main!(hot_path);
