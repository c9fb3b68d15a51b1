//! Reading PEM files: certificate chains, private keys, CA bundles. Every error names the file
//! and says what was wrong with it, since it reaches the user as a start-up error (or, on a
//! reload, as the log line saying why the old certificate was kept).

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

/// The certificates in `path`, in file order (a chain: leaf first). At least one.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let named = |e: rustls::pki_types::pem::Error| format!("{}: {}", path.display(), describe(e));
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(named)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(named)?;
    if certificates.is_empty() {
        return Err(format!(
            "{}: no certificate in it (expected a PEM \"BEGIN CERTIFICATE\" block)",
            path.display()
        ));
    }
    Ok(certificates)
}

/// The first private key in `path` (PKCS#8, PKCS#1 RSA or SEC1 EC).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "{}: no private key in it (expected a PEM \"BEGIN PRIVATE KEY\" block)",
            path.display()
        ),
        e => format!("{}: {}", path.display(), describe(e)),
    })
}

/// The CA certificates in `path`, as roots to verify peers against.
pub fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(path)? {
        roots
            .add(certificate)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

fn describe(error: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match error {
        Error::Io(e) => e.to_string(),
        Error::NoItemsFound => "nothing in PEM format in it".into(),
        e => format!("not valid PEM ({e:?})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn reads_a_certificate_and_its_key_and_names_bad_files() {
        let dir = std::env::temp_dir().join(format!("ferroxy-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = write(&dir, "cert.pem", &made.cert.pem());
        let key = write(&dir, "key.pem", &made.signing_key.serialize_pem());
        assert_eq!(certificates(&cert).unwrap().len(), 1);
        assert!(private_key(&key).is_ok());
        assert_eq!(roots(&cert).unwrap().len(), 1);

        let missing = dir.join("missing.pem");
        assert!(certificates(&missing).unwrap_err().contains("missing.pem"));
        let error = private_key(&cert).unwrap_err();
        assert!(
            error.contains("cert.pem") && error.contains("private key"),
            "{error}"
        );
        let error = certificates(&key).unwrap_err();
        assert!(
            error.contains("key.pem") && error.contains("no certificate"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
