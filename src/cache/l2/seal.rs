//! Values in the shared tier carry a keyed MAC made with a key derived from the partition secret,
//! bound to the Redis key they are stored under and to their kind. Redis is shared
//! infrastructure: whoever can write to it may delete or withhold values, but cannot make a
//! replica serve a value no replica sealed, nor move a sealed value to another key or kind.

/// Sealed values start with this; anything else (an older format, garbage) fails to open.
const MAGIC: &[u8; 4] = b"IPX2";
const MAC_LEN: usize = 32;

/// What a sealed value is: part of the MAC, so one kind never passes for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Entry,
    Status,
    Purge,
    Confirmation,
    Refusal,
    Event,
}

impl Kind {
    pub const ALL: [Kind; 6] = [Kind::Entry, Kind::Status, Kind::Purge, Kind::Confirmation, Kind::Refusal, Kind::Event];

    /// The metric label of values of this kind that failed their MAC.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Entry => "entry",
            Kind::Status => "status",
            Kind::Purge => "purge",
            Kind::Confirmation => "confirmation",
            Kind::Refusal => "refusal",
            Kind::Event => "event",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a shared-tier value failed its MAC")]
pub struct Forged;

#[derive(Clone)]
pub struct Sealer {
    key: [u8; 32],
}

impl Sealer {
    /// The MAC key for this deployment: derived from the partition secret every replica shares.
    pub fn new(secret: &str) -> Sealer {
        Sealer { key: blake3::derive_key("insights-proxy shared tier value mac v1", secret.as_bytes()) }
    }

    fn mac(&self, kind: Kind, key: &str, payload: &[u8]) -> [u8; MAC_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(kind.as_str().as_bytes());
        h.update(&[0]);
        h.update(&(key.len() as u64).to_le_bytes());
        h.update(key.as_bytes());
        h.update(payload);
        *h.finalize().as_bytes()
    }

    /// `payload` sealed for storing under `key`: the magic, the payload, then the MAC.
    pub fn seal(&self, kind: Kind, key: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAGIC.len() + payload.len() + MAC_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(payload);
        out.extend_from_slice(&self.mac(kind, key, payload));
        out
    }

    /// The payload of a value read from `key`, if a replica sealed it for that key and kind.
    pub fn open<'a>(&self, kind: Kind, key: &str, value: &'a [u8]) -> Result<&'a [u8], Forged> {
        let rest = value.strip_prefix(MAGIC).ok_or(Forged)?;
        let split = rest.len().checked_sub(MAC_LEN).ok_or(Forged)?;
        let (payload, mac) = rest.split_at(split);
        // blake3::Hash compares in constant time.
        if blake3::Hash::from(self.mac(kind, key, payload)) == blake3::Hash::from_slice(mac).map_err(|_| Forged)? {
            Ok(payload)
        } else {
            Err(Forged)
        }
    }

    /// A text message (pub/sub) with its MAC appended in hex, bound to the channel.
    pub fn seal_text(&self, channel: &str, text: &str) -> String {
        format!("{text} {}", blake3::Hash::from(self.mac(Kind::Event, channel, text.as_bytes())).to_hex())
    }

    /// The text of a message sealed with [`Sealer::seal_text`] for `channel`.
    pub fn open_text<'a>(&self, channel: &str, message: &'a str) -> Result<&'a str, Forged> {
        let (text, mac) = message.rsplit_once(' ').ok_or(Forged)?;
        let mac = blake3::Hash::from_hex(mac).map_err(|_| Forged)?;
        if blake3::Hash::from(self.mac(Kind::Event, channel, text.as_bytes())) == mac {
            Ok(text)
        } else {
            Err(Forged)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_opens_only_under_its_key_kind_and_secret() {
        let s = Sealer::new("secret");
        let v = s.seal(Kind::Entry, "k1", b"payload");
        assert_eq!(s.open(Kind::Entry, "k1", &v), Ok(&b"payload"[..]));
        assert_eq!(s.open(Kind::Entry, "k2", &v), Err(Forged), "moved to another key");
        assert_eq!(s.open(Kind::Status, "k1", &v), Err(Forged), "read as another kind");
        assert_eq!(Sealer::new("other").open(Kind::Entry, "k1", &v), Err(Forged), "another deployment's");
        let mut tampered = v.clone();
        tampered[5] ^= 1;
        assert_eq!(s.open(Kind::Entry, "k1", &tampered), Err(Forged));
        assert_eq!(s.open(Kind::Entry, "k1", b"IPX2short"), Err(Forged));
        assert_eq!(s.open(Kind::Entry, "k1", b""), Err(Forged));
    }

    #[test]
    fn messages_open_only_on_their_channel() {
        let s = Sealer::new("secret");
        let m = s.seal_text("c1", "r1 purge p 3");
        assert_eq!(s.open_text("c1", &m), Ok("r1 purge p 3"));
        assert_eq!(s.open_text("c2", &m), Err(Forged));
        assert_eq!(s.open_text("c1", "r1 purge p 3 00"), Err(Forged));
        assert_eq!(s.open_text("c1", &m.replace("p 3", "p 4")), Err(Forged));
    }
}
