//! Opening a new HTTP/1.1 connection to a peer, with its connect/read/write timeouts.

use std::time::Duration;

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_io_timeout::TimeoutStream;

use crate::body::ProxyBody;
use crate::error::{Error, ErrorKind, Result};
use crate::peer::Peer;

pub(super) async fn connect(peer: &Peer) -> Result<http1::SendRequest<ProxyBody>> {
    let timeouts = *peer.timeouts();
    let stream = tokio::time::timeout(timeouts.connect, open(peer))
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::ConnectTimeout,
                format!("connect timed out after {:?}", timeouts.connect),
            )
        })??;
    let _ = stream.set_nodelay(true);
    // Only writes are timed on the socket (proxy_send_timeout). hyper keeps a read pending
    // on idle pooled connections, so a socket read timeout would count idle time against the
    // next request; reads are timed per response head and per body frame instead.
    let mut io = TimeoutStream::new(stream);
    io.set_write_timeout(nonzero(timeouts.write));
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(Box::pin(io)))
        .await
        .map_err(|e| Error::new(ErrorKind::ConnectError, e.to_string()))?;
    let addr = peer.pool_key().clone();
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(upstream = &*addr, %error, "upstream connection ended");
        }
    });
    Ok(sender)
}

async fn open(peer: &Peer) -> Result<TcpStream> {
    let result = match peer.socket_addr() {
        Some(addr) => TcpStream::connect(addr).await,
        None => TcpStream::connect(peer.addr()).await,
    };
    result.map_err(|e| {
        let kind = match e.kind() {
            std::io::ErrorKind::ConnectionRefused => ErrorKind::ConnectRefused,
            std::io::ErrorKind::TimedOut => ErrorKind::ConnectTimeout,
            _ => ErrorKind::ConnectError,
        };
        Error::new(kind, format!("connect to {} failed: {e}", peer.addr()))
    })
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}
