//! One page of an insights list as the upstream answered it, split once (when it is stored) into
//! the parts an answer is spliced from: the page's own fields pre-rendered, its `next`/`previous`
//! links (rewritten per request) and its items. A page whose members are all plain hits is then
//! answered by copying bytes, without parsing or serialising JSON per request; and while none of
//! those members changed, by the answer assembled last ([`Assembled`]), without even that.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::Value;
use time::OffsetDateTime;

use super::Entry;
use crate::query::QueryParams;
use crate::refresh::RefreshMode;

/// A list page and, when it has the expected shape, its layout.
#[derive(Debug)]
pub struct ListPage {
    /// The upstream's answer as it came.
    pub body: Bytes,
    layout: Option<PageLayout>,
    /// The last answer spliced from members that were all plain hits, for one request shape.
    assembled: Mutex<Option<Arc<Assembled>>>,
}

/// A spliced answer, reusable as it is while nothing it was made from can have changed: the
/// cache saw no change in the page's project since before its members were read
/// ([`super::InsightCache::changes`]), and every member is still a plain hit (wall clock before
/// `until_ms`: fresh, not yet in its refresh-ahead window, not expired). The page itself lives in
/// its credential's partition and is dropped by any purge, so the answer never crosses principals.
#[derive(Debug)]
pub struct Assembled {
    pub body: Bytes,
    /// The sealed file `body` is a mapping of, when it is large (`super::sealed`).
    pub file: Option<super::sealed::SealedFile>,
    /// What the answer was made for: its links are rewritten from the client's own query and the
    /// proxy's origin, and each member's plan depends on the mode.
    pub query: QueryParams,
    pub public_base: String,
    pub mode: RefreshMode,
    pub truthy: bool,
    /// The project's change count read before the members were.
    pub changes: u64,
    /// Wall-clock millisecond at which the first member stops being a plain hit.
    pub until_ms: i64,
    /// The members in page order (each read counts towards its refresh-ahead).
    pub members: Vec<Arc<Entry>>,
    /// The listed insights, confirmed for the principal as the full path does on every read.
    pub listed: Vec<u64>,
    /// When they were last confirmed (wall-clock ms): reuse renews that at most once a second.
    pub confirmed_ms: AtomicI64,
}

impl Assembled {
    /// Whether this answer was made for a request of this shape.
    pub fn made_for(&self, query: &QueryParams, public_base: &str, mode: RefreshMode, truthy: bool) -> bool {
        self.mode == mode && self.truthy == truthy && self.public_base == public_base && self.query == *query
    }

    /// Claims the once-a-second renewal of the confirmations: true for one caller per second.
    pub fn claim_confirmation(&self, now_ms: i64) -> bool {
        let last = self.confirmed_ms.load(Ordering::Relaxed);
        now_ms - last >= 1000
            && self.confirmed_ms.compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

/// A page (a JSON object with a `results` array) as the proxy answers it: the compact rendering
/// of every field in the upstream's order, with slots for the links and the results.
#[derive(Debug)]
pub struct PageLayout {
    pub parts: Vec<Part>,
    pub items: Vec<ListedItem>,
}

#[derive(Debug)]
pub enum Part {
    /// Rendered as it is: punctuation, field names and values.
    Text(Vec<u8>),
    /// A `next` or `previous` URL, rewritten for the client (then rendered as a JSON string).
    Link(String),
    /// The `results` array.
    Results,
}

/// One item of `results`.
#[derive(Debug)]
pub struct ListedItem {
    /// The insight's id, if the item has one.
    pub insight: Option<u64>,
    /// The item as listed, compact: what the page carries when the insight is not answered.
    pub listed: Bytes,
    /// When the listed result was calculated, if the item is a result the cache would keep.
    pub last_refresh: Option<OffsetDateTime>,
}

impl ListPage {
    pub fn new(body: Bytes) -> ListPage {
        let layout = PageLayout::of(&body);
        ListPage { body, layout, assembled: Mutex::new(None) }
    }

    /// The answer assembled last, if any.
    pub fn assembled(&self) -> Option<Arc<Assembled>> {
        self.assembled.lock().clone()
    }

    /// Keeps `answer` as the one to reuse (replacing one made for another request shape).
    pub fn keep_assembled(&self, answer: Arc<Assembled>) {
        *self.assembled.lock() = Some(answer);
    }

    /// `None` when the page is not an object with a `results` array (answered as garbage).
    pub fn layout(&self) -> Option<&PageLayout> {
        self.layout.as_ref()
    }
}

impl PageLayout {
    fn of(body: &[u8]) -> Option<PageLayout> {
        let Ok(Value::Object(page)) = serde_json::from_slice::<Value>(body) else { return None };
        let Some(Value::Array(results)) = page.get("results") else { return None };
        let items = results.iter().map(ListedItem::of).collect();
        let mut parts = Vec::new();
        let mut text = b"{".to_vec();
        for (i, (k, v)) in page.iter().enumerate() {
            if i > 0 {
                text.push(b',');
            }
            serde_json::to_writer(&mut text, k).expect("a key serialises");
            text.push(b':');
            let slot = match (k.as_str(), v) {
                ("results", _) => Some(Part::Results),
                ("next" | "previous", Value::String(url)) => Some(Part::Link(url.clone())),
                _ => None,
            };
            match slot {
                Some(part) => {
                    parts.push(Part::Text(std::mem::take(&mut text)));
                    parts.push(part);
                }
                None => serde_json::to_writer(&mut text, v).expect("a value serialises"),
            }
        }
        text.push(b'}');
        parts.push(Part::Text(text));
        Some(PageLayout { parts, items })
    }
}

impl ListedItem {
    fn of(item: &Value) -> ListedItem {
        let insight = item.get("id").and_then(Value::as_u64);
        let last_refresh = insight.and_then(|id| Entry::from_value(item.clone(), id, 0).ok()).map(|e| e.last_refresh());
        ListedItem { insight, listed: Bytes::from(item.to_string()), last_refresh }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_split_around_its_links_and_results() {
        let body = br#"{"count": 2, "next": "http://up/x?offset=2", "previous": null, "results": [{"id": 1, "name": "a"}, {"x": 1}], "z": [1, 2]}"#;
        let page = ListPage::new(Bytes::from_static(body));
        let layout = page.layout().expect("a page");
        let texts: Vec<String> = layout
            .parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => String::from_utf8(t.clone()).unwrap(),
                Part::Link(u) => format!("<{u}>"),
                Part::Results => "<results>".into(),
            })
            .collect();
        assert_eq!(
            texts,
            [
                r#"{"count":2,"next":"#,
                "<http://up/x?offset=2>",
                r#","previous":null,"results":"#,
                "<results>",
                r#","z":[1,2]}"#
            ]
        );
        assert_eq!(layout.items[0].insight, Some(1));
        assert_eq!(&layout.items[0].listed[..], br#"{"id":1,"name":"a"}"#);
        assert_eq!(layout.items[0].last_refresh, None, "no result: not an entry");
        assert_eq!(layout.items[1].insight, None);
        assert!(ListPage::new(Bytes::from_static(b"[1]")).layout().is_none());
        assert!(ListPage::new(Bytes::from_static(br#"{"results": 1}"#)).layout().is_none());
    }
}
