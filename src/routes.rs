//! The only place that knows the URL shapes of the insights API. [`route`] is pure.

use http::Method;

use crate::error::ApiError;
use crate::query::QueryParams;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /api/{environments|projects}/:project/insights/:id/`
    InsightRetrieve { project: u64, insight: u64 },
    /// `GET /api/{environments|projects}/:project/insights/` (not `basic=true`)
    InsightList { project: u64 },
    /// `PATCH|PUT|POST /api/.../insights/:id/`: passed through, then the insight's entries are dropped.
    InsightWrite { project: u64, insight: u64 },
    /// `GET /api/{environments|projects}/:project/query/:id/`: answered if the proxy issued the id.
    QueryStatus { project: u64, query_id: String },
    /// `DELETE .../query/:id/` (`Some(id)`) or `POST .../insights/cancel/` (the id in the body's
    /// `client_query_id`): passed through, and a status the proxy issued is dropped too.
    QueryCancel { project: u64, query_id: Option<String> },
    /// Anything else: forwarded untouched.
    Passthrough,
    /// Refused without asking the upstream.
    Reject(ApiError),
}

/// Routes a request. `query` is the already-parsed query string (callers reject bad encodings).
impl Route {
    /// A short, bounded label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Route::InsightRetrieve { .. } => "insight",
            Route::InsightList { .. } => "insight_list",
            Route::InsightWrite { .. } => "insight_write",
            Route::QueryStatus { .. } => "query_status",
            Route::QueryCancel { .. } => "query_cancel",
            Route::Passthrough => "passthrough",
            Route::Reject(_) => "rejected",
        }
    }
}

pub fn route(method: &Method, path: &str, query: &QueryParams) -> Route {
    if has_dot_segment(path) {
        return Route::Reject(ApiError::bad_request("Paths with dot-segments are not allowed."));
    }
    let Some(rest) = path.strip_prefix("/api/") else {
        return Route::Passthrough;
    };
    let mut parts = Segments(Some(rest.trim_end_matches('/')));
    let (Some(scope), Some(project)) = (parts.next(), parts.next()) else {
        return Route::Passthrough;
    };
    if scope != "environments" && scope != "projects" {
        return Route::Passthrough;
    }
    let project = match parse_id(project) {
        Id::Valid(p) => p,
        Id::TooLarge => return Route::Reject(ApiError::not_found()),
        Id::NotNumeric => return Route::Passthrough, // e.g. `@current`
    };
    // The remaining segments, at most two of interest (no allocation: this runs on every hit).
    let rest = (parts.next(), parts.next(), parts.next());
    let csv = query.get("format").is_some_and(|f| f != "json");
    match (rest, method) {
        ((Some("insights"), None, _), &Method::GET) if !csv && query.get("basic") != Some("true") => {
            Route::InsightList { project }
        }
        ((Some("insights"), Some("cancel"), None), &Method::POST) => Route::QueryCancel { project, query_id: None },
        ((Some("insights"), Some(id), None), m) => match parse_id(id) {
            Id::Valid(insight) if m == Method::GET && !csv => Route::InsightRetrieve { project, insight },
            Id::Valid(insight) if m == Method::PATCH || m == Method::PUT || m == Method::POST => {
                Route::InsightWrite { project, insight }
            }
            Id::TooLarge => Route::Reject(ApiError::not_found()),
            _ => Route::Passthrough,
        },
        ((Some("query"), Some(id), None), &Method::GET) if !id.is_empty() => {
            Route::QueryStatus { project, query_id: id.to_string() }
        }
        ((Some("query"), Some(id), None), &Method::DELETE) if !id.is_empty() => {
            Route::QueryCancel { project, query_id: Some(id.to_string()) }
        }
        _ => Route::Passthrough,
    }
}

/// `str::split('/')` by byte position: the same segments, without a `char` searcher's per-call
/// set-up (this runs on every hit).
struct Segments<'a>(Option<&'a str>);

impl<'a> Iterator for Segments<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.0?;
        match s.bytes().position(|b| b == b'/') {
            Some(i) => {
                self.0 = Some(&s[i + 1..]);
                Some(&s[..i])
            }
            None => {
                self.0 = None;
                Some(s)
            }
        }
    }
}

enum Id {
    Valid(u64),
    TooLarge,
    NotNumeric,
}

/// Database ids are positive and fit PostgreSQL's bigint; a longer run of digits is still an id in
/// the URL's grammar, but names nothing.
fn parse_id(s: &str) -> Id {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Id::NotNumeric;
    }
    match s.parse::<u64>() {
        Ok(n) if n <= i64::MAX as u64 => Id::Valid(n),
        _ => Id::TooLarge,
    }
}

fn has_dot_segment(path: &str) -> bool {
    if !path.bytes().any(|b| b == b'.' || b == b'%') {
        return false;
    }
    path.split('/').any(|seg| {
        let seg = seg.to_ascii_lowercase().replace("%2e", ".");
        seg == "." || seg == ".."
    }) || path.to_ascii_lowercase().contains("%2f")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(method: Method, path: &str, query: &str) -> Route {
        route(&method, path, &QueryParams::parse(Some(query)).unwrap())
    }

    #[test]
    fn insight_routes() {
        assert_eq!(
            r(Method::GET, "/api/environments/1/insights/2/", ""),
            Route::InsightRetrieve { project: 1, insight: 2 }
        );
        assert_eq!(r(Method::GET, "/api/projects/1/insights/2", ""), Route::InsightRetrieve { project: 1, insight: 2 });
        assert_eq!(r(Method::GET, "/api/projects/1/insights/", "limit=2"), Route::InsightList { project: 1 });
        assert_eq!(r(Method::GET, "/api/projects/1/insights/", "basic=true"), Route::Passthrough);
        assert_eq!(r(Method::GET, "/api/projects/1/insights/2/", "format=csv"), Route::Passthrough);
        assert_eq!(r(Method::PATCH, "/api/projects/1/insights/2/", ""), Route::InsightWrite { project: 1, insight: 2 });
        assert_eq!(r(Method::DELETE, "/api/projects/1/insights/2/", ""), Route::Passthrough);
        assert_eq!(r(Method::GET, "/api/projects/1/insights/activity/", ""), Route::Passthrough);
        assert_eq!(r(Method::GET, "/api/projects/1/insights/2/sharing/", ""), Route::Passthrough);
        assert_eq!(r(Method::POST, "/api/projects/1/insights/", ""), Route::Passthrough);
        assert_eq!(r(Method::GET, "/api/projects/@current/insights/2/", ""), Route::Passthrough);
        assert_eq!(
            r(Method::GET, "/api/environments/3/query/abc/", ""),
            Route::QueryStatus { project: 3, query_id: "abc".into() }
        );
        assert_eq!(r(Method::GET, "/healthz", ""), Route::Passthrough);
        assert_eq!(
            r(Method::GET, "/api/projects/1/query/abc/", ""),
            Route::QueryStatus { project: 1, query_id: "abc".into() }
        );
        assert_eq!(r(Method::GET, "/api/projects/1/query/abc/def/", ""), Route::Passthrough);
        assert_eq!(
            r(Method::DELETE, "/api/projects/1/query/abc/", ""),
            Route::QueryCancel { project: 1, query_id: Some("abc".into()) }
        );
        assert_eq!(
            r(Method::POST, "/api/projects/1/insights/cancel/", ""),
            Route::QueryCancel { project: 1, query_id: None }
        );
        assert_eq!(r(Method::GET, "/api/projects/1/", ""), Route::Passthrough);
    }

    #[test]
    fn bad_ids_and_paths() {
        assert_eq!(
            r(Method::GET, "/api/projects/1/insights/99999999999999999999999/", ""),
            Route::Reject(ApiError::not_found())
        );
        assert_eq!(
            r(Method::GET, "/api/projects/99999999999999999999/insights/1/", ""),
            Route::Reject(ApiError::not_found())
        );
        assert!(matches!(r(Method::GET, "/api/environments/1/insights/../../x", ""), Route::Reject(_)));
        assert!(matches!(r(Method::GET, "/api/environments/1/insights/%2e%2E/x", ""), Route::Reject(_)));
        assert!(matches!(r(Method::GET, "/api/environments/1/insights/1%2F..", ""), Route::Reject(_)));
        assert_eq!(r(Method::GET, "/api/environments/1/insights/-1/", ""), Route::Passthrough);
    }

    #[test]
    fn segments_are_the_split_at_every_slash() {
        use proptest::prelude::*;
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(2000));
        runner
            .run(&"[a/é0%.]{0,12}", |s| {
                prop_assert_eq!(Segments(Some(&s)).collect::<Vec<_>>(), s.split('/').collect::<Vec<_>>());
                Ok(())
            })
            .unwrap();
    }
}
