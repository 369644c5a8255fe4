//! A request's header fields as the decision reads them, from either parser: pingora's
//! `HeaderMap`, or the fast path's fields parsed in place ([`crate::http::conn`]). Reading through
//! one trait keeps one decision for both.

use http::{HeaderMap, HeaderName};

pub trait HeaderFields {
    /// The values of every field named `name`, in the order received.
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a;

    /// The first value of `name`.
    fn first<'a>(&'a self, name: &'a HeaderName) -> Option<&'a [u8]> {
        self.values(name).next()
    }
}

impl HeaderFields for HeaderMap {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).iter().map(|v| v.as_bytes())
    }
}

/// Fields parsed in place by `httparse` (names as received: compared without case).
impl HeaderFields for [httparse::Header<'_>] {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter().filter(move |h| h.name.eq_ignore_ascii_case(name.as_str())).map(|h| h.value)
    }
}
