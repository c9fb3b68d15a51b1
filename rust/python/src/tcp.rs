//! `TcpServer`: the engine's TCP (L4) proxy driven from Python (`ferroxy.TcpProxy`), and
//! `TcpEchoUpstream`, a byte echo to proxy to in tests.
//!
//! Bytes are copied in Rust; Python runs only for the hooks an app overrides, asked through
//! the bridge as the HTTP server's are: `upstream_peer(client_addr)` once per connection
//! (the tokio task queues a job and awaits its answer), and `connection_filter`.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use tokio::sync::oneshot;

use ferroxy_engine::connection_filter::ConnectionFilter;
use ferroxy_engine::error::{Error, ErrorKind};
use ferroxy_engine::lb::{LoadBalancer, Upstream};
use ferroxy_engine::listener::Endpoint;
use ferroxy_engine::tcp_proxy::{
    Choice, PeerChooser, PeerFuture, TcpProxy, TcpProxyConfig, TcpUpstream,
};
use ferroxy_engine::{DownstreamDigest, Server, ServerConfig, ServerHandle};

use crate::bridge::{Bridge, Job};
use crate::connection_filter::{ip_access_from, ConnectionCall, PyConnectionFilter};
use crate::lb::PyLoadBalancer;
use crate::logs::{self};
use crate::server::{endpoints, upstream_from};
use crate::types::{non_negative_seconds, positive_seconds, PyPeer};

/// A connection whose upstream the `upstream_peer` hook is asked for, and where the answer
/// goes (`Err`: the hook failed, the connection is closed).
pub struct PeerJob {
    pub client_addr: SocketAddr,
    pub reply: oneshot::Sender<Result<Choice, String>>,
}

/// The `upstream_peer(client_addr)` hook, asked from the engine's tokio tasks.
struct PyPeerChooser {
    bridge: Arc<Bridge>,
}

impl PeerChooser for PyPeerChooser {
    fn upstream_peer(&self, client: &DownstreamDigest) -> PeerFuture {
        let (reply, replied) = oneshot::channel();
        let client_addr = client.client_addr;
        self.bridge
            .submit(Job::TcpPeer(PeerJob { client_addr, reply }));
        Box::pin(async move {
            match replied.await {
                Ok(Ok(choice)) => Ok(choice),
                Ok(Err(message)) => Err(Error::new(ErrorKind::HookError, message)),
                // The dispatcher dropped the call, or the server stopped.
                Err(_) => Err(Error::new(
                    ErrorKind::HookError,
                    "upstream_peer gave no answer",
                )),
            }
        })
    }
}

/// One `upstream_peer` call, as the dispatcher sees it: the client's address, and
/// `answer(peer)` or `fail(message)`, once.
#[pyclass(module = "ferroxy._core", frozen)]
pub struct TcpPeerCall {
    client_addr: SocketAddr,
    reply: Mutex<Option<oneshot::Sender<Result<Choice, String>>>>,
}

impl TcpPeerCall {
    fn send(&self, answer: Result<Choice, String>) -> PyResult<()> {
        let reply = self
            .reply
            .lock()
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("this call was already answered"))?;
        // The connection may be gone already: nothing to tell it then.
        let _ = reply.send(answer);
        Ok(())
    }

    fn is_pending(&self) -> bool {
        self.reply.lock().is_some()
    }
}

#[pymethods]
impl TcpPeerCall {
    #[getter]
    fn client_addr(&self) -> String {
        self.client_addr.to_string()
    }

    /// Connect this client to `peer`; a `pool.select()` pick counts in flight on its
    /// backend while the connection lasts.
    fn answer(&self, peer: PyRef<'_, PyPeer>) -> PyResult<()> {
        let chosen = peer.chosen();
        self.send(Ok(Choice {
            peer: chosen.peer,
            selected: chosen.pick.map(|pick| pick.selected),
        }))
    }

    /// The hook failed: close the connection.
    fn fail(&self, message: String) -> PyResult<()> {
        self.send(Err(message))
    }
}

/// The dispatcher's methods, looked up once.
struct TcpDispatcher {
    peer_phase: Option<Py<PyAny>>,
    connection_phase: Option<Py<PyAny>>,
    emit_logs: Py<PyAny>,
    stopped: Py<PyAny>,
}

#[pyclass(name = "TcpServer", module = "ferroxy._core", frozen)]
pub struct PyTcpServer {
    bridge: Arc<Bridge>,
    dispatcher: TcpDispatcher,
    listeners: Vec<Endpoint>,
    config: TcpProxyConfig,
    threads: usize,
    grace_period: Duration,
    /// Balancers whose health checks run with this server, besides the upstream's own.
    balancers: Vec<Arc<LoadBalancer>>,
    handle: Mutex<Option<ServerHandle>>,
    addrs: OnceLock<Vec<SocketAddr>>,
}

#[pymethods]
impl PyTcpServer {
    #[new]
    #[pyo3(signature = (
        dispatcher, *, upstream=None, upstream_peer=false, connection_filter_hook=false,
        listen=None, tls=None, proxy_protocol=None, connection_filter=None, idle_timeout=None,
        connect_tries=None, threads=None, grace_period=None, balancers=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        dispatcher: &Bound<'_, PyAny>,
        upstream: Option<&Bound<'_, PyAny>>,
        upstream_peer: bool,
        connection_filter_hook: bool,
        listen: Option<&Bound<'_, PyAny>>,
        tls: Option<&Bound<'_, PyAny>>,
        proxy_protocol: Option<bool>,
        connection_filter: Option<&Bound<'_, PyAny>>,
        idle_timeout: Option<f64>,
        connect_tries: Option<i64>,
        threads: Option<i64>,
        grace_period: Option<f64>,
        balancers: Option<Vec<PyRef<'_, PyLoadBalancer>>>,
    ) -> PyResult<Self> {
        let bridge = Arc::new(Bridge::new()?);
        let upstream = match upstream.filter(|u| !u.is_none()) {
            _ if upstream_peer => TcpUpstream::Chosen(Arc::new(PyPeerChooser {
                bridge: bridge.clone(),
            })),
            Some(value) => TcpUpstream::Fixed(upstream_from(value)?),
            None => {
                return Err(PyValueError::new_err(
                    "upstream: a TCP proxy needs an upstream or an upstream_peer hook",
                ))
            }
        };
        if let Some(threads) = threads.filter(|n| !(0..=1024).contains(n)) {
            return Err(PyValueError::new_err(format!(
                "threads must be between 0 and 1024, got {threads}"
            )));
        }
        let connect_tries = match connect_tries {
            Some(n) if !(1..=100).contains(&n) => {
                return Err(PyValueError::new_err(format!(
                    "connect_tries must be between 1 and 100, got {n}"
                )))
            }
            Some(n) => n as usize,
            None => TcpProxyConfig::DEFAULT_CONNECT_TRIES,
        };
        let tls = match tls.filter(|t| !t.is_none()) {
            // No ALPN: a TCP proxy cannot agree to a protocol for what is behind it.
            Some(tls) => Some(crate::tls::acceptor_offering(tls, Vec::new())?),
            None => None,
        };
        let connection_filter: Option<Arc<dyn ConnectionFilter>> =
            match connection_filter.filter(|f| !f.is_none()) {
                Some(_) if connection_filter_hook => {
                    return Err(PyValueError::new_err(
                        "connection_filter: the app has a connection_filter hook already; give \
                         one or the other",
                    ))
                }
                Some(declared) => Some(Arc::new(ip_access_from(declared)?)),
                None if connection_filter_hook => Some(Arc::new(PyConnectionFilter {
                    bridge: bridge.clone(),
                })),
                None => None,
            };
        let listeners = endpoints(listen, None, tls.as_ref(), proxy_protocol.unwrap_or(false))?
            .into_iter()
            .map(|endpoint| endpoint.with_connection_filter(connection_filter.clone()))
            .collect();
        let mut config = TcpProxyConfig::new(upstream);
        config.connect_tries = connect_tries;
        if let Some(idle) = positive_seconds("idle_timeout", idle_timeout)? {
            config.idle_timeout = idle;
        }
        let defaults = ServerConfig::default();
        let method = |name: &str| -> PyResult<Py<PyAny>> {
            dispatcher
                .getattr(name)
                .map(Bound::unbind)
                .map_err(|_| PyTypeError::new_err(format!("dispatcher has no {name}() method")))
        };
        let dispatcher = TcpDispatcher {
            peer_phase: upstream_peer.then(|| method("peer_phase")).transpose()?,
            connection_phase: connection_filter_hook
                .then(|| method("connection_phase"))
                .transpose()?,
            emit_logs: method("emit_logs")?,
            stopped: method("stopped")?,
        };
        logs::register_loop(&bridge);
        Ok(PyTcpServer {
            bridge,
            dispatcher,
            listeners,
            config,
            threads: threads.map_or(defaults.threads, |n| n as usize),
            grace_period: non_negative_seconds("grace_period", grace_period)?
                .unwrap_or(defaults.grace_period),
            balancers: balancers
                .unwrap_or_default()
                .iter()
                .map(|balancer| balancer.inner.clone())
                .collect(),
            handle: Mutex::new(None),
            addrs: OnceLock::new(),
        })
    }

    fn start(&self, py: Python<'_>) -> PyResult<()> {
        if self.addrs.get().is_some() {
            return Err(PyRuntimeError::new_err("server already started"));
        }
        // The upstream balancer's checks run as the service's own background work.
        let own = match &self.config.upstream {
            TcpUpstream::Fixed(Upstream::Balanced(balancer)) => Some(balancer.clone()),
            _ => None,
        };
        let balancer_services: Vec<_> = self
            .balancers
            .iter()
            .filter(|balancer| !own.as_ref().is_some_and(|own| Arc::ptr_eq(own, balancer)))
            .flat_map(|balancer| balancer.background_services())
            .collect();
        let proxy = Arc::new(TcpProxy::new(self.config.clone()));
        let listeners = self.listeners.clone();
        let (threads, grace) = (self.threads, self.grace_period);
        let bridge = self.bridge.clone();
        let started = py.detach(move || {
            let mut server = Server::new(threads, grace);
            server.add_service(listeners, proxy);
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

    #[getter]
    fn addr(&self) -> PyResult<String> {
        Ok(self.listening()?[0].to_string())
    }

    /// Every listener's address, in the order given.
    #[getter]
    fn addrs(&self) -> PyResult<Vec<String>> {
        Ok(self.listening()?.iter().map(ToString::to_string).collect())
    }

    /// Each listener's scheme ("tcp" or "tls"), in the order of `addrs`.
    #[getter]
    fn schemes(&self) -> Vec<&'static str> {
        self.listeners
            .iter()
            .map(|endpoint| if endpoint.tls.is_some() { "tls" } else { "tcp" })
            .collect()
    }

    #[getter]
    fn port(&self) -> PyResult<u16> {
        Ok(self.listening()?[0].port())
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
        self.handle
            .lock()
            .as_ref()
            .is_none_or(ServerHandle::is_stopped)
    }

    /// Read the TLS listeners' files again (True if there are any); see `Server.reload_tls`.
    fn reload_tls(&self) -> PyResult<bool> {
        let mut reloaded = false;
        for endpoint in &self.listeners {
            if let Some(acceptor) = &endpoint.tls {
                acceptor.reload().map_err(PyValueError::new_err)?;
                reloaded = true;
            }
        }
        Ok(reloaded)
    }

    #[pyo3(signature = (grace_period=None))]
    fn shutdown(&self, grace_period: Option<f64>) -> PyResult<()> {
        let grace = non_negative_seconds("grace_period", grace_period)?;
        match self.handle.lock().as_ref() {
            Some(handle) => handle.shutdown(grace),
            None => self.bridge.submit(Job::Stopped),
        }
        Ok(())
    }

    fn run_pending(&self, py: Python<'_>) -> PyResult<usize> {
        crate::bridge::run_batch(py, &self.bridge, &self.dispatcher.emit_logs, |py, job| {
            self.run_job(py, job)
        })
    }
}

impl PyTcpServer {
    fn listening(&self) -> PyResult<&[SocketAddr]> {
        self.addrs
            .get()
            .map(Vec::as_slice)
            .ok_or_else(|| PyRuntimeError::new_err("server not started"))
    }

    fn run_job(&self, py: Python<'_>, job: Job) -> PyResult<()> {
        match job {
            Job::TcpPeer(job) => {
                let call = Bound::new(
                    py,
                    TcpPeerCall {
                        client_addr: job.client_addr,
                        reply: Mutex::new(Some(job.reply)),
                    },
                )?;
                // Without a peer_phase nobody answers: the dropped call closes the connection.
                let Some(method) = &self.dispatcher.peer_phase else {
                    return Ok(());
                };
                if let Err(error) = method.call1(py, (&call,)) {
                    if call.get().is_pending() {
                        let _ = call.get().send(Err(error.to_string()));
                    }
                    return Err(error);
                }
                Ok(())
            }
            Job::Connection(job) => {
                let call = Bound::new(py, ConnectionCall::from_job(job))?;
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
            Job::Stopped => {
                self.bridge.set_serving(false);
                // Dropping the runtime closes connections that outlived the grace period.
                let handle = self.handle.lock().take();
                drop(handle);
                self.dispatcher.stopped.call0(py).map(drop)
            }
            // An HTTP server's jobs never come here.
            Job::Phase(_) | Job::BodyRead(_) | Job::Stream(_) | Job::Logging { .. } => Ok(()),
        }
    }
}

/// A TCP echo server on its own runtime: every byte a client sends comes back. For tests.
#[pyclass(name = "TcpEchoUpstream", module = "ferroxy._core", frozen)]
pub struct PyTcpEchoUpstream {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    addr: SocketAddr,
    connections: Arc<std::sync::atomic::AtomicU64>,
}

#[pymethods]
impl PyTcpEchoUpstream {
    #[new]
    #[pyo3(signature = (listen="127.0.0.1:0"))]
    fn new(py: Python<'_>, listen: &str) -> PyResult<Self> {
        let cannot =
            |e: std::io::Error| PyOSError::new_err(format!("cannot serve on {listen}: {e}"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ferroxy-tcp-echo")
            .enable_all()
            .build()
            .map_err(cannot)?;
        let listener = py
            .detach(|| runtime.block_on(tokio::net::TcpListener::bind(listen)))
            .map_err(cannot)?;
        let addr = listener.local_addr().map_err(cannot)?;
        let connections = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = connections.clone();
        runtime.spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::spawn(async move {
                    let (mut from, mut to) = conn.split();
                    let _ = tokio::io::copy(&mut from, &mut to).await;
                });
            }
        });
        Ok(PyTcpEchoUpstream {
            runtime: Mutex::new(Some(runtime)),
            addr,
            connections,
        })
    }

    #[getter]
    fn addr(&self) -> String {
        self.addr.to_string()
    }

    #[getter]
    fn port(&self) -> u16 {
        self.addr.port()
    }

    /// TCP connections accepted so far.
    #[getter]
    fn connections(&self) -> u64 {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stop serving and close every connection; later calls do nothing.
    fn stop(&self, py: Python<'_>) {
        let runtime = self.runtime.lock().take();
        if let Some(runtime) = runtime {
            py.detach(|| runtime.shutdown_timeout(Duration::from_secs(1)));
        }
    }

    fn __repr__(&self) -> String {
        format!("TcpEchoUpstream({})", self.addr)
    }
}
