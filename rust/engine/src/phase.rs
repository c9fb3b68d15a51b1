//! The proxy phases: one trait whose methods the engine calls, in order, for every request.
//! Modelled on Pingora's `ProxyHttp`; every method but `new_ctx` and `upstream_peer` has a
//! default that does nothing, so an implementation overrides only what it needs.

use std::future::Future;

use crate::error::{Error, Result};
use crate::peer::Peer;
use crate::response::Response;
use crate::session::Session;

/// The phases an application can override, in the order the engine runs them (`fail_to_proxy`
/// instead of the ones after a failure). Language bindings name their hooks from this list.
pub const HOOK_NAMES: &[&str] = &[
    "new_ctx",
    "request_filter",
    "upstream_peer",
    "upstream_request_filter",
    "response_filter",
    "fail_to_proxy",
    "logging",
];

pub trait ProxyHttp: Send + Sync + 'static {
    /// Per-request state handed to every phase.
    type Ctx: Send + 'static;

    fn new_ctx(&self) -> Self::Ctx;

    /// First phase. Returning a response answers the client and skips the upstream.
    fn request_filter(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::Ctx,
    ) -> impl Future<Output = Result<Option<Response>>> + Send {
        async { Ok(None) }
    }

    /// Chooses where to send the request.
    fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Self::Ctx,
    ) -> impl Future<Output = Result<Peer>> + Send;

    /// Edits the request about to be sent upstream (already stripped of hop-by-hop headers
    /// and carrying X-Forwarded-*).
    fn upstream_request_filter(
        &self,
        _session: &mut Session,
        _upstream_request: &mut http::request::Parts,
        _ctx: &mut Self::Ctx,
    ) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// Edits the upstream's response head before it goes to the client.
    fn response_filter(
        &self,
        _session: &mut Session,
        _upstream_response: &mut http::response::Parts,
        _ctx: &mut Self::Ctx,
    ) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// Called when any phase or the upstream failed. `None` sends the default error page
    /// (502/504/500 by the error's kind).
    fn fail_to_proxy(
        &self,
        _session: &mut Session,
        _error: &Error,
        _ctx: &mut Self::Ctx,
    ) -> impl Future<Output = Option<Response>> + Send {
        async { None }
    }

    /// Always last, once the response has been sent (or has failed). Synchronous because it
    /// runs when the response body is dropped; implementations that need to do I/O hand the
    /// work off rather than block.
    fn logging(&self, _session: &mut Session, _error: Option<&Error>, _ctx: &mut Self::Ctx) {}
}
