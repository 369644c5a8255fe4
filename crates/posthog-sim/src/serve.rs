//! Running the simulator as a pingora server, and picking a loopback port for it.

use std::net::TcpListener;

use pingora::server::configuration::ServerConf;
use pingora::server::Server;

use crate::Simulator;

/// A server running only the simulated backend on `listen` (the `posthog-sim` binary, the proxy's
/// demo mode, tests, benchmarks). It stops at once on shutdown: nothing of it needs draining.
pub fn server(sim: &Simulator, listen: &str, threads: usize) -> Server {
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    server.add_service(sim.service(listen));
    server
}

/// A free loopback port. Taken below Linux's ephemeral range (32768+), where the kernel never
/// hands a released port to an outgoing connection, and never the same one twice in a process;
/// checked free when handed out (another process may still take it).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        // A different starting point per process, so concurrent test binaries rarely meet.
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let _ = NEXT.compare_exchange(
            u32::MAX,
            (seed ^ std::process::id().wrapping_mul(7919)) % SPAN,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_bindable() {
        let (a, b) = (free_port(), free_port());
        assert_ne!(a, b);
        assert!(TcpListener::bind(("127.0.0.1", a)).is_ok());
    }
}
