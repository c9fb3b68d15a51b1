//! The request/response heads, the session and its connections, as Python sees them. Heads
//! live in slots shared with the engine: filled before a hook runs, taken back after, so hooks edit
//! the engine's own headers in place.

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use ferroxy_engine::{DownstreamDigest, TlsDigest, UpstreamDigest, UpstreamProtocol};

use crate::headers::{detached, HeaderSource, Headers, RequestSlot, ResponseSlot};
use crate::types::final_status;

#[pyclass(name = "RequestHeader", module = "ferroxy", frozen)]
pub struct PyRequestHeader {
    pub slot: RequestSlot,
    client_addr: SocketAddr,
}

impl PyRequestHeader {
    pub fn new(slot: RequestSlot, client_addr: SocketAddr) -> Self {
        PyRequestHeader { slot, client_addr }
    }

    fn read<R>(&self, f: impl FnOnce(&http::request::Parts) -> R) -> PyResult<R> {
        self.slot.lock().as_ref().map(f).ok_or_else(detached)
    }

    fn write<R>(&self, f: impl FnOnce(&mut http::request::Parts) -> PyResult<R>) -> PyResult<R> {
        self.slot.lock().as_mut().map(f).ok_or_else(detached)?
    }

    /// Replace the path and query, keeping scheme and authority (h2 requests carry them).
    fn set_target(&self, path: Option<&str>, query: Option<&str>) -> PyResult<()> {
        self.write(|parts| {
            let old_path = parts.uri.path().to_owned();
            let old_query = parts.uri.query().map(str::to_owned);
            let path = path.unwrap_or(&old_path);
            if !path.starts_with('/') {
                return Err(PyValueError::new_err(format!(
                    "path must start with '/', got {path:?}"
                )));
            }
            let query = match query {
                Some(q) => (!q.is_empty()).then(|| q.to_owned()),
                None => old_query,
            };
            let target = match query {
                Some(q) => format!("{path}?{q}"),
                None => path.to_owned(),
            };
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.path_and_query = Some(target.parse().map_err(|_| {
                PyValueError::new_err(format!("invalid request target {target:?}"))
            })?);
            parts.uri =
                http::Uri::from_parts(uri).map_err(|e| PyValueError::new_err(e.to_string()))?;
            Ok(())
        })
    }
}

pub fn version_str(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

#[pymethods]
impl PyRequestHeader {
    #[getter]
    fn method(&self) -> PyResult<String> {
        self.read(|p| p.method.as_str().to_owned())
    }
    #[setter]
    fn set_method(&self, method: &str) -> PyResult<()> {
        let method = http::Method::from_bytes(method.as_bytes())
            .map_err(|_| PyValueError::new_err(format!("invalid method {method:?}")))?;
        self.write(|p| {
            p.method = method;
            Ok(())
        })
    }
    #[getter]
    fn path(&self) -> PyResult<String> {
        self.read(|p| p.uri.path().to_owned())
    }
    #[setter]
    fn set_path(&self, path: &str) -> PyResult<()> {
        self.set_target(Some(path), None)
    }
    #[getter]
    fn query(&self) -> PyResult<String> {
        self.read(|p| p.uri.query().unwrap_or("").to_owned())
    }
    #[setter]
    fn set_query(&self, query: &str) -> PyResult<()> {
        self.set_target(None, Some(query))
    }
    #[getter]
    fn uri(&self) -> PyResult<String> {
        self.read(|p| {
            p.uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_owned()
        })
    }
    #[getter]
    fn version(&self) -> PyResult<&'static str> {
        self.read(|p| version_str(p.version))
    }
    #[getter]
    fn headers(&self) -> Headers {
        Headers::new(HeaderSource::Request(self.slot.clone()))
    }
    #[getter]
    fn client_addr(&self) -> String {
        self.client_addr.to_string()
    }
    fn __repr__(&self) -> PyResult<String> {
        self.read(|p| format!("RequestHeader({} {})", p.method, p.uri))
    }
}

#[pyclass(name = "ResponseHeader", module = "ferroxy", frozen)]
pub struct PyResponseHeader {
    pub slot: ResponseSlot,
}

#[pymethods]
impl PyResponseHeader {
    #[getter]
    fn status(&self) -> PyResult<u16> {
        self.slot
            .lock()
            .as_ref()
            .map(|p| p.status.as_u16())
            .ok_or_else(detached)
    }
    #[setter]
    fn set_status(&self, status: u16) -> PyResult<()> {
        let status = final_status("ResponseHeader.status", status)?;
        self.slot
            .lock()
            .as_mut()
            .map(|p| p.status = status)
            .ok_or_else(detached)
    }
    #[getter]
    fn version(&self) -> PyResult<&'static str> {
        self.slot
            .lock()
            .as_ref()
            .map(|p| version_str(p.version))
            .ok_or_else(detached)
    }
    #[getter]
    fn headers(&self) -> Headers {
        Headers::new(HeaderSource::Response(self.slot.clone()))
    }
    fn __repr__(&self) -> PyResult<String> {
        Ok(format!("ResponseHeader({})", self.status()?))
    }
}

#[pyclass(name = "Session", module = "ferroxy")]
pub struct PySession {
    req: Py<PyRequestHeader>,
    downstream: Arc<DownstreamDigest>,
    upstream: Option<UpstreamDigest>,
    route: Option<RouteRef>,
    request_id: Option<http::HeaderValue>,
    #[pyo3(get, set)]
    ctx: Py<PyAny>,
    /// Where `read_request_body` asks the engine for the body: the latest request trip's
    /// channel (see [`crate::body_read`]); a send fails once that trip has ended.
    pub reading: Option<tokio::sync::oneshot::Sender<crate::body_read::BodyReadRequest>>,
    /// The body `read_request_body` read, given again to later reads.
    pub read_body: Option<Py<pyo3::types::PyBytes>>,
}

impl PySession {
    /// The head to send upstream, built from `req` as it stands now, the way the engine
    /// builds it (one function does it for both).
    pub fn build_upstream_request(&self) -> PyResult<http::request::Parts> {
        self.req.get().read(|req| {
            ferroxy_engine::forward::upstream_request(
                req,
                self.downstream.client_addr.ip(),
                self.downstream.scheme,
            )
        })
    }

    /// A Python view of a request head that belongs to this session.
    pub fn request_header(&self, parts: http::request::Parts) -> PyRequestHeader {
        PyRequestHeader::new(
            Arc::new(Mutex::new(Some(parts))),
            self.downstream.client_addr,
        )
    }

    pub fn set_upstream(&mut self, digest: Option<UpstreamDigest>) {
        if digest.is_some() {
            self.upstream = digest;
        }
    }
}

#[pymethods]
impl PySession {
    #[getter]
    fn req(&self, py: Python<'_>) -> Py<PyRequestHeader> {
        self.req.clone_ref(py)
    }
    /// Await the whole request body (at most `limit` bytes) in a request-side hook, before
    /// the upstream is chosen; it is then what goes upstream. RequestBodyError above the
    /// limit (413) or when the upload fails; RuntimeError outside a request-side hook.
    // 1 MiB when not told: nginx's `client_max_body_size` (a literal, for the signature
    // Python shows).
    #[pyo3(signature = (limit = 1048576))]
    fn read_request_body(slf: &Bound<'_, Self>, limit: u64) -> PyResult<Py<PyAny>> {
        crate::body_read::ask(slf, limit)
    }
    #[getter]
    fn client_addr(&self) -> String {
        self.downstream.client_addr.to_string()
    }
    /// The client's connection: addresses, scheme, TLS details.
    #[getter]
    fn client_conn(&self) -> PyResult<ClientConn> {
        Ok(ClientConn {
            digest: self.downstream.clone(),
            // hyper settles the protocol per connection: each request on it has its version.
            protocol: self.req.get().read(|req| version_str(req.version))?,
        })
    }
    /// What the client's TLS handshake settled; None on a plain connection.
    #[getter]
    fn tls(&self) -> Option<crate::tls::TlsInfo> {
        self.downstream.tls.as_ref().map(|_| crate::tls::TlsInfo {
            digest: self.downstream.clone(),
        })
    }
    /// The upstream connection the request went out on; None until it has.
    #[getter]
    fn server_conn(&self) -> Option<ServerConn> {
        self.upstream.map(|digest| ServerConn { digest })
    }
    /// The `Route` that matched this request (None when none did, or there are no routes).
    #[getter]
    fn route<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.route
            .as_ref()
            .map(|route| route.routes.bind(py).get_item(route.index))
            .transpose()
    }
    /// The request's id: the one a filter gave it or read, else the client's `x-request-id`.
    #[getter]
    fn request_id(&self) -> PyResult<Option<String>> {
        let latin1 = |v: &http::HeaderValue| v.as_bytes().iter().map(|&b| b as char).collect();
        match &self.request_id {
            Some(id) => Ok(Some(latin1(id))),
            None => self.req.get().read(|req| {
                req.headers
                    .get(&ferroxy_engine::filters::REQUEST_ID)
                    .map(latin1)
            }),
        }
    }
    /// A preview of the request as the engine would forward it now (hop-by-hop headers
    /// removed, X-Forwarded-* set). Edits to it are not sent: edit `upstream_request` in
    /// upstream_request_filter for that.
    fn upstream_request(&self, py: Python<'_>) -> PyResult<Py<PyRequestHeader>> {
        let parts = self.build_upstream_request()?;
        Py::new(py, self.request_header(parts))
    }
    fn __repr__(&self) -> String {
        format!("Session(client={})", self.downstream.client_addr)
    }
}

/// The downstream connection a request arrived on.
#[pyclass(name = "ClientConn", module = "ferroxy", frozen)]
pub struct ClientConn {
    digest: Arc<DownstreamDigest>,
    protocol: &'static str,
}

#[pymethods]
impl ClientConn {
    /// The client's address, `host:port`.
    #[getter]
    fn client_addr(&self) -> String {
        self.digest.client_addr.to_string()
    }
    /// The address the client connected to (ours), `host:port`.
    #[getter]
    fn local_addr(&self) -> String {
        self.digest.local_addr.to_string()
    }
    /// "http" or "https".
    #[getter]
    fn scheme(&self) -> &'static str {
        self.digest.scheme.as_str()
    }
    /// "HTTP/1.1", "HTTP/2", ...
    #[getter]
    fn protocol(&self) -> &'static str {
        self.protocol
    }
    #[getter]
    fn tls(&self) -> bool {
        self.digest.tls.is_some()
    }
    /// The client's certificate chain (DER, leaf first) from a mutual-TLS handshake.
    #[getter]
    fn client_certificates<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, pyo3::types::PyBytes>> {
        self.digest.tls.as_ref().map_or_else(Vec::new, |tls| {
            tls.client_certificates
                .iter()
                .map(|der| pyo3::types::PyBytes::new(py, der))
                .collect()
        })
    }
    /// The server name the client asked for in its TLS handshake.
    #[getter]
    fn sni(&self) -> Option<String> {
        self.digest.tls.as_ref().and_then(|t| t.sni.clone())
    }
    /// The protocol TLS ALPN settled on, e.g. "h2".
    #[getter]
    fn alpn(&self) -> Option<String> {
        self.digest.tls.as_ref().and_then(TlsDigest::alpn_text)
    }
    fn __repr__(&self) -> String {
        format!(
            "ClientConn({} -> {}, {})",
            self.digest.client_addr,
            self.digest.local_addr,
            self.digest.scheme.as_str()
        )
    }
}

/// The upstream connection a request was sent over.
#[pyclass(name = "ServerConn", module = "ferroxy", frozen)]
pub struct ServerConn {
    digest: UpstreamDigest,
}

#[pymethods]
impl ServerConn {
    /// The upstream's address, `host:port`.
    #[getter]
    fn peer_addr(&self) -> String {
        self.digest.peer_addr.to_string()
    }
    /// Our end of the connection, `host:port`.
    #[getter]
    fn local_addr(&self) -> String {
        self.digest.local_addr.to_string()
    }
    /// "HTTP/1.1" or "HTTP/2".
    #[getter]
    fn protocol(&self) -> &'static str {
        match self.digest.protocol {
            UpstreamProtocol::Http1 => "HTTP/1.1",
            UpstreamProtocol::Http2 => "HTTP/2",
        }
    }
    /// True when the connection came from the pool, False when it was opened for this request.
    #[getter]
    fn reused(&self) -> bool {
        self.digest.reused
    }
    fn __repr__(&self) -> String {
        format!(
            "ServerConn({}, reused={})",
            self.digest.peer_addr, self.digest.reused
        )
    }
}

/// The route a request took: its index in the app's `routes`, which Python keeps.
#[derive(Clone)]
pub struct RouteRef {
    pub index: usize,
    pub routes: Arc<Py<pyo3::types::PyTuple>>,
}

/// A request's session object, for jobs that run beside its phases (body chunks, WebSocket
/// messages): the first job the Python thread runs makes it or finds it here, so every job
/// of the request sees one object and one `ctx`. Only requests of an app with such hooks
/// have one.
pub type SharedSession = Arc<Mutex<Option<Py<PySession>>>>;

/// The engine side's handle on a request's Python session: the shared request slot, and the
/// Python object once the Python thread has made it (it is made lazily, on that thread).
pub struct SessionRef {
    pub py: Option<Py<PySession>>,
    /// Where the request's jobs meet their one object (see [`SharedSession`]).
    pub shared: Option<SharedSession>,
    pub req: RequestSlot,
    pub downstream: Arc<DownstreamDigest>,
    /// The upstream connection's facts as of this trip, for the session to show.
    pub upstream: Option<UpstreamDigest>,
    /// Chosen before any hook runs, so the first trip's are the request's.
    pub route: Option<RouteRef>,
    pub request_id: Option<http::HeaderValue>,
}

impl SessionRef {
    pub fn object(&mut self, py: Python<'_>) -> PyResult<Py<PySession>> {
        let Some(shared) = self.shared.clone() else {
            return self.own_object(py);
        };
        let mut cell = shared.lock();
        if self.py.is_none() {
            self.py = cell.as_ref().map(|session| session.clone_ref(py));
        }
        let session = self.own_object(py)?;
        if cell.is_none() {
            *cell = Some(session.clone_ref(py));
        }
        Ok(session)
    }

    fn own_object(&mut self, py: Python<'_>) -> PyResult<Py<PySession>> {
        if let Some(session) = &self.py {
            if self.upstream.is_some() || self.request_id.is_some() || self.route.is_some() {
                let mut session = session.borrow_mut(py);
                session.set_upstream(self.upstream);
                if let Some(id) = self.request_id.take() {
                    session.request_id = Some(id);
                }
                // The first trip's, when a stream job made the object before it.
                if let Some(route) = self.route.take() {
                    session.route.get_or_insert(route);
                }
            }
            return Ok(session.clone_ref(py));
        }
        let req = Py::new(
            py,
            PyRequestHeader::new(self.req.clone(), self.downstream.client_addr),
        )?;
        let session = Py::new(
            py,
            PySession {
                req,
                downstream: self.downstream.clone(),
                upstream: self.upstream,
                route: self.route.take(),
                request_id: self.request_id.take(),
                ctx: py.None(),
                reading: None,
                read_body: None,
            },
        )?;
        self.py = Some(session.clone_ref(py));
        Ok(session)
    }
}
