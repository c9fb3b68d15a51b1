//! What a server runs: services that serve accepted connections (HTTP today, TCP later) and
//! background services that start and stop with the server (the pool evictor; health checks
//! and DNS refresh later).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use crate::digest::DownstreamDigest;

pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves the connections accepted on its listeners.
pub trait Service: Send + Sync + 'static {
    /// Serve one accepted connection until it ends. When `shutdown` fires, finish what is
    /// in flight and close (the server's grace period bounds how long that may take).
    fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        downstream: Arc<DownstreamDigest>,
        shutdown: ShutdownSignal,
    ) -> BoxFuture;

    /// Background work this service needs while the server runs.
    fn background(&self) -> Vec<Box<dyn BackgroundService>> {
        Vec::new()
    }
}

/// Work that runs for as long as the server does.
pub trait BackgroundService: Send + 'static {
    fn name(&self) -> &'static str;

    /// Run until `shutdown` fires.
    fn run(self: Box<Self>, shutdown: ShutdownSignal) -> BoxFuture;
}

/// Tells services the server has begun to shut down.
#[derive(Clone)]
pub struct ShutdownSignal(watch::Receiver<bool>);

impl ShutdownSignal {
    pub(crate) fn new() -> (watch::Sender<bool>, ShutdownSignal) {
        let (tx, rx) = watch::channel(false);
        (tx, ShutdownSignal(rx))
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown has begun (at once if it already has).
    pub async fn begun(&mut self) {
        let _ = self.0.wait_for(|down| *down).await;
    }
}

/// Counts the connections being served, so shutdown can wait for the last one.
#[derive(Clone, Default)]
pub(crate) struct ConnectionTracker(Arc<Tracked>);

#[derive(Default)]
struct Tracked {
    open: AtomicUsize,
    closed: Notify,
}

/// Held by a connection's task while it runs.
pub(crate) struct Tracking(Arc<Tracked>);

impl ConnectionTracker {
    pub fn track(&self) -> Tracking {
        self.0.open.fetch_add(1, Ordering::AcqRel);
        Tracking(self.0.clone())
    }

    pub fn open(&self) -> usize {
        self.0.open.load(Ordering::Acquire)
    }

    /// Resolves when no tracked connection is left.
    pub async fn all_closed(&self) {
        loop {
            let closed = self.0.closed.notified();
            if self.open() == 0 {
                return;
            }
            closed.await;
        }
    }
}

impl Drop for Tracking {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn all_closed_waits_for_the_last_connection() {
        let tracker = ConnectionTracker::default();
        tracker.all_closed().await;
        let (a, b) = (tracker.track(), tracker.track());
        let waiter = tokio::spawn({
            let tracker = tracker.clone();
            async move { tracker.all_closed().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one connection is still open");
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("all_closed resolves once the last one closes")
            .unwrap();
    }
}
