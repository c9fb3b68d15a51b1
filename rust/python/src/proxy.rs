//! The engine's phase trait implemented by handing phases to Python. Runs on tokio workers,
//! so nothing here touches the interpreter: it only queues jobs and awaits their replies.
//!
//! The engine calls every phase; consecutive request-side hooks that Python overrides share
//! one trip to the Python thread when no Rust step sits between them, and the later phases
//! then find their outcome already here. A fixed `upstream` is not such a step (nothing can
//! observe it between the hooks), so `request_filter` and `upstream_request_filter` share a
//! trip around it.

use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::types::PyTuple;
use pyo3::Py;
use tokio::sync::oneshot;

use ferroxy_engine::lb::Upstream;
use ferroxy_engine::phase::HOOK_NAMES;
use ferroxy_engine::{Error, ErrorKind, Peer, ProxyHttp, Response, Session};

use crate::body_read::{BodyReadRequest, PendingRead};
use crate::bridge::{Bridge, Job};
use crate::call::{Outcome, PhaseJob, PhaseKind, Reply, RequestSteps};
use crate::headers::{RequestSlot, ResponseSlot};
use crate::session::{PySession, RouteRef, SessionRef, SharedSession};
use crate::stream::{PyBodyFilter, PyMessageFilter, StreamHook, StreamSession};
use crate::types::Chosen;
use ferroxy_engine::body_filter::BodyFilter;
use ferroxy_engine::websocket::MessageFilter;

/// Which hooks the Python app overrides; the rest never cross into Python.
#[derive(Debug, Default, Clone, Copy)]
pub struct Hooks {
    pub request_filter: bool,
    pub upstream_peer: bool,
    pub upstream_request_filter: bool,
    pub fail_to_connect: bool,
    pub response_filter: bool,
    pub fail_to_proxy: bool,
    pub logging: bool,
    pub request_body_filter: bool,
    pub response_body_filter: bool,
    pub websocket_message: bool,
    /// Asked per connection, not per request: not a phase (see `connection_filter`).
    pub connection_filter: bool,
}

impl Hooks {
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut hooks = Hooks::default();
        for name in names {
            if name == crate::connection_filter::HOOK {
                hooks.connection_filter = true;
                continue;
            }
            if !HOOK_NAMES.contains(&name) {
                return Err(format!("unknown hook {name:?}"));
            }
            match name {
                "request_filter" => hooks.request_filter = true,
                "upstream_peer" => hooks.upstream_peer = true,
                "upstream_request_filter" => hooks.upstream_request_filter = true,
                "fail_to_connect" => hooks.fail_to_connect = true,
                "response_filter" => hooks.response_filter = true,
                "fail_to_proxy" => hooks.fail_to_proxy = true,
                "logging" => hooks.logging = true,
                "request_body_filter" => hooks.request_body_filter = true,
                "response_body_filter" => hooks.response_body_filter = true,
                "websocket_message" => hooks.websocket_message = true,
                // new_ctx needs no trip of its own: made on the first trip that happens.
                _ => {}
            }
        }
        Ok(hooks)
    }

    /// Whether the app has hooks that run beside the phases, per chunk or message (see
    /// [`crate::stream`]).
    pub fn has_streams(&self) -> bool {
        self.request_body_filter || self.response_body_filter || self.websocket_message
    }

    /// The Python hooks that run in one trip from `request_filter` on: request_filter, then
    /// as long as each next phase is Python's (or a fixed peer, which nothing can observe
    /// being chosen), the next. A load balancer's pick is a Rust step: upstream_request_filter
    /// waits for it, so it sees the backend picked.
    /// With routes, upstream_request_filter always waits: a route may strip the path of the
    /// head it filters, a Rust step.
    fn trip_at_request_filter(&self, upstream: Option<&Upstream>, routed: bool) -> RequestSteps {
        if !self.request_filter {
            return RequestSteps::default();
        }
        let peer_is_known =
            !routed && (self.upstream_peer || matches!(upstream, Some(Upstream::Peer(_))));
        RequestSteps {
            request_filter: true,
            upstream_peer: self.upstream_peer,
            upstream_request_filter: self.upstream_request_filter && peer_is_known,
        }
    }

    /// The same from `upstream_peer` on, when no earlier trip covered it (the first attempt
    /// of an app without request_filter, or a retry).
    fn trip_at_upstream_peer(&self, routed: bool) -> RequestSteps {
        RequestSteps {
            request_filter: false,
            upstream_peer: self.upstream_peer,
            upstream_request_filter: !routed && self.upstream_peer && self.upstream_request_filter,
        }
    }
}

pub struct PyProxy {
    pub bridge: Arc<Bridge>,
    pub hooks: Hooks,
    pub upstream: Option<Upstream>,
}

/// Whether the request's rule set has routes.
fn routed(session: &Session) -> bool {
    session.rules().routes.is_some()
}

/// The app's `Route` objects of the request's rule set (kept beside its routes by
/// `Server`), `session.route` being one of them.
fn route_objects(session: &Session) -> Option<Arc<Py<PyTuple>>> {
    let data = session.rules().routes.as_ref()?.data()?.clone();
    data.downcast::<Py<PyTuple>>().ok()
}

#[derive(Default)]
pub struct PyCtx {
    session: Option<pyo3::Py<PySession>>,
    req: Option<RequestSlot>,
    /// Chosen by an earlier trip, for `upstream_peer` to return.
    peer: Option<Chosen>,
    /// upstream_request_filter has run for this attempt in an earlier trip; the engine holds
    /// its result.
    upstream_request_filtered: bool,
    /// The session object the request's stream jobs share with its phases; only for an app
    /// with stream hooks (see [`crate::session::SharedSession`]).
    shared: Option<SharedSession>,
    /// `read_request_body` failed in this request's trip: the request's error (a 413, say),
    /// unless the hook answered the client itself.
    /// Boxed: rare, and the ctx is part of every request's state.
    body_error: Option<Box<Error>>,
}

/// `req` without its extensions (which cannot be cloned, and which no hook reads).
fn head_copy(req: &http::request::Parts) -> http::request::Parts {
    let mut copy = placeholder_request();
    copy.method = req.method.clone();
    copy.uri = req.uri.clone();
    copy.version = req.version;
    copy.headers = req.headers.clone();
    copy
}

fn placeholder_request() -> http::request::Parts {
    http::Request::new(()).into_parts().0
}

impl PyProxy {
    fn session_ref(&self, session: &mut Session, ctx: &mut PyCtx) -> SessionRef {
        let slot = ctx
            .req
            .get_or_insert_with(|| Arc::new(Mutex::new(None)))
            .clone();
        // A head already in the slot belongs to a trip that never came back (the client left
        // mid-phase): it is the real one, and `session.req` only the placeholder.
        slot.lock()
            .get_or_insert_with(|| std::mem::replace(&mut session.req, placeholder_request()));
        let is_new = ctx.session.is_none();
        SessionRef {
            py: ctx.session.take(),
            shared: ctx.shared.clone(),
            req: slot,
            downstream: session.downstream.clone(),
            upstream: session.upstream_digest,
            route: session
                .route
                .filter(|_| is_new)
                .and_then(|index| Some((index, route_objects(session)?)))
                .map(|(index, routes)| RouteRef { index, routes }),
            // A response-phase template may make it after the first trip.
            request_id: session.request_id.clone(),
        }
    }

    /// What the request's stream jobs need to reach its session object.
    fn stream_session(&self, session: &Session, ctx: &mut PyCtx) -> StreamSession {
        StreamSession {
            shared: ctx.shared.get_or_insert_with(Default::default).clone(),
            req: ctx
                .req
                .get_or_insert_with(|| Arc::new(Mutex::new(None)))
                .clone(),
            downstream: session.downstream.clone(),
            upstream: session.upstream_digest,
            request_id: session.request_id.clone(),
        }
    }

    fn body_filter(
        &self,
        hook: StreamHook,
        session: &Session,
        ctx: &mut PyCtx,
    ) -> Option<Arc<dyn BodyFilter>> {
        Some(Arc::new(PyBodyFilter {
            bridge: self.bridge.clone(),
            hook,
            session: self.stream_session(session, ctx),
        }))
    }

    /// Hand a phase to Python and wait for its outcome. The request head goes to Python
    /// for the trip and comes back, edits included.
    async fn trip(
        &self,
        kind: PhaseKind,
        session: &mut Session,
        ctx: &mut PyCtx,
        upstream_request: Option<Box<http::request::Parts>>,
        upstream_response: Option<ResponseSlot>,
        error: Option<Error>,
    ) -> Outcome {
        let session_ref = self.session_ref(session, ctx);
        let slot = session_ref.req.clone();
        let (reply, mut replied) = oneshot::channel();
        // A request trip's hooks may ask for the body (see crate::body_read).
        let (body_reads, body_asks) = match kind {
            PhaseKind::Request(_) => {
                let (asks, asked) = oneshot::channel();
                (Some(asks), Some(asked))
            }
            _ => (None, None),
        };
        self.bridge.submit(Job::Phase(PhaseJob {
            kind,
            session: session_ref,
            upstream_request,
            upstream_response,
            error,
            reply,
            body_reads,
        }));
        let reply = match body_asks {
            None => replied.await,
            Some(mut asked) => tokio::select! {
                biased;
                reply = &mut replied => reply,
                ask = &mut asked => match ask {
                    // Boxed: rare, and inline it would grow every trip's future.
                    Ok(ask) => Box::pin(self.serve_body_read(ask, &mut replied, session, ctx)).await,
                    // No ask can come now: the reply decides.
                    Err(_) => replied.await,
                },
            },
        };
        if let Some(req) = slot.lock().take() {
            session.req = req;
        }
        match reply {
            Ok(reply) => {
                ctx.session = reply.session;
                reply.outcome
            }
            Err(_) => Outcome::Fail(Error::new(
                ErrorKind::Internal,
                "the Python dispatcher dropped the call",
            )),
        }
    }

    /// Read the body a hook asked for while its trip runs, answer the hook, and wait for the
    /// trip's reply. A reply that comes first (the hook stopped waiting) abandons the read:
    /// what is left of the body cannot be sent then, so the connection closes after this
    /// request, and a trip that went on to the upstream fails.
    async fn serve_body_read(
        &self,
        ask: BodyReadRequest,
        replied: &mut oneshot::Receiver<Reply>,
        session: &mut Session,
        ctx: &mut PyCtx,
    ) -> Result<Reply, oneshot::error::RecvError> {
        let pending = PendingRead::new(self.bridge.clone(), ask);
        let read = {
            let reading = session.read_request_body(pending.limit());
            tokio::select! {
                biased;
                reply = &mut *replied => Err(reply),
                read = reading => Ok(read),
            }
        };
        match read {
            Ok(read) => {
                if let Err(error) = &read {
                    ctx.body_error = Some(Box::new(error.clone()));
                }
                pending.finish(read);
                replied.await
            }
            Err(reply) => {
                session.keepalive = false;
                if matches!(
                    &reply,
                    Ok(Reply {
                        outcome: Outcome::Proceed { .. },
                        ..
                    })
                ) {
                    ctx.body_error = Some(Box::new(Error::new(
                        ErrorKind::Internal,
                        "a hook went on without the request body it was reading",
                    )));
                }
                reply
            }
        }
    }

    /// Run the request-side hooks in `steps` in one trip. Returns a response when
    /// request_filter answered; keeps the chosen peer and the filtered upstream request for
    /// the phases that follow.
    async fn request_trip(
        &self,
        steps: RequestSteps,
        session: &mut Session,
        ctx: &mut PyCtx,
        upstream_request: Option<Box<http::request::Parts>>,
    ) -> ferroxy_engine::error::Result<Option<Response>> {
        match self
            .trip(
                PhaseKind::Request(steps),
                session,
                ctx,
                upstream_request,
                None,
                None,
            )
            .await
        {
            Outcome::Respond(response) => Ok(Some(response)),
            Outcome::Fail(_) | Outcome::Proceed { .. } if ctx.body_error.is_some() => {
                Err(*ctx.body_error.take().expect("checked"))
            }
            Outcome::Proceed {
                peer,
                upstream_request,
            } => {
                ctx.peer = peer;
                if steps.upstream_request_filter {
                    ctx.upstream_request_filtered = true;
                    if let Some(head) = upstream_request {
                        session.set_upstream_request(head);
                    }
                }
                Ok(None)
            }
            Outcome::Fail(error) => Err(error),
            Outcome::Retry(_) => Err(Error::new(
                ErrorKind::Internal,
                "a request phase answered as fail_to_connect",
            )),
        }
    }
}

impl ProxyHttp for PyProxy {
    type Ctx = PyCtx;

    fn new_ctx(&self) -> PyCtx {
        PyCtx {
            // Made up front: a stream job and a phase may be the first to reach Python.
            shared: self.hooks.has_streams().then(Default::default),
            ..PyCtx::default()
        }
    }

    // Inline, as the other per-request checks of a hook's presence: most apps have none.
    #[inline]
    fn request_body_filter(
        &self,
        session: &Session,
        ctx: &mut PyCtx,
    ) -> Option<Arc<dyn BodyFilter>> {
        if !self.hooks.request_body_filter {
            return None;
        }
        self.body_filter(StreamHook::RequestBody, session, ctx)
    }

    #[inline]
    fn response_body_filter(
        &self,
        session: &Session,
        _upstream_response: &http::response::Parts,
        ctx: &mut PyCtx,
    ) -> Option<Arc<dyn BodyFilter>> {
        if !self.hooks.response_body_filter {
            return None;
        }
        // The engine keeps its request head to the end (the access log reads it), so the
        // chunks' hooks read a copy: from here on only `logging` sees the head, and it would
        // find the same.
        let slot = ctx
            .req
            .get_or_insert_with(|| Arc::new(Mutex::new(None)))
            .clone();
        slot.lock().get_or_insert_with(|| head_copy(&session.req));
        self.body_filter(StreamHook::ResponseBody, session, ctx)
    }

    fn websocket_filter(
        &self,
        session: &Session,
        ctx: &mut PyCtx,
    ) -> Option<Arc<dyn MessageFilter>> {
        if !self.hooks.websocket_message {
            return None;
        }
        Some(Arc::new(PyMessageFilter {
            bridge: self.bridge.clone(),
            session: self.stream_session(session, ctx),
        }))
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut PyCtx,
    ) -> ferroxy_engine::error::Result<Option<Response>> {
        let steps = self
            .hooks
            .trip_at_request_filter(self.upstream.as_ref(), routed(session));
        if steps.is_empty() {
            return Ok(None);
        }
        self.request_trip(steps, session, ctx, None).await
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut PyCtx,
    ) -> ferroxy_engine::error::Result<Peer> {
        if ctx.peer.is_none() && self.hooks.upstream_peer {
            let steps = self.hooks.trip_at_upstream_peer(routed(session));
            self.request_trip(steps, session, ctx, None).await?;
            if ctx.peer.is_none() {
                return Err(Error::new(
                    ErrorKind::Internal,
                    "upstream_peer chose no peer",
                ));
            }
        }
        if let Some(chosen) = ctx.peer.take() {
            if let Some(pick) = chosen.pick {
                session.backend = Some(pick.selected);
                session.retry = pick.retry;
            }
            return Ok(chosen.peer);
        }
        match &self.upstream {
            Some(upstream) => upstream.select(session),
            // The client asked for what no route serves (the engine routes before asking).
            None if routed(session) => {
                Err(Error::new(ErrorKind::InvalidRequest, "no route matches").with_status(404))
            }
            None => Err(Error::new(
                ErrorKind::Internal,
                "no upstream: set `upstream` or override upstream_peer()",
            )),
        }
    }

    fn upstream_peer_overrides_routes(&self) -> bool {
        self.hooks.upstream_peer
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut http::request::Parts,
        ctx: &mut PyCtx,
    ) -> ferroxy_engine::error::Result<()> {
        if !self.hooks.upstream_request_filter {
            return Ok(());
        }
        if std::mem::take(&mut ctx.upstream_request_filtered) {
            // An earlier trip of this attempt ran it; the engine holds its result. (Cleared:
            // a retry filters a new head for its new peer.)
            return Ok(());
        }
        let steps = RequestSteps {
            upstream_request_filter: true,
            ..RequestSteps::default()
        };
        let head = std::mem::replace(upstream_request, placeholder_request());
        let trip = self.request_trip(steps, session, ctx, Some(Box::new(head)));
        trip.await?;
        // This trip ran it for this try only: a retry filters its own head.
        ctx.upstream_request_filtered = false;
        if let Some(filtered) = session.take_upstream_request() {
            *upstream_request = filtered;
        }
        Ok(())
    }

    async fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &Peer,
        ctx: &mut PyCtx,
        mut error: Error,
    ) -> Error {
        if !self.hooks.fail_to_connect {
            return error;
        }
        let outcome = self
            .trip(
                PhaseKind::ConnectFail,
                session,
                ctx,
                None,
                None,
                Some(error.clone()),
            )
            .await;
        match outcome {
            Outcome::Retry(retry) => error.retry = retry,
            // The hook raised: its error is the request's (a 500), not retried.
            Outcome::Fail(failed) => return failed,
            Outcome::Proceed { .. } | Outcome::Respond(_) => {}
        }
        error
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut http::response::Parts,
        ctx: &mut PyCtx,
    ) -> ferroxy_engine::error::Result<()> {
        if !self.hooks.response_filter {
            return Ok(());
        }
        let placeholder = http::Response::new(()).into_parts().0;
        let slot: ResponseSlot = Arc::new(Mutex::new(Some(std::mem::replace(
            upstream_response,
            placeholder,
        ))));
        let outcome = self
            .trip(
                PhaseKind::Response,
                session,
                ctx,
                None,
                Some(slot.clone()),
                None,
            )
            .await;
        if let Some(parts) = slot.lock().take() {
            *upstream_response = parts;
        }
        match outcome {
            Outcome::Fail(error) => Err(error),
            Outcome::Proceed { .. } | Outcome::Respond(_) | Outcome::Retry(_) => Ok(()),
        }
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        error: &Error,
        ctx: &mut PyCtx,
    ) -> Option<Response> {
        if !self.hooks.fail_to_proxy {
            return None;
        }
        match self
            .trip(
                PhaseKind::Fail,
                session,
                ctx,
                None,
                None,
                Some(error.clone()),
            )
            .await
        {
            Outcome::Respond(response) => Some(response),
            Outcome::Proceed { .. } | Outcome::Fail(_) | Outcome::Retry(_) => None,
        }
    }

    fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut PyCtx) {
        if !self.hooks.logging {
            return;
        }
        // The request head stays with Python from here on: the engine is done with it.
        let session_ref = self.session_ref(session, ctx);
        self.bridge.submit(Job::Logging {
            session: session_ref,
            error: error.cloned(),
        });
    }
}
