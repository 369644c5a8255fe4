//! One insight answered under its refresh mode: a small interpreter of [`plan`]. Each arm makes
//! one engine call and shapes the answer; a step that changes what the proxy knows (a
//! revalidation, an entry read from the upstream's cache) plans again.

use std::sync::Arc;

use bytes::Bytes;

use super::body::{failure_reply, nothing_cached, overlay_miss, stored_timezone};
use super::vouch::{remembered_refusal, revalidate};
use super::{Ask, InsightCall, Reply};
use crate::app::App;
use crate::cache::{CacheKey, Entry};
use crate::cache_status::{CacheStatus, Detail, Fwd};
use crate::engine::{CalcSpec, Outcome};
use crate::failure::Failure;
use crate::refresh::{fallback, plan, Background, CalcReason, Fallback, Plan, Served, UpstreamRefresh, View};
use crate::upstream::UpstreamResponse;

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

/// Answers one insight under `ask.mode`. `peeked` is the upstream's own answer when the caller
/// already has it (a list page), so a miss does not ask again.
pub(super) async fn answer(app: &Arc<App>, spec: &Arc<CalcSpec>, ask: Ask, peeked: Option<Outcome>) -> Reply {
    let engine = &app.engine;
    let (partition, project, insight) = (spec.key.partition, spec.project, Some(spec.insight));
    // The upstream accepted the caller within the window, or during this request (a
    // revalidation); looked up once per request, not once per step.
    let mut vouched = engine.is_confirmed(partition, project, insight);
    if !vouched {
        if let Some(reply) = remembered_refusal(app, partition, project, insight) {
            return reply;
        }
    }
    let mut peeked = peeked;
    let mut entry = engine.entry(spec).await;
    // The entry was read from the upstream's cache during this request.
    let mut from_upstream = false;
    loop {
        let view = engine.view(spec, ask.mode, entry.as_deref(), vouched, from_upstream);
        match plan(ask.mode, &view) {
            Plan::Revalidate => {
                vouched = true;
                match revalidate(app, spec).await {
                    Ok(Some(stored)) => entry = app.cache.get(&spec.key).await.or(Some(stored)),
                    Ok(None) => {}
                    Err(reply) => return reply,
                }
            }
            Plan::Serve { background, served } => {
                let entry = entry.expect("a plan to serve has an entry");
                return serve(app, spec, &view, &entry, background, served);
            }
            Plan::Calculate { reason, refresh } => return calculate(app, spec, entry, reason, refresh).await,
            Plan::ReadUpstreamCache { enqueue, from_note } => {
                match read(app, spec, peeked.take(), from_note).await {
                    // The upstream's cache had a result: answer as if it had been ours.
                    (Outcome::Stored(e), _) => {
                        entry = Some(e);
                        from_upstream = true;
                    }
                    (outcome, remembered) => return miss(app, spec, ask, enqueue, outcome, remembered),
                }
            }
            Plan::EnqueueOnly { read_first, from_note } => {
                return enqueue_only(app, spec, ask, entry, read_first.then_some((peeked.take(), from_note))).await
            }
        }
    }
}

fn hit_status(app: &App, entry: &Entry, detail: Option<Detail>) -> CacheStatus {
    CacheStatus::hit().ttl(entry.stale.ttl_seconds(app.clock.now(), &app.config.thresholds)).detail_opt(detail)
}

fn serve(
    app: &App,
    spec: &Arc<CalcSpec>,
    view: &View,
    entry: &Arc<Entry>,
    background: Background,
    served: Served,
) -> Reply {
    let engine = &app.engine;
    let qs = match background {
        Background::None => None,
        Background::Running => engine.running_status(spec),
        Background::IfAbsent => Some(engine.enqueue(spec, Some(entry), false, UpstreamRefresh::Blocking)),
        Background::Always => Some(engine.enqueue(spec, Some(entry), true, UpstreamRefresh::Blocking)),
    };
    let cs = match served {
        Served::FromUpstream => CacheStatus::fwd(Fwd::Miss).fwd_status(200).stored(),
        Served::Fresh => hit_status(app, entry, None),
        Served::Stale => hit_status(app, entry, Some(Detail::Stale)),
        Served::StaleWhileRevalidate => hit_status(app, entry, Some(Detail::StaleWhileRevalidate)),
        Served::TooSoonToForce => hit_status(app, entry, Some(Detail::TooSoonToForce)),
    };
    if view.state == crate::refresh::CacheState::Fresh {
        engine.schedule_ahead(spec, entry);
    }
    Reply::kept(entry.render(true, qs.as_deref()), entry.file(), cs)
}

async fn calculate(
    app: &Arc<App>,
    spec: &Arc<CalcSpec>,
    entry: Option<Arc<Entry>>,
    reason: CalcReason,
    refresh: UpstreamRefresh,
) -> Reply {
    let fwd = match reason {
        CalcReason::Miss => Fwd::Miss,
        CalcReason::Forced => Fwd::Request,
        _ => Fwd::Stale,
    };
    let (outcome, started) = app.engine.calculate(spec, entry.as_ref(), reason, refresh).await;
    let forwarded = CacheStatus::fwd(fwd).collapsed(!started);
    let f = match outcome {
        Outcome::Stored(e) => {
            return Reply::kept(e.render(e.upstream_cached(), None), e.file(), forwarded.fwd_status(200).stored())
        }
        Outcome::Relay(r) => return Reply::relay(&r, forwarded.fwd_status(r.status)),
        Outcome::Failed(f) => f,
    };
    let confirmed = app.engine.is_confirmed(spec.key.partition, spec.project, Some(spec.insight));
    match (fallback(f.shortfall(), entry.is_some(), confirmed), entry) {
        (Fallback::ServeStaleIfError, Some(e)) => {
            Reply::json(200, e.render(true, None), hit_status(app, &e, Some(Detail::StaleIfError)))
        }
        (Fallback::RevalidateThenServeOverBudget, Some(e)) => match revalidate(app, spec).await {
            Ok(_) => Reply::json(200, e.render(true, None), hit_status(app, &e, Some(Detail::Budget))),
            Err(reply) => reply,
        },
        (Fallback::ServeOverBudget, Some(e)) => {
            Reply::json(200, e.render(true, None), hit_status(app, &e, Some(Detail::Budget)))
        }
        _ => failure_reply(app, spec, &f, CacheStatus::fwd(fwd).detail(Detail::Failure(f.as_str()))),
    }
}

/// What the upstream's cache holds for the key: the caller's own copy (`peeked`), the proxy's
/// note that it holds nothing (`from_note`), or a read. Also says whether the note answered.
async fn read(app: &Arc<App>, spec: &Arc<CalcSpec>, peeked: Option<Outcome>, from_note: bool) -> (Outcome, bool) {
    if let Some(outcome) = peeked {
        return (outcome, false);
    }
    if let Some(body) = app.cache.upstream_empty(&spec.key).filter(|_| from_note) {
        let content_type = Some("application/json".to_string());
        let noted = UpstreamResponse { status: 200, content_type, body, ..Default::default() };
        return (Outcome::Relay(Arc::new(noted)), true);
    }
    (app.engine.read_upstream_cache(spec).await, false)
}

/// A miss the mode does not calculate for, answered from the upstream's answer (or its
/// absence): the insight without a result, with a new status when `enqueue`, else the status of a
/// calculation already running.
fn miss(app: &Arc<App>, spec: &Arc<CalcSpec>, ask: Ask, enqueue: bool, outcome: Outcome, remembered: bool) -> Reply {
    let engine = &app.engine;
    let start = || engine.enqueue(spec, None, false, UpstreamRefresh::Blocking);
    match outcome {
        Outcome::Relay(r) => {
            // Work is queued only for a caller the upstream just showed the insight to.
            let qs = match (enqueue, r.status) {
                (true, 200) => Some(start()),
                (false, 200) => engine.running_status(spec),
                _ => None,
            };
            let cs = if remembered {
                CacheStatus::hit().detail(Detail::UpstreamEmpty)
            } else {
                CacheStatus::fwd(Fwd::Miss).fwd_status(r.status)
            };
            match (r.status, qs) {
                (200, Some(qs)) => Reply::json(200, overlay_miss(&r.body, Some(&qs), false, ask.truthy), cs),
                // The upstream was asked with a truthy `refresh=force_cache`.
                (200, None) if !ask.truthy => Reply::json(200, stored_timezone(&r.body), cs),
                _ => Reply::relay(&r, cs),
            }
        }
        // Out of budget for even a read: a miss is the honest answer (force_cache never
        // calculates), with a status when the mode enqueues work. Not even a read fit the budget,
        // so the upstream has not vouched for this caller just now: work is queued only for one
        // it confirmed recently.
        Outcome::Failed(Failure::Budget) => {
            let cs = CacheStatus::fwd(Fwd::Miss).detail(Detail::Budget);
            let qs = match enqueue {
                true if engine.is_confirmed(spec.key.partition, spec.project, Some(spec.insight)) => Some(start()),
                true => return failure_reply(app, spec, &Failure::Budget, cs),
                false => engine.running_status(spec),
            };
            Reply::json(200, overlay_miss(&nothing_cached(spec.insight), qs.as_deref(), false, ask.truthy), cs)
        }
        Outcome::Failed(f) => {
            failure_reply(app, spec, &f, CacheStatus::fwd(Fwd::Miss).detail(Detail::Failure(f.as_str())))
        }
        Outcome::Stored(_) => unreachable!("a stored result is served"),
    }
}

/// `force_async`: the insight's metadata with a new status, and the calculation queued. `read`:
/// the metadata, and the upstream's word that this caller may see it, come from a read of the
/// upstream's cache first (the caller's own copy, the proxy's note, or a read), before any work is
/// queued in the caller's name.
async fn enqueue_only(
    app: &Arc<App>,
    spec: &Arc<CalcSpec>,
    ask: Ask,
    entry: Option<Arc<Entry>>,
    read_first: Option<(Option<Outcome>, bool)>,
) -> Reply {
    let cs = CacheStatus::fwd(Fwd::Request).detail(Detail::Enqueued);
    let metadata = |e: &Entry| Bytes::from(e.to_value(false).to_string());
    let base = match (&entry, read_first) {
        (Some(e), None) => metadata(e),
        (_, read_first) => {
            let (peeked, from_note) = read_first.unwrap_or((None, false));
            match read(app, spec, peeked, from_note).await.0 {
                Outcome::Stored(e) => metadata(&e),
                Outcome::Relay(r) if r.status == 200 => r.body.clone(),
                Outcome::Relay(r) => return Reply::relay(&r, cs),
                // The upstream down: as for a hit, what we have stands. Nothing else vouches for
                // this principal, so nothing else queues work in its name.
                Outcome::Failed(f) => match &entry {
                    Some(e) if f.is_upstream_outage() => metadata(e),
                    _ => return failure_reply(app, spec, &f, cs),
                },
            }
        }
    };
    let qs = app.engine.enqueue(spec, entry.as_deref(), true, UpstreamRefresh::ForceBlocking);
    Reply::json(200, overlay_miss(&base, Some(&qs), true, ask.truthy), cs)
}
