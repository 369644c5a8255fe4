//! Date ranges: PostHog's relative/absolute date strings, the resolved `[from, to]` range of a
//! query (`QueryDateRange`) and the interval buckets a trends series is laid out on. All UTC.

use crate::staleness::Interval;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// Upper bound on data points per series, so an override like `date_from=-1000y` with a minute
/// interval cannot make a response explode. The most recent buckets are kept.
pub(crate) const MAX_BUCKETS: i64 = 1000;

/// The date range used when a query has none (`-7d`, PostHog's default).
const DEFAULT_DATE_FROM: &str = "-7d";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DateRange {
    pub from: OffsetDateTime,
    pub to: OffsetDateTime,
}

impl DateRange {
    pub fn span(&self) -> time::Duration {
        self.to - self.from
    }
}

/// Seconds in one `unit`, or `None` for the calendar units (month, quarter, year).
fn fixed_seconds(unit: Interval) -> Option<i64> {
    match unit {
        Interval::Second => Some(1),
        Interval::Minute => Some(60),
        Interval::Hour => Some(3600),
        Interval::Day => Some(86_400),
        Interval::Week => Some(7 * 86_400),
        Interval::Month | Interval::Quarter | Interval::Year => None,
    }
}

/// Months in one calendar `unit` (1 for the others, which never ask).
fn months(unit: Interval) -> i64 {
    match unit {
        Interval::Quarter => 3,
        Interval::Year => 12,
        _ => 1,
    }
}

/// Resolves a query's `dateRange` like `QueryDateRange`: relative `date_from` is floored to the
/// start of the day (of the hour/minute for sub-day intervals), `date_to` (default now) is
/// extended to the end of that unit, unless `explicitDate` is set. Unparseable values fall back
/// to the defaults instead of failing, so no input can break a request.
pub(crate) fn resolve(
    date_from: Option<&str>,
    date_to: Option<&str>,
    explicit: bool,
    interval: Interval,
    now: OffsetDateTime,
) -> DateRange {
    let now = now.to_offset(UtcOffset::UTC);
    let default_from = || parse(DEFAULT_DATE_FROM, now).unwrap_or(now);
    let from = match date_from.filter(|s| !s.is_empty()) {
        Some("all") => add_months(now, -24).unwrap_or(now),
        Some(s) => parse(s, now).unwrap_or_else(default_from),
        None => default_from(),
    };
    let to = date_to.filter(|s| !s.is_empty()).and_then(|s| parse(s, now)).unwrap_or(now);
    if explicit {
        return DateRange { from, to };
    }
    let unit = range_unit(interval);
    DateRange { from: start_of(from, unit).unwrap_or(from), to: end_of(to, unit).unwrap_or(to) }
}

/// Sub-day intervals keep their own precision; everything else works in whole days.
fn range_unit(interval: Interval) -> Interval {
    match interval {
        Interval::Second | Interval::Minute | Interval::Hour => interval,
        _ => Interval::Day,
    }
}

/// Bucket starts for `range`, aligned to the interval (weeks start on Sunday, PostHog's default).
pub(crate) fn buckets(range: &DateRange, interval: Interval) -> Vec<OffsetDateTime> {
    let Some(mut t) = start_of(range.from, interval) else {
        return Vec::new();
    };
    let n = count_buckets(t, range.to, interval);
    if n > MAX_BUCKETS {
        match step(t, interval, n - MAX_BUCKETS) {
            Some(skipped) => t = skipped,
            None => return Vec::new(),
        }
    }
    let mut out = Vec::new();
    while t <= range.to && (out.len() as i64) < MAX_BUCKETS {
        out.push(t);
        match step(t, interval, 1) {
            Some(next) => t = next,
            None => break,
        }
    }
    out
}

fn count_buckets(from: OffsetDateTime, to: OffsetDateTime, unit: Interval) -> i64 {
    if to < from {
        return 0;
    }
    match fixed_seconds(unit) {
        Some(secs) => (to - from).whole_seconds() / secs + 1,
        None => (month_index(to) - month_index(from)) / months(unit) + 1,
    }
}

const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/// A trends `labels` entry: `1-Jan-2024`, with the time for sub-day intervals.
pub(crate) fn label(t: OffsetDateTime, interval: Interval) -> String {
    let base = format!("{}-{}-{}", t.day(), MONTHS[usize::from(u8::from(t.month())) - 1], t.year());
    match interval {
        Interval::Second => format!("{base} {:02}:{:02}:{:02}", t.hour(), t.minute(), t.second()),
        Interval::Minute | Interval::Hour => format!("{base} {:02}:{:02}", t.hour(), t.minute()),
        _ => base,
    }
}

/// A trends `days` entry: `2024-01-01`, or `2024-01-01 13:00:00` for sub-day intervals.
pub(crate) fn day(t: OffsetDateTime, interval: Interval) -> String {
    match interval {
        Interval::Second | Interval::Minute | Interval::Hour => sql_datetime(t),
        _ => format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()),
    }
}

/// `2024-01-01 13:00:00`, as ClickHouse literals in generated HogQL.
pub(crate) fn sql_datetime(t: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A relative (`-7d`, `-24h`, `-1mStart`, `dStart`, `-30M` minutes) or absolute
/// (`2024-01-31`, `2024-01-31T10:00:00Z`) date.
fn parse(s: &str, now: OffsetDateTime) -> Option<OffsetDateTime> {
    parse_relative(s, now).or_else(|| parse_absolute(s))
}

fn parse_relative(s: &str, now: OffsetDateTime) -> Option<OffsetDateTime> {
    let body = s.strip_prefix('-').unwrap_or(s);
    let (body, edge) = match (body.strip_suffix("Start"), body.strip_suffix("End")) {
        (Some(b), _) => (b, Some(false)),
        (_, Some(b)) => (b, Some(true)),
        _ => (body, None),
    };
    let digits = body.find(|c: char| !c.is_ascii_digit()).unwrap_or(body.len());
    let (num, unit) = body.split_at(digits);
    let n: i64 = if num.is_empty() { 0 } else { num.parse().ok().filter(|n| *n <= 100_000)? };
    let unit = match unit {
        "s" => Interval::Second,
        "M" => Interval::Minute,
        "h" => Interval::Hour,
        "d" => Interval::Day,
        "w" => Interval::Week,
        "m" => Interval::Month,
        "q" => Interval::Quarter,
        "y" => Interval::Year,
        _ => return None,
    };
    let t = step(now, unit, -n)?;
    match edge {
        None => Some(t),
        Some(false) => start_of(t, unit),
        Some(true) => end_of(t, unit),
    }
}

fn parse_absolute(s: &str) -> Option<OffsetDateTime> {
    if let Some(t) = crate::datetime::parse_datetime(s) {
        return Some(t.to_offset(UtcOffset::UTC));
    }
    let date_part = s.get(..10)?;
    let mut parts = date_part.split('-');
    let year: i32 = parts.next()?.parse().ok()?;
    let month: u8 = parts.next()?.parse().ok()?;
    let day: u8 = parts.next()?.parse().ok()?;
    let date = Date::from_calendar_date(year, Month::try_from(month).ok()?, day).ok()?;
    let rest = &s[10..];
    if rest.is_empty() {
        return Some(date.midnight().assume_utc());
    }
    // `2024-01-31T10:00[:00][anything]`; a time zone other than Z was handled by RFC 3339 above.
    let rest = rest.strip_prefix('T').or_else(|| rest.strip_prefix(' '))?;
    let hour: u8 = rest.get(0..2)?.parse().ok()?;
    let minute: u8 = rest.get(3..5)?.parse().ok()?;
    let second: u8 = if rest.get(5..6) == Some(":") { rest.get(6..8)?.parse().ok()? } else { 0 };
    let time = Time::from_hms(hour, minute, second).ok()?;
    Some(PrimitiveDateTime::new(date, time).assume_utc())
}

fn month_index(t: OffsetDateTime) -> i64 {
    i64::from(t.year()) * 12 + i64::from(u8::from(t.month())) - 1
}

fn add_months(t: OffsetDateTime, delta: i64) -> Option<OffsetDateTime> {
    let idx = month_index(t).checked_add(delta)?;
    let year = i32::try_from(idx.div_euclid(12)).ok()?;
    let month = Month::try_from(u8::try_from(idx.rem_euclid(12) + 1).ok()?).ok()?;
    let day = t.day().min(month.length(year));
    let date = Date::from_calendar_date(year, month, day).ok()?;
    Some(t.replace_date(date))
}

/// `t` moved by `n` units (negative = back), `None` on overflow.
fn step(t: OffsetDateTime, unit: Interval, n: i64) -> Option<OffsetDateTime> {
    match fixed_seconds(unit) {
        Some(secs) => t.checked_add(time::Duration::seconds(secs.checked_mul(n)?)),
        None => add_months(t, n.checked_mul(months(unit))?),
    }
}

fn start_of(t: OffsetDateTime, unit: Interval) -> Option<OffsetDateTime> {
    Some(match unit {
        Interval::Second => t.truncate_to_second(),
        Interval::Minute => t.truncate_to_minute(),
        Interval::Hour => t.truncate_to_hour(),
        Interval::Day => t.truncate_to_day(),
        Interval::Week => {
            let back = i64::from(t.weekday().number_days_from_sunday());
            t.truncate_to_day().checked_sub(time::Duration::days(back))?
        }
        Interval::Month | Interval::Quarter | Interval::Year => {
            let first_month = match unit {
                Interval::Month => u8::from(t.month()),
                Interval::Quarter => (u8::from(t.month()) - 1) / 3 * 3 + 1,
                _ => 1,
            };
            let date = Date::from_calendar_date(t.year(), Month::try_from(first_month).ok()?, 1).ok()?;
            t.truncate_to_day().replace_date(date)
        }
    })
}

fn end_of(t: OffsetDateTime, unit: Interval) -> Option<OffsetDateTime> {
    step(start_of(t, unit)?, unit, 1)?.checked_sub(time::Duration::microseconds(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2024-03-13 15:42:10 UTC); // a Wednesday

    fn r(from: Option<&str>, to: Option<&str>, interval: Interval) -> DateRange {
        resolve(from, to, false, interval, NOW)
    }

    #[test]
    fn relative_ranges() {
        let d = r(Some("-7d"), None, Interval::Day);
        assert_eq!(d.from, datetime!(2024-03-06 0:00 UTC));
        assert_eq!(d.to, datetime!(2024-03-13 23:59:59.999999 UTC));
        let h = r(Some("-24h"), None, Interval::Hour);
        assert_eq!(h.from, datetime!(2024-03-12 15:00 UTC));
        assert_eq!(h.to, datetime!(2024-03-13 15:59:59.999999 UTC));
        assert_eq!(r(Some("-1mStart"), None, Interval::Day).from, datetime!(2024-02-01 0:00 UTC));
        assert_eq!(r(Some("-1y"), None, Interval::Month).from, datetime!(2023-03-13 0:00 UTC));
        assert_eq!(r(None, None, Interval::Day).from, datetime!(2024-03-06 0:00 UTC));
        assert_eq!(r(Some("-30M"), None, Interval::Minute).from, datetime!(2024-03-13 15:12 UTC));
    }

    #[test]
    fn absolute_and_garbage() {
        let f = r(Some("2024-01-01"), Some("2024-01-31"), Interval::Day);
        assert_eq!(f.from, datetime!(2024-01-01 0:00 UTC));
        assert_eq!(f.to, datetime!(2024-01-31 23:59:59.999999 UTC));
        let t = r(Some("2024-01-01T10:30:00Z"), Some("2024-01-02 08:00"), Interval::Hour);
        assert_eq!(t.from, datetime!(2024-01-01 10:00 UTC));
        assert_eq!(t.to, datetime!(2024-01-02 08:59:59.999999 UTC));
        let explicit = resolve(Some("2024-01-01T10:30:00Z"), Some("2024-01-02"), true, Interval::Day, NOW);
        assert_eq!(explicit.from, datetime!(2024-01-01 10:30 UTC));
        for junk in ["", "-99999999999d", "-100000y", "🦔", "2024-13-01", "-", "xd", "2024-01-01Tzz"] {
            let g = r(Some(junk), Some(junk), Interval::Day);
            assert!(g.from <= g.to, "{junk:?}");
        }
    }

    #[test]
    fn bucket_layouts() {
        assert_eq!(buckets(&r(Some("-7d"), None, Interval::Day), Interval::Day).len(), 8);
        assert_eq!(buckets(&r(Some("-24h"), None, Interval::Hour), Interval::Hour).len(), 25);
        assert_eq!(buckets(&r(Some("-60M"), None, Interval::Minute), Interval::Minute).len(), 61);
        let weeks = buckets(&r(Some("-30d"), None, Interval::Week), Interval::Week);
        assert_eq!(weeks[0], datetime!(2024-02-11 0:00 UTC)); // the Sunday on or before Feb 12
        let months = buckets(&r(Some("-1y"), None, Interval::Month), Interval::Month);
        assert_eq!((months[0], months.len()), (datetime!(2023-03-01 0:00 UTC), 13));
        let capped = buckets(&r(Some("all"), None, Interval::Minute), Interval::Minute);
        assert_eq!(capped.len() as i64, MAX_BUCKETS);
        assert_eq!(*capped.last().unwrap(), datetime!(2024-03-13 15:42 UTC));
        let empty = DateRange { from: NOW, to: NOW - time::Duration::days(1) };
        assert!(buckets(&empty, Interval::Day).is_empty());
    }

    #[test]
    fn labels() {
        let t = datetime!(2024-01-05 09:30 UTC);
        assert_eq!(label(t, Interval::Day), "5-Jan-2024");
        assert_eq!(label(t, Interval::Hour), "5-Jan-2024 09:30");
        assert_eq!(day(t, Interval::Day), "2024-01-05");
        assert_eq!(day(t, Interval::Minute), "2024-01-05 09:30:00");
    }
}
