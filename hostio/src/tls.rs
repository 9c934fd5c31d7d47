//! TLS trust from PEM files, and the client configuration of an MQTT-over-TLS client.
//!
//! The crypto provider is always aws-lc-rs, passed explicitly (the process-wide default may be
//! unset, or set by another library).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Why a PEM file gave no usable certificates or TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    /// The file could not be read, or holds malformed PEM.
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate of the file cannot be a trust anchor.
    #[error("{}: unusable CA certificate", path.display())]
    Unusable {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// The file holds no certificate.
    #[error("{}: no certificate in file", path.display())]
    Empty { path: PathBuf },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
}

/// Every certificate of the PEM file `path`, in file order; an error if there is none.
pub fn pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let read = |source| TlsFileError::Read { path: path.to_path_buf(), source };
    let certs = CertificateDer::pem_file_iter(path).map_err(read)?.collect::<Result<Vec<_>, _>>().map_err(read)?;
    if certs.is_empty() {
        return Err(TlsFileError::Empty { path: path.to_path_buf() });
    }
    Ok(certs)
}

/// The trust anchors of the CA PEM file `ca`: every certificate in it; an error if there is none.
pub fn root_store_from_pem(ca: &Path) -> Result<rustls::RootCertStore, TlsFileError> {
    let read = |source| TlsFileError::Read { path: ca.to_path_buf(), source };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(read)? {
        roots.add(cert.map_err(read)?).map_err(|source| TlsFileError::Unusable { path: ca.to_path_buf(), source })?;
    }
    if roots.is_empty() {
        return Err(TlsFileError::Empty { path: ca.to_path_buf() });
    }
    Ok(roots)
}

/// The client configuration of an MQTT-over-TLS client: trusts only the CA(s) in the PEM file
/// `ca`, presents no client certificate (the broker authenticates with username and password),
/// and offers rustls's safe default protocol versions.
pub fn mqtt_client_config(ca: &Path) -> Result<rustls::ClientConfig, TlsFileError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let roots = root_store_from_pem(ca)?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsFileError::Config)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    fn ca_pem() -> String {
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate").cert.pem()
    }

    #[test]
    fn a_ca_file_gives_its_certificates_and_a_client_configuration() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = write(dir.path(), "ca.pem", &format!("{}{}", ca_pem(), ca_pem()));
        assert_eq!(pem_certificates(&ca).expect("certificates").len(), 2);
        assert_eq!(root_store_from_pem(&ca).expect("roots").len(), 2);
        let cfg = mqtt_client_config(&ca).expect("client configuration");
        assert!(!cfg.client_auth_cert_resolver.has_certs(), "no client certificate");
    }

    #[test]
    fn a_file_without_certificates_is_refused_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = write(dir.path(), "empty.pem", "not a certificate\n");
        for err in [pem_certificates(&empty).expect_err("empty"), root_store_from_pem(&empty).expect_err("empty")] {
            assert!(matches!(err, TlsFileError::Empty { .. }), "{err:?}");
            assert_eq!(err.to_string(), format!("{}: no certificate in file", empty.display()));
        }
    }

    #[test]
    fn a_missing_file_is_a_read_error_with_its_path() {
        let err = mqtt_client_config(Path::new("/nonexistent/ca.pem")).expect_err("missing");
        assert!(matches!(err, TlsFileError::Read { .. }), "{err:?}");
        assert_eq!(err.to_string(), "reading /nonexistent/ca.pem");
        assert!(std::error::Error::source(&err).is_some(), "the cause is kept");
    }
}
