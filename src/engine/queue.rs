//! The queue of background calculations: bounded, deduplicated per flight, drained by the
//! engine's workers ([`super::workers`]).
//!
//! No tenant can starve another. Work a client asked for waits in one lane per principal within
//! one lane per project; workers serve the projects round-robin, and within a project its
//! principals round-robin, so a job with k ready lanes ahead of it is taken after at most k other
//! jobs. A principal may hold at most `max_queued_per_principal` queued jobs, so a flood from one
//! key is refused (PostHog's `concurrency_limit_exceeded`) while the others are still accepted. A
//! lane whose principal has no rate token, or whose project has no free calculation slot, is
//! skipped until it has (parked), so a worker never waits for one caller's budget while others'
//! work could run.

use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::spec::CalcSpec;
use crate::budget::Budget;
use crate::cache::{CacheKey, Entry, Partition};
use crate::refresh::UpstreamRefresh;

/// How long client work waits for its budget once it is next in its lane: past it (or when its
/// key's next token is further off) it completes with `concurrency_limit_exceeded`.
const PARKED_WAIT: Duration = Duration::from_secs(60);
/// The same for refresh-ahead, which only uses budget nobody is waiting for: the next read of
/// the entry schedules it again.
const AHEAD_PARKED_WAIT: Duration = Duration::from_secs(1);
/// A job taken from its lane that loses its budget to someone else goes back to the front of its
/// lane; the time it loses it this often, it completes with `concurrency_limit_exceeded`.
const MAX_LOST_RACES: u32 = 3;
/// How long an idle worker sleeps when nothing is queued (a push wakes it at once).
const IDLE_WAKE: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Job {
    pub spec: Arc<CalcSpec>,
    /// The flight it runs under ([`super::Engine::flight_key`]): jobs are deduplicated by it.
    pub flight: CacheKey,
    pub refresh: UpstreamRefresh,
    /// The status a client polls; refresh-ahead has none.
    pub status_id: Option<String>,
    /// Set for refresh-ahead.
    pub ahead: Option<Ahead>,
    /// Statuses of later requests for the same flight that this job's work answers: they were
    /// handed out, so they complete with it.
    pub joined: Vec<String>,
    /// The `last_refresh` of the entry the request saw (`None`: nothing was cached). A result
    /// newer than it that lands while the job waits answers the job (`workers::answered_meanwhile`).
    pub seen: Option<time::OffsetDateTime>,
}

impl Job {
    /// Every status this job completes.
    pub fn statuses(&self) -> impl Iterator<Item = &String> {
        self.status_id.iter().chain(&self.joined)
    }
}

/// What a refresh-ahead job knows about the entry it refreshes.
#[derive(Debug)]
pub struct Ahead {
    /// The entry whose refresh-ahead claim this job holds (released if the job cannot run).
    pub claimed: Arc<Entry>,
    /// The `last_refresh` it replaces: anything newer makes the job moot.
    pub base: time::OffsetDateTime,
    /// The upstream cache key (0 if unknown).
    pub group: u128,
    /// Reads per minute of the variant since its result was calculated: the hottest go first.
    pub heat: u64,
}

/// A job in the queue, with what the queue knows of its wait.
#[derive(Debug)]
struct Queued {
    job: Job,
    /// Since when the job has been next in its lane without budget (its budget wait).
    parked_since: Option<Instant>,
    /// Races for budget lost after being taken from its lane.
    lost: u32,
}

impl Queued {
    fn new(job: Job) -> Self {
        Queued { job, parked_since: None, lost: 0 }
    }

    fn principal(&self) -> Partition {
        self.job.spec.key.partition
    }
}

/// What a worker takes from the queue.
#[derive(Debug)]
pub enum Next {
    /// A job whose budget is there now.
    Run(Taken),
    /// A job that waited its longest for budget: it completes without running.
    Expired(Job),
}

/// A job taken from its lane, for [`JobQueue::put_back`] if it loses its budget after all.
#[derive(Debug)]
pub struct Taken {
    pub job: Job,
    pub(super) lost: u32,
}

/// A refresh-ahead job in the heap, hottest first, then oldest first.
struct ByHeat {
    heat: u64,
    seq: u64,
    queued: Queued,
}

impl PartialEq for ByHeat {
    fn eq(&self, other: &Self) -> bool {
        (self.heat, self.seq) == (other.heat, other.seq)
    }
}
impl Eq for ByHeat {}
impl PartialOrd for ByHeat {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ByHeat {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.heat.cmp(&other.heat).then(other.seq.cmp(&self.seq))
    }
}

#[derive(Default)]
struct AheadLane {
    heap: BinaryHeap<ByHeat>,
    seq: u64,
}

/// One project's client work: a lane per principal, served in `order`.
#[derive(Default)]
struct ProjectLanes {
    order: VecDeque<Partition>,
    lanes: HashMap<Partition, VecDeque<Queued>>,
}

#[derive(Default)]
struct Lanes {
    /// Projects with client work, in serving order; a project served goes to the back.
    order: VecDeque<u64>,
    projects: HashMap<u64, ProjectLanes>,
    /// Client jobs queued per principal, across projects.
    per_principal: HashMap<Partition, usize>,
    client: usize,
    ahead: AheadLane,
    /// Flights with a job waiting in the queue: a second job for the same flight is not queued.
    queued: HashSet<CacheKey>,
}

impl Lanes {
    /// The queued client job for `flight`, if one is (its lane is the flight's principal's).
    fn client_job_mut(&mut self, project: u64, flight: &CacheKey) -> Option<&mut Job> {
        let lane = self.projects.get_mut(&project)?.lanes.get_mut(&flight.partition)?;
        lane.iter_mut().map(|q| &mut q.job).find(|j| j.flight == *flight)
    }

    /// Takes the refresh-ahead job for `flight` out of its lane, if one is queued.
    fn take_ahead(&mut self, flight: &CacheKey) -> Option<Job> {
        let mut jobs = std::mem::take(&mut self.ahead.heap).into_vec();
        let at = jobs.iter().position(|c| c.queued.job.flight == *flight);
        let taken = at.map(|at| jobs.swap_remove(at).queued.job);
        self.ahead.heap = jobs.into();
        if taken.is_some() {
            self.queued.remove(flight);
        }
        taken
    }

    /// Queues client work at the back of its lane (or the front, for a job going back).
    fn insert(&mut self, q: Queued, front: bool) {
        let (project, principal) = (q.job.spec.project, q.principal());
        self.queued.insert(q.job.flight);
        *self.per_principal.entry(principal).or_default() += 1;
        self.client += 1;
        let lanes = self.projects.entry(project).or_insert_with(|| {
            self.order.push_back(project);
            ProjectLanes::default()
        });
        let lane = lanes.lanes.entry(principal).or_insert_with(|| {
            lanes.order.push_back(principal);
            VecDeque::new()
        });
        if front {
            lane.push_front(q);
        } else {
            lane.push_back(q);
        }
    }

    /// Takes the head of the lane at `order[at]` of the project at `self.order[p]`; `served`
    /// sends both to the back of their rounds. Empty lanes and projects are removed.
    fn take_head(&mut self, p: usize, at: usize, served: bool) -> Queued {
        let project = self.order[p];
        let lanes = self.projects.get_mut(&project).expect("an ordered project has lanes");
        let principal = lanes.order[at];
        let lane = lanes.lanes.get_mut(&principal).expect("an ordered principal has a lane");
        let q = lane.pop_front().expect("lanes are never empty");
        if lane.is_empty() {
            lanes.lanes.remove(&principal);
            lanes.order.remove(at);
        } else if served {
            lanes.order.remove(at);
            lanes.order.push_back(principal);
        }
        if lanes.lanes.is_empty() {
            self.projects.remove(&project);
            self.order.remove(p);
        } else if served {
            self.order.remove(p);
            self.order.push_back(project);
        }
        self.client -= 1;
        match self.per_principal.get_mut(&principal) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                self.per_principal.remove(&principal);
            }
        }
        self.queued.remove(&q.job.flight);
        q
    }
}

/// Whether a parked job may wait on: `ready_in` is how long until its key has a token (`None`:
/// it has one, and waits for a slot). Either way it is woken again by `since + wait`.
fn may_wait(since: Instant, wait: Duration, now: Instant, ready_in: Option<Duration>) -> Option<Duration> {
    let left = (since + wait).checked_duration_since(now).filter(|d| !d.is_zero())?;
    match ready_in {
        Some(d) if d > left => None,
        Some(d) => Some(d),
        None => Some(left),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the background queue is full")]
pub struct QueueFull;

/// Work a client asked for, in fair lanes (see the module doc), and refresh-ahead (hottest
/// first). Workers take client work whenever some is ready, so refresh-ahead only uses capacity
/// nobody is waiting for, and when the budget cannot cover every hot entry the hottest are
/// refreshed. At most `capacity` jobs wait in each of the two, `max_per_principal` of them
/// client work of one principal.
pub struct JobQueue {
    lanes: Mutex<Lanes>,
    /// Woken by every push: the job may be ready for an idle worker.
    pushed: Notify,
    budget: Arc<Budget>,
    capacity: usize,
    max_per_principal: usize,
}

impl JobQueue {
    pub fn new(capacity: usize, max_per_principal: usize, budget: Arc<Budget>) -> Self {
        Self {
            lanes: Mutex::new(Lanes::default()),
            pushed: Notify::new(),
            budget,
            capacity,
            max_per_principal: max_per_principal.clamp(1, capacity.max(1)),
        }
    }

    /// Queues `job` unless one for the same flight is already waiting. Jobs with a status go in
    /// their principal's lane, refused when the queue or the principal's share of it is full;
    /// refresh-ahead goes in the ahead lane, where a full lane drops its coldest job for a hotter
    /// one (the dropped entry may be scheduled again by its next read).
    pub fn push(&self, mut job: Job) -> Result<(), QueueFull> {
        let mut lanes = self.lanes.lock();
        if lanes.queued.contains(&job.flight) {
            if job.status_id.is_none() {
                return Ok(()); // refresh-ahead for work already queued
            }
            // A client joins queued work: its status completes with that job's. Refresh-ahead
            // work a client joins becomes client work (its lane, its priority).
            let project = job.spec.project;
            if let Some(queued) = lanes.client_job_mut(project, &job.flight) {
                queued.joined.extend(job.statuses().cloned());
                queued.seen = queued.seen.max(job.seen);
                return Ok(());
            }
            self.admit(&lanes, &job)?;
            if let Some(ahead) = lanes.take_ahead(&job.flight) {
                if let Some(a) = &ahead.ahead {
                    a.claimed.unclaim_refresh_ahead();
                }
                job.joined.extend(ahead.statuses().cloned());
            }
        }
        let Some(ahead) = &job.ahead else {
            self.admit(&lanes, &job)?;
            lanes.insert(Queued::new(job), false);
            drop(lanes);
            self.pushed.notify_one();
            return Ok(());
        };
        let heat = ahead.heat;
        let lane = &mut lanes.ahead;
        if lane.heap.len() >= self.capacity {
            // The coldest waiting job: a linear scan, only when the lane is full.
            let coldest = lane.heap.iter().min().map(|c| (c.heat, c.seq));
            match coldest {
                Some((h, seq)) if h < heat => {
                    let mut jobs = std::mem::take(&mut lane.heap).into_vec();
                    let at = jobs.iter().position(|c| c.seq == seq).expect("the coldest job is queued");
                    let dropped = jobs.swap_remove(at);
                    lane.heap = jobs.into();
                    lanes.queued.remove(&dropped.queued.job.flight);
                    if let Some(a) = &dropped.queued.job.ahead {
                        a.claimed.unclaim_refresh_ahead();
                    }
                }
                _ => return Err(QueueFull),
            }
        }
        lanes.ahead.seq += 1;
        let seq = lanes.ahead.seq;
        lanes.queued.insert(job.flight);
        lanes.ahead.heap.push(ByHeat { heat, seq, queued: Queued::new(job) });
        drop(lanes);
        self.pushed.notify_one();
        Ok(())
    }

    /// Whether client work `job` fits: the queue and its principal's share both have room.
    fn admit(&self, lanes: &Lanes, job: &Job) -> Result<(), QueueFull> {
        let mine = lanes.per_principal.get(&job.spec.key.partition).copied().unwrap_or(0);
        if lanes.client >= self.capacity || mine >= self.max_per_principal {
            return Err(QueueFull);
        }
        Ok(())
    }

    /// Puts back a job that lost its budget after it was taken (a blocking client took the slot
    /// first), at the front of its lane: it waits for its lane's next turn, not behind everything
    /// queued since. Hands it back when it cannot wait again (its lane's share is taken, or it
    /// lost too often): the caller completes it.
    pub fn put_back(&self, taken: Taken) -> Option<Job> {
        let Taken { job, lost } = taken;
        if job.ahead.is_some() || lost + 1 >= MAX_LOST_RACES {
            return Some(job);
        }
        let mut lanes = self.lanes.lock();
        if lanes.queued.contains(&job.flight) {
            // Queued again meanwhile: that job runs it, and completes this one's statuses too.
            let project = job.spec.project;
            if let Some(queued) = lanes.client_job_mut(project, &job.flight) {
                queued.joined.extend(job.statuses().cloned());
                queued.seen = queued.seen.max(job.seen);
                return None;
            }
            return Some(job);
        }
        if self.admit(&lanes, &job).is_err() {
            return Some(job);
        }
        lanes.insert(Queued { job, parked_since: None, lost: lost + 1 }, true);
        drop(lanes);
        self.pushed.notify_one();
        None
    }

    /// The next job whose budget is there, waiting until there is one (or one waited too long).
    pub async fn pop(&self) -> Next {
        loop {
            let pushed = self.pushed.notified();
            let freed = self.budget.slot_freed().notified();
            tokio::pin!(pushed, freed);
            pushed.as_mut().enable();
            freed.as_mut().enable();
            let wake = match self.take(Instant::now()) {
                Ok(next) => return next,
                Err(wake) => wake.unwrap_or(IDLE_WAKE),
            };
            tokio::select! {
                _ = pushed => {}
                _ = freed => {}
                _ = tokio::time::sleep(wake) => {}
            }
        }
    }

    /// Looks through the lanes once: the first job in round-robin order whose budget is granted
    /// ([`Budget::try_grant`]), else the hottest such refresh-ahead job. `Err` says when to look
    /// again (a key's next token, a parked job's longest wait); a freed slot or a push wakes the
    /// workers sooner.
    fn take(&self, now: Instant) -> Result<Next, Option<Duration>> {
        let mut guard = self.lanes.lock();
        let lanes = &mut *guard;
        let mut wake: Option<Duration> = None;
        let mut sooner = |d: Duration| wake = Some(wake.map_or(d, |w| w.min(d)));
        for p in 0..lanes.order.len() {
            let project = lanes.order[p];
            let Some(project_lanes) = lanes.projects.get_mut(&project) else { continue };
            for at in 0..project_lanes.order.len() {
                let principal = project_lanes.order[at];
                let Some(head) = project_lanes.lanes.get_mut(&principal).and_then(|l| l.front_mut()) else { continue };
                let spec = &head.job.spec;
                let ready_in = match self.budget.try_grant(spec.key, project, &spec.principal) {
                    Ok(()) => {
                        let q = lanes.take_head(p, at, true);
                        return Ok(Next::Run(Taken { job: q.job, lost: q.lost }));
                    }
                    Err(ready_in) => ready_in,
                };
                let since = *head.parked_since.get_or_insert(now);
                match may_wait(since, PARKED_WAIT, now, ready_in) {
                    Some(d) => sooner(d),
                    None => return Ok(Next::Expired(lanes.take_head(p, at, false).job)),
                }
            }
        }
        // Refresh-ahead, hottest first: the ones without budget are set aside and put back.
        let mut aside = Vec::new();
        let mut found = None;
        while let Some(mut next) = lanes.ahead.heap.pop() {
            let spec = &next.queued.job.spec;
            let ready_in = match self.budget.try_grant(spec.key, spec.project, &spec.principal) {
                Ok(()) => {
                    found = Some(Next::Run(Taken { job: next.queued.job, lost: 0 }));
                    break;
                }
                Err(ready_in) => ready_in,
            };
            let since = *next.queued.parked_since.get_or_insert(now);
            match may_wait(since, AHEAD_PARKED_WAIT, now, ready_in) {
                Some(d) => sooner(d),
                None => {
                    found = Some(Next::Expired(next.queued.job));
                    break;
                }
            }
            aside.push(next);
        }
        lanes.ahead.heap.extend(aside);
        match found {
            Some(next) => {
                let (Next::Run(Taken { job, .. }) | Next::Expired(job)) = &next;
                lanes.queued.remove(&job.flight);
                Ok(next)
            }
            None => Err(wake),
        }
    }

    /// Jobs waiting.
    pub fn len(&self) -> usize {
        let lanes = self.lanes.lock();
        lanes.client + lanes.ahead.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Principal;
    use crate::budget::Priority;
    use crate::cache::PartitionKeyer;
    use crate::config::BudgetSettings;
    use crate::query::QueryParams;
    use bytes::Bytes;

    fn budget(per_minute: Option<u32>, project_concurrency: usize) -> Arc<Budget> {
        Budget::new(
            BudgetSettings {
                project_concurrency,
                per_minute,
                per_hour: None,
                wait: Duration::from_secs(1),
                forced_reserve_percent: 25,
                shared: false,
                slot_lease: Duration::from_secs(10),
                assumed_replicas: 1,
            },
            None,
        )
        .unwrap()
    }

    /// A queue whose budget never stops anything.
    fn queue(capacity: usize, max_per_principal: usize) -> JobQueue {
        JobQueue::new(capacity, max_per_principal, budget(None, 100))
    }

    /// One keyer for every test: without a secret each keyer draws its own.
    static KEYER: std::sync::LazyLock<PartitionKeyer> = std::sync::LazyLock::new(|| PartitionKeyer::new(None));

    fn principal(key: &str) -> Principal {
        Principal::api_key(&KEYER, key)
    }

    fn spec(project: u64, principal: Principal, insight: u64) -> Arc<CalcSpec> {
        let key = CacheKey::new(principal.partition(), project, insight, &QueryParams::default());
        Arc::new(CalcSpec {
            key,
            project,
            insight,
            path: format!("/api/environments/{project}/insights/{insight}/"),
            query: QueryParams::default(),
            principal,
        })
    }

    /// Work `key` asked for in `project`, for `insight` (which names it in the assertions).
    fn client_job(project: u64, key: &str, insight: u64) -> Job {
        let spec = spec(project, principal(key), insight);
        let flight = spec.key;
        let status_id = Some(format!("s{insight}"));
        Job { spec, flight, refresh: UpstreamRefresh::Blocking, status_id, ahead: None, joined: Vec::new(), seen: None }
    }

    fn ahead_job(insight: u64, heat: u64) -> (Job, Arc<Entry>) {
        let spec = spec(1, principal("k"), insight);
        let key = spec.key;
        let body = Bytes::from(format!(r#"{{"id":{insight},"result":[1],"last_refresh":"2026-01-01T00:00:00Z"}}"#));
        let entry = Arc::new(Entry::from_upstream(&body, insight, 1).unwrap());
        assert!(entry.claim_refresh_ahead());
        let ahead = Ahead { claimed: entry.clone(), base: entry.last_refresh(), group: 0, heat };
        let job = Job {
            spec,
            flight: key,
            refresh: UpstreamRefresh::ForceBlocking,
            status_id: None,
            ahead: Some(ahead),
            joined: Vec::new(),
            seen: Some(entry.last_refresh()),
        };
        (job, entry)
    }

    /// The insight of the next job to run, or a panic when none is ready within a second. The job
    /// is done at once: its grant goes back, as a worker's does.
    async fn next_run(q: &JobQueue) -> u64 {
        match tokio::time::timeout(Duration::from_secs(1), q.pop()).await.expect("a job is ready") {
            Next::Run(t) => {
                q.budget.release_grant(&t.job.spec.key);
                t.job.spec.insight
            }
            Next::Expired(job) => panic!("job {} expired", job.spec.insight),
        }
    }

    /// Whether `pop` finds nothing ready for a while.
    async fn nothing_ready(q: &JobQueue) -> bool {
        tokio::time::timeout(Duration::from_millis(100), q.pop()).await.is_err()
    }

    #[tokio::test]
    async fn refresh_ahead_goes_hottest_first_and_a_full_lane_drops_the_coldest() {
        let q = queue(3, 3);
        let mut entries = Vec::new();
        for (insight, heat) in [(1, 5), (2, 50), (3, 1)] {
            let (job, e) = ahead_job(insight, heat);
            q.push(job).unwrap();
            entries.push(e);
        }
        let (again, _) = ahead_job(2, 99);
        q.push(again).unwrap(); // the same flight is queued once
        assert_eq!(q.len(), 3);
        let (colder, _) = ahead_job(4, 0);
        assert!(q.push(colder).is_err(), "full, and colder than everything queued");
        let (hotter, _) = ahead_job(5, 20);
        q.push(hotter).unwrap();
        assert!(entries[2].claim_refresh_ahead(), "the dropped job released its claim");
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(next_run(&q).await);
        }
        assert_eq!(order, vec![2, 5, 1]);
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn every_status_handed_out_rides_with_the_job_that_does_the_work() {
        let q = queue(10, 10);
        // A second client for queued work: one job, both statuses.
        q.push(client_job(1, "k", 7)).unwrap();
        let mut second = client_job(1, "k", 7);
        second.status_id = Some("s7-again".into());
        q.push(second).unwrap();
        assert_eq!(q.len(), 1);
        // A client for queued refresh-ahead work: it becomes client work with the client's status.
        let (ahead, entry) = ahead_job(8, 5);
        q.push(ahead).unwrap();
        let mut client = client_job(1, "k", 8);
        client.status_id = Some("s8".into());
        q.push(client).unwrap();
        assert_eq!(q.len(), 2);
        assert!(entry.claim_refresh_ahead(), "the refresh-ahead claim was released");
        let mut statuses = Vec::new();
        for _ in 0..2 {
            match tokio::time::timeout(Duration::from_secs(1), q.pop()).await.expect("a job is ready") {
                Next::Run(t) => {
                    q.budget.release_grant(&t.job.spec.key);
                    assert!(t.job.ahead.is_none());
                    statuses.extend(t.job.statuses().cloned());
                }
                Next::Expired(job) => panic!("job {} expired", job.spec.insight),
            }
        }
        statuses.sort();
        assert_eq!(statuses, ["s7", "s7-again", "s8"]);
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn a_job_that_lost_its_budget_hands_its_statuses_to_the_duplicate_queued_meanwhile() {
        let q = queue(10, 10);
        q.push(client_job(1, "k", 7)).unwrap();
        let Next::Run(taken) = q.pop().await else { panic!("expired") };
        q.budget.release_grant(&taken.job.spec.key);
        // While it ran, another request for the same flight was queued.
        let mut again = client_job(1, "k", 7);
        again.status_id = Some("s7-again".into());
        q.push(again).unwrap();
        assert!(q.put_back(taken).is_none(), "the duplicate does the work");
        assert_eq!(q.len(), 1);
        let Next::Run(t) = q.pop().await else { panic!("expired") };
        let mut statuses: Vec<String> = t.job.statuses().cloned().collect();
        statuses.sort();
        assert_eq!(statuses, ["s7", "s7-again"], "both statuses complete with the one job");
    }

    #[tokio::test]
    async fn client_work_is_served_round_robin_by_project_then_by_principal() {
        let q = queue(100, 100);
        // Project 1: key a queues 11, 12, 13, then key b queues 14. Project 2: key c queues 21, 22.
        for (project, key, insight) in
            [(1, "a", 11), (1, "a", 12), (1, "a", 13), (1, "b", 14), (2, "c", 21), (2, "c", 22)]
        {
            q.push(client_job(project, key, insight)).unwrap();
        }
        q.push(client_job(1, "a", 11)).unwrap(); // the same flight is queued once
        assert_eq!(q.len(), 6);
        let mut order = Vec::new();
        for _ in 0..6 {
            order.push(next_run(&q).await);
        }
        assert_eq!(order, vec![11, 21, 14, 22, 12, 13], "projects alternate; in project 1, a and b do");
        assert!(q.is_empty());
        let lanes = q.lanes.lock();
        assert!(lanes.projects.is_empty() && lanes.order.is_empty() && lanes.per_principal.is_empty());
        assert!(lanes.queued.is_empty(), "no lane or key outlives its jobs");
    }

    #[tokio::test]
    async fn a_principal_over_its_share_is_refused_while_others_are_accepted() {
        let q = queue(6, 3);
        for insight in 1..=3 {
            q.push(client_job(1, "flood", insight)).unwrap();
        }
        assert_eq!(q.push(client_job(1, "flood", 4)), Err(QueueFull));
        assert_eq!(q.push(client_job(2, "flood", 5)), Err(QueueFull), "the share counts across projects");
        q.push(client_job(1, "other", 6)).unwrap();
        q.push(client_job(2, "third", 7)).unwrap();
        q.push(client_job(2, "third", 8)).unwrap();
        assert_eq!(q.push(client_job(2, "fourth", 9)), Err(QueueFull), "the whole queue is bounded too");
        assert_eq!(q.len(), 6);
        // A job taken frees its principal's share.
        assert_eq!(next_run(&q).await, 1);
        q.push(client_job(1, "flood", 4)).unwrap();
    }

    #[tokio::test]
    async fn lanes_without_a_token_or_a_slot_are_skipped_while_others_run() {
        // 8 per minute: a burst of 2, then one token every 10 s. One slot per project.
        let b = budget(Some(8), 1);
        let q = JobQueue::new(100, 100, b.clone());
        let spent = principal("spent");
        while b.rate_token(&spent, Duration::ZERO, false).await.is_ok() {}
        let held = b.slot(2, Priority::Blocking, Duration::ZERO).await.unwrap();
        q.push(client_job(1, "spent", 11)).unwrap(); // no token
        q.push(client_job(2, "c", 21)).unwrap(); // no slot in project 2
        q.push(client_job(1, "b", 12)).unwrap();
        q.push(client_job(3, "d", 31)).unwrap();
        let (ahead, _) = ahead_job(13, 1);
        q.push(ahead).unwrap();
        assert_eq!(next_run(&q).await, 12);
        assert_eq!(next_run(&q).await, 31);
        assert_eq!(next_run(&q).await, 13, "refresh-ahead runs while client work is parked");
        assert!(nothing_ready(&q).await, "parked lanes stay parked");
        drop(held);
        assert_eq!(next_run(&q).await, 21, "a freed slot wakes the project's lane");
        assert!(nothing_ready(&q).await);
        assert_eq!(q.len(), 1, "the key without tokens still waits for one");
    }

    #[tokio::test]
    async fn a_free_slot_goes_to_one_worker_at_a_time() {
        let b = budget(None, 1);
        let q = JobQueue::new(100, 100, b.clone());
        q.push(client_job(1, "a", 11)).unwrap();
        q.push(client_job(1, "b", 12)).unwrap();
        let Next::Run(first) = q.pop().await else { panic!("expired") };
        assert_eq!(first.job.spec.insight, 11);
        assert!(nothing_ready(&q).await, "the project's only slot is promised to the first job");
        // The first job calculates: it takes its slot, and the second waits for that slot.
        assert!(b.claim_grant(&first.job.spec.key));
        let slot = b.slot(1, Priority::Async, Duration::ZERO).await.unwrap();
        assert!(nothing_ready(&q).await);
        drop(slot);
        assert_eq!(next_run(&q).await, 12);
    }

    #[tokio::test]
    async fn work_whose_token_is_further_off_than_its_wait_completes_instead() {
        // One call per minute: a bucket of one that never refills within the wait.
        let b = budget(Some(1), 1);
        let q = JobQueue::new(100, 100, b.clone());
        let spent = principal("spent");
        b.rate_token(&spent, Duration::ZERO, false).await.unwrap();
        q.push(client_job(1, "spent", 11)).unwrap();
        q.push(client_job(1, "other", 12)).unwrap();
        match tokio::time::timeout(Duration::from_secs(1), q.pop()).await.unwrap() {
            Next::Expired(job) => assert_eq!(job.spec.insight, 11),
            Next::Run(t) => panic!("job {} ran first", t.job.spec.insight),
        }
        assert_eq!(next_run(&q).await, 12);
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn a_job_that_lost_its_budget_goes_back_to_the_front_of_its_lane() {
        let q = queue(100, 100);
        for insight in [11, 12] {
            q.push(client_job(1, "a", insight)).unwrap();
        }
        let Next::Run(taken) = q.pop().await else { panic!("expired") };
        assert_eq!(taken.job.spec.insight, 11);
        assert!(q.put_back(taken).is_none());
        let mut lost = 0;
        loop {
            let Next::Run(taken) = q.pop().await else { panic!("expired") };
            assert_eq!(taken.job.spec.insight, 11, "ahead of the lane's later work");
            lost += 1;
            if let Some(job) = q.put_back(taken) {
                assert_eq!(job.spec.insight, 11);
                break;
            }
            assert!(lost < 10, "a job goes back a bounded number of times");
        }
        assert_eq!(lost + 1, MAX_LOST_RACES as usize);
        assert_eq!(next_run(&q).await, 12);
    }
}
