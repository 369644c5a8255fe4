//! The cluster's budget in the `[l2]` Redis: every replica takes from the same per-key token
//! buckets and the same per-project calculation slots, so an uneven load balancer cannot make
//! the busy replica starve while idle ones sit on unused budget, nor N replicas use N times
//! PostHog's limits.
//!
//! - **Rate**: one hash per API key holding a bucket per window; one script takes a token from all
//!   of them at once (one round trip per upstream call), on Redis' own clock (`TIME`), never a
//!   replica's.
//! - **Slots**: one sorted set per project, holder → lease expiry (Redis time). A held slot is
//!   renewed while it runs and removed when it ends; a crashed replica's slots expire with their
//!   lease. Lower priorities take a slot only while fewer than `N − 1` (async work) or `N − 2`
//!   (refresh-ahead) are held (never fewer than 1), so at least one slot is always left to
//!   blocking clients, wherever they are.
//! - **Membership**: each replica renews its id in a sorted set every second. While Redis is
//!   unreachable a replica falls back to its share of the budget, 1 / (live replicas last seen),
//!   in memory; what it spent then is charged to the shared buckets once Redis is back. Right
//!   after Redis goes down, and after it is back until every replica's running slots are in it
//!   again, no new slot is taken: what the other replicas run is unknown then.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::OnceCell;

use super::local::{shape, Rate};
use crate::cache::l2::{Connection, Target, TargetError};
use crate::cache::Partition;
use crate::config::{BudgetSettings, L2Settings};
use crate::refresh::Priority;

/// How often a replica renews its membership; it expires after [`MEMBER_TTL`].
pub const HEARTBEAT: Duration = Duration::from_secs(1);
const MEMBER_TTL: Duration = Duration::from_secs(5);
/// After a failed Redis call the budget stays local this long before it asks Redis again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Keys whose degraded-mode state is kept at most.
const MAX_KEYS: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("the shared budget's Redis URL is not usable: {0}")]
    Url(#[from] TargetError),
}

/// Takes `cost` (1, or 0 to only charge a debt) tokens from each bucket of a key (or none), on
/// Redis' clock. KEYS[1]: the key's hash. ARGV: cost, the reserve (share of capacity a forced call
/// leaves), tokens spent locally while Redis was down (charged now), then capacity and refill per
/// millisecond of each window. Returns 0 when taken, else the milliseconds until a token is there.
const TAKE: &str = r"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cost, reserve, debt = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local at = tonumber(redis.call('HGET', KEYS[1], 'at') or now)
local elapsed = math.max(0, now - at)
local n = (#ARGV - 3) / 2
local tokens, wait, ttl = {}, 0, 1000
for i = 1, n do
  local cap, rate = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  local held = redis.call('HGET', KEYS[1], 'b' .. i)
  local tk = math.min(cap, (held and tonumber(held) or cap) + elapsed * rate) - debt
  local need = cost + reserve * cap
  if cost > 0 and tk < need then
    wait = math.max(wait, rate > 0 and math.ceil((need - tk) / rate) or 86400000)
  end
  tokens[i] = tk
end
for i = 1, n do
  if wait == 0 then tokens[i] = tokens[i] - cost end
  local cap, rate = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  if rate > 0 then ttl = math.max(ttl, math.ceil((cap - tokens[i]) / rate) + 1000) end
  redis.call('HSET', KEYS[1], 'b' .. i, tostring(tokens[i]))
end
redis.call('HSET', KEYS[1], 'at', now)
redis.call('PEXPIRE', KEYS[1], ttl)
return wait
";

/// Claims a slot. KEYS[1]: the project's sorted set. ARGV: holder, how many may be held for this
/// priority, lease in ms. 1 when claimed.
const CLAIM: &str = r"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
return 1
";

/// Renews a held slot, or records it again (a slot taken while Redis was down, or whose lease
/// ran out during an outage), so the cluster counts every running calculation. Same ARGV as
/// CLAIM without the limit. Also the membership heartbeat (KEYS[1] the members, ARGV[1] the
/// replica), which returns the live members.
const RENEW: &str = r"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
return redis.call('ZRANGE', KEYS[1], 0, -1)
";

const RELEASE: &str = "return redis.call('ZREM', KEYS[1], ARGV[1])";

/// What asking for a shared slot came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Acquired,
    /// As many as this priority may hold are held across the cluster.
    Full,
    /// Redis cannot say: the replica's local share decides.
    Down,
    /// Redis just went down or came back: no slot until the others' running calculations are
    /// known to be done or recorded.
    Unsure,
}

/// A key's budget while Redis is down: this replica's share, and what it spent meanwhile.
struct Fallback {
    replicas: u32,
    windows: Vec<(u32, Duration)>,
    rate: Rate,
    spent: u32,
}

pub struct Shared {
    settings: BudgetSettings,
    prefix: String,
    timeout: Duration,
    /// The `[l2]` Redis: one node, a Cluster (each script touches one key, so it runs where that
    /// key lives) or a Sentinel's master.
    target: Target,
    conn: OnceCell<Connection>,
    replica: String,
    holders: AtomicU64,
    take: redis::Script,
    claim: redis::Script,
    renew: redis::Script,
    release: redis::Script,
    /// Until when Redis counts as down (the budget is local meanwhile).
    down_until: Mutex<Option<Instant>>,
    /// Live replicas and this one's rank among them, as last seen.
    members: Mutex<Option<(u32, u32)>>,
    fallback: moka::sync::Cache<Partition, Arc<Mutex<Fallback>>>,
    /// When a key's next token is due, as Redis last said: background work waits for it without
    /// asking Redis.
    rate_hints: moka::sync::Cache<Partition, Instant>,
    ever_up: AtomicBool,
    /// A call failed since the last one that succeeded.
    was_down: AtomicBool,
    /// Slots are this replica's share, not the cluster's, until then: after Redis went down (the
    /// other replicas' running calculations are unknown) and after it came back (until every
    /// replica's running calculations are recorded in it again by their renewals).
    slots_unsure_until: Mutex<Option<Instant>>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The Redis connection for the shared budget, from the `[l2]` settings: the one place that
/// knows how to reach Redis, so another deployment shape (cluster, sentinel) is one change here.
impl Shared {
    pub fn new(settings: BudgetSettings, l2: &L2Settings) -> Result<Arc<Shared>, SharedError> {
        Ok(Arc::new(Shared {
            settings,
            prefix: format!("{}budget:", l2.prefix),
            timeout: l2.timeout,
            target: Target::parse(&l2.url)?,
            conn: OnceCell::new(),
            replica: format!("{:016x}", rand::random::<u64>()),
            holders: AtomicU64::new(0),
            take: redis::Script::new(TAKE),
            claim: redis::Script::new(CLAIM),
            renew: redis::Script::new(RENEW),
            release: redis::Script::new(RELEASE),
            down_until: Mutex::new(None),
            members: Mutex::new(None),
            fallback: moka::sync::Cache::builder()
                .max_capacity(MAX_KEYS)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            rate_hints: moka::sync::Cache::builder()
                .max_capacity(MAX_KEYS)
                .time_to_live(Duration::from_secs(3600))
                .build(),
            ever_up: AtomicBool::new(false),
            was_down: AtomicBool::new(false),
            slots_unsure_until: Mutex::new(None),
        }))
    }

    /// Whether the budget is the cluster's right now (Redis answered lately).
    pub fn is_up(&self) -> bool {
        self.ever_up.load(Ordering::Relaxed) && self.down_until.lock().is_none()
    }

    /// Live replicas as last seen (the assumed count before Redis was ever reached).
    pub fn replicas(&self) -> u32 {
        self.members.lock().map_or(self.settings.assumed_replicas, |(n, _)| n)
    }

    /// Runs one script within the timeout; `None` (and the budget local for a while) on failure.
    async fn run<T: redis::FromRedisValue>(&self, invocation: redis::ScriptInvocation<'_>) -> Option<T> {
        {
            let mut down = self.down_until.lock();
            match *down {
                Some(until) if Instant::now() < until => return None,
                _ => *down = None,
            }
        }
        let attempt = async {
            let conn = self.conn.get_or_try_init(|| self.target.connect(self.timeout)).await?;
            invocation.invoke_async::<T>(&mut conn.clone()).await
        };
        match tokio::time::timeout(self.timeout * 2, attempt).await {
            Ok(Ok(v)) => {
                self.ever_up.store(true, Ordering::Relaxed);
                if self.was_down.swap(false, Ordering::Relaxed) {
                    self.unsure_for(self.settings.slot_lease / 3 + RETRY_AFTER + HEARTBEAT);
                }
                Some(v)
            }
            Ok(Err(e)) => self.failed(&e.to_string()),
            Err(_) => self.failed("timed out"),
        }
    }

    fn unsure_for(&self, d: Duration) {
        *self.slots_unsure_until.lock() = Some(Instant::now() + d);
    }

    /// Whether slots may be taken at all right now: not in the moments after Redis went down or
    /// came back, when what other replicas run is unknown.
    pub fn slots_sure(&self) -> bool {
        self.slots_unsure_until.lock().is_none_or(|t| Instant::now() >= t)
    }

    fn failed<T>(&self, why: &str) -> Option<T> {
        let mut down = self.down_until.lock();
        if down.is_none() {
            tracing::warn!(error = why, "shared budget: Redis unreachable, using this replica's share");
            // Calculations other replicas started before the outage still run: wait for them.
            self.unsure_for(self.settings.slot_lease / 3);
        }
        self.was_down.store(true, Ordering::Relaxed);
        *down = Some(Instant::now() + RETRY_AFTER);
        None
    }

    /// One token of `key`'s buckets for `windows`, leaving `reserve` of each: `None` when
    /// taken, else how long until one is there. From this replica's share while Redis is down.
    pub async fn take(&self, key: Partition, windows: &[(u32, Duration)], reserve: f64) -> Option<Duration> {
        let fallback = self.fallback_of(key, windows);
        let debt = std::mem::take(&mut fallback.lock().spent);
        let wait = match self.charge(key, windows, 1, reserve, debt).await {
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(ms)),
            None => {
                let mut f = fallback.lock();
                f.spent += debt;
                let wait = f.rate.take(Instant::now(), reserve);
                if wait.is_none() {
                    f.spent += 1;
                }
                return wait;
            }
        };
        match wait {
            Some(d) => self.rate_hints.insert(key, Instant::now() + d),
            None => self.rate_hints.invalidate(&key),
        }
        wait
    }

    /// The take script for `key`: `cost` tokens and the `debt` spent while Redis was down.
    async fn charge(
        &self,
        key: Partition,
        windows: &[(u32, Duration)],
        cost: u32,
        reserve: f64,
        debt: u32,
    ) -> Option<u64> {
        let mut script = self.take.key(format!("{}rate:{}", self.prefix, hex(&key.0)));
        script.arg(cost).arg(reserve).arg(debt);
        for &(limit, window) in windows {
            let (capacity, per_second) = shape(f64::from(limit), window);
            script.arg(capacity).arg(per_second / 1000.0);
        }
        self.run::<u64>(script).await
    }

    /// Charges what this replica spent on its share while Redis was down to the shared buckets,
    /// as soon as Redis is back (not at each key's next call, which may never come).
    async fn settle(&self) {
        let owed: Vec<_> = self
            .fallback
            .iter()
            .filter_map(|(key, f)| {
                let mut f = f.lock();
                (f.spent > 0).then(|| (*key, f.windows.clone(), std::mem::take(&mut f.spent)))
            })
            .collect();
        for (i, (key, windows, debt)) in owed.iter().enumerate() {
            if self.charge(*key, windows, 0, 0.0, *debt).await.is_none() {
                // Down again: what is left stays owed.
                for (key, _, debt) in &owed[i..] {
                    if let Some(f) = self.fallback.get(key) {
                        f.lock().spent += debt;
                    }
                }
                return;
            }
        }
    }

    /// How long until `key` has a token, as Redis last said (no call).
    pub fn rate_hint(&self, key: Partition) -> Option<Duration> {
        let due = self.rate_hints.get(&key)?;
        due.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
    }

    /// This replica's budget for `key` while Redis is down: 1 / the live replicas last seen.
    fn fallback_of(&self, key: Partition, windows: &[(u32, Duration)]) -> Arc<Mutex<Fallback>> {
        let replicas = self.replicas();
        let make = || Fallback {
            replicas,
            windows: windows.to_vec(),
            rate: Rate::new(windows, 1.0 / f64::from(replicas)),
            spent: 0,
        };
        let f = self.fallback.get_with(key, || Arc::new(Mutex::new(make())));
        {
            let mut g = f.lock();
            if g.replicas != replicas {
                let spent = g.spent;
                *g = Fallback { spent, ..make() };
            }
        }
        f
    }

    /// A new holder id for a slot of this replica.
    pub fn holder(&self) -> String {
        format!("{}:{}", self.replica, self.holders.fetch_add(1, Ordering::Relaxed))
    }

    /// How many slots of a project `priority` may bring the cluster to.
    pub fn limit(&self, priority: Priority) -> usize {
        let n = self.settings.project_concurrency;
        match priority {
            Priority::Blocking => n,
            Priority::Async => n.saturating_sub(1).max(1),
            Priority::Ahead => n.saturating_sub(2).max(1),
        }
    }

    pub async fn claim(&self, project: u64, priority: Priority, holder: &str) -> Claim {
        if !self.slots_sure() {
            return Claim::Unsure;
        }
        let mut script = self.claim.key(self.slots_key(project));
        script.arg(holder).arg(self.limit(priority)).arg(self.lease_ms());
        match self.run::<u8>(script).await {
            Some(1) => Claim::Acquired,
            Some(_) => Claim::Full,
            None => Claim::Down,
        }
    }

    /// Keeps `holder`'s slot alive until the returned task is aborted.
    pub fn hold(self: &Arc<Self>, project: u64, holder: String) -> tokio::task::JoinHandle<()> {
        let shared = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(shared.settings.slot_lease / 3).await;
                let mut script = shared.renew.key(shared.slots_key(project));
                script.arg(&holder).arg(shared.lease_ms());
                let _ = shared.run::<Vec<String>>(script).await;
            }
        })
    }

    /// Gives a slot back to the cluster.
    pub async fn release(&self, project: u64, holder: &str) {
        let mut script = self.release.key(self.slots_key(project));
        script.arg(holder);
        let _ = self.run::<u8>(script).await;
    }

    /// This replica's share of a project's slots while Redis is down: the cluster's slots split
    /// over the live replicas last seen, the remainder to the lowest ranks, so the shares add up
    /// to the cluster's limit (a replica may get none when there are more replicas than slots).
    pub fn local_slots(&self) -> usize {
        let n = self.settings.project_concurrency;
        let (live, rank) = self.members.lock().unwrap_or((self.settings.assumed_replicas, 0));
        let (live, rank) = (live.max(1) as usize, rank as usize);
        n / live + usize::from(rank < n % live)
    }

    /// Renews this replica's membership and learns how many replicas are live; until stopped.
    pub async fn heartbeat(&self) {
        loop {
            self.beat().await;
            tokio::time::sleep(HEARTBEAT).await;
        }
    }

    /// One membership renewal. Redis down: the last count stands.
    pub async fn beat(&self) {
        // A heartbeat always asks Redis: it is what notices Redis is back.
        *self.down_until.lock() = None;
        let mut script = self.renew.key(format!("{}members", self.prefix));
        script.arg(&self.replica).arg(MEMBER_TTL.as_millis() as u64);
        if let Some(mut members) = self.run::<Vec<String>>(script).await {
            members.sort();
            let rank = members.iter().position(|m| *m == self.replica).unwrap_or(0);
            *self.members.lock() = Some((members.len().max(1) as u32, rank as u32));
            self.settle().await;
        }
    }

    fn slots_key(&self, project: u64) -> String {
        format!("{}slots:{project}", self.prefix)
    }

    fn lease_ms(&self) -> u64 {
        self.settings.slot_lease.as_millis() as u64
    }
}
