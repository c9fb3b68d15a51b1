//! One upstream connection, HTTP/1.1 or HTTP/2, behind one type. An HTTP/1.1 connection
//! carries one request at a time and is held exclusively while in use; an HTTP/2 one
//! multiplexes, so every request to its peer shares it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};

use super::canned::CannedUpstream;
use crate::body::ProxyBody;
use crate::digest::UpstreamDigest;
use crate::peer::PeerKey;

pub(crate) enum Sender {
    Http1(http1::SendRequest<ProxyBody>),
    Http2(http2::SendRequest<ProxyBody>),
    /// No connection at all: a prepared answer (see `canned`).
    Canned(Arc<CannedUpstream>),
}

/// A connection to a peer, taken from the pool or newly opened. Dropping an HTTP/1.1 one
/// closes it; [`super::ConnectionPool::put_back`] keeps it for reuse.
pub struct UpstreamConnection {
    pub(crate) sender: Sender,
    pub(crate) key: Arc<PeerKey>,
    pub(crate) digest: UpstreamDigest,
    /// How long it may idle in the pool before it is closed.
    pub(crate) idle_timeout: Duration,
}

pin_project_lite::pin_project! {
    /// The wait for an answer on one protocol or the other.
    #[project = SendingProjection]
    enum Sending<H1, H2> {
        Http1 { #[pin] sending: H1 },
        Http2 { #[pin] sending: H2 },
    }
}

impl<H1, H2> Future for Sending<H1, H2>
where
    H1: Future<Output = Sent>,
    H2: Future<Output = Sent>,
{
    type Output = Sent;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Sent> {
        match self.project() {
            SendingProjection::Http1 { sending } => sending.poll(cx),
            SendingProjection::Http2 { sending } => sending.poll(cx),
        }
    }
}

type Sent = Result<http::Response<Incoming>, TrySendError<http::Request<ProxyBody>>>;

impl UpstreamConnection {
    /// Another handle on a shared (HTTP/2) connection.
    ///
    /// # Panics
    /// On an HTTP/1.1 connection, which cannot be shared.
    pub(crate) fn clone_shared(&self) -> UpstreamConnection {
        let sender = match &self.sender {
            Sender::Http2(sender) => Sender::Http2(sender.clone()),
            Sender::Canned(canned) => Sender::Canned(canned.clone()),
            Sender::Http1(_) => panic!("an HTTP/1.1 connection cannot be shared"),
        };
        UpstreamConnection {
            sender,
            key: self.key.clone(),
            digest: self.digest,
            idle_timeout: self.idle_timeout,
        }
    }

    pub fn digest(&self) -> &UpstreamDigest {
        &self.digest
    }

    pub fn key(&self) -> &Arc<PeerKey> {
        &self.key
    }

    /// Multiplexed: other requests may use it at the same time.
    pub fn is_shared(&self) -> bool {
        matches!(self.sender, Sender::Http2(_) | Sender::Canned(_))
    }

    pub fn is_closed(&self) -> bool {
        match &self.sender {
            Sender::Http1(s) => s.is_closed(),
            Sender::Http2(s) => s.is_closed(),
            Sender::Canned(_) => false,
        }
    }

    /// Wait until it can take a request; an error means it has closed.
    pub async fn ready(&mut self) -> hyper::Result<()> {
        match &mut self.sender {
            Sender::Http1(s) => s.ready().await,
            Sender::Http2(s) => s.ready().await,
            Sender::Canned(_) => Ok(()),
        }
    }

    /// Send `req` over a real connection. When the connection turns out closed before any
    /// of the request was written, the error hands the request back (see hyper's
    /// `TrySendError`).
    ///
    /// Not an `async fn`: hyper takes the request at once, so the future returned holds only
    /// the wait for the answer (one protocol's), not the request: it sits in every request's
    /// future.
    pub(crate) fn send(
        &mut self,
        req: http::Request<ProxyBody>,
    ) -> impl Future<Output = Sent> + Send + 'static {
        match &mut self.sender {
            Sender::Http1(s) => Sending::Http1 {
                sending: s.try_send_request(req),
            },
            Sender::Http2(s) => Sending::Http2 {
                sending: s.try_send_request(req),
            },
            Sender::Canned(_) => {
                unreachable!("UpstreamClient::send answers canned requests itself")
            }
        }
    }
}

/// Real connections without a network: hyper's client over an in-memory pipe, the other end
/// served by hyper too.
#[cfg(test)]
pub(crate) mod testing {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU16, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::peer::{Peer, UpstreamProtocol};

    /// Tells connections apart: each one gets its own local port in its digest.
    static NEXT_LOCAL_PORT: AtomicU16 = AtomicU16::new(40000);

    /// Longer than any of these in-memory steps takes: a step that never happens fails the
    /// test instead of hanging it.
    const STEP: Duration = Duration::from_secs(10);

    /// The two tasks behind a test connection: the upstream serving the far end of the pipe,
    /// and hyper's client task driving the near end.
    pub(crate) struct Pipe {
        upstream: JoinHandle<()>,
        driver: JoinHandle<()>,
    }

    impl Pipe {
        /// The upstream goes away; returns once the connection has seen it (is closed).
        pub(crate) async fn hang_up(self) {
            self.upstream.abort();
            tokio::time::timeout(STEP, self.driver)
                .await
                .expect("hyper noticed the upstream going away")
                .unwrap();
        }

        /// Returns once our side has closed the connection (dropped its last handle).
        pub(crate) async fn closed_by_us(self) {
            tokio::time::timeout(STEP, self.upstream)
                .await
                .expect("the connection was closed")
                .unwrap();
        }
    }

    /// A new connection to `peer`, as the pool gets one from `connect` (pass the idle
    /// timeout the pool gives `peer`). The upstream reads each request's body and answers
    /// 200 "ok".
    pub(crate) async fn connection(
        peer: &Peer,
        idle_timeout: Duration,
    ) -> (UpstreamConnection, Pipe) {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let upstream = tokio::spawn(async move {
            let answer = service_fn(|req: http::Request<Incoming>| async move {
                req.into_body().collect().await?;
                Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(far), answer)
                .await;
        });
        let io = TokioIo::new(near);
        let (sender, driver) = match peer.protocol() {
            UpstreamProtocol::Http1 => {
                let (sender, connection) = http1::handshake(io).await.expect("h1 handshake");
                let driver = tokio::spawn(async move {
                    let _ = connection.await;
                });
                (Sender::Http1(sender), driver)
            }
            UpstreamProtocol::Http2 => {
                let (sender, connection) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("h2 handshake");
                let driver = tokio::spawn(async move {
                    let _ = connection.await;
                });
                (Sender::Http2(sender), driver)
            }
        };
        let digest = UpstreamDigest {
            peer_addr: peer.socket_addr().expect("an IP literal peer"),
            local_addr: SocketAddr::from((
                [127, 0, 0, 1],
                NEXT_LOCAL_PORT.fetch_add(1, Ordering::Relaxed),
            )),
            protocol: peer.protocol(),
            reused: false,
        };
        let conn = UpstreamConnection {
            sender,
            key: peer.key().clone(),
            digest,
            idle_timeout,
        };
        (conn, Pipe { upstream, driver })
    }
}
