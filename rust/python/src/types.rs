//! Small value types users build in Python: Peer, Response; and ProxyError, which they read.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use ferroxy_engine::peer::{PeerTimeouts, UpstreamProtocol};
use ferroxy_engine::tls::client::{Alpn, TlsOptions};
use ferroxy_engine::{Error, Peer};

use crate::headers::{HeaderSource, Headers};

#[pyclass(name = "Peer", module = "ferroxy", frozen)]
pub struct PyPeer {
    pub inner: Peer,
    /// The load balancer's pick this peer stands for, when `pool.select()` made it: the
    /// request that returns it from `upstream_peer` takes it over (counted in flight until
    /// its response ends, and told how its try went).
    pub pick: parking_lot::Mutex<Option<crate::lb::Pick>>,
}

impl PyPeer {
    pub fn of(inner: Peer) -> Self {
        PyPeer {
            inner,
            pick: parking_lot::Mutex::new(None),
        }
    }

    /// The peer, and its pick for the first request that asks.
    pub fn chosen(&self) -> Chosen {
        Chosen {
            peer: self.inner.clone(),
            pick: self.pick.lock().take(),
        }
    }
}

/// A peer an `upstream_peer` hook returned, with the balancer's pick behind it, if any.
pub struct Chosen {
    pub peer: Peer,
    pub pick: Option<crate::lb::Pick>,
}

/// Seconds from Python, if given, as a Duration; ValueError naming `field` unless finite and
/// >= 0.
pub fn non_negative_seconds(field: &str, given: Option<f64>) -> PyResult<Option<Duration>> {
    match given {
        Some(seconds) if !(seconds.is_finite() && seconds >= 0.0) => Err(PyValueError::new_err(
            format!("{field} must be a non-negative number of seconds, got {seconds}"),
        )),
        _ => Ok(given.map(Duration::from_secs_f64)),
    }
}

/// Seconds from Python, if given, as a Duration; ValueError naming `field` unless finite and
/// > 0.
pub fn positive_seconds(field: &str, given: Option<f64>) -> PyResult<Option<Duration>> {
    match given {
        Some(seconds) if !(seconds.is_finite() && seconds > 0.0) => Err(PyValueError::new_err(
            format!("{field} must be a positive number of seconds, got {seconds}"),
        )),
        _ => Ok(given.map(Duration::from_secs_f64)),
    }
}

/// A status a response can carry (200..=999: 1xx are not final); ValueError naming `field`.
pub fn final_status(field: &str, status: u16) -> PyResult<http::StatusCode> {
    http::StatusCode::from_u16(status)
        .ok()
        .filter(|s| s.as_u16() >= 200)
        .ok_or_else(|| PyValueError::new_err(format!("{field} must be 200..=999, got {status}")))
}

#[pymethods]
impl PyPeer {
    #[new]
    #[pyo3(signature = (
        addr, *, connect_timeout=None, read_timeout=None, write_timeout=None, idle_timeout=None,
        tls=false, sni=None, verify_cert=true, verify_hostname=true, ca=None, client_cert=None,
        alpn=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        addr: &str,
        connect_timeout: Option<f64>,
        read_timeout: Option<f64>,
        write_timeout: Option<f64>,
        idle_timeout: Option<f64>,
        tls: bool,
        sni: Option<String>,
        verify_cert: bool,
        verify_hostname: bool,
        ca: Option<std::path::PathBuf>,
        client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
        alpn: Option<&str>,
    ) -> PyResult<Self> {
        let peer = Peer::new(addr).map_err(|e| PyValueError::new_err(format!("Peer.addr: {e}")))?;
        // Timeouts not given keep the engine's defaults, the only place they are stated.
        let defaults = PeerTimeouts::default();
        let timeouts = PeerTimeouts {
            connect: positive_seconds("Peer.connect_timeout", connect_timeout)?
                .unwrap_or(defaults.connect),
            read: positive_seconds("Peer.read_timeout", read_timeout)?.unwrap_or(defaults.read),
            write: positive_seconds("Peer.write_timeout", write_timeout)?.unwrap_or(defaults.write),
            idle: positive_seconds("Peer.idle_timeout", idle_timeout)?.unwrap_or(defaults.idle),
        };
        let peer = peer.with_timeouts(timeouts);
        let alpn = alpn
            .map(Alpn::parse)
            .transpose()
            .map_err(|e| PyValueError::new_err(format!("Peer.alpn: {e}")))?;
        if !tls {
            let tls_only = [
                ("sni", sni.is_some()),
                ("verify_cert", !verify_cert),
                ("verify_hostname", !verify_hostname),
                ("ca", ca.is_some()),
                ("client_cert", client_cert.is_some()),
            ];
            if let Some((field, _)) = tls_only.iter().find(|(_, given)| *given) {
                return Err(PyValueError::new_err(format!(
                    "Peer.{field}: only applies with tls=True"
                )));
            }
            // Cleartext cannot negotiate: "h2" is h2 with prior knowledge.
            let protocol = match alpn.unwrap_or_default() {
                Alpn::Http1 => UpstreamProtocol::Http1,
                Alpn::Http2 => UpstreamProtocol::Http2,
                Alpn::Http2OrHttp1 => {
                    return Err(PyValueError::new_err(
                        "Peer.alpn: \"h2,h1\" needs tls=True (cleartext cannot negotiate; \
                         \"h2\" is HTTP/2 with prior knowledge)",
                    ))
                }
            };
            return Ok(PyPeer::of(peer.with_protocol(protocol)));
        }
        let options = TlsOptions {
            sni,
            verify_cert,
            verify_hostname,
            ca,
            client_cert,
            alpn: alpn.unwrap_or_default(),
        };
        let peer = peer
            .with_tls(&options)
            .map_err(|e| PyValueError::new_err(format!("Peer.{e}")))?;
        Ok(PyPeer::of(peer))
    }

    #[getter]
    fn addr(&self) -> &str {
        self.inner.addr()
    }
    #[getter]
    fn connect_timeout(&self) -> f64 {
        self.inner.timeouts().connect.as_secs_f64()
    }
    #[getter]
    fn read_timeout(&self) -> f64 {
        self.inner.timeouts().read.as_secs_f64()
    }
    #[getter]
    fn write_timeout(&self) -> f64 {
        self.inner.timeouts().write.as_secs_f64()
    }
    #[getter]
    fn idle_timeout(&self) -> f64 {
        self.inner.timeouts().idle.as_secs_f64()
    }
    #[getter]
    fn tls(&self) -> bool {
        self.inner.tls().is_some()
    }
    #[getter]
    fn sni(&self) -> Option<&str> {
        self.inner.tls().and_then(|tls| tls.sni())
    }
    #[getter]
    fn verify_cert(&self) -> bool {
        self.inner.tls().is_none_or(|tls| tls.verify_cert())
    }
    #[getter]
    fn verify_hostname(&self) -> bool {
        self.inner.tls().is_none_or(|tls| tls.verify_hostname())
    }
    #[getter]
    fn ca(&self) -> Option<String> {
        let ca = self.inner.tls().and_then(|tls| tls.ca())?;
        Some(ca.display().to_string())
    }
    #[getter]
    fn client_cert(&self) -> Option<(String, String)> {
        let (cert, key) = self.inner.tls().and_then(|tls| tls.client_cert())?;
        Some((cert.display().to_string(), key.display().to_string()))
    }
    /// What was asked for: "h1", "h2" or "h2,h1".
    #[getter]
    fn alpn(&self) -> &'static str {
        match self.inner.tls() {
            Some(tls) => tls.alpn().as_str(),
            None if self.inner.protocol() == UpstreamProtocol::Http2 => Alpn::Http2.as_str(),
            None => Alpn::Http1.as_str(),
        }
    }

    fn __repr__(&self) -> String {
        format!("Peer({:?})", self.inner.addr())
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<PyPeer>()
            .is_ok_and(|o| o.get().inner == self.inner)
    }

    fn __hash__(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.inner.addr().hash(&mut hasher);
        hasher.finish()
    }
}

pub fn peer_object(py: Python<'_>, peer: &Peer) -> PyResult<Py<PyPeer>> {
    Py::new(py, PyPeer::of(peer.clone()))
}

#[pyclass(name = "Response", module = "ferroxy", frozen)]
pub struct PyResponse {
    status: http::StatusCode,
    headers: Arc<Mutex<http::HeaderMap>>,
    body: Bytes,
}

#[pymethods]
impl PyResponse {
    #[new]
    #[pyo3(signature = (status, headers=None, body=None))]
    fn new(
        status: u16,
        headers: Option<&Bound<'_, PyAny>>,
        body: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let status = final_status("Response.status", status)?;
        let body = match body {
            None => Bytes::new(),
            Some(b) if b.is_instance_of::<PyBytes>() => {
                Bytes::copy_from_slice(b.cast::<PyBytes>()?.as_bytes())
            }
            Some(s) if s.is_instance_of::<PyString>() => {
                Bytes::from(s.cast::<PyString>()?.to_str()?.to_owned())
            }
            Some(other) => {
                return Err(PyTypeError::new_err(format!(
                    "Response.body must be bytes or str, not {}",
                    other.get_type().name()?
                )))
            }
        };
        let map = headers
            .map(crate::headers::headers_from_python)
            .transpose()
            .map_err(|e| PyValueError::new_err(format!("Response.headers: {e}")))?
            .unwrap_or_default();
        Ok(PyResponse {
            status,
            headers: Arc::new(Mutex::new(map)),
            body,
        })
    }

    #[getter]
    fn status(&self) -> u16 {
        self.status.as_u16()
    }
    #[getter]
    fn headers(&self) -> Headers {
        Headers::new(HeaderSource::Owned(self.headers.clone()))
    }
    #[getter]
    fn body<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.body)
    }

    fn __repr__(&self) -> String {
        format!(
            "Response({}, body=<{} bytes>)",
            self.status.as_u16(),
            self.body.len()
        )
    }
}

impl PyResponse {
    pub fn to_engine(&self) -> ferroxy_engine::Response {
        ferroxy_engine::Response {
            status: self.status,
            headers: self.headers.lock().clone(),
            body: self.body.clone(),
        }
    }
}

#[pyclass(name = "ProxyError", module = "ferroxy", frozen)]
pub struct PyProxyError {
    inner: Error,
}

#[pymethods]
impl PyProxyError {
    #[getter]
    fn kind(&self) -> &'static str {
        self.inner.kind.as_str()
    }
    #[getter]
    fn message(&self) -> &str {
        &self.inner.message
    }
    /// Whose doing the failure was: "client", "upstream" or "proxy".
    #[getter]
    fn side(&self) -> &'static str {
        self.inner.side.as_str()
    }
    #[getter]
    fn status(&self) -> u16 {
        self.inner.status
    }
    #[getter]
    fn peer(&self, py: Python<'_>) -> PyResult<Option<Py<PyPeer>>> {
        self.inner
            .peer
            .as_ref()
            .map(|p| peer_object(py, p))
            .transpose()
    }
    /// Every failed try of the request, in order (the last is this error's own), each a
    /// dict with `peer` ("host:port"), `kind` and `message`; empty when the request was not
    /// sent through a load balancer and not retried.
    #[getter]
    fn tries<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyList>> {
        let tries = pyo3::types::PyList::empty(py);
        for failed in &self.inner.tries {
            let entry = pyo3::types::PyDict::new(py);
            entry.set_item("peer", &*failed.peer)?;
            entry.set_item("kind", failed.kind.as_str())?;
            entry.set_item("message", &failed.message)?;
            tries.append(entry)?;
        }
        Ok(tries)
    }
    /// Whether the proxy will try again after this failure (what `fail_to_connect` sees, and
    /// may overrule by returning True or False).
    #[getter]
    fn retry(&self) -> bool {
        self.inner.retry
    }
    fn __repr__(&self) -> String {
        format!(
            "ProxyError(kind={:?}, message={:?})",
            self.inner.kind.as_str(),
            self.inner.message
        )
    }
    fn __str__(&self) -> String {
        self.inner.to_string()
    }
}

pub fn error_object(py: Python<'_>, error: Error) -> PyResult<Py<PyProxyError>> {
    Py::new(py, PyProxyError { inner: error })
}
