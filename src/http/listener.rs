//! The proxy port's listening socket and accept loop: pingora's listening service, without the
//! part that made every connection cost about 8 KB more for its whole life.
//!
//! pingora's service spawns one task per connection whose future holds its listener's handshake
//! (`UninitializedStream::handshake`); with pingora's rustls built in (the upstream is HTTPS), that
//! future has room for a rustls handshake even on a cleartext listener, and a task's future is
//! allocated whole for the task's life. Here the task is only pingora's `handle_event` (the
//! connection loop, [`FastPath`]); the listener's own TLS is [`crate::tls::accept`], boxed per
//! handshake.
//!
//! Everything else is as pingora's service does it: the socket is bound with `SO_REUSEADDR` and
//! a backlog of 65 535, or taken from the descriptors a running instance hands over in a
//! zero-downtime upgrade (`--upgrade`), and is put in that table for the next one; accepted
//! streams get `TCP_NODELAY`, pingora's socket digest and no L4 buffers (the connection loop reads
//! each request head into a buffer of its own and writes each answer in one vectored write); on
//! shutdown the accept loops stop and the app is told to clean up, while open connections finish.

use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::l4::listener::Listener;
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::Service;
use tokio::net::{TcpListener, TcpSocket};

use pingora::apps::ServerApp;

use super::FastPath;

/// pingora's listen backlog.
const BACKLOG: u32 = 65_535;

/// The listening service of the proxy's port.
pub struct Listening {
    addr: String,
    app: Option<FastPath>,
    /// A backend in this process (the demo simulator) that must accept connections before this
    /// port does: pingora starts services side by side, so a first request could otherwise reach
    /// the proxy before its upstream listens and be answered 502.
    after: Option<SocketAddr>,
}

/// How long the port waits for an in-process backend before it opens anyway.
const BACKEND_WAIT: Duration = Duration::from_secs(10);

impl Listening {
    pub fn new(addr: String, app: FastPath) -> Listening {
        Listening { addr, app: Some(app), after: None }
    }

    /// Opens the port only once `backend` accepts connections (or after [`BACKEND_WAIT`]).
    pub fn after(mut self, backend: SocketAddr) -> Listening {
        self.after = Some(backend);
        self
    }
}

/// Waits until `backend` accepts a connection, at most [`BACKEND_WAIT`].
async fn wait_for(backend: SocketAddr) {
    let deadline = tokio::time::Instant::now() + BACKEND_WAIT;
    while tokio::net::TcpStream::connect(backend).await.is_err() {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(%backend, "the built-in backend does not accept connections; opening the proxy port anyway");
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[async_trait]
impl Service for Listening {
    async fn start_service(&mut self, fds: Option<ListenFds>, shutdown: ShutdownWatch, listeners_per_fd: usize) {
        if let Some(backend) = self.after {
            wait_for(backend).await;
        }
        // As pingora's service: a port that cannot be bound stops the start (the address was
        // checked before the server was built, so this is a race with another process).
        let listener = match bind(&self.addr, fds) {
            Ok(l) => Arc::new(Listener::from(l)),
            Err(e) => panic!("could not listen on {}: {e}", self.addr),
        };
        let app = Arc::new(self.app.take().expect("the service starts once"));
        let loops: Vec<_> = (0..listeners_per_fd.max(1))
            .map(|_| tokio::spawn(accept_loop(listener.clone(), app.clone(), shutdown.clone())))
            .collect();
        for l in loops {
            let _ = l.await;
        }
        app.cleanup().await;
    }

    fn name(&self) -> &str {
        "Pingora HTTP Proxy Service"
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(vec![self.addr.clone()])
    }
}

async fn accept_loop(listener: Arc<Listener>, app: Arc<FastPath>, mut shutdown: ShutdownWatch) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            changed = shutdown.changed() => match changed {
                Ok(()) if !*shutdown.borrow() => continue,
                _ => return,
            },
        };
        match accepted {
            Ok(mut stream) => {
                // As pingora's listener (`apply_stream_settings`): an answer's last segment goes
                // out without waiting for the client's ACK of the ones before (Nagle's wait meets
                // the client's delayed ACK: 40 ms).
                if let Err(e) = stream.set_nodelay() {
                    tracing::debug!("TCP_NODELAY not set on an accepted connection: {e}");
                }
                let handled = pingora::services::listening::Service::handle_event(
                    Box::new(stream),
                    app.clone(),
                    shutdown.clone(),
                );
                tokio::spawn(handled);
            }
            Err(e) => {
                tracing::error!("accept() failed: {e}");
                // Out of descriptors (EMFILE, ENFILE): accept() fails at once until some close,
                // so wait a moment instead of spinning (as pingora does for EMFILE).
                if matches!(e.raw_os_error(), Some(23 | 24)) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// The listening socket for `addr`: the one a running instance handed over in `fds`, else a new
/// one, put in `fds` for the next upgrade.
fn bind(addr: &str, fds: Option<ListenFds>) -> std::io::Result<TcpListener> {
    if let Some(fd) = fds.as_ref().and_then(|t| t.lock().get(addr).copied()) {
        // SAFETY: the descriptor was received for this address from the instance being replaced,
        // and nothing else in this process owns it.
        let socket = TcpSocket::from_std_stream(unsafe { std::net::TcpStream::from_raw_fd(fd) });
        // `listen` again on a listening socket updates its backlog on Linux (as pingora does).
        return socket.listen(BACKLOG);
    }
    let sock_addr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to listen on"))?;
    let socket = if sock_addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(sock_addr)?;
    let listener = socket.listen(BACKLOG)?;
    if let Some(t) = fds {
        t.lock().add(addr.to_string(), listener.as_raw_fd());
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn the_wait_ends_when_the_backend_listens() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let bound = Arc::new(AtomicBool::new(false));
        let flag = bound.clone();
        let backend = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let l = TcpListener::bind(addr).await.unwrap();
            flag.store(true, Ordering::SeqCst);
            loop {
                let _ = l.accept().await;
            }
        });
        wait_for(addr).await;
        assert!(bound.load(Ordering::SeqCst), "the wait ended before the backend listened");
        backend.abort();
    }
}
