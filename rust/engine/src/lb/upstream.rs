//! Where a proxy sends requests: one fixed peer, or a balancer's pick per request. The pick
//! stays with the request (`Session::backend`) until its response ends, so least connections
//! and the backend's counts see it, and passive health checks hear how it went.

use std::sync::Arc;

use super::LoadBalancer;
use crate::error::{Error, ErrorKind, Result};
use crate::peer::Peer;
use crate::session::Session;

#[derive(Debug, Clone)]
pub enum Upstream {
    Peer(Peer),
    Balanced(Arc<LoadBalancer>),
}

impl Upstream {
    /// The peer for this try of `session`'s request (see [`LoadBalancer::select_for`]).
    pub fn select(&self, session: &mut Session) -> Result<Peer> {
        match self {
            Upstream::Peer(peer) => Ok(peer.clone()),
            Upstream::Balanced(balancer) => balancer.select_for(session),
        }
    }
}

impl LoadBalancer {
    /// Picks a backend for `session`'s request by its hash key, preferring one this request
    /// has not tried yet, and gives the request this balancer's retry policy. Fails (502)
    /// when no backend is healthy.
    pub fn select_for(&self, session: &mut Session) -> Result<Peer> {
        let key = self.hash_key().and_then(|key| key.extract(session));
        let tried: Vec<&str> = session.tries.iter().map(|t| &*t.peer).collect();
        let selected = self.select_untried(key.as_deref(), &tried).ok_or_else(|| {
            Error::new(
                ErrorKind::NoHealthyUpstream,
                format!("none of {} backends is healthy", self.backends().len()),
            )
        })?;
        let peer = selected.peer().clone();
        session.retry = *self.retry_policy();
        session.backend = Some(selected);
        Ok(peer)
    }
}
