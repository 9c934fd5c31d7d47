//! The `mqtt_credentials` table: integrators' MQTT logins as stored (hashes, never a password),
//! and the devices of their sites. Generating and checking secrets is [`crate::mqtt`]'s.

use serde::{Deserialize, Serialize};

use crate::store::db::on_db;
use crate::store::{Db, StoreError};

/// A credential as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MqttCredential {
    /// The MQTT user name.
    pub username: String,
    /// Sites whose topics it may subscribe to.
    pub sites: Vec<String>,
    /// Whether it may subscribe to `its/v1/alerts/#`.
    pub alerts: bool,
    /// Unix ms.
    pub created_at_ms: i64,
    /// Who created it (`user:NAME`, `apikey:ID`, `cli`).
    pub created_by: Option<String>,
}

/// A stored credential with its hashes.
#[derive(Debug, Clone)]
pub struct StoredCredential {
    pub credential: MqttCredential,
    pub secret_sha256: String,
    pub mosquitto_hash: String,
}

#[derive(sqlx::FromRow)]
struct Row {
    username: String,
    secret_sha256: String,
    mosquitto_hash: String,
    sites: String,
    alerts: i64,
    created_at_ms: i64,
    created_by: Option<String>,
}

const COLUMNS: &str = "username, secret_sha256, mosquitto_hash, sites, alerts, created_at_ms, created_by";

impl From<Row> for StoredCredential {
    fn from(r: Row) -> Self {
        StoredCredential {
            credential: MqttCredential {
                username: r.username,
                sites: serde_json::from_str(&r.sites).unwrap_or_default(),
                alerts: r.alerts != 0,
                created_at_ms: r.created_at_ms,
                created_by: r.created_by,
            },
            secret_sha256: r.secret_sha256,
            mosquitto_hash: r.mosquitto_hash,
        }
    }
}

/// The rows of `mqtt_credentials`.
#[derive(Debug, Clone)]
pub struct CredentialRows {
    db: Db,
}

impl CredentialRows {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Stores a new credential (its hashes made by the caller); `Conflict` when the user name is
    /// taken.
    pub async fn insert(&self, stored: &StoredCredential) -> Result<(), StoreError> {
        let c = &stored.credential;
        let sites_json = serde_json::to_string(&c.sites).map_err(|e| StoreError::InvalidQuery(e.to_string()))?;
        let sql = "INSERT INTO mqtt_credentials (username, secret_sha256, mosquitto_hash, sites, alerts, created_at_ms, \
                   created_by) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (username) DO NOTHING";
        let n = on_db!(self.db.write(), pool => sqlx::query(sql)
            .bind(&c.username).bind(&stored.secret_sha256).bind(&stored.mosquitto_hash).bind(&sites_json)
            .bind(i64::from(c.alerts)).bind(c.created_at_ms).bind(&c.created_by)
            .execute(pool).await.map(|r| r.rows_affected()))?;
        if n == 0 {
            return Err(StoreError::Conflict(format!("MQTT user {} exists", c.username)));
        }
        Ok(())
    }

    /// All credentials, by user name.
    pub async fn list(&self) -> Result<Vec<StoredCredential>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM mqtt_credentials ORDER BY username");
        let rows: Vec<Row> =
            on_db!(self.db.read(), pool => sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await)?;
        Ok(rows.into_iter().map(StoredCredential::from).collect())
    }

    /// One credential.
    pub async fn get(&self, username: &str) -> Result<Option<StoredCredential>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM mqtt_credentials WHERE username = $1");
        let row: Option<Row> = on_db!(self.db.read(), pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(username).fetch_optional(pool).await)?;
        Ok(row.map(StoredCredential::from))
    }

    /// Deletes a credential; false when there was none.
    pub async fn delete(&self, username: &str) -> Result<bool, StoreError> {
        let n = on_db!(self.db.write(), pool => sqlx::query("DELETE FROM mqtt_credentials WHERE username = $1")
            .bind(username).execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(n > 0)
    }

    /// Devices assigned to one of `sites`.
    pub async fn devices_of_sites(&self, sites: &[String]) -> Result<Vec<String>, StoreError> {
        if sites.is_empty() {
            return Ok(Vec::new());
        }
        let sql = "SELECT device_id, site_id FROM devices WHERE site_id IS NOT NULL ORDER BY device_id";
        let rows: Vec<(String, String)> = on_db!(self.db.read(), pool => sqlx::query_as(sql).fetch_all(pool).await)?;
        Ok(rows.into_iter().filter(|(_, s)| sites.contains(s)).map(|(d, _)| d).collect())
    }
}
