//! Talking to upstreams: connecting, pooling connections, sending one request.

mod connect;
pub mod pool;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::error::{Error, ErrorKind, Result};
use crate::peer::Peer;
pub use pool::{ConnectionPool, PoolConfig, PooledConnection};

/// Sends requests to peers over connections from the shared pool.
pub struct UpstreamClient {
    pool: Arc<ConnectionPool>,
}

impl UpstreamClient {
    pub fn new(pool: Arc<ConnectionPool>) -> Self {
        UpstreamClient { pool }
    }

    pub fn pool(&self) -> &Arc<ConnectionPool> {
        &self.pool
    }

    /// Send `req` to `peer`. Returns the response head, its streaming body and the connection
    /// (to hand back to the pool once the body has been read to the end).
    ///
    /// A pooled connection may have been closed by the upstream while idle; when sending on
    /// one fails before the request was written, hyper hands the request back and we retry on
    /// the next connection, which ends at a fresh one.
    ///
    /// The response head must come within the peer's read timeout of the request body's
    /// end (`request_finished`); while the body is still being sent, only the write timeout
    /// applies.
    pub async fn send(
        &self,
        peer: &Peer,
        mut req: http::Request<ProxyBody>,
        request_finished: &AtomicBool,
    ) -> Result<(http::response::Parts, Incoming, PooledConnection)> {
        let read_timeout = peer.timeouts().read;
        loop {
            let (mut conn, reused) = match self.pool.checkout(peer) {
                Some(conn) => (conn, true),
                None => (self.connect(peer).await?, false),
            };
            if reused && conn.sender.ready().await.is_err() {
                continue;
            }
            let sent = within_read_timeout(
                conn.sender.try_send_request(req),
                read_timeout,
                request_finished,
            );
            let Some(sent) = sent.await else {
                let message = format!("no response within {read_timeout:?}");
                return Err(Error::new(ErrorKind::ReadTimeout, message).with_peer(peer));
            };
            match sent {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    return Ok((parts, body, conn));
                }
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) if reused => {
                        tracing::debug!(
                            peer = peer.addr(),
                            "pooled connection was closed; retrying"
                        );
                        req = unsent;
                    }
                    _ => return Err(Error::from_upstream(&failed.into_error()).with_peer(peer)),
                },
            }
        }
    }

    async fn connect(&self, peer: &Peer) -> Result<PooledConnection> {
        let sender = connect::connect(peer)
            .await
            .map_err(|e| e.with_peer(peer))?;
        Ok(self.pool.wrap_new(peer, sender))
    }
}

/// `response` if it resolves within `read_timeout` after the request body has finished.
async fn within_read_timeout<F: Future>(
    response: F,
    read_timeout: Duration,
    request_finished: &AtomicBool,
) -> Option<F::Output> {
    tokio::pin!(response);
    // A window counts only if the body had finished when it began, so the wait after the
    // upload is never shorter than the read timeout. Stalls while uploading are the write
    // timeout's business.
    let mut window_after_upload = request_finished.load(Ordering::Acquire);
    loop {
        match tokio::time::timeout(read_timeout, &mut response).await {
            Ok(output) => return Some(output),
            Err(_) if window_after_upload => return None,
            Err(_) => window_after_upload = request_finished.load(Ordering::Acquire),
        }
    }
}
