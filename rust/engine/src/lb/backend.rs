//! One upstream a [`LoadBalancer`](super::LoadBalancer) can pick, and the error that names
//! the field of a bad backend list.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::peer::Peer;

/// Bad load-balancer configuration: `field` says where (`backends`, `backends[2].weight`,
/// `strategy`), so the Python layer can raise a `ValueError` a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error, for a field inside `outer` (`weight` inside `backends[2]`).
    pub(crate) fn within(mut self, outer: &str) -> Self {
        self.field = format!("{outer}.{}", self.field);
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// An upstream with its weight, whether it may be picked, and how many requests it is
/// serving now. Shared (`Arc`) between the balancer's list and every [`Selected`](super::Selected)
/// that holds one of its requests, so a list swapped out keeps counting until its last
/// request ends.
#[derive(Debug)]
pub struct Backend {
    peer: Peer,
    weight: u32,
    healthy: AtomicBool,
    in_flight: AtomicUsize,
}

impl Backend {
    /// `addr` is `host:port`, validated as [`Peer::new`] does; `weight` is at least 1.
    /// Healthy until told otherwise.
    pub fn new(addr: &str, weight: u32) -> Result<Self, ConfigError> {
        let peer = Peer::new(addr).map_err(|message| ConfigError::new("address", message))?;
        if weight == 0 {
            return Err(ConfigError::new("weight", "must be at least 1, got 0"));
        }
        Ok(Backend {
            peer,
            weight,
            healthy: AtomicBool::new(true),
            in_flight: AtomicUsize::new(0),
        })
    }

    pub fn addr(&self) -> &str {
        self.peer.addr()
    }

    /// Where to send a request picked for this backend (default timeouts and protocol: the
    /// proxy sets its own with `with_timeouts` / `with_protocol`).
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    pub fn weight(&self) -> u32 {
        self.weight
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Health checks (active or passive) mark a backend; selection skips unhealthy ones.
    /// Returns whether the health changed, so only changes need logging.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
    }

    /// Requests picked for this backend whose [`Selected`](super::Selected) is still alive.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(super) fn begin_request(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn end_request(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
