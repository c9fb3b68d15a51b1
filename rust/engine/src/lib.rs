//! ferroxy's proxy engine: a server whose HTTP service (HTTP/1.1 + h2c) runs each request
//! through the phases of a [`ProxyHttp`] implementation and forwards it to an upstream
//! [`Peer`] over a shared connection pool. Pure Rust: the Python layer is one implementation
//! of the trait.
//!
//! Homes: `phase` (the trait), `proxy` (runs the phases), `access_log` (the per-request log), `session` and `digest` (one
//! request and its connections), `validate` (requests refused before any phase), `forward` (proxy header semantics), `body` (streaming),
//! `upstream` (peer connections and the pool), `peer`, `lb` (load balancing over backends), `filters` and `route` (declarative filters and routes, run between the phases), `path` (the canonical request path they match), `rules` (the two together, swapped whole by a reload), `error`, `server` with `listener`,
//! `service` and `http_service` (what runs and where it listens), `connection_filter` (which
//! connections are served at all) with `cidr` (the networks it and the filters match), `flood` (HTTP/2 control-frame
//! floods, watched on the client socket).

pub mod access_log;
pub mod body;
pub mod body_filter;
pub mod cidr;
pub mod client_conn;
pub mod compression;
pub mod connection_filter;
pub mod digest;
pub mod error;
pub mod filters;
pub mod flood;
pub mod forward;
pub mod grpc;
pub mod http_service;
pub mod lb;
pub mod listener;
pub mod path;
pub mod peer;
pub mod phase;
pub mod proxy;
pub mod proxy_protocol;
pub mod response;
pub mod retry;
pub mod route;
pub mod rules;
pub mod server;
pub mod service;
pub mod session;
pub mod simulate;
pub mod tcp_proxy;
pub mod tls;
pub mod upgrade;
pub mod upstream;
pub mod validate;
pub mod websocket;

pub use access_log::{AccessLog, AccessLogFormat, AccessLogTarget};
pub use connection_filter::{ConnectionFilter, IpAccess};
pub use digest::{DownstreamDigest, Scheme, TlsDigest, UpstreamDigest};
pub use error::{Error, ErrorKind, ErrorSide};
pub use listener::Listener;
pub use peer::{Peer, PeerKey, UpstreamProtocol};
pub use phase::ProxyHttp;
pub use response::Response;
pub use rules::{Routes, Rules, RulesHandle};
pub use server::{BackgroundStop, Server, ServerConfig, ServerHandle};
pub use session::Session;
