//! The app's connection filter: `ferroxy.filters.IPAccess` made into the engine's
//! [`IpAccess`] once at start-up (run in Rust, no GIL), or the app's `connection_filter` hook,
//! asked through the bridge as a phase is: the tokio task queues a job and awaits its answer,
//! and the Python thread runs the hook in its next batch.

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use tokio::sync::oneshot;

use ferroxy_engine::connection_filter::{ConnectionFilter, IpAccess, Verdict};

use crate::bridge::{Bridge, Job};
use crate::call::{deliver, Delivery};

/// The hook's name, as the app writes it and as `hooks=` names it.
pub const HOOK: &str = "connection_filter";

/// A connection the hook is asked about, and where its answer goes.
pub struct ConnectionJob {
    pub client_addr: SocketAddr,
    pub reply: oneshot::Sender<bool>,
}

/// The `connection_filter` hook, asked from the engine's tokio tasks.
pub struct PyConnectionFilter {
    pub bridge: Arc<Bridge>,
}

impl std::fmt::Debug for PyConnectionFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PyConnectionFilter")
    }
}

impl ConnectionFilter for PyConnectionFilter {
    fn should_accept(&self, client_addr: SocketAddr) -> Verdict<'_> {
        let (reply, replied) = oneshot::channel();
        self.bridge
            .submit(Job::Connection(ConnectionJob { client_addr, reply }));
        // No answer (the dispatcher dropped the call, the server stopped): refused, as a
        // failing hook's connection is.
        Box::pin(async move { replied.await.unwrap_or(false) })
    }
}

/// One `connection_filter` call, as the dispatcher sees it: the client's address, and
/// `answer()` to accept or refuse it, once.
#[pyclass(module = "ferroxy._core", frozen)]
pub struct ConnectionCall {
    client_addr: SocketAddr,
    reply: Mutex<Option<oneshot::Sender<bool>>>,
}

impl ConnectionCall {
    pub fn from_job(job: ConnectionJob) -> Self {
        ConnectionCall {
            client_addr: job.client_addr,
            reply: Mutex::new(Some(job.reply)),
        }
    }

    pub fn is_pending(&self) -> bool {
        self.reply.lock().is_some()
    }
}

#[pymethods]
impl ConnectionCall {
    /// `host:port`, as `session.client_addr` shows it (`[::1]:5000` for IPv6).
    #[getter]
    fn client_addr(&self) -> String {
        self.client_addr.to_string()
    }

    /// Serve the connection (True) or close it (False).
    fn answer(&self, accept: bool) -> PyResult<()> {
        let reply = self
            .reply
            .lock()
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("this call was already answered"))?;
        // With the batch's other answers, as a phase's reply is (see `call::deliver`).
        deliver(Delivery::Connection(reply, accept));
        Ok(())
    }
}

/// `IPAccess(allow=, deny=)` as the engine's rules; errors name the class and the entry
/// (`IPAccess.allow[1]: "10.0.0.300/8" is not a CIDR`).
pub fn ip_access_from(obj: &Bound<'_, PyAny>) -> PyResult<IpAccess> {
    let class = obj.get_type().name()?.to_string();
    let module: String = obj.get_type().getattr("__module__")?.extract()?;
    if class != "IPAccess" || !module.starts_with("ferroxy") {
        return Err(PyTypeError::new_err(format!(
            "connection_filter must be a ferroxy.filters.IPAccess (or a connection_filter \
             method of the app), not {class}"
        )));
    }
    let allow: Vec<String> = obj.getattr("allow")?.extract()?;
    let deny: Vec<String> = obj.getattr("deny")?.extract()?;
    IpAccess::allow_deny(&allow, &deny).map_err(|e| PyValueError::new_err(format!("{class}.{e}")))
}

/// Check an `IPAccess` when Python makes one: the conversion start-up runs.
#[pyfunction]
#[pyo3(signature = (access, /))]
pub fn check_ip_access(access: &Bound<'_, PyAny>) -> PyResult<()> {
    ip_access_from(access).map(drop)
}
