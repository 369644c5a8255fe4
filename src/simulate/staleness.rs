//! Interval names, staleness thresholds and the pure staleness rules (refresh-semantics.md §2).
//!
//! Nothing here reads a clock: callers pass `now`, so the proxy can reuse these functions.

use std::time::Duration;
use time::OffsetDateTime;

/// A query's `interval` (`query_date_range.interval_name` in PostHog).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Interval {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Quarter,
    Year,
}

impl Interval {
    /// PostHog's interval names; case-sensitive like the pydantic enum.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "second" => Self::Second,
            "minute" => Self::Minute,
            "hour" => Self::Hour,
            "day" => Self::Day,
            "week" => Self::Week,
            "month" => Self::Month,
            "quarter" => Self::Quarter,
            "year" => Self::Year,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Second => "second",
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Week => "week",
            Self::Month => "month",
            Self::Quarter => "quarter",
            Self::Year => "year",
        }
    }
}

/// One staleness threshold per interval; `None` means "never stale" (PostHog's missing map key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntervalTable {
    pub second: Option<Duration>,
    pub minute: Option<Duration>,
    pub hour: Option<Duration>,
    pub day: Option<Duration>,
    pub week: Option<Duration>,
    pub month: Option<Duration>,
    pub quarter: Option<Duration>,
    pub year: Option<Duration>,
}

impl IntervalTable {
    pub fn get(&self, interval: Interval) -> Option<Duration> {
        match interval {
            Interval::Second => self.second,
            Interval::Minute => self.minute,
            Interval::Hour => self.hour,
            Interval::Day => self.day,
            Interval::Week => self.week,
            Interval::Month => self.month,
            Interval::Quarter => self.quarter,
            Interval::Year => self.year,
        }
    }

    /// The same threshold for every interval except `second`, which stays "never stale" as upstream.
    pub fn uniform(d: Duration) -> Self {
        Self {
            second: None,
            minute: Some(d),
            hour: Some(d),
            day: Some(d),
            week: Some(d),
            month: Some(d),
            quarter: Some(d),
            year: Some(d),
        }
    }
}

const MIN: u64 = 60;
const HOUR: u64 = 60 * MIN;
const DAY: u64 = 24 * HOUR;

/// DEFAULT (`blocking`/`async`/`force_cache` freshness) and LAZY (`lazy_async` enqueue trigger)
/// thresholds. `Default` is PostHog's table (IS via CUc, §2.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub default: IntervalTable,
    pub lazy: IntervalTable,
}

impl Default for Thresholds {
    fn default() -> Self {
        let s = |secs: u64| Some(Duration::from_secs(secs));
        Self {
            default: IntervalTable {
                second: None,
                minute: s(5 * MIN),
                hour: s(HOUR),
                day: s(6 * HOUR),
                week: s(DAY),
                month: s(DAY),
                quarter: s(DAY),
                year: s(DAY),
            },
            lazy: IntervalTable {
                second: None,
                minute: s(15 * MIN),
                hour: s(2 * HOUR),
                day: s(12 * HOUR),
                week: s(DAY),
                month: s(DAY),
                quarter: s(DAY),
                year: s(DAY),
            },
        }
    }
}

impl Thresholds {
    /// Every interval (but `second`) gets the same DEFAULT and LAZY threshold; handy in tests.
    pub fn uniform(default: Duration, lazy: Duration) -> Self {
        Self { default: IntervalTable::uniform(default), lazy: IntervalTable::uniform(lazy) }
    }
}

/// `t + d`, or `None` when it does not fit (a huge configured threshold must not panic).
pub fn add_duration(t: OffsetDateTime, d: Duration) -> Option<OffsetDateTime> {
    t.checked_add(time::Duration::try_from(d).ok()?)
}

/// PostHog's `is_stale` (CUc, §2.1) for one threshold table entry:
/// a fixed past range (`date_to` more than 10 s before `last_refresh`) is never stale, a missing
/// threshold is never stale, otherwise stale iff `now > last_refresh + max_age` (strict).
pub fn is_stale(
    now: OffsetDateTime,
    last_refresh: OffsetDateTime,
    date_to: Option<OffsetDateTime>,
    max_age: Option<Duration>,
) -> bool {
    if let Some(date_to) = date_to {
        if date_to < last_refresh - time::Duration::seconds(10) {
            return false;
        }
    }
    match max_age.and_then(|age| add_duration(last_refresh, age)) {
        Some(deadline) => now > deadline,
        None => false,
    }
}

/// `_refresh_frequency` of the trends/funnels runners (TRQ, §2.4): the advisory gap between
/// `last_refresh` and `next_allowed_client_refresh`.
pub fn next_allowed_refresh_delay(interval: Interval, range: time::Duration) -> Duration {
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
    use time::macros::datetime;

    fn stale(interval: Interval, age: time::Duration) -> bool {
        let last = datetime!(2024-03-01 12:00 UTC);
        is_stale(last + age, last, None, Thresholds::default().default.get(interval))
    }

    #[test]
    fn posthog_stale_table() {
        // T-ST test_is_stale
        assert!(stale(Interval::Minute, time::Duration::minutes(6)));
        assert!(!stale(Interval::Minute, time::Duration::seconds(10)));
        assert!(stale(Interval::Hour, time::Duration::minutes(61)));
        assert!(stale(Interval::Day, time::Duration::hours(7)));
        assert!(!stale(Interval::Day, time::Duration::hours(1)));
        assert!(stale(Interval::Month, time::Duration::days(2)));
        assert!(!stale(Interval::Month, time::Duration::hours(20)));
        assert!(!stale(Interval::Second, time::Duration::days(365)));
    }

    #[test]
    fn boundary_is_not_stale() {
        assert!(!stale(Interval::Minute, time::Duration::minutes(5)));
        assert!(stale(Interval::Minute, time::Duration::minutes(5) + time::Duration::milliseconds(1)));
    }

    #[test]
    fn fixed_past_range_never_stale() {
        let last = datetime!(2024-03-01 12:00 UTC);
        let date_to = Some(datetime!(2024-01-31 23:59:59 UTC));
        let max = Some(Duration::from_secs(60));
        assert!(!is_stale(last + time::Duration::days(400), last, date_to, max));
        // date_to within 10 s of last_refresh still counts as "current"
        let near = Some(last - time::Duration::seconds(5));
        assert!(is_stale(last + time::Duration::minutes(2), last, near, max));
    }

    #[test]
    fn huge_threshold_does_not_panic() {
        let last = datetime!(2024-03-01 12:00 UTC);
        assert!(!is_stale(last, last, None, Some(Duration::MAX)));
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
