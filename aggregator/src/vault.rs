//! Secrets at rest: what the database holds in clear would be enough to mint admin tokens (the
//! RS256 signing keys), to pass any user's second factor (TOTP secrets) or to impersonate the
//! traffic centre towards its webhook, SMTP and MQTT peers (channel secrets). The [`Vault`] seals
//! those columns with AES-256-GCM under a key kept **outside** the database, so that a copy of
//! the database alone (a backup, a replica, a stolen disk image, a read through some SQL hole)
//! yields none of them.
//!
//! - **The key ring** is a small text file (`[secrets] key_file`, mode 0600) or the environment
//!   variable [`KEYRING_ENV`] (for container platforms, from a secret store). One key per line,
//!   `<key id> <32 bytes, base64>`; `#` starts a comment. The first key seals; every key opens.
//!   The file is created with one fresh key at the first start, when the database holds no sealed
//!   value yet; otherwise a missing key is an error that names the key ids the database needs.
//! - **Rotation**: `its-aggregator secrets rotate` puts a new key first in the file, seals every
//!   stored secret again with it, and keeps the older keys (so that another replica still running
//!   with the old file keeps working until it restarts); `--retire-old` then drops them from the
//!   file once nothing is sealed with them.
//! - **Format** of a sealed value: `sealed:v1:<key id>:<base64(nonce ‖ ciphertext ‖ tag)>`, with a
//!   random 96-bit nonce per value and the value's place (table, column and row, e.g.
//!   `users.totp_secret:17`) as associated data, so a sealed value moved to another row or column
//!   does not open.
//! - A value that is not sealed (written before this existed) is read as it is, and sealed at the
//!   next start (see the stores' `seal_plaintext`).
//!
//! The vault depends on nothing in this crate but its error type, so every layer may use it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine as _;
use rand::RngCore as _;

/// Environment variable that holds the key ring itself (takes precedence over the file).
pub const KEYRING_ENV: &str = "ITS_AGGREGATOR_SECRETS_KEYRING";
/// Prefix of every sealed value.
pub const SEALED_PREFIX: &str = "sealed:v1:";
/// Bytes of a key (AES-256).
const KEY_LEN: usize = 32;
/// Longest key id accepted.
const MAX_KEY_ID: usize = 32;

/// Why the key ring could not be read or a value not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    /// The key ring text is malformed (line number, reason).
    #[error("{source_name}: line {line}: {message}")]
    KeyRing { source_name: String, line: usize, message: String },
    /// Reading or writing the key file failed.
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    /// A value is sealed with a key that is not in the ring.
    #[error("a secret is sealed with key {0:?}, which is not in the key ring")]
    UnknownKey(String),
    /// A sealed value does not open (wrong key, altered, or moved to another row).
    #[error("a sealed secret ({context}) does not open: altered, moved, or sealed under another key with the same id")]
    Tampered { context: String },
    /// A sealed value is not in the sealed format.
    #[error("malformed sealed value ({context})")]
    Malformed { context: String },
}

struct VaultKey {
    id: String,
    key: LessSafeKey,
    /// The raw bytes, to write the ring back (rotation).
    raw: [u8; KEY_LEN],
}

/// The key ring (cheap to clone).
#[derive(Clone)]
pub struct Vault {
    keys: Arc<Vec<VaultKey>>,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault").field("key_ids", &self.key_ids()).finish()
    }
}

/// Where the key ring comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The text of [`KEYRING_ENV`].
    Env(String),
    /// A file (created at the first start).
    File(PathBuf),
}

impl KeySource {
    /// [`KEYRING_ENV`] when set and not empty, else the file.
    pub fn from_env_or_file(file: &Path) -> Self {
        match std::env::var(KEYRING_ENV) {
            Ok(text) if !text.trim().is_empty() => KeySource::Env(text),
            _ => KeySource::File(file.to_path_buf()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            KeySource::Env(_) => format!("${KEYRING_ENV}"),
            KeySource::File(p) => p.display().to_string(),
        }
    }
}

fn new_key_id() -> String {
    let mut b = [0u8; 4];
    rand::rng().fill_bytes(&mut b);
    format!("k{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}

fn make_key(id: String, raw: [u8; KEY_LEN]) -> Result<VaultKey, String> {
    let unbound = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| "not a usable AES-256 key".to_owned())?;
    Ok(VaultKey { id, key: LessSafeKey::new(unbound), raw })
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl Vault {
    /// A ring with one fresh random key. For in-memory databases and tests, whose secrets do not
    /// outlive the process; never for a database file (its secrets could not be read again).
    pub fn ephemeral() -> Self {
        let mut raw = [0u8; KEY_LEN];
        rand::rng().fill_bytes(&mut raw);
        match make_key(new_key_id(), raw) {
            Ok(k) => Self { keys: Arc::new(vec![k]) },
            // A 32-byte key is always a valid AES-256 key.
            Err(_) => Self { keys: Arc::new(Vec::new()) },
        }
    }

    /// Parses a key ring (see the module documentation). `source_name` names it in errors.
    pub fn parse(source_name: &str, text: &str) -> Result<Self, VaultError> {
        let mut keys: Vec<VaultKey> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let err =
                |message: String| VaultError::KeyRing { source_name: source_name.to_owned(), line: i + 1, message };
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(id), Some(key), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(err("expected `<key id> <base64 key>`".into()));
            };
            if id.is_empty()
                || id.len() > MAX_KEY_ID
                || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(err(format!("key id {id:?}: 1 to {MAX_KEY_ID} of A-Z a-z 0-9 - _")));
            }
            if keys.iter().any(|k| k.id == id) {
                return Err(err(format!("key id {id:?} appears twice")));
            }
            let bytes = b64().decode(key).map_err(|e| err(format!("key {id:?} is not base64: {e}")))?;
            let raw: [u8; KEY_LEN] = bytes
                .try_into()
                .map_err(|b: Vec<u8>| err(format!("key {id:?} has {} bytes; a key has {KEY_LEN}", b.len())))?;
            keys.push(make_key(id.to_owned(), raw).map_err(err)?);
        }
        if keys.is_empty() {
            return Err(VaultError::KeyRing {
                source_name: source_name.to_owned(),
                line: 0,
                message: "no key in it".into(),
            });
        }
        Ok(Self { keys: Arc::new(keys) })
    }

    /// Reads the ring from `source`. A missing file is created with one fresh key (mode 0600)
    /// only when `may_create` (the caller knows the database holds nothing sealed yet).
    pub fn load(source: &KeySource, may_create: bool) -> Result<(Self, bool), VaultError> {
        match source {
            KeySource::Env(text) => Ok((Self::parse(&source.describe(), text)?, false)),
            KeySource::File(path) => match std::fs::read_to_string(path) {
                Ok(text) => {
                    warn_if_readable_by_others(path);
                    Ok((Self::parse(&path.display().to_string(), &text)?, false))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && may_create => {
                    let vault = Self::ephemeral();
                    vault.write_file(path)?;
                    Ok((vault, true))
                }
                Err(e) => Err(VaultError::Io { path: path.display().to_string(), message: e.to_string() }),
            },
        }
    }

    /// The ring as text (what [`Vault::parse`] reads).
    pub fn to_text(&self) -> String {
        let mut out = String::from(
            "# its-aggregator secrets key ring: the first key seals, every key opens.\n\
             # Keep it out of database backups; without it the stored secrets cannot be read.\n",
        );
        for k in self.keys.iter() {
            out.push_str(&format!("{} {}\n", k.id, b64().encode(k.raw)));
        }
        out
    }

    /// Writes the ring to `path` atomically, mode 0600 (the directory is created if missing).
    pub fn write_file(&self, path: &Path) -> Result<(), VaultError> {
        let io = |e: std::io::Error| VaultError::Io { path: path.display().to_string(), message: e.to_string() };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension("tmp");
        crate::fsutil::write_private(&tmp, self.to_text().as_bytes()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// A ring with a new key in front of these (rotation).
    pub fn with_new_active_key(&self) -> Self {
        let fresh = Self::ephemeral();
        let mut keys: Vec<VaultKey> = Vec::new();
        for k in fresh.keys.iter().chain(self.keys.iter()) {
            if let Ok(copy) = make_key(k.id.clone(), k.raw) {
                keys.push(copy);
            }
        }
        Self { keys: Arc::new(keys) }
    }

    /// Only the active key (after every value was sealed again with it).
    pub fn active_only(&self) -> Self {
        let keys = self.keys.first().and_then(|k| make_key(k.id.clone(), k.raw).ok()).into_iter().collect();
        Self { keys: Arc::new(keys) }
    }

    /// The ids of the keys, the active one first.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.id.clone()).collect()
    }

    /// The id of the sealing key.
    pub fn active_key_id(&self) -> Option<&str> {
        self.keys.first().map(|k| k.id.as_str())
    }

    /// Seals `plaintext` for the place `context` (e.g. `users.totp_secret:17`).
    pub fn seal(&self, context: &str, plaintext: &str) -> Result<String, VaultError> {
        let k = self.keys.first().ok_or_else(|| VaultError::UnknownKey(String::new()))?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut buf = plaintext.as_bytes().to_vec();
        k.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(context.as_bytes()), &mut buf)
            .map_err(|_| VaultError::Malformed { context: context.to_owned() })?;
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(format!("{SEALED_PREFIX}{}:{}", k.id, b64().encode(out)))
    }

    /// Opens a value stored for `context`: a sealed one with its key, a plain one (written
    /// before sealing existed) as it is.
    pub fn open(&self, context: &str, stored: &str) -> Result<String, VaultError> {
        let Some(rest) = stored.strip_prefix(SEALED_PREFIX) else {
            return Ok(stored.to_owned());
        };
        let malformed = || VaultError::Malformed { context: context.to_owned() };
        let (kid, body) = rest.split_once(':').ok_or_else(malformed)?;
        let k = self.keys.iter().find(|k| k.id == kid).ok_or_else(|| VaultError::UnknownKey(kid.to_owned()))?;
        let bytes = b64().decode(body).map_err(|_| malformed())?;
        if bytes.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(malformed());
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| malformed())?;
        let mut buf = sealed.to_vec();
        let plain = k
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(context.as_bytes()), &mut buf)
            .map_err(|_| VaultError::Tampered { context: context.to_owned() })?;
        String::from_utf8(plain.to_vec()).map_err(|_| malformed())
    }

    /// Whether a stored value is sealed.
    pub fn is_sealed(stored: &str) -> bool {
        stored.starts_with(SEALED_PREFIX)
    }

    /// The key id a stored value is sealed with (`None`: not sealed).
    pub fn sealed_with(stored: &str) -> Option<&str> {
        stored.strip_prefix(SEALED_PREFIX).and_then(|r| r.split_once(':')).map(|(k, _)| k)
    }

    /// Whether a sealed value needs sealing again with the active key (rotation).
    pub fn needs_reseal(&self, stored: &str) -> bool {
        Self::sealed_with(stored) != self.active_key_id()
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", m.permissions().mode() & 0o777), "the secrets key file is readable by other users: chmod 600 it");
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open_with_context() {
        let v = Vault::ephemeral();
        let s = v.seal("users.totp_secret:1", "JBSWY3DPEHPK3PXP").expect("seal");
        assert!(Vault::is_sealed(&s) && !s.contains("JBSWY3DP"), "{s}");
        assert_eq!(v.open("users.totp_secret:1", &s).expect("open"), "JBSWY3DPEHPK3PXP");
        assert_ne!(s, v.seal("users.totp_secret:1", "JBSWY3DPEHPK3PXP").expect("seal"), "fresh nonce");
        // Moved to another row, or altered: refused.
        assert!(matches!(v.open("users.totp_secret:2", &s), Err(VaultError::Tampered { .. })));
        let mut altered = s.clone();
        altered.pop();
        altered.push(if s.ends_with('A') { 'B' } else { 'A' });
        assert!(v.open("users.totp_secret:1", &altered).is_err());
        // Another ring cannot open it; a plain legacy value reads as it is.
        assert!(matches!(Vault::ephemeral().open("users.totp_secret:1", &s), Err(VaultError::UnknownKey(_))));
        assert_eq!(v.open("x", "plain").expect("legacy"), "plain");
    }

    #[test]
    fn key_ring_text_round_trips_and_rotates() {
        let v = Vault::ephemeral();
        let text = v.to_text();
        let again = Vault::parse("ring", &text).expect("parse");
        let s = v.seal("c", "secret").expect("seal");
        assert_eq!(again.open("c", &s).expect("open"), "secret");
        let rotated = v.with_new_active_key();
        assert_eq!(rotated.key_ids().len(), 2);
        assert_eq!(rotated.key_ids()[1], v.key_ids()[0]);
        assert!(rotated.needs_reseal(&s));
        assert_eq!(rotated.open("c", &s).expect("old key still opens"), "secret");
        let s2 = rotated.seal("c", "secret").expect("seal");
        assert!(!rotated.needs_reseal(&s2));
        assert_eq!(rotated.active_only().key_ids(), vec![rotated.key_ids()[0].clone()]);
    }

    #[test]
    fn malformed_rings_are_refused_with_the_line() {
        for (text, line) in [
            ("", 0),
            ("k1\n", 1),
            ("# c\nk1 notbase64!!\n", 2),
            ("k1 AAAA\n", 1),
            ("k/1 AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n", 1),
        ] {
            match Vault::parse("ring", text) {
                Err(VaultError::KeyRing { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
        let dup = "k1 AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\nk1 AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n";
        assert!(matches!(Vault::parse("ring", dup), Err(VaultError::KeyRing { line: 2, .. })));
    }

    #[cfg(unix)]
    #[test]
    fn key_file_is_created_private_only_when_allowed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/secrets.key");
        let src = KeySource::File(path.clone());
        assert!(matches!(Vault::load(&src, false), Err(VaultError::Io { .. })));
        let (v, created) = Vault::load(&src, true).expect("created");
        assert!(created);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (again, created) = Vault::load(&src, true).expect("read");
        assert!(!created);
        assert_eq!(again.key_ids(), v.key_ids());
    }
}
