//! The upstream's word on a caller before cached data reaches it: a refusal it remembers, or a
//! revalidation (docs/trust.md).

use std::sync::Arc;

use super::body::failure_reply;
use super::Reply;
use crate::app::App;
use crate::cache::{Entry, Partition};
use crate::cache_status::{CacheStatus, Detail, Fwd};
use crate::engine::{CalcSpec, Outcome};

/// The upstream's refusal of this principal, answered from memory while it is remembered.
pub(super) fn remembered_refusal(app: &App, partition: Partition, project: u64, insight: Option<u64>) -> Option<Reply> {
    let r = app.engine.refusal(partition, project, insight)?;
    app.metrics.trust_refusals.with_label_values(&["refused"]).inc();
    Some(Reply::relay(&r, CacheStatus::fwd(Fwd::Bypass).fwd_status(r.status).detail(Detail::Refused)))
}

/// Cached data reaches a principal only while the upstream recently confirmed its access: this
/// asks again with a read that never calculates. `Ok` when cached data may reach it (with the
/// entry the read stored, if any): the upstream accepted it, or the upstream is down, the one
/// failure that lets what we have stand without its word. Otherwise the answer to give instead:
/// the upstream's refusal, or the proxy's own failure (docs/trust.md).
pub(super) async fn revalidate(app: &Arc<App>, spec: &Arc<CalcSpec>) -> Result<Option<Arc<Entry>>, Reply> {
    match app.engine.revalidate(spec).await {
        Outcome::Stored(e) => Ok(Some(e)),
        Outcome::Relay(r) if r.status == 200 => Ok(None),
        Outcome::Relay(r) => {
            Err(Reply::relay(&r, CacheStatus::fwd(Fwd::Request).fwd_status(r.status).detail(Detail::Revalidated)))
        }
        Outcome::Failed(f) if f.is_upstream_outage() => Ok(None),
        Outcome::Failed(f) => {
            Err(failure_reply(app, spec, &f, CacheStatus::fwd(Fwd::Request).detail(Detail::Failure(f.as_str()))))
        }
    }
}
