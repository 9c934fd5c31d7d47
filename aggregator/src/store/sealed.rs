//! The secret columns, in one list: which values the [`Vault`](crate::vault::Vault) seals, the
//! associated data each is sealed for, and the passes over all of them (the key ids in use,
//! sealing what is still plain or sealed with an older key).
//!
//! | column | context (associated data) |
//! |---|---|
//! | `signing_keys.private_pem` | `signing_keys.private_pem:<kid>` |
//! | `users.totp_secret` | `users.totp_secret:<user_id>` |
//! | `alert_channels.spec` (the channel's JSON, with its webhook secret or SMTP/MQTT password) | `alert_channels.spec` |
//!
//! Everything else secret is stored as a one-way hash already (passwords: argon2id; refresh
//! tokens, API key secrets, recovery codes, MQTT credentials: SHA-256 or PBKDF2 of high-entropy
//! values).

use super::{Db, StoreError};
use crate::store::db::on_db;
use crate::vault::{Vault, VaultError};

/// Context of a signing key's private key.
pub fn signing_key_context(kid: &str) -> String {
    format!("signing_keys.private_pem:{kid}")
}

/// Context of a user's TOTP secret.
pub fn totp_context(user_id: i64) -> String {
    format!("users.totp_secret:{user_id}")
}

/// Context of an alert channel's settings.
pub const CHANNEL_CONTEXT: &str = "alert_channels.spec";

impl From<VaultError> for StoreError {
    fn from(e: VaultError) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

/// Seals `plain` for `context` with the database's vault.
pub fn seal(db: &Db, context: &str, plain: &str) -> Result<String, StoreError> {
    Ok(db.vault().seal(context, plain)?)
}

/// Opens a stored value for `context` (a plain legacy value is returned as it is).
pub fn open(db: &Db, context: &str, stored: &str) -> Result<String, StoreError> {
    Ok(db.vault().open(context, stored)?)
}

/// One stored secret: its table's key and the stored text.
struct Stored {
    context: String,
    key: String,
    text: String,
}

/// The stored rows: signing keys (kid, pem), users (id, TOTP secret), channels (id, spec).
type StoredRows = (Vec<(String, String)>, Vec<(i64, String)>, Vec<(i64, String)>);

async fn all_stored(db: &Db) -> Result<(Vec<Stored>, Vec<Stored>, Vec<Stored>), StoreError> {
    let (keys, users, channels): StoredRows = on_db!(db.write(), pool => {
        let keys = sqlx::query_as("SELECT kid, private_pem FROM signing_keys").fetch_all(pool).await?;
        let users = sqlx::query_as("SELECT user_id, totp_secret FROM users WHERE totp_secret IS NOT NULL")
            .fetch_all(pool)
            .await?;
        let channels = sqlx::query_as("SELECT channel_id, spec FROM alert_channels").fetch_all(pool).await?;
        (keys, users, channels)
    });
    Ok((
        keys.into_iter().map(|(kid, text)| Stored { context: signing_key_context(&kid), key: kid, text }).collect(),
        users.into_iter().map(|(id, text)| Stored { context: totp_context(id), key: id.to_string(), text }).collect(),
        channels
            .into_iter()
            .map(|(id, text)| Stored { context: CHANNEL_CONTEXT.to_owned(), key: id.to_string(), text })
            .collect(),
    ))
}

/// The ids of the keys the stored secrets are sealed with, sorted, each once.
pub async fn key_ids_in_use(db: &Db) -> Result<Vec<String>, StoreError> {
    let (a, b, c) = all_stored(db).await?;
    let mut ids: Vec<String> =
        a.iter().chain(&b).chain(&c).filter_map(|s| Vault::sealed_with(&s.text).map(str::to_owned)).collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// How many values a [`seal_all`] pass sealed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SealReport {
    /// Plain values (written before sealing existed) now sealed.
    pub plain: usize,
    /// Values sealed with an older key, sealed again with the active one.
    pub resealed: usize,
}

/// Seals every secret that is plain or sealed with another key than the vault's active one.
/// Each value is opened first (so an altered or unknown-key value stops the pass with an error
/// and changes nothing of it) and written back only if it did not change meanwhile.
pub async fn seal_all(db: &Db) -> Result<SealReport, StoreError> {
    let vault = db.vault();
    let (keys, users, channels) = all_stored(db).await?;
    let mut report = SealReport::default();
    for (table, rows) in [("keys", keys), ("users", users), ("channels", channels)] {
        for s in rows {
            if !vault.needs_reseal(&s.text) {
                continue;
            }
            let plain = vault.open(&s.context, &s.text)?;
            let sealed = vault.seal(&s.context, &plain)?;
            let sql = match table {
                "keys" => "UPDATE signing_keys SET private_pem = $1 WHERE kid = $2 AND private_pem = $3",
                "users" => "UPDATE users SET totp_secret = $1 WHERE CAST(user_id AS TEXT) = $2 AND totp_secret = $3",
                _ => "UPDATE alert_channels SET spec = $1 WHERE CAST(channel_id AS TEXT) = $2 AND spec = $3",
            };
            on_db!(db.write(), pool => sqlx::query(sql).bind(&sealed).bind(&s.key).bind(&s.text)
                .execute(pool).await.map(|r| r.rows_affected()))?;
            if Vault::is_sealed(&s.text) {
                report.resealed += 1;
            } else {
                report.plain += 1;
            }
        }
    }
    // SQLite: the plain forms replaced are gone from the pages (`secure_delete`); the write-ahead
    // log may still hold the old pages until it is checkpointed and emptied.
    if report.plain + report.resealed > 0
        && let super::Pools::Sqlite { writer, .. } = &db.pools
    {
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(writer).await?;
    }
    Ok(report)
}
