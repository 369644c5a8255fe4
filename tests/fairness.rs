//! Fairness of the background queue between tenants: one key flooding async work, or out of rate
//! tokens, does not hold back another key's or another project's async work.
//!
//! The bound: workers serve the queue round-robin, project first, then principal within the
//! project, skipping lanes without budget. With W workers busy on calculations that take T each,
//! one of them frees up at least every T/W on average and every worker within T, so a job with k
//! ready lanes served before it is picked up within ceil((k + 1) / W) · T and completes
//! T later:
//!
//! ```text
//!     bound(k) = (ceil((k + 1) / W) + 1) · T,   k ≤ P · L − 1
//! ```
//!
//! for P projects with ready work and L ready principals in the job's own project. SLACK covers
//! HTTP, polling and a loaded 2-core test machine; it is not part of the design.
//!
//! Every loop is bounded in count and time, every socket is on 127.0.0.1, every thread is joined.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

const SLACK: Duration = Duration::from_millis(1500);

/// A variant of an insight that the simulator calculates anew (its cache key hashes variables).
fn variant_url(project: u64, insight: u64, n: u64) -> String {
    format!("/api/environments/{project}/insights/{insight}/?refresh=async&variables_override=%7B%22x%22%3A{n}%7D")
}

/// The bound above for `k` lanes served first, `workers` workers and calculations of `calc`.
fn bound(k: u32, workers: u32, calc: Duration) -> Duration {
    calc * ((k + 1).div_ceil(workers) + 1)
}

/// An async request that must be accepted: its status id.
fn accepted(h: &Harness, path: &str, token: &str) -> String {
    let r = h.get(path, token);
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    let qs = &r.json()["query_status"];
    assert!(qs.is_object(), "{path}: no query_status: {}", r.text());
    assert!(qs["error_message"].is_null(), "{path}: refused: {qs}");
    assert_eq!(qs["complete"], false, "{path}: {qs}");
    qs["id"].as_str().expect("a status id").to_string()
}

/// Polls the status until it completes with a result; how long that took since `since`.
fn completed(h: &Harness, project: u64, id: &str, token: &str, since: Instant) -> Duration {
    let path = format!("/api/environments/{project}/query/{id}/");
    let mut done = None;
    eventually(&format!("status {id} of project {project} completes"), || {
        let r = h.get(&path, token);
        match r.status {
            200 => {
                let qs = &r.json()["query_status"];
                assert_eq!(qs["complete"], true, "{qs}");
                assert_eq!(qs["error"], false, "{qs}");
                done = Some(since.elapsed());
                true
            }
            202 => false,
            s => panic!("polling {path}: {s} {}", r.text()),
        }
    });
    done.expect("completed")
}

/// The proxy with `workers` workers in front of a simulator whose calculations take `calc`,
/// without refresh-ahead or the simulator's own concurrency limit; `tweak` sets the rest.
fn harness(workers: u32, calc: Duration, tweak: impl FnOnce(&mut insights_proxy::config::Config)) -> Harness {
    Harness::with(|c, sim| {
        c.workers = workers as usize;
        c.refresh_ahead.enabled = false;
        sim.calc_delay = calc;
        sim.concurrency_limit = None;
        tweak(c);
    })
}

/// Async requests from the other tenants: project 2's key, and another key in project 1. How
/// long each took from being sent to completing.
fn the_others_complete(h: &Harness) -> (Duration, Duration) {
    let started = Instant::now();
    let other_project = accepted(h, &variant_url(2, 21, 0), P2);
    let other_key = accepted(h, &variant_url(1, 1, 1_000_000), ALL);
    (completed(h, 2, &other_project, P2, started), completed(h, 1, &other_key, ALL, started))
}

/// Client threads sending async requests for distinct variants of project 1's insights (1–20)
/// with one key, until `requests` were sent or they are told to stop.
struct Flood {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Flood {
    /// A failed test stops its flood before the harness goes away.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Flood {
    fn start(h: &Harness, token: &'static str, requests: u64, threads: usize) -> Flood {
        let next = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (accepted, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let port = h.proxy_port;
        let threads = (0..threads)
            .map(|_| {
                let (next, stop, accepted, refused) = (next.clone(), stop.clone(), accepted.clone(), refused.clone());
                std::thread::spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= requests || stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let auth = format!("Bearer {token}");
                    let r = http(port, "GET", &variant_url(1, 1 + i % 20, i), &[("Authorization", &auth)], None);
                    assert_eq!(r.status, 200, "{}", r.text());
                    let qs = &r.json()["query_status"];
                    if qs["error_message"] == "concurrency_limit_exceeded" {
                        assert_eq!(qs["complete"], true, "a refusal is a completed status: {qs}");
                        refused.fetch_add(1, Ordering::SeqCst);
                    } else {
                        assert_eq!(qs["complete"], false, "{qs}");
                        accepted.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        Flood { stop, accepted, refused, threads }
    }

    /// Stops the threads (`stop`) or lets them send every request, and returns how many
    /// requests were (accepted, refused).
    fn finish(mut self, stop: bool) -> (u64, u64) {
        self.stop.store(stop, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().expect("a flood thread panicked");
        }
        (self.accepted.load(Ordering::SeqCst), self.refused.load(Ordering::SeqCst))
    }
}

#[test]
fn a_key_flooding_async_work_does_not_hold_back_other_projects_or_keys() {
    const WORKERS: u32 = 2;
    const CALC: Duration = Duration::from_millis(500);
    let h = harness(WORKERS, CALC, |c| c.queue_capacity = 256);
    let flood = Flood::start(&h, P1, 3000, 4);
    eventually("the flooding key is refused more work", || flood.refused.load(Ordering::SeqCst) > 0);
    assert!(h.app.engine.queued() <= 256, "the queue holds {}", h.app.engine.queued());

    // The others, while the flood goes on.
    let (p2_took, all_took) = the_others_complete(&h);
    let still_flooding = h.app.engine.queued();
    let (flood_accepted, flood_refused) = flood.finish(false);

    // Project 2 is one of P = 2 projects with one principal: k ≤ 1. The other key shares project 1
    // with the flooder (L = 2): k ≤ 3.
    let (p2_bound, all_bound) = (bound(1, WORKERS, CALC), bound(3, WORKERS, CALC));
    eprintln!(
        "flood: {flood_accepted} accepted, {flood_refused} refused, {still_flooding} still queued; \
         project 2 completed in {p2_took:?} (bound {p2_bound:?} + {SLACK:?}); \
         another key in project 1 in {all_took:?} (bound {all_bound:?} + {SLACK:?})"
    );
    assert!(still_flooding > 0, "the flood was still queued when the others completed");
    assert!(p2_took <= p2_bound + SLACK, "project 2 waited {p2_took:?}");
    assert!(all_took <= all_bound + SLACK, "the other key waited {all_took:?}");
}

#[test]
fn a_key_out_of_rate_tokens_does_not_hold_the_workers() {
    const WORKERS: u32 = 2;
    const CALC: Duration = Duration::from_millis(300);
    let h = harness(WORKERS, CALC, |c| {
        // A burst of 2, then one token per 10 s: the flooder's reads spend its burst.
        c.budget.per_minute = Some(8);
        c.budget.wait = Duration::from_millis(100);
    });
    let (flood_accepted, _) = Flood::start(&h, P1, 40, 4).finish(false);
    assert!(flood_accepted > 2, "the flooder queued work beyond its tokens: {flood_accepted}");
    assert!(h.app.engine.queued() > 0, "the flooder's work waits for its tokens");

    let (p2_took, all_took) = the_others_complete(&h);
    // The flooder's lane is parked: two ready lanes (k ≤ 1), and the workers are free.
    let limit = bound(1, WORKERS, CALC);
    eprintln!(
        "flooder out of tokens ({flood_accepted} queued): project 2 completed in {p2_took:?}, another key in \
         project 1 in {all_took:?} (bound {limit:?} + {SLACK:?})"
    );
    assert!(p2_took <= limit + SLACK, "project 2 waited {p2_took:?}");
    assert!(all_took <= limit + SLACK, "the other key waited {all_took:?}");
    assert!(h.app.engine.queued() > 0, "the flooder's work still waits for its tokens");
}
