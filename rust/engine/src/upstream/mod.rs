//! Talking to upstreams: opening connections, pooling them, exchanging one request.

mod canned;
mod connect;
mod connection;
mod pool;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::body::{BodyProgress, ProxyBody};
use crate::digest::UpstreamDigest;
use crate::error::{Error, ErrorKind, ErrorSide, Result};
use crate::peer::Peer;
pub use canned::{CannedUpstream, Received};
pub use connect::{transport, Transport};
use connection::Sender;
pub use connection::UpstreamConnection;
pub use pool::{ConnectionPool, PoolConfig};

/// Opens or reuses connections to peers and sends requests over them.
pub struct UpstreamClient {
    pool: Arc<ConnectionPool>,
    /// Set for phase tests: every peer is this prepared answer, no network involved.
    canned: Option<Arc<CannedUpstream>>,
}

/// An upstream's answer: its head, its streaming body, and the connection it came on (to
/// hand back to the pool once the exchange has completed).
pub struct Exchange {
    pub head: http::response::Parts,
    /// Streamed, with the peer's read timeout between frames.
    pub body: ProxyBody,
    pub connection: UpstreamConnection,
}

impl UpstreamClient {
    pub fn new(pool: Arc<ConnectionPool>) -> Self {
        UpstreamClient { pool, canned: None }
    }

    /// A client whose every peer answers with `canned`'s response, without a network.
    pub fn canned(canned: Arc<CannedUpstream>) -> Self {
        UpstreamClient {
            pool: Arc::new(ConnectionPool::new(PoolConfig::default())),
            canned: Some(canned),
        }
    }

    pub fn pool(&self) -> &Arc<ConnectionPool> {
        &self.pool
    }

    /// A connection to `peer`: a pooled one, else a new one. Fails only when connecting
    /// fails, before anything was sent (so the caller may try another peer).
    pub async fn connect(&self, peer: &Peer) -> Result<UpstreamConnection> {
        if let Some(canned) = &self.canned {
            let addr = peer
                .socket_addr()
                .unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
            return Ok(UpstreamConnection {
                sender: Sender::Canned(canned.clone()),
                key: peer.key().clone(),
                digest: UpstreamDigest {
                    peer_addr: addr,
                    local_addr: ([127, 0, 0, 1], 0).into(),
                    protocol: peer.protocol(),
                    reused: false,
                },
                idle_timeout: Duration::ZERO,
            });
        }
        if let Some(conn) = self.pool.checkout(peer) {
            return Ok(conn);
        }
        // With ALPN "h2,h1" the protocol is known only once connected: opening goes through
        // the gate all the same, so a burst makes one h2 connection rather than one each (an
        // h1 answer only serializes the burst's connects).
        if peer.may_speak_http2() {
            let gate = self.pool.opening_gate(peer);
            let _opening = gate.lock().await;
            // Whoever held the gate before us may have opened one for everybody.
            if let Some(conn) = self.pool.checkout(peer) {
                return Ok(conn);
            }
            return self.open(peer).await;
        }
        self.open(peer).await
    }

    async fn open(&self, peer: &Peer) -> Result<UpstreamConnection> {
        // Boxed: a connect's future (TCP, timeout, either handshake) is kilobytes, and held
        // inline it would grow every request's future, which hyper moves per request. Most
        // requests reuse a pooled connection and never come here.
        let opening = Box::pin(connect::connect(peer, self.pool.idle_timeout_for(peer)));
        let conn = opening.await?;
        if conn.is_shared() {
            self.pool.put_back(conn.clone_shared());
        }
        Ok(conn)
    }

    /// Send `req` to `peer` over `conn`.
    ///
    /// A pooled connection may have been closed by the upstream while idle; when sending on
    /// one fails before the request was written, hyper hands the request back and we retry on
    /// the next connection, which ends at a fresh one.
    ///
    /// The response head must come within the peer's read timeout of the request body's end
    /// (`upload`); while the body is still being sent, only the write timeout applies.
    pub async fn send(
        &self,
        peer: &Peer,
        mut conn: UpstreamConnection,
        mut req: http::Request<ProxyBody>,
        upload: &BodyProgress,
    ) -> Result<Exchange> {
        let read_timeout = peer.timeouts().read;
        if let Sender::Canned(canned) = &conn.sender {
            // Boxed: simulations only, kept out of the real exchange's future.
            let (head, body) = Box::pin(canned.exchange(req)).await?;
            return Ok(Exchange {
                head,
                body,
                connection: conn,
            });
        }
        loop {
            if conn.digest.reused && conn.ready().await.is_err() {
                conn = self.connect(peer).await?;
                continue;
            }
            // The attempt's wait, its answer and its failure end in this block: the wait
            // for a fresh connection below would otherwise hold them all (they were most of
            // this future's size).
            let unsent = {
                let sending = conn.send(req);
                tokio::pin!(sending);
                let sent = within_read_timeout(sending, read_timeout, upload).await;
                let Some(sent) = sent else {
                    let message = format!("no response within {read_timeout:?}");
                    return Err(Error::new(ErrorKind::ReadTimeout, message).with_peer(peer));
                };
                match sent {
                    Ok(response) => {
                        // Split at once: a response kept whole while it may change would be
                        // copied on every request.
                        let (mut head, body) = response.into_parts();
                        if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
                            crate::upgrade::UpstreamUpgrade::keep(&mut head);
                        }
                        return Ok(Exchange {
                            head,
                            body: ProxyBody::streamed(body, read_timeout, ErrorSide::Upstream),
                            connection: conn,
                        });
                    }
                    Err(mut failed) => match failed.take_message() {
                        Some(unsent) if conn.digest.reused => unsent,
                        _ => {
                            return Err(
                                Error::from_upstream(Box::new(failed.into_error())).with_peer(peer)
                            )
                        }
                    },
                }
            };
            tracing::debug!(peer = peer.addr(), "pooled connection was closed; retrying");
            req = unsent;
            conn = self.connect(peer).await?;
        }
    }
}

/// `response` if it resolves within `read_timeout` after the request body has finished.
async fn within_read_timeout<F: Future>(
    mut response: std::pin::Pin<&mut F>,
    read_timeout: Duration,
    upload: &BodyProgress,
) -> Option<F::Output> {
    // A window counts only if the body had finished when it began, so the wait after the
    // upload is never shorter than the read timeout. Stalls while uploading are the write
    // timeout's business.
    let mut window_after_upload = upload.is_finished();
    loop {
        match tokio::time::timeout(read_timeout, response.as_mut()).await {
            Ok(output) => return Some(output),
            Err(_) if window_after_upload => return None,
            Err(_) => window_after_upload = upload.is_finished(),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tokio::time::Instant;

    use super::*;

    const READ: Duration = Duration::from_secs(10);

    /// An upload still in progress, finished once the returned task has read it to its end
    /// after `uploading_for`.
    fn upload_lasting(uploading_for: Duration) -> (BodyProgress, tokio::task::JoinHandle<()>) {
        let mut body = ProxyBody::full(Bytes::from_static(b"request body"));
        let progress = body.progress();
        assert!(!progress.is_finished());
        let uploading = tokio::spawn(async move {
            tokio::time::sleep(uploading_for).await;
            while body.frame().await.is_some() {}
        });
        (progress, uploading)
    }

    /// A response head that comes `after` from now.
    async fn response_after(after: Duration) -> &'static str {
        tokio::time::sleep(after).await;
        "response"
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_finished_upload_the_wait_is_the_read_timeout() {
        let (done, _) = upload_lasting(Duration::ZERO);
        tokio::task::yield_now().await;
        assert!(done.is_finished());
        let started = Instant::now();
        let waited =
            within_read_timeout(std::pin::pin!(std::future::pending::<()>()), READ, &done).await;
        assert!(waited.is_none());
        let elapsed = started.elapsed();
        assert!(
            elapsed >= READ && elapsed <= READ + Duration::from_millis(1),
            "{elapsed:?}"
        );

        let response = std::pin::pin!(response_after(READ - Duration::from_millis(1)));
        assert_eq!(
            within_read_timeout(response, READ, &done).await,
            Some("response")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn time_spent_uploading_does_not_count_against_the_read_timeout() {
        let uploading_for = READ * 3 / 2;
        let (upload, _) = upload_lasting(uploading_for);
        let started = Instant::now();
        let waited =
            within_read_timeout(std::pin::pin!(std::future::pending::<()>()), READ, &upload).await;
        assert!(waited.is_none());
        let elapsed = started.elapsed();
        assert!(
            elapsed >= uploading_for + READ,
            "gave up {:?} after the upload, less than the read timeout",
            elapsed - uploading_for
        );
        assert!(elapsed <= uploading_for + 2 * READ, "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_within_the_read_timeout_of_the_uploads_end_is_taken() {
        let uploading_for = READ * 3 / 2;
        let (upload, _) = upload_lasting(uploading_for);
        // Later than the read timeout after the request began, sooner after the upload ended.
        let response = response_after(uploading_for + READ - Duration::from_millis(1));
        assert_eq!(
            within_read_timeout(std::pin::pin!(response), READ, &upload).await,
            Some("response")
        );
    }
}
