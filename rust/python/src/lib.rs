//! `ferroxy._core`: the thin pyo3 layer over the ferroxy engine. It implements the engine's
//! phase trait by handing phases to the Python thread, and exposes the types hooks see.

mod bench;
mod bridge;
mod call;
mod echo;
mod headers;
mod http;
mod logs;
mod proxy;
mod server;
mod simulate;
mod types;

use pyo3::prelude::*;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Lowest Python logging level the engine forwards (the `ferroxy` logger's effective level).
#[pyfunction]
fn set_log_level(level: i32) {
    logs::set_threshold(level);
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    logs::install();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(set_log_level, m)?)?;
    m.add_class::<headers::Headers>()?;
    m.add_class::<types::PyPeer>()?;
    m.add_class::<types::PyResponse>()?;
    m.add_class::<types::PyProxyError>()?;
    m.add_class::<http::PyRequestHeader>()?;
    m.add_class::<http::PyResponseHeader>()?;
    m.add_class::<http::PySession>()?;
    m.add_class::<http::ClientConn>()?;
    m.add_class::<http::ServerConn>()?;
    m.add_class::<call::Call>()?;
    m.add_class::<server::PyServer>()?;
    m.add_class::<simulate::Simulation>()?;
    m.add_class::<simulate::SimulationResult>()?;
    m.add_class::<echo::PyEchoUpstream>()?;
    Ok(())
}
