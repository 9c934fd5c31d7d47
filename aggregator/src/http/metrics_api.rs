//! Traffic metrics (rollups) and anomalies: `GET /api/v1/metrics`, `GET /api/v1/anomalies`.
//! Both take the events API's camera filters and are narrowed to the caller's scope.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;

use super::{ApiError, AppState, TimeParam, direction_schema, page_limit, parse_time, query_params, string_enum};
use crate::analytics::{ANOMALY_KINDS, AnomalyQuery, MetricQuery, Resolution, query_anomalies, query_metrics};
use crate::auth::Principal;
use crate::store::PageCursor;

/// Default page size.
const DEFAULT_LIMIT: u32 = 100;

fn resolution_schema() -> utoipa::openapi::schema::Object {
    string_enum(&["1m", "15m", "1h"], "Rollup resolution (default 15m)")
}

fn anomaly_kind_schema() -> utoipa::openapi::schema::Object {
    string_enum(ANOMALY_KINDS, "Anomaly kind")
}

/// Query parameters of `GET /api/v1/metrics` (documentation; the handler parses them strictly).
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct MetricParams {
    /// `1m`, `15m` (default) or `1h`.
    #[param(schema_with = resolution_schema)]
    resolution: Option<String>,
    /// Device id.
    device: Option<String>,
    /// Camera id.
    camera: Option<String>,
    /// Site id (the camera's site, else its device's).
    site: Option<String>,
    /// Object class of crossing series (car, truck, ...).
    class: Option<String>,
    /// Count line.
    line: Option<String>,
    /// Zone (occupancy series).
    zone: Option<String>,
    /// `in` or `out`.
    #[param(schema_with = direction_schema)]
    direction: Option<String>,
    /// Bucket start at or after: RFC 3339 or Unix ms.
    #[param(value_type = Option<TimeParam>, inline)]
    from: Option<String>,
    /// Bucket start before: RFC 3339 or Unix ms.
    #[param(value_type = Option<TimeParam>, inline)]
    to: Option<String>,
    /// 1..=1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// A page of rollups.
#[derive(Debug, Serialize, ToSchema)]
pub struct MetricPageDoc {
    /// Oldest bucket first. Each: `resolution`, `start` (RFC 3339), `start_ms`, `end_ms`, `device`, `camera`,
    /// `line`, `zone`, `class`, `direction`, `count`, `speed_samples`, `speed_mean_kmh`, `speed_p85_kmh`, `occupancy`.
    #[schema(value_type = Vec<Object>)]
    pub metrics: Vec<serde_json::Value>,
    /// Present when more rows match: pass it as `cursor`.
    pub next_cursor: Option<String>,
}

/// Query parameters of `GET /api/v1/anomalies`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct AnomalyParams {
    /// `volume_high`, `volume_low` or `speed_drop`.
    #[param(schema_with = anomaly_kind_schema)]
    kind: Option<String>,
    /// Device id.
    device: Option<String>,
    /// Camera id.
    camera: Option<String>,
    /// Site id.
    site: Option<String>,
    /// Count line.
    line: Option<String>,
    /// Bucket start at or after: RFC 3339 or Unix ms.
    #[param(value_type = Option<TimeParam>, inline)]
    from: Option<String>,
    /// Bucket start before: RFC 3339 or Unix ms.
    #[param(value_type = Option<TimeParam>, inline)]
    to: Option<String>,
    /// 1..=1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// A page of anomalies.
#[derive(Debug, Serialize, ToSchema)]
pub struct AnomalyPageDoc {
    /// Newest first. Each: `id`, `kind`, `device`, `camera`, `line`, `resolution`, `start`, `start_ms`, `value`,
    /// `baseline`, `spread`, `score`, `samples`, `@timestamp`, `detected_at_ms`.
    #[schema(value_type = Vec<Object>)]
    pub anomalies: Vec<serde_json::Value>,
    /// Present when more match: pass it as `cursor`.
    pub next_cursor: Option<String>,
}

/// Filter values with NUL never match anything stored; refuse them rather than send them to the
/// database (PostgreSQL rejects NUL in text).
fn no_nul(p: &std::collections::HashMap<String, String>) -> Result<(), ApiError> {
    match p.iter().find(|(_, v)| v.contains('\0')) {
        Some((name, _)) => Err(ApiError::invalid_parameter(format!("{name} must not contain NUL"))),
        None => Ok(()),
    }
}

fn cursor(value: Option<&String>) -> Result<Option<(i64, i64)>, ApiError> {
    value.map(|c| PageCursor::decode(c).map(|p| (p.key_ms, p.id)).map_err(|_| ApiError::invalid_cursor())).transpose()
}

fn time(params: &std::collections::HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    params.get(name).map(|v| parse_time(name, v)).transpose()
}

/// Traffic metrics: rollups per camera, line, class and direction (counts, mean and 85th percentile speed) and per
/// zone (occupancy), over 1 minute, 15 minutes or 1 hour; oldest bucket first.
#[utoipa::path(get, path = "/api/v1/metrics", tag = "metrics", params(MetricParams),
    extensions(("x-permission" = json!("metrics:read"))),
    responses((status = 200, description = "A page of rollups", body = MetricPageDoc)))]
pub async fn list_metrics(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<crate::analytics::MetricPage>, ApiError> {
    let p = query_params(
        params,
        &[
            "resolution",
            "device",
            "camera",
            "site",
            "class",
            "line",
            "zone",
            "direction",
            "from",
            "to",
            "limit",
            "cursor",
        ],
    )?;
    no_nul(&p)?;
    let resolution = p
        .get("resolution")
        .map(|r| Resolution::parse(r).ok_or_else(|| ApiError::invalid_parameter("resolution must be 1m, 15m or 1h")))
        .transpose()?;
    if let Some(d) = p.get("direction")
        && d != "in"
        && d != "out"
    {
        return Err(ApiError::invalid_parameter("direction must be in or out"));
    }
    let q = MetricQuery {
        resolution,
        device: p.get("device").cloned(),
        camera: p.get("camera").cloned(),
        site: p.get("site").cloned(),
        class: p.get("class").cloned(),
        line: p.get("line").cloned(),
        zone: p.get("zone").cloned(),
        direction: p.get("direction").cloned(),
        from_ms: time(&p, "from")?,
        to_ms: time(&p, "to")?,
        limit: p.get("limit").map(|l| page_limit(l)).transpose()?.unwrap_or(DEFAULT_LIMIT),
        after: cursor(p.get("cursor"))?,
        scope: principal.scope.clone(),
    };
    Ok(Json(query_metrics(&state.store.db(), &q).await?))
}

/// Anomalies found by the analytics (unusual volumes by time of week, sudden speed drops), newest first.
#[utoipa::path(get, path = "/api/v1/anomalies", tag = "metrics", params(AnomalyParams),
    extensions(("x-permission" = json!("metrics:read"))),
    responses((status = 200, description = "A page of anomalies", body = AnomalyPageDoc)))]
pub async fn list_anomalies(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<crate::analytics::AnomalyPage>, ApiError> {
    let p = query_params(params, &["kind", "device", "camera", "site", "line", "from", "to", "limit", "cursor"])?;
    no_nul(&p)?;
    if let Some(k) = p.get("kind")
        && !ANOMALY_KINDS.contains(&k.as_str())
    {
        return Err(ApiError::invalid_parameter(format!("kind must be one of {}", ANOMALY_KINDS.join(", "))));
    }
    let q = AnomalyQuery {
        kind: p.get("kind").cloned(),
        device: p.get("device").cloned(),
        camera: p.get("camera").cloned(),
        site: p.get("site").cloned(),
        line: p.get("line").cloned(),
        from_ms: time(&p, "from")?,
        to_ms: time(&p, "to")?,
        limit: p.get("limit").map(|l| page_limit(l)).transpose()?.unwrap_or(DEFAULT_LIMIT),
        before: cursor(p.get("cursor"))?,
        scope: principal.scope.clone(),
    };
    Ok(Json(query_anomalies(&state.store.db(), &q).await?))
}
