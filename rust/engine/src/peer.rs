//! An upstream to proxy to: its address and the timeouts that apply to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Timeouts for one upstream. Defaults follow nginx's proxy_* defaults, except connect
/// (5 s rather than 60 s: a peer that takes longer to accept is down for practical purposes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerTimeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
    /// How long an idle pooled connection to this peer may be reused after its last use.
    pub idle: Duration,
}

impl Default for PeerTimeouts {
    fn default() -> Self {
        PeerTimeouts {
            connect: Duration::from_secs(5),
            read: Duration::from_secs(60),
            write: Duration::from_secs(60),
            idle: Duration::from_secs(60),
        }
    }
}

/// Where to send a request. Cheap to clone: the address is shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    addr: Arc<str>,
    /// Parsed once when the address is an IP literal, so the hot path skips DNS.
    resolved: Option<SocketAddr>,
    timeouts: PeerTimeouts,
    pool_key: Arc<str>,
}

impl Peer {
    /// `addr` is `host:port`; hosts that are not IP literals are resolved at connect time.
    pub fn new(addr: &str) -> Result<Self, String> {
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| format!("expected \"host:port\", got {addr:?}"))?;
        if host.is_empty() {
            return Err(format!("missing host in {addr:?}"));
        }
        port.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("invalid port {port:?} in {addr:?}"))?;
        let addr: Arc<str> = Arc::from(addr);
        Ok(Peer {
            resolved: addr.parse().ok(),
            timeouts: PeerTimeouts::default(),
            pool_key: addr.clone(),
            addr,
        })
    }

    pub fn with_timeouts(mut self, timeouts: PeerTimeouts) -> Self {
        self.timeouts = timeouts;
        self.pool_key = if (timeouts.read, timeouts.write)
            == (PeerTimeouts::default().read, PeerTimeouts::default().write)
        {
            self.addr.clone()
        } else {
            Arc::from(format!(
                "{} read={:?} write={:?}",
                self.addr, timeouts.read, timeouts.write
            ))
        };
        self
    }

    pub fn timeouts(&self) -> &PeerTimeouts {
        &self.timeouts
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.resolved
    }

    /// The key the connection pool files this peer's connections under. The write timeout
    /// is part of it because it is set on the socket when it is opened: a connection opened
    /// for one peer must not serve another with a different one.
    pub fn pool_key(&self) -> &Arc<str> {
        &self.pool_key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_literals_and_names() {
        assert!(Peer::new("127.0.0.1:80").unwrap().socket_addr().is_some());
        assert!(Peer::new("[::1]:80").unwrap().socket_addr().is_some());
        assert!(Peer::new("localhost:8080").unwrap().socket_addr().is_none());
    }

    #[test]
    fn socket_timeouts_separate_pool_keys() {
        let plain = Peer::new("127.0.0.1:80").unwrap();
        let idle = plain.clone().with_timeouts(PeerTimeouts {
            idle: Duration::from_secs(1),
            ..Default::default()
        });
        let quick = plain.clone().with_timeouts(PeerTimeouts {
            read: Duration::from_millis(200),
            ..Default::default()
        });
        assert_eq!(plain.pool_key(), idle.pool_key());
        assert_ne!(plain.pool_key(), quick.pool_key());
    }

    #[test]
    fn rejects_bad_addresses() {
        for bad in ["nohost", ":80", "host:0", "host:99999", "host:x"] {
            assert!(Peer::new(bad).is_err(), "{bad} accepted");
        }
    }
}
