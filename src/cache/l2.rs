//! The optional shared second tier on Redis (or Valkey), behind the in-memory cache, for several
//! proxy replicas: the same keys and partitions as L1, a versioned value format, purge markers
//! that work across replicas, a lease per key so one calculation serves every replica, and
//! pub/sub events that wake waiting replicas and apply purges everywhere.
//!
//! Redis is never required for correctness: every call has a short timeout behind a circuit
//! breaker, and on failure the proxy goes on with L1 and the upstream alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use tokio::sync::{Notify, OnceCell};

use super::entry::Entry;
use super::key::{CacheKey, Partition};
use crate::config::{BreakerSettings, L2Settings};
use crate::refresh::{Interval, StaleInfo};
use crate::upstream::Breaker;

/// Stored values start with this; anything else (an older format, garbage) is a miss.
const FORMAT: &[u8; 4] = b"IPX1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PurgeScope {
    Insight { project: u64, insight: u64 },
    Project(u64),
    Partition(Partition),
}

/// What other replicas told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Purge(PurgeScope),
    /// A calculation for this key landed in L2.
    Done(String),
}

pub enum Lease {
    /// This replica calculates; release with the token.
    Acquired(String),
    /// Another replica is calculating.
    Held,
    /// Redis cannot say: calculate locally.
    Unavailable,
}

pub struct L2 {
    settings: L2Settings,
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    breaker: Breaker,
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
    pub errors: AtomicU64,
    replica: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl L2 {
    pub fn new(settings: L2Settings) -> Result<Arc<L2>, redis::RedisError> {
        let client = redis::Client::open(settings.url.as_str())?;
        let breaker = Breaker::new(BreakerSettings {
            failures: 3,
            cooldown: Duration::from_millis(500),
            max_cooldown: Duration::from_secs(10),
        });
        let replica = format!("{:016x}", rand::random::<u64>());
        Ok(Arc::new(L2 {
            settings,
            client,
            conn: OnceCell::new(),
            breaker,
            waiters: Mutex::new(HashMap::new()),
            errors: AtomicU64::new(0),
            replica,
        }))
    }

    pub fn settings(&self) -> &L2Settings {
        &self.settings
    }

    pub fn is_up(&self) -> bool {
        !self.breaker.is_open()
    }

    pub fn key_name(&self, key: &CacheKey) -> String {
        hex(&key.to_bytes())
    }

    fn k(&self, kind: &str, rest: &str) -> String {
        format!("{}{kind}:{rest}", self.settings.prefix)
    }

    fn marker(&self, scope: &PurgeScope) -> String {
        match scope {
            PurgeScope::Insight { project, insight } => self.k("purge", &format!("i:{project}:{insight}")),
            PurgeScope::Project(p) => self.k("purge", &format!("p:{p}")),
            PurgeScope::Partition(p) => self.k("purge", &format!("t:{}", hex(&p.0))),
        }
    }

    pub fn channel(&self) -> String {
        self.k("events", "v1")
    }

    /// Runs one command within the timeout, through the breaker. `None` on any failure.
    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        if !self.breaker.allow() {
            return None;
        }
        let attempt = async {
            let conn = self
                .conn
                .get_or_try_init(|| async {
                    let config = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(self.settings.timeout))
                        .set_response_timeout(Some(self.settings.timeout))
                        .set_number_of_retries(1);
                    ConnectionManager::new_with_config(self.client.clone(), config).await
                })
                .await?;
            cmd.query_async::<T>(&mut conn.clone()).await
        };
        let result = tokio::time::timeout(self.settings.timeout * 2, attempt).await;
        match result {
            Ok(Ok(v)) => {
                self.breaker.record(true);
                Some(v)
            }
            Ok(Err(e)) => {
                self.fail(&e.to_string());
                None
            }
            Err(_) => {
                self.fail("timeout");
                None
            }
        }
    }

    fn fail(&self, why: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.breaker.record(false);
        tracing::debug!(why, "l2 call failed");
    }

    /// The entry for `key`, if L2 has one newer than every purge that covers it. `epoch` is the
    /// local cache epoch to give it (taken before this call).
    pub async fn get(&self, key: &CacheKey, epoch: u64) -> Option<Entry> {
        let mut cmd = redis::cmd("MGET");
        cmd.arg(self.k("e", &self.key_name(key)))
            .arg(self.marker(&PurgeScope::Insight { project: key.project, insight: key.insight }))
            .arg(self.marker(&PurgeScope::Project(key.project)))
            .arg(self.marker(&PurgeScope::Partition(key.partition)));
        let values: Vec<Option<Vec<u8>>> = self.run(&cmd).await?;
        let mut it = values.into_iter();
        let value = it.next().flatten()?;
        let newest_purge =
            it.flatten().filter_map(|v| String::from_utf8(v).ok()?.parse::<i64>().ok()).max().unwrap_or(0);
        let (entry, started_ms) = decode(&value, epoch)?;
        (started_ms > newest_purge).then_some(entry)
    }

    pub async fn put(&self, key: &CacheKey, entry: &Entry) {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.k("e", &self.key_name(key)))
            .arg(encode(entry))
            .arg("PX")
            .arg(self.settings.ttl.as_millis() as u64);
        let _: Option<()> = self.run(&cmd).await;
    }

    /// Records a purge for every replica (the marker) and tells them (the event).
    pub async fn purge(&self, scope: &PurgeScope, now_ms: i64) {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.marker(scope)).arg(now_ms).arg("PX").arg(self.settings.ttl.as_millis() as u64);
        let _: Option<()> = self.run(&cmd).await;
        self.publish(&encode_event(&Event::Purge(*scope), &self.replica)).await;
    }

    async fn publish(&self, message: &str) {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(self.channel()).arg(message);
        let _: Option<i64> = self.run(&cmd).await;
    }

    pub async fn try_lease(&self, key: &CacheKey) -> Lease {
        let token = format!("{}:{:016x}", self.replica, rand::random::<u64>());
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.k("lease", &self.key_name(key)))
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(self.settings.lease.as_millis() as u64);
        match self.run::<Option<String>>(&cmd).await {
            Some(Some(_)) => Lease::Acquired(token),
            Some(None) => Lease::Held,
            None => Lease::Unavailable,
        }
    }

    /// Extends a lease this replica holds (while its calculation runs).
    pub async fn renew(&self, key: &CacheKey, token: &str) -> bool {
        let script = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end",
        );
        let mut cmd = script.prepare_invoke();
        cmd.key(self.k("lease", &self.key_name(key))).arg(token).arg(self.settings.lease.as_millis() as u64);
        let conn = match self.conn.get() {
            Some(c) => c.clone(),
            None => return false,
        };
        let mut conn = conn;
        matches!(tokio::time::timeout(self.settings.timeout * 2, cmd.invoke_async::<i64>(&mut conn)).await, Ok(Ok(1)))
    }

    /// Releases the lease and wakes the replicas waiting for this key.
    pub async fn release(&self, key: &CacheKey, token: &str) {
        let script = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end",
        );
        let mut cmd = script.prepare_invoke();
        cmd.key(self.k("lease", &self.key_name(key))).arg(token);
        if let Some(conn) = self.conn.get() {
            let mut conn = conn.clone();
            let _ = tokio::time::timeout(self.settings.timeout * 2, cmd.invoke_async::<i64>(&mut conn)).await;
        }
        self.publish(&encode_event(&Event::Done(self.key_name(key)), &self.replica)).await;
    }

    /// Waits until another replica reports the key done, or `at_most` passes (the fallback when a
    /// message is lost or the leader died).
    pub async fn wait_done(&self, key: &CacheKey, at_most: Duration) {
        let notify = self.waiters.lock().entry(self.key_name(key)).or_insert_with(|| Arc::new(Notify::new())).clone();
        let _ = tokio::time::timeout(at_most, notify.notified()).await;
    }

    /// Applies an event received from the channel; returns a purge to apply to L1.
    pub fn on_message(&self, payload: &str) -> Option<PurgeScope> {
        let (replica, event) = decode_event(payload)?;
        match event {
            Event::Done(key) => {
                if let Some(n) = self.waiters.lock().remove(&key) {
                    n.notify_waiters();
                }
                None
            }
            Event::Purge(_) if replica == self.replica => None,
            Event::Purge(scope) => Some(scope),
        }
    }

    /// Stores a query status so a poll may land on any replica.
    pub async fn put_status(&self, id: &str, owner: Partition, json: &[u8], ttl: Duration) {
        let mut value = hex(&owner.0).into_bytes();
        value.push(b'\n');
        value.extend_from_slice(json);
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.k("status", id)).arg(value).arg("PX").arg(ttl.as_millis() as u64);
        let _: Option<()> = self.run(&cmd).await;
    }

    /// A status stored by any replica, if `owner` owns it.
    pub async fn get_status(&self, id: &str, owner: Partition) -> Option<Bytes> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.k("status", id));
        let value: Vec<u8> = self.run::<Option<Vec<u8>>>(&cmd).await??;
        let split = value.iter().position(|b| *b == b'\n')?;
        (value[..split] == *hex(&owner.0).as_bytes()).then(|| Bytes::copy_from_slice(&value[split + 1..]))
    }

    /// Listens for events until shutdown, reconnecting as needed; `apply` gets purges.
    pub async fn listen(
        self: Arc<Self>,
        apply: impl Fn(PurgeScope) + Send + Sync,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        use futures_util::StreamExt;
        loop {
            let session = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(self.channel()).await?;
                let mut stream = pubsub.on_message();
                while let Some(msg) = stream.next().await {
                    if let Ok(payload) = msg.get_payload::<String>() {
                        if let Some(scope) = self.on_message(&payload) {
                            apply(scope);
                        }
                    }
                }
                Ok::<(), redis::RedisError>(())
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                r = session => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "l2 events: reconnecting");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

fn encode(entry: &Entry) -> Vec<u8> {
    let s = &entry.stale;
    let body = entry.body();
    let mut out = Vec::with_capacity(body.len() + 64);
    out.extend_from_slice(FORMAT);
    out.extend_from_slice(&s.last_refresh.unix_timestamp_nanos().to_le_bytes());
    out.push(Interval::ALL.iter().position(|i| *i == s.interval).unwrap_or(1) as u8);
    match s.date_to {
        Some(d) => {
            out.push(1);
            out.extend_from_slice(&d.unix_timestamp_nanos().to_le_bytes());
        }
        None => {
            out.push(0);
            out.extend_from_slice(&[0; 16]);
        }
    }
    out.extend_from_slice(&entry.started_ms.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The entry and the wall-clock millisecond its calculation started, or `None` for anything
/// that is not a value in this format.
fn decode(v: &[u8], epoch: u64) -> Option<(Entry, i64)> {
    let rest = v.strip_prefix(FORMAT)?;
    let nanos = |b: &[u8]| -> Option<time::OffsetDateTime> {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from_le_bytes(b.try_into().ok()?)).ok()
    };
    let last_refresh = nanos(rest.get(..16)?)?;
    let interval = *Interval::ALL.get(usize::from(*rest.get(16)?))?;
    let date_to = match rest.get(17)? {
        0 => None,
        1 => Some(nanos(rest.get(18..34)?)?),
        _ => return None,
    };
    let started_ms = i64::from_le_bytes(rest.get(34..42)?.try_into().ok()?);
    let body = Bytes::copy_from_slice(rest.get(42..)?);
    if body.first() != Some(&b'{') {
        return None;
    }
    let entry = Entry::from_parts(body, StaleInfo { last_refresh, interval, date_to }, epoch, started_ms);
    Some((entry, started_ms))
}

fn encode_event(e: &Event, replica: &str) -> String {
    match e {
        Event::Done(key) => format!("{replica} done {key}"),
        Event::Purge(PurgeScope::Insight { project, insight }) => format!("{replica} purge i {project} {insight}"),
        Event::Purge(PurgeScope::Project(p)) => format!("{replica} purge p {p}"),
        Event::Purge(PurgeScope::Partition(p)) => format!("{replica} purge t {}", hex(&p.0)),
    }
}

fn decode_event(s: &str) -> Option<(String, Event)> {
    let mut parts = s.split(' ');
    let replica = parts.next()?.to_string();
    let event = match (parts.next()?, parts.next()) {
        ("done", Some(key)) => Event::Done(key.to_string()),
        ("purge", Some("i")) => Event::Purge(PurgeScope::Insight {
            project: parts.next()?.parse().ok()?,
            insight: parts.next()?.parse().ok()?,
        }),
        ("purge", Some("p")) => Event::Purge(PurgeScope::Project(parts.next()?.parse().ok()?)),
        ("purge", Some("t")) => {
            let h = parts.next()?;
            let mut p = [0u8; 16];
            for (i, b) in p.iter_mut().enumerate() {
                *b = u8::from_str_radix(h.get(i * 2..i * 2 + 2)?, 16).ok()?;
            }
            Event::Purge(PurgeScope::Partition(Partition(p)))
        }
        _ => return None,
    };
    Some((replica, event))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_garbage_is_a_miss() {
        let body = br#"{"id":1,"result":[1],"last_refresh":"2026-01-01T00:00:00Z","query":{"source":{"interval":"hour","dateRange":{"date_to":"2025-01-31"}}}}"#;
        let e = Entry::from_upstream(body, 1, 1).unwrap().stamped(1234);
        let (back, started) = decode(&encode(&e), 9).unwrap();
        assert_eq!((back.stale, back.epoch, started), (e.stale, 9, 1234));
        assert_eq!(back.render(true, None), e.render(true, None));
        assert!(decode(b"IPX0whatever", 1).is_none());
        assert!(decode(b"", 1).is_none());
        assert!(decode(&encode(&e)[..30], 1).is_none());
    }

    #[test]
    fn events_round_trip() {
        for e in [
            Event::Done("ab".into()),
            Event::Purge(PurgeScope::Insight { project: 1, insight: 2 }),
            Event::Purge(PurgeScope::Project(3)),
            Event::Purge(PurgeScope::Partition(Partition([7; 16]))),
        ] {
            assert_eq!(decode_event(&encode_event(&e, "r1")), Some(("r1".to_string(), e)));
        }
        assert_eq!(decode_event("r1 purge x"), None);
    }
}
