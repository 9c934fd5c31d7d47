//! Sign-in, tokens, MFA and the caller's own account: `/api/v1/auth/...` and the JWKS.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::authz::ClientIp;
use super::body::Body;
use super::{ApiError, AppState, ErrorBody};
use crate::auth::store::AuditEntry;
use crate::auth::{LoginOutcome, Principal, Subject, TokenPair, secrets};
use crate::store::Scope;
use crate::unix_ms;

/// Recovery codes handed out when MFA is confirmed.
const RECOVERY_CODES: usize = 10;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
}

/// The password was right and the account uses MFA: send a code with this token to
/// `POST /api/v1/auth/login/mfa`.
#[derive(Debug, Serialize, ToSchema)]
pub struct MfaChallenge {
    /// Always true.
    pub mfa_required: bool,
    pub mfa_token: String,
    /// Seconds the MFA token is valid.
    pub expires_in: u64,
}

/// Tokens, or the MFA challenge.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum LoginResponse {
    Tokens(TokenPair),
    Mfa(MfaChallenge),
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MfaLoginRequest {
    pub mfa_token: String,
    /// The 6-digit code of the authenticator app.
    pub code: Option<String>,
    /// Or one of the one-time recovery codes.
    pub recovery_code: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

/// The caller.
#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    /// `user` or `api_key`.
    pub kind: String,
    pub user_id: Option<i64>,
    pub username: Option<String>,
    pub api_key_id: Option<String>,
    pub role: Option<String>,
    pub permissions: Vec<String>,
    #[schema(value_type = Object)]
    pub scope: Scope,
    pub mfa_enabled: bool,
    pub mfa_required_by_role: bool,
    pub mfa_enrolment_only: bool,
    pub recovery_codes_left: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    pub current_password: String,
    pub new_password: String,
}

/// A TOTP secret to put into an authenticator app: scan `qr_svg` or enter `secret`.
#[derive(Debug, Serialize, ToSchema)]
pub struct MfaEnrolment {
    /// Base32 secret.
    pub secret: String,
    /// `otpauth://totp/...`
    pub otpauth_uri: String,
    /// The URI as a QR code (SVG document).
    pub qr_svg: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MfaCode {
    /// The current 6-digit code.
    pub code: String,
}

/// One-time recovery codes: shown once, keep them somewhere safe.
#[derive(Debug, Serialize, ToSchema)]
pub struct RecoveryCodes {
    pub recovery_codes: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RotatedKey {
    /// Id of the new signing key.
    pub kid: String,
}

pub(super) async fn audit(
    state: &AppState,
    p: &Principal,
    action: &'static str,
    target: Option<String>,
    ip: ClientIp,
    detail: serde_json::Value,
) {
    state
        .auth
        .audit_quiet(
            AuditEntry {
                actor: p.actor(),
                action,
                target,
                outcome: "success",
                client_addr: ip.0.map(|a| a.to_string()),
                detail,
            },
            unix_ms(),
        )
        .await;
}

fn user_of(p: &Principal) -> Result<(i64, String), ApiError> {
    match &p.subject {
        Subject::User { user_id, session_id, .. } => Ok((*user_id, session_id.clone())),
        Subject::ApiKey { .. } => {
            Err(ApiError::invalid_request("this is for users signed in with a password, not API keys"))
        }
    }
}

/// Sign in with name and password.
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginRequest,
    extensions(("x-permission" = json!("public"))),
    responses((status = 200, description = "Tokens, or an MFA challenge", body = LoginResponse),
              (status = 401, description = "Invalid username or password", body = ErrorBody),
              (status = 429, description = "Too many failed attempts", body = ErrorBody),
              (status = 503, description = "Busy checking other passwords: try again (Retry-After)", body = ErrorBody)))]
pub async fn login(
    State(state): State<AppState>,
    ip: ClientIp,
    Body(req): Body<LoginRequest>,
) -> Result<Json<LoginResponse>, ApiError> {
    if req.username.len() > 256 || req.password.len() > secrets::MAX_PASSWORD_LEN {
        return Err(crate::auth::AuthError::InvalidCredentials.into());
    }
    Ok(Json(match state.auth.login(&req.username, &req.password, ip.0).await? {
        LoginOutcome::Tokens(t) => LoginResponse::Tokens(t),
        LoginOutcome::MfaRequired { mfa_token, expires_in } => {
            LoginResponse::Mfa(MfaChallenge { mfa_required: true, mfa_token, expires_in })
        }
    }))
}

/// Second step of sign-in: a TOTP code or a recovery code.
#[utoipa::path(post, path = "/api/v1/auth/login/mfa", tag = "auth", request_body = MfaLoginRequest,
    extensions(("x-permission" = json!("public"))),
    responses((status = 200, description = "Tokens", body = TokenPair),
              (status = 401, description = "Invalid MFA token or code", body = ErrorBody),
              (status = 429, description = "Too many failed attempts", body = ErrorBody)))]
pub async fn login_mfa(
    State(state): State<AppState>,
    ip: ClientIp,
    Body(req): Body<MfaLoginRequest>,
) -> Result<Json<TokenPair>, ApiError> {
    let pair = state.auth.login_mfa(&req.mfa_token, req.code.as_deref(), req.recovery_code.as_deref(), ip.0).await?;
    Ok(Json(pair))
}

/// Exchange a refresh token for a new pair. Each refresh token works once; presenting a used one
/// revokes the whole session.
#[utoipa::path(post, path = "/api/v1/auth/refresh", tag = "auth", request_body = RefreshRequest,
    extensions(("x-permission" = json!("public"))),
    responses((status = 200, description = "New tokens", body = TokenPair),
              (status = 401, description = "Unknown, used, expired or revoked refresh token", body = ErrorBody)))]
pub async fn refresh(
    State(state): State<AppState>,
    ip: ClientIp,
    Body(req): Body<RefreshRequest>,
) -> Result<Json<TokenPair>, ApiError> {
    Ok(Json(state.auth.refresh(&req.refresh_token, ip.0).await?))
}

/// Sign out: revokes the session of the access token (its refresh token stops working, its
/// access tokens within a second).
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth",
    extensions(("x-permission" = json!("authenticated"))),
    responses((status = 204, description = "Signed out")))]
pub async fn logout(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
) -> Result<StatusCode, ApiError> {
    let (_, session) = user_of(&p)?;
    state.auth.revoke_session(&session, "logout").await?;
    audit(&state, &p, "logout", Some(format!("session:{session}")), ip, json!({})).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Who am I: identity, role, permissions, scope and MFA state.
#[utoipa::path(get, path = "/api/v1/auth/me", tag = "auth",
    extensions(("x-permission" = json!("authenticated"))),
    responses((status = 200, description = "The caller", body = Me)))]
pub async fn me(State(state): State<AppState>, Extension(p): Extension<Principal>) -> Result<Json<Me>, ApiError> {
    let permissions = p.permissions.names().into_iter().map(str::to_owned).collect();
    Ok(Json(match &p.subject {
        Subject::User { user_id, username, role, .. } => {
            let user = state.auth.store.user_by_id(*user_id).await?.ok_or_else(|| ApiError::no_such("such user"))?;
            let left =
                if user.totp_enabled { Some(state.auth.store.unused_recovery_codes(*user_id).await?) } else { None };
            Me {
                kind: "user".into(),
                user_id: Some(*user_id),
                username: Some(username.clone()),
                api_key_id: None,
                role: Some(role.as_str().into()),
                permissions,
                scope: p.scope.clone(),
                mfa_enabled: user.totp_enabled,
                mfa_required_by_role: state.auth.store.role_requires_mfa(*role).await?,
                mfa_enrolment_only: p.mfa_enrolment_only,
                recovery_codes_left: left,
            }
        }
        Subject::ApiKey { key_id, .. } => Me {
            kind: "api_key".into(),
            user_id: None,
            username: None,
            api_key_id: Some(key_id.clone()),
            role: None,
            permissions,
            scope: p.scope.clone(),
            mfa_enabled: false,
            mfa_required_by_role: false,
            mfa_enrolment_only: false,
            recovery_codes_left: None,
        },
    }))
}

/// Change your password (every session of yours is signed out).
#[utoipa::path(post, path = "/api/v1/auth/password", tag = "auth", request_body = PasswordChange,
    extensions(("x-permission" = json!("authenticated"))),
    responses((status = 204, description = "Changed; sign in again"),
              (status = 401, description = "Current password wrong", body = ErrorBody),
              (status = 429, description = "Too many wrong passwords", body = ErrorBody)))]
pub async fn change_password(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Body(req): Body<PasswordChange>,
) -> Result<StatusCode, ApiError> {
    let (user_id, _) = user_of(&p)?;
    let user = state.auth.store.user_by_id(user_id).await?.ok_or_else(|| ApiError::no_such("such user"))?;
    let right = state
        .auth
        .check_own_secret(&user, ip.0, "password.change_failure", || {
            state.auth.password_matches(&user, &req.current_password)
        })
        .await?;
    if !right {
        return Err(crate::auth::AuthError::InvalidCredentials.into());
    }
    secrets::check_password_policy(&req.new_password).map_err(ApiError::invalid_request)?;
    let hash = state.auth.hash_password(&req.new_password).await?;
    state.auth.store.set_password(user_id, &hash, unix_ms()).await?;
    state.auth.revoke_user(user_id, "password changed").await?;
    audit(&state, &p, "password.changed", Some(format!("user:{}", user.username)), ip, json!({})).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Start MFA enrolment: a new TOTP secret (not active until confirmed with a code).
#[utoipa::path(post, path = "/api/v1/auth/mfa/enroll", tag = "auth",
    extensions(("x-permission" = json!("authenticated"))),
    responses((status = 200, description = "Secret, otpauth URI and QR code", body = MfaEnrolment),
              (status = 409, description = "MFA is already enabled", body = ErrorBody)))]
pub async fn mfa_enroll(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<MfaEnrolment>, ApiError> {
    let (user_id, _) = user_of(&p)?;
    let user = state.auth.store.user_by_id(user_id).await?.ok_or_else(|| ApiError::no_such("such user"))?;
    if user.totp_enabled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "MFA is already enabled; disable it first to enrol again",
        ));
    }
    let secret = secrets::totp::new_secret();
    let uri = secrets::totp::uri(&secret, &user.username, &state.auth.config.issuer_name)
        .map_err(|e| ApiError::internal(&e))?;
    let qr_svg = secrets::totp::qr_svg(&uri).map_err(|e| ApiError::internal(&e))?;
    state.auth.store.set_pending_totp(user_id, &secret, unix_ms()).await?;
    Ok(Json(MfaEnrolment { secret, otpauth_uri: uri, qr_svg }))
}

/// Confirm MFA enrolment with a current code: MFA is on from now, every session is signed out,
/// and the recovery codes are returned (once).
#[utoipa::path(post, path = "/api/v1/auth/mfa/confirm", tag = "auth", request_body = MfaCode,
    extensions(("x-permission" = json!("authenticated"))),
    responses((status = 200, description = "MFA enabled", body = RecoveryCodes),
              (status = 401, description = "Wrong or reused code", body = ErrorBody),
              (status = 409, description = "No enrolment started, or already enabled", body = ErrorBody),
              (status = 429, description = "Too many wrong codes", body = ErrorBody)))]
pub async fn mfa_confirm(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Body(req): Body<MfaCode>,
) -> Result<Json<RecoveryCodes>, ApiError> {
    let (user_id, _) = user_of(&p)?;
    let user = state.auth.store.user_by_id(user_id).await?.ok_or_else(|| ApiError::no_such("such user"))?;
    let Some(secret) = user.totp_secret.as_deref().filter(|_| !user.totp_enabled) else {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", "start with POST /api/v1/auth/mfa/enroll"));
    };
    let now = state.auth.now();
    let right = state
        .auth
        .check_own_secret(&user, ip.0, "mfa.confirm_failure", || async {
            Ok(state.auth.accept_totp(user_id, secret, &req.code, now).await?)
        })
        .await?;
    if !right {
        return Err(crate::auth::AuthError::InvalidCode.into());
    }
    let codes: Vec<String> = (0..RECOVERY_CODES)
        .map(|_| {
            let raw = secrets::random_id(10);
            format!("{}-{}", &raw[..5], &raw[5..])
        })
        .collect();
    let hashes: Vec<String> = codes.iter().map(|c| secrets::sha256_hex(&c.replace('-', ""))).collect();
    state.auth.store.enable_totp(user_id, &hashes, now).await?;
    state.auth.revoke_user(user_id, "MFA enabled").await?;
    audit(&state, &p, "mfa.enabled", Some(format!("user:{}", user.username)), ip, json!({})).await;
    Ok(Json(RecoveryCodes { recovery_codes: codes }))
}

/// Turn MFA off (needs a current code; refused when the role requires MFA).
#[utoipa::path(post, path = "/api/v1/auth/mfa/disable", tag = "auth", request_body = MfaCode,
    extensions(("x-permission" = json!("authenticated"))),
    responses((status = 204, description = "MFA disabled"),
              (status = 401, description = "Wrong or reused code", body = ErrorBody),
              (status = 409, description = "MFA not enabled, or required by the role", body = ErrorBody),
              (status = 429, description = "Too many wrong codes", body = ErrorBody)))]
pub async fn mfa_disable(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Body(req): Body<MfaCode>,
) -> Result<StatusCode, ApiError> {
    let (user_id, _) = user_of(&p)?;
    let user = state.auth.store.user_by_id(user_id).await?.ok_or_else(|| ApiError::no_such("such user"))?;
    let Some(secret) = user.totp_secret.as_deref().filter(|_| user.totp_enabled) else {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", "MFA is not enabled"));
    };
    if state.auth.store.role_requires_mfa(user.role).await? {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("the role {} requires MFA", user.role)));
    }
    let now = state.auth.now();
    let right = state
        .auth
        .check_own_secret(&user, ip.0, "mfa.disable_failure", || async {
            Ok(state.auth.accept_totp(user_id, secret, &req.code, now).await?)
        })
        .await?;
    if !right {
        return Err(crate::auth::AuthError::InvalidCode.into());
    }
    state.auth.store.disable_totp(user_id, now).await?;
    state.auth.revoke_user(user_id, "MFA disabled").await?;
    audit(&state, &p, "mfa.disabled", Some(format!("user:{}", user.username)), ip, json!({})).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Rotate the token signing key: new tokens are signed with a new key; tokens signed with the
/// old one stay valid until they expire (its public key stays in the JWKS until then).
#[utoipa::path(post, path = "/api/v1/auth/keys/rotate", tag = "auth",
    extensions(("x-permission" = json!("keys:rotate"))),
    responses((status = 200, description = "The new key id", body = RotatedKey)))]
pub async fn rotate_keys(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
) -> Result<Json<RotatedKey>, ApiError> {
    let kid = state.auth.keys.rotate(unix_ms()).await?;
    audit(&state, &p, "keys.rotated", Some(kid.clone()), ip, json!({})).await;
    Ok(Json(RotatedKey { kid }))
}

/// The public keys that verify access tokens (RFC 7517), for other services.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "auth",
    extensions(("x-permission" = json!("public"))),
    responses((status = 200, description = "JSON Web Key Set", body = Object)))]
pub async fn jwks(State(state): State<AppState>) -> Response {
    ([(axum::http::header::CACHE_CONTROL, "public, max-age=60")], Json(state.auth.keys.jwks())).into_response()
}
