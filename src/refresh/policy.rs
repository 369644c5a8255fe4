//! The refresh decision: a pure function of (mode, cache state, in-flight state), following the
//! table in docs/refresh-semantics.md §2.2. The cache state itself comes from [`CacheState::of`], a pure
//! function of the entry's staleness facts, the clock reading and the thresholds.

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

/// Background work to start alongside an answer (PostHog's `enqueue_async_calculation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Background {
    None,
    /// `refresh_requested=False`: reuse an existing status record for the key if there is one.
    IfAbsent,
    /// `refresh_requested=True`: always a new status record (the calculation itself is still
    /// shared with one already running for the key).
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Answer from the cache (fresh or stale), starting `background` work.
    Serve { background: Background },
    /// Nothing cached under `force_cache`: ask the upstream's cache, which never calculates.
    Peek,
    /// Nothing cached under `force_cache`, but a calculation for the key is running: answer a
    /// cache miss carrying its status, without asking the upstream.
    MissRunning,
    /// Calculate synchronously and answer with the result; `join` = share the running calculation.
    Calculate { refresh: UpstreamRefresh, join: bool },
    /// Answer a cache miss with a `query_status`, and calculate in the background (rr=False).
    MissEnqueue,
    /// `force_async`: answer only a fresh `query_status`; calculate in the background (rr=True).
    ForceEnqueue,
}

pub fn decide(mode: RefreshMode, state: CacheState, in_flight: bool) -> Decision {
    use CacheState::*;
    use Decision::*;
    use RefreshMode::*;
    let calculate = |refresh| Calculate { refresh, join: in_flight };
    match (mode, state) {
        (ForceBlocking, _) => calculate(UpstreamRefresh::ForceBlocking),
        (ForceAsync, _) => ForceEnqueue,
        (_, Fresh) => Serve { background: Background::None },
        (ForceCache, Miss) if in_flight => MissRunning,
        (ForceCache, Miss) => Peek,
        (ForceCache, Stale | LazyStale) => Serve { background: Background::None },
        (Blocking, Miss | Stale | LazyStale) => calculate(UpstreamRefresh::Blocking),
        (Async, Miss) | (LazyAsync, Miss) => MissEnqueue,
        (Async, Stale | LazyStale) => Serve { background: Background::Always },
        (LazyAsync, Stale) => Serve { background: Background::None },
        (LazyAsync, LazyStale) => Serve { background: Background::IfAbsent },
        (AsyncExceptOnCacheMiss, Miss) => calculate(UpstreamRefresh::Blocking),
        (AsyncExceptOnCacheMiss, Stale | LazyStale) => Serve { background: Background::Always },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use Background as B;
    use CacheState::*;
    use Decision::*;
    use RefreshMode::*;
    use UpstreamRefresh as U;

    /// One row per cell: mode × cache state × in-flight (docs/refresh-semantics.md §2.2).
    #[test]
    fn every_cell() {
        let serve = |background| Serve { background };
        let calc = |refresh, join| Calculate { refresh, join };
        #[rustfmt::skip]
        let table: &[(RefreshMode, CacheState, bool, Decision)] = &[
            (ForceCache, Miss, false, Peek),
            (ForceCache, Miss, true, MissRunning),
            (ForceCache, Fresh, false, serve(B::None)),
            (ForceCache, Fresh, true, serve(B::None)),
            (ForceCache, Stale, false, serve(B::None)),
            (ForceCache, Stale, true, serve(B::None)),
            (ForceCache, LazyStale, false, serve(B::None)),
            (ForceCache, LazyStale, true, serve(B::None)),
            (Blocking, Miss, false, calc(U::Blocking, false)),
            (Blocking, Miss, true, calc(U::Blocking, true)),
            (Blocking, Fresh, false, serve(B::None)),
            (Blocking, Fresh, true, serve(B::None)),
            (Blocking, Stale, false, calc(U::Blocking, false)),
            (Blocking, Stale, true, calc(U::Blocking, true)),
            (Blocking, LazyStale, false, calc(U::Blocking, false)),
            (Blocking, LazyStale, true, calc(U::Blocking, true)),
            (Async, Miss, false, MissEnqueue),
            (Async, Miss, true, MissEnqueue),
            (Async, Fresh, false, serve(B::None)),
            (Async, Fresh, true, serve(B::None)),
            (Async, Stale, false, serve(B::Always)),
            (Async, Stale, true, serve(B::Always)),
            (Async, LazyStale, false, serve(B::Always)),
            (Async, LazyStale, true, serve(B::Always)),
            (LazyAsync, Miss, false, MissEnqueue),
            (LazyAsync, Miss, true, MissEnqueue),
            (LazyAsync, Fresh, false, serve(B::None)),
            (LazyAsync, Fresh, true, serve(B::None)),
            (LazyAsync, Stale, false, serve(B::None)),
            (LazyAsync, Stale, true, serve(B::None)),
            (LazyAsync, LazyStale, false, serve(B::IfAbsent)),
            (LazyAsync, LazyStale, true, serve(B::IfAbsent)),
            (ForceBlocking, Miss, false, calc(U::ForceBlocking, false)),
            (ForceBlocking, Miss, true, calc(U::ForceBlocking, true)),
            (ForceBlocking, Fresh, false, calc(U::ForceBlocking, false)),
            (ForceBlocking, Fresh, true, calc(U::ForceBlocking, true)),
            (ForceBlocking, Stale, false, calc(U::ForceBlocking, false)),
            (ForceBlocking, Stale, true, calc(U::ForceBlocking, true)),
            (ForceBlocking, LazyStale, false, calc(U::ForceBlocking, false)),
            (ForceBlocking, LazyStale, true, calc(U::ForceBlocking, true)),
            (ForceAsync, Miss, false, ForceEnqueue),
            (ForceAsync, Miss, true, ForceEnqueue),
            (ForceAsync, Fresh, false, ForceEnqueue),
            (ForceAsync, Fresh, true, ForceEnqueue),
            (ForceAsync, Stale, false, ForceEnqueue),
            (ForceAsync, Stale, true, ForceEnqueue),
            (ForceAsync, LazyStale, false, ForceEnqueue),
            (ForceAsync, LazyStale, true, ForceEnqueue),
            (AsyncExceptOnCacheMiss, Miss, false, calc(U::Blocking, false)),
            (AsyncExceptOnCacheMiss, Miss, true, calc(U::Blocking, true)),
            (AsyncExceptOnCacheMiss, Fresh, false, serve(B::None)),
            (AsyncExceptOnCacheMiss, Fresh, true, serve(B::None)),
            (AsyncExceptOnCacheMiss, Stale, false, serve(B::Always)),
            (AsyncExceptOnCacheMiss, Stale, true, serve(B::Always)),
            (AsyncExceptOnCacheMiss, LazyStale, false, serve(B::Always)),
            (AsyncExceptOnCacheMiss, LazyStale, true, serve(B::Always)),
        ];
        assert_eq!(table.len(), RefreshMode::ALL.len() * CacheState::ALL.len() * 2);
        for &(mode, state, in_flight, want) in table {
            assert_eq!(decide(mode, state, in_flight), want, "{mode:?} {state:?} in_flight={in_flight}");
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
