//! The proxy's wall clock.
//!
//! Staleness is decided from wall-clock timestamps (`last_refresh` in bodies), so tests need to move
//! time forward without sleeping. Every component reads time through a [`Clock`]; tests hand the
//! same clock to the simulated backend (as its time source, see `demo`) and call [`Clock::advance`].

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Clone, Debug, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn now(&self) -> OffsetDateTime {
        let off = self.offset_ms.load(Ordering::Relaxed);
        let now = now_utc();
        if off == 0 {
            return now;
        }
        now + time::Duration::milliseconds(off)
    }

    /// Moves this clock (and every clone of it) forward.
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX / 2);
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

thread_local! {
    /// The last whole second this thread turned into a date. A hit reads the clock several times,
    /// nearly always within one second: replacing the nanoseconds of that date is several times
    /// cheaper than the calendar arithmetic of a new one.
    static SECOND: Cell<(u64, Option<OffsetDateTime>)> = const { Cell::new((0, None)) };
}

/// `OffsetDateTime::now_utc()`, the date of the current second computed once per second and thread.
fn now_utc() -> OffsetDateTime {
    let Some((secs, nanos)) = realtime() else { return OffsetDateTime::now_utc() };
    let second = SECOND.with(|last| match last.get() {
        (s, Some(t)) if s == secs => Some(t),
        _ => {
            let t = i64::try_from(secs).ok().and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok());
            last.set((secs, t));
            t
        }
    });
    second.and_then(|t| t.replace_nanosecond(nanos).ok()).unwrap_or_else(OffsetDateTime::now_utc)
}

/// Seconds and nanoseconds since the Unix epoch, straight from `clock_gettime` (a hit reads the
/// clock several times; `SystemTime::now().duration_since(UNIX_EPOCH)` costs twice as much).
fn realtime() -> Option<(u64, u32)> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) } == 0;
    let secs = u64::try_from(ts.tv_sec).ok().filter(|_| ok)?;
    let nanos = u32::try_from(ts.tv_nsec).ok().filter(|n| *n < 1_000_000_000)?;
    Some((secs, nanos))
}

/// RFC 3339 in UTC with `Z`, with sub-seconds only when non-zero, as PostHog's renderer
/// (orjson `OPT_UTC_Z`) writes datetimes (docs/refresh-semantics.md §4.4).
pub fn format_datetime(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let t = if t.microsecond() == 0 {
        t.replace_nanosecond(0).unwrap_or(t)
    } else {
        t.replace_nanosecond(t.microsecond() * 1000).unwrap_or(t)
    };
    t.format(&Rfc3339).unwrap_or_default()
}

/// Parses an RFC 3339 datetime, as found in `last_refresh`.
pub fn parse_datetime(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_per_second_date_reads_the_system_clock() {
        for _ in 0..3 {
            let (ours, theirs) = (now_utc(), OffsetDateTime::now_utc());
            assert!((theirs - ours).abs() < time::Duration::seconds(1), "{ours} vs {theirs}");
            assert!(now_utc() >= ours);
        }
    }

    #[test]
    fn the_raw_clock_is_the_system_clock() {
        let (secs, nanos) = realtime().expect("CLOCK_REALTIME");
        let ours = std::time::UNIX_EPOCH + Duration::new(secs, nanos);
        let theirs = std::time::SystemTime::now();
        assert!(theirs.duration_since(ours).is_ok_and(|d| d < Duration::from_secs(1)), "{ours:?} vs {theirs:?}");
    }

    #[test]
    fn formats_like_posthog() {
        let t = parse_datetime("2012-01-15T04:01:34Z").unwrap();
        assert_eq!(format_datetime(t), "2012-01-15T04:01:34Z");
        let t = parse_datetime("2012-01-15T04:01:34.123456789+00:00").unwrap();
        assert_eq!(format_datetime(t), "2012-01-15T04:01:34.123456Z");
    }

    #[test]
    fn advance_moves_all_clones() {
        let c = Clock::new();
        let c2 = c.clone();
        let before = c2.now();
        c.advance(Duration::from_secs(600));
        assert!(c2.now() - before >= time::Duration::seconds(600));
    }
}
