//! What a server runs: services that serve accepted connections (HTTP today, TCP later) and
//! background services that start and stop with the server (the pool evictor; health checks
//! and DNS refresh later).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;

use crate::digest::DownstreamDigest;
use crate::listener::DownstreamStream;

pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves the connections accepted on its listeners.
pub trait Service: Send + Sync + 'static {
    /// Serve one accepted connection until it ends. When `shutdown` fires, finish what is
    /// in flight and close (the server's grace period bounds how long that may take).
    fn serve_connection(
        self: Arc<Self>,
        stream: DownstreamStream,
        downstream: Arc<DownstreamDigest>,
        shutdown: ShutdownSignal,
    ) -> BoxFuture;

    /// Background work this service needs while the server runs.
    fn background(&self) -> Vec<Box<dyn BackgroundService>> {
        Vec::new()
    }

    /// Called once every connection has ended (or been cut at the end of the grace period),
    /// before the server reports it has stopped; on a thread that may block.
    fn stopped(&self) {}
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
