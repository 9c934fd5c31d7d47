//! Users, roles, API keys and the audit log.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::auth_api::audit;
use super::authz::ClientIp;
use super::body::{Body, Path};
use super::{ApiError, AppState, ErrorBody};
use crate::auth::store::{ApiKeyRow, AuditQuery, AuditRecord, UserRow};
use crate::auth::{Permission, PermissionSet, Principal, Role, scope_within, validate_scope};
use crate::store::fleet::{NameText, SiteIdText};
use crate::store::{CameraRef, Scope};
use crate::unix_ms;

/// Grants of a viewer or integrator: the sites and cameras (`device/camera`) it may see.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    #[serde(default)]
    #[schema(inline, value_type = Vec<SiteIdText>)]
    pub sites: Vec<String>,
    /// `device/camera`
    #[serde(default)]
    #[schema(inline, value_type = Vec<CameraRefText>)]
    pub cameras: Vec<String>,
}

/// `device/camera`: a device id, `/`, a camera id without control characters (up to 128 bytes;
/// the pattern admits 32 characters, which always fit).
#[derive(ToSchema)]
#[schema(pattern = r"^[A-Za-z0-9._-]{1,64}/[^\x00-\x1f\x7f-\x9f]{1,32}$")]
#[allow(dead_code)]
struct CameraRefText(String);

/// The name of a permission (`GET /api/v1/roles` lists them).
struct PermissionName;

impl utoipa::PartialSchema for PermissionName {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .enum_values(Some(Permission::ALL.iter().map(|p| p.as_str())))
            .into()
    }
}

impl ToSchema for PermissionName {}

impl Grants {
    fn to_scope(&self) -> Result<Scope, ApiError> {
        let cameras = self
            .cameras
            .iter()
            .map(|c| {
                CameraRef::parse(c)
                    .ok_or_else(|| ApiError::invalid_request(format!("camera {c:?} is not device/camera")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for s in &self.sites {
            crate::store::fleet::validate_site_id(s)
                .map_err(|_| ApiError::invalid_request(format!("site {s:?} is not a site id")))?;
        }
        Ok(Scope::Limited { sites: self.sites.clone(), cameras })
    }

    fn from_scope(scope: &Scope) -> Option<Self> {
        match scope {
            Scope::All => None,
            Scope::Limited { sites, cameras } => {
                Some(Self { sites: sites.clone(), cameras: cameras.iter().map(ToString::to_string).collect() })
            }
        }
    }
}

/// A user as the API shows it (never the password hash or TOTP secret).
#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    pub user_id: i64,
    pub username: String,
    pub role: Role,
    /// Absent: sees everything its role allows.
    pub grants: Option<Grants>,
    pub disabled: bool,
    pub mfa_enabled: bool,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl From<&UserRow> for UserView {
    fn from(u: &UserRow) -> Self {
        Self {
            user_id: u.user_id,
            username: u.username.clone(),
            role: u.role,
            grants: Grants::from_scope(&u.scope),
            disabled: u.disabled,
            mfa_enabled: u.totp_enabled,
            created_at_ms: u.created_at_ms,
            updated_at_ms: u.updated_at_ms,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserList {
    pub users: Vec<UserView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// 1 to 64 of `A-Z a-z 0-9 . _ - @` (stored lower-case).
    #[schema(pattern = r"^[A-Za-z0-9._@-]{1,64}$")]
    pub username: String,
    /// At least 12 characters, at most 256 bytes, not one repeated character.
    #[schema(min_length = 12)]
    pub password: String,
    pub role: Role,
    /// Only for viewer and integrator.
    pub grants: Option<Grants>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    pub role: Option<Role>,
    /// `null` removes the grants (sees all its role allows).
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<Grants>)]
    pub grants: Option<Option<Grants>>,
    pub disabled: Option<bool>,
    /// Sets a new password (the user's sessions end): at least 12 characters, at most 256 bytes,
    /// not one repeated character.
    #[schema(min_length = 12)]
    pub password: Option<String>,
}

/// A JSON number without a fraction (`2` or `2.0`, as JSON Schema's `integer` admits both).
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match Option::<f64>::deserialize(d)? {
        None => Ok(None),
        Some(v) if v.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&v) => Ok(Some(v as u32)),
        Some(v) => Err(serde::de::Error::custom(format!("expected a whole number, found {v}"))),
    }
}

/// `Some(None)` for an explicit `null`, `None` for an absent field.
pub fn double_option<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RoleView {
    pub role: Role,
    pub permissions: Vec<String>,
    /// Whether users of this role must use MFA.
    pub require_mfa: bool,
    /// Whether grants can narrow it to sites or cameras.
    pub scopable: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RoleList {
    pub roles: Vec<RoleView>,
    /// Every permission with what it allows.
    #[schema(value_type = Object)]
    pub permissions: serde_json::Value,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolePolicy {
    pub require_mfa: bool,
}

/// An API key as the API shows it (never its secret, except once at creation in `key`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyView {
    pub key_id: String,
    pub name: String,
    pub permissions: Vec<String>,
    pub grants: Option<Grants>,
    pub created_by: String,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub last_used_ms: Option<i64>,
    pub revoked: bool,
    /// The key itself: only in the answer to its creation. Send it as `Authorization: Bearer
    /// <key>` or `X-API-Key: <key>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl From<&ApiKeyRow> for ApiKeyView {
    fn from(k: &ApiKeyRow) -> Self {
        Self {
            key_id: k.key_id.clone(),
            name: k.name.clone(),
            permissions: k.permissions.clone(),
            grants: Grants::from_scope(&k.scope),
            created_by: k.created_by.clone(),
            created_at_ms: k.created_at_ms,
            expires_at_ms: k.expires_at_ms,
            last_used_ms: k.last_used_ms,
            revoked: k.revoked_at_ms.is_some(),
            key: None,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyList {
    pub api_keys: Vec<ApiKeyView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    /// 1 to 128 characters without control characters (leading and trailing spaces are trimmed).
    #[schema(value_type = NameText, inline)]
    pub name: String,
    /// Permission names; each must be one the creator has.
    #[schema(min_items = 1, inline, value_type = Vec<PermissionName>)]
    pub permissions: Vec<String>,
    /// Sites and cameras the key may see (within the creator's); absent = the creator's scope.
    pub grants: Option<Grants>,
    /// Days until the key expires (1..=3650); absent = never.
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(minimum = 1, maximum = 3650)]
    pub expires_in_days: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditRecord>,
    pub next_cursor: Option<String>,
}

fn role_view(role: Role, mfa: &[Role]) -> RoleView {
    RoleView {
        role,
        permissions: role.permissions().names().into_iter().map(str::to_owned).collect(),
        require_mfa: mfa.contains(&role),
        scopable: role.scopable(),
    }
}

async fn load_user(state: &AppState, id: i64) -> Result<UserRow, ApiError> {
    state.auth.store.user_by_id(id).await?.ok_or_else(|| ApiError::no_such(format!("user {id}")))
}

/// Whether the caller sees the user: it sees everything the user sees (a caller limited to
/// sites sees only users limited within them).
fn user_visible(p: &Principal, u: &UserRow) -> bool {
    scope_within(&crate::auth::effective_scope(u.role, &u.scope), &p.scope)
}

/// The user, when the caller could manage it (holds every permission of its role and sees all
/// it sees): 404 when the caller does not see it, 403 when it sees but may not manage it.
async fn load_user_within_reach(state: &AppState, p: &Principal, id: i64) -> Result<UserRow, ApiError> {
    let user = load_user(state, id).await?;
    if !user_visible(p, &user) {
        return Err(ApiError::no_such(format!("user {id}")));
    }
    if !p.may_manage_user(user.role, &user.scope) {
        return Err(beyond_caller("a user whose role has permissions"));
    }
    Ok(user)
}

/// 403 for a change that would give a user more than the caller has.
fn beyond_caller(what: &str) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("{what} beyond your own permissions or sites"))
}

/// Refuses a change that would leave no enabled admin.
async fn keep_an_admin(state: &AppState, changed: &UserRow, new_role: Role, disabled: bool) -> Result<(), ApiError> {
    if changed.role != Role::Admin || changed.disabled || (new_role == Role::Admin && !disabled) {
        return Ok(());
    }
    let others = state
        .auth
        .store
        .list_users()
        .await?
        .iter()
        .filter(|u| u.role == Role::Admin && !u.disabled && u.user_id != changed.user_id)
        .count();
    if others == 0 {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", "this would leave no enabled admin"));
    }
    Ok(())
}

/// List users.
#[utoipa::path(get, path = "/api/v1/users", tag = "users", extensions(("x-permission" = json!("users:read"))),
    responses((status = 200, description = "Users", body = UserList)))]
pub async fn list_users(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<UserList>, ApiError> {
    let users = state.auth.store.list_users().await?;
    Ok(Json(UserList { users: users.iter().filter(|u| user_visible(&p, u)).map(UserView::from).collect() }))
}

/// One user.
#[utoipa::path(get, path = "/api/v1/users/{id}", tag = "users", params(("id" = i64, Path, description = "User id")),
    extensions(("x-permission" = json!("users:read"))),
    responses((status = 200, description = "The user", body = UserView), (status = 404, description = "No such user", body = ErrorBody)))]
pub async fn get_user(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<i64>,
) -> Result<Json<UserView>, ApiError> {
    let user = load_user(&state, id).await?;
    if !user_visible(&p, &user) {
        return Err(ApiError::no_such(format!("user {id}")));
    }
    Ok(Json(UserView::from(&user)))
}

/// Create a user.
#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = NewUser,
    extensions(("x-permission" = json!("users:write"))),
    responses((status = 201, description = "Created", body = UserView), (status = 409, description = "Name taken", body = ErrorBody)))]
pub async fn create_user(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Body(req): Body<NewUser>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    let scope = match &req.grants {
        Some(g) => g.to_scope()?,
        None => Scope::All,
    };
    validate_scope(req.role, &scope).map_err(ApiError::invalid_request)?;
    if !p.may_manage_user(req.role, &scope) {
        return Err(beyond_caller("a user with a role or grants"));
    }
    let id = state.auth.create_user(&req.username, &req.password, req.role, &scope).await?;
    let user = load_user(&state, id).await?;
    audit(
        &state,
        &p,
        "user.created",
        Some(format!("user:{}", user.username)),
        ip,
        json!({ "role": user.role, "grants": req.grants }),
    )
    .await;
    Ok((StatusCode::CREATED, Json(UserView::from(&user))))
}

/// Change a user's role, grants, disabled flag or password. Any change signs the user out.
#[utoipa::path(patch, path = "/api/v1/users/{id}", tag = "users", request_body = UserPatch, params(("id" = i64, Path, description = "User id")),
    extensions(("x-permission" = json!("users:write"))),
    responses((status = 200, description = "Updated", body = UserView), (status = 404, description = "No such user", body = ErrorBody),
              (status = 409, description = "Would leave no enabled admin", body = ErrorBody)))]
pub async fn update_user(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Path(id): Path<i64>,
    Body(req): Body<UserPatch>,
) -> Result<Json<UserView>, ApiError> {
    let user = load_user_within_reach(&state, &p, id).await?;
    let role = req.role.unwrap_or(user.role);
    let scope = match &req.grants {
        None => user.scope.clone(),
        Some(None) => Scope::All,
        Some(Some(g)) => g.to_scope()?,
    };
    // A role change to a role that cannot be narrowed drops the grants.
    let scope = if role.scopable() || req.grants.as_ref().is_some_and(Option::is_some) { scope } else { Scope::All };
    validate_scope(role, &scope).map_err(ApiError::invalid_request)?;
    if !p.may_manage_user(role, &scope) {
        return Err(beyond_caller("a role or grants"));
    }
    let disabled = req.disabled.unwrap_or(user.disabled);
    keep_an_admin(&state, &user, role, disabled).await?;
    let now = unix_ms();
    if let Some(pw) = &req.password {
        crate::auth::secrets::check_password_policy(pw).map_err(ApiError::invalid_request)?;
        let hash = state.auth.hash_password(pw).await?;
        state.auth.store.set_password(id, &hash, now).await?;
    }
    state.auth.store.update_user(id, role, &scope, disabled, now).await?;
    state.auth.revoke_user(id, "account changed").await?;
    let target = Some(format!("user:{}", user.username));
    if role != user.role {
        audit(&state, &p, "user.role_changed", target.clone(), ip, json!({ "from": user.role, "to": role })).await;
    }
    if scope != user.scope {
        audit(&state, &p, "user.grants_changed", target.clone(), ip, json!({ "grants": Grants::from_scope(&scope) }))
            .await;
    }
    if disabled != user.disabled {
        audit(&state, &p, if disabled { "user.disabled" } else { "user.enabled" }, target.clone(), ip, json!({})).await;
    }
    if req.password.is_some() {
        audit(&state, &p, "password.reset", target, ip, json!({})).await;
    }
    Ok(Json(UserView::from(&load_user(&state, id).await?)))
}

/// Reset a user's MFA (lost phone): MFA off, recovery codes gone, sessions ended.
#[utoipa::path(delete, path = "/api/v1/users/{id}/mfa", tag = "users", params(("id" = i64, Path, description = "User id")),
    extensions(("x-permission" = json!("users:write"))),
    responses((status = 204, description = "Reset"), (status = 404, description = "No such user", body = ErrorBody)))]
pub async fn reset_mfa(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    let user = load_user_within_reach(&state, &p, id).await?;
    state.auth.store.disable_totp(id, unix_ms()).await?;
    state.auth.revoke_user(id, "MFA reset").await?;
    audit(&state, &p, "mfa.reset", Some(format!("user:{}", user.username)), ip, json!({})).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Roles with their permissions and MFA policy.
#[utoipa::path(get, path = "/api/v1/roles", tag = "users", extensions(("x-permission" = json!("users:read"))),
    responses((status = 200, description = "Roles", body = RoleList)))]
pub async fn list_roles(State(state): State<AppState>) -> Result<Json<RoleList>, ApiError> {
    let mfa = state.auth.store.mfa_required_roles().await?;
    let permissions: serde_json::Map<String, serde_json::Value> =
        Permission::ALL.iter().map(|p| (p.as_str().to_owned(), json!(p.description()))).collect();
    Ok(Json(RoleList {
        roles: Role::ALL.iter().map(|r| role_view(*r, &mfa)).collect(),
        permissions: permissions.into(),
    }))
}

/// Require (or stop requiring) MFA for a role. Users of the role without MFA can then only enrol.
#[utoipa::path(put, path = "/api/v1/roles/{role}/policy", tag = "users", request_body = RolePolicy,
    params(("role" = String, Path, description = "admin, operator, analyst, viewer, integrator or device")),
    extensions(("x-permission" = json!("users:write"))),
    responses((status = 200, description = "The role", body = RoleView), (status = 404, description = "No such role", body = ErrorBody)))]
pub async fn set_role_policy(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Path(role): Path<String>,
    Body(req): Body<RolePolicy>,
) -> Result<Json<RoleView>, ApiError> {
    let role = Role::parse(&role)
        .ok_or_else(|| ApiError::no_such(format!("role {:?}", role.chars().take(32).collect::<String>())))?;
    // A policy applies to every user of the role, on every site.
    if !p.may_grant(role.permissions(), &Scope::All) {
        return Err(beyond_caller("a policy of a role"));
    }
    state.auth.store.set_role_requires_mfa(role, req.require_mfa, unix_ms()).await?;
    if req.require_mfa {
        // Sessions of the role's users without MFA end: signed in again, they may only enrol.
        for u in state.auth.store.list_users().await?.iter().filter(|u| u.role == role && !u.totp_enabled) {
            state.auth.revoke_user(u.user_id, "role requires MFA").await?;
        }
    }
    audit(
        &state,
        &p,
        "role.policy_changed",
        Some(format!("role:{role}")),
        ip,
        json!({ "require_mfa": req.require_mfa }),
    )
    .await;
    let mfa = state.auth.store.mfa_required_roles().await?;
    Ok(Json(role_view(role, &mfa)))
}

/// List API keys (never their secrets).
#[utoipa::path(get, path = "/api/v1/api-keys", tag = "api-keys", extensions(("x-permission" = json!("apikeys:read"))),
    responses((status = 200, description = "API keys", body = ApiKeyList)))]
pub async fn list_api_keys(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<ApiKeyList>, ApiError> {
    let keys = state.auth.store.list_api_keys().await?;
    Ok(Json(ApiKeyList {
        api_keys: keys.iter().filter(|k| scope_within(&k.scope, &p.scope)).map(ApiKeyView::from).collect(),
    }))
}

/// Whether the caller could have made the key (it holds every permission of it and sees all it
/// sees): only such keys are listed and revocable by it.
fn key_within_reach(p: &Principal, k: &ApiKeyRow) -> bool {
    let perms = PermissionSet::of(&k.permissions.iter().filter_map(|n| Permission::parse(n)).collect::<Vec<_>>());
    p.may_grant(perms, &k.scope)
}

/// Create an API key. The key is in the answer, once; only its hash is kept.
#[utoipa::path(post, path = "/api/v1/api-keys", tag = "api-keys", request_body = NewApiKey,
    extensions(("x-permission" = json!("apikeys:write"))),
    responses((status = 201, description = "Created; `key` is shown only now", body = ApiKeyView),
              (status = 403, description = "A permission or grant beyond the creator's", body = ErrorBody)))]
pub async fn create_api_key(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Body(req): Body<NewApiKey>,
) -> Result<(StatusCode, Json<ApiKeyView>), ApiError> {
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid_request("name must have 1 to 128 printable characters"));
    }
    if req.permissions.is_empty() {
        return Err(ApiError::invalid_request("give at least one permission"));
    }
    let mut perms = Vec::new();
    for name in &req.permissions {
        perms.push(Permission::parse(name).ok_or_else(|| {
            ApiError::invalid_request(format!("unknown permission {:?}", name.chars().take(64).collect::<String>()))
        })?);
    }
    let perms = PermissionSet::of(&perms);
    if !perms.is_subset(p.permissions) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "an API key cannot have a permission its creator lacks",
        ));
    }
    let scope = match &req.grants {
        Some(g) => g.to_scope()?,
        None => p.scope.clone(),
    };
    if !scope_within(&scope, &p.scope) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "an API key cannot see more than its creator"));
    }
    let expires = match req.expires_in_days {
        None => None,
        Some(d) if (1..=3650).contains(&d) => Some(state.auth.now() + i64::from(d) * 86_400_000),
        Some(_) => return Err(ApiError::invalid_request("expires_in_days must be between 1 and 3650")),
    };
    let (row, key) = state.auth.create_api_key(&p, name, perms, scope, expires).await?;
    audit(
        &state,
        &p,
        "apikey.created",
        Some(format!("apikey:{}", row.key_id)),
        ip,
        json!({ "name": row.name, "permissions": row.permissions, "expires_at_ms": expires }),
    )
    .await;
    let mut view = ApiKeyView::from(&row);
    view.key = Some(key);
    Ok((StatusCode::CREATED, Json(view)))
}

/// Revoke an API key (immediately).
#[utoipa::path(delete, path = "/api/v1/api-keys/{id}", tag = "api-keys", params(("id" = String, Path, description = "Key id")),
    extensions(("x-permission" = json!("apikeys:write"))),
    responses((status = 204, description = "Revoked"), (status = 404, description = "No such key", body = ErrorBody)))]
pub async fn revoke_api_key(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    match state.auth.store.api_key(&id).await? {
        Some(k) if key_within_reach(&p, &k) => {}
        Some(k) if scope_within(&k.scope, &p.scope) => return Err(beyond_caller("an API key with permissions")),
        _ => return Err(ApiError::no_such("such API key")),
    }
    state.auth.revoke_api_key(&id).await?;
    audit(&state, &p, "apikey.revoked", Some(format!("apikey:{id}")), ip, json!({})).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Query parameters of the audit log (documentation; parsed strictly by the handler).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct AuditParams {
    /// `user:<name>`, `apikey:<id>`, `system`, `cli` or `anonymous`.
    actor: Option<String>,
    /// e.g. `login.failure`, `user.role_changed`, `apikey.created`.
    action: Option<String>,
    /// RFC 3339 or Unix ms, inclusive.
    #[param(value_type = Option<super::TimeParam>, inline)]
    from: Option<String>,
    /// RFC 3339 or Unix ms, exclusive.
    #[param(value_type = Option<super::TimeParam>, inline)]
    to: Option<String>,
    /// 1..=1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[1-9][0-9]{0,17}$")]
    cursor: Option<String>,
}

/// The audit log, newest first.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditParams), extensions(("x-permission" = json!("audit:read"))),
    responses((status = 200, description = "Entries", body = AuditPage), (status = 400, description = "Bad parameter", body = ErrorBody)))]
pub async fn list_audit(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    // The log names every site's devices, users and keys: not for a caller limited to some.
    if !p.sees_everything() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the audit log covers every site: it needs a credential that is not limited to sites",
        ));
    }
    let mut q = AuditQuery { limit: 100, ..Default::default() };
    for (name, value) in super::query_params(params, &["actor", "action", "from", "to", "limit", "cursor"])? {
        match name.as_str() {
            "actor" => q.actor = Some(value),
            "action" => q.action = Some(value),
            "from" => q.from_ms = Some(super::parse_time("from", &value)?),
            "to" => q.to_ms = Some(super::parse_time("to", &value)?),
            "limit" => q.limit = super::page_limit(&value)?,
            "cursor" => {
                q.before_id = Some(value.parse::<i64>().ok().filter(|v| *v > 0).ok_or_else(ApiError::invalid_cursor)?);
            }
            _ => return Err(ApiError::unknown_parameter(&name)),
        }
    }
    let mut entries = state.auth.store.query_audit(&q).await?;
    let more = entries.len() > q.limit as usize;
    entries.truncate(q.limit as usize);
    let next_cursor = if more { entries.last().map(|e| e.id.to_string()) } else { None };
    Ok(Json(AuditPage { entries, next_cursor }))
}
