//! TLS settings from Python (`ferroxy.TlsConfig`, read once at start-up into the engine's
//! acceptor), and what a handshake settled, as `session.tls` shows it.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use ferroxy_engine::tls::server::{
    CertificateFacts, CertificateFiles, ClientAuth, TlsAcceptor, TlsSettings,
};
use ferroxy_engine::TlsDigest;

use crate::types::positive_seconds;

/// `tls`: a `TlsConfig` or a list of them (chosen by SNI, the first the default; the
/// client-certificate settings and handshake timeout are the first one's). Files are read now:
/// errors name the field and the file.
pub fn acceptor_from(tls: &Bound<'_, PyAny>) -> PyResult<Arc<TlsAcceptor>> {
    acceptor_offering(tls, TlsSettings::http_alpn())
}

/// [`acceptor_from`] offering `alpn` (none for a TCP proxy).
pub fn acceptor_offering(tls: &Bound<'_, PyAny>, alpn: Vec<Vec<u8>>) -> PyResult<Arc<TlsAcceptor>> {
    let configs: Vec<Bound<'_, PyAny>> = if tls.hasattr("cert")? {
        vec![tls.clone()]
    } else {
        tls.try_iter()
            .and_then(|items| items.collect::<PyResult<_>>())
            .map_err(|_| PyTypeError::new_err("tls must be a TlsConfig or a list of them"))?
    };
    let Some(first) = configs.first() else {
        return Err(PyValueError::new_err(
            "tls: an empty list (give at least one TlsConfig)",
        ));
    };
    // One listener has one client-certificate policy: a later entry that asks for another
    // would otherwise be ignored, and fail open.
    for (i, config) in configs.iter().enumerate().skip(1) {
        for field in ["client_ca", "client_auth", "handshake_timeout"] {
            if !config.getattr(field)?.eq(first.getattr(field)?)? {
                return Err(PyValueError::new_err(format!(
                    "tls[{i}].{field}: every TlsConfig of one listener shares the first one's \
                     {field} (set it the same on each)"
                )));
            }
        }
    }
    let mut certificates = Vec::with_capacity(configs.len());
    for config in &configs {
        certificates.push(CertificateFiles {
            cert: field(config, "cert", "a path")?,
            key: field(config, "key", "a path")?,
        });
    }
    let client_ca: Option<PathBuf> = field(first, "client_ca", "a path or None")?;
    let client_auth: String = field(first, "client_auth", "a string")?;
    let client_auth = match client_auth.as_str() {
        "none" => ClientAuth::None,
        "optional" => ClientAuth::Optional,
        "required" => ClientAuth::Required,
        other => {
            return Err(PyValueError::new_err(format!(
            "TlsConfig.client_auth must be \"none\", \"optional\" or \"required\", got {other:?}"
        )))
        }
    };
    if client_auth != ClientAuth::None && client_ca.is_none() {
        return Err(PyValueError::new_err(
            "TlsConfig.client_ca: client_auth needs the CA bundle client certificates must chain to",
        ));
    }
    let handshake_timeout = positive_seconds(
        "TlsConfig.handshake_timeout",
        field(first, "handshake_timeout", "a number of seconds or None")?,
    )?
    .unwrap_or(TlsSettings::DEFAULT_HANDSHAKE_TIMEOUT);
    let settings = TlsSettings {
        certificates,
        client_ca,
        client_auth,
        handshake_timeout,
        alpn,
    };
    TlsAcceptor::new(settings)
        .map(Arc::new)
        .map_err(|e| PyValueError::new_err(format!("tls: {e}")))
}

/// `config.name` as a `T`, or a TypeError naming the field and what it must be.
fn field<'py, T: FromPyObjectOwned<'py>>(
    config: &Bound<'py, PyAny>,
    name: &str,
    must_be: &str,
) -> PyResult<T> {
    let value = config.getattr(name)?;
    value.extract().map_err(|_| {
        let given = value
            .get_type()
            .name()
            .map_or_else(|_| "?".to_owned(), |n| n.to_string());
        PyTypeError::new_err(format!("TlsConfig.{name} must be {must_be}, got {given}"))
    })
}

/// What the client's TLS handshake settled (`session.tls`; None on a plain connection).
#[pyclass(name = "TlsInfo", module = "ferroxy", frozen)]
pub struct TlsInfo {
    pub digest: Arc<ferroxy_engine::DownstreamDigest>,
}

impl TlsInfo {
    fn tls(&self) -> &TlsDigest {
        self.digest
            .tls
            .as_ref()
            .expect("TlsInfo is made for TLS connections only")
    }
}

#[pymethods]
impl TlsInfo {
    /// "TLSv1.3" or "TLSv1.2".
    #[getter]
    fn version(&self) -> Option<&'static str> {
        self.tls().version
    }
    /// The suite's IANA name, e.g. "TLS_AES_256_GCM_SHA384".
    #[getter]
    fn cipher(&self) -> Option<&'static str> {
        self.tls().cipher
    }
    /// The protocol ALPN settled on: "h2" or "http/1.1".
    #[getter]
    fn alpn(&self) -> Option<String> {
        self.tls().alpn_text()
    }
    /// The server name the client asked for.
    #[getter]
    fn sni(&self) -> Option<String> {
        self.tls().sni.clone()
    }
    /// The client's verified certificate (mutual TLS), or None.
    #[getter]
    fn client_cert(&self) -> PyResult<Option<ClientCert>> {
        let Some(leaf) = self.tls().client_certificates.first() else {
            return Ok(None);
        };
        CertificateFacts::of(leaf)
            .map(|facts| Some(ClientCert { facts }))
            .map_err(|e| PyValueError::new_err(format!("client certificate: {e}")))
    }
    fn __repr__(&self) -> String {
        let tls = self.tls();
        format!(
            "TlsInfo(version={:?}, sni={:?}, alpn={:?})",
            tls.version.unwrap_or(""),
            tls.sni.as_deref().unwrap_or(""),
            self.alpn().unwrap_or_default()
        )
    }
}

/// A client certificate's facts.
#[pyclass(name = "ClientCert", module = "ferroxy", frozen)]
pub struct ClientCert {
    facts: CertificateFacts,
}

#[pymethods]
impl ClientCert {
    /// RFC 4514, e.g. "CN=alice,O=Example".
    #[getter]
    fn subject(&self) -> &str {
        &self.facts.subject
    }
    #[getter]
    fn issuer(&self) -> &str {
        &self.facts.issuer
    }
    /// Subject alternative names: DNS names, IP addresses, e-mail addresses, URIs.
    #[getter]
    fn sans(&self) -> Vec<String> {
        self.facts.sans.clone()
    }
    /// Hex, colon separated, as openssl prints it.
    #[getter]
    fn serial(&self) -> &str {
        &self.facts.serial
    }
    /// SHA-256 of the DER, lower-case hex.
    #[getter]
    fn sha256_fingerprint(&self) -> &str {
        &self.facts.sha256_fingerprint
    }
    #[getter]
    fn pem(&self) -> &str {
        &self.facts.pem
    }
    fn __repr__(&self) -> String {
        format!("ClientCert(subject={:?})", self.facts.subject)
    }
}
