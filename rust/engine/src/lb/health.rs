//! Backend health: what requests observe of their backend (passive checks) and, later, the
//! background checks that probe each backend (active checks).

use super::Backend;

/// What one request learned about its backend, for passive health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// Connecting to the backend failed (refused, unreachable, connect timeout).
    ConnectFailed,
    /// The exchange failed after connecting (reset, read timeout) before a response head.
    ExchangeFailed,
    /// The backend answered with this status (5xx counts against it).
    Status(u16),
}

impl Backend {
    /// Counts `observation` towards this backend's passive health. (Not acted on yet.)
    pub fn observe(&self, _observation: Observation) {}
}
