//! `ferroxy._core`: the thin pyo3 layer over the ferroxy engine. It implements the engine's
//! phase trait by handing phases to the Python thread, and exposes the types hooks see.

mod alloc;
#[cfg(feature = "bridge-bench")]
mod bench;
mod body_read;
mod bridge;
mod call;
mod compression;
mod connection_filter;
mod echo;
mod filters;
mod headers;
mod lb;
mod logs;
mod proxy;
mod server;
mod session;
mod simulate;
mod stream;
mod tcp;
mod tls;
mod types;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use ferroxy_engine::peer::PeerTimeouts;
use ferroxy_engine::phase::HOOK_NAMES;
use ferroxy_engine::{AccessLogFormat, AccessLogTarget, ServerConfig};

#[global_allocator]
static ALLOCATOR: alloc::Mimalloc = alloc::Mimalloc;

/// Lowest Python logging level the engine forwards (the `ferroxy` logger's effective level).
#[pyfunction]
fn set_log_level(level: i32) {
    logs::set_threshold(level);
}

/// The engine's defaults, by the keyword that sets each in `Server(...)` or `Peer(...)`:
/// Python reads them from here rather than stating them again.
fn defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let server = ServerConfig::default();
    let peer = PeerTimeouts::default();
    let defaults = PyDict::new(py);
    defaults.set_item("listen", server.listeners[0].to_string())?;
    defaults.set_item("access_log", AccessLogTarget::default().spec())?;
    defaults.set_item("access_log_format", AccessLogFormat::DEFAULT_NAME)?;
    defaults.set_item("threads", server.threads)?;
    defaults.set_item("grace_period", server.grace_period.as_secs_f64())?;
    defaults.set_item(
        "client_read_timeout",
        server.client_read_timeout.as_secs_f64(),
    )?;
    defaults.set_item(
        "client_write_timeout",
        server.client_write_timeout.as_secs_f64(),
    )?;
    defaults.set_item("keepalive_timeout", server.keepalive_timeout.as_secs_f64())?;
    defaults.set_item(
        "tunnel_idle_timeout",
        server.tunnel_idle_timeout.as_secs_f64(),
    )?;
    defaults.set_item("pool_idle_timeout", server.pool.idle_timeout.as_secs_f64())?;
    defaults.set_item("pool_max_idle_per_peer", server.pool.max_idle_per_peer)?;
    defaults.set_item("connect_timeout", peer.connect.as_secs_f64())?;
    defaults.set_item("read_timeout", peer.read.as_secs_f64())?;
    defaults.set_item("write_timeout", peer.write.as_secs_f64())?;
    defaults.set_item("idle_timeout", peer.idle.as_secs_f64())?;
    defaults.set_item("compression", compression::defaults(py)?)?;
    let tcp = ferroxy_engine::tcp_proxy::TcpProxyConfig::DEFAULT_IDLE_TIMEOUT;
    defaults.set_item("tcp_idle_timeout", tcp.as_secs_f64())?;
    defaults.set_item(
        "tcp_connect_tries",
        ferroxy_engine::tcp_proxy::TcpProxyConfig::DEFAULT_CONNECT_TRIES,
    )?;
    Ok(defaults)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    logs::install();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(set_log_level, m)?)?;
    m.add_function(wrap_pyfunction!(filters::check_filter, m)?)?;
    m.add_function(wrap_pyfunction!(filters::check_condition, m)?)?;
    m.add_function(wrap_pyfunction!(filters::check_route, m)?)?;
    m.add_function(wrap_pyfunction!(connection_filter::check_ip_access, m)?)?;
    m.add_function(wrap_pyfunction!(call::step, m)?)?;
    m.add("HOOK_NAMES", PyTuple::new(m.py(), HOOK_NAMES)?)?;
    m.add("DEFAULTS", defaults(m.py())?)?;
    m.add(
        "REQUEST_STEPS",
        PyTuple::new(m.py(), call::RequestSteps::NAMES)?,
    )?;
    m.add_class::<headers::Headers>()?;
    // A mapping to isinstance() and to the libraries that check for one.
    m.py()
        .import("collections.abc")?
        .getattr("MutableMapping")?
        .call_method1("register", (m.py().get_type::<headers::Headers>(),))?;
    m.add_class::<types::PyPeer>()?;
    m.add_class::<lb::PyLoadBalancer>()?;
    m.add_class::<lb::PyHealthCheck>()?;
    m.add_class::<types::PyResponse>()?;
    m.add_class::<types::PyProxyError>()?;
    m.add_class::<session::PyRequestHeader>()?;
    m.add_class::<session::PyResponseHeader>()?;
    m.add_class::<session::PySession>()?;
    m.add_class::<session::ClientConn>()?;
    m.add_class::<session::ServerConn>()?;
    m.add_class::<tls::TlsInfo>()?;
    m.add_class::<tls::ClientCert>()?;
    m.add_class::<call::Call>()?;
    m.add_class::<connection_filter::ConnectionCall>()?;
    m.add_class::<stream::StreamCall>()?;
    m.add(
        "RequestBodyError",
        m.py().get_type::<body_read::RequestBodyError>(),
    )?;
    m.add_class::<server::PyServer>()?;
    m.add_class::<simulate::Simulation>()?;
    m.add_class::<simulate::SimulationResult>()?;
    m.add_class::<echo::PyEchoUpstream>()?;
    m.add_class::<tcp::PyTcpServer>()?;
    m.add_class::<tcp::TcpPeerCall>()?;
    m.add_class::<tcp::PyTcpEchoUpstream>()?;
    Ok(())
}
