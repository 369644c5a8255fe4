//! Token buckets in this replica's memory: the whole budget without `[budget] shared`, and a
//! replica's share of it while the shared budget's Redis is unreachable.

use std::time::{Duration, Instant};

/// The bucket for a limit of `limit` calls per `window`: `(capacity, refill per second)`.
/// Capacity L/4 plus a refill of 3L/4 per window is at most L in any window (a plain bucket of
/// capacity L refilled at L per window would allow 2L), so upstream's sliding-window throttle
/// never trips on the proxy's own calls. The same shape is used by the shared buckets in Redis.
pub fn shape(limit: f64, window: Duration) -> (f64, f64) {
    let capacity = (limit / 4.0).max(1.0);
    (capacity, (limit - capacity).max(0.0) / window.as_secs_f64())
}

/// One bucket per window of the key's limits.
pub struct Rate {
    buckets: Vec<Bucket>,
}

struct Bucket {
    tokens: f64,
    capacity: f64,
    per_second: f64,
    at: Instant,
}

impl Rate {
    /// Full buckets for `windows` (limit, window), each limit scaled by `share` (1 for the whole).
    pub fn new(windows: &[(u32, Duration)], share: f64) -> Self {
        let now = Instant::now();
        let buckets = windows
            .iter()
            .map(|&(limit, window)| {
                let (capacity, per_second) = shape(f64::from(limit) * share, window);
                Bucket { tokens: capacity, capacity, per_second, at: now }
            })
            .collect();
        Self { buckets }
    }

    /// Takes a token from every bucket while leaving `reserve` (a share of its capacity) in it, or
    /// says how long until that is possible.
    pub fn take(&mut self, now: Instant, reserve: f64) -> Option<Duration> {
        let mut wait = Duration::ZERO;
        for b in &mut self.buckets {
            b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * b.per_second).min(b.capacity);
            b.at = now;
            let need = 1.0 + reserve * b.capacity;
            if b.tokens < need {
                let secs = if b.per_second > 0.0 { (need - b.tokens) / b.per_second } else { f64::INFINITY };
                wait = wait.max(Duration::from_secs_f64(secs.min(86_400.0)));
            }
        }
        if wait > Duration::ZERO {
            return Some(wait);
        }
        for b in &mut self.buckets {
            b.tokens -= 1.0;
        }
        None
    }

    /// Gives back a token taken for a call that was not made.
    pub fn refund(&mut self) {
        for b in &mut self.buckets {
            b.tokens = (b.tokens + 1.0).min(b.capacity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_window_exceeds_the_limit() {
        let start = Instant::now();
        let mut r = Rate::new(&[(8, Duration::from_secs(60))], 1.0);
        // Greedy caller: take whenever allowed, over 10 minutes of simulated time.
        let mut taken = Vec::new();
        let mut now = start;
        while now < start + Duration::from_secs(600) {
            match r.take(now, 0.0) {
                None => taken.push(now),
                Some(d) => now += d.max(Duration::from_millis(1)),
            }
        }
        for (i, t) in taken.iter().enumerate() {
            let in_window = taken[i..].iter().take_while(|u| **u < *t + Duration::from_secs(60)).count();
            assert!(in_window <= 8, "{in_window} calls in one minute");
        }
        assert!(taken.len() >= 8 * 10 * 3 / 4, "sustains at least 3/4 of the limit: {}", taken.len());
    }

    #[test]
    fn a_share_is_that_part_of_the_limit() {
        let now = Instant::now();
        let mut r = Rate::new(&[(240, Duration::from_secs(60))], 1.0 / 3.0);
        let burst = std::iter::from_fn(|| r.take(now, 0.0).is_none().then_some(())).take(1000).count();
        assert_eq!(burst, 20, "a third of the 60-token burst");
    }

    #[test]
    fn refills_go_to_the_reserve_before_forced_calls() {
        // A forced caller and a normal one both take whenever allowed: the normal one's demand
        // (one call every 4 s, below the 0.5/s refill) is always met; forced gets the rest.
        let start = Instant::now();
        let mut r = Rate::new(&[(40, Duration::from_secs(60))], 1.0);
        let (mut forced, mut others, mut refused) = (0, 0, 0);
        let mut now = start;
        let mut next_other = start;
        while now < start + Duration::from_secs(600) {
            if now >= next_other {
                match r.take(now, 0.0) {
                    None => others += 1,
                    Some(_) => refused += 1,
                }
                next_other += Duration::from_secs(4);
            }
            if r.take(now, 0.5).is_none() {
                forced += 1;
            }
            now += Duration::from_millis(100);
        }
        assert_eq!(refused, 0, "a normal call was refused while forced calls were served");
        assert_eq!(others, 150);
        assert!(forced >= 140, "forced calls get what is left: {forced}");
    }
}
