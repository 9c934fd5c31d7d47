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
//! - Sign-in is throttled per account name and per client address, with lockout; every answer
//!   about credentials is the same whether the account exists or not, and costs the same time.
//! - Security-relevant actions go to the audit log ([`store::AuditEntry`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::{Db, Scope, StoreError};
use crate::unix_ms;

pub mod permissions;
pub mod secrets;
pub mod store;
pub mod tokens;

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
    polled_to_ms: i64,
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
        let svc = Arc::new(Self {
            clock: RwLock::new(Arc::new(unix_ms)),
            store,
            keys,
            config,
            revoked: RwLock::new(Revocations { sessions: HashMap::new(), polled_to_ms: 0 }),
            touched: Mutex::new(HashMap::new()),
        });
        svc.poll_revocations(now).await?;
        Ok(svc)
    }

    /// Background upkeep until `shutdown`: revocations every second, keys every 30 s (and
    /// rotation when the active key is older than `key_rotation`), expired sessions hourly.
    pub async fn run_upkeep(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            n += 1;
            let now = self.now();
            if let Err(e) = self.poll_revocations(now).await {
                tracing::warn!(error = %e, "polling session revocations failed");
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
        let mut r = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        for (sid, at) in rows {
            r.sessions.insert(sid, at);
        }
        let horizon = now - ms(self.config.access_ttl) - 60_000;
        r.sessions.retain(|_, at| *at >= horizon);
        r.polled_to_ms = now;
        Ok(())
    }

    fn mark_revoked(&self, session_id: &str, now: i64) {
        self.revoked.write().unwrap_or_else(|p| p.into_inner()).sessions.insert(session_id.to_owned(), now);
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

    async fn check_locked(&self, keys: &[&str], now: i64) -> Result<(), AuthError> {
        for key in keys {
            if let Some(state) = self.store.throttle_state(key).await?
                && let Some(until) = state.locked_until_ms
                && until > now
            {
                let retry_after_s = u64::try_from((until - now + 999) / 1000).unwrap_or(1);
                return Err(AuthError::TooManyAttempts { retry_after_s });
            }
        }
        Ok(())
    }

    async fn record_failures(&self, user_key: &str, addr_key: Option<&str>, now: i64) -> Result<(), StoreError> {
        let c = &self.config;
        let window = ms(c.throttle_window);
        let lock = ms(c.lockout);
        let s = self.store.record_failure(user_key, now, window, c.max_failures_per_account, lock).await?;
        if s.locked_until_ms.is_some_and(|u| u > now) {
            tracing::warn!(key = user_key, "sign-in locked after repeated failures");
        }
        if let Some(addr_key) = addr_key {
            self.store.record_failure(addr_key, now, window, c.max_failures_per_addr, lock).await?;
        }
        Ok(())
    }

    /// Sign-in with name and password.
    pub async fn login(&self, username: &str, password: &str, addr: Option<IpAddr>) -> Result<LoginOutcome, AuthError> {
        let now = self.now();
        let name = normalise_username(username);
        let user_key = format!("user:{name}");
        let addr_key = addr.map(|a| format!("addr:{a}"));
        let mut throttle_keys = vec![user_key.as_str()];
        if let Some(a) = &addr_key {
            throttle_keys.push(a);
        }
        let audit = |action: &'static str, outcome: &'static str, detail: serde_json::Value| AuditEntry {
            actor: if name.is_empty() { "anonymous".into() } else { format!("user:{}", truncate(&name, 64)) },
            action,
            target: None,
            outcome,
            client_addr: addr.map(|a| a.to_string()),
            detail,
        };
        if let Err(e) = self.check_locked(&throttle_keys, now).await {
            self.audit_quiet(audit("login.locked", "denied", serde_json::json!({})), now).await;
            return Err(e);
        }
        let user = self.store.user_by_name(&name).await?;
        let hash = user.as_ref().map_or_else(|| secrets::dummy_hash().to_owned(), |u| u.password_hash.clone());
        let matches = secrets::verify_password_off_thread(password, &hash).await;
        let user = match user {
            Some(u) if matches && !u.disabled => u,
            other => {
                self.record_failures(&user_key, addr_key.as_deref(), now).await?;
                let reason = match other {
                    None => "unknown user",
                    Some(u) if u.disabled && matches => "account disabled",
                    Some(_) => "wrong password",
                };
                self.audit_quiet(audit("login.failure", "failure", serde_json::json!({ "reason": reason })), now).await;
                return Err(AuthError::InvalidCredentials);
            }
        };
        if user.totp_enabled {
            // The count is cleared only when the second factor is right too: a password step
            // between wrong codes must not reset it, or the code could be guessed without end.
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
        self.store.clear_throttle(&user_key).await?;
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
        let user_key = format!("user:{}", user.username);
        let addr_key = addr.map(|a| format!("addr:{a}"));
        let mut keys = vec![user_key.as_str()];
        if let Some(a) = &addr_key {
            keys.push(a);
        }
        self.check_locked(&keys, now).await?;
        let (ok, method) = self.check_second_factor(&user, code, recovery_code, now).await?;
        let entry = |action: &'static str, outcome: &'static str| AuditEntry {
            actor: format!("user:{}", user.username),
            action,
            target: None,
            outcome,
            client_addr: addr.map(|a| a.to_string()),
            detail: serde_json::json!({ "method": method }),
        };
        if !ok {
            self.record_failures(&user_key, addr_key.as_deref(), now).await?;
            self.audit_quiet(entry("mfa.failure", "failure"), now).await;
            return Err(AuthError::InvalidCode);
        }
        self.store.clear_throttle(&user_key).await?;
        if method == "recovery_code" {
            self.audit_quiet(entry("mfa.recovery_code_used", "success"), now).await;
        }
        let pair = self.start_session(&user, &["pwd", "otp"], false, addr, now).await?;
        self.audit_quiet(entry("login.success", "success"), now).await;
        Ok(pair)
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
            (Some(t), _) => self.authenticate_jwt(t),
            (None, Some(k)) => self.authenticate_api_key(k.trim()).await,
            (None, None) => Err(AuthError::Missing),
        }
    }

    fn authenticate_jwt(&self, token: &str) -> Result<Principal, AuthError> {
        let claims: AccessClaims = self.keys.verify(token, AUDIENCE_ACCESS).map_err(|e| {
            log_token_error(&e);
            AuthError::InvalidToken
        })?;
        if self.is_revoked(&claims.sid) {
            return Err(AuthError::InvalidToken);
        }
        let user_id: i64 = claims.sub.parse().map_err(|_| AuthError::InvalidToken)?;
        let permissions = if claims.mfa_enrolment_only { PermissionSet::EMPTY } else { claims.role.permissions() };
        Ok(Principal {
            subject: Subject::User { user_id, username: claims.name, role: claims.role, session_id: claims.sid },
            permissions,
            scope: effective_scope(claims.role, &claims.scope),
            mfa_enrolment_only: claims.mfa_enrolment_only,
        })
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
        let hash = secrets::hash_password_off_thread(password).await.map_err(AuthError::Invalid)?;
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
