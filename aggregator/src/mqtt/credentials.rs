//! Integrators' MQTT credentials: a user name, a password shown once, and what it may read
//! (sites, alerts). The embedded broker checks them ([`IntegratorAuthenticator`]); for an
//! external Mosquitto, [`mosquitto_files`] writes its password and ACL files from them.
//!
//! An integrator may subscribe within:
//! - `its/v1/{site}/#` for each of its sites (events and counts of the cameras there);
//! - `its/v1/devices/{device}/status` for each device assigned to one of its sites (as the
//!   assignment was when it connected);
//! - `its/v1/alerts/#` when `alerts` is set;
//! - `its/v1/aggregator/+/status`.
//!
//! It may publish nothing.
//!
//! Each stored credential has a **generation** ([`StoredCredential::generation`]): a digest of its
//! secret's hash and creation time, so it changes whenever the credential is created again (a
//! deleted credential created again under the same user name is a new generation, even with the
//! same sites). The grant carries it; the broker's front puts it in the client id it gives rumqttd
//! (so no session of an earlier generation is ever resumed) and
//! [`IntegratorAuthenticator::is_current`] closes the connections of a grant whose credential is
//! gone, of another generation, or whose sites or alerts changed.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;

use super::acl::{AuthOutcome, Authenticator, ConnectRequest, Grant};
use super::topics::{ROOT, device_status_topic, site_filter};
use crate::auth::secrets::{ct_eq, random_token, sha256_hex};
use crate::store::mqtt_credentials::CredentialRows;
pub use crate::store::mqtt_credentials::{MqttCredential, StoredCredential};
use crate::store::{Db, StoreError};

/// Iterations of Mosquitto's PBKDF2-SHA512 (`mosquitto_passwd`'s default).
pub const MOSQUITTO_ITERATIONS: u32 = 101;
/// How long the embedded broker trusts what it read about a credential (so a revocation closes
/// the credential's connections within about this long).
pub const CACHE_TTL: Duration = Duration::from_secs(5);

/// Hex digits of a credential generation: 64 bits, so two issues of one user name never share
/// one in practice, and short enough for client ids.
const GENERATION_HEX: usize = 16;

impl StoredCredential {
    /// The credential's generation: [`GENERATION_HEX`] hex digits of SHA-256 over the secret's
    /// hash and the creation time. Both are new whenever the credential is (re)created (the
    /// secret is random), and neither changes otherwise, so no schema change was needed.
    pub fn generation(&self) -> String {
        sha256_hex(&format!("{}:{}", self.secret_sha256, self.credential.created_at_ms))
            .chars()
            .take(GENERATION_HEX)
            .collect()
    }
}

/// Mosquitto's `$7$` password hash (PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte key, standard
/// base64), as `mosquitto_passwd` writes it.
pub fn mosquitto_hash(password: &str) -> String {
    let mut salt = [0u8; 12];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut salt);
    mosquitto_hash_with(password, &salt, MOSQUITTO_ITERATIONS)
}

fn mosquitto_hash_with(password: &str, salt: &[u8], iterations: u32) -> String {
    let mut key = [0u8; 64];
    let iterations = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
    aws_lc_rs::pbkdf2::derive(aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA512, iterations, salt, password.as_bytes(), &mut key);
    let b64 = base64::engine::general_purpose::STANDARD;
    format!("$7${}${}${}", iterations, b64.encode(salt), b64.encode(key))
}

/// Integrators' credentials: validation and secrets here, the rows in
/// [`crate::store::mqtt_credentials`].
#[derive(Clone)]
pub struct CredentialStore {
    rows: CredentialRows,
}

impl CredentialStore {
    pub fn new(db: Db) -> Self {
        Self { rows: CredentialRows::new(db) }
    }

    /// Creates a credential and returns it with its password (the only time it is seen).
    /// `Conflict` when the user name is taken, `InvalidQuery` for a bad name or site id.
    pub async fn create(
        &self,
        username: &str,
        sites: &[String],
        alerts: bool,
        created_by: Option<&str>,
        now_ms: i64,
    ) -> Result<(MqttCredential, String), StoreError> {
        if crate::pki::validate_device_id(username).is_err() {
            return Err(StoreError::InvalidQuery(
                "an MQTT user name is 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', '-'".into(),
            ));
        }
        let mut sites = sites.to_vec();
        sites.sort();
        sites.dedup();
        for s in &sites {
            crate::store::fleet::validate_site_id(s)?;
        }
        let password = random_token(32);
        let secret_sha256 = sha256_hex(&password);
        let mosquitto_hash = {
            let p = password.clone();
            tokio::task::spawn_blocking(move || mosquitto_hash(&p))
                .await
                .map_err(|e| StoreError::InvalidQuery(format!("hashing: {e}")))?
        };
        let credential = MqttCredential {
            username: username.to_owned(),
            sites,
            alerts,
            created_at_ms: now_ms,
            created_by: created_by.map(str::to_owned),
        };
        self.rows.insert(&StoredCredential { credential: credential.clone(), secret_sha256, mosquitto_hash }).await?;
        Ok((credential, password))
    }

    /// All credentials, by user name.
    pub async fn list(&self) -> Result<Vec<StoredCredential>, StoreError> {
        self.rows.list().await
    }

    /// One credential.
    pub async fn get(&self, username: &str) -> Result<Option<StoredCredential>, StoreError> {
        self.rows.get(username).await
    }

    /// Deletes a credential; false when there was none.
    pub async fn delete(&self, username: &str) -> Result<bool, StoreError> {
        self.rows.delete(username).await
    }

    /// Devices assigned to one of `sites`.
    pub async fn devices_of_sites(&self, sites: &[String]) -> Result<Vec<String>, StoreError> {
        self.rows.devices_of_sites(sites).await
    }
}

/// The subscribe rights of a credential (`devices`: those assigned to its sites), with its
/// generation.
pub fn integrator_grant(stored: &StoredCredential, devices: &[String]) -> Grant {
    let c = &stored.credential;
    let mut subscribe: Vec<String> = c.sites.iter().map(|s| site_filter(s)).collect();
    subscribe.extend(devices.iter().map(|d| device_status_topic(d)));
    if c.alerts {
        subscribe.push(format!("{ROOT}/alerts/#"));
    }
    subscribe.push(format!("{ROOT}/aggregator/+/status"));
    Grant {
        principal: format!("integrator:{}", c.username),
        generation: stored.generation(),
        subscribe,
        publish: Vec::new(),
    }
}

/// Whether `grant` was made from `stored` as it is now: the same generation, and the same sites
/// and alerts. The device status topics are left out: they follow the site assignment as it was
/// at CONNECT, and reading it again would cost a query per connection and check.
fn grant_holds(stored: &StoredCredential, grant: &Grant) -> bool {
    let devices = format!("{ROOT}/devices/");
    let scope =
        |g: &Grant| -> Vec<String> { g.subscribe.iter().filter(|f| !f.starts_with(&devices)).cloned().collect() };
    let now = integrator_grant(stored, &[]);
    grant.generation == now.generation && scope(grant) == scope(&now)
}

/// The embedded broker's check of integrators: the user name must be a credential and the
/// password its secret.
pub struct IntegratorAuthenticator {
    store: CredentialStore,
    cache: Mutex<HashMap<String, (Instant, Option<StoredCredential>)>>,
}

impl IntegratorAuthenticator {
    pub fn new(db: Db) -> Self {
        Self { store: CredentialStore::new(db), cache: Mutex::new(HashMap::new()) }
    }

    /// The credential, from the cache when it is fresh. `Err`: storage failed.
    async fn lookup(&self, username: &str, fresh: bool) -> Result<Option<StoredCredential>, StoreError> {
        if !fresh
            && let Ok(cache) = self.cache.lock()
            && let Some((at, c)) = cache.get(username)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(c.clone());
        }
        let c = self.store.get(username).await?;
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
            cache.insert(username.to_owned(), (Instant::now(), c.clone()));
        }
        Ok(c)
    }
}

#[async_trait]
impl Authenticator for IntegratorAuthenticator {
    async fn authenticate(&self, req: &ConnectRequest) -> AuthOutcome {
        let (Some(username), Some(password)) = (&req.username, &req.password) else {
            return AuthOutcome::NotMine;
        };
        let stored = match self.lookup(username, true).await {
            Ok(Some(s)) => s,
            Ok(None) => return AuthOutcome::NotMine,
            Err(e) => {
                tracing::warn!(error = %e, "MQTT: cannot read the integrator credentials");
                return AuthOutcome::Refused;
            }
        };
        if !ct_eq(&sha256_hex(password), &stored.secret_sha256) {
            return AuthOutcome::Refused;
        }
        let devices = match self.store.devices_of_sites(&stored.credential.sites).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "MQTT: cannot read the devices of an integrator's sites");
                return AuthOutcome::Refused;
            }
        };
        AuthOutcome::Granted(integrator_grant(&stored, &devices))
    }

    async fn is_current(&self, grant: &Grant) -> bool {
        let Some(username) = grant.principal.strip_prefix("integrator:") else {
            return true;
        };
        match self.lookup(username, false).await {
            Ok(Some(stored)) => grant_holds(&stored, grant),
            // Deleted.
            Ok(None) => false,
            // Storage trouble is not a revocation.
            Err(_) => true,
        }
    }
}

/// A Mosquitto password file and ACL file for `credentials`, plus the aggregator's own user
/// (`aggregator`: user name and password of `[mqtt]`, which may publish under `its/v1/#`).
pub fn mosquitto_files(
    credentials: &[(StoredCredential, Vec<String>)],
    aggregator: Option<(&str, &str)>,
) -> (String, String) {
    let mut passwd = String::new();
    let mut acl = String::from(
        "# Written by `its-aggregator mqtt mosquitto-config` from the stored MQTT credentials.\n\
         # Use with: password_file <this dir>/passwd, acl_file <this dir>/acl, allow_anonymous false\n",
    );
    if let Some((user, password)) = aggregator {
        passwd.push_str(&format!("{user}:{}\n", mosquitto_hash(password)));
        acl.push_str(&format!("\n# The aggregator itself\nuser {user}\ntopic readwrite {ROOT}/#\n"));
    }
    for (stored, devices) in credentials {
        let c = &stored.credential;
        passwd.push_str(&format!("{}:{}\n", c.username, stored.mosquitto_hash));
        acl.push_str(&format!("\n# Integrator {}\nuser {}\n", c.username, c.username));
        for filter in integrator_grant(stored, devices).subscribe {
            acl.push_str(&format!("topic read {filter}\n"));
        }
    }
    (passwd, acl)
}

/// `its-aggregator mqtt mosquitto-config --out DIR`: writes `DIR/passwd` and `DIR/acl` (mode
/// 0600 / 0644) from the stored credentials (`mode`: the `[mqtt]` mode, whose external broker
/// login is the aggregator's own user); returns how many credentials it wrote.
pub async fn write_mosquitto_config(db: Db, mode: &super::MqttMode, out: &std::path::Path) -> anyhow::Result<usize> {
    use anyhow::Context as _;
    let creds = CredentialStore::new(db);
    let mut all = Vec::new();
    for c in creds.list().await? {
        let devices = creds.devices_of_sites(&c.credential.sites).await?;
        all.push((c, devices));
    }
    let aggregator = match mode {
        super::MqttMode::External(ext) if !ext.username.is_empty() => {
            Some((ext.username.as_str(), ext.password.as_str()))
        }
        _ => None,
    };
    let (passwd, acl) = mosquitto_files(&all, aggregator);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let write = |name: &str, text: &str, mode: u32| -> anyhow::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = out.join(name);
        let tmp = out.join(format!(".{name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    };
    write("passwd", &passwd, 0o600)?;
    write("acl", &acl, 0o644)?;
    Ok(all.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mosquitto_hash_format() {
        // Known answer: PBKDF2-HMAC-SHA512("password", "saltsaltsalt", 101), as mosquitto_passwd
        // would write it for that salt.
        let h = mosquitto_hash_with("password", b"saltsaltsalt", 101);
        let parts: Vec<&str> = h.split('$').collect();
        assert_eq!(parts[..3], ["", "7", "101"]);
        assert_eq!(parts[3], "c2FsdHNhbHRzYWx0");
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(parts[4]).map(|k| k.len()).ok(), Some(64));
        assert_ne!(mosquitto_hash("x"), mosquitto_hash("x"), "salted");
    }

    fn stored(sites: &[&str], alerts: bool, secret: &str, created_at_ms: i64) -> StoredCredential {
        StoredCredential {
            credential: MqttCredential {
                username: "acme".into(),
                sites: sites.iter().map(|s| (*s).to_owned()).collect(),
                alerts,
                created_at_ms,
                created_by: None,
            },
            secret_sha256: sha256_hex(secret),
            mosquitto_hash: "$7$h".into(),
        }
    }

    #[test]
    fn generations_change_with_each_creation() {
        let a = stored(&["north"], false, "first password", 1000);
        assert_eq!(a.generation().len(), GENERATION_HEX);
        assert!(a.generation().chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a.generation(), a.clone().generation(), "stable");
        // Created again: a new secret (and time), so a new generation, even with the same sites.
        assert_ne!(a.generation(), stored(&["north"], false, "second password", 1000).generation());
        assert_ne!(a.generation(), stored(&["north"], false, "first password", 1001).generation());
    }

    #[test]
    fn grants_hold_while_the_credential_is_unchanged() {
        let a = stored(&["north", "south"], true, "pw", 1000);
        let g = integrator_grant(&a, &["dev-n".into()]);
        assert_eq!(g.generation, a.generation());
        assert!(grant_holds(&a, &g), "device assignments are not checked again");
        // Created again with the same scope, or the same generation with another scope.
        assert!(!grant_holds(&stored(&["north", "south"], true, "pw2", 2000), &g));
        assert!(!grant_holds(&stored(&["north"], true, "pw", 1000), &g));
        assert!(!grant_holds(&stored(&["north", "south"], false, "pw", 1000), &g));
        assert!(!grant_holds(&stored(&["north", "south", "west"], true, "pw", 1000), &g));
    }

    #[test]
    fn grant_of_a_credential() {
        let s = stored(&["north"], false, "pw", 0);
        let g = integrator_grant(&s, &["dev-n".into()]);
        assert!(g.may_subscribe("its/v1/north/#"));
        assert!(g.may_subscribe("its/v1/devices/dev-n/status"));
        assert!(!g.may_subscribe("its/v1/devices/+/status"));
        assert!(!g.may_subscribe("its/v1/alerts/#"));
        assert!(g.may_subscribe("its/v1/aggregator/+/status"));
        let (passwd, acl) = mosquitto_files(&[(s, vec![])], Some(("agg", "pw")));
        assert!(passwd.contains("acme:$7$h\n") && passwd.starts_with("agg:$7$101$"), "{passwd}");
        assert!(acl.contains("user acme\ntopic read its/v1/north/#\n"), "{acl}");
    }
}
