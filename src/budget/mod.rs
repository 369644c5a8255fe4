//! The calculation budget: what the proxy itself may ask of the upstream, so it never trips
//! PostHog's limits (docs/refresh-semantics.md §6, §7): at most N concurrent calculations per project, and
//! per personal API key a rate that stays inside 240/min and 1200/hour.
//!
//! Calculation slots are handed out by priority: a client waiting on a blocking answer, then async
//! work a client asked for, then refresh-ahead. Background workers do not wait in line: they take a
//! job only with a grant ([`Budget::try_grant`]: the key's token taken, a slot of the project
//! promised) and serve other work while there is none. Promises count only against other
//! background work: a blocking client still goes first.
//!
//! A forced recalculation (`force_blocking`) never takes the last `forced_reserve` share of a key's
//! rate. The client already has an answer it could be given, whereas misses, stale entries and
//! refresh-ahead keep every reader's tiles fresh: without the reserve, a steady 2 % of forced reads
//! spent the whole hourly rate and refresh-ahead never ran.
//!
//! Where the budget lives: in this replica's memory (`local`), or with `[budget] shared` in Redis
//! for the whole cluster (`shared`), with this replica's share in memory while Redis is down.
//! Locally a released slot goes straight to the next waiter; shared, the waiters of this replica
//! ask Redis in priority order (only the highest priority waiting here asks).

mod local;
mod shared;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};

use crate::auth::Principal;
use crate::cache::{CacheKey, Partition};
use crate::config::{BudgetSettings, L2Settings};
pub use crate::refresh::Priority;
use local::Rate;
use shared::{Claim, Shared};
pub use shared::{SharedError, HEARTBEAT};

/// How often a waiter for a shared slot asks Redis again (slots freed on other replicas wake
/// nobody here).
const SLOT_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the upstream budget is spent")]
pub struct Exhausted;

#[derive(Default)]
struct Slots {
    running: usize,
    /// Slots promised to background jobs a worker took ([`Budget::try_grant`]) and not yet taken.
    promised: usize,
    waiting: [VecDeque<oneshot::Sender<()>>; 3],
    /// Shared budget: this replica's callers waiting for a slot, by priority, in order of arrival
    /// (their tickets); only the first of the highest priority asks Redis.
    asking: [VecDeque<u64>; 3],
    /// Shared budget: the cluster had no slot for background work when last asked, until then.
    full_until: Option<Instant>,
}

impl Slots {
    fn is_unused(&self) -> bool {
        self.running == 0 && self.promised == 0 && self.asking.iter().all(VecDeque::is_empty)
    }
}

/// What a background job was granted when a worker took it: a slot of its project promised, and
/// its key's token already taken (returned if the job never calculates). Shared, the token is
/// taken when the job calculates.
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
    shared: Option<Arc<Shared>>,
    /// Shared budget: numbers the callers waiting for a slot.
    tickets: std::sync::atomic::AtomicU64,
}

/// A held calculation slot; dropping it hands the slot on.
pub struct Slot {
    budget: Arc<Budget>,
    project: u64,
    /// Shared budget: the slot's holder id in Redis and the task renewing its lease.
    lease: Option<(String, tokio::task::JoinHandle<()>)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (budget, project) = (self.budget.clone(), self.project);
        match (self.lease.take(), &budget.shared, tokio::runtime::Handle::try_current()) {
            (Some((holder, renewer)), Some(shared), Ok(rt)) => {
                renewer.abort();
                // Counted free here once Redis has it back, so this replica's next waiter does
                // not ask before the cluster can say yes. (A runtime shutting down never runs
                // this: the slot then comes back with its lease, as after a crash.)
                let shared = shared.clone();
                rt.spawn(async move {
                    shared.release(project, &holder).await;
                    budget.release_shared(project);
                });
            }
            (Some((_, renewer)), _, _) => {
                renewer.abort();
                budget.release_shared(project);
            }
            (None, _, _) => budget.release(project),
        }
    }
}

impl Budget {
    /// The budget; with `settings.shared`, the cluster's in the `[l2]` Redis.
    pub fn new(settings: BudgetSettings, l2: Option<&L2Settings>) -> Result<Arc<Self>, SharedError> {
        let shared = match l2 {
            Some(l2) if settings.shared => Some(Shared::new(settings, l2)?),
            _ => None,
        };
        let rates =
            moka::sync::Cache::builder().max_capacity(MAX_RATE_STATES).time_to_idle(Duration::from_secs(3600)).build();
        Ok(Arc::new(Self {
            settings,
            projects: Mutex::new(HashMap::new()),
            rates,
            freed: Notify::new(),
            grants: Mutex::new(HashMap::new()),
            counts: BudgetCounts::default(),
            shared,
            tickets: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    pub fn settings(&self) -> &BudgetSettings {
        &self.settings
    }

    pub fn counts(&self) -> &BudgetCounts {
        &self.counts
    }

    /// Whether the budget is the cluster's right now: `None` when it is not shared, `Some(false)`
    /// while Redis is unreachable (this replica's share applies).
    pub fn shared_up(&self) -> Option<bool> {
        self.shared.as_ref().map(|s| s.is_up())
    }

    /// With the shared budget: the live replicas last seen.
    pub fn replicas(&self) -> Option<u32> {
        self.shared.as_ref().map(|s| s.replicas())
    }

    /// With the shared budget: keeps this replica in the membership (which sets every replica's
    /// share while Redis is down) until the future is dropped. Without it, returns at once.
    pub async fn membership(&self) {
        if let Some(shared) = &self.shared {
            shared.heartbeat().await;
        }
    }

    /// A calculation slot for `project`, waiting at most `wait` behind higher-priority work.
    pub async fn slot(self: &Arc<Self>, project: u64, priority: Priority, wait: Duration) -> Result<Slot, Exhausted> {
        if let Some(shared) = &self.shared {
            return self.shared_slot(shared, project, priority, wait).await;
        }
        let mut rx = {
            let mut projects = self.projects.lock();
            let slots = projects.entry(project).or_default();
            if slots.running < self.settings.project_concurrency {
                slots.running += 1;
                return Ok(Slot { budget: self.clone(), project, lease: None });
            }
            let (tx, rx) = oneshot::channel();
            slots.waiting[priority as usize].push_back(tx);
            rx
        };
        count(&self.counts.slot_waits);
        let slot = || Slot { budget: self.clone(), project, lease: None };
        let got = tokio::select! {
            r = &mut rx => r.map(|()| slot()).map_err(|_| Exhausted),
            _ = tokio::time::sleep(wait) => {
                // A slot may have been handed over just as the wait ended: keep it if so.
                rx.close();
                rx.try_recv().map(|()| slot()).map_err(|_| Exhausted)
            }
        };
        if got.is_err() {
            count(&self.counts.slot_exhausted);
        }
        got
    }

    /// A slot of the cluster's: this replica's first waiter of the highest priority asks Redis,
    /// again whenever a slot is freed here and every [`SLOT_POLL`] (so one replica asks at most
    /// once per poll per project however many wait). While Redis is down, one of this replica's
    /// share.
    async fn shared_slot(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        project: u64,
        priority: Priority,
        wait: Duration,
    ) -> Result<Slot, Exhausted> {
        let deadline = tokio::time::Instant::now() + wait;
        let p = priority as usize;
        let ticket = self.tickets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.projects.lock().entry(project).or_default().asking[p].push_back(ticket);
        let _asking = scopeguard(|| self.stop_asking(project, p, ticket));
        let holder = shared.holder();
        let mut waited = false;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let turn =
                self.projects.lock().get(&project).is_some_and(|s| {
                    s.asking[..p].iter().all(VecDeque::is_empty) && s.asking[p].front() == Some(&ticket)
                });
            if turn {
                let claim = shared.claim(project, priority, &holder).await;
                let mut projects = self.projects.lock();
                let slots = projects.entry(project).or_default();
                let taken = match claim {
                    Claim::Acquired => true,
                    Claim::Full => {
                        if priority != Priority::Blocking {
                            slots.full_until = Some(Instant::now() + SLOT_POLL);
                        }
                        false
                    }
                    Claim::Down => slots.running < shared.local_slots() && shared.slots_sure(),
                    Claim::Unsure => false,
                };
                if taken {
                    slots.running += 1;
                    drop(projects);
                    let renewer = shared.hold(project, holder.clone());
                    return Ok(Slot { budget: self.clone(), project, lease: Some((holder, renewer)) });
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                count(&self.counts.slot_exhausted);
                return Err(Exhausted);
            }
            if !std::mem::replace(&mut waited, true) {
                count(&self.counts.slot_waits);
            }
            tokio::select! {
                _ = freed => {}
                _ = tokio::time::sleep(SLOT_POLL.min(deadline - now)) => {}
            }
        }
    }

    fn stop_asking(&self, project: u64, p: usize, ticket: u64) {
        let mut projects = self.projects.lock();
        if let Some(slots) = projects.get_mut(&project) {
            slots.asking[p].retain(|&t| t != ticket);
            if slots.is_unused() {
                projects.remove(&project);
            }
        }
        drop(projects);
        // The next in line may ask now.
        self.freed.notify_waiters();
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
            if slots.is_unused() {
                projects.remove(&project);
            }
        }
        self.freed.notify_waiters();
    }

    /// A shared slot ended: its waiters here ask the cluster again.
    fn release_shared(&self, project: u64) {
        {
            let mut projects = self.projects.lock();
            let Some(slots) = projects.get_mut(&project) else { return };
            slots.running = slots.running.saturating_sub(1);
            slots.full_until = None;
            if slots.is_unused() {
                projects.remove(&project);
            }
        }
        self.freed.notify_waiters();
    }

    /// Calculations running for `project` on this replica (for tests and metrics).
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
    /// ignore promises, so they keep their priority. `Err(Some(d))`: no token (or, shared, no
    /// slot in the cluster) for `d`; `Err(None)`: the project has no free slot here.
    ///
    /// Shared, nothing is asked of Redis here (the queue's lock is held): the grant goes by what
    /// Redis said last, and the job takes its token and slot from Redis when it calculates.
    pub fn try_grant(&self, key: CacheKey, project: u64, principal: &Principal) -> Result<(), Option<Duration>> {
        let mut projects = self.projects.lock();
        if let Some(slots) = projects.get(&project) {
            if slots.running + slots.promised >= self.settings.project_concurrency {
                return Err(None);
            }
            if let Some(d) = slots.full_until.and_then(|t| t.checked_duration_since(Instant::now())) {
                return Err(Some(d.max(Duration::from_millis(1))));
            }
        }
        let rate = match &self.shared {
            Some(shared) => {
                if let Some(d) = principal.rate_key().and_then(|k| shared.rate_hint(k)) {
                    return Err(Some(d));
                }
                None
            }
            None => self.rate_of(principal),
        };
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
    /// caller takes one with [`Budget::slot`], ahead of nobody). Whether its token was taken
    /// with it (shared, the caller takes it with [`Budget::rate_token`]).
    pub fn claim_grant(&self, key: &CacheKey) -> bool {
        let Some(grant) = self.take_grant(key) else { return false };
        self.unpromise(grant.project);
        self.shared.is_none()
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
            if slots.is_unused() {
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
        Some(self.rates.get_with(key, || Arc::new(Mutex::new(Rate::new(&windows, 1.0)))))
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
    /// Shared: one Redis call per attempt.
    pub async fn rate_token(&self, principal: &Principal, wait: Duration, forced: bool) -> Result<(), Exhausted> {
        let reserve = if forced { f64::from(self.settings.forced_reserve_percent) / 100.0 } else { 0.0 };
        let deadline = Instant::now() + wait;
        let mut waited = false;
        // What to do with an answer "a token in `d`" (or now): sleep within the wait, or give up.
        let mut step = |retry_in: Option<Duration>| match retry_in {
            None => Ok(None),
            Some(d) if Instant::now() + d <= deadline => {
                if !std::mem::replace(&mut waited, true) {
                    count(&self.counts.rate_waits);
                }
                Ok(Some(d))
            }
            Some(_) => {
                count(&self.counts.rate_exhausted);
                Err(Exhausted)
            }
        };
        if let Some(shared) = &self.shared {
            let Some(key) = principal.rate_key() else { return Ok(()) };
            let windows = self.windows();
            if windows.is_empty() {
                return Ok(());
            }
            while let Some(d) = step(shared.take(key, &windows, reserve).await)? {
                tokio::time::sleep(d).await;
            }
            return Ok(());
        }
        let Some(rate) = self.rate_of(principal) else { return Ok(()) };
        loop {
            let retry_in = rate.lock().take(Instant::now(), reserve);
            match step(retry_in)? {
                None => return Ok(()),
                Some(d) => tokio::time::sleep(d).await,
            }
        }
    }
}

/// Runs `f` when dropped (also when the future holding it is cancelled).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
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
            shared: false,
            slot_lease: Duration::from_secs(10),
            assumed_replicas: 1,
        }
    }

    #[tokio::test]
    async fn slots_are_bounded_per_project_and_go_by_priority() {
        let b = Budget::new(settings(1), None).unwrap();
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
        let b = Budget::new(settings(1), None).unwrap();
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
        let b = Budget::new(BudgetSettings { per_minute: Some(600), ..settings(1) }, None).unwrap();
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

    #[tokio::test]
    async fn sessions_are_exempt_and_keys_are_limited() {
        let b = Budget::new(settings(1), None).unwrap();
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
        let b = Budget::new(BudgetSettings { per_minute: Some(40), ..settings(1) }, None).unwrap();
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
}
