//! The calculation engine: the one place that asks the upstream about insights. It owns what that
//! takes (single flight, the budget and calculation permits, the upstream client, the upstream's
//! word on principals, the shared tier's leases, the background queue and its workers), all
//! private, behind a narrow API the handlers call once per step of a [`crate::refresh::Plan`]:
//! - [`Engine::view`]: what the proxy knows about a request, for [`crate::refresh::plan`];
//! - [`Engine::calculate`]: calculate or join a calculation, as a waiting client;
//! - [`Engine::read_upstream_cache`] and [`Engine::revalidate`]: reads that never calculate;
//! - [`Engine::enqueue`]: background work with a query status; [`Engine::schedule_ahead`]:
//!   refresh-ahead of a hot entry.
//!
//! Layout: `calculate` (flights, budget, the upstream call and what lands in the cache), `queue`
//! (fair lanes of background work), `workers` (running it), `schedule` (putting work in the queue),
//! `spec` (one insight as the proxy asks about it).

mod calculate;
mod queue;
mod schedule;
mod shared;
mod spec;
pub mod workers;

use std::sync::Arc;

use bytes::Bytes;
use time::OffsetDateTime;
use tokio::sync::Semaphore;

use crate::budget::{Budget, BudgetCounts};
use crate::cache::{CacheKey, Entry, InsightCache, Partition, PartitionKeyer};
use crate::clock::Clock;
use crate::config::{BudgetSettings, Config, ForcedMinInterval};
use crate::failure::Failure;
use crate::flights::Flights;
use crate::metrics::Metrics;
use crate::refresh::{CacheState, RefreshMode, View};
use crate::status::StatusRegistry;
use crate::trust::Trust;
use crate::upstream::{UpstreamClient, UpstreamRequest, UpstreamResponse};

pub use queue::QueueFull;
pub use spec::{own_request, CalcSpec};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum FlightKind {
    /// Reading the upstream's cache (`refresh=force_cache`): cheap, never calculates.
    Read,
    Calculate,
}

type FlightKey = (CacheKey, FlightKind);

/// One upstream cache key of one insight across partitions, for refresh-ahead: the group when
/// known, else the proxy's variant (which is the same for every partition).
type AheadKey = (u64, u64, u128, bool);

/// What one upstream call for an insight came to. Cheap to clone: every waiter gets a copy.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A good result, now in the cache (unless a purge raced it).
    Stored(Arc<Entry>),
    /// An answer to relay as it is and never cache: 4xx, or 200 with no result or an error status.
    Relay(Arc<UpstreamResponse>),
    Failed(Failure),
}

pub struct Engine {
    config: Arc<Config>,
    clock: Clock,
    cache: Arc<InsightCache>,
    statuses: Arc<StatusRegistry>,
    metrics: Arc<Metrics>,
    keyer: PartitionKeyer,
    flights: Flights<FlightKey, Outcome>,
    /// Refresh-ahead runs per upstream key across partitions: the first partition calculates, the
    /// others wait for it and then read the upstream's fresh cache with their own credential.
    ahead_flights: Flights<AheadKey, Outcome>,
    upstream: UpstreamClient,
    jobs: queue::JobQueue,
    /// Bounds concurrent upstream calculations, blocking and background alike.
    calc_permits: Semaphore,
    budget: Arc<Budget>,
    /// What the upstream said about principals recently: confirmations, refusals, and the
    /// allowance for credentials it never accepted.
    trust: Trust,
    /// Aging entries the shared tier was asked about within the last second.
    l2_asked: moka::sync::Cache<CacheKey, ()>,
}

impl Engine {
    /// The engine over the proxy's shared state (the app holds the same handles).
    pub fn new(
        config: Arc<Config>,
        clock: Clock,
        cache: Arc<InsightCache>,
        statuses: Arc<StatusRegistry>,
        metrics: Arc<Metrics>,
        keyer: PartitionKeyer,
        upstream: UpstreamClient,
    ) -> Arc<Engine> {
        let budget = Budget::new(config.budget, config.l2.as_ref()).unwrap_or_else(|e| {
            tracing::error!(error = %e, "running with this replica's own budget");
            Budget::new(BudgetSettings { shared: false, ..config.budget }, None).expect("a local budget needs no Redis")
        });
        Arc::new(Engine {
            jobs: queue::JobQueue::new(config.queue_capacity, config.max_queued_per_principal, budget.clone()),
            calc_permits: Semaphore::new(config.max_concurrent_calculations),
            budget,
            trust: Trust::new(
                config.revalidate_after,
                config.revalidate_scope,
                config.rejected_ttl,
                config.unconfirmed_calls_per_second,
            ),
            flights: Flights::default(),
            ahead_flights: Flights::default(),
            l2_asked: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(std::time::Duration::from_secs(1))
                .build(),
            upstream,
            config,
            clock,
            cache,
            statuses,
            metrics,
            keyer,
        })
    }

    /// The entry cached for `spec`, brought up to date from its group: another variant of the
    /// same upstream cache key may hold a newer result, which this one adopts rather than
    /// calculate (looked up only once the entry is old enough to matter).
    pub async fn entry(&self, spec: &CalcSpec) -> Option<Arc<Entry>> {
        let mut entry = self.cache.get(&spec.key).await?;
        if self.aging(&spec.key, &entry, self.clock.now()) {
            if let Some(newer) = self.newer_shared(&spec.key, Some(entry.last_refresh())).await {
                entry = newer;
            }
        }
        if !self.worth_freshening(&entry, self.clock.now()) {
            return Some(entry);
        }
        Some(self.freshen(spec, &entry).await.unwrap_or(entry))
    }

    /// The entry cached for `key` when no newer result of its group could matter (the hit path's
    /// case, where [`Engine::entry`] returns it as it is); `None` when nothing is cached or the
    /// entry is old enough that [`Engine::entry`] would look for a newer one.
    pub async fn settled_entry(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        let entry = self.cache.get(key).await?;
        let now = self.clock.now();
        let shared_may_be_newer = self.cache.l2().is_some() && self.in_ahead_window(&entry, now);
        (!shared_may_be_newer && !self.worth_freshening(&entry, now)).then_some(entry)
    }

    /// With the shared tier: a result of `key` newer than `than` that another replica stored,
    /// now kept in memory here too. Asked at most once a second per key from reads (a key whose
    /// entry ages on every replica would otherwise cost a Redis read per hit).
    async fn newer_shared(&self, key: &CacheKey, than: Option<OffsetDateTime>) -> Option<Arc<Entry>> {
        let l2 = self.cache.l2()?;
        let epoch = self.cache.begin();
        let e = l2.get(key, epoch).await?;
        if than.is_some_and(|t| e.last_refresh() <= t) {
            return None;
        }
        let e = Arc::new(e);
        self.cache.insert_local(*key, e.clone()).await.then_some(e)
    }

    /// Whether this replica's entry is old enough that another replica may have replaced it in
    /// the shared tier (in the refresh-ahead window or stale), and the shared tier was not asked
    /// about the key within the last second.
    fn aging(&self, key: &CacheKey, entry: &Entry, now: OffsetDateTime) -> bool {
        if self.cache.l2().is_none() || !self.in_ahead_window(entry, now) {
            return false;
        }
        let mut first = false;
        self.l2_asked.get_with(*key, || first = true);
        first
    }

    /// The wall-clock millisecond until which `entry` is read as a plain hit whatever else
    /// happens: fresh, before its refresh-ahead window (where a read may look for a newer result
    /// or schedule a refresh) and before the cache could have expired it.
    pub fn plain_hit_until_ms(&self, entry: &Entry) -> i64 {
        let kept = self.cache.kept_until_ms(entry.started_ms);
        let Some(opens) = self.ahead_window_opens(entry) else { return kept };
        // A millisecond early: the time is truncated to milliseconds here.
        kept.min((opens.unix_timestamp_nanos() / 1_000_000) as i64 - 1)
    }

    /// Whether `entry` is in its refresh-ahead window or stale.
    fn in_ahead_window(&self, entry: &Entry, now: OffsetDateTime) -> bool {
        self.ahead_window_opens(entry).is_some_and(|opens| now >= opens)
    }

    /// When `entry`'s refresh-ahead window opens (`None`: its interval has no threshold).
    fn ahead_window_opens(&self, entry: &Entry) -> Option<OffsetDateTime> {
        let threshold = self.config.thresholds.default_for(entry.stale.interval)?;
        let share = f64::from(self.config.refresh_ahead.start_percent) / 100.0;
        Some(entry.stale.last_refresh + threshold.mul_f64(share))
    }

    /// Whether an entry is old enough that a newer result of its group could matter: in the
    /// refresh-ahead window or stale. Younger entries skip the group lookup (the hit path).
    fn worth_freshening(&self, entry: &Entry, now: OffsetDateTime) -> bool {
        entry.group != 0 && self.in_ahead_window(entry, now)
    }

    /// What the proxy knows about a request for `spec` in `mode` holding `entry`. `vouched`: the
    /// caller already found confirmed, or accepted by the upstream during this request (else the
    /// confirmations are looked up); `from_upstream`: the entry was read from the upstream's cache
    /// during this request.
    pub fn view(
        &self,
        spec: &CalcSpec,
        mode: RefreshMode,
        entry: Option<&Entry>,
        vouched: bool,
        from_upstream: bool,
    ) -> View {
        self.view_of(&spec.key, mode, entry, vouched, from_upstream)
    }

    /// [`Engine::view`] of a request for `key` (its partition, project and insight).
    pub fn view_of(
        &self,
        key: &CacheKey,
        mode: RefreshMode,
        entry: Option<&Entry>,
        vouched: bool,
        from_upstream: bool,
    ) -> View {
        let now = self.clock.now();
        let state = CacheState::of(entry.map(|e| &e.stale), now, &self.config.thresholds);
        let flight = calculate::flight_of(key, entry);
        View {
            state,
            in_flight: self.flights.is_running(&(flight, FlightKind::Calculate)),
            confirmed: vouched || from_upstream || self.is_confirmed(key.partition, key.project, Some(key.insight)),
            upstream_empty: state == CacheState::Miss && self.cache.upstream_empty(key).is_some(),
            from_upstream,
            too_soon_to_force: mode.is_forced() && entry.is_some_and(|e| self.too_soon_to_force(e, now)),
        }
    }

    /// Whether `[refresh] forced_min_interval` holds a forced recalculation of `entry` off.
    fn too_soon_to_force(&self, entry: &Entry, now: OffsetDateTime) -> bool {
        match self.config.forced_min_interval {
            ForcedMinInterval::Off => false,
            ForcedMinInterval::NextAllowedClientRefresh => entry.next_allowed_refresh().is_some_and(|t| now < t),
            ForcedMinInterval::After(d) => now - entry.last_refresh() < d,
        }
    }

    /// Records that the upstream just accepted this principal for this project (and insight),
    /// here and, through the shared tier, for every replica.
    pub fn confirm(&self, partition: Partition, project: u64, insight: Option<u64>) {
        self.trust.confirm(partition, project, insight, self.clock.now());
        self.share_confirmation(partition, project, insight);
    }

    /// [`Engine::confirm`] of every insight the upstream listed to this principal on one page.
    pub fn confirm_listed(&self, partition: Partition, project: u64, insights: &[u64]) {
        self.trust.confirm_listed(partition, project, insights, self.clock.now());
    }

    /// Whether the upstream accepted this principal for this project (and insight, under
    /// `revalidate_scope = "insight"`) within the window.
    pub fn is_confirmed(&self, partition: Partition, project: u64, insight: Option<u64>) -> bool {
        self.trust.is_confirmed(partition, project, insight, self.clock.now())
    }

    /// The upstream's refusal of this principal, while it is remembered.
    pub fn refusal(&self, partition: Partition, project: u64, insight: Option<u64>) -> Option<Arc<UpstreamResponse>> {
        self.trust.refusal(partition, project, insight)
    }

    /// The upstream refused this principal (401/403): nothing cached reaches it again, its query
    /// statuses are dropped, and the refusal is answered from memory for `rejected_ttl`, here
    /// and (through the shared tier) on every replica.
    fn reject(&self, partition: Partition, project: u64, insight: Option<u64>, answer: Arc<UpstreamResponse>) {
        self.trust.refuse(partition, project, insight, answer.clone());
        self.share_refusal(crate::cache::l2::Refusal { partition, project, insight, answer });
        let was_known = self.trust.forget(partition);
        self.statuses.drop_owner(partition);
        // A credential never accepted and holding nothing costs nothing (no purge marker in the
        // shared tier for every made-up key); one accepted elsewhere is dropped there as well.
        if was_known || self.cache.owns(partition) {
            self.cache.purge_partition(partition);
        }
    }

    /// The status of a background calculation for the key that is still running, if any.
    pub fn running_status(&self, spec: &CalcSpec) -> Option<Bytes> {
        self.statuses
            .running(spec.key.partition, &self.keyer.status_id(&spec.key), self.clock.now())
            .map(|s| s.to_json())
    }

    /// Copies a status to the shared tier, so a poll may land on any replica.
    fn share_status(&self, id: &str, owner: Partition) {
        let (Some(l2), Some(status)) = (self.cache.l2().cloned(), self.statuses.get(owner, id)) else { return };
        let (id, ttl) = (id.to_string(), self.config.status_ttl);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { l2.put_status(&id, owner, &status.to_json(), ttl).await });
        }
    }

    /// A list page read from the upstream's cache for `partition` (never calculates): its answer
    /// when 200, else what to answer instead (the upstream's refusal or error, relayed, or the
    /// proxy's failure). A 200 confirms the principal for the project; a 401/403 rejects it.
    pub async fn read_list(
        &self,
        req: &UpstreamRequest,
        principal: &crate::auth::Principal,
        project: u64,
    ) -> Result<UpstreamResponse, ListRead> {
        let partition = principal.partition();
        if !self.trust.admit(partition) {
            self.metrics.trust_refusals.with_label_values(&["unconfirmed"]).inc();
            return Err(ListRead::Failed(Failure::Unconfirmed));
        }
        if self.budget.rate_token(principal, self.budget.settings().wait, false).await.is_err() {
            return Err(ListRead::Failed(Failure::Budget));
        }
        self.metrics.upstream_reads.with_label_values(&["list"]).inc();
        let resp = self.upstream.send(req).await.map_err(|e| ListRead::Failed(Failure::Upstream(e)))?;
        if resp.status != 200 {
            let resp = Arc::new(resp);
            if resp.status == 401 || resp.status == 403 {
                self.reject(partition, project, None, resp.clone());
            }
            return Err(ListRead::Relay(resp));
        }
        self.confirm(partition, project, None);
        Ok(resp)
    }

    /// The client for the upstream, for requests passed through as they are.
    pub fn upstream(&self) -> &UpstreamClient {
        &self.upstream
    }

    /// Background jobs waiting.
    pub fn queued(&self) -> usize {
        self.jobs.len()
    }

    /// Calculations and reads running now.
    pub fn flights_running(&self) -> usize {
        self.flights.len()
    }

    /// Nothing queued and nothing running.
    pub fn is_idle(&self) -> bool {
        self.jobs.is_empty() && self.flights.is_empty() && self.ahead_flights.is_empty()
    }

    /// Whether the upstream budget is the cluster's right now (`None`: not shared; `Some(false)`:
    /// Redis is unreachable and this replica's share applies).
    pub fn budget_shared_up(&self) -> Option<bool> {
        self.budget.shared_up()
    }

    /// With the shared budget: whether it is the cluster's right now, and the live replicas last
    /// seen.
    pub fn budget_sharing(&self) -> Option<(bool, u32)> {
        Some((self.budget.shared_up()?, self.budget.replicas()?))
    }

    /// Calculation slots of `project` taken now.
    pub fn slots_taken(&self, project: u64) -> usize {
        self.budget.running(project)
    }

    /// How often calls waited for the budget or gave up waiting, since start (for the metrics).
    pub fn budget_counts(&self) -> &BudgetCounts {
        self.budget.counts()
    }
}

/// Why a list page read gave no page.
#[derive(Debug)]
pub enum ListRead {
    /// The upstream's own answer (an error, a refusal), to relay as it is.
    Relay(Arc<UpstreamResponse>),
    Failed(Failure),
}
