//! The Ketama ring of consistent hashing, laid out as nginx's `hash ... consistent` lays it
//! (and Pingora's pingora-ketama after it): 160 points per unit of weight, each point the
//! CRC32 of the backend's host, a zero byte, its port, then the previous point's hash. Keys
//! hash with the same CRC32, so a key reaches the backend it would reach under nginx.

use std::sync::Arc;

use super::Backend;

const POINTS_PER_WEIGHT: u32 = 160;

#[derive(Debug, Clone, Copy)]
struct Point {
    hash: u32,
    /// Index into the balancer's backend list.
    backend: u32,
}

#[derive(Debug)]
pub(super) struct Ring {
    /// Sorted by hash, one point per hash.
    points: Box<[Point]>,
}

impl Ring {
    pub(super) fn new(backends: &[Arc<Backend>]) -> Self {
        let mut points = Vec::new();
        for (index, backend) in backends.iter().enumerate() {
            // Peer::new checked there is a ':'; nginx splits at the last one too, so an IPv6
            // host keeps its brackets.
            let (host, port) = backend
                .addr()
                .rsplit_once(':')
                .unwrap_or((backend.addr(), ""));
            let mut base = crc32fast::Hasher::new();
            base.update(host.as_bytes());
            base.update(&[0]);
            base.update(port.as_bytes());
            let mut previous: u32 = 0;
            // At most MAX_WEIGHT * 160 points each: no overflow.
            for _ in 0..backend.weight() * POINTS_PER_WEIGHT {
                let mut hasher = base.clone();
                hasher.update(&previous.to_le_bytes());
                previous = hasher.finalize();
                points.push(Point {
                    hash: previous,
                    backend: index as u32,
                });
            }
        }
        points.sort_unstable_by_key(|point| (point.hash, point.backend));
        points.dedup_by_key(|point| point.hash);
        Ring {
            points: points.into_boxed_slice(),
        }
    }

    /// The backend owning `key`: the first point at or after the key's hash (wrapping),
    /// walking on past points of backends it may not pick.
    pub(super) fn lookup(
        &self,
        key: &[u8],
        backends: &[Arc<Backend>],
        usable: impl Fn(&Backend) -> bool,
    ) -> Option<usize> {
        let hash = crc32fast::hash(key);
        let start = self.points.partition_point(|point| point.hash < hash);
        let (wrapped, from_key) = self.points.split_at(start);
        from_key
            .iter()
            .chain(wrapped)
            .map(|point| point.backend as usize)
            .find(|&index| usable(&backends[index]))
    }
}
