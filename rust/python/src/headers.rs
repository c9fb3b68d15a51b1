//! `Headers`: a case-insensitive, multi-valued, mutable view over a header map that stays in
//! Rust. Nothing is copied into a dict; each access locks the owner's map briefly.

use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use parking_lot::Mutex;
use pyo3::exceptions::{PyKeyError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyMapping, PyString};

pub type RequestSlot = Arc<Mutex<Option<http::request::Parts>>>;
pub type ResponseSlot = Arc<Mutex<Option<http::response::Parts>>>;

/// Whose headers a view shows. Request and response heads live in a slot the engine fills
/// while a hook runs and takes back afterwards.
#[derive(Clone)]
pub enum HeaderSource {
    Request(RequestSlot),
    Response(ResponseSlot),
    Owned(Arc<Mutex<HeaderMap>>),
}

impl HeaderSource {
    fn with<R>(&self, f: impl FnOnce(&mut HeaderMap) -> R) -> PyResult<R> {
        match self {
            HeaderSource::Request(slot) => slot
                .lock()
                .as_mut()
                .map(|p| f(&mut p.headers))
                .ok_or_else(detached),
            HeaderSource::Response(slot) => slot
                .lock()
                .as_mut()
                .map(|p| f(&mut p.headers))
                .ok_or_else(detached),
            HeaderSource::Owned(map) => Ok(f(&mut map.lock())),
        }
    }
}

pub fn detached() -> PyErr {
    PyRuntimeError::new_err("this request/response is only available while its hooks run")
}

#[pyclass(module = "ferroxy", frozen, sequence)]
pub struct Headers {
    source: HeaderSource,
}

impl Headers {
    pub fn new(source: HeaderSource) -> Self {
        Headers { source }
    }
}

fn name_of(name: &str) -> PyResult<HeaderName> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| PyValueError::new_err(format!("invalid header name {name:?}")))
}

fn value_of(name: &str, value: &str) -> PyResult<HeaderValue> {
    HeaderValue::from_str(value)
        .map_err(|_| PyValueError::new_err(format!("invalid value for header {name:?}: {value:?}")))
}

/// Header values are bytes on the wire; non-ASCII ones read as Latin-1 so nothing is lost.
pub fn value_str(value: &HeaderValue) -> String {
    match value.to_str() {
        Ok(s) => s.to_owned(),
        Err(_) => value.as_bytes().iter().map(|&b| b as char).collect(),
    }
}

/// Fill `map` from a Python mapping, a `Headers`, or an iterable of (name, value) pairs.
pub fn extend_from_python(map: &mut HeaderMap, source: &Bound<'_, PyAny>) -> PyResult<()> {
    let pairs = if let Ok(headers) = source.cast::<Headers>() {
        return headers.get().source.with(|m| map.extend(m.clone()));
    } else if let Ok(mapping) = source.cast::<PyMapping>() {
        mapping.items()?.into_any()
    } else {
        source.clone()
    };
    for pair in pairs.try_iter()? {
        let (name, value): (String, String) = pair?.extract().map_err(|_| {
            PyTypeError::new_err("headers must be a mapping or (name, value) pairs of str")
        })?;
        map.append(name_of(&name)?, value_of(&name, &value)?);
    }
    Ok(())
}

#[pymethods]
impl Headers {
    fn __getitem__(&self, name: &str) -> PyResult<String> {
        self.source
            .with(|m| m.get(name).map(value_str))?
            .ok_or_else(|| PyKeyError::new_err(name.to_owned()))
    }

    fn __setitem__(&self, name: &str, value: &str) -> PyResult<()> {
        let (name, value) = (name_of(name)?, value_of(name, value)?);
        self.source.with(|m| {
            m.insert(name, value);
        })
    }

    fn __delitem__(&self, name: &str) -> PyResult<()> {
        match self.source.with(|m| m.remove(name))? {
            Some(_) => Ok(()),
            None => Err(PyKeyError::new_err(name.to_owned())),
        }
    }

    fn __contains__(&self, name: &Bound<'_, PyAny>) -> PyResult<bool> {
        match name.cast::<PyString>() {
            Ok(name) => {
                let name = name.to_str()?;
                self.source.with(|m| m.contains_key(name))
            }
            Err(_) => Ok(false),
        }
    }

    fn __len__(&self) -> PyResult<usize> {
        self.source.with(|m| m.keys_len())
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(PyList::new(py, self.keys()?)?.try_iter()?.into_any())
    }

    #[pyo3(signature = (name, default=None))]
    fn get(&self, name: &str, default: Option<String>) -> PyResult<Option<String>> {
        Ok(self
            .source
            .with(|m| m.get(name).map(value_str))?
            .or(default))
    }

    fn get_all(&self, name: &str) -> PyResult<Vec<String>> {
        self.source
            .with(|m| m.get_all(name).iter().map(value_str).collect())
    }

    fn add(&self, name: &str, value: &str) -> PyResult<()> {
        let (name, value) = (name_of(name)?, value_of(name, value)?);
        self.source.with(|m| {
            m.append(name, value);
        })
    }

    #[pyo3(signature = (name, default=None))]
    fn pop(&self, name: &str, default: Option<String>) -> PyResult<Option<String>> {
        let first = self.source.with(|m| {
            let first = m.get(name).map(value_str);
            m.remove(name);
            first
        })?;
        Ok(first.or(default))
    }

    fn keys(&self) -> PyResult<Vec<String>> {
        self.source
            .with(|m| m.keys().map(|k| k.as_str().to_owned()).collect())
    }

    fn values(&self) -> PyResult<Vec<String>> {
        self.source.with(|m| m.values().map(value_str).collect())
    }

    fn items(&self) -> PyResult<Vec<(String, String)>> {
        self.source.with(|m| {
            m.iter()
                .map(|(k, v)| (k.as_str().to_owned(), value_str(v)))
                .collect()
        })
    }

    fn __repr__(&self) -> PyResult<String> {
        Ok(format!("Headers({:?})", self.items()?))
    }
}
