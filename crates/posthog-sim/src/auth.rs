//! Credentials (personal API keys and session cookies), project access and DRF-style throttles.

use crate::error::ApiError;
use crate::params::Params;
use http::HeaderMap;
use parking_lot::Mutex;
use serde_json::Value;
use std::collections::{HashMap, HashSet, VecDeque};
use time::OffsetDateTime;

/// Demo credentials: (credential, is a session id, user id, projects or `None` for all).
const DEMO: [(&str, bool, u64, Option<u64>); 4] = [
    ("phx_demo_all", false, 1, None),
    ("phx_demo_p1", false, 2, Some(1)),
    ("phx_demo_p2", false, 3, Some(2)),
    ("demo_session_all", true, 1, None),
];

#[derive(Clone, Debug)]
struct Credential {
    session: bool,
    user_id: u64,
    all_projects: bool,
    allow: HashSet<u64>,
    deny: HashSet<u64>,
    /// Insights this credential may not see although it sees their project (PostHog's
    /// object-level access control).
    deny_insights: HashSet<u64>,
    revoked: bool,
}

impl Credential {
    fn api_key(user_id: u64) -> Self {
        Self {
            session: false,
            user_id,
            all_projects: false,
            allow: HashSet::new(),
            deny: HashSet::new(),
            deny_insights: HashSet::new(),
            revoked: false,
        }
    }
}

/// Who a request runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Principal {
    pub user_id: u64,
    /// The credential string (API key or session id), to re-check access as it changes.
    pub credential: String,
    /// Personal API key requests are throttled; session users are exempt (RL).
    pub api_key: bool,
}

#[derive(Default)]
struct History {
    minute: VecDeque<OffsetDateTime>,
    hour: VecDeque<OffsetDateTime>,
}

pub(crate) struct Auth {
    credentials: Mutex<HashMap<String, Credential>>,
    history: Mutex<HashMap<String, History>>,
    rate_limit: Option<(u32, u32)>,
}

impl Auth {
    pub fn new(rate_limit: Option<(u32, u32)>) -> Self {
        let credentials = DEMO
            .iter()
            .map(|&(cred, session, user_id, project)| {
                let mut c = Credential::api_key(user_id);
                c.session = session;
                c.all_projects = project.is_none();
                c.allow.extend(project);
                (cred.to_owned(), c)
            })
            .collect();
        Self { credentials: Mutex::new(credentials), history: Mutex::new(HashMap::new()), rate_limit }
    }

    /// Revokes an API key or session id; an unknown one is recorded as revoked.
    pub fn revoke(&self, credential: &str) {
        let mut creds = self.credentials.lock();
        creds.entry(credential.to_owned()).or_insert_with(|| Credential::api_key(1)).revoked = true;
    }

    /// Grants or removes one project for a credential. An unknown credential becomes a new
    /// personal API key (user 1) with just this grant, which lets tests mint keys.
    pub fn set_access(&self, credential: &str, project: u64, allowed: bool) {
        let mut creds = self.credentials.lock();
        let c = creds.entry(credential.to_owned()).or_insert_with(|| Credential::api_key(1));
        if allowed {
            c.deny.remove(&project);
            c.allow.insert(project);
        } else {
            c.allow.remove(&project);
            c.deny.insert(project);
        }
    }

    /// Restricts or restores one insight for a credential (object-level access control).
    pub fn set_insight_access(&self, credential: &str, insight: u64, allowed: bool) {
        let mut creds = self.credentials.lock();
        let c = creds.entry(credential.to_owned()).or_insert_with(|| Credential::api_key(1));
        if allowed {
            c.deny_insights.remove(&insight);
        } else {
            c.deny_insights.insert(insight);
        }
    }

    pub fn can_access_insight(&self, principal: &Principal, insight: u64) -> bool {
        self.credentials.lock().get(&principal.credential).is_none_or(|c| !c.deny_insights.contains(&insight))
    }

    pub fn can_access(&self, principal: &Principal, project: u64) -> bool {
        let creds = self.credentials.lock();
        creds
            .get(&principal.credential)
            .is_some_and(|c| !c.revoked && !c.deny.contains(&project) && (c.all_projects || c.allow.contains(&project)))
    }

    /// PostHog's authenticator order: a personal API key (`Authorization: Bearer`, then the
    /// `personal_api_key` query parameter, then the body field) wins and fails hard when
    /// invalid; otherwise the `sessionid` cookie, which for unsafe methods also needs CSRF.
    pub fn authenticate(
        &self,
        method: &str,
        headers: &HeaderMap,
        params: &Params,
        body: Option<&Value>,
    ) -> Result<Principal, ApiError> {
        if let Some(key) = find_api_key(headers, params, body) {
            let creds = self.credentials.lock();
            return match creds.get(&key) {
                Some(c) if !c.session && !c.revoked => {
                    Ok(Principal { user_id: c.user_id, credential: key, api_key: true })
                }
                _ => Err(ApiError::authentication_failed("Personal API key found in request is invalid.")),
            };
        }
        let session = cookie(headers, "sessionid");
        let user = session.as_ref().and_then(|sid| {
            let creds = self.credentials.lock();
            creds.get(sid).filter(|c| c.session && !c.revoked).map(|c| c.user_id)
        });
        // An unknown session is an anonymous user, as in Django.
        let (Some(sid), Some(user_id)) = (session, user) else {
            return Err(ApiError::not_authenticated());
        };
        if !matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE") {
            let token = cookie(headers, "csrftoken");
            let sent = headers.get("x-csrftoken").and_then(|v| v.to_str().ok());
            if token.is_none() || token.as_deref() != sent {
                return Err(ApiError::permission_denied("CSRF Failed: CSRF token missing."));
            }
        }
        Ok(Principal { user_id, credential: sid, api_key: false })
    }

    /// Burst (per minute) then sustained (per hour) throttle for personal API keys, DRF's
    /// `SimpleRateThrottle`: a sliding window of request times. Returns the 429 and the
    /// `Retry-After` seconds when over either limit.
    pub fn throttle(&self, principal: &Principal, now: OffsetDateTime) -> Result<(), (ApiError, u64)> {
        let (Some((per_minute, per_hour)), true) = (self.rate_limit, principal.api_key) else {
            return Ok(());
        };
        let mut all = self.history.lock();
        let h = all.entry(principal.credential.clone()).or_default();
        let mut waits = Vec::new();
        for (window, limit, span) in
            [(&mut h.minute, per_minute, time::Duration::minutes(1)), (&mut h.hour, per_hour, time::Duration::hours(1))]
        {
            while window.back().is_some_and(|t| *t <= now - span) {
                window.pop_back();
            }
            if window.len() >= limit as usize {
                let remaining = span - window.back().map_or(time::Duration::ZERO, |oldest| now - *oldest);
                let available = i64::from(limit) - window.len() as i64 + 1;
                waits.push(if available > 0 {
                    remaining.as_seconds_f64() / available as f64
                } else {
                    remaining.as_seconds_f64()
                });
            } else {
                window.push_front(now);
            }
        }
        let Some(wait) = waits.into_iter().reduce(f64::max) else {
            return Ok(());
        };
        let wait = wait.ceil().max(1.0) as u64;
        let unit = if wait == 1 { "second" } else { "seconds" };
        Err((ApiError::throttled(format!("Request was throttled. Expected available in {wait} {unit}.")), wait))
    }
}

fn find_api_key(headers: &HeaderMap, params: &Params, body: Option<&Value>) -> Option<String> {
    let bearer = headers.get_all(http::header::AUTHORIZATION).iter().find_map(|v| {
        let v = v.to_str().ok()?;
        let rest = v.strip_prefix("Bearer")?;
        let token = rest.trim();
        (rest.starts_with(char::is_whitespace) && !token.is_empty()).then(|| token.to_owned())
    });
    bearer
        .or_else(|| params.get("personal_api_key").filter(|k| !k.is_empty()).map(str::to_owned))
        .or_else(|| body?.get("personal_api_key")?.as_str().filter(|k| !k.is_empty()).map(str::to_owned))
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(http::header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(
        |pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name && !v.is_empty()).then(|| v.to_owned())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn credential_sources() {
        let auth = Auth::new(None);
        let none = Params::default();
        let ok = |r: Result<Principal, ApiError>| r.unwrap().user_id;
        assert_eq!(ok(auth.authenticate("GET", &headers(&[("authorization", "Bearer phx_demo_p1")]), &none, None)), 2);
        assert_eq!(
            ok(auth.authenticate("GET", &HeaderMap::new(), &Params::parse("personal_api_key=phx_demo_p2"), None)),
            3
        );
        let body = json!({"personal_api_key": "phx_demo_all"});
        assert_eq!(ok(auth.authenticate("POST", &HeaderMap::new(), &none, Some(&body))), 1);
        let cookie = headers(&[("cookie", "a=b; sessionid=demo_session_all")]);
        assert_eq!(ok(auth.authenticate("GET", &cookie, &none, None)), 1);
        // a session cannot be used as an API key, and the bad key wins over a good session
        let both = headers(&[("authorization", "Bearer demo_session_all"), ("cookie", "sessionid=demo_session_all")]);
        assert_eq!(auth.authenticate("GET", &both, &none, None).unwrap_err().code, "authentication_failed");
        assert_eq!(
            auth.authenticate("GET", &headers(&[("authorization", "Basic x")]), &none, None).unwrap_err().code,
            "not_authenticated"
        );
        assert_eq!(
            auth.authenticate("GET", &headers(&[("cookie", "sessionid=nope")]), &none, None).unwrap_err().code,
            "not_authenticated"
        );
    }

    #[test]
    fn csrf_for_session_writes() {
        let auth = Auth::new(None);
        let none = Params::default();
        let no_csrf = headers(&[("cookie", "sessionid=demo_session_all")]);
        assert_eq!(auth.authenticate("PATCH", &no_csrf, &none, None).unwrap_err().status, 403);
        let csrf = headers(&[("cookie", "sessionid=demo_session_all; csrftoken=t"), ("x-csrftoken", "t")]);
        assert!(auth.authenticate("PATCH", &csrf, &none, None).is_ok());
    }

    #[test]
    fn access_and_revocation() {
        let auth = Auth::new(None);
        let p = |c: &str| Principal { user_id: 1, credential: c.into(), api_key: true };
        assert!(auth.can_access(&p("phx_demo_all"), 3));
        assert!(auth.can_access(&p("phx_demo_p1"), 1) && !auth.can_access(&p("phx_demo_p1"), 2));
        auth.set_access("phx_demo_all", 3, false);
        assert!(!auth.can_access(&p("phx_demo_all"), 3));
        auth.set_access("phx_new", 2, true);
        assert!(auth.can_access(&p("phx_new"), 2));
        auth.revoke("phx_demo_p1");
        let h = headers(&[("authorization", "Bearer phx_demo_p1")]);
        assert_eq!(auth.authenticate("GET", &h, &Params::default(), None).unwrap_err().status, 401);
    }

    #[test]
    fn throttles() {
        let auth = Auth::new(Some((2, 4)));
        let key = Principal { user_id: 1, credential: "phx_demo_all".into(), api_key: true };
        let t0 = time::macros::datetime!(2024-01-01 0:00 UTC);
        let at = |s: i64| t0 + time::Duration::seconds(s);
        assert!(auth.throttle(&key, t0).is_ok());
        assert!(auth.throttle(&key, t0).is_ok());
        let (err, wait) = auth.throttle(&key, at(10)).unwrap_err();
        assert_eq!((err.status, wait), (429, 50));
        assert_eq!(err.detail, "Request was throttled. Expected available in 50 seconds.");
        // DRF evaluates every throttle: the burst-throttled request still counted per hour.
        assert!(auth.throttle(&key, at(61)).is_ok());
        let (_, wait) = auth.throttle(&key, at(62)).unwrap_err();
        assert_eq!(wait, 3600 - 62);
        let session = Principal { api_key: false, ..key };
        assert!(auth.throttle(&session, t0).is_ok());
    }
}
