//! Runs one request through the phases of a [`ProxyHttp`], in order, and streams the answer
//! back. Every phase is called here, for every implementation: Rust steps (routes, balancers,
//! filters) slot in between them, and a failed connect can ask `upstream_peer` again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::access_log::{AccessLog, AccessRecord, Arrival};
use crate::body::{BodyProgress, BoxError, ProxyBody};
use crate::digest::DownstreamDigest;
use crate::error::{Error, ErrorKind, ErrorSide, FailedTry, Result};
use crate::filters::Step;
use crate::forward;
use crate::lb::Observation;
use crate::phase::ProxyHttp;
use crate::response::Response;
use crate::retry;
use crate::rules::{Rules, RulesHandle};
use crate::session::Session;
use crate::upstream::{ConnectionPool, Exchange, UpstreamClient, UpstreamConnection};
use crate::validate::{self, Admission};

/// More tries than this for one request means an implementation that keeps asking for
/// retries: stop there.
const MAX_CONNECT_ATTEMPTS: usize = 16;

/// Whether the request's retry policy allows another try after the one that just failed
/// (not yet in `session.tries`).
#[inline]
fn retries_left(session: &Session) -> bool {
    session.tries.len() < session.retry.max_retries
        && session
            .deadline()
            .is_none_or(|deadline| session.started.elapsed() < deadline)
}

/// Keeps a failed try for the request's final error: when it was picked by a balancer or
/// is retried (a lone request to a fixed peer has its one error, and no list to allocate).
fn record_try(session: &mut Session, peer: &crate::Peer, error: &Error) {
    if session.backend.is_some() || error.retry || !session.tries.is_empty() {
        session.tries.push(FailedTry::new(peer, error));
    }
}

/// When a try must end: its own timeout from when its peer was chosen, or the request's
/// deadline, whichever comes first.
#[derive(Clone, Copy)]
struct TryLimit {
    at: std::time::Instant,
    /// The request's deadline, not the try's own timeout: running out of it says nothing
    /// about the backend.
    by_deadline: bool,
}

impl TryLimit {
    /// The limit of a try starting now; `None` (no timer at all) for requests with neither,
    /// as to a fixed peer.
    #[inline]
    fn starting_now(session: &Session) -> Option<TryLimit> {
        let policy = &session.retry;
        let own = policy.try_timeout.map(|t| std::time::Instant::now() + t);
        let overall = session.deadline().map(|d| session.started + d);
        match (own, overall) {
            (Some(own), Some(overall)) if overall < own => Some(TryLimit {
                at: overall,
                by_deadline: true,
            }),
            (Some(at), _) => Some(TryLimit {
                at,
                by_deadline: false,
            }),
            (None, Some(at)) => Some(TryLimit {
                at,
                by_deadline: true,
            }),
            (None, None) => None,
        }
    }
}

/// `inner`'s output, or `None` once `limit` has passed. One future type whether or not there is
/// a limit, awaited at one place: without a limit it is `inner` and a `None` (no timer, and
/// the compiler keeps `inner` inlined in its caller as before there were limits).
struct Limited<F> {
    inner: F,
    /// Boxed: rare, and kept out of every request's future.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<F: Future + Unpin> Limited<F> {
    fn new(inner: F, limit: Option<TryLimit>) -> Self {
        Limited {
            inner,
            sleep: limit.map(|limit| Box::pin(tokio::time::sleep_until(limit.at.into()))),
        }
    }
}

impl<F: Future + Unpin> Future for Limited<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(output) = Pin::new(&mut self.inner).poll(cx) {
            return Poll::Ready(Some(output));
        }
        match self.sleep.as_mut().map(|sleep| sleep.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(None),
            _ => Poll::Pending,
        }
    }
}

fn try_timed_out(kind: ErrorKind, peer: &crate::Peer, limit: Option<TryLimit>) -> Error {
    let what = match limit {
        Some(TryLimit {
            by_deadline: true, ..
        }) => "the request's deadline passed",
        _ => "the try's time limit (try_timeout) passed",
    };
    Error::new(kind, what).with_peer(peer)
}

/// Before a try connects: whether to read the request body whole (up to
/// [`retry::REPLAY_LIMIT`]) into `kept`, because a failure after sending could be retried and
/// the tries after must send it again. Only requests that can be resent at all (retries left,
/// an idempotent method, a known small length) wait for their whole body, and they do before
/// any upstream connection is taken (a pooled one would sit idle meanwhile).
fn must_keep(session: &Session, kept: &Option<Bytes>) -> bool {
    kept.is_none()
        && retries_left(session)
        && retry::is_idempotent(&session.req.method)
        && session
            .body_size()
            .is_some_and(|n| n <= retry::REPLAY_LIMIT)
}

/// Reads the request body into `kept` (see [`must_keep`]).
async fn keep_for_resend(session: &mut Session, kept: &mut Option<Bytes>) -> Result<()> {
    let bytes = match session.take_body() {
        // Of known, small length (a body with a length has no trailers).
        Some(body) if !body.is_end_stream() => body.read_whole().await?,
        _ => Bytes::new(),
    };
    *kept = Some(bytes);
    Ok(())
}

/// The body this try sends: the kept one, else the client's (streamed; sent only once);
/// through the request's body filter, if it has one (a resent body is filtered again, from
/// the client's bytes).
fn body_to_send(session: &mut Session, kept: &Option<Bytes>) -> ProxyBody {
    let body = match kept {
        Some(bytes) => ProxyBody::full(bytes.clone()),
        None => session.take_body().unwrap_or_else(ProxyBody::empty),
    };
    match &session.request_body_filter {
        Some(filter) if !body.is_end_stream() => body.filtered(filter.clone()),
        _ => body,
    }
}

/// How a try's exchange ended, short of an error for the client.
enum Tried {
    /// The response head came (it is in the caller's slot); the upload's progress.
    Answered(BodyProgress),
    /// Sending failed, in a way that allows sending the request again.
    Again,
    /// A pooled connection turned out closed and opening a new one failed: nothing was
    /// sent, so this is a failed connect (the flag: the request's deadline ran out).
    ConnectFailed(Error, bool),
}

/// An upstream's 101: taken when the client asked to switch to what the upstream switched
/// to (see [`crate::upgrade`]), and refused (502) otherwise, rather than tunnelling bytes we
/// would no longer read as HTTP.
fn switching(session: &mut Session, head: &mut http::response::Parts) -> Result<()> {
    let asked = crate::upgrade::requested(&session.req);
    let switched_to = head.headers.get(http::header::UPGRADE);
    let agreed = match (asked, switched_to) {
        (Some(asked), Some(to)) => crate::upgrade::offers(asked, to),
        _ => false,
    };
    if !agreed {
        return Err(Error::new(
            ErrorKind::UpstreamProtocol,
            "the upstream switched protocols to one the client did not ask for",
        ));
    }
    // A request the proxy takes nothing after (one with a body it could not trust, or a
    // client's `Connection: close`) does not become a tunnel: bytes after it would reach the
    // upstream unread.
    if !session.keepalive {
        return Err(Error::new(
            ErrorKind::InvalidRequest,
            "an upgrade on a connection that must close after this request",
        )
        .with_status(400));
    }
    forward::switching_headers(&mut head.headers);
    if let Some(switch) = head.extensions.get::<crate::upgrade::UpstreamUpgrade>() {
        switch.set_filter(session.websocket.take());
    }
    Ok(())
}

/// Have the client's connection close once `response` is sent. HTTP/1 only: hyper reads
/// this header of ours and closes after the response (HTTP/2 has no such header; its
/// connection ends with GOAWAY).
pub fn close_after<B>(response: &mut http::Response<B>, request_version: http::Version) {
    static CLOSE: http::HeaderValue = http::HeaderValue::from_static("close");
    if request_version <= http::Version::HTTP_11 {
        response
            .headers_mut()
            .insert(http::header::CONNECTION, CLOSE.clone());
    }
}

/// How the proxy service treats every request, whatever its phases decide.
#[derive(Debug, Clone, Default)]
pub struct ProxyConfig {
    /// Where a line per request goes; `None` for no access log.
    pub access_log: Option<Arc<AccessLog>>,
    /// The declarative filters and routes run between the phases, swappable while serving
    /// (see [`crate::rules`]).
    pub rules: RulesHandle,
    /// Compress upstream responses for clients that accept it; `None` leaves them as sent.
    pub compression: Option<Arc<crate::compression::Compression>>,
}

pub struct ProxyService<P: ProxyHttp> {
    proxy: Arc<P>,
    upstream: UpstreamClient,
    config: ProxyConfig,
}

impl<P: ProxyHttp> ProxyService<P> {
    pub fn new(proxy: Arc<P>, upstream: UpstreamClient, config: ProxyConfig) -> Self {
        ProxyService {
            proxy,
            upstream,
            config,
        }
    }

    pub fn pool(&self) -> &Arc<ConnectionPool> {
        self.upstream.pool()
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// The holder of the filters and routes: a new set stored in it applies to the requests
    /// that arrive from then on.
    pub fn rules(&self) -> &RulesHandle {
        &self.config.rules
    }

    /// Proxy one request that arrived on `downstream`.
    pub async fn handle(
        &self,
        req: http::Request<ProxyBody>,
        downstream: Arc<DownstreamDigest>,
    ) -> http::Response<ResponseBody<P>> {
        // Made in its box: a session on the stack would be part of this future.
        let mut state = Box::new(RequestState {
            session: Session::new(req, downstream),
            ctx: self.proxy.new_ctx(),
            access: None,
        });
        // Once, for the whole request: its filters, route and response filters come from one
        // set, whatever a reload does meanwhile.
        state.session.rules = Some(self.config.rules.load());
        state.access = self.config.access_log.as_ref().map(|log| Access {
            log: log.clone(),
            arrival: Arrival::new(&state.session.req),
        });
        // If the client goes away mid-phase, hyper drops this future; the guard still runs
        // the access log and the `logging` phase.
        let mut request = InFlight {
            state: Some(state),
            service: self,
        };
        let RequestState { session, ctx, .. } = &mut **request
            .state
            .as_mut()
            .expect("state is taken only at the end");
        let (mut response, upstream, error) = self.respond(session, ctx).await;
        if !session.keepalive {
            close_after(&mut response, session.req.version);
        }
        let state = request.state.take().expect("state is still here");
        let mut status = response.status().as_u16();
        if let Some(error) = error.as_ref().filter(|_| status == 200) {
            // A gRPC call's failure is answered 200 with its grpc-status: the log says the
            // failure's own status, so that monitoring by 5xx sees it.
            if crate::grpc::is_call(&state.session.req.headers) {
                status = error.status;
            }
        }
        let finish = self.finish(state, status, error);
        response.map(|body| ResponseBody {
            inner: body,
            upstream,
            finish: Some(finish),
            bytes: 0,
            error: None,
            ended: false,
        })
    }

    /// The response to send: the upstream's, a phase's own, or an error page.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &mut P::Ctx,
    ) -> (http::Response<ProxyBody>, Option<PoolReturn>, Option<Error>) {
        let error = match self.proxy_phases(session, ctx).await {
            Ok(Proxied::Upstream {
                head,
                body,
                connection,
                upload,
            }) => {
                // A connection that switched protocols is the tunnel's, not the pool's (told by
                // what the upstream client left, not the status a filter may have changed).
                if head
                    .extensions
                    .get::<crate::upgrade::UpstreamUpgrade>()
                    .is_some()
                {
                    return (http::Response::from_parts(head, body), None, None);
                }
                let pooled = PoolReturn {
                    connection,
                    pool: self.upstream.pool().clone(),
                    upload,
                };
                return (http::Response::from_parts(head, body), Some(pooled), None);
            }
            Ok(Proxied::Local(mut response)) => {
                if let Some(filters) = &session.rules().filters {
                    filters.on_local_response(session, &mut response.headers);
                }
                return (response.into_http(), None, None);
            }
            Err(mut error) => {
                error.tries = std::mem::take(&mut session.tries).into_boxed_slice();
                error
            }
        };
        if error.side == ErrorSide::Client {
            // What follows on a connection whose client erred cannot be trusted to be framed
            // as we think.
            session.keepalive = false;
        }
        let client = session.client_addr();
        if error.side == ErrorSide::Client {
            // Any client can send these at will: at warn, they would be a way to fill the
            // disk (nginx logs them at info). The access log still names the error.
            tracing::debug!(%client, side = error.side.as_str(), "{error}");
        } else if error.kind != ErrorKind::HookError {
            tracing::warn!(%client, side = error.side.as_str(), "{error}");
        }
        let mut page = match self.proxy.fail_to_proxy(session, &error, ctx).await {
            Some(page) => page,
            None if crate::grpc::is_call(&session.req.headers) => {
                let deadline_passed = session
                    .client_deadline
                    .is_some_and(|deadline| session.started.elapsed() >= deadline);
                let request_type = session.req.headers.get(http::header::CONTENT_TYPE);
                crate::grpc::error_response(&error, deadline_passed, request_type)
            }
            None => Response::error_page(&error),
        };
        if let Some(filters) = &session.rules().filters {
            filters.on_local_response(session, &mut page.headers);
        }
        (page.into_http(), None, Some(error))
    }

    async fn proxy_phases(&self, session: &mut Session, ctx: &mut P::Ctx) -> Result<Proxied> {
        if session.req.method == http::Method::CONNECT {
            return Err(Error::new(
                ErrorKind::InvalidRequest,
                "CONNECT is not supported by a reverse proxy",
            )
            .with_status(405));
        }
        if validate::check(&session.req)? == Admission::ProxyThenClose {
            session.keepalive = false;
        }
        // Path conditions must match the path the upstream will read, so filters, routes,
        // hooks and the upstream all get its canonical form. Apps with neither forward the
        // path as sent, as nginx's `proxy_pass` without a URI does.
        if !session.rules().is_empty() {
            crate::path::normalize_request(&mut session.req)?;
        }
        // Before any phase, so that a filter that answers leaves every hook out; the route
        // after them, on the request as they left it, so every phase sees it. The request's
        // own reference to its set is lent for these steps (no hook runs among them, and so
        // none reads `session.rules()` meanwhile) rather than cloned.
        let rules = session
            .rules
            .take()
            .expect("handle() loaded the request's rules");
        if let Some(filters) = &rules.filters {
            let answer = match filters.on_request(session) {
                Step::Continue => None,
                Step::Answer(answer) => Some(answer),
                // Boxed: only apps with a filter that waits pay for its future.
                Step::Wait(at) => Box::pin(filters.resume(session, at)).await,
            };
            if let Some(answer) = answer {
                session.rules = Some(rules);
                return Ok(Proxied::Local(answer));
            }
        }
        if let Some(routes) = &rules.routes {
            routes.router().route(session);
        }
        session.rules = Some(rules);
        if let Some(response) = self.proxy.request_filter(session, ctx).await? {
            return Ok(Proxied::Local(response));
        }
        // Asked here, applied as each try sends the body (a body read whole later, in a
        // retry's upstream_peer, is read as the client sent it).
        if session.body_mut().is_some_and(|body| !body.is_end_stream()) {
            session.request_body_filter = self.proxy.request_body_filter(session, ctx);
        }
        let mut kept: Option<Bytes> = None;
        // Filled by the try that gets a response head (an out-slot rather than a return value:
        // the exchange is big, and each level it is returned through copies it).
        let mut answer = None;
        let progress = loop {
            let (peer, connection, limit) = self.connect(session, ctx, &mut kept).await?;
            let exchanging = self.exchange(session, &peer, connection, limit, &kept, &mut answer);
            match exchanging.await? {
                Tried::Answered(progress) => break progress,
                Tried::Again => {}
                Tried::ConnectFailed(error, by_deadline) => {
                    // Boxed: rare, and inline it would grow every request's future.
                    let failed = self.connect_failed(session, ctx, &peer, error, by_deadline);
                    Box::pin(failed).await?;
                }
            }
        };
        let mut exchange: Exchange = answer.expect("the try that succeeded left its exchange");
        session.upstream_digest = Some(*exchange.connection.digest());
        let mut head = exchange.head;
        if let Some(backend) = &session.backend {
            backend.observe(Observation::Status(head.status.as_u16()));
        }
        if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
            switching(session, &mut head)?;
        } else {
            forward::response_headers(&mut head.headers);
        }
        self.proxy.response_filter(session, &mut head, ctx).await?;
        session.with_rules(|rules, session| {
            if let Some(filters) = &rules.filters {
                filters.on_response(session, &mut head);
            }
        });
        self.shape_response_body(session, &mut head, &mut exchange.body, ctx);
        Ok(Proxied::Upstream {
            head,
            body: exchange.body,
            connection: exchange.connection,
            upload: progress,
        })
    }

    /// Put the response body through what the app has it go through: its body filter, then
    /// compression. In place, as the rare case: a body moved through here and back would be
    /// copied on every request.
    fn shape_response_body(
        &self,
        session: &Session,
        head: &mut http::response::Parts,
        body: &mut ProxyBody,
        ctx: &mut P::Ctx,
    ) {
        // Not a 206 either: its Content-Range describes the bytes as they came.
        if crate::body::response_has_body(&session.req.method, head.status)
            && head.status != http::StatusCode::SWITCHING_PROTOCOLS
            && head.status != http::StatusCode::PARTIAL_CONTENT
        {
            if let Some(filter) = self.proxy.response_body_filter(session, head, ctx) {
                head.headers.remove(http::header::CONTENT_LENGTH);
                crate::compression::weaken_etag(&mut head.headers);
                let unfiltered = std::mem::replace(body, ProxyBody::empty());
                *body = unfiltered.filtered(filter);
            }
        }
        if let Some(compression) = &self.config.compression {
            let length = body.size_hint().exact();
            let req = &session.req;
            let plan = compression.start(&req.method, &req.headers, head, length);
            let plain = std::mem::replace(body, ProxyBody::empty());
            *body = plain.coded(plan);
        }
    }

    /// Send the request over `connection` and wait for the response head, left in `answer`
    /// with the upload's progress returned. `Again` when sending failed in a way that allows
    /// sending it again (see [`retry::may_resend`]): the caller then picks a peer again.
    async fn exchange(
        &self,
        session: &mut Session,
        peer: &crate::Peer,
        connection: UpstreamConnection,
        limit: Option<TryLimit>,
        kept: &Option<Bytes>,
        answer: &mut Option<Exchange>,
    ) -> Result<Tried> {
        let mut head = session
            .take_upstream_request()
            .expect("connect() built the upstream request");
        forward::for_upstream_protocol(&mut head, peer.protocol());
        let mut body = body_to_send(session, kept);
        let progress = body.progress();
        let reused = connection.digest().reused;
        let request = http::Request::from_parts(head, body);
        let sent = std::time::Instant::now();
        // Boxed: the exchange's future (the request, hyper's send, the read timer) is the
        // bulk of a request's; inline, every future above it would carry it and be moved
        // with it (see the size test below).
        let exchanging = Box::pin(self.upstream.send(peer, connection, request, &progress));
        // In a block of its own: the exchange's result is big, and what follows awaits.
        let (error, by_deadline) = {
            let exchanged = Limited::new(exchanging, limit).await;
            let by_deadline = exchanged.is_none() && limit.is_some_and(|l| l.by_deadline);
            match exchanged
                .unwrap_or_else(|| Err(try_timed_out(ErrorKind::ReadTimeout, peer, limit)))
            {
                Ok(exchange) => {
                    session.upstream_time = Some(sent.elapsed());
                    *answer = Some(exchange);
                    return Ok(Tried::Answered(progress));
                }
                Err(error) => (error, by_deadline),
            }
        };
        if error.kind.is_connect_failure() {
            // A pooled connection turned out closed, and opening a new one failed: nothing
            // was sent, so this is a failed connect, retried as one.
            return Ok(Tried::ConnectFailed(error, by_deadline));
        }
        // What says nothing about the backend: a client that failed mid-upload, the
        // keep-alive race (a reused connection closed as the request arrived), the request's
        // deadline running out.
        let race = reused && error.kind == ErrorKind::UpstreamClosed;
        let blame = error.side == ErrorSide::Upstream && !race && !by_deadline;
        if let Some(backend) = session.backend.as_ref().filter(|_| blame) {
            backend.observe(Observation::ExchangeFailed);
        }
        let resend = retry::may_resend(&session.req.method, kept.is_some(), reused, error.kind)
            && retries_left(session);
        record_try(session, peer, &error);
        if !resend {
            return Err(error);
        }
        tracing::debug!(peer = peer.addr(), "{error}; sending the request again");
        // The next try picks its backend again.
        session.backend = None;
        Ok(Tried::Again)
    }

    /// Choose a peer, prepare the request for it and connect; a failed connect goes
    /// through `fail_to_connect`, which may have us choose again. Each try filters a head
    /// built afresh from `session.req` for its own peer, before connecting (a failing filter
    /// opens no connection). Returns the try's time limit too, counted from its choice of
    /// peer, for the exchange to keep to.
    async fn connect(
        &self,
        session: &mut Session,
        ctx: &mut P::Ctx,
        kept: &mut Option<Bytes>,
    ) -> Result<(crate::Peer, UpstreamConnection, Option<TryLimit>)> {
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) {
                // The last try's head was filtered for the peer that failed. (The first try's
                // may have been built and filtered ahead, in request_filter's trip.)
                session.take_upstream_request();
            }
            let peer = 'chosen: {
                // A statement of its own: what it chose is not kept across the await below,
                // which would grow the request's future by a peer.
                if let Some(selected) = session.with_rules(|rules, session| {
                    let upstream = self.routed_upstream(rules, session)?;
                    Some(upstream.select(session))
                }) {
                    break 'chosen selected?;
                }
                self.proxy.upstream_peer(session, ctx).await?
            };
            let limit = TryLimit::starting_now(session);
            session.upstream = Some(peer.clone());
            // Built here unless the implementation built it ahead, in this try (see
            // Session::upstream_request).
            session.upstream_request();
            let mut head = session.take_upstream_request().expect("just built");
            if session.request_body_filter.is_some() {
                // The filter may change the length: the body goes chunked (HTTP/1.1).
                head.headers.remove(http::header::CONTENT_LENGTH);
            }
            if head.headers.contains_key(http::header::UPGRADE) {
                if session.websocket.is_none() {
                    session.websocket = self.proxy.websocket_filter(session, ctx);
                }
                if session.websocket.is_some() {
                    head.headers.remove(http::header::SEC_WEBSOCKET_EXTENSIONS);
                }
            }
            let filtered = self
                .proxy
                .upstream_request_filter(session, &mut head, ctx)
                .await;
            session.set_upstream_request(head);
            filtered?;
            if must_keep(session, kept) {
                // Boxed: rare, and inline it would grow every request's future.
                Box::pin(keep_for_resend(session, kept)).await?;
            }
            // The failure's locals end in this block, before the (rare) wait below.
            let failed = {
                let (error, by_deadline) = {
                    let connected = {
                        let connecting = std::pin::pin!(self.upstream.connect(&peer));
                        Limited::new(connecting, limit).await
                    };
                    let by_deadline = connected.is_none() && limit.is_some_and(|l| l.by_deadline);
                    match connected.unwrap_or_else(|| {
                        Err(try_timed_out(ErrorKind::ConnectTimeout, &peer, limit))
                    }) {
                        Ok(connection) => return Ok((peer, connection, limit)),
                        Err(error) => (error, by_deadline),
                    }
                };
                self.connect_failed(session, ctx, &peer, error, by_deadline)
            };
            // Boxed: rare, and inline it would grow every request's future.
            Box::pin(failed).await?;
        }
    }

    /// Connecting to `peer` failed: tell its backend (unless the request's deadline was
    /// what ran out), let `fail_to_connect` decide on the retry the policy allows, and
    /// return the error unless another try is to be made.
    async fn connect_failed(
        &self,
        session: &mut Session,
        ctx: &mut P::Ctx,
        peer: &crate::Peer,
        mut error: Error,
        by_deadline: bool,
    ) -> Result<()> {
        if let Some(backend) = session.backend.as_ref().filter(|_| !by_deadline) {
            backend.observe(Observation::ConnectFailed);
        }
        error.retry = retries_left(session);
        // The hook sees the tries before this one.
        error.tries = session.tries.clone().into_boxed_slice();
        let mut error = self.proxy.fail_to_connect(session, peer, ctx, error).await;
        if session.tries.len() + 1 >= MAX_CONNECT_ATTEMPTS {
            error.retry = false;
        }
        record_try(session, peer, &error);
        if !error.retry {
            return Err(error);
        }
        tracing::debug!(peer = peer.addr(), "{error}; trying again");
        session.backend = None;
        Ok(())
    }

    /// The matched route's upstream, unless the implementation's `upstream_peer` chooses
    /// for routed requests too.
    fn routed_upstream<'r>(
        &self,
        rules: &'r Rules,
        session: &Session,
    ) -> Option<&'r crate::lb::Upstream> {
        let router = rules.routes.as_ref()?.router();
        if self.proxy.upstream_peer_overrides_routes() {
            return None;
        }
        router.upstream(session)
    }

    fn finish(&self, state: Box<RequestState<P>>, status: u16, error: Option<Error>) -> Finish<P> {
        Finish {
            proxy: self.proxy.clone(),
            state,
            status,
            error: error.map(Box::new),
        }
    }
}

/// What a request carries from its arrival to the end of its response. Boxed: it moves from
/// the phases into the response body, and the response moves several times inside hyper.
struct RequestState<P: ProxyHttp> {
    session: Session,
    ctx: P::Ctx,
    access: Option<Access>,
}

enum Proxied {
    Upstream {
        head: http::response::Parts,
        body: ProxyBody,
        connection: UpstreamConnection,
        upload: BodyProgress,
    },
    Local(Response),
}

/// A request between its arrival and its response: if dropped before that (the client went
/// away), it still logs, as a 499.
struct InFlight<'a, P: ProxyHttp> {
    state: Option<Box<RequestState<P>>>,
    service: &'a ProxyService<P>,
}

impl<P: ProxyHttp> Drop for InFlight<'_, P> {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            let error = Error::new(
                ErrorKind::DownstreamClosed,
                "client went away before the response",
            );
            let status = error.status;
            self.service.finish(state, status, Some(error)).run(0, None);
        }
    }
}

/// What happens once the response is over: the access log line and the `logging` phase. It
/// keeps the session and ctx until then, for the phases that run while the body streams.
pub struct Finish<P: ProxyHttp> {
    proxy: Arc<P>,
    state: Box<RequestState<P>>,
    status: u16,
    /// Boxed, as errors are rare and big.
    error: Option<Box<Error>>,
}

impl<P: ProxyHttp> Finish<P> {
    fn run(mut self, bytes: u64, body_error: Option<Box<Error>>) {
        let mut error = self.error.take().or(body_error);
        let RequestState {
            session,
            ctx,
            access,
        } = &mut *self.state;
        if let Some(error) = error.as_mut().filter(|e| e.peer.is_none()) {
            error.peer = session.upstream.clone().map(Box::new);
        }
        if let Some(access) = access {
            access.log_line(session, self.status, bytes, error.as_deref());
        }
        self.proxy.logging(session, error.as_deref(), ctx);
    }
}

/// What a request's access-log line needs beyond the session: the request as it arrived
/// (hooks may edit `session.req`, and the Python layer swaps it out while a hook runs).
struct Access {
    log: Arc<AccessLog>,
    arrival: Arrival,
}

impl Access {
    fn log_line(&self, session: &Session, status: u16, bytes: u64, error: Option<&Error>) {
        let arrival = &self.arrival;
        self.log.log(&AccessRecord {
            time: arrival.time,
            client: session.client_addr(),
            method: &arrival.method,
            uri: &arrival.uri,
            protocol: arrival.protocol,
            status,
            bytes,
            upstream: session.upstream.as_ref().map(|peer| peer.addr()),
            upstream_time: session.upstream_time,
            duration: session.started.elapsed(),
            // The id a filter gave the request, else the client's.
            request_id: (session.request_id.as_ref())
                .or(arrival.request_id.as_ref())
                .map(|v| v.as_bytes()),
            user_agent: arrival.user_agent.as_ref().map(|v| v.as_bytes()),
            referer: arrival.referer.as_ref().map(|v| v.as_bytes()),
            error: error.map(|e| e.kind.as_str()),
        });
    }
}

/// The upstream connection behind a response, handed back when the response is over.
struct PoolReturn {
    connection: UpstreamConnection,
    pool: Arc<ConnectionPool>,
    /// Whether the request body was sent to its end (an upstream may answer before reading
    /// it all).
    upload: BodyProgress,
}

/// The body sent to the client. Counts bytes, releases the upstream connection when the
/// response is over, and runs the finish step exactly once, when hyper drops the body.
pub struct ResponseBody<P: ProxyHttp> {
    inner: ProxyBody,
    upstream: Option<PoolReturn>,
    finish: Option<Finish<P>>,
    bytes: u64,
    error: Option<Box<Error>>,
    ended: bool,
}

impl<P: ProxyHttp> ResponseBody<P> {
    /// The failure this response reports so far: a phase's, or its body's.
    pub fn error(&self) -> Option<&Error> {
        self.finish
            .as_ref()
            .and_then(|f| f.error.as_deref())
            .or(self.error.as_deref())
    }

    /// The session behind this response (gone once the body has been dropped).
    pub fn session(&self) -> Option<&Session> {
        self.finish.as_ref().map(|f| &f.state.session)
    }
}

// Nothing in it is ever pinned in place (the session and ctx are only moved, whole): a
// `Ctx` that is not `Unpin` does not make the body so.
impl<P: ProxyHttp> Unpin for ResponseBody<P> {}

impl<P: ProxyHttp> Body for ResponseBody<P> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let mut error = Error::from_upstream_ref(e.as_ref());
                error.message = format!("{} (while streaming the response body)", error.message);
                this.error = Some(Box::new(error));
            }
            Poll::Ready(None) => this.ended = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<P: ProxyHttp> Drop for ResponseBody<P> {
    fn drop(&mut self) {
        let complete = self.error.is_none() && (self.ended || self.inner.is_end_stream());
        if let Some(upstream) = self.upstream.take() {
            let exchange_complete = complete && upstream.upload.is_finished();
            upstream
                .pool
                .release(upstream.connection, exchange_complete);
        }
        if self.error.is_none() && !complete {
            self.error = Some(Box::new(Error::new(
                ErrorKind::DownstreamClosed,
                "client went away before the response was complete",
            )));
        }
        if let Some(finish) = self.finish.take() {
            finish.run(self.bytes, self.error.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::Peer;
    use crate::upstream::PoolConfig;

    struct Fixed(Peer);

    impl ProxyHttp for Fixed {
        type Ctx = ();
        fn new_ctx(&self) {}
        async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Peer> {
            Ok(self.0.clone())
        }
    }

    /// hyper moves each request's future and response into place once or more per request:
    /// what they weigh is paid on every request, so they stay small (the rare, big parts,
    /// such as opening a connection or the request's state, are boxed).
    #[test]
    fn what_a_request_moves_stays_small() {
        let service = ProxyService::new(
            Arc::new(Fixed(Peer::new("127.0.0.1:1").unwrap())),
            UpstreamClient::new(Arc::new(ConnectionPool::new(PoolConfig::default()))),
            ProxyConfig::default(),
        );
        let downstream = Arc::new(DownstreamDigest::tcp(
            ([127, 0, 0, 1], 1).into(),
            ([127, 0, 0, 1], 2).into(),
        ));
        let handling = service.handle(http::Request::new(ProxyBody::empty()), downstream);
        let future = std::mem::size_of_val(&handling);
        let response = std::mem::size_of::<http::Response<ResponseBody<Fixed>>>();
        // About 1.9 KB (2.6 KB before the session was made in its box, with the tries of load
        // balancing) and 400 bytes when written (at 6081b96: a 472-byte response; before the
        // boxing here, a 4.6 KB future and a 736-byte response).
        assert!(future <= 2560, "a request's future is {future} bytes");
        assert!(response <= 512, "a response is {response} bytes");
    }
}
