//! An upstream to proxy to: its address, the protocol to speak, the timeouts that apply to
//! it, and the [`PeerKey`] that decides which pooled connections can serve it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::tls::client::{TlsOptionError, TlsOptions, UpstreamTls};

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

/// The protocol spoken to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1: one request at a time per connection.
    #[default]
    Http1,
    /// Cleartext HTTP/2 with prior knowledge: one connection multiplexes many requests.
    Http2,
}

/// Everything that makes two upstream connections differ: a pooled connection serves a peer
/// only if their keys are equal. Timeouts that are not baked into the connection (connect,
/// read, idle) are not part of it; TLS is (verification, SNI, CA, client certificate, ALPN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerKey {
    addr: Arc<str>,
    protocol: UpstreamProtocol,
    tls: Option<Arc<UpstreamTls>>,
    /// Set on the socket when it is opened (see `upstream::connect`).
    write_timeout: Duration,
    /// Of the fields above, computed once: the pool looks a key up twice per request.
    hash: u64,
}

impl PeerKey {
    fn new(
        addr: Arc<str>,
        protocol: UpstreamProtocol,
        tls: Option<Arc<UpstreamTls>>,
        write_timeout: Duration,
    ) -> Self {
        // Seeded once per process, as HashMap's own hasher is: peers may come from requests.
        static SEED: std::sync::OnceLock<std::collections::hash_map::RandomState> =
            std::sync::OnceLock::new();
        let hash = std::hash::BuildHasher::hash_one(
            SEED.get_or_init(Default::default),
            (&addr, protocol, &tls, write_timeout),
        );
        PeerKey {
            addr,
            protocol,
            tls,
            write_timeout,
            hash,
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The key's hash, as [`PeerKeyHasher`] hands it to a map.
    pub fn precomputed_hash(&self) -> u64 {
        self.hash
    }
}

impl std::hash::Hash for PeerKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// For maps keyed by [`PeerKey`]: its hash is computed already, so hashing is passing it on.
#[derive(Default)]
pub struct PeerKeyHasher(u64);

impl std::hash::Hasher for PeerKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only write_u64 is ever called (see PeerKey's Hash); fold anything else in anyway.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

/// A map from peer keys, hashing each by its precomputed hash.
pub type PeerKeyMap<V> =
    std::collections::HashMap<Arc<PeerKey>, V, std::hash::BuildHasherDefault<PeerKeyHasher>>;

/// Where to send a request. Cheap to clone: the address and key are shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    addr: Arc<str>,
    /// Parsed once when the address is an IP literal, so the hot path skips DNS.
    resolved: Option<SocketAddr>,
    timeouts: PeerTimeouts,
    protocol: UpstreamProtocol,
    tls: Option<Arc<UpstreamTls>>,
    key: Arc<PeerKey>,
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
        let timeouts = PeerTimeouts::default();
        let protocol = UpstreamProtocol::default();
        Ok(Peer {
            resolved: addr.parse().ok(),
            key: Arc::new(PeerKey::new(addr.clone(), protocol, None, timeouts.write)),
            addr,
            timeouts,
            protocol,
            tls: None,
        })
    }

    pub fn with_timeouts(mut self, timeouts: PeerTimeouts) -> Self {
        self.timeouts = timeouts;
        self.rekey()
    }

    pub fn with_protocol(mut self, protocol: UpstreamProtocol) -> Self {
        self.protocol = protocol;
        self.rekey()
    }

    /// Speak TLS to this peer. The files `options` names are read now. With `alpn` "h2" the
    /// protocol is HTTP/2; with "h1" or "h2,h1" it is what the server picks (known once
    /// connected: see `UpstreamDigest::protocol`), HTTP/1.1 until then.
    pub fn with_tls(mut self, options: &TlsOptions) -> Result<Self, TlsOptionError> {
        let tls = UpstreamTls::new(options, self.host())?;
        self.protocol = match tls.alpn() {
            crate::tls::client::Alpn::Http2 => UpstreamProtocol::Http2,
            _ => UpstreamProtocol::Http1,
        };
        self.tls = Some(tls);
        Ok(self.rekey())
    }

    fn rekey(mut self) -> Self {
        self.key = Arc::new(PeerKey::new(
            self.addr.clone(),
            self.protocol,
            self.tls.clone(),
            self.timeouts.write,
        ));
        self
    }

    /// The address's host, without the brackets of an IPv6 literal.
    pub fn host(&self) -> &str {
        let host = self.addr.rsplit_once(':').map_or(&*self.addr, |(h, _)| h);
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
    }

    pub fn tls(&self) -> Option<&Arc<UpstreamTls>> {
        self.tls.as_ref()
    }

    /// Whether connections to it may turn out HTTP/2 (and so be shared).
    pub fn may_speak_http2(&self) -> bool {
        self.protocol == UpstreamProtocol::Http2
            || self
                .tls
                .as_ref()
                .is_some_and(|tls| tls.alpn() != crate::tls::client::Alpn::Http1)
    }

    pub fn protocol(&self) -> UpstreamProtocol {
        self.protocol
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

    /// The key the connection pool files this peer's connections under.
    pub fn key(&self) -> &Arc<PeerKey> {
        &self.key
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
    fn only_what_changes_a_connection_separates_pool_keys() {
        let plain = Peer::new("127.0.0.1:80").unwrap();
        let same_connection = plain.clone().with_timeouts(PeerTimeouts {
            idle: Duration::from_secs(1),
            read: Duration::from_millis(200),
            connect: Duration::from_millis(100),
            ..Default::default()
        });
        assert_eq!(plain.key(), same_connection.key());
        let slow_writes = plain.clone().with_timeouts(PeerTimeouts {
            write: Duration::from_secs(1),
            ..Default::default()
        });
        assert_ne!(plain.key(), slow_writes.key());
        let h2 = plain.clone().with_protocol(UpstreamProtocol::Http2);
        assert_ne!(plain.key(), h2.key());
        assert_ne!(plain.key(), Peer::new("127.0.0.1:81").unwrap().key());
    }

    #[test]
    fn tls_settings_separate_pool_keys() {
        use crate::tls::client::Alpn;
        let plain = Peer::new("localhost:443").unwrap();
        let tls = |options: TlsOptions| plain.clone().with_tls(&options).unwrap();
        let default = tls(TlsOptions::default());
        assert_eq!(plain.host(), "localhost");
        assert_eq!(default.key(), tls(TlsOptions::default()).key());
        assert_ne!(plain.key(), default.key());
        let variants = [
            TlsOptions {
                sni: Some("other.example".into()),
                ..Default::default()
            },
            TlsOptions {
                sni: Some(String::new()),
                ..Default::default()
            },
            TlsOptions {
                verify_cert: false,
                ..Default::default()
            },
            TlsOptions {
                verify_hostname: false,
                ..Default::default()
            },
            TlsOptions {
                alpn: Alpn::Http2OrHttp1,
                ..Default::default()
            },
        ];
        for options in variants {
            let peer = tls(options.clone());
            assert_ne!(default.key(), peer.key(), "{options:?}");
            assert_eq!(peer.key(), tls(options).key());
        }
        assert!(tls(TlsOptions {
            alpn: Alpn::Http2OrHttp1,
            ..Default::default()
        })
        .may_speak_http2());
        assert!(!default.may_speak_http2());
        let h2 = tls(TlsOptions {
            alpn: Alpn::Http2,
            ..Default::default()
        });
        assert_eq!(h2.protocol(), UpstreamProtocol::Http2);
        assert_eq!(Peer::new("[::1]:443").unwrap().host(), "::1");
    }

    #[test]
    fn rejects_bad_addresses() {
        for bad in ["nohost", ":80", "host:0", "host:99999", "host:x"] {
            assert!(Peer::new(bad).is_err(), "{bad} accepted");
        }
    }
}
