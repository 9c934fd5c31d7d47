//! Storage of users, sessions, refresh tokens, signing keys, API keys, role policies, sign-in
//! throttling and the audit log: one implementation for both backends (see [`on_db!`]).

use serde::Serialize;

use crate::store::db::on_db;
use crate::store::{Db, Scope, StoreError, sealed};

use crate::model::permissions::Role;

/// A stored user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub user_id: i64,
    pub username: String,
    pub password_hash: String,
    pub role: Role,
    pub scope: Scope,
    pub disabled: bool,
    pub totp_secret: Option<String>,
    pub totp_enabled: bool,
    pub totp_last_step: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A `users` row as selected ([`USER_COLUMNS`]): secrets sealed, role and scope as text.
#[derive(sqlx::FromRow)]
struct UserDbRow {
    user_id: i64,
    username: String,
    password_hash: String,
    role: String,
    scope: String,
    disabled: i64,
    totp_secret: Option<String>,
    totp_enabled: i64,
    totp_last_step: i64,
    created_at_ms: i64,
    updated_at_ms: i64,
}
const USER_COLUMNS: &str = "user_id, username, password_hash, role, scope, disabled, totp_secret, totp_enabled, \
     totp_last_step, created_at_ms, updated_at_ms";

fn user_from(db: &Db, t: UserDbRow) -> Result<UserRow, StoreError> {
    let UserDbRow {
        user_id,
        username,
        password_hash,
        role,
        scope,
        disabled,
        totp_secret,
        totp_enabled,
        totp_last_step: last,
        created_at_ms: created,
        updated_at_ms: updated,
    } = t;
    let totp_secret = totp_secret.map(|s| sealed::open(db, &sealed::totp_context(user_id), &s)).transpose()?;
    let role = Role::parse(&role).ok_or_else(|| StoreError::Corrupt(format!("role {role:?} of user {user_id}")))?;
    Ok(UserRow {
        user_id,
        username,
        password_hash,
        role,
        scope: parse_scope(&scope)?,
        disabled: disabled != 0,
        totp_secret,
        totp_enabled: totp_enabled != 0,
        totp_last_step: last,
        created_at_ms: created,
        updated_at_ms: updated,
    })
}

pub(crate) fn parse_scope(s: &str) -> Result<Scope, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("scope {s:?}: {e}")))
}

pub(crate) fn scope_text(scope: &Scope) -> Result<String, StoreError> {
    serde_json::to_string(scope).map_err(|e| StoreError::InvalidData(format!("scope: {e}")))
}

/// A session (one refresh-token family).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub session_id: String,
    pub user_id: i64,
    pub amr: String,
    pub expires_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

/// What became of a presented refresh token in [`AuthStore::use_refresh_token`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshUse {
    /// Unknown token.
    Unknown,
    /// The token was already used: its session has now been revoked (a stolen token was replayed
    /// or a client raced itself; either way the family is no longer trusted).
    Reused { session_id: String, user_id: i64 },
    /// The session is revoked or expired.
    Dead { session_id: String },
    /// Valid: marked used, the new token stored in the same session.
    Rotated(SessionRow),
}

/// A signing key as stored.
#[derive(Debug, Clone)]
pub struct SigningKeyRow {
    pub kid: String,
    pub private_pem: String,
    pub n: String,
    pub e: String,
    pub created_at_ms: i64,
    pub retired_at_ms: Option<i64>,
}

/// An API key as stored (never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRow {
    pub key_id: String,
    pub name: String,
    pub secret_hash: String,
    pub permissions: Vec<String>,
    pub scope: Scope,
    pub created_by: String,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub last_used_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
}

/// An `api_keys` row as selected ([`API_KEY_COLUMNS`]): permissions and scope as JSON text.
#[derive(sqlx::FromRow)]
struct ApiKeyDbRow {
    key_id: String,
    name: String,
    secret_hash: String,
    permissions: String,
    scope: String,
    created_by: String,
    created_at_ms: i64,
    expires_at_ms: Option<i64>,
    last_used_ms: Option<i64>,
    revoked_at_ms: Option<i64>,
}
const API_KEY_COLUMNS: &str = "key_id, name, secret_hash, permissions, scope, created_by, created_at_ms, expires_at_ms, last_used_ms, revoked_at_ms";

fn api_key_from(t: ApiKeyDbRow) -> Result<ApiKeyRow, StoreError> {
    let ApiKeyDbRow {
        key_id,
        name,
        secret_hash,
        permissions,
        scope,
        created_by,
        created_at_ms,
        expires_at_ms,
        last_used_ms,
        revoked_at_ms: revoked,
    } = t;
    let permissions = serde_json::from_str(&permissions)
        .map_err(|e| StoreError::Corrupt(format!("permissions of API key {key_id}: {e}")))?;
    Ok(ApiKeyRow {
        key_id,
        name,
        secret_hash,
        permissions,
        scope: parse_scope(&scope)?,
        created_by,
        created_at_ms,
        expires_at_ms,
        last_used_ms,
        revoked_at_ms: revoked,
    })
}

/// One audit log entry to write.
#[derive(Debug, Clone, Default)]
pub struct AuditEntry {
    pub actor: String,
    pub action: &'static str,
    pub target: Option<String>,
    /// `success`, `failure` or `denied`.
    pub outcome: &'static str,
    pub client_addr: Option<String>,
    pub detail: serde_json::Value,
}

/// One audit log entry as read back.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AuditRecord {
    pub id: i64,
    pub at_ms: i64,
    #[serde(rename = "@timestamp")]
    pub timestamp: String,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub outcome: String,
    pub client_addr: Option<String>,
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

/// Filter of [`AuthStore::query_audit`].
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// Entries with an id below this (the cursor).
    pub before_id: Option<i64>,
    pub limit: u32,
}

/// One counted attempt of a throttle key ([`AuthStore::reserve_attempt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// The attempt may go on (the key is not locked and this attempt is within the limit).
    pub allowed: bool,
    /// Attempts counted in the window, this one included.
    pub failures: i64,
    /// Locked until then (when not allowed).
    pub locked_until_ms: Option<i64>,
}

/// The storage of the auth module.
#[derive(Debug, Clone)]
pub struct AuthStore {
    db: Db,
}

impl AuthStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    // --- users -------------------------------------------------------------------------------

    /// Creates a user; `Conflict` when the name is taken.
    pub async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        role: Role,
        scope: &Scope,
        now_ms: i64,
    ) -> Result<i64, StoreError> {
        let scope = scope_text(scope)?;
        let sql = "INSERT INTO users (username, password_hash, role, scope, created_at_ms, updated_at_ms) \
                   VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (username) DO NOTHING RETURNING user_id";
        let id: Option<i64> = on_db!(self.db.write(), pool => sqlx::query_scalar(sql)
            .bind(username).bind(password_hash).bind(role.as_str()).bind(&scope).bind(now_ms)
            .fetch_optional(pool).await)?;
        id.ok_or_else(|| StoreError::Conflict(format!("user {username:?} exists")))
    }

    pub async fn user_by_name(&self, username: &str) -> Result<Option<UserRow>, StoreError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE username = $1");
        let row: Option<UserDbRow> = on_db!(self.db.write(), pool => sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str())).bind(username).fetch_optional(pool).await)?;
        row.map(|r| user_from(&self.db, r)).transpose()
    }

    pub async fn user_by_id(&self, user_id: i64) -> Result<Option<UserRow>, StoreError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE user_id = $1");
        let row: Option<UserDbRow> = on_db!(self.db.write(), pool => sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str())).bind(user_id).fetch_optional(pool).await)?;
        row.map(|r| user_from(&self.db, r)).transpose()
    }

    pub async fn list_users(&self) -> Result<Vec<UserRow>, StoreError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users ORDER BY user_id");
        let rows: Vec<UserDbRow> =
            on_db!(self.db.read(), pool => sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str())).fetch_all(pool).await)?;
        rows.into_iter().map(|r| user_from(&self.db, r)).collect()
    }

    pub async fn count_users(&self) -> Result<i64, StoreError> {
        Ok(on_db!(self.db.read(), pool => sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(pool).await)?)
    }

    /// Updates role, scope and disabled flag.
    pub async fn update_user(
        &self,
        user_id: i64,
        role: Role,
        scope: &Scope,
        disabled: bool,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let scope = scope_text(scope)?;
        let sql = "UPDATE users SET role = $1, scope = $2, disabled = $3, updated_at_ms = $4 WHERE user_id = $5";
        let n = on_db!(self.db.write(), pool => sqlx::query(sql)
            .bind(role.as_str()).bind(&scope).bind(i64::from(disabled)).bind(now_ms).bind(user_id)
            .execute(pool).await.map(|r| r.rows_affected()))?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("user {user_id}")));
        }
        Ok(())
    }

    pub async fn set_password(&self, user_id: i64, hash: &str, now_ms: i64) -> Result<(), StoreError> {
        let sql = "UPDATE users SET password_hash = $1, updated_at_ms = $2 WHERE user_id = $3";
        on_db!(self.db.write(), pool => sqlx::query(sql).bind(hash).bind(now_ms).bind(user_id).execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Starts (or restarts) TOTP enrolment: stores the secret, not yet enabled.
    pub async fn set_pending_totp(&self, user_id: i64, secret_b32: &str, now_ms: i64) -> Result<(), StoreError> {
        let secret = sealed::seal(&self.db, &sealed::totp_context(user_id), secret_b32)?;
        let sql = "UPDATE users SET totp_secret = $1, totp_enabled = 0, totp_last_step = 0, updated_at_ms = $2 \
                   WHERE user_id = $3";
        on_db!(self.db.write(), pool => sqlx::query(sql).bind(&secret).bind(now_ms).bind(user_id).execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Records the TOTP step just accepted, only if it is newer than every step accepted before
    /// (atomic: of two concurrent uses of one code exactly one wins). `false` = replay.
    pub async fn accept_totp_step(&self, user_id: i64, step: i64) -> Result<bool, StoreError> {
        let sql = "UPDATE users SET totp_last_step = $1 WHERE user_id = $2 AND totp_last_step < $1";
        let n = on_db!(self.db.write(), pool => sqlx::query(sql).bind(step).bind(user_id)
            .execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(n == 1)
    }

    /// Enables TOTP and replaces the recovery codes, in one transaction.
    pub async fn enable_totp(&self, user_id: i64, recovery_hashes: &[String], now_ms: i64) -> Result<(), StoreError> {
        on_db!(self.db.write(), pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("UPDATE users SET totp_enabled = 1, updated_at_ms = $1 WHERE user_id = $2")
                .bind(now_ms).bind(user_id).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
            for h in recovery_hashes {
                sqlx::query("INSERT INTO recovery_codes (user_id, code_hash) VALUES ($1, $2)")
                    .bind(user_id).bind(h).execute(&mut *tx).await?;
            }
            tx.commit().await
        })?;
        Ok(())
    }

    /// Turns TOTP off and forgets the secret and recovery codes.
    pub async fn disable_totp(&self, user_id: i64, now_ms: i64) -> Result<(), StoreError> {
        on_db!(self.db.write(), pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("UPDATE users SET totp_enabled = 0, totp_secret = NULL, totp_last_step = 0, updated_at_ms = $1 WHERE user_id = $2")
                .bind(now_ms).bind(user_id).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
            tx.commit().await
        })?;
        Ok(())
    }

    /// Uses a recovery code (by hash) once; `false` if unknown or used.
    pub async fn use_recovery_code(&self, user_id: i64, code_hash: &str, now_ms: i64) -> Result<bool, StoreError> {
        let sql =
            "UPDATE recovery_codes SET used_at_ms = $1 WHERE user_id = $2 AND code_hash = $3 AND used_at_ms IS NULL";
        let n = on_db!(self.db.write(), pool => sqlx::query(sql).bind(now_ms).bind(user_id).bind(code_hash)
            .execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(n == 1)
    }

    pub async fn unused_recovery_codes(&self, user_id: i64) -> Result<i64, StoreError> {
        let sql = "SELECT COUNT(*) FROM recovery_codes WHERE user_id = $1 AND used_at_ms IS NULL";
        Ok(on_db!(self.db.read(), pool => sqlx::query_scalar(sql).bind(user_id).fetch_one(pool).await)?)
    }

    // --- sessions and refresh tokens ---------------------------------------------------------

    /// Creates a session with its first refresh token.
    pub async fn create_session(
        &self,
        session: &SessionRow,
        first_token_hash: &str,
        client_addr: Option<&str>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        on_db!(self.db.write(), pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("INSERT INTO sessions (session_id, user_id, amr, created_at_ms, expires_at_ms, client_addr) VALUES ($1, $2, $3, $4, $5, $6)")
                .bind(&session.session_id).bind(session.user_id).bind(&session.amr).bind(now_ms)
                .bind(session.expires_at_ms).bind(client_addr).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO refresh_tokens (token_hash, session_id, issued_at_ms) VALUES ($1, $2, $3)")
                .bind(first_token_hash).bind(&session.session_id).bind(now_ms).execute(&mut *tx).await?;
            tx.commit().await
        })?;
        Ok(())
    }

    /// Rotates a refresh token: the presented one is marked used (atomically, so one of two
    /// concurrent uses wins) and `next_hash` stored in its session. Reuse revokes the session.
    pub async fn use_refresh_token(
        &self,
        token_hash: &str,
        next_hash: &str,
        now_ms: i64,
    ) -> Result<RefreshUse, StoreError> {
        type Found = (String, Option<i64>, i64, String, i64, Option<i64>);
        let sql = "SELECT t.session_id, t.used_at_ms, s.user_id, s.amr, s.expires_at_ms, s.revoked_at_ms \
                   FROM refresh_tokens t JOIN sessions s ON s.session_id = t.session_id WHERE t.token_hash = $1";
        let found: Option<Found> =
            on_db!(self.db.write(), pool => sqlx::query_as(sql).bind(token_hash).fetch_optional(pool).await)?;
        let Some((session_id, used, user_id, amr, expires_at_ms, revoked_at_ms)) = found else {
            return Ok(RefreshUse::Unknown);
        };
        if revoked_at_ms.is_some() || expires_at_ms <= now_ms {
            return Ok(RefreshUse::Dead { session_id });
        }
        if used.is_some() {
            self.revoke_session(&session_id, "refresh token reused", now_ms).await?;
            return Ok(RefreshUse::Reused { session_id, user_id });
        }
        let won = on_db!(self.db.write(), pool => {
            let mut tx = pool.begin().await?;
            let n = sqlx::query("UPDATE refresh_tokens SET used_at_ms = $1 WHERE token_hash = $2 AND used_at_ms IS NULL")
                .bind(now_ms).bind(token_hash).execute(&mut *tx).await?.rows_affected();
            if n == 1 {
                sqlx::query("INSERT INTO refresh_tokens (token_hash, session_id, issued_at_ms) VALUES ($1, $2, $3)")
                    .bind(next_hash).bind(&session_id).bind(now_ms).execute(&mut *tx).await?;
            }
            tx.commit().await.map(|()| n == 1)
        })?;
        if !won {
            self.revoke_session(&session_id, "refresh token reused", now_ms).await?;
            return Ok(RefreshUse::Reused { session_id, user_id });
        }
        Ok(RefreshUse::Rotated(SessionRow { session_id, user_id, amr, expires_at_ms, revoked_at_ms: None }))
    }

    /// The session a refresh token belongs to, if any (for logout by refresh token).
    pub async fn session_of_refresh_token(&self, token_hash: &str) -> Result<Option<(String, i64)>, StoreError> {
        let sql = "SELECT s.session_id, s.user_id FROM refresh_tokens t JOIN sessions s ON s.session_id = t.session_id \
                   WHERE t.token_hash = $1";
        Ok(on_db!(self.db.write(), pool => sqlx::query_as(sql).bind(token_hash).fetch_optional(pool).await)?)
    }

    /// Revokes one session (idempotent: the first reason stays).
    pub async fn revoke_session(&self, session_id: &str, reason: &str, now_ms: i64) -> Result<bool, StoreError> {
        let sql = "UPDATE sessions SET revoked_at_ms = $1, revoked_reason = $2 WHERE session_id = $3 AND revoked_at_ms IS NULL";
        let n = on_db!(self.db.write(), pool => sqlx::query(sql).bind(now_ms).bind(reason).bind(session_id)
            .execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(n == 1)
    }

    /// Revokes every live session of a user; returns how many.
    pub async fn revoke_user_sessions(&self, user_id: i64, reason: &str, now_ms: i64) -> Result<u64, StoreError> {
        let sql =
            "UPDATE sessions SET revoked_at_ms = $1, revoked_reason = $2 WHERE user_id = $3 AND revoked_at_ms IS NULL";
        Ok(on_db!(self.db.write(), pool => sqlx::query(sql).bind(now_ms).bind(reason).bind(user_id)
            .execute(pool).await.map(|r| r.rows_affected()))?)
    }

    /// Sessions revoked at or after `since_ms` (the revocation cache polls this).
    pub async fn revoked_since(&self, since_ms: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let sql = "SELECT session_id, revoked_at_ms FROM sessions WHERE revoked_at_ms >= $1";
        let rows: Vec<(String, Option<i64>)> =
            on_db!(self.db.read(), pool => sqlx::query_as(sql).bind(since_ms).fetch_all(pool).await)?;
        Ok(rows.into_iter().map(|(s, t)| (s, t.unwrap_or(since_ms))).collect())
    }

    pub async fn session(&self, session_id: &str) -> Result<Option<SessionRow>, StoreError> {
        let sql = "SELECT session_id, user_id, amr, expires_at_ms, revoked_at_ms FROM sessions WHERE session_id = $1";
        let row: Option<(String, i64, String, i64, Option<i64>)> =
            on_db!(self.db.write(), pool => sqlx::query_as(sql).bind(session_id).fetch_optional(pool).await)?;
        Ok(row.map(|(session_id, user_id, amr, expires_at_ms, revoked_at_ms)| SessionRow {
            session_id,
            user_id,
            amr,
            expires_at_ms,
            revoked_at_ms,
        }))
    }

    /// Deletes sessions (and their tokens) expired before `before_ms`.
    pub async fn purge_sessions(&self, before_ms: i64) -> Result<u64, StoreError> {
        Ok(on_db!(self.db.write(), pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM refresh_tokens WHERE session_id IN (SELECT session_id FROM sessions WHERE expires_at_ms < $1)")
                .bind(before_ms).execute(&mut *tx).await?;
            let n = sqlx::query("DELETE FROM sessions WHERE expires_at_ms < $1").bind(before_ms).execute(&mut *tx).await?.rows_affected();
            tx.commit().await.map(|()| n)
        })?)
    }

    // --- signing keys ------------------------------------------------------------------------

    pub async fn insert_signing_key(&self, key: &SigningKeyRow) -> Result<(), StoreError> {
        let private_pem = sealed::seal(&self.db, &sealed::signing_key_context(&key.kid), &key.private_pem)?;
        let sql = "INSERT INTO signing_keys (kid, private_pem, n, e, created_at_ms) VALUES ($1, $2, $3, $4, $5)";
        on_db!(self.db.write(), pool => sqlx::query(sql).bind(&key.kid).bind(&private_pem).bind(&key.n)
            .bind(&key.e).bind(key.created_at_ms).execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Retires every key but `keep_kid`.
    pub async fn retire_signing_keys_except(&self, keep_kid: &str, now_ms: i64) -> Result<(), StoreError> {
        let sql = "UPDATE signing_keys SET retired_at_ms = $1 WHERE kid <> $2 AND retired_at_ms IS NULL";
        on_db!(self.db.write(), pool => sqlx::query(sql).bind(now_ms).bind(keep_kid).execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Keys not retired, or retired at or after `retired_after_ms`, newest first.
    pub async fn signing_keys(&self, retired_after_ms: i64) -> Result<Vec<SigningKeyRow>, StoreError> {
        let sql = "SELECT kid, private_pem, n, e, created_at_ms, retired_at_ms FROM signing_keys \
                   WHERE retired_at_ms IS NULL OR retired_at_ms >= $1 ORDER BY created_at_ms DESC, kid DESC";
        let rows: Vec<(String, String, String, String, i64, Option<i64>)> =
            on_db!(self.db.write(), pool => sqlx::query_as(sql).bind(retired_after_ms).fetch_all(pool).await)?;
        rows.into_iter()
            .map(|(kid, private_pem, n, e, created_at_ms, retired_at_ms)| {
                Ok(SigningKeyRow {
                    private_pem: sealed::open(&self.db, &sealed::signing_key_context(&kid), &private_pem)?,
                    kid,
                    n,
                    e,
                    created_at_ms,
                    retired_at_ms,
                })
            })
            .collect()
    }

    // --- API keys ----------------------------------------------------------------------------

    pub async fn insert_api_key(&self, key: &ApiKeyRow) -> Result<(), StoreError> {
        let perms = serde_json::to_string(&key.permissions).map_err(|e| StoreError::InvalidData(e.to_string()))?;
        let scope = scope_text(&key.scope)?;
        let sql = "INSERT INTO api_keys (key_id, name, secret_hash, permissions, scope, created_by, created_at_ms, expires_at_ms) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
        on_db!(self.db.write(), pool => sqlx::query(sql).bind(&key.key_id).bind(&key.name).bind(&key.secret_hash)
            .bind(&perms).bind(&scope).bind(&key.created_by).bind(key.created_at_ms).bind(key.expires_at_ms)
            .execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    pub async fn api_key(&self, key_id: &str) -> Result<Option<ApiKeyRow>, StoreError> {
        let sql = format!("SELECT {API_KEY_COLUMNS} FROM api_keys WHERE key_id = $1");
        let row: Option<ApiKeyDbRow> = on_db!(self.db.read(), pool => sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str())).bind(key_id).fetch_optional(pool).await)?;
        row.map(api_key_from).transpose()
    }

    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyRow>, StoreError> {
        let sql = format!("SELECT {API_KEY_COLUMNS} FROM api_keys ORDER BY created_at_ms, key_id");
        let rows: Vec<ApiKeyDbRow> =
            on_db!(self.db.read(), pool => sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str())).fetch_all(pool).await)?;
        rows.into_iter().map(api_key_from).collect()
    }

    pub async fn revoke_api_key(&self, key_id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let sql = "UPDATE api_keys SET revoked_at_ms = $1 WHERE key_id = $2 AND revoked_at_ms IS NULL";
        let n = on_db!(self.db.write(), pool => sqlx::query(sql).bind(now_ms).bind(key_id)
            .execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(n == 1)
    }

    pub async fn touch_api_key(&self, key_id: &str, now_ms: i64) -> Result<(), StoreError> {
        let sql = "UPDATE api_keys SET last_used_ms = $1 WHERE key_id = $2";
        on_db!(self.db.write(), pool => sqlx::query(sql).bind(now_ms).bind(key_id).execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    // --- role policies -----------------------------------------------------------------------

    /// Roles that must use MFA.
    pub async fn mfa_required_roles(&self) -> Result<Vec<Role>, StoreError> {
        let rows: Vec<String> = on_db!(self.db.read(), pool =>
            sqlx::query_scalar("SELECT role FROM role_policies WHERE require_mfa = 1 ORDER BY role").fetch_all(pool).await)?;
        Ok(rows.iter().filter_map(|r| Role::parse(r)).collect())
    }

    pub async fn role_requires_mfa(&self, role: Role) -> Result<bool, StoreError> {
        let v: Option<i64> = on_db!(self.db.write(), pool =>
            sqlx::query_scalar("SELECT require_mfa FROM role_policies WHERE role = $1").bind(role.as_str()).fetch_optional(pool).await)?;
        Ok(v.unwrap_or(0) != 0)
    }

    pub async fn set_role_requires_mfa(&self, role: Role, require: bool, now_ms: i64) -> Result<(), StoreError> {
        let sql = "INSERT INTO role_policies (role, require_mfa, updated_at_ms) VALUES ($1, $2, $3) \
                   ON CONFLICT (role) DO UPDATE SET require_mfa = $2, updated_at_ms = $3";
        on_db!(self.db.write(), pool => sqlx::query(sql).bind(role.as_str()).bind(i64::from(require)).bind(now_ms)
            .execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    // --- throttling --------------------------------------------------------------------------

    /// Counts an attempt for `key` **before** its credential is checked, in one statement (so
    /// concurrent attempts are counted one by one): a new window starts when the old one has
    /// passed; a locked key is not counted. When this attempt goes beyond `max_failures` in the
    /// window the key is locked until `now + lock_ms` at once. The answer says whether the
    /// attempt may go on ([`Attempt::allowed`]).
    pub async fn reserve_attempt(
        &self,
        key: &str,
        now_ms: i64,
        window_ms: i64,
        max_failures: i64,
        lock_ms: i64,
    ) -> Result<Attempt, StoreError> {
        let sql = "INSERT INTO login_throttle (throttle_key, failures, window_start_ms) VALUES ($1, 1, $2) \
                   ON CONFLICT (throttle_key) DO UPDATE SET \
                     failures = CASE WHEN COALESCE(login_throttle.locked_until_ms, 0) > $2 THEN login_throttle.failures \
                       WHEN login_throttle.window_start_ms <= $2 - $3 THEN 1 ELSE login_throttle.failures + 1 END, \
                     window_start_ms = CASE WHEN COALESCE(login_throttle.locked_until_ms, 0) > $2 THEN login_throttle.window_start_ms \
                       WHEN login_throttle.window_start_ms <= $2 - $3 THEN $2 ELSE login_throttle.window_start_ms END \
                   RETURNING failures, locked_until_ms";
        let (failures, locked): (i64, Option<i64>) = on_db!(self.db.write(), pool =>
            sqlx::query_as(sql).bind(key).bind(now_ms).bind(window_ms).fetch_one(pool).await)?;
        if let Some(until) = locked.filter(|u| *u > now_ms) {
            return Ok(Attempt { allowed: false, failures, locked_until_ms: Some(until) });
        }
        if failures > max_failures {
            let until = self.lock_throttle(key, now_ms, lock_ms).await?;
            return Ok(Attempt { allowed: false, failures, locked_until_ms: Some(until) });
        }
        Ok(Attempt { allowed: true, failures, locked_until_ms: None })
    }

    /// Locks `key` until `now + lock_ms` (a new window starts after it); returns that time.
    pub async fn lock_throttle(&self, key: &str, now_ms: i64, lock_ms: i64) -> Result<i64, StoreError> {
        let until = now_ms.saturating_add(lock_ms);
        let sql = "UPDATE login_throttle SET locked_until_ms = $1, failures = 0, window_start_ms = $2 WHERE throttle_key = $3";
        on_db!(self.db.write(), pool => sqlx::query(sql).bind(until).bind(now_ms).bind(key).execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(until)
    }

    /// Takes back one counted attempt of `key` (it succeeded, or was never checked).
    pub async fn refund_attempt(&self, key: &str) -> Result<(), StoreError> {
        let sql = "UPDATE login_throttle SET failures = CASE WHEN failures > 0 THEN failures - 1 ELSE 0 END \
                   WHERE throttle_key = $1";
        on_db!(self.db.write(), pool => sqlx::query(sql).bind(key).execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    pub async fn clear_throttle(&self, key: &str) -> Result<(), StoreError> {
        on_db!(self.db.write(), pool =>
            sqlx::query("DELETE FROM login_throttle WHERE throttle_key = $1").bind(key).execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Deletes the throttle rows whose window ended before `window_start_before_ms` and that are
    /// not locked at `now_ms`; returns how many.
    pub async fn purge_throttle(&self, window_start_before_ms: i64, now_ms: i64) -> Result<u64, StoreError> {
        let sql = "DELETE FROM login_throttle WHERE window_start_ms < $1 AND COALESCE(locked_until_ms, 0) <= $2";
        Ok(on_db!(self.db.write(), pool => sqlx::query(sql).bind(window_start_before_ms).bind(now_ms)
            .execute(pool).await.map(|r| r.rows_affected()))?)
    }

    /// Rows in the throttle table.
    pub async fn throttle_rows(&self) -> Result<i64, StoreError> {
        Ok(
            on_db!(self.db.read(), pool => sqlx::query_scalar("SELECT COUNT(*) FROM login_throttle").fetch_one(pool).await)?,
        )
    }

    // --- audit -------------------------------------------------------------------------------

    pub async fn audit(&self, entry: &AuditEntry, now_ms: i64) -> Result<(), StoreError> {
        let detail = serde_json::to_string(&entry.detail).map_err(|e| StoreError::InvalidData(e.to_string()))?;
        let sql = "INSERT INTO audit_log (at_ms, actor, action, target, outcome, client_addr, detail) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7)";
        on_db!(self.db.write(), pool => sqlx::query(sql).bind(now_ms).bind(&entry.actor).bind(entry.action)
            .bind(entry.target.as_deref()).bind(entry.outcome).bind(entry.client_addr.as_deref()).bind(&detail)
            .execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Deletes at most `batch` audit entries older than `before_ms`, oldest first; returns how
    /// many.
    pub async fn purge_audit_before(&self, before_ms: i64, batch: i64) -> Result<u64, StoreError> {
        let sql = "DELETE FROM audit_log WHERE id IN \
                   (SELECT id FROM audit_log WHERE at_ms < $1 ORDER BY id LIMIT $2)";
        Ok(on_db!(self.db.write(), pool => sqlx::query(sql).bind(before_ms).bind(batch)
            .execute(pool).await.map(|r| r.rows_affected()))?)
    }

    /// Deletes at most `batch` of the oldest audit entries beyond the newest `keep`; returns how
    /// many.
    pub async fn trim_audit(&self, keep: i64, batch: i64) -> Result<u64, StoreError> {
        let sql = "DELETE FROM audit_log WHERE id IN (SELECT id FROM audit_log WHERE id <= \
                   (SELECT id FROM audit_log ORDER BY id DESC LIMIT 1 OFFSET $1) ORDER BY id LIMIT $2)";
        Ok(on_db!(self.db.write(), pool => sqlx::query(sql).bind(keep).bind(batch)
            .execute(pool).await.map(|r| r.rows_affected()))?)
    }

    /// Entries in the audit log.
    pub async fn audit_rows(&self) -> Result<i64, StoreError> {
        Ok(on_db!(self.db.read(), pool => sqlx::query_scalar("SELECT COUNT(*) FROM audit_log").fetch_one(pool).await)?)
    }

    /// API keys revoked at or after `since_ms` (the revocation cache polls this).
    pub async fn api_keys_revoked_since(&self, since_ms: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let sql = "SELECT key_id, revoked_at_ms FROM api_keys WHERE revoked_at_ms >= $1";
        let rows: Vec<(String, Option<i64>)> =
            on_db!(self.db.read(), pool => sqlx::query_as(sql).bind(since_ms).fetch_all(pool).await)?;
        Ok(rows.into_iter().map(|(k, t)| (k, t.unwrap_or(since_ms))).collect())
    }

    /// Newest first; `limit + 1` rows are read so the caller knows whether there is more.
    pub async fn query_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let sql = "SELECT id, at_ms, actor, action, target, outcome, client_addr, detail FROM audit_log \
                   WHERE ($1 IS NULL OR actor = $1) AND ($2 IS NULL OR action = $2) \
                   AND ($3 IS NULL OR at_ms >= $3) AND ($4 IS NULL OR at_ms < $4) AND ($5 IS NULL OR id < $5) \
                   ORDER BY id DESC LIMIT $6";
        type Row = (i64, i64, String, String, Option<String>, String, Option<String>, String);
        let limit = i64::from(q.limit) + 1;
        let rows: Vec<Row> = on_db!(self.db.read(), pool => sqlx::query_as(sql)
            .bind(q.actor.as_deref()).bind(q.action.as_deref()).bind(q.from_ms).bind(q.to_ms).bind(q.before_id)
            .bind(limit).fetch_all(pool).await)?;
        rows.into_iter()
            .map(|(id, at_ms, actor, action, target, outcome, client_addr, detail)| {
                Ok(AuditRecord {
                    id,
                    at_ms,
                    timestamp: crate::store::format_timestamp_ms(at_ms),
                    actor,
                    action,
                    target,
                    outcome,
                    client_addr,
                    detail: serde_json::from_str(&detail)
                        .map_err(|e| StoreError::Corrupt(format!("audit entry {id}: {e}")))?,
                })
            })
            .collect()
    }
}
