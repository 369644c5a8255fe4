//! The principal: the one identity the upstream will authenticate for a request, built once at the
//! front door. Cache partitions, rate budgets, confirmations, queues and query statuses all hang
//! off it (docs/trust.md).
//!
//! PostHog tries its authenticators in a fixed order and the first carrier present wins: a personal
//! API key (`Authorization: Bearer`, then the `personal_api_key` query parameter, then the JSON body
//! field), and only without one the `sessionid` cookie. The principal is that first carrier, and
//! the proxy's own upstream calls send exactly it and nothing else, so what the upstream
//! authenticates is always what the partition and the rate budget were derived from: extra or junk
//! carriers next to a real key change neither.
//!
//! Its `Debug` output is redacted so a credential cannot reach a log by accident.

use std::fmt;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::cache::{Partition, PartitionKeyer};
use crate::fields::HeaderFields;

pub const SESSION_COOKIE: &str = "sessionid";

/// Where the principal's credential came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Carrier {
    Bearer,
    QueryKey,
    BodyKey,
    SessionCookie,
}

impl Carrier {
    pub fn is_api_key(self) -> bool {
        !matches!(self, Carrier::SessionCookie)
    }
}

/// What a request's credential came to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrincipalError {
    /// A personal API key that can never be valid (it cannot even be sent as a header).
    #[error("Personal API key found in request is invalid.")]
    InvalidKey,
}

#[derive(Clone)]
pub struct Principal {
    carrier: Carrier,
    partition: Partition,
    /// The single header that carries the credential upstream: `Authorization: Bearer <key>` for
    /// a personal API key whatever its carrier (PostHog accepts a key in any of them alike), else
    /// `Cookie: sessionid=<id>`.
    header: (HeaderName, HeaderValue),
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Principal({:?}, {:?})", self.carrier, self.partition)
    }
}

impl Principal {
    /// The principal of a request, in PostHog's order: `Ok(None)` when nothing authenticates it.
    /// `query_key` and `body_key` are the `personal_api_key` query parameter and body field.
    pub fn from_request(
        keyer: &PartitionKeyer,
        headers: &(impl HeaderFields + ?Sized),
        query_key: Option<&str>,
        body_key: Option<&str>,
    ) -> Result<Option<Principal>, PrincipalError> {
        if let Some((value, key)) = bearer(headers) {
            // The client's own header already says exactly this: sent on as it came.
            let partition = keyer.partition(b"personal-api-key", key.as_bytes());
            let value = HeaderValue::from_bytes(value).map_err(|_| PrincipalError::InvalidKey)?;
            let header = (http::header::AUTHORIZATION, value);
            return Ok(Some(Principal { carrier: Carrier::Bearer, partition, header }));
        }
        let key = query_key
            .filter(|k| !k.is_empty())
            .map(|k| (Carrier::QueryKey, k))
            .or_else(|| body_key.filter(|k| !k.is_empty()).map(|k| (Carrier::BodyKey, k)));
        if let Some((carrier, key)) = key {
            let value = HeaderValue::try_from(format!("Bearer {key}")).map_err(|_| PrincipalError::InvalidKey)?;
            let partition = keyer.partition(b"personal-api-key", key.as_bytes());
            return Ok(Some(Principal { carrier, partition, header: (http::header::AUTHORIZATION, value) }));
        }
        let Some(session) = session_cookie(headers) else { return Ok(None) };
        let value =
            HeaderValue::try_from(format!("{SESSION_COOKIE}={session}")).map_err(|_| PrincipalError::InvalidKey)?;
        let partition = keyer.partition(b"session", session.as_bytes());
        Ok(Some(Principal { carrier: Carrier::SessionCookie, partition, header: (http::header::COOKIE, value) }))
    }

    /// A principal for a personal API key sent as a bearer token (tests and tools).
    pub fn api_key(keyer: &PartitionKeyer, key: &str) -> Principal {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::try_from(format!("Bearer {key}")).expect("a header-safe key"),
        );
        Principal::from_request(keyer, &h, None, None).expect("valid").expect("a key")
    }

    pub fn carrier(&self) -> Carrier {
        self.carrier
    }

    /// Owns cache entries, statuses and confirmations: one per credential the upstream
    /// authenticates (the same key in any carrier is one partition).
    pub fn partition(&self) -> Partition {
        self.partition
    }

    /// The identity the upstream throttles: the personal API key. Session users are not
    /// throttled upstream, so they have none.
    pub fn rate_key(&self) -> Option<Partition> {
        self.carrier.is_api_key().then_some(self.partition)
    }

    /// The only credential header the proxy's own upstream calls carry.
    pub fn upstream_header(&self) -> (HeaderName, HeaderValue) {
        self.header.clone()
    }
}

/// `Authorization: Bearer <key>` as PostHog reads it (the header and the key); any other scheme
/// is not a personal API key.
fn bearer(headers: &(impl HeaderFields + ?Sized)) -> Option<(&[u8], &str)> {
    headers.values(&http::header::AUTHORIZATION).find_map(|v| {
        let rest = visible_ascii(v)?.strip_prefix("Bearer")?;
        let token = rest.trim();
        (rest.starts_with(|c: char| c.is_ascii_whitespace()) && !token.is_empty()).then_some((v, token))
    })
}

fn session_cookie(headers: &(impl HeaderFields + ?Sized)) -> Option<&str> {
    headers
        .values(&http::header::COOKIE)
        .filter_map(visible_ascii)
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().split_once('=').filter(|(k, v)| *k == SESSION_COOKIE && !v.is_empty()).map(|(_, v)| v))
}

/// A field value as text when it is all visible ASCII (and tabs), as `HeaderValue::to_str` reads it.
fn visible_ascii(value: &[u8]) -> Option<&str> {
    value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)).then(|| std::str::from_utf8(value).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyer() -> PartitionKeyer {
        PartitionKeyer::new(Some("0123456789abcdef"))
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    fn principal(pairs: &[(&str, &str)], query: Option<&str>, body: Option<&str>) -> Option<Principal> {
        Principal::from_request(&keyer(), &headers(pairs), query, body).unwrap()
    }

    #[test]
    fn the_first_carrier_in_posthogs_order_wins() {
        assert!(principal(&[], None, Some("")).is_none());
        let bearer = principal(&[("authorization", "Bearer k1"), ("cookie", "sessionid=s")], Some("k2"), Some("k3"));
        assert_eq!(bearer.unwrap().carrier(), Carrier::Bearer);
        assert_eq!(
            principal(&[("cookie", "sessionid=s")], Some("k2"), Some("k3")).unwrap().carrier(),
            Carrier::QueryKey
        );
        assert_eq!(principal(&[("cookie", "sessionid=s")], None, Some("k3")).unwrap().carrier(), Carrier::BodyKey);
        let session = principal(&[("cookie", "a=b; sessionid=s; c=d")], None, None).unwrap();
        assert_eq!(session.carrier(), Carrier::SessionCookie);
        assert_eq!(session.rate_key(), None, "sessions are not throttled upstream");
        // Another scheme is not a personal API key: the next carrier authenticates.
        assert_eq!(
            principal(&[("authorization", "Basic abc")], Some("k2"), None).unwrap().carrier(),
            Carrier::QueryKey
        );
        assert!(principal(&[("authorization", "Bearer ")], None, None).is_none());
    }

    #[test]
    fn extra_carriers_change_neither_partition_nor_rate_key() {
        let plain = principal(&[("authorization", "Bearer k1")], None, None).unwrap();
        for junk in [
            principal(&[("authorization", "Bearer k1"), ("cookie", "sessionid=junk")], None, None),
            principal(&[("authorization", "Bearer k1")], Some("junk"), Some("junk2")),
            principal(&[("cookie", "sessionid=other")], Some("k1"), None),
            principal(&[], None, Some("k1")),
        ] {
            let junk = junk.unwrap();
            assert_eq!(junk.partition(), plain.partition());
            assert_eq!(junk.rate_key(), plain.rate_key());
            assert_eq!(junk.upstream_header(), plain.upstream_header(), "sent upstream as the same bearer token");
        }
        let other = principal(&[("authorization", "Bearer k2")], None, None).unwrap();
        assert_ne!(other.partition(), plain.partition());
        // A session id equal to a key's text is another principal.
        let session = principal(&[("cookie", "sessionid=k1")], None, None).unwrap();
        assert_ne!(session.partition(), plain.partition());
    }

    #[test]
    fn a_key_that_cannot_be_sent_is_invalid_and_nothing_leaks_in_debug() {
        let r = Principal::from_request(&keyer(), &HeaderMap::new(), Some("a\r\nX-Injected: 1"), None);
        assert_eq!(r.unwrap_err(), PrincipalError::InvalidKey);
        let p = principal(&[("authorization", "Bearer secret-key")], None, None).unwrap();
        assert!(!format!("{p:?}").contains("secret"));
    }
}
