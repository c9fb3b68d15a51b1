//! One upstream a [`LoadBalancer`](super::LoadBalancer) can pick, and the error that names
//! the field of a bad backend list.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use super::health::{HealthConfig, PassiveState};
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
    pub fn within(mut self, outer: &str) -> Self {
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

/// An upstream with its weight, whether it may be picked, how many requests it is serving
/// now, and its totals. Shared (`Arc`) between the balancer's list and every
/// [`Selected`](super::Selected) that holds one of its requests, so a list swapped out keeps
/// counting until its last request ends.
#[derive(Debug)]
pub struct Backend {
    peer: Peer,
    weight: u32,
    /// The active checks' verdict (see [`health`](super::health)).
    healthy: AtomicBool,
    passive: PassiveState,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    failures: AtomicU64,
    health: Arc<HealthConfig>,
}

/// The peer for a backend spec; errors name the field (`address` or `weight`).
pub(super) fn check_spec(addr: &str, weight: u32) -> Result<Peer, ConfigError> {
    let peer = Peer::new(addr).map_err(|message| ConfigError::new("address", message))?;
    if !(1..=MAX_WEIGHT).contains(&weight) {
        return Err(ConfigError::new(
            "weight",
            format!("must be 1 to {MAX_WEIGHT}, got {weight}"),
        ));
    }
    Ok(peer)
}

/// The largest weight: consistent hashing puts 160 points on its ring per unit of weight,
/// so a weight in the millions would cost gigabytes (nginx caps weights too).
pub const MAX_WEIGHT: u32 = 10_000;

/// A backend's numbers at one moment, for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus {
    pub addr: String,
    pub weight: u32,
    pub healthy: bool,
    pub in_flight: usize,
    /// Times it was selected.
    pub requests: u64,
    /// Failures observed (connect failures, failed exchanges, 5xx).
    pub failures: u64,
}

impl Backend {
    /// `addr` is `host:port`, validated as [`Peer::new`] does; `weight` is at least 1.
    /// Healthy until told otherwise; passive checks with their defaults.
    pub fn new(addr: &str, weight: u32) -> Result<Self, ConfigError> {
        Self::checked(addr, weight, Arc::default())
    }

    /// As [`new`](Self::new), checked as `health` says.
    pub(super) fn checked(
        addr: &str,
        weight: u32,
        health: Arc<HealthConfig>,
    ) -> Result<Self, ConfigError> {
        let peer = check_spec(addr, weight)?;
        Ok(Backend {
            peer,
            weight,
            healthy: AtomicBool::new(true),
            passive: PassiveState::default(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            health,
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

    /// Whether selection may pick it: it passes active checks and passive checks have not
    /// ejected it. Two relaxed loads while it is not ejected.
    pub fn is_healthy(&self) -> bool {
        self.passes_active_checks() && self.passive.admits(self)
    }

    /// The active checks' verdict alone (true without active checks).
    pub fn passes_active_checks(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether passive checks have it out for a cool-down now.
    pub fn is_ejected(&self) -> bool {
        self.passive.is_ejected()
    }

    /// Sets the active checks' verdict; selection skips a backend that fails them. Returns
    /// whether it changed, so only changes need logging.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
    }

    /// Requests picked for this backend whose [`Selected`](super::Selected) is still alive.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Times this backend was selected.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Failures [observed](Self::observe) on it.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> BackendStatus {
        BackendStatus {
            addr: self.addr().to_owned(),
            weight: self.weight,
            // Without ending a cool-down (what a selection does): a report changes nothing.
            healthy: self.passes_active_checks() && !self.passive.keeps_out(),
            in_flight: self.in_flight(),
            requests: self.requests(),
            failures: self.failures(),
        }
    }

    pub(super) fn health(&self) -> &HealthConfig {
        &self.health
    }

    pub(super) fn passive_state(&self) -> &PassiveState {
        &self.passive
    }

    pub(super) fn count_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn begin_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn end_request(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
