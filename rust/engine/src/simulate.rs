//! A request run through a proxy's real phases with the sockets replaced: the request is
//! given, the upstream is a prepared answer ([`CannedUpstream`]). For testing phase
//! implementations without a network (Python's `ferroxy.testing.simulate`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body::Body;

use crate::body::ProxyBody;
use crate::digest::DownstreamDigest;
use crate::error::Error;
use crate::peer::Peer;
use crate::phase::ProxyHttp;
use crate::proxy::{ProxyConfig, ProxyService};
use crate::response::Response;
use crate::upstream::{CannedUpstream, Received, UpstreamClient};

/// What came of a simulated request.
pub struct Simulated {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// What the upstream was sent; `None` when nothing was proxied.
    pub upstream_request: Option<Received>,
    /// The peer `upstream_peer` chose (the last one, after retries).
    pub peer: Option<Peer>,
    /// What `fail_to_proxy` and `logging` saw.
    pub error: Option<Error>,
}

/// Run `request`, as if it came from `client_addr` to `local_addr`, through `proxy`'s
/// phases (and `config`'s filters and routes), with every upstream answering `upstream`. The
/// `logging` phase has run when this returns.
pub async fn simulate<P: ProxyHttp>(
    proxy: Arc<P>,
    config: ProxyConfig,
    request: http::Request<Bytes>,
    client_addr: SocketAddr,
    local_addr: SocketAddr,
    upstream: Response,
) -> Simulated {
    let canned = Arc::new(CannedUpstream::new(upstream));
    let service = ProxyService::new(proxy, UpstreamClient::canned(canned.clone()), config);
    let downstream = Arc::new(DownstreamDigest::tcp(client_addr, local_addr));
    let response = service
        .handle(request.map(ProxyBody::full), downstream)
        .await;
    let (head, mut body) = response.into_parts();
    let mut received = BytesMut::new();
    while let Some(Ok(frame)) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
    {
        if let Some(data) = frame.data_ref() {
            received.extend_from_slice(data);
        }
    }
    let error = body.error().cloned();
    let peer = body.session().and_then(|s| s.upstream.clone());
    // The response is over: the finish step (the logging phase) runs now.
    drop(body);
    Simulated {
        status: head.status,
        headers: head.headers,
        body: received.freeze(),
        upstream_request: canned.take_received(),
        peer,
        error,
    }
}
