//! The REST API as an axum [`Router`]: an app that can be called without a socket
//! (`tower::ServiceExt::oneshot` in tests, `axum::serve` in the binary).
//!
//! | Route | Answer |
//! |---|---|
//! | `GET /healthz` | `{"status":"ok","backend":"sqlite"}` after a database ping; 503 when it fails |
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /api/v1/devices` | `{"devices":[...]}` |
//! | `GET /api/v1/events?device=&camera=&kind=&from=&to=&limit=&cursor=` | `{"events":[...],"next_cursor":...}`, newest first; each event has `has_snapshot` |
//! | `GET /api/v1/events/{id}/snapshot?variant=full\|crop` | the event's snapshot, `image/jpeg`: the full frame (default) or the crop |
//!
//! The snapshot route answers 400 `invalid_parameter` for an id that is not `<device>:<seq>` or a
//! variant other than `full` / `crop`; 404 `event_not_found` when no such event is stored (even if
//! pictures for it arrived), 404 `snapshot_not_found` when the event has no snapshot, or no crop
//! for `variant=crop`; 503 `unavailable` when object storage cannot be reached.
//!
//! Every error is `{"error":{"code","message"}}` (see [`ApiError`]). Every request is counted in
//! [`HTTP_REQUESTS_TOTAL`] by route template and status, and timed in
//! [`HTTP_REQUEST_DURATION_SECONDS`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::snapshots::SnapshotObjects;
use crate::store::{EventId, EventQuery, EventStore, SnapshotLookup};

pub mod error;

pub use error::ApiError;

/// Counter of HTTP requests, labels `route` (the route template, `unmatched` for 404s) and `status`.
pub const HTTP_REQUESTS_TOTAL: &str = "its_http_requests_total";
/// Histogram of request handling time in seconds, label `route`.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "its_http_request_duration_seconds";
/// How long `/healthz` waits for the database.
const HEALTH_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn EventStore>,
    /// Where the snapshot pictures are.
    pub snapshots: SnapshotObjects,
    pub metrics: PrometheusHandle,
}

/// The API's router, state applied.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(render_metrics))
        .route("/api/v1/devices", get(list_devices))
        .route("/api/v1/events", get(list_events))
        .route("/api/v1/events/{id}/snapshot", get(event_snapshot))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(track_requests))
        .with_state(state)
}

/// Counts and times every request, in one place.
async fn track_requests(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let start = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!(HTTP_REQUEST_DURATION_SECONDS, "route" => route.clone()).record(start.elapsed().as_secs_f64());
    metrics::counter!(HTTP_REQUESTS_TOTAL, "route" => route, "status" => status).increment(1);
    response
}

async fn not_found() -> ApiError {
    ApiError::not_found()
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

async fn healthz(State(state): State<AppState>) -> Result<Response, ApiError> {
    match tokio::time::timeout(HEALTH_PING_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => Ok(Json(serde_json::json!({
            "status": "ok",
            "backend": state.store.backend(),
        }))
        .into_response()),
        Ok(Err(e)) => Err(ApiError::unavailable(&e)),
        Err(_) => Err(ApiError::unavailable(&"database ping timed out")),
    }
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
        .into_response()
}

async fn list_devices(State(state): State<AppState>) -> Result<Response, ApiError> {
    let devices = state.store.list_devices().await?;
    Ok(Json(serde_json::json!({ "devices": devices })).into_response())
}

async fn list_events(
    State(state): State<AppState>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(pairs) = params.map_err(|_| ApiError::invalid_parameter("malformed query string"))?;
    let query = parse_event_query(pairs)?;
    let page = state.store.query_events(&query).await?;
    Ok(Json(page).into_response())
}

/// Which picture of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotVariant {
    Full,
    Crop,
}

/// The query string of `GET /api/v1/events/{id}/snapshot`: at most one `variant`, `full` (the
/// default, also when empty) or `crop`.
pub fn parse_snapshot_variant(pairs: Vec<(String, String)>) -> Result<SnapshotVariant, ApiError> {
    let mut variant = None;
    for (name, value) in pairs {
        if name != "variant" {
            return Err(ApiError::unknown_parameter(&name));
        }
        if variant.is_some() {
            return Err(ApiError::invalid_parameter("parameter variant given more than once"));
        }
        variant = Some(match value.as_str() {
            "" | "full" => SnapshotVariant::Full,
            "crop" => SnapshotVariant::Crop,
            _ => return Err(ApiError::invalid_parameter("variant must be full or crop")),
        });
    }
    Ok(variant.unwrap_or(SnapshotVariant::Full))
}

async fn event_snapshot(
    State(state): State<AppState>,
    Path(id): Path<String>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(pairs) = params.map_err(|_| ApiError::invalid_parameter("malformed query string"))?;
    let variant = parse_snapshot_variant(pairs)?;
    let id = EventId::parse(&id).ok_or_else(|| ApiError::invalid_parameter("the event id must be <device>:<seq>"))?;
    let record = match state.store.snapshot_for_event(&id).await? {
        SnapshotLookup::Found(record) => record,
        SnapshotLookup::NoEvent => {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "event_not_found", format!("no event {id} is stored")));
        }
        SnapshotLookup::NoSnapshot => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "snapshot_not_found",
                format!("event {id} has no snapshot"),
            ));
        }
    };
    let key = match variant {
        SnapshotVariant::Full => record.full_key,
        SnapshotVariant::Crop => record.crop_key.ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "snapshot_not_found",
                format!("the snapshot of event {id} has no crop"),
            )
        })?,
    };
    match state.snapshots.get(&key).await {
        Ok(Some(bytes)) => Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, "private, max-age=86400, immutable")],
            bytes,
        )
            .into_response()),
        // The row is written only after its objects: a missing one was removed behind our back.
        Ok(None) => Err(ApiError::internal(&format!("object {key} of event {id} is missing"))),
        Err(e) => {
            tracing::warn!(error = %e, "snapshot store unavailable");
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the snapshot store is unavailable"))
        }
    }
}

/// Maps the query string of `GET /api/v1/events` onto an [`EventQuery`]. Empty values count as
/// absent; unknown and repeated parameters are refused. Kind, limit range and cursor are checked
/// by the store (one place for both backends).
pub fn parse_event_query(pairs: Vec<(String, String)>) -> Result<EventQuery, ApiError> {
    fn once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), ApiError> {
        if slot.is_some() {
            return Err(ApiError::invalid_parameter(format!("parameter {name} given more than once")));
        }
        *slot = Some(value);
        Ok(())
    }
    let mut q = EventQuery::default();
    for (name, value) in pairs {
        let known = matches!(name.as_str(), "device" | "camera" | "kind" | "from" | "to" | "limit" | "cursor");
        if !known {
            return Err(ApiError::unknown_parameter(&name));
        }
        if value.is_empty() {
            continue;
        }
        match name.as_str() {
            "device" => once(&mut q.device, "device", value)?,
            "camera" => once(&mut q.camera, "camera", value)?,
            "kind" => once(&mut q.kind, "kind", value)?,
            "cursor" => once(&mut q.cursor, "cursor", value)?,
            "from" => once(&mut q.from_ms, "from", parse_time("from", &value)?)?,
            "to" => once(&mut q.to_ms, "to", parse_time("to", &value)?)?,
            _ => {
                let limit = value.parse::<u32>().map_err(|_| {
                    ApiError::invalid_parameter(format!(
                        "limit must be an integer between 1 and {}",
                        crate::store::MAX_PAGE_LIMIT
                    ))
                })?;
                once(&mut q.limit, "limit", limit)?;
            }
        }
    }
    Ok(q)
}

/// Unix milliseconds (`1700000000000`, may be negative) or RFC 3339 (`2023-11-14T22:13:20Z`).
pub fn parse_time(name: &str, value: &str) -> Result<i64, ApiError> {
    let bad = || ApiError::invalid_parameter(format!("{name} must be an RFC 3339 time or Unix milliseconds"));
    let digits = value.strip_prefix('-').unwrap_or(value);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse::<i64>().map_err(|_| bad());
    }
    let t = time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339).map_err(|_| bad())?;
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_variants() {
        let q = |pairs: &[(&str, &str)]| {
            parse_snapshot_variant(pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect())
        };
        assert_eq!(q(&[]), Ok(SnapshotVariant::Full));
        assert_eq!(q(&[("variant", "")]), Ok(SnapshotVariant::Full));
        assert_eq!(q(&[("variant", "full")]), Ok(SnapshotVariant::Full));
        assert_eq!(q(&[("variant", "crop")]), Ok(SnapshotVariant::Crop));
        for bad in [&[("variant", "thumb")][..], &[("variant", "crop"), ("variant", "crop")], &[("size", "1")]] {
            assert_eq!(q(bad).map_err(|e| e.status), Err(StatusCode::BAD_REQUEST), "{bad:?}");
        }
    }

    #[test]
    fn event_ids_parse_strictly() {
        let id = EventId::parse("box-7:42").expect("valid");
        assert_eq!((id.device_id.as_str(), id.seq), ("box-7", 42));
        assert_eq!(id.to_string(), "box-7:42");
        assert_eq!(EventId::parse("a:b:3"), None, "device ids have no colon");
        for bad in
            ["", ":", "box", "box:", ":5", "box:-1", "box:+1", "box:1.0", "box: 1", "b x:1", "box:99999999999999999999"]
        {
            assert_eq!(EventId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn times_parse_as_millis_or_rfc3339() {
        assert_eq!(parse_time("from", "1700000000123").expect("ms"), 1_700_000_000_123);
        assert_eq!(parse_time("from", "-5").expect("ms"), -5);
        assert_eq!(parse_time("from", "2023-11-14T22:13:20.123Z").expect("rfc"), 1_700_000_000_123);
        assert_eq!(parse_time("from", "2023-11-14T23:13:20.123+01:00").expect("rfc"), 1_700_000_000_123);
        for bad in ["", "-", "x", "99999999999999999999", "2023-13-01T00:00:00Z", "2023-11-14"] {
            assert!(parse_time("from", bad).is_err(), "{bad}");
        }
    }
}
