//! Talking to upstreams: connecting, pooling connections, sending one request.

mod connect;
pub mod pool;

use std::sync::Arc;

use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::error::{Error, Result};
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
    pub async fn send(
        &self,
        peer: &Peer,
        mut req: http::Request<ProxyBody>,
    ) -> Result<(http::response::Parts, Incoming, PooledConnection)> {
        loop {
            let (mut conn, reused) = match self.pool.checkout(peer) {
                Some(conn) => (conn, true),
                None => (self.connect(peer).await?, false),
            };
            if reused && conn.sender.ready().await.is_err() {
                continue;
            }
            match conn.sender.try_send_request(req).await {
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
                    _ => return Err(Error::from_upstream(failed.error()).with_peer(peer)),
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
