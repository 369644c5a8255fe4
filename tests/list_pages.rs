//! List pages answered from kept pages and entries: a page whose insights are all plain hits is
//! spliced from the entries' pre-rendered bytes, and must be exactly the page the full assembly
//! (each insight answered through the refresh plan, the page built as JSON) gives, for every mode
//! and every state of its members; a member going stale or being purged shows on the next read.

mod common;

use std::time::Duration;

use common::*;
use insights_proxy::auth::Principal;
use insights_proxy::insights::{list, list_in_full, ListCall, Reply};
use insights_proxy::query::QueryParams;
use insights_proxy::refresh::RefreshParam;
use serde_json::Value;

const LIST: &str = "/api/environments/1/insights/";

/// Thresholds of the simulated insights are minutes to hours: confirmations and kept pages last
/// longer than the clock is moved here, so the spliced path is what a read takes.
fn harness() -> Harness {
    Harness::with(|c, _| {
        c.revalidate_after = Duration::from_secs(24 * 3600);
        c.list_page_ttl = Duration::from_secs(600);
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn call(h: &Harness, token: &str, query: &str) -> ListCall {
    let query = QueryParams::parse(Some(query)).unwrap();
    let param = match query.get("refresh") {
        Some(q) => RefreshParam::Text(q),
        None => RefreshParam::Absent,
    };
    let (mode, truthy) = (param.mode(), param.truthy());
    ListCall {
        project: 1,
        path: LIST.to_string(),
        principal: Principal::api_key(&h.app.keyer, token),
        mode,
        truthy,
        query,
        public_base: "http://proxy.example:8080".to_string(),
    }
}

/// Waits for background work (async refreshes, refresh-ahead) to land.
fn settle(h: &Harness) {
    eventually("the engine idle", || h.app.engine.is_idle() && h.app.metrics.busy_workers.get() == 0);
}

fn same(a: &Reply, b: &Reply) -> bool {
    a.status == b.status && a.body == b.body
}

/// Both assemblies of the same page for `token` and `query`: equal bytes. Background work a read
/// starts for stale members (on the full path) changes the next read's statuses, so a pair that
/// differs is read again once that work landed; a difference of the splice itself stays.
fn assert_spliced_equals_full(h: &Harness, rt: &tokio::runtime::Runtime, token: &str, query: &str, case: &str) {
    let (mut spliced, mut full) = (None, None);
    for _ in 0..5 {
        settle(h);
        let s = rt.block_on(list(&h.app, call(h, token, query)));
        let f = rt.block_on(list_in_full(&h.app, call(h, token, query)));
        let equal = same(&s, &f);
        (spliced, full) = (Some(s), Some(f));
        if equal {
            break;
        }
    }
    let (spliced, full) = (spliced.unwrap(), full.unwrap());
    if !same(&spliced, &full) {
        let at = spliced.body.iter().zip(&full.body[..]).position(|(a, b)| a != b).unwrap_or(0);
        let around =
            |b: &[u8]| String::from_utf8_lossy(&b[at.saturating_sub(200)..(at + 200).min(b.len())]).into_owned();
        panic!(
            "{case}, {query:?}: differ at byte {at}\n spliced {} …{}…\n full    {} …{}…",
            spliced.status,
            around(&spliced.body),
            full.status,
            around(&full.body)
        );
    }
    settle(h);
}

/// The modes that may serve a member from its entry (the forced ones recalculate every time, so
/// two reads differ by design; they always take the full path).
const MODES: [&str; 6] =
    ["", "refresh=blocking", "refresh=async", "refresh=lazy_async", "refresh=force_cache", "refresh=false"];

#[test]
fn a_spliced_page_is_the_page_assembled_in_full() {
    let h = harness();
    let rt = runtime();
    let filled = h.get(&format!("{LIST}?refresh=blocking"), ALL);
    assert_eq!(filled.status, 200, "{}", filled.text());
    settle(&h);
    let paged = ["limit=3", "limit=3&offset=3", "limit=5&client_query_id=q&filters_override=%7B%7D"];

    // Every member fresh.
    for query in MODES.iter().copied().chain(paged) {
        assert_spliced_equals_full(&h, &rt, ALL, query, "fresh");
    }
    // Some members stale (the shortest thresholds passed), the page still kept and confirmed.
    h.clock.advance(Duration::from_secs(20 * 60));
    for query in MODES {
        assert_spliced_equals_full(&h, &rt, ALL, query, "some stale");
    }
    // Every member stale (a day interval's threshold passed too).
    h.clock.advance(Duration::from_secs(7 * 3600));
    for query in ["refresh=force_cache", "refresh=lazy_async", "refresh=blocking"] {
        assert_spliced_equals_full(&h, &rt, ALL, query, "all stale");
    }
    // A member purged.
    let first = h.project1_insights()[0]["id"].as_u64().unwrap();
    h.app.cache.purge_insight(1, first);
    for query in MODES {
        assert_spliced_equals_full(&h, &rt, ALL, query, "purged");
    }
    // A principal the upstream refuses for the project.
    for query in ["", "refresh=force_cache"] {
        assert_spliced_equals_full(&h, &rt, P2, query, "refused");
    }
}

fn last_refreshes(page: &Value) -> Vec<(u64, String)> {
    page["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|i| (i["id"].as_u64().unwrap(), i["last_refresh"].as_str().unwrap_or_default().to_string()))
        .collect()
}

#[test]
fn a_member_going_stale_or_purged_shows_on_the_next_read() {
    let h = harness();
    let filled = h.get(&format!("{LIST}?refresh=blocking"), ALL);
    assert_eq!(filled.status, 200, "{}", filled.text());
    settle(&h);
    let before = h.get(LIST, ALL);
    assert!(before.cache_status().contains("detail=list-page"), "{}", before.cache_status());
    let before = last_refreshes(&before.json());

    // Past the shortest thresholds: those members are recalculated on the next (blocking) read of
    // the kept page; every member is what its own entry says.
    h.clock.advance(Duration::from_secs(20 * 60));
    let after = h.get(&format!("{LIST}?refresh=blocking"), ALL);
    assert!(after.cache_status().contains("detail=list-page"), "the kept page: {}", after.cache_status());
    let after = last_refreshes(&after.json());
    assert!(before.iter().zip(&after).any(|(b, a)| b != a), "a stale member was recalculated");
    for (id, last_refresh) in &after {
        let own = h.get(&format!("{LIST}{id}/?refresh=force_cache"), ALL).json();
        assert_eq!(own["last_refresh"].as_str(), Some(last_refresh.as_str()), "insight {id}");
    }

    // Purged (a write through the proxy): the next read carries the change.
    let (id, _) = after[0].clone();
    let patched = h.request(
        "PATCH",
        &format!("{LIST}{id}/"),
        &[("Authorization", "Bearer phx_demo_all")],
        Some(r#"{"name":"renamed"}"#),
    );
    assert_eq!(patched.status, 200, "{}", patched.text());
    let page = h.get(LIST, ALL).json();
    let item = page["results"].as_array().unwrap().iter().find(|i| i["id"].as_u64() == Some(id)).cloned();
    assert_eq!(item.expect("still listed")["name"], "renamed");
}
