//! Authentication and authorisation: who is calling ([`Principal`]) and what they may do.
//!
//! - People sign in with a name and password (argon2id, [`secrets`]); with MFA enabled a second
//!   step takes a TOTP code or a one-time recovery code. They get a short-lived RS256 access
//!   token ([`tokens`]) and a refresh token. A refresh token is used once: using it returns a new
//!   pair; using it twice revokes its whole family (the session), since one of the two users of
//!   it is not who they claim. Logout revokes the session. Changing a user's role, grants,
//!   password or MFA revokes their sessions too, so a token never outlives the rights it carries
//!   by more than the revocation poll (1 s).
//! - Integrations use API keys (`its_<id>_<secret>`), scoped to permissions and sites, stored
//!   hashed, with expiry and last-used time.
//! - Sign-in is throttled per account name and per client address (an IPv6 client by its /64),
//!   with lockout. Each attempt is counted **before** its password or code is checked, in one
//!   statement per key, so a burst of concurrent attempts cannot get past the limit; a correct
//!   one takes its count back. Every answer about credentials is the same whether the account
//!   exists or not, and costs the same time. Password hashing runs on a bounded pool
//!   ([`hashing`]): its memory is fixed, and a request that would wait too long is refused.
//!   The same counting guards the other checks of a secret: the second factor, a password
//!   change, turning MFA on or off.
//! - An access token is accepted only for a session that exists and is not revoked (checked
//!   against the database at most once a minute per session, revocations within a second), so a
//!   token minted with a stolen signing key for a made-up session is refused.
//! - Long-lived answers (the live stream) ask [`AuthService::still_valid`] whenever revocations
//!   arrive ([`AuthService::revocations`]) and when the credential expires.
//! - Security-relevant actions go to the audit log ([`store::AuditEntry`]); failures anyone can
//!   cause are summarised ([`audit_digest`]); the log has a retention of its own
//!   (`[audit]`), independent of the events'.
//!
//! Inside: this file ([`AuthService`], [`Principal`]), [`hashing`] (the bounded argon2 pool),
//! [`secrets`] (tokens, hashes, constant-time comparison), [`tokens`] (JWT signing keys),
//! [`audit_digest`]; the roles are [`crate::model::permissions`], the tables
//! [`crate::store::auth`] (re-exported as [`store`]).
//!
//! Dependencies: store, model, telemetry. Never http, config, mqtt.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::{Db, Scope, StoreError};
use crate::unix_ms;

pub mod audit_digest;
pub mod hashing;
pub mod secrets;
pub mod tokens;

pub use crate::model::permissions;
pub use crate::store::auth as store;
pub use permissions::{Access, Permission, PermissionSet, Role};
use store::{ApiKeyRow, AuditEntry, AuthStore, RefreshUse, SessionRow, UserRow};
use tokens::{AUDIENCE_ACCESS, AUDIENCE_MFA, ISSUER, KeyRing, TokenError};

/// Lifetimes and limits.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Access token lifetime (default 10 minutes).
    pub access_ttl: Duration,
    /// Session lifetime: refresh tokens stop working this long after sign-in (default 14 days).
    pub session_ttl: Duration,
    /// Time to enter the second factor after the password (default 5 minutes).
    pub mfa_ttl: Duration,
    /// Automatic signing key rotation (default 30 days; zero = only by hand).
    pub key_rotation: Duration,
    /// Failed sign-ins per account name within `throttle_window` before it is locked.
    pub max_failures_per_account: i64,
    /// Failed sign-ins per client address within `throttle_window` before it is locked.
    pub max_failures_per_addr: i64,
    pub throttle_window: Duration,
    pub lockout: Duration,
    /// Name shown by authenticator apps.
    pub issuer_name: String,
    /// Password hashing workers (each holds 19 MiB while it works).
    pub hash_workers: usize,
    /// Password checks that may wait for a worker before more are refused with 503.
    pub hash_queue: usize,
    /// Audit entries older than this are deleted (`None`: kept).
    pub audit_max_age: Option<Duration>,
    /// At most this many audit entries are kept, the newest (`None`: no limit).
    pub audit_max_rows: Option<u64>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            access_ttl: Duration::from_secs(600),
            session_ttl: Duration::from_secs(14 * 86_400),
            mfa_ttl: Duration::from_secs(300),
            key_rotation: Duration::from_secs(30 * 86_400),
            max_failures_per_account: 5,
            max_failures_per_addr: 20,
            throttle_window: Duration::from_secs(900),
            lockout: Duration::from_secs(900),
            issuer_name: "ITS Camera AI".into(),
            // One per CPU: argon2 is CPU-bound, more workers only add memory.
            hash_workers: std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 16),
            // A few seconds of sign-ins at ~40 ms each per worker; beyond that, answer at once.
            hash_queue: 64,
            // A year of who-did-what, and at most a million entries (a few hundred MB).
            audit_max_age: Some(Duration::from_secs(365 * 86_400)),
            audit_max_rows: Some(1_000_000),
        }
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AccessClaims {
    pub iss: String,
    pub aud: String,
    /// User id.
    pub sub: String,
    /// Username.
    pub name: String,
    pub role: Role,
    /// Session (refresh-token family) id.
    pub sid: String,
    pub scope: Scope,
    /// How the user authenticated: `["pwd"]` or `["pwd", "otp"]`.
    pub amr: Vec<String>,
    pub iat: i64,
    pub exp: i64,
    /// Set when the role requires MFA and the user has not enrolled: the token only allows
    /// enrolling.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mfa_enrolment_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MfaClaims {
    iss: String,
    aud: String,
    sub: String,
    iat: i64,
    exp: i64,
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq)]
pub enum Subject {
    User { user_id: i64, username: String, role: Role, session_id: String },
    ApiKey { key_id: String, name: String },
}

/// An authenticated caller with what it may do and see.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub subject: Subject,
    pub permissions: PermissionSet,
    pub scope: Scope,
    /// Only MFA enrolment is allowed until the user enrols (the role requires MFA).
    pub mfa_enrolment_only: bool,
    /// When the credential stops working (the access token's `exp`, an API key's expiry), Unix
    /// ms; `None`: never by itself.
    pub expires_at_ms: Option<i64>,
}

impl Principal {
    /// The audit log's name for the caller: `user:<name>` or `apikey:<id>`.
    pub fn actor(&self) -> String {
        match &self.subject {
            Subject::User { username, .. } => format!("user:{username}"),
            Subject::ApiKey { key_id, .. } => format!("apikey:{key_id}"),
        }
    }

    pub fn user_id(&self) -> Option<i64> {
        match &self.subject {
            Subject::User { user_id, .. } => Some(*user_id),
            Subject::ApiKey { .. } => None,
        }
    }

    pub fn can(&self, p: Permission) -> bool {
        self.permissions.contains(p)
    }

    /// Whether the caller may give (or manage) a credential of `permissions` seeing `scope`: it
    /// holds every one of those permissions and sees at least as much. Nobody hands out more
    /// than they have.
    pub fn may_grant(&self, permissions: PermissionSet, scope: &Scope) -> bool {
        permissions.is_subset(self.permissions) && scope_within(scope, &self.scope)
    }

    /// Whether the caller may manage a user of `role` with `scope` (its effective scope).
    pub fn may_manage_user(&self, role: Role, scope: &Scope) -> bool {
        self.may_grant(role.permissions(), &effective_scope(role, scope))
    }

    /// Whether the caller sees every site (writes that span sites need it).
    pub fn sees_everything(&self) -> bool {
        self.scope == Scope::All
    }
}

/// Access and refresh token, as returned by sign-in and refresh.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// The session's id (revoked by logout).
    pub session_id: String,
    /// True when the role requires MFA and the user has not enrolled yet: the access token only
    /// allows `POST /api/v1/auth/mfa/enroll` and `/confirm`.
    pub mfa_enrolment_required: bool,
}

/// What sign-in answers.
#[derive(Debug, Clone)]
pub enum LoginOutcome {
    Tokens(TokenPair),
    /// Password accepted; the second factor is needed: send it with this token.
    MfaRequired {
        mfa_token: String,
        expires_in: u64,
    },
}

/// Why authentication failed. Messages are generic on purpose.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required")]
    Missing,
    #[error("the credential is invalid, expired or revoked")]
    InvalidToken,
    #[error("invalid username or password")]
    InvalidCredentials,
    #[error("invalid or already used code")]
    InvalidCode,
    #[error("too many failed attempts; try again later")]
    TooManyAttempts { retry_after_s: u64 },
    /// The password service is saturated: try again shortly (answered 503).
    #[error("the service is busy; try again in a second")]
    Busy,
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// What a rejected credential gets logged as, never answered.
fn log_token_error(e: &TokenError) {
    tracing::debug!(error = %e, "token refused");
}

/// Sessions revoked recently, polled from the database so that a logout on any replica stops
/// the session's access tokens everywhere within a second.
#[derive(Debug, Default)]
struct Revocations {
    sessions: HashMap<String, i64>,
    /// API keys revoked recently (long-lived streams check these; requests read the key).
    api_keys: HashMap<String, i64>,
    polled_to_ms: i64,
}

/// How long a session found valid in the database is trusted without asking again
/// (revocations still apply within a second, through [`Revocations`]).
const SESSION_CHECK_TTL_MS: i64 = 60_000;
/// Sessions remembered as valid before the memory is cleared.
const MAX_KNOWN_SESSIONS: usize = 100_000;
/// How long a revoked API key is remembered for the streams.
const KEY_REVOCATION_MEMORY_MS: i64 = 300_000;

/// The two throttle keys of an attempt: the account name and the client address (an IPv6 client
/// by its /64, the smallest network one subscriber usually gets).
#[derive(Debug, Clone)]
struct ThrottleKeys {
    user: String,
    addr: Option<String>,
}

impl ThrottleKeys {
    fn new(username: &str, addr: Option<IpAddr>) -> Self {
        Self { user: format!("user:{username}"), addr: addr.map(throttle_addr_key) }
    }
}

/// The throttle key of a client address: `addr:<IPv4>` or `addr:<IPv6 /64>/64` (an IPv4-mapped
/// IPv6 address is its IPv4 address).
pub fn throttle_addr_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("addr:{v4}"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("addr:{v4}"),
            None => {
                let s = v6.segments();
                let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("addr:{net}/64")
            }
        },
    }
}

/// The attempts counted for one check of a secret.
#[derive(Debug, Clone, Copy)]
struct Counted {
    user: store::Attempt,
    addr: Option<store::Attempt>,
}

/// API key last-use times written at most once a minute per key.
const API_KEY_TOUCH_EVERY_MS: i64 = 60_000;

/// The authentication service.
pub struct AuthService {
    /// Wall clock in Unix ms ([`unix_ms`]; tests set their own with [`AuthService::set_clock`]).
    clock: RwLock<Arc<dyn Fn() -> i64 + Send + Sync>>,
    pub store: AuthStore,
    pub keys: KeyRing,
    pub config: AuthConfig,
    revoked: RwLock<Revocations>,
    touched: Mutex<HashMap<String, i64>>,
    /// Where argon2 runs.
    passwords: Arc<hashing::PasswordPool>,
    /// Repeated failures, summarised.
    digest: audit_digest::AuditDigest,
    /// Sessions found valid in the database: id -> (user id, when checked).
    known_sessions: Mutex<HashMap<String, (i64, i64)>>,
    /// Bumped whenever revocations arrive: long-lived answers then check their credential.
    changes: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for AuthService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthService").field("config", &self.config).finish_non_exhaustive()
    }
}

impl AuthService {
    /// Opens the service on the database (creating the first signing key if needed).
    pub async fn open(db: Db, config: AuthConfig) -> Result<Arc<Self>, StoreError> {
        let store = AuthStore::new(db);
        let now = unix_ms();
        let grace = ms(config.access_ttl.max(config.mfa_ttl)) + 1000 * tokens::LEEWAY_S as i64;
        let keys = KeyRing::open(store.clone(), grace, now).await?;
        let passwords = hashing::PasswordPool::new(config.hash_workers, config.hash_queue);
        let svc = Arc::new(Self {
            clock: RwLock::new(Arc::new(unix_ms)),
            store,
            keys,
            config,
            revoked: RwLock::new(Revocations::default()),
            touched: Mutex::new(HashMap::new()),
            passwords,
            digest: audit_digest::AuditDigest::default(),
            known_sessions: Mutex::new(HashMap::new()),
            changes: tokio::sync::watch::channel(0).0,
        });
        svc.poll_revocations(now).await?;
        Ok(svc)
    }

    /// Background upkeep until `shutdown`: revocations every second, audit summaries every 10 s,
    /// throttle rows every minute, keys every 30 s (and rotation when the active key is older
    /// than `key_rotation`), expired sessions and audit retention hourly (and at start).
    pub async fn run_upkeep(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        self.audit_retention(self.now()).await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => {
                    self.flush_audit_digest(self.now(), true).await;
                    return;
                }
            }
            n += 1;
            let now = self.now();
            if let Err(e) = self.poll_revocations(now).await {
                tracing::warn!(error = %e, "polling session revocations failed");
            }
            if n.is_multiple_of(10) {
                self.flush_audit_digest(now, false).await;
            }
            if n.is_multiple_of(60) {
                match self.store.purge_throttle(now - ms(self.config.throttle_window), now).await {
                    Ok(0) => {}
                    Ok(purged) => tracing::debug!(purged, "purged sign-in throttle rows"),
                    Err(e) => tracing::warn!(error = %e, "purging sign-in throttle rows failed"),
                }
            }
            if n.is_multiple_of(3600) {
                self.audit_retention(now).await;
            }
            if n.is_multiple_of(30) {
                if let Err(e) = self.keys.reload(now).await {
                    tracing::warn!(error = %e, "reloading signing keys failed");
                }
                let rotate_after = ms(self.config.key_rotation);
                if rotate_after > 0
                    && let Some((_, created)) = self.keys.active_kid()
                    && now - created > rotate_after
                {
                    match self.keys.rotate(now).await {
                        Ok(kid) => {
                            tracing::info!(%kid, "signing key rotated (age)");
                            self.audit_quiet(
                                AuditEntry {
                                    actor: "system".into(),
                                    action: "keys.rotated",
                                    target: Some(kid),
                                    outcome: "success",
                                    ..Default::default()
                                },
                                now,
                            )
                            .await;
                        }
                        Err(e) => tracing::warn!(error = %e, "signing key rotation failed"),
                    }
                }
            }
            if n.is_multiple_of(3600)
                && let Err(e) = self.store.purge_sessions(now - 86_400_000).await
            {
                tracing::warn!(error = %e, "purging expired sessions failed");
            }
        }
    }

    /// The service's clock, Unix ms.
    pub fn now(&self) -> i64 {
        let clock = Arc::clone(&self.clock.read().unwrap_or_else(|p| p.into_inner()));
        clock()
    }

    /// Replaces the clock (tests: TOTP codes and lockouts at a controlled time). Token expiry is
    /// still checked against the real clock by the JWT library.
    pub fn set_clock(&self, clock: Arc<dyn Fn() -> i64 + Send + Sync>) {
        *self.clock.write().unwrap_or_else(|p| p.into_inner()) = clock;
    }

    async fn poll_revocations(&self, now: i64) -> Result<(), StoreError> {
        let since = self.revoked.read().unwrap_or_else(|p| p.into_inner()).polled_to_ms;
        // Overlap the previous poll: a revocation committed with an earlier clock is not missed.
        let rows = self.store.revoked_since(since.saturating_sub(5_000)).await?;
        let keys = self.store.api_keys_revoked_since(since.saturating_sub(5_000)).await?;
        let mut fresh = false;
        {
            let mut r = self.revoked.write().unwrap_or_else(|p| p.into_inner());
            for (sid, at) in rows {
                fresh |= r.sessions.insert(sid, at).is_none();
            }
            for (kid, at) in keys {
                fresh |= r.api_keys.insert(kid, at).is_none();
            }
            let horizon = now - ms(self.config.access_ttl) - 60_000;
            r.sessions.retain(|_, at| *at >= horizon);
            r.api_keys.retain(|_, at| *at >= now - KEY_REVOCATION_MEMORY_MS);
            r.polled_to_ms = now;
        }
        if fresh {
            self.changes.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    fn mark_revoked(&self, session_id: &str, now: i64) {
        self.revoked.write().unwrap_or_else(|p| p.into_inner()).sessions.insert(session_id.to_owned(), now);
        self.known_sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(session_id);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Changes whenever credentials were revoked (sessions, API keys; disabling a user or
    /// changing their rights revokes their sessions): a long-lived answer then asks
    /// [`AuthService::still_valid`].
    pub fn revocations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether the credential a [`Principal`] was made from still holds now: not expired, its
    /// session or API key not revoked (as known to this replica, within a second of the
    /// revocation anywhere).
    pub fn still_valid(&self, p: &Principal) -> bool {
        if p.expires_at_ms.is_some_and(|e| e <= self.now()) {
            return false;
        }
        let r = self.revoked.read().unwrap_or_else(|p| p.into_inner());
        match &p.subject {
            Subject::User { session_id, .. } => !r.sessions.contains_key(session_id),
            Subject::ApiKey { key_id, .. } => !r.api_keys.contains_key(key_id),
        }
    }

    /// Writes the audit summaries whose window ended (all of them with `all`; the upkeep does
    /// this every 10 s and at shutdown).
    pub async fn flush_audit_digest(&self, now: i64, all: bool) {
        for entry in self.digest.due(now, all) {
            self.audit_quiet(entry, now).await;
        }
    }

    /// Deletes audit entries beyond `[audit]` (age, then count), in batches.
    pub async fn audit_retention(&self, now: i64) -> u64 {
        const BATCH: i64 = 10_000;
        /// Runs one kind of deletion batch after batch until a batch is not full.
        async fn batches<F, Fut>(what: &str, mut step: F) -> u64
        where
            F: FnMut() -> Fut,
            Fut: std::future::Future<Output = Result<u64, StoreError>>,
        {
            let mut deleted = 0;
            loop {
                match step().await {
                    Ok(n) => {
                        deleted += n;
                        if n < BATCH as u64 {
                            return deleted;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "audit retention ({what}) failed");
                        return deleted;
                    }
                }
            }
        }
        let mut deleted = 0u64;
        if let Some(age) = self.config.audit_max_age {
            deleted += batches("age", || self.store.purge_audit_before(now - ms(age), BATCH)).await;
        }
        if let Some(max) = self.config.audit_max_rows {
            let keep = i64::try_from(max).unwrap_or(i64::MAX);
            deleted += batches("count", || self.store.trim_audit(keep, BATCH)).await;
        }
        if deleted > 0 {
            tracing::info!(deleted, "audit retention deleted old entries");
        }
        deleted
    }

    /// Writes an audit entry of a failure anyone can cause: the first of its kind at once, its
    /// repeats as one summary ([`audit_digest`]).
    pub async fn audit_failure(&self, entry: AuditEntry, now: i64) {
        if let Some(entry) = self.digest.admit(entry, now) {
            self.audit_quiet(entry, now).await;
        }
    }

    /// Hashes a new password on the pool.
    pub async fn hash_password(&self, password: &str) -> Result<String, AuthError> {
        self.passwords.hash(password).await.map_err(pool_error)
    }

    fn is_revoked(&self, session_id: &str) -> bool {
        self.revoked.read().unwrap_or_else(|p| p.into_inner()).sessions.contains_key(session_id)
    }

    /// Writes an audit entry; a failure is logged, never lost silently, and never fails the
    /// request that caused it.
    pub async fn audit_quiet(&self, entry: AuditEntry, now: i64) {
        if let Err(e) = self.store.audit(&entry, now).await {
            tracing::error!(error = %e, action = entry.action, actor = %entry.actor, "writing the audit log failed");
        }
    }

    // --- sign-in -----------------------------------------------------------------------------

    /// Counts an attempt on the address key (if any) then the account key, before the secret is
    /// checked. Refused (429) when either is locked or this attempt is beyond its limit.
    async fn count_attempt(&self, keys: &ThrottleKeys, now: i64) -> Result<Counted, AuthError> {
        let c = &self.config;
        let (window, lock) = (ms(c.throttle_window), ms(c.lockout));
        let addr = match &keys.addr {
            Some(k) => {
                let a = self.store.reserve_attempt(k, now, window, c.max_failures_per_addr, lock).await?;
                if !a.allowed {
                    return Err(too_many(a, now));
                }
                Some(a)
            }
            None => None,
        };
        let user = self.store.reserve_attempt(&keys.user, now, window, c.max_failures_per_account, lock).await?;
        if !user.allowed {
            if user.failures == c.max_failures_per_account + 1 {
                tracing::warn!(key = keys.user, "sign-in locked: attempts beyond the limit");
            }
            return Err(too_many(user, now));
        }
        Ok(Counted { user, addr })
    }

    /// The checked secret was wrong: the attempt stays counted, and the key whose limit it
    /// reached is locked.
    async fn attempt_failed(&self, keys: &ThrottleKeys, counted: Counted, now: i64) -> Result<(), StoreError> {
        let c = &self.config;
        if counted.user.failures >= c.max_failures_per_account {
            self.store.lock_throttle(&keys.user, now, ms(c.lockout)).await?;
            tracing::warn!(key = keys.user, "sign-in locked after repeated failures");
        }
        if let (Some(k), Some(a)) = (&keys.addr, counted.addr)
            && a.failures >= c.max_failures_per_addr
        {
            self.store.lock_throttle(k, now, ms(c.lockout)).await?;
            tracing::warn!(key = k, "sign-in locked for a client address after repeated failures");
        }
        Ok(())
    }

    /// The checked secret was right: the address takes its attempt back; the account's count
    /// is cleared when `clear_account` (the whole sign-in succeeded), else only this attempt is
    /// taken back (a right password before the second factor leaves earlier failures counted).
    async fn attempt_succeeded(&self, keys: &ThrottleKeys, clear_account: bool) -> Result<(), StoreError> {
        if let Some(k) = &keys.addr {
            self.store.refund_attempt(k).await?;
        }
        if clear_account {
            self.store.clear_throttle(&keys.user).await
        } else {
            self.store.refund_attempt(&keys.user).await
        }
    }

    /// The secret could not be checked (the pool was busy): both attempts are taken back.
    async fn attempt_not_made(&self, keys: &ThrottleKeys) {
        for k in std::iter::once(&keys.user).chain(keys.addr.iter()) {
            if let Err(e) = self.store.refund_attempt(k).await {
                tracing::warn!(error = %e, "taking back a sign-in attempt failed");
            }
        }
    }

    /// Sign-in with name and password.
    pub async fn login(&self, username: &str, password: &str, addr: Option<IpAddr>) -> Result<LoginOutcome, AuthError> {
        let now = self.now();
        let name = normalise_username(username);
        let keys = ThrottleKeys::new(&name, addr);
        let audit = |action: &'static str, outcome: &'static str, detail: serde_json::Value| AuditEntry {
            actor: if name.is_empty() { "anonymous".into() } else { format!("user:{}", truncate(&name, 64)) },
            action,
            target: None,
            outcome,
            client_addr: addr.map(|a| a.to_string()),
            detail,
        };
        let counted = match self.count_attempt(&keys, now).await {
            Ok(c) => c,
            Err(e) => {
                self.audit_failure(audit("login.locked", "denied", serde_json::json!({})), now).await;
                return Err(e);
            }
        };
        let user = self.store.user_by_name(&name).await?;
        let hash = user.as_ref().map_or(hashing::DUMMY_HASH, |u| u.password_hash.as_str());
        let matches = match self.passwords.verify(password, hash).await {
            Ok(m) => m,
            Err(e) => {
                self.attempt_not_made(&keys).await;
                return Err(pool_error(e));
            }
        };
        let user = match user {
            Some(u) if matches && !u.disabled => u,
            other => {
                self.attempt_failed(&keys, counted, now).await?;
                let reason = match other {
                    None => "unknown user",
                    Some(u) if u.disabled && matches => "account disabled",
                    Some(_) => "wrong password",
                };
                self.audit_failure(audit("login.failure", "failure", serde_json::json!({ "reason": reason })), now)
                    .await;
                return Err(AuthError::InvalidCredentials);
            }
        };
        if user.totp_enabled {
            // The account's count is cleared only when the second factor is right too: a
            // password step between wrong codes must not reset it, or the code could be guessed
            // without end.
            self.attempt_succeeded(&keys, false).await?;
            let claims = MfaClaims {
                iss: ISSUER.into(),
                aud: AUDIENCE_MFA.into(),
                sub: user.user_id.to_string(),
                iat: now / 1000,
                exp: (now + ms(self.config.mfa_ttl)) / 1000,
            };
            let mfa_token = self.keys.sign(&claims).map_err(|e| AuthError::Invalid(e.to_string()))?;
            self.audit_quiet(audit("login.password_ok", "success", serde_json::json!({ "mfa": "pending" })), now).await;
            return Ok(LoginOutcome::MfaRequired { mfa_token, expires_in: self.config.mfa_ttl.as_secs() });
        }
        self.attempt_succeeded(&keys, true).await?;
        let enrolment_only = self.store.role_requires_mfa(user.role).await?;
        let pair = self.start_session(&user, &["pwd"], enrolment_only, addr, now).await?;
        self.audit_quiet(
            audit(
                "login.success",
                "success",
                serde_json::json!({ "amr": ["pwd"], "mfa_enrolment_required": enrolment_only }),
            ),
            now,
        )
        .await;
        Ok(LoginOutcome::Tokens(pair))
    }

    /// Second step of sign-in: the MFA token from [`AuthService::login`] and a TOTP code or a
    /// recovery code.
    pub async fn login_mfa(
        &self,
        mfa_token: &str,
        code: Option<&str>,
        recovery_code: Option<&str>,
        addr: Option<IpAddr>,
    ) -> Result<TokenPair, AuthError> {
        let now = self.now();
        let claims: MfaClaims = self.keys.verify(mfa_token, AUDIENCE_MFA).map_err(|e| {
            log_token_error(&e);
            AuthError::InvalidToken
        })?;
        let user_id: i64 = claims.sub.parse().map_err(|_| AuthError::InvalidToken)?;
        let user = self.store.user_by_id(user_id).await?.ok_or(AuthError::InvalidToken)?;
        if user.disabled || !user.totp_enabled {
            return Err(AuthError::InvalidToken);
        }
        let keys = ThrottleKeys::new(&user.username, addr);
        let counted = self.count_attempt(&keys, now).await?;
        let (ok, method) = match self.check_second_factor(&user, code, recovery_code, now).await {
            Ok(r) => r,
            Err(e) => {
                self.attempt_not_made(&keys).await;
                return Err(e);
            }
        };
        let entry = |action: &'static str, outcome: &'static str| AuditEntry {
            actor: format!("user:{}", user.username),
            action,
            target: None,
            outcome,
            client_addr: addr.map(|a| a.to_string()),
            detail: serde_json::json!({ "method": method }),
        };
        if !ok {
            self.attempt_failed(&keys, counted, now).await?;
            self.audit_failure(entry("mfa.failure", "failure"), now).await;
            return Err(AuthError::InvalidCode);
        }
        self.attempt_succeeded(&keys, true).await?;
        if method == "recovery_code" {
            self.audit_quiet(entry("mfa.recovery_code_used", "success"), now).await;
        }
        let pair = self.start_session(&user, &["pwd", "otp"], false, addr, now).await?;
        self.audit_quiet(entry("login.success", "success"), now).await;
        Ok(pair)
    }

    /// Checks a secret of a signed-in user's own account (the current password before a change,
    /// a code before MFA is turned on or off) under the same counting as sign-in, on the
    /// account's key: `check` says whether it is right. `action` names the failure in the audit
    /// log.
    pub async fn check_own_secret<F, Fut>(
        &self,
        user: &UserRow,
        addr: Option<IpAddr>,
        action: &'static str,
        check: F,
    ) -> Result<bool, AuthError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<bool, AuthError>>,
    {
        let now = self.now();
        let keys = ThrottleKeys { user: format!("user:{}", user.username), addr: None };
        let counted = self.count_attempt(&keys, now).await?;
        match check().await {
            Ok(true) => {
                self.store.refund_attempt(&keys.user).await?;
                Ok(true)
            }
            Ok(false) => {
                self.attempt_failed(&keys, counted, now).await?;
                self.audit_failure(
                    AuditEntry {
                        actor: format!("user:{}", user.username),
                        action,
                        target: None,
                        outcome: "failure",
                        client_addr: addr.map(|a| a.to_string()),
                        detail: serde_json::json!({}),
                    },
                    now,
                )
                .await;
                Ok(false)
            }
            Err(e) => {
                self.attempt_not_made(&keys).await;
                Err(e)
            }
        }
    }

    /// Whether `password` is the user's password (on the pool; not counted: see
    /// [`AuthService::check_own_secret`]).
    pub async fn password_matches(&self, user: &UserRow, password: &str) -> Result<bool, AuthError> {
        self.passwords.verify(password, &user.password_hash).await.map_err(pool_error)
    }

    /// Checks a TOTP code (refusing a step already used) or a recovery code (once).
    async fn check_second_factor(
        &self,
        user: &UserRow,
        code: Option<&str>,
        recovery_code: Option<&str>,
        now: i64,
    ) -> Result<(bool, &'static str), AuthError> {
        match (code, recovery_code) {
            (Some(code), None) => {
                let Some(secret) = &user.totp_secret else { return Ok((false, "totp")) };
                Ok((self.accept_totp(user.user_id, secret, code, now).await?, "totp"))
            }
            (None, Some(rc)) => {
                let normalised: String =
                    rc.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_lowercase();
                let used = self.store.use_recovery_code(user.user_id, &secrets::sha256_hex(&normalised), now).await?;
                Ok((used, "recovery_code"))
            }
            _ => Err(AuthError::Invalid("give exactly one of code and recovery_code".into())),
        }
    }

    /// Whether `code` is the TOTP code of `secret` at `now` (one step of skew) AND its time step
    /// is newer than every step this user had accepted: a code works once, then is a replay.
    pub async fn accept_totp(&self, user_id: i64, secret: &str, code: &str, now: i64) -> Result<bool, StoreError> {
        let t = u64::try_from(now / 1000).unwrap_or(0);
        match secrets::totp::matching_step(secret, code, t) {
            Some(step) => self.store.accept_totp_step(user_id, i64::try_from(step).unwrap_or(i64::MAX)).await,
            None => Ok(false),
        }
    }

    async fn start_session(
        &self,
        user: &UserRow,
        amr: &[&str],
        enrolment_only: bool,
        addr: Option<IpAddr>,
        now: i64,
    ) -> Result<TokenPair, AuthError> {
        let session = SessionRow {
            session_id: secrets::random_id(20),
            user_id: user.user_id,
            amr: amr.join("+"),
            expires_at_ms: now + ms(self.config.session_ttl),
            revoked_at_ms: None,
        };
        let refresh = secrets::random_token(32);
        let addr_text = addr.map(|a| a.to_string());
        self.store.create_session(&session, &secrets::sha256_hex(&refresh), addr_text.as_deref(), now).await?;
        self.issue(user, &session, refresh, enrolment_only, now)
    }

    fn issue(
        &self,
        user: &UserRow,
        session: &SessionRow,
        refresh_token: String,
        enrolment_only: bool,
        now: i64,
    ) -> Result<TokenPair, AuthError> {
        let claims = AccessClaims {
            iss: ISSUER.into(),
            aud: AUDIENCE_ACCESS.into(),
            sub: user.user_id.to_string(),
            name: user.username.clone(),
            role: user.role,
            sid: session.session_id.clone(),
            scope: effective_scope(user.role, &user.scope),
            amr: session.amr.split('+').map(str::to_owned).collect(),
            iat: now / 1000,
            exp: (now + ms(self.config.access_ttl)) / 1000,
            mfa_enrolment_only: enrolment_only,
        };
        let access_token = self.keys.sign(&claims).map_err(|e| AuthError::Invalid(e.to_string()))?;
        Ok(TokenPair {
            access_token,
            refresh_token,
            token_type: "Bearer".into(),
            expires_in: self.config.access_ttl.as_secs(),
            session_id: session.session_id.clone(),
            mfa_enrolment_required: enrolment_only,
        })
    }

    /// Exchanges a refresh token for a new pair; reuse revokes the session.
    pub async fn refresh(&self, refresh_token: &str, addr: Option<IpAddr>) -> Result<TokenPair, AuthError> {
        let now = self.now();
        if refresh_token.is_empty() || refresh_token.len() > 256 {
            return Err(AuthError::InvalidToken);
        }
        let next = secrets::random_token(32);
        match self
            .store
            .use_refresh_token(&secrets::sha256_hex(refresh_token), &secrets::sha256_hex(&next), now)
            .await?
        {
            RefreshUse::Unknown | RefreshUse::Dead { .. } => Err(AuthError::InvalidToken),
            RefreshUse::Reused { session_id, user_id } => {
                self.mark_revoked(&session_id, now);
                let username =
                    self.store.user_by_id(user_id).await?.map_or_else(|| user_id.to_string(), |u| u.username);
                tracing::warn!(user = %username, session = %session_id, "refresh token reused: session revoked");
                self.audit_quiet(
                    AuditEntry {
                        actor: format!("user:{username}"),
                        action: "token.reuse_detected",
                        target: Some(format!("session:{session_id}")),
                        outcome: "denied",
                        client_addr: addr.map(|a| a.to_string()),
                        detail: serde_json::json!({ "session_revoked": true }),
                    },
                    now,
                )
                .await;
                Err(AuthError::InvalidToken)
            }
            RefreshUse::Rotated(session) => {
                let user = self.store.user_by_id(session.user_id).await?.ok_or(AuthError::InvalidToken)?;
                if user.disabled {
                    self.store.revoke_session(&session.session_id, "account disabled", now).await?;
                    self.mark_revoked(&session.session_id, now);
                    return Err(AuthError::InvalidToken);
                }
                let enrolment_only = !user.totp_enabled && self.store.role_requires_mfa(user.role).await?;
                self.issue(&user, &session, next, enrolment_only, now)
            }
        }
    }

    /// Revokes a session (logout).
    pub async fn revoke_session(&self, session_id: &str, reason: &str) -> Result<bool, StoreError> {
        let now = self.now();
        let revoked = self.store.revoke_session(session_id, reason, now).await?;
        self.mark_revoked(session_id, now);
        Ok(revoked)
    }

    /// Revokes an API key: refused from the next request, live streams end within a second.
    pub async fn revoke_api_key(&self, key_id: &str) -> Result<bool, StoreError> {
        let now = self.now();
        let revoked = self.store.revoke_api_key(key_id, now).await?;
        self.revoked.write().unwrap_or_else(|p| p.into_inner()).api_keys.insert(key_id.to_owned(), now);
        self.changes.send_modify(|n| *n += 1);
        Ok(revoked)
    }

    /// Revokes every session of a user (role, grants, password or MFA changed; disabled).
    pub async fn revoke_user(&self, user_id: i64, reason: &str) -> Result<u64, StoreError> {
        let now = self.now();
        let n = self.store.revoke_user_sessions(user_id, reason, now).await?;
        // The poll picks the ids up within a second; do it now for this replica.
        self.poll_revocations(now).await?;
        Ok(n)
    }

    // --- per request -------------------------------------------------------------------------

    /// Authenticates a request from its `Authorization` or `X-API-Key` header value.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        api_key: Option<&str>,
    ) -> Result<Principal, AuthError> {
        let bearer = match authorization {
            Some(v) => {
                let (scheme, rest) = v.trim().split_once(' ').ok_or(AuthError::InvalidToken)?;
                if !scheme.eq_ignore_ascii_case("bearer") {
                    return Err(AuthError::InvalidToken);
                }
                Some(rest.trim())
            }
            None => None,
        };
        match (bearer, api_key) {
            (Some(t), _) if t.starts_with("its_") => self.authenticate_api_key(t).await,
            (Some(t), _) => self.authenticate_jwt(t).await,
            (None, Some(k)) => self.authenticate_api_key(k.trim()).await,
            (None, None) => Err(AuthError::Missing),
        }
    }

    async fn authenticate_jwt(&self, token: &str) -> Result<Principal, AuthError> {
        let claims: AccessClaims = self.keys.verify(token, AUDIENCE_ACCESS).map_err(|e| {
            log_token_error(&e);
            AuthError::InvalidToken
        })?;
        if self.is_revoked(&claims.sid) {
            return Err(AuthError::InvalidToken);
        }
        let user_id: i64 = claims.sub.parse().map_err(|_| AuthError::InvalidToken)?;
        if !self.session_is_live(&claims.sid, user_id).await? {
            tracing::debug!(session = %claims.sid, "access token of an unknown, expired or revoked session refused");
            return Err(AuthError::InvalidToken);
        }
        let permissions = if claims.mfa_enrolment_only { PermissionSet::EMPTY } else { claims.role.permissions() };
        Ok(Principal {
            subject: Subject::User { user_id, username: claims.name, role: claims.role, session_id: claims.sid },
            permissions,
            scope: effective_scope(claims.role, &claims.scope),
            mfa_enrolment_only: claims.mfa_enrolment_only,
            expires_at_ms: Some(claims.exp.saturating_mul(1000)),
        })
    }

    /// Whether the session exists in the database, belongs to `user_id`, and is neither revoked
    /// nor expired; a positive answer is trusted for [`SESSION_CHECK_TTL_MS`] (revocations
    /// still reach [`Revocations`] within a second).
    async fn session_is_live(&self, session_id: &str, user_id: i64) -> Result<bool, StoreError> {
        let now = self.now();
        {
            let known = self.known_sessions.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((uid, at)) = known.get(session_id)
                && now - *at < SESSION_CHECK_TTL_MS
            {
                return Ok(*uid == user_id);
            }
        }
        let live = self
            .store
            .session(session_id)
            .await?
            .is_some_and(|s| s.user_id == user_id && s.revoked_at_ms.is_none() && s.expires_at_ms > now);
        if live {
            let mut known = self.known_sessions.lock().unwrap_or_else(|p| p.into_inner());
            if known.len() >= MAX_KNOWN_SESSIONS {
                known.clear();
            }
            known.insert(session_id.to_owned(), (user_id, now));
        }
        Ok(live)
    }

    async fn authenticate_api_key(&self, presented: &str) -> Result<Principal, AuthError> {
        let now = self.now();
        let (key_id, secret) = parse_api_key(presented).ok_or(AuthError::InvalidToken)?;
        let key = self.store.api_key(key_id).await?;
        // Hash and compare even for an unknown id: the answer takes the same time.
        let hash = secrets::sha256_hex(secret);
        let stored = key.as_ref().map_or("0".repeat(64), |k| k.secret_hash.clone());
        let matches = secrets::ct_eq(&hash, &stored);
        let key = match key {
            Some(k) if matches && k.revoked_at_ms.is_none() && k.expires_at_ms.is_none_or(|e| e > now) => k,
            _ => return Err(AuthError::InvalidToken),
        };
        self.touch_api_key(&key.key_id, now).await;
        let permissions =
            PermissionSet::of(&key.permissions.iter().filter_map(|p| Permission::parse(p)).collect::<Vec<_>>());
        Ok(Principal {
            subject: Subject::ApiKey { key_id: key.key_id, name: key.name },
            permissions,
            scope: key.scope,
            mfa_enrolment_only: false,
            expires_at_ms: key.expires_at_ms,
        })
    }

    async fn touch_api_key(&self, key_id: &str, now: i64) {
        {
            let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
            match touched.get(key_id) {
                Some(t) if now - *t < API_KEY_TOUCH_EVERY_MS => return,
                _ => {
                    touched.insert(key_id.to_owned(), now);
                }
            }
        }
        if let Err(e) = self.store.touch_api_key(key_id, now).await {
            tracing::warn!(error = %e, key = key_id, "recording API key use failed");
        }
    }

    // --- administration ----------------------------------------------------------------------

    /// Creates a user (command line and API). The password must pass the policy.
    pub async fn create_user(
        &self,
        username: &str,
        password: &str,
        role: Role,
        scope: &Scope,
    ) -> Result<i64, AuthError> {
        let name = normalise_username(username);
        validate_username(&name).map_err(AuthError::Invalid)?;
        secrets::check_password_policy(password).map_err(AuthError::Invalid)?;
        validate_scope(role, scope).map_err(AuthError::Invalid)?;
        let hash = self.hash_password(password).await?;
        Ok(self.store.create_user(&name, &hash, role, scope, self.now()).await?)
    }

    /// Creates an API key; returns the stored row and the full key (shown once).
    pub async fn create_api_key(
        &self,
        creator: &Principal,
        name: &str,
        permissions: PermissionSet,
        scope: Scope,
        expires_at_ms: Option<i64>,
    ) -> Result<(ApiKeyRow, String), AuthError> {
        let now = self.now();
        let key_id = secrets::random_id(12);
        let secret = secrets::random_token(32);
        let row = ApiKeyRow {
            key_id: key_id.clone(),
            name: name.to_owned(),
            secret_hash: secrets::sha256_hex(&secret),
            permissions: permissions.names().into_iter().map(str::to_owned).collect(),
            scope,
            created_by: creator.actor(),
            created_at_ms: now,
            expires_at_ms,
            last_used_ms: None,
            revoked_at_ms: None,
        };
        self.store.insert_api_key(&row).await?;
        Ok((row, format!("its_{key_id}_{secret}")))
    }
}

/// 429 with the time left of a lock.
fn too_many(a: store::Attempt, now: i64) -> AuthError {
    let retry_after_s = a.locked_until_ms.map_or(1, |until| u64::try_from((until - now + 999) / 1000).unwrap_or(1));
    AuthError::TooManyAttempts { retry_after_s: retry_after_s.max(1) }
}

fn pool_error(e: hashing::PoolError) -> AuthError {
    match e {
        hashing::PoolError::Busy | hashing::PoolError::Stopped => AuthError::Busy,
        hashing::PoolError::Hash(m) => AuthError::Invalid(m),
    }
}

/// `its_<key id>_<secret>`.
fn parse_api_key(s: &str) -> Option<(&str, &str)> {
    let rest = s.strip_prefix("its_")?;
    let (id, secret) = rest.split_once('_')?;
    let ok_id = id.len() == 12 && id.bytes().all(|b| b.is_ascii_alphanumeric());
    let ok_secret = (20..=128).contains(&secret.len())
        && secret.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (ok_id && ok_secret).then_some((id, secret))
}

/// Only viewers and integrators can be narrowed; other roles see everything.
pub fn effective_scope(role: Role, scope: &Scope) -> Scope {
    if role.scopable() { scope.clone() } else { Scope::All }
}

/// A scope is allowed only on roles that can be narrowed.
pub fn validate_scope(role: Role, scope: &Scope) -> Result<(), String> {
    match scope {
        Scope::Limited { .. } if !role.scopable() => {
            Err(format!("role {role} cannot be limited to sites or cameras (only viewer and integrator)"))
        }
        _ => Ok(()),
    }
}

/// Whether `inner` sees nothing that `outer` does not.
pub fn scope_within(inner: &Scope, outer: &Scope) -> bool {
    match (inner, outer) {
        (_, Scope::All) => true,
        (Scope::All, Scope::Limited { .. }) => false,
        (Scope::Limited { sites: is, cameras: ic }, Scope::Limited { sites: os, cameras: oc }) => {
            is.iter().all(|s| os.contains(s)) && ic.iter().all(|c| oc.contains(c))
        }
    }
}

/// Usernames compare case-insensitively and without surrounding spaces.
pub fn normalise_username(s: &str) -> String {
    s.trim().to_lowercase()
}

pub fn validate_username(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok { Ok(()) } else { Err("a username has 1 to 64 characters: letters, digits, '.', '_', '-', '@'".into()) }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::CameraRef;

    #[test]
    fn api_key_format() {
        let key = format!("its_{}_{}", secrets::random_id(12), secrets::random_token(32));
        assert!(parse_api_key(&key).is_some());
        for bad in ["its_", "its_abc_def", "xx_abcdefghijkm_aaaaaaaaaaaaaaaaaaaaaaaa", "its_abcdefghijkm_short"] {
            assert!(parse_api_key(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn scopes_nest() {
        let cam = CameraRef { device_id: "d".into(), camera: "c".into() };
        let a = Scope::Limited { sites: vec!["s1".into()], cameras: vec![] };
        let b = Scope::Limited { sites: vec!["s1".into(), "s2".into()], cameras: vec![cam.clone()] };
        assert!(scope_within(&a, &b) && !scope_within(&b, &a));
        assert!(scope_within(&b, &Scope::All) && !scope_within(&Scope::All, &b));
        assert!(validate_scope(Role::Admin, &a).is_err() && validate_scope(Role::Viewer, &a).is_ok());
        assert_eq!(effective_scope(Role::Operator, &a), Scope::All);
        assert_eq!(normalise_username("  Alice "), "alice");
        assert!(validate_username("alice@example.org").is_ok() && validate_username("a b").is_err());
    }
}
