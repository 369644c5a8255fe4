//! What the upstream said about principals recently: which it accepted (confirmations), which it
//! refused (remembered, so a refused credential costs the upstream nothing for a while), and how
//! many upstream calls credentials it never accepted may cause (docs/trust.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use time::OffsetDateTime;

use crate::cache::{FastHasher, Partition};
use crate::config::RevalidateScope;
use crate::upstream::UpstreamResponse;

/// Confirmations and refusals kept at most; a forgotten confirmation only costs a revalidation, a
/// forgotten refusal one more upstream call.
const MAX_RECORDS: u64 = 100_000;
/// How long a principal the upstream accepted counts as known: its calls are bounded by its own
/// rate budget instead of the allowance for unknown credentials.
const KNOWN_FOR: Duration = Duration::from_secs(3600);

/// (principal, project, insight): insight 0 is the whole project.
type Scope = (Partition, u64, u64);

pub struct Trust {
    window: time::Duration,
    scope: RevalidateScope,
    /// Each confirmation's end (when it was given plus the window): the hit path compares, and
    /// never subtracts dates.
    confirmations: moka::sync::Cache<Scope, OffsetDateTime, FastHasher>,
    known: moka::sync::Cache<Partition, (), FastHasher>,
    refusals: moka::sync::Cache<Scope, Arc<UpstreamResponse>, FastHasher>,
    unknown_calls: Mutex<Allowance>,
}

impl Trust {
    pub fn new(window: Duration, scope: RevalidateScope, refused_for: Duration, unknown_per_second: u32) -> Self {
        Self {
            window: time::Duration::try_from(window).unwrap_or(time::Duration::MAX),
            scope,
            confirmations: moka::sync::Cache::builder()
                .max_capacity(MAX_RECORDS)
                .time_to_live(window)
                .support_invalidation_closures()
                .build_with_hasher(FastHasher::default()),
            known: moka::sync::Cache::builder()
                .max_capacity(MAX_RECORDS)
                .time_to_live(KNOWN_FOR)
                .build_with_hasher(FastHasher::default()),
            refusals: moka::sync::Cache::builder()
                .max_capacity(MAX_RECORDS)
                .time_to_live(refused_for)
                .build_with_hasher(FastHasher::default()),
            unknown_calls: Mutex::new(Allowance::new(unknown_per_second)),
        }
    }

    fn scoped(&self, partition: Partition, project: u64, insight: Option<u64>) -> Scope {
        (partition, project, self.confirmed_insight(insight))
    }

    /// The insight a confirmation covers under the revalidation scope (0: the whole project).
    pub fn confirmed_insight(&self, insight: Option<u64>) -> u64 {
        match self.scope {
            RevalidateScope::Project => 0,
            RevalidateScope::Insight => insight.unwrap_or(0),
        }
    }

    /// What a refusal with `status` is about, as (project, insight): a 401 the credential
    /// everywhere (0, 0); a 403 its project, or its insight for a single-object refusal.
    pub fn refused_scope(project: u64, insight: Option<u64>, status: u16) -> (u64, u64) {
        match status {
            401 => (0, 0),
            _ => (project, insight.unwrap_or(0)),
        }
    }

    /// The upstream just answered 200 to this principal for this project (and insight; `None`
    /// for a project-wide read such as a list page).
    pub fn confirm(&self, partition: Partition, project: u64, insight: Option<u64>, now: OffsetDateTime) {
        self.confirmations.insert(self.scoped(partition, project, insight), now.saturating_add(self.window));
        // Renewed on every acceptance, so an active principal never lapses into unknown.
        self.known.insert(partition, ());
        // Accepted again (a key re-granted): an earlier refusal no longer stands.
        for scope in [(partition, 0, 0), (partition, project, 0), (partition, project, insight.unwrap_or(0))] {
            self.refusals.invalidate(&scope);
        }
    }

    /// [`Trust::confirm`] of each of `insights` (one list page), writing the records they share
    /// (the principal's, and under the project scope its one confirmation) once.
    pub fn confirm_listed(&self, partition: Partition, project: u64, insights: &[u64], now: OffsetDateTime) {
        let Some((&first, rest)) = insights.split_first() else { return };
        self.confirm(partition, project, Some(first), now);
        let until = now.saturating_add(self.window);
        for &insight in rest {
            if self.scope == RevalidateScope::Insight {
                self.confirmations.insert((partition, project, insight), until);
            }
            self.refusals.invalidate(&(partition, project, insight));
        }
    }

    /// Whether cached data may reach this principal: the upstream accepted it for the scope
    /// within the revalidation window.
    pub fn is_confirmed(&self, partition: Partition, project: u64, insight: Option<u64>, now: OffsetDateTime) -> bool {
        self.confirmations.get(&self.scoped(partition, project, insight)).is_some_and(|until| now <= until)
    }

    /// The upstream refused this principal (401: the credential, everywhere; 403: this project, or
    /// this insight for a single-object refusal): remember its answer, forget its confirmations.
    pub fn refuse(&self, partition: Partition, project: u64, insight: Option<u64>, answer: Arc<UpstreamResponse>) {
        let (p, i) = Self::refused_scope(project, insight, answer.status);
        let scope = (partition, p, i);
        self.refusals.insert(scope, answer);
        self.confirmations.invalidate(&(partition, project, 0));
        if let Some(i) = insight {
            self.confirmations.invalidate(&(partition, project, i));
        }
        if scope.1 == 0 {
            // The credential itself is refused: nothing of it stands anywhere.
            let _ = self.confirmations.invalidate_entries_if(move |k, _| k.0 == partition);
        }
    }

    /// The upstream's remembered refusal of this principal for this insight (or project), if any.
    /// Only asked for a principal that is not confirmed, so the hit path never pays for it.
    pub fn refusal(&self, partition: Partition, project: u64, insight: Option<u64>) -> Option<Arc<UpstreamResponse>> {
        self.refusals
            .get(&(partition, 0, 0))
            .or_else(|| self.refusals.get(&(partition, project, 0)))
            .or_else(|| insight.and_then(|i| self.refusals.get(&(partition, project, i))))
    }

    /// Whether an upstream call may be made for this principal now: always for one the upstream
    /// accepted within the hour (its own rate budget bounds it); otherwise it takes one of the
    /// calls per second that unknown credentials share, so a flood of made-up keys costs the
    /// upstream at most that.
    pub fn admit(&self, partition: Partition) -> bool {
        self.known.get(&partition).is_some() || self.unknown_calls.lock().take(Instant::now())
    }

    /// Drops what is known of a principal; whether it was known (accepted within the hour).
    pub fn forget(&self, partition: Partition) -> bool {
        self.known.remove(&partition).is_some()
    }
}

/// A token bucket of `per_second` calls, as deep as one second's worth.
struct Allowance {
    tokens: f64,
    per_second: f64,
    at: Instant,
}

impl Allowance {
    fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second.max(1));
        Self { tokens: per_second, per_second, at: Instant::now() }
    }

    fn take(&mut self, now: Instant) -> bool {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.per_second).min(self.per_second);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn answer(status: u16) -> Arc<UpstreamResponse> {
        Arc::new(UpstreamResponse { status, body: Bytes::from_static(b"{}"), ..Default::default() })
    }

    fn trust(scope: RevalidateScope) -> Trust {
        Trust::new(Duration::from_secs(60), scope, Duration::from_secs(60), 5)
    }

    #[test]
    fn confirmations_cover_their_scope_and_window() {
        let now = OffsetDateTime::now_utc();
        let p = Partition([1; 16]);
        let t = trust(RevalidateScope::Project);
        t.confirm(p, 1, Some(10), now);
        assert!(t.is_confirmed(p, 1, Some(11), now), "project scope: any insight of the project");
        assert!(!t.is_confirmed(p, 2, Some(10), now));
        assert!(t.is_confirmed(p, 1, Some(10), now + time::Duration::seconds(60)), "the window's last instant");
        assert!(!t.is_confirmed(p, 1, Some(10), now + time::Duration::seconds(61)), "past the window");
        let t = trust(RevalidateScope::Insight);
        t.confirm(p, 1, Some(10), now);
        assert!(t.is_confirmed(p, 1, Some(10), now));
        assert!(!t.is_confirmed(p, 1, Some(11), now), "insight scope: that insight only");
    }

    #[test]
    fn refusals_are_remembered_by_what_was_refused_and_cleared_by_acceptance() {
        let now = OffsetDateTime::now_utc();
        let (p, q) = (Partition([1; 16]), Partition([2; 16]));
        let t = trust(RevalidateScope::Project);
        t.confirm(p, 1, Some(10), now);
        t.confirm(p, 2, Some(20), now);
        t.refuse(p, 1, Some(10), answer(403));
        assert!(!t.is_confirmed(p, 1, Some(10), now));
        assert!(t.is_confirmed(p, 2, Some(20), now), "a 403 is about its project");
        assert_eq!(t.refusal(p, 1, Some(10)).unwrap().status, 403);
        assert!(t.refusal(p, 2, Some(20)).is_none());
        assert!(t.refusal(q, 1, Some(10)).is_none(), "another principal is untouched");
        t.refuse(p, 2, Some(20), answer(401));
        assert!(!t.is_confirmed(p, 2, Some(20), now), "a 401 is about the credential everywhere");
        assert_eq!(t.refusal(p, 3, None).unwrap().status, 401);
        t.confirm(p, 3, None, now);
        assert!(t.refusal(p, 3, None).is_none());
    }

    #[test]
    fn unknown_principals_share_a_bounded_allowance() {
        let t = trust(RevalidateScope::Project);
        let admitted = (0..100u8).filter(|i| t.admit(Partition([*i; 16]))).count();
        assert_eq!(admitted, 5, "one second's worth");
        let known = Partition([200; 16]);
        t.confirm(known, 1, None, OffsetDateTime::now_utc());
        assert!((0..100).all(|_| t.admit(known)), "a known principal is bounded by its own budget");
    }
}
