//! Polls of the query statuses the proxy hands out (`GET .../query/:id/`).

use std::sync::Arc;

use bytes::Bytes;

use super::vouch::{remembered_refusal, revalidate};
use super::Reply;
use crate::app::App;
use crate::auth::Principal;
use crate::cache::CacheKey;
use crate::cache_status::CacheStatus;
use crate::engine::CalcSpec;
use crate::query::QueryParams;

/// Whether a query id is one the proxy issues ([`crate::cache::PartitionKeyer::status_id`]).
pub fn is_own_query_id(id: &str) -> bool {
    id.starts_with("ipx_")
}

/// `GET .../query/:id/` for ids the proxy issued: 202 running, 200 complete, 400 failed, 404
/// unknown, expired, or another principal's. `None`: not ours, pass it through. A status carries
/// results, so a poll is a cached read: it needs the same confirmation as any cached answer.
pub async fn query_status(app: &Arc<App>, project: u64, query_id: &str, principal: Option<Principal>) -> Option<Reply> {
    if !is_own_query_id(query_id) {
        return None;
    }
    let cs = CacheStatus::hit();
    // Without a credential, or for an id this principal was not given, the upstream answers as
    // PostHog does (401, 403 for a project it cannot see, 404).
    let principal = principal?;
    let owner = principal.partition();
    let now = app.clock.now();
    let mut status = app.statuses.live(owner, query_id, now);
    if status.is_none() {
        // Another replica may have issued it.
        if let Some(l2) = app.cache.l2() {
            status = l2.get_status(query_id, owner).await.and_then(|b| serde_json::from_slice(&b).ok());
        }
    }
    let status = status.filter(|s| s.team_id == project && now <= s.expiration_time)?;
    if !app.engine.is_confirmed(owner, project, status.insight_id) {
        if let Some(reply) = remembered_refusal(app, owner, project, status.insight_id) {
            return Some(reply);
        }
        let insight = status.insight_id.unwrap_or(0);
        let query = match status.dashboard_id {
            Some(d) => QueryParams::parse(Some(&format!("from_dashboard={d}"))).unwrap_or_default(),
            None => QueryParams::default(),
        };
        let spec = Arc::new(CalcSpec {
            key: CacheKey::new(owner, project, insight, &query),
            project,
            insight,
            path: format!("/api/environments/{project}/insights/{insight}/"),
            query,
            principal,
        });
        if let Err(reply) = revalidate(app, &spec).await {
            return Some(reply);
        }
    }
    let code = match (status.complete, status.error) {
        (false, _) => 202,
        (true, false) => 200,
        (true, true) => 400,
    };
    let body = serde_json::json!({ "query_status": status.for_polling() });
    Some(Reply::json(code, Bytes::from(body.to_string()), cs))
}
