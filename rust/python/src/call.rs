//! One phase handed to Python, and how Python answers it.

use std::cell::RefCell;

use parking_lot::Mutex;
use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use tokio::sync::oneshot;

use ferroxy_engine::{Error, Response};

use crate::headers::ResponseSlot;
use crate::session::{PyRequestHeader, PyResponseHeader, PySession, SessionRef};
use crate::types::{error_object, Chosen, PyPeer, PyProxyError, PyResponse};

#[derive(Clone, Copy, Debug)]
pub enum PhaseKind {
    /// Consecutive request-side hooks ([`RequestSteps`]), in one trip.
    Request(RequestSteps),
    Response,
    /// `fail_to_connect`, with the connect error.
    ConnectFail,
    Fail,
}

/// Which request-side hooks a request trip runs, in this order. Consecutive hooks share a
/// trip when no Rust step sits between them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestSteps {
    pub request_filter: bool,
    pub upstream_peer: bool,
    pub upstream_request_filter: bool,
}

impl RequestSteps {
    pub fn is_empty(&self) -> bool {
        *self == RequestSteps::default()
    }

    /// The hooks in bit order, for Python (`_core.REQUEST_STEPS`): bit i is the i-th name.
    pub const NAMES: [&'static str; 3] =
        ["request_filter", "upstream_peer", "upstream_request_filter"];

    /// As one int for Python: bit i set when the i-th of `NAMES` runs.
    fn bits(&self) -> u8 {
        u8::from(self.request_filter)
            | u8::from(self.upstream_peer) << 1
            | u8::from(self.upstream_request_filter) << 2
    }
}

// Proceed, the big variant, is what nearly every trip returns: boxing it would cost an
// allocation per trip to save bytes on the rare ones.
#[allow(clippy::large_enum_variant)]
pub enum Outcome {
    Proceed {
        peer: Option<Chosen>,
        upstream_request: Option<http::request::Parts>,
    },
    Respond(Response),
    Fail(Error),
    /// `fail_to_connect` decided: try again (true) or not (false).
    Retry(bool),
}

/// The answer to a phase, with the session object so later phases reuse it (and its ctx).
pub struct Reply {
    pub outcome: Outcome,
    pub session: Option<Py<PySession>>,
}

pub struct PhaseJob {
    pub kind: PhaseKind,
    pub session: SessionRef,
    /// The head to send upstream, when the engine has built it already; else a trip that
    /// runs upstream_request_filter builds it from the session's request, on first use.
    pub upstream_request: Option<Box<http::request::Parts>>,
    pub upstream_response: Option<ResponseSlot>,
    pub error: Option<Error>,
    pub reply: oneshot::Sender<Reply>,
    /// A request trip's: where `session.read_request_body` asks for the body.
    pub body_reads: Option<oneshot::Sender<crate::body_read::BodyReadRequest>>,
}

#[pyclass(module = "ferroxy._core", frozen)]
pub struct Call {
    session: Py<PySession>,
    steps: u8,
    upstream_request: Mutex<UpstreamRequest>,
    upstream_response: Option<Py<PyResponseHeader>>,
    error: Option<Py<PyProxyError>>,
    reply: Mutex<Option<oneshot::Sender<Reply>>>,
}

/// The upstream request head of a request trip: not needed yet, built (or handed over) and
/// waiting, or shown to Python.
enum UpstreamRequest {
    None,
    Ready(Box<http::request::Parts>),
    Shown(Py<PyRequestHeader>),
}

impl Call {
    /// Build the Python side of a job; runs on the Python thread.
    pub fn from_job(py: Python<'_>, mut job: PhaseJob) -> PyResult<(PhaseKind, Bound<'_, Call>)> {
        let session = job.session.object(py)?;
        let steps = match job.kind {
            PhaseKind::Request(steps) => steps.bits(),
            _ => 0,
        };
        let upstream_request = match job.upstream_request {
            Some(parts) => UpstreamRequest::Ready(parts),
            None => UpstreamRequest::None,
        };
        let upstream_response = job
            .upstream_response
            .map(|slot| Py::new(py, PyResponseHeader { slot }))
            .transpose()?;
        let error = job.error.map(|e| error_object(py, e)).transpose()?;
        if let Some(body_reads) = job.body_reads {
            // A request trip's hooks may ask for the body (see `crate::body_read`).
            session.borrow_mut(py).reading = Some(body_reads);
        }
        let call = Call {
            session,
            steps,
            upstream_request: Mutex::new(upstream_request),
            upstream_response,
            error,
            reply: Mutex::new(Some(job.reply)),
        };
        Ok((job.kind, Bound::new(py, call)?))
    }

    pub fn complete(&self, py: Python<'_>, outcome: Outcome) -> PyResult<()> {
        let reply = self
            .reply
            .lock()
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("this call was already completed"))?;
        deliver(Delivery::Phase(
            reply,
            Reply {
                outcome,
                session: Some(self.session.clone_ref(py)),
            },
        ));
        Ok(())
    }

    pub fn is_pending(&self) -> bool {
        self.reply.lock().is_some()
    }
}

/// Take one step of a phase coroutine (`phase.send(None)`) and time it. Python's driver
/// (`_dispatch._drive`) steps every phase through here: two reads of this clock cost a
/// fraction of two `time.perf_counter()` calls, and nothing is raised when the phase ends.
///
/// `None` when the phase finished within `threshold` seconds, the usual case; otherwise
/// `(finished, value, held)`: the phase's result if it finished, else what it waits on, and
/// the seconds the step held the thread. An exception the step raised propagates.
#[pyfunction]
pub fn step(
    py: Python<'_>,
    phase: &Bound<'_, PyAny>,
    threshold: f64,
) -> PyResult<Option<(bool, Py<PyAny>, f64)>> {
    let started = std::time::Instant::now();
    let mut value = std::ptr::null_mut();
    // SAFETY: `phase` is a live object and `value` a place for the result; PyIter_Send takes
    // any object that can be sent to (a coroutine, through am_send).
    let sent = unsafe { pyo3::ffi::PyIter_Send(phase.as_ptr(), py.None().as_ptr(), &mut value) };
    let held = started.elapsed().as_secs_f64();
    let finished = match sent {
        pyo3::ffi::PySendResult::PYGEN_ERROR => return Err(PyErr::fetch(py)),
        pyo3::ffi::PySendResult::PYGEN_RETURN => true,
        pyo3::ffi::PySendResult::PYGEN_NEXT => false,
    };
    // SAFETY: on success PyIter_Send hands back a new reference.
    let value = unsafe { Bound::from_owned_ptr(py, value) };
    if finished && held <= threshold {
        return Ok(None);
    }
    Ok(Some((finished, value.unbind(), held)))
}

/// An answer for an engine task: a phase's reply, or a connection filter's verdict.
// Phase, the big variant, is nearly every delivery: boxing it would cost an allocation per
// trip (as for Outcome).
#[allow(clippy::large_enum_variant)]
pub enum Delivery {
    Phase(oneshot::Sender<Reply>, Reply),
    Connection(oneshot::Sender<bool>, bool),
    Stream(
        oneshot::Sender<crate::stream::StreamAnswer>,
        crate::stream::StreamAnswer,
    ),
}

impl Delivery {
    fn send(self) {
        // The engine task may be gone (client disconnected): nothing to tell it then.
        match self {
            Delivery::Phase(sender, reply) => {
                let _ = sender.send(reply);
            }
            Delivery::Connection(sender, accept) => {
                let _ = sender.send(accept);
            }
            Delivery::Stream(sender, answer) => {
                let _ = sender.send(answer);
            }
        }
    }
}

thread_local! {
    /// Replies held back while `run_pending` runs a batch on this thread.
    static HELD: RefCell<Option<Vec<Delivery>>> = const { RefCell::new(None) };
}

/// Send a reply now, or at the end of the batch being run. Each send wakes an engine
/// thread, and a woken thread on the same core preempts the Python thread: sending a batch's
/// replies together costs one switch per batch instead of one per call.
pub fn deliver(delivery: Delivery) {
    let unsent = HELD.with(|held| match held.borrow_mut().as_mut() {
        Some(batch) => {
            batch.push(delivery);
            None
        }
        None => Some(delivery),
    });
    if let Some(delivery) = unsent {
        delivery.send();
    }
}

/// Holds replies for as long as it lives (one `run_pending` batch); sends them on drop.
pub struct HoldReplies(());

impl HoldReplies {
    pub fn begin() -> Self {
        HELD.with(|held| held.borrow_mut().get_or_insert_with(Vec::new).clear());
        HoldReplies(())
    }
}

impl Drop for HoldReplies {
    fn drop(&mut self) {
        let batch = HELD
            .with(|held| held.borrow_mut().take())
            .unwrap_or_default();
        for delivery in batch {
            delivery.send();
        }
    }
}

#[pymethods]
impl Call {
    #[getter]
    fn session(&self, py: Python<'_>) -> Py<PySession> {
        self.session.clone_ref(py)
    }
    /// Which request-side hooks this trip runs (see `RequestSteps::bits`).
    #[getter]
    fn steps(&self) -> u8 {
        self.steps
    }
    /// The request head that will be sent upstream, for upstream_request_filter to edit.
    #[getter]
    fn upstream_request(&self, py: Python<'_>) -> PyResult<Py<PyRequestHeader>> {
        let mut upstream_request = self.upstream_request.lock();
        let parts = match std::mem::replace(&mut *upstream_request, UpstreamRequest::None) {
            UpstreamRequest::Shown(shown) => {
                let again = shown.clone_ref(py);
                *upstream_request = UpstreamRequest::Shown(shown);
                return Ok(again);
            }
            UpstreamRequest::Ready(parts) => *parts,
            UpstreamRequest::None => self.session.borrow(py).build_upstream_request()?,
        };
        let shown = Py::new(py, self.session.borrow(py).request_header(parts))?;
        *upstream_request = UpstreamRequest::Shown(shown.clone_ref(py));
        Ok(shown)
    }
    #[getter]
    fn upstream_response(&self, py: Python<'_>) -> Option<Py<PyResponseHeader>> {
        self.upstream_response.as_ref().map(|r| r.clone_ref(py))
    }
    #[getter]
    fn error(&self, py: Python<'_>) -> Option<Py<PyProxyError>> {
        self.error.as_ref().map(|e| e.clone_ref(py))
    }

    /// Go on proxying: to `peer` when the trip chose one, with the upstream request as
    /// upstream_request_filter left it.
    #[pyo3(signature = (peer=None))]
    fn proceed(&self, py: Python<'_>, peer: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let peer = match peer {
            Some(p) if !p.is_none() => Some(
                p.cast::<PyPeer>()
                    .map_err(|_| PyTypeError::new_err("peer must be a Peer"))?
                    .get()
                    .chosen(),
            ),
            _ => None,
        };
        let upstream_request =
            match std::mem::replace(&mut *self.upstream_request.lock(), UpstreamRequest::None) {
                UpstreamRequest::None => None,
                UpstreamRequest::Ready(parts) => Some(*parts),
                UpstreamRequest::Shown(shown) => {
                    Some(shown.get().slot.lock().take().ok_or_else(|| {
                        PyRuntimeError::new_err("upstream_request was already sent")
                    })?)
                }
            };
        self.complete(
            py,
            Outcome::Proceed {
                peer,
                upstream_request,
            },
        )
    }

    /// `fail_to_connect`'s answer: ask upstream_peer again (True) or fail (False).
    fn retry(&self, py: Python<'_>, retry: bool) -> PyResult<()> {
        self.complete(py, Outcome::Retry(retry))
    }

    fn respond(&self, py: Python<'_>, response: &Bound<'_, PyAny>) -> PyResult<()> {
        let response = response
            .cast::<PyResponse>()
            .map_err(|_| PyTypeError::new_err("respond() takes a Response"))?;
        self.complete(py, Outcome::Respond(response.get().to_engine()))
    }

    /// `hook` failed with `message`; the engine decides the status.
    fn fail(&self, py: Python<'_>, hook: &str, message: &str) -> PyResult<()> {
        self.complete(py, Outcome::Fail(Error::hook(hook, message)))
    }

    /// `hook` was still running after `seconds` (the server's hook_timeout) and was
    /// abandoned: the client gets a 504, later hooks see `error.kind == "hook_timeout"`.
    fn time_out(&self, py: Python<'_>, hook: &str, seconds: f64) -> PyResult<()> {
        let after =
            crate::types::non_negative_seconds("hook_timeout", Some(seconds))?.unwrap_or_default();
        self.complete(py, Outcome::Fail(Error::hook_timeout(hook, after)))
    }
}
