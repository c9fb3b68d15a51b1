//! The upstream connection pool, shared by every runtime thread and filed by [`PeerKey`].
//! Idle HTTP/1.1 connections are handed out one request at a time, most recently used first
//! (a steady load keeps few connections warm and the rest age out); an HTTP/2 connection is
//! shared by every request to its peer for as long as it stays open.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::connection::UpstreamConnection;
use crate::peer::{Peer, PeerKeyMap};

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
    peers: Mutex<PeerKeyMap<PeerConnections>>,
    /// One connect at a time per shared-connection peer, so that a burst of first requests
    /// opens one HTTP/2 connection and the rest of the burst shares it.
    opening: Mutex<PeerKeyMap<Arc<tokio::sync::Mutex<()>>>>,
}

impl ConnectionPool {
    pub fn new(config: PoolConfig) -> Self {
        ConnectionPool {
            config,
            peers: Mutex::new(PeerKeyMap::default()),
            opening: Mutex::new(PeerKeyMap::default()),
        }
    }

    /// A connection to `peer` that is open and unexpired: a shared HTTP/2 one, or the
    /// freshest idle HTTP/1.1 one (taken out of the pool until it is put back).
    pub fn checkout(&self, peer: &Peer) -> Option<UpstreamConnection> {
        let now = Instant::now();
        // Idle time is the asking peer's: it is not part of the key, so the connection may
        // have been opened for a peer with another.
        let idle_timeout = self.idle_timeout_for(peer);
        let mut peers = self.peers.lock();
        let conns = peers.get_mut(peer.key())?;
        conns
            .shared
            .retain(|s| s.expires > now && !s.conn.is_closed());
        if let Some(shared) = conns.shared.last_mut() {
            shared.expires = now + idle_timeout;
            let mut conn = shared.conn.clone_shared();
            conn.digest.reused = true;
            conn.idle_timeout = idle_timeout;
            return Some(conn);
        }
        while let Some(idle) = conns.idle.pop_back() {
            if idle.expires > now && !idle.conn.is_closed() {
                let mut conn = idle.conn;
                conn.digest.reused = true;
                conn.idle_timeout = idle_timeout;
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
        drop(peers);
        // A gate nobody holds or waits on can go; the next connect makes a new one.
        self.opening
            .lock()
            .retain(|_, gate| Arc::strong_count(gate) > 1);
    }

    /// Held while a shared connection to `peer` is being opened.
    pub(crate) fn opening_gate(&self, peer: &Peer) -> Arc<tokio::sync::Mutex<()>> {
        self.opening
            .lock()
            .entry(peer.key().clone())
            .or_default()
            .clone()
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::super::connection::testing::{connection, Pipe};
    use super::*;
    use crate::peer::{PeerTimeouts, UpstreamProtocol};

    const PEER: &str = "127.0.0.1:8000";

    fn pool_keeping(max_idle_per_peer: usize) -> ConnectionPool {
        ConnectionPool::new(PoolConfig {
            max_idle_per_peer,
            ..Default::default()
        })
    }

    fn peer_with(timeouts: PeerTimeouts) -> Peer {
        Peer::new(PEER).unwrap().with_timeouts(timeouts)
    }

    fn idling_for(idle: Duration) -> PeerTimeouts {
        PeerTimeouts {
            idle,
            ..Default::default()
        }
    }

    /// A new connection to `peer`, with the idle timeout `pool` gives it (as `connect` does).
    async fn open(pool: &ConnectionPool, peer: &Peer) -> (UpstreamConnection, Pipe) {
        connection(peer, pool.idle_timeout_for(peer)).await
    }

    /// Which connection it is (each test connection has its own local port).
    fn id(conn: &UpstreamConnection) -> SocketAddr {
        conn.digest().local_addr
    }

    /// `n` new connections to `peer`, returned to `pool` in order, oldest first.
    async fn fill(pool: &ConnectionPool, peer: &Peer, n: usize) -> Vec<(SocketAddr, Pipe)> {
        let mut filed = Vec::new();
        for _ in 0..n {
            let (conn, pipe) = open(pool, peer).await;
            filed.push((id(&conn), pipe));
            pool.release(conn, true);
        }
        filed
    }

    /// Which connection a checkout hands out, if any; it says it was reused.
    fn checkout_id(pool: &ConnectionPool, peer: &Peer) -> Option<SocketAddr> {
        pool.checkout(peer).map(|conn| {
            assert!(
                conn.digest().reused,
                "a pooled connection says it is reused"
            );
            id(&conn)
        })
    }

    #[tokio::test(start_paused = true)]
    async fn the_most_recently_returned_connection_goes_out_first() {
        let pool = pool_keeping(8);
        let peer = Peer::new(PEER).unwrap();
        let filed = fill(&pool, &peer, 3).await;
        assert_eq!(pool.len(), 3);
        let newest = pool.checkout(&peer).unwrap();
        assert_eq!(id(&newest), filed[2].0);
        let middle = pool.checkout(&peer).unwrap();
        assert_eq!(id(&middle), filed[1].0);
        pool.release(middle, true);
        pool.release(newest, true);
        assert_eq!(checkout_id(&pool, &peer), Some(filed[2].0));
        assert_eq!(checkout_id(&pool, &peer), Some(filed[1].0));
        assert_eq!(checkout_id(&pool, &peer), Some(filed[0].0));
        assert_eq!(checkout_id(&pool, &peer), None);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_expire_at_the_peers_idle_timeout() {
        let pool = pool_keeping(8);
        let peer = peer_with(idling_for(Duration::from_secs(10)));
        let mut filed = fill(&pool, &peer, 1).await;
        tokio::time::advance(Duration::from_millis(9_999)).await;
        let conn = pool
            .checkout(&peer)
            .expect("fresh just before its idle timeout");
        // Idle time counts from the last return, not from the connect.
        pool.release(conn, true);
        tokio::time::advance(Duration::from_millis(9_999)).await;
        let conn = pool
            .checkout(&peer)
            .expect("fresh again after its last use");
        pool.release(conn, true);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(pool.checkout(&peer).is_none(), "kept past its idle timeout");
        filed.remove(0).1.closed_by_us().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_is_the_last_users() {
        // Idle timeouts are not part of the key: a connection opened for a patient peer
        // and used by a hasty one idles as the hasty one says.
        let pool = pool_keeping(8);
        let patient = peer_with(idling_for(Duration::from_secs(60)));
        let hasty = peer_with(idling_for(Duration::from_secs(1)));
        let _filed = fill(&pool, &patient, 1).await;
        let conn = pool.checkout(&hasty).expect("the same key");
        pool.release(conn, true);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            pool.checkout(&patient).is_none(),
            "kept past the last user's idle timeout"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_pools_idle_timeout_caps_the_peers() {
        let pool = ConnectionPool::new(PoolConfig {
            idle_timeout: Duration::from_secs(5),
            ..Default::default()
        });
        let peer = peer_with(idling_for(Duration::from_secs(60)));
        let _filed = fill(&pool, &peer, 1).await;
        tokio::time::advance(Duration::from_millis(4_999)).await;
        let conn = pool.checkout(&peer).expect("fresh before the pool's cap");
        pool.release(conn, true);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(pool.checkout(&peer).is_none(), "kept past the pool's cap");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_peer_closes_its_oldest_idle_connection() {
        let pool = pool_keeping(2);
        let peer = Peer::new(PEER).unwrap();
        let mut filed = fill(&pool, &peer, 3).await;
        assert_eq!(pool.len(), 2);
        let (_, oldest) = filed.remove(0);
        oldest.closed_by_us().await;
        assert_eq!(checkout_id(&pool, &peer), Some(filed[1].0));
        assert_eq!(checkout_id(&pool, &peer), Some(filed[0].0));
        assert_eq!(checkout_id(&pool, &peer), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_of_zero_keeps_no_idle_connection() {
        let pool = pool_keeping(0);
        let peer = Peer::new(PEER).unwrap();
        let mut filed = fill(&pool, &peer, 1).await;
        assert!(pool.is_empty());
        assert!(pool.checkout(&peer).is_none());
        filed.remove(0).1.closed_by_us().await;
    }

    #[tokio::test(start_paused = true)]
    async fn closed_connections_are_never_handed_out() {
        let pool = pool_keeping(8);
        let peer = Peer::new(PEER).unwrap();
        let mut filed = fill(&pool, &peer, 2).await;
        // The upstream closes the freshest one while it idles in the pool.
        let (_, newest) = filed.pop().unwrap();
        newest.hang_up().await;
        assert_eq!(checkout_id(&pool, &peer), Some(filed[0].0));
        assert_eq!(checkout_id(&pool, &peer), None);

        // One that closes while checked out is not put back either.
        let (conn, pipe) = open(&pool, &peer).await;
        pipe.hang_up().await;
        assert!(conn.is_closed());
        pool.release(conn, true);
        assert!(pool.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_incomplete_http1_exchange_closes_its_connection() {
        let pool = pool_keeping(8);
        let peer = Peer::new(PEER).unwrap();
        let (conn, pipe) = open(&pool, &peer).await;
        pool.release(conn, false);
        assert!(pool.is_empty());
        pipe.closed_by_us().await;
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_removes_expired_and_closed_connections() {
        let pool = pool_keeping(8);
        let peer = peer_with(idling_for(Duration::from_secs(10)));
        let mut expiring = fill(&pool, &peer, 1).await;
        tokio::time::advance(Duration::from_secs(5)).await;
        let fresh = fill(&pool, &peer, 1).await;
        let (_, closing) = fill(&pool, &peer, 1).await.pop().unwrap();
        closing.hang_up().await;
        assert_eq!(pool.len(), 3, "nothing is dropped until the evictor runs");
        tokio::time::advance(Duration::from_secs(5)).await;
        pool.evict_expired();
        assert_eq!(pool.len(), 1);
        expiring.remove(0).1.closed_by_us().await;
        assert_eq!(checkout_id(&pool, &peer), Some(fresh[0].0));

        // A peer with nothing left is forgotten altogether.
        tokio::time::advance(Duration::from_secs(10)).await;
        pool.evict_expired();
        assert!(pool.peers.lock().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn connections_serve_only_peers_with_the_same_key() {
        let pool = pool_keeping(8);
        let peer = Peer::new(PEER).unwrap();
        let _filed = fill(&pool, &peer, 1).await;
        let strangers = [
            Peer::new("127.0.0.1:8001").unwrap(),
            Peer::new(PEER)
                .unwrap()
                .with_protocol(UpstreamProtocol::Http2),
            peer_with(PeerTimeouts {
                write: Duration::from_secs(1),
                ..Default::default()
            }),
        ];
        for stranger in &strangers {
            assert_ne!(stranger.key(), peer.key());
            assert!(pool.checkout(stranger).is_none(), "{stranger:?} shared");
        }
        // Timeouts that the connection does not carry do not separate peers.
        let same_connection = peer_with(PeerTimeouts {
            read: Duration::from_millis(100),
            connect: Duration::from_millis(100),
            idle: Duration::from_secs(1),
            ..Default::default()
        });
        let conn = pool
            .checkout(&same_connection)
            .expect("same key, same pool");
        pool.release(conn, true);
        assert!(pool.checkout(&peer).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_connection_is_shared_while_it_stays_pooled() {
        let pool = pool_keeping(8);
        let peer =
            peer_with(idling_for(Duration::from_secs(10))).with_protocol(UpstreamProtocol::Http2);
        let (conn, pipe) = open(&pool, &peer).await;
        assert!(conn.is_shared());
        assert!(!conn.digest().reused);
        // What `UpstreamClient::open` does: offer it to others at once.
        pool.put_back(conn.clone_shared());
        let first = pool.checkout(&peer).expect("shared");
        let second = pool.checkout(&peer).expect("shared again");
        for handle in [&first, &second] {
            assert!(handle.digest().reused);
            assert_eq!(id(handle), id(&conn));
        }
        assert_eq!(pool.len(), 1, "one connection, however many handles");
        // Handing handles back, complete or not, leaves the one filed connection.
        pool.release(first, false);
        pool.release(second, true);
        pool.release(conn, true);
        assert_eq!(pool.len(), 1);

        // Each checkout counts as a use: it stays filed for its idle timeout after the last.
        tokio::time::advance(Duration::from_secs(8)).await;
        drop(pool.checkout(&peer).expect("fresh"));
        tokio::time::advance(Duration::from_secs(8)).await;
        drop(
            pool.checkout(&peer)
                .expect("its last use pushed its expiry"),
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(pool.checkout(&peer).is_none(), "kept past its idle timeout");
        pool.evict_expired();
        assert!(pool.is_empty());
        pipe.closed_by_us().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_http2_connection_is_not_shared() {
        let pool = pool_keeping(8);
        let peer = Peer::new(PEER)
            .unwrap()
            .with_protocol(UpstreamProtocol::Http2);
        let (conn, pipe) = open(&pool, &peer).await;
        pool.put_back(conn.clone_shared());
        pipe.hang_up().await;
        assert!(conn.is_closed());
        assert!(pool.checkout(&peer).is_none());
        assert!(
            pool.is_empty(),
            "checkout forgets a closed shared connection"
        );
    }
}
