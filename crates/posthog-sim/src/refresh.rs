//! `refresh` parsing on the insights endpoints (§1), the pure per-mode decision (§2.2) and the
//! advisory `next_allowed_client_refresh` gap (§4.3). Staleness itself is the crate's
//! [`crate::refresh::StaleInfo`]: upstream and the proxy share that rule.

use crate::staleness::Interval;
use serde_json::Value;
use std::time::Duration;

/// PostHog's `ExecutionMode`, named by its `refresh` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefreshMode {
    ForceCache,
    Blocking,
    Async,
    LazyAsync,
    AsyncExceptOnCacheMiss,
    ForceBlocking,
    ForceAsync,
}

impl RefreshMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ForceCache => "force_cache",
            Self::Blocking => "blocking",
            Self::Async => "async",
            Self::LazyAsync => "lazy_async",
            Self::AsyncExceptOnCacheMiss => "async_except_on_cache_miss",
            Self::ForceBlocking => "force_blocking",
            Self::ForceAsync => "force_async",
        }
    }

    /// The allow-list of `refresh_requested_by_client` (UT): case-sensitive, and without
    /// `async_except_on_cache_miss`, which the insights endpoints do not accept.
    fn from_insights_allow_list(s: &str) -> Option<Self> {
        Some(match s {
            "async" => Self::Async,
            "blocking" => Self::Blocking,
            "force_async" => Self::ForceAsync,
            "force_blocking" => Self::ForceBlocking,
            "force_cache" => Self::ForceCache,
            "lazy_async" => Self::LazyAsync,
            _ => return None,
        })
    }
}

/// The parsed `refresh` of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefreshParam {
    pub mode: RefreshMode,
    /// `refresh_requested_by_client` returned `True` or a mode name. Decides the `timezone` field (§4.2).
    pub truthy: bool,
}

/// `_request_has_key_set("refresh", …)` + `execution_mode_from_refresh` (UT, QR25):
/// the query-string value wins over the body's; a JSON boolean counts as itself, anything else
/// as Python's `str()` of it (so the number `1` is `"1"`, true; `1.0` is `"1.0"`, unknown);
/// absent, false-ish or unknown → `force_cache`.
pub fn parse_refresh(query: Option<&str>, body: Option<&Value>) -> RefreshParam {
    let text: Option<std::borrow::Cow<'_, str>> = match (query, body) {
        (Some(q), _) => Some(q.into()),
        (None, None | Some(Value::Null)) => None,
        (None, Some(Value::Bool(b))) => {
            return if *b { truthy(RefreshMode::ForceBlocking) } else { falsy() };
        }
        (None, Some(Value::String(s))) => Some(s.as_str().into()),
        // Python's str() of a number; lists and objects never match anything.
        (None, Some(Value::Number(n))) => Some(n.to_string().into()),
        (None, Some(_)) => return falsy(),
    };
    let Some(text) = text else { return falsy() };
    match text.to_lowercase().as_str() {
        "true" | "1" | "yes" | "" => return truthy(RefreshMode::ForceBlocking),
        "false" | "0" | "no" => return falsy(),
        _ => {}
    }
    match RefreshMode::from_insights_allow_list(&text) {
        Some(mode) => truthy(mode),
        None => falsy(),
    }
}

fn truthy(mode: RefreshMode) -> RefreshParam {
    RefreshParam { mode, truthy: true }
}

fn falsy() -> RefreshParam {
    RefreshParam { mode: RefreshMode::ForceCache, truthy: false }
}

/// How a cached entry compares with the DEFAULT and LAZY thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Freshness {
    pub fresh_default: bool,
    pub fresh_lazy: bool,
}

/// What to do for one (mode, cache state) cell of the §2.2 table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Return the cached entry; optionally enqueue with `refresh_requested = rr` first.
    /// `status_from_enqueue`: the body's `query_status` is what the enqueue returned
    /// (`async`), rather than the running status looked up afterwards (`lazy_async`).
    Serve { enqueue: Option<bool>, status_from_enqueue: bool },
    /// `CacheMissResponse`; optionally enqueue with `refresh_requested = rr`.
    Miss { enqueue: Option<bool> },
    /// Synchronous calculation (step 6).
    Calculate,
    /// Skip the cache and enqueue with `rr = true`; the body is only a status.
    ForceAsync,
}

pub(crate) fn decide(mode: RefreshMode, hit: Option<Freshness>) -> Decision {
    use RefreshMode::*;
    const SERVE: Decision = Decision::Serve { enqueue: None, status_from_enqueue: false };
    match (mode, hit) {
        (ForceAsync, _) => Decision::ForceAsync,
        (ForceBlocking, _) => Decision::Calculate,
        (ForceCache, Some(_)) => SERVE,
        (ForceCache, None) => Decision::Miss { enqueue: None },
        (_, Some(f)) if f.fresh_default => SERVE,
        (Blocking, Some(_)) | (Blocking, None) => Decision::Calculate,
        (Async | AsyncExceptOnCacheMiss, Some(_)) => Decision::Serve { enqueue: Some(true), status_from_enqueue: true },
        (Async | LazyAsync, None) => Decision::Miss { enqueue: Some(false) },
        (AsyncExceptOnCacheMiss, None) => Decision::Calculate,
        (LazyAsync, Some(f)) if f.fresh_lazy => SERVE,
        (LazyAsync, Some(_)) => Decision::Serve { enqueue: Some(false), status_from_enqueue: false },
    }
}

/// `_refresh_frequency` of the trends/funnels runners (TRQ, §4.3): the advisory gap between
/// `last_refresh` and `next_allowed_client_refresh`.
pub fn next_allowed_refresh_delay(interval: Interval, range: time::Duration) -> Duration {
    const MIN: u64 = 60;
    match interval {
        Interval::Second | Interval::Minute => Duration::from_secs(MIN),
        Interval::Hour => Duration::from_secs(3 * MIN),
        _ if range <= time::Duration::days(7) => Duration::from_secs(3 * MIN),
        _ => Duration::from_secs(15 * MIN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use RefreshMode::*;

    fn q(s: &str) -> RefreshParam {
        parse_refresh(Some(s), None)
    }

    #[test]
    fn query_string_values() {
        for t in ["true", "TRUE", "1", "yes", "Yes", ""] {
            assert_eq!(q(t), RefreshParam { mode: ForceBlocking, truthy: true }, "{t:?}");
        }
        for f in ["false", "False", "0", "no", "NO"] {
            assert_eq!(q(f), RefreshParam { mode: ForceCache, truthy: false }, "{f:?}");
        }
        for (s, m) in [
            ("async", Async),
            ("blocking", Blocking),
            ("force_async", ForceAsync),
            ("force_blocking", ForceBlocking),
            ("force_cache", ForceCache),
            ("lazy_async", LazyAsync),
        ] {
            assert_eq!(q(s), RefreshParam { mode: m, truthy: true });
        }
        // case-sensitive mode names; async_except_on_cache_miss is not on the insights allow-list
        for s in ["Blocking", "FORCE_CACHE", "async_except_on_cache_miss", "nonsense", "2"] {
            assert_eq!(q(s), RefreshParam { mode: ForceCache, truthy: false }, "{s:?}");
        }
    }

    #[test]
    fn body_values_and_precedence() {
        let b = |v: Value| parse_refresh(None, Some(&v));
        assert_eq!(b(json!(true)).mode, ForceBlocking);
        assert_eq!(b(json!(false)), RefreshParam { mode: ForceCache, truthy: false });
        assert_eq!(b(json!("blocking")).mode, Blocking);
        assert_eq!(b(json!(1)), RefreshParam { mode: ForceBlocking, truthy: true });
        assert_eq!(b(json!(0)), RefreshParam { mode: ForceCache, truthy: false });
        assert_eq!(b(json!(1.5)).mode, ForceCache);
        assert_eq!(b(serde_json::from_str::<Value>("1.0").unwrap()), RefreshParam { mode: ForceCache, truthy: false });
        assert_eq!(b(json!({"mode": "blocking"})), RefreshParam { mode: ForceCache, truthy: false });
        assert_eq!(b(json!(null)), RefreshParam { mode: ForceCache, truthy: false });
        assert_eq!(b(json!(["blocking"])).mode, ForceCache);
        // the query string wins even when its value is unknown
        assert_eq!(parse_refresh(Some("bogus"), Some(&json!("blocking"))).mode, ForceCache);
        assert_eq!(parse_refresh(None, None), RefreshParam { mode: ForceCache, truthy: false });
    }

    #[test]
    fn decision_table() {
        let fresh = Some(Freshness { fresh_default: true, fresh_lazy: true });
        let lazy_fresh = Some(Freshness { fresh_default: false, fresh_lazy: true });
        let stale = Some(Freshness { fresh_default: false, fresh_lazy: false });
        let serve = Decision::Serve { enqueue: None, status_from_enqueue: false };
        let serve_rr = Decision::Serve { enqueue: Some(true), status_from_enqueue: true };
        let serve_lazy = Decision::Serve { enqueue: Some(false), status_from_enqueue: false };
        let rows = [
            (ForceCache, [serve, serve, serve, Decision::Miss { enqueue: None }]),
            (Blocking, [serve, Decision::Calculate, Decision::Calculate, Decision::Calculate]),
            (Async, [serve, serve_rr, serve_rr, Decision::Miss { enqueue: Some(false) }]),
            (LazyAsync, [serve, serve, serve_lazy, Decision::Miss { enqueue: Some(false) }]),
            (AsyncExceptOnCacheMiss, [serve, serve_rr, serve_rr, Decision::Calculate]),
            (ForceBlocking, [Decision::Calculate; 4]),
            (ForceAsync, [Decision::ForceAsync; 4]),
        ];
        for (mode, expected) in rows {
            for (state, want) in [fresh, lazy_fresh, stale, None].into_iter().zip(expected) {
                assert_eq!(decide(mode, state), want, "{mode:?} {state:?}");
            }
        }
    }

    #[test]
    fn refresh_frequency() {
        let d = time::Duration::days;
        assert_eq!(next_allowed_refresh_delay(Interval::Minute, d(30)), Duration::from_secs(60));
        assert_eq!(next_allowed_refresh_delay(Interval::Hour, d(30)), Duration::from_secs(180));
        assert_eq!(next_allowed_refresh_delay(Interval::Day, d(7)), Duration::from_secs(180));
        assert_eq!(next_allowed_refresh_delay(Interval::Day, d(8)), Duration::from_secs(900));
    }
}
