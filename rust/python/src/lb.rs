//! `ferroxy.LoadBalancer`: the engine's balancer (`ferroxy_engine::lb`), made from Python once
//! and asked from hooks (`pool.select(key=...)` in `upstream_peer`). The selection runs in
//! Rust; only the answer, a `Peer`, crosses back. `ferroxy.HealthCheck` configures its
//! active checks, which run while a proxy server that uses the balancer runs.

use std::sync::Arc;

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

use ferroxy_engine::lb::{
    Backend, BackendStatus, ConfigError, ExpectStatus, HashKey, HealthChange, HealthCheck,
    HealthConfig, HealthListener, LoadBalancer, LoadBalancerConfig, PassiveCheck, Probe, Strategy,
    DEFAULT_MAX_RETRIES,
};
use ferroxy_engine::retry::RetryPolicy;

use crate::logs::log_python_error;
use crate::types::{positive_seconds, PyPeer};

#[pyclass(name = "HealthCheck", module = "ferroxy", frozen)]
pub struct PyHealthCheck {
    inner: HealthCheck,
}

/// `name` as a whole number of at least 1, or ValueError naming `health_check.name`.
fn threshold(name: &str, given: Option<i64>, default: u32) -> PyResult<u32> {
    let Some(given) = given else {
        return Ok(default);
    };
    u32::try_from(given)
        .ok()
        .filter(|&n| n >= 1)
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "health_check.{name} must be a whole number of at least 1, got {given}"
            ))
        })
}

/// `expect_status`: one status or an iterable of them (`range(200, 400)`).
fn expect_status_from(given: &Bound<'_, PyAny>) -> PyResult<ExpectStatus> {
    let field_error =
        |message: String| PyValueError::new_err(format!("health_check.expect_status: {message}"));
    let statuses: Vec<i64> = match given.extract::<i64>() {
        Ok(status) => vec![status],
        Err(_) => given
            .try_iter()
            .and_then(|items| items.map(|item| item?.extract::<i64>()).collect())
            .map_err(|_| {
                field_error(format!(
                    "expected a status or an iterable of them (range(200, 400)), got {}",
                    given.repr().map_or_else(|_| "?".into(), |r| r.to_string())
                ))
            })?,
    };
    let statuses = statuses
        .into_iter()
        .map(|status| {
            u16::try_from(status)
                .map_err(|_| field_error(format!("statuses are 100-599, got {status}")))
        })
        .collect::<PyResult<Vec<u16>>>()?;
    ExpectStatus::new(statuses).map_err(health_check_error)
}

impl PyHealthCheck {
    fn timed(
        mut check: HealthCheck,
        interval: Option<f64>,
        timeout: Option<f64>,
        healthy: Option<i64>,
        unhealthy: Option<i64>,
    ) -> PyResult<Self> {
        if let Some(interval) = positive_seconds("health_check.interval", interval)? {
            check.interval = interval;
        }
        if let Some(timeout) = positive_seconds("health_check.timeout", timeout)? {
            check.timeout = timeout;
        }
        check.healthy = threshold("healthy", healthy, check.healthy)?;
        check.unhealthy = threshold("unhealthy", unhealthy, check.unhealthy)?;
        check.validate().map_err(health_check_error)?;
        Ok(PyHealthCheck { inner: check })
    }
}

#[pymethods]
impl PyHealthCheck {
    /// An HTTP/1.1 GET of `path`, passing when the status is in `expect_status`.
    #[staticmethod]
    #[pyo3(signature = (
        path, *, interval=None, timeout=None, healthy=None, unhealthy=None, expect_status=None,
        host=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn http(
        path: &str,
        interval: Option<f64>,
        timeout: Option<f64>,
        healthy: Option<i64>,
        unhealthy: Option<i64>,
        expect_status: Option<&Bound<'_, PyAny>>,
        host: Option<&str>,
    ) -> PyResult<Self> {
        let mut check = HealthCheck::http(path).map_err(health_check_error)?;
        if let Probe::Http {
            host: check_host,
            expect_status: check_expect,
            ..
        } = &mut check.probe
        {
            if let Some(given) = expect_status.filter(|given| !given.is_none()) {
                *check_expect = expect_status_from(given)?;
            }
            if let Some(host) = host {
                *check_host = Some(http::HeaderValue::from_str(host).map_err(|_| {
                    PyValueError::new_err(format!(
                        "health_check.host: {host:?} cannot be a Host header"
                    ))
                })?);
            }
        }
        Self::timed(check, interval, timeout, healthy, unhealthy)
    }

    /// A TCP connect, passing when it completes within the timeout.
    #[staticmethod]
    #[pyo3(signature = (*, interval=None, timeout=None, healthy=None, unhealthy=None))]
    fn tcp(
        interval: Option<f64>,
        timeout: Option<f64>,
        healthy: Option<i64>,
        unhealthy: Option<i64>,
    ) -> PyResult<Self> {
        Self::timed(HealthCheck::tcp(), interval, timeout, healthy, unhealthy)
    }

    /// `"http"` or `"tcp"`.
    #[getter]
    fn kind(&self) -> &'static str {
        match self.inner.probe {
            Probe::Tcp => "tcp",
            Probe::Http { .. } => "http",
        }
    }

    #[getter]
    fn path(&self) -> Option<&str> {
        match &self.inner.probe {
            Probe::Tcp => None,
            Probe::Http { path, .. } => Some(path.as_str()),
        }
    }

    #[getter]
    fn interval(&self) -> f64 {
        self.inner.interval.as_secs_f64()
    }

    #[getter]
    fn timeout(&self) -> f64 {
        self.inner.timeout.as_secs_f64()
    }

    #[getter]
    fn healthy(&self) -> u32 {
        self.inner.healthy
    }

    #[getter]
    fn unhealthy(&self) -> u32 {
        self.inner.unhealthy
    }

    fn __repr__(&self) -> String {
        let path = self
            .path()
            .map_or_else(String::new, |path| format!("{path:?}, "));
        format!(
            "HealthCheck.{}({path}interval={:?}, timeout={:?}, healthy={}, unhealthy={})",
            self.kind(),
            self.interval(),
            self.timeout(),
            self.inner.healthy,
            self.inner.unhealthy
        )
    }
}

/// A backend as `pool.backends()` and `on_health_change` show it.
fn status_dict<'py>(py: Python<'py>, status: &BackendStatus) -> PyResult<Bound<'py, PyDict>> {
    let entry = PyDict::new(py);
    entry.set_item("addr", &status.addr)?;
    entry.set_item("weight", status.weight)?;
    entry.set_item("healthy", status.healthy)?;
    entry.set_item("in_flight", status.in_flight)?;
    entry.set_item("requests", status.requests)?;
    entry.set_item("failures", status.failures)?;
    Ok(entry)
}

/// Calls `callback(backend, healthy)` for each change, in order, on a thread of its own:
/// changes are seen on runtime workers, which must not wait for the GIL. The thread ends
/// with the balancer (when the listener, and with it the sender, is dropped).
fn python_listener(callback: Py<PyAny>) -> PyResult<HealthListener> {
    let (changes, received) = std::sync::mpsc::channel::<(BackendStatus, bool)>();
    std::thread::Builder::new()
        .name("ferroxy-health-change".into())
        .spawn(move || {
            for (status, healthy) in received {
                Python::attach(|py| {
                    let called = status_dict(py, &status)
                        .and_then(|backend| callback.call1(py, (backend, healthy)));
                    if let Err(error) = called {
                        log_python_error(py, &error, "on_health_change failed");
                    }
                });
            }
        })
        .map_err(|error| PyRuntimeError::new_err(format!("cannot start a thread: {error}")))?;
    Ok(Arc::new(move |backend: &Backend, change: &HealthChange| {
        let _ = changes.send((backend.status(), change.healthy));
    }))
}

/// The passive-check options; those not given keep the engine's defaults.
fn passive_check(
    max_fails: Option<i64>,
    fail_timeout: Option<f64>,
    max_fail_timeout: Option<f64>,
) -> PyResult<PassiveCheck> {
    let defaults = PassiveCheck::default();
    let max_fails = max_fails
        .map(|given| {
            u32::try_from(given).map_err(|_| {
                PyValueError::new_err(format!(
                    "max_fails must be a whole number >= 0 (0: no passive checks), got {given}"
                ))
            })
        })
        .transpose()?
        .unwrap_or(defaults.max_fails);
    let fail_timeout =
        positive_seconds("fail_timeout", fail_timeout)?.unwrap_or(defaults.fail_timeout);
    let max_fail_timeout = positive_seconds("max_fail_timeout", max_fail_timeout)?
        // A longer first cool-down than the default cap raises the cap with it.
        .unwrap_or_else(|| defaults.max_fail_timeout.max(fail_timeout));
    Ok(PassiveCheck {
        max_fails,
        fail_timeout,
        max_fail_timeout,
    })
}

/// A backend `pool.select()` picked, and the retry policy of its balancer: what the request
/// that goes to it takes over.
pub struct Pick {
    pub selected: ferroxy_engine::lb::Selected,
    pub retry: RetryPolicy,
}

#[pyclass(name = "LoadBalancer", module = "ferroxy", frozen)]
pub struct PyLoadBalancer {
    pub inner: Arc<LoadBalancer>,
    strategy: String,
}

fn config_error(error: ConfigError) -> PyErr {
    PyValueError::new_err(error.to_string())
}

/// A bad field of a `HealthCheck`, named as the `health_check` option's.
fn health_check_error(error: ConfigError) -> PyErr {
    config_error(error.within("health_check"))
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
                "backends[{i}].weight: must be 1 to {}, got {weight}",
                ferroxy_engine::lb::MAX_WEIGHT
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
        backends, *, strategy="round_robin", hash_key=None, health_check=None, max_retries=None,
        try_timeout=None, deadline=None, on_health_change=None, max_fails=None, fail_timeout=None,
        max_fail_timeout=None, dns_refresh=None, seed=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        backends: &Bound<'_, PyAny>,
        strategy: &str,
        hash_key: Option<&str>,
        health_check: Option<&Bound<'_, PyAny>>,
        max_retries: Option<i64>,
        try_timeout: Option<f64>,
        deadline: Option<f64>,
        on_health_change: Option<&Bound<'_, PyAny>>,
        max_fails: Option<i64>,
        fail_timeout: Option<f64>,
        max_fail_timeout: Option<f64>,
        dns_refresh: Option<f64>,
        seed: Option<u64>,
    ) -> PyResult<Self> {
        let parsed = Strategy::parse(strategy).map_err(config_error)?;
        let hash_key = hash_key
            .map(HashKey::parse)
            .transpose()
            .map_err(config_error)?;
        if hash_key.is_some() && parsed != Strategy::Consistent {
            return Err(PyValueError::new_err(format!(
                "hash_key: only strategy=\"consistent\" hashes a key, and strategy is {strategy:?}"
            )));
        }
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
        let active = match health_check.filter(|check| !check.is_none()) {
            Some(check) => Some(
                check
                    .cast::<PyHealthCheck>()
                    .map_err(|_| {
                        PyTypeError::new_err(
                            "health_check must be a HealthCheck (HealthCheck.http(...) or HealthCheck.tcp(...))",
                        )
                    })?
                    .get()
                    .inner
                    .clone(),
            ),
            None => None,
        };
        let passive = passive_check(max_fails, fail_timeout, max_fail_timeout)?;
        let defaults = LoadBalancerConfig::default();
        let dns_refresh =
            positive_seconds("dns_refresh", dns_refresh)?.unwrap_or(defaults.dns_refresh);
        let on_health_change = on_health_change.filter(|callback| !callback.is_none());
        if on_health_change.is_some_and(|callback| !callback.is_callable()) {
            return Err(PyTypeError::new_err(
                "on_health_change must be callable(backend, healthy)",
            ));
        }
        // Checked before the listener's thread starts, so a bad config starts none.
        let mut health = HealthConfig {
            active,
            passive,
            listener: None,
        };
        health.validate().map_err(config_error)?;
        health.listener = on_health_change
            .map(|callback| python_listener(callback.clone().unbind()))
            .transpose()?;
        let config = LoadBalancerConfig {
            health,
            dns_refresh,
            seed,
        };
        // Names among the backends are resolved now, without holding the GIL.
        let inner = py
            .detach(|| LoadBalancer::with_config(parsed, backends, config))
            .map_err(config_error)?
            .with_hash_key(hash_key)
            .with_retry_policy(retry);
        let inner = Arc::new(inner);
        Ok(PyLoadBalancer {
            inner,
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
        let peer = PyPeer::of(selected.backend().peer().clone());
        *peer.pick.lock() = Some(Pick {
            selected,
            retry: *self.inner.retry_policy(),
        });
        Ok(peer)
    }

    /// Each backend: `addr`, `weight`, `healthy`, `in_flight`, and the totals `requests`
    /// (times selected) and `failures` (observed by the proxy).
    fn backends<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for backend in self.inner.backends().iter() {
            list.append(status_dict(py, &backend.status())?)?;
        }
        Ok(list)
    }

    /// Replace the backends at once (requests choosing meanwhile see the old list or the
    /// new one); a backend kept keeps its health and counts. A bad list changes nothing.
    /// Names are resolved again (ValueError naming `backends[i]` for one that does not).
    fn set_backends(&self, py: Python<'_>, backends: &Bound<'_, PyAny>) -> PyResult<()> {
        let backends = backends_from(backends)?;
        py.detach(|| self.inner.set_backends(backends))
            .map_err(config_error)
    }

    fn __repr__(&self) -> String {
        let specs = self.inner.specs();
        let addrs: Vec<&str> = specs.iter().map(|(addr, _)| addr.as_str()).collect();
        format!("LoadBalancer({addrs:?}, strategy={:?})", self.strategy)
    }
}
