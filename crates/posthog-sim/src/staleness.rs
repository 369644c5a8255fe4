//! PostHog's staleness rule (docs/refresh-semantics.md §2): `is_stale` in `posthog/caching/utils.py`
//! with the DEFAULT and LAZY threshold tables, `cache_target_age` (§2.3). The simulator keeps its
//! own copy of the rule on purpose: end-to-end tests compare the proxy against it, so the two must
//! not share code.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use time::OffsetDateTime;

/// A query's `interval` (`query_date_range.interval_name`).
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

    pub fn name(self) -> &'static str {
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

/// The name is not one of PostHog's intervals.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown interval")]
pub struct UnknownInterval;

impl FromStr for Interval {
    type Err = UnknownInterval;
    fn from_str(s: &str) -> Result<Self, UnknownInterval> {
        Interval::ALL.into_iter().find(|i| i.name() == s).ok_or(UnknownInterval)
    }
}

/// Which table a staleness check reads: `lazy_async` uses LAZY, every other mode DEFAULT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThresholdMode {
    Default,
    Lazy,
}

/// The threshold per interval for both modes; an interval without one never goes stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thresholds {
    table: HashMap<(Interval, ThresholdMode), Duration>,
}

impl Thresholds {
    /// PostHog's tables (§2.2): second has none, minute 5 / 15 min, hour 1 / 2 h, day 6 / 12 h,
    /// week and longer a day in both.
    pub fn posthog() -> Self {
        const MINUTE: u64 = 60;
        const HOUR: u64 = 60 * MINUTE;
        const DAY: u64 = 24 * HOUR;
        let rows = [
            (Interval::Minute, 5 * MINUTE, 15 * MINUTE),
            (Interval::Hour, HOUR, 2 * HOUR),
            (Interval::Day, 6 * HOUR, 12 * HOUR),
            (Interval::Week, DAY, DAY),
            (Interval::Month, DAY, DAY),
            (Interval::Quarter, DAY, DAY),
            (Interval::Year, DAY, DAY),
        ];
        let mut t = Self { table: HashMap::new() };
        for (interval, default, lazy) in rows {
            t.set(ThresholdMode::Default, interval, Some(Duration::from_secs(default)));
            t.set(ThresholdMode::Lazy, interval, Some(Duration::from_secs(lazy)));
        }
        t
    }

    /// Every interval stale after `default`, lazily after `lazy` (tests and short demos).
    pub fn uniform(default: Duration, lazy: Duration) -> Self {
        let mut t = Self { table: HashMap::new() };
        for interval in Interval::ALL {
            t.set(ThresholdMode::Default, interval, Some(default));
            t.set(ThresholdMode::Lazy, interval, Some(lazy));
        }
        t
    }

    /// Sets (or with `None` removes) one threshold.
    pub fn set(&mut self, mode: ThresholdMode, interval: Interval, threshold: Option<Duration>) {
        match threshold {
            Some(d) => self.table.insert((interval, mode), d),
            None => self.table.remove(&(interval, mode)),
        };
    }

    pub fn set_default(&mut self, interval: Interval, threshold: Option<Duration>) {
        self.set(ThresholdMode::Default, interval, threshold);
    }

    pub fn set_lazy(&mut self, interval: Interval, threshold: Option<Duration>) {
        self.set(ThresholdMode::Lazy, interval, threshold);
    }

    pub fn get(&self, mode: ThresholdMode, interval: Interval) -> Option<Duration> {
        self.table.get(&(interval, mode)).copied()
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Self::posthog()
    }
}

/// What `is_stale` is given about one cached result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleInfo {
    pub last_refresh: OffsetDateTime,
    pub interval: Interval,
    /// `query_date_range.date_to()`.
    pub date_to: Option<OffsetDateTime>,
}

impl StaleInfo {
    /// `last_refresh + threshold`; `None` when the interval has none (or it is past the calendar).
    fn max_age(&self, t: &Thresholds, mode: ThresholdMode) -> Option<OffsetDateTime> {
        let threshold = time::Duration::try_from(t.get(mode, self.interval)?).ok()?;
        self.last_refresh.checked_add(threshold)
    }

    /// `is_stale` (§2.1 steps 4–6): a range that ended more than 10 s before the calculation never
    /// goes stale; otherwise stale strictly after `last_refresh + threshold`.
    pub fn is_stale(&self, now: OffsetDateTime, t: &Thresholds, mode: ThresholdMode) -> bool {
        if self.date_to.is_some_and(|date_to| date_to < self.last_refresh - time::Duration::seconds(10)) {
            return false;
        }
        self.max_age(t, mode).is_some_and(|max_age| now > max_age)
    }

    /// `cache_target_age` (§2.3): computed when the result is calculated, from the DEFAULT table.
    pub fn cache_target_age(&self, t: &Thresholds) -> Option<OffsetDateTime> {
        self.max_age(t, ThresholdMode::Default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;
    use ThresholdMode::{Default as D, Lazy as L};

    const LAST_REFRESH: OffsetDateTime = datetime!(2026-01-01 12:00 UTC);

    fn info(interval: Interval) -> StaleInfo {
        StaleInfo { last_refresh: LAST_REFRESH, interval, date_to: None }
    }

    fn after(minutes: i64) -> OffsetDateTime {
        LAST_REFRESH + time::Duration::minutes(minutes)
    }

    // posthog/caching/test/test_stale_utils.py, as black-box cases.
    #[test]
    fn posthogs_tables() {
        let t = Thresholds::posthog();
        assert!(info(Interval::Minute).is_stale(after(6), &t, D));
        assert!(!info(Interval::Minute).is_stale(after(6), &t, L));
        assert!(info(Interval::Hour).is_stale(after(61), &t, D));
        assert!(!info(Interval::Hour).is_stale(after(90), &t, L));
        assert!(info(Interval::Day).is_stale(after(7 * 60), &t, D));
        assert!(!info(Interval::Day).is_stale(after(60), &t, D));
        assert!(info(Interval::Month).is_stale(after(2 * 24 * 60), &t, D));
        assert!(!info(Interval::Month).is_stale(after(20 * 60), &t, D));
        assert!(!info(Interval::Second).is_stale(after(100_000), &t, D));
    }

    #[test]
    fn exactly_at_the_threshold_is_fresh() {
        let t = Thresholds::posthog();
        let i = info(Interval::Minute);
        assert!(!i.is_stale(after(5), &t, D));
        assert!(i.is_stale(after(5) + time::Duration::nanoseconds(1), &t, D));
    }

    #[test]
    fn a_range_that_ended_before_the_calculation_never_goes_stale() {
        let t = Thresholds::posthog();
        let mut i = info(Interval::Day);
        i.date_to = Some(LAST_REFRESH - time::Duration::seconds(11));
        assert!(!i.is_stale(datetime!(2030-01-01 0:00 UTC), &t, D));
        i.date_to = Some(LAST_REFRESH - time::Duration::seconds(10));
        assert!(i.is_stale(datetime!(2030-01-01 0:00 UTC), &t, D));
    }

    #[test]
    fn cache_target_age_reads_the_default_table() {
        let t = Thresholds::posthog();
        assert_eq!(info(Interval::Day).cache_target_age(&t), Some(after(6 * 60)));
        assert_eq!(info(Interval::Second).cache_target_age(&t), None);
        let huge = Thresholds::uniform(Duration::from_secs(u64::MAX), Duration::from_secs(u64::MAX));
        assert_eq!(info(Interval::Day).cache_target_age(&huge), None);
        assert!(!info(Interval::Day).is_stale(datetime!(9999-01-01 0:00 UTC), &huge, D));
    }

    #[test]
    fn a_removed_threshold_means_never_stale() {
        let mut t = Thresholds::uniform(Duration::from_secs(60), Duration::from_secs(120));
        t.set_default(Interval::Hour, None);
        assert!(!info(Interval::Hour).is_stale(after(100_000), &t, D));
        assert!(info(Interval::Hour).is_stale(after(3), &t, L));
        assert_eq!(t.get(D, Interval::Day), Some(Duration::from_secs(60)));
    }

    #[test]
    fn interval_names() {
        for i in Interval::ALL {
            assert_eq!(i.name().parse::<Interval>(), Ok(i));
        }
        assert_eq!("fortnight".parse::<Interval>(), Err(UnknownInterval));
    }
}
