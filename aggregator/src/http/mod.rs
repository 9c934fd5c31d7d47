//! The REST API as an axum [`Router`]: an app that can be called without a socket
//! (`tower::ServiceExt::oneshot` in tests, [`transport`]: plain HTTP or HTTPS, in the binary).
//!
//! | Route | Answer |
//! |---|---|
//! | `GET /healthz` | `{"status":"ok","backend":"sqlite"}` after a database ping; 503 when it fails |
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /api/v1/devices` | `{"devices":[...]}` |
//! | `GET /api/v1/events?device=&camera=&kind=&site=&class=&zone=&line=&direction=&min_speed=&max_speed=&has_snapshot=&from=&to=&limit=&cursor=` | `{"events":[...],"next_cursor":...}`, newest first; each event has `has_snapshot` |
//! | `GET /api/v1/events/{id}/snapshot?variant=full\|crop` | the event's snapshot, `image/jpeg`: the full frame (default) or the crop |
//! | `GET /api/v1/stream` | server-sent events of what is committed now ([`stream_api`]) |
//! | `GET /api/v1/metrics`, `GET /api/v1/anomalies` | traffic rollups and anomalies ([`metrics_api`]) |
//! | `/api/v1/alert-rules`, `/api/v1/alert-channels`, `/api/v1/alerts`, `/api/v1/alert-deliveries` | alerting ([`alerts_api`]) |
//! | `/api/v1/mqtt/credentials` | integrators' MQTT logins ([`mqtt_api`]) |
//!
//! The whole list, with what each operation needs, is the OpenAPI document ([`openapi`]). A route
//! that is not in it is refused to everyone ([`authz`]), except the public `GET /metrics` and
//! `GET /api/v1/openapi.json` ([`authz::PUBLIC_ROUTES`]).
//!
//! The snapshot route answers 400 `invalid_parameter` for an id that is not `<device>:<seq>` or a
//! variant other than `full` / `crop`; 404 `event_not_found` when no such event is stored (even if
//! pictures for it arrived), 404 `snapshot_not_found` when the event has no snapshot, or no crop
//! for `variant=crop`; 503 `unavailable` when object storage cannot be reached.
//!
//! Every error is `{"error":{"code","message"}}` (see [`ApiError`]). Every request is counted in
//! [`HTTP_REQUESTS_TOTAL`] by route template and status, and timed in
//! [`HTTP_REQUEST_DURATION_SECONDS`].
//!
//! Inside: this file (the router, request metrics, `/healthz`), one `*_api` file per resource,
//! [`authz`] (who may call what, from the OpenAPI annotations), [`body`] and [`error`] (JSON in
//! and out), [`client_addr`] (the client behind a proxy), [`transport`] (the listener: TLS,
//! limits, timeouts).
//!
//! Dependencies: every service module, store, bus, certs, telemetry (the top of the crate: only
//! config, server and demo are above it). Nothing below uses it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;

use axum::Extension;

use crate::auth::{Access, AuthService, Principal};
use crate::snapshots::SnapshotObjects;
use crate::store::fleet::Fleet;
use crate::store::{EventId, EventQuery, EventStore, SnapshotLookup};
pub use authz::AccessMap;

pub mod admin_api;
pub mod alerts_api;
pub mod auth_api;
pub mod authz;
pub mod body;
pub mod client_addr;
pub mod error;
pub mod fleet_api;
pub mod metrics_api;
pub mod mqtt_api;
pub mod stream_api;
pub mod system_api;
pub mod transport;

use crate::telemetry::http::{HTTP_REQUEST_DURATION_SECONDS, HTTP_REQUESTS_TOTAL};
use body::Path;
pub use error::ApiError;

/// How long `/healthz` waits for the database.
const HEALTH_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn EventStore>,
    /// Where the snapshot pictures are.
    pub snapshots: SnapshotObjects,
    pub metrics: PrometheusHandle,
    /// Reverse proxies whose forwarding headers are believed ([`client_addr::client_addr`]).
    pub trusted_proxies: Arc<Vec<client_addr::IpNet>>,
    /// Authentication: users, tokens, API keys, audit.
    pub auth: Arc<AuthService>,
    /// Sites, devices and cameras.
    pub fleet: Fleet,
    /// What each endpoint needs ([`access_map`]).
    pub access: Arc<AccessMap>,
    /// What this replica (and, with Redis, the others) just committed.
    pub bus: crate::bus::EventBus,
    /// Turns true at shutdown: open `GET /api/v1/stream` answers end then (a dropped sender
    /// counts as never).
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Where alert channels may point ([`crate::alerts::targets`]).
    pub alert_targets: crate::alerts::targets::TargetPolicy,
}

/// The error form of every 4xx/5xx answer.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `invalid_parameter`, `unauthenticated`, `forbidden`, ...
    pub code: String,
    /// For people; safe to show.
    pub message: String,
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "ITS Camera AI aggregator API",
        description = "Traffic events, devices, sites and cameras, users and access of an ITS Camera AI fleet. \
Authenticate with `Authorization: Bearer <access token>` (from `POST /api/v1/auth/login`) or with an API key \
(`Authorization: Bearer its_...` or `X-API-Key: its_...`). Each operation's `x-permission` names what it needs. \
Errors are `{\"error\": {\"code\", \"message\"}}`."
    ),
    components(schemas(ErrorBody, ErrorDetail))
)]
struct ApiDoc;

/// Adds the security schemes, each operation's security requirement (from its `x-permission`),
/// the permission to its description, and the error answers every protected operation can give.
struct ApiConventions;

impl utoipa::Modify for ApiConventions {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT or its_ API key").build(),
            ),
        );
        components
            .add_security_scheme("api_key", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))));
        let error = |desc: &str| {
            utoipa::openapi::ResponseBuilder::new()
                .description(desc)
                .content(
                    "application/json",
                    utoipa::openapi::ContentBuilder::new()
                        .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for item in doc.paths.paths.values_mut() {
            for op in
                [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch].into_iter().flatten()
            {
                let access = op
                    .extensions
                    .as_ref()
                    .and_then(|e| e.get(authz::PERMISSION_EXTENSION))
                    .and_then(|v| v.as_str())
                    .and_then(Access::parse);
                // Every handler parses its query string strictly and takes an empty value as an
                // absent parameter (`?limit=` is the default limit): say so in each constrained
                // parameter's schema.
                for param in op.parameters.iter_mut().flatten() {
                    if param.parameter_in != utoipa::openapi::path::ParameterIn::Query {
                        continue;
                    }
                    let Some(schema) = param.schema.take() else { continue };
                    let plain = serde_json::to_value(&schema).ok() == Some(serde_json::json!({ "type": "string" }));
                    let is_any_of = matches!(&schema, utoipa::openapi::RefOr::T(utoipa::openapi::Schema::AnyOf(_)));
                    param.schema = Some(if plain || is_any_of {
                        schema
                    } else {
                        utoipa::openapi::schema::AnyOfBuilder::new()
                            .item(schema)
                            .item(
                                utoipa::openapi::schema::ObjectBuilder::new()
                                    .schema_type(utoipa::openapi::schema::Type::String)
                                    .enum_values(Some([""]))
                                    .description(Some("Empty: as if absent")),
                            )
                            .into()
                    });
                }
                let has_body = op.request_body.is_some();
                let mut add = |code: &str, desc: &str| {
                    if !op.responses.responses.contains_key(code) {
                        op.responses.responses.insert(code.to_owned(), error(desc).into());
                    }
                };
                add("400", "Invalid request");
                add("503", "Storage unavailable");
                if has_body {
                    // What `body::Body` answers for a body it cannot take.
                    add("408", "The request body did not arrive within `[http] body_timeout_s`");
                    add("413", "The request body is too large");
                    add("415", "The body is not `Content-Type: application/json`");
                }
                if access != Some(Access::Public) {
                    add("401", "No, invalid, expired or revoked credential");
                    add("403", "The credential lacks the permission");
                    op.security = Some(vec![
                        SecurityRequirement::new("bearer", Vec::<String>::new()),
                        SecurityRequirement::new("api_key", Vec::<String>::new()),
                    ]);
                }
                if let Some(a) = access {
                    let note = match a {
                        Access::Public => "Public.".to_owned(),
                        Access::Authenticated => "Any authenticated caller (their own account).".to_owned(),
                        Access::Requires(p) => format!("Requires the permission `{p}`."),
                    };
                    let d = op.description.get_or_insert_with(String::new);
                    if !d.is_empty() {
                        d.push_str("\n\n");
                    }
                    d.push_str(&note);
                }
            }
        }
    }
}

/// The documented API: every route with its OpenAPI description, in one list.
fn api() -> utoipa_axum::router::OpenApiRouter<AppState> {
    use utoipa::OpenApi as _;
    use utoipa_axum::routes;
    utoipa_axum::router::OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(auth_api::login))
        .routes(routes!(auth_api::login_mfa))
        .routes(routes!(auth_api::refresh))
        .routes(routes!(auth_api::logout))
        .routes(routes!(auth_api::me))
        .routes(routes!(auth_api::change_password))
        .routes(routes!(auth_api::mfa_enroll))
        .routes(routes!(auth_api::mfa_confirm))
        .routes(routes!(auth_api::mfa_disable))
        .routes(routes!(auth_api::rotate_keys))
        .routes(routes!(auth_api::jwks))
        .routes(routes!(admin_api::list_users, admin_api::create_user))
        .routes(routes!(admin_api::get_user, admin_api::update_user))
        .routes(routes!(admin_api::reset_mfa))
        .routes(routes!(admin_api::list_roles))
        .routes(routes!(admin_api::set_role_policy))
        .routes(routes!(admin_api::list_api_keys, admin_api::create_api_key))
        .routes(routes!(admin_api::revoke_api_key))
        .routes(routes!(admin_api::list_audit))
        .routes(routes!(fleet_api::list_sites, fleet_api::create_site))
        .routes(routes!(fleet_api::rename_site, fleet_api::delete_site))
        .routes(routes!(fleet_api::list_devices))
        .routes(routes!(fleet_api::get_device, fleet_api::update_device))
        .routes(routes!(fleet_api::device_health))
        .routes(routes!(fleet_api::list_cameras))
        .routes(routes!(fleet_api::get_camera, fleet_api::update_camera))
        .routes(routes!(list_events))
        .routes(routes!(stream_api::stream_events))
        .routes(routes!(event_snapshot))
        .routes(routes!(system_api::storage))
        .routes(routes!(metrics_api::list_metrics))
        .routes(routes!(metrics_api::list_anomalies))
        .routes(routes!(alerts_api::list_rules, alerts_api::create_rule))
        .routes(routes!(alerts_api::get_rule, alerts_api::update_rule, alerts_api::delete_rule))
        .routes(routes!(alerts_api::list_channels, alerts_api::create_channel))
        .routes(routes!(alerts_api::get_channel, alerts_api::update_channel, alerts_api::delete_channel))
        .routes(routes!(alerts_api::list_alerts))
        .routes(routes!(alerts_api::get_alert))
        .routes(routes!(alerts_api::ack_alert))
        .routes(routes!(alerts_api::resolve_alert))
        .routes(routes!(alerts_api::alert_deliveries))
        .routes(routes!(alerts_api::dead_letters))
        .routes(routes!(alerts_api::retry_delivery))
        .routes(routes!(mqtt_api::list_mqtt_credentials, mqtt_api::create_mqtt_credential))
        .routes(routes!(mqtt_api::revoke_mqtt_credential))
        .routes(routes!(healthz))
}

/// The OpenAPI document (served at `/api/v1/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    documented_routes().1
}

/// The routes and their document, with the conventions applied over every collected path.
fn documented_routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (routes, mut doc) = api().split_for_parts();
    utoipa::Modify::modify(&ApiConventions, &mut doc);
    (routes, doc)
}

/// What each endpoint needs, read from the OpenAPI document. Fails (naming them) when an
/// operation does not declare it.
pub fn access_map() -> Result<AccessMap, String> {
    AccessMap::from_openapi(&openapi())
}

/// The API's router, state applied.
pub fn router(state: AppState) -> Router {
    router_with(state, Router::new())
}

/// [`router`] with `extra` routes beside the documented ones, behind the same authorisation,
/// which refuses them to everyone: they declare no permission ([`authz::route_access`]). For the
/// tests that prove it.
#[doc(hidden)]
pub fn router_with(state: AppState, extra: Router<AppState>) -> Router {
    let (routes, doc) = documented_routes();
    let doc = Arc::new(doc);
    routes
        .merge(extra)
        .route("/metrics", get(render_metrics))
        .route(
            "/api/v1/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authz::authorize))
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

/// Liveness and database reachability.
#[utoipa::path(get, path = "/healthz", tag = "system", extensions(("x-permission" = json!("public"))),
    responses((status = 200, description = "`{\"status\":\"ok\",\"backend\":\"sqlite\"}`", body = Object),
              (status = 503, description = "The database cannot be reached", body = ErrorBody)))]
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

/// Query parameters of `GET /api/v1/events` (documentation; the handler parses them strictly).
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct EventParams {
    /// Device id.
    device: Option<String>,
    /// Camera id.
    camera: Option<String>,
    /// Event kind: line_crossing, speed_measurement, zone_enter, zone_exit, zone_dwell, stopped_vehicle, wrong_way, congestion, counts, object_track, zone_occupancy, device_health.
    #[param(schema_with = kind_schema)]
    kind: Option<String>,
    /// Site id (the camera's site, else its device's).
    site: Option<String>,
    /// Object class (label): car, truck, bus, person, ...
    class: Option<String>,
    /// Zone name.
    zone: Option<String>,
    /// Count line name.
    line: Option<String>,
    /// `in` or `out`.
    #[param(schema_with = direction_schema)]
    direction: Option<String>,
    /// km/h, inclusive.
    min_speed: Option<f64>,
    /// km/h, inclusive.
    max_speed: Option<f64>,
    /// Only events with (true) or without (false) a snapshot.
    has_snapshot: Option<bool>,
    /// RFC 3339 or Unix ms, inclusive.
    #[param(value_type = Option<TimeParam>, inline)]
    from: Option<String>,
    /// RFC 3339 or Unix ms, exclusive.
    #[param(value_type = Option<TimeParam>, inline)]
    to: Option<String>,
    /// 1..=1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// The schema of a time parameter: an RFC 3339 date-time or Unix milliseconds ([`parse_time`]).
pub struct TimeParam;

impl utoipa::PartialSchema for TimeParam {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64))),
            )
            .description(Some("RFC 3339 (`2023-11-14T22:13:20Z`) or Unix milliseconds"))
            .into()
    }
}

impl utoipa::ToSchema for TimeParam {}

/// A string parameter that takes one of `values` (`schema_with` drops the field's doc comment,
/// so the schema carries it).
fn string_enum(values: &[&str], description: &str) -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(values.iter().copied()))
        .description(Some(description))
        .build()
}

fn kind_schema() -> utoipa::openapi::schema::Object {
    string_enum(its_shared::event::KIND_NAMES, "Event kind")
}

fn direction_schema() -> utoipa::openapi::schema::Object {
    string_enum(&["in", "out"], "Direction of a line crossing")
}

/// A page of events.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct EventPageDoc {
    /// Newest first. Each: `id` (`device:seq`), `device_id`, `seq`, `camera`, `kind`, `label`, `@timestamp`, `observed_at_ms`, `ingested_at_ms`, `payload`, `has_snapshot`.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<serde_json::Value>,
    /// Present when more events match: pass it as `cursor`.
    pub next_cursor: Option<String>,
}

/// Events, newest first, filtered and paginated (only those of cameras the caller may see).
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventParams), extensions(("x-permission" = json!("events:read"))),
    responses((status = 200, description = "A page of events", body = EventPageDoc)))]
async fn list_events(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(pairs) = params.map_err(|_| ApiError::invalid_parameter("malformed query string"))?;
    let mut query = parse_event_query(pairs)?;
    query.scope = principal.scope.clone();
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

/// The snapshot of an event: the full frame (default) or the crop, JPEG.
#[utoipa::path(get, path = "/api/v1/events/{id}/snapshot", tag = "events",
    params(("id" = String, Path, description = "`device:seq`", pattern = r"^[A-Za-z0-9._-]{1,64}:[0-9]{1,19}$"),
           ("variant" = Option<String>, Query, description = "`full` (default, also when empty) or `crop`", pattern = "^(full|crop)?$")),
    extensions(("x-permission" = json!("events:read"))),
    responses((status = 200, description = "The picture", content_type = "image/jpeg", body = Vec<u8>),
              (status = 404, description = "No such event, or no snapshot", body = ErrorBody)))]
async fn event_snapshot(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(pairs) = params.map_err(|_| ApiError::invalid_parameter("malformed query string"))?;
    let variant = parse_snapshot_variant(pairs)?;
    let id = EventId::parse(&id).ok_or_else(|| ApiError::invalid_parameter("the event id must be <device>:<seq>"))?;
    if principal.scope != crate::store::Scope::All && !state.fleet.event_visible(&id, &principal.scope).await? {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "event_not_found", format!("no event {id} is stored")));
    }
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
/// absent; unknown and repeated parameters are refused. Parameters: `device`, `camera`, `kind`,
/// `site`, `class` (the object's label), `zone`, `line`, `direction` (`in`/`out`), `min_speed`
/// and `max_speed` (km/h, inclusive), `has_snapshot` (`true`/`false`), `from`, `to`, `limit`,
/// `cursor`. Kind, direction, speed bounds, limit range and cursor are checked by the store (one
/// place for both backends). The scope is not a parameter: the caller sets it from the
/// credentials.
pub fn parse_event_query(pairs: Vec<(String, String)>) -> Result<EventQuery, ApiError> {
    fn once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), ApiError> {
        if slot.is_some() {
            return Err(ApiError::invalid_parameter(format!("parameter {name} given more than once")));
        }
        *slot = Some(value);
        Ok(())
    }
    fn speed(name: &str, value: &str) -> Result<f64, ApiError> {
        value
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| ApiError::invalid_parameter(format!("{name} must be a number of km/h")))
    }
    let mut q = EventQuery::default();
    for (name, value) in pairs {
        let known = matches!(
            name.as_str(),
            "device"
                | "camera"
                | "kind"
                | "site"
                | "class"
                | "zone"
                | "line"
                | "direction"
                | "min_speed"
                | "max_speed"
                | "has_snapshot"
                | "from"
                | "to"
                | "limit"
                | "cursor"
        );
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
            "site" => once(&mut q.site, "site", value)?,
            "class" => once(&mut q.label, "class", value)?,
            "zone" => once(&mut q.zone, "zone", value)?,
            "line" => once(&mut q.line, "line", value)?,
            "direction" => once(&mut q.direction, "direction", value)?,
            "min_speed" => once(&mut q.min_speed_kmh, "min_speed", speed("min_speed", &value)?)?,
            "max_speed" => once(&mut q.max_speed_kmh, "max_speed", speed("max_speed", &value)?)?,
            "has_snapshot" => {
                let has = match value.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(ApiError::invalid_parameter("has_snapshot must be true or false")),
                };
                once(&mut q.has_snapshot, "has_snapshot", has)?;
            }
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

/// Strict query parsing: only the named parameters, each at most once; empty values are absent.
pub(crate) fn query_params(
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
    allowed: &[&str],
) -> Result<std::collections::HashMap<String, String>, ApiError> {
    let Query(pairs) = params.map_err(|_| ApiError::invalid_parameter("malformed query string"))?;
    let mut out = std::collections::HashMap::new();
    for (name, value) in pairs {
        if !allowed.contains(&name.as_str()) {
            return Err(ApiError::unknown_parameter(&name));
        }
        if out.contains_key(&name) {
            return Err(ApiError::invalid_parameter(format!("parameter {name} given more than once")));
        }
        if !value.is_empty() {
            out.insert(name, value);
        }
    }
    Ok(out)
}

/// A page size parameter: 1..=1000.
pub(crate) fn page_limit(value: &str) -> Result<u32, ApiError> {
    value
        .parse::<u32>()
        .ok()
        .filter(|l| (1..=1000).contains(l))
        .ok_or_else(|| ApiError::invalid_parameter("limit must be an integer between 1 and 1000"))
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
    fn every_operation_declares_who_may_call_it() {
        let doc = openapi();
        let map = access_map().expect("every operation declares x-permission");
        let ops: usize = doc.paths.paths.values().map(|item| authz::operations(item).len()).sum();
        assert_eq!(map.entries().len(), ops);
        assert_eq!(
            map.get(&axum::http::Method::GET, "/api/v1/events"),
            Some(Access::Requires(crate::auth::Permission::EventsRead))
        );
        assert_eq!(map.get(&axum::http::Method::POST, "/api/v1/auth/login"), Some(Access::Public));
        // An operation that declares nothing is named, and the router would not start.
        let mut broken = doc.clone();
        let item = broken.paths.paths.get_mut("/api/v1/users").expect("users");
        if let Some(op) = item.get.as_mut() {
            op.extensions = None;
        }
        let err = AccessMap::from_openapi(&broken).expect_err("undeclared");
        assert!(err.contains("GET /api/v1/users"), "{err}");
        // Protected operations document their security and 401/403 answers.
        let events = doc.paths.paths.get("/api/v1/events").and_then(|i| i.get.as_ref()).expect("events");
        assert!(events.security.is_some());
        assert!(events.responses.responses.contains_key("401") && events.responses.responses.contains_key("403"));
    }

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
    fn event_filters_parse() {
        let q = |pairs: &[(&str, &str)]| {
            parse_event_query(pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect())
        };
        let got = q(&[
            ("site", "north"),
            ("class", "truck"),
            ("zone", "z1"),
            ("line", "l1"),
            ("direction", "in"),
            ("min_speed", "40.5"),
            ("max_speed", "90"),
            ("has_snapshot", "true"),
            ("zone", ""),
        ])
        .expect("filters");
        let want = EventQuery {
            site: Some("north".into()),
            label: Some("truck".into()),
            zone: Some("z1".into()),
            line: Some("l1".into()),
            direction: Some("in".into()),
            min_speed_kmh: Some(40.5),
            max_speed_kmh: Some(90.0),
            has_snapshot: Some(true),
            ..EventQuery::default()
        };
        assert_eq!(got, want);
        assert_eq!(q(&[("has_snapshot", "false")]).expect("false").has_snapshot, Some(false));
        for bad in [
            &[("class", "car"), ("class", "bus")][..],
            &[("min_speed", "fast")],
            &[("max_speed", "inf")],
            &[("min_speed", "NaN")],
            &[("has_snapshot", "yes")],
            &[("scope", "all")],
            &[("label", "car")],
        ] {
            assert_eq!(q(bad).map_err(|e| e.status), Err(StatusCode::BAD_REQUEST), "{bad:?}");
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
