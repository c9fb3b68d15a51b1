//! A request's streams handed to Python: each chunk of a body that `request_body_filter` or
//! `response_body_filter` sees, and each message of a WebSocket that `websocket_message`
//! sees. They run beside the phases (a request body streams upstream while the response
//! phases run), so each chunk or message is a job of its own through the bridge, reaching
//! the request's one session object through its [`SharedSession`]. The engine reads the next
//! chunk only once Python has answered for the last: a slow hook slows the sender.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyMemoryView, PyString};
use tokio::sync::oneshot;

use ferroxy_engine::body_filter::{BodyFilter, ChunkVerdict};
use ferroxy_engine::websocket::{Message, MessageFilter, Verdict};
use ferroxy_engine::{DownstreamDigest, Error, ErrorKind, UpstreamDigest};

use crate::bridge::{Bridge, Job};
use crate::call::{deliver, Delivery};
use crate::headers::RequestSlot;
use crate::session::{PySession, SessionRef, SharedSession};

/// Which hook a stream job is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamHook {
    RequestBody,
    ResponseBody,
    WebSocketMessage,
}

impl StreamHook {
    pub fn name(self) -> &'static str {
        match self {
            StreamHook::RequestBody => "request_body_filter",
            StreamHook::ResponseBody => "response_body_filter",
            StreamHook::WebSocketMessage => "websocket_message",
        }
    }
}

/// What a chunk or message job carries.
pub enum StreamData {
    /// A body's chunk, and whether it ends the body.
    Chunk(Bytes, bool),
    /// A WebSocket message, and whether the client sent it.
    Message(Message, bool),
}

/// Python's answer for one chunk or message.
pub enum StreamAnswer {
    /// Send it as it came.
    Keep,
    /// Send these bytes instead (a body chunk, or a binary message).
    Bytes(Bytes),
    /// Send this text message instead.
    Text(String),
    /// Send nothing (a message; `ferroxy.DROP`).
    Drop,
    /// The hook failed: the stream ends with this error.
    Fail(Error),
}

pub struct StreamJob {
    pub hook: StreamHook,
    pub session: SessionRef,
    pub data: StreamData,
    pub reply: oneshot::Sender<StreamAnswer>,
}

/// What a request's stream jobs need of its session: enough to make the session object when
/// no phase has made it yet.
#[derive(Clone)]
pub struct StreamSession {
    pub shared: SharedSession,
    pub req: RequestSlot,
    pub downstream: Arc<DownstreamDigest>,
    pub upstream: Option<UpstreamDigest>,
    pub request_id: Option<http::HeaderValue>,
}

impl StreamSession {
    fn session_ref(&self) -> SessionRef {
        SessionRef {
            py: None,
            shared: Some(self.shared.clone()),
            req: self.req.clone(),
            downstream: self.downstream.clone(),
            upstream: self.upstream,
            route: None,
            request_id: self.request_id.clone(),
        }
    }
}

/// Hands one chunk or message to Python and waits for its answer. No answer (the
/// dispatcher dropped the job, the server stopped) fails the stream.
async fn ask(
    bridge: &Bridge,
    hook: StreamHook,
    session: &StreamSession,
    data: StreamData,
) -> StreamAnswer {
    let (reply, replied) = oneshot::channel();
    bridge.submit(Job::Stream(StreamJob {
        hook,
        session: session.session_ref(),
        data,
        reply,
    }));
    replied.await.unwrap_or_else(|_| {
        StreamAnswer::Fail(Error::new(
            ErrorKind::Internal,
            format!("the Python dispatcher dropped a {} call", hook.name()),
        ))
    })
}

/// `request_body_filter` or `response_body_filter`, as the engine's body filter.
pub struct PyBodyFilter {
    pub bridge: Arc<Bridge>,
    pub hook: StreamHook,
    pub session: StreamSession,
}

impl BodyFilter for PyBodyFilter {
    fn on_chunk(&self, chunk: Bytes, end_of_stream: bool) -> ChunkVerdict {
        let bridge = self.bridge.clone();
        let session = self.session.clone();
        let hook = self.hook;
        Box::pin(async move {
            let data = StreamData::Chunk(chunk, end_of_stream);
            match ask(&bridge, hook, &session, data).await {
                StreamAnswer::Keep => Ok(None),
                StreamAnswer::Bytes(bytes) => Ok(Some(bytes)),
                StreamAnswer::Fail(error) => Err(error),
                StreamAnswer::Text(_) | StreamAnswer::Drop => Err(Error::hook(
                    hook.name(),
                    "a body filter answered as a message filter",
                )),
            }
        })
    }
}

/// `websocket_message`, as the engine's message filter.
pub struct PyMessageFilter {
    pub bridge: Arc<Bridge>,
    pub session: StreamSession,
}

impl MessageFilter for PyMessageFilter {
    fn on_message(
        &self,
        message: Message,
        from_client: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Verdict> + Send + 'static>> {
        let bridge = self.bridge.clone();
        let session = self.session.clone();
        Box::pin(async move {
            let data = StreamData::Message(message, from_client);
            match ask(&bridge, StreamHook::WebSocketMessage, &session, data).await {
                StreamAnswer::Keep => Verdict::Forward,
                StreamAnswer::Bytes(bytes) => Verdict::Replace(Message::Binary(bytes)),
                StreamAnswer::Text(text) => Verdict::Replace(Message::Text(text)),
                // A failing hook loses the message, not the tunnel: the dispatcher has
                // logged why.
                StreamAnswer::Drop | StreamAnswer::Fail(_) => Verdict::Drop,
            }
        })
    }
}

/// One chunk or message, as the dispatcher sees it: `hook`, `session`, `data` (bytes, or
/// str for a text message), `flag` (`end_of_stream` for a chunk, `from_client` for a
/// message), and one answer: `keep()`, `replace(data)`, `drop()`, `fail()` or `time_out()`.
#[pyclass(module = "ferroxy._core", frozen)]
pub struct StreamCall {
    hook: StreamHook,
    session: Py<PySession>,
    data: Py<PyAny>,
    flag: bool,
    reply: Mutex<Option<oneshot::Sender<StreamAnswer>>>,
}

impl StreamCall {
    pub fn from_job(py: Python<'_>, mut job: StreamJob) -> PyResult<Self> {
        let session = job.session.object(py)?;
        let (data, flag) = match job.data {
            StreamData::Chunk(bytes, end) => (PyBytes::new(py, &bytes).into_any().unbind(), end),
            StreamData::Message(Message::Binary(bytes), from_client) => {
                (PyBytes::new(py, &bytes).into_any().unbind(), from_client)
            }
            StreamData::Message(Message::Text(text), from_client) => {
                (PyString::new(py, &text).into_any().unbind(), from_client)
            }
        };
        Ok(StreamCall {
            hook: job.hook,
            session,
            data,
            flag,
            reply: Mutex::new(Some(job.reply)),
        })
    }

    fn answer(&self, answer: StreamAnswer) -> PyResult<()> {
        let reply = self
            .reply
            .lock()
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("this call was already answered"))?;
        deliver(Delivery::Stream(reply, answer));
        Ok(())
    }
}

/// Bytes from what a hook returned: bytes, bytearray or memoryview.
fn bytes_of(value: &Bound<'_, PyAny>) -> Option<Bytes> {
    if let Ok(bytes) = value.cast::<PyBytes>() {
        return Some(Bytes::copy_from_slice(bytes.as_bytes()));
    }
    if let Ok(array) = value.cast::<PyByteArray>() {
        return Some(Bytes::from(array.to_vec()));
    }
    if value.cast::<PyMemoryView>().is_ok() {
        let bytes = value.call_method0("tobytes").ok()?;
        return bytes_of(&bytes);
    }
    None
}

#[pymethods]
impl StreamCall {
    #[getter]
    fn hook(&self) -> &'static str {
        self.hook.name()
    }
    #[getter]
    fn session(&self, py: Python<'_>) -> Py<PySession> {
        self.session.clone_ref(py)
    }
    #[getter]
    fn data(&self, py: Python<'_>) -> Py<PyAny> {
        self.data.clone_ref(py)
    }
    #[getter]
    fn flag(&self) -> bool {
        self.flag
    }

    /// Not answered yet.
    pub fn is_pending(&self) -> bool {
        self.reply.lock().is_some()
    }

    /// Send the chunk or message as it came.
    fn keep(&self) -> PyResult<()> {
        self.answer(StreamAnswer::Keep)
    }

    /// Send `data` instead: bytes for a body chunk; str (a text message) or bytes (a binary
    /// one) for a message. TypeError for anything else, leaving the call unanswered.
    fn replace(&self, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let message = self.hook == StreamHook::WebSocketMessage;
        if let Some(bytes) = bytes_of(data) {
            return self.answer(StreamAnswer::Bytes(bytes));
        }
        if message {
            if let Ok(text) = data.cast::<PyString>() {
                return self.answer(StreamAnswer::Text(text.to_str()?.to_owned()));
            }
        }
        let expected = if message {
            "str, bytes, None or ferroxy.DROP"
        } else {
            "bytes or None"
        };
        Err(PyTypeError::new_err(format!(
            "{} returned {}, expected {expected}",
            self.hook.name(),
            data.get_type().name()?
        )))
    }

    /// Send nothing for this message.
    fn drop(&self) -> PyResult<()> {
        if self.hook != StreamHook::WebSocketMessage {
            return Err(PyTypeError::new_err(format!(
                "{} cannot drop a chunk: return b\"\" to send nothing for it",
                self.hook.name()
            )));
        }
        self.answer(StreamAnswer::Drop)
    }

    /// `hook` failed with `message`: the body ends with a 500 (the message is dropped).
    fn fail(&self, hook: &str, message: &str) -> PyResult<()> {
        self.answer(StreamAnswer::Fail(Error::hook(hook, message)))
    }

    /// `hook` ran past the server's hook_timeout and was abandoned.
    fn time_out(&self, hook: &str, seconds: f64) -> PyResult<()> {
        let after =
            crate::types::non_negative_seconds("hook_timeout", Some(seconds))?.unwrap_or_default();
        self.answer(StreamAnswer::Fail(Error::hook_timeout(hook, after)))
    }
}
