//! The optional shared second tier on Redis (or Valkey; one node, a Cluster, or a Sentinel-watched
//! master), behind the in-memory cache, for several proxy replicas: the same keys and partitions
//! as L1, purge markers that work across replicas, a lease per key so one calculation serves every
//! replica, the upstream's word on principals, and pub/sub events that wake waiting replicas and
//! apply purges and refusals everywhere.
//!
//! Redis is shared infrastructure, not a party the proxy trusts: every stored value is sealed
//! with a MAC ([`seal`]) bound to its key and kind, and a value that fails it is dropped and
//! counted. Purges and entries are ordered by one Redis counter ([`L2::version`]), never by
//! replica clocks.
//!
//! Redis is never required for correctness: every call has a short timeout behind a circuit
//! breaker, and on failure the proxy goes on with L1 and the upstream alone.
//!
//! Keys touched together by one command or script share a hash tag (`{...}`), so every command
//! runs on a Redis Cluster: an entry, its lease and its insight's purge marker are tagged by the
//! insight; a principal's purge marker, confirmations and refusals by its partition.

pub mod codec;
mod connect;
mod seal;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use prometheus::IntCounterVec;
use tokio::sync::{Notify, OnceCell};

use super::entry::Entry;
use super::key::{CacheKey, Partition};
use crate::config::{BreakerSettings, L2Settings};
pub use crate::redis_target::{Target, TargetError};
use crate::upstream::{Breaker, UpstreamResponse};
use codec::{decode_entry, decode_event, decode_refusal, encode_entry, encode_event, encode_refusal, hex};
pub use codec::{Event, Refusal};
pub use connect::Connection;
pub use seal::Kind;
use seal::Sealer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PurgeScope {
    Insight { project: u64, insight: u64 },
    Project(u64),
    Partition(Partition),
}

pub enum Lease {
    /// This replica calculates; release with the token.
    Acquired(String),
    /// Another replica is calculating.
    Held,
    /// Redis cannot say: calculate locally.
    Unavailable,
}

/// What the cluster knows of a principal, from the shared tier.
#[derive(Debug, Clone)]
pub enum SharedWord {
    /// The upstream accepted it on some replica; the confirmation lasts this much longer.
    Confirmed { remaining: Duration },
    /// The upstream refused it on some replica, and that is still remembered.
    Refused(Arc<UpstreamResponse>),
}

/// Purge markers hold the version as a fixed-width number, so the marker script can compare it
/// without knowing the MAC.
const VERSION_DIGITS: usize = 20;

/// Writes a purge marker unless one with the same or a newer version is there: markers only move
/// forward even when two purges of one scope race.
const MARKER_SCRIPT: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local n = tonumber(string.sub(cur, 5, 24))
  if n and n >= tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1";

pub struct L2 {
    settings: L2Settings,
    target: Target,
    conn: OnceCell<Connection>,
    breaker: Breaker,
    sealer: Sealer,
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
    pub errors: AtomicU64,
    /// Values dropped because their MAC failed, by kind.
    rejected: IntCounterVec,
    replica: String,
}

impl L2 {
    /// The shared tier at `settings.url`; values are sealed with a key derived from `secret` (the
    /// partition secret every replica shares). `rejected` counts values that fail their MAC.
    pub fn new(settings: L2Settings, secret: &str, rejected: IntCounterVec) -> Result<Arc<L2>, TargetError> {
        let target = Target::parse(&settings.url)?;
        let breaker = Breaker::new(BreakerSettings {
            failures: 3,
            cooldown: Duration::from_millis(500),
            max_cooldown: Duration::from_secs(10),
        });
        let replica = format!("{:016x}", rand::random::<u64>());
        for kind in Kind::ALL {
            rejected.with_label_values(&[kind.as_str()]);
        }
        Ok(Arc::new(L2 {
            settings,
            target,
            conn: OnceCell::new(),
            breaker,
            sealer: Sealer::new(secret),
            waiters: Mutex::new(HashMap::new()),
            errors: AtomicU64::new(0),
            rejected,
            replica,
        }))
    }

    pub fn settings(&self) -> &L2Settings {
        &self.settings
    }

    pub fn is_up(&self) -> bool {
        !self.breaker.is_open()
    }

    /// The connection every shared-tier command goes through (one node, a cluster or the
    /// Sentinels' master), opened on first use. Callers bound their own calls with timeouts.
    pub async fn connection(&self) -> redis::RedisResult<Connection> {
        let timeout = self.settings.timeout;
        self.conn.get_or_try_init(|| self.target.connect(timeout)).await.cloned()
    }

    pub fn key_name(&self, key: &CacheKey) -> String {
        hex(&key.to_bytes())
    }

    fn tagged(&self, tag: &str, rest: &str) -> String {
        format!("{}{{{tag}}}:{rest}", self.settings.prefix)
    }

    fn insight_tag(project: u64, insight: u64) -> String {
        format!("i{project}.{insight}")
    }

    fn partition_tag(p: Partition) -> String {
        format!("t{}", hex(&p.0))
    }

    fn entry_key(&self, key: &CacheKey) -> String {
        self.tagged(&Self::insight_tag(key.project, key.insight), &format!("e:{}", self.key_name(key)))
    }

    fn lease_key(&self, key: &CacheKey) -> String {
        self.tagged(&Self::insight_tag(key.project, key.insight), &format!("lease:{}", self.key_name(key)))
    }

    fn marker(&self, scope: &PurgeScope) -> String {
        match scope {
            PurgeScope::Insight { project, insight } => self.tagged(&Self::insight_tag(*project, *insight), "purge"),
            PurgeScope::Project(p) => self.tagged(&format!("p{p}"), "purge"),
            PurgeScope::Partition(p) => self.tagged(&Self::partition_tag(*p), "purge"),
        }
    }

    fn version_key(&self) -> String {
        format!("{}version", self.settings.prefix)
    }

    fn status_key(&self, id: &str) -> String {
        format!("{}status:{id}", self.settings.prefix)
    }

    fn confirmation_key(&self, p: Partition, project: u64, insight: u64) -> String {
        self.tagged(&Self::partition_tag(p), &format!("ok:{project}:{insight}"))
    }

    fn refusal_key(&self, p: Partition, project: u64, insight: u64) -> String {
        self.tagged(&Self::partition_tag(p), &format!("no:{project}:{insight}"))
    }

    pub fn channel(&self) -> String {
        format!("{}events:v2", self.settings.prefix)
    }

    /// Runs one call within the timeout, through the breaker. `None` on any failure.
    async fn call<T, F, Fut>(&self, f: F) -> Option<T>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !self.breaker.allow() {
            return None;
        }
        let attempt = async { f(self.connection().await?).await };
        // Boxed: the connection's futures nest deeply, and every request future would carry them.
        match tokio::time::timeout(self.settings.timeout * 2, Box::pin(attempt)).await {
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

    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        self.call(|mut c| async move { cmd.query_async::<T>(&mut c).await }).await
    }

    async fn run_pipe<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Option<T> {
        self.call(|mut c| async move { pipe.query_async::<T>(&mut c).await }).await
    }

    fn fail(&self, why: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.breaker.record(false);
        tracing::debug!(why, "l2 call failed");
    }

    /// The payload of `value` read from `key`, or `None` (counted) when its MAC fails.
    fn open<'a>(&self, kind: Kind, key: &str, value: &'a [u8]) -> Option<&'a [u8]> {
        match self.sealer.open(kind, key, value) {
            Ok(p) => Some(p),
            Err(_) => {
                self.rejected.with_label_values(&[kind.as_str()]).inc();
                tracing::warn!(kind = kind.as_str(), "a shared-tier value failed its MAC; dropped");
                None
            }
        }
    }

    /// The shared version now: take it before asking the upstream, and store the result with it.
    /// Every purge raises it first, so a result is newer than a purge exactly when its version is
    /// at least the purge's, whichever replica did which and whatever their clocks say. `None`
    /// when Redis cannot say (the result then stays in this replica's memory).
    pub async fn version(&self) -> Option<u64> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.version_key());
        Some(self.run::<Option<u64>>(&cmd).await?.unwrap_or(0))
    }

    /// The entry for `key`, if the shared tier has one (sealed for that key) no older than every
    /// purge that covers it. `epoch` is the local cache epoch to give it (taken before this call).
    pub async fn get(&self, key: &CacheKey, epoch: u64) -> Option<Entry> {
        let entry_key = self.entry_key(key);
        let markers = [
            self.marker(&PurgeScope::Insight { project: key.project, insight: key.insight }),
            self.marker(&PurgeScope::Project(key.project)),
            self.marker(&PurgeScope::Partition(key.partition)),
        ];
        // The entry and its insight's marker share a slot; the other markers live with their scope.
        let mut same_slot = redis::cmd("MGET");
        same_slot.arg(&entry_key).arg(&markers[0]);
        let (mut project, mut partition) = (redis::cmd("GET"), redis::cmd("GET"));
        project.arg(&markers[1]);
        partition.arg(&markers[2]);
        let (values, project, partition) = tokio::join!(
            self.run::<Vec<Option<Vec<u8>>>>(&same_slot),
            self.run::<Option<Vec<u8>>>(&project),
            self.run::<Option<Vec<u8>>>(&partition),
        );
        let mut values = values?.into_iter();
        let value = values.next().flatten()?;
        let mut newest = 0;
        for (marker, v) in markers.iter().zip([values.next().flatten(), project?, partition?]) {
            if let Some(v) = v {
                // A marker that fails its MAC covers everything: a miss, never a resurrection.
                let seq = self.open(Kind::Purge, marker, &v).and_then(|p| std::str::from_utf8(p).ok()?.parse().ok())?;
                newest = newest.max(seq);
            }
        }
        let payload = self.open(Kind::Entry, &entry_key, &value)?;
        let (entry, version) = decode_entry(payload, epoch)?;
        (version >= newest).then_some(entry)
    }

    /// Stores `entry` for every replica, if it carries a shared version (see [`L2::version`]).
    pub async fn put(&self, key: &CacheKey, entry: &Entry) {
        let Some(version) = entry.version else { return };
        let entry_key = self.entry_key(key);
        let mut cmd = redis::cmd("SET");
        cmd.arg(&entry_key)
            .arg(self.sealer.seal(Kind::Entry, &entry_key, &encode_entry(entry, version)))
            .arg("PX")
            .arg(self.settings.ttl.as_millis() as u64);
        let _: Option<()> = self.run(&cmd).await;
    }

    /// Records a purge for every replica (the marker, at a new version) and tells them (the
    /// event).
    pub async fn purge(&self, scope: &PurgeScope) {
        let mut incr = redis::cmd("INCR");
        incr.arg(self.version_key());
        if let Some(version) = self.run::<u64>(&incr).await {
            let marker = self.marker(scope);
            let payload = format!("{version:0VERSION_DIGITS$}");
            let sealed = self.sealer.seal(Kind::Purge, &marker, payload.as_bytes());
            let script = redis::Script::new(MARKER_SCRIPT);
            let mut inv = script.prepare_invoke();
            inv.key(&marker).arg(version).arg(sealed).arg(self.settings.ttl.as_millis() as u64);
            let _: Option<i64> = self.call(|mut c| async move { inv.invoke_async(&mut c).await }).await;
        }
        self.publish(&Event::Purge(*scope)).await;
    }

    async fn publish(&self, event: &Event) {
        let channel = self.channel();
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&channel).arg(self.sealer.seal_text(&channel, &encode_event(event, &self.replica)));
        let _: Option<i64> = self.run(&cmd).await;
    }

    pub async fn try_lease(&self, key: &CacheKey) -> Lease {
        let token = format!("{}:{:016x}", self.replica, rand::random::<u64>());
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.lease_key(key)).arg(&token).arg("NX").arg("PX").arg(self.settings.lease.as_millis() as u64);
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
        let mut inv = script.prepare_invoke();
        inv.key(self.lease_key(key)).arg(token).arg(self.settings.lease.as_millis() as u64);
        matches!(self.call(|mut c| async move { inv.invoke_async::<i64>(&mut c).await }).await, Some(1))
    }

    /// Releases the lease and wakes the replicas waiting for this key.
    pub async fn release(&self, key: &CacheKey, token: &str) {
        let script = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end",
        );
        let mut inv = script.prepare_invoke();
        inv.key(self.lease_key(key)).arg(token);
        let _: Option<i64> = self.call(|mut c| async move { inv.invoke_async(&mut c).await }).await;
        self.publish(&Event::Done(self.key_name(key))).await;
    }

    /// Waits until another replica reports the key done, or `at_most` passes (the fallback when a
    /// message is lost or the leader died).
    pub async fn wait_done(&self, key: &CacheKey, at_most: Duration) {
        let notify = self.waiters.lock().entry(self.key_name(key)).or_insert_with(|| Arc::new(Notify::new())).clone();
        let _ = tokio::time::timeout(at_most, notify.notified()).await;
    }

    /// Applies an event received from the channel; returns what the replica must apply itself
    /// (another replica's purge or refusal).
    pub fn on_message(&self, message: &str) -> Option<Event> {
        let Ok(text) = self.sealer.open_text(&self.channel(), message) else {
            self.rejected.with_label_values(&[Kind::Event.as_str()]).inc();
            return None;
        };
        let (replica, event) = decode_event(text)?;
        match event {
            Event::Done(key) => {
                if let Some(n) = self.waiters.lock().remove(&key) {
                    n.notify_waiters();
                }
                None
            }
            _ if replica == self.replica => None,
            other => Some(other),
        }
    }

    /// Stores a query status so a poll may land on any replica.
    pub async fn put_status(&self, id: &str, owner: Partition, json: &[u8], ttl: Duration) {
        let key = self.status_key(id);
        let mut value = owner.0.to_vec();
        value.extend_from_slice(json);
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key).arg(self.sealer.seal(Kind::Status, &key, &value)).arg("PX").arg(ttl.as_millis() as u64);
        let _: Option<()> = self.run(&cmd).await;
    }

    /// A status stored by any replica, if `owner` owns it.
    pub async fn get_status(&self, id: &str, owner: Partition) -> Option<Bytes> {
        let key = self.status_key(id);
        let mut cmd = redis::cmd("GET");
        cmd.arg(&key);
        let value: Vec<u8> = self.run::<Option<Vec<u8>>>(&cmd).await??;
        let payload = self.open(Kind::Status, &key, &value)?;
        let (who, json) = payload.split_at_checked(owner.0.len())?;
        (who == owner.0).then(|| Bytes::copy_from_slice(json))
    }

    /// Remembers for every replica, for `window`, that the upstream accepted `partition` for this
    /// project (`insight` 0) or insight; an earlier shared refusal of it no longer stands.
    pub async fn share_confirmation(&self, partition: Partition, project: u64, insight: u64, window: Duration) {
        let key = self.confirmation_key(partition, project, insight);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&key)
            .arg(self.sealer.seal(Kind::Confirmation, &key, b""))
            .arg("PX")
            .arg(window.as_millis().max(1) as u64)
            .ignore();
        pipe.cmd("DEL")
            .arg(self.refusal_key(partition, 0, 0))
            .arg(self.refusal_key(partition, project, 0))
            .arg(self.refusal_key(partition, project, insight))
            .ignore();
        let _: Option<()> = self.run_pipe(&pipe).await;
    }

    /// Remembers for every replica, for `ttl`, that the upstream refused a principal (`project` 0
    /// for the credential everywhere; `insight` 0 for a whole project), drops its shared
    /// confirmations there, and tells every replica (which drop its entries and statuses).
    pub async fn share_refusal(&self, refusal: &Refusal, scope: (u64, u64), ttl: Duration) {
        let p = refusal.partition;
        let key = self.refusal_key(p, scope.0, scope.1);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&key)
            .arg(self.sealer.seal(Kind::Refusal, &key, &encode_refusal(&refusal.answer)))
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .ignore();
        pipe.cmd("DEL")
            .arg(self.confirmation_key(p, refusal.project, 0))
            .arg(self.confirmation_key(p, refusal.project, refusal.insight.unwrap_or(0)))
            .ignore();
        let _: Option<()> = self.run_pipe(&pipe).await;
        self.publish(&Event::Reject(refusal.clone())).await;
    }

    /// What the cluster knows of `partition` for this project and insight: a refusal still
    /// remembered (the credential's, the project's, the insight's), else a confirmation of the
    /// scope `confirmed` names (`(project, 0)` or `(project, insight)`), else nothing.
    pub async fn shared_word(
        &self,
        partition: Partition,
        project: u64,
        insight: Option<u64>,
        confirmed: (u64, u64),
    ) -> Option<SharedWord> {
        let refusals = [
            self.refusal_key(partition, 0, 0),
            self.refusal_key(partition, project, 0),
            self.refusal_key(partition, project, insight.unwrap_or(0)),
        ];
        let ok = self.confirmation_key(partition, confirmed.0, confirmed.1);
        let mut pipe = redis::pipe();
        pipe.cmd("MGET").arg(&refusals[..]).cmd("GET").arg(&ok).cmd("PTTL").arg(&ok);
        type Word = (Vec<Option<Vec<u8>>>, Option<Vec<u8>>, i64);
        let (values, confirmation, pttl): Word = self.run_pipe(&pipe).await?;
        for (key, value) in refusals.iter().zip(values) {
            let Some(value) = value else { continue };
            if let Some(answer) = self.open(Kind::Refusal, key, &value).and_then(decode_refusal) {
                return Some(SharedWord::Refused(Arc::new(answer)));
            }
        }
        let confirmation = confirmation?;
        self.open(Kind::Confirmation, &ok, &confirmation)?;
        let remaining = Duration::from_millis(u64::try_from(pttl).ok()?);
        Some(SharedWord::Confirmed { remaining })
    }

    /// Listens for events until shutdown, reconnecting as needed; `apply` gets other replicas'
    /// purges and refusals.
    pub async fn listen(
        self: Arc<Self>,
        apply: impl Fn(Event) + Send + Sync,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        use futures_util::StreamExt;
        loop {
            let session = async {
                let mut pubsub = self.target.pubsub().await?;
                pubsub.subscribe(self.channel()).await?;
                let mut stream = pubsub.on_message();
                while let Some(msg) = stream.next().await {
                    if let Ok(payload) = msg.get_payload::<String>() {
                        if let Some(event) = self.on_message(&payload) {
                            apply(event);
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
