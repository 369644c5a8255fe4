//! What the decision reads of a request ([`Request`]), from pingora's parsed head or from the fast
//! path's ([`OneRead`]): a GET whose whole head arrived in one read, parsed in place with the parser
//! pingora uses, without pingora's session (its `HeaderMap` hashes every name, its `Uri` copies the
//! target, its session state is moved between futures).
//!
//! [`OneRead::parse`] accepts only heads that pingora's reader accepts as the same request and that
//! need none of its per-request machinery; anything else is read again by pingora's session from the
//! same bytes, so every refusal stays pingora's or [`super::framing`]'s. Deferred: a parse error, a
//! method other than GET, a version other than HTTP/1.0 and 1.1, bytes after the head, a target
//! that is not origin-form or has bytes outside RFC 3986's path and query characters, more than
//! [`MAX_FIELDS`] fields, a missing, repeated or invalid `Host`, and any field that frames a body or
//! changes the connection (`Content-Length`, `Transfer-Encoding`, `Expect`, `Upgrade`, `TE`, and
//! `Connection` other than one `close` or `keep-alive`).

use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::Method;
use pingora::http::RequestHeader;

use crate::fields::HeaderFields;

/// The fields a fast-path head may have; a head with more is pingora's to read.
pub const MAX_FIELDS: usize = 32;

/// A request as the decision reads it.
pub(crate) struct Request<'a, F: HeaderFields + ?Sized> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// The target's authority, when it carries one (HTTP/2's `:authority`); HTTP/1 has `Host`.
    pub authority: Option<&'a str>,
    pub headers: &'a F,
    /// Whether the connection is TLS.
    pub tls: bool,
}

impl<'a> Request<'a, http::HeaderMap> {
    pub fn of(req: &'a RequestHeader, tls: bool) -> Self {
        Request {
            method: &req.method,
            path: req.uri.path(),
            query: req.uri.query(),
            authority: req.uri.authority().map(|a| a.as_str()),
            headers: &req.headers,
            tls,
        }
    }
}

/// What the client's `Connection` field asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Connection {
    Unsaid,
    Close,
    KeepAlive,
}

/// A GET head parsed in place from one read (see the module's documentation).
pub(crate) struct OneRead<'b> {
    fields: [httparse::Header<'b>; MAX_FIELDS],
    len: usize,
    path: &'b str,
    query: Option<&'b str>,
    http10: bool,
    connection: Connection,
}

impl<'b> OneRead<'b> {
    /// `buf` parsed as one GET head and nothing more, or `None`: pingora's session reads it.
    pub fn parse(buf: &'b [u8]) -> Option<OneRead<'b>> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut req = httparse::Request::new(&mut fields);
        let (target, version) = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) if n == buf.len() && req.method == Some("GET") => {
                (req.path?, req.version?)
            }
            _ => return None,
        };
        let len = req.headers.len();
        if version > 1 || !target.starts_with('/') || !target.bytes().all(is_target_byte) {
            return None;
        }
        // By byte position: `split_once('?')` sets up a `char` searcher on every hit.
        let (path, query) = match target.bytes().position(|b| b == b'?') {
            Some(i) => (&target[..i], Some(&target[i + 1..])),
            None => (target, None),
        };
        let mut connection = Connection::Unsaid;
        let mut hosts = 0;
        for field in &fields[..len] {
            let name = field.name.as_bytes();
            if name.eq_ignore_ascii_case(HOST.as_str().as_bytes()) {
                hosts += 1;
                if !super::framing::is_valid_authority(field.value) {
                    return None;
                }
            } else if name.eq_ignore_ascii_case(CONNECTION.as_str().as_bytes()) {
                let value = field.value.trim_ascii();
                connection = match connection {
                    Connection::Unsaid if value.eq_ignore_ascii_case(b"close") => Connection::Close,
                    Connection::Unsaid if value.eq_ignore_ascii_case(b"keep-alive") => Connection::KeepAlive,
                    _ => return None,
                };
            } else if [CONTENT_LENGTH, TRANSFER_ENCODING, EXPECT, UPGRADE, TE]
                .iter()
                .any(|n| name.eq_ignore_ascii_case(n.as_str().as_bytes()))
            {
                return None;
            }
        }
        (hosts == 1).then_some(OneRead { fields, len, path, query, http10: version == 0, connection })
    }

    pub fn request(&self, tls: bool) -> Request<'_, [httparse::Header<'b>]> {
        Request {
            method: &Method::GET,
            path: self.path,
            query: self.query,
            authority: None,
            headers: &self.fields[..self.len],
            tls,
        }
    }

    pub fn path(&self) -> &'b str {
        self.path
    }

    /// Whether the client keeps the connection, as pingora's session reads it: HTTP/1.1 unless
    /// `close`, HTTP/1.0 only with `keep-alive`.
    pub fn keeps_alive(&self) -> bool {
        match self.connection {
            Connection::Close => false,
            Connection::KeepAlive => true,
            Connection::Unsaid => !self.http10,
        }
    }
}

/// RFC 3986's characters of a path and a query (unreserved, sub-delims, `:`, `@`, `/`, `?`, and
/// `%` of percent-encoding): all of them pass `httparse` and `http::Uri` alike, and none ends or
/// escapes the target (no `#`, no space, no byte pingora would percent-encode).
fn is_target_byte(b: u8) -> bool {
    TARGET_BYTES[usize::from(b)]
}

/// [`is_target_byte`] as a table: the check runs over every byte of every fast-path target.
const TARGET_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let others = b"-._~!$&'()*+,;=:@/?%";
    let mut i = 0;
    while i < others.len() {
        table[others[i] as usize] = true;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &str) -> Option<(String, Option<String>, Connection)> {
        OneRead::parse(head.as_bytes()).map(|r| (r.path.to_string(), r.query.map(str::to_string), r.connection))
    }

    #[test]
    fn a_plain_get_is_parsed_in_place() {
        let (path, query, connection) =
            parse("GET /api/environments/1/insights/5/?refresh=blocking&a=%20 HTTP/1.1\r\nHost: x:8080\r\n\r\n")
                .unwrap();
        assert_eq!(path, "/api/environments/1/insights/5/");
        assert_eq!(query.as_deref(), Some("refresh=blocking&a=%20"));
        assert_eq!(connection, Connection::Unsaid);
        let (_, _, connection) = parse("GET / HTTP/1.0\r\nhost: x\r\nConnection: Keep-Alive\r\n\r\n").unwrap();
        assert_eq!(connection, Connection::KeepAlive);
    }

    #[test]
    fn anything_else_is_left_to_pingora() {
        for head in [
            "POST / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x/y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nConnection: close\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /a|b HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n",
        ] {
            assert!(parse(head).is_none(), "{head:?}");
        }
        let many: String = (0..MAX_FIELDS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert!(parse(&format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n")).is_none());
    }

    /// Pieces of heads: the plain ones the fast path takes and the hostile ones it must leave to
    /// pingora (smuggling shapes, bad authorities, odd bytes, odd line ends).
    const METHODS: &[&str] = &["GET", "GET", "POST", "get", "HEAD", "GET "];
    const VERSIONS: &[&str] = &["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "http/1.1"];
    const TARGETS: &[&str] = &[
        "/api/environments/1/insights/5/",
        "/api/environments/1/insights/?limit=2&offset=0",
        "/a/../b?x=%41",
        "/q?refresh=force_blocking&personal_api_key=k",
        "/a?b=[1]",
        "/a#frag",
        "/a b",
        "http://h/a",
        "*",
        "/caf\u{e9}",
        "/a\"b",
        "/a{b}",
        "//h/a",
    ];
    const FIELDS: &[&str] = &[
        "Host: 127.0.0.1",
        "Host: localhost:8080",
        "host: [::1]:80",
        "Host: a@b",
        "Host: a b",
        "Host: \u{e9}",
        "Host:",
        "Authorization: Bearer k",
        "authorization: Bearer k2",
        "Cookie: sessionid=s; a=b",
        "X-Forwarded-Proto: https",
        "Content-Length: 0",
        "Content-Length: 5",
        "content-length: 5, 5",
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: gzip, chunked",
        "Connection: close",
        "Connection: keep-alive",
        "Connection: Keep-Alive, Upgrade",
        "Upgrade: websocket",
        "Expect: 100-continue",
        "TE: trailers",
        "X-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "X-Tab: a\tb",
        "X-Ctl: a\u{1}b",
        "X-Del: a\u{7f}",
        "X-Obs: caf\u{e9}",
        "Bad Name: x",
        "Name : x",
        " folded",
        ": empty",
    ];

    /// A head from the pools: the first field is always a `Host` from [`FIELDS`]' first seven (or
    /// none), so a good share of generated heads is one the fast path takes.
    fn head(method: usize, target: usize, version: usize, fields: &[usize], lf_only: bool, tail: &str) -> Vec<u8> {
        let eol = if lf_only { "\n" } else { "\r\n" };
        let mut h = format!("{} {} {}{eol}", METHODS[method], TARGETS[target], VERSIONS[version]);
        for &f in fields {
            h.push_str(FIELDS[f]);
            h.push_str(eol);
        }
        h.push_str(eol);
        h.push_str(tail);
        h.into_bytes()
    }

    /// Whatever `OneRead` accepts, pingora's session reads as the same request (method, target,
    /// fields in order, no body), `framing::check` admits, and keeps or closes alike.
    fn agrees_with_pingora(rt: &tokio::runtime::Runtime, bytes: &[u8]) -> Result<(), String> {
        let Some(one) = OneRead::parse(bytes) else { return Ok(()) };
        let mut session =
            pingora::protocols::http::ServerSession::new_http1(Box::new(std::io::Cursor::new(bytes.to_vec())));
        match rt.block_on(session.read_request()) {
            Ok(true) => {}
            other => return Err(format!("pingora refused what the fast path took: {other:?}")),
        }
        let body_empty = session.is_body_empty();
        let keeps = session.get_keepalive().is_some();
        let req = session.req_header();
        let theirs = Request::of(req, false);
        let ours = one.request(false);
        let fields = |r: &[httparse::Header<'_>]| {
            r.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect::<Vec<_>>()
        };
        let pingora_fields: Vec<_> =
            req.headers.iter().map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec())).collect();
        let mut ours_sorted = fields(ours.headers);
        let mut theirs_sorted = pingora_fields;
        // The header map groups by name; order within a name is kept.
        ours_sorted.sort_by(|a, b| a.0.cmp(&b.0));
        theirs_sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let checks = [
            (req.method == Method::GET, "method"),
            (ours.path == theirs.path, "path"),
            (ours.query == theirs.query, "query"),
            (theirs.authority.is_none(), "authority"),
            (ours_sorted == theirs_sorted, "fields"),
            (body_empty, "no body"),
            (super::super::framing::check(req, || None).is_ok(), "framing"),
            (keeps == one.keeps_alive(), "keep-alive"),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, what)) => Err(format!("{what} differs")),
            None => Ok(()),
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().build().unwrap()
    }

    /// Every method, target, version, line end and tail, with each field alone after a plain
    /// `Host` and as the only field.
    #[test]
    fn every_single_piece_agrees_with_pingora() {
        let rt = runtime();
        let mut taken = 0;
        for (m, t, v) in itertools(METHODS.len(), TARGETS.len(), VERSIONS.len()) {
            for f in 0..FIELDS.len() {
                for fields in [&[0, f][..], &[f]] {
                    for lf in [false, true] {
                        for tail in TAILS {
                            let bytes = head(m, t, v, fields, lf, tail);
                            taken += usize::from(OneRead::parse(&bytes).is_some());
                            if let Err(e) = agrees_with_pingora(&rt, &bytes) {
                                panic!("{e}: {}", bytes.escape_ascii());
                            }
                        }
                    }
                }
            }
        }
        assert!(taken > 500, "the fast path took only {taken} heads");
    }

    /// Several fields together, drawn from the pools.
    #[test]
    fn combined_fields_agree_with_pingora() {
        use proptest::prelude::*;
        let rt = runtime();
        let heads = (
            prop_oneof![8 => Just(0usize), 1 => 0..METHODS.len()],
            0..TARGETS.len(),
            prop_oneof![4 => Just(0usize), 1 => 0..VERSIONS.len()],
            proptest::collection::vec(prop_oneof![3 => 0..3usize, 4 => 7..17usize, 2 => 0..FIELDS.len()], 0..6),
            any::<bool>(),
            prop_oneof![8 => Just(0usize), 1 => 0..TAILS.len()],
        );
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(4000));
        runner
            .run(&heads, |(m, t, v, f, lf, tail)| {
                let bytes = head(m, t, v, &f, lf, TAILS[tail]);
                agrees_with_pingora(&rt, &bytes)
                    .map_err(|e| TestCaseError::fail(format!("{e}: {}", bytes.escape_ascii())))
            })
            .unwrap();
    }

    const TAILS: [&str; 3] = ["", "GET / HTTP/1.1\r\nHost: x\r\n\r\n", "x"];

    fn itertools(a: usize, b: usize, c: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        (0..a).flat_map(move |i| (0..b).flat_map(move |j| (0..c).map(move |k| (i, j, k))))
    }

    #[test]
    fn plain_heads_are_taken() {
        // So the properties above are not vacuous: the common shapes reach the fast path.
        let rt = runtime();
        for fields in [&[0, 7][..], &[1, 9, 10], &[2, 16], &[0, 17, 22, 23, 26]] {
            let bytes = head(0, 0, 0, fields, false, "");
            assert!(OneRead::parse(&bytes).is_some(), "{}", bytes.escape_ascii());
            agrees_with_pingora(&rt, &bytes).unwrap();
        }
    }
}
