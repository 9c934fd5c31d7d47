//! Serving certificates from PEM files (`[http] tls_cert`/`tls_key`, the MQTT front's listener):
//! loading and checking the chain and key, and [`ReloadingCert`], which swaps them in place when
//! the files change, so a renewed certificate needs no restart.
//!
//! Dependencies: none inside the crate (a leaf); the HTTP API and the MQTT front both use it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

/// How often the certificate files are read and compared with what is served.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// The PEM files of the HTTPS certificate: the chain (leaf first) and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate or key file that cannot be used. [`TlsFileError::field`] says which setting.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsFileError {
    #[error("certificate {}: {message}", path.display())]
    Cert { path: PathBuf, message: String },
    #[error("private key {}: {message}", path.display())]
    Key { path: PathBuf, message: String },
}

impl TlsFileError {
    /// The `[http]` key the problem belongs to: `tls_cert` or `tls_key`.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Cert { .. } => "tls_cert",
            Self::Key { .. } => "tls_key",
        }
    }

    /// The message without the file kind (the configuration path says it).
    pub fn detail(&self) -> String {
        match self {
            Self::Cert { path, message } | Self::Key { path, message } => format!("{}: {message}", path.display()),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The certificate chain in a PEM file (at least one certificate, the leaf first).
pub fn load_cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    parse_cert_chain(path, &read(path))
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1), as a signing key.
pub fn load_signing_key(path: &Path) -> Result<Arc<dyn rustls::sign::SigningKey>, TlsFileError> {
    parse_signing_key(path, &read(path))
}

/// A file's contents, or why it cannot be read.
type Pem = Result<Vec<u8>, String>;

fn read(path: &Path) -> Pem {
    std::fs::read(path).map_err(|e| e.to_string())
}

fn parse_cert_chain(path: &Path, pem: &Pem) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let err = |message: String| TlsFileError::Cert { path: path.to_path_buf(), message };
    let pem = pem.as_ref().map_err(|e| err(e.clone()))?;
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not a PEM certificate file: {e}")))?;
    if chain.is_empty() {
        return Err(err("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into()));
    }
    for (i, der) in chain.iter().enumerate() {
        x509_parser::parse_x509_certificate(der)
            .map_err(|e| err(format!("certificate {} of the chain does not parse: {e}", i + 1)))?;
    }
    Ok(chain)
}

fn parse_signing_key(path: &Path, pem: &Pem) -> Result<Arc<dyn rustls::sign::SigningKey>, TlsFileError> {
    let err = |message: String| TlsFileError::Key { path: path.to_path_buf(), message };
    let pem = pem.as_ref().map_err(|e| err(e.clone()))?;
    let der = PrivateKeyDer::from_pem_slice(pem).map_err(|e| err(format!("no PEM private key in it: {e}")))?;
    provider().key_provider.load_private_key(der).map_err(|e| err(format!("unusable private key: {e}")))
}

/// What the two files held when last read: a digest of their contents (or read errors).
/// Contents, not modification times: a file rewritten within the file system's timestamp
/// granularity, or copied with its old time preserved, is still noticed.
type Stamp = [u8; 32];

impl TlsFiles {
    /// Reads and checks both files: each parses, and the key belongs to the leaf certificate.
    /// Every problem is returned (both files are read even if the first fails).
    pub fn load(&self) -> Result<Arc<CertifiedKey>, Vec<TlsFileError>> {
        let (_, cert_pem, key_pem) = self.read();
        self.certified_key(&cert_pem, &key_pem)
    }

    /// Both files' contents, and their [`Stamp`].
    fn read(&self) -> (Stamp, Pem, Pem) {
        let (cert_pem, key_pem) = (read(&self.cert), read(&self.key));
        let stamp = {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            for part in [&cert_pem, &key_pem] {
                match part {
                    Ok(bytes) => {
                        h.update([1]);
                        h.update((bytes.len() as u64).to_le_bytes());
                        h.update(bytes);
                    }
                    Err(e) => {
                        h.update([0]);
                        h.update((e.len() as u64).to_le_bytes());
                        h.update(e.as_bytes());
                    }
                }
            }
            h.finalize().into()
        };
        (stamp, cert_pem, key_pem)
    }

    fn certified_key(&self, cert_pem: &Pem, key_pem: &Pem) -> Result<Arc<CertifiedKey>, Vec<TlsFileError>> {
        let chain = parse_cert_chain(&self.cert, cert_pem);
        let key = parse_signing_key(&self.key, key_pem);
        let (chain, key) = match (chain, key) {
            (Ok(c), Ok(k)) => (c, k),
            (c, k) => return Err(c.err().into_iter().chain(k.err()).collect()),
        };
        let certified = CertifiedKey::new(chain, key);
        match certified.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(e) => {
                return Err(vec![TlsFileError::Key {
                    path: self.key.clone(),
                    message: format!("does not belong to the certificate {}: {e}", self.cert.display()),
                }]);
            }
        }
        Ok(Arc::new(certified))
    }
}

fn describe(errors: &[TlsFileError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// The leaf's expiry, for the log.
fn not_after(key: &CertifiedKey) -> Option<time::OffsetDateTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(key.cert.first()?).ok()?;
    Some(cert.validity().not_after.to_datetime())
}

fn log_loaded(files: &TlsFiles, key: &CertifiedKey, what: &str) {
    let expires = not_after(key);
    let expires_s = expires.map(|t| t.to_string()).unwrap_or_else(|| "?".into());
    if expires.is_some_and(|t| t <= time::OffsetDateTime::now_utc()) {
        tracing::warn!(cert = %files.cert.display(), not_after = %expires_s, "HTTPS certificate {what}, but it has expired");
    } else {
        tracing::info!(cert = %files.cert.display(), not_after = %expires_s, "HTTPS certificate {what}");
    }
}

/// The HTTPS certificate, swapped in place when its files change.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
    /// The file contents last loaded or tried (a broken file is reported once, not every check).
    stamp: Mutex<Stamp>,
}

impl ReloadingCert {
    /// Loads the files; an error names each file that cannot be used.
    pub fn load(files: TlsFiles) -> anyhow::Result<Arc<Self>> {
        let (stamp, cert_pem, key_pem) = files.read();
        let key = files.certified_key(&cert_pem, &key_pem).map_err(|e| anyhow::anyhow!("HTTPS: {}", describe(&e)))?;
        log_loaded(&files, &key, "loaded");
        Ok(Arc::new(Self { files, current: RwLock::new(key), stamp: Mutex::new(stamp) }))
    }

    /// The certificate served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Reloads if the files changed since the last try. `Ok(true)`: a new certificate is served;
    /// `Err`: the changed files are unusable and the previous certificate stays.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let (stamp, cert_pem, key_pem) = self.files.read();
        {
            let mut last = self.stamp.lock().unwrap_or_else(PoisonError::into_inner);
            if *last == stamp {
                return Ok(false);
            }
            *last = stamp;
        }
        let key = self.files.certified_key(&cert_pem, &key_pem).map_err(|e| describe(&e))?;
        log_loaded(&self.files, &key, "reloaded");
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = key;
        Ok(true)
    }

    /// Checks the files every `interval` until shutdown.
    pub async fn watch(self: Arc<Self>, interval: Duration, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                _ = tick.tick() => {}
            }
            let this = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || this.reload_if_changed()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "HTTPS certificate files changed but cannot be used; still serving the previous certificate")
                }
                Err(e) => tracing::error!(error = %e, "HTTPS certificate reload failed"),
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The rustls configuration: TLS 1.3 and 1.2, ALPN `h2` and `http/1.1`, the reloading certificate.
pub fn server_config(cert: Arc<ReloadingCert>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("HTTPS: TLS versions")?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
