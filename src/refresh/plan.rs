//! What a request does: [`plan`], a pure function of the refresh mode and a [`View`] of the
//! request (cache state, a running calculation, the upstream's word on the caller), following the
//! table in docs/refresh-semantics.md §2.2 and the trust rules in docs/trust.md. It is the one
//! authority: the handler only carries out the [`Plan`], one engine call per arm, and plans again
//! when a step changed the view (a revalidation, an entry read from the upstream's cache). The
//! cache state itself comes from [`CacheState::of`], a pure function of the entry's staleness
//! facts, the clock reading and the thresholds.

use time::OffsetDateTime;

use super::mode::RefreshMode;
use super::staleness::{StaleInfo, Thresholds};

/// What the proxy's cache holds for the key, as seen at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheState {
    Miss,
    Fresh,
    /// Stale by the DEFAULT table, still fresh by the LAZY one.
    Stale,
    /// Stale by both tables.
    LazyStale,
}

impl CacheState {
    pub const ALL: [CacheState; 4] = [CacheState::Miss, CacheState::Fresh, CacheState::Stale, CacheState::LazyStale];

    pub fn of(entry: Option<&StaleInfo>, now: OffsetDateTime, t: &Thresholds) -> CacheState {
        match entry {
            None => CacheState::Miss,
            Some(e) if !e.is_stale(now, t) => CacheState::Fresh,
            Some(e) if !e.is_lazy_stale(now, t) => CacheState::Stale,
            Some(_) => CacheState::LazyStale,
        }
    }
}

/// The `refresh` value the proxy sends upstream for a calculation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamRefresh {
    /// Never calculates: reads the upstream's own cache.
    ForceCache,
    /// Calculates unless the upstream's cache is fresh.
    Blocking,
    /// Always calculates.
    ForceBlocking,
}

impl UpstreamRefresh {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamRefresh::ForceCache => "force_cache",
            UpstreamRefresh::Blocking => "blocking",
            UpstreamRefresh::ForceBlocking => "force_blocking",
        }
    }
}

/// What the proxy knows about one request when it decides what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub state: CacheState,
    /// A calculation for the key's flight is running.
    pub in_flight: bool,
    /// The upstream accepted this principal for the insight within the window, or during this
    /// request: cached data may reach it.
    pub confirmed: bool,
    /// The proxy remembers that the upstream's cache had nothing for the key.
    pub upstream_empty: bool,
    /// The entry was read from the upstream's cache during this request: answering it is a
    /// forward, not a hit.
    pub from_upstream: bool,
}

/// Work started alongside an answer from the cache (PostHog's `enqueue_async_calculation`), or
/// the status of work already running that the answer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Background {
    None,
    /// Nothing new: the answer carries the status of the calculation that is running.
    Running,
    /// `refresh_requested=False`: reuse an existing status record for the key if there is one.
    IfAbsent,
    /// `refresh_requested=True`: always a new status record (the calculation itself is still
    /// shared with one already running for the key).
    Always,
}

/// How an answer from the cache is labelled (its `Cache-Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Fresh,
    /// Stale, and nothing refreshes it now (the mode does not).
    Stale,
    StaleWhileRevalidate,
    /// Read from the upstream's cache during this request.
    FromUpstream,
}

/// Why a calculation runs; it decides whose budget turn it takes and labels the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CalcReason {
    /// A client waits: nothing was cached.
    Miss,
    /// A client waits: the entry was stale.
    Stale,
    /// A client waits: it forced a recalculation (`force_blocking`).
    Forced,
    /// Work a client asked for in the background (`async`, `force_async`, ...).
    Background,
    /// Refresh-ahead: nobody waits.
    Ahead,
}

impl CalcReason {
    pub const ALL: [CalcReason; 5] =
        [CalcReason::Miss, CalcReason::Stale, CalcReason::Forced, CalcReason::Background, CalcReason::Ahead];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CalcReason::Miss => "miss",
            CalcReason::Stale => "stale",
            CalcReason::Forced => "forced",
            CalcReason::Background => "background",
            CalcReason::Ahead => "ahead",
        }
    }

    /// Its turn for a calculation slot.
    pub fn priority(self) -> Priority {
        match self {
            CalcReason::Miss | CalcReason::Stale | CalcReason::Forced => Priority::Blocking,
            CalcReason::Background => Priority::Async,
            CalcReason::Ahead => Priority::Ahead,
        }
    }

    /// A forced recalculation never takes the key's reserved share of its rate.
    pub fn is_forced(self) -> bool {
        self == CalcReason::Forced
    }
}

/// Who is next for a project's calculation slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// A client is waiting for the answer.
    Blocking = 0,
    /// Background work a client asked for (`async`, `force_async`, ...).
    Async = 1,
    /// Refresh-ahead: nobody is waiting.
    Ahead = 2,
}

/// What one request does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Answer from the cache, starting or reporting `background` work.
    Serve { background: Background, served: Served },
    /// Cached data would reach a principal the upstream has not accepted lately: ask it again
    /// with a read that never calculates, then plan again.
    Revalidate,
    /// Nothing cached and the mode does not calculate on a miss: answer what the upstream's cache
    /// holds (`from_note`: what the proxy remembers it holds, nothing), with a new status when
    /// `enqueue` and otherwise the status of a calculation already running.
    ReadUpstreamCache { enqueue: bool, from_note: bool },
    /// Calculate (or join the running calculation) and answer with the result.
    Calculate { reason: CalcReason, refresh: UpstreamRefresh },
    /// `force_async`: answer the insight without a result and a new status, and calculate in the
    /// background. `read_first`: nothing the upstream vouched for this caller is at hand, so a
    /// read of the upstream's cache comes first (the answer's metadata, and the caller's right);
    /// `from_note` as for [`Plan::ReadUpstreamCache`].
    EnqueueOnly { read_first: bool, from_note: bool },
}

/// The one decision (module doc).
pub fn plan(mode: RefreshMode, v: &View) -> Plan {
    use CacheState::*;
    use RefreshMode::*;
    let calculate = |reason, refresh| Plan::Calculate { reason, refresh };
    let serve = |background: Background| {
        if !v.confirmed {
            return Plan::Revalidate;
        }
        let background = match background {
            Background::None if v.in_flight => Background::Running,
            b => b,
        };
        let served = match (v.from_upstream, v.state, background) {
            (true, _, _) => Served::FromUpstream,
            (_, Fresh, _) => Served::Fresh,
            (_, _, Background::None | Background::Running) => Served::Stale,
            _ => Served::StaleWhileRevalidate,
        };
        Plan::Serve { background, served }
    };
    let read = |enqueue| Plan::ReadUpstreamCache { enqueue, from_note: v.upstream_empty && v.confirmed };
    let reason = match v.state {
        Miss => CalcReason::Miss,
        _ => CalcReason::Stale,
    };
    match (mode, v.state) {
        (ForceBlocking, _) => calculate(CalcReason::Forced, UpstreamRefresh::ForceBlocking),
        (ForceAsync, state) => {
            Plan::EnqueueOnly { read_first: state == Miss || !v.confirmed, from_note: v.upstream_empty && v.confirmed }
        }
        (_, Fresh) => serve(Background::None),
        (ForceCache, Miss) => read(false),
        (ForceCache, Stale | LazyStale) => serve(Background::None),
        (Blocking, Miss | Stale | LazyStale) => calculate(reason, UpstreamRefresh::Blocking),
        (Async | LazyAsync, Miss) => read(true),
        (Async, Stale | LazyStale) => serve(Background::Always),
        (LazyAsync, Stale) => serve(Background::None),
        (LazyAsync, LazyStale) => serve(Background::IfAbsent),
        (AsyncExceptOnCacheMiss, Miss) => calculate(reason, UpstreamRefresh::Blocking),
        (AsyncExceptOnCacheMiss, Stale | LazyStale) => serve(Background::Always),
    }
}

/// Why a calculation or read gave no answer, as far as the fallback cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortfall {
    /// The upstream failed (connect, timeout, 5xx, broken answer, open circuit).
    Outage,
    /// The proxy's own budget for the upstream is spent.
    Budget,
    /// Anything else: the proxy's own failure, or the client's.
    Other,
}

/// What answers a calculation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// stale-if-error: a result we have beats an upstream outage.
    ServeStaleIfError,
    /// Over the proxy's own budget the entry stands in, for a principal the upstream accepted.
    ServeOverBudget,
    /// Over budget, for a principal not accepted lately: revalidate it first.
    RevalidateThenServeOverBudget,
    /// Nothing cached may stand in: the failure is the answer.
    Fail,
}

/// The proxy's own failure never unlocks cached data by itself (docs/trust.md).
pub fn fallback(shortfall: Shortfall, cached: bool, confirmed: bool) -> Fallback {
    match (shortfall, cached, confirmed) {
        (_, false, _) | (Shortfall::Other, _, _) => Fallback::Fail,
        (Shortfall::Outage, true, _) => Fallback::ServeStaleIfError,
        (Shortfall::Budget, true, true) => Fallback::ServeOverBudget,
        (Shortfall::Budget, true, false) => Fallback::RevalidateThenServeOverBudget,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use Background as B;
    use CacheState::*;
    use RefreshMode::*;
    use UpstreamRefresh as U;

    /// A row matches a set of views: modes, states, then in-flight, confirmed, upstream-empty and
    /// from-upstream, where `None` matches either value.
    type Row = (&'static [RefreshMode], &'static [CacheState], [Option<bool>; 4], Plan);

    const CACHED: &[CacheState] = &[Fresh, Stale, LazyStale];
    const STALE: &[CacheState] = &[Stale, LazyStale];

    const fn row(
        modes: &'static [RefreshMode],
        states: &'static [CacheState],
        in_flight: Option<bool>,
        confirmed: Option<bool>,
        upstream_empty: Option<bool>,
        from_upstream: Option<bool>,
        plan: Plan,
    ) -> Row {
        (modes, states, [in_flight, confirmed, upstream_empty, from_upstream], plan)
    }

    fn matches(f: Option<bool>, v: bool) -> bool {
        f.is_none_or(|f| f == v)
    }

    /// Every view there can be: an entry read from the upstream this request is cached, and
    /// reading it is the upstream's word on the caller; the note is only looked up for a miss.
    fn every_view() -> Vec<View> {
        let bools = [false, true];
        let mut views = Vec::new();
        for state in CacheState::ALL {
            for in_flight in bools {
                for confirmed in bools {
                    for upstream_empty in bools {
                        for from_upstream in bools {
                            // The proxy's note matters (and is looked up) only for a miss.
                            if from_upstream && (state == Miss || !confirmed) || upstream_empty && state != Miss {
                                continue;
                            }
                            views.push(View { state, in_flight, confirmed, upstream_empty, from_upstream });
                        }
                    }
                }
            }
        }
        views
    }

    /// The whole decision, one row per cell (docs/refresh-semantics.md §2.2, docs/trust.md); the
    /// test checks every (mode, view) is covered by exactly one row.
    #[test]
    fn every_cell() {
        const T: Option<bool> = Some(true);
        const F: Option<bool> = Some(false);
        const ANY: Option<bool> = None;
        let serve = |background, served| Plan::Serve { background, served };
        let calc = |reason, refresh| Plan::Calculate { reason, refresh };
        let read = |enqueue, from_note| Plan::ReadUpstreamCache { enqueue, from_note };
        let enqueue_only = |read_first, from_note| Plan::EnqueueOnly { read_first, from_note };
        use CalcReason as R;
        use Served as S;
        #[rustfmt::skip]
        let table = [
            // force_blocking always calculates; force_async always enqueues.
            row(&[ForceBlocking], &CacheState::ALL, ANY, ANY, ANY, ANY, calc(R::Forced, U::ForceBlocking)),
            row(&[ForceAsync], &[Miss], ANY, F, ANY, ANY, enqueue_only(true, false)),
            row(&[ForceAsync], &[Miss], ANY, T, F, ANY, enqueue_only(true, false)),
            row(&[ForceAsync], &[Miss], ANY, T, T, ANY, enqueue_only(true, true)),
            row(&[ForceAsync], CACHED, ANY, F, ANY, ANY, enqueue_only(true, false)),
            row(&[ForceAsync], CACHED, ANY, T, F, ANY, enqueue_only(false, false)),
            // Cached data never reaches a caller the upstream has not accepted lately.
            row(&[ForceCache, Blocking, Async, LazyAsync, AsyncExceptOnCacheMiss], &[Fresh], ANY, F, ANY, ANY, Plan::Revalidate),
            row(&[ForceCache, LazyAsync], STALE, ANY, F, ANY, ANY, Plan::Revalidate),
            row(&[Async, AsyncExceptOnCacheMiss], STALE, ANY, F, ANY, ANY, Plan::Revalidate),
            // Fresh: served; with the running calculation's status when there is one.
            row(&[ForceCache, Blocking, Async, LazyAsync, AsyncExceptOnCacheMiss], &[Fresh], F, T, ANY, F, serve(B::None, S::Fresh)),
            row(&[ForceCache, Blocking, Async, LazyAsync, AsyncExceptOnCacheMiss], &[Fresh], T, T, ANY, F, serve(B::Running, S::Fresh)),
            row(&[ForceCache, Blocking, Async, LazyAsync, AsyncExceptOnCacheMiss], &[Fresh], F, T, ANY, T, serve(B::None, S::FromUpstream)),
            row(&[ForceCache, Blocking, Async, LazyAsync, AsyncExceptOnCacheMiss], &[Fresh], T, T, ANY, T, serve(B::Running, S::FromUpstream)),
            // force_cache: never calculates.
            row(&[ForceCache], &[Miss], ANY, F, ANY, ANY, read(false, false)),
            row(&[ForceCache], &[Miss], ANY, T, F, ANY, read(false, false)),
            row(&[ForceCache], &[Miss], ANY, T, T, ANY, read(false, true)),
            row(&[ForceCache], STALE, F, T, ANY, F, serve(B::None, S::Stale)),
            row(&[ForceCache], STALE, T, T, ANY, F, serve(B::Running, S::Stale)),
            row(&[ForceCache], STALE, F, T, ANY, T, serve(B::None, S::FromUpstream)),
            row(&[ForceCache], STALE, T, T, ANY, T, serve(B::Running, S::FromUpstream)),
            // blocking: calculates unless fresh.
            row(&[Blocking], &[Miss], ANY, ANY, ANY, ANY, calc(R::Miss, U::Blocking)),
            row(&[Blocking], STALE, ANY, ANY, ANY, ANY, calc(R::Stale, U::Blocking)),
            // async, lazy_async: a miss reads the upstream's cache and enqueues.
            row(&[Async, LazyAsync], &[Miss], ANY, F, ANY, ANY, read(true, false)),
            row(&[Async, LazyAsync], &[Miss], ANY, T, F, ANY, read(true, false)),
            row(&[Async, LazyAsync], &[Miss], ANY, T, T, ANY, read(true, true)),
            // async: stale is served while it recalculates.
            row(&[Async, AsyncExceptOnCacheMiss], STALE, ANY, T, ANY, F, serve(B::Always, S::StaleWhileRevalidate)),
            row(&[Async, AsyncExceptOnCacheMiss], STALE, ANY, T, ANY, T, serve(B::Always, S::FromUpstream)),
            // lazy_async: merely stale is served as it is; lazily stale starts work, reusing a
            // status for the key.
            row(&[LazyAsync], &[Stale], F, T, ANY, F, serve(B::None, S::Stale)),
            row(&[LazyAsync], &[Stale], T, T, ANY, F, serve(B::Running, S::Stale)),
            row(&[LazyAsync], &[Stale], F, T, ANY, T, serve(B::None, S::FromUpstream)),
            row(&[LazyAsync], &[Stale], T, T, ANY, T, serve(B::Running, S::FromUpstream)),
            row(&[LazyAsync], &[LazyStale], ANY, T, ANY, F, serve(B::IfAbsent, S::StaleWhileRevalidate)),
            row(&[LazyAsync], &[LazyStale], ANY, T, ANY, T, serve(B::IfAbsent, S::FromUpstream)),
            // async_except_on_cache_miss: a miss calculates as blocking does.
            row(&[AsyncExceptOnCacheMiss], &[Miss], ANY, ANY, ANY, ANY, calc(R::Miss, U::Blocking)),
        ];
        let views = every_view();
        let mut cells = 0;
        for mode in RefreshMode::ALL {
            for v in &views {
                let flags = [v.in_flight, v.confirmed, v.upstream_empty, v.from_upstream];
                let covers = |(modes, states, pattern, _): &&Row| {
                    modes.contains(&mode)
                        && states.contains(&v.state)
                        && pattern.iter().zip(flags).all(|(p, f)| matches(*p, f))
                };
                let rows: Vec<&Row> = table.iter().filter(covers).collect();
                assert_eq!(rows.len(), 1, "{mode:?} {v:?} is covered by {} rows", rows.len());
                assert_eq!(plan(mode, v), rows[0].3, "{mode:?} {v:?}");
                cells += 1;
            }
        }
        assert_eq!(cells, RefreshMode::ALL.len() * views.len());
    }

    #[test]
    fn reasons_take_their_turn() {
        for r in CalcReason::ALL {
            let want = match r {
                CalcReason::Background => Priority::Async,
                CalcReason::Ahead => Priority::Ahead,
                _ => Priority::Blocking,
            };
            assert_eq!(r.priority(), want, "{r:?}");
            assert_eq!(r.is_forced(), r == CalcReason::Forced);
        }
        let labels: std::collections::HashSet<_> = CalcReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), CalcReason::ALL.len());
    }

    #[test]
    fn only_an_upstream_outage_or_the_budget_unlocks_cached_data() {
        use Fallback::*;
        use Shortfall::*;
        #[rustfmt::skip]
        let table = [
            (Outage, false, false, Fail), (Outage, false, true, Fail),
            (Outage, true, false, ServeStaleIfError), (Outage, true, true, ServeStaleIfError),
            (Budget, false, false, Fail), (Budget, false, true, Fail),
            (Budget, true, false, RevalidateThenServeOverBudget), (Budget, true, true, ServeOverBudget),
            (Other, false, false, Fail), (Other, false, true, Fail),
            (Other, true, false, Fail), (Other, true, true, Fail),
        ];
        for (shortfall, cached, confirmed, want) in table {
            assert_eq!(
                fallback(shortfall, cached, confirmed),
                want,
                "{shortfall:?} cached={cached} confirmed={confirmed}"
            );
        }
    }

    #[test]
    fn cache_state_from_staleness() {
        use crate::refresh::staleness::Interval;
        use time::macros::datetime;
        let t = Thresholds::uniform(Duration::from_secs(60), Duration::from_secs(120));
        let lr = datetime!(2026-01-01 00:00 UTC);
        let e = StaleInfo { last_refresh: lr, interval: Interval::Day, date_to: None };
        let at = |s: i64| lr + time::Duration::seconds(s);
        assert_eq!(CacheState::of(None, at(0), &t), Miss);
        assert_eq!(CacheState::of(Some(&e), at(60), &t), Fresh);
        assert_eq!(CacheState::of(Some(&e), at(61), &t), Stale);
        assert_eq!(CacheState::of(Some(&e), at(121), &t), LazyStale);
    }
}
