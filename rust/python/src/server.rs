//! `Server`: the engine's server driven from Python. The Python thread that owns it runs
//! `run_pending` whenever `fileno()` becomes readable.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use pyo3::exceptions::{PyException, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;

use ferroxy_engine::upstream::PoolConfig;
use ferroxy_engine::{
    AccessLog, AccessLogFormat, AccessLogTarget, Server, ServerConfig, ServerHandle,
};

use crate::bridge::{error_arg, Bridge, Job};
use crate::call::{Call, HoldReplies, PhaseKind};
use crate::logs;
use crate::proxy::{Hooks, PyProxy};
use crate::types::PyPeer;

/// The dispatcher's methods, looked up once rather than on every job.
struct Dispatcher {
    request_phase: Py<PyAny>,
    response_phase: Py<PyAny>,
    fail_phase: Py<PyAny>,
    logging_phase: Py<PyAny>,
    emit_logs: Py<PyAny>,
    stopped: Py<PyAny>,
}

#[pyclass(name = "Server", module = "ferroxy._core", frozen)]
pub struct PyServer {
    bridge: Arc<Bridge>,
    dispatcher: Dispatcher,
    config: ServerConfig,
    hooks: Hooks,
    upstream: Option<ferroxy_engine::Peer>,
    handle: Mutex<Option<ServerHandle>>,
    addr: OnceLock<std::net::SocketAddr>,
}

/// `access_log=`: a path, `"-"` (stdout) or `"off"`; or True (stdout) or False (off).
#[derive(FromPyObject)]
enum AccessLogOption {
    #[pyo3(transparent, annotation = "bool")]
    Enabled(bool),
    #[pyo3(transparent, annotation = "str | os.PathLike[str]")]
    Target(PathBuf),
}

impl From<AccessLogOption> for AccessLogTarget {
    fn from(option: AccessLogOption) -> Self {
        match option {
            AccessLogOption::Enabled(true) => AccessLogTarget::Stdout,
            AccessLogOption::Enabled(false) => AccessLogTarget::Off,
            AccessLogOption::Target(path) => AccessLogTarget::from(path),
        }
    }
}

fn duration(field: &str, seconds: f64) -> PyResult<Duration> {
    if seconds.is_finite() && seconds >= 0.0 {
        Ok(Duration::from_secs_f64(seconds))
    } else {
        Err(PyValueError::new_err(format!(
            "{field} must be a non-negative number of seconds, got {seconds}"
        )))
    }
}

fn positive(field: &str, seconds: f64) -> PyResult<Duration> {
    match duration(field, seconds)? {
        d if d.is_zero() => Err(PyValueError::new_err(format!(
            "{field} must be greater than 0"
        ))),
        d => Ok(d),
    }
}

#[pymethods]
impl PyServer {
    #[new]
    #[pyo3(signature = (
        dispatcher, *, hooks=None, upstream=None, listen="127.0.0.1:8080".to_owned(), threads=0,
        grace_period=5.0, client_read_timeout=60.0, client_write_timeout=60.0, keepalive_timeout=75.0,
        pool_idle_timeout=60.0, pool_max_idle_per_peer=128,
        access_log=AccessLogOption::Target(PathBuf::from("-")),
        access_log_format="combined".to_owned()
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        dispatcher: &Bound<'_, PyAny>,
        hooks: Option<&Bound<'_, PyAny>>,
        upstream: Option<&Bound<'_, PyAny>>,
        listen: String,
        threads: i64,
        grace_period: f64,
        client_read_timeout: f64,
        client_write_timeout: f64,
        keepalive_timeout: f64,
        pool_idle_timeout: f64,
        pool_max_idle_per_peer: i64,
        access_log: AccessLogOption,
        access_log_format: String,
    ) -> PyResult<Self> {
        let hook_names: Vec<String> = match hooks {
            Some(names) => names
                .try_iter()?
                .map(|n| n?.extract::<String>())
                .collect::<PyResult<_>>()?,
            None => Vec::new(),
        };
        let hooks = Hooks::from_names(hook_names.iter().map(String::as_str))
            .map_err(PyValueError::new_err)?;
        let upstream = match upstream {
            Some(peer) if !peer.is_none() => Some(
                peer.cast::<PyPeer>()
                    .map_err(|_| PyTypeError::new_err("upstream must be a Peer"))?
                    .get()
                    .inner
                    .clone(),
            ),
            _ => None,
        };
        if !(0..=1024).contains(&threads) {
            return Err(PyValueError::new_err(format!(
                "threads must be between 0 and 1024, got {threads}"
            )));
        }
        let pool_max_idle_per_peer = usize::try_from(pool_max_idle_per_peer)
            .map_err(|_| PyValueError::new_err("pool_max_idle_per_peer must be >= 0"))?;
        let access_log_format = AccessLogFormat::parse(&access_log_format)
            .map_err(|e| PyValueError::new_err(format!("access_log_format: {e}")))?;
        let config = ServerConfig {
            listen,
            threads: threads as usize,
            grace_period: duration("grace_period", grace_period)?,
            client_read_timeout: positive("client_read_timeout", client_read_timeout)?,
            client_write_timeout: positive("client_write_timeout", client_write_timeout)?,
            keepalive_timeout: positive("keepalive_timeout", keepalive_timeout)?,
            pool: PoolConfig {
                idle_timeout: duration("pool_idle_timeout", pool_idle_timeout)?,
                max_idle_per_peer: pool_max_idle_per_peer,
            },
            // After the other options, so that a bad one leaves no file created.
            access_log: AccessLog::open(&access_log.into(), access_log_format)?,
        };
        let method = |name: &str| -> PyResult<Py<PyAny>> {
            dispatcher
                .getattr(name)
                .map(Bound::unbind)
                .map_err(|_| PyTypeError::new_err(format!("dispatcher has no {name}() method")))
        };
        let dispatcher = Dispatcher {
            request_phase: method("request_phase")?,
            response_phase: method("response_phase")?,
            fail_phase: method("fail_phase")?,
            logging_phase: method("logging_phase")?,
            emit_logs: method("emit_logs")?,
            stopped: method("stopped")?,
        };
        let bridge = Arc::new(Bridge::new()?);
        logs::register_loop(&bridge);
        let _ = py;
        Ok(PyServer {
            bridge,
            dispatcher,
            config,
            hooks,
            upstream,
            handle: Mutex::new(None),
            addr: OnceLock::new(),
        })
    }

    fn start(&self, py: Python<'_>) -> PyResult<()> {
        if self.addr.get().is_some() {
            return Err(PyRuntimeError::new_err("server already started"));
        }
        let proxy = self.proxy();
        let bridge = self.bridge.clone();
        let config = self.config.clone();
        // No lock held while detached: another thread holding the GIL may read our state.
        let started = py.detach(move || {
            Server::new(config, proxy)
                .on_stopped(move || bridge.submit(Job::Stopped))
                .start()
        });
        let handle = started.map_err(|e| PyOSError::new_err(e.to_string()))?;
        if self.addr.set(handle.local_addr()).is_err() {
            return Err(PyRuntimeError::new_err("server already started"));
        }
        *self.handle.lock() = Some(handle);
        self.bridge.set_serving(true);
        logs::wake_loops();
        Ok(())
    }

    /// Reopen the access log file at its path (after logrotate renamed it).
    fn reopen_access_log(&self) {
        if let Some(log) = &self.config.access_log {
            log.reopen();
        }
    }

    #[getter]
    fn addr(&self) -> PyResult<String> {
        Ok(self.local_addr()?.to_string())
    }

    #[getter]
    fn port(&self) -> PyResult<u16> {
        Ok(self.local_addr()?.port())
    }

    #[getter]
    fn python_calls(&self) -> u64 {
        self.bridge.python_calls()
    }

    fn fileno(&self) -> i32 {
        self.bridge.fileno()
    }

    #[getter]
    fn stopped(&self) -> bool {
        self.handle
            .lock()
            .as_ref()
            .is_none_or(ServerHandle::is_stopped)
    }

    #[pyo3(signature = (grace_period=None))]
    fn shutdown(&self, grace_period: Option<f64>) -> PyResult<()> {
        let grace = grace_period
            .map(|g| duration("grace_period", g))
            .transpose()?;
        match self.handle.lock().as_ref() {
            Some(handle) => handle.shutdown(grace),
            // Never started, or already stopped: report "stopped" all the same.
            None => self.bridge.submit(Job::Stopped),
        }
        Ok(())
    }

    /// Time `trips` response-phase round trips through the bridge, `in_flight` at a time,
    /// from a tokio runtime on this thread (release the loop thread to drain meanwhile:
    /// call this from an executor). Returns seconds of wall time.
    #[pyo3(signature = (trips, in_flight=1))]
    fn bench_bridge(&self, py: Python<'_>, trips: usize, in_flight: usize) -> PyResult<f64> {
        if !self.hooks.response_filter {
            return Err(PyValueError::new_err(
                "bench_bridge needs an app that overrides response_filter",
            ));
        }
        let proxy = Arc::new(self.proxy());
        self.bridge.set_serving(true);
        let elapsed = py.detach(|| crate::bench::run(proxy, trips, in_flight));
        self.bridge.set_serving(false);
        Ok(elapsed?)
    }

    fn run_pending(&self, py: Python<'_>) -> PyResult<usize> {
        let jobs = self.bridge.take();
        let count = jobs.len();
        // KeyboardInterrupt and SystemExit are the user's, not ours to log: raised once the
        // batch is done, so no other request is left waiting.
        let mut interrupt = None;
        let held = HoldReplies::begin();
        for job in jobs {
            if let Err(error) = self.run_job(py, job) {
                if error.is_instance_of::<PyException>(py) {
                    log_python_error(py, &error, "ferroxy dispatcher failed");
                } else {
                    interrupt.get_or_insert(error);
                }
            }
        }
        drop(held);
        let records = logs::take_records();
        if !records.is_empty() {
            let batch = PyList::new(
                py,
                records.into_iter().map(|r| (r.logger, r.level, r.message)),
            )?;
            if let Err(error) = self.dispatcher.emit_logs.call1(py, (batch,)) {
                log_python_error(py, &error, "emitting engine logs failed");
            }
        }
        match interrupt {
            Some(error) => Err(error),
            None => Ok(count),
        }
    }
}

impl PyServer {
    fn proxy(&self) -> PyProxy {
        PyProxy {
            bridge: self.bridge.clone(),
            hooks: self.hooks,
            upstream: self.upstream.clone(),
        }
    }

    fn local_addr(&self) -> PyResult<std::net::SocketAddr> {
        self.addr
            .get()
            .copied()
            .ok_or_else(|| PyRuntimeError::new_err("server not started"))
    }

    fn run_job(&self, py: Python<'_>, job: Job) -> PyResult<()> {
        match job {
            Job::Phase(job) => {
                let (kind, call) = Call::from_job(py, job)?;
                let method = match kind {
                    PhaseKind::Request => &self.dispatcher.request_phase,
                    PhaseKind::Response => &self.dispatcher.response_phase,
                    PhaseKind::Fail => &self.dispatcher.fail_phase,
                };
                if let Err(error) = method.call1(py, (&call,)) {
                    // The dispatcher itself broke: the client still gets an answer.
                    if call.get().is_pending() {
                        let _ = call.call_method1("fail", ("dispatcher", error.to_string(), 500));
                    }
                    return Err(error);
                }
                Ok(())
            }
            Job::Logging { mut session, error } => {
                let session = session.object(py)?;
                let error = error_arg(py, error)?;
                self.dispatcher
                    .logging_phase
                    .call1(py, (session, error))
                    .map(drop)
            }
            Job::Stopped => {
                self.bridge.set_serving(false);
                // Dropping the runtime closes connections that outlived the grace period
                // and frees the engine's threads and pooled sockets.
                let handle = self.handle.lock().take();
                drop(handle);
                self.dispatcher.stopped.call0(py).map(drop)
            }
        }
    }
}

/// Report a Python exception through Python's logging, traceback included.
fn log_python_error(py: Python<'_>, error: &PyErr, what: &str) {
    let logged = py.import("logging").and_then(|logging| {
        let logger = logging.call_method1("getLogger", ("ferroxy",))?;
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("exc_info", error.value(py))?;
        logger.call_method("error", (what,), Some(&kwargs))
    });
    if logged.is_err() {
        error.print(py);
    }
}
