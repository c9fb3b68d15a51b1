//! `ferroxy.LoadBalancer`: the engine's balancer (`ferroxy_engine::lb`), made from Python once
//! and asked from hooks (`pool.select(key=...)` in `upstream_peer`). The selection runs in
//! Rust; only the answer, a `Peer`, crosses back.

use std::sync::Arc;

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

use ferroxy_engine::lb::{ConfigError, HashKey, LoadBalancer, Strategy, DEFAULT_MAX_RETRIES};
use ferroxy_engine::retry::RetryPolicy;

use crate::types::{positive_seconds, PyPeer};

#[pyclass(name = "LoadBalancer", module = "ferroxy", frozen)]
pub struct PyLoadBalancer {
    pub inner: Arc<LoadBalancer>,
    strategy: String,
}

fn config_error(error: ConfigError) -> PyErr {
    PyValueError::new_err(error.to_string())
}

/// Backends as Python gives them: `"host:port"` or `("host:port", weight)`.
fn backends_from(backends: &Bound<'_, PyAny>) -> PyResult<Vec<(String, u32)>> {
    if backends.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(
            "backends must be a list of \"host:port\" or (\"host:port\", weight), not a str",
        ));
    }
    let mut out = Vec::new();
    for (i, item) in backends.try_iter()?.enumerate() {
        let item = item?;
        if let Ok(addr) = item.extract::<String>() {
            out.push((addr, 1));
            continue;
        }
        let Ok((addr, weight)) = item.extract::<(String, i64)>() else {
            return Err(PyValueError::new_err(format!(
                "backends[{i}] must be \"host:port\" or (\"host:port\", weight), got {}",
                item.repr()?
            )));
        };
        let weight = u32::try_from(weight).map_err(|_| {
            PyValueError::new_err(format!(
                "backends[{i}].weight: must be a whole number of at least 1, got {weight}"
            ))
        })?;
        out.push((addr, weight));
    }
    Ok(out)
}

#[pymethods]
impl PyLoadBalancer {
    #[new]
    #[pyo3(signature = (
        backends, *, strategy="round_robin", hash_key=None, max_retries=None, try_timeout=None,
        deadline=None, seed=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        backends: &Bound<'_, PyAny>,
        strategy: &str,
        hash_key: Option<&str>,
        max_retries: Option<i64>,
        try_timeout: Option<f64>,
        deadline: Option<f64>,
        seed: Option<u64>,
    ) -> PyResult<Self> {
        let parsed = Strategy::parse(strategy).map_err(config_error)?;
        let hash_key = hash_key
            .map(HashKey::parse)
            .transpose()
            .map_err(config_error)?;
        let max_retries = match max_retries {
            None => DEFAULT_MAX_RETRIES,
            Some(n) => usize::try_from(n).map_err(|_| {
                PyValueError::new_err(format!("max_retries: must be 0 or more, got {n}"))
            })?,
        };
        let retry = RetryPolicy {
            max_retries,
            try_timeout: positive_seconds("try_timeout", try_timeout)?,
            deadline: positive_seconds("deadline", deadline)?,
        };
        let backends = backends_from(backends)?;
        let inner = match seed {
            Some(seed) => LoadBalancer::with_seed(parsed, backends, seed),
            None => LoadBalancer::new(parsed, backends),
        }
        .map_err(config_error)?
        .with_hash_key(hash_key)
        .with_retry_policy(retry);
        Ok(PyLoadBalancer {
            inner: Arc::new(inner),
            strategy: strategy.to_owned(),
        })
    }

    #[getter]
    fn max_retries(&self) -> usize {
        self.inner.retry_policy().max_retries
    }

    #[getter]
    fn strategy(&self) -> &str {
        &self.strategy
    }

    /// A healthy backend's peer; `key` (str or bytes) is what "consistent" hashes.
    #[pyo3(signature = (key=None))]
    fn select(&self, key: Option<&Bound<'_, PyAny>>) -> PyResult<PyPeer> {
        let owned;
        let key: Option<&[u8]> = match key {
            None => None,
            Some(key) if key.is_none() => None,
            Some(key) => {
                if let Ok(bytes) = key.cast::<PyBytes>() {
                    owned = bytes.as_bytes().to_vec();
                } else if let Ok(text) = key.extract::<String>() {
                    owned = text.into_bytes();
                } else {
                    return Err(PyTypeError::new_err(format!(
                        "key must be str, bytes or None, got {}",
                        key.get_type().name()?
                    )));
                }
                Some(&owned)
            }
        };
        let selected = self
            .inner
            .select(key)
            .ok_or_else(|| PyRuntimeError::new_err("no healthy backend to choose from"))?;
        Ok(PyPeer {
            inner: selected.backend().peer().clone(),
        })
    }

    /// Each backend: `addr`, `weight`, `healthy` and `in_flight`.
    fn backends<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for backend in self.inner.backends().iter() {
            let entry = PyDict::new(py);
            entry.set_item("addr", backend.addr())?;
            entry.set_item("weight", backend.weight())?;
            entry.set_item("healthy", backend.is_healthy())?;
            entry.set_item("in_flight", backend.in_flight())?;
            list.append(entry)?;
        }
        Ok(list)
    }

    /// Replace the backends at once (requests choosing meanwhile see the old list or the
    /// new one); a backend kept keeps its health and counts. A bad list changes nothing.
    fn set_backends(&self, backends: &Bound<'_, PyAny>) -> PyResult<()> {
        let backends = backends_from(backends)?;
        self.inner.set_backends(backends).map_err(config_error)
    }

    fn __repr__(&self) -> String {
        let addrs: Vec<String> = self
            .inner
            .backends()
            .iter()
            .map(|b| b.addr().to_owned())
            .collect();
        format!("LoadBalancer({addrs:?}, strategy={:?})", self.strategy)
    }
}
