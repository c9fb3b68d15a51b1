//! The downstream TLS acceptor: certificates chosen by the name the client asks for (SNI),
//! ALPN offering h2 and http/1.1, optional or required client certificates, and reloading
//! every file on demand without dropping a connection.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::digest::TlsDigest;

/// A certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Whether clients must present a certificate (mutual TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// Not asked for.
    #[default]
    None,
    /// Asked for; a client without one is served, one with a bad one is refused.
    Optional,
    /// A client without a certificate the CA signed is refused in the handshake.
    Required,
}

/// How a TLS listener is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Chosen by SNI against the names each certificate carries; the first is the default
    /// (clients that send no name, or one no certificate carries).
    pub certificates: Vec<CertificateFiles>,
    /// The CA bundle client certificates must chain to (needed unless `client_auth` is None).
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
    /// Longest a client may take to complete its handshake.
    pub handshake_timeout: Duration,
    /// The application protocols offered in ALPN: HTTP's by default; none for a TCP proxy,
    /// which must not agree to a protocol for whatever is behind it.
    pub alpn: Vec<Vec<u8>>,
}

impl TlsSettings {
    /// The engine's default handshake timeout: nginx's `ssl_handshake_timeout`.
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

    pub fn new(certificates: Vec<CertificateFiles>) -> Self {
        TlsSettings {
            certificates,
            client_ca: None,
            client_auth: ClientAuth::None,
            handshake_timeout: Self::DEFAULT_HANDSHAKE_TIMEOUT,
            alpn: Self::http_alpn(),
        }
    }

    /// What an HTTP listener offers: HTTP/2, then HTTP/1.1.
    pub fn http_alpn() -> Vec<Vec<u8>> {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    }
}

/// Accepts TLS connections with the certificates last loaded.
pub struct TlsAcceptor {
    settings: TlsSettings,
    config: ArcSwap<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Why a handshake did not complete.
#[derive(Debug)]
pub enum HandshakeError {
    TimedOut,
    /// rustls's error (bad certificate, no shared version, plain HTTP sent...) or the socket's.
    Failed(std::io::Error),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::TimedOut => f.write_str("TLS handshake timed out"),
            HandshakeError::Failed(e) => write!(f, "TLS handshake failed: {e}"),
        }
    }
}

impl TlsAcceptor {
    /// Loads every file now; errors name the file and say what is wrong with it.
    pub fn new(settings: TlsSettings) -> Result<Self, String> {
        let config = build(&settings)?;
        Ok(TlsAcceptor {
            settings,
            config: ArcSwap::from_pointee(config),
        })
    }

    /// Read the files again. New handshakes use them; connections already up keep theirs.
    /// On an error the certificates in use stay, and the error says why.
    pub fn reload(&self) -> Result<(), String> {
        let config = build(&self.settings)?;
        self.config.store(Arc::new(config));
        Ok(())
    }

    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// The handshake, within the handshake timeout, and what it settled.
    pub async fn accept(
        &self,
        stream: TcpStream,
    ) -> Result<(TlsStream<TcpStream>, TlsDigest), HandshakeError> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.load_full());
        let stream = tokio::time::timeout(self.settings.handshake_timeout, acceptor.accept(stream))
            .await
            .map_err(|_| HandshakeError::TimedOut)?
            .map_err(HandshakeError::Failed)?;
        let digest = digest_of(stream.get_ref().1);
        Ok((stream, digest))
    }
}

fn digest_of(conn: &rustls::ServerConnection) -> TlsDigest {
    TlsDigest {
        sni: conn.server_name().map(str::to_owned),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        client_certificates: conn
            .peer_certificates()
            .map(|chain| chain.iter().map(|c| c.as_ref().to_vec()).collect())
            .unwrap_or_default(),
        version: conn.protocol_version().and_then(version_name),
        cipher: conn
            .negotiated_cipher_suite()
            .and_then(|s| cipher_name(s.suite())),
    }
}

/// The version as nginx's `$ssl_protocol` and OpenSSL write it ("TLSv1.3"), not rustls's
/// enum name ("TLSv1_3").
fn version_name(version: rustls::ProtocolVersion) -> Option<&'static str> {
    match version {
        rustls::ProtocolVersion::TLSv1_3 => Some("TLSv1.3"),
        rustls::ProtocolVersion::TLSv1_2 => Some("TLSv1.2"),
        other => other.as_str(),
    }
}

/// The suite's IANA name, as OpenSSL and nginx give it for TLS 1.3 too ("TLS_AES_128_GCM_SHA256"
/// where rustls says "TLS13_AES_128_GCM_SHA256"); TLS 1.2 names are the same in both.
fn cipher_name(suite: rustls::CipherSuite) -> Option<&'static str> {
    use rustls::CipherSuite;
    match suite {
        CipherSuite::TLS13_AES_128_GCM_SHA256 => Some("TLS_AES_128_GCM_SHA256"),
        CipherSuite::TLS13_AES_256_GCM_SHA384 => Some("TLS_AES_256_GCM_SHA384"),
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => Some("TLS_CHACHA20_POLY1305_SHA256"),
        other => other.as_str(),
    }
}

fn build(settings: &TlsSettings) -> Result<rustls::ServerConfig, String> {
    if settings.certificates.is_empty() {
        return Err("a TLS listener needs at least one certificate".into());
    }
    let provider = super::provider();
    let mut choices = Vec::with_capacity(settings.certificates.len());
    for files in &settings.certificates {
        let chain = super::pem::certificates(&files.cert)?;
        let key = super::pem::private_key(&files.key)?;
        let names = names_in(&chain[0])
            .map_err(|e| format!("{}: cannot read the certificate: {e}", files.cert.display()))?;
        let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
            format!(
                "{} and {}: the key does not go with the certificate ({e})",
                files.cert.display(),
                files.key.display()
            )
        })?;
        choices.push((names, Arc::new(certified)));
    }
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(super::VERSIONS)
        .map_err(|e| e.to_string())?;
    let builder =
        match (settings.client_auth, &settings.client_ca) {
            (ClientAuth::None, _) => builder.with_no_client_auth(),
            (_, None) => return Err(
                "client_auth needs client_ca, the CA bundle to verify client certificates against"
                    .into(),
            ),
            (auth, Some(ca)) => {
                let roots = Arc::new(super::pem::roots(ca)?);
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
                let verifier = match auth {
                    ClientAuth::Optional => verifier.allow_unauthenticated(),
                    _ => verifier,
                };
                let verifier = verifier
                    .build()
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
    let mut config = builder.with_cert_resolver(Arc::new(ByServerName { choices }));
    config.alpn_protocols = settings.alpn.clone();
    Ok(config)
}

/// The DNS names a certificate is for: its subjectAltNames, or its common name when it has
/// none (as browsers no longer accept, but clients of a proxy may still send).
fn names_in(cert: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    Ok(names)
}

/// Picks the certificate for the name a client asks for: one that names it exactly, else one
/// whose wildcard covers it (`*.example.com` covers one label), else the first.
#[derive(Debug)]
struct ByServerName {
    choices: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl ByServerName {
    fn choose(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        if let Some(name) = server_name.map(str::to_ascii_lowercase) {
            let exact = self.choices.iter().find(|(names, _)| names.contains(&name));
            let wildcard = || {
                let parent = name.split_once('.')?.1;
                self.choices
                    .iter()
                    .find(|(names, _)| names.iter().any(|n| n.strip_prefix("*.") == Some(parent)))
            };
            if let Some((_, key)) = exact.or_else(wildcard) {
                return key.clone();
            }
        }
        self.choices[0].1.clone()
    }
}

impl ResolvesServerCert for ByServerName {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.choose(client_hello.server_name()))
    }
}

/// What a certificate says of its holder, read for `session.tls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    /// RFC 4514, e.g. `CN=alice,O=Example`.
    pub subject: String,
    pub issuer: String,
    /// DNS names, IP addresses, e-mail addresses and URIs, as written.
    pub sans: Vec<String>,
    /// Hex, upper case, colon separated (as openssl prints it).
    pub serial: String,
    /// Of the DER, lower-case hex without separators.
    pub sha256_fingerprint: String,
    /// The certificate in PEM.
    pub pem: String,
}

impl CertificateFacts {
    pub fn of(der: &[u8]) -> Result<Self, String> {
        use sha2::Digest;
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        let mut sans = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                        sans.push((*s).to_owned())
                    }
                    GeneralName::IPAddress(bytes) => {
                        let ip = match bytes.len() {
                            4 => <[u8; 4]>::try_from(*bytes).ok().map(std::net::IpAddr::from),
                            16 => <[u8; 16]>::try_from(*bytes)
                                .ok()
                                .map(std::net::IpAddr::from),
                            _ => None,
                        };
                        sans.extend(ip.map(|ip| ip.to_string()));
                    }
                    _ => {}
                }
            }
        }
        let fingerprint = sha2::Sha256::digest(der);
        Ok(CertificateFacts {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            sans,
            serial: cert.raw_serial_as_string().to_ascii_uppercase(),
            sha256_fingerprint: fingerprint.iter().map(|b| format!("{b:02x}")).collect(),
            pem: pem_of(der),
        })
    }
}

fn pem_of(der: &[u8]) -> String {
    use base64ct::{Base64, Encoding};
    let encoded = Base64::encode_string(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}
