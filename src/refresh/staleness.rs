//! Staleness as PostHog decides it (docs/refresh-semantics.md §3.1): a threshold per query interval, strict
//! `>`, and a fixed date range that ended before the calculation never goes stale.

use std::str::FromStr;
use std::time::Duration;

use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    pub const ALL: [Interval; 8] = [
        Interval::Second,
        Interval::Minute,
        Interval::Hour,
        Interval::Day,
        Interval::Week,
        Interval::Month,
        Interval::Quarter,
        Interval::Year,
    ];

    fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Interval::Second => "second",
            Interval::Minute => "minute",
            Interval::Hour => "hour",
            Interval::Day => "day",
            Interval::Week => "week",
            Interval::Month => "month",
            Interval::Quarter => "quarter",
            Interval::Year => "year",
        }
    }
}

impl FromStr for Interval {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Interval::ALL.into_iter().find(|i| i.as_str() == s).ok_or(())
    }
}

const MIN: u64 = 60;
const HOUR: u64 = 3600;
const DAY: u64 = 86400;

/// DEFAULT and LAZY thresholds per interval; `None` means never stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thresholds {
    default: [Option<Duration>; 8],
    lazy: [Option<Duration>; 8],
}

impl Thresholds {
    /// PostHog's values (IS, docs/refresh-semantics.md §3.2).
    pub fn posthog() -> Self {
        let s = |secs: u64| Some(Duration::from_secs(secs));
        Self {
            default: [None, s(5 * MIN), s(HOUR), s(6 * HOUR), s(DAY), s(DAY), s(DAY), s(DAY)],
            lazy: [None, s(15 * MIN), s(2 * HOUR), s(12 * HOUR), s(DAY), s(DAY), s(DAY), s(DAY)],
        }
    }

    /// Every interval stale after `default`, lazily after `lazy`: for tests.
    pub fn uniform(default: Duration, lazy: Duration) -> Self {
        Self { default: [Some(default); 8], lazy: [Some(lazy); 8] }
    }

    pub fn set_default(&mut self, i: Interval, d: Option<Duration>) {
        self.default[i.index()] = d;
    }

    pub fn set_lazy(&mut self, i: Interval, d: Option<Duration>) {
        self.lazy[i.index()] = d;
    }

    pub fn default_for(&self, i: Interval) -> Option<Duration> {
        self.default[i.index()]
    }

    pub fn lazy_for(&self, i: Interval) -> Option<Duration> {
        self.lazy[i.index()]
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Self::posthog()
    }
}

const NANOS_PER_SECOND: i128 = 1_000_000_000;
/// The last instant `OffsetDateTime` can hold (9999-12-31T23:59:59.999999999Z), in Unix nanoseconds.
const MAX_NANOS: i128 = 253_402_300_799_999_999_999;

/// What staleness needs to know about a cached result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleInfo {
    pub last_refresh: OffsetDateTime,
    pub interval: Interval,
    /// The end of a fixed date range, if the query has one.
    pub date_to: Option<OffsetDateTime>,
}

impl StaleInfo {
    /// `cache_target_age`: when the result goes stale by the DEFAULT table.
    pub fn target_age(&self, t: &Thresholds) -> Option<OffsetDateTime> {
        t.default_for(self.interval).and_then(|d| self.last_refresh.checked_add(d.try_into().ok()?))
    }

    /// When the result goes stale under `threshold` (`None` = never), in Unix nanoseconds: integer
    /// arithmetic, since date-time arithmetic on `OffsetDateTime` was ~2 % of a cache hit's
    /// instructions. A fixed date range that ended before the calculation never goes stale.
    fn stale_after_nanos(&self, threshold: Option<Duration>) -> Option<i128> {
        let last_refresh = self.last_refresh.unix_timestamp_nanos();
        if let Some(date_to) = self.date_to {
            if date_to.unix_timestamp_nanos() < last_refresh - 10 * NANOS_PER_SECOND {
                return None;
            }
        }
        let at = last_refresh.checked_add(i128::try_from(threshold?.as_nanos()).ok()?)?;
        // A threshold too large to add is as good as none.
        (at <= MAX_NANOS).then_some(at)
    }

    /// Whether the result can ever go stale: not for an interval without a threshold, nor for a
    /// fixed date range that ended before the calculation.
    pub fn can_go_stale(&self, t: &Thresholds) -> bool {
        self.stale_after_nanos(t.default_for(self.interval)).is_some()
    }

    pub fn is_stale(&self, now: OffsetDateTime, t: &Thresholds) -> bool {
        self.stale_after_nanos(t.default_for(self.interval)).is_some_and(|at| now.unix_timestamp_nanos() > at)
    }

    pub fn is_lazy_stale(&self, now: OffsetDateTime, t: &Thresholds) -> bool {
        self.stale_after_nanos(t.lazy_for(self.interval)).is_some_and(|at| now.unix_timestamp_nanos() > at)
    }

    /// Seconds until stale (negative once stale, rounded down), for `Cache-Status: ttl=`.
    pub fn ttl_seconds(&self, now: OffsetDateTime, t: &Thresholds) -> Option<i64> {
        self.stale_after_nanos(t.default_for(self.interval))
            .map(|at| (at - now.unix_timestamp_nanos()).div_euclid(NANOS_PER_SECOND) as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn info(interval: Interval) -> StaleInfo {
        StaleInfo { last_refresh: datetime!(2026-01-01 12:00 UTC), interval, date_to: None }
    }

    // T-ST test_is_stale, re-expressed.
    #[test]
    fn posthog_thresholds() {
        let t = Thresholds::posthog();
        let lr = datetime!(2026-01-01 12:00 UTC);
        let m = |mins: i64| lr + time::Duration::minutes(mins);
        assert!(info(Interval::Minute).is_stale(m(6), &t));
        assert!(!info(Interval::Minute).is_stale(lr + time::Duration::seconds(10), &t));
        assert!(info(Interval::Hour).is_stale(m(61), &t));
        assert!(info(Interval::Day).is_stale(m(7 * 60), &t));
        assert!(!info(Interval::Day).is_stale(m(60), &t));
        assert!(info(Interval::Month).is_stale(m(2 * 24 * 60), &t));
        assert!(!info(Interval::Month).is_stale(m(20 * 60), &t));
        assert!(!info(Interval::Second).is_stale(m(100_000), &t));
    }

    #[test]
    fn boundary_is_not_stale() {
        let t = Thresholds::posthog();
        let i = info(Interval::Minute);
        assert!(!i.is_stale(i.last_refresh + time::Duration::minutes(5), &t));
        assert!(i.is_stale(i.last_refresh + time::Duration::minutes(5) + time::Duration::nanoseconds(1), &t));
    }

    #[test]
    fn lazy_is_later() {
        let t = Thresholds::posthog();
        let i = info(Interval::Hour);
        let at = i.last_refresh + time::Duration::minutes(90);
        assert!(i.is_stale(at, &t) && !i.is_lazy_stale(at, &t));
    }

    #[test]
    fn fixed_past_range_never_stale() {
        let t = Thresholds::posthog();
        let mut i = info(Interval::Day);
        i.date_to = Some(datetime!(2025-12-01 00:00 UTC));
        assert!(!i.is_stale(datetime!(2030-01-01 00:00 UTC), &t));
        i.date_to = Some(i.last_refresh); // ends "now": still goes stale
        assert!(i.is_stale(datetime!(2030-01-01 00:00 UTC), &t));
    }

    #[test]
    fn huge_thresholds_mean_never_stale() {
        let t = Thresholds::uniform(Duration::from_secs(u64::MAX), Duration::from_secs(u64::MAX));
        let i = info(Interval::Day);
        assert!(!i.is_stale(datetime!(2100-01-01 00:00 UTC), &t));
        assert_eq!(i.target_age(&t), None);
    }

    #[test]
    fn the_largest_instant() {
        assert_eq!(MAX_NANOS, time::PrimitiveDateTime::MAX.assume_utc().unix_timestamp_nanos());
    }

    #[test]
    fn ttl_rounds_down() {
        let t = Thresholds::posthog();
        let i = info(Interval::Minute);
        let at = |d: time::Duration| i.ttl_seconds(i.last_refresh + d, &t);
        assert_eq!(at(time::Duration::ZERO), Some(300));
        assert_eq!(at(time::Duration::milliseconds(1)), Some(299));
        assert_eq!(at(time::Duration::minutes(5)), Some(0));
        assert_eq!(at(time::Duration::minutes(5) + time::Duration::milliseconds(1)), Some(-1));
        assert_eq!(at(time::Duration::minutes(6)), Some(-60));
        assert_eq!(info(Interval::Second).ttl_seconds(i.last_refresh, &t), None);
    }

    #[test]
    fn target_age_uses_default_table() {
        let t = Thresholds::posthog();
        let i = info(Interval::Day);
        assert_eq!(i.target_age(&t), Some(i.last_refresh + time::Duration::hours(6)));
        assert_eq!(info(Interval::Second).target_age(&t), None);
    }
}
