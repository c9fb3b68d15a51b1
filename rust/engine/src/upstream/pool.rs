//! The upstream connection pool, shared by every runtime thread and filed by [`PeerKey`].
//! Idle HTTP/1.1 connections are handed out one request at a time, most recently used first
//! (a steady load keeps few connections warm and the rest age out); an HTTP/2 connection is
//! shared by every request to its peer for as long as it stays open.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::connection::UpstreamConnection;
use crate::peer::{Peer, PeerKey};

#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// Upper bound on any peer's idle timeout.
    pub idle_timeout: Duration,
    /// Idle HTTP/1.1 connections kept per peer; extra ones are closed when returned.
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
    conn: UpstreamConnection,
    expires: Instant,
}

#[derive(Default)]
struct PeerConnections {
    /// Idle HTTP/1.1 connections, oldest first.
    idle: VecDeque<Idle>,
    /// Open HTTP/2 connections, each usable by many requests at once.
    shared: Vec<Idle>,
}

pub struct ConnectionPool {
    config: PoolConfig,
    peers: Mutex<HashMap<Arc<PeerKey>, PeerConnections>>,
}

impl ConnectionPool {
    pub fn new(config: PoolConfig) -> Self {
        ConnectionPool {
            config,
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// A connection to `peer` that is open and unexpired: a shared HTTP/2 one, or the
    /// freshest idle HTTP/1.1 one (taken out of the pool until it is put back).
    pub fn checkout(&self, peer: &Peer) -> Option<UpstreamConnection> {
        let now = Instant::now();
        let mut peers = self.peers.lock();
        let conns = peers.get_mut(peer.key())?;
        conns
            .shared
            .retain(|s| s.expires > now && !s.conn.is_closed());
        if let Some(shared) = conns.shared.last_mut() {
            shared.expires = now + shared.conn.idle_timeout;
            let mut conn = shared.conn.clone_shared();
            conn.digest.reused = true;
            return Some(conn);
        }
        while let Some(idle) = conns.idle.pop_back() {
            if idle.expires > now && !idle.conn.is_closed() {
                let mut conn = idle.conn;
                conn.digest.reused = true;
                return Some(conn);
            }
        }
        None
    }

    /// Hand `conn` back once its exchange is over. A shared (HTTP/2) connection stays filed
    /// for other requests whatever became of this one; an HTTP/1.1 connection can take another
    /// request only if this exchange was written and read to the end, and is closed otherwise.
    pub fn release(&self, conn: UpstreamConnection, exchange_complete: bool) {
        if exchange_complete && !conn.is_shared() {
            self.put_back(conn);
        }
    }

    /// Keep `conn` for reuse: an idle HTTP/1.1 connection whose exchange is complete, or a
    /// new HTTP/2 connection, offered to other requests at once.
    pub(crate) fn put_back(&self, conn: UpstreamConnection) {
        if conn.is_closed() {
            return;
        }
        let expires = Instant::now() + conn.idle_timeout;
        let mut peers = self.peers.lock();
        if conn.is_shared() {
            if conn.digest.reused {
                // Still filed: the pool keeps its own handle on a shared connection.
                return;
            }
            let conns = peers.entry(conn.key.clone()).or_default();
            conns.shared.push(Idle { conn, expires });
            return;
        }
        if self.config.max_idle_per_peer == 0 {
            return;
        }
        let conns = peers.entry(conn.key.clone()).or_default();
        if conns.idle.len() >= self.config.max_idle_per_peer {
            // The oldest goes: it is the likeliest to have been closed by the peer.
            conns.idle.pop_front();
        }
        conns.idle.push_back(Idle { conn, expires });
    }

    /// Close connections that have expired or closed; the pool's evictor calls this
    /// periodically.
    pub fn evict_expired(&self) {
        let now = Instant::now();
        let mut peers = self.peers.lock();
        peers.retain(|_, conns| {
            conns
                .idle
                .retain(|c| c.expires > now && !c.conn.is_closed());
            conns
                .shared
                .retain(|c| c.expires > now && !c.conn.is_closed());
            !(conns.idle.is_empty() && conns.shared.is_empty())
        });
    }

    pub(crate) fn idle_timeout_for(&self, peer: &Peer) -> Duration {
        peer.timeouts().idle.min(self.config.idle_timeout)
    }

    /// Connections held now (idle HTTP/1.1 plus shared HTTP/2), across all peers.
    pub fn len(&self) -> usize {
        self.peers
            .lock()
            .values()
            .map(|c| c.idle.len() + c.shared.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
