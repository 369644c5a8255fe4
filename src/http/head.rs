//! The head of the proxy's own answers, built in one place for both writers: pingora's session
//! ([`Head::response_header`], HTTP/1 and HTTP/2) and the fast path's HTTP/1 bytes
//! ([`Head::h1`]). Both take their fields from [`Head::fields`], so they cannot disagree on a
//! name, a value or the order; `tests/fast_path.rs` `answers_are_byte_identical_on_both_paths`
//! checks the bytes against pingora's writer.

use http::header::{self, HeaderName, HeaderValue};
use http::StatusCode;
use pingora::http::ResponseHeader;

use crate::cache_status::{decimal, CacheStatus};
use crate::insights::Reply;

static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
// Built at compile time: `HeaderValue::from_static` checks every byte when it runs.
static VARY: HeaderValue = HeaderValue::from_static("Authorization, Cookie");
const JSON: &str = "application/json";
static DEFAULT_CONTENT_TYPE: HeaderValue = HeaderValue::from_static(JSON);

/// Why an answer's head cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidHead {
    #[error("invalid status")]
    Status,
    #[error("invalid content-type")]
    ContentType,
    #[error("invalid cache-status")]
    CacheStatus,
}

/// One field's value, rendered by each writer its own way (bytes, or a `HeaderValue`).
pub(crate) enum Value<'a> {
    Static(&'static str),
    /// Checked by [`Head::of`] to be a valid header value.
    Text(&'a str),
    Length(usize),
    CacheStatus(&'a CacheStatus),
    Header(&'a HeaderValue),
}

/// A reply's status and fields, checked.
pub(crate) struct Head<'a> {
    status: StatusCode,
    content_type: &'a str,
    reply: &'a Reply,
}

impl<'a> Head<'a> {
    pub(crate) fn of(reply: &'a Reply) -> Result<Head<'a>, InvalidHead> {
        let status = StatusCode::from_u16(reply.status).map_err(|_| InvalidHead::Status)?;
        let content_type = reply.content_type.as_deref().unwrap_or(JSON);
        // `http::HeaderValue::from_str`'s rule.
        if !content_type.bytes().all(|b| b == b'\t' || (b >= 32 && b != 127)) {
            return Err(InvalidHead::ContentType);
        }
        Ok(Head { status, content_type, reply })
    }

    /// The answer's fields, in the order both writers send them; the writers add only what pingora
    /// adds to every response (`Date`, and `Connection` on HTTP/1).
    pub(crate) fn fields(&self) -> impl Iterator<Item = (&'a HeaderName, Value<'a>)> {
        // The default as a static value: `HeaderValue::from_str` would copy it into an allocation.
        let content_type = match self.reply.content_type {
            None => Value::Header(&DEFAULT_CONTENT_TYPE),
            Some(_) => Value::Text(self.content_type),
        };
        let own = [
            (&header::CONTENT_TYPE, content_type),
            (&header::CONTENT_LENGTH, Value::Length(self.reply.body.len())),
            (&CACHE_STATUS, Value::CacheStatus(&self.reply.cache_status)),
            (&header::VARY, Value::Header(&VARY)),
        ];
        own.into_iter().chain(self.reply.relayed.iter().map(|(name, value)| (name, Value::Header(value))))
    }

    /// The head for pingora's session, which adds `Date` (and on HTTP/1 `Connection`) and titles
    /// the standard names on the wire.
    pub(crate) fn response_header(&self) -> Result<ResponseHeader, InvalidHead> {
        // Built as plain `http` parts: no case map, and the names are not re-parsed from bytes as
        // `ResponseHeader::insert_header` does.
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = self.status;
        let h = &mut parts.headers;
        h.reserve(6);
        for (name, value) in self.fields() {
            let value = match value {
                Value::Static(s) => HeaderValue::from_static(s),
                Value::Text(s) => HeaderValue::from_str(s).map_err(|_| InvalidHead::ContentType)?,
                Value::Length(n) => HeaderValue::from(n),
                Value::CacheStatus(cs) => {
                    // Sized once, written without `fmt`.
                    let mut v = Vec::with_capacity(64);
                    cs.write_to(&mut v);
                    HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).map_err(|_| InvalidHead::CacheStatus)?
                }
                Value::Header(v) => v.clone(),
            };
            h.append(name.clone(), value);
        }
        Ok(ResponseHeader::from(parts))
    }

    /// The HTTP/1.1 head pingora's HTTP/1 session writes for this answer (status line, the fields
    /// with pingora's name case, then its `Date` and `Connection`), without a `ResponseHeader`.
    /// `None` for an answer with relayed upstream headers (rare error answers): pingora's writer
    /// takes those, so a repeated name is grouped as its header map groups it.
    pub(crate) fn h1(&self, keep_alive: bool) -> Option<Vec<u8>> {
        if !self.reply.relayed.is_empty() {
            return None;
        }
        let date = pingora::protocols::http::date::get_cached_date();
        let mut head = Vec::with_capacity(256 + self.content_type.len());
        head.extend_from_slice(b"HTTP/1.1 ");
        head.extend_from_slice(self.status.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(self.status.canonical_reason().unwrap_or("").as_bytes());
        head.extend_from_slice(b"\r\n");
        for (name, value) in self.fields() {
            put_field(&mut head, name, value);
        }
        put_field(&mut head, &header::DATE, Value::Header(&date));
        put_field(&mut head, &header::CONNECTION, Value::Static(if keep_alive { "keep-alive" } else { "close" }));
        head.extend_from_slice(b"\r\n");
        Some(head)
    }
}

fn put_field(head: &mut Vec<u8>, name: &HeaderName, value: Value<'_>) {
    head.extend_from_slice(wire_name(name).as_bytes());
    head.extend_from_slice(b": ");
    match value {
        Value::Static(s) | Value::Text(s) => head.extend_from_slice(s.as_bytes()),
        Value::Length(n) => head.extend_from_slice(decimal(n as i64, &mut [0u8; 20])),
        Value::CacheStatus(cs) => cs.write_to(head),
        Value::Header(v) => head.extend_from_slice(v.as_bytes()),
    }
    head.extend_from_slice(b"\r\n");
}

/// A name as pingora 0.9.1's HTTP/1 writer spells it (`pingora_http::case_header_name`'s
/// `titled_header_name_str`, private there): these standard names titled, the rest lowercase.
fn wire_name(name: &HeaderName) -> &str {
    match *name {
        header::ACCEPT_RANGES => "Accept-Ranges",
        header::AGE => "Age",
        header::CACHE_CONTROL => "Cache-Control",
        header::CONNECTION => "Connection",
        header::CONTENT_TYPE => "Content-Type",
        header::CONTENT_ENCODING => "Content-Encoding",
        header::CONTENT_LENGTH => "Content-Length",
        header::DATE => "Date",
        header::TRANSFER_ENCODING => "Transfer-Encoding",
        header::HOST => "Host",
        header::SERVER => "Server",
        header::SET_COOKIE => "Set-Cookie",
        _ => name.as_str(),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::cache_status::{Detail, Fwd};

    fn reply(status: u16, content_type: Option<&str>) -> Reply {
        let mut r =
            Reply::json(status, Bytes::from_static(b"{}"), CacheStatus::fwd(Fwd::Bypass).detail(Detail::Rejected));
        r.content_type = content_type.map(str::to_string);
        r
    }

    #[test]
    fn both_writers_send_the_same_fields_in_the_same_order() {
        let r = reply(404, None);
        let head = Head::of(&r).unwrap();
        let pingora: Vec<(String, String)> = head
            .response_header()
            .unwrap()
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap().to_string()))
            .collect();
        let wire = String::from_utf8(head.h1(false).unwrap()).unwrap();
        let mut lines = wire.split("\r\n");
        assert_eq!(lines.next(), Some("HTTP/1.1 404 Not Found"));
        let fields: Vec<(String, String)> = lines
            .take_while(|l| !l.is_empty())
            .map(|l| l.split_once(": ").map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())).unwrap())
            .filter(|(k, _)| k != "date" && k != "connection")
            .collect();
        assert_eq!(fields, pingora);
        assert!(wire.contains("\r\nContent-Type: application/json\r\nContent-Length: 2\r\ncache-status: "));
        assert!(wire.ends_with("\r\nConnection: close\r\n\r\n"), "{wire}");
    }

    #[test]
    fn a_head_pingora_would_refuse_is_refused_for_both() {
        assert_eq!(Head::of(&reply(1000, None)).err(), Some(InvalidHead::Status));
        assert_eq!(Head::of(&reply(200, Some("text/plain\r\nx: y"))).err(), Some(InvalidHead::ContentType));
        let mut relayed = reply(429, None);
        relayed.relayed.push((header::RETRY_AFTER, HeaderValue::from_static("5")));
        let head = Head::of(&relayed).unwrap();
        assert!(head.h1(true).is_none(), "relayed headers go through pingora's writer");
        assert_eq!(head.response_header().unwrap().headers.get(header::RETRY_AFTER).unwrap(), "5");
    }
}
