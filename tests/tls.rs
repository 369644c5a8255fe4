//! TLS on the listener: a verifying client gets the proxy's answers over TLS; a new certificate
//! (files replaced, or SIGHUP) reaches new connections while established ones keep working; bad
//! certificates stop the start (or a reload) clearly; plain HTTP and HTTP/2 cleartext on the TLS
//! port are refused without harm.
#![cfg(feature = "tls")]

mod common;
mod edge;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use edge::*;
use insights_proxy::clock::Clock;
use insights_proxy::config::{Config, TlsConfig, TlsVersion};
use insights_proxy::server::{self, StartError};
use insights_proxy::tls::{Reload, Tls, TlsError};
use posthog_sim::serve::free_port;
use posthog_sim::testing::Running;
use posthog_sim::{SimConfig, Simulator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const INSIGHT: &str = "/api/environments/1/insights/1/";

struct Proxy {
    port: u16,
    pki: Pki,
    dir: TempDir,
    tls: Arc<Tls>,
    _proxy: Running,
    _backend: Running,
}

impl Proxy {
    fn cert(&self) -> PathBuf {
        self.dir.path("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.path("key.pem")
    }
}

fn tls_config(dir: &TempDir, reload_check: Duration) -> TlsConfig {
    TlsConfig {
        cert_path: dir.path("cert.pem"),
        key_path: dir.path("key.pem"),
        min_version: TlsVersion::V1_2,
        reload_check,
    }
}

/// The simulated backend and the proxy with TLS on its listener, serving `first`.
fn start(reload_check: Duration, tweak: impl FnOnce(&mut Config)) -> (Proxy, Leaf) {
    let pki = Pki::new();
    let dir = TempDir::new("tls");
    let first = pki.leaf("first", false);
    install(&first, &dir.path("cert.pem"), &dir.path("key.pem"));
    let sim = Simulator::new(SimConfig { calc_delay: Duration::from_millis(20), ..SimConfig::default() }, Clock::new());
    let (sim_port, port) = (free_port(), free_port());
    let backend = start_backend(&sim, sim_port);
    let mut config = test_config(port, sim_port);
    config.admin_listen = None;
    config.tls = Some(tls_config(&dir, reload_check));
    tweak(&mut config);
    let built = server::build(config, Clock::new()).expect("the proxy builds");
    let tls = built.tls.clone().expect("TLS is on");
    let proxy = Running::start(built.server);
    wait_for_port(port);
    (Proxy { port, pki, dir, tls, _proxy: proxy, _backend: backend }, first)
}

#[test]
fn a_verifying_client_gets_answers_over_tls() {
    let (p, first) = start(Duration::from_secs(3600), |_| {});
    let ca = p.pki.ca_der();
    runtime().block_on(async {
        let mut s = tls_connect(p.port, &ca, &[b"http/1.1"]).await.expect("the chain verifies against the CA");
        assert_eq!(served_cert(&s), first.der);
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let miss = h1_get(&mut s, &format!("{INSIGHT}?refresh=blocking"), ALL).await.unwrap();
        assert_eq!(miss.status, 200, "{}", miss.text());
        let hit = h1_get(&mut s, INSIGHT, ALL).await.unwrap();
        assert_eq!(hit.status, 200);
        assert!(hit.header("cache-status").unwrap_or("").contains("hit"), "{:?}", hit.headers);
        assert_eq!(hit.header("connection"), Some("keep-alive"));
        // Links the proxy writes point back at it over https.
        let list = h1_get(&mut s, "/api/environments/1/insights/?limit=1", ALL).await.unwrap();
        assert_eq!(list.status, 200, "{}", list.text());
        let next: serde_json::Value = serde_json::from_slice(&list.body).unwrap();
        let next = next["next"].as_str().unwrap_or_default().to_string();
        assert!(next.starts_with("https://localhost/"), "{next}");
        // A client without ALPN speaks HTTP/1.1 too.
        let mut plain = tls_connect(p.port, &ca, &[]).await.unwrap();
        assert_eq!(h1_get(&mut plain, INSIGHT, ALL).await.unwrap().status, 200);
    });
}

#[test]
fn a_replaced_certificate_reaches_new_connections_and_established_ones_keep_working() {
    let (p, first) = start(Duration::from_millis(50), |_| {});
    let ca = p.pki.ca_der();
    let rt = runtime();
    let mut old = rt.block_on(tls_connect(p.port, &ca, &[b"http/1.1"])).unwrap();
    assert_eq!(rt.block_on(h1_get(&mut old, INSIGHT, ALL)).unwrap().status, 200);

    let second = p.pki.leaf("second", false);
    install(&second, &p.cert(), &p.key());
    eventually("new connections get the new certificate", || {
        let s = rt.block_on(tls_connect(p.port, &ca, &[b"http/1.1"])).unwrap();
        served_cert(&s) == second.der
    });
    assert_eq!(served_cert(&old), first.der);
    let again = rt.block_on(h1_get(&mut old, INSIGHT, ALL)).expect("the established connection still answers");
    assert_eq!(again.status, 200);
}

#[test]
fn sighup_reloads_the_certificate() {
    let (p, _) = start(Duration::from_secs(3600), |_| {});
    let ca = p.pki.ca_der();
    eventually("the reload watcher handles SIGHUP", || p.tls.reloads_on_sighup());
    let second = p.pki.leaf("after-sighup", false);
    install(&second, &p.cert(), &p.key());
    let rt = runtime();
    // The files are looked at once an hour here: only the signal can bring the new certificate.
    let s = rt.block_on(tls_connect(p.port, &ca, &[])).unwrap();
    assert_ne!(served_cert(&s), second.der);
    let hup = std::process::Command::new("kill").args(["-HUP", &std::process::id().to_string()]).status().unwrap();
    assert!(hup.success());
    eventually("SIGHUP reloaded the certificate", || {
        let s = rt.block_on(tls_connect(p.port, &ca, &[])).unwrap();
        served_cert(&s) == second.der
    });
}

#[test]
fn a_bad_new_certificate_is_refused_and_the_old_one_kept() {
    let (p, first) = start(Duration::from_secs(3600), |_| {});
    let ca = p.pki.ca_der();
    let rt = runtime();
    // A key of another certificate.
    let other = p.pki.leaf("other", false);
    std::fs::write(p.key(), &other.key_pem).unwrap();
    assert!(matches!(p.tls.reload(), Reload::KeptOld(TlsError::KeyMismatch { .. })));
    // Not PEM at all.
    std::fs::write(p.cert(), "not a certificate").unwrap();
    assert!(matches!(p.tls.reload(), Reload::KeptOld(TlsError::NoCertificate { .. })));
    // Gone.
    std::fs::remove_file(p.cert()).unwrap();
    assert!(matches!(p.tls.reload(), Reload::KeptOld(TlsError::Read { .. })));
    let mut s = rt.block_on(tls_connect(p.port, &ca, &[])).unwrap();
    assert_eq!(served_cert(&s), first.der, "the old certificate is still served");
    assert_eq!(rt.block_on(h1_get(&mut s, INSIGHT, ALL)).unwrap().status, 200);
    // Fixed: the next reload takes it.
    install(&other, &p.cert(), &p.key());
    assert!(matches!(p.tls.reload(), Reload::Replaced));
    let s = rt.block_on(tls_connect(p.port, &ca, &[])).unwrap();
    assert_eq!(served_cert(&s), other.der);
}

#[test]
fn plain_http_and_h2_cleartext_on_the_tls_port_are_refused_and_the_port_keeps_serving() {
    let (p, _) = start(Duration::from_secs(3600), |_| {});
    let ca = p.pki.ca_der();
    runtime().block_on(async {
        let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
        let r = h1_get(&mut plain, INSIGHT, ALL).await.expect("an answer in plain HTTP");
        assert_eq!(r.status, 400);
        assert!(r.text().contains("TLS port"), "{}", r.text());
        assert_eq!(r.header("connection"), Some("close"));

        let mut h2c = tokio::net::TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
        h2c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(20), h2c.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0, "an h2 preface on the TLS port is closed unanswered");

        let mut s = tls_connect(p.port, &ca, &[]).await.unwrap();
        assert_eq!(h1_get(&mut s, INSIGHT, ALL).await.unwrap().status, 200);
    });
}

#[test]
fn a_tls_client_on_the_cleartext_port_fails_its_handshake_and_nothing_else() {
    let h = Harness::start();
    let pki = Pki::new();
    runtime().block_on(async {
        assert!(tls_connect(h.proxy_port, &pki.ca_der(), &[]).await.is_err());
    });
    assert_eq!(h.get(INSIGHT, ALL).status, 200, "the cleartext port still serves");
}

#[test]
fn tls_13_only_refuses_a_tls_12_client() {
    let (p, _) = start(Duration::from_secs(3600), |c| {
        c.tls.as_mut().unwrap().min_version = TlsVersion::V1_3;
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(p.pki.ca_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let connect = |versions: &[&'static rustls::SupportedProtocolVersion]| {
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
            connector.connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp).await
        }
    };
    let rt = runtime();
    assert!(rt.block_on(connect(&[&rustls::version::TLS12])).is_err(), "TLS 1.2 is refused");
    let s = rt.block_on(connect(&[&rustls::version::TLS13])).expect("TLS 1.3 is accepted");
    assert_eq!(s.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
}

/// Start-up errors: each stops `build` with a typed error naming the file, before anything listens.
#[test]
fn a_certificate_that_cannot_be_served_stops_the_start() {
    let pki = Pki::new();
    let dir = TempDir::new("tls-start");
    let build = |dir: &TempDir| {
        let mut config = test_config(free_port(), free_port());
        config.admin_listen = None;
        config.tls = Some(tls_config(dir, Duration::from_secs(5)));
        server::build(config, Clock::new()).map(|_| ())
    };
    let tls_error = |r: Result<(), StartError>| match r {
        Err(StartError::Tls(e)) => e,
        other => panic!("expected a TLS start error, got {:?}", other.err()),
    };
    assert!(matches!(tls_error(build(&dir)), TlsError::Read { .. }), "missing files");
    let a = pki.leaf("a", false);
    let b = pki.leaf("b", false);
    std::fs::write(dir.path("cert.pem"), &a.cert_pem).unwrap();
    std::fs::write(dir.path("key.pem"), &b.key_pem).unwrap();
    let mismatch = tls_error(build(&dir));
    assert!(matches!(mismatch, TlsError::KeyMismatch { .. }), "{mismatch}");
    assert!(mismatch.to_string().contains("key.pem"), "{mismatch}");
    std::fs::write(dir.path("key.pem"), "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n")
        .unwrap();
    let e = tls_error(build(&dir));
    assert!(matches!(e, TlsError::Pem { .. } | TlsError::NoKey { .. }), "{e}");
    std::fs::write(dir.path("key.pem"), &a.cert_pem).unwrap();
    assert!(matches!(tls_error(build(&dir)), TlsError::NoKey { .. }));
    // Expired: served (clients decide), reported as such.
    let old = pki.leaf("old", true);
    install(&old, &dir.path("cert.pem"), &dir.path("key.pem"));
    let loaded =
        insights_proxy::tls::load(&tls_config(&dir, Duration::from_secs(5))).expect("an expired certificate loads");
    assert!(loaded.expiry_warning().is_some_and(|w| w.contains("expired")));
    assert!(build(&dir).is_ok());
}

/// `--check-config` reads the files too: an error exits 2 naming the file, an expired certificate
/// is a warning.
#[test]
fn check_config_validates_the_certificate_files() {
    let pki = Pki::new();
    let dir = TempDir::new("tls-check");
    let file = dir.path("proxy.toml");
    let cert = dir.path("cert.pem");
    let key = dir.path("key.pem");
    std::fs::write(
        &file,
        format!(
            "[server.tls]\ncert_path = {:?}\nkey_path = {:?}\nmin_version = \"1.3\"\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    )
    .unwrap();
    let check = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_insights-proxy"))
            .args(["--check-config", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = check();
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cert.pem"), "{err}");
    install(&pki.leaf("ok", false), &cert, &key);
    let (code, err) = check();
    assert_eq!(code, Some(0), "{err}");
    install(&pki.leaf("old", true), &cert, &key);
    let (code, err) = check();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("warning") && err.contains("expired"), "{err}");
    std::fs::write(&file, "[server.tls]\ncert_path = \"a\"\nkey_path = \"b\"\nmin_version = \"1.1\"\n").unwrap();
    let (code, err) = check();
    assert_eq!(code, Some(2));
    assert!(err.contains("server.tls.min_version"), "{err}");
}

#[test]
fn h2_is_negotiated_by_alpn_and_serves_the_same_answers() {
    let (p, _) = start(Duration::from_secs(3600), |_| {});
    let ca = p.pki.ca_der();
    runtime().block_on(async {
        let s = tls_connect(p.port, &ca, &[b"h2", b"http/1.1"]).await.unwrap();
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let c = h2_handshake(s).await;
        let miss = h2_get(&c, &format!("{INSIGHT}?refresh=blocking"), ALL).await;
        assert_eq!(miss.status, 200, "{:?}", miss.body);
        let hits = futures_util::future::join_all((0..8).map(|_| h2_get(&c, INSIGHT, ALL))).await;
        for hit in hits {
            assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
            assert!(hit.header("connection").is_none());
        }
    });
}
