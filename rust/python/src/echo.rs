//! The built-in echo upstream, for tests and the quickstart's demo upstream.

use parking_lot::Mutex;
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;

use ferroxy_echo::EchoUpstream;

#[pyclass(name = "EchoUpstream", module = "ferroxy._core", frozen)]
pub struct PyEchoUpstream {
    inner: Mutex<EchoUpstream>,
    addr: std::net::SocketAddr,
}

#[pymethods]
impl PyEchoUpstream {
    #[new]
    #[pyo3(signature = (listen="127.0.0.1:0"))]
    fn new(py: Python<'_>, listen: &str) -> PyResult<Self> {
        let inner = py
            .detach(|| EchoUpstream::start(listen))
            .map_err(|e| PyOSError::new_err(format!("cannot listen on {listen}: {e}")))?;
        let addr = inner.addr();
        Ok(PyEchoUpstream {
            inner: Mutex::new(inner),
            addr,
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
        format!("http://{}", self.addr)
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
