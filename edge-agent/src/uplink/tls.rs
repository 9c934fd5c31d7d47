//! The agent's TLS identity: the bundle `its-aggregator device enroll` writes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use its_hostio::tls::{TlsFileError, pem_certificates};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocol id of the uplink (the aggregator requires the same).
pub const ALPN: &[u8] = b"its-uplink/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// `device.pem`, `device.key` and `ca.pem` in one directory.
#[derive(Debug, Clone)]
pub struct DeviceBundle {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl DeviceBundle {
    pub fn in_dir(dir: &Path) -> Self {
        Self { cert: dir.join("device.pem"), key: dir.join("device.key"), ca: dir.join("ca.pem") }
    }

    /// Missing files, for configuration checks.
    pub fn missing(&self) -> Vec<PathBuf> {
        [&self.cert, &self.key, &self.ca].into_iter().filter(|p| !p.is_file()).cloned().collect()
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    pem_certificates(path).map_err(|e| match e {
        TlsFileError::Read { source, .. } => TlsError::File { path: path.to_path_buf(), message: source.to_string() },
        TlsFileError::Empty { .. } => {
            TlsError::File { path: path.to_path_buf(), message: "no certificate in file".into() }
        }
        other => TlsError::Config(other.to_string()),
    })
}

/// The client configuration: trusts only the fleet CA, presents the device certificate.
pub fn client_config(bundle: &DeviceBundle) -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&bundle.ca)? {
        roots.add(c).map_err(|e| TlsError::Config(e.to_string()))?;
    }
    let key = PrivateKeyDer::from_pem_file(&bundle.key)
        .map_err(|e| TlsError::File { path: bundle.key.clone(), message: e.to_string() })?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs(&bundle.cert)?, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}
