//! The facts of the connections behind a request, as Pingora's digests keep them: the
//! downstream connection it arrived on and the upstream connection it was sent over.

use std::net::SocketAddr;

use crate::peer::UpstreamProtocol;

/// "http" or "https": how the client reached us, what X-Forwarded-Proto reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// A downstream connection, shared by every request that arrives on it.
#[derive(Debug, Clone)]
pub struct DownstreamDigest {
    pub client_addr: SocketAddr,
    /// The address the client connected to (ours).
    pub local_addr: SocketAddr,
    pub scheme: Scheme,
    /// Set on TLS connections.
    pub tls: Option<TlsDigest>,
}

impl DownstreamDigest {
    /// A plain-TCP connection from `client_addr` to `local_addr`.
    pub fn tcp(client_addr: SocketAddr, local_addr: SocketAddr) -> Self {
        DownstreamDigest {
            client_addr,
            local_addr,
            scheme: Scheme::Http,
            tls: None,
        }
    }
}

/// What a TLS handshake settled.
#[derive(Debug, Clone, Default)]
pub struct TlsDigest {
    /// The server name the client asked for (SNI).
    pub sni: Option<String>,
    /// The protocol ALPN chose (`h2`, `http/1.1`).
    pub alpn: Option<Vec<u8>>,
    /// The client's certificate chain, DER, leaf first (mutual TLS).
    pub client_certificates: Vec<Vec<u8>>,
    /// The negotiated TLS version, "TLSv1.3" or "TLSv1.2".
    pub version: Option<&'static str>,
    /// The negotiated cipher suite, its IANA name, e.g. "TLS_AES_256_GCM_SHA384".
    pub cipher: Option<&'static str>,
}

impl TlsDigest {
    /// The ALPN protocol as text ("h2"), for logs and hooks.
    pub fn alpn_text(&self) -> Option<String> {
        self.alpn
            .as_ref()
            .map(|alpn| String::from_utf8_lossy(alpn).into_owned())
    }
}

/// The upstream connection a request was sent over.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamDigest {
    pub peer_addr: SocketAddr,
    pub local_addr: SocketAddr,
    pub protocol: UpstreamProtocol,
    /// Taken from the pool (true) or opened for this request (false).
    pub reused: bool,
}
