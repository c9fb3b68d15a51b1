//! `Server`: the engine's server driven from Python. The Python thread that owns it runs
//! `run_pending` whenever `fileno()` becomes readable.

use std::any::Any;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use ferroxy_engine::connection_filter::ConnectionFilter;
use ferroxy_engine::lb::Upstream;
use ferroxy_engine::listener::Endpoint;
use ferroxy_engine::tls::server::TlsAcceptor;
use ferroxy_engine::upstream::PoolConfig;
use ferroxy_engine::{
    AccessLog, AccessLogFormat, AccessLogTarget, BackgroundStop, Listener, Routes, Rules, Server,
    ServerConfig, ServerHandle,
};

use crate::bridge::{error_arg, Bridge, Job};
use crate::call::{Call, PhaseKind};
use crate::connection_filter::{ip_access_from, ConnectionCall, PyConnectionFilter};
use crate::lb::PyLoadBalancer;
use crate::logs::{self};
use crate::proxy::{Hooks, PyProxy};
use crate::stream::StreamCall;
use crate::types::{non_negative_seconds, positive_seconds, PyPeer};

/// The dispatcher's methods, looked up once rather than on every job.
struct Dispatcher {
    request_phase: Py<PyAny>,
    response_phase: Py<PyAny>,
    connect_fail_phase: Py<PyAny>,
    fail_phase: Py<PyAny>,
    logging_phase: Py<PyAny>,
    /// Only for an app with a `connection_filter` hook.
    connection_phase: Option<Py<PyAny>>,
    /// Only for an app with a body filter or `websocket_message` hook.
    stream_phase: Option<Py<PyAny>>,
    emit_logs: Py<PyAny>,
    stopped: Py<PyAny>,
}

#[pyclass(name = "Server", module = "ferroxy._core", frozen)]
pub struct PyServer {
    bridge: Arc<Bridge>,
    dispatcher: Dispatcher,
    config: ServerConfig,
    hooks: Hooks,
    upstream: Option<Upstream>,
    /// The load balancers the app uses, whose background services run with the server.
    balancers: Vec<Arc<ferroxy_engine::lb::LoadBalancer>>,
    /// The balancers of the reloaded routes that `balancers` lacks, with their background
    /// services: each reload of the routes stops those its routes no longer use. (Its lock
    /// also keeps concurrent reloads in order, so the checks run are those of the routes
    /// in effect.)
    reloaded_balancers: Mutex<Vec<(Arc<ferroxy_engine::lb::LoadBalancer>, Vec<BackgroundStop>)>>,
    handle: Mutex<Option<ServerHandle>>,
    addrs: OnceLock<Vec<std::net::SocketAddr>>,
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

#[pymethods]
impl PyServer {
    #[new]
    #[pyo3(signature = (
        dispatcher, *, hooks=None, upstream=None, listen=None, threads=None, grace_period=None,
        client_read_timeout=None, client_write_timeout=None, keepalive_timeout=None,
        pool_idle_timeout=None, pool_max_idle_per_peer=None, access_log=None,
        access_log_format=None, filters=None, routes=None, balancers=None, tls=None,
        tls_listen=None, proxy_protocol=None, tunnel_idle_timeout=None, compression=None,
        connection_filter=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        dispatcher: &Bound<'_, PyAny>,
        hooks: Option<&Bound<'_, PyAny>>,
        upstream: Option<&Bound<'_, PyAny>>,
        listen: Option<&Bound<'_, PyAny>>,
        threads: Option<i64>,
        grace_period: Option<f64>,
        client_read_timeout: Option<f64>,
        client_write_timeout: Option<f64>,
        keepalive_timeout: Option<f64>,
        pool_idle_timeout: Option<f64>,
        pool_max_idle_per_peer: Option<i64>,
        access_log: Option<AccessLogOption>,
        access_log_format: Option<String>,
        filters: Option<&Bound<'_, PyAny>>,
        routes: Option<&Bound<'_, PyAny>>,
        balancers: Option<Vec<PyRef<'_, PyLoadBalancer>>>,
        tls: Option<&Bound<'_, PyAny>>,
        tls_listen: Option<&Bound<'_, PyAny>>,
        proxy_protocol: Option<bool>,
        tunnel_idle_timeout: Option<f64>,
        compression: Option<&Bound<'_, PyAny>>,
        connection_filter: Option<&Bound<'_, PyAny>>,
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
            Some(value) if !value.is_none() => Some(upstream_from(value)?),
            _ => None,
        };
        if let Some(threads) = threads.filter(|n| !(0..=1024).contains(n)) {
            return Err(PyValueError::new_err(format!(
                "threads must be between 0 and 1024, got {threads}"
            )));
        }
        let pool_max_idle_per_peer = pool_max_idle_per_peer
            .map(usize::try_from)
            .transpose()
            .map_err(|_| PyValueError::new_err("pool_max_idle_per_peer must be >= 0"))?;
        // Options not given keep the engine's defaults, the only place they are stated.
        let defaults = ServerConfig::default();
        let access_log_format = match access_log_format {
            Some(text) => AccessLogFormat::parse(&text)
                .map_err(|e| PyValueError::new_err(format!("access_log_format: {e}")))?,
            None => AccessLogFormat::default(),
        };
        let access_log_target = access_log.map_or_else(AccessLogTarget::default, Into::into);
        let mut rules = Rules::default();
        if let Some(filters) = filters.filter(|f| !f.is_none()) {
            rules.filters = crate::filters::filters_from(filters)?;
        }
        if let Some(routes) = routes.filter(|r| !r.is_none()) {
            rules.routes = routes_with_objects(routes)?;
        }
        let tls = match tls.filter(|t| !t.is_none()) {
            Some(tls) => Some(crate::tls::acceptor_from(tls)?),
            None => None,
        };
        let bridge = Arc::new(Bridge::new()?);
        let connection_filter: Option<Arc<dyn ConnectionFilter>> =
            match connection_filter.filter(|f| !f.is_none()) {
                Some(_) if hooks.connection_filter => {
                    return Err(PyValueError::new_err(
                        "connection_filter: the app has a connection_filter hook already; give \
                         one or the other",
                    ))
                }
                Some(declared) => Some(Arc::new(ip_access_from(declared)?)),
                None if hooks.connection_filter => Some(Arc::new(PyConnectionFilter {
                    bridge: bridge.clone(),
                })),
                None => None,
            };
        let config = ServerConfig {
            listeners: endpoints(
                listen,
                tls_listen,
                tls.as_ref(),
                proxy_protocol.unwrap_or(false),
            )?
            .into_iter()
            .map(|endpoint| endpoint.with_connection_filter(connection_filter.clone()))
            .collect(),
            threads: threads.map_or(defaults.threads, |n| n as usize),
            grace_period: non_negative_seconds("grace_period", grace_period)?
                .unwrap_or(defaults.grace_period),
            client_read_timeout: positive_seconds("client_read_timeout", client_read_timeout)?
                .unwrap_or(defaults.client_read_timeout),
            client_write_timeout: positive_seconds("client_write_timeout", client_write_timeout)?
                .unwrap_or(defaults.client_write_timeout),
            keepalive_timeout: positive_seconds("keepalive_timeout", keepalive_timeout)?
                .unwrap_or(defaults.keepalive_timeout),
            tunnel_idle_timeout: positive_seconds("tunnel_idle_timeout", tunnel_idle_timeout)?
                .unwrap_or(defaults.tunnel_idle_timeout),
            pool: PoolConfig {
                idle_timeout: non_negative_seconds("pool_idle_timeout", pool_idle_timeout)?
                    .unwrap_or(defaults.pool.idle_timeout),
                max_idle_per_peer: pool_max_idle_per_peer
                    .unwrap_or(defaults.pool.max_idle_per_peer),
            },
            rules: rules.into(),
            compression: match compression.filter(|c| !c.is_none()) {
                Some(config) => Some(crate::compression::compression_from(config)?),
                None => None,
            },
            // After the other options, so that a bad one leaves no file created.
            access_log: AccessLog::open(&access_log_target, access_log_format)?,
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
            connect_fail_phase: method("connect_fail_phase")?,
            fail_phase: method("fail_phase")?,
            logging_phase: method("logging_phase")?,
            connection_phase: hooks
                .connection_filter
                .then(|| method("connection_phase"))
                .transpose()?,
            stream_phase: hooks
                .has_streams()
                .then(|| method("stream_phase"))
                .transpose()?,
            emit_logs: method("emit_logs")?,
            stopped: method("stopped")?,
        };
        logs::register_loop(&bridge);
        Ok(PyServer {
            bridge,
            dispatcher,
            config,
            hooks,
            upstream,
            balancers: balancers
                .unwrap_or_default()
                .iter()
                .map(|balancer| balancer.inner.clone())
                .collect(),
            reloaded_balancers: Mutex::new(Vec::new()),
            handle: Mutex::new(None),
            addrs: OnceLock::new(),
        })
    }

    fn start(&self, py: Python<'_>) -> PyResult<()> {
        if self.addrs.get().is_some() {
            return Err(PyRuntimeError::new_err("server already started"));
        }
        let proxy = self.proxy();
        let bridge = self.bridge.clone();
        let config = self.config.clone();
        // The health checks and DNS refresh of the balancers the app uses run while this
        // server does.
        let balancer_services: Vec<_> = self
            .balancers
            .iter()
            .flat_map(|balancer| balancer.background_services())
            .collect();
        // No lock held while detached: another thread holding the GIL may read our state.
        let started = py.detach(move || {
            let mut server = Server::proxy(config, proxy);
            for service in balancer_services {
                server.add_background(service);
            }
            server
                .on_stopped(move || bridge.submit(Job::Stopped))
                .start()
        });
        let handle = started.map_err(|e| PyOSError::new_err(e.to_string()))?;
        if self.addrs.set(handle.local_addrs().to_vec()).is_err() {
            return Err(PyRuntimeError::new_err("server already started"));
        }
        *self.handle.lock() = Some(handle);
        self.bridge.set_serving(true);
        logs::wake_loops();
        Ok(())
    }

    /// Swap in new filters and routes while serving (`Proxy.reload`): each one given (a list,
    /// possibly empty) replaces the current one, one left out stays; both are checked first,
    /// and a bad one raises with nothing changed. Requests that arrive from now on run the
    /// new set, those in flight finish on theirs. `balancers` are the load balancers the new
    /// routes use: those this server does not run yet get their health checks and DNS
    /// refresh started, and those only earlier reloaded routes used have theirs stopped now
    /// (a request still on those routes is served by the balancer all the same, on the
    /// health it last saw); those the server started with run until it stops.
    #[pyo3(signature = (*, filters=None, routes=None, balancers=None))]
    fn reload(
        &self,
        filters: Option<&Bound<'_, PyAny>>,
        routes: Option<&Bound<'_, PyAny>>,
        balancers: Option<Vec<PyRef<'_, PyLoadBalancer>>>,
    ) -> PyResult<()> {
        if self.stopped() {
            return Err(PyRuntimeError::new_err(
                "the server is not running: reload() swaps the rules of a running proxy (set \
                 the app's filters and routes before it starts)",
            ));
        }
        let filters = filters.map(crate::filters::filters_from).transpose()?;
        let routes = routes.map(routes_with_objects).transpose()?;
        if let Some(None) = routes {
            if self.upstream.is_none() && !self.hooks.upstream_peer {
                return Err(PyValueError::new_err(
                    "routes: the app has no `upstream` and no upstream_peer(): without routes \
                     no request would have anywhere to go",
                ));
            }
        }
        let mut reloaded = self.reloaded_balancers.lock();
        self.config.rules.update(|current| {
            let mut next = current.clone();
            if let Some(filters) = &filters {
                next.filters = filters.clone();
            }
            if let Some(routes) = &routes {
                next.routes = routes.clone();
            }
            next
        });
        if routes.is_none() {
            // The routes, and so their balancers, stay.
            return Ok(());
        }
        let wanted: Vec<_> = balancers
            .unwrap_or_default()
            .iter()
            .map(|balancer| balancer.inner.clone())
            .filter(|balancer| !self.balancers.iter().any(|b| Arc::ptr_eq(b, balancer)))
            .collect();
        // Dropping their stop handles stops the services of those no longer wanted.
        reloaded.retain(|(balancer, _)| wanted.iter().any(|w| Arc::ptr_eq(w, balancer)));
        let handle = self.handle.lock();
        for balancer in wanted {
            if reloaded.iter().any(|(b, _)| Arc::ptr_eq(b, &balancer)) {
                continue;
            }
            let stops = match handle.as_ref() {
                Some(handle) => (balancer.background_services().into_iter())
                    .map(|service| handle.add_background(service))
                    .collect(),
                None => Vec::new(),
            };
            reloaded.push((balancer, stops));
        }
        Ok(())
    }

    /// Read every TLS listener's certificate, key and CA files again (`Proxy.reload_tls`,
    /// SIGHUP): new handshakes use them, open connections keep theirs. A file that cannot be
    /// used raises ValueError naming it, and the certificates in use stay.
    fn reload_tls(&self) -> PyResult<bool> {
        let mut acceptors: Vec<&Arc<TlsAcceptor>> = Vec::new();
        for endpoint in &self.config.listeners {
            if let Some(acceptor) = &endpoint.tls {
                if !acceptors.iter().any(|a| Arc::ptr_eq(a, acceptor)) {
                    acceptors.push(acceptor);
                }
            }
        }
        for acceptor in &acceptors {
            acceptor.reload().map_err(PyValueError::new_err)?;
        }
        Ok(!acceptors.is_empty())
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

    /// Every listener's address, in the order given.
    #[getter]
    fn addrs(&self) -> PyResult<Vec<String>> {
        Ok(self.listening()?.iter().map(ToString::to_string).collect())
    }

    /// Each listener's scheme ("http" or "https"), in the order of `addrs`.
    #[getter]
    fn schemes(&self) -> Vec<&'static str> {
        self.config
            .listeners
            .iter()
            .map(|endpoint| {
                if endpoint.tls.is_some() {
                    "https"
                } else {
                    "http"
                }
            })
            .collect()
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

    #[getter(stopped)]
    fn is_stopped(&self) -> bool {
        self.stopped()
    }

    #[pyo3(signature = (grace_period=None))]
    fn shutdown(&self, grace_period: Option<f64>) -> PyResult<()> {
        let grace = non_negative_seconds("grace_period", grace_period)?;
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
    #[cfg(feature = "bridge-bench")]
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

    /// Run one request through the app's phases with no sockets (see `ferroxy.testing.simulate`).
    /// Returns at once; the outcome is ready once `dispatcher.stopped()` has been called.
    #[pyo3(signature = (method, path, headers, body, client_addr, local_addr, upstream=None))]
    #[allow(clippy::too_many_arguments)]
    fn simulate(
        &self,
        method: String,
        path: String,
        headers: &Bound<'_, PyAny>,
        body: Vec<u8>,
        client_addr: String,
        local_addr: String,
        upstream: Option<&Bound<'_, crate::types::PyResponse>>,
    ) -> PyResult<crate::simulate::Simulation> {
        if self.addrs.get().is_some() {
            return Err(PyRuntimeError::new_err(
                "this server is serving; simulate on a new one",
            ));
        }
        let request = crate::simulate::SimulatedRequest {
            method,
            target: path,
            headers: crate::headers::headers_from_python(headers)?,
            body: body.into(),
            client_addr,
            local_addr,
        };
        self.bridge.set_serving(true);
        // The app's filters and routes too; no access log.
        let config = ferroxy_engine::proxy::ProxyConfig {
            access_log: None,
            rules: self.config.rules.clone(),
            compression: self.config.compression.clone().map(Arc::new),
        };
        crate::simulate::start(
            self.proxy(),
            config,
            self.bridge.clone(),
            request,
            crate::simulate::upstream_response(upstream),
        )
    }

    fn run_pending(&self, py: Python<'_>) -> PyResult<usize> {
        crate::bridge::run_batch(py, &self.bridge, &self.dispatcher.emit_logs, |py, job| {
            self.run_job(py, job)
        })
    }
}

/// A fixed `upstream`: a `Peer`, or a `LoadBalancer` that picks per request in Rust.
pub fn upstream_from(value: &Bound<'_, PyAny>) -> PyResult<Upstream> {
    if let Ok(peer) = value.cast::<PyPeer>() {
        return Ok(Upstream::Peer(peer.get().inner.clone()));
    }
    if let Ok(balancer) = value.cast::<PyLoadBalancer>() {
        return Ok(Upstream::Balanced(balancer.get().inner.clone()));
    }
    Err(PyTypeError::new_err(format!(
        "upstream must be a Peer or a LoadBalancer, not {}",
        value.get_type().name()?
    )))
}

/// Routes for the engine, with Python's own list beside them for `session.route` to hand back
/// the object that matched (`None` for an empty list).
fn routes_with_objects(routes: &Bound<'_, PyAny>) -> PyResult<Option<Arc<Routes>>> {
    let objects = PyTuple::new(
        routes.py(),
        routes.try_iter()?.collect::<PyResult<Vec<_>>>()?,
    )?;
    let Some(router) = crate::filters::routes_from(objects.as_any())? else {
        return Ok(None);
    };
    let objects: Arc<dyn Any + Send + Sync> = Arc::new(objects.unbind());
    Ok(Some(Arc::new(Routes::with_data(router, objects))))
}

impl PyServer {
    fn stopped(&self) -> bool {
        self.handle
            .lock()
            .as_ref()
            .is_none_or(ServerHandle::is_stopped)
    }

    fn proxy(&self) -> PyProxy {
        PyProxy {
            bridge: self.bridge.clone(),
            hooks: self.hooks,
            upstream: self.upstream.clone(),
        }
    }

    fn local_addr(&self) -> PyResult<std::net::SocketAddr> {
        Ok(self.listening()?[0])
    }

    fn listening(&self) -> PyResult<&[std::net::SocketAddr]> {
        self.addrs
            .get()
            .map(Vec::as_slice)
            .ok_or_else(|| PyRuntimeError::new_err("server not started"))
    }

    fn run_job(&self, py: Python<'_>, job: Job) -> PyResult<()> {
        match job {
            Job::Phase(job) => {
                let (kind, call) = Call::from_job(py, job)?;
                let method = match kind {
                    PhaseKind::Request(_) => &self.dispatcher.request_phase,
                    PhaseKind::Response => &self.dispatcher.response_phase,
                    PhaseKind::ConnectFail => &self.dispatcher.connect_fail_phase,
                    PhaseKind::Fail => &self.dispatcher.fail_phase,
                };
                if let Err(error) = method.call1(py, (&call,)) {
                    // The dispatcher itself broke: the client still gets an answer.
                    if call.get().is_pending() {
                        let _ = call.call_method1("fail", ("dispatcher", error.to_string()));
                    }
                    return Err(error);
                }
                Ok(())
            }
            Job::Connection(job) => {
                let call = Bound::new(py, ConnectionCall::from_job(job))?;
                // Without a connection_phase nobody answers: the dropped call refuses.
                let Some(method) = &self.dispatcher.connection_phase else {
                    return Ok(());
                };
                if let Err(error) = method.call1(py, (&call,)) {
                    if call.get().is_pending() {
                        let _ = call.call_method1("answer", (false,));
                    }
                    return Err(error);
                }
                Ok(())
            }
            Job::BodyRead(job) => crate::body_read::resume(py, job),
            Job::Stream(job) => {
                let call = Bound::new(py, StreamCall::from_job(py, job)?)?;
                // Without a stream_phase nobody answers: the dropped call fails the stream.
                let Some(method) = &self.dispatcher.stream_phase else {
                    return Ok(());
                };
                if let Err(error) = method.call1(py, (&call,)) {
                    if call.get().is_pending() {
                        let _ = call.call_method1("fail", ("dispatcher", error.to_string()));
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
            // A TCP server's job never comes here (dropped: that connection closes).
            Job::TcpPeer(_) => Ok(()),
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

/// The listeners, in order: `listen`'s, then `tls_listen`'s. A `listen` address given as a
/// string is configured by the shorthand options: TLS when the app has `tls` and no
/// `tls_listen` is given, the PROXY protocol when `proxy_protocol` is set; a
/// `ferroxy.Listener` says all about itself. `tls_listen`'s always speak TLS, with the app's
/// `tls`. An address named twice raises ValueError naming both places.
pub(crate) fn endpoints(
    listen: Option<&Bound<'_, PyAny>>,
    tls_listen: Option<&Bound<'_, PyAny>>,
    tls: Option<&Arc<TlsAcceptor>>,
    proxy_protocol: bool,
) -> PyResult<Vec<Endpoint>> {
    let tls_listen = tls_listen.filter(|l| !l.is_none());
    let given = match (listen, tls_listen) {
        // Only TLS listeners were asked for.
        (None, Some(_)) => Vec::new(),
        _ => listen_entries(listen)?,
    };
    let shorthand_tls = if tls_listen.is_none() { tls } else { None };
    let mut named: Vec<(String, Endpoint)> = Vec::new();
    for (i, entry) in given.into_iter().enumerate() {
        let field = match listen {
            Some(one) if !is_list(one) => "listen".to_owned(),
            _ => format!("listen[{i}]"),
        };
        let endpoint = match entry {
            ListenEntry::Addr(listener) => {
                let endpoint = match shorthand_tls {
                    Some(acceptor) => Endpoint::tls(listener, acceptor.clone()),
                    None => Endpoint::from(listener),
                };
                endpoint.with_proxy_protocol(proxy_protocol)
            }
            ListenEntry::Own(object) => own_endpoint(&field, &object)?,
        };
        named.push((field, endpoint));
    }
    if let Some(tls_listen) = tls_listen {
        let Some(acceptor) = tls else {
            return Err(PyValueError::new_err(
                "tls_listen: TLS listeners need a certificate (the app's `tls`, or tls=)",
            ));
        };
        let several = is_list(tls_listen);
        for (i, listener) in listen_specs("tls_listen", Some(tls_listen))?
            .into_iter()
            .enumerate()
        {
            let field = if several {
                format!("tls_listen[{i}]")
            } else {
                "tls_listen".to_owned()
            };
            let endpoint =
                Endpoint::tls(listener, acceptor.clone()).with_proxy_protocol(proxy_protocol);
            named.push((field, endpoint));
        }
    }
    for (i, (field, endpoint)) in named.iter().enumerate() {
        if let Some((earlier, _)) = named[..i]
            .iter()
            .find(|(_, other)| same_socket(&other.listener, &endpoint.listener))
        {
            return Err(PyValueError::new_err(format!(
                "{field}: {} is already {earlier}: each address has one listener",
                endpoint.listener
            )));
        }
    }
    Ok(named.into_iter().map(|(_, endpoint)| endpoint).collect())
}

/// One `listen` entry: an address the shorthand options configure, or a `ferroxy.Listener`.
enum ListenEntry<'py> {
    Addr(Listener),
    Own(Bound<'py, PyAny>),
}

fn is_listener_object(value: &Bound<'_, PyAny>) -> PyResult<bool> {
    Ok(value.hasattr("addr")? && value.hasattr("proxy_protocol")?)
}

/// A list (not one address, not one Listener).
fn is_list(value: &Bound<'_, PyAny>) -> bool {
    !value.is_instance_of::<pyo3::types::PyString>() && !is_listener_object(value).unwrap_or(false)
}

/// `listen`: one entry or a list of them; None for the default.
fn listen_entries<'py>(listen: Option<&Bound<'py, PyAny>>) -> PyResult<Vec<ListenEntry<'py>>> {
    let Some(listen) = listen else {
        return Ok(listen_specs("listen", None)?
            .into_iter()
            .map(ListenEntry::Addr)
            .collect());
    };
    let items: Vec<Bound<'py, PyAny>> = if is_list(listen) {
        listen
            .try_iter()
            .and_then(|items| items.collect::<PyResult<_>>())
            .map_err(|_| {
                PyTypeError::new_err("listen must be a str, a ferroxy.Listener, or a list of them")
            })?
    } else {
        vec![listen.clone()]
    };
    if items.is_empty() {
        return Err(PyValueError::new_err(
            "listen must name at least one address",
        ));
    }
    let several = is_list(listen);
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let field = if several {
                format!("listen[{i}]")
            } else {
                "listen".to_owned()
            };
            if is_listener_object(&item)? {
                return Ok(ListenEntry::Own(item));
            }
            let spec: String = item.extract().map_err(|_| {
                let kind = item
                    .get_type()
                    .name()
                    .map_or_else(|_| "?".into(), |n| n.to_string());
                PyTypeError::new_err(format!(
                    "{field} must be a str or a ferroxy.Listener, not {kind}"
                ))
            })?;
            Listener::parse(&spec)
                .map(ListenEntry::Addr)
                .map_err(|e| PyValueError::new_err(format!("{field}: {e}")))
        })
        .collect()
}

/// A `ferroxy.Listener(addr, tls=, proxy_protocol=)` as the engine's endpoint; errors name
/// `field` (`listen[2].tls: ...`).
fn own_endpoint(field: &str, object: &Bound<'_, PyAny>) -> PyResult<Endpoint> {
    let within = |error: PyErr| {
        let py = object.py();
        if error.is_instance_of::<PyValueError>(py) {
            PyValueError::new_err(format!("{field}.{}", error.value(py)))
        } else if error.is_instance_of::<PyTypeError>(py) {
            PyTypeError::new_err(format!("{field}.{}", error.value(py)))
        } else {
            error
        }
    };
    let addr: String = object
        .getattr("addr")?
        .extract()
        .map_err(|_| PyTypeError::new_err(format!("{field}.addr must be a str")))?;
    let listener =
        Listener::parse(&addr).map_err(|e| PyValueError::new_err(format!("{field}.addr: {e}")))?;
    let proxy_protocol: bool = object
        .getattr("proxy_protocol")?
        .extract()
        .map_err(|_| PyTypeError::new_err(format!("{field}.proxy_protocol must be a bool")))?;
    let tls = object.getattr("tls")?;
    let endpoint = if tls.is_none() {
        Endpoint::from(listener)
    } else {
        Endpoint::tls(listener, crate::tls::acceptor_from(&tls).map_err(within)?)
    };
    Ok(endpoint.with_proxy_protocol(proxy_protocol))
}

/// Whether two listeners would be the same socket: one descriptor twice, or one address and
/// port twice (port 0, a fresh port each time, never clashes).
fn same_socket(a: &Listener, b: &Listener) -> bool {
    match (a, b) {
        (Listener::Fd(a), Listener::Fd(b)) => a == b,
        (Listener::Addr(a), Listener::Addr(b)) => a == b && !a.ends_with(":0"),
        _ => false,
    }
}

/// `field`: one `host:port` or `fd:N`, or a list of them; None for the default.
fn listen_specs(field: &str, listen: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<Listener>> {
    let specs: Vec<String> = match listen {
        None => {
            return Ok(ServerConfig::default()
                .listeners
                .into_iter()
                .map(|endpoint| endpoint.listener)
                .collect())
        }
        Some(one) if one.is_instance_of::<pyo3::types::PyString>() => vec![one.extract()?],
        Some(many) => many
            .try_iter()
            .and_then(|items| items.map(|item| item?.extract::<String>()).collect())
            .map_err(|_| PyTypeError::new_err(format!("{field} must be a str or a list of str")))?,
    };
    if specs.is_empty() {
        return Err(PyValueError::new_err(format!(
            "{field} must name at least one address"
        )));
    }
    specs
        .iter()
        .map(|spec| {
            Listener::parse(spec).map_err(|e| PyValueError::new_err(format!("{field}: {e}")))
        })
        .collect()
}
