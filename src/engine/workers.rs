//! The engine's workers: a fixed pool that drains the background queue as a pingora background
//! service and stops on shutdown. Every job taken completes the statuses it carries, whatever
//! happens to its calculation.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::Value;

use super::calculate::Ask;
use super::queue::{Ahead, Job, Next, Taken};
use super::{Engine, Outcome};
use crate::cache::Entry;
use crate::failure::Failure;
use crate::flights::Flight;
use crate::refresh::UpstreamRefresh;

/// Refresh-ahead: nobody polls it; the result simply lands in the cache. One partition at a time
/// refreshes an upstream cache key: the others wait for it, then read the upstream's fresh cache
/// with their own credential (no calculation). If it could not run (budget), the next read may
/// schedule it again.
async fn run_ahead(engine: &Arc<Engine>, job: &Job, ahead: &Ahead) {
    let spec = &job.spec;
    let ahead_of = Some((ahead.base, ahead.group));
    let key = match ahead.group {
        0 => (spec.project, spec.insight, spec.key.variant, false),
        g => (spec.project, spec.insight, g, true),
    };
    let run = {
        let (engine, spec) = (engine.clone(), spec.clone());
        let ask = Ask::ahead(job.flight, job.refresh);
        move || {
            let (engine, spec) = (engine.clone(), spec.clone());
            async move { engine.calculation(&spec, ask, ahead_of).0.wait().await }
        }
    };
    let (first, started) = engine.ahead_flights.join_or_start(key, |_| {
        let run = run.clone();
        async move { run().await.unwrap_or(Outcome::Failed(Failure::Interrupted)) }
    });
    let mut outcome = first.wait().await;
    if !started {
        // Another partition's refresh of the same upstream key: its result is not ours to use;
        // ours now reads the upstream's cache (or calculates if that did not happen).
        outcome = run().await;
    }
    let ours = job.flight == spec.key;
    let taken = match outcome {
        // Another variant's result whose upstream key changed meanwhile is not taken (`None`):
        // this variant's next read schedules it again.
        Some(o @ Outcome::Stored(_)) => engine.adopt(spec, Some(&ahead.claimed), o, ours).await.is_some(),
        _ => false,
    };
    if !taken {
        ahead.claimed.unclaim_refresh_ahead();
    }
}

/// Runs one job to completion and records the outcome in its status. A job that lost its budget
/// after it was taken (someone else took the token or the slot first) is handed back with its
/// status untouched, for its lane (`JobQueue::put_back`).
async fn run_job(engine: &Arc<Engine>, job: Job) -> Option<Job> {
    if let Some(ahead) = &job.ahead {
        run_ahead(engine, &job, ahead).await;
        return None;
    }
    job.status_id.as_ref()?;
    for id in job.statuses() {
        engine.statuses.picked_up(id, engine.clock.now());
        engine.share_status(id, job.spec.key.partition);
    }
    if let Some(entry) = answered_meanwhile(engine, &job).await {
        let result = Ok(crate::status::query_response(&entry));
        for id in job.statuses() {
            engine.statuses.finish(id, engine.clock.now(), result.clone());
            engine.share_status(id, job.spec.key.partition);
        }
        return None;
    }
    let own = engine.cache.get_local(&job.spec.key).await;
    let ask = Ask::background(job.flight, job.refresh);
    let wait = |flight: Arc<Flight<Outcome>>| async move { flight.wait().await };
    let (outcome, _) = engine.calculate_under(&job.spec, own.as_ref(), ask, wait).await;
    let result = match outcome {
        Some(Outcome::Failed(Failure::Budget)) => return Some(job),
        Some(Outcome::Stored(entry)) => Ok(crate::status::query_response(&entry)),
        Some(Outcome::Relay(resp)) => Err(relay_message(&resp.body)),
        Some(Outcome::Failed(f)) => Err(f.to_api_error().detail),
        None => Err("The calculation was interrupted.".into()),
    };
    for id in job.statuses() {
        engine.statuses.finish(id, engine.clock.now(), result.clone());
        engine.share_status(id, job.spec.key.partition);
    }
    None
}

/// The entry that already answers a client job, checked right before it calculates: a result
/// newer than the one its request saw landed while it waited (a client's calculation, another
/// variant's), and is fresh. Forced work takes any newer result, one calculated since the
/// request saw the entry (two forces of one key share a calculation); forced work on a miss
/// always runs.
async fn answered_meanwhile(engine: &Engine, job: &Job) -> Option<Arc<Entry>> {
    let forced = job.refresh == UpstreamRefresh::ForceBlocking;
    if forced && job.seen.is_none() {
        return None;
    }
    let own = engine.cache.get_local(&job.spec.key).await?;
    let own = engine.freshen(&job.spec, &own).await.unwrap_or(own);
    if job.seen.is_some_and(|seen| own.last_refresh() <= seen) {
        return None;
    }
    (forced || !own.stale.is_stale(engine.clock.now(), &engine.config.thresholds)).then_some(own)
}

/// Completes a job that will not run: its status says `concurrency_limit_exceeded`, as PostHog's
/// does when a team runs too many queries; refresh-ahead releases its claim for the next read.
fn give_up(engine: &Engine, job: Job) {
    if let Some(ahead) = &job.ahead {
        ahead.claimed.unclaim_refresh_ahead();
    }
    for id in job.statuses() {
        engine.statuses.finish(id, engine.clock.now(), Err(Failure::Budget.to_api_error().detail));
        engine.share_status(id, job.spec.key.partition);
    }
}

/// The upstream's own error message for a relayed answer, e.g. `concurrency_limit_exceeded`.
fn relay_message(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    v.pointer("/query_status/error_message")
        .or_else(|| v.get("detail"))
        .and_then(Value::as_str)
        .unwrap_or("The upstream did not return a result.")
        .to_string()
}

pub struct Workers {
    pub engine: Arc<Engine>,
}

#[async_trait]
impl BackgroundService for Workers {
    async fn start(&self, shutdown: ShutdownWatch) {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..self.engine.config.workers {
            let (engine, mut shutdown) = (self.engine.clone(), shutdown.clone());
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        next = engine.jobs.pop() => match next {
                            Next::Run(Taken { job, lost }) => {
                                engine.metrics.busy_workers.inc();
                                let key = job.spec.key;
                                let back = run_job(&engine, job).await;
                                // A job that did not calculate gives its token and slot back.
                                engine.budget.release_grant(&key);
                                if let Some(job) = back {
                                    if let Some(job) = engine.jobs.put_back(Taken { job, lost }) {
                                        give_up(&engine, job);
                                    }
                                }
                                engine.metrics.busy_workers.dec();
                            }
                            Next::Expired(job) => give_up(&engine, job),
                        },
                    }
                }
            });
        }
        // The shared budget's membership: every replica's share while Redis is down.
        let (engine, mut shutdown_watch) = (self.engine.clone(), shutdown.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = shutdown_watch.changed() => {}
                _ = engine.budget.membership() => {}
            }
        });
        while tasks.join_next().await.is_some() {}
    }
}
