//! One page of `GET /insights/`: its membership is the upstream's (kept briefly per principal),
//! and each insight on it is answered under the request's mode from its own entry.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::Value;

use super::answer::answer;
use super::vouch::remembered_refusal;
use super::{Ask, Reply};
use crate::app::App;
use crate::auth::Principal;
use crate::cache::page::Part;
use crate::cache::sealed;
use crate::cache::{Assembled, CacheKey, Entry, ListPage, PageKey};
use crate::cache_status::{CacheStatus, Detail, Fwd};
use crate::engine::{own_request, CalcSpec, ListRead, Outcome};
use crate::failure::Failure;
use crate::query::QueryParams;
use crate::refresh::{plan, Background, CacheState, Plan, RefreshMode, Served};

/// One page of `GET /insights/`.
#[derive(Debug, Clone)]
pub struct ListCall {
    pub project: u64,
    pub path: String,
    pub query: QueryParams,
    pub principal: Principal,
    pub mode: RefreshMode,
    pub truthy: bool,
    /// Where the client reaches the proxy (`http://host:port`), for `next`/`previous`.
    pub public_base: String,
}

/// The parameters of a list request that an item on the page is keyed and asked with: the
/// upstream's list ignores `from_dashboard` (and its paging parameters are the list's), so its
/// items are stored and answered as the insight's own results, never under a dashboard's key.
const ITEM_PARAMS: [&str; 3] = ["filters_override", "variables_override", "tile_filters_override"];

/// Each insight on the page is answered under the request's mode from the same per-insight
/// entries as retrieve; the calculations a page needs run concurrently. A kept page whose every
/// insight is a plain hit is spliced from the entries' pre-rendered bytes ([`spliced`]), and that
/// answer is reused while none of its members can have changed ([`reused`]).
pub async fn list(app: &Arc<App>, call: ListCall) -> Reply {
    list_with(app, call, true).await
}

/// [`list`] that always answers each insight through [`answer`] and assembles the page as JSON:
/// the reference the spliced page is compared with.
#[doc(hidden)]
pub async fn list_in_full(app: &Arc<App>, call: ListCall) -> Reply {
    list_with(app, call, false).await
}

async fn list_with(app: &Arc<App>, call: ListCall, splice: bool) -> Reply {
    let partition = call.principal.partition();
    let epoch = app.cache.begin();
    let started_ms = app.cache.now_ms();
    let req = own_request(&call.path, &call.query, &call.principal, "force_cache");
    let listed = || CacheStatus::fwd(Fwd::UriMiss);
    let confirmed = app.engine.is_confirmed(partition, call.project, None);
    if !confirmed {
        if let Some(reply) = remembered_refusal(app, partition, call.project, None) {
            return reply;
        }
    }
    // A page's membership is kept briefly per principal, so a dashboard's viewers do not each
    // cost an upstream call; the insights on it are answered from their own entries below.
    let page_key = PageKey { partition, project: call.project, path_and_query: req.path_and_query.clone() };
    let cached_page = if confirmed { app.cache.page(&page_key).await } else { None };
    // A page read from the upstream now: its results are ordered against purges on any replica.
    let version = if cached_page.is_none() { app.cache.shared_version().await } else { None };
    let (page, page_status) = match cached_page {
        Some(page) => {
            if splice {
                if let Some(reply) = reused(app, &call, &page) {
                    return reply;
                }
                if let Some(reply) = spliced(app, &call, &page).await {
                    return reply;
                }
            }
            (page, CacheStatus::hit().detail(Detail::ListPage))
        }
        None => {
            let failed = |f: Failure| Reply::error(&f.to_api_error(), listed().detail(Detail::Failure(f.as_str())));
            let resp = match app.engine.read_list(&req, &call.principal, call.project).await {
                Ok(resp) => resp,
                Err(ListRead::Failed(f)) => return failed(f),
                Err(ListRead::Relay(resp)) => return Reply::relay(&resp, listed().fwd_status(resp.status)),
            };
            (app.cache.put_page(page_key, resp.body).await, listed().fwd_status(200))
        }
    };
    let Ok(Value::Object(mut page)) = serde_json::from_slice::<Value>(&page.body) else {
        return Reply::error(
            &Failure::Garbage.to_api_error(),
            listed().detail(Detail::Failure(Failure::Garbage.as_str())),
        );
    };
    let items = match page.get_mut("results") {
        Some(Value::Array(items)) => std::mem::take(items),
        _ => {
            return Reply::error(
                &Failure::Garbage.to_api_error(),
                listed().detail(Detail::Failure(Failure::Garbage.as_str())),
            )
        }
    };
    let item_path = item_path(&call.path);
    let item_query = call.query.only(&ITEM_PARAMS);
    // The upstream listed them to this principal: under the insight scope that confirms each.
    let listed_ids: Vec<u64> = items.iter().filter_map(|item| item.get("id").and_then(Value::as_u64)).collect();
    app.engine.confirm_listed(partition, call.project, &listed_ids);
    let mut tasks = tokio::task::JoinSet::new();
    let mut answered: Vec<Value> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let Some(insight) = item.get("id").and_then(Value::as_u64) else {
            answered.push(item);
            continue;
        };
        let spec = Arc::new(CalcSpec {
            key: CacheKey::new(partition, call.project, insight, &item_query),
            project: call.project,
            insight,
            path: format!("{item_path}{insight}/"),
            query: item_query.clone(),
            principal: call.principal.clone(),
        });
        // The page came from the upstream's cache: a result on it is a peek worth keeping.
        let peeked = match Entry::from_value(item.clone(), insight, epoch).map(|e| e.stamped(started_ms)) {
            Ok(e) => {
                let e = Arc::new(e.versioned(version));
                app.cache.insert(spec.key, e.clone()).await;
                Outcome::Stored(e)
            }
            Err(_) => Outcome::Relay(Arc::new(crate::upstream::UpstreamResponse {
                status: 200,
                body: Bytes::from(item.to_string()),
                ..Default::default()
            })),
        };
        answered.push(item);
        let (app, ask) = (app.clone(), Ask { mode: call.mode, truthy: call.truthy });
        tasks.spawn(async move { (i, answer(&app, &spec, ask, Some(peeked)).await) });
    }
    while let Some(done) = tasks.join_next().await {
        let Ok((i, reply)) = done else { continue };
        if reply.status == 200 {
            if let Ok(v) = serde_json::from_slice::<Value>(&reply.body) {
                answered[i] = v;
            }
        }
    }
    page.insert("results".into(), Value::Array(answered));
    for link in ["next", "previous"] {
        if let Some(Value::String(url)) = page.get(link) {
            let rewritten = client_page_link(url, &call.public_base, &call.query);
            page.insert(link.into(), Value::String(rewritten));
        }
    }
    Reply::json(200, Bytes::from(Value::Object(page).to_string()), page_status)
}

/// `/api/.../insights/` → `/api/.../insights/`, the prefix of an item's own path.
fn item_path(list_path: &str) -> String {
    format!("{}/", list_path.trim_end_matches('/'))
}

/// A kept page answered from the entries' pre-rendered bytes, when that gives exactly what
/// answering each insight in full gives: every listed insight's plan under the request's mode is
/// to serve its cached entry with nothing in the background (so its answer is the entry's hit
/// rendering), and no listed result is newer than the entry (which the full path would store
/// first). `None`, before any effect but the confirmations the full path makes too, otherwise.
async fn spliced(app: &Arc<App>, call: &ListCall, page: &ListPage) -> Option<Reply> {
    let layout = page.layout()?;
    let (engine, partition) = (&app.engine, call.principal.partition());
    // Before any member is read: a change after this makes the answer not reusable.
    let changes = app.cache.changes(call.project);
    let now_ms = app.cache.now_ms();
    let ids: Vec<u64> = layout.items.iter().filter_map(|item| item.insight).collect();
    engine.confirm_listed(partition, call.project, &ids);
    let item_query = call.query.only(&ITEM_PARAMS);
    let base = CacheKey::new(partition, call.project, 0, &item_query);
    let mut hits = Vec::with_capacity(ids.len());
    let mut len = page.body.len();
    // Forced modes read `next_allowed_client_refresh` against the clock: not bounded here.
    let mut reusable = !call.mode.is_forced();
    let mut until_ms = i64::MAX;
    for item in &layout.items {
        let Some(insight) = item.insight else { continue };
        let key = CacheKey { insight, ..base };
        let entry = engine.settled_entry(&key).await?;
        if item.last_refresh.is_some_and(|listed| listed > entry.last_refresh()) {
            return None;
        }
        let view = engine.view_of(&key, call.mode, Some(&entry), false, false);
        match plan(call.mode, &view) {
            Plan::Serve { background: Background::None, served } if served != Served::FromUpstream => {}
            _ => return None,
        }
        len += entry.body().len();
        reusable &= view.state == CacheState::Fresh;
        until_ms = until_ms.min(engine.plain_hit_until_ms(&entry));
        hits.push((key, entry, view.state));
    }
    // What `answer`'s serve does for each: count the read, and schedule refresh-ahead when fresh.
    let item_path = item_path(&call.path);
    for (key, entry, state) in &hits {
        if *state == CacheState::Fresh {
            engine.schedule_ahead_of(key, entry, || {
                Arc::new(CalcSpec {
                    key: *key,
                    project: call.project,
                    insight: key.insight,
                    path: format!("{item_path}{}/", key.insight),
                    query: item_query.clone(),
                    principal: call.principal.clone(),
                })
            });
        }
    }
    let mut out = BytesMut::with_capacity(len);
    let mut members = hits.iter();
    for part in &layout.parts {
        match part {
            Part::Text(text) => out.put_slice(text),
            Part::Link(url) => {
                let link = client_page_link(url, &call.public_base, &call.query);
                serde_json::to_writer((&mut out).writer(), &link).expect("a string serialises");
            }
            Part::Results => {
                out.put_u8(b'[');
                for (i, item) in layout.items.iter().enumerate() {
                    if i > 0 {
                        out.put_u8(b',');
                    }
                    match item.insight {
                        Some(_) => {
                            out.put_slice(&members.next().expect("one hit per listed insight").1.render(true, None))
                        }
                        None => out.put_slice(&item.listed),
                    }
                }
                out.put_u8(b']');
            }
        }
    }
    let body = out.freeze();
    if reusable && now_ms < until_ms {
        // Kept in a sealed file when large, as cached insights are, so its reuse is sent with
        // `sendfile` (`cache::sealed`).
        let (body, file) = match sealed::seal(&body) {
            Some((body, file)) => (body, Some(file)),
            None => (body, None),
        };
        page.keep_assembled(Arc::new(Assembled {
            body: body.clone(),
            file: file.clone(),
            query: call.query.clone(),
            public_base: call.public_base.clone(),
            mode: call.mode,
            truthy: call.truthy,
            changes,
            until_ms,
            members: hits.into_iter().map(|(_, entry, _)| entry).collect(),
            listed: ids,
            confirmed_ms: AtomicI64::new(now_ms),
        }));
        return Some(Reply::kept(body, file.as_ref(), CacheStatus::hit().detail(Detail::ListPage)));
    }
    Some(Reply::json(200, body, CacheStatus::hit().detail(Detail::ListPage)))
}

/// The answer [`spliced`] made last for this page, when splicing again would give the same bytes:
/// made for a request of this shape, no change in the project since its members were read, and
/// every member still a plain hit ([`Assembled`]). What serving each member does besides its
/// bytes is done here too: its read is counted (refresh-ahead), and the listed insights are
/// confirmed, at most once a second.
fn reused(app: &Arc<App>, call: &ListCall, page: &ListPage) -> Option<Reply> {
    let assembled = page.assembled()?;
    if !assembled.made_for(&call.query, &call.public_base, call.mode, call.truthy)
        || assembled.changes != app.cache.changes(call.project)
    {
        return None;
    }
    let now_ms = app.cache.now_ms();
    if now_ms >= assembled.until_ms {
        return None;
    }
    for member in &assembled.members {
        member.note_read();
    }
    if assembled.claim_confirmation(now_ms) {
        app.engine.confirm_listed(call.principal.partition(), call.project, &assembled.listed);
    }
    Some(Reply::kept(assembled.body.clone(), assembled.file.as_ref(), CacheStatus::hit().detail(Detail::ListPage)))
}

/// A page link as the upstream builds it for the client's own request, so a client paging through
/// the proxy keeps its `refresh`, `client_query_id` and every other parameter: DRF's
/// `replace_query_param` on the client's query (blank values dropped, keys sorted, `quote_plus`)
/// with the page position (`limit`, `offset`) the upstream chose for the proxy's read, on the
/// proxy's origin.
pub fn client_page_link(upstream_link: &str, public_base: &str, client_query: &QueryParams) -> String {
    let relinked = rewrite_origin(upstream_link, public_base);
    let (path, upstream_query) = relinked.split_once('?').unwrap_or((&relinked, ""));
    let Ok(position) = QueryParams::parse(Some(upstream_query)) else { return relinked };
    let mut params: std::collections::BTreeMap<&str, Vec<&str>> = std::collections::BTreeMap::new();
    for (k, v) in client_query.iter().filter(|(_, v)| !v.is_empty()) {
        params.entry(k).or_default().push(v);
    }
    for name in ["limit", "offset"] {
        match position.get(name) {
            Some(v) => params.insert(name, vec![v]),
            None => params.remove(name),
        };
    }
    let quote_plus = |s: &str| crate::query::encode(s).replace("%20", "+");
    let query: Vec<String> = params
        .iter()
        .flat_map(|(k, vs)| vs.iter().map(move |v| format!("{}={}", quote_plus(k), quote_plus(v))))
        .collect();
    if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", query.join("&"))
    }
}

/// Points an absolute URL the upstream built from its own host back at the proxy.
pub fn rewrite_origin(url: &str, public_base: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let path = rest.find('/').map(|i| &rest[i..]).unwrap_or("/");
    format!("{public_base}{path}")
}

/// The upstream's answer to an unconfirmed principal it refused a moment ago: it stands, at no
/// upstream cost ([`crate::trust::Trust::refusal`]).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_links_keep_the_clients_own_parameters() {
        let client =
            QueryParams::parse(Some("refresh=blocking&client_query_id=q+1&limit=2&personal_api_key=k&x=")).unwrap();
        let upstream = "http://up:9/api/projects/1/insights/?limit=2&offset=4&refresh=force_cache";
        assert_eq!(
            client_page_link(upstream, "http://proxy:8080", &client),
            "http://proxy:8080/api/projects/1/insights/?client_query_id=q+1&limit=2&offset=4&personal_api_key=k&refresh=blocking"
        );
        let first = "http://up:9/api/projects/1/insights/?limit=2&refresh=force_cache";
        let on_page_two = QueryParams::parse(Some("offset=2&limit=2")).unwrap();
        assert_eq!(client_page_link(first, "http://p", &on_page_two), "http://p/api/projects/1/insights/?limit=2");
    }

    #[test]
    fn origins_are_rewritten() {
        assert_eq!(
            rewrite_origin("http://127.0.0.1:9/api/projects/1/insights/?limit=2&offset=2", "http://proxy:8080"),
            "http://proxy:8080/api/projects/1/insights/?limit=2&offset=2"
        );
        assert_eq!(rewrite_origin("https://us.posthog.com", "http://p"), "http://p/");
        assert_eq!(rewrite_origin("/relative", "http://p"), "/relative");
    }
}
