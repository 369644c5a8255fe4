//! HTTP/2 downstream with a real `h2` client, h2c with prior knowledge on the cleartext listener:
//! the proxy's own answers, refresh modes, single flight over many streams of one connection,
//! pass-through with bodies, the 413/431 limits, revocation, the per-connection stream bound, and
//! streams the client resets.

mod common;
mod edge;

use std::time::Duration;

use common::*;
use edge::*;
use serde_json::Value;

fn auth(token: &str) -> String {
    format!("Bearer {token}")
}

/// The sum of `insights_proxy_in_flight` over its kinds.
fn in_flight(h: &Harness) -> f64 {
    let text = h.admin("GET", "/metrics", false).text();
    text.lines()
        .filter(|l| l.starts_with("insights_proxy_in_flight{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn own_answers_over_h2c_carry_the_same_fields_and_no_connection_header() {
    let h = Harness::start();
    let (id, url) = h.day_insight();
    runtime().block_on(async {
        let c = h2c_connect(h.proxy_port).await;
        let miss = h2_get(&c, &format!("{url}?refresh=blocking"), ALL).await;
        assert_eq!(miss.status, 200, "{:?}", miss.body);
        assert!(miss.cache_status().contains("fwd=miss"), "{}", miss.cache_status());
        let hit = h2_get(&c, &url, ALL).await;
        assert_eq!(hit.status, 200);
        assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
        assert_eq!(hit.header("content-length").and_then(|l| l.parse().ok()), Some(hit.body.len()));
        assert_eq!(hit.header("vary"), Some("Authorization, Cookie"));
        assert_eq!(hit.header("content-type"), Some("application/json"));
        assert!(hit.header("date").is_some());
        for hop in ["connection", "keep-alive", "transfer-encoding"] {
            assert!(hit.header(hop).is_none(), "{hop} on h2: {:?}", hit.headers);
        }
        assert_eq!(hit.json()["id"].as_u64(), Some(id));
        // The same answer as over HTTP/1.1.
        let h1 = h.get(&url, ALL);
        assert_eq!(h1.json()["result"], hit.json()["result"]);
        // A refusal of the proxy's own (a bad query string) and a pass-through, on the same
        // connection.
        let refused = h2_get(&c, &format!("{url}?a=%zz"), ALL).await;
        assert_eq!(refused.status, 400);
        let projects = h2_get(&c, "/api/projects/", ALL).await;
        assert_eq!(projects.status, 200);
        assert_eq!(projects.header("cache-status"), Some("insights-proxy; fwd=bypass"));
    });
}

#[test]
fn many_concurrent_streams_of_one_connection_share_one_calculation() {
    let h = Harness::with(|_, sim| sim.calc_delay = Duration::from_millis(300));
    let (id, url) = h.day_insight();
    let before = h.sim.calculations(1, id);
    let answers = runtime().block_on(async {
        let c = h2c_connect(h.proxy_port).await;
        let path = format!("{url}?refresh=blocking");
        let streams: Vec<_> = (0..40).map(|_| h2_get(&c, &path, ALL)).collect();
        futures_util::future::join_all(streams).await
    });
    assert_eq!(answers.len(), 40);
    let first = answers[0].json();
    for a in &answers {
        assert_eq!(a.status, 200, "{:?}", a.body);
        assert_eq!(a.json()["last_refresh"], first["last_refresh"], "one result for all");
    }
    assert_eq!(h.sim.calculations(1, id) - before, 1, "one upstream calculation for 40 streams");
}

#[test]
fn refresh_modes_over_h2() {
    let h = Harness::start();
    let (id, url) = h.day_insight();
    let calcs = || h.sim.calculations(1, id);
    runtime().block_on(async {
        let c = h2c_connect(h.proxy_port).await;
        let cold = h2_get(&c, &format!("{url}?refresh=force_cache"), ALL).await;
        assert!(cold.json()["result"].is_null(), "force_cache never calculates: {:?}", cold.body);
        assert_eq!(calcs(), 0);
        let blocking = h2_get(&c, &format!("{url}?refresh=blocking"), ALL).await;
        assert_eq!(blocking.status, 200);
        assert_eq!(calcs(), 1);
        let cached = h2_get(&c, &format!("{url}?refresh=force_cache"), ALL).await;
        assert!(cached.cache_status().contains("hit"), "{}", cached.cache_status());
        let forced = h2_get(&c, &format!("{url}?refresh=force_blocking"), ALL).await;
        assert!(forced.cache_status().contains("fwd=request"), "{}", forced.cache_status());
        assert_eq!(calcs(), 2);
        let queued = h2_get(&c, &format!("{url}?refresh=force_async"), ALL).await;
        let status: Value = queued.json()["query_status"].clone();
        let status_id = status["id"].as_str().expect("a query status").to_string();
        let poll = format!("/api/environments/1/query/{status_id}/");
        let mut done = Value::Null;
        for _ in 0..3000 {
            let r = h2_get(&c, &poll, ALL).await;
            assert!(r.status == 200 || r.status == 202, "{}: {:?}", r.status, r.body);
            if r.status == 200 {
                done = r.json();
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(done["query_status"]["complete"], true, "{done}");
        assert_eq!(calcs(), 3);
        // Another principal's poll of that status is not answered with it.
        let other = h2_get(&c, &poll, P2).await;
        assert_ne!(other.status, 200, "{:?}", other.body);
    });
}

#[test]
fn pass_through_with_bodies_and_the_limits_over_h2() {
    let h = Harness::with(|c, _| c.max_body_bytes = 1024);
    let (_, url) = h.day_insight();
    let bearer = auth(ALL);
    runtime().block_on(async {
        let c = h2c_connect(h.proxy_port).await;
        assert_eq!(h2_get(&c, &format!("{url}?refresh=blocking"), ALL).await.status, 200);
        let body = br#"{"description":"over h2"}"#;
        let json = [("authorization", bearer.as_str()), ("content-type", "application/json")];
        let patched = h2_request(&c, "PATCH", &url, &json, Some(body)).await.unwrap();
        assert_eq!(patched.status, 200, "{:?}", patched.body);
        assert_eq!(patched.json()["description"], "over h2");
        let after = h2_get(&c, &url, ALL).await;
        assert!(!after.cache_status().contains("; hit"), "the write purged the entry: {}", after.cache_status());
        assert_eq!(after.json()["description"], "over h2");

        // A GET with a JSON body is read by the proxy on h2 too.
        let with_body = h2_request(&c, "GET", &url, &json, Some(br#"{"refresh":"force_cache"}"#)).await.unwrap();
        assert!(with_body.cache_status().contains("hit"), "{}", with_body.cache_status());

        // 413: declared, and undeclared (counted as it passes).
        let big = vec![b' '; 4096];
        let len = big.len().to_string();
        let declared = [("authorization", bearer.as_str()), ("content-length", len.as_str())];
        let r = h2_request(&c, "PATCH", &url, &declared, Some(&big)).await.unwrap();
        assert_eq!(r.status, 413, "{:?}", r.body);
        let r = h2_request(&c, "PATCH", &url, &[("authorization", bearer.as_str())], Some(&big)).await;
        assert_eq!(r.map(|r| r.status).unwrap_or(413), 413);

        // 431: too many header fields.
        let many: Vec<(String, String)> = (0..101).map(|i| (format!("x-h{i}"), "v".to_string())).collect();
        let mut headers: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        headers.push(("authorization", bearer.as_str()));
        let r = h2_request(&c, "GET", &url, &headers, None).await.unwrap();
        assert_eq!(r.status, 431, "{:?}", r.body);
    });
    // A refused stream does not take the connection's other streams with it.
    runtime().block_on(async {
        let c = h2c_connect(h.proxy_port).await;
        let big = vec![b' '; 4096];
        let bearer = auth(ALL);
        let _ = h2_request(&c, "PATCH", &url, &[("authorization", bearer.as_str())], Some(&big)).await;
        assert_eq!(h2_get(&c, &url, ALL).await.status, 200);
    });
}

#[test]
fn a_revoked_key_gets_no_cached_data_over_h2() {
    let h = Harness::with(|c, _| c.revalidate_after = Duration::from_secs(60));
    let key = "phx_h2_revoked";
    h.sim.set_project_access(key, 1, true);
    let (_, url) = h.day_insight();
    runtime().block_on(async {
        let c = h2c_connect(h.proxy_port).await;
        assert_eq!(h2_get(&c, &format!("{url}?refresh=blocking"), key).await.status, 200);
        assert!(h2_get(&c, &url, key).await.cache_status().contains("hit"));
        h.sim.revoke_token(key);
        h.clock.advance(Duration::from_secs(61));
        let r = h2_get(&c, &url, key).await;
        assert_eq!(r.status, 401, "{:?}", r.body);
        assert!(r.json().get("result").is_none(), "no cached data in a refusal: {:?}", r.body);
    });
}

#[test]
fn a_connection_gets_at_most_the_configured_streams_at_once() {
    let h = Harness::with(|c, sim| {
        c.h2_max_concurrent_streams = 4;
        sim.calc_delay = Duration::from_millis(50);
    });
    let (_, url) = h.day_insight();
    runtime().block_on(async {
        let c = h2c_connect(h.proxy_port).await;
        // The server's SETTINGS arrive with the first answer.
        assert_eq!(h2_get(&c, &format!("{url}?refresh=blocking"), ALL).await.status, 200);
        assert_eq!(c.current_max_send_streams(), 4);
        // More requests than that still complete: the client waits for a free stream.
        let path = format!("{url}?refresh=force_blocking");
        let all = futures_util::future::join_all((0..12).map(|_| h2_get(&c, &path, ALL))).await;
        assert!(all.iter().all(|r| r.status == 200));
    });
}

#[test]
fn streams_the_client_resets_leave_no_work_behind() {
    let h = Harness::with(|_, sim| sim.calc_delay = Duration::from_millis(300));
    let (id, url) = h.day_insight();
    let before = h.sim.calculations(1, id);
    let rt = runtime();
    rt.block_on(async {
        let c = h2c_connect(h.proxy_port).await;
        let path = format!("http://localhost{url}?refresh=blocking");
        let mut sent = Vec::new();
        for _ in 0..20 {
            let mut send = c.clone().ready().await.unwrap();
            let req = http::Request::get(&path).header("authorization", auth(ALL)).body(()).unwrap();
            sent.push(send.send_request(req, true).unwrap());
        }
        // Every stream is reset before its answer.
        for (resp, mut stream) in sent {
            stream.send_reset(h2::Reason::CANCEL);
            drop(resp);
        }
        // The connection still serves new streams.
        let projects = h2_get(&c, "/api/projects/", ALL).await;
        assert_eq!(projects.status, 200);
    });
    // The calculation the streams started finishes once and lands in the cache; nothing stays
    // in flight.
    eventually("the calculation lands", || h.sim.calculations(1, id) - before == 1);
    eventually("nothing in flight", || in_flight(&h) == 0.0);
    let hit = h.get(&url, ALL);
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert_eq!(h.sim.calculations(1, id) - before, 1, "reset streams did not start more calculations");
}

/// An answer's fields as (lowercase name, value), without those that differ by design between
/// HTTP/1.1 and HTTP/2 (hop-by-hop) or from one second to the next (`date`).
fn end_to_end(fields: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut fields: Vec<_> = fields
        .filter(|(k, _)| !["connection", "keep-alive", "transfer-encoding", "date"].contains(&k.as_str()))
        .collect();
    fields.sort();
    fields
}

#[test]
fn own_answers_over_h2_equal_the_http1_answers_apart_from_hop_by_hop_fields() {
    let h = Harness::start();
    let (_, url) = h.day_insight();
    assert_eq!(h.get(&format!("{url}?refresh=blocking"), ALL).status, 200);
    // A hit, a refusal of the proxy's own (a bad query string), and the upstream's refusal of an
    // unknown token (one token each: a second request would meet the refusal remembered).
    let cases =
        [(url.clone(), ALL, ALL), (format!("{url}?a=%zz"), ALL, ALL), (url.clone(), "phx_nobody_1", "phx_nobody_2")];
    runtime().block_on(async {
        let c = h2c_connect(h.proxy_port).await;
        for (path, h1_token, h2_token) in &cases {
            let h1 = h.get(path, h1_token);
            let h2 = h2_get(&c, path, h2_token).await;
            assert_eq!(h2.status, h1.status, "{path}");
            assert_eq!(&h2.body[..], &h1.body[..], "{path}");
            let h2_fields = h2.headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()));
            assert_eq!(end_to_end(h2_fields), end_to_end(h1.headers.clone().into_iter()), "{path}");
            assert!(h2.header("date").is_some() && h1.header("date").is_some(), "{path}");
        }
    });
}

/// HTTP/2 by hand, for a client that opens more streams than the server allows (the `h2` client
/// never does): frames, and header blocks as HPACK literals without indexing or Huffman coding.
mod raw_h2 {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const END_STREAM: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;
    const ACK: u8 = 0x1;

    pub struct Frame {
        pub kind: u8,
        pub flags: u8,
        pub stream: u32,
        pub payload: Vec<u8>,
    }

    pub struct Conn(TcpStream);

    impl Conn {
        /// The preface and an empty SETTINGS; the server's SETTINGS read and acknowledged.
        pub fn open(port: u16) -> Conn {
            let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut c = Conn(s);
            c.0.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
            c.send(SETTINGS, 0, 0, &[]);
            loop {
                let f = c.frame().expect("the server's SETTINGS");
                if f.kind == SETTINGS && f.flags & ACK == 0 {
                    break;
                }
            }
            c.send(SETTINGS, ACK, 0, &[]);
            c
        }

        fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
            let len = (payload.len() as u32).to_be_bytes();
            let mut f = vec![len[1], len[2], len[3], kind, flags];
            f.extend_from_slice(&stream.to_be_bytes());
            f.extend_from_slice(payload);
            self.0.write_all(&f).unwrap();
        }

        /// A GET without a body on `stream`.
        pub fn get(&mut self, stream: u32, path: &str, authorization: &str) {
            let mut block = Vec::new();
            for (k, v) in [
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", "localhost"),
                (":path", path),
                ("authorization", authorization),
            ] {
                block.push(0); // literal without indexing, new name
                for s in [k, v] {
                    assert!(s.len() < 127);
                    block.push(s.len() as u8);
                    block.extend_from_slice(s.as_bytes());
                }
            }
            self.send(HEADERS, END_HEADERS | END_STREAM, stream, &block);
        }

        /// The next frame; `None` when the connection ends.
        pub fn frame(&mut self) -> Option<Frame> {
            let mut head = [0u8; 9];
            self.0.read_exact(&mut head).ok()?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0; len];
            self.0.read_exact(&mut payload).ok()?;
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            Some(Frame { kind: head[3], flags: head[4], stream, payload })
        }
    }
}

#[test]
fn streams_past_the_configured_bound_are_refused_and_the_others_answered() {
    let h = Harness::with(|c, sim| {
        c.h2_max_concurrent_streams = 4;
        sim.calc_delay = Duration::from_millis(300);
    });
    let (_, url) = h.day_insight();
    let mut c = raw_h2::Conn::open(h.proxy_port);
    // Six streams at once; the first four wait on one calculation while the last two arrive.
    let path = format!("{url}?refresh=blocking");
    let streams = [1, 3, 5, 7, 9, 11];
    for s in streams {
        c.get(s, &path, &auth(ALL));
    }
    let (mut answered, mut refused) = (Vec::new(), Vec::new());
    while answered.len() + refused.len() < streams.len() {
        let f = c.frame().expect("a frame for every stream");
        match f.kind {
            raw_h2::RST_STREAM => {
                let code = u32::from_be_bytes(f.payload[..4].try_into().unwrap());
                assert_eq!(code, 0x7, "REFUSED_STREAM for stream {}", f.stream);
                refused.push(f.stream);
            }
            // The answer's last frame (HEADERS, or DATA after them).
            _ if f.flags & raw_h2::END_STREAM != 0 && f.stream != 0 => answered.push(f.stream),
            _ => {}
        }
    }
    answered.sort();
    assert_eq!(answered, [1, 3, 5, 7]);
    assert_eq!(refused, [9, 11]);
    // The connection goes on: a new stream is answered.
    c.get(13, &url, &auth(ALL));
    loop {
        let f = c.frame().expect("an answer on stream 13");
        if f.stream == 13 && f.flags & raw_h2::END_STREAM != 0 {
            break;
        }
    }
}

#[test]
fn on_shutdown_a_connection_gets_goaway_and_its_stream_in_flight_its_answer() {
    let mut h = Harness::with(|c, sim| {
        // The runtime outlives the signal by this much: time for the answer in flight.
        c.grace_period = Duration::from_secs(2);
        sim.calc_delay = Duration::from_millis(500);
    });
    let (_, url) = h.day_insight();
    // The client's connection is driven while the proxy stops.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let c = rt.block_on(h2c_connect(h.proxy_port));
    let path = format!("{url}?refresh=blocking");
    let answer = rt.spawn({
        let c = c.clone();
        async move { h2_get(&c, &path, ALL).await }
    });
    eventually("the stream is in flight", || in_flight(&h) > 0.0);
    std::thread::scope(|s| {
        s.spawn(|| h.stop_proxy(true));
        let answer = rt.block_on(answer).unwrap();
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        // After GOAWAY the connection takes no new stream.
        let bearer = auth(ALL);
        let headers = [("authorization", bearer.as_str())];
        let after = rt.block_on(async {
            let request = h2_request(&c, "GET", &url, &headers, None);
            tokio::time::timeout(Duration::from_secs(20), request).await
        });
        let refused = matches!(&after, Ok(Err(e)) if e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR));
        assert!(refused, "a new stream after GOAWAY: {:?}", after.map(|r| r.map(|r| r.status)));
    });
}
