//! The proxy's cache: one small type, [`InsightCache`], in front of moka. A second tier joins here.
//!
//! Invalidation is by epoch. Every calculation takes an epoch when it starts; purging an insight,
//! a project or a partition records the epoch of the purge. An entry is served only if its
//! calculation started after every purge that covers it, so a calculation racing a PATCH can never
//! store a result from before the PATCH. The purge records are bounded; when one is evicted, its
//! epoch raises a global floor instead (only extra misses, never a stale answer).

pub mod entry;
pub mod key;
pub mod l2;
pub mod page;
pub mod sealed;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use moka::future::Cache;
use parking_lot::Mutex;

pub use entry::{Entry, EntryError};
pub use key::{CacheKey, Partition, PartitionKeyer};
pub use l2::{PurgeScope, L2};
pub use page::{Assembled, ListPage};

use crate::clock::Clock;

/// Purge records beyond this many are folded into the floor.
const MAX_PURGE_RECORDS: u64 = 100_000;

/// The hasher of maps the hit path reads, keyed by partitions (keyed hashes of credentials) and
/// ids: seeded per process, several times cheaper than SipHash for these keys.
pub type FastHasher = foldhash::fast::RandomState;

struct Epochs {
    counter: AtomicU64,
    /// Epoch of the newest purge of any scope: entries newer than it skip the lookups.
    newest_purge: AtomicU64,
    floor: Arc<AtomicU64>,
    purges: moka::sync::Cache<PurgeScope, u64>,
}

impl Epochs {
    /// `changes` learns of a raised floor: it ends entries of every scope.
    fn new(changes: Arc<Changes>) -> Self {
        let floor = Arc::new(AtomicU64::new(0));
        let f = floor.clone();
        let purges = moka::sync::Cache::builder()
            .max_capacity(MAX_PURGE_RECORDS)
            .eviction_listener(move |_k, v: u64, cause| {
                // Only a record that is forgotten raises the floor; one replaced by a newer purge
                // of the same scope is still covered by its successor.
                if cause.was_evicted() {
                    f.fetch_max(v, Ordering::Relaxed);
                    changes.note_all();
                }
            })
            .build();
        Self { counter: AtomicU64::new(1), newest_purge: AtomicU64::new(0), floor, purges }
    }

    fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    fn purge(&self, scope: PurgeScope) {
        let e = self.next();
        self.purges.insert(scope, e);
        self.newest_purge.fetch_max(e, Ordering::Release);
    }

    fn is_current(&self, key: &CacheKey, epoch: u64) -> bool {
        if epoch > self.newest_purge.load(Ordering::Acquire) {
            return true;
        }
        let scopes = [
            PurgeScope::Insight { project: key.project, insight: key.insight },
            PurgeScope::Project(key.project),
            PurgeScope::Partition(key.partition),
        ];
        let newest = scopes.iter().filter_map(|s| self.purges.get(s)).max().unwrap_or(0);
        epoch > newest.max(self.floor.load(Ordering::Relaxed))
    }
}

/// One page of an insights list as the upstream answered it, per credential.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct PageKey {
    pub partition: Partition,
    pub project: u64,
    pub path_and_query: String,
}

/// How long a list page's membership is reused unless configured ([`InsightCache::with_page_ttl`]).
const PAGE_TTL: Duration = Duration::from_secs(10);
const MAX_PAGES: u64 = 10_000;

/// How long an upstream "nothing cached" answer is remembered (a calculation through the proxy
/// fills the cache sooner; one made elsewhere shows up after this).
const EMPTY_TTL: Duration = Duration::from_secs(10);
const MAX_EMPTY: u64 = 100_000;

const DAY: Duration = Duration::from_secs(86_400);

/// Upstream cache keys whose newest known calculation time is kept, at most.
const MAX_UPSTREAM_KEYS: u64 = 100_000;

/// One upstream cache key of one insight, across credentials: (project, insight, group).
pub type UpstreamKey = (u64, u64, u128);

fn pages_cache(ttl: Duration) -> Cache<PageKey, Arc<ListPage>> {
    Cache::builder().max_capacity(MAX_PAGES).time_to_live(ttl).build()
}

/// Slots of the change counts: projects share one when they hash alike (a spurious change costs
/// one assembly, never a wrong answer).
const CHANGE_SLOTS: usize = 64;

/// Counts every change of what a cached answer is made from, per project slot: an entry stored,
/// replaced, removed or dropped by the cache, a purge, a calculation started (which a read of a
/// fresh entry reports while it runs). An answer assembled from entries read after a count stays
/// what assembling it again would give while the count is unchanged, up to the wall-clock bounds
/// of its entries ([`Assembled`]).
struct Changes {
    slots: [AtomicU64; CHANGE_SLOTS],
}

impl Default for Changes {
    fn default() -> Self {
        Self { slots: std::array::from_fn(|_| AtomicU64::new(0)) }
    }
}

impl Changes {
    fn slot(&self, project: u64) -> &AtomicU64 {
        &self.slots[(project.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % CHANGE_SLOTS]
    }

    /// Called after the change is visible to readers.
    fn note(&self, project: u64) {
        self.slot(project).fetch_add(1, Ordering::SeqCst);
    }

    fn note_all(&self) {
        for slot in &self.slots {
            slot.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Read before the entries an answer is assembled from.
    fn count(&self, project: u64) -> u64 {
        self.slot(project).load(Ordering::SeqCst)
    }
}

pub struct InsightCache {
    entries: Cache<CacheKey, Arc<Entry>, FastHasher>,
    /// Per credential partition and upstream cache key (`CacheKey::group_key`): the newest result
    /// any variant of that key brought in. Variants adopt it instead of calculating again.
    groups: moka::sync::Cache<CacheKey, Arc<Entry>>,
    /// Per upstream cache key, across partitions: when its newest known result was calculated.
    /// Only a time, never data: it tells a refresh whether the upstream's own cache already holds
    /// something newer than ours (then `refresh=blocking` reads it without a calculation).
    upstream_latest: moka::sync::Cache<UpstreamKey, time::OffsetDateTime>,
    pages: Cache<PageKey, Arc<ListPage>>,
    /// The upstream's answer when its cache had nothing for a key (a result-less insight body).
    empty: moka::sync::Cache<CacheKey, Bytes>,
    epochs: Epochs,
    /// Entries per partition, so purging a partition that owns nothing (a rejected key seen for
    /// the first time) costs nothing: no purge record, no invalidation scan.
    owners: Arc<Mutex<HashMap<Partition, u32>>>,
    /// The shared second tier, when configured.
    l2: Option<Arc<L2>>,
    clock: Clock,
    changes: Arc<Changes>,
    ttl: Duration,
}

/// Called with the cause of every entry the cache drops on its own (`size`, `expired`).
pub type EvictionHook = Arc<dyn Fn(&'static str) + Send + Sync>;

impl InsightCache {
    pub fn new(max_bytes: u64, ttl: Duration, on_evict: Option<EvictionHook>) -> Self {
        let owners: Arc<Mutex<HashMap<Partition, u32>>> = Arc::default();
        let gone = owners.clone();
        let changes: Arc<Changes> = Arc::default();
        let dropped = changes.clone();
        let entries = Cache::builder()
            .name("insights")
            .max_capacity(max_bytes)
            .weigher(|_k: &CacheKey, v: &Arc<Entry>| -> u32 {
                (v.weight() + std::mem::size_of::<CacheKey>()).try_into().unwrap_or(u32::MAX)
            })
            .time_to_live(ttl)
            .support_invalidation_closures()
            .eviction_listener(move |k: Arc<CacheKey>, _v, cause| {
                use moka::notification::RemovalCause;
                let cause = match cause {
                    RemovalCause::Size => "size",
                    RemovalCause::Expired => "expired",
                    RemovalCause::Explicit => "purged",
                    RemovalCause::Replaced => return,
                };
                dropped.note(k.project);
                let mut owners = gone.lock();
                if let std::collections::hash_map::Entry::Occupied(mut n) = owners.entry(k.partition) {
                    *n.get_mut() -= 1;
                    if *n.get() == 0 {
                        n.remove();
                    }
                }
                drop(owners);
                if let Some(hook) = &on_evict {
                    hook(cause);
                }
            })
            .build_with_hasher(FastHasher::default());
        let pages = pages_cache(PAGE_TTL);
        let empty = moka::sync::Cache::builder().max_capacity(MAX_EMPTY).time_to_live(EMPTY_TTL).build();
        // Group entries are the same Arcs as the entries themselves, so this costs little beyond
        // keeping an evicted entry alive while its group is remembered.
        let groups = moka::sync::Cache::builder()
            .max_capacity((max_bytes / 4).max(1))
            .weigher(|_k: &CacheKey, v: &Arc<Entry>| -> u32 { v.weight().try_into().unwrap_or(u32::MAX) })
            .time_to_live(ttl)
            .build();
        let upstream_latest =
            moka::sync::Cache::builder().max_capacity(MAX_UPSTREAM_KEYS).time_to_live(ttl.min(DAY)).build();
        Self {
            entries,
            groups,
            upstream_latest,
            pages,
            empty,
            epochs: Epochs::new(changes.clone()),
            owners,
            l2: None,
            clock: Clock::new(),
            changes,
            ttl,
        }
    }

    /// Reuses a list page's membership for `ttl` (per credential; any purge drops every page).
    pub fn with_page_ttl(mut self, ttl: Duration) -> Self {
        self.pages = pages_cache(ttl);
        self
    }

    /// Puts the shared tier behind this cache; purge markers and started times use `clock`.
    pub fn with_l2(mut self, l2: Option<Arc<L2>>, clock: Clock) -> Self {
        self.l2 = l2;
        self.clock = clock;
        self
    }

    pub fn l2(&self) -> Option<&Arc<L2>> {
        self.l2.as_ref()
    }

    /// How many changes the cache saw in `project`'s slot: read it before reading the entries an
    /// answer is assembled from; the answer may be reused while it is unchanged ([`Assembled`]).
    pub fn changes(&self, project: u64) -> u64 {
        self.changes.count(project)
    }

    /// Records a change the cache cannot see itself: a calculation for `project` started.
    pub fn note_change(&self, project: u64) {
        self.changes.note(project);
    }

    /// The wall-clock millisecond before which an entry whose calculation started at
    /// `started_ms` cannot have expired from memory (it was stored after it started).
    pub fn kept_until_ms(&self, started_ms: i64) -> i64 {
        // A second early: the cache expires by the monotonic clock, this is the wall clock.
        started_ms.saturating_add(i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)) - 1000
    }

    /// Wall-clock milliseconds, when a calculation started (this replica's own bookkeeping; the
    /// shared tier orders by [`InsightCache::shared_version`]).
    pub fn now_ms(&self) -> i64 {
        (self.clock.now().unix_timestamp_nanos() / 1_000_000) as i64
    }

    /// The epoch a calculation must carry: call it before asking the upstream.
    pub fn begin(&self) -> u64 {
        self.epochs.next()
    }

    /// The shared tier's version, to take before asking the upstream: a result stored with it is
    /// ordered against every replica's purges. `None` without the shared tier or when it cannot
    /// say; such a result stays in this replica's memory.
    pub async fn shared_version(&self) -> Option<u64> {
        self.l2.as_ref()?.version().await
    }

    /// The entry for `key`: from memory, else from the shared tier (and then kept in memory).
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        if let Some(e) = self.get_local(key).await {
            return Some(e);
        }
        let l2 = self.l2.as_ref()?;
        let epoch = self.begin();
        let e = Arc::new(l2.get(key, epoch).await?);
        self.insert_local(*key, e.clone()).await;
        self.epochs.is_current(key, e.epoch).then_some(e)
    }

    /// The entry for `key` in memory only.
    pub async fn get_local(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        let e = self.entries.get(key).await?;
        self.epochs.is_current(key, e.epoch).then_some(e)
    }

    /// Stores `entry` in memory and in the shared tier, unless a purge happened since its
    /// calculation started, or the same or a newer result is already there (keeping the old one
    /// keeps its read counts). Returns whether it was stored.
    pub async fn insert(&self, key: CacheKey, entry: Arc<Entry>) -> bool {
        let stored = self.insert_local(key, entry.clone()).await;
        if stored {
            if let Some(l2) = &self.l2 {
                l2.put(&key, &entry).await;
            }
        }
        stored
    }

    /// Stores `entry` in memory only (one read from the shared tier), with the same rules as
    /// [`InsightCache::insert`].
    pub async fn insert_local(&self, key: CacheKey, entry: Arc<Entry>) -> bool {
        use moka::ops::compute::{CompResult, Op};
        if !self.epochs.is_current(&key, entry.epoch) {
            return false;
        }
        let epochs = &self.epochs;
        let result = self
            .entries
            .entry(key)
            .and_compute_with(|old| {
                let keep_old = old.is_some_and(|o| {
                    let o = o.into_value();
                    epochs.is_current(&key, o.epoch) && o.last_refresh() >= entry.last_refresh()
                });
                std::future::ready(if keep_old { Op::Nop } else { Op::Put(entry.clone()) })
            })
            .await;
        match result {
            CompResult::Inserted(_) => *self.owners.lock().entry(key.partition).or_insert(0) += 1,
            CompResult::ReplacedWith(_) => {}
            _ => return false,
        }
        self.changes.note(key.project);
        // The upstream has something for this key now: its "nothing cached" note is over.
        self.empty.invalidate(&key);
        self.note_group(&key, &entry);
        true
    }

    /// Whether any entry in memory belongs to `partition`.
    pub fn owns(&self, partition: Partition) -> bool {
        self.owners.lock().contains_key(&partition)
    }

    /// Records `entry` as its group's newest result (in its partition) and its calculation time
    /// as the upstream key's newest (across partitions), when it is newer than what is known.
    fn note_group(&self, key: &CacheKey, entry: &Arc<Entry>) {
        if entry.group == 0 {
            return;
        }
        let gk = key.group_key(entry.group);
        if self.groups.get(&gk).is_none_or(|g| g.last_refresh() < entry.last_refresh()) {
            self.groups.insert(gk, entry.clone());
        }
        let uk = (key.project, key.insight, entry.group);
        if self.upstream_latest.get(&uk).is_none_or(|t| t < entry.last_refresh()) {
            self.upstream_latest.insert(uk, entry.last_refresh());
        }
    }

    /// The newest result of the upstream cache key `group` in `key`'s partition, if it is still
    /// current (no purge since).
    pub fn group_latest(&self, key: &CacheKey, group: u128) -> Option<Arc<Entry>> {
        let e = self.groups.get(&key.group_key(group))?;
        self.epochs.is_current(key, e.epoch).then_some(e)
    }

    /// When the upstream last calculated this cache key of this insight, as far as any partition
    /// saw.
    pub fn upstream_latest(&self, project: u64, insight: u64, group: u128) -> Option<time::OffsetDateTime> {
        self.upstream_latest.get(&(project, insight, group))
    }

    pub async fn remove(&self, key: &CacheKey) {
        self.entries.invalidate(key).await;
        self.changes.note(key.project);
    }

    pub fn purge_insight(&self, project: u64, insight: u64) {
        self.purge(PurgeScope::Insight { project, insight });
    }

    pub fn purge_project(&self, project: u64) {
        self.purge(PurgeScope::Project(project));
    }

    pub fn purge_partition(&self, partition: Partition) {
        self.purge(PurgeScope::Partition(partition));
    }

    /// Purges here and, through the shared tier, on every replica.
    pub fn purge(&self, scope: PurgeScope) {
        self.purge_local(scope);
        if let Some(l2) = self.l2.clone() {
            // Within a runtime (always, when serving); the marker also covers a lost event.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { l2.purge(&scope).await });
            }
        }
    }

    pub fn upstream_empty(&self, key: &CacheKey) -> Option<Bytes> {
        self.empty.get(key)
    }

    pub fn note_upstream_empty(&self, key: CacheKey, body: Bytes) {
        self.empty.insert(key, body);
    }

    pub async fn page(&self, key: &PageKey) -> Option<Arc<ListPage>> {
        self.pages.get(key).await
    }

    /// Keeps a list page (split once for answering, [`ListPage`]) and returns it.
    pub async fn put_page(&self, key: PageKey, body: Bytes) -> Arc<ListPage> {
        let page = Arc::new(ListPage::new(body));
        self.pages.insert(key, page.clone()).await;
        page
    }

    /// Purges this replica's memory only (what another replica's purge event asks for).
    pub fn purge_local(&self, scope: PurgeScope) {
        self.epochs.purge(scope);
        match scope {
            PurgeScope::Insight { project, .. } | PurgeScope::Project(project) => self.changes.note(project),
            PurgeScope::Partition(_) => self.changes.note_all(),
        }
        // Pages and "nothing cached" notes are short-lived: any purge drops them all. Upstream
        // times are dropped too: after a write the upstream's cache key may be new.
        self.pages.invalidate_all();
        self.upstream_latest.invalidate_all();
        self.empty.invalidate_all();
        let _ = match scope {
            PurgeScope::Insight { project, insight } => {
                self.entries.invalidate_entries_if(move |k, _| k.project == project && k.insight == insight)
            }
            PurgeScope::Project(project) => self.entries.invalidate_entries_if(move |k, _| k.project == project),
            // Every cache read evaluates a registered predicate until it retires: skip it when
            // there is nothing to find.
            PurgeScope::Partition(partition) if !self.owns(partition) => return,
            PurgeScope::Partition(partition) => {
                self.entries.invalidate_entries_if(move |k, _| k.partition == partition)
            }
        };
    }

    /// The live entries of one insight (every partition and variant): for the admin API, O(cache).
    pub fn entries_of(&self, project: u64, insight: u64) -> Vec<(CacheKey, Arc<Entry>)> {
        self.entries
            .iter()
            .filter(|(k, e)| k.project == project && k.insight == insight && self.epochs.is_current(k, e.epoch))
            .map(|(k, e)| (*k, e))
            .collect()
    }

    /// Purge records kept (insights, projects and partitions purged recently).
    pub fn purge_records(&self) -> u64 {
        self.epochs.purges.run_pending_tasks();
        self.epochs.purges.entry_count()
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    pub fn weighted_size(&self) -> u64 {
        self.entries.weighted_size()
    }

    pub async fn run_pending_tasks(&self) {
        self.entries.run_pending_tasks().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::QueryParams;
    use serde_json::json;

    fn entry(cache: &InsightCache, insight: u64, lr: &str) -> Arc<Entry> {
        let b = serde_json::to_vec(&json!({"id": insight, "result": [1], "last_refresh": lr})).unwrap();
        Arc::new(Entry::from_upstream(&b, insight, cache.begin()).unwrap())
    }

    fn key(p: u8, project: u64, insight: u64) -> CacheKey {
        CacheKey::new(Partition([p; 16]), project, insight, &QueryParams::default())
    }

    #[tokio::test]
    async fn purge_beats_a_racing_calculation() {
        let c = InsightCache::new(1 << 20, Duration::from_secs(60), None);
        let early = entry(&c, 1, "2026-01-01T00:00:00Z"); // calculation started
        c.purge_insight(1, 1); // PATCH lands meanwhile
        assert!(!c.insert(key(1, 1, 1), early).await, "a result from before the purge is refused");
        let late = entry(&c, 1, "2026-01-01T00:00:01Z");
        assert!(c.insert(key(1, 1, 1), late).await);
        assert!(c.get(&key(1, 1, 1)).await.is_some());
    }

    #[tokio::test]
    async fn purges_cover_their_scope_only() {
        let c = InsightCache::new(1 << 20, Duration::from_secs(60), None);
        for (p, proj, ins) in [(1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 3)] {
            let e = entry(&c, ins, "2026-01-01T00:00:00Z");
            assert!(c.insert(key(p, proj, ins), e).await);
        }
        c.purge_insight(1, 1);
        assert!(c.get(&key(1, 1, 1)).await.is_none() && c.get(&key(2, 1, 1)).await.is_none());
        assert!(c.get(&key(1, 1, 2)).await.is_some());
        c.purge_partition(Partition([1; 16]));
        assert!(c.get(&key(1, 1, 2)).await.is_none() && c.get(&key(1, 2, 3)).await.is_none());
        let e = entry(&c, 3, "2026-01-01T00:00:00Z");
        assert!(c.insert(key(2, 2, 3), e).await);
        c.purge_project(2);
        assert!(c.get(&key(2, 2, 3)).await.is_none());
    }

    #[tokio::test]
    async fn an_older_result_never_replaces_a_newer_one() {
        let c = InsightCache::new(1 << 20, Duration::from_secs(60), None);
        let older = entry(&c, 1, "2026-01-01T00:00:00Z");
        let newer = entry(&c, 1, "2026-01-01T00:05:00Z");
        assert!(c.insert(key(1, 1, 1), newer).await);
        assert!(!c.insert(key(1, 1, 1), older).await);
    }

    #[tokio::test]
    async fn every_change_of_a_project_is_counted_and_no_other() {
        let c = InsightCache::new(1 << 20, Duration::from_secs(60), None);
        let (one, two) = (c.changes(1), c.changes(2));
        assert!(c.insert(key(1, 1, 1), entry(&c, 1, "2026-01-01T00:00:01Z")).await);
        let stored = c.changes(1);
        assert!(stored > one, "an entry stored");
        assert!(!c.insert(key(1, 1, 1), entry(&c, 1, "2026-01-01T00:00:00Z")).await);
        assert_eq!(c.changes(1), stored, "an older result refused changes nothing");
        c.note_change(1);
        let started = c.changes(1);
        assert!(started > stored, "a calculation started");
        c.remove(&key(1, 1, 1)).await;
        assert!(c.changes(1) > started, "an entry removed");
        let removed = c.changes(1);
        c.purge_insight(1, 7);
        assert!(c.changes(1) > removed, "an insight purged");
        assert_eq!(c.changes(2), two, "another project's count is its own");
        c.purge_partition(Partition([9; 16]));
        assert!(c.changes(2) > two, "a partition spans projects");
    }

    #[tokio::test]
    async fn a_group_is_per_partition_and_only_its_time_crosses() {
        let c = InsightCache::new(1 << 20, Duration::from_secs(60), None);
        let b = serde_json::to_vec(&json!({"id": 1, "result": [1], "last_refresh": "2026-01-01T00:00:00Z",
            "filters_hash": "cache_1_x"}))
        .unwrap();
        let e = Arc::new(Entry::from_upstream(&b, 1, c.begin()).unwrap());
        assert!(c.insert(key(1, 1, 1), e.clone()).await);
        assert!(c.group_latest(&key(1, 1, 1), e.group).is_some());
        assert!(c.group_latest(&key(2, 1, 1), e.group).is_none(), "another credential's group is its own");
        assert_eq!(c.upstream_latest(1, 1, e.group), Some(e.last_refresh()));
        c.purge_partition(Partition([1; 16]));
        assert!(c.group_latest(&key(1, 1, 1), e.group).is_none(), "purged with the partition");
    }
}
