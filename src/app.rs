//! The proxy's shared state and the one way a calculation happens: [`App::calculation`], a
//! single-flight upstream call whose good result lands in the cache.

use std::sync::Arc;

use http::Method;
use tokio::sync::Semaphore;

use crate::auth::Principal;
use crate::budget::{Budget, Priority};
use crate::cache::l2::Lease;
use crate::cache::{CacheKey, Entry, EntryError, InsightCache, Partition, PartitionKeyer, L2};
use crate::clock::Clock;
use crate::config::Config;
use crate::failure::Failure;
use crate::flights::{Flight, Flights};
use crate::metrics::Metrics;
use crate::query::QueryParams;
use crate::refresh::UpstreamRefresh;
use crate::status::StatusRegistry;
use crate::trust::Trust;
use crate::upstream::{UpstreamClient, UpstreamError, UpstreamRequest, UpstreamResponse};
use crate::workers::JobQueue;
use std::time::Duration;
use time::OffsetDateTime;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum FlightKind {
    /// Reading the upstream's cache (`refresh=force_cache`): cheap, never calculates.
    Peek,
    /// The same read made to confirm a principal: never answered from what the proxy remembers
    /// of the upstream (its "nothing cached" note), only by the upstream itself.
    Revalidate,
    Calculate,
}

pub type FlightKey = (CacheKey, FlightKind);

/// One upstream cache key of one insight across partitions, for refresh-ahead: the group when
/// known, else the proxy's variant (which is the same for every partition).
pub type AheadKey = (u64, u64, u128, bool);

/// How long background work waits for budget once a worker took it. Workers take a job only with
/// its key's token and a slot of its project promised ([`JobQueue`]), so this covers a slot a
/// blocking client took meanwhile; the job then goes back to its lane instead of holding the worker.
const BACKGROUND_BUDGET_WAIT: Duration = Duration::from_secs(1);

/// What one upstream call for an insight came to. Cheap to clone: every waiter gets a copy.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A good result, now in the cache (unless a purge raced it).
    Stored(Arc<Entry>),
    /// An answer to relay as it is and never cache: 4xx, or 200 with no result or an error status.
    Relay(Arc<UpstreamResponse>),
    Failed(Failure),
}

/// Everything needed to ask the upstream about one insight on a caller's behalf.
#[derive(Debug, Clone)]
pub struct CalcSpec {
    pub key: CacheKey,
    pub project: u64,
    pub insight: u64,
    /// The path as the client sent it, so the upstream sees the same alias.
    pub path: String,
    pub query: QueryParams,
    pub principal: Principal,
}

/// Query parameters that never go upstream from the proxy's own calls: the proxy sets `refresh`
/// itself, a client's `client_query_id` names the client's query, not ours, and the credential
/// travels only as the principal's one header.
const NOT_FORWARDED: [&str; 3] = ["refresh", "client_query_id", "personal_api_key"];

/// A GET the proxy makes on a principal's behalf: the client's parameters with the proxy's
/// `refresh`, and exactly one credential, the principal's.
pub fn own_request(path: &str, query: &QueryParams, principal: &Principal, refresh: &str) -> UpstreamRequest {
    let query = query.encode_without(&NOT_FORWARDED, &[("refresh", refresh)]);
    UpstreamRequest {
        method: Method::GET,
        path_and_query: format!("{path}?{query}"),
        headers: vec![principal.upstream_header()],
        body: None,
    }
}

impl CalcSpec {
    pub fn dashboard_id(&self) -> Option<u64> {
        self.query.get("from_dashboard").and_then(|d| d.parse().ok())
    }

    pub fn upstream_request(&self, refresh: UpstreamRefresh) -> UpstreamRequest {
        own_request(&self.path, &self.query, &self.principal, refresh.as_str())
    }
}

pub struct App {
    pub config: Arc<Config>,
    pub clock: Clock,
    pub cache: InsightCache,
    pub keyer: PartitionKeyer,
    pub flights: Flights<FlightKey, Outcome>,
    /// Refresh-ahead runs per upstream key across partitions: the first partition calculates, the
    /// others wait for it and then read the upstream's fresh cache with their own credential.
    pub ahead_flights: Flights<AheadKey, Outcome>,
    pub statuses: StatusRegistry,
    pub upstream: UpstreamClient,
    pub jobs: JobQueue,
    /// Bounds concurrent upstream calculations, blocking and background alike.
    pub calc_permits: Semaphore,
    pub budget: Arc<Budget>,

    /// What the upstream said about principals recently: confirmations, refusals, and the
    /// allowance for credentials it never accepted.
    pub trust: Trust,
    pub metrics: Metrics,
}

impl App {
    /// Records that the upstream just accepted this principal for this project (and insight).
    pub fn confirm(&self, partition: Partition, project: u64, insight: Option<u64>) {
        self.trust.confirm(partition, project, insight, self.clock.now());
    }

    /// Whether the upstream accepted this principal for this project (and insight, under
    /// `revalidate_scope = "insight"`) within the window.
    pub fn is_confirmed(&self, partition: Partition, project: u64, insight: Option<u64>) -> bool {
        self.trust.is_confirmed(partition, project, insight, self.clock.now())
    }

    /// The upstream refused this principal (401/403): nothing cached reaches it again, here or
    /// (through the shared tier) on other replicas, its query statuses are dropped, and the
    /// refusal is answered from memory for `rejected_ttl`.
    pub fn reject(&self, partition: Partition, project: u64, insight: Option<u64>, answer: Arc<UpstreamResponse>) {
        self.trust.refuse(partition, project, insight, answer);
        let was_known = self.trust.forget(partition);
        self.statuses.drop_owner(partition);
        // A credential never accepted and holding nothing costs nothing (no purge marker in the
        // shared tier for every made-up key); one accepted elsewhere is dropped there as well.
        if was_known || self.cache.owns(partition) {
            self.cache.purge_partition(partition);
        }
    }

    pub fn new(config: Arc<Config>, clock: Clock, upstream: UpstreamClient) -> Arc<App> {
        let metrics = Metrics::new();
        let evictions = metrics.evictions.clone();
        let hook: crate::cache::EvictionHook = Arc::new(move |cause| evictions.with_label_values(&[cause]).inc());
        let l2 = config.l2.clone().and_then(|s| match L2::new(s) {
            Ok(l2) => Some(l2),
            Err(e) => {
                tracing::error!(error = %e, "the [l2] url is unusable; running without the shared tier");
                None
            }
        });
        let budget = Budget::new(config.budget);
        Arc::new(App {
            cache: InsightCache::new(config.cache_max_bytes, config.cache_ttl, Some(hook))
                .with_page_ttl(config.list_page_ttl)
                .with_l2(l2, clock.clone()),
            keyer: PartitionKeyer::new(config.partition_secret.as_deref()),
            flights: Flights::default(),
            ahead_flights: Flights::default(),
            statuses: StatusRegistry::new(config.status_ttl, config.status_max_records, config.status_max_bytes),
            jobs: JobQueue::new(config.queue_capacity, config.max_queued_per_principal, budget.clone()),
            calc_permits: Semaphore::new(config.max_concurrent_calculations),
            budget,
            trust: Trust::new(
                config.revalidate_after,
                config.revalidate_scope,
                config.rejected_ttl,
                config.unconfirmed_calls_per_second,
            ),
            metrics,
            upstream,
            clock,
            config,
        })
    }

    /// Whether `entry`'s upstream cache key (its group) may stand for this variant: the upstream
    /// confirmed it for this very variant within the entry's lazy staleness threshold (15 min for
    /// minute intervals, 2 h hourly, 12 h daily). Past that the variant asks the upstream itself
    /// again (a read, when the upstream's cache is fresh), so a dashboard whose filters changed
    /// elsewhere leaves the group within that time.
    pub fn alias_usable(&self, entry: &Entry, now: OffsetDateTime) -> bool {
        if entry.group == 0 {
            return false;
        }
        let Some(threshold) = self.config.thresholds.lazy_for(entry.stale.interval) else { return true };
        let now_ms = (now.unix_timestamp_nanos() / 1_000_000) as i64;
        let age_ms = now_ms.saturating_sub(entry.confirmed_ms);
        u128::try_from(age_ms).is_ok_and(|a| a <= threshold.as_millis())
    }

    /// The flight a calculation for `spec` runs under: its group's when the entry has one
    /// (variants the upstream computes identically share one calculation), else its own. Always
    /// within the caller's partition. A variant whose alias the upstream has not confirmed lately
    /// still runs under its group, so it never calculates beside the group; having joined another
    /// variant's calculation it then asks the upstream itself ([`App::calculate_for`]).
    pub fn flight_key(&self, spec: &CalcSpec, entry: Option<&Entry>) -> CacheKey {
        match entry {
            Some(e) if e.group != 0 => spec.key.group_key(e.group),
            _ => spec.key,
        }
    }

    /// `entry` brought up to date from its group: when another variant of the same upstream cache
    /// key (same partition) holds a newer result, this variant adopts it, stores and returns it.
    pub async fn freshen(&self, spec: &CalcSpec, entry: &Arc<Entry>) -> Option<Arc<Entry>> {
        if !self.alias_usable(entry, self.clock.now()) {
            return None;
        }
        let newer = self.cache.group_latest(&spec.key, entry.group)?;
        if newer.last_refresh() <= entry.last_refresh() {
            return None;
        }
        self.adopt_from(spec, entry, &newer).await
    }

    async fn adopt_from(&self, spec: &CalcSpec, own: &Arc<Entry>, fresh: &Arc<Entry>) -> Option<Arc<Entry>> {
        let adopted = Arc::new(own.adopt(fresh)?);
        self.metrics.adopted.inc();
        self.cache.insert(spec.key, adopted.clone()).await;
        Some(adopted)
    }

    /// The result of a flight as this variant's entry. `ours`: the flight ran for this variant
    /// (this call started it, or it ran under the variant's own key). A flight another variant of
    /// the group started stored that variant's body: this variant takes the result into its own
    /// (`own`: its entry before the flight). `None` when that result is not this variant's to
    /// take: the other variant's upstream key changed meanwhile (its dashboard's filters were
    /// edited), so the caller calculates under its own key.
    pub async fn adopt(
        &self,
        spec: &CalcSpec,
        own: Option<&Arc<Entry>>,
        outcome: Outcome,
        ours: bool,
    ) -> Option<Outcome> {
        let Outcome::Stored(fresh) = &outcome else { return Some(outcome) };
        let current = self.cache.get_local(&spec.key).await;
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, fresh)) || ours {
            return Some(outcome);
        }
        match own.or(current.as_ref()) {
            Some(own) if own.group == fresh.group && fresh.group != 0 => {
                if current.as_ref().is_some_and(|c| c.last_refresh() >= fresh.last_refresh()) {
                    return current.map(Outcome::Stored);
                }
                Some(self.adopt_from(spec, own, fresh).await.map_or(outcome, Outcome::Stored))
            }
            _ => None,
        }
    }

    /// Calculates for `spec` under `flight` (its own key or its group's, [`App::flight_key`]), or
    /// joins that calculation, and takes the result as this variant's ([`App::adopt`]); if the
    /// flight was another variant's whose upstream key changed meanwhile, calculates under the
    /// variant's own key. `wait` is how the caller waits on a flight (`None`: the work was
    /// abandoned). Returns the outcome and whether this call started the flight it took it from.
    #[allow(clippy::too_many_arguments)]
    pub async fn calculate_for<W, F>(
        self: &Arc<Self>,
        spec: &Arc<CalcSpec>,
        own: Option<&Arc<Entry>>,
        mut flight: CacheKey,
        refresh: UpstreamRefresh,
        reason: &'static str,
        wait: W,
    ) -> (Option<Outcome>, bool)
    where
        W: Fn(Arc<Flight<Outcome>>) -> F,
        F: std::future::Future<Output = Option<Outcome>>,
    {
        // The alias is not confirmed lately: another variant's result does not answer for this one
        // until the upstream says again that it computes them identically.
        let mut unconfirmed = own.is_some_and(|e| e.group != 0 && !self.alias_usable(e, self.clock.now()));
        let mut refresh = refresh;
        let mut adopted: Option<Outcome> = None;
        loop {
            let (running, started) = self.calculation(spec, flight, refresh, reason, None);
            let Some(outcome) = wait(running).await else { return (adopted, started) };
            let ours = started || flight == spec.key;
            match self.adopt(spec, own, outcome, ours).await {
                // Joined after the group's calculation: the upstream answers this variant from the
                // cache that calculation just filled (no calculation) unless its key changed.
                Some(outcome) if unconfirmed && !ours => {
                    (unconfirmed, flight, refresh) = (false, spec.key, UpstreamRefresh::Blocking);
                    adopted = Some(outcome);
                }
                Some(Outcome::Failed(_)) if adopted.is_some() => return (adopted, started),
                Some(outcome) => return (Some(outcome), started),
                None => flight = spec.key,
            }
        }
    }

    /// Joins the running calculation under `flight` (see [`App::flight_key`]), or starts one.
    /// Returns the flight and whether this call started it.
    /// `reason` labels the calculation in metrics: miss, stale, forced, background or ahead.
    /// `ahead_of`: for refresh-ahead, the `last_refresh` it means to replace; if something newer
    /// arrived meanwhile it does nothing, and if another partition's result is newer upstream it
    /// reads that (`blocking`) instead of calculating.
    pub fn calculation(
        self: &Arc<Self>,
        spec: &Arc<CalcSpec>,
        flight: CacheKey,
        refresh: UpstreamRefresh,
        reason: &'static str,
        ahead_of: Option<(OffsetDateTime, u128)>,
    ) -> (Arc<Flight<Outcome>>, bool) {
        let (flight, started) = self.flights.join_or_start((flight, FlightKind::Calculate), || {
            let (app, spec) = (self.clone(), spec.clone());
            async move {
                match app.shared_flight(&spec, refresh, reason, ahead_of).await {
                    Some(outcome) => outcome,
                    None => app.calculate_here(&spec, refresh, reason, ahead_of).await,
                }
            }
        });
        if !started {
            self.metrics.coalesced.inc();
        }
        (flight, started)
    }

    /// Copies a status to the shared tier, so a poll may land on any replica.
    pub fn share_status(&self, id: &str, owner: Partition) {
        let (Some(l2), Some(status)) = (self.cache.l2().cloned(), self.statuses.get(owner, id)) else { return };
        let (id, ttl) = (id.to_string(), self.config.status_ttl);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { l2.put_status(&id, owner, &status.to_json(), ttl).await });
        }
    }

    /// One calculation on this replica, within the budget: a slot for the project (by priority),
    /// a global permit, and a rate token for the credential.
    async fn calculate_here(
        &self,
        spec: &Arc<CalcSpec>,
        refresh: UpstreamRefresh,
        reason: &'static str,
        ahead_of: Option<(OffsetDateTime, u128)>,
    ) -> Outcome {
        if let Some(done) = self.superseded(spec, ahead_of).await {
            return done;
        }
        let priority = match reason {
            "background" => Priority::Async,
            "ahead" => Priority::Ahead,
            _ => Priority::Blocking,
        };
        let wait = match priority {
            Priority::Blocking => self.budget.settings().wait,
            Priority::Async => BACKGROUND_BUDGET_WAIT,
            // Refresh-ahead only uses budget nobody is waiting for; the next read retries.
            Priority::Ahead => Duration::from_secs(1),
        };
        let deadline = tokio::time::Instant::now() + wait;
        // Background work a worker took was granted its token (and promised a slot) then.
        let granted = priority != Priority::Blocking && self.budget.claim_grant(&spec.key);
        // The rate token first: a slot is never held while waiting for rate.
        let forced = reason == "forced";
        if !granted && self.budget.rate_token(&spec.principal, wait, forced).await.is_err() {
            return Outcome::Failed(Failure::Budget);
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(_slot) = self.budget.slot(spec.project, priority, left).await else {
            return Outcome::Failed(Failure::Budget);
        };
        let _permit = self.calc_permits.acquire().await;
        crate::flights::mark_underway();
        if let Some(done) = self.superseded(spec, ahead_of).await {
            return done;
        }
        let refresh = match ahead_of {
            // Another partition's calculation of the same upstream key is newer than ours: the
            // upstream's cache holds it, and `blocking` reads it without calculating.
            Some((base, group)) if self.upstream_newer(spec, group, base) => {
                self.metrics.upstream_reads.with_label_values(&["ahead"]).inc();
                return self.call(spec, UpstreamRefresh::Blocking, "read").await;
            }
            _ => refresh,
        };
        self.metrics.calculations.with_label_values(&[reason]).inc();
        self.call(spec, refresh, "calculation").await
    }

    /// Whether the upstream calculated this variant's upstream cache key after `base`, as far as
    /// any partition saw (a time only, no data crosses partitions).
    fn upstream_newer(&self, spec: &CalcSpec, group: u128, base: OffsetDateTime) -> bool {
        group != 0 && self.cache.upstream_latest(spec.project, spec.insight, group).is_some_and(|t| t > base)
    }

    /// For refresh-ahead: the entry that already replaced the one it meant to refresh (a client's
    /// calculation or another variant's landed meanwhile), so it need not run.
    async fn superseded(&self, spec: &CalcSpec, ahead_of: Option<(OffsetDateTime, u128)>) -> Option<Outcome> {
        let (base, _) = ahead_of?;
        let own = self.cache.get_local(&spec.key).await?;
        let own = match self.freshen(spec, &own).await {
            Some(adopted) => adopted,
            None => own,
        };
        (own.last_refresh() > base).then_some(Outcome::Stored(own))
    }

    /// With the shared tier: one calculation per key across replicas. Returns the outcome when
    /// another replica's calculation served this one (or this replica calculated under a lease);
    /// `None` to calculate here without a lease (no shared tier, or it is unavailable).
    async fn shared_flight(
        self: &Arc<Self>,
        spec: &Arc<CalcSpec>,
        refresh: UpstreamRefresh,
        reason: &'static str,
        ahead_of: Option<(OffsetDateTime, u128)>,
    ) -> Option<Outcome> {
        let l2 = self.cache.l2()?.clone();
        // What counts as an answer: newer than what this replica has, or, when forced, newer
        // than the request.
        let current = self.cache.get_local(&spec.key).await.map(|e| e.last_refresh());
        let floor = match refresh {
            UpstreamRefresh::ForceBlocking => Some(self.clock.now() - time::Duration::seconds(1)),
            _ => current,
        };
        let deadline = tokio::time::Instant::now() + self.config.read_timeout;
        loop {
            match l2.try_lease(&spec.key).await {
                Lease::Unavailable => return None,
                Lease::Acquired(token) => {
                    let renewer = {
                        let (l2, key, token) = (l2.clone(), spec.key, token.clone());
                        let every = l2.settings().lease / 3;
                        tokio::spawn(async move {
                            loop {
                                tokio::time::sleep(every).await;
                                if !l2.renew(&key, &token).await {
                                    return;
                                }
                            }
                        })
                    };
                    let outcome = self.calculate_here(spec, refresh, reason, ahead_of).await;
                    renewer.abort();
                    l2.release(&spec.key, &token).await;
                    return Some(outcome);
                }
                Lease::Held => {
                    // Another replica holds the calculation; its budget wait is its own.
                    crate::flights::mark_underway();
                    l2.wait_done(&spec.key, l2.settings().wait_poll).await;
                    let epoch = self.cache.begin();
                    if let Some(e) = l2.get(&spec.key, epoch).await {
                        if floor.is_none_or(|f| e.last_refresh() > f) {
                            let e = Arc::new(e);
                            self.cache.insert(spec.key, e.clone()).await;
                            self.metrics.coalesced.inc();
                            return Some(Outcome::Stored(e));
                        }
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return None;
                    }
                }
            }
        }
    }

    /// Reads the upstream's cache for the key (never calculates), sharing concurrent reads of
    /// the same kind: [`FlightKind::Peek`] or [`FlightKind::Revalidate`].
    pub fn peek(self: &Arc<Self>, spec: &Arc<CalcSpec>, kind: FlightKind) -> Arc<Flight<Outcome>> {
        self.flights
            .join_or_start((spec.key, kind), || {
                let (app, spec) = (self.clone(), spec.clone());
                async move {
                    let revalidating = kind == FlightKind::Revalidate;
                    // "The upstream has nothing" is remembered briefly, so repeated misses of a
                    // never-calculated insight do not each cost an upstream call. It vouches for
                    // nobody: it answers only a principal confirmed within the window, and never
                    // a revalidation.
                    let confirmed = || app.is_confirmed(spec.key.partition, spec.project, Some(spec.insight));
                    if let Some(body) = app.cache.upstream_empty(&spec.key).filter(|_| !revalidating && confirmed()) {
                        let content_type = Some("application/json".to_string());
                        return Outcome::Relay(Arc::new(UpstreamResponse {
                            status: 200,
                            content_type,
                            body,
                            ..Default::default()
                        }));
                    }
                    // A read never waits for budget: a miss answers at once, as upstream would.
                    if app.budget.rate_token(&spec.principal, Duration::ZERO, false).await.is_err() {
                        return Outcome::Failed(Failure::Budget);
                    }
                    let label = if revalidating { "revalidation" } else { "peek" };
                    app.metrics.upstream_reads.with_label_values(&[label]).inc();
                    let outcome = app.call(&spec, UpstreamRefresh::ForceCache, "read").await;
                    if let Outcome::Relay(r) = &outcome {
                        if r.status == 200 {
                            app.cache.note_upstream_empty(spec.key, r.body.clone());
                        }
                    }
                    outcome
                }
            })
            .0
    }

    async fn call(&self, spec: &CalcSpec, refresh: UpstreamRefresh, kind: &'static str) -> Outcome {
        if !self.trust.admit(spec.key.partition) {
            self.metrics.trust_refusals.with_label_values(&["unconfirmed"]).inc();
            return Outcome::Failed(Failure::Unconfirmed);
        }
        let epoch = self.cache.begin();
        let started_ms = self.cache.now_ms();
        let gauge = self.metrics.in_flight.with_label_values(&[kind]);
        gauge.inc();
        let timer = self.metrics.upstream_seconds.start_timer();
        let resp = self.upstream.send(&spec.upstream_request(refresh)).await;
        timer.observe_duration();
        gauge.dec();
        let outcome = self.absorb(spec, epoch, started_ms, resp).await;
        if let Outcome::Failed(f) = &outcome {
            self.metrics.upstream_errors.with_label_values(&[f.as_str()]).inc();
            tracing::warn!(
                project = spec.project,
                insight = spec.insight,
                refresh = refresh.as_str(),
                failure = f.as_str(),
                "upstream call failed"
            );
        }
        outcome
    }

    /// Turns an upstream answer into an outcome, caching it only if it is a good insight.
    async fn absorb(
        &self,
        spec: &CalcSpec,
        epoch: u64,
        started_ms: i64,
        resp: Result<UpstreamResponse, UpstreamError>,
    ) -> Outcome {
        let resp = match resp {
            Err(e) => return Outcome::Failed(Failure::Upstream(e)),
            Ok(r) => r,
        };
        if resp.status == 200 {
            self.confirm(spec.key.partition, spec.project, Some(spec.insight));
        }
        match resp.status {
            404 => {
                // Gone for this caller (soft-deleted, or not in this project).
                self.cache.remove(&spec.key).await;
                Outcome::Relay(Arc::new(resp))
            }
            200 => match Entry::from_upstream(&resp.body, spec.insight, epoch).map(|e| e.stamped(started_ms)) {
                Ok(e) => {
                    let e = Arc::new(e);
                    self.cache.insert(spec.key, e.clone()).await;
                    Outcome::Stored(e)
                }
                Err(EntryError::NotAnObject | EntryError::WrongInsight(_)) => Outcome::Failed(Failure::Garbage),
                Err(_) => Outcome::Relay(Arc::new(resp)),
            },
            s if s >= 500 => Outcome::Failed(Failure::Status(Arc::new(resp))),
            401 | 403 => {
                // The upstream no longer accepts this principal for this project (or insight).
                let resp = Arc::new(resp);
                self.reject(spec.key.partition, spec.project, Some(spec.insight), resp.clone());
                Outcome::Relay(resp)
            }
            _ => Outcome::Relay(Arc::new(resp)),
        }
    }
}
