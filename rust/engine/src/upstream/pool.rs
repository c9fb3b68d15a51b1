//! The upstream connection pool: idle HTTP/1.1 connections filed by peer, shared by every
//! runtime thread. Most-recently-used first, so a steady load keeps few connections warm
//! and the rest age out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;
use parking_lot::Mutex;

use crate::body::ProxyBody;
use crate::peer::Peer;

#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// Upper bound on any peer's idle timeout.
    pub idle_timeout: Duration,
    /// Idle connections kept per peer; extra ones are closed when returned.
    pub max_idle_per_peer: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            idle_timeout: Duration::from_secs(60),
            max_idle_per_peer: 128,
        }
    }
}

struct Idle {
    sender: SendRequest<ProxyBody>,
    expires: Instant,
}

pub struct ConnectionPool {
    config: PoolConfig,
    idle: Mutex<HashMap<Arc<str>, Vec<Idle>>>,
}

/// A connection checked out of the pool (or new). Dropping it closes the connection;
/// [`ConnectionPool::put_back`] keeps it for reuse.
pub struct PooledConnection {
    pub(crate) sender: SendRequest<ProxyBody>,
    key: Arc<str>,
    idle_timeout: Duration,
}

impl ConnectionPool {
    pub fn new(config: PoolConfig) -> Self {
        ConnectionPool {
            config,
            idle: Mutex::new(HashMap::new()),
        }
    }

    /// The freshest idle connection to `peer` that has not expired or closed.
    pub fn checkout(&self, peer: &Peer) -> Option<PooledConnection> {
        let now = Instant::now();
        let mut idle = self.idle.lock();
        let conns = idle.get_mut(peer.pool_key())?;
        while let Some(conn) = conns.pop() {
            if conn.expires > now && !conn.sender.is_closed() {
                return Some(PooledConnection {
                    sender: conn.sender,
                    key: peer.pool_key().clone(),
                    idle_timeout: self.idle_timeout_for(peer),
                });
            }
        }
        None
    }

    pub(crate) fn wrap_new(&self, peer: &Peer, sender: SendRequest<ProxyBody>) -> PooledConnection {
        PooledConnection {
            sender,
            key: peer.pool_key().clone(),
            idle_timeout: self.idle_timeout_for(peer),
        }
    }

    /// Keep `conn` for reuse. Call only once its response has been read to the end.
    pub fn put_back(&self, conn: PooledConnection) {
        if conn.sender.is_closed() || self.config.max_idle_per_peer == 0 {
            return;
        }
        let expires = Instant::now() + conn.idle_timeout;
        let mut idle = self.idle.lock();
        let conns = idle.entry(conn.key).or_default();
        if conns.len() >= self.config.max_idle_per_peer {
            // The oldest goes: it is the likeliest to have been closed by the peer.
            conns.remove(0);
        }
        conns.push(Idle {
            sender: conn.sender,
            expires,
        });
    }

    /// Close idle connections that have expired; the server calls this periodically.
    pub fn evict_expired(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock();
        idle.retain(|_, conns| {
            conns.retain(|c| c.expires > now && !c.sender.is_closed());
            !conns.is_empty()
        });
    }

    /// Idle connections currently held, across all peers.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().values().map(Vec::len).sum()
    }

    fn idle_timeout_for(&self, peer: &Peer) -> Duration {
        peer.timeouts().idle.min(self.config.idle_timeout)
    }
}
