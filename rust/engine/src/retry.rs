//! When a request may be sent upstream again: the policy a load balancer gives its requests,
//! and the rules that keep a retry from doing a request's work twice.

use std::time::Duration;

/// How many more tries a request may make after a failed one, and how long they may take.
/// A fixed `Peer` has the default: no retries, no limits beyond the peer's own timeouts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries after the first: a failed connect always may retry (nothing was sent); a
    /// failure after sending only under [`may_resend`].
    pub max_retries: usize,
    /// Bounds each try, from choosing its peer to the response head.
    pub try_timeout: Option<Duration>,
    /// Bounds all tries together, counted from the request's arrival.
    pub deadline: Option<Duration>,
}

/// The most request body kept to send again: a larger body, or one of unknown length, is
/// streamed and never resent.
pub const REPLAY_LIMIT: u64 = 64 * 1024;

/// Methods whose effect is the same however many times they arrive (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::TRACE
            | http::Method::PUT
            | http::Method::DELETE
    )
}

/// Whether a request that was sent and then failed may be sent again: its method is
/// idempotent, its body was kept, and the failure is the kind a server gives before
/// processing a request (a reused connection closed or reset, before any response byte).
/// A timeout is not: the request may be running still.
pub fn may_resend(
    method: &http::Method,
    body_kept: bool,
    connection_reused: bool,
    failure: crate::ErrorKind,
) -> bool {
    is_idempotent(method)
        && body_kept
        && connection_reused
        && failure == crate::ErrorKind::UpstreamClosed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn only_idempotent_requests_kept_whole_are_resent_after_a_reset() {
        let get = http::Method::GET;
        assert!(may_resend(&get, true, true, ErrorKind::UpstreamClosed));
        assert!(may_resend(
            &http::Method::PUT,
            true,
            true,
            ErrorKind::UpstreamClosed
        ));
        assert!(!may_resend(
            &http::Method::POST,
            true,
            true,
            ErrorKind::UpstreamClosed
        ));
        assert!(!may_resend(
            &http::Method::PATCH,
            true,
            true,
            ErrorKind::UpstreamClosed
        ));
        assert!(!may_resend(&get, false, true, ErrorKind::UpstreamClosed));
        assert!(!may_resend(&get, true, false, ErrorKind::UpstreamClosed));
        assert!(!may_resend(&get, true, true, ErrorKind::ReadTimeout));
    }
}
