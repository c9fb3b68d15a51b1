//! `Headers`: a case-insensitive, multi-valued, mutable view over a header map that stays in
//! Rust. Nothing is copied into a dict; each access locks the owner's map briefly.
//!
//! Values are bytes on the wire. As `str` they are Latin-1 both ways: reading decodes every
//! byte to the character of the same number, writing encodes each character back to its byte,
//! so `h[k] = h[k]` sends exactly the bytes that came in. `bytes` values pass through as they
//! are, for other encodings.

use std::borrow::Cow;
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use parking_lot::Mutex;
use pyo3::exceptions::{PyKeyError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyDict, PyList, PyMapping, PyString, PyTuple, PyType};

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

/// Registered as a `collections.abc.MutableMapping` at import (see `lib.rs`).
#[pyclass(module = "ferroxy", frozen, mapping)]
pub struct Headers {
    source: HeaderSource,
}

impl Headers {
    pub fn new(source: HeaderSource) -> Self {
        Headers { source }
    }

    /// The map's contents, copied out first: `other` may be a view of the map being edited
    /// or compared, and its lock is not reentrant.
    fn snapshot(&self) -> PyResult<HeaderMap> {
        self.source.with(|m| m.clone())
    }
}

fn name_of(name: &str) -> PyResult<HeaderName> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| PyValueError::new_err(format!("invalid header name {name:?}")))
}

/// A value from Python: `bytes` as they are, a `str` as Latin-1 (the inverse of
/// [`value_str`]). ValueError naming the header for characters beyond U+00FF or for control
/// characters (CR, LF, NUL...), which would split or end the header on the wire.
fn value_of(name: &str, value: &Bound<'_, PyAny>) -> PyResult<HeaderValue> {
    let invalid = |why: &str| {
        let shown = value.repr().map(|r| r.to_string()).unwrap_or_default();
        PyValueError::new_err(format!("invalid value for header {name:?}: {shown} {why}"))
    };
    let bytes: Cow<'_, [u8]> = if let Ok(bytes) = value.cast::<PyBytes>() {
        Cow::Borrowed(bytes.as_bytes())
    } else if let Ok(text) = value.cast::<PyString>() {
        let text = text.to_str()?;
        if text.is_ascii() {
            Cow::Borrowed(text.as_bytes())
        } else {
            let latin1: Option<Vec<u8>> = text.chars().map(|c| u8::try_from(c).ok()).collect();
            Cow::Owned(latin1.ok_or_else(|| {
                invalid(
                    "has characters beyond U+00FF; str values are Latin-1, pass bytes \
                     (such as value.encode()) to send another encoding",
                )
            })?)
        }
    } else {
        return Err(PyTypeError::new_err(format!(
            "header {name:?}: values must be str or bytes, not {}",
            value.get_type().name()?
        )));
    };
    HeaderValue::from_bytes(&bytes).map_err(|_| invalid("has a control character (CR, LF, NUL...)"))
}

/// A value as Python `str`: Latin-1, so every byte maps to one character and back.
pub fn value_str(value: &HeaderValue) -> String {
    match value.to_str() {
        Ok(s) => s.to_owned(),
        Err(_) => value.as_bytes().iter().map(|&b| char::from(b)).collect(),
    }
}

fn value_bytes<'py>(py: Python<'py>, value: &HeaderValue) -> Bound<'py, PyBytes> {
    PyBytes::new(py, value.as_bytes())
}

/// Headers from a `Headers`, a mapping (as `dict()` takes one: anything with `keys()`), or
/// an iterable of (name, value) pairs; values are str or bytes.
pub fn headers_from_python(source: &Bound<'_, PyAny>) -> PyResult<HeaderMap> {
    if let Ok(headers) = source.cast::<Headers>() {
        return headers.get().snapshot();
    }
    let mut map = HeaderMap::new();
    let mut add = |name: &Bound<'_, PyAny>, value: &Bound<'_, PyAny>| -> PyResult<()> {
        let name = name
            .cast::<PyString>()
            .map_err(|_| PyTypeError::new_err("header names must be str"))?
            .to_str()?;
        map.append(name_of(name)?, value_of(name, value)?);
        Ok(())
    };
    if let Ok(dict) = source.cast::<PyDict>() {
        for (name, value) in dict {
            add(&name, &value)?;
        }
    } else if source.hasattr(intern!(source.py(), "keys"))? {
        for name in source
            .call_method0(intern!(source.py(), "keys"))?
            .try_iter()?
        {
            let name = name?;
            add(&name, &source.get_item(&name)?)?;
        }
    } else {
        for pair in source.try_iter()? {
            let (name, value): (Bound<'_, PyAny>, Bound<'_, PyAny>) =
                pair?.extract().map_err(|_| {
                    PyTypeError::new_err("headers must be a mapping or (name, value) pairs")
                })?;
            add(&name, &value)?;
        }
    }
    Ok(map)
}

/// `collections.abc`'s view types: they give `keys()`, `values()` and `items()` the same
/// live, set-like behaviour as a dict's.
fn abc_view<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyType>>,
    name: &str,
    headers: &Bound<'py, Headers>,
) -> PyResult<Bound<'py, PyAny>> {
    cell.import(py, "collections.abc", name)?.call1((headers,))
}

#[pymethods]
impl Headers {
    /// `Headers(headers=None)`: a free-standing set of headers, from a mapping or
    /// (name, value) pairs; views on requests and responses come from their `headers`.
    #[new]
    #[pyo3(signature = (headers=None, /))]
    fn py_new(headers: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let map = headers
            .map(headers_from_python)
            .transpose()?
            .unwrap_or_default();
        Ok(Headers::new(HeaderSource::Owned(Arc::new(Mutex::new(map)))))
    }

    fn __getitem__(&self, name: &str) -> PyResult<String> {
        self.source
            .with(|m| m.get(name).map(value_str))?
            .ok_or_else(|| PyKeyError::new_err(name.to_owned()))
    }

    fn __setitem__(&self, name: &str, value: &Bound<'_, PyAny>) -> PyResult<()> {
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
        let names = self
            .source
            .with(|m| m.keys().map(|k| k.as_str().to_owned()).collect::<Vec<_>>())?;
        Ok(PyList::new(py, names)?.try_iter()?.into_any())
    }

    /// Equal to another `Headers` or a mapping with the same names and, name by name, the
    /// same values in the same order (names compare case-insensitively).
    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        if other.cast::<PyMapping>().is_err() {
            return Ok(py.NotImplemented());
        }
        // Names or values no header can have: not equal, rather than an error.
        let equal = match headers_from_python(other) {
            Ok(other) => self.source.with(|m| *m == other)?,
            Err(_) => false,
        };
        Ok(PyBool::new(py, equal).to_owned().into_any().unbind())
    }

    #[pyo3(signature = (name, default=None, /))]
    fn get<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        default: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        Ok(match self.source.with(|m| m.get(name).map(value_str))? {
            Some(value) => Some(PyString::new(py, &value).into_any()),
            None => default,
        })
    }

    fn get_all(&self, name: &str) -> PyResult<Vec<String>> {
        self.source
            .with(|m| m.get_all(name).iter().map(value_str).collect())
    }

    /// The first value as it is on the wire.
    #[pyo3(signature = (name, default=None))]
    fn get_bytes<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        default: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        Ok(match self.source.with(|m| m.get(name).cloned())? {
            Some(value) => Some(value_bytes(py, &value).into_any()),
            None => default,
        })
    }

    fn get_all_bytes<'py>(
        &self,
        py: Python<'py>,
        name: &str,
    ) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let values: Vec<HeaderValue> = self
            .source
            .with(|m| m.get_all(name).iter().cloned().collect())?;
        Ok(values.iter().map(|v| value_bytes(py, v)).collect())
    }

    fn add(&self, name: &str, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let (name, value) = (name_of(name)?, value_of(name, value)?);
        self.source.with(|m| {
            m.append(name, value);
        })
    }

    /// Remove every value of `name` and return the first; `default` (if given) when absent,
    /// else KeyError.
    #[pyo3(signature = (name, /, *default))]
    fn pop<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        default: &Bound<'py, PyTuple>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if default.len() > 1 {
            return Err(PyTypeError::new_err(format!(
                "pop expected at most 2 arguments, got {}",
                default.len() + 1
            )));
        }
        let first = self.source.with(|m| {
            let first = m.get(name).map(value_str);
            m.remove(name);
            first
        })?;
        match first {
            Some(value) => Ok(PyString::new(py, &value).into_any()),
            None if !default.is_empty() => default.get_item(0),
            None => Err(PyKeyError::new_err(name.to_owned())),
        }
    }

    /// Remove one name with all its values; return it with its first value.
    fn popitem(&self) -> PyResult<(String, String)> {
        self.source
            .with(|m| {
                let name = m.keys().next()?.clone();
                let first = m.get(&name).map(value_str)?;
                m.remove(&name);
                Some((name.as_str().to_owned(), first))
            })?
            .ok_or_else(|| PyKeyError::new_err("popitem(): the headers are empty"))
    }

    /// The first value of `name`, after setting it to `default` if it was absent.
    #[pyo3(signature = (name, default, /))]
    fn setdefault(&self, name: &str, default: &Bound<'_, PyAny>) -> PyResult<String> {
        let (header, given) = (name_of(name)?, value_of(name, default)?);
        self.source
            .with(|m| value_str(m.entry(header).or_insert(given)))
    }

    /// Like `dict.update`: each name given replaces the values this view had for it, and
    /// keeps every value given for it (a `Headers` or repeated pairs carry several).
    /// `HeaderMap::extend` does exactly that.
    #[pyo3(signature = (other=None, /, **names))]
    fn update(
        &self,
        other: Option<&Bound<'_, PyAny>>,
        names: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        let mut given = other
            .map(headers_from_python)
            .transpose()?
            .unwrap_or_default();
        if let Some(names) = names {
            given.extend(headers_from_python(names)?);
        }
        self.source.with(|m| m.extend(given))
    }

    fn clear(&self) -> PyResult<()> {
        self.source.with(HeaderMap::clear)
    }

    fn keys<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        static KEYS_VIEW: PyOnceLock<Py<PyType>> = PyOnceLock::new();
        abc_view(slf.py(), &KEYS_VIEW, "KeysView", slf)
    }

    /// The first value of each name, like `h[name]`; `multi_items()` has them all.
    fn values<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        static VALUES_VIEW: PyOnceLock<Py<PyType>> = PyOnceLock::new();
        abc_view(slf.py(), &VALUES_VIEW, "ValuesView", slf)
    }

    /// `(name, first value)` for each name, like `h[name]`; `multi_items()` has them all.
    fn items<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        static ITEMS_VIEW: PyOnceLock<Py<PyType>> = PyOnceLock::new();
        abc_view(slf.py(), &ITEMS_VIEW, "ItemsView", slf)
    }

    /// Every `(name, value)` pair, a name once per value, in order.
    fn multi_items(&self) -> PyResult<Vec<(String, String)>> {
        self.source.with(|m| {
            m.iter()
                .map(|(k, v)| (k.as_str().to_owned(), value_str(v)))
                .collect()
        })
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let items = PyList::new(py, self.multi_items()?)?;
        Ok(format!("Headers({})", items.repr()?))
    }
}
