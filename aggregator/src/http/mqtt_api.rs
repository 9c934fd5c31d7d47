//! MQTT credentials of integrators (see [`crate::mqtt::credentials`]).

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::auth_api::audit;
use super::authz::ClientIp;
use super::body::{Body, Path};
use super::{ApiError, AppState, ErrorBody};
use crate::auth::Principal;
use crate::mqtt::credentials::{CredentialStore, MqttCredential};
use crate::store::fleet::SiteIdText;
use crate::store::{Scope, StoreError};
use crate::unix_ms;

/// A new MQTT credential.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMqttCredential {
    /// The MQTT user name: 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,64}$")]
    pub username: String,
    /// Existing sites whose topics (`its/v1/{site}/#`, and the status of their devices) it may
    /// subscribe to.
    #[serde(default)]
    #[schema(inline, value_type = Vec<SiteIdText>)]
    pub sites: Vec<String>,
    /// Whether it may subscribe to `its/v1/alerts/#` (only a creator who sees everything may
    /// grant this).
    #[serde(default)]
    pub alerts: bool,
}

/// A credential just created: `password` is shown only now.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedMqttCredential {
    #[serde(flatten)]
    pub credential: MqttCredential,
    /// The MQTT password (not stored; only its hashes are).
    pub password: String,
}

/// The credentials.
#[derive(Debug, Serialize, ToSchema)]
pub struct MqttCredentialList {
    pub credentials: Vec<MqttCredential>,
}

/// List MQTT credentials of integrators (never their passwords).
#[utoipa::path(get, path = "/api/v1/mqtt/credentials", tag = "mqtt",
    extensions(("x-permission" = json!("apikeys:read"))),
    responses((status = 200, description = "MQTT credentials", body = MqttCredentialList)))]
pub async fn list_mqtt_credentials(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<MqttCredentialList>, ApiError> {
    let list = CredentialStore::new(state.store.db()).list().await?;
    Ok(Json(MqttCredentialList {
        credentials: list.into_iter().map(|c| c.credential).filter(|c| within_reach(&p, c)).collect(),
    }))
}

/// Whether the caller could have made the credential (sees all it sees): a caller limited to
/// sites lists and revokes only credentials within them, without alerts (which span every site).
fn within_reach(p: &Principal, c: &MqttCredential) -> bool {
    match &p.scope {
        Scope::All => true,
        Scope::Limited { sites, .. } => !c.alerts && c.sites.iter().all(|s| sites.contains(s)),
    }
}

/// Create an MQTT credential for an integrator, scoped to sites (and alerts). The password is in
/// the answer, once.
#[utoipa::path(post, path = "/api/v1/mqtt/credentials", tag = "mqtt", request_body = NewMqttCredential,
    extensions(("x-permission" = json!("apikeys:write"))),
    responses((status = 201, description = "Created; `password` is shown only now", body = CreatedMqttCredential),
              (status = 400, description = "Invalid user name", body = ErrorBody),
              (status = 404, description = "A site that does not exist", body = ErrorBody),
              (status = 403, description = "A site or alerts beyond the creator's grants", body = ErrorBody),
              (status = 409, description = "The user name is taken", body = ErrorBody)))]
pub async fn create_mqtt_credential(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Body(req): Body<NewMqttCredential>,
) -> Result<(StatusCode, Json<CreatedMqttCredential>), ApiError> {
    if crate::pki::validate_device_id(&req.username).is_err() {
        return Err(ApiError::invalid_request("username must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', '-'"));
    }
    if req.sites.len() > 1000 {
        return Err(ApiError::invalid_request("at most 1000 sites"));
    }
    for site in &req.sites {
        match state.fleet.get_site(site).await {
            Ok(_) => {}
            Err(StoreError::NotFound(_)) => {
                let shown: String = site.chars().take(64).collect();
                return Err(ApiError::no_such(format!("site {shown:?}")));
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Scope::Limited { sites, .. } = &p.scope
        && (req.alerts || req.sites.iter().any(|s| !sites.contains(s)))
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "an MQTT credential cannot see more than its creator",
        ));
    }
    let actor = p.actor();
    let store = CredentialStore::new(state.store.db());
    let (credential, password) = store.create(&req.username, &req.sites, req.alerts, Some(&actor), unix_ms()).await?;
    audit(
        &state,
        &p,
        "mqtt_credential.created",
        Some(format!("mqtt:{}", credential.username)),
        ip,
        json!({ "sites": credential.sites, "alerts": credential.alerts }),
    )
    .await;
    Ok((StatusCode::CREATED, Json(CreatedMqttCredential { credential, password })))
}

/// Revoke (delete) an MQTT credential; the embedded broker closes its connections within a few
/// seconds. With an external broker, write its files again (`its-aggregator mqtt
/// mosquitto-config`).
#[utoipa::path(delete, path = "/api/v1/mqtt/credentials/{username}", tag = "mqtt",
    params(("username" = String, Path, description = "MQTT user name")),
    extensions(("x-permission" = json!("apikeys:write"))),
    responses((status = 204, description = "Revoked"), (status = 404, description = "No such credential", body = ErrorBody)))]
pub async fn revoke_mqtt_credential(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Path(username): Path<String>,
) -> Result<StatusCode, ApiError> {
    let store = CredentialStore::new(state.store.db());
    match store.get(&username).await? {
        Some(c) if within_reach(&p, &c.credential) => {}
        _ => return Err(ApiError::no_such("such MQTT credential")),
    }
    if !store.delete(&username).await? {
        return Err(ApiError::no_such("such MQTT credential"));
    }
    audit(&state, &p, "mqtt_credential.revoked", Some(format!("mqtt:{username}")), ip, json!({})).await;
    Ok(StatusCode::NO_CONTENT)
}
