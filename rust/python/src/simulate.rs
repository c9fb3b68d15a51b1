//! `Server.simulate`: one request through the app's real phases with the sockets replaced
//! (the engine's `simulate`), for `ferroxy.testing.simulate`. The phases run on a runtime of
//! their own on another thread; the hooks run on the caller's loop through the bridge, as
//! they do when serving.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use ferroxy_engine::simulate::{simulate, Simulated};

use crate::bridge::{Bridge, Job};
use crate::headers::{HeaderSource, Headers};
use crate::proxy::PyProxy;
use crate::session::PyRequestHeader;
use crate::types::{error_object, peer_object, PyPeer, PyProxyError, PyResponse};

/// The request to simulate, as Python gave it.
pub struct SimulatedRequest {
    pub method: String,
    pub target: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub client_addr: String,
    pub local_addr: String,
}

fn socket_addr(field: &str, addr: &str) -> PyResult<SocketAddr> {
    addr.parse()
        .map_err(|_| PyValueError::new_err(format!("{field} must be \"ip:port\", got {addr:?}")))
}

/// Start simulating `request` against `upstream`; the bridge gets `Job::Stopped` when it is
/// over, and the returned handle holds the outcome.
pub fn start(
    proxy: PyProxy,
    config: ferroxy_engine::proxy::ProxyConfig,
    bridge: Arc<Bridge>,
    request: SimulatedRequest,
    upstream: ferroxy_engine::Response,
) -> PyResult<Simulation> {
    let method = http::Method::from_bytes(request.method.as_bytes())
        .map_err(|_| PyValueError::new_err(format!("invalid method {:?}", request.method)))?;
    if !request.target.starts_with('/') {
        return Err(PyValueError::new_err(format!(
            "path must start with '/', got {:?}",
            request.target
        )));
    }
    let uri: http::Uri = request
        .target
        .parse()
        .map_err(|_| PyValueError::new_err(format!("invalid path {:?}", request.target)))?;
    let client_addr = socket_addr("client_addr", &request.client_addr)?;
    let local_addr = socket_addr("local_addr", &request.local_addr)?;
    let mut req = http::Request::new(request.body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = request.headers;
    let outcome = Arc::new(Mutex::new(None));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let done = outcome.clone();
    std::thread::Builder::new()
        .name("ferroxy-simulate".into())
        .spawn(move || {
            let simulated = runtime.block_on(simulate(
                Arc::new(proxy),
                config,
                req,
                client_addr,
                local_addr,
                upstream,
            ));
            *done.lock() = Some(simulated);
            bridge.submit(Job::Stopped);
        })?;
    Ok(Simulation {
        outcome,
        client_addr,
    })
}

/// A simulation under way; its outcome once the bridge has said it stopped.
#[pyclass(name = "Simulation", module = "ferroxy._core", frozen)]
pub struct Simulation {
    outcome: Arc<Mutex<Option<Simulated>>>,
    client_addr: SocketAddr,
}

#[pymethods]
impl Simulation {
    /// The outcome; RuntimeError while the simulation still runs (or was already read).
    fn result(&self, py: Python<'_>) -> PyResult<SimulationResult> {
        let simulated = self
            .outcome
            .lock()
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("the simulation has not finished"))?;
        let client_addr = self.client_addr;
        let (upstream_request, upstream_body) = match simulated.upstream_request {
            Some(received) => {
                let slot = Arc::new(Mutex::new(Some(received.head)));
                (
                    Some(Py::new(py, PyRequestHeader::new(slot, client_addr))?),
                    Some(received.body),
                )
            }
            None => (None, None),
        };
        Ok(SimulationResult {
            status: simulated.status.as_u16(),
            headers: Arc::new(Mutex::new(simulated.headers)),
            body: simulated.body,
            upstream_request,
            upstream_body,
            peer: simulated
                .peer
                .as_ref()
                .map(|p| peer_object(py, p))
                .transpose()?,
            error: simulated.error.map(|e| error_object(py, e)).transpose()?,
        })
    }
}

/// What a simulated request came to: the response the client got, what the upstream was
/// sent, the peer chosen, and the error the failure phases saw.
#[pyclass(name = "SimulationResult", module = "ferroxy.testing", frozen)]
pub struct SimulationResult {
    #[pyo3(get)]
    status: u16,
    headers: Arc<Mutex<http::HeaderMap>>,
    body: Bytes,
    #[pyo3(get)]
    upstream_request: Option<Py<PyRequestHeader>>,
    upstream_body: Option<Bytes>,
    #[pyo3(get)]
    peer: Option<Py<PyPeer>>,
    #[pyo3(get)]
    error: Option<Py<PyProxyError>>,
}

#[pymethods]
impl SimulationResult {
    #[getter]
    fn headers(&self) -> Headers {
        Headers::new(HeaderSource::Owned(self.headers.clone()))
    }
    #[getter]
    fn body<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.body)
    }
    /// The body the upstream received; None when nothing was proxied.
    #[getter]
    fn upstream_body<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.upstream_body.as_ref().map(|b| PyBytes::new(py, b))
    }
    fn __repr__(&self) -> String {
        format!(
            "SimulationResult(status={}, body=<{} bytes>, proxied={})",
            self.status,
            self.body.len(),
            self.upstream_request.is_some()
        )
    }
}

/// The upstream's answer: the given `Response`, or an empty 200.
pub fn upstream_response(upstream: Option<&Bound<'_, PyResponse>>) -> ferroxy_engine::Response {
    match upstream {
        Some(response) => response.get().to_engine(),
        None => ferroxy_engine::Response::new(http::StatusCode::OK, Bytes::new()),
    }
}
