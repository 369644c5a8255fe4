//! The simulator's notion of now. Staleness is decided from wall-clock timestamps, so tests move
//! time forward instead of sleeping: a [`SimClock`] reads any [`TimeSource`], and whoever starts
//! the simulator may pass one it also gives to other components (the proxy's clock in end-to-end
//! tests), so that one `advance` ages both alike.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

/// Where the simulator reads the time, and how its control API (`/_sim/clock/advance`) moves it.
pub trait TimeSource: Send + Sync + 'static {
    fn now(&self) -> OffsetDateTime;
    /// Moves this source's time forward by `by`.
    fn advance(&self, by: Duration);
}

/// Wall-clock time plus an offset that [`TimeSource::advance`] grows: the simulator's own clock.
#[derive(Debug, Default)]
pub struct ManualClock {
    offset_ms: AtomicI64,
}

impl TimeSource for ManualClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc() + time::Duration::milliseconds(self.offset_ms.load(Ordering::Relaxed))
    }

    fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX / 2);
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

/// A shared handle on a [`TimeSource`]; clones read and move the same time.
#[derive(Clone)]
pub struct SimClock(Arc<dyn TimeSource>);

impl SimClock {
    /// A new [`ManualClock`] of its own.
    pub fn new() -> Self {
        Self(Arc::new(ManualClock::default()))
    }

    pub fn now(&self) -> OffsetDateTime {
        self.0.now()
    }

    pub fn advance(&self, by: Duration) {
        self.0.advance(by);
    }
}

impl Default for SimClock {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for SimClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SimClock").field(&self.now()).finish()
    }
}

/// Any time source (e.g. a clock the caller shares with other components) becomes a `SimClock`.
impl<T: TimeSource> From<T> for SimClock {
    fn from(source: T) -> Self {
        Self(Arc::new(source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_one_time() {
        let clock = SimClock::new();
        let other = clock.clone();
        let before = other.now();
        clock.advance(Duration::from_secs(600));
        assert!(other.now() - before >= time::Duration::seconds(600));
    }

    #[test]
    fn a_foreign_source_is_read_and_moved() {
        #[derive(Clone, Default)]
        struct Fixed(Arc<AtomicI64>);
        impl TimeSource for Fixed {
            fn now(&self) -> OffsetDateTime {
                OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(self.0.load(Ordering::Relaxed))
            }
            fn advance(&self, by: Duration) {
                self.0.fetch_add(by.as_secs() as i64, Ordering::Relaxed);
            }
        }
        let source = Fixed::default();
        let clock = SimClock::from(source.clone());
        clock.advance(Duration::from_secs(5));
        assert_eq!(source.now(), OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(5));
        assert_eq!(clock.now(), source.now());
    }
}
