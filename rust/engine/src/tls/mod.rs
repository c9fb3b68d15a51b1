//! TLS with rustls, on both sides: the downstream acceptor (`server`: certificates chosen by
//! SNI, client certificates, reload) and what they share (`pem`: reading certificate and key
//! files; the crypto provider and protocol versions).
//!
//! One provider for the whole engine, ring, and only TLS 1.2 and 1.3 with rustls's default
//! cipher suites (all AEAD, forward secret): nothing older can be turned on.

pub mod client;
pub mod pem;
pub mod server;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The provider every TLS config of the engine is built with (not the process default, which
/// another library in the same process could install differently).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// TLS 1.2 and 1.3, the versions both sides accept.
pub const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];
