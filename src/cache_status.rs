//! How an answer was produced, as a type: rendered once as the `Cache-Status` header (RFC 9211),
//! and read as a bounded metric label, never parsed back from its text. The README's
//! `Cache-Status` table lists its values.

use std::fmt;

/// The cache name every value starts with.
pub const CACHE_NAME: &str = "insights-proxy";

/// Why the answer went to the upstream (RFC 9211 `fwd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fwd {
    /// Nothing cached.
    Miss,
    /// The cached entry was stale.
    Stale,
    /// The client forced it (`force_blocking`, `force_async`) or it re-checked the caller.
    Request,
    /// A list page: its membership is the upstream's.
    UriMiss,
    /// Passed through, refused, or answered without the cache.
    Bypass,
}

/// The proxy's own word on the answer (`detail=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    Stale,
    StaleWhileRevalidate,
    StaleIfError,
    Budget,
    ListPage,
    UpstreamEmpty,
    Revalidated,
    Refused,
    /// A forced read of an entry calculated within `[refresh] forced_min_interval`.
    TooSoonToForce,
    Enqueued,
    Rejected,
    UpstreamError,
    NoCredential,
    /// A failure's own name ([`crate::failure::Failure::as_str`]).
    Failure(&'static str),
}

impl Detail {
    fn as_str(self) -> &'static str {
        match self {
            Detail::Stale => "stale",
            Detail::StaleWhileRevalidate => "stale-while-revalidate",
            Detail::StaleIfError => "stale-if-error",
            Detail::Budget => "budget",
            Detail::ListPage => "list-page",
            Detail::UpstreamEmpty => "upstream-empty",
            Detail::Revalidated => "revalidated",
            Detail::Refused => "refused",
            Detail::TooSoonToForce => "too-soon-to-force",
            Detail::Enqueued => "enqueued",
            Detail::Rejected => "rejected",
            Detail::UpstreamError => "upstream-error",
            Detail::NoCredential => "no-credential",
            Detail::Failure(name) => name,
        }
    }
}

/// One answer's `Cache-Status`: a hit (with its ttl) or a forward (with why, and what the
/// upstream said), then whether it was stored and shared, then the proxy's detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheStatus {
    /// `None`: a hit.
    fwd: Option<Fwd>,
    ttl: Option<i64>,
    fwd_status: Option<u16>,
    stored: bool,
    collapsed: bool,
    detail: Option<Detail>,
}

impl CacheStatus {
    pub fn hit() -> Self {
        Self { fwd: None, ttl: None, fwd_status: None, stored: false, collapsed: false, detail: None }
    }

    pub fn fwd(fwd: Fwd) -> Self {
        Self { fwd: Some(fwd), ..Self::hit() }
    }

    pub fn ttl(mut self, ttl: Option<i64>) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn fwd_status(mut self, status: u16) -> Self {
        self.fwd_status = Some(status);
        self
    }

    pub fn stored(mut self) -> Self {
        self.stored = true;
        self
    }

    pub fn collapsed(mut self, collapsed: bool) -> Self {
        self.collapsed = collapsed;
        self
    }

    pub fn detail(mut self, detail: Detail) -> Self {
        self.detail = Some(detail);
        self
    }

    pub fn detail_opt(mut self, detail: Option<Detail>) -> Self {
        self.detail = detail;
        self
    }

    pub fn is_hit(&self) -> bool {
        self.fwd.is_none()
    }

    /// A short, bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match (self.fwd, self.detail) {
            (None, Some(Detail::StaleIfError)) => "stale_if_error",
            (None, Some(Detail::Stale | Detail::StaleWhileRevalidate | Detail::Budget)) => "stale",
            (None, Some(Detail::UpstreamEmpty)) => "miss",
            (None, _) => "hit",
            (Some(Fwd::Miss | Fwd::UriMiss), _) => "miss",
            (Some(Fwd::Stale), _) => "refresh",
            (Some(Fwd::Request), _) => "forced",
            (Some(Fwd::Bypass), _) => "bypass",
        }
    }
}

impl CacheStatus {
    /// The header's value piece by piece: the one renderer behind [`Self::write_to`] and
    /// `Display`.
    fn pieces(&self, mut put: impl FnMut(&[u8])) {
        put(CACHE_NAME.as_bytes());
        put(match self.fwd {
            None => b"; hit",
            Some(Fwd::Miss) => b"; fwd=miss",
            Some(Fwd::Stale) => b"; fwd=stale",
            Some(Fwd::Request) => b"; fwd=request",
            Some(Fwd::UriMiss) => b"; fwd=uri-miss",
            Some(Fwd::Bypass) => b"; fwd=bypass",
        });
        let mut digits = [0u8; 20];
        if let Some(ttl) = self.ttl {
            put(b"; ttl=");
            put(decimal(ttl, &mut digits));
        }
        if let Some(s) = self.fwd_status {
            put(b"; fwd-status=");
            put(decimal(i64::from(s), &mut digits));
        }
        if self.stored {
            put(b"; stored");
        }
        if self.collapsed {
            put(b"; collapsed");
        }
        if let Some(d) = self.detail {
            put(b"; detail=");
            put(d.as_str().as_bytes());
        }
    }

    /// Appends the header's value to `out` (the fast path's response head), without `fmt`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        self.pieces(|s| out.extend_from_slice(s));
    }
}

/// `n` in decimal ASCII, in `buf` (header values written without `fmt`).
pub(crate) fn decimal(n: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    let mut m = n.unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (m % 10) as u8;
        m /= 10;
        if m == 0 {
            break;
        }
    }
    if n < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

impl fmt::Display for CacheStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut written = Ok(());
        self.pieces(|s| {
            if written.is_ok() {
                // Every piece is ASCII.
                written = std::str::from_utf8(s).map_err(|_| fmt::Error).and_then(|s| f.write_str(s));
            }
        });
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_bytes_are_its_display() {
        let details = [None, Some(Detail::Stale), Some(Detail::Rejected), Some(Detail::TooSoonToForce)];
        for fwd in [None, Some(Fwd::Miss), Some(Fwd::Bypass), Some(Fwd::UriMiss)] {
            for ttl in [None, Some(0), Some(-7), Some(86_400), Some(i64::MIN), Some(i64::MAX)] {
                for detail in details {
                    let cs =
                        CacheStatus { fwd, ttl, fwd_status: Some(503), stored: true, collapsed: ttl.is_some(), detail };
                    let mut bytes = Vec::new();
                    cs.write_to(&mut bytes);
                    assert_eq!(String::from_utf8(bytes).unwrap(), cs.to_string());
                }
            }
        }
        let mut bytes = Vec::new();
        CacheStatus::hit().ttl(Some(-12)).write_to(&mut bytes);
        assert_eq!(bytes, b"insights-proxy; hit; ttl=-12");
    }

    /// The README's `Cache-Status` table lists every detail the proxy gives.
    #[test]
    fn the_readme_table_lists_every_detail() {
        let readme = include_str!("../README.md");
        let named = [
            Detail::Stale,
            Detail::StaleWhileRevalidate,
            Detail::StaleIfError,
            Detail::Budget,
            Detail::ListPage,
            Detail::UpstreamEmpty,
            Detail::Revalidated,
            Detail::Refused,
            Detail::TooSoonToForce,
            Detail::Enqueued,
            Detail::Rejected,
            Detail::UpstreamError,
            Detail::NoCredential,
        ];
        for d in named {
            // A new variant must be added to `named` (and so to the README).
            match d {
                Detail::Stale
                | Detail::StaleWhileRevalidate
                | Detail::StaleIfError
                | Detail::Budget
                | Detail::ListPage
                | Detail::UpstreamEmpty
                | Detail::Revalidated
                | Detail::Refused
                | Detail::TooSoonToForce
                | Detail::Enqueued
                | Detail::Rejected
                | Detail::UpstreamError
                | Detail::NoCredential
                | Detail::Failure(_) => {}
            }
            let cell = format!("detail={}`", d.as_str());
            assert!(readme.contains(&cell), "README's Cache-Status table has no row for {cell}");
        }
        for fwd in [Fwd::Miss, Fwd::Stale, Fwd::Request, Fwd::UriMiss, Fwd::Bypass] {
            let shown = CacheStatus::fwd(fwd).to_string();
            assert!(readme.contains(&format!("`{shown}")), "README's Cache-Status table has no row for {shown}");
        }
    }

    #[test]
    fn renders_rfc_9211_values_and_labels_them() {
        let cases = [
            (CacheStatus::hit().ttl(Some(12)), "insights-proxy; hit; ttl=12", "hit"),
            (
                CacheStatus::hit().ttl(Some(-3)).detail(Detail::Stale),
                "insights-proxy; hit; ttl=-3; detail=stale",
                "stale",
            ),
            (
                CacheStatus::hit().detail(Detail::StaleIfError),
                "insights-proxy; hit; detail=stale-if-error",
                "stale_if_error",
            ),
            (CacheStatus::hit().detail(Detail::Budget), "insights-proxy; hit; detail=budget", "stale"),
            (CacheStatus::hit().detail(Detail::UpstreamEmpty), "insights-proxy; hit; detail=upstream-empty", "miss"),
            (
                CacheStatus::fwd(Fwd::Stale).fwd_status(200).stored().collapsed(true),
                "insights-proxy; fwd=stale; fwd-status=200; stored; collapsed",
                "refresh",
            ),
            (
                CacheStatus::fwd(Fwd::Request).fwd_status(401).detail(Detail::Revalidated),
                "insights-proxy; fwd=request; fwd-status=401; detail=revalidated",
                "forced",
            ),
            (
                CacheStatus::fwd(Fwd::UriMiss).detail(Detail::Failure("timeout")),
                "insights-proxy; fwd=uri-miss; detail=timeout",
                "miss",
            ),
            (CacheStatus::fwd(Fwd::Bypass), "insights-proxy; fwd=bypass", "bypass"),
        ];
        for (cs, text, label) in cases {
            assert_eq!(cs.to_string(), text);
            assert_eq!(cs.label(), label, "{text}");
        }
    }
}
