//! The built-in echo upstream, for tests and the quickstart's demo upstream.

use parking_lot::Mutex;
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;

use ferroxy_echo::{EchoTls, EchoUpstream};

#[pyclass(name = "EchoUpstream", module = "ferroxy._core", frozen)]
pub struct PyEchoUpstream {
    inner: Mutex<EchoUpstream>,
    addr: std::net::SocketAddr,
    tls: bool,
}

#[pymethods]
impl PyEchoUpstream {
    #[new]
    /// With `tls_cert` and `tls_key`, serves TLS (h2 and HTTP/1.1 by ALPN); with `client_ca`
    /// too, requires a client certificate that CA signed.
    #[pyo3(signature = (listen="127.0.0.1:0", *, tls_cert=None, tls_key=None, client_ca=None))]
    fn new(
        py: Python<'_>,
        listen: &str,
        tls_cert: Option<std::path::PathBuf>,
        tls_key: Option<std::path::PathBuf>,
        client_ca: Option<std::path::PathBuf>,
    ) -> PyResult<Self> {
        let tls = match (tls_cert, tls_key) {
            (Some(cert), Some(key)) => Some(EchoTls {
                cert,
                key,
                client_ca,
            }),
            (None, None) if client_ca.is_none() => None,
            _ => {
                return Err(pyo3::exceptions::PyValueError::new_err(
                    "EchoUpstream: tls_cert and tls_key go together (and client_ca needs them)",
                ))
            }
        };
        let inner = py
            .detach(|| EchoUpstream::start_with(listen, tls.as_ref()))
            .map_err(|e| PyOSError::new_err(format!("cannot serve on {listen}: {e}")))?;
        let addr = inner.addr();
        Ok(PyEchoUpstream {
            inner: Mutex::new(inner),
            addr,
            tls: tls.is_some(),
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
    #[getter]
    fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }
    #[getter]
    fn connections(&self) -> u64 {
        self.inner.lock().stats().connections()
    }
    #[getter]
    fn requests(&self) -> u64 {
        self.inner.lock().stats().requests()
    }
    fn stop(&self, py: Python<'_>) {
        py.detach(|| self.inner.lock().stop());
    }
    fn __repr__(&self) -> String {
        format!("EchoUpstream({})", self.addr)
    }
}
