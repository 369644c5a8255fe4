//! The upstream's word on principals, shared through the shared tier: a confirmation or refusal
//! seen by one replica counts for every replica, so the cluster revalidates a credential once per
//! window, not once per replica, and a revocation seen anywhere stops cached data everywhere.
//! Redis is asked only where a replica would otherwise ask the upstream; hits stay local.

use std::sync::Arc;

use super::spec::CalcSpec;
use super::{Engine, Outcome};
use crate::cache::l2::{Event, Refusal, SharedWord};
use crate::cache::{Partition, PurgeScope};
use crate::trust::Trust;
use crate::upstream::UpstreamResponse;

impl Engine {
    /// Tells every replica that the upstream accepted this principal (for the window).
    pub(super) fn share_confirmation(&self, partition: Partition, project: u64, insight: Option<u64>) {
        let Some(l2) = self.cache.l2().cloned() else { return };
        let (insight, window) = (self.trust.confirmed_insight(insight), self.config.revalidate_after);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { l2.share_confirmation(partition, project, insight, window).await });
        }
    }

    /// Tells every replica that the upstream refused this principal (for `rejected_ttl`).
    pub(super) fn share_refusal(&self, refusal: Refusal) {
        let Some(l2) = self.cache.l2().cloned() else { return };
        let scope = Trust::refused_scope(refusal.project, refusal.insight, refusal.answer.status);
        let ttl = self.config.rejected_ttl;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { l2.share_refusal(&refusal, scope, ttl).await });
        }
    }

    /// Before a revalidation: what another replica heard from the upstream about the caller. A
    /// shared confirmation lets cached data reach it (a 200 without a body: nothing to store); a
    /// shared refusal is answered as the upstream answered it. `None`: ask the upstream.
    pub(super) async fn shared_word(&self, spec: &CalcSpec) -> Option<Outcome> {
        let l2 = self.cache.l2()?;
        let (p, project, insight) = (spec.key.partition, spec.project, Some(spec.insight));
        let scope = (project, self.trust.confirmed_insight(insight));
        match l2.shared_word(p, project, insight, scope).await? {
            SharedWord::Confirmed { remaining } => {
                // Confirmed when the shared record began, so the window ends when it does.
                let elapsed = self.config.revalidate_after.saturating_sub(remaining);
                let at = self.clock.now() - time::Duration::try_from(elapsed).unwrap_or(time::Duration::ZERO);
                self.trust.confirm(p, project, insight, at);
                Some(Outcome::Relay(Arc::new(UpstreamResponse { status: 200, ..Default::default() })))
            }
            SharedWord::Refused(answer) => {
                self.forget_refused(Refusal { partition: p, project, insight, answer: answer.clone() });
                Some(Outcome::Relay(answer))
            }
        }
    }

    /// Applies what another replica published: its purges, and its refusals (the principal's
    /// entries and statuses dropped here too, and its refusal answered from memory).
    pub fn apply_shared(&self, event: Event) {
        match event {
            Event::Purge(scope) => self.cache.purge_local(scope),
            Event::Reject(refusal) => self.forget_refused(refusal),
            Event::Done(_) => {}
        }
    }

    /// A refusal heard from another replica, applied here only.
    fn forget_refused(&self, r: Refusal) {
        self.trust.refuse(r.partition, r.project, r.insight, r.answer);
        self.trust.forget(r.partition);
        self.statuses.drop_owner(r.partition);
        self.cache.purge_local(PurgeScope::Partition(r.partition));
    }
}
