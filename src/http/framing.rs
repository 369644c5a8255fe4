//! The front door: what a request's head must look like before the proxy does anything with it.
//!
//! - Body framing is unambiguous: at most one `Content-Length`, a plain number, or exactly one
//!   `Transfer-Encoding: chunked` on HTTP/1.1, never both (nginx refuses the same).
//! - The authority the proxy writes into links (`Host`, or an absolute-form target's) is a
//!   reg-name, an IPv4 address or a bracketed IPv6 address, with an optional numeric port
//!   (RFC 3986 §3.2.2-3.2.3), so it can never break out of a JSON string or a header.
//!
//! pingora's HTTP/1 parser already refuses, before any hook runs (its own empty 400, connection
//! closed): differing or unparseable `Content-Length` values, a final `Transfer-Encoding` other
//! than `chunked`, `Transfer-Encoding` on HTTP/1.0, obs-fold, control bytes in a field, a space
//! before a colon, and duplicate `Host`. What it lets through and this module refuses: repeated
//! equal lengths (`5, 5`, two lines), `Transfer-Encoding` lists and repeats ending in `chunked`,
//! and `Content-Length` together with `Transfer-Encoding` (pingora drops the length and forwards).

use std::net::Ipv6Addr;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use pingora::http::authority::raw_target_authority;
use pingora::http::RequestHeader;
use pingora::protocols::http::ServerSession;

use crate::error::ApiError;

/// Why a request's head is refused (400) before any work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("Content-Length must be given once, as a single value.")]
    RepeatedContentLength,
    #[error("Content-Length must be a number of bytes (digits only).")]
    InvalidContentLength,
    #[error("A request must not carry both Content-Length and Transfer-Encoding.")]
    LengthAndTransferEncoding,
    #[error("Transfer-Encoding must be exactly \"chunked\", given once.")]
    UnsupportedTransferEncoding,
    #[error("An HTTP/1.0 request must not carry Transfer-Encoding.")]
    TransferEncodingOnHttp10,
    #[error(
        "The Host header must be a host name, an IPv4 address or a bracketed IPv6 address, with an optional port."
    )]
    InvalidHost,
    #[error("The request target's authority must be a host name, an IPv4 address or a bracketed IPv6 address, with an optional port.")]
    InvalidTargetAuthority,
}

impl From<HeadError> for ApiError {
    fn from(e: HeadError) -> ApiError {
        ApiError::bad_request(e.to_string())
    }
}

/// Checks `session`'s request head ([`check`]); a refused request's connection is not reused
/// (its body, if any, is never read, so nothing of it can be taken for a next request).
pub(crate) fn admit(session: &mut ServerSession) -> Result<(), ApiError> {
    let raw_head = || session.as_http1().map(|h1| h1.get_headers_raw_bytes());
    let checked = check(session.req_header(), raw_head);
    checked.map_err(|e| {
        session.set_keepalive(None);
        e.into()
    })
}

/// Checks a request head: its body framing and its authority. `raw_head` gives the head as
/// received (HTTP/1), asked for only when `Transfer-Encoding` is present: pingora's parser drops
/// `Content-Length` from `req` in that case.
pub fn check(req: &RequestHeader, raw_head: impl FnOnce() -> Option<Bytes>) -> Result<(), HeadError> {
    check_framing(req, raw_head)?;
    if let Some(host) = req.headers.get(HOST) {
        if !is_valid_authority(host.as_bytes()) {
            return Err(HeadError::InvalidHost);
        }
    }
    // pingora keeps an HTTP/1 absolute-form target's authority out of `uri` (HTTP/2 puts
    // `:authority` there).
    let target = raw_target_authority(req.raw_path());
    let authorities = req.uri.authority().map(|a| a.as_str().as_bytes()).into_iter().chain(target.authority());
    for authority in authorities {
        if !is_valid_authority(authority) {
            return Err(HeadError::InvalidTargetAuthority);
        }
    }
    Ok(())
}

fn check_framing(req: &RequestHeader, raw_head: impl FnOnce() -> Option<Bytes>) -> Result<(), HeadError> {
    let mut lengths = req.headers.get_all(CONTENT_LENGTH).iter();
    let length = lengths.next();
    if lengths.next().is_some() {
        return Err(HeadError::RepeatedContentLength);
    }
    if let Some(value) = length {
        let value = trim_ows(value.as_bytes());
        if value.contains(&b',') {
            return Err(HeadError::RepeatedContentLength);
        }
        if parse_digits(value).is_none() {
            return Err(HeadError::InvalidContentLength);
        }
    }
    let mut codings = req.headers.get_all(TRANSFER_ENCODING).iter();
    let Some(coding) = codings.next() else {
        return Ok(());
    };
    if req.version < http::Version::HTTP_11 {
        return Err(HeadError::TransferEncodingOnHttp10);
    }
    if length.is_some() || raw_head().is_some_and(|raw| names_content_length(&raw)) {
        return Err(HeadError::LengthAndTransferEncoding);
    }
    if codings.next().is_some() || !trim_ows(coding.as_bytes()).eq_ignore_ascii_case(b"chunked") {
        return Err(HeadError::UnsupportedTransferEncoding);
    }
    Ok(())
}

/// A run of ASCII digits that fits a `u64` (no sign, no spaces, not empty).
fn parse_digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| {
        let digit = b.is_ascii_digit().then(|| u64::from(b - b'0'))?;
        n.checked_mul(10)?.checked_add(digit)
    })
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Whether a raw HTTP/1 head has a `Content-Length` field line (pingora's parser allows no space
/// before the colon, and lines may end in a bare LF).
fn names_content_length(raw: &[u8]) -> bool {
    const NAME: &[u8] = b"content-length:";
    raw.split(|&b| b == b'\n')
        .skip(1)
        .any(|line| line.len() >= NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME))
}

/// `host [":" port]` where host is a reg-name (which includes IPv4 addresses) or a bracketed IPv6
/// address, and port is 1 to 5 digits up to 65535 (RFC 3986 §3.2.2-3.2.3; IPvFuture and zone ids
/// are refused).
pub fn is_valid_authority(authority: &[u8]) -> bool {
    let (host_ok, rest) = match authority.strip_prefix(b"[") {
        Some(bracketed) => match bracketed.iter().position(|&b| b == b']') {
            Some(end) => (is_ipv6(&bracketed[..end]), &bracketed[end + 1..]),
            None => return false,
        },
        None => {
            let end = authority.iter().position(|&b| b == b':').unwrap_or(authority.len());
            (is_reg_name(&authority[..end]), &authority[end..])
        }
    };
    host_ok
        && match rest {
            [] => true,
            [b':', port @ ..] => port.len() <= 5 && parse_digits(port).is_some_and(|p| p <= 65535),
            _ => false,
        }
}

fn is_ipv6(s: &[u8]) -> bool {
    std::str::from_utf8(s).is_ok_and(|s| s.parse::<Ipv6Addr>().is_ok())
}

/// `1*( unreserved / pct-encoded / sub-delims )` (an empty host is refused too).
fn is_reg_name(s: &[u8]) -> bool {
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' => {
                if !(s.get(i + 1).is_some_and(u8::is_ascii_hexdigit) && s.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
                {
                    return false;
                }
                i += 3;
                continue;
            }
            b if b.is_ascii_alphanumeric() => {}
            b'-' | b'.' | b'_' | b'~' => {}
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' => {}
            _ => return false,
        }
        i += 1;
    }
    !s.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(version: http::Version, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("POST", b"/api/projects/", None).unwrap();
        req.set_version(version);
        for (k, v) in headers {
            req.append_header(k.to_string(), *v).unwrap();
        }
        req
    }

    fn framing(headers: &[(&str, &str)]) -> Result<(), HeadError> {
        check(&head(http::Version::HTTP_11, headers), || None)
    }

    #[test]
    fn one_plain_length_or_one_chunked_coding_passes() {
        assert_eq!(framing(&[]), Ok(()));
        assert_eq!(framing(&[("content-length", "0")]), Ok(()));
        assert_eq!(framing(&[("content-length", " 42\t")]), Ok(()));
        assert_eq!(framing(&[("content-length", "18446744073709551615")]), Ok(()));
        assert_eq!(framing(&[("transfer-encoding", "chunked")]), Ok(()));
        assert_eq!(framing(&[("transfer-encoding", "ChUnKeD")]), Ok(()));
    }

    #[test]
    fn repeated_or_malformed_lengths_are_refused() {
        use HeadError::*;
        assert_eq!(framing(&[("content-length", "5, 5")]), Err(RepeatedContentLength));
        assert_eq!(framing(&[("content-length", "5"), ("content-length", "5")]), Err(RepeatedContentLength));
        assert_eq!(framing(&[("content-length", "5"), ("content-length", "6")]), Err(RepeatedContentLength));
        for bad in ["", "abc", "+5", "-5", "0x5", "5 5", "18446744073709551616", "1e3"] {
            assert_eq!(framing(&[("content-length", bad)]), Err(InvalidContentLength), "{bad:?}");
        }
    }

    #[test]
    fn only_exactly_chunked_on_http11_is_accepted() {
        use HeadError::*;
        for bad in ["gzip, chunked", "chunked, identity", "chunked, chunked", "xchunked", "identity", "chunked;q=1", ""]
        {
            assert_eq!(framing(&[("transfer-encoding", bad)]), Err(UnsupportedTransferEncoding), "{bad:?}");
        }
        let twice = [("transfer-encoding", "gzip"), ("transfer-encoding", "chunked")];
        assert_eq!(framing(&twice), Err(UnsupportedTransferEncoding));
        let http10 = head(http::Version::HTTP_10, &[("transfer-encoding", "chunked")]);
        assert_eq!(check(&http10, || None), Err(TransferEncodingOnHttp10));
    }

    #[test]
    fn a_length_with_a_coding_is_refused_even_when_the_parser_dropped_it() {
        let both = [("content-length", "0"), ("transfer-encoding", "chunked")];
        assert_eq!(framing(&both), Err(HeadError::LengthAndTransferEncoding));
        // pingora's parser keeps only the coding; the raw head still names the length.
        let req = head(http::Version::HTTP_11, &[("transfer-encoding", "chunked")]);
        let raw = Bytes::from_static(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\nCONTENT-LENGTH: 5\r\n\r\n");
        assert_eq!(check(&req, || Some(raw)), Err(HeadError::LengthAndTransferEncoding));
        let raw = Bytes::from_static(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nX-Content-Length: 5\r\n\r\n");
        assert_eq!(check(&req, || Some(raw)), Ok(()));
    }

    #[test]
    fn authorities_follow_rfc3986() {
        for good in [
            "example.com",
            "example.com:8080",
            "127.0.0.1",
            "127.0.0.1:65535",
            "[::1]",
            "[2001:db8::1]:443",
            "a-b_c~d.e",
            "xn--bcher-kva.example",
            "a%2Fb",
            "sub!$&'()*+,;=delims",
        ] {
            assert!(is_valid_authority(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            ":80",
            "x\",\"injected\":\"1",
            "example.com/path",
            "example.com\\x",
            "a b",
            "a\tb",
            "example.com:",
            "example.com:80x",
            "example.com:65536",
            "example.com:000080",
            "example.com:80:80",
            "user@example.com",
            "::1",
            "[::1",
            "[::1]x",
            "[::1]:",
            "[v1.fe80::a]",
            "[fe80::1%25eth0]",
            "a%zz",
            "a%2",
            "<script>",
            "é.example",
        ] {
            assert!(!is_valid_authority(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn a_hostile_host_or_target_authority_is_refused() {
        let req = head(http::Version::HTTP_11, &[("host", "x\",\"injected\":\"1")]);
        assert_eq!(check(&req, || None), Err(HeadError::InvalidHost));
        let ok = head(http::Version::HTTP_11, &[("host", "example.com:8080")]);
        assert_eq!(check(&ok, || None), Ok(()));
        let absolute = RequestHeader::build("GET", b"http://example.com:99999/api/projects/", None).unwrap();
        assert_eq!(check(&absolute, || None), Err(HeadError::InvalidTargetAuthority));
    }
}
