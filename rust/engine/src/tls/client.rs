//! TLS to upstreams: the settings a peer is given (verification, SNI, CA, client
//! certificate, ALPN), the rustls `ClientConfig` they make (built once per distinct setting,
//! whatever the number of peers, requests or connections), the handshake, and a message
//! saying what failed when it does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Which protocols to offer by ALPN (over TLS), or to speak (cleartext: only one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Alpn {
    #[default]
    Http1,
    Http2,
    /// Offer both, h2 preferred: the server picks.
    Http2OrHttp1,
}

impl Alpn {
    /// `"h1"`, `"h2"` or `"h2,h1"` (spaces around the comma allowed).
    pub fn parse(text: &str) -> Result<Alpn, String> {
        let names: Vec<&str> = text.split(',').map(str::trim).collect();
        match names.as_slice() {
            ["h1"] => Ok(Alpn::Http1),
            ["h2"] => Ok(Alpn::Http2),
            ["h2", "h1"] => Ok(Alpn::Http2OrHttp1),
            _ => Err(format!(
                "expected \"h1\", \"h2\" or \"h2,h1\", got {text:?}"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Alpn::Http1 => "h1",
            Alpn::Http2 => "h2",
            Alpn::Http2OrHttp1 => "h2,h1",
        }
    }

    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::Http1 => vec![b"http/1.1".to_vec()],
            Alpn::Http2 => vec![b"h2".to_vec()],
            Alpn::Http2OrHttp1 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        }
    }
}

/// What a user asks for (Python's `Peer(tls=True, ...)` keywords).
#[derive(Debug, Clone)]
pub struct TlsOptions {
    /// None: the host of the address when it is a name; `Some("")`: send none.
    pub sni: Option<String>,
    pub verify_cert: bool,
    pub verify_hostname: bool,
    /// Replaces the built-in webpki roots.
    pub ca: Option<PathBuf>,
    /// Certificate chain and private key, presented when the upstream asks for one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub alpn: Alpn,
}

impl Default for TlsOptions {
    fn default() -> Self {
        TlsOptions {
            sni: None,
            verify_cert: true,
            verify_hostname: true,
            ca: None,
            client_cert: None,
            alpn: Alpn::Http1,
        }
    }
}

/// A bad option: which one, and why (Python prefixes `Peer.`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptionError {
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for TlsOptionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A file a config was built from, named by its path and its contents' digest: the same
/// path with other contents (a renewed certificate) is another setting.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LoadedFile {
    path: PathBuf,
    sha256: [u8; 32],
}

impl LoadedFile {
    fn read(field: &'static str, path: &Path) -> Result<LoadedFile, TlsOptionError> {
        let contents = std::fs::read(path).map_err(|e| TlsOptionError {
            field,
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        Ok(LoadedFile {
            path: path.to_owned(),
            sha256: Sha256::digest(&contents).into(),
        })
    }
}

/// Everything that shapes a `ClientConfig` (the server name does not: it is per connection).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ConfigSettings {
    verify_cert: bool,
    verify_hostname: bool,
    send_sni: bool,
    ca: Option<LoadedFile>,
    client_cert: Option<(LoadedFile, LoadedFile)>,
    alpn: Alpn,
}

/// A peer's upstream TLS: the settings (compared and hashed for the pool key) and the
/// config they make, shared with every other peer of the same settings.
#[derive(Debug)]
pub struct UpstreamTls {
    settings: ConfigSettings,
    /// The name the certificate is checked against, and sent as SNI unless `send_sni` is off
    /// (rustls never sends an IP address as SNI).
    server_name: ServerName<'static>,
    sni: Option<String>,
    config: Arc<ClientConfig>,
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings && self.server_name == other.server_name
    }
}

impl Eq for UpstreamTls {}

impl std::hash::Hash for UpstreamTls {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.settings.hash(state);
        self.server_name.hash(state);
    }
}

impl UpstreamTls {
    /// Reads the files `options` names (so a bad path fails now, at start-up) and finds or
    /// builds the config. `host` is the address's host part (brackets of IPv6 removed).
    pub fn new(options: &TlsOptions, host: &str) -> Result<Arc<UpstreamTls>, TlsOptionError> {
        let (server_name, send_sni) = match options.sni.as_deref() {
            None => (host_name(host, "addr")?, true),
            Some("") => (host_name(host, "addr")?, false),
            Some(sni) => (host_name(sni, "sni")?, true),
        };
        let ca = options
            .ca
            .as_deref()
            .map(|path| LoadedFile::read("ca", path))
            .transpose()?;
        let client_cert = options
            .client_cert
            .as_ref()
            .map(|(cert, key)| {
                Ok::<_, TlsOptionError>((
                    LoadedFile::read("client_cert", cert)?,
                    LoadedFile::read("client_cert", key)?,
                ))
            })
            .transpose()?;
        let settings = ConfigSettings {
            verify_cert: options.verify_cert,
            verify_hostname: options.verify_hostname,
            send_sni,
            ca,
            client_cert,
            alpn: options.alpn,
        };
        Ok(Arc::new(UpstreamTls {
            config: cached_config(&settings)?,
            settings,
            sni: options.sni.clone(),
            server_name,
        }))
    }

    pub fn alpn(&self) -> Alpn {
        self.settings.alpn
    }

    /// As given: None for the default (the address's host).
    pub fn sni(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    pub fn verify_cert(&self) -> bool {
        self.settings.verify_cert
    }

    pub fn verify_hostname(&self) -> bool {
        self.settings.verify_hostname
    }

    pub fn ca(&self) -> Option<&Path> {
        self.settings.ca.as_ref().map(|f| f.path.as_path())
    }

    pub fn client_cert(&self) -> Option<(&Path, &Path)> {
        self.settings
            .client_cert
            .as_ref()
            .map(|(c, k)| (c.path.as_path(), k.path.as_path()))
    }

    /// The handshake over `stream`; the error message says what failed.
    pub async fn connect(&self, stream: TcpStream) -> Result<TlsStream<TcpStream>, String> {
        TlsConnector::from(self.config.clone())
            .connect(self.server_name.clone(), stream)
            .await
            .map_err(|e| self.describe_failure(&e))
    }

    fn describe_failure(&self, error: &std::io::Error) -> String {
        let name = match &self.server_name {
            ServerName::DnsName(name) => name.as_ref().to_owned(),
            ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
            other => format!("{other:?}"),
        };
        let rustls_error = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        let what = match rustls_error {
            Some(rustls::Error::InvalidCertificate(certificate)) => match certificate {
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    format!("wrong hostname: the upstream's certificate is not valid for {name:?}")
                }
                CertificateError::UnknownIssuer => {
                    "unknown CA: the upstream's certificate is not signed by a trusted CA".into()
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "expired: the upstream's certificate has expired".into()
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "not yet valid: the upstream's certificate is not valid yet".into()
                }
                other => format!("invalid upstream certificate: {other:?}"),
            },
            Some(other) => other.to_string(),
            None => error.to_string(),
        };
        format!("TLS handshake with {name} failed: {what}")
    }
}

fn host_name(host: &str, field: &'static str) -> Result<ServerName<'static>, TlsOptionError> {
    ServerName::try_from(host.to_owned()).map_err(|e| TlsOptionError {
        field,
        message: format!("{host:?} is not a valid server name: {e}"),
    })
}

/// One config per distinct setting for the process's life: peers made per request (in a
/// hook) reuse it rather than build one (parsing the CA bundle, the key) each time.
fn cached_config(settings: &ConfigSettings) -> Result<Arc<ClientConfig>, TlsOptionError> {
    static CONFIGS: OnceLock<Mutex<HashMap<ConfigSettings, Arc<ClientConfig>>>> = OnceLock::new();
    let configs = CONFIGS.get_or_init(Default::default);
    if let Some(config) = configs.lock().get(settings) {
        return Ok(config.clone());
    }
    let config = Arc::new(build_config(settings)?);
    Ok(configs
        .lock()
        .entry(settings.clone())
        .or_insert(config)
        .clone())
}

fn build_config(settings: &ConfigSettings) -> Result<ClientConfig, TlsOptionError> {
    let roots = match &settings.ca {
        Some(ca) => super::pem::roots(&ca.path).map_err(|message| TlsOptionError {
            field: "ca",
            message,
        })?,
        None => RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    };
    let provider = super::provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(super::VERSIONS)
        .map_err(|e| TlsOptionError {
            field: "tls",
            message: e.to_string(),
        })?;
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsOptionError {
            field: "ca",
            message: e.to_string(),
        })?;
    let builder = match (settings.verify_cert, settings.verify_hostname) {
        (true, true) => builder.with_webpki_verifier(webpki),
        (true, false) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki))),
        (false, _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider))),
    };
    let mut config = match &settings.client_cert {
        Some((cert, key)) => {
            let chain = super::pem::certificates(&cert.path).map_err(|message| TlsOptionError {
                field: "client_cert",
                message,
            })?;
            let key = super::pem::private_key(&key.path).map_err(|message| TlsOptionError {
                field: "client_cert",
                message,
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsOptionError {
                    field: "client_cert",
                    message: format!("the key does not go with the certificate: {e}"),
                })?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = settings.alpn.protocols();
    config.enable_sni = settings.send_sni;
    Ok(config)
}

/// `verify_hostname=False`: the chain must still lead to a trusted root (and be in date), but
/// the certificate may name another host, as with upstreams reached by an address their
/// certificate does not list. Uses rustls's `danger` API because rustls has no such switch:
/// everything but the name check is webpki's own.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `verify_cert=False`: any certificate is accepted (encryption without authentication, for
/// self-signed upstreams on a trusted network). Needs rustls's `danger` API, which is what
/// it is for. The handshake's signatures are still checked, so the server must hold the key
/// of the certificate it shows.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_alpn() {
        assert_eq!(Alpn::parse("h2").unwrap(), Alpn::Http2);
        assert_eq!(Alpn::parse("h1").unwrap(), Alpn::Http1);
        assert_eq!(Alpn::parse("h2, h1").unwrap(), Alpn::Http2OrHttp1);
        assert!(Alpn::parse("h3").is_err());
        assert!(Alpn::parse("h1,h2").is_err());
    }

    #[test]
    fn equal_settings_share_one_config_and_files_are_read_at_once() {
        let a = UpstreamTls::new(&TlsOptions::default(), "example.com").unwrap();
        let b = UpstreamTls::new(&TlsOptions::default(), "example.com").unwrap();
        assert!(Arc::ptr_eq(&a.config, &b.config));
        assert_eq!(a, b);
        let other_name = UpstreamTls::new(&TlsOptions::default(), "example.org").unwrap();
        assert!(Arc::ptr_eq(&a.config, &other_name.config));
        assert_ne!(a, other_name);

        let missing = TlsOptions {
            ca: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let error = UpstreamTls::new(&missing, "example.com").unwrap_err();
        assert_eq!(error.field, "ca");
        assert!(
            error.message.contains("cannot read /nonexistent/ca.pem"),
            "{error}"
        );
    }
}
