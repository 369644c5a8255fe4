//! How a calculation happens: one single-flight upstream call per key (across replicas with the
//! shared tier), within the budget, whose good result lands in the cache; and the reads that never
//! calculate. Variants of one upstream cache key (a group) share their calculation.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::spec::CalcSpec;
use super::{Engine, FlightKind, Outcome};
use crate::cache::l2::Lease;
use crate::cache::{CacheKey, Entry, EntryError};
use crate::failure::Failure;
use crate::flights::{Flight, Underway};
use crate::refresh::{CalcReason, Priority, UpstreamRefresh};
use crate::upstream::{UpstreamError, UpstreamResponse};

/// How long background work waits for budget once a worker took it. Workers take a job only with
/// its key's token and a slot of its project promised (the engine's queue), so this covers a slot
/// a blocking client took meanwhile; the job then goes back to its lane instead of holding the
/// worker.
const BACKGROUND_BUDGET_WAIT: Duration = Duration::from_secs(1);
/// How long refresh-ahead waits for budget once a worker took it.
const AHEAD_BUDGET_WAIT: Duration = Duration::from_secs(1);
/// How long a forced read of a cached entry waits for budget before it is answered from the entry.
const FORCED_PATIENCE: Duration = Duration::from_secs(1);

impl Engine {
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
    /// variant's calculation it then asks the upstream itself ([`Engine::calculate`]).
    pub fn flight_key(&self, spec: &CalcSpec, entry: Option<&Entry>) -> CacheKey {
        flight_of(&spec.key, entry)
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

    /// A waiting client's calculation for `spec` (`own`: its entry now), run or joined under the
    /// flight of its group ([`Engine::flight_key`]). Returns the outcome and whether this call
    /// started the flight it took it from.
    pub async fn calculate(
        self: &Arc<Self>,
        spec: &Arc<CalcSpec>,
        own: Option<&Arc<Entry>>,
        reason: CalcReason,
        refresh: UpstreamRefresh,
    ) -> (Outcome, bool) {
        // A forced read of a cached entry already has an answer it could be given: it waits about
        // a second for budget, not the full `wait_ms`, and is then answered from the entry.
        let patience = match (reason, own) {
            (CalcReason::Forced, Some(_)) => FORCED_PATIENCE.min(self.budget.settings().wait),
            _ => self.budget.settings().wait,
        };
        let ask = Ask { flight: self.flight_key(spec, own.map(|e| &**e)), refresh, reason, patience };
        let (outcome, started) = self.calculate_under(spec, own, ask, |f| self.wait_as_client(f, patience)).await;
        (outcome.unwrap_or(Outcome::Failed(Failure::Interrupted)), started)
    }

    /// A client's wait on a calculation it started or joined: like its own budget wait, at most
    /// `patience` for the work to get underway (joined background work may still be queued behind
    /// other work), then the upstream's time.
    async fn wait_as_client(&self, flight: Arc<Flight<Outcome>>, patience: Duration) -> Option<Outcome> {
        if tokio::time::timeout(patience, flight.underway()).await.is_err() {
            return Some(Outcome::Failed(Failure::Budget));
        }
        match tokio::time::timeout(self.config.connect_timeout + self.config.read_timeout, flight.wait()).await {
            Ok(outcome) => outcome,
            Err(_) => Some(Outcome::Failed(Failure::Upstream(UpstreamError::Timeout))),
        }
    }

    /// Calculates for `spec` under `ask.flight` (its own key or its group's), or joins that
    /// calculation, and takes the result as this variant's ([`Engine::adopt`]); if the flight was
    /// another variant's whose upstream key changed meanwhile, calculates under the variant's own
    /// key. `wait` is how the caller waits on a flight (`None`: the work was abandoned). Returns
    /// the outcome and whether this call started the flight it took it from.
    pub(super) async fn calculate_under<W, F>(
        self: &Arc<Self>,
        spec: &Arc<CalcSpec>,
        own: Option<&Arc<Entry>>,
        ask: Ask,
        wait: W,
    ) -> (Option<Outcome>, bool)
    where
        W: Fn(Arc<Flight<Outcome>>) -> F,
        F: Future<Output = Option<Outcome>>,
    {
        // The alias is not confirmed lately: another variant's result does not answer for this one
        // until the upstream says again that it computes them identically.
        let mut unconfirmed = own.is_some_and(|e| e.group != 0 && !self.alias_usable(e, self.clock.now()));
        let mut ask = ask;
        let mut adopted: Option<Outcome> = None;
        loop {
            let (running, started) = self.calculation(spec, ask, None);
            let Some(outcome) = wait(running).await else { return (adopted, started) };
            let ours = started || ask.flight == spec.key;
            match self.adopt(spec, own, outcome, ours).await {
                // Joined after the group's calculation: the upstream answers this variant from the
                // cache that calculation just filled (no calculation) unless its key changed.
                Some(outcome) if unconfirmed && !ours => {
                    unconfirmed = false;
                    ask = Ask { flight: spec.key, refresh: UpstreamRefresh::Blocking, ..ask };
                    adopted = Some(outcome);
                }
                Some(Outcome::Failed(_)) if adopted.is_some() => return (adopted, started),
                Some(outcome) => return (Some(outcome), started),
                None => ask.flight = spec.key,
            }
        }
    }

    /// Joins the running calculation under `ask.flight` (see [`Engine::flight_key`]), or starts
    /// one. Returns the flight and whether this call started it. `ahead_of`: for refresh-ahead,
    /// the `last_refresh` it means to replace (and the upstream key); if something newer arrived
    /// meanwhile it does nothing, and if another partition's result is newer upstream it reads
    /// that (`blocking`) instead of calculating.
    pub(super) fn calculation(
        self: &Arc<Self>,
        spec: &Arc<CalcSpec>,
        ask: Ask,
        ahead_of: Option<(OffsetDateTime, u128)>,
    ) -> (Arc<Flight<Outcome>>, bool) {
        let (flight, started) = self.flights.join_or_start((ask.flight, FlightKind::Calculate), |underway| {
            let (engine, spec) = (self.clone(), spec.clone());
            async move {
                match engine.shared_flight(&spec, ask, ahead_of, &underway).await {
                    Some(outcome) => outcome,
                    None => engine.calculate_here(&spec, ask, ahead_of, &underway).await,
                }
            }
        });
        if started {
            // A read of a fresh entry of this flight now reports the calculation: an answer
            // assembled before it is not reused.
            self.cache.note_change(spec.project);
        } else {
            self.metrics.coalesced.inc();
        }
        (flight, started)
    }

    /// One calculation on this replica, within the budget: a slot for the project (by priority),
    /// a global permit, and a rate token for the credential.
    async fn calculate_here(
        &self,
        spec: &Arc<CalcSpec>,
        ask: Ask,
        ahead_of: Option<(OffsetDateTime, u128)>,
        underway: &Underway,
    ) -> Outcome {
        if let Some(done) = self.superseded(spec, ahead_of).await {
            return done;
        }
        let priority = ask.reason.priority();
        let wait = ask.patience;
        let deadline = tokio::time::Instant::now() + wait;
        // Background work a worker took was granted its token (and promised a slot) then.
        let granted = priority != Priority::Blocking && self.budget.claim_grant(&spec.key);
        // The rate token first: a slot is never held while waiting for rate.
        if !granted && self.budget.rate_token(&spec.principal, wait, ask.reason.is_forced()).await.is_err() {
            return Outcome::Failed(Failure::Budget);
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(_slot) = self.budget.slot(spec.project, priority, left).await else {
            return Outcome::Failed(Failure::Budget);
        };
        let _permit = self.calc_permits.acquire().await;
        underway.mark();
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
            _ => ask.refresh,
        };
        self.metrics.calculations.with_label_values(&[ask.reason.as_str()]).inc();
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
        ask: Ask,
        ahead_of: Option<(OffsetDateTime, u128)>,
        underway: &Underway,
    ) -> Option<Outcome> {
        let l2 = self.cache.l2()?.clone();
        // What counts as an answer: newer than what this replica has, or, when forced, newer
        // than the request.
        let current = self.cache.get_local(&spec.key).await.map(|e| e.last_refresh());
        let floor = match ask.refresh {
            UpstreamRefresh::ForceBlocking => Some(self.clock.now() - time::Duration::seconds(1)),
            _ => current,
        };
        let deadline = tokio::time::Instant::now() + self.config.read_timeout;
        loop {
            match l2.try_lease(&spec.key).await {
                Lease::Unavailable => return None,
                Lease::Acquired(token) => {
                    // Another replica may have finished this calculation after this one looked:
                    // its result (fresh, or newer than a forced request) stands instead of a
                    // second calculation.
                    if let Some(e) = self.newer_shared(&spec.key, floor).await {
                        let forced = ask.refresh == UpstreamRefresh::ForceBlocking;
                        if forced || !e.stale.is_stale(self.clock.now(), &self.config.thresholds) {
                            l2.release(&spec.key, &token).await;
                            self.metrics.coalesced.inc();
                            return Some(Outcome::Stored(e));
                        }
                    }
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
                    let outcome = self.calculate_here(spec, ask, ahead_of, underway).await;
                    renewer.abort();
                    l2.release(&spec.key, &token).await;
                    return Some(outcome);
                }
                Lease::Held => {
                    // Another replica holds the calculation; its budget wait is its own.
                    underway.mark();
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

    /// What the upstream's cache holds for the key (a read that never calculates), shared with
    /// concurrent reads of the key.
    pub async fn read_upstream_cache(self: &Arc<Self>, spec: &Arc<CalcSpec>) -> Outcome {
        self.read(spec, "peek").await
    }

    /// The same read made to ask whether the upstream still accepts the caller.
    /// Another replica's word on the caller, from the shared tier, stands in for it.
    pub async fn revalidate(self: &Arc<Self>, spec: &Arc<CalcSpec>) -> Outcome {
        if let Some(word) = self.shared_word(spec).await {
            return word;
        }
        self.metrics.revalidations.inc();
        self.read(spec, "revalidation").await
    }

    /// A read of the upstream's cache (`refresh=force_cache`), labelled `label` in the metrics.
    async fn read(self: &Arc<Self>, spec: &Arc<CalcSpec>, label: &'static str) -> Outcome {
        let (flight, _) = self.flights.join_or_start((spec.key, FlightKind::Read), |_| {
            let (engine, spec) = (self.clone(), spec.clone());
            async move {
                // A read never waits for budget: a miss answers at once, as upstream would.
                if engine.budget.rate_token(&spec.principal, Duration::ZERO, false).await.is_err() {
                    return Outcome::Failed(Failure::Budget);
                }
                engine.metrics.upstream_reads.with_label_values(&[label]).inc();
                let outcome = engine.call(&spec, UpstreamRefresh::ForceCache, "read").await;
                if let Outcome::Relay(r) = &outcome {
                    if r.status == 200 {
                        // "The upstream has nothing", remembered briefly so repeated misses of a
                        // never-calculated insight do not each cost an upstream call
                        // ([`crate::refresh::View::upstream_empty`]).
                        engine.cache.note_upstream_empty(spec.key, r.body.clone());
                    }
                }
                outcome
            }
        });
        flight.wait().await.unwrap_or(Outcome::Failed(Failure::Interrupted))
    }

    async fn call(&self, spec: &CalcSpec, refresh: UpstreamRefresh, kind: &'static str) -> Outcome {
        if !self.trust.admit(spec.key.partition) {
            self.metrics.trust_refusals.with_label_values(&["unconfirmed"]).inc();
            return Outcome::Failed(Failure::Unconfirmed);
        }
        let started =
            Started { epoch: self.cache.begin(), ms: self.cache.now_ms(), version: self.cache.shared_version().await };
        let gauge = self.metrics.in_flight.with_label_values(&[kind]);
        gauge.inc();
        let timer = self.metrics.upstream_seconds.start_timer();
        let resp = self.upstream.send(&spec.upstream_request(refresh)).await;
        timer.observe_duration();
        gauge.dec();
        let outcome = self.absorb(spec, started, resp).await;
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
        started: Started,
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
            200 => match Entry::from_upstream(&resp.body, spec.insight, started.epoch)
                .map(|e| e.stamped(started.ms).versioned(started.version))
            {
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

/// When an upstream call started, on each clock its result is ordered by: the local cache epoch
/// (purges here), the wall clock (this replica's bookkeeping) and the shared tier's version
/// (purges on any replica).
struct Started {
    epoch: u64,
    ms: i64,
    version: Option<u64>,
}

/// One calculation asked for: under which flight, with which `refresh`, why, and how long it
/// waits for budget.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ask {
    pub flight: CacheKey,
    pub refresh: UpstreamRefresh,
    pub reason: CalcReason,
    pub patience: Duration,
}

impl Ask {
    /// Background work a client asked for, taken by a worker.
    pub fn background(flight: CacheKey, refresh: UpstreamRefresh) -> Ask {
        Ask { flight, refresh, reason: CalcReason::Background, patience: BACKGROUND_BUDGET_WAIT }
    }

    /// Refresh-ahead: it only uses budget nobody is waiting for; the next read retries.
    pub fn ahead(flight: CacheKey, refresh: UpstreamRefresh) -> Ask {
        Ask { flight, refresh, reason: CalcReason::Ahead, patience: AHEAD_BUDGET_WAIT }
    }
}

/// The flight of a calculation for `key` holding `entry` ([`Engine::flight_key`]).
pub(super) fn flight_of(key: &CacheKey, entry: Option<&Entry>) -> CacheKey {
    match entry {
        Some(e) if e.group != 0 => key.group_key(e.group),
        _ => *key,
    }
}
