//! The caller's credential, as PostHog accepts it: `Authorization` (Bearer personal API key),
//! a `personal_api_key` query parameter or JSON body field, or a `sessionid` cookie.
//!
//! The proxy never interprets a credential: it only forwards it upstream and hashes it (keyed, see
//! [`crate::cache::key::PartitionKeyer`]) into the partition that owns cache entries. Its `Debug`
//! output is redacted so it cannot reach a log by accident.

use std::fmt;

use http::HeaderMap;

#[derive(Clone, PartialEq, Eq, Default)]
pub struct Credential {
    pub authorization: Option<String>,
    pub api_key_param: Option<String>,
    pub session_cookie: Option<String>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

pub const SESSION_COOKIE: &str = "sessionid";

impl Credential {
    /// Everything that may authenticate the request; `None` when nothing does.
    pub fn from_request(headers: &HeaderMap, api_key_param: Option<&str>) -> Option<Credential> {
        let authorization = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string);
        let session_cookie = headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .filter(|(k, v)| *k == SESSION_COOKIE && !v.is_empty())
            .map(|(_, v)| v.to_string())
            .next_back();
        let c = Credential {
            authorization,
            api_key_param: api_key_param.filter(|k| !k.is_empty()).map(str::to_string),
            session_cookie,
        };
        (c != Credential::default()).then_some(c)
    }

    /// The bytes the partition is derived from: every part, length-prefixed so that no two
    /// different credentials share an encoding.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for part in [&self.authorization, &self.api_key_param, &self.session_cookie] {
            match part {
                Some(s) => {
                    out.push(1);
                    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
                    out.extend_from_slice(s.as_bytes());
                }
                None => out.push(0),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_each_kind() {
        let mut h = HeaderMap::new();
        assert!(Credential::from_request(&h, None).is_none());
        assert!(Credential::from_request(&h, Some("")).is_none());
        let c = Credential::from_request(&h, Some("phx_1")).unwrap();
        assert_eq!(c.api_key_param.as_deref(), Some("phx_1"));
        h.insert("cookie", "a=b; sessionid=s1; c=d".parse().unwrap());
        let c = Credential::from_request(&h, None).unwrap();
        assert_eq!(c.session_cookie.as_deref(), Some("s1"));
        h.insert("authorization", "Bearer phx_2".parse().unwrap());
        let c = Credential::from_request(&h, None).unwrap();
        assert_eq!(c.authorization.as_deref(), Some("Bearer phx_2"));
        assert_eq!(format!("{c:?}"), "Credential(<redacted>)");
    }

    #[test]
    fn encodings_are_unambiguous() {
        let a = Credential { authorization: Some("ab".into()), api_key_param: None, session_cookie: None };
        let b = Credential { authorization: None, api_key_param: Some("ab".into()), session_cookie: None };
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
    }
}
