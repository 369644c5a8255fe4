//! Running pingora servers in-process for tests and benchmarks: each on its own thread, stopped
//! through a channel instead of a process signal. Any pingora [`Server`] works (the simulator's,
//! or the proxy's in end-to-end tests).

use std::thread::JoinHandle;

use async_trait::async_trait;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};

/// A shutdown signal sent through a channel: `Some(true)` graceful, `Some(false)` fast.
pub struct ChannelShutdown(pub tokio::sync::watch::Receiver<Option<bool>>);

#[async_trait]
impl ShutdownSignalWatch for ChannelShutdown {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.0.clone();
        let graceful = loop {
            if let Some(g) = *rx.borrow_and_update() {
                break g;
            }
            if rx.changed().await.is_err() {
                break false;
            }
        };
        if graceful {
            ShutdownSignal::GracefulTerminate
        } else {
            ShutdownSignal::FastShutdown
        }
    }
}

/// A pingora server running on its own thread until [`Running::stop`] (or drop).
pub struct Running {
    stop: tokio::sync::watch::Sender<Option<bool>>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    pub fn start(server: Server) -> Running {
        let (stop, rx) = tokio::sync::watch::channel(None);
        let thread = std::thread::spawn(move || server.run(RunArgs { shutdown_signal: Box::new(ChannelShutdown(rx)) }));
        Running { stop, thread: Some(thread) }
    }

    /// Stops the server: `graceful` drains for the grace period first.
    pub fn stop(mut self, graceful: bool) {
        self.shutdown(graceful);
    }

    fn shutdown(&mut self, graceful: bool) {
        let _ = self.stop.send(Some(graceful));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown(false);
    }
}
