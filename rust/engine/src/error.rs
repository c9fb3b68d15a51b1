//! Why a request could not be proxied, and which status the client gets for it.

use std::fmt;

use crate::peer::Peer;

/// The class of a proxy failure. `as_str` is the stable short code shown to hooks and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The upstream refused the TCP connection.
    ConnectRefused,
    /// The TCP connect did not finish within the peer's connect timeout.
    ConnectTimeout,
    /// Any other failure to connect (DNS, unreachable, handshake).
    ConnectError,
    /// The upstream sent nothing for longer than the peer's read timeout.
    ReadTimeout,
    /// Writing to the upstream stalled for longer than the peer's write timeout.
    WriteTimeout,
    /// The upstream closed or reset the connection before a complete response.
    UpstreamClosed,
    /// The upstream answered with something that is not valid HTTP.
    UpstreamProtocol,
    /// A phase hook failed (raised, or returned the wrong type).
    HookError,
    /// The downstream request cannot be forwarded as it is.
    InvalidRequest,
    /// The client stopped sending its request body for longer than client_read_timeout.
    ClientTimeout,
    /// The client went away before its response was complete.
    DownstreamClosed,
    /// A bug or an unexpected state inside the proxy.
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::ConnectRefused => "connect_refused",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::ConnectError => "connect_error",
            ErrorKind::ReadTimeout => "read_timeout",
            ErrorKind::WriteTimeout => "write_timeout",
            ErrorKind::UpstreamClosed => "upstream_closed",
            ErrorKind::UpstreamProtocol => "upstream_protocol",
            ErrorKind::HookError => "hook_error",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::ClientTimeout => "client_timeout",
            ErrorKind::DownstreamClosed => "downstream_closed",
            ErrorKind::Internal => "internal",
        }
    }

    /// The status a client gets by default: 504 for timeouts, 502 for other upstream
    /// failures (as nginx does), 400 for requests we cannot forward, 500 for the rest.
    pub fn default_status(self) -> u16 {
        match self {
            ErrorKind::ConnectTimeout | ErrorKind::ReadTimeout | ErrorKind::WriteTimeout => 504,
            ErrorKind::ConnectRefused
            | ErrorKind::ConnectError
            | ErrorKind::UpstreamClosed
            | ErrorKind::UpstreamProtocol => 502,
            ErrorKind::InvalidRequest => 400,
            ErrorKind::ClientTimeout => 408,
            // nginx's code for "client closed request": only ever seen in logs.
            ErrorKind::DownstreamClosed => 499,
            ErrorKind::HookError | ErrorKind::Internal => 500,
        }
    }
}

/// A proxy failure: its kind, a human message, the peer involved and the status to send.
#[derive(Debug, Clone)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    pub peer: Option<Peer>,
    pub status: u16,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            peer: None,
            status: kind.default_status(),
        }
    }

    /// A hook failure; `status` lets a hook's failure map to 502 (upstream_peer) or 500.
    pub fn hook(message: impl Into<String>, status: u16) -> Self {
        Error {
            status,
            ..Error::new(ErrorKind::HookError, message)
        }
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    pub fn with_peer(mut self, peer: &Peer) -> Self {
        self.peer = Some(peer.clone());
        self
    }

    /// Classify a failure seen while exchanging a request with an upstream: hyper's errors,
    /// socket errors, and body timeouts on either side.
    pub fn from_upstream(err: &(dyn std::error::Error + 'static)) -> Self {
        let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = current {
            if let Some(idle) = e.downcast_ref::<crate::body::IdleTimeout>() {
                return Error::new(idle.kind(), e.to_string());
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return Error::from_io(io);
            }
            current = e.source();
        }
        let kind = match err.downcast_ref::<hyper::Error>() {
            Some(h) if h.is_parse() || h.is_parse_status() => ErrorKind::UpstreamProtocol,
            _ => ErrorKind::UpstreamClosed,
        };
        Error::new(kind, err.to_string())
    }

    /// Classify an I/O failure on an upstream socket. Read waits are timed per message, not
    /// on the socket, so a socket timeout is a write that stalled.
    pub fn from_io(err: &std::io::Error) -> Self {
        use std::io::ErrorKind as Io;
        let kind = match err.kind() {
            Io::TimedOut => ErrorKind::WriteTimeout,
            Io::ConnectionRefused => ErrorKind::ConnectRefused,
            _ => ErrorKind::UpstreamClosed,
        };
        Error::new(kind, err.to_string())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)?;
        if let Some(peer) = &self.peer {
            write!(f, " (upstream {})", peer.addr())?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}
