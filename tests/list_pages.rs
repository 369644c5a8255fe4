//! List pages answered from kept pages and entries: a page whose insights are all plain hits is
//! spliced from the entries' pre-rendered bytes, and must be exactly the page the full assembly
//! (each insight answered through the refresh plan, the page built as JSON) gives, for every mode
//! and every state of its members; a member going stale or being purged shows on the next read.

mod common;

use std::time::Duration;

use common::*;
use insights_proxy::auth::Principal;
use insights_proxy::cache::PageKey;
use insights_proxy::engine::own_request;
use insights_proxy::insights::{list, list_in_full, ListCall, Reply};
use insights_proxy::query::QueryParams;
use insights_proxy::refresh::{RefreshParam, Thresholds};
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

/// A runtime of its own for the direct calls: work they leave running (a calculation another
/// request joins) goes on while the test waits or makes requests.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
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

/// Whether the kept page of `token`'s `query` holds an answer assembled for exactly this request,
/// which the next read reuses as it is (so a test of reuse is not passing on the splice alone).
fn reusable(h: &Harness, rt: &tokio::runtime::Runtime, token: &str, query: &str) -> bool {
    let c = call(h, token, query);
    let key = PageKey {
        partition: c.principal.partition(),
        project: c.project,
        path_and_query: own_request(&c.path, &c.query, &c.principal, "force_cache").path_and_query,
    };
    rt.block_on(h.app.cache.page(&key))
        .and_then(|page| page.assembled())
        .is_some_and(|a| a.made_for(&c.query, &c.public_base, c.mode, c.truthy))
}

/// Members' thresholds of ten minutes, whatever their interval.
fn uniform_harness(tweak: impl FnOnce(&mut insights_proxy::config::Config)) -> Harness {
    Harness::with(|c, s| {
        c.revalidate_after = Duration::from_secs(24 * 3600);
        c.list_page_ttl = Duration::from_secs(600);
        c.thresholds = Thresholds::uniform(Duration::from_secs(600), Duration::from_secs(1200));
        s.calc_delay = Duration::ZERO;
        tweak(c);
    })
}

fn fill(h: &Harness, token: &str) {
    let filled = h.get(&format!("{LIST}?refresh=blocking"), token);
    assert_eq!(filled.status, 200, "{}", filled.text());
    settle(h);
}

fn read(h: &Harness, rt: &tokio::runtime::Runtime, token: &str, query: &str) -> Reply {
    let r = rt.block_on(list(&h.app, call(h, token, query)));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r
}

fn json(r: &Reply) -> Value {
    serde_json::from_slice(&r.body).expect("a JSON page")
}

#[test]
fn a_reused_page_is_the_full_assembly_and_shows_a_recalculated_or_purged_member() {
    let h = uniform_harness(|_| {});
    let rt = runtime();
    fill(&h, ALL);
    for query in ["", "refresh=blocking", "limit=3&offset=3&client_query_id=a"] {
        // A page's first read comes from the upstream (assembled in full); the next is spliced.
        read(&h, &rt, ALL, query);
        read(&h, &rt, ALL, query);
        assert!(reusable(&h, &rt, ALL, query), "{query:?}: every member a fresh hit, the answer is kept");
        let calculations = h.sim.total_calculations();
        let reused = read(&h, &rt, ALL, query);
        let full = rt.block_on(list_in_full(&h.app, call(&h, ALL, query)));
        assert!(same(&reused, &full), "{query:?}: the reused page is the full assembly");
        assert_eq!(h.sim.total_calculations(), calculations, "{query:?}: a reused page costs the upstream nothing");
    }

    // One member recalculated (a forced read of the insight itself): the next read of the page
    // carries the new result.
    let before = last_refreshes(&json(&read(&h, &rt, ALL, "")));
    let (id, old) = before[1].clone();
    h.clock.advance(Duration::from_secs(1));
    let forced = h.get(&format!("{LIST}{id}/?refresh=force_blocking"), ALL);
    assert_eq!(forced.status, 200, "{}", forced.text());
    let new = forced.json()["last_refresh"].as_str().unwrap().to_string();
    assert_ne!(new, old, "recalculated");
    settle(&h);
    let after = last_refreshes(&json(&read(&h, &rt, ALL, "")));
    assert_eq!(after[1], (id, new), "the page shows the recalculated member");
    assert_eq!(after.iter().filter(|(i, _)| *i != id).count(), before.len() - 1);
    assert_spliced_equals_full(&h, &rt, ALL, "", "recalculated");

    // Reused again, then one member purged: the page no longer carries the purged entry.
    read(&h, &rt, ALL, "");
    assert!(reusable(&h, &rt, ALL, ""));
    let renamed = h.request(
        "PATCH",
        &format!("{LIST}{id}/"),
        &[("Authorization", "Bearer phx_demo_all")],
        Some(r#"{"name":"renamed after reuse"}"#),
    );
    assert_eq!(renamed.status, 200, "{}", renamed.text());
    let page = json(&read(&h, &rt, ALL, ""));
    let item = page["results"].as_array().unwrap().iter().find(|i| i["id"].as_u64() == Some(id)).cloned();
    assert_eq!(item.expect("still listed")["name"], "renamed after reuse");
    assert_spliced_equals_full(&h, &rt, ALL, "", "purged");
}

#[test]
fn a_reused_page_ends_where_its_members_reach_their_refresh_ahead_window() {
    let h = uniform_harness(|_| {});
    let rt = runtime();
    fill(&h, ALL);
    for _ in 0..3 {
        read(&h, &rt, ALL, "");
    }
    assert!(reusable(&h, &rt, ALL, ""));
    let calculations = h.sim.total_calculations();
    // 98 % of the threshold: every member is due for refresh-ahead (it starts between 90 % and
    // 95 %), none is stale. Read as a full assembly would, the page schedules them.
    h.clock.advance(Duration::from_secs(588));
    let page = read(&h, &rt, ALL, "");
    assert!(page.cache_status.to_string().contains("detail=list-page"), "{}", page.cache_status);
    eventually("refresh-ahead recalculates the members", || h.sim.total_calculations() > calculations);
    settle(&h);
    assert_spliced_equals_full(&h, &rt, ALL, "", "after refresh-ahead");
}

#[test]
fn a_member_turning_stale_is_never_served_from_a_reused_page() {
    // Past the threshold every member that can go stale is (a fixed range that ended before its
    // calculation never does): a blocking read asks the upstream for each one (whose own cache
    // may still hold the same result), an async read answers each with the status of its
    // background refresh.
    for query in ["refresh=blocking", "refresh=async"] {
        let h = uniform_harness(|c| c.refresh_ahead.enabled = false);
        let rt = runtime();
        fill(&h, ALL);
        read(&h, &rt, ALL, query);
        let reused = json(&read(&h, &rt, ALL, query));
        assert!(reusable(&h, &rt, ALL, query), "{query}");
        let members = reused["results"].as_array().unwrap().len() as u64;
        assert!(reused["results"].as_array().unwrap().iter().all(|i| i["query_status"].is_null()));
        let requests = h.sim.requests();
        h.clock.advance(Duration::from_secs(601));
        let page = json(&read(&h, &rt, ALL, query));
        let asked = h.sim.requests() - requests;
        let stale =
            h.project1_insights().iter().filter(|i| i["query"]["source"]["dateRange"]["date_to"].is_null()).count()
                as u64;
        assert!(stale > members / 2, "{query}: most members can go stale: {stale} of {members}");
        if query == "refresh=blocking" {
            assert!(asked >= stale, "{query}: every stale member asked of the upstream: {asked} of {stale}");
        } else {
            let statuses = page["results"].as_array().unwrap().iter().filter(|i| !i["query_status"].is_null()).count();
            assert!(statuses as u64 >= stale, "{query}: every stale member reports its refresh: {page}");
        }
        settle(&h);
        assert_spliced_equals_full(&h, &rt, ALL, "refresh=force_cache", "stale");
    }
}

/// A key the upstream accepts for project 1, whose first page is kept with a reusable answer.
fn key_with_a_reused_page(h: &Harness, rt: &tokio::runtime::Runtime, key: &str) {
    h.sim.set_project_access(key, 1, true);
    fill(h, key);
    read(h, rt, key, "");
    read(h, rt, key, "");
    assert!(reusable(h, rt, key, ""));
}

/// Reads of the page by `key` are refused with `status`, carrying no data.
fn assert_page_refused(h: &Harness, key: &str, status: u16) {
    for _ in 0..2 {
        let r = h.get(LIST, key);
        assert_eq!(r.status, status, "{}", r.text());
        assert!(r.json().get("results").is_none(), "cached data in a refusal: {}", r.text());
    }
}

#[test]
fn a_principal_refused_elsewhere_never_gets_its_reused_page() {
    let h = uniform_harness(|_| {});
    let key = "phx_list_refused";
    key_with_a_reused_page(&h, &runtime(), key);
    let id = h.project1_insights()[0]["id"].as_u64().unwrap();
    // The upstream refuses the key now; the proxy learns it from a read it has to forward.
    h.sim.set_project_access(key, 1, false);
    let refused = h.get(&format!("{LIST}{id}/?refresh=force_blocking"), key);
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert_page_refused(&h, key, 403);
}

#[test]
fn a_revoked_key_never_gets_its_reused_page_once_its_confirmation_lapsed() {
    let h = uniform_harness(|c| c.revalidate_after = Duration::from_secs(60));
    let key = "phx_list_revoked";
    key_with_a_reused_page(&h, &runtime(), key);
    h.sim.revoke_token(key);
    h.clock.advance(Duration::from_secs(61));
    assert_page_refused(&h, key, 401);
}

#[derive(Debug, Clone)]
enum Step {
    /// A principal reads a page.
    Read(usize, &'static str),
    /// A principal forces a recalculation of the n-th insight (its own entry only).
    Recalculate(usize, usize),
    /// The n-th insight is purged (a write through any replica).
    Purge(usize),
    /// The clock moves on by this many seconds.
    Advance(u64),
}

const PRINCIPALS: [&str; 3] = [ALL, P1, "phx_list_third"];
const QUERIES: [&str; 4] = ["", "refresh=blocking", "limit=3", "limit=3&offset=3&refresh=force_cache"];

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0..PRINCIPALS.len(), 0..QUERIES.len()).prop_map(|(p, q)| Step::Read(p, QUERIES[q])),
        2 => (0..PRINCIPALS.len(), 0..6usize).prop_map(|(p, i)| Step::Recalculate(p, i)),
        1 => (0..6usize).prop_map(Step::Purge),
        1 => (1..120u64).prop_map(Step::Advance),
    ]
}

/// Whatever principals do, each read of a page is the full assembly from that principal's own
/// entries: no principal's kept answer reaches another, and none outlives a change of a member.
#[test]
fn principals_never_get_each_others_reused_pages() {
    use proptest::test_runner::{Config, TestRunner};
    let h = uniform_harness(|_| {});
    let rt = runtime();
    h.sim.set_project_access(PRINCIPALS[2], 1, true);
    for p in PRINCIPALS {
        fill(&h, p);
    }
    let ids: Vec<u64> = h.project1_insights().iter().filter_map(|i| i["id"].as_u64()).collect();
    let mut runner = TestRunner::new(Config { cases: 12, failure_persistence: None, ..Config::default() });
    runner
        .run(&proptest::collection::vec(step(), 1..10), |steps| {
            for s in steps {
                match s {
                    Step::Read(p, query) => {
                        // Twice: the second read reuses what the first assembled, where it may.
                        read(&h, &rt, PRINCIPALS[p], query);
                        assert_spliced_equals_full(&h, &rt, PRINCIPALS[p], query, "generated");
                    }
                    Step::Recalculate(p, i) => {
                        let r = h.get(&format!("{LIST}{}/?refresh=force_blocking", ids[i]), PRINCIPALS[p]);
                        assert_eq!(r.status, 200, "{}", r.text());
                    }
                    Step::Purge(i) => h.app.cache.purge_insight(1, ids[i]),
                    Step::Advance(secs) => h.clock.advance(Duration::from_secs(secs)),
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn a_calculation_started_for_a_member_shows_on_the_next_read_of_a_reused_page() {
    let h = Harness::with(|c, s| {
        c.revalidate_after = Duration::from_secs(24 * 3600);
        c.list_page_ttl = Duration::from_secs(600);
        s.calc_delay = Duration::from_millis(1500);
    });
    let rt = runtime();
    fill(&h, ALL);
    read(&h, &rt, ALL, "");
    read(&h, &rt, ALL, "");
    assert!(reusable(&h, &rt, ALL, ""));
    let id = h.project1_insights()[2]["id"].as_u64().unwrap();
    // Another client asks for a recalculation in the background: while it runs, a read of the
    // insight (alone or on a page) carries its status.
    let queued = h.get(&format!("{LIST}{id}/?refresh=force_async"), ALL);
    assert_eq!(queued.status, 200, "{}", queued.text());
    let status = queued.json()["query_status"]["id"].as_str().expect("a status").to_string();
    eventually("the calculation runs", || h.app.metrics.busy_workers.get() > 0);
    let page = json(&read(&h, &rt, ALL, ""));
    let item = page["results"].as_array().unwrap().iter().find(|i| i["id"].as_u64() == Some(id)).cloned().unwrap();
    assert_eq!(item["query_status"]["id"].as_str(), Some(status.as_str()), "{item}");
    settle(&h);
    assert_spliced_equals_full(&h, &rt, ALL, "", "after the calculation");
}
