//! Alert rules, notification channels, alerts and their deliveries (see [`crate::alerts`]).
//!
//! | Route | Permission |
//! |---|---|
//! | `GET/POST /api/v1/alert-rules`, `GET/PUT/DELETE /api/v1/alert-rules/{id}` | `rules:read` / `rules:write` |
//! | `GET/POST /api/v1/alert-channels`, `GET/PUT/DELETE /api/v1/alert-channels/{id}` | `rules:read` / `rules:write` |
//! | `GET /api/v1/alerts`, `GET /api/v1/alerts/{id}`, `GET /api/v1/alerts/{id}/deliveries` | `alerts:read` |
//! | `POST /api/v1/alerts/{id}/ack`, `POST /api/v1/alerts/{id}/resolve` | `alerts:ack` |
//! | `GET /api/v1/alert-deliveries/dead`, `POST /api/v1/alert-deliveries/{id}/retry` | `rules:read` / `rules:write` |
//!
//! A rule or channel with a bad field is answered 400 `invalid_field`, the message naming each
//! bad field by its path (`condition.speed_above_kmh: ...`); a rule naming a channel that does
//! not exist, 409 `unknown_channel`. Alerts are narrowed to the caller's scope like events.
//!
//! Rules and channels apply to every site (a rule fires on any camera's events and sends them to
//! its channels), so changing them — and retrying a delivery — needs a credential that is not
//! limited to sites (403 otherwise). A channel's target must be a place notifications may go
//! ([`crate::alerts::targets`]: not loopback or link-local): 400 `invalid_field` otherwise.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde_json::{Value, json};

use super::auth_api::audit;
use super::authz::ClientIp;
use super::body::{Body, Path};
use super::{ApiError, AppState, ErrorBody};
use crate::alerts::model::{ChannelSpec, FieldError, RuleSpec};
use crate::alerts::store::{AlertQuery, AlertStore};
use crate::auth::Principal;
use crate::bus::BusMessage;
use crate::store::Scope;
use crate::unix_ms;

fn alerts(state: &AppState) -> AlertStore {
    AlertStore::new(state.store.db())
}

/// 403 for a caller limited to sites, for changes that reach every site.
fn require_all_sites(p: &Principal, what: &str) -> Result<(), ApiError> {
    if p.sees_everything() {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{what} apply to every site: this needs a credential that is not limited to sites"),
        ))
    }
}

/// A channel whose target the policy refuses: 400 naming the field.
fn check_targets(state: &AppState, spec: &ChannelSpec) -> Result<(), ApiError> {
    let errors = crate::alerts::targets::channel_target_errors(&state.alert_targets, spec);
    if errors.is_empty() { Ok(()) } else { Err(field_errors(errors)) }
}

fn field_errors(errors: Vec<FieldError>) -> ApiError {
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", text.join("; "))
}

/// Alert rules.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct RuleList {
    /// Each: the rule's fields with `rule_id`, `suppressed_total`, `created_by`, `created_at_ms`, `updated_at_ms`.
    #[schema(value_type = Vec<Object>)]
    pub rules: Vec<Value>,
}

/// Notification channels (without their secrets).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ChannelList {
    /// Each: the channel's fields with `channel_id`; `secret` and `password` are replaced by
    /// `has_secret` / `has_password`.
    #[schema(value_type = Vec<Object>)]
    pub channels: Vec<Value>,
}

/// A page of alerts.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct AlertPageDoc {
    /// Newest first. Each: `alert_id`, `rule_id`, `rule_name`, `severity`, `state`, `subject`, `device_id`, `camera`, `title`, `details`, `count`, `opened_at`, `opened_at_ms`, `last_seen_ms`, `acknowledged_at_ms`, `acknowledged_by`, `resolved_at_ms`, `resolved_by`, `escalated_at_ms`.
    #[schema(value_type = Vec<Object>)]
    pub alerts: Vec<Value>,
    /// Present when more alerts match: pass it as `cursor`.
    pub next_cursor: Option<String>,
}

/// The deliveries of an alert, each with its attempts.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct DeliveryList {
    /// Each: `delivery_id`, `alert_id`, `channel_id`, `reason` (opened, escalated), `state` (pending, delivered, dead), `attempts`, `next_attempt_ms`, `last_error`, `created_at_ms`, `updated_at_ms`, and `attempt_log`: every attempt with `attempt`, `at_ms`, `outcome`, `http_status`, `error`, `latency_ms`.
    #[schema(value_type = Vec<Object>)]
    pub deliveries: Vec<Value>,
}

use crate::alerts::model::IdNumber as IdParam;

async fn check_channels(store: &AlertStore, spec: &RuleSpec) -> Result<(), ApiError> {
    let refs = spec.channel_refs();
    let ids: Vec<i64> = refs.iter().map(|(_, id)| *id).collect();
    let missing = store.missing_channels(&ids).await?;
    if let Some((path, id)) = refs.iter().find(|(_, id)| missing.contains(id)) {
        return Err(ApiError::new(StatusCode::CONFLICT, "unknown_channel", format!("{path}: no alert channel {id}")));
    }
    Ok(())
}

// -- Rules ---------------------------------------------------------------------------------------

/// Alert rules.
#[utoipa::path(get, path = "/api/v1/alert-rules", tag = "alerts", extensions(("x-permission" = json!("rules:read"))),
    responses((status = 200, description = "Rules", body = RuleList)))]
pub async fn list_rules(State(state): State<AppState>) -> Result<Json<RuleList>, ApiError> {
    let rules = alerts(&state).list_rules().await?.iter().map(|r| r.to_json()).collect();
    Ok(Json(RuleList { rules }))
}

/// Create an alert rule.
#[utoipa::path(post, path = "/api/v1/alert-rules", tag = "alerts", request_body = crate::alerts::model::RuleBody,
    extensions(("x-permission" = json!("rules:write"))),
    responses((status = 201, description = "Created", body = Object),
              (status = 409, description = "A channel it names does not exist", body = ErrorBody)))]
pub async fn create_rule(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Body(mut spec): Body<RuleSpec>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    require_all_sites(&p, "alert rules")?;
    spec.validate().map_err(field_errors)?;
    let store = alerts(&state);
    check_channels(&store, &spec).await?;
    let rule = store.create_rule(&spec, Some(&p.actor()), unix_ms()).await?;
    crate::alerts::rules_changed();
    audit(
        &state,
        &p,
        "alert_rule.created",
        Some(format!("alert_rule:{}", rule.rule_id)),
        ip,
        json!({ "name": rule.spec.name }),
    )
    .await;
    Ok((StatusCode::CREATED, Json(rule.to_json())))
}

/// One alert rule.
#[utoipa::path(get, path = "/api/v1/alert-rules/{id}", tag = "alerts",
    params(("id" = inline(IdParam), Path, description = "Rule id")),
    extensions(("x-permission" = json!("rules:read"))),
    responses((status = 200, description = "The rule", body = Object), (status = 404, description = "No such rule", body = ErrorBody)))]
pub async fn get_rule(State(state): State<AppState>, Path(id): Path<i64>) -> Result<Json<Value>, ApiError> {
    Ok(Json(alerts(&state).get_rule(id).await?.to_json()))
}

/// Replace an alert rule.
#[utoipa::path(put, path = "/api/v1/alert-rules/{id}", tag = "alerts", request_body = crate::alerts::model::RuleBody,
    params(("id" = inline(IdParam), Path, description = "Rule id")),
    extensions(("x-permission" = json!("rules:write"))),
    responses((status = 200, description = "Replaced", body = Object), (status = 404, description = "No such rule", body = ErrorBody),
              (status = 409, description = "A channel it names does not exist", body = ErrorBody)))]
pub async fn update_rule(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Path(id): Path<i64>,
    Body(mut spec): Body<RuleSpec>,
) -> Result<Json<Value>, ApiError> {
    require_all_sites(&p, "alert rules")?;
    spec.validate().map_err(field_errors)?;
    let store = alerts(&state);
    store.get_rule(id).await?;
    check_channels(&store, &spec).await?;
    let rule = store.update_rule(id, &spec, unix_ms()).await?;
    crate::alerts::rules_changed();
    audit(&state, &p, "alert_rule.updated", Some(format!("alert_rule:{id}")), ip, json!({ "name": rule.spec.name }))
        .await;
    Ok(Json(rule.to_json()))
}

/// Delete an alert rule (its alerts stay).
#[utoipa::path(delete, path = "/api/v1/alert-rules/{id}", tag = "alerts",
    params(("id" = inline(IdParam), Path, description = "Rule id")),
    extensions(("x-permission" = json!("rules:write"))),
    responses((status = 204, description = "Deleted"), (status = 404, description = "No such rule", body = ErrorBody)))]
pub async fn delete_rule(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    require_all_sites(&p, "alert rules")?;
    alerts(&state).delete_rule(id).await?;
    crate::alerts::rules_changed();
    audit(&state, &p, "alert_rule.deleted", Some(format!("alert_rule:{id}")), ip, json!({})).await;
    Ok(StatusCode::NO_CONTENT)
}

// -- Channels ------------------------------------------------------------------------------------

/// Notification channels (without their secrets).
#[utoipa::path(get, path = "/api/v1/alert-channels", tag = "alerts", extensions(("x-permission" = json!("rules:read"))),
    responses((status = 200, description = "Channels", body = ChannelList)))]
pub async fn list_channels(State(state): State<AppState>) -> Result<Json<ChannelList>, ApiError> {
    let channels = alerts(&state).list_channels().await?.iter().map(|c| c.to_json()).collect();
    Ok(Json(ChannelList { channels }))
}

/// Create a notification channel: a signed webhook, an MQTT broker or e-mail recipients.
#[utoipa::path(post, path = "/api/v1/alert-channels", tag = "alerts", request_body = crate::alerts::model::ChannelBody,
    extensions(("x-permission" = json!("rules:write"))),
    responses((status = 201, description = "Created (without its secrets)", body = Object)))]
pub async fn create_channel(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Body(mut spec): Body<ChannelSpec>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    require_all_sites(&p, "alert channels")?;
    spec.validate().map_err(field_errors)?;
    check_targets(&state, &spec)?;
    let channel = alerts(&state).create_channel(&spec, unix_ms()).await?;
    audit(
        &state,
        &p,
        "alert_channel.created",
        Some(format!("alert_channel:{}", channel.channel_id)),
        ip,
        json!({ "name": channel.spec.name, "kind": channel.spec.target.kind() }),
    )
    .await;
    Ok((StatusCode::CREATED, Json(channel.to_json())))
}

/// One notification channel (without its secrets).
#[utoipa::path(get, path = "/api/v1/alert-channels/{id}", tag = "alerts",
    params(("id" = inline(IdParam), Path, description = "Channel id")),
    extensions(("x-permission" = json!("rules:read"))),
    responses((status = 200, description = "The channel", body = Object), (status = 404, description = "No such channel", body = ErrorBody)))]
pub async fn get_channel(State(state): State<AppState>, Path(id): Path<i64>) -> Result<Json<Value>, ApiError> {
    Ok(Json(alerts(&state).get_channel(id).await?.to_json()))
}

/// Replace a notification channel (secrets included: they are never shown, so give them again).
#[utoipa::path(put, path = "/api/v1/alert-channels/{id}", tag = "alerts", request_body = crate::alerts::model::ChannelBody,
    params(("id" = inline(IdParam), Path, description = "Channel id")),
    extensions(("x-permission" = json!("rules:write"))),
    responses((status = 200, description = "Replaced", body = Object), (status = 404, description = "No such channel", body = ErrorBody)))]
pub async fn update_channel(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Path(id): Path<i64>,
    Body(mut spec): Body<ChannelSpec>,
) -> Result<Json<Value>, ApiError> {
    require_all_sites(&p, "alert channels")?;
    spec.validate().map_err(field_errors)?;
    check_targets(&state, &spec)?;
    let channel = alerts(&state).update_channel(id, &spec, unix_ms()).await?;
    audit(
        &state,
        &p,
        "alert_channel.updated",
        Some(format!("alert_channel:{id}")),
        ip,
        json!({ "name": channel.spec.name }),
    )
    .await;
    Ok(Json(channel.to_json()))
}

/// Delete a notification channel that no rule names.
#[utoipa::path(delete, path = "/api/v1/alert-channels/{id}", tag = "alerts",
    params(("id" = inline(IdParam), Path, description = "Channel id")),
    extensions(("x-permission" = json!("rules:write"))),
    responses((status = 204, description = "Deleted"), (status = 404, description = "No such channel", body = ErrorBody),
              (status = 409, description = "Rules still name it", body = ErrorBody)))]
pub async fn delete_channel(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    require_all_sites(&p, "alert channels")?;
    alerts(&state).delete_channel(id).await?;
    audit(&state, &p, "alert_channel.deleted", Some(format!("alert_channel:{id}")), ip, json!({})).await;
    Ok(StatusCode::NO_CONTENT)
}

// -- Alerts --------------------------------------------------------------------------------------

/// Query parameters of `GET /api/v1/alerts` (documentation; the handler parses them strictly).
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct AlertParams {
    /// `open`, `acknowledged` or `resolved`.
    #[param(schema_with = state_schema)]
    state: Option<String>,
    /// `info`, `warning` or `critical`.
    #[param(schema_with = severity_schema)]
    severity: Option<String>,
    /// Rule id.
    #[param(minimum = 1, maximum = 9223372036854775807_i64)]
    rule: Option<i64>,
    /// Device id.
    device: Option<String>,
    /// Camera id.
    camera: Option<String>,
    /// Opened at or after: RFC 3339 or Unix ms.
    #[param(value_type = Option<super::TimeParam>, inline)]
    from: Option<String>,
    /// Opened before: RFC 3339 or Unix ms.
    #[param(value_type = Option<super::TimeParam>, inline)]
    to: Option<String>,
    /// 1..=1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(pattern = r"^[0-9]{1,16}-[0-9]{1,18}$")]
    cursor: Option<String>,
}

fn state_schema() -> utoipa::openapi::schema::Object {
    super::string_enum(&["open", "acknowledged", "resolved"], "Alert state")
}

fn severity_schema() -> utoipa::openapi::schema::Object {
    super::string_enum(&["info", "warning", "critical"], "Severity")
}

/// Alerts, newest first, filtered and paginated (only those of cameras the caller may see).
#[utoipa::path(get, path = "/api/v1/alerts", tag = "alerts", params(AlertParams),
    extensions(("x-permission" = json!("alerts:read"))),
    responses((status = 200, description = "A page of alerts", body = AlertPageDoc)))]
pub async fn list_alerts(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<AlertPageDoc>, ApiError> {
    let q = super::query_params(
        params,
        &["state", "severity", "rule", "device", "camera", "from", "to", "limit", "cursor"],
    )?;
    if let Some(s) = q.get("state")
        && !matches!(s.as_str(), "open" | "acknowledged" | "resolved")
    {
        return Err(ApiError::invalid_parameter("state must be open, acknowledged or resolved"));
    }
    if let Some(s) = q.get("severity")
        && crate::alerts::Severity::parse(s).is_none()
    {
        return Err(ApiError::invalid_parameter("severity must be info, warning or critical"));
    }
    let rule_id = q
        .get("rule")
        .map(|v| {
            v.parse::<i64>()
                .ok()
                .filter(|r| *r >= 1)
                .ok_or_else(|| ApiError::invalid_parameter("rule must be a rule id"))
        })
        .transpose()?;
    let from_ms = q.get("from").map(|v| super::parse_time("from", v)).transpose()?;
    let to_ms = q.get("to").map(|v| super::parse_time("to", v)).transpose()?;
    let limit = match q.get("limit") {
        Some(v) => super::page_limit(v)?,
        None => 100,
    };
    if let Some(c) = q.get("cursor") {
        crate::store::PageCursor::decode_position(c).map_err(|_| ApiError::invalid_cursor())?;
    }
    let query = AlertQuery {
        state: q.get("state").cloned(),
        severity: q.get("severity").cloned(),
        rule_id,
        device: q.get("device").cloned(),
        camera: q.get("camera").cloned(),
        from_ms,
        to_ms,
        limit,
        cursor: q.get("cursor").cloned(),
        scope: p.scope.clone(),
    };
    let page = alerts(&state).list_alerts(&query).await?;
    Ok(Json(AlertPageDoc { alerts: page.alerts.iter().map(|a| a.to_json()).collect(), next_cursor: page.next_cursor }))
}

/// One alert.
#[utoipa::path(get, path = "/api/v1/alerts/{id}", tag = "alerts",
    params(("id" = inline(IdParam), Path, description = "Alert id")),
    extensions(("x-permission" = json!("alerts:read"))),
    responses((status = 200, description = "The alert", body = Object), (status = 404, description = "No such alert", body = ErrorBody)))]
pub async fn get_alert(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(alerts(&state).get_alert(id, &p.scope).await?.to_json()))
}

fn publish(state: &AppState, alert: &crate::alerts::Alert, event: &str) {
    let mut v = alert.to_json();
    if let Some(o) = v.as_object_mut() {
        o.insert("event".into(), event.into());
    }
    state.bus.publish(BusMessage::Alert { alert: v });
}

/// Acknowledge an open alert (it is not escalated from then on).
#[utoipa::path(post, path = "/api/v1/alerts/{id}/ack", tag = "alerts",
    params(("id" = inline(IdParam), Path, description = "Alert id")),
    extensions(("x-permission" = json!("alerts:ack"))),
    responses((status = 200, description = "Acknowledged", body = Object), (status = 404, description = "No such alert", body = ErrorBody),
              (status = 409, description = "Not open", body = ErrorBody)))]
pub async fn ack_alert(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    let alert = alerts(&state).acknowledge(id, &p.actor(), unix_ms(), &p.scope).await?;
    publish(&state, &alert, "acknowledged");
    audit(&state, &p, "alert.acknowledged", Some(format!("alert:{id}")), ip, json!({})).await;
    Ok(Json(alert.to_json()))
}

/// Resolve an alert (open or acknowledged).
#[utoipa::path(post, path = "/api/v1/alerts/{id}/resolve", tag = "alerts",
    params(("id" = inline(IdParam), Path, description = "Alert id")),
    extensions(("x-permission" = json!("alerts:ack"))),
    responses((status = 200, description = "Resolved", body = Object), (status = 404, description = "No such alert", body = ErrorBody),
              (status = 409, description = "Already resolved", body = ErrorBody)))]
pub async fn resolve_alert(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    let alert = alerts(&state).resolve(id, &p.actor(), unix_ms(), &p.scope).await?;
    publish(&state, &alert, "resolved");
    audit(&state, &p, "alert.resolved", Some(format!("alert:{id}")), ip, json!({})).await;
    Ok(Json(alert.to_json()))
}

/// The notifications of an alert: each delivery with every attempt.
#[utoipa::path(get, path = "/api/v1/alerts/{id}/deliveries", tag = "alerts",
    params(("id" = inline(IdParam), Path, description = "Alert id")),
    extensions(("x-permission" = json!("alerts:read"))),
    responses((status = 200, description = "Deliveries", body = DeliveryList), (status = 404, description = "No such alert", body = ErrorBody)))]
pub async fn alert_deliveries(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<i64>,
) -> Result<Json<DeliveryList>, ApiError> {
    let store = alerts(&state);
    store.get_alert(id, &p.scope).await?;
    let deliveries = store
        .deliveries_of(id)
        .await?
        .into_iter()
        .map(|(d, attempts)| {
            let mut v = d.to_json();
            if let Some(o) = v.as_object_mut() {
                o.insert("attempt_log".into(), attempts.iter().map(|a| a.to_json()).collect::<Vec<_>>().into());
            }
            v
        })
        .collect();
    Ok(Json(DeliveryList { deliveries }))
}

/// Dead-lettered deliveries, newest first.
#[utoipa::path(get, path = "/api/v1/alert-deliveries/dead", tag = "alerts",
    params(("limit" = Option<u32>, Query, description = "1..=1000, default 100", minimum = 1, maximum = 1000)),
    extensions(("x-permission" = json!("rules:read"))),
    responses((status = 200, description = "Dead letters", body = DeliveryList)))]
pub async fn dead_letters(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<DeliveryList>, ApiError> {
    let q = super::query_params(params, &["limit"])?;
    let limit = match q.get("limit") {
        Some(v) => super::page_limit(v)?,
        None => 100,
    };
    let store = alerts(&state);
    let mut deliveries = Vec::new();
    for d in store.dead_letters(limit).await? {
        if p.scope != Scope::All && store.get_alert(d.alert_id, &p.scope).await.is_err() {
            continue;
        }
        deliveries.push(d.to_json());
    }
    Ok(Json(DeliveryList { deliveries }))
}

/// Put a dead-lettered delivery back in the queue for a fresh round of attempts.
#[utoipa::path(post, path = "/api/v1/alert-deliveries/{id}/retry", tag = "alerts",
    params(("id" = inline(IdParam), Path, description = "Delivery id")),
    extensions(("x-permission" = json!("rules:write"))),
    responses((status = 200, description = "Queued again", body = Object), (status = 404, description = "No such delivery", body = ErrorBody),
              (status = 409, description = "Not dead", body = ErrorBody)))]
pub async fn retry_delivery(
    State(state): State<AppState>,
    ip: ClientIp,
    Extension(p): Extension<Principal>,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    require_all_sites(&p, "alert deliveries")?;
    let d = alerts(&state).retry_dead(id, unix_ms()).await?;
    crate::alerts::wake_deliveries();
    audit(&state, &p, "alert_delivery.retried", Some(format!("alert_delivery:{id}")), ip, json!({})).await;
    Ok(Json(d.to_json()))
}
