//! The aggregator's small certificate authority.
//!
//! `its-aggregator pki init` creates, in the PKI directory:
//! - `ca.pem` / `ca.key`: the CA that signs the server and every device certificate;
//! - `server.pem` / `server.key`: the QUIC server certificate (names given at init);
//! - `devices.json`: the register of issued device certificates (serial, validity, revocation);
//! - `crl.pem`: the certificate revocation list, rewritten on every revocation and read by the
//!   running server (it reloads it without a restart).
//!
//! `its-aggregator device enroll <id>` writes a bundle (`device.pem`, `device.key`, `ca.pem`) for
//! the installer to copy to the box. The device id lives in the certificate's common name; the
//! server takes the identity from the verified certificate, never from what the client sends.
//! Keys are ECDSA P-256, written with mode 0600.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

/// ALPN protocol id of the uplink.
pub const ALPN: &[u8] = b"its-uplink/1";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("PKI directory {0} already holds a CA; refusing to overwrite it (remove it first)")]
    AlreadyInitialised(PathBuf),
    #[error("PKI directory {0} has no CA: run `its-aggregator pki init` first")]
    NotInitialised(PathBuf),
    #[error("invalid device id {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ -")]
    BadDeviceId(String),
    #[error("device {0:?} has no certificate in the register")]
    UnknownDevice(String),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("device register {path}: {message}")]
    Register { path: PathBuf, message: String },
    #[error("peer certificate: {0}")]
    PeerCertificate(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

/// A device id: what the certificate's common name must be.
pub fn validate_device_id(id: &str) -> Result<(), PkiError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok { Ok(()) } else { Err(PkiError::BadDeviceId(id.to_string())) }
}

/// One issued device certificate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IssuedCert {
    pub device_id: String,
    pub serial_hex: String,
    pub not_before: String,
    pub not_after: String,
    pub revoked_at: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Register {
    crl_number: u64,
    issued: Vec<IssuedCert>,
}

/// The PKI directory.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

/// Files of a device bundle, as `its-agent` expects them in its `device_bundle` directory.
#[derive(Debug, Clone)]
pub struct DeviceBundle {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl DeviceBundle {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            cert: dir.join("device.pem"),
            key: dir.join("device.key"),
            ca: dir.join("ca.pem"),
        }
    }
}

fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    if secret {
        crate::fsutil::write_private(&tmp, contents).map_err(io_err(&tmp))?;
    } else {
        let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(contents).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(io_err(path))
}

fn fmt_time(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.unix_timestamp().to_string())
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    Ok(SerialNumber::from_slice(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

impl Pki {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    fn ca_key_path(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn server_cert_path(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    fn server_key_path(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    fn register_path(&self) -> PathBuf {
        self.dir.join("devices.json")
    }
    pub fn crl_path(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    pub fn is_initialised(&self) -> bool {
        self.ca_cert_path().exists() && self.ca_key_path().exists()
    }

    /// Whether the files the QUIC listener needs are present. The CA's private key is not among
    /// them: a server can run without it (issue certificates on another host).
    pub fn can_serve(&self) -> bool {
        self.ca_cert_path().exists() && self.server_cert_path().exists() && self.server_key_path().exists()
    }

    /// Creates the CA, the server certificate for `server_names` and an empty CRL.
    pub fn init(&self, server_names: &[String]) -> Result<(), PkiError> {
        if self.is_initialised() {
            return Err(PkiError::AlreadyInitialised(self.dir.clone()));
        }
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let now = OffsetDateTime::now_utc();
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name = DistinguishedName::new();
        ca.distinguished_name.push(DnType::CommonName, "ITS Camera AI fleet CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        ca.not_before = now - Duration::hours(1);
        ca.not_after = now + Duration::days(3650);
        ca.serial_number = Some(random_serial()?);
        let ca_cert = ca.self_signed(&ca_key)?;
        write_file(&self.ca_key_path(), ca_key.serialize_pem().as_bytes(), true)?;
        write_file(&self.ca_cert_path(), ca_cert.pem().as_bytes(), false)?;

        let issuer = Issuer::new(ca, ca_key);
        let server_key = KeyPair::generate()?;
        let mut names: Vec<String> = server_names.to_vec();
        for default in ["its-aggregator", "localhost", "127.0.0.1", "::1"] {
            if !names.iter().any(|n| n == default) {
                names.push(default.to_string());
            }
        }
        let mut sp = CertificateParams::new(names)?;
        sp.distinguished_name = DistinguishedName::new();
        sp.distinguished_name.push(DnType::CommonName, "its-aggregator");
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        sp.not_before = now - Duration::hours(1);
        sp.not_after = now + Duration::days(825);
        sp.serial_number = Some(random_serial()?);
        let server_cert = sp.signed_by(&server_key, &issuer)?;
        write_file(&self.server_key_path(), server_key.serialize_pem().as_bytes(), true)?;
        write_file(&self.server_cert_path(), server_cert.pem().as_bytes(), false)?;
        self.save_register(&Register::default())?;
        self.write_crl(&issuer, &Register::default())
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        if !self.is_initialised() {
            return Err(PkiError::NotInitialised(self.dir.clone()));
        }
        let key = KeyPair::from_pem(&read(&self.ca_key_path())?)?;
        Ok(Issuer::from_ca_cert_pem(&read(&self.ca_cert_path())?, key)?)
    }

    fn load_register(&self) -> Result<Register, PkiError> {
        let path = self.register_path();
        if !path.exists() {
            return Ok(Register::default());
        }
        serde_json::from_str(&read(&path)?).map_err(|e| PkiError::Register { path, message: e.to_string() })
    }

    fn save_register(&self, r: &Register) -> Result<(), PkiError> {
        let path = self.register_path();
        let text = serde_json::to_string_pretty(r)
            .map_err(|e| PkiError::Register { path: path.clone(), message: e.to_string() })?;
        write_file(&path, text.as_bytes(), false)
    }

    /// Issues a device certificate valid for `days` and writes the bundle into `out`.
    pub fn enroll(&self, device_id: &str, out: &Path, days: i64) -> Result<DeviceBundle, PkiError> {
        let now = OffsetDateTime::now_utc();
        self.enroll_with_validity(device_id, out, now - Duration::hours(1), now + Duration::days(days))
    }

    /// As [`Pki::enroll`], with an explicit validity window (tests issue expired certificates).
    pub fn enroll_with_validity(
        &self,
        device_id: &str,
        out: &Path,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<DeviceBundle, PkiError> {
        validate_device_id(device_id)?;
        let issuer = self.issuer()?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, device_id);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.not_before = not_before;
        p.not_after = not_after;
        let serial = random_serial()?;
        p.serial_number = Some(serial.clone());
        let cert = p.signed_by(&key, &issuer)?;
        fs::create_dir_all(out).map_err(io_err(out))?;
        let bundle = DeviceBundle::in_dir(out);
        write_file(&bundle.key, key.serialize_pem().as_bytes(), true)?;
        write_file(&bundle.cert, cert.pem().as_bytes(), false)?;
        write_file(&bundle.ca, read(&self.ca_cert_path())?.as_bytes(), false)?;
        let mut reg = self.load_register()?;
        reg.issued.push(IssuedCert {
            device_id: device_id.to_string(),
            serial_hex: serial_hex(&serial.to_bytes()),
            not_before: fmt_time(not_before),
            not_after: fmt_time(not_after),
            revoked_at: None,
        });
        self.save_register(&reg)?;
        Ok(bundle)
    }

    /// Revokes every certificate issued to `device_id` and rewrites the CRL. Returns how many
    /// certificates were newly revoked.
    pub fn revoke(&self, device_id: &str) -> Result<usize, PkiError> {
        let issuer = self.issuer()?;
        let mut reg = self.load_register()?;
        if !reg.issued.iter().any(|c| c.device_id == device_id) {
            return Err(PkiError::UnknownDevice(device_id.to_string()));
        }
        let now = fmt_time(OffsetDateTime::now_utc());
        let mut n = 0;
        for c in reg.issued.iter_mut().filter(|c| c.device_id == device_id && c.revoked_at.is_none()) {
            c.revoked_at = Some(now.clone());
            n += 1;
        }
        reg.crl_number += 1;
        self.save_register(&reg)?;
        self.write_crl(&issuer, &reg)?;
        Ok(n)
    }

    pub fn issued(&self) -> Result<Vec<IssuedCert>, PkiError> {
        Ok(self.load_register()?.issued)
    }

    fn write_crl(&self, issuer: &Issuer<'_, KeyPair>, reg: &Register) -> Result<(), PkiError> {
        let now = OffsetDateTime::now_utc();
        let revoked_certs = reg
            .issued
            .iter()
            .filter(|c| c.revoked_at.is_some())
            .filter_map(|c| unhex(&c.serial_hex))
            .map(|serial| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: now,
                reason_code: Some(RevocationReason::CessationOfOperation),
                invalidity_date: None,
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            // The server only checks the CRL's signature and serials; a long next_update keeps
            // it valid for rustls without a periodic re-signing job.
            next_update: now + Duration::days(3650),
            crl_number: SerialNumber::from(reg.crl_number.max(1)),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(issuer)?;
        write_file(&self.crl_path(), crl.pem()?.as_bytes(), false)
    }

    /// The rustls server configuration for the QUIC listener: the server certificate, client
    /// certificates required and verified against the CA and the current CRL.
    pub fn server_tls_config(&self) -> Result<rustls::ServerConfig, PkiError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in load_certs(&self.ca_cert_path())? {
            roots.add(c).map_err(|e| PkiError::Tls(e.to_string()))?;
        }
        let crls = load_crls(&self.crl_path())?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .with_crls(crls)
            .build()
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        let certs = load_certs(&self.server_cert_path())?;
        let key = load_key(&self.server_key_path())?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| PkiError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// A digest of the revocation list's contents (`None`: none can be read), to reload on
    /// change: contents, not the modification time, so a rewrite within one time stamp tick is
    /// seen.
    pub fn revocation_stamp(&self) -> Option<[u8; 32]> {
        use sha2::Digest as _;
        fs::read(self.crl_path()).ok().map(|bytes| sha2::Sha256::digest(&bytes).into())
    }

    /// The serial numbers (lower-case hex, as in the register) the revocation list names.
    pub fn revoked_serials(&self) -> Result<std::collections::HashSet<String>, PkiError> {
        let mut out = std::collections::HashSet::new();
        for der in load_crls(&self.crl_path())? {
            let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())
                .map_err(|e| PkiError::Tls(format!("{}: {e}", self.crl_path().display())))?;
            for revoked in crl.iter_revoked_certificates() {
                out.insert(serial_hex(revoked.raw_serial()));
            }
        }
        Ok(out)
    }
}

/// The serial number of a certificate, lower-case hex (as the register and
/// [`Pki::revoked_serials`] write it).
pub fn cert_serial_hex(der: &CertificateDer<'_>) -> Result<String, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| PkiError::PeerCertificate(e.to_string()))?;
    Ok(serial_hex(cert.raw_serial()))
}

/// A serial number as hex without the leading zero bytes DER may add (so the certificate's,
/// the revocation list's and the register's forms compare equal).
fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len().saturating_sub(1));
    hex(&raw[start..])
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Result<Vec<_>, _> =
        CertificateDer::pem_file_iter(path).map_err(|e| PkiError::Tls(format!("{}: {e}", path.display())))?.collect();
    let certs = certs.map_err(|e| PkiError::Tls(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(PkiError::Tls(format!("{}: no certificate found", path.display())));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| PkiError::Tls(format!("{}: {e}", path.display())))
}

fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, PkiError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let crls: Result<Vec<_>, _> = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| PkiError::Tls(format!("{}: {e}", path.display())))?
        .collect();
    crls.map_err(|e| PkiError::Tls(format!("{}: {e}", path.display())))
}

/// The device id (common name) of a verified peer certificate.
pub fn device_id_from_cert(der: &CertificateDer<'_>) -> Result<String, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| PkiError::PeerCertificate(e.to_string()))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| PkiError::PeerCertificate("no common name".into()))?;
    validate_device_id(cn)?;
    Ok(cn.to_string())
}
