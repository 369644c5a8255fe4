//! The admin listener, on its own port (loopback by default): `/metrics` (Prometheus text),
//! `/healthz` (alive), `/readyz` (configured and the upstream reachable), and behind a bearer token
//! the admin API: purge an insight or a project, inspect an insight's entries (metadata only).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{Method, Response};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::app::App;
use crate::clock::format_datetime;
use crate::error::ApiError;
use crate::query::QueryParams;
use crate::upstream::UpstreamRequest;

pub struct AdminApp {
    pub app: Arc<App>,
}

fn respond(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("a valid response")
}

fn json_reply(status: u16, v: serde_json::Value) -> Response<Vec<u8>> {
    respond(status, "application/json", v.to_string().into_bytes())
}

fn error(e: &ApiError) -> Response<Vec<u8>> {
    respond(e.status, "application/json", e.body().to_vec())
}

/// Constant-time comparison, so the token cannot be found byte by byte from response times.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl AdminApp {
    /// Sets the gauges that are read off other components, then renders every metric.
    pub async fn metrics_text(&self) -> Vec<u8> {
        let (app, m) = (&self.app, &self.app.metrics);
        // moka's counts are approximate until its pending housekeeping has run.
        app.cache.run_pending_tasks().await;
        m.queue_depth.set(app.engine.queued() as i64);
        m.cache_entries.set(app.cache.entry_count() as i64);
        m.cache_bytes.set(app.cache.weighted_size() as i64);
        m.sendfile_bodies.set(crate::cache::sealed::open_files() as i64);
        m.status_records.set(app.statuses.len() as i64);
        m.status_running.set(app.statuses.running_count() as i64);
        m.purge_records.set(app.cache.purge_records() as i64);
        m.status_bytes.set(app.statuses.done_bytes() as i64);
        m.circuit_open.set(i64::from(app.engine.upstream().breaker().is_open()));
        let age = app.statuses.oldest_running_start().map_or(0, |t| (app.clock.now() - t).whole_seconds().max(0));
        m.status_oldest_running_seconds.set(age);
        m.cache_max_bytes.set(app.config.cache_max_bytes as i64);
        m.queue_capacity.set(app.config.queue_capacity as i64);
        m.workers.set(app.config.workers as i64);
        let (b, total) = (app.engine.budget_counts(), |c: &AtomicU64| c.load(Ordering::Relaxed));
        let (waits, exhausted) = (&m.budget_waits, &m.budget_exhausted);
        m.mirror(&[
            (waits.with_label_values(&["rate"]), total(&b.rate_waits)),
            (exhausted.with_label_values(&["rate"]), total(&b.rate_exhausted)),
            (waits.with_label_values(&["slot"]), total(&b.slot_waits)),
            (exhausted.with_label_values(&["slot"]), total(&b.slot_exhausted)),
        ]);
        if let Some((up, replicas)) = app.engine.budget_sharing() {
            m.budget_shared.set(i64::from(up));
            m.budget_replicas.set(i64::from(replicas));
        }
        if let Some(l2) = app.cache.l2() {
            let g = m.l2();
            g.up.set(i64::from(l2.is_up()));
            m.mirror(&[(g.errors.clone(), total(&l2.errors))]);
        }
        m.render()
    }

    /// Ready when the upstream accepts a connection and its circuit is closed. While the circuit
    /// is open, each check past the cooldown probes the upstream itself (an answer below 500
    /// closes the circuit), so readiness cannot latch on a proxy that gets no traffic.
    pub async fn readiness(&self) -> Result<(), &'static str> {
        let settings = self.app.engine.upstream().settings();
        if self.app.engine.upstream().breaker().is_open() {
            let probe =
                UpstreamRequest { method: Method::GET, path_and_query: "/_health".into(), headers: vec![], body: None };
            return match self.app.engine.upstream().send(&probe).await {
                Ok(r) if r.status < 500 => Ok(()),
                _ => Err("upstream circuit open"),
            };
        }
        // The shared tier being down degrades, it does not make the proxy unready: it is in the
        // /readyz detail and in metrics.
        let timeout = settings.connect_timeout.min(Duration::from_secs(2));
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(settings.url.addr)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err("upstream unreachable"),
        }
    }

    fn authorized(&self, session: &ServerSession) -> Result<(), ApiError> {
        let Some(token) = &self.app.config.admin_token else {
            return Err(ApiError::permission_denied("The admin API is disabled: set [admin] token."));
        };
        let given = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(g) if same(g.as_bytes(), token.as_bytes()) => Ok(()),
            Some(_) => Err(ApiError::authentication_failed("Invalid admin token.")),
            None => Err(ApiError::not_authenticated()),
        }
    }

    fn ids(query: &QueryParams) -> Result<(u64, Option<u64>), ApiError> {
        let num = |name: &'static str| -> Result<Option<u64>, ApiError> {
            query
                .get(name)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| ApiError::bad_request(format!("{name} must be a number")).with_attr(name))
                })
                .transpose()
        };
        let project =
            num("project")?.ok_or_else(|| ApiError::bad_request("project is required").with_attr("project"))?;
        Ok((project, num("insight")?))
    }

    fn purge(&self, query: &QueryParams) -> Result<serde_json::Value, ApiError> {
        let (project, insight) = Self::ids(query)?;
        match insight {
            Some(insight) => self.app.cache.purge_insight(project, insight),
            None => self.app.cache.purge_project(project),
        }
        tracing::info!(project, insight, "admin purge");
        Ok(json!({ "purged": { "project": project, "insight": insight } }))
    }

    fn inspect(&self, query: &QueryParams) -> Result<serde_json::Value, ApiError> {
        let (project, insight) = Self::ids(query)?;
        let insight = insight.ok_or_else(|| ApiError::bad_request("insight is required").with_attr("insight"))?;
        let (app, now) = (&self.app, self.app.clock.now());
        let t = &app.config.thresholds;
        let entries: Vec<_> = app
            .cache
            .entries_of(project, insight)
            .into_iter()
            .map(|(key, e)| {
                let status = app.statuses.get(key.partition, &app.keyer.status_id(&key));
                json!({
                    "partition": format!("{:?}", key.partition),
                    "variant": format!("{:032x}", key.variant),
                    "upstream_key": (e.group != 0).then(|| format!("{:032x}", e.group)),
                    "last_refresh": format_datetime(e.stale.last_refresh),
                    "age_seconds": (now - e.stale.last_refresh).whole_seconds(),
                    "interval": e.stale.interval.as_str(),
                    "stale": e.stale.is_stale(now, t),
                    "lazy_stale": e.stale.is_lazy_stale(now, t),
                    "cache_target_age": e.stale.target_age(t).map(format_datetime),
                    "bytes": e.weight(),
                    "query_status": status.map(|s| json!({"id": s.id, "complete": s.complete, "error": s.error})),
                })
            })
            .collect();
        Ok(json!({ "project": project, "insight": insight, "entries": entries }))
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let (method, path) = (req.method.clone(), req.uri.path().to_string());
        let query = match QueryParams::parse(req.uri.query()) {
            Ok(q) => q,
            Err(e) => return error(&ApiError::bad_request(e.to_string())),
        };
        match (method, path.trim_end_matches('/')) {
            (Method::GET, "/metrics") => respond(200, "text/plain; version=0.0.4", self.metrics_text().await),
            (Method::GET, "/healthz") => json_reply(200, json!({"status": "ok"})),
            (Method::GET, "/readyz") => {
                let l2 = self.app.cache.l2().map(|l2| if l2.is_up() { "ok" } else { "down" });
                match self.readiness().await {
                    Ok(()) => json_reply(200, json!({"status": "ready", "upstream": "ok", "l2": l2})),
                    Err(why) => json_reply(503, json!({"status": "not ready", "upstream": why, "l2": l2})),
                }
            }
            (m, p @ ("/admin/purge" | "/admin/entries")) => {
                if let Err(e) = self.authorized(session) {
                    return error(&e);
                }
                let result = match (m, p) {
                    (Method::POST, "/admin/purge") => self.purge(&query),
                    (Method::GET, "/admin/entries") => self.inspect(&query),
                    (m, _) => Err(ApiError::method_not_allowed(m.as_str())),
                };
                match result {
                    Ok(v) => json_reply(200, v),
                    Err(e) => error(&e),
                }
            }
            _ => error(&ApiError::not_found()),
        }
    }
}
