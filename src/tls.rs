//! TLS on the listener. The certificate chain and key of `[server.tls]` are checked when they are
//! loaded (readable PEM, a key that matches the certificate; an expired certificate is only a
//! warning) and served through pingora's rustls acceptor with ALPN `h2` and `http/1.1`.
//!
//! The proxy builds the rustls `ServerConfig` itself and runs the handshake in its listening app
//! ([`accept`]) rather than giving pingora's listener a `TlsSettings`: pingora 0.9.1's
//! `TlsSettings::build` always allows TLS 1.2 (no minimum version) and panics on a bad file.
//! A reload ([`Tls::reload`], on SIGHUP or when the files change, see [`Watch`]) swaps the
//! `Arc<ServerConfig>` new connections take; established connections keep the one they were
//! accepted with. A new certificate that does not load is logged and the old one kept.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, Stream};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{TlsConfig, TlsVersion};
use crate::error::ApiError;

/// pingora's bound on a listener's handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// The first byte of a TLS record carrying a handshake (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

/// Why a certificate or key cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: not valid PEM: {source}", path.display())]
    Pem { path: PathBuf, source: std::io::Error },
    #[error("{}: no PEM certificate in it", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no PEM private key in it", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: the certificate cannot be parsed: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{} does not belong to the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{} with {}: {reason}", cert.display(), key.display())]
    Refused { cert: PathBuf, key: PathBuf, reason: String },
}

/// A certificate and key, loaded and checked.
pub struct Loaded {
    config: Arc<ServerConfig>,
    /// The end-entity certificate's subject, for logs.
    pub subject: String,
    pub not_after: OffsetDateTime,
}

impl Loaded {
    pub fn is_expired(&self) -> bool {
        self.not_after < OffsetDateTime::now_utc()
    }

    /// A warning for `--check-config` and the log, when the certificate is past its end date
    /// (it is served anyway: clients decide).
    pub fn expiry_warning(&self) -> Option<String> {
        self.is_expired().then(|| format!("the certificate ({}) expired at {}", self.subject, self.not_after))
    }
}

/// Reads and checks `settings`' files and builds the rustls configuration new connections use.
pub fn load(settings: &TlsConfig) -> Result<Loaded, TlsError> {
    let (cert_path, key_path) = (&settings.cert_path, &settings.key_path);
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Pem { path: cert_path.clone(), source })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate { path: cert_path.clone() });
    };
    let (subject, not_after) =
        validity(leaf).map_err(|reason| TlsError::BadCertificate { path: cert_path.clone(), reason })?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|source| TlsError::Pem { path: key_path.clone(), source })?
        .ok_or_else(|| TlsError::NoKey { path: key_path.clone() })?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = match settings.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let refused = |reason: String| TlsError::Refused { cert: cert_path.clone(), key: key_path.clone(), reason };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| refused(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                TlsError::KeyMismatch { cert: cert_path.clone(), key: key_path.clone() }
            }
            e => refused(e.to_string()),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Loaded { config: Arc::new(config), subject, not_after })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

fn validity(der: &CertificateDer<'_>) -> Result<(String, OffsetDateTime), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| e.to_string())?;
    let not_after = cert.validity().not_after.to_datetime();
    Ok((cert.subject().to_string(), not_after))
}

/// The files' modification times and lengths: a change to either is a new certificate to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    cert: Option<(SystemTime, u64)>,
    key: Option<(SystemTime, u64)>,
}

impl Stamp {
    fn of(settings: &TlsConfig) -> Stamp {
        let stamp = |p: &Path| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
        Stamp { cert: stamp(&settings.cert_path), key: stamp(&settings.key_path) }
    }
}

/// What a reload did.
#[derive(Debug)]
pub enum Reload {
    /// New connections get the new certificate.
    Replaced,
    /// The new files did not load: the old certificate is still served.
    KeptOld(TlsError),
}

/// The listener's current certificate, swapped by reloads.
pub struct Tls {
    settings: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    /// The files as last loaded (or last tried): the watcher reloads when they change.
    seen: Mutex<Stamp>,
    /// Set once SIGHUP reloads (before that, SIGHUP's default action would end the process).
    sighup: AtomicBool,
}

impl Tls {
    /// Loads the certificate; an expired one is served with a warning.
    pub fn new(settings: TlsConfig) -> Result<Arc<Tls>, TlsError> {
        let stamp = Stamp::of(&settings);
        let loaded = load(&settings)?;
        if let Some(w) = loaded.expiry_warning() {
            tracing::warn!(cert = %settings.cert_path.display(), "{w}");
        }
        Ok(Arc::new(Tls {
            settings,
            current: RwLock::new(loaded.config),
            seen: Mutex::new(stamp),
            sighup: AtomicBool::new(false),
        }))
    }

    /// Loads the files again; on failure the current certificate stays.
    pub fn reload(&self) -> Reload {
        *self.seen.lock() = Stamp::of(&self.settings);
        match load(&self.settings) {
            Ok(loaded) => {
                if let Some(w) = loaded.expiry_warning() {
                    tracing::warn!(cert = %self.settings.cert_path.display(), "reloaded, but {w}");
                }
                tracing::info!(subject = %loaded.subject, not_after = %loaded.not_after, "TLS certificate reloaded");
                *self.current.write() = loaded.config;
                Reload::Replaced
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS certificate not reloaded, the previous one is still served");
                Reload::KeptOld(e)
            }
        }
    }

    /// Whether SIGHUP reloads yet (the watcher is running).
    pub fn reloads_on_sighup(&self) -> bool {
        self.sighup.load(Ordering::Acquire)
    }

    fn files_changed(&self) -> bool {
        Stamp::of(&self.settings) != *self.seen.lock()
    }

    fn acceptor(&self) -> Acceptor {
        Acceptor::from_server_config(self.current.read().clone())
    }
}

/// What the first bytes on the TLS port were.
enum Opening {
    Tls,
    PlainHttp,
    H2Preface,
    Other,
}

fn opening(first: &[u8]) -> Opening {
    match first {
        [TLS_HANDSHAKE_RECORD, ..] => Opening::Tls,
        _ if first.starts_with(H2_PREFACE_START) || H2_PREFACE_START.starts_with(first) => Opening::H2Preface,
        [b, ..] if b.is_ascii_uppercase() => Opening::PlainHttp,
        _ => Opening::Other,
    }
}

/// The TLS handshake of a new connection on the listener; `None` (logged) when there is no TLS
/// connection to serve. Plain HTTP gets a 400 that says so, as nginx answers it.
pub async fn accept(tls: &Tls, stream: Stream) -> Option<Stream> {
    if !stream.as_any().is::<L4Stream>() {
        tracing::error!("TLS listener: a connection that is not a socket stream");
        return None;
    }
    let mut l4: L4Stream = *stream.into_any().downcast::<L4Stream>().ok()?;
    let peer = l4.get_socket_digest().and_then(|d| d.peer_addr().map(ToString::to_string)).unwrap_or_default();
    let mut first = [0u8; 16];
    let n = match tokio::time::timeout(HANDSHAKE_TIMEOUT, l4.read(&mut first)).await {
        Ok(Ok(n)) if n > 0 => n,
        Ok(_) => return None,
        Err(_) => {
            tracing::info!(%peer, "TLS handshake: nothing received in time, connection closed");
            return None;
        }
    };
    let first = &first[..n];
    match opening(first) {
        Opening::Tls => {}
        Opening::PlainHttp => {
            tracing::info!(%peer, "plain HTTP on the TLS port: answered 400, connection closed");
            let body =
                ApiError::bad_request("This port speaks HTTPS: the plain HTTP request was sent to the TLS port.")
                    .body();
            let head = format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = l4.write_all(head.as_bytes()).await;
            let _ = l4.write_all(&body).await;
            let _ = l4.flush().await;
            return None;
        }
        Opening::H2Preface => {
            tracing::info!(%peer, "an HTTP/2 cleartext preface on the TLS port: connection closed");
            return None;
        }
        Opening::Other => {
            tracing::info!(%peer, "not a TLS handshake on the TLS port: connection closed");
            return None;
        }
    }
    l4.rewind(first);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor().tls_handshake(l4)).await {
        Ok(Ok(stream)) => Some(Box::new(stream)),
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake not finished in time, connection closed");
            None
        }
    }
}

/// Reloads the certificate on SIGHUP and when its files change (looked at every
/// `reload_check`).
pub struct Watch {
    pub tls: Arc<Tls>,
}

#[async_trait]
impl BackgroundService for Watch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "SIGHUP does not reload the TLS certificate (file changes still do)");
                None
            }
        };
        self.tls.sighup.store(hangup.is_some(), Ordering::Release);
        // The files were just loaded: the first look is one period from now.
        let period = self.tls.settings.reload_check;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let sighup = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = sighup => {
                    tracing::info!("SIGHUP: reloading the TLS certificate");
                    self.tls.reload();
                }
                _ = tick.tick() => {
                    if self.tls.files_changed() {
                        self.tls.reload();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bytes_tell_tls_from_plain_http() {
        assert!(matches!(opening(&[0x16, 0x03, 0x01]), Opening::Tls));
        assert!(matches!(opening(b"GET / HTTP/1.1\r\n"), Opening::PlainHttp));
        assert!(matches!(opening(b"PRI * HTTP/2.0\r\n"), Opening::H2Preface));
        assert!(matches!(opening(b"PRI"), Opening::H2Preface));
        assert!(matches!(opening(b"\x00\x01"), Opening::Other));
    }
}
