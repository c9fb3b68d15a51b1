//! `ferroxy.filters` and `ferroxy.Route` objects made into the engine's filters and routes.
//! The same conversion checks each object when Python constructs it (`check_filter`,
//! `check_condition`, `check_route`), so a bad value fails where it is written, naming the
//! class and field (`Redirect.to: unknown placeholder {hots}`), and nothing invalid reaches
//! the engine; at start-up it runs once more to build what the engine runs.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use ferroxy_engine::filters::rate_limit::{RateLimit, RateLimitOptions};
use ferroxy_engine::filters::{
    Action, BasicAuth, Condition, Cors, CorsConfig, Filter, Filters, Groups, HostMatch, Template,
    TextMatch,
};
use ferroxy_engine::lb::ConfigError;
use ferroxy_engine::route::{Route, Router};

use crate::server::upstream_from;

/// An error naming `class.field`.
fn field_error(class: &str, field: &str, message: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("{class}.{field}: {message}"))
}

/// The class name of one of ferroxy's filter, condition or route objects.
fn class_of(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    let ty = obj.get_type();
    let module: String = ty.getattr("__module__")?.extract()?;
    if !module.starts_with("ferroxy") {
        return Err(PyTypeError::new_err(format!(
            "expected a ferroxy {what}, not {}",
            ty.name()?
        )));
    }
    Ok(ty.name()?.to_string())
}

fn attr<'py, T>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<T>
where
    T: for<'a> FromPyObject<'a, 'py, Error = PyErr>,
{
    obj.getattr(name)?.extract()
}

fn regex(class: &str, field: &str, pattern: &str) -> PyResult<regex::Regex> {
    regex::Regex::new(pattern).map_err(|e| field_error(class, field, e))
}

fn header_name(class: &str, name: &str) -> PyResult<http::HeaderName> {
    http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        field_error(
            class,
            "name",
            format!("{name:?} is not a valid header name"),
        )
    })
}

/// `equals=` or `regex=`, else present.
fn text_match(obj: &Bound<'_, PyAny>, class: &str) -> PyResult<TextMatch> {
    let equals: Option<String> = attr(obj, "equals")?;
    let pattern: Option<String> = attr(obj, "regex")?;
    Ok(match (equals, pattern) {
        (Some(_), Some(_)) => {
            return Err(field_error(
                class,
                "regex",
                "give equals= or regex=, not both",
            ))
        }
        (Some(value), None) => TextMatch::Exact(value),
        (None, Some(pattern)) => TextMatch::Regex(regex(class, "regex", &pattern)?),
        (None, None) => TextMatch::Present,
    })
}

fn path(class: &str, field: &str, value: String) -> PyResult<String> {
    if value.starts_with('/') {
        Ok(value)
    } else {
        Err(field_error(
            class,
            field,
            format!("must start with '/', got {value:?}"),
        ))
    }
}

pub fn condition_from(obj: &Bound<'_, PyAny>) -> PyResult<Condition> {
    let class = class_of(obj, "condition")?;
    let class = class.as_str();
    let all = |field: &str| -> PyResult<Vec<Condition>> {
        obj.getattr(field)?
            .try_iter()?
            .map(|c| condition_from(&c?))
            .collect()
    };
    Ok(match class {
        "Method" => {
            let names: Vec<String> = attr(obj, "methods")?;
            let methods = names
                .iter()
                .map(|name| {
                    http::Method::from_bytes(name.as_bytes()).map_err(|_| {
                        field_error(class, "methods", format!("{name:?} is not a method"))
                    })
                })
                .collect::<PyResult<_>>()?;
            Condition::Method(methods)
        }
        "Path" => Condition::Path(TextMatch::Exact(path(class, "path", attr(obj, "path")?)?)),
        "PathPrefix" => Condition::Path(TextMatch::Prefix(path(
            class,
            "prefix",
            attr(obj, "prefix")?,
        )?)),
        "PathRegex" => {
            let pattern: String = attr(obj, "pattern")?;
            Condition::Path(TextMatch::Regex(regex(class, "pattern", &pattern)?))
        }
        "Host" => Condition::Host(host(class, &attr::<String>(obj, "host")?)?),
        "Header" => {
            let name: String = attr(obj, "name")?;
            Condition::Header(header_name(class, &name)?, text_match(obj, class)?)
        }
        "Query" => Condition::Query(attr(obj, "name")?, text_match(obj, class)?),
        "Cookie" => Condition::Cookie(attr(obj, "name")?, text_match(obj, class)?),
        "ClientIP" => {
            let inside: Vec<String> = attr(obj, "in_")?;
            let outside: Vec<String> = attr(obj, "not_in")?;
            Condition::client_ip(&inside, &outside).map_err(|e| config_error(class, e))?
        }
        "All" => Condition::All(all("conditions")?),
        "Any" => Condition::Any(all("conditions")?),
        "Not" => Condition::Not(Box::new(condition_from(&obj.getattr("condition")?)?)),
        _ => return Err(PyTypeError::new_err(format!("{class} is not a condition"))),
    })
}

fn host(class: &str, pattern: &str) -> PyResult<HostMatch> {
    HostMatch::parse(pattern).map_err(|e| config_error(class, e))
}

fn status(class: &str, obj: &Bound<'_, PyAny>) -> PyResult<http::StatusCode> {
    let status: u16 =
        attr(obj, "status").map_err(|_| field_error(class, "status", "must be an int"))?;
    http::StatusCode::from_u16(status)
        .map_err(|_| field_error(class, "status", format!("{status} is not a status")))
}

pub fn filter_from(obj: &Bound<'_, PyAny>) -> PyResult<Filter> {
    filter_at(obj, &mut Occurrences::new())
}

/// How many `RateLimit`s of a filter list so far had each [`RateLimitOptions::identity`].
type Occurrences = std::collections::HashMap<String, usize>;

/// `obj`, the next filter of a list whose earlier `RateLimit`s are counted in `occurrences`.
fn filter_at(obj: &Bound<'_, PyAny>, occurrences: &mut Occurrences) -> PyResult<Filter> {
    let class = class_of(obj, "filter")?;
    let class = class.as_str();
    let when = obj.getattr("when")?;
    let when = if when.is_none() {
        None
    } else {
        Some(condition_from(&when)?)
    };
    let template = |field: &str, groups: Groups<'_>| -> PyResult<Template> {
        let text: String = attr(obj, field)?;
        Template::parse(field, &text, groups).map_err(|e| config_error(class, e))
    };
    let groups = Filter::groups(when.as_ref(), None);
    let header =
        || -> PyResult<http::HeaderName> { header_name(class, &attr::<String>(obj, "name")?) };
    let action = match class {
        "Deny" => Action::Deny(status(class, obj)?),
        "Respond" => Action::Respond {
            status: status(class, obj)?,
            body: attr::<Vec<u8>>(obj, "body")?.into(),
            headers: response_headers(class, obj)?,
        },
        "Redirect" => Action::Redirect {
            to: template("to", groups)?,
            status: status(class, obj)?,
        },
        "SetRequestHeader" => Action::SetRequestHeader(header()?, template("value", groups)?),
        "AddRequestHeader" => Action::AddRequestHeader(header()?, template("value", groups)?),
        "RemoveRequestHeader" => Action::RemoveRequestHeader(header()?),
        "SetResponseHeader" => Action::SetResponseHeader(header()?, template("value", groups)?),
        "AddResponseHeader" => Action::AddResponseHeader(header()?, template("value", groups)?),
        "RemoveResponseHeader" => Action::RemoveResponseHeader(header()?),
        "RewritePath" => {
            let pattern = regex(class, "pattern", &attr::<String>(obj, "pattern")?)?;
            let to = template("to", Groups::of(Some(&pattern)))?;
            Action::RewritePath { pattern, to }
        }
        "MaxBodySize" => {
            let max: u64 = attr(obj, "max_bytes")
                .map_err(|_| field_error(class, "max_bytes", "must be an int >= 0"))?;
            Action::MaxBodySize(max)
        }
        "RequestId" => Action::RequestId,
        "BasicAuth" => {
            let realm: String = attr(obj, "realm")?;
            let auth = BasicAuth::new(&pairs(obj, "users")?, &realm)
                .map_err(|e| config_error(class, e))?;
            Action::BasicAuth(kept(obj, 0, || Ok(auth))?)
        }
        "Cors" => Action::Cors(Arc::new(cors(class, obj)?)),
        "RateLimit" => {
            let options = rate_limit_options(obj, occurrences)?;
            // Which of the limits alike it is names its counters in a store: part of what
            // the kept state was made from.
            let place = options.occurrence;
            Action::RateLimit(kept(obj, place, || {
                RateLimit::new(options).map_err(|e| config_error(class, e))
            })?)
        }
        _ => return Err(PyTypeError::new_err(format!("{class} is not a filter"))),
    };
    let filter = Filter::new(when, action);
    filter.check().map_err(|e| config_error(class, e))?;
    Ok(filter)
}

/// What the engine made of a filter object, kept in its `_compiled` slot beside the fields
/// it was made from.
#[pyclass(frozen)]
struct Compiled(Arc<dyn Any + Send + Sync>);

/// The engine's state of filter `obj` (RateLimit's counters, BasicAuth's verdicts): the one
/// made when `obj` was last compiled, while its fields (and `place`, what else the state was
/// made from) are unchanged, so that reloading the very same object keeps it; else (a new
/// object, even an equal one, or one edited or placed otherwise since) a fresh one from
/// `make`.
fn kept<T: Send + Sync + 'static>(
    obj: &Bound<'_, PyAny>,
    place: usize,
    make: impl FnOnce() -> PyResult<T>,
) -> PyResult<Arc<T>> {
    let fields = (obj.call_method0("_fields")?, place).into_pyobject(obj.py())?;
    // Unset (an AttributeError) until the first compile.
    if let Ok(slot) = obj.getattr("_compiled") {
        if let Ok((was, compiled)) = slot.extract::<(Bound<'_, PyAny>, Bound<'_, Compiled>)>() {
            if was.eq(&fields)? {
                if let Ok(state) = compiled.get().0.clone().downcast::<T>() {
                    return Ok(state);
                }
            }
        }
    }
    let state = Arc::new(make()?);
    obj.setattr("_compiled", (fields, Compiled(state.clone())))?;
    Ok(state)
}

/// A `dict[str, str]` attribute, in its order.
fn pairs(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<(String, String)>> {
    obj.getattr(name)?
        .call_method0("items")?
        .try_iter()?
        .map(|item| item?.extract())
        .collect()
}

/// `Respond.headers`: names and values checked here, the engine's rules by `Filter::check`.
fn response_headers(class: &str, obj: &Bound<'_, PyAny>) -> PyResult<http::HeaderMap> {
    let mut headers = http::HeaderMap::new();
    for (name, value) in pairs(obj, "headers")? {
        let field = format!("headers[{name:?}]");
        let name = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| field_error(class, &field, "is not a valid header name"))?;
        let value = http::HeaderValue::try_from(value)
            .map_err(|_| field_error(class, &field, "is not a valid header value"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

fn cors(class: &str, obj: &Bound<'_, PyAny>) -> PyResult<Cors> {
    let config = CorsConfig {
        origins: attr(obj, "origins")?,
        methods: attr(obj, "methods")?,
        headers: attr(obj, "headers")?,
        expose_headers: attr(obj, "expose_headers")?,
        credentials: attr(obj, "credentials")?,
        max_age: attr(obj, "max_age")
            .map_err(|_| field_error(class, "max_age", "must be an int >= 0 or None"))?,
    };
    Cors::new(&config).map_err(|e| config_error(class, e))
}

fn rate_limit_options(
    obj: &Bound<'_, PyAny>,
    occurrences: &mut Occurrences,
) -> PyResult<RateLimitOptions> {
    let class = "RateLimit";
    let seconds: f64 = attr(obj, "store_timeout")
        .map_err(|_| field_error(class, "store_timeout", "must be a number of seconds"))?;
    let store_timeout = Duration::try_from_secs_f64(seconds).map_err(|_| {
        field_error(
            class,
            "store_timeout",
            format!("must be over 0 and at most 10 seconds, got {seconds}"),
        )
    })?;
    let mut options = RateLimitOptions {
        key: attr(obj, "key")?,
        rate: attr(obj, "rate")?,
        burst: attr(obj, "burst")
            .map_err(|_| field_error(class, "burst", "must be an int >= 0"))?,
        status: status(class, obj)?,
        store: attr(obj, "store")?,
        on_store_error: attr(obj, "on_store_error")?,
        store_timeout,
        name: attr(obj, "name")?,
        // Without a `name`, filters differ in the store by their condition, key and limit,
        // and among filters alike in those by their order.
        scope: obj.getattr("when")?.repr()?.to_string(),
        occurrence: 0,
    };
    let seen = occurrences.entry(options.identity()).or_default();
    options.occurrence = *seen;
    *seen += 1;
    Ok(options)
}

fn config_error(class: &str, error: ConfigError) -> PyErr {
    field_error(class, &error.field, error.message)
}

/// The filters of `Proxy.filters`, in order; `None` for none.
pub fn filters_from(list: &Bound<'_, PyAny>) -> PyResult<Option<Arc<Filters>>> {
    let mut occurrences = Occurrences::new();
    let filters = list
        .try_iter()?
        .enumerate()
        .map(|(i, f)| {
            filter_at(&f?, &mut occurrences)
                .map_err(|e| within(list.py(), e, &format!("filters[{i}]")))
        })
        .collect::<PyResult<Vec<_>>>()?;
    if filters.is_empty() {
        return Ok(None);
    }
    let filters = Filters::new(filters).map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(Some(Arc::new(filters)))
}

pub fn route_from(obj: &Bound<'_, PyAny>) -> PyResult<Route> {
    let class = "Route";
    let host_pattern: Option<String> = attr(obj, "host")?;
    let path_prefix: Option<String> = attr(obj, "path_prefix")?;
    let path_regex: Option<String> = attr(obj, "path_regex")?;
    let route = Route {
        host: host_pattern.map(|h| host(class, &h)).transpose()?,
        path_prefix,
        path_regex: path_regex
            .map(|p| regex(class, "path_regex", &p))
            .transpose()?,
        upstream: upstream_from(&obj.getattr("upstream")?)
            .map_err(|e| within(obj.py(), e, "Route.upstream"))?,
        strip_prefix: attr(obj, "strip_prefix")?,
    };
    route.check().map_err(|e| config_error(class, e))?;
    Ok(route)
}

/// The routes of `Proxy.routes`, in order; `None` for none.
pub fn routes_from(list: &Bound<'_, PyAny>) -> PyResult<Option<Router>> {
    let routes = list
        .try_iter()?
        .enumerate()
        .map(|(i, r)| route_from(&r?).map_err(|e| within(list.py(), e, &format!("routes[{i}]"))))
        .collect::<PyResult<Vec<_>>>()?;
    if routes.is_empty() {
        return Ok(None);
    }
    let router = Router::new(routes).map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(Some(router))
}

/// `error` with `where_: ` before its message, of the same exception type.
fn within(py: Python<'_>, error: PyErr, where_: &str) -> PyErr {
    let message = format!("{where_}: {}", error.value(py));
    if error.is_instance_of::<PyTypeError>(py) {
        PyTypeError::new_err(message)
    } else {
        PyValueError::new_err(message)
    }
}

/// Check a filter as the engine will run it (ValueError naming its class and field).
#[pyfunction]
#[pyo3(signature = (filter, /))]
pub fn check_filter(filter: &Bound<'_, PyAny>) -> PyResult<()> {
    filter_from(filter).map(drop)
}

#[pyfunction]
#[pyo3(signature = (condition, /))]
pub fn check_condition(condition: &Bound<'_, PyAny>) -> PyResult<()> {
    condition_from(condition).map(drop)
}

#[pyfunction]
#[pyo3(signature = (route, /))]
pub fn check_route(route: &Bound<'_, PyAny>) -> PyResult<()> {
    route_from(route).map(drop)
}
