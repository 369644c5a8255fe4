//! Unit tests of the simulator through its plain handler (no sockets), plus one pingora smoke test.

use super::*;
use ::http::HeaderMap;
use serde_json::{json, Value};

const ALL: &str = "phx_demo_all";
const P1: &str = "phx_demo_p1";
const HOST: &str = "sim.test:8010";

fn config(calc_ms: u64) -> SimConfig {
    SimConfig { calc_delay: Duration::from_millis(calc_ms), ..SimConfig::default() }
}

fn sim() -> Simulator {
    Simulator::new(config(5), SimClock::new())
}

fn headers(token: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HOST.parse().unwrap());
    if let Some(t) = token {
        h.insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    h
}

fn json_of(r: &SimResponse) -> Value {
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

fn header<'a>(r: &'a SimResponse, name: &str) -> Option<&'a str> {
    r.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
}

async fn call(sim: &Simulator, method: &str, target: &str, token: Option<&str>, body: &str) -> SimResponse {
    sim.handle(method, target, &headers(token), body.as_bytes()).await
}

/// GET as `phx_demo_all`, expecting 200.
async fn get(sim: &Simulator, target: &str) -> Value {
    let r = call(sim, "GET", target, Some(ALL), "").await;
    assert_eq!(r.status, 200, "{target}: {}", String::from_utf8_lossy(&r.body));
    json_of(&r)
}

async fn patch(sim: &Simulator, target: &str, body: Value) -> SimResponse {
    call(sim, "PATCH", target, Some(ALL), &body.to_string()).await
}

fn insight(id: u64) -> String {
    format!("/api/projects/{}/insights/{id}/", data::seeded_project(id))
}

async fn wait_until(mut done: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("condition not reached in time");
}

/// Polls `query/:id/` until it stops answering 202.
async fn poll_until_done(sim: &Simulator, poll: &str) -> SimResponse {
    for _ in 0..1000 {
        let r = call(sim, "GET", poll, Some(ALL), "").await;
        if r.status != 202 {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{poll} never finished");
}

/// Waits until a background calculation has landed in the cache.
async fn wait_cached(sim: &Simulator, url: &str, calculation: u64) {
    for _ in 0..1000 {
        let b = get(sim, url).await;
        if b["result"][0]["calculation_number"].as_u64() == Some(calculation) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{url} never cached calculation {calculation}");
}

fn ts(v: &Value) -> time::OffsetDateTime {
    crate::datetime::parse_datetime(v.as_str().unwrap_or_default()).expect("a datetime")
}

fn calc_no(body: &Value) -> u64 {
    body["result"][0]["calculation_number"].as_u64().expect("a calculated result")
}

const FULL_FIELDS: &[&str] = &[
    "id",
    "short_id",
    "name",
    "derived_name",
    "filters",
    "query",
    "order",
    "deleted",
    "dashboards",
    "dashboard_tiles",
    "last_refresh",
    "cache_target_age",
    "next_allowed_client_refresh",
    "result",
    "hasMore",
    "columns",
    "created_at",
    "created_by",
    "description",
    "updated_at",
    "tags",
    "favorited",
    "saved",
    "last_modified_at",
    "last_modified_by",
    "is_sample",
    "effective_restriction_level",
    "effective_privilege_level",
    "user_access_level",
    "timezone",
    "is_cached",
    "query_status",
    "hogql",
    "types",
    "resolved_date_range",
    "filters_hash",
    "alerts",
    "last_viewed_at",
];

#[tokio::test]
async fn retrieve_shape_on_a_cold_cache() {
    let sim = sim();
    let b = get(&sim, &insight(1)).await;
    for &f in FULL_FIELDS {
        assert!(b.get(f).is_some(), "missing {f}");
    }
    assert!(b.get("color").is_none() && b.get("layouts").is_none());
    assert_eq!((b["id"].as_u64(), b["result"].clone(), b["last_refresh"].clone()), (Some(1), Value::Null, Value::Null));
    assert_eq!(
        (b["is_cached"].clone(), b["timezone"].clone(), b["query_status"].clone()),
        (json!(false), Value::Null, Value::Null)
    );
    assert!(b["filters_hash"].as_str().unwrap().starts_with("cache_1_"));
    assert_eq!(b["query"]["kind"], "InsightVizNode");
    assert_eq!(b["query"]["source"]["dateRange"]["date_from"], "-7d");
    assert_eq!(b["created_by"]["email"].as_str().map(|e| e.ends_with("@hedgebox.example")), Some(true));
    assert_eq!(b["dashboards"], json!([1, 2]));
    assert_eq!(sim.total_calculations(), 0);
    // the trailing slash is optional, `environments` is an alias, and a short_id works too
    let short = b["short_id"].as_str().unwrap().to_owned();
    for target in [
        "/api/projects/1/insights/1".to_owned(),
        "/api/environments/1/insights/1/".into(),
        format!("/api/projects/1/insights/{short}/"),
    ] {
        assert_eq!(get(&sim, &target).await["id"], 1, "{target}");
    }
}

#[tokio::test]
async fn auth_errors_are_posthog_shaped() {
    let sim = sim();
    let r = call(&sim, "GET", &insight(1), None, "").await;
    assert_eq!(r.status, 401);
    assert_eq!(
        json_of(&r),
        json!({"type": "authentication_error", "code": "not_authenticated", "detail": "Authentication credentials were not provided.", "attr": null})
    );
    assert!(header(&r, "www-authenticate").is_some());
    let r = call(&sim, "GET", &insight(1), Some("phx_nope"), "").await;
    assert_eq!((r.status, json_of(&r)["code"].clone()), (401, json!("authentication_failed")));
    assert_eq!(json_of(&r)["detail"], "Personal API key found in request is invalid.");
    let r = call(&sim, "GET", &insight(21), Some(P1), "").await;
    assert_eq!(
        (r.status, json_of(&r)),
        (
            403,
            json!({"type": "authentication_error", "code": "permission_denied", "detail": "You don't have access to the project.", "attr": null})
        )
    );
    assert_eq!(call(&sim, "GET", "/api/projects/99/insights/1/", Some(ALL), "").await.status, 404);
    // insight 21 belongs to project 2
    assert_eq!(call(&sim, "GET", "/api/projects/1/insights/21/", Some(ALL), "").await.status, 404);
    // other credential sources
    assert_eq!(
        call(&sim, "GET", "/api/projects/1/insights/1/?personal_api_key=phx_demo_p1", None, "").await.status,
        200
    );
    let mut cookie = headers(None);
    cookie.insert("cookie", "sessionid=demo_session_all".parse().unwrap());
    assert_eq!(sim.handle("GET", &insight(1), &cookie, b"").await.status, 200);
    assert_eq!(sim.handle("PATCH", &insight(1), &cookie, b"{}").await.status, 403); // CSRF
                                                                                    // revocation and access changes
    sim.set_project_access(P1, 1, false);
    assert_eq!(call(&sim, "GET", &insight(1), Some(P1), "").await.status, 403);
    sim.revoke_token(P1);
    assert_eq!(call(&sim, "GET", &insight(1), Some(P1), "").await.status, 401);
}

#[tokio::test]
async fn projects_endpoint() {
    let sim = sim();
    let all = get(&sim, "/api/projects/").await;
    assert_eq!(all["count"], 3);
    assert_eq!(all["results"][1]["timezone"], "Europe/Berlin");
    let r = call(&sim, "GET", "/api/projects/", Some(P1), "").await;
    assert_eq!(json_of(&r)["results"].as_array().map(|a| a.len()), Some(1));
    assert_eq!(call(&sim, "GET", "/api/projects/2/", Some(P1), "").await.status, 403);
    assert_eq!(json_of(&call(&sim, "GET", "/api/projects/@current/", Some("phx_demo_p2"), "").await)["id"], 2);
    assert_eq!(get(&sim, "/api/projects/@current/insights/1/").await["id"], 1);
}

#[tokio::test]
async fn refresh_parsing_over_http() {
    let sim = sim();
    for (q, calculates) in [
        ("refresh=Blocking", false),
        ("refresh=async_except_on_cache_miss", false),
        ("refresh=false", false),
        ("refresh=nonsense", false),
        ("refresh=TRUE", true),
        ("refresh", true),
        ("refresh=1", true),
        ("refresh=yes", true),
        ("refresh=force_blocking", true),
    ] {
        let before = sim.calculations(1, 1);
        let b = get(&sim, &format!("{}?{q}", insight(1))).await;
        assert_eq!(sim.calculations(1, 1) - before, u64::from(calculates), "{q}");
        assert_eq!(b["is_cached"], json!(!calculates && b["last_refresh"].is_string()), "{q}");
    }
    // the query string wins over the body; a body `refresh` counts when there is none
    let r = patch(&sim, &format!("{}?refresh=false", insight(3)), json!({"refresh": true})).await;
    assert_eq!((r.status, sim.calculations(1, 3)), (200, 0));
    let r = patch(&sim, &insight(3), json!({"refresh": "force_blocking"})).await;
    assert_eq!((r.status, sim.calculations(1, 3)), (200, 1));
}

#[tokio::test]
async fn blocking_and_force_cache_across_miss_fresh_stale() {
    let sim = sim();
    let url = insight(1);
    // miss: force_cache returns nothing, blocking calculates
    assert_eq!(get(&sim, &url).await["result"], Value::Null);
    let first = get(&sim, &format!("{url}?refresh=blocking")).await;
    assert_eq!((first["is_cached"].clone(), calc_no(&first), sim.calculations(1, 1)), (json!(false), 1, 1));
    let last_refresh = ts(&first["last_refresh"]);
    assert_eq!(ts(&first["next_allowed_client_refresh"]) - last_refresh, time::Duration::minutes(15));
    assert_eq!(ts(&first["cache_target_age"]) - last_refresh, time::Duration::hours(6));
    assert_eq!(first["result"][0]["data"].as_array().map(Vec::len), Some(8));
    assert_eq!(first["timezone"], "UTC");
    // fresh: both serve the cache
    for q in ["refresh=blocking", "refresh=force_cache", "refresh=false"] {
        let b = get(&sim, &format!("{url}?{q}")).await;
        assert_eq!(
            (b["is_cached"].clone(), calc_no(&b), b["last_refresh"].clone()),
            (json!(true), 1, first["last_refresh"].clone()),
            "{q}"
        );
    }
    // stale (day interval: 6 h): force_cache still serves it, blocking recalculates
    sim.clock().advance(Duration::from_secs(6 * 3600 + 1));
    let stale = get(&sim, &url).await;
    assert_eq!((stale["is_cached"].clone(), calc_no(&stale)), (json!(true), 1));
    let again = get(&sim, &format!("{url}?refresh=blocking")).await;
    assert_eq!((again["is_cached"].clone(), calc_no(&again), sim.calculations(1, 1)), (json!(false), 2, 2));
    // force_blocking always calculates, even on a fresh entry
    let forced = get(&sim, &format!("{url}?refresh=force_blocking")).await;
    assert_eq!((forced["is_cached"].clone(), calc_no(&forced)), (json!(false), 3));
}

#[tokio::test]
async fn refresh_frequency_follows_interval_and_range() {
    let sim = sim();
    for (id, minutes) in [(3, 3), (4, 1), (2, 15), (10, 15)] {
        let b = get(&sim, &format!("{}?refresh=blocking", insight(id))).await;
        let gap = ts(&b["next_allowed_client_refresh"]) - ts(&b["last_refresh"]);
        assert_eq!(gap, time::Duration::minutes(minutes), "insight {id}");
    }
}

#[tokio::test]
async fn async_mode_enqueues_and_polling_finishes() {
    let sim = Simulator::new(config(150), SimClock::new());
    let url = insight(1);
    let miss = get(&sim, &format!("{url}?refresh=async")).await;
    assert_eq!(miss["result"], Value::Null);
    let status = &miss["query_status"];
    assert_eq!((status["complete"].clone(), status["query_async"].clone()), (json!(false), json!(true)));
    assert_eq!(status["id"], miss["filters_hash"]);
    let poll = format!("/api/projects/1/query/{}/", status["id"].as_str().unwrap());
    let r = call(&sim, "GET", &poll, Some(ALL), "").await;
    assert_eq!(r.status, 202);
    assert_eq!(json_of(&r)["query_status"]["team_id"], 1);
    // a second async miss with a status already present does not enqueue again (rr = false)
    let again = get(&sim, &format!("{url}?refresh=async")).await;
    assert_eq!(again["query_status"]["task_id"], status["task_id"]);
    let done = poll_until_done(&sim, &poll).await;
    assert_eq!(done.status, 200);
    let qs = &json_of(&done)["query_status"];
    assert_eq!((qs["complete"].clone(), qs["error"].clone()), (json!(true), json!(false)));
    assert_eq!(qs["results"]["results"][0]["calculation_number"], 1);
    assert_eq!(qs["results"]["cache_key"], miss["filters_hash"]);
    assert!(qs["end_time"].is_string() && qs["pickup_time"].is_string());
    // the result is now cached; fresh async serves it with no status
    let hit = get(&sim, &format!("{url}?refresh=async")).await;
    assert_eq!((hit["is_cached"].clone(), hit["query_status"].clone(), calc_no(&hit)), (json!(true), Value::Null, 1));
    assert_eq!(sim.calculations(1, 1), 1);
    // stale async: the stale result plus a fresh enqueue (rr = true)
    sim.clock().advance(Duration::from_secs(7 * 3600));
    let stale = get(&sim, &format!("{url}?refresh=async")).await;
    assert_eq!((stale["is_cached"].clone(), calc_no(&stale)), (json!(true), 1));
    assert_eq!(stale["query_status"]["complete"], false);
    assert_ne!(stale["query_status"]["task_id"], status["task_id"]);
    assert_eq!(poll_until_done(&sim, &poll).await.status, 200);
    assert_eq!(sim.calculations(1, 1), 2);
    // unknown and expired statuses are 404
    assert_eq!(call(&sim, "GET", "/api/projects/1/query/nope/", Some(ALL), "").await.status, 404);
    sim.clock().advance(Duration::from_secs(21 * 60));
    assert_eq!(call(&sim, "GET", &poll, Some(ALL), "").await.status, 404);
}

#[tokio::test]
async fn lazy_async_uses_the_lazy_thresholds() {
    let sim = sim();
    let url = insight(1);
    let miss = get(&sim, &format!("{url}?refresh=lazy_async")).await;
    assert_eq!((miss["result"].clone(), miss["query_status"]["complete"].clone()), (Value::Null, json!(false)));
    wait_cached(&sim, &url, 1).await;
    let fresh = get(&sim, &format!("{url}?refresh=lazy_async")).await;
    assert_eq!((fresh["is_cached"].clone(), fresh["query_status"].clone()), (json!(true), Value::Null));
    // 7 h: stale by DEFAULT (6 h), fresh by LAZY (12 h) → cached, nothing enqueued
    sim.clock().advance(Duration::from_secs(7 * 3600));
    let b = get(&sim, &format!("{url}?refresh=lazy_async")).await;
    assert_eq!((b["is_cached"].clone(), b["query_status"].clone()), (json!(true), Value::Null));
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(sim.calculations(1, 1), 1);
    // 13 h: stale by LAZY → enqueued, status reported, result still the old one
    sim.clock().advance(Duration::from_secs(6 * 3600));
    let b = get(&sim, &format!("{url}?refresh=lazy_async")).await;
    assert_eq!((calc_no(&b), b["query_status"]["complete"].clone()), (1, json!(false)));
    wait_cached(&sim, &url, 2).await;
}

#[tokio::test]
async fn force_async_ignores_the_cache() {
    let sim = sim();
    let url = insight(1);
    get(&sim, &format!("{url}?refresh=blocking")).await;
    let b = get(&sim, &format!("{url}?refresh=force_async")).await;
    assert_eq!(
        (b["result"].clone(), b["filters_hash"].clone(), b["is_cached"].clone()),
        (Value::Null, Value::Null, json!(false))
    );
    assert_eq!((b["query_status"]["complete"].clone(), b["timezone"].clone()), (json!(false), json!("UTC")));
    wait_until(|| sim.calculations(1, 1) == 2).await;
}

#[tokio::test]
async fn timezone_follows_the_refresh_rule() {
    let sim = sim();
    let url = insight(21); // project 2, Europe/Berlin
    assert_eq!(get(&sim, &url).await["timezone"], Value::Null);
    assert_eq!(get(&sim, &format!("{url}?refresh=force_cache")).await["timezone"], "Europe/Berlin");
    get(&sim, &format!("{url}?refresh=blocking")).await;
    assert_eq!(get(&sim, &url).await["timezone"], "Europe/Berlin");
}

#[tokio::test]
async fn fixed_past_range_is_never_stale() {
    let sim = sim();
    let (fixed, relative) = (insight(8), insight(1));
    let b = get(&sim, &format!("{fixed}?refresh=blocking")).await;
    assert_eq!(b["query"]["source"]["dateRange"]["date_to"], "2024-01-31");
    assert_eq!(b["result"][0]["data"].as_array().map(Vec::len), Some(31));
    get(&sim, &format!("{relative}?refresh=blocking")).await;
    // stay inside the 7-day storage TTL, which expires even a fixed range
    sim.clock().advance(Duration::from_secs(6 * 86_400));
    assert_eq!(get(&sim, &format!("{fixed}?refresh=blocking")).await["is_cached"], true);
    assert_eq!(get(&sim, &format!("{relative}?refresh=blocking")).await["is_cached"], false);
    assert_eq!((sim.calculations(1, 8), sim.calculations(1, 1)), (1, 2));
}

/// `SimConfig.thresholds`: a custom table decides staleness and
/// `cache_target_age`, and a missing threshold means never stale.
#[tokio::test]
async fn configured_thresholds_decide_staleness() {
    use crate::staleness::{Interval, Thresholds};
    let mut thresholds = Thresholds::uniform(Duration::from_secs(60), Duration::from_secs(120));
    thresholds.set_default(Interval::Hour, None);
    let sim = Simulator::new(SimConfig { thresholds, ..config(0) }, SimClock::new());
    let (day, hour) = (insight(1), insight(3)); // trends by day and by hour
    let first = get(&sim, &format!("{day}?refresh=blocking")).await;
    assert_eq!(ts(&first["cache_target_age"]) - ts(&first["last_refresh"]), time::Duration::seconds(60));
    assert_eq!(get(&sim, &format!("{hour}?refresh=blocking")).await["cache_target_age"], Value::Null);
    sim.clock().advance(Duration::from_secs(61));
    assert_eq!(calc_no(&get(&sim, &format!("{day}?refresh=blocking")).await), 2);
    assert_eq!(calc_no(&get(&sim, &format!("{hour}?refresh=blocking")).await), 1);
}

#[tokio::test]
async fn storage_ttl_expires_entries() {
    let sim = sim();
    get(&sim, &format!("{}?refresh=blocking", insight(8))).await;
    sim.clock().advance(Duration::from_secs(7 * 86_400 + 1));
    assert_eq!(get(&sim, &insight(8)).await["result"], Value::Null);
}

#[tokio::test]
async fn dashboards_and_overrides_change_the_key() {
    let sim = sim();
    let plain = get(&sim, &format!("{}?refresh=blocking", insight(1))).await;
    // dashboard 2 (-30d) has a tile for insight 1
    let dash = get(&sim, &format!("{}?from_dashboard=2&refresh=blocking", insight(1))).await;
    assert_ne!(dash["filters_hash"], plain["filters_hash"]);
    assert_eq!(dash["query"]["source"]["dateRange"]["date_from"], "-30d");
    assert_eq!(dash["result"][0]["data"].as_array().map(Vec::len), Some(31));
    assert!(dash.get("color").is_some() && dash["layouts"]["sm"].is_object());
    assert_eq!(sim.calculations(1, 1), 2);
    // dashboard 1 has no filters: same key, but tile fields
    let d1 = get(&sim, &format!("{}?from_dashboard=1", insight(1))).await;
    assert_eq!((d1["filters_hash"].clone(), d1["is_cached"].clone()), (plain["filters_hash"].clone(), json!(true)));
    assert!(d1.get("layouts").is_some());
    // no tile on dashboard 3 → ignored, as are junk ids
    for q in ["from_dashboard=3", "from_dashboard=abc", "from_dashboard=99999999999999999999"] {
        let b = get(&sim, &format!("{}?{q}", insight(1))).await;
        assert_eq!(b["filters_hash"], plain["filters_hash"], "{q}");
        assert!(b.get("color").is_none());
    }
    // insight 2's tile on dashboard 3 stores its own filters, which replace the dashboard's
    let tile = get(&sim, &format!("{}?from_dashboard=3", insight(2))).await;
    assert_eq!(tile["query"]["source"]["dateRange"]["date_from"], "-180d");
    assert_eq!(tile["query"]["source"]["interval"], "day");
    // dashboard 3 itself applies interval and properties
    let d3 = get(&sim, &format!("{}?from_dashboard=3", insight(4))).await;
    assert_eq!(
        (d3["query"]["source"]["interval"].clone(), d3["query"]["source"]["dateRange"]["date_from"].clone()),
        (json!("week"), json!("-90d"))
    );
    assert!(d3["query"]["source"]["properties"].to_string().contains("Chrome"));
    // overrides are JSON query parameters and part of the key
    let enc = |v: Value| {
        percent_encoding::utf8_percent_encode(&v.to_string(), percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let f = get(&sim, &format!("{}?filters_override={}", insight(1), enc(json!({"date_from": "-14d"})))).await;
    assert_eq!(f["query"]["source"]["dateRange"]["date_from"], "-14d");
    let v =
        get(&sim, &format!("{}?variables_override={}", insight(1), enc(json!({"x": {"code": "x", "value": 1}})))).await;
    let t = get(
        &sim,
        &format!("{}?from_dashboard=2&tile_filters_override={}", insight(1), enc(json!({"date_from": "-3d"}))),
    )
    .await;
    assert_eq!(t["query"]["source"]["dateRange"]["date_from"], "-3d");
    let keys: std::collections::HashSet<String> =
        [&plain, &dash, &f, &v, &t].iter().map(|b| b["filters_hash"].as_str().unwrap().to_owned()).collect();
    assert_eq!(keys.len(), 5);
    let bad = call(&sim, "GET", &format!("{}?filters_override=%7Bnope", insight(1)), Some(ALL), "").await;
    assert_eq!(bad.status, 400);
    assert_eq!(json_of(&bad)["attr"], "filters_override");
    assert_eq!(json_of(&bad)["detail"], "Invalid JSON passed in filters_override parameter");
}

#[tokio::test]
async fn writes_change_or_keep_the_key() {
    let sim = sim();
    let url = insight(1);
    let before = get(&sim, &format!("{url}?refresh=blocking")).await;
    // renaming and a series custom_name keep the key; the cached result shows the new name
    let mut query = before["query"].clone();
    query["source"]["series"][0]["custom_name"] = "Renamed series".into();
    let r = patch(&sim, &url, json!({"name": "New name", "query": query, "tags": ["a"]})).await;
    let renamed = json_of(&r);
    assert_eq!(
        (r.status, renamed["name"].clone(), renamed["is_cached"].clone()),
        (200, json!("New name"), json!(true))
    );
    assert_eq!(renamed["filters_hash"], before["filters_hash"]);
    assert_eq!(renamed["result"][0]["action"]["custom_name"], "Renamed series");
    // a changed query is a different key: the old result is not served
    query["source"]["dateRange"]["date_from"] = "-3d".into();
    let changed = json_of(&patch(&sim, &url, json!({"query": query})).await);
    assert_ne!(changed["filters_hash"], before["filters_hash"]);
    assert_eq!(changed["result"], Value::Null);
    assert_eq!(get(&sim, &url).await["query"]["source"]["dateRange"]["date_from"], "-3d");
}

#[tokio::test]
async fn soft_delete_restore_and_forbidden_destroy() {
    let sim = sim();
    let url = insight(1);
    let r = call(&sim, "DELETE", &url, Some(ALL), "").await;
    assert_eq!((r.status, r.body.len()), (405, 0));
    get(&sim, &url).await;
    let del = patch(&sim, &url, json!({"deleted": true})).await;
    assert_eq!((del.status, json_of(&del)["deleted"].clone()), (200, json!(true)));
    assert_eq!(json_of(&del)["dashboards"], json!([]));
    assert_eq!(call(&sim, "GET", &url, Some(ALL), "").await.status, 404);
    assert_eq!(patch(&sim, &url, json!({"name": "x"})).await.status, 404);
    assert_eq!(get(&sim, "/api/projects/1/insights/").await["count"], 19);
    let restored = patch(&sim, &url, json!({"deleted": false})).await;
    assert_eq!((restored.status, json_of(&restored)["deleted"].clone()), (200, json!(false)));
    assert_eq!(get(&sim, &url).await["deleted"], false);
    let log = get(&sim, &format!("{url}activity/")).await;
    let kinds: Vec<&str> = log["results"].as_array().unwrap().iter().map(|a| a["activity"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["restored", "deleted", "created"]);
}

#[tokio::test]
async fn list_pagination_and_basic() {
    let sim = sim();
    let mut h = headers(Some(ALL));
    h.insert("host", "example.test:8000".parse().unwrap());
    let page = |target: &'static str| {
        let (sim, h) = (sim.clone(), h.clone());
        async move { json_of(&sim.handle("GET", target, &h, b"").await) }
    };
    let mid = page("/api/projects/1/insights/?limit=5&offset=5").await;
    assert_eq!(mid["count"], 20);
    assert_eq!(mid["next"], "http://example.test:8000/api/projects/1/insights/?limit=5&offset=10");
    assert_eq!(mid["previous"], "http://example.test:8000/api/projects/1/insights/?limit=5");
    assert_eq!(
        mid["results"].as_array().map(|r| r.iter().map(|i| i["id"].as_u64().unwrap()).collect::<Vec<_>>()),
        Some(vec![6, 7, 8, 9, 10])
    );
    let first = page("/api/projects/1/insights/?limit=5").await;
    assert_eq!(
        (first["previous"].clone(), first["next"].clone()),
        (Value::Null, json!("http://example.test:8000/api/projects/1/insights/?limit=5&offset=5"))
    );
    let later = page("/api/projects/1/insights/?limit=5&offset=12&basic=true").await;
    assert_eq!(later["previous"], "http://example.test:8000/api/projects/1/insights/?basic=true&limit=5&offset=7");
    let last = page("/api/projects/1/insights/?limit=5&offset=15").await;
    assert_eq!(last["next"], Value::Null);
    let all = page("/api/environments/2/insights/?limit=abc").await;
    assert_eq!(
        (all["count"].clone(), all["results"].as_array().map(Vec::len), all["next"].clone()),
        (json!(15), Some(15), Value::Null)
    );
    assert!(all["results"][0].get("result").is_some() && all["results"][0].get("filters_hash").is_some());
    let basic = page("/api/projects/1/insights/?basic=true&limit=2").await;
    let first = &basic["results"][0];
    assert!(first.get("result").is_none() && first.get("is_cached").is_none() && first.get("query").is_some());
    // filters
    let short = first["short_id"].as_str().unwrap().to_owned();
    let one = get(&sim, &format!("/api/projects/1/insights/?short_id={short}")).await;
    assert_eq!((one["count"].clone(), one["results"][0]["id"].clone()), (json!(1), json!(1)));
    let by_user = get(&sim, "/api/projects/1/insights/?created_by=%5B1%2C2%2C3%5D").await;
    assert_eq!(by_user["count"], 20);
    assert_eq!(call(&sim, "GET", "/api/projects/1/insights/?created_by=%5Bx", Some(ALL), "").await.status, 400);
    // every listed insight runs the request's refresh mode, serially
    get(&sim, "/api/projects/1/insights/?refresh=blocking&limit=3").await;
    assert_eq!(sim.total_calculations(), 3);
}

#[tokio::test]
async fn concurrency_limit_answers_200_with_an_error_status() {
    let sim = Simulator::new(SimConfig { concurrency_limit: Some(1), ..config(150) }, SimClock::new());
    let (first, second) = (
        format!("{}?refresh=force_blocking", insight(1)),
        format!("{}?refresh=force_blocking&client_query_id=q1", insight(2)),
    );
    let (a, b) = tokio::join!(call(&sim, "GET", &first, Some(ALL), ""), call(&sim, "GET", &second, Some(ALL), ""));
    assert_eq!((a.status, b.status), (200, 200));
    let (ok, limited) = (json_of(&a), json_of(&b));
    assert_eq!(calc_no(&ok), 1);
    assert_eq!((limited["result"].clone(), limited["is_cached"].clone()), (Value::Null, json!(false)));
    assert!(limited["last_refresh"].is_string());
    let qs = &limited["query_status"];
    assert_eq!(
        (qs["error"].clone(), qs["error_message"].clone(), qs["id"].clone()),
        (json!(true), json!("concurrency_limit_exceeded"), json!("q1"))
    );
    assert_eq!((qs["insight_id"].clone(), qs["team_id"].clone()), (json!(2), json!(1)));
    assert_eq!(sim.calculations(1, 2), 0);
    assert_eq!(sim.limit_errors(), 1, "the refusal is counted");
    // not cached; another team is not limited
    assert_eq!(get(&sim, &insight(2)).await["result"], Value::Null);
    sim.set_fault(Fault::Concurrency);
    let b = get(&sim, &format!("{}?refresh=force_blocking", insight(1))).await;
    assert_eq!(b["query_status"]["error_message"], "concurrency_limit_exceeded");
}

#[tokio::test]
async fn calculation_counter_and_stats() {
    let sim = sim();
    get(&sim, &format!("{}?refresh=blocking", insight(1))).await;
    get(&sim, &format!("{}?refresh=blocking&from_dashboard=2", insight(1))).await;
    get(&sim, &format!("{}?refresh=blocking", insight(22))).await;
    get(&sim, &insight(22)).await;
    assert_eq!((sim.calculations(1, 1), sim.calculations(2, 22), sim.calculations(1, 22)), (2, 1, 0));
    assert_eq!((sim.total_calculations(), sim.requests()), (3, 4));
    let stats = json_of(&call(&sim, "GET", "/_sim/stats", None, "").await);
    assert_eq!(
        stats,
        json!({"total_calculations": 3, "requests": 4, "throttled": 0, "limit_errors": 0, "calculations": {"1/1": 2, "2/22": 1}})
    );
    assert_eq!(sim.requests(), 4, "control calls are not counted");
}

#[tokio::test]
async fn create_insight_and_validation() {
    let sim = sim();
    let query = json!({"kind": "InsightVizNode", "source": {"kind": "TrendsQuery", "series": [{"kind": "EventsNode", "event": "signed_up"}]}});
    let r = call(
        &sim,
        "POST",
        "/api/projects/1/insights/",
        Some(P1),
        &json!({"name": "Mine", "query": query, "dashboards": [1]}).to_string(),
    )
    .await;
    assert_eq!(r.status, 201);
    let b = json_of(&r);
    assert_eq!(
        (b["id"].clone(), b["result"].clone(), b["last_refresh"].clone()),
        (json!(51), Value::Null, Value::Null)
    );
    assert_eq!((b["created_by"]["id"].clone(), b["dashboards"].clone()), (json!(2), json!([1])));
    let calc = get(&sim, "/api/projects/1/insights/51/?refresh=true").await;
    assert_eq!((calc_no(&calc), sim.calculations(1, 51)), (1, 1));
    for (body, attr) in [
        ("{\"query\": 5}", "query"),
        ("{\"name\": []}", "name"),
        ("{\"favorited\": \"maybe\"}", "favorited"),
        ("{\"dashboards\": [99]}", "dashboards"),
        ("{\"dashboards\": [4]}", "dashboards"),
        ("[1]", "non_field_errors"),
    ] {
        let r = call(&sim, "POST", "/api/projects/1/insights/", Some(ALL), body).await;
        assert_eq!((r.status, json_of(&r)["attr"].clone()), (400, json!(attr)), "{body}");
    }
    let r = call(&sim, "POST", "/api/projects/1/insights/", Some(ALL), "{nope").await;
    assert_eq!((r.status, json_of(&r)["code"].clone()), (400, json!("parse_error")));
    // an empty body creates a legacy insight without a query
    let r = call(&sim, "POST", "/api/projects/1/insights/", Some(ALL), "").await;
    assert_eq!((r.status, json_of(&r)["query"].clone()), (201, Value::Null));
}

#[tokio::test]
async fn side_endpoints() {
    let sim = sim();
    let sharing = get(&sim, &format!("{}sharing/", insight(1))).await;
    assert_eq!(sharing["enabled"], false);
    assert!(sharing["access_token"].is_string() && sharing["created_at"].is_string());
    let activity = get(&sim, "/api/projects/1/insights/activity/").await;
    assert_eq!((activity["next"].clone(), activity["results"].as_array().map(Vec::len)), (Value::Null, Some(20)));
    assert_eq!(activity["results"][0]["scope"], "Insight");
    let viewed = call(&sim, "POST", &format!("{}viewed/", insight(1)), Some(ALL), "").await;
    assert_eq!((viewed.status, viewed.body.len()), (200, 0));
    assert_eq!(call(&sim, "POST", "/api/projects/1/insights/999/viewed/", Some(ALL), "").await.status, 404);
    let cancel = call(&sim, "POST", "/api/projects/1/insights/cancel", Some(ALL), "{\"client_query_id\": \"x\"}").await;
    assert_eq!(cancel.status, 201);
    assert_eq!(call(&sim, "PUT", "/api/projects/1/insights/activity/", Some(ALL), "").await.status, 405);
    assert_eq!(call(&sim, "POST", "/api/projects/", Some(ALL), "").await.status, 405);
}

#[tokio::test]
async fn control_api() {
    let sim = sim();
    let post = |target: &'static str| {
        let sim = sim.clone();
        async move { call(&sim, "POST", target, None, "").await.status }
    };
    assert_eq!(post("/_sim/revoke?token=phx_demo_p1").await, 200);
    assert_eq!(call(&sim, "GET", &insight(1), Some(P1), "").await.status, 401);
    assert_eq!(post("/_sim/access?token=phx_demo_p2&project=1&allowed=true").await, 200);
    assert_eq!(call(&sim, "GET", &insight(1), Some("phx_demo_p2"), "").await.status, 200);
    assert_eq!(post("/_sim/access?token=phx_demo_p2&project=1&allowed=false").await, 200);
    assert_eq!(call(&sim, "GET", &insight(1), Some("phx_demo_p2"), "").await.status, 403);
    let before = sim.clock().now();
    assert_eq!(post("/_sim/clock/advance?seconds=3600").await, 200);
    assert!(sim.clock().now() - before >= time::Duration::hours(1));
    assert_eq!(post("/_sim/calc_delay?ms=0").await, 200);
    assert_eq!(post("/_sim/fault?kind=status&status=502").await, 200);
    assert_eq!(call(&sim, "GET", &insight(1), Some(ALL), "").await.status, 502);
    assert_eq!(post("/_sim/fault?kind=none").await, 200);
    assert_eq!(call(&sim, "GET", &insight(1), Some(ALL), "").await.status, 200);
    for bad in [
        "/_sim/fault?kind=status&status=42",
        "/_sim/fault?kind=wat",
        "/_sim/clock/advance?seconds=-1",
        "/_sim/clock/advance?seconds=999999999999999",
        "/_sim/revoke",
    ] {
        assert_eq!(post(bad).await, 400, "{bad}");
    }
    assert_eq!(post("/_sim/nope").await, 404);
    assert_eq!(call(&sim, "GET", "/_sim/fault", None, "").await.status, 405);
}

#[tokio::test]
async fn faults() {
    let sim = sim();
    sim.set_fault(Fault::Status(503));
    let r = call(&sim, "GET", &insight(1), Some(ALL), "").await;
    assert_eq!((r.status, json_of(&r)["type"].clone()), (503, json!("server_error")));
    sim.set_fault(Fault::Garbage);
    let r = call(&sim, "GET", &insight(1), Some(ALL), "").await;
    assert!(r.status == 200 && serde_json::from_slice::<Value>(&r.body).is_err());
    sim.set_fault(Fault::NullResult);
    let b = get(&sim, &format!("{}?refresh=blocking", insight(1))).await;
    assert_eq!((b["result"].clone(), sim.calculations(1, 1)), (Value::Null, 1));
    sim.set_fault(Fault::Hang);
    let hung = tokio::spawn({
        let sim = sim.clone();
        async move { call(&sim, "GET", &insight(1), Some(ALL), "").await.status }
    });
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(!hung.is_finished());
    // the control API keeps working while requests hang
    assert_eq!(call(&sim, "POST", "/_sim/fault?kind=none", None, "").await.status, 200);
    assert_eq!(hung.await.unwrap(), 200);
}

#[tokio::test]
async fn rate_limit_throttles_api_keys_only() {
    let sim = Simulator::new(SimConfig { rate_limit: Some((2, 100)), ..config(5) }, SimClock::new());
    for _ in 0..2 {
        assert_eq!(call(&sim, "GET", &insight(1), Some(ALL), "").await.status, 200);
    }
    let r = call(&sim, "GET", &insight(1), Some(ALL), "").await;
    assert_eq!((r.status, json_of(&r)["type"].clone()), (429, json!("throttled_error")));
    assert_eq!(header(&r, "retry-after"), Some("60"));
    assert_eq!(sim.throttled(), 1, "the 429 is counted");
    let mut cookie = headers(None);
    cookie.insert("cookie", "sessionid=demo_session_all".parse().unwrap());
    assert_eq!(sim.handle("GET", &insight(1), &cookie, b"").await.status, 200);
    sim.clock().advance(Duration::from_secs(61));
    assert_eq!(call(&sim, "GET", &insight(1), Some(ALL), "").await.status, 200);
}

#[tokio::test]
async fn seeded_results_are_realistic_sizes() {
    let sim = Simulator::new(SimConfig { concurrency_limit: None, ..config(0) }, SimClock::new());
    for id in 1..=data::INSIGHT_COUNT {
        let b = get(&sim, &format!("{}?refresh=blocking", insight(id))).await;
        let size = b["result"].to_string().len();
        assert!((1_000..=50_000).contains(&size), "insight {id}: {size} bytes");
    }
    // seeded insights never share a cache key
    let mut keys = std::collections::HashSet::new();
    for id in 1..=data::INSIGHT_COUNT {
        assert!(keys.insert(get(&sim, &insight(id)).await["filters_hash"].to_string()), "insight {id}");
    }
}

#[tokio::test]
async fn hostile_inputs_never_panic() {
    let sim = sim();
    let targets = [
        "/", "", "?", "/api", "/api/", "/api/projects/%", "/api/projects/%ff/insights/", "/api/projects/1/insights/%00/",
        "/api/projects/18446744073709551616/insights/", "/api/projects/1/insights/99999999999999999999999/",
        "/api/projects/1/insights/-1/", "/api/projects/1/insights/1/?refresh=%ff%fe", "/api/projects/1/insights/?limit=-5&offset=%ff",
        "/api/projects/1/insights/?offset=18446744073709551615&limit=18446744073709551615",
        "/api/projects/1/insights/1/?filters_override=%5B1%5D", "/api/projects/1/insights/1/?filters_override=%7B%22date_from%22%3A5%7D",
        "/api/projects/1/insights/1/?filters_override=%7B%22date_from%22%3A%22-999999999y%22%2C%22interval%22%3A%22minute%22%7D&refresh=blocking",
        "/api/projects/1/insights/1/?tile_filters_override=null", "/api/projects/1/query/%ff/", "/api/projects/1/insights/1/?from_dashboard=-1",
        "/api/projects/@current/insights/?created_by=1e400", "/_sim/clock/advance?seconds=abc", "//api//projects//1//",
    ];
    let bodies = [
        "",
        "{",
        "null",
        "[]",
        "\"x\"",
        "{\"query\": {\"kind\": 1}}",
        "{\"refresh\": {\"a\": 1}}",
        "{\"tags\": [1, {}]}",
        "\u{0}\u{1}",
    ];
    for method in ["GET", "POST", "PATCH", "DELETE", "PUT", "HEAD", "BREW"] {
        for target in targets {
            for body in bodies {
                let r = call(&sim, method, target, Some(ALL), body).await;
                assert!((200..=599).contains(&r.status), "{method} {target} {body:?}");
                if !r.body.is_empty() {
                    assert!(serde_json::from_slice::<Value>(&r.body).is_ok(), "{method} {target}");
                }
            }
        }
    }
    // a patched query of an unknown kind still renders
    let r = patch(&sim, &insight(1), json!({"query": {"kind": "HogQLQuery", "query": "select 1"}})).await;
    assert_eq!(r.status, 200);
    let b = get(&sim, &format!("{}?refresh=blocking", insight(1))).await;
    assert_eq!(b["result"], json!([]));
}

/// The pingora adapter over a real socket: keep-alive with Content-Length, then shutdown.
#[test]
fn pingora_service_smoke() {
    use std::io::{Read, Write};

    let port = crate::serve::free_port();
    let sim = Simulator::new(config(1), SimClock::new());
    let running = crate::testing::Running::start(crate::serve::server(&sim, &format!("127.0.0.1:{port}"), 1));

    let mut conn = None;
    for _ in 0..200 {
        if let Ok(c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            conn = Some(c);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut conn = conn.expect("simulator did not start");
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let read_response = |conn: &mut std::net::TcpStream| -> (String, Value) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = conn.read(&mut chunk).unwrap();
            assert!(n > 0, "connection closed early");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let head = text[..end].to_lowercase();
                let len: usize =
                    head.lines().find_map(|l| l.strip_prefix("content-length: ")).unwrap().trim().parse().unwrap();
                if buf.len() >= end + 4 + len {
                    return (head, serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap());
                }
            }
        }
    };
    let body = "{\"name\": \"over the wire\"}";
    let requests = [
        "GET /api/projects/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer phx_demo_all\r\n\r\n".to_owned(),
        format!("PATCH /api/projects/1/insights/1/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer phx_demo_all\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
        "GET /_sim/stats HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
    ];
    let mut replies = Vec::new();
    for req in &requests {
        conn.write_all(req.as_bytes()).unwrap();
        replies.push(read_response(&mut conn));
    }
    assert!(replies[0].0.starts_with("http/1.1 200") && replies[0].0.contains("content-type: application/json"));
    assert_eq!(replies[0].1["count"], 3);
    assert_eq!(replies[1].1["name"], "over the wire");
    assert_eq!(replies[2].1["requests"], 2);
    running.stop(false);
}
