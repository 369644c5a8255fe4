//! Answering insight requests from the cache: retrieve, list and query-status polling. Each handler
//! turns a request into a [`Reply`]; the pingora glue in `proxy` only parses and writes.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use crate::app::{App, CalcSpec, FlightKind, Outcome};
use crate::auth::Principal;
use crate::cache::{CacheKey, Entry, PageKey, Partition};
use crate::cache_status::{CacheStatus, Detail, Fwd};
use crate::error::ApiError;
use crate::failure::{Failure, CONCURRENCY_LIMIT_EXCEEDED};
use crate::query::QueryParams;
use crate::refresh::{decide, Background, CacheState, Decision, RefreshMode, UpstreamRefresh};
use crate::upstream::UpstreamError;
use crate::workers::{Ahead, Job};

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    pub content_type: Option<String>,
    /// How it was produced: its `Cache-Status` header and metric label.
    pub cache_status: CacheStatus,
    /// The upstream's headers relayed with its answer (`Retry-After`, `WWW-Authenticate`).
    pub relayed: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl Reply {
    pub fn json(status: u16, body: Bytes, cache_status: CacheStatus) -> Self {
        Self { status, body, content_type: None, cache_status, relayed: Vec::new() }
    }

    pub fn error(e: &ApiError, cache_status: CacheStatus) -> Self {
        Self::json(e.status, e.body(), cache_status)
    }

    fn relay(resp: &crate::upstream::UpstreamResponse, cache_status: CacheStatus) -> Self {
        Self {
            status: resp.status,
            body: resp.body.clone(),
            content_type: resp.content_type.clone(),
            cache_status,
            relayed: resp.relayed.clone(),
        }
    }
}

/// What the client asked of one insight: the execution mode, and whether its `refresh` counts as
/// one at all (it decides the answer's `timezone`).
#[derive(Debug, Clone, Copy)]
struct Ask {
    mode: RefreshMode,
    truthy: bool,
}

/// One insight request, already routed and parsed.
#[derive(Debug, Clone)]
pub struct InsightCall {
    pub project: u64,
    pub insight: u64,
    pub path: String,
    pub query: QueryParams,
    pub principal: Principal,
    pub mode: RefreshMode,
    /// Whether the client's `refresh` counts as one ([`crate::refresh::RefreshParam::truthy`]).
    pub truthy: bool,
}

pub async fn retrieve(app: &Arc<App>, call: InsightCall) -> Reply {
    let unknown = crate::cache::key::unknown_params(&call.query);
    if unknown > 0 {
        app.metrics.unknown_params.inc_by(unknown as u64);
    }
    let key = CacheKey::new(call.principal.partition(), call.project, call.insight, &call.query);
    let spec = Arc::new(CalcSpec {
        key,
        project: call.project,
        insight: call.insight,
        path: call.path,
        query: call.query,
        principal: call.principal,
    });
    answer(app, &spec, Ask { mode: call.mode, truthy: call.truthy }, None).await
}

fn hit_status(app: &App, entry: &Entry, now: time::OffsetDateTime, detail: Option<Detail>) -> CacheStatus {
    CacheStatus::hit().ttl(entry.stale.ttl_seconds(now, &app.config.thresholds)).detail_opt(detail)
}

/// Answers one insight under `mode`. `peeked` is the upstream's own answer when the caller already
/// has it (a list page), so a miss does not ask again.
async fn answer(app: &Arc<App>, spec: &Arc<CalcSpec>, ask: Ask, peeked: Option<Outcome>) -> Reply {
    let Ask { mode, truthy } = ask;
    let mut peeked = peeked;
    let (partition, project, insight) = (spec.key.partition, spec.project, Some(spec.insight));
    let mut confirmed = app.is_confirmed(partition, project, insight);
    if !confirmed {
        if let Some(reply) = remembered_refusal(app, partition, project, insight) {
            return reply;
        }
    }
    let mut entry = app.cache.get(&spec.key).await;
    // Set once the upstream's cache supplied the entry: the answer then did go upstream.
    let mut via_peek = false;
    let mut freshened = false;
    loop {
        let now = app.clock.now();
        if !freshened {
            freshened = true;
            // Another variant of the same upstream cache key may hold a newer result: adopt it
            // rather than calculate (looked up only once the entry is old enough to matter).
            if let Some(e) = entry.as_ref().filter(|e| worth_freshening(app, e, now)) {
                if let Some(adopted) = app.freshen(spec, e).await {
                    entry = Some(adopted);
                }
            }
        }
        let state = CacheState::of(entry.as_ref().map(|e| &e.stale), now, &app.config.thresholds);
        let flight_key = app.flight_key(spec, entry.as_deref());
        let in_flight = app.flights.is_running(&(flight_key, crate::app::FlightKind::Calculate));
        let decision = decide(mode, state, in_flight);
        match decision {
            Decision::Serve { .. } if !via_peek && !confirmed => {
                confirmed = true;
                match revalidate(app, spec).await {
                    Ok(Some(stored)) => entry = app.cache.get(&spec.key).await.or(Some(stored)),
                    Ok(None) => {}
                    Err(reply) => return reply,
                }
            }
            Decision::Serve { background } => {
                let entry = entry.expect("Serve implies an entry");
                let seen = Some(entry.last_refresh());
                let qs = match background {
                    Background::None if in_flight => running_status(app, spec),
                    Background::None => None,
                    Background::IfAbsent => {
                        Some(enqueue(app, spec, flight_key, false, UpstreamRefresh::Blocking, seen))
                    }
                    Background::Always => Some(enqueue(app, spec, flight_key, true, UpstreamRefresh::Blocking, seen)),
                };
                let detail = match (state, background) {
                    (CacheState::Fresh, _) => None,
                    (_, Background::None) => Some(Detail::Stale),
                    _ => Some(Detail::StaleWhileRevalidate),
                };
                let cs = if via_peek {
                    CacheStatus::fwd(Fwd::Miss).fwd_status(200).stored()
                } else {
                    hit_status(app, &entry, now, detail)
                };
                if state == CacheState::Fresh {
                    refresh_ahead(app, spec, &entry, now);
                }
                return Reply::json(200, entry.render(true, qs.as_deref()), cs);
            }
            Decision::Calculate { refresh, .. } => {
                let (fwd, reason) = match (refresh, state) {
                    (UpstreamRefresh::ForceBlocking, _) => (Fwd::Request, "forced"),
                    (_, CacheState::Miss) => (Fwd::Miss, "miss"),
                    _ => (Fwd::Stale, "stale"),
                };
                let wait =
                    |flight: Arc<crate::flights::Flight<Outcome>>| async move { wait_as_client(app, &flight).await };
                let (outcome, started) =
                    app.calculate_for(spec, entry.as_ref(), flight_key, refresh, reason, wait).await;
                let outcome = outcome.unwrap_or(Outcome::Failed(Failure::Interrupted));
                let forwarded = CacheStatus::fwd(fwd).collapsed(!started);
                return match outcome {
                    Outcome::Stored(e) => {
                        Reply::json(200, e.render(e.upstream_cached(), None), forwarded.fwd_status(200).stored())
                    }
                    Outcome::Relay(r) => Reply::relay(&r, forwarded.fwd_status(r.status)),
                    // stale-if-error: a result we have beats an upstream outage. Over the proxy's
                    // own budget it stands in too, but only for a principal the upstream
                    // confirmed: the proxy's failure never unlocks cached data by itself.
                    Outcome::Failed(f) => match entry {
                        Some(e) if f.is_upstream_outage() => Reply::json(
                            200,
                            e.render(true, None),
                            hit_status(app, &e, app.clock.now(), Some(Detail::StaleIfError)),
                        ),
                        Some(e) if f == Failure::Budget => {
                            if !app.is_confirmed(partition, project, insight) {
                                if let Err(reply) = revalidate(app, spec).await {
                                    return reply;
                                }
                            }
                            Reply::json(
                                200,
                                e.render(true, None),
                                hit_status(app, &e, app.clock.now(), Some(Detail::Budget)),
                            )
                        }
                        _ => failure_reply(app, spec, &f, CacheStatus::fwd(fwd).detail(Detail::Failure(f.as_str()))),
                    },
                };
            }
            Decision::Peek | Decision::MissRunning | Decision::MissEnqueue => {
                // Answered from the proxy's short memory that the upstream has nothing cached.
                let remembered = peeked.is_none() && app.cache.upstream_empty(&spec.key).is_some();
                let outcome = match peeked.take() {
                    Some(o) => o,
                    None => {
                        app.peek(spec, FlightKind::Peek).wait().await.unwrap_or(Outcome::Failed(Failure::Interrupted))
                    }
                };
                match outcome {
                    // The upstream's cache had a result: answer as if it had been ours.
                    Outcome::Stored(e) => {
                        entry = Some(e);
                        via_peek = true;
                        continue;
                    }
                    Outcome::Relay(r) => {
                        // Work is queued only for a caller the upstream just showed the insight to.
                        let qs = match decision {
                            Decision::MissEnqueue if r.status == 200 => {
                                Some(enqueue(app, spec, flight_key, false, UpstreamRefresh::Blocking, None))
                            }
                            _ if r.status == 200 => running_status(app, spec),
                            _ => None,
                        };
                        let cs = if remembered {
                            CacheStatus::hit().detail(Detail::UpstreamEmpty)
                        } else {
                            CacheStatus::fwd(Fwd::Miss).fwd_status(r.status)
                        };
                        return match (r.status, qs) {
                            (200, Some(qs)) => Reply::json(200, overlay_miss(&r.body, Some(&qs), false, truthy), cs),
                            // The upstream was asked with a truthy `refresh=force_cache`.
                            (200, None) if !truthy => Reply::json(200, stored_timezone(&r.body), cs),
                            _ => Reply::relay(&r, cs),
                        };
                    }
                    // Out of budget for even a read: a miss is the honest answer (force_cache never
                    // calculates), with a status when the mode enqueues work.
                    Outcome::Failed(Failure::Budget) => {
                        // Not even a read fit the budget, so the upstream has not vouched for this
                        // caller just now: queue work only for one it confirmed recently.
                        let confirmed = app.is_confirmed(partition, project, insight);
                        let qs = match decision {
                            Decision::MissEnqueue if confirmed => {
                                Some(enqueue(app, spec, flight_key, false, UpstreamRefresh::Blocking, None))
                            }
                            Decision::MissEnqueue => {
                                return failure_reply(
                                    app,
                                    spec,
                                    &Failure::Budget,
                                    CacheStatus::fwd(Fwd::Miss).detail(Detail::Budget),
                                )
                            }
                            _ => running_status(app, spec),
                        };
                        let body = serde_json::json!({
                            "id": spec.insight, "result": null, "last_refresh": null, "is_cached": false,
                            "timezone": null, "next_allowed_client_refresh": null, "cache_target_age": null,
                        });
                        let body = overlay_miss(body.to_string().as_bytes(), qs.as_deref(), false, truthy);
                        return Reply::json(200, body, CacheStatus::fwd(Fwd::Miss).detail(Detail::Budget));
                    }
                    Outcome::Failed(f) => {
                        return failure_reply(
                            app,
                            spec,
                            &f,
                            CacheStatus::fwd(Fwd::Miss).detail(Detail::Failure(f.as_str())),
                        )
                    }
                }
            }
            Decision::ForceEnqueue => {
                let cs = CacheStatus::fwd(Fwd::Request).detail(Detail::Enqueued);
                // The insight's metadata for the answer, and the upstream's word that this caller
                // may see it, before any work is queued in the caller's name.
                let vouched = via_peek || app.is_confirmed(partition, project, insight);
                let base = match (&entry, peeked.take()) {
                    (Some(e), _) if vouched => Bytes::from(e.to_value(false).to_string()),
                    (None, Some(Outcome::Stored(e))) => Bytes::from(e.to_value(false).to_string()),
                    (None, Some(Outcome::Relay(r))) if r.status == 200 => r.body.clone(),
                    (None, Some(Outcome::Relay(r))) => return Reply::relay(&r, cs),
                    _ => match app
                        .peek(spec, FlightKind::Peek)
                        .wait()
                        .await
                        .unwrap_or(Outcome::Failed(Failure::Interrupted))
                    {
                        Outcome::Stored(e) => Bytes::from(e.to_value(false).to_string()),
                        Outcome::Relay(r) if r.status == 200 => r.body.clone(),
                        Outcome::Relay(r) => return Reply::relay(&r, cs),
                        // The upstream down: as for a hit, what we have stands. Nothing else
                        // vouches for this principal, so nothing else queues work in its name.
                        Outcome::Failed(f) => match &entry {
                            Some(e) if f.is_upstream_outage() => Bytes::from(e.to_value(false).to_string()),
                            _ => return failure_reply(app, spec, &f, cs),
                        },
                    },
                };
                let seen = entry.as_ref().map(|e| e.last_refresh());
                let qs = enqueue(app, spec, flight_key, true, UpstreamRefresh::ForceBlocking, seen);
                return Reply::json(200, overlay_miss(&base, Some(&qs), true, truthy), cs);
            }
        }
    }
}

/// The answer when nothing cached can stand in for a failed upstream call. Over budget it is what
/// PostHog answers when a team runs too many queries: HTTP 200, no result, an error status
/// (docs/refresh-semantics.md §6).
fn failure_reply(app: &App, spec: &CalcSpec, f: &Failure, cache_status: CacheStatus) -> Reply {
    match f {
        Failure::Budget => {}
        // The upstream's own error answer, as PostHog gave it (status, body, `Retry-After`).
        Failure::Status(answer) => return Reply::relay(answer, cache_status),
        _ => return Reply::error(&f.to_api_error(), cache_status),
    }
    let now = crate::clock::format_datetime(app.clock.now());
    let body = serde_json::json!({
        "id": spec.insight,
        "result": null,
        "last_refresh": now,
        "is_cached": false,
        "query_status": {
            "id": null,
            "team_id": spec.project,
            "insight_id": spec.insight,
            "dashboard_id": spec.dashboard_id(),
            "query_async": true,
            "complete": true,
            "error": true,
            "error_message": CONCURRENCY_LIMIT_EXCEEDED,
        },
    });
    Reply::json(200, Bytes::from(body.to_string()), cache_status)
}

/// When refresh-ahead starts for `key`, as a fraction of the staleness threshold: at
/// `start_percent`, plus a per-key jitter over the first half of what remains (so a dashboard's
/// tiles do not fire together, and every refresh still lands well before the threshold).
fn ahead_fraction(start_percent: u8, key: &CacheKey) -> f64 {
    let jitter = (key.variant as u64 ^ key.insight.wrapping_mul(0x9E37_79B9_7F4A_7C15)) % 1000;
    let start = f64::from(start_percent);
    (start + (100.0 - start) / 2.0 * jitter as f64 / 1000.0) / 100.0
}

/// Whether an entry is old enough that a newer result of its group could matter: in the
/// refresh-ahead window or stale. Younger entries skip the group lookup (the hit path).
fn worth_freshening(app: &App, entry: &Entry, now: time::OffsetDateTime) -> bool {
    if entry.group == 0 {
        return false;
    }
    let Some(threshold) = app.config.thresholds.default_for(entry.stale.interval) else { return false };
    let age = (now - entry.stale.last_refresh).as_seconds_f64();
    age >= threshold.as_secs_f64() * f64::from(app.config.refresh_ahead.start_percent) / 100.0
}

/// Schedules a background recalculation of a hot entry shortly before it goes stale: read at
/// least `min_reads` times, and older than [`ahead_fraction`] of its staleness threshold. Once
/// per calculated result of the upstream cache key: variants of the same key (same partition)
/// share one claim, so they are refreshed once, not once each.
fn refresh_ahead(app: &App, spec: &Arc<CalcSpec>, entry: &Arc<Entry>, now: time::OffsetDateTime) {
    let settings = app.config.refresh_ahead;
    let reads = entry.note_read();
    if !settings.enabled || reads < settings.min_reads || !entry.stale.can_go_stale(&app.config.thresholds) {
        return;
    }
    let Some(threshold) = app.config.thresholds.default_for(entry.stale.interval) else { return };
    let age = (now - entry.stale.last_refresh).as_seconds_f64();
    if age < threshold.as_secs_f64() * ahead_fraction(settings.start_percent, &spec.key) {
        return;
    }
    let usable = app.alias_usable(entry, now);
    // The claim lives on the group's newest result when the group is usable, else on the entry.
    let claimed = match usable.then(|| app.cache.group_latest(&spec.key, entry.group)).flatten() {
        Some(g) if g.last_refresh() == entry.last_refresh() => g,
        _ => entry.clone(),
    };
    if !claimed.claim_refresh_ahead() {
        return;
    }
    let heat = (f64::from(reads) * 60.0 / age.max(1.0)) as u64;
    let ahead = Ahead { claimed: claimed.clone(), base: entry.last_refresh(), group: entry.group, heat };
    // A variant whose alias is not confirmed lately refreshes under its own key, so its own call
    // confirms it (refresh-ahead runs one upstream key at a time anyway, see `run_ahead`).
    let flight = if usable { app.flight_key(spec, Some(entry)) } else { spec.key };
    // The upstream's own cache is still fresh, so only force_blocking recalculates.
    let job = Job {
        spec: spec.clone(),
        flight,
        refresh: UpstreamRefresh::ForceBlocking,
        status_id: None,
        ahead: Some(ahead),
        joined: Vec::new(),
        seen: Some(entry.last_refresh()),
    };
    if app.jobs.push(job).is_err() {
        claimed.unclaim_refresh_ahead();
        tracing::debug!(project = spec.project, insight = spec.insight, "refresh-ahead queue full");
    }
}

/// The status of a background calculation for the key that is still running, if any.
fn running_status(app: &App, spec: &CalcSpec) -> Option<Bytes> {
    app.statuses.running(spec.key.partition, &app.keyer.status_id(&spec.key), app.clock.now()).map(|s| s.to_json())
}

/// PostHog's `enqueue_async_calculation`: with `rr=false` an existing status is returned as it is.
/// Work that cannot be taken (queue or registry full) is answered as PostHog does when it cannot
/// take more: a completed status with `concurrency_limit_exceeded`, never one that looks queued.
fn enqueue(
    app: &Arc<App>,
    spec: &Arc<CalcSpec>,
    flight: CacheKey,
    refresh_requested: bool,
    refresh: UpstreamRefresh,
    seen: Option<time::OffsetDateTime>,
) -> Bytes {
    let id = app.keyer.status_id(&spec.key);
    let owner = spec.key.partition;
    if !refresh_requested {
        // An existing status is returned as it is (upstream's dedup), unless it is a failure:
        // then the work is tried again rather than reporting the old error for 20 minutes.
        if let Some(s) = app.statuses.live(owner, &id, app.clock.now()).filter(|s| !(s.complete && s.error)) {
            return s.to_json();
        }
    }
    let blank = app.statuses.blank(id.clone(), spec.project, spec.insight, spec.dashboard_id(), app.clock.now());
    let refuse = |blank| {
        let s = app.statuses.refuse(owner, blank, CONCURRENCY_LIMIT_EXCEEDED);
        app.metrics.async_refused.inc();
        app.share_status(&id, owner);
        s.to_json()
    };
    let status = match app.statuses.start(owner, blank.clone()) {
        Ok(status) => status,
        Err(_) => return refuse(blank),
    };
    let status_id = Some(id.clone());
    let job = Job { spec: spec.clone(), flight, refresh, status_id, ahead: None, joined: Vec::new(), seen };
    if app.jobs.push(job).is_err() {
        return refuse(blank);
    }
    app.share_status(&id, owner);
    status.to_json()
}

/// A cache-miss answer built from the upstream's insight body (PostHog's `NothingInCacheResult`):
/// the insight's metadata with nothing of a calculation, carrying our `query_status`. For
/// `force_async` the cache key is null too. `timezone` is the team's (as the body has it) for a
/// truthy `refresh`, else the stored one: none. Keys keep the upstream's order.
fn overlay_miss(body: &[u8], query_status: Option<&[u8]>, force_async: bool, truthy: bool) -> Bytes {
    let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(body) else {
        return Bytes::copy_from_slice(body);
    };
    let qs = query_status.and_then(|q| serde_json::from_slice(q).ok()).unwrap_or(Value::Null);
    let nulled = ["result", "last_refresh", "next_allowed_client_refresh", "cache_target_age", "columns", "hogql"];
    for k in nulled.into_iter().chain(["resolved_date_range", "hasMore"]) {
        if k == "hasMore" && !m.contains_key(k) {
            continue;
        }
        m.insert(k.into(), Value::Null);
    }
    if !truthy {
        m.insert("timezone".into(), Value::Null);
    }
    if force_async {
        m.insert("filters_hash".into(), Value::Null);
    }
    m.insert("is_cached".into(), Value::Bool(false));
    m.insert("query_status".into(), qs);
    Bytes::from(Value::Object(m).to_string())
}

/// The upstream's miss answer to the proxy's truthy `refresh=force_cache`, as a client whose
/// `refresh` is absent or false-ish gets it: the stored timezone, which for nothing stored is none.
fn stored_timezone(body: &[u8]) -> Bytes {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut m)) if m.get("result").is_none_or(Value::is_null) => {
            m.insert("timezone".into(), Value::Null);
            Bytes::from(Value::Object(m).to_string())
        }
        _ => Bytes::copy_from_slice(body),
    }
}

/// A client's wait on a calculation it started or joined: like a blocking request's own budget
/// wait, at most `budget.wait_ms` for the work to get underway (joined background work may still
/// be queued behind other work), then the upstream's time.
async fn wait_as_client(app: &App, flight: &crate::flights::Flight<Outcome>) -> Option<Outcome> {
    if tokio::time::timeout(app.budget.settings().wait, flight.underway()).await.is_err() {
        return Some(Outcome::Failed(Failure::Budget));
    }
    match tokio::time::timeout(app.config.connect_timeout + app.config.read_timeout, flight.wait()).await {
        Ok(outcome) => outcome,
        Err(_) => Some(Outcome::Failed(Failure::Upstream(UpstreamError::Timeout))),
    }
}

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

/// Each insight on the page is answered under the request's mode from the same per-insight
/// entries as retrieve; the calculations a page needs run concurrently.
pub async fn list(app: &Arc<App>, call: ListCall) -> Reply {
    let partition = call.principal.partition();
    let epoch = app.cache.begin();
    let started_ms = app.cache.now_ms();
    let req = crate::app::own_request(&call.path, &call.query, &call.principal, "force_cache");
    let listed = || CacheStatus::fwd(Fwd::UriMiss);
    let confirmed = app.is_confirmed(partition, call.project, None);
    if !confirmed {
        if let Some(reply) = remembered_refusal(app, partition, call.project, None) {
            return reply;
        }
    }
    // A page's membership is kept briefly per principal, so a dashboard's viewers do not each
    // cost an upstream call; the insights on it are answered from their own entries below.
    let page_key = PageKey { partition, project: call.project, path_and_query: req.path_and_query.clone() };
    let cached_page = if confirmed { app.cache.page(&page_key).await } else { None };
    let (body, page_status) = match cached_page {
        Some(body) => (body, CacheStatus::hit().detail(Detail::ListPage)),
        None => {
            let failed = |f: Failure| Reply::error(&f.to_api_error(), listed().detail(Detail::Failure(f.as_str())));
            if !app.trust.admit(partition) {
                app.metrics.trust_refusals.with_label_values(&["unconfirmed"]).inc();
                return failed(Failure::Unconfirmed);
            }
            if app.budget.rate_token(&call.principal, app.budget.settings().wait, false).await.is_err() {
                return failed(Failure::Budget);
            }
            app.metrics.upstream_reads.with_label_values(&["list"]).inc();
            let resp = match app.upstream.send(&req).await {
                Ok(r) => r,
                Err(e) => return failed(Failure::Upstream(e)),
            };
            if resp.status != 200 {
                let resp = Arc::new(resp);
                if resp.status == 401 || resp.status == 403 {
                    app.reject(partition, call.project, None, resp.clone());
                }
                return Reply::relay(&resp, listed().fwd_status(resp.status));
            }
            app.confirm(partition, call.project, None);
            app.cache.put_page(page_key, resp.body.clone()).await;
            (resp.body, listed().fwd_status(200))
        }
    };
    let Ok(Value::Object(mut page)) = serde_json::from_slice::<Value>(&body) else {
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
    let item_path = format!("{}/", call.path.trim_end_matches('/'));
    // The upstream's list ignores `from_dashboard` (and its paging parameters are the list's): its
    // items are stored and answered as the insight's own results, never under a dashboard's key.
    let item_query = call.query.only(&["filters_override", "variables_override", "tile_filters_override"]);
    let mut tasks = tokio::task::JoinSet::new();
    let mut answered: Vec<Value> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let Some(insight) = item.get("id").and_then(Value::as_u64) else {
            answered.push(item);
            continue;
        };
        // The upstream listed it to this principal: under the insight scope that confirms it.
        app.confirm(partition, call.project, Some(insight));
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
                let e = Arc::new(e);
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
fn remembered_refusal(app: &App, partition: Partition, project: u64, insight: Option<u64>) -> Option<Reply> {
    let r = app.trust.refusal(partition, project, insight)?;
    app.metrics.trust_refusals.with_label_values(&["refused"]).inc();
    Some(Reply::relay(&r, CacheStatus::fwd(Fwd::Bypass).fwd_status(r.status).detail(Detail::Refused)))
}

/// Cached data reaches a principal only while the upstream recently confirmed its access: this
/// asks again with a read that never calculates. `Ok` when cached data may reach it (with the
/// entry the read stored, if any): the upstream accepted it, or the upstream is down, the one
/// failure that lets what we have stand without its word. Otherwise the answer to give instead:
/// the upstream's refusal, or the proxy's own failure (docs/trust.md).
async fn revalidate(app: &Arc<App>, spec: &Arc<CalcSpec>) -> Result<Option<Arc<Entry>>, Reply> {
    app.metrics.revalidations.inc();
    let outcome = app.peek(spec, FlightKind::Revalidate).wait().await;
    match outcome.unwrap_or(Outcome::Failed(Failure::Interrupted)) {
        Outcome::Stored(e) => Ok(Some(e)),
        Outcome::Relay(r) if r.status == 200 => Ok(None),
        Outcome::Relay(r) => {
            Err(Reply::relay(&r, CacheStatus::fwd(Fwd::Request).fwd_status(r.status).detail(Detail::Revalidated)))
        }
        Outcome::Failed(f) if f.is_upstream_outage() => Ok(None),
        Outcome::Failed(f) => {
            Err(failure_reply(app, spec, &f, CacheStatus::fwd(Fwd::Request).detail(Detail::Failure(f.as_str()))))
        }
    }
}

/// `GET .../query/:id/` for ids the proxy issued: 202 running, 200 complete, 400 failed, 404
/// unknown, expired, or another principal's. `None`: not ours, pass it through. A status carries
/// results, so a poll is a cached read: it needs the same confirmation as any cached answer.
/// Whether a query id is one the proxy issues ([`crate::cache::PartitionKeyer::status_id`]).
pub fn is_own_query_id(id: &str) -> bool {
    id.starts_with("ipx_")
}

pub async fn query_status(app: &Arc<App>, project: u64, query_id: &str, principal: Option<Principal>) -> Option<Reply> {
    if !is_own_query_id(query_id) {
        return None;
    }
    let cs = CacheStatus::hit();
    // Without a credential, or for an id this principal was not given, the upstream answers as
    // PostHog does (401, 403 for a project it cannot see, 404).
    let principal = principal?;
    let owner = principal.partition();
    let now = app.clock.now();
    let mut status = app.statuses.live(owner, query_id, now);
    if status.is_none() {
        // Another replica may have issued it.
        if let Some(l2) = app.cache.l2() {
            status = l2.get_status(query_id, owner).await.and_then(|b| serde_json::from_slice(&b).ok());
        }
    }
    let status = status.filter(|s| s.team_id == project && now <= s.expiration_time)?;
    if !app.is_confirmed(owner, project, status.insight_id) {
        if let Some(reply) = remembered_refusal(app, owner, project, status.insight_id) {
            return Some(reply);
        }
        let insight = status.insight_id.unwrap_or(0);
        let query = match status.dashboard_id {
            Some(d) => QueryParams::parse(Some(&format!("from_dashboard={d}"))).unwrap_or_default(),
            None => QueryParams::default(),
        };
        let spec = Arc::new(CalcSpec {
            key: CacheKey::new(owner, project, insight, &query),
            project,
            insight,
            path: format!("/api/environments/{project}/insights/{insight}/"),
            query,
            principal,
        });
        if let Err(reply) = revalidate(app, &spec).await {
            return Some(reply);
        }
    }
    let code = match (status.complete, status.error) {
        (false, _) => 202,
        (true, false) => 200,
        (true, true) => 400,
    };
    let body = serde_json::json!({ "query_status": status.for_polling() });
    Some(Reply::json(code, Bytes::from(body.to_string()), cs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_ahead_starts_in_the_first_half_of_what_remains() {
        let (mut lo, mut hi) = (1.0f64, 0.0f64);
        for insight in 0..500 {
            let key = CacheKey::new(Partition([0; 16]), 1, insight, &QueryParams::default());
            let f = ahead_fraction(90, &key);
            (lo, hi) = (lo.min(f), hi.max(f));
        }
        assert!(lo >= 0.90 && hi < 0.95, "{lo}..{hi}");
        assert!(hi - lo > 0.04, "spread over the window: {lo}..{hi}");
    }

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
