//! Opening a new connection to a peer, with its connect and write timeouts: TCP, then TLS
//! when the peer has it, then the peer's protocol (over TLS, the one ALPN chose).

use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_io_timeout::TimeoutStream;

use super::connection::{Sender, UpstreamConnection};
use crate::digest::UpstreamDigest;
use crate::error::{Error, ErrorKind, Result};
use crate::peer::{Peer, UpstreamProtocol};

pub(super) async fn connect(peer: &Peer, idle_timeout: Duration) -> Result<UpstreamConnection> {
    let (stream, digest) = match transport(peer).await? {
        (Transport::Tcp(stream), digest) => (stream, digest),
        (Transport::Tls(stream), digest) => {
            let protocol = match stream.get_ref().1.alpn_protocol() {
                Some(b"h2") => UpstreamProtocol::Http2,
                _ => UpstreamProtocol::Http1,
            };
            let digest = UpstreamDigest { protocol, ..digest };
            return speak(peer, *stream, digest, idle_timeout).await;
        }
    };
    speak(peer, stream, digest, idle_timeout).await
}

/// A connection to a peer before any protocol: TCP, or TLS over it when the peer has it.
pub enum Transport {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// TCP to `peer`, then TLS when it has it, within its connect timeout (one deadline for
/// both: both are "connecting"); shared by the HTTP client and the TCP proxy.
pub async fn transport(peer: &Peer) -> Result<(Transport, UpstreamDigest)> {
    let timeouts = *peer.timeouts();
    let deadline = tokio::time::Instant::now() + timeouts.connect;
    let timed_out = || {
        Error::new(
            ErrorKind::ConnectTimeout,
            format!("connect timed out after {:?}", timeouts.connect),
        )
        .with_peer(peer)
    };
    let stream = tokio::time::timeout_at(deadline, open(peer))
        .await
        .map_err(|_| timed_out())??;
    let _ = stream.set_nodelay(true);
    let digest = UpstreamDigest {
        peer_addr: stream
            .peer_addr()
            .map_err(|e| Error::from_connect(e, peer))?,
        local_addr: stream
            .local_addr()
            .map_err(|e| Error::from_connect(e, peer))?,
        protocol: peer.protocol(),
        reused: false,
    };
    let Some(tls) = peer.tls() else {
        return Ok((Transport::Tcp(stream), digest));
    };
    let stream = tokio::time::timeout_at(deadline, tls.connect(stream))
        .await
        .map_err(|_| timed_out())?
        .map_err(|message| Error::new(ErrorKind::TlsHandshake, message).with_peer(peer))?;
    Ok((Transport::Tls(Box::new(stream)), digest))
}

/// The HTTP handshake over `stream`, in `digest.protocol`.
async fn speak<S>(
    peer: &Peer,
    stream: S,
    digest: UpstreamDigest,
    idle_timeout: Duration,
) -> Result<UpstreamConnection>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    // Only writes are timed on the socket (proxy_send_timeout). hyper keeps a read pending
    // on idle pooled connections, so a socket read timeout would count idle time against the
    // next request; reads are timed per response head and per body frame instead.
    let mut io = TimeoutStream::new(stream);
    io.set_write_timeout(nonzero(peer.timeouts().write));
    let io = TokioIo::new(Box::pin(io));
    let handshake_failed = |e: hyper::Error| {
        Error::new(ErrorKind::ConnectError, e.to_string())
            .with_peer(peer)
            .with_cause(e)
    };
    let sender = match digest.protocol {
        UpstreamProtocol::Http1 => {
            let (sender, connection) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(handshake_failed)?;
            // With upgrades: a 101 hands the socket to the tunnel (see crate::upgrade).
            drive(peer, connection.with_upgrades());
            Sender::Http1(sender)
        }
        UpstreamProtocol::Http2 => {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(handshake_failed)?;
            drive(peer, connection);
            Sender::Http2(sender)
        }
    };
    Ok(UpstreamConnection {
        sender,
        key: peer.key().clone(),
        digest,
        idle_timeout,
    })
}

/// Run a connection's I/O on its own task until it closes.
fn drive<C>(peer: &Peer, connection: C)
where
    C: std::future::Future<Output = hyper::Result<()>> + Send + 'static,
{
    let key = peer.key().clone();
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(upstream = key.addr(), %error, "upstream connection ended");
        }
    });
}

async fn open(peer: &Peer) -> Result<TcpStream> {
    let result = match peer.socket_addr() {
        Some(addr) => TcpStream::connect(addr).await,
        None => TcpStream::connect(peer.addr()).await,
    };
    result.map_err(|e| Error::from_connect(e, peer))
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}
