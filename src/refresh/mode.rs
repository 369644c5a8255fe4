//! Parsing `refresh` exactly as PostHog's `refresh_requested_by_client` + `execution_mode_from_refresh`
//! do (docs/refresh-semantics.md §1.1, §1.2), except that `async_except_on_cache_miss` is accepted:
//! the API document lists it, so the proxy makes it work (§1.3).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefreshMode {
    ForceCache,
    Blocking,
    Async,
    LazyAsync,
    ForceBlocking,
    ForceAsync,
    AsyncExceptOnCacheMiss,
}

impl RefreshMode {
    pub const ALL: [RefreshMode; 7] = [
        RefreshMode::ForceCache,
        RefreshMode::Blocking,
        RefreshMode::Async,
        RefreshMode::LazyAsync,
        RefreshMode::ForceBlocking,
        RefreshMode::ForceAsync,
        RefreshMode::AsyncExceptOnCacheMiss,
    ];

    /// `force_blocking` and `force_async`: the client asks for a recalculation whatever is cached.
    pub fn is_forced(self) -> bool {
        matches!(self, RefreshMode::ForceBlocking | RefreshMode::ForceAsync)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RefreshMode::ForceCache => "force_cache",
            RefreshMode::Blocking => "blocking",
            RefreshMode::Async => "async",
            RefreshMode::LazyAsync => "lazy_async",
            RefreshMode::ForceBlocking => "force_blocking",
            RefreshMode::ForceAsync => "force_async",
            RefreshMode::AsyncExceptOnCacheMiss => "async_except_on_cache_miss",
        }
    }

    /// Mode names match case-sensitively, as upstream.
    fn from_name(s: &str) -> Option<Self> {
        RefreshMode::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

impl fmt::Display for RefreshMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The raw `refresh` value as the client sent it: from the query string (a string) or from a JSON
/// body (a boolean or a string). The query string wins, as upstream reads it first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshParam<'a> {
    Absent,
    Text(&'a str),
    Bool(bool),
}

impl RefreshParam<'_> {
    /// Whether PostHog counts the value as a refresh at all: a known mode or a true-ish word.
    /// Absent, false-ish and unknown values are not, and then an answer's `timezone` is the one
    /// stored with the result (null on a miss) rather than the team's.
    pub fn truthy(&self) -> bool {
        match *self {
            RefreshParam::Absent => false,
            RefreshParam::Bool(b) => b,
            RefreshParam::Text(s) => s == "force_cache" || self.mode() != RefreshMode::ForceCache,
        }
    }

    /// The execution mode.
    pub fn mode(&self) -> RefreshMode {
        match *self {
            RefreshParam::Absent | RefreshParam::Bool(false) => RefreshMode::ForceCache,
            RefreshParam::Bool(true) => RefreshMode::ForceBlocking,
            RefreshParam::Text(s) => {
                if let Some(m) = RefreshMode::from_name(s) {
                    m
                } else if s.is_empty() || ["true", "1", "yes"].iter().any(|t| s.eq_ignore_ascii_case(t)) {
                    RefreshMode::ForceBlocking
                } else {
                    // "false"/"0"/"no" and anything unknown: silently force_cache.
                    RefreshMode::ForceCache
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RefreshMode::*;

    #[test]
    fn parses_like_posthog() {
        let cases: &[(RefreshParam, RefreshMode)] = &[
            (RefreshParam::Absent, ForceCache),
            (RefreshParam::Text(""), ForceBlocking),
            (RefreshParam::Text("true"), ForceBlocking),
            (RefreshParam::Text("TRUE"), ForceBlocking),
            (RefreshParam::Text("1"), ForceBlocking),
            (RefreshParam::Text("Yes"), ForceBlocking),
            (RefreshParam::Text("false"), ForceCache),
            (RefreshParam::Text("0"), ForceCache),
            (RefreshParam::Text("no"), ForceCache),
            (RefreshParam::Text("blocking"), Blocking),
            (RefreshParam::Text("Blocking"), ForceCache),
            (RefreshParam::Text("async"), Async),
            (RefreshParam::Text("lazy_async"), LazyAsync),
            (RefreshParam::Text("force_blocking"), ForceBlocking),
            (RefreshParam::Text("force_async"), ForceAsync),
            (RefreshParam::Text("force_cache"), ForceCache),
            (RefreshParam::Text("async_except_on_cache_miss"), AsyncExceptOnCacheMiss),
            (RefreshParam::Text("bogus"), ForceCache),
            (RefreshParam::Text("\u{0}\u{ffff}"), ForceCache),
            (RefreshParam::Bool(true), ForceBlocking),
            (RefreshParam::Bool(false), ForceCache),
        ];
        for (param, want) in cases {
            assert_eq!(param.mode(), *want, "{param:?}");
            // Only absent, false-ish and unknown values are not a refresh.
            let falsy = matches!(param, RefreshParam::Absent | RefreshParam::Bool(false))
                || matches!(param, RefreshParam::Text(s) if ["false", "0", "no", "Blocking", "bogus", "\u{0}\u{ffff}"].contains(s));
            assert_eq!(param.truthy(), !falsy, "{param:?}");
        }
    }
}
