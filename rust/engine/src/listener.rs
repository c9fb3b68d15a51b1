//! Where a server accepts connections: an address to bind, or a listening socket inherited
//! as a file descriptor (from a supervisor, or from the previous process during a
//! zero-downtime upgrade).

use std::fmt;
use std::os::fd::{FromRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::connection_filter::ConnectionFilter;
use crate::tls::server::TlsAcceptor;

/// A listener, and what runs on each of its connections before its service sees it: the
/// PROXY protocol header, the connection filter, the TLS handshake, in that order.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub listener: Listener,
    /// Set on a TLS listener: its connections are served once their handshake completes.
    pub tls: Option<Arc<TlsAcceptor>>,
    /// Every connection begins with a PROXY protocol header (v1 or v2), sent by the L4 load
    /// balancer in front: its source address is the client's. A connection without a valid
    /// one is closed.
    pub proxy_protocol: bool,
    /// Asked for every connection, after its PROXY protocol header and before its TLS
    /// handshake: one it refuses is closed at once, nothing written.
    pub connection_filter: Option<Arc<dyn ConnectionFilter>>,
}

impl Endpoint {
    pub fn tls(listener: Listener, acceptor: Arc<TlsAcceptor>) -> Self {
        Endpoint {
            listener,
            tls: Some(acceptor),
            proxy_protocol: false,
            connection_filter: None,
        }
    }

    pub fn with_proxy_protocol(mut self, expected: bool) -> Self {
        self.proxy_protocol = expected;
        self
    }

    pub fn with_connection_filter(mut self, filter: Option<Arc<dyn ConnectionFilter>>) -> Self {
        self.connection_filter = filter;
        self
    }
}

impl From<Listener> for Endpoint {
    fn from(listener: Listener) -> Self {
        Endpoint {
            listener,
            tls: None,
            proxy_protocol: false,
            connection_filter: None,
        }
    }
}

impl From<&str> for Endpoint {
    fn from(addr: &str) -> Self {
        Listener::from(addr).into()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.listener)?;
        if self.proxy_protocol {
            f.write_str(" (PROXY protocol)")?;
        }
        if self.tls.is_some() {
            f.write_str(" (TLS)")?;
        }
        Ok(())
    }
}

/// An accepted client connection, as a service reads and writes it: plain TCP, or TLS over
/// TCP once the handshake is done.
pub enum DownstreamStream {
    Tcp(TcpStream),
    /// Boxed: rustls's state is kilobytes, and plain connections should not carry its room.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl DownstreamStream {
    /// The TCP socket under it.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            DownstreamStream::Tcp(tcp) => tcp,
            DownstreamStream::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl AsyncRead for DownstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            DownstreamStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            DownstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for DownstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            DownstreamStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            DownstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            DownstreamStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            DownstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            DownstreamStream::Tcp(s) => s.is_write_vectored(),
            DownstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            DownstreamStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            DownstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            DownstreamStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            DownstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listener {
    /// `host:port` to bind.
    Addr(String),
    /// A listening TCP socket this process inherited, by descriptor number. Opening it takes
    /// ownership of the descriptor: open it once.
    Fd(RawFd),
}

impl Listener {
    /// `"fd:N"` names an inherited descriptor; anything else is an address to bind.
    pub fn parse(spec: &str) -> Result<Listener, String> {
        match spec.strip_prefix("fd:") {
            Some(n) => n
                .parse::<RawFd>()
                .ok()
                .filter(|fd| *fd >= 0)
                .map(Listener::Fd)
                .ok_or_else(|| format!("invalid descriptor in {spec:?}: expected fd:N")),
            None if spec.is_empty() => Err("empty listen address".into()),
            None => Ok(Listener::Addr(spec.to_owned())),
        }
    }

    /// The bound, non-blocking socket. Errors name the address or descriptor.
    pub fn open(&self) -> std::io::Result<std::net::TcpListener> {
        let named = |e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("cannot listen on {self}: {e}"))
        };
        let listener = match self {
            Listener::Addr(addr) => std::net::TcpListener::bind(addr).map_err(named)?,
            Listener::Fd(fd) => {
                // SAFETY: the descriptor was handed to this process to listen on (that is
                // what naming it in the configuration says) and nothing else here owns it.
                let listener = unsafe { std::net::TcpListener::from_raw_fd(*fd) };
                // Not a socket: say so now rather than fail on accept. (A socket that was
                // bound but never listen()ed on is not caught here; its accepts fail.)
                listener.local_addr().map_err(named)?;
                listener
            }
        };
        listener.set_nonblocking(true).map_err(named)?;
        Ok(listener)
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listener::Addr(addr) => f.write_str(addr),
            Listener::Fd(fd) => write!(f, "fd:{fd}"),
        }
    }
}

impl From<&str> for Listener {
    fn from(addr: &str) -> Self {
        Listener::Addr(addr.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn parses_addresses_and_descriptors() {
        assert_eq!(
            Listener::parse("127.0.0.1:80"),
            Ok(Listener::Addr("127.0.0.1:80".into()))
        );
        assert_eq!(Listener::parse("fd:3"), Ok(Listener::Fd(3)));
        assert!(Listener::parse("fd:x").is_err());
        assert!(Listener::parse("fd:-1").is_err());
        assert!(Listener::parse("").is_err());
    }

    #[test]
    fn opens_an_inherited_socket() {
        let bound = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = bound.local_addr().unwrap();
        let listener = Listener::Fd(bound.into_raw_fd()).open().unwrap();
        assert_eq!(listener.local_addr().unwrap(), addr);
    }

    #[test]
    fn a_descriptor_that_is_not_a_socket_is_refused_by_name() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let error = Listener::Fd(file.into_raw_fd()).open().unwrap_err();
        assert!(error.to_string().contains("fd:"), "{error}");
    }

    #[test]
    fn bind_errors_name_the_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let error = Listener::Addr(addr.clone()).open().unwrap_err();
        assert!(error.to_string().contains(&addr), "{error}");
    }
}
