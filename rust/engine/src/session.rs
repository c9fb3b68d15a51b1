//! One downstream request as it moves through the proxy phases.

use std::net::SocketAddr;
use std::time::Instant;

use hyper::body::Incoming;

use crate::peer::Peer;

pub struct Session {
    /// The request line and headers as the client sent them (filters may change them).
    pub req: http::request::Parts,
    pub client_addr: SocketAddr,
    /// "http" or "https": what X-Forwarded-Proto reports.
    pub scheme: &'static str,
    /// The peer chosen by `upstream_peer`, once chosen.
    pub upstream: Option<Peer>,
    pub started: Instant,
    body: Option<Incoming>,
}

impl Session {
    pub fn new(req: http::Request<Incoming>, client_addr: SocketAddr) -> Self {
        let (req, body) = req.into_parts();
        Session {
            body: Some(body),
            ..Session::from_parts(req, client_addr)
        }
    }

    /// A session for a request head with no body (tests, benchmarks, synthetic requests).
    pub fn from_parts(req: http::request::Parts, client_addr: SocketAddr) -> Self {
        Session {
            req,
            client_addr,
            scheme: "http",
            upstream: None,
            started: Instant::now(),
            body: None,
        }
    }

    /// How long the chosen upstream may pause while sending its response.
    pub fn upstream_read_timeout(&self) -> std::time::Duration {
        self.upstream
            .as_ref()
            .map_or(crate::peer::PeerTimeouts::default().read, |p| {
                p.timeouts().read
            })
    }

    /// The downstream request body, for the proxy to forward; `None` once taken.
    pub fn take_body(&mut self) -> Option<Incoming> {
        self.body.take()
    }
}
