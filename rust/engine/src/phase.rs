//! The proxy phases: one trait whose methods the engine calls, in order, for every request.
//! Modelled on Pingora's `ProxyHttp`. `new_ctx` and `upstream_peer` must be written; every
//! other phase has a default, stated on it, so an implementation overrides only what it
//! needs.
//!
//! Order: `new_ctx`, `request_filter`, then for each attempt `upstream_peer`,
//! `upstream_request_filter` and the exchange (a failure to connect goes through
//! `fail_to_connect`, which may ask for another attempt), then `response_filter`; on any
//! failure `fail_to_proxy`; always `logging`, last. The engine's declarative filters and
//! routes run between them (see [`crate::proxy`]): request filters and the route before
//! `request_filter`, response filters after `response_filter`.

use std::future::Future;

use crate::error::{Error, Result};
use crate::peer::Peer;
use crate::response::Response;
use crate::session::Session;

/// The phases a Python application can override as hooks, in the order the engine runs them
/// (`fail_to_connect` only after a failed connect, `fail_to_proxy` instead of the ones after a
/// failure). The bindings derive their hook names from this list.
pub const HOOK_NAMES: &[&str] = &[
    "new_ctx",
    "request_filter",
    "upstream_peer",
    "upstream_request_filter",
    "fail_to_connect",
    "response_filter",
    "request_body_filter",
    "response_body_filter",
    "websocket_message",
    "fail_to_proxy",
    "logging",
];

pub trait ProxyHttp: Send + Sync + 'static {
    /// Per-request state handed to every phase.
    type Ctx: Send + 'static;

    /// Makes the per-request state; called once, before any phase.
    fn new_ctx(&self) -> Self::Ctx;

    /// First phase. Returning a response answers the client and skips the upstream.
    /// Default: `Ok(None)`, proxy the request.
    fn request_filter(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::Ctx,
    ) -> impl Future<Output = Result<Option<Response>>> + Send {
        async { Ok(None) }
    }

    /// Chooses where to send the request. Called again for each retry.
    fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Self::Ctx,
    ) -> impl Future<Output = Result<Peer>> + Send;

    /// Whether `upstream_peer` chooses for requests a route matched too (see
    /// [`crate::route`]). Default: false, a matched route's upstream is used and
    /// `upstream_peer` is asked only for requests no route matched.
    fn upstream_peer_overrides_routes(&self) -> bool {
        false
    }

    /// Edits the request about to be sent upstream (already stripped of hop-by-hop headers
    /// and carrying X-Forwarded-*), once per attempt, with the attempt's peer in
    /// `session.upstream`. Default: send it as it is.
    fn upstream_request_filter(
        &self,
        _session: &mut Session,
        _upstream_request: &mut http::request::Parts,
        _ctx: &mut Self::Ctx,
    ) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// Connecting to `peer` failed, before any of the request was sent. `error.retry` says
    /// whether the proxy will ask `upstream_peer` again: set when the request's retry policy
    /// (a load balancer's `max_retries`, deadline) allows another try. Return the error with
    /// `retry` changed to veto or force a retry (the engine stops at 16 tries whatever it
    /// says; `session.tries` lists the ones before). Default: the policy's decision.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &Peer,
        _ctx: &mut Self::Ctx,
        error: Error,
    ) -> impl Future<Output = Error> + Send {
        async { error }
    }

    /// Edits the upstream's response head before it goes to the client. Default: nothing.
    fn response_filter(
        &self,
        _session: &mut Session,
        _upstream_response: &mut http::response::Parts,
        _ctx: &mut Self::Ctx,
    ) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// Called when any phase or the upstream failed. Default: `None`, the engine's error
    /// page (502/504/500 by the error's kind).
    fn fail_to_proxy(
        &self,
        _session: &mut Session,
        _error: &Error,
        _ctx: &mut Self::Ctx,
    ) -> impl Future<Output = Option<Response>> + Send {
        async { None }
    }

    /// Once `request_filter` has passed the request on: the filter that sees each chunk of
    /// its body on the way upstream, or `None` (the default) to stream it as it came. With
    /// one, the request goes upstream without its Content-Length (chunked, over HTTP/1.1),
    /// as the filter may change the length. A body read whole in `request_filter` is
    /// filtered too.
    fn request_body_filter(
        &self,
        _session: &Session,
        _ctx: &mut Self::Ctx,
    ) -> Option<std::sync::Arc<dyn crate::body_filter::BodyFilter>> {
        None
    }

    /// After `response_filter`, for a response that has a body (not for HEAD, 1xx, 204 or
    /// 304): the filter that sees each chunk of it on the way to the client, or `None` (the
    /// default). With one, the response loses its Content-Length (chunked over HTTP/1.1) and
    /// its strong ETag is weakened. It sees the body as the upstream sent it; compression,
    /// when configured, encodes what it leaves.
    fn response_body_filter(
        &self,
        _session: &Session,
        _upstream_response: &http::response::Parts,
        _ctx: &mut Self::Ctx,
    ) -> Option<std::sync::Arc<dyn crate::body_filter::BodyFilter>> {
        None
    }

    /// For a WebSocket handshake (a request asking to switch protocols): the filter that sees
    /// each message of the tunnel it becomes, or `None` (the default) for a tunnel that only
    /// copies bytes. With one, the handshake goes without `Sec-WebSocket-Extensions`, so that
    /// no extension (permessage-deflate) hides the messages from it.
    fn websocket_filter(
        &self,
        _session: &Session,
        _ctx: &mut Self::Ctx,
    ) -> Option<std::sync::Arc<dyn crate::websocket::MessageFilter>> {
        None
    }

    /// Always last, once the response has been sent (or has failed). Synchronous because it
    /// runs when the response body is dropped; implementations that need to do I/O hand the
    /// work off rather than block. Default: nothing (the access log is the engine's own).
    fn logging(&self, _session: &mut Session, _error: Option<&Error>, _ctx: &mut Self::Ctx) {}
}
