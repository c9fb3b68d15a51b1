//! One downstream request as it moves through the proxy phases.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::body::ProxyBody;
use crate::digest::{DownstreamDigest, UpstreamDigest};
use crate::error::FailedTry;
use crate::lb::Selected;
use crate::peer::Peer;
use crate::retry::RetryPolicy;
use crate::rules::Rules;

pub struct Session {
    /// The request line and headers as the client sent them (filters may change them).
    pub req: http::request::Parts,
    /// The connection the request arrived on.
    pub downstream: Arc<DownstreamDigest>,
    /// The peer chosen by `upstream_peer`, once chosen (the last one, after retries).
    pub upstream: Option<Peer>,
    /// The connection the request went upstream on, once sent.
    pub upstream_digest: Option<UpstreamDigest>,
    /// When the request arrived.
    pub started: Instant,
    /// From sending the request upstream to its response head, once it has come.
    pub upstream_time: Option<std::time::Duration>,
    /// Whether the client's connection may carry another request after this one. The proxy
    /// clears it for requests it refused or found unusual; a Rust phase may clear it too (HTTP/1
    /// clients are then told `Connection: close`, and the connection closes after the
    /// response).
    pub keepalive: bool,
    /// The load balancer's pick for the current try, counted in flight on its backend until
    /// the response ends (or the next try picks again).
    pub backend: Option<Selected>,
    /// How this request may be tried again: a load balancer's policy, set when it picks
    /// (none for a fixed peer).
    pub retry: RetryPolicy,
    /// How long the client gave its call, counted from `started`: a gRPC call's
    /// `grpc-timeout`. Every try ends by then, as by `retry.deadline`.
    pub client_deadline: Option<std::time::Duration>,
    /// What sees the messages of the tunnel this request's handshake asks for, once
    /// `websocket_filter` gave one.
    pub websocket: Option<std::sync::Arc<dyn crate::websocket::MessageFilter>>,
    /// What each try's request body goes through, once `request_body_filter` gave it (see
    /// [`crate::body_filter`]).
    pub request_body_filter: Option<std::sync::Arc<dyn crate::body_filter::BodyFilter>>,
    /// The failed tries so far, in order.
    pub tries: Vec<FailedTry>,
    /// The index of the route that matched, in the router's list (see [`crate::route`]).
    pub route: Option<usize>,
    /// What the matched route strips from the path it sends upstream.
    pub strip_prefix: Option<Arc<str>>,
    /// The request's id, once a filter needed it: the client's `x-request-id`, or one made
    /// for it (see [`crate::filters::request_id`]).
    pub request_id: Option<http::HeaderValue>,
    /// The Cors filters that applied to the request, for the response phase.
    pub(crate) cors: crate::filters::CorsApplied,
    /// The filters and routes this request runs, loaded once when it arrived (a reload
    /// meanwhile does not change them); `None` outside the proxy (see [`Session::rules`]).
    pub rules: Option<Arc<Rules>>,
    /// The request head sent upstream: built once from `req` when the proxy first needs it.
    upstream_request: Option<http::request::Parts>,
    body: Option<ProxyBody>,
}

impl Session {
    /// When all tries must be over, counted from `started`: the balancer's retry deadline
    /// or the client's own (`client_deadline`), whichever comes first.
    #[inline]
    pub fn deadline(&self) -> Option<std::time::Duration> {
        match (self.retry.deadline, self.client_deadline) {
            (Some(ours), Some(clients)) => Some(ours.min(clients)),
            (ours, clients) => ours.or(clients),
        }
    }

    pub fn new(req: http::Request<ProxyBody>, downstream: Arc<DownstreamDigest>) -> Self {
        let (req, body) = req.into_parts();
        Session::with_body(req, downstream, Some(body))
    }

    /// A session for a request head with no body (tests, benchmarks, synthetic requests).
    pub fn from_parts(req: http::request::Parts, downstream: Arc<DownstreamDigest>) -> Self {
        Session::with_body(req, downstream, None)
    }

    /// Built in one piece: `Session { body, ..Session::from_parts(..) }` would build a whole
    /// session and copy it again (three memcpy calls per request, callgrind says).
    #[inline]
    fn with_body(
        req: http::request::Parts,
        downstream: Arc<DownstreamDigest>,
        body: Option<ProxyBody>,
    ) -> Self {
        // gRPC runs over HTTP/2 only: HTTP/1 requests skip the lookup.
        let client_deadline = if req.version == http::Version::HTTP_2 {
            crate::grpc::timeout(&req.headers)
        } else {
            None
        };
        Session {
            req,
            downstream,
            upstream: None,
            upstream_digest: None,
            started: Instant::now(),
            upstream_time: None,
            keepalive: true,
            backend: None,
            retry: RetryPolicy::default(),
            client_deadline,
            websocket: None,
            request_body_filter: None,
            tries: Vec::new(),
            route: None,
            strip_prefix: None,
            request_id: None,
            cors: Default::default(),
            rules: None,
            upstream_request: None,
            body,
        }
    }

    /// The filters and routes this request runs (none when it was given none).
    pub fn rules(&self) -> &Rules {
        self.rules.as_deref().unwrap_or(Rules::none())
    }

    /// Run `step` with the request's rules beside the session itself, lending the
    /// session's own reference rather than cloning it: `session.rules()` reads none
    /// inside, so no hook may run there.
    pub(crate) fn with_rules<R>(&mut self, step: impl FnOnce(&Rules, &mut Session) -> R) -> R {
        let rules = self.rules.take();
        let result = step(rules.as_deref().unwrap_or(Rules::none()), self);
        self.rules = rules;
        result
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.downstream.client_addr
    }

    /// The head to send upstream, built from `req` on first use (hop-by-hop headers gone,
    /// X-Forwarded-* set, the route's prefix stripped; see [`crate::forward::upstream_request`]).
    /// Built once: whoever asks first (the proxy, or a phase implementation that runs ahead)
    /// builds it.
    pub fn upstream_request(&mut self) -> &mut http::request::Parts {
        let Session {
            upstream_request,
            req,
            downstream,
            strip_prefix,
            ..
        } = self;
        upstream_request.get_or_insert_with(|| {
            let mut head = crate::forward::upstream_request(
                req,
                downstream.client_addr.ip(),
                downstream.scheme,
            );
            if let Some(prefix) = strip_prefix {
                crate::route::strip_prefix(&mut head, prefix);
            }
            head
        })
    }

    /// Install a head built elsewhere from this session's `req` (see `upstream_request`).
    pub fn set_upstream_request(&mut self, head: http::request::Parts) {
        self.upstream_request = Some(head);
    }

    pub fn take_upstream_request(&mut self) -> Option<http::request::Parts> {
        self.upstream_request.take()
    }

    /// The request body's length when it is known (a Content-Length, or no body); `None`
    /// for a streamed body of unknown length, or once the body has been taken.
    pub fn body_size(&self) -> Option<u64> {
        use http_body::Body;
        self.body.as_ref()?.size_hint().exact()
    }

    /// The downstream request body, while it has not been taken.
    pub fn body_mut(&mut self) -> Option<&mut ProxyBody> {
        self.body.as_mut()
    }

    /// Read the request body whole, up to `limit` bytes, before the upstream is chosen
    /// (Pingora's `read_request_body`, pingora#575): a phase may route or answer by what it
    /// says. The bytes are then the body sent upstream (its trailers, if any, are not), so
    /// reading it again gives them again. Fails with a 413 above `limit` (said before
    /// reading when the length is known), with the client's error when its upload fails,
    /// and once the body has been sent.
    pub async fn read_request_body(&mut self, limit: u64) -> crate::error::Result<bytes::Bytes> {
        use crate::error::{Error, ErrorKind};
        let Some(mut body) = self.body.take() else {
            return Err(Error::new(
                ErrorKind::Internal,
                "the request body was read after it had been sent upstream",
            ));
        };
        if !body.limit(limit) {
            // Left in place: a read with a larger limit may follow.
            self.body = Some(body);
            return Err(Error::new(
                ErrorKind::BodyTooLarge,
                format!("the request body is longer than {limit} bytes"),
            ));
        }
        let whole = body.read_whole().await?;
        self.body = Some(ProxyBody::full(whole.clone()));
        Ok(whole)
    }

    /// Put a request body (back) in place: the one a hook read whole, or filtered.
    pub fn set_body(&mut self, body: ProxyBody) {
        self.body = Some(body);
    }

    /// The downstream request body, for the proxy to forward; `None` once taken.
    pub fn take_body(&mut self) -> Option<ProxyBody> {
        self.body.take()
    }
}

/// A session for unit tests: `method uri` with `headers`, from client 10.1.2.3:5555.
#[cfg(test)]
pub(crate) fn test_session(method: &str, uri: &str, headers: &[(&str, &str)]) -> Session {
    let mut builder = http::Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let (parts, ()) = builder.body(()).unwrap().into_parts();
    let downstream = Arc::new(DownstreamDigest::tcp(
        ([10, 1, 2, 3], 5555).into(),
        ([127, 0, 0, 1], 80).into(),
    ));
    Session::from_parts(parts, downstream)
}
