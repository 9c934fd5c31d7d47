//! Sites, devices and cameras. Every read is narrowed to the caller's scope: something outside
//! it answers 404, exactly like something that does not exist.

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
use crate::auth::Principal;
use crate::store::Scope;
use crate::store::fleet::{
    CameraDetail, CameraPatch, DeviceDetail, DevicePatch, HealthSample, NameText, SiteIdText, SiteRecord,
};
use crate::unix_ms;

#[derive(Debug, Serialize, ToSchema)]
pub struct SiteList {
    pub sites: Vec<SiteRecord>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSite {
    /// `[A-Za-z0-9._-]`, 1 to 64 characters.
    #[schema(value_type = SiteIdText, inline)]
    pub site_id: String,
    /// 1 to 128 characters without control characters (leading and trailing spaces are trimmed).
    #[schema(value_type = NameText, inline)]
    pub name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SitePatch {
    /// 1 to 128 characters without control characters (leading and trailing spaces are trimmed).
    #[schema(value_type = NameText, inline)]
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceList {
    pub devices: Vec<DeviceDetail>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CameraList {
    pub cameras: Vec<CameraDetail>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthList {
    pub health: Vec<HealthSample>,
}

fn site_visible(scope: &Scope, site: &str) -> bool {
    match scope {
        Scope::All => true,
        Scope::Limited { sites, .. } => sites.iter().any(|s| s == site),
    }
}

/// Sites (a limited caller sees the sites it was granted).
#[utoipa::path(get, path = "/api/v1/sites", tag = "fleet", extensions(("x-permission" = json!("sites:read"))),
    responses((status = 200, description = "Sites", body = SiteList)))]
pub async fn list_sites(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<SiteList>, ApiError> {
    let sites = state.fleet.list_sites().await?.into_iter().filter(|s| site_visible(&p.scope, &s.site_id)).collect();
    Ok(Json(SiteList { sites }))
}

/// Create a site.
#[utoipa::path(post, path = "/api/v1/sites", tag = "fleet", request_body = NewSite, extensions(("x-permission" = json!("sites:write"))),
    responses((status = 201, description = "Created", body = SiteRecord), (status = 409, description = "Exists", body = ErrorBody)))]
pub async fn create_site(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Body(req): Body<NewSite>,
) -> Result<(StatusCode, Json<SiteRecord>), ApiError> {
    if !p.sees_everything() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a caller limited to sites cannot create sites (it could not see them)",
        ));
    }
    let site = state.fleet.create_site(&req.site_id, &req.name, unix_ms()).await?;
    audit(&state, &p, "site.created", Some(format!("site:{}", site.site_id)), ip, json!({ "name": site.name })).await;
    Ok((StatusCode::CREATED, Json(site)))
}

/// Rename a site.
#[utoipa::path(patch, path = "/api/v1/sites/{site}", tag = "fleet", request_body = SitePatch, params(("site" = String, Path, description = "Site id")),
    extensions(("x-permission" = json!("sites:write"))),
    responses((status = 200, description = "Renamed", body = SiteRecord), (status = 404, description = "No such site", body = ErrorBody)))]
pub async fn rename_site(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Path(site): Path<String>,
    Body(req): Body<SitePatch>,
) -> Result<Json<SiteRecord>, ApiError> {
    site_in_scope(&p, &site)?;
    let renamed = state.fleet.rename_site(&site, &req.name).await?;
    audit(&state, &p, "site.renamed", Some(format!("site:{site}")), ip, json!({ "name": renamed.name })).await;
    Ok(Json(renamed))
}

/// A site outside the caller's scope is answered as not found.
fn site_in_scope(p: &Principal, site: &str) -> Result<(), ApiError> {
    if site_visible(&p.scope, site) {
        Ok(())
    } else {
        let shown: String = site.chars().take(64).collect();
        Err(ApiError::no_such(format!("site {shown}")))
    }
}

/// Delete a site that nothing is assigned to.
#[utoipa::path(delete, path = "/api/v1/sites/{site}", tag = "fleet", params(("site" = String, Path, description = "Site id")),
    extensions(("x-permission" = json!("sites:write"))),
    responses((status = 204, description = "Deleted"), (status = 404, description = "No such site", body = ErrorBody),
              (status = 409, description = "Devices or cameras still assigned", body = ErrorBody)))]
pub async fn delete_site(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Path(site): Path<String>,
) -> Result<StatusCode, ApiError> {
    site_in_scope(&p, &site)?;
    state.fleet.delete_site(&site).await?;
    audit(&state, &p, "site.deleted", Some(format!("site:{site}")), ip, json!({})).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Devices with their latest health and cameras.
#[utoipa::path(get, path = "/api/v1/devices", tag = "fleet", extensions(("x-permission" = json!("devices:read"))),
    responses((status = 200, description = "Devices", body = DeviceList)))]
pub async fn list_devices(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<DeviceList>, ApiError> {
    Ok(Json(DeviceList { devices: state.fleet.list_devices(&p.scope).await? }))
}

/// One device with its latest health and cameras.
#[utoipa::path(get, path = "/api/v1/devices/{device}", tag = "fleet", params(("device" = String, Path, description = "Device id")),
    extensions(("x-permission" = json!("devices:read"))),
    responses((status = 200, description = "The device", body = DeviceDetail), (status = 404, description = "No such device", body = ErrorBody)))]
pub async fn get_device(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(device): Path<String>,
) -> Result<Json<DeviceDetail>, ApiError> {
    Ok(Json(state.fleet.get_device(&device, &p.scope).await?))
}

/// Rename a device, assign it to a site, or disable it (its certificate is refused from then on,
/// and a live connection is closed within a second) or enable it again.
#[utoipa::path(patch, path = "/api/v1/devices/{device}", tag = "fleet", request_body = DevicePatch, params(("device" = String, Path, description = "Device id")),
    extensions(("x-permission" = json!("devices:write"))),
    responses((status = 200, description = "Updated", body = DeviceDetail), (status = 404, description = "No such device", body = ErrorBody)))]
pub async fn update_device(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Path(device): Path<String>,
    Body(patch): Body<DevicePatch>,
) -> Result<Json<DeviceDetail>, ApiError> {
    let before = state.fleet.get_device(&device, &Scope::All).await?;
    let after = state.fleet.update_device(&device, &patch, &p.scope, unix_ms()).await?;
    let target = Some(format!("device:{device}"));
    if before.disabled != after.disabled {
        audit(
            &state,
            &p,
            if after.disabled { "device.disabled" } else { "device.enabled" },
            target.clone(),
            ip,
            json!({}),
        )
        .await;
    }
    if before.site_id != after.site_id || before.name != after.name {
        audit(&state, &p, "device.updated", target, ip, json!({ "site_id": after.site_id, "name": after.name })).await;
    }
    Ok(Json(after))
}

/// Health reports of a device, newest first.
#[utoipa::path(get, path = "/api/v1/devices/{device}/health", tag = "fleet",
    params(("device" = String, Path, description = "Device id"),
           ("from" = inline(Option<super::TimeParam>), Query, description = "RFC 3339 or Unix ms"),
           ("to" = inline(Option<super::TimeParam>), Query, description = "RFC 3339 or Unix ms"),
           ("limit" = Option<u32>, Query, description = "1..=1000, default 100", minimum = 1, maximum = 1000)),
    extensions(("x-permission" = json!("devices:read"))),
    responses((status = 200, description = "Health reports", body = HealthList), (status = 404, description = "No such device", body = ErrorBody)))]
pub async fn device_health(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(device): Path<String>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<HealthList>, ApiError> {
    let q = super::query_params(params, &["from", "to", "limit"])?;
    state.fleet.get_device(&device, &p.scope).await?;
    let from = q.get("from").map(|v| super::parse_time("from", v)).transpose()?;
    let to = q.get("to").map(|v| super::parse_time("to", v)).transpose()?;
    let limit = match q.get("limit") {
        Some(v) => super::page_limit(v)?,
        None => 100,
    };
    Ok(Json(HealthList { health: state.fleet.health_history(&device, from, to, limit, &p.scope).await? }))
}

/// Cameras, optionally of one device or site.
#[utoipa::path(get, path = "/api/v1/cameras", tag = "fleet",
    params(("device" = Option<String>, Query, description = "Device id"), ("site" = Option<String>, Query, description = "Effective site")),
    extensions(("x-permission" = json!("devices:read"))),
    responses((status = 200, description = "Cameras", body = CameraList)))]
pub async fn list_cameras(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<CameraList>, ApiError> {
    let q = super::query_params(params, &["device", "site"])?;
    let cameras = state
        .fleet
        .list_cameras(&p.scope, q.get("device").map(String::as_str), q.get("site").map(String::as_str))
        .await?;
    Ok(Json(CameraList { cameras }))
}

/// One camera.
#[utoipa::path(get, path = "/api/v1/devices/{device}/cameras/{camera}", tag = "fleet",
    params(("device" = String, Path, description = "Device id"), ("camera" = String, Path, description = "Camera id on the device")),
    extensions(("x-permission" = json!("devices:read"))),
    responses((status = 200, description = "The camera", body = CameraDetail), (status = 404, description = "No such camera", body = ErrorBody)))]
pub async fn get_camera(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path((device, camera)): Path<(String, String)>,
) -> Result<Json<CameraDetail>, ApiError> {
    Ok(Json(state.fleet.get_camera(&device, &camera, &p.scope).await?))
}

/// Rename a camera or give it a site of its own.
#[utoipa::path(patch, path = "/api/v1/devices/{device}/cameras/{camera}", tag = "fleet", request_body = CameraPatch,
    params(("device" = String, Path, description = "Device id"), ("camera" = String, Path, description = "Camera id on the device")),
    extensions(("x-permission" = json!("devices:write"))),
    responses((status = 200, description = "Updated", body = CameraDetail), (status = 404, description = "No such camera", body = ErrorBody)))]
pub async fn update_camera(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Path((device, camera)): Path<(String, String)>,
    Body(patch): Body<CameraPatch>,
) -> Result<Json<CameraDetail>, ApiError> {
    let after = state.fleet.update_camera(&device, &camera, &patch, &p.scope).await?;
    audit(
        &state,
        &p,
        "camera.updated",
        Some(format!("camera:{device}/{camera}")),
        ip,
        json!({ "site_id": after.site_id, "name": after.name }),
    )
    .await;
    Ok(Json(after))
}
