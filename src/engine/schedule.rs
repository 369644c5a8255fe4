//! Putting work in the background queue: work a client asked for, with a query status it can
//! poll (PostHog's `enqueue_async_calculation`), and refresh-ahead of hot entries.

use std::sync::Arc;

use bytes::Bytes;

use super::queue::{Ahead, Job};
use super::spec::CalcSpec;
use super::Engine;
use crate::cache::{CacheKey, Entry};
use crate::failure::CONCURRENCY_LIMIT_EXCEEDED;
use crate::refresh::UpstreamRefresh;

impl Engine {
    /// Background work for `spec` with a status the client can poll; returns the status to answer
    /// with. `seen`: the `last_refresh` of the entry the request saw. With `refresh_requested`
    /// false an existing status is returned as it is (PostHog's dedup). Work that cannot be taken
    /// (queue or registry full) is answered as PostHog does when it cannot take more: a completed
    /// status with `concurrency_limit_exceeded`, never one that looks queued.
    pub fn enqueue(
        &self,
        spec: &Arc<CalcSpec>,
        seen: Option<&Entry>,
        refresh_requested: bool,
        refresh: UpstreamRefresh,
    ) -> Bytes {
        let id = self.keyer.status_id(&spec.key);
        let owner = spec.key.partition;
        if !refresh_requested {
            // An existing status is returned as it is, unless it is a failure: then the work is
            // tried again rather than reporting the old error for 20 minutes.
            if let Some(s) = self.statuses.live(owner, &id, self.clock.now()).filter(|s| !(s.complete && s.error)) {
                return s.to_json();
            }
        }
        let blank = self.statuses.blank(id.clone(), spec.project, spec.insight, spec.dashboard_id(), self.clock.now());
        let refuse = |blank| {
            let s = self.statuses.refuse(owner, blank, CONCURRENCY_LIMIT_EXCEEDED);
            self.metrics.async_refused.inc();
            self.share_status(&id, owner);
            s.to_json()
        };
        let status = match self.statuses.start(owner, blank.clone()) {
            Ok(status) => status,
            Err(_) => return refuse(blank),
        };
        let job = Job {
            spec: spec.clone(),
            flight: self.flight_key(spec, seen),
            refresh,
            status_id: Some(id.clone()),
            ahead: None,
            joined: Vec::new(),
            seen: seen.map(Entry::last_refresh),
        };
        if self.jobs.push(job).is_err() {
            return refuse(blank);
        }
        self.share_status(&id, owner);
        status.to_json()
    }

    /// Schedules a background recalculation of a hot entry shortly before it goes stale: read at
    /// least `min_reads` times, and older than [`ahead_fraction`] of its staleness threshold. Once
    /// per calculated result of the upstream cache key: variants of the same key (same partition)
    /// share one claim, so they are refreshed once, not once each.
    pub fn schedule_ahead(&self, spec: &Arc<CalcSpec>, entry: &Arc<Entry>) {
        self.schedule_ahead_of(&spec.key, entry, || spec.clone())
    }

    /// [`Engine::schedule_ahead`] for the entry of `key`, with the spec made only when a job is
    /// queued (a list page answers many entries and rarely queues one).
    pub fn schedule_ahead_of(&self, key: &CacheKey, entry: &Arc<Entry>, spec: impl FnOnce() -> Arc<CalcSpec>) {
        let settings = self.config.refresh_ahead;
        let reads = entry.note_read();
        if !settings.enabled || reads < settings.min_reads || !entry.stale.can_go_stale(&self.config.thresholds) {
            return;
        }
        let Some(threshold) = self.config.thresholds.default_for(entry.stale.interval) else { return };
        let now = self.clock.now();
        let age = (now - entry.stale.last_refresh).as_seconds_f64();
        if age < threshold.as_secs_f64() * ahead_fraction(settings.start_percent, key) {
            return;
        }
        let usable = self.alias_usable(entry, now);
        // The claim lives on the group's newest result when the group is usable, else on the entry.
        let claimed = match usable.then(|| self.cache.group_latest(key, entry.group)).flatten() {
            Some(g) if g.last_refresh() == entry.last_refresh() => g,
            _ => entry.clone(),
        };
        if !claimed.claim_refresh_ahead() {
            return;
        }
        let heat = (f64::from(reads) * 60.0 / age.max(1.0)) as u64;
        let ahead = Ahead { claimed: claimed.clone(), base: entry.last_refresh(), group: entry.group, heat };
        // A variant whose alias is not confirmed lately refreshes under its own key, so its own call
        // confirms it (refresh-ahead runs one upstream key at a time anyway, see `run_ahead`).
        let flight = if usable { super::calculate::flight_of(key, Some(entry)) } else { *key };
        // The upstream's own cache is still fresh, so only force_blocking recalculates.
        let job = Job {
            spec: spec(),
            flight,
            refresh: UpstreamRefresh::ForceBlocking,
            status_id: None,
            ahead: Some(ahead),
            joined: Vec::new(),
            seen: Some(entry.last_refresh()),
        };
        if self.jobs.push(job).is_err() {
            claimed.unclaim_refresh_ahead();
            tracing::debug!(project = key.project, insight = key.insight, "refresh-ahead queue full");
        }
    }
}

/// When refresh-ahead starts for `key`, as a fraction of the staleness threshold: at
/// `start_percent`, plus a per-key jitter over the first half of what remains (so a dashboard's
/// tiles do not fire together, and every refresh still lands well before the threshold).
fn ahead_fraction(start_percent: u8, key: &CacheKey) -> f64 {
    let jitter = (key.variant as u64 ^ key.insight.wrapping_mul(0x9E37_79B9_7F4A_7C15)) % 1000;
    let start = f64::from(start_percent);
    (start + (100.0 - start) / 2.0 * jitter as f64 / 1000.0) / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Partition;
    use crate::query::QueryParams;

    #[test]
    fn refresh_ahead_starts_in_the_first_half_of_what_remains() {
        let (mut lo, mut hi) = (1.0f64, 0.0f64);
        for insight in 0..500 {
            let key = CacheKey::new(Partition([0; 16]), 1, insight, &QueryParams::default());
            let f = ahead_fraction(90, &key);
            (lo, hi) = (lo.min(f), hi.max(f));
        }
        assert!(lo >= 0.90 && hi < 0.95, "{lo}..{hi}");
        assert!(hi - lo > 0.04, "spread over the window: {lo}..{hi}");
    }
}
