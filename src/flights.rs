//! Single flight: any number of callers that need the same work share one execution, and every
//! waiter is woken the moment it finishes (no polling, unlike nginx's 500 ms cache lock).
//!
//! The work runs in its own task, so a client that disconnects does not cancel a calculation other
//! callers (or the cache) are waiting for.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::cache::FastHasher;

/// The flights running now, by key.
type Running<K, V> = Arc<Mutex<HashMap<K, Arc<Flight<V>>, FastHasher>>>;

pub struct Flight<V> {
    value: OnceLock<V>,
    /// Set when the work ended without a value (its task panicked or was cancelled).
    abandoned: AtomicBool,
    /// Set by the work (see [`Underway`]) once it stopped queueing, e.g. for budget.
    underway: Arc<AtomicBool>,
    notify: Arc<Notify>,
}

/// The work's handle on its flight: it marks when the work stops waiting its turn (e.g. for
/// budget) and starts the real work, so joiners can tell "queued" from "running"
/// ([`Flight::underway`]).
#[derive(Clone)]
pub struct Underway {
    flag: Arc<AtomicBool>,
    notify: Arc<Notify>,
}

impl Underway {
    pub fn mark(&self) {
        if !self.flag.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }
}

impl<V: Clone> Flight<V> {
    /// Returns once the work is underway or over (whichever comes first).
    pub async fn underway(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.underway.load(Ordering::Acquire)
                || self.value.get().is_some()
                || self.abandoned.load(Ordering::Acquire)
            {
                return;
            }
            notified.await;
        }
    }

    /// The work's value; `None` if the work was abandoned.
    pub async fn wait(&self) -> Option<V> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = self.value.get() {
                return Some(v.clone());
            }
            if self.abandoned.load(Ordering::Acquire) {
                return None;
            }
            notified.await;
        }
    }
}

pub struct Flights<K, V> {
    running: Running<K, V>,
}

impl<K, V> Default for Flights<K, V> {
    fn default() -> Self {
        Self { running: Arc::new(Mutex::new(HashMap::with_hasher(FastHasher::default()))) }
    }
}

/// Removes the flight from the map and wakes its waiters however the task ends.
struct Landing<K: Hash + Eq, V> {
    running: Running<K, V>,
    key: K,
    flight: Arc<Flight<V>>,
}

impl<K: Hash + Eq, V> Drop for Landing<K, V> {
    fn drop(&mut self) {
        {
            let mut map = self.running.lock();
            if map.get(&self.key).is_some_and(|f| Arc::ptr_eq(f, &self.flight)) {
                map.remove(&self.key);
            }
        }
        if self.flight.value.get().is_none() {
            self.flight.abandoned.store(true, Ordering::Release);
        }
        self.flight.notify.notify_waiters();
    }
}

impl<K, V> Flights<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn is_running(&self, key: &K) -> bool {
        self.running.lock().contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.running.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Joins the flight for `key`, or starts one running `work` (built lazily, only if this call
    /// starts it, and handed the flight's [`Underway`]). Returns the flight and whether this call
    /// started it.
    pub fn join_or_start<F, Fut>(&self, key: K, work: F) -> (Arc<Flight<V>>, bool)
    where
        F: FnOnce(Underway) -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let flight = {
            let mut map = self.running.lock();
            if let Some(f) = map.get(&key) {
                return (f.clone(), false);
            }
            let f = Arc::new(Flight {
                value: OnceLock::new(),
                abandoned: AtomicBool::new(false),
                underway: Arc::new(AtomicBool::new(false)),
                notify: Arc::new(Notify::new()),
            });
            map.insert(key.clone(), f.clone());
            f
        };
        let fut = work(Underway { flag: flight.underway.clone(), notify: flight.notify.clone() });
        let landing = Landing { running: self.running.clone(), key, flight: flight.clone() };
        tokio::spawn(async move {
            let v = fut.await;
            let _ = landing.flight.value.set(v);
            drop(landing);
        });
        (flight, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_callers_one_execution() {
        let flights: Arc<Flights<u32, u64>> = Arc::new(Flights::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(tokio::sync::Barrier::new(64));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (flights, runs, barrier) = (flights.clone(), runs.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let (f, _) = flights.join_or_start(7, |_| {
                    let runs = runs.clone();
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        42
                    }
                });
                f.wait().await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Some(42));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(flights.is_empty());
    }

    #[tokio::test]
    async fn joiners_see_when_queued_work_gets_underway() {
        let flights: Flights<u32, u64> = Flights::default();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (f, _) = flights.join_or_start(1, |underway| async move {
            go_rx.await.unwrap(); // "waiting for budget"
            underway.mark();
            tokio::time::sleep(Duration::from_millis(20)).await;
            5
        });
        assert!(tokio::time::timeout(Duration::from_millis(50), f.underway()).await.is_err(), "still queued");
        go_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), f.underway()).await.expect("underway");
        assert_eq!(f.wait().await, Some(5));
    }

    #[tokio::test]
    async fn abandoned_work_wakes_waiters() {
        let flights: Flights<u32, u64> = Flights::default();
        let (f, started) = flights.join_or_start(1, |_| async { panic!("work fails") });
        assert!(started);
        assert_eq!(f.wait().await, None);
        assert!(!flights.is_running(&1));
    }
}
