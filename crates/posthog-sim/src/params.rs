//! Query-string and path decoding, and DRF-style absolute pagination URLs.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::collections::BTreeMap;

/// Decoded query-string pairs in request order.
#[derive(Debug, Default)]
pub(crate) struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// `application/x-www-form-urlencoded` decoding, lossy like Django for bad UTF-8.
    pub fn parse(query: &str) -> Self {
        let pairs = query
            .split('&')
            .filter(|s| !s.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (decode_component(k), decode_component(v))
            })
            .collect();
        Self { pairs }
    }

    /// Django's `QueryDict.get`: the last value for the key.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The raw (decoded) pairs, for rebuilding URLs.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }
}

fn decode_component(s: &str) -> String {
    let spaced = s.replace('+', " ");
    percent_decode_str(&spaced).decode_utf8_lossy().into_owned()
}

/// PostHog's `str_to_bool`: `y`, `yes`, `t`, `true`, `on`, `1` (any case).
pub(crate) fn str_to_bool(v: Option<&str>) -> bool {
    v.is_some_and(|v| matches!(v.to_lowercase().as_str(), "y" | "yes" | "t" | "true" | "on" | "1"))
}

/// Splits `path?query` (a request target) into its parts.
pub(crate) fn split_target(path_and_query: &str) -> (&str, &str) {
    path_and_query.split_once('?').unwrap_or((path_and_query, ""))
}

/// Path segments with one trailing slash removed and each segment percent-decoded.
/// `None` when a segment is not valid UTF-8 after decoding (routes to 404).
pub(crate) fn path_segments(path: &str) -> Option<Vec<String>> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    trimmed.split('/').map(|seg| percent_decode_str(seg).decode_utf8().ok().map(|c| c.into_owned())).collect()
}

/// Python's `urllib.parse.quote_plus` safe set: letters, digits and `_.-~`.
const QUOTE_PLUS: &AsciiSet = &NON_ALPHANUMERIC.remove(b'_').remove(b'.').remove(b'-').remove(b'~');

fn quote_plus(s: &str) -> String {
    utf8_percent_encode(s, QUOTE_PLUS).to_string().replace("%20", "+")
}

/// DRF's `replace_query_param` / `remove_query_param` on `http://{host}{path}?{query}`:
/// blank values are dropped (`parse_qs`), keys are sorted, `set` replaces and `remove` drops keys.
pub(crate) fn absolute_url(host: &str, path: &str, params: &Params, set: &[(&str, String)], remove: &[&str]) -> String {
    let mut map: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (k, v) in params.pairs() {
        if !v.is_empty() {
            map.entry(k.as_str()).or_default().push(v.as_str());
        }
    }
    for (k, v) in set {
        map.insert(k, vec![v.as_str()]);
    }
    for k in remove {
        map.remove(k);
    }
    let query: Vec<String> =
        map.iter().flat_map(|(k, vs)| vs.iter().map(move |v| format!("{}={}", quote_plus(k), quote_plus(v)))).collect();
    if query.is_empty() {
        format!("http://{host}{path}")
    } else {
        format!("http://{host}{path}?{}", query.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_takes_last_value() {
        let p = Params::parse("refresh=true&a=1&refresh=blocking&flag&x=%7B%22k%22%3A+1%7D&bad=%ff");
        assert_eq!(p.get("refresh"), Some("blocking"));
        assert_eq!(p.get("flag"), Some(""));
        assert_eq!(p.get("x"), Some("{\"k\": 1}"));
        assert_eq!(p.get("bad"), Some("\u{fffd}"));
        assert_eq!(p.get("missing"), None);
    }

    #[test]
    fn segments() {
        assert_eq!(path_segments("/api/projects/1/insights/").unwrap(), ["api", "projects", "1", "insights"]);
        assert_eq!(path_segments("/api/projects/%31").unwrap(), ["api", "projects", "1"]);
        assert!(path_segments("/api/%ff").is_none());
    }

    #[test]
    fn drf_urls() {
        let p = Params::parse("offset=5&refresh=&basic=true&limit=2");
        let next = absolute_url("h:1", "/p/", &p, &[("limit", "2".into()), ("offset", "7".into())], &[]);
        assert_eq!(next, "http://h:1/p/?basic=true&limit=2&offset=7");
        let prev = absolute_url("h:1", "/p/", &p, &[("limit", "2".into())], &["offset"]);
        assert_eq!(prev, "http://h:1/p/?basic=true&limit=2");
        let q = Params::parse("short_id=a b");
        assert_eq!(absolute_url("h", "/p", &q, &[], &[]), "http://h/p?short_id=a+b");
    }
}
