//! The shared tier's payloads (sealed by [`super::seal`] before they reach Redis): entries with
//! their staleness facts and version, the upstream's refusals, and the events replicas publish.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

use super::PurgeScope;
use crate::cache::entry::Entry;
use crate::cache::key::Partition;
use crate::refresh::{Interval, StaleInfo};
use crate::upstream::UpstreamResponse;

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

fn partition(h: &str) -> Option<Partition> {
    Some(Partition(unhex(h)?.try_into().ok()?))
}

/// An entry and the shared version it was calculated at (see [`super::L2::version`]).
pub fn encode_entry(entry: &Entry, version: u64) -> Vec<u8> {
    let s = &entry.stale;
    let body = entry.body();
    let mut out = Vec::with_capacity(body.len() + 64);
    out.extend_from_slice(&s.last_refresh.unix_timestamp_nanos().to_le_bytes());
    out.push(Interval::ALL.iter().position(|i| *i == s.interval).unwrap_or(1) as u8);
    match s.date_to {
        Some(d) => {
            out.push(1);
            out.extend_from_slice(&d.unix_timestamp_nanos().to_le_bytes());
        }
        None => {
            out.push(0);
            out.extend_from_slice(&[0; 16]);
        }
    }
    out.extend_from_slice(&entry.started_ms.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The entry (given the local cache `epoch`) and its shared version, or `None` for anything that
/// is not a payload in this format.
pub fn decode_entry(v: &[u8], epoch: u64) -> Option<(Entry, u64)> {
    let nanos = |b: &[u8]| -> Option<time::OffsetDateTime> {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from_le_bytes(b.try_into().ok()?)).ok()
    };
    let last_refresh = nanos(v.get(..16)?)?;
    let interval = *Interval::ALL.get(usize::from(*v.get(16)?))?;
    let date_to = match v.get(17)? {
        0 => None,
        1 => Some(nanos(v.get(18..34)?)?),
        _ => return None,
    };
    let started_ms = i64::from_le_bytes(v.get(34..42)?.try_into().ok()?);
    let version = u64::from_le_bytes(v.get(42..50)?.try_into().ok()?);
    let body = Bytes::copy_from_slice(v.get(50..)?);
    if body.first() != Some(&b'{') {
        return None;
    }
    let entry = Entry::from_parts(body, StaleInfo { last_refresh, interval, date_to }, epoch, started_ms)
        .versioned(Some(version));
    Some((entry, version))
}

/// The upstream's refusal as it is relayed: status, content type, relayed headers, body.
pub fn encode_refusal(r: &UpstreamResponse) -> Vec<u8> {
    let mut out = Vec::with_capacity(r.body.len() + 64);
    let field = |out: &mut Vec<u8>, b: &[u8]| {
        let b = &b[..b.len().min(usize::from(u16::MAX))];
        out.extend_from_slice(&(b.len() as u16).to_le_bytes());
        out.extend_from_slice(b);
    };
    out.extend_from_slice(&r.status.to_le_bytes());
    field(&mut out, r.content_type.as_deref().unwrap_or("").as_bytes());
    out.push(r.relayed.len().min(16) as u8);
    for (name, value) in r.relayed.iter().take(16) {
        field(&mut out, name.as_str().as_bytes());
        field(&mut out, value.as_bytes());
    }
    out.extend_from_slice(&r.body);
    out
}

pub fn decode_refusal(v: &[u8]) -> Option<UpstreamResponse> {
    let mut c = Cursor(v);
    let status = u16::from_le_bytes(c.take(2)?.try_into().ok()?);
    let ct = String::from_utf8(c.field()?.to_vec()).ok()?;
    let headers = *c.take(1)?.first()?;
    let mut relayed = Vec::new();
    for _ in 0..headers {
        let name = HeaderName::from_bytes(c.field()?).ok()?;
        let value = HeaderValue::from_bytes(c.field()?).ok()?;
        relayed.push((name, value));
    }
    if !(400..500).contains(&status) {
        return None;
    }
    let body = Bytes::copy_from_slice(c.0);
    Some(UpstreamResponse { status, content_type: (!ct.is_empty()).then_some(ct), body, relayed })
}

/// Reads a payload front to back.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    /// A field written with its length (u16, little-endian) first.
    fn field(&mut self) -> Option<&'a [u8]> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().ok()?);
        self.take(usize::from(n))
    }
}

/// The upstream refused a principal (401/403) on some replica.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub partition: Partition,
    pub project: u64,
    pub insight: Option<u64>,
    pub answer: Arc<UpstreamResponse>,
}

impl PartialEq for Refusal {
    fn eq(&self, o: &Self) -> bool {
        (self.partition, self.project, self.insight, encode_refusal(&self.answer))
            == (o.partition, o.project, o.insight, encode_refusal(&o.answer))
    }
}

/// What replicas tell each other.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Purge(PurgeScope),
    /// A calculation for this key landed in the shared tier.
    Done(String),
    Reject(Refusal),
}

pub fn encode_event(e: &Event, replica: &str) -> String {
    match e {
        Event::Done(key) => format!("{replica} done {key}"),
        Event::Purge(PurgeScope::Insight { project, insight }) => format!("{replica} purge i {project} {insight}"),
        Event::Purge(PurgeScope::Project(p)) => format!("{replica} purge p {p}"),
        Event::Purge(PurgeScope::Partition(p)) => format!("{replica} purge t {}", hex(&p.0)),
        Event::Reject(r) => format!(
            "{replica} reject {} {} {} {}",
            hex(&r.partition.0),
            r.project,
            r.insight.unwrap_or(0),
            hex(&encode_refusal(&r.answer))
        ),
    }
}

pub fn decode_event(s: &str) -> Option<(String, Event)> {
    let mut parts = s.split(' ');
    let replica = parts.next()?.to_string();
    let event = match (parts.next()?, parts.next()) {
        ("done", Some(key)) => Event::Done(key.to_string()),
        ("purge", Some("i")) => Event::Purge(PurgeScope::Insight {
            project: parts.next()?.parse().ok()?,
            insight: parts.next()?.parse().ok()?,
        }),
        ("purge", Some("p")) => Event::Purge(PurgeScope::Project(parts.next()?.parse().ok()?)),
        ("purge", Some("t")) => Event::Purge(PurgeScope::Partition(partition(parts.next()?)?)),
        ("reject", Some(p)) => Event::Reject(Refusal {
            partition: partition(p)?,
            project: parts.next()?.parse().ok()?,
            insight: Some(parts.next()?.parse().ok()?).filter(|i| *i != 0),
            answer: Arc::new(decode_refusal(&unhex(parts.next()?)?)?),
        }),
        _ => return None,
    };
    parts.next().is_none().then_some((replica, event))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_garbage_is_a_miss() {
        let body = br#"{"id":1,"result":[1],"last_refresh":"2026-01-01T00:00:00Z","query":{"source":{"interval":"hour","dateRange":{"date_to":"2025-01-31"}}}}"#;
        let e = Entry::from_upstream(body, 1, 1).unwrap().stamped(1234);
        let (back, version) = decode_entry(&encode_entry(&e, 77), 9).unwrap();
        assert_eq!((back.stale, back.epoch, back.started_ms, version), (e.stale, 9, 1234, 77));
        assert_eq!(back.version, Some(77));
        assert_eq!(back.render(true, None), e.render(true, None));
        assert!(decode_entry(b"whatever", 1).is_none());
        assert!(decode_entry(b"", 1).is_none());
        assert!(decode_entry(&encode_entry(&e, 1)[..30], 1).is_none());
    }

    #[test]
    fn events_round_trip() {
        let answer = UpstreamResponse {
            status: 403,
            content_type: Some("application/json".into()),
            body: Bytes::from_static(br#"{"detail":"no"}"#),
            relayed: vec![(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))],
        };
        for e in [
            Event::Done("ab".into()),
            Event::Purge(PurgeScope::Insight { project: 1, insight: 2 }),
            Event::Purge(PurgeScope::Project(3)),
            Event::Purge(PurgeScope::Partition(Partition([7; 16]))),
            Event::Reject(Refusal {
                partition: Partition([9; 16]),
                project: 4,
                insight: Some(5),
                answer: Arc::new(answer.clone()),
            }),
            Event::Reject(Refusal {
                partition: Partition([9; 16]),
                project: 4,
                insight: None,
                answer: Arc::new(answer),
            }),
        ] {
            assert_eq!(decode_event(&encode_event(&e, "r1")), Some(("r1".to_string(), e)));
        }
        assert_eq!(decode_event("r1 purge x"), None);
        assert_eq!(decode_event("r1 purge p 3 extra"), None);
    }
}
