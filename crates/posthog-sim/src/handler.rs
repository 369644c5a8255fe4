//! Request entry point: faults, routing, body parsing, authentication, project access and
//! throttling, then the project and query-status endpoints. Insight endpoints live in
//! `insights.rs`, the `/_sim/` control API in `control.rs`.

use crate::auth::Principal;
use crate::body::{self, DateStyle};
use crate::data::Project;
use crate::error::ApiError;
use crate::params::{path_segments, split_target, Params};
use crate::{control, insights, Fault, Inner, SimResponse};
use bytes::Bytes;
use http::HeaderMap;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Handlers return the response either way; `?` turns an [`ApiError`] into its response.
pub(crate) type Reply = Result<SimResponse, SimResponse>;

impl From<ApiError> for SimResponse {
    fn from(e: ApiError) -> Self {
        let mut r = json_response(e.status, e.to_json().to_string());
        if e.status == 401 {
            r.headers.push(("www-authenticate", "Bearer realm=\"api\"".into()));
        }
        r
    }
}

pub(crate) fn json_response(status: u16, body: String) -> SimResponse {
    SimResponse { status, headers: vec![("content-type", "application/json".into())], body: Bytes::from(body) }
}

pub(crate) fn empty_response(status: u16) -> SimResponse {
    SimResponse { status, headers: Vec::new(), body: Bytes::new() }
}

pub(crate) fn not_found() -> SimResponse {
    ApiError::not_found().into()
}

/// A routed, authenticated request.
pub(crate) struct Request<'a> {
    pub inner: &'a Arc<Inner>,
    pub method: &'a str,
    pub path: &'a str,
    pub params: Params,
    pub headers: &'a HeaderMap,
    /// The JSON body when it is an object (DRF's `request.data`).
    pub body: Option<Value>,
    pub principal: Principal,
}

impl Request<'_> {
    /// The `Host` header, for absolute pagination URLs.
    pub fn host(&self) -> &str {
        self.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost")
    }

    /// Resolves `:project_id` (digits or `@current`): unknown → 404, no access → 403.
    fn project(&self, raw: &str) -> Result<&Project, SimResponse> {
        let data = &self.inner.data;
        let id = if raw == "@current" {
            data.projects.iter().map(|p| p.id).find(|id| self.inner.auth.can_access(&self.principal, *id))
        } else if raw.bytes().all(|b| b.is_ascii_digit()) {
            raw.parse::<u64>().ok()
        } else {
            None
        };
        let project = id.and_then(|id| data.project(id)).ok_or_else(not_found)?;
        if !self.inner.auth.can_access(&self.principal, project.id) {
            return Err(ApiError::permission_denied("You don't have access to the project.").into());
        }
        Ok(project)
    }

    fn method_not_allowed(&self) -> SimResponse {
        ApiError::method_not_allowed(self.method).into()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sub<'a> {
    Insights,
    InsightsActivity,
    InsightsCancel,
    Insight(&'a str),
    InsightSharing(&'a str),
    InsightActivity(&'a str),
    InsightViewed(&'a str),
    Query(&'a str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route<'a> {
    Projects,
    Project(&'a str),
    Team(&'a str, Sub<'a>),
}

fn route(segments: &[String]) -> Option<Route<'_>> {
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    match *s.as_slice() {
        ["api", "projects"] => Some(Route::Projects),
        ["api", "projects", id] => Some(Route::Project(id)),
        ["api", "projects" | "environments", team, ref rest @ ..] => Some(Route::Team(team, sub_route(rest)?)),
        _ => None,
    }
}

fn sub_route<'a>(rest: &[&'a str]) -> Option<Sub<'a>> {
    Some(match *rest {
        ["insights"] => Sub::Insights,
        // DRF routes list-level actions before `insights/:id/`.
        ["insights", "activity"] => Sub::InsightsActivity,
        ["insights", "cancel"] => Sub::InsightsCancel,
        ["insights", id] => Sub::Insight(id),
        ["insights", id, "sharing"] => Sub::InsightSharing(id),
        ["insights", id, "activity"] => Sub::InsightActivity(id),
        ["insights", id, "viewed"] => Sub::InsightViewed(id),
        ["query", id] => Sub::Query(id),
        _ => return None,
    })
}

pub(crate) async fn handle(
    inner: &Arc<Inner>,
    method: &str,
    target: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> SimResponse {
    let (path, query) = split_target(target);
    if path == "/_sim" || path.starts_with("/_sim/") {
        return control::handle(inner, method, path, &Params::parse(query));
    }
    inner.requests.fetch_add(1, Ordering::Relaxed);
    if path == "/api" || path.starts_with("/api/") {
        match inner.fault() {
            Fault::Status(code) => return fault_status(code),
            Fault::Garbage => return garbage(),
            Fault::Hang => {
                // Resumes only when the fault is cleared; pingora cancels it on shutdown.
                while inner.fault() == Fault::Hang {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Fault::None | Fault::NullResult | Fault::Concurrency => {}
        }
    }
    api(inner, method, path, query, headers, body).await.unwrap_or_else(|e| e)
}

async fn api(inner: &Arc<Inner>, method: &str, path: &str, query: &str, headers: &HeaderMap, raw: &[u8]) -> Reply {
    let segments = path_segments(path).ok_or_else(not_found)?;
    let route = route(&segments).ok_or_else(not_found)?;
    let params = Params::parse(query);
    let body = parse_body(method, raw)?;
    let principal = inner.auth.authenticate(method, headers, &params, body.as_ref())?;
    let req = Request { inner, method, path, params, headers, body, principal };
    match route {
        Route::Projects => match method {
            "GET" => Ok(list_projects(&req)),
            _ => Err(req.method_not_allowed()),
        },
        Route::Project(raw) => {
            let project = req.project(raw)?;
            match method {
                "GET" => Ok(json_response(200, project_json(project).to_string())),
                _ => Err(req.method_not_allowed()),
            }
        }
        Route::Team(raw, sub) => {
            let project = req.project(raw)?;
            if !matches!(sub, Sub::Query(_)) {
                let now = inner.clock.now();
                if let Err((e, wait)) = inner.auth.throttle(&req.principal, now) {
                    inner.throttled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let mut r: SimResponse = e.into();
                    r.headers.push(("retry-after", wait.to_string()));
                    return Err(r);
                }
            }
            match sub {
                Sub::Query(id) => query_status(&req, project, id),
                other => insights::handle(&req, project, other).await,
            }
        }
    }
}

/// DRF's `request.data`: empty → none; for writes, malformed JSON is a 400. GET bodies are
/// parsed leniently (only `refresh`/`personal_api_key` are read from them).
fn parse_body(method: &str, raw: &[u8]) -> Result<Option<Value>, SimResponse> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    match serde_json::from_slice::<Value>(raw) {
        Ok(v @ Value::Object(_)) => Ok(Some(v)),
        Ok(_) | Err(_) if matches!(method, "GET" | "HEAD" | "DELETE" | "OPTIONS") => Ok(None),
        Ok(other) => {
            let kind = match other {
                Value::Array(_) => "list",
                Value::String(_) => "str",
                Value::Number(_) => "int",
                Value::Bool(_) => "bool",
                _ => "NoneType",
            };
            let detail = format!("Invalid data. Expected a dictionary, but got {kind}.");
            Err(ApiError::bad_request(detail).with_attr("non_field_errors").into())
        }
        Err(e) => Err(ApiError::new(400, "validation_error", "parse_error", format!("JSON parse error - {e}")).into()),
    }
}

/// `Fault::Status`: a PostHog-shaped error with that status. Statuses that cannot carry a final
/// response body (1xx, 204, 304, out of range) become a 500 so HTTP framing stays valid.
fn fault_status(code: u16) -> SimResponse {
    let code = if (200..=599).contains(&code) && code != 204 && code != 304 { code } else { 500 };
    let e = match code {
        400 => ApiError::bad_request("Simulated bad request."),
        401 => ApiError::not_authenticated(),
        403 => ApiError::permission_denied("You do not have permission to perform this action."),
        404 => ApiError::not_found(),
        429 => ApiError::throttled("Request was throttled."),
        500..=599 => ApiError::new(code, "server_error", "error", "A server error occurred."),
        _ => ApiError::new(code, "invalid_request", "error", "Simulated fault."),
    };
    let mut r: SimResponse = e.into();
    if code == 429 || code == 503 {
        r.headers.push(("retry-after", "1".into()));
    }
    r
}

fn garbage() -> SimResponse {
    json_response(200, "{\"id\": 1, \"result\": [{\"data\": [1, 2, ".to_owned())
}

fn project_json(p: &Project) -> Value {
    json!({
        "id": p.id, "uuid": p.uuid, "organization": p.organization, "api_token": p.api_token,
        "name": p.name, "timezone": p.timezone, "created_at": crate::datetime::format_datetime(p.created_at),
        "is_demo": false, "ingested_event": true, "completed_snapshot_onboarding": true,
        "access_control": false, "week_start_day": null, "primary_dashboard": (p.id - 1) * 3 + 1,
    })
}

fn list_projects(req: &Request<'_>) -> SimResponse {
    let visible: Vec<Value> = req
        .inner
        .data
        .projects
        .iter()
        .filter(|p| req.inner.auth.can_access(&req.principal, p.id))
        .map(project_json)
        .collect();
    json_response(200, json!({"count": visible.len(), "next": null, "previous": null, "results": visible}).to_string())
}

/// `GET|DELETE query/:id/` (QAPI): 202 running, 200 done, 400/500 failed, 404 unknown/expired.
fn query_status(req: &Request<'_>, project: &Project, id: &str) -> Reply {
    let engine = &req.inner.engine;
    let now = req.inner.clock.now();
    match req.method {
        "GET" => {
            let status = engine.status(project.id, id, now).ok_or_else(not_found)?;
            let progress =
                (!status.complete && crate::params::str_to_bool(req.params.get("show_progress"))).then(|| {
                    let elapsed = status.pickup_time.map_or(0.0, |t| (now - t).as_seconds_f64().max(0.0));
                    json!({"bytes_read": (elapsed * 5e7) as u64, "rows_read": (elapsed * 1e6) as u64,
                    "estimated_rows_total": 10_000_000u64, "time_elapsed": elapsed, "active_cpu_time": elapsed * 0.8})
                });
            let code = match (status.complete, status.error, &status.error_message) {
                (false, _, _) => 202,
                (true, false, _) => 200,
                (true, true, Some(_)) => 400,
                (true, true, None) => 500,
            };
            let inner = body::status(&status, DateStyle::Django, progress);
            Ok(json_response(code, body::splice("{}", "query_status", &inner)))
        }
        "DELETE" => {
            engine.remove_status(project.id, id);
            Ok(json_response(200, json!({"message": "Query cancelled"}).to_string()))
        }
        _ => Err(req.method_not_allowed()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(p: &str) -> Vec<String> {
        path_segments(p).unwrap()
    }

    #[test]
    fn routes() {
        assert_eq!(route(&segs("/api/projects/")), Some(Route::Projects));
        assert_eq!(route(&segs("/api/projects/2")), Some(Route::Project("2")));
        let s = segs("/api/environments/1/insights/7/sharing/");
        assert_eq!(route(&s), Some(Route::Team("1", Sub::InsightSharing("7"))));
        let s = segs("/api/projects/1/insights/activity");
        assert_eq!(route(&s), Some(Route::Team("1", Sub::InsightsActivity)));
        let s = segs("/api/projects/1/query/abc/");
        assert_eq!(route(&s), Some(Route::Team("1", Sub::Query("abc"))));
        for bad in ["/api/projects/1/dashboards/", "/api//projects/1/insights/", "/api/projects/1/insights/1/x/", "/"] {
            assert_eq!(route(&segs(bad)), None, "{bad}");
        }
    }
}
