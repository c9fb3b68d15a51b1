//! Hands work from the engine's tokio workers to the one thread that runs Python.
//!
//! Attaching a tokio worker to the interpreter costs ~9 us a call (a thread state is built
//! and torn down each time), so workers never touch Python: they push a [`Job`] onto a queue
//! and, only when the queue was empty, write one byte to a socket the Python thread's
//! asyncio loop watches. The loop then runs every queued job in one batch.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::call::PhaseJob;
use crate::connection_filter::ConnectionJob;
use crate::session::SessionRef;
use crate::stream::StreamJob;
use crate::tcp::PeerJob;
use crate::types::error_object;

pub enum Job {
    /// A phase whose outcome a tokio task awaits.
    Phase(PhaseJob),
    /// The `connection_filter` hook, for a connection just accepted.
    Connection(ConnectionJob),
    /// The request body a hook awaits (see [`crate::body_read`]).
    BodyRead(crate::body_read::BodyReadJob),
    /// A body chunk or WebSocket message for its hook (see [`crate::stream`]).
    Stream(StreamJob),
    /// A TCP proxy's `upstream_peer(client_addr)` hook, for a connection just accepted.
    TcpPeer(PeerJob),
    /// The `logging` hook: fire and forget.
    Logging {
        session: SessionRef,
        error: Option<ferroxy_engine::Error>,
    },
    /// The server has stopped: the Python side may end its loop.
    Stopped,
}

pub struct Bridge {
    queue: Mutex<Vec<Job>>,
    wake_pending: AtomicBool,
    wake_tx: UnixStream,
    wake_rx: UnixStream,
    /// Hook calls handed to Python: lets tests prove the pure-Rust path makes none.
    python_calls: AtomicU64,
    /// Between start and stop: only then does a Python loop watch this bridge.
    serving: AtomicBool,
}

impl Bridge {
    pub fn new() -> std::io::Result<Self> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        Ok(Bridge {
            queue: Mutex::new(Vec::new()),
            wake_pending: AtomicBool::new(false),
            wake_tx,
            wake_rx,
            python_calls: AtomicU64::new(0),
            serving: AtomicBool::new(false),
        })
    }

    pub fn submit(&self, job: Job) {
        if matches!(
            job,
            Job::Phase(_)
                | Job::Connection(_)
                | Job::TcpPeer(_)
                | Job::Stream(_)
                | Job::Logging { .. }
        ) {
            self.python_calls.fetch_add(1, Ordering::Relaxed);
        }
        self.queue.lock().push(job);
        self.wake();
    }

    /// Make the Python loop call `run_pending` soon. One byte per batch, not per job.
    pub fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            // A full socket buffer means a wake-up is already pending: nothing is lost.
            let _ = (&self.wake_tx).write(&[1]);
        }
    }

    /// Everything queued so far. Order matters: drain the wake-up bytes, then clear the
    /// flag, then take the queue. A job pushed before the clear is in the queue we take; one
    /// pushed after it writes a byte nobody has drained, so the loop calls us again. (Clearing
    /// before draining could swallow the only byte while the flag says a wake-up is pending:
    /// the loop would never wake again.)
    pub fn take(&self) -> Vec<Job> {
        let mut sink = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut sink), Ok(n) if n > 0) {}
        self.wake_pending.store(false, Ordering::Release);
        std::mem::take(&mut *self.queue.lock())
    }

    pub fn fileno(&self) -> RawFd {
        self.wake_rx.as_raw_fd()
    }

    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Release);
    }

    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    pub fn python_calls(&self) -> u64 {
        self.python_calls.load(Ordering::Relaxed)
    }
}

/// Run every job queued on `bridge` (one batch, its replies sent together), then hand the
/// engine's log records to `emit_logs`. The `run_pending` of every server kind.
pub fn run_batch(
    py: pyo3::Python<'_>,
    bridge: &Bridge,
    emit_logs: &pyo3::Py<pyo3::PyAny>,
    mut run_job: impl FnMut(pyo3::Python<'_>, Job) -> pyo3::PyResult<()>,
) -> pyo3::PyResult<usize> {
    use pyo3::exceptions::PyException;
    use pyo3::types::PyList;
    let jobs = bridge.take();
    let count = jobs.len();
    // KeyboardInterrupt and SystemExit are the user's, not ours to log: raised once the
    // batch is done, so no other request is left waiting.
    let mut interrupt = None;
    let held = crate::call::HoldReplies::begin();
    for job in jobs {
        if let Err(error) = run_job(py, job) {
            if error.is_instance_of::<PyException>(py) {
                crate::logs::log_python_error(py, &error, "ferroxy dispatcher failed");
            } else {
                interrupt.get_or_insert(error);
            }
        }
    }
    drop(held);
    let records = crate::logs::take_records();
    if !records.is_empty() {
        let batch = PyList::new(
            py,
            records.into_iter().map(|r| (r.logger, r.level, r.message)),
        )?;
        if let Err(error) = emit_logs.call1(py, (batch,)) {
            crate::logs::log_python_error(py, &error, "emitting engine logs failed");
        }
    }
    match interrupt {
        Some(error) => Err(error),
        None => Ok(count),
    }
}

/// Turn an engine error into the Python object hooks receive.
pub fn error_arg(
    py: pyo3::Python<'_>,
    error: Option<ferroxy_engine::Error>,
) -> pyo3::PyResult<pyo3::Py<pyo3::PyAny>> {
    match error {
        Some(error) => Ok(error_object(py, error)?.into_any()),
        None => Ok(py.None()),
    }
}
