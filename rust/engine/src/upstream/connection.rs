//! One upstream connection, HTTP/1.1 or HTTP/2, behind one type. An HTTP/1.1 connection
//! carries one request at a time and is held exclusively while in use; an HTTP/2 one
//! multiplexes, so every request to its peer shares it.

use std::sync::Arc;
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
    pub(crate) async fn send(&mut self, req: http::Request<ProxyBody>) -> Sent {
        match &mut self.sender {
            Sender::Http1(s) => s.try_send_request(req).await,
            Sender::Http2(s) => s.try_send_request(req).await,
            Sender::Canned(_) => {
                unreachable!("UpstreamClient::send answers canned requests itself")
            }
        }
    }
}
