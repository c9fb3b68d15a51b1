//! The engine's phase trait implemented by handing phases to Python. Runs on tokio workers,
//! so nothing here touches the interpreter: it only queues jobs and awaits their replies.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use ferroxy_engine::phase::HOOK_NAMES;
use ferroxy_engine::{Error, ErrorKind, Peer, ProxyHttp, Response, Session};

use crate::bridge::{Bridge, Job};
use crate::call::{Outcome, PhaseJob, PhaseKind};
use crate::headers::{RequestSlot, ResponseSlot};
use crate::http::{PySession, SessionRef};

/// Which hooks the Python app overrides; the rest never cross into Python.
#[derive(Debug, Default, Clone, Copy)]
pub struct Hooks {
    pub request_filter: bool,
    pub upstream_peer: bool,
    pub upstream_request_filter: bool,
    pub response_filter: bool,
    pub fail_to_proxy: bool,
    pub logging: bool,
}

impl Hooks {
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut hooks = Hooks::default();
        for name in names {
            if !HOOK_NAMES.contains(&name) {
                return Err(format!("unknown hook {name:?}"));
            }
            match name {
                "request_filter" => hooks.request_filter = true,
                "upstream_peer" => hooks.upstream_peer = true,
                "upstream_request_filter" => hooks.upstream_request_filter = true,
                "response_filter" => hooks.response_filter = true,
                "fail_to_proxy" => hooks.fail_to_proxy = true,
                "logging" => hooks.logging = true,
                // new_ctx needs no trip of its own: made on the first trip that happens.
                _ => {}
            }
        }
        Ok(hooks)
    }

    /// The request-side hooks run together in one trip to Python.
    fn request_trip(&self) -> bool {
        self.request_filter || self.upstream_peer || self.upstream_request_filter
    }
}

pub struct PyProxy {
    pub bridge: Arc<Bridge>,
    pub hooks: Hooks,
    pub upstream: Option<Peer>,
}

#[derive(Default)]
pub struct PyCtx {
    session: Option<pyo3::Py<PySession>>,
    req: Option<RequestSlot>,
    peer: Option<Peer>,
    upstream_request: Option<http::request::Parts>,
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
        SessionRef {
            py: ctx.session.take(),
            req: slot,
            client_addr: session.client_addr,
            scheme: session.scheme,
        }
    }

    /// Hand a phase to Python and wait for its outcome. The request head goes to Python
    /// for the trip and comes back, edits included.
    async fn trip(
        &self,
        kind: PhaseKind,
        session: &mut Session,
        ctx: &mut PyCtx,
        upstream_response: Option<ResponseSlot>,
        error: Option<Error>,
    ) -> Outcome {
        let session_ref = self.session_ref(session, ctx);
        let slot = session_ref.req.clone();
        let (reply, replied) = oneshot::channel();
        self.bridge.submit(Job::Phase(PhaseJob {
            kind,
            session: session_ref,
            upstream_response,
            error,
            reply,
        }));
        let reply = replied.await;
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
}

impl ProxyHttp for PyProxy {
    type Ctx = PyCtx;

    fn new_ctx(&self) -> PyCtx {
        PyCtx::default()
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut PyCtx,
    ) -> ferroxy_engine::error::Result<Option<Response>> {
        if !self.hooks.request_trip() {
            return Ok(None);
        }
        match self
            .trip(PhaseKind::Request, session, ctx, None, None)
            .await
        {
            Outcome::Respond(response) => Ok(Some(response)),
            Outcome::Proceed {
                peer,
                upstream_request,
            } => {
                ctx.peer = peer;
                ctx.upstream_request = upstream_request;
                Ok(None)
            }
            Outcome::Fail(error) => Err(error),
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut PyCtx,
    ) -> ferroxy_engine::error::Result<Peer> {
        ctx.peer
            .take()
            .or_else(|| self.upstream.clone())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Internal,
                    "no upstream: set `upstream` or override upstream_peer()",
                )
            })
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut http::request::Parts,
        ctx: &mut PyCtx,
    ) -> ferroxy_engine::error::Result<()> {
        // Python edited a copy built the same way during the request trip; it replaces ours.
        if let Some(edited) = ctx.upstream_request.take() {
            *upstream_request = edited;
        }
        Ok(())
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
            .trip(PhaseKind::Response, session, ctx, Some(slot.clone()), None)
            .await;
        if let Some(parts) = slot.lock().take() {
            *upstream_response = parts;
        }
        match outcome {
            Outcome::Fail(error) => Err(error),
            Outcome::Proceed { .. } | Outcome::Respond(_) => Ok(()),
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
            .trip(PhaseKind::Fail, session, ctx, None, Some(error.clone()))
            .await
        {
            Outcome::Respond(response) => Some(response),
            Outcome::Proceed { .. } | Outcome::Fail(_) => None,
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
