//! Datetimes as PostHog writes and reads them: its renderer is orjson with `OPT_UTC_Z`, so RFC 3339
//! in UTC with `Z` and microseconds only when non-zero (docs/refresh-semantics.md §3).

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// `2012-01-15T04:01:34Z`, or `2012-01-15T04:01:34.123456Z` (orjson keeps microseconds, drops
/// nanoseconds).
pub fn format_datetime(t: OffsetDateTime) -> String {
    let utc = t.to_offset(time::UtcOffset::UTC);
    let micros = utc.microsecond();
    let truncated = utc.replace_nanosecond(micros * 1_000).unwrap_or(utc);
    truncated.format(&Rfc3339).unwrap_or_default()
}

/// An RFC 3339 datetime, as in `last_refresh` or a `date_from` given as a timestamp.
pub fn parse_datetime(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microseconds_only_when_non_zero() {
        let whole = parse_datetime("2012-01-15T04:01:34Z").unwrap();
        assert_eq!(format_datetime(whole), "2012-01-15T04:01:34Z");
        let fine = parse_datetime("2012-01-15T04:01:34.123456789+02:00").unwrap();
        assert_eq!(format_datetime(fine), "2012-01-15T02:01:34.123456Z");
        let nanos_only = parse_datetime("2012-01-15T04:01:34.000000500Z").unwrap();
        assert_eq!(format_datetime(nanos_only), "2012-01-15T04:01:34Z");
    }
}
