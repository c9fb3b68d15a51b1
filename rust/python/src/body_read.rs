//! `await session.read_request_body(limit)`: a request-side hook asks for the whole request
//! body mid-trip. Each request trip carries a oneshot channel for the ask
//! ([`BodyReadRequest`]); the engine task, while it waits for the trip's reply, reads the body
//! when asked and answers with a [`BodyReadJob`] that resolves the hook's future on the Python
//! thread. The trip's reply stays the call's own throughout: a hook that stops waiting (its
//! hook_timeout, its own `wait_for`) still completes the call, and the read is abandoned.

use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::sync::Arc;

use ferroxy_engine::{Error, ErrorKind};

use crate::bridge::{Bridge, Job};
use crate::session::PySession;

pyo3::create_exception!(
    ferroxy,
    RequestBodyError,
    pyo3::exceptions::PyException,
    "session.read_request_body() could not read the body: longer than its limit (`status` \
     413), or the client's upload failed. Left unhandled, the client gets that status."
);

/// A hook's ask: the limit, the future it awaits, and its session (which keeps the bytes, so
/// that reading again, in this trip or a later one, gives them again).
pub struct BodyReadRequest {
    pub limit: u64,
    pub waiter: Py<PyAny>,
    pub session: Py<PySession>,
}

/// The body read (or why not), for the future awaiting it.
pub struct BodyReadJob {
    request: BodyReadRequest,
    result: Result<Bytes, Error>,
}

/// An ask being served: answers the hook when told the result, or, if the engine task ends
/// first (the client left), with an error, so that no hook awaits forever.
pub struct PendingRead {
    bridge: Arc<Bridge>,
    request: Option<BodyReadRequest>,
}

impl PendingRead {
    pub fn new(bridge: Arc<Bridge>, request: BodyReadRequest) -> Self {
        PendingRead {
            bridge,
            request: Some(request),
        }
    }

    pub fn limit(&self) -> u64 {
        self.request.as_ref().map_or(0, |request| request.limit)
    }

    pub fn finish(mut self, result: Result<Bytes, Error>) {
        if let Some(request) = self.request.take() {
            self.bridge
                .submit(Job::BodyRead(BodyReadJob { request, result }));
        }
    }
}

impl Drop for PendingRead {
    fn drop(&mut self) {
        if let Some(request) = self.request.take() {
            let gone = Error::new(
                ErrorKind::DownstreamClosed,
                "the request ended before its body was read",
            );
            self.bridge.submit(Job::BodyRead(BodyReadJob {
                request,
                result: Err(gone),
            }));
        }
    }
}

fn raised(py: Python<'_>, error: &Error) -> PyResult<Py<PyAny>> {
    let raised = RequestBodyError::new_err(error.message.clone());
    let value = raised.value(py);
    value.setattr("status", error.status)?;
    Ok(value.clone().into_any().unbind())
}

/// Resolve the hook's future, on the Python thread (a future given up on is left alone).
pub fn resume(py: Python<'_>, job: BodyReadJob) -> PyResult<()> {
    let BodyReadJob { request, result } = job;
    let body = match result {
        Ok(bytes) => Ok(PyBytes::new(py, &bytes).unbind()),
        Err(error) => Err(error),
    };
    if let Ok(body) = &body {
        request.session.borrow_mut(py).read_body = Some(body.clone_ref(py));
    }
    let waiter = request.waiter.bind(py);
    if waiter.call_method0("done")?.is_truthy()? {
        return Ok(());
    }
    match body {
        Ok(body) => waiter.call_method1("set_result", (body,))?,
        Err(error) => waiter.call_method1("set_exception", (raised(py, &error)?,))?,
    };
    Ok(())
}

/// `session.read_request_body(limit)`: a future of the body. Bytes already read are given
/// again at once; otherwise the engine is asked, once per trip.
pub fn ask(session: &Bound<'_, PySession>, limit: u64) -> PyResult<Py<PyAny>> {
    let py = session.py();
    // First, so that a hook with no running loop (a `@ferroxy.blocking` one) takes nothing.
    let waiter = py
        .import("asyncio")?
        .call_method0("get_running_loop")?
        .call_method0("create_future")?;
    if let Some(body) = session.borrow().read_body.as_ref() {
        if body.bind(py).as_bytes().len() as u64 > limit {
            let too_large = Error::new(
                ErrorKind::BodyTooLarge,
                format!("the request body is longer than {limit} bytes"),
            );
            waiter.call_method1("set_exception", (raised(py, &too_large)?,))?;
        } else {
            waiter.call_method1("set_result", (body.clone_ref(py),))?;
        }
        return Ok(waiter.unbind());
    }
    let not_now = || {
        pyo3::exceptions::PyRuntimeError::new_err(
            "read_request_body() is awaited in request_filter, upstream_peer or \
             upstream_request_filter, once at a time",
        )
    };
    let asks = session.borrow_mut().reading.take().ok_or_else(not_now)?;
    let request = BodyReadRequest {
        limit,
        waiter: waiter.clone().unbind(),
        session: session.clone().unbind(),
    };
    // Refused when the trip that carried the channel has ended.
    asks.send(request).map_err(|_| not_now())?;
    Ok(waiter.unbind())
}
