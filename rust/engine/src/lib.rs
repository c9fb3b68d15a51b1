//! ferroxy's proxy engine: an HTTP/1.1 + h2c server that runs a request through the
//! phases of a [`ProxyHttp`] implementation and forwards it to an upstream [`Peer`] over a
//! shared connection pool. Pure Rust: the Python layer is one implementation of the trait.

pub mod access_log;
pub mod body;
pub mod echo;
pub mod error;
pub mod forward;
pub mod peer;
pub mod phase;
pub mod proxy;
pub mod response;
pub mod server;
pub mod session;
pub mod upstream;

pub use access_log::{AccessLog, AccessLogFormat, AccessLogTarget};
pub use error::{Error, ErrorKind};
pub use peer::Peer;
pub use phase::ProxyHttp;
pub use response::Response;
pub use server::{Server, ServerConfig, ServerHandle};
pub use session::Session;
