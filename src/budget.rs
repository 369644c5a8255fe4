//! The calculation budget: what the proxy itself may ask of the upstream, so it never trips
//! PostHog's limits (docs/refresh-semantics.md §6, §7): at most N concurrent calculations per project, and
//! per personal API key a rate that stays inside 240/min and 1200/hour.
//!
//! Calculation slots are handed out by priority: a client waiting on a blocking answer, then async
//! work a client asked for, then refresh-ahead. A released slot goes straight to the next waiter.
//! Background workers do not wait in line: they take a job only with a grant ([`Budget::try_grant`]:
//! the key's token taken, a slot of the project promised) and serve other work while there is none.
//! Promises count only against other background work: a blocking client still goes first.
//!
//! A forced recalculation (`force_blocking`) never takes the last `forced_reserve` share of a key's
//! rate. The client already has an answer it could be given, whereas misses, stale entries and
//! refresh-ahead keep every reader's tiles fresh: without the reserve, a steady 2 % of forced reads
//! spent the whole hourly rate and refresh-ahead never ran.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};

use crate::auth::Principal;
use crate::cache::{CacheKey, Partition};
use crate::config::BudgetSettings;
pub use crate::refresh::Priority;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the upstream budget is spent")]
pub struct Exhausted;

#[derive(Default)]
struct Slots {
    running: usize,
    /// Slots promised to background jobs a worker took ([`Budget::try_grant`]) and not yet taken.
    promised: usize,
    waiting: [VecDeque<oneshot::Sender<()>>; 3],
}

/// What a background job was granted when a worker took it: a slot of its project promised, and
/// its key's token already taken (returned if the job never calculates).
struct Grant {
    project: u64,
    rate: Option<Arc<Mutex<Rate>>>,
}

/// How often callers met the budget since start, per limit: waited for it, or gave up waiting
/// (read by the admin listener at scrape time).
#[derive(Debug, Default)]
pub struct BudgetCounts {
    pub rate_waits: AtomicU64,
    pub rate_exhausted: AtomicU64,
    pub slot_waits: AtomicU64,
    pub slot_exhausted: AtomicU64,
}

fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Keys whose rate state is kept at most; a forgotten one starts with a full bucket.
const MAX_RATE_STATES: u64 = 100_000;

pub struct Budget {
    settings: BudgetSettings,
    projects: Mutex<HashMap<u64, Slots>>,
    rates: moka::sync::Cache<Partition, Arc<Mutex<Rate>>>,
    /// Woken when a project's slot becomes free (not when it is handed to a waiter).
    freed: Notify,
    /// Grants not yet claimed, by the cache key of the job they were made for.
    grants: Mutex<HashMap<CacheKey, Vec<Grant>>>,
    counts: BudgetCounts,
}

/// A held calculation slot; dropping it hands the slot on.
pub struct Slot {
    budget: Arc<Budget>,
    project: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.budget.release(self.project);
    }
}

impl Budget {
    pub fn new(settings: BudgetSettings) -> Arc<Self> {
        let rates =
            moka::sync::Cache::builder().max_capacity(MAX_RATE_STATES).time_to_idle(Duration::from_secs(3600)).build();
        Arc::new(Self {
            settings,
            projects: Mutex::new(HashMap::new()),
            rates,
            freed: Notify::new(),
            grants: Mutex::new(HashMap::new()),
            counts: BudgetCounts::default(),
        })
    }

    pub fn settings(&self) -> &BudgetSettings {
        &self.settings
    }

    pub fn counts(&self) -> &BudgetCounts {
        &self.counts
    }

    /// A calculation slot for `project`, waiting at most `wait` behind higher-priority work.
    pub async fn slot(self: &Arc<Self>, project: u64, priority: Priority, wait: Duration) -> Result<Slot, Exhausted> {
        let mut rx = {
            let mut projects = self.projects.lock();
            let slots = projects.entry(project).or_default();
            if slots.running < self.settings.project_concurrency {
                slots.running += 1;
                return Ok(Slot { budget: self.clone(), project });
            }
            let (tx, rx) = oneshot::channel();
            slots.waiting[priority as usize].push_back(tx);
            rx
        };
        count(&self.counts.slot_waits);
        let got = tokio::select! {
            r = &mut rx => r.map(|()| Slot { budget: self.clone(), project }).map_err(|_| Exhausted),
            _ = tokio::time::sleep(wait) => {
                // A slot may have been handed over just as the wait ended: keep it if so.
                rx.close();
                rx.try_recv().map(|()| Slot { budget: self.clone(), project }).map_err(|_| Exhausted)
            }
        };
        if got.is_err() {
            count(&self.counts.slot_exhausted);
        }
        got
    }

    fn release(&self, project: u64) {
        {
            let mut projects = self.projects.lock();
            let Some(slots) = projects.get_mut(&project) else { return };
            for queue in slots.waiting.iter_mut() {
                while let Some(tx) = queue.pop_front() {
                    if tx.send(()).is_ok() {
                        return; // handed over: still running
                    }
                }
            }
            slots.running = slots.running.saturating_sub(1);
            if slots.running == 0 && slots.promised == 0 {
                projects.remove(&project);
            }
        }
        self.freed.notify_waiters();
    }

    /// Calculations running for `project` (for tests and metrics).
    pub fn running(&self, project: u64) -> usize {
        self.projects.lock().get(&project).map_or(0, |s| s.running)
    }

    /// Notified whenever a project's slot becomes free for background work.
    pub fn slot_freed(&self) -> &Notify {
        &self.freed
    }

    /// For a background job a worker is about to take: takes a token of the principal's key and
    /// promises a slot of `project` to the job's calculation (its cache key `key`), if both are
    /// there now. A slot counts as free when it is neither running nor promised; blocking clients
    /// ignore promises, so they keep their priority. `Err(Some(d))`: the key has no token for
    /// `d`; `Err(None)`: the project has no free slot.
    pub fn try_grant(&self, key: CacheKey, project: u64, principal: &Principal) -> Result<(), Option<Duration>> {
        let mut projects = self.projects.lock();
        if projects.get(&project).is_some_and(|s| s.running + s.promised >= self.settings.project_concurrency) {
            return Err(None);
        }
        let rate = self.rate_of(principal);
        if let Some(rate) = &rate {
            if let Some(wait) = rate.lock().take(Instant::now(), 0.0) {
                return Err(Some(wait));
            }
        }
        projects.entry(project).or_default().promised += 1;
        self.grants.lock().entry(key).or_default().push(Grant { project, rate });
        Ok(())
    }

    /// Claims the grant made for a calculation of `key`: its slot is no longer promised (the
    /// caller takes one with [`Budget::slot`], ahead of nobody), and its token is spent. Whether
    /// there was one.
    pub fn claim_grant(&self, key: &CacheKey) -> bool {
        let Some(grant) = self.take_grant(key) else { return false };
        self.unpromise(grant.project);
        true
    }

    /// Returns an unclaimed grant for `key` (its job did not calculate: it joined another
    /// calculation, or found the work done): the token goes back to the key, the slot to others.
    pub fn release_grant(&self, key: &CacheKey) {
        let Some(grant) = self.take_grant(key) else { return };
        if let Some(rate) = &grant.rate {
            rate.lock().refund();
        }
        self.unpromise(grant.project);
        self.freed.notify_waiters();
    }

    fn take_grant(&self, key: &CacheKey) -> Option<Grant> {
        let mut grants = self.grants.lock();
        let list = grants.get_mut(key)?;
        let grant = list.pop();
        if list.is_empty() {
            grants.remove(key);
        }
        grant
    }

    fn unpromise(&self, project: u64) {
        let mut projects = self.projects.lock();
        if let Some(slots) = projects.get_mut(&project) {
            slots.promised = slots.promised.saturating_sub(1);
            if slots.running == 0 && slots.promised == 0 {
                projects.remove(&project);
            }
        }
    }

    /// The rate state of the principal's key, `None` when it is not limited (a session, or no
    /// limits configured).
    fn rate_of(&self, principal: &Principal) -> Option<Arc<Mutex<Rate>>> {
        let key = principal.rate_key()?;
        let windows = self.windows();
        if windows.is_empty() {
            return None;
        }
        Some(self.rates.get_with(key, || Arc::new(Mutex::new(Rate::new(&windows)))))
    }

    fn windows(&self) -> Vec<(u32, Duration)> {
        [
            self.settings.per_minute.map(|n| (n, Duration::from_secs(60))),
            self.settings.per_hour.map(|n| (n, Duration::from_secs(3600))),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// One upstream call's worth of rate for the principal's personal API key (the identity the
    /// upstream throttles, whatever other carriers the request had), waiting at most `wait`.
    /// Sessions are exempt, as upstream exempts them. A `forced` call leaves the reserve alone.
    pub async fn rate_token(&self, principal: &Principal, wait: Duration, forced: bool) -> Result<(), Exhausted> {
        let Some(rate) = self.rate_of(principal) else { return Ok(()) };
        let reserve = if forced { f64::from(self.settings.forced_reserve_percent) / 100.0 } else { 0.0 };
        let deadline = Instant::now() + wait;
        let mut waited = false;
        loop {
            let retry_in = rate.lock().take(Instant::now(), reserve);
            match retry_in {
                None => return Ok(()),
                Some(d) if Instant::now() + d <= deadline => {
                    if !std::mem::replace(&mut waited, true) {
                        count(&self.counts.rate_waits);
                    }
                    tokio::time::sleep(d).await
                }
                Some(_) => {
                    count(&self.counts.rate_exhausted);
                    return Err(Exhausted);
                }
            }
        }
    }
}

/// Token buckets sized so that no window of the limit's length ever sees more than the limit:
/// capacity L/4 plus a refill of 3L/4 per window is at most L in any window (a plain bucket of
/// capacity L refilled at L per window would allow 2L), so upstream's sliding-window throttle
/// never trips on the proxy's own calls.
struct Rate {
    buckets: Vec<Bucket>,
}

struct Bucket {
    tokens: f64,
    capacity: f64,
    per_second: f64,
    at: Instant,
}

impl Rate {
    fn new(windows: &[(u32, Duration)]) -> Self {
        let now = Instant::now();
        let buckets = windows
            .iter()
            .map(|&(limit, window)| {
                let limit = f64::from(limit);
                let capacity = (limit / 4.0).max(1.0);
                Bucket {
                    tokens: capacity,
                    capacity,
                    per_second: (limit - capacity).max(0.0) / window.as_secs_f64(),
                    at: now,
                }
            })
            .collect();
        Self { buckets }
    }

    /// Takes a token from every bucket while leaving `reserve` (a share of its capacity) in it, or
    /// says how long until that is possible.
    fn take(&mut self, now: Instant, reserve: f64) -> Option<Duration> {
        let mut wait = Duration::ZERO;
        for b in &mut self.buckets {
            b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * b.per_second).min(b.capacity);
            b.at = now;
            let need = 1.0 + reserve * b.capacity;
            if b.tokens < need {
                let secs = if b.per_second > 0.0 { (need - b.tokens) / b.per_second } else { f64::INFINITY };
                wait = wait.max(Duration::from_secs_f64(secs.min(86_400.0)));
            }
        }
        if wait > Duration::ZERO {
            return Some(wait);
        }
        for b in &mut self.buckets {
            b.tokens -= 1.0;
        }
        None
    }

    /// Gives back a token taken for a call that was not made.
    fn refund(&mut self) {
        for b in &mut self.buckets {
            b.tokens = (b.tokens + 1.0).min(b.capacity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::PartitionKeyer;

    fn settings(concurrency: usize) -> BudgetSettings {
        BudgetSettings {
            project_concurrency: concurrency,
            per_minute: Some(8),
            per_hour: None,
            wait: Duration::from_secs(1),
            forced_reserve_percent: 50,
        }
    }

    #[tokio::test]
    async fn slots_are_bounded_per_project_and_go_by_priority() {
        let b = Budget::new(settings(1));
        let held = b.slot(1, Priority::Blocking, Duration::from_secs(1)).await.unwrap();
        let _other_project = b.slot(2, Priority::Ahead, Duration::ZERO).await.unwrap();
        assert!(b.slot(1, Priority::Blocking, Duration::from_millis(10)).await.is_err());
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for p in [Priority::Ahead, Priority::Async, Priority::Blocking] {
            let (b, order) = (b.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let s = b.slot(1, p, Duration::from_secs(5)).await.unwrap();
                order.lock().push(p);
                drop(s);
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock(), vec![Priority::Blocking, Priority::Async, Priority::Ahead]);
        assert_eq!(b.running(1), 0);
    }

    #[tokio::test]
    async fn grants_take_a_token_and_promise_a_slot_to_background_work_only() {
        let b = Budget::new(settings(1));
        let keyer = PartitionKeyer::new(None);
        let (a, c) = (Principal::api_key(&keyer, "a"), Principal::api_key(&keyer, "c"));
        let key = |p: &Principal, insight| CacheKey::new(p.partition(), 1, insight, &Default::default());
        b.try_grant(key(&a, 1), 1, &a).unwrap();
        assert_eq!(b.try_grant(key(&c, 2), 1, &c), Err(None), "the only slot is promised");
        // A blocking client goes first all the same.
        let blocking = b.slot(1, Priority::Blocking, Duration::ZERO).await.unwrap();
        drop(blocking);
        // Unclaimed, the grant gives back its token and its slot.
        b.release_grant(&key(&a, 1));
        b.try_grant(key(&c, 2), 1, &c).unwrap();
        assert!(b.claim_grant(&key(&c, 2)), "claimed by its calculation");
        assert!(!b.claim_grant(&key(&c, 2)), "once");
        // The key `a` spent one of its 2 tokens and got it back: two more grants, then none.
        for insight in [3, 4] {
            b.try_grant(key(&a, insight), 2, &a).unwrap();
            b.claim_grant(&key(&a, insight));
        }
        assert!(matches!(b.try_grant(key(&a, 5), 3, &a), Err(Some(d)) if d > Duration::ZERO));
        assert_eq!(b.running(1), 0);
    }

    #[tokio::test]
    async fn waits_and_refusals_are_counted_per_limit() {
        let b = Budget::new(BudgetSettings { per_minute: Some(600), ..settings(1) });
        let a = Principal::api_key(&PartitionKeyer::new(None), "a");
        let counts = |c: &AtomicU64| c.load(Ordering::Relaxed);
        // A capacity of 150 tokens refilled at 7.5/s: the next token is ~133 ms away.
        while b.rate_token(&a, Duration::ZERO, false).await.is_ok() {}
        assert_eq!(counts(&b.counts().rate_exhausted), 1);
        assert_eq!(counts(&b.counts().rate_waits), 0);
        b.rate_token(&a, Duration::from_secs(5), false).await.unwrap();
        assert_eq!(counts(&b.counts().rate_waits), 1);
        let _held = b.slot(1, Priority::Blocking, Duration::ZERO).await.unwrap();
        assert!(b.slot(1, Priority::Blocking, Duration::from_millis(10)).await.is_err());
        assert_eq!((counts(&b.counts().slot_waits), counts(&b.counts().slot_exhausted)), (1, 1));
        assert_eq!(counts(&b.counts().rate_exhausted), 1, "a slot refusal is not a rate refusal");
    }

    #[test]
    fn no_window_exceeds_the_limit() {
        let start = Instant::now();
        let mut r = Rate::new(&[(8, Duration::from_secs(60))]);
        // Greedy caller: take whenever allowed, over 10 minutes of simulated time.
        let mut taken = Vec::new();
        let mut now = start;
        while now < start + Duration::from_secs(600) {
            match r.take(now, 0.0) {
                None => taken.push(now),
                Some(d) => now += d.max(Duration::from_millis(1)),
            }
        }
        for (i, t) in taken.iter().enumerate() {
            let in_window = taken[i..].iter().take_while(|u| **u < *t + Duration::from_secs(60)).count();
            assert!(in_window <= 8, "{in_window} calls in one minute");
        }
        assert!(taken.len() >= 8 * 10 * 3 / 4, "sustains at least 3/4 of the limit: {}", taken.len());
    }

    #[tokio::test]
    async fn sessions_are_exempt_and_keys_are_limited() {
        let b = Budget::new(settings(1));
        let keyer = PartitionKeyer::new(None);
        let mut h = http::HeaderMap::new();
        h.insert(http::header::COOKIE, "sessionid=s".parse().unwrap());
        let session = Principal::from_request(&keyer, &h, None, None).unwrap().unwrap();
        for _ in 0..50 {
            b.rate_token(&session, Duration::ZERO, true).await.unwrap();
        }
        let key = Principal::api_key(&keyer, "k");
        let mut ok = 0;
        while b.rate_token(&key, Duration::ZERO, false).await.is_ok() {
            ok += 1;
        }
        assert_eq!(ok, 2, "capacity is a quarter of the per-minute limit");
    }

    #[tokio::test]
    async fn forced_calls_leave_the_reserve_to_the_others() {
        // 40/min: capacity 10, refill 0.5/s; half of it reserved from forced calls.
        let b = Budget::new(BudgetSettings { per_minute: Some(40), ..settings(1) });
        let key = Principal::api_key(&PartitionKeyer::new(None), "k");
        let mut forced = 0;
        while b.rate_token(&key, Duration::ZERO, true).await.is_ok() {
            forced += 1;
        }
        assert_eq!(forced, 5, "forced calls stop at the reserve");
        let mut others = 0;
        while b.rate_token(&key, Duration::ZERO, false).await.is_ok() {
            others += 1;
        }
        assert_eq!(others, 5, "the reserve is there for everything else");
    }

    #[test]
    fn refills_go_to_the_reserve_before_forced_calls() {
        // A forced caller and a normal one both take whenever allowed: the normal one's demand
        // (one call every 4 s, below the 0.5/s refill) is always met; forced gets the rest.
        let start = Instant::now();
        let mut r = Rate::new(&[(40, Duration::from_secs(60))]);
        let (mut forced, mut others, mut refused) = (0, 0, 0);
        let mut now = start;
        let mut next_other = start;
        while now < start + Duration::from_secs(600) {
            if now >= next_other {
                match r.take(now, 0.0) {
                    None => others += 1,
                    Some(_) => refused += 1,
                }
                next_other += Duration::from_secs(4);
            }
            if r.take(now, 0.5).is_none() {
                forced += 1;
            }
            now += Duration::from_millis(100);
        }
        assert_eq!(refused, 0, "a normal call was refused while forced calls were served");
        assert_eq!(others, 150);
        assert!(forced >= 140, "forced calls get what is left: {forced}");
    }
}
