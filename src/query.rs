//! Strict query-string parsing: percent-decoding must be valid and decode to UTF-8, `+` is a space
//! (as Django reads forms), and a repeated parameter takes its last value (Django's `QueryDict.get`).

use percent_encoding::percent_decode;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("the query string has invalid percent-encoding")]
    BadEncoding,
    #[error("the query string is not valid UTF-8")]
    NotUtf8,
    #[error("the query string has more than {0} parameters")]
    TooMany(usize),
}

/// At most this many parameters: a request with more is refused rather than hashed into a key.
pub const MAX_PARAMS: usize = 256;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryParams {
    pairs: Vec<(String, String)>,
}

impl QueryParams {
    pub fn parse(query: Option<&str>) -> Result<Self, QueryError> {
        let mut pairs = Vec::new();
        for part in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            if pairs.len() == MAX_PARAMS {
                return Err(QueryError::TooMany(MAX_PARAMS));
            }
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            pairs.push((decode(k)?, decode(v)?));
        }
        Ok(Self { pairs })
    }

    /// The last value of `name`, as Django's `QueryDict.get` returns it.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Only the parameters named in `keep`.
    pub fn only(&self, keep: &[&str]) -> QueryParams {
        QueryParams { pairs: self.pairs.iter().filter(|(k, _)| keep.contains(&k.as_str())).cloned().collect() }
    }

    /// Re-encodes the parameters, leaving out `drop` and appending `extra`.
    pub fn encode_without(&self, drop: &[&str], extra: &[(&str, &str)]) -> String {
        let kept = || self.iter().filter(|(k, _)| !drop.contains(k)).chain(extra.iter().copied());
        // Written in place, sized for the common case of nothing to escape: every kept list-page
        // hit builds its page key with this.
        let mut out = String::with_capacity(kept().map(|(k, v)| k.len() + v.len() + 2).sum());
        for (k, v) in kept() {
            if !out.is_empty() {
                out.push('&');
            }
            out.extend(percent_encoding::utf8_percent_encode(k, ENCODED));
            out.push('=');
            out.extend(percent_encoding::utf8_percent_encode(v, ENCODED));
        }
        out
    }
}

fn decode(s: &str) -> Result<String, QueryError> {
    let bytes = s.as_bytes();
    // percent_decode passes malformed escapes through; refuse them instead.
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%' {
            let ok = bytes.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
            if !ok {
                return Err(QueryError::BadEncoding);
            }
        }
    }
    let plus_as_space = s.replace('+', " ");
    percent_decode(plus_as_space.as_bytes()).decode_utf8().map(|c| c.into_owned()).map_err(|_| QueryError::NotUtf8)
}

/// What [`encode`] escapes: everything but RFC 3986's unreserved characters.
const ENCODED: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

pub fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, ENCODED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_value_wins() {
        let q = QueryParams::parse(Some("refresh=blocking&refresh=async&x")).unwrap();
        assert_eq!(q.get("refresh"), Some("async"));
        assert_eq!(q.get("x"), Some(""));
        assert_eq!(q.get("y"), None);
    }

    #[test]
    fn decodes_strictly() {
        let q = QueryParams::parse(Some("a=%7B%22x%22%3A1%7D&b=a+b")).unwrap();
        assert_eq!(q.get("a"), Some("{\"x\":1}"));
        assert_eq!(q.get("b"), Some("a b"));
        assert_eq!(QueryParams::parse(Some("a=%zz")), Err(QueryError::BadEncoding));
        assert_eq!(QueryParams::parse(Some("a=%")), Err(QueryError::BadEncoding));
        assert_eq!(QueryParams::parse(Some("a=%ff")), Err(QueryError::NotUtf8));
    }

    #[test]
    fn reencodes() {
        let q = QueryParams::parse(Some("refresh=true&from_dashboard=3&f=%7B%7D")).unwrap();
        assert_eq!(
            q.encode_without(&["refresh"], &[("refresh", "blocking")]),
            "from_dashboard=3&f=%7B%7D&refresh=blocking"
        );
    }
}
