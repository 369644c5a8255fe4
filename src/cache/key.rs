//! Cache keys. Every key carries the caller's partition (a keyed hash of the credential), so an
//! entry, an in-flight calculation or a query status can only ever be found by the credential that
//! created it (docs/refresh-semantics.md §8: per-user property restrictions and access control make
//! results principal-specific).

use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::query::QueryParams;

/// 128 bits of a keyed BLAKE3 hash of the credential.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition(pub [u8; 16]);

impl fmt::Debug for Partition {
    /// A short prefix is enough to correlate log lines and cannot be reversed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p:{:02x}{:02x}{:02x}{:02x}", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}

/// Derives partitions. The key is either configured (stable across restarts and replicas) or
/// random per process.
#[derive(Clone)]
pub struct PartitionKeyer {
    key: [u8; 32],
    /// Tells keyers apart in the per-thread memo (clones share the key, and the id).
    id: u64,
}

/// The last credential a thread derived a partition for, and that partition: a connection's
/// requests repeat one credential, and the keyed hash is a noticeable part of a cache hit.
struct Memo {
    keyer: u64,
    kind: Vec<u8>,
    secret: Vec<u8>,
    partition: Partition,
}

thread_local! {
    static LAST: RefCell<Option<Memo>> = const { RefCell::new(None) };
}

static KEYERS: AtomicU64 = AtomicU64::new(1);

/// Equality in time that depends on the lengths only: whether a guess matches the credential
/// last seen on a thread must not show in how long the comparison takes.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

impl PartitionKeyer {
    pub fn new(secret: Option<&str>) -> Self {
        let key = match secret {
            Some(s) => blake3::derive_key("insights-proxy partition key v1", s.as_bytes()),
            None => rand::random(),
        };
        Self { key, id: KEYERS.fetch_add(1, Ordering::Relaxed) }
    }

    /// The partition of one credential: `kind` separates kinds of credential, so a session id
    /// equal to some key's text is another partition.
    pub fn partition(&self, kind: &[u8], secret: &[u8]) -> Partition {
        LAST.with(|last| {
            let mut last = last.borrow_mut();
            if let Some(m) = last.as_ref().filter(|m| m.keyer == self.id && m.kind == kind) {
                if same_secret(&m.secret, secret) {
                    return m.partition;
                }
            }
            let partition = self.derive(kind, secret);
            let m =
                last.get_or_insert_with(|| Memo { keyer: self.id, kind: Vec::new(), secret: Vec::new(), partition });
            m.keyer = self.id;
            m.partition = partition;
            m.kind.clear();
            m.kind.extend_from_slice(kind);
            m.secret.clear();
            m.secret.extend_from_slice(secret);
            partition
        })
    }

    fn derive(&self, kind: &[u8], secret: &[u8]) -> Partition {
        let mut hasher = blake3::Hasher::new_keyed(&self.key);
        hasher.update(&(kind.len() as u64).to_le_bytes());
        hasher.update(kind);
        hasher.update(secret);
        let h = hasher.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.as_bytes()[..16]);
        Partition(out)
    }

    /// An id for a query status: unguessable and unique per key, so a status can be polled only by
    /// someone who was given it.
    pub fn status_id(&self, key: &CacheKey) -> String {
        let h = blake3::keyed_hash(&self.key, &key.to_bytes());
        format!("ipx_{}_{}", key.project, &h.to_hex()[..32])
    }
}

/// Which variant of an insight's result: the parameters that change the query
/// (docs/refresh-semantics.md §8). `refresh`, `client_query_id` and the like are deliberately not
/// part of it.
pub const VARIANT_PARAMS: [&str; 4] =
    ["from_dashboard", "filters_override", "variables_override", "tile_filters_override"];

/// Parameters known not to change an insight's result: the refresh mode, ids of the client's
/// query and session, and the credential. Every other parameter, known or not, is part of the key: a parameter PostHog adds tomorrow that
/// changes the result must never be answered with another variant's result.
pub const IGNORED_PARAMS: [&str; 4] = ["refresh", "client_query_id", "session_id", "personal_api_key"];

/// How many of the query's parameters are neither a known variant parameter nor known to be
/// ignorable (each is keyed; a metric counts them so an operator sees clients change).
pub fn unknown_params(query: &QueryParams) -> usize {
    query.iter().filter(|(k, _)| !VARIANT_PARAMS.contains(k) && !IGNORED_PARAMS.contains(k)).count()
}

const GROUP_TAG: u128 = 0x6772_6f75_7000_0000_0000_0000_0000_0001;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct CacheKey {
    pub partition: Partition,
    /// The project (environment) id; both URL aliases share entries.
    pub project: u64,
    pub insight: u64,
    /// Hash of the normalised variant parameters; 0 when none is given.
    pub variant: u128,
}

impl CacheKey {
    pub fn new(partition: Partition, project: u64, insight: u64, query: &QueryParams) -> Self {
        Self { partition, project, insight, variant: variant_of(query) }
    }

    /// The key of the upstream cache key `group` within this key's partition and insight: where
    /// variants that the upstream computes identically meet (one flight, one newest result).
    pub fn group_key(&self, group: u128) -> CacheKey {
        // Tagged, so it is not a variant's own key (short of a 128-bit hash collision).
        CacheKey { variant: group ^ GROUP_TAG, ..*self }
    }

    pub fn to_bytes(&self) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[..16].copy_from_slice(&self.partition.0);
        b[16..24].copy_from_slice(&self.project.to_le_bytes());
        b[24..32].copy_from_slice(&self.insight.to_le_bytes());
        b[32..].copy_from_slice(&self.variant.to_le_bytes());
        b
    }
}

/// `v` with every object's keys sorted (serde_json keeps them in the order given), so that
/// equivalent JSON has one text.
fn canonical_json(v: &serde_json::Value) -> String {
    fn write(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::Object(m) => {
                let mut entries: Vec<_> = m.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push('{');
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::from(k.as_str()).to_string());
                    out.push(':');
                    write(v, out);
                }
                out.push('}');
            }
            serde_json::Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

/// JSON parameters are normalised (key order, whitespace) so equivalent overrides share an entry;
/// anything that is not JSON is hashed as given.
fn variant_of(query: &QueryParams) -> u128 {
    // The hit path's common case: nothing that could key a variant.
    if query.iter().all(|(k, _)| IGNORED_PARAMS.contains(&k)) {
        return 0;
    }
    let mut hasher = blake3::Hasher::new();
    let mut any = false;
    // The known parameters in a fixed order, then any other (but the ignorable) by name.
    let mut others: Vec<&str> =
        query.iter().map(|(k, _)| k).filter(|k| !VARIANT_PARAMS.contains(k) && !IGNORED_PARAMS.contains(k)).collect();
    others.sort_unstable();
    others.dedup();
    for name in VARIANT_PARAMS.into_iter().chain(others) {
        let Some(raw) = query.get(name) else { continue };
        let normalised = serde_json::from_str::<serde_json::Value>(raw).map(|v| canonical_json(&v));
        let value = normalised.as_deref().unwrap_or(raw);
        if value.is_empty() || value == "null" {
            continue;
        }
        any = true;
        for part in [name, value] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
    }
    if !any {
        return 0;
    }
    let h = hasher.finalize();
    u128::from_le_bytes(h.as_bytes()[..16].try_into().expect("16 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(k: &PartitionKeyer, token: &str) -> Partition {
        k.partition(b"personal-api-key", token.as_bytes())
    }

    fn q(s: &str) -> QueryParams {
        QueryParams::parse(Some(s)).unwrap()
    }

    #[test]
    fn partitions_differ_per_credential_and_key() {
        let k = PartitionKeyer::new(Some("0123456789abcdef"));
        assert_ne!(part(&k, "a"), part(&k, "b"));
        assert_eq!(part(&k, "a"), part(&k, "a"));
        let other = PartitionKeyer::new(Some("fedcba9876543210"));
        assert_ne!(part(&k, "a"), part(&other, "a"));
        // The per-thread memo answers only for the same keyer, kind and credential.
        for _ in 0..2 {
            assert_eq!(part(&k, "a"), k.derive(b"personal-api-key", b"a"));
            assert_eq!(part(&other, "a"), other.derive(b"personal-api-key", b"a"));
            assert_eq!(k.partition(b"session", b"a"), k.derive(b"session", b"a"));
            assert_eq!(part(&k, "ab"), k.derive(b"personal-api-key", b"ab"));
        }
        assert!(same_secret(b"ab", b"ab") && !same_secret(b"ab", b"ac") && !same_secret(b"ab", b"abc"));
    }

    #[test]
    fn variant_ignores_refresh_and_normalises_json() {
        let p = Partition([0; 16]);
        let base = CacheKey::new(p, 1, 2, &q(""));
        assert_eq!(base.variant, 0);
        assert_eq!(CacheKey::new(p, 1, 2, &q("refresh=blocking&client_query_id=x")), base);
        let a = CacheKey::new(p, 1, 2, &q("filters_override=%7B%22a%22%3A1%2C%22b%22%3A2%7D"));
        let b = CacheKey::new(p, 1, 2, &q("filters_override=%7B%22b%22%3A2%2C+%22a%22%3A1%7D"));
        assert_eq!(a, b);
        assert_ne!(a, base);
        assert_ne!(CacheKey::new(p, 1, 2, &q("from_dashboard=3")), CacheKey::new(p, 1, 2, &q("from_dashboard=4")));
        // Any other parameter is keyed too, but those known not to change the result.
        assert_ne!(CacheKey::new(p, 1, 2, &q("some_future_param=x")), base);
        assert_ne!(CacheKey::new(p, 1, 2, &q("a=1")), CacheKey::new(p, 1, 2, &q("b=1")));
        assert_eq!(CacheKey::new(p, 1, 2, &q("session_id=s&personal_api_key=k")), base);
        assert_eq!(unknown_params(&q("refresh=async&from_dashboard=1&x=1&y=2")), 2);
        // A value moved between parameters is a different variant.
        assert_ne!(
            CacheKey::new(p, 1, 2, &q("filters_override=1")),
            CacheKey::new(p, 1, 2, &q("variables_override=1"))
        );
    }

    #[test]
    fn integers_beyond_64_bits_neither_collide_nor_turn_into_floats() {
        let p = Partition([0; 16]);
        let a = CacheKey::new(p, 1, 2, &q("filters_override=%7B%22x%22%3A18446744073709551616%7D"));
        let b = CacheKey::new(p, 1, 2, &q("filters_override=%7B%22x%22%3A18446744073709551617%7D"));
        let c = CacheKey::new(p, 1, 2, &q("filters_override=%7B%22x%22%3A1.8446744073709552e19%7D"));
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(b, c);
    }

    #[test]
    fn status_ids_are_per_partition() {
        let k = PartitionKeyer::new(None);
        let a = CacheKey::new(part(&k, "a"), 1, 2, &q(""));
        let b = CacheKey::new(part(&k, "b"), 1, 2, &q(""));
        assert_ne!(k.status_id(&a), k.status_id(&b));
        assert!(k.status_id(&a).starts_with("ipx_1_"));
    }
}
