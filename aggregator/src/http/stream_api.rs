//! `GET /api/v1/stream`: what the fleet commits, live, as server-sent events.
//!
//! Messages (each `data:` is one JSON object):
//! - `event: event`: a newly stored event, in the public JSON form of `GET /api/v1/events`
//!   (`id` = `device:seq`, also the SSE `id:`). `ingested_at_ms` is when the commit finished;
//!   `has_snapshot` is `false`: a snapshot travels on its own stream and is stored on its own
//!   (ask `GET /api/v1/events/{id}/snapshot`).
//! - `event: alert`: an alert opened, acknowledged, resolved or escalated (its public JSON).
//! - `event: anomaly`: an anomaly the analytics flagged (its public JSON).
//! - `event: device_status`: `{"device_id", "online", "at_ms"}` when a device connects or its
//!   connection ends.
//!
//! With Redis fan-out ([`crate::export::fanout`]) the stream of any replica shows what every
//! replica commits, each message once.
//!
//! Filters (query string, all optional, empty = absent; a message is sent only when it matches
//! every filter given, and one that lacks the attribute filtered on does not match): `device`,
//! `camera` (the camera's id on its device), `site` (the camera's effective site), `kind` (event
//! kind; events only: other message types are not filtered by it), `types` (comma-separated
//! subset of `event,alert,anomaly,device_status`; default all) and `duration_s` (close the
//! stream after this many seconds, 0..=86400; default: stay open). A caller with a limited scope
//! (site or camera grants) sees only the events, alerts and anomalies of the cameras it may see,
//! and the status of devices with at least one such camera.
//!
//! The stream starts with the comment `: ready` once it is subscribed (what is committed after
//! it is in the stream), and sends a keep-alive comment every 15 s. It lasts only as long as
//! its credential: when the access token expires, or the session or API key is revoked (a user
//! disabled or changed is revoked too), the stream sends `event: end` (`data:` the reason) and
//! closes, within about a second of the revocation on any replica; the client signs in again
//! or refreshes its token, and reconnects. A client that does not read
//! fast enough for [`CLIENT_QUEUE`] messages to drain is dropped (the stream ends, counted in
//! [`STREAM_DROPPED`]): it reconnects and catches up with `GET /api/v1/events`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use its_shared::event::{EventEnvelope, KIND_NAMES};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{ApiError, AppState};
use crate::auth::Principal;
use crate::bus::{BusMessage, BusReceiver};
use crate::store::{Fleet, Scope, StoreError, StoredEvent};
use crate::telemetry::http::{STREAM_CLIENTS, STREAM_CREDENTIAL_ENDED, STREAM_DROPPED, STREAM_MESSAGES};

/// Messages queued for one client before it is dropped as too slow.
pub const CLIENT_QUEUE: usize = 1024;

const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How long a camera's site (or a device's visibility) is cached per stream.
const LOOKUP_TTL: Duration = Duration::from_secs(10);
const MAX_DURATION_S: u64 = 86_400;

/// Query parameters of `GET /api/v1/stream` (documentation; the handler parses them strictly).
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct StreamParams {
    /// Device id.
    device: Option<String>,
    /// Camera id.
    camera: Option<String>,
    /// Site id (the camera's site, else its device's).
    site: Option<String>,
    /// Event kind (filters events only).
    #[param(schema_with = super::kind_schema)]
    kind: Option<String>,
    /// Comma-separated subset of `event,alert,anomaly,device_status` (default: all).
    #[param(pattern = r"^(event|alert|anomaly|device_status)(,(event|alert|anomaly|device_status))*$")]
    types: Option<String>,
    /// Close the stream after this many seconds (default: stay open).
    #[param(minimum = 0, maximum = 86400)]
    duration_s: Option<u64>,
}

/// Which message types a client wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Types {
    event: bool,
    alert: bool,
    anomaly: bool,
    device_status: bool,
}

/// The parsed query of one stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamQuery {
    pub device: Option<String>,
    pub camera: Option<String>,
    pub site: Option<String>,
    pub kind: Option<String>,
    types: Types,
    pub duration: Option<Duration>,
}

/// Parses the query string (empty values are absent; unknown and repeated parameters refused).
pub fn parse_stream_query(pairs: Vec<(String, String)>) -> Result<StreamQuery, ApiError> {
    let mut q = StreamQuery {
        device: None,
        camera: None,
        site: None,
        kind: None,
        types: Types { event: true, alert: true, anomaly: true, device_status: true },
        duration: None,
    };
    let mut seen = std::collections::HashSet::new();
    for (name, value) in pairs {
        if !matches!(name.as_str(), "device" | "camera" | "site" | "kind" | "types" | "duration_s") {
            return Err(ApiError::unknown_parameter(&name));
        }
        if !seen.insert(name.clone()) {
            return Err(ApiError::invalid_parameter(format!("parameter {name} given more than once")));
        }
        if value.is_empty() {
            continue;
        }
        match name.as_str() {
            "device" => q.device = Some(value),
            "camera" => q.camera = Some(value),
            "site" => q.site = Some(value),
            "kind" => {
                if !KIND_NAMES.contains(&value.as_str()) {
                    return Err(ApiError::invalid_parameter(format!(
                        "unknown kind; expected one of {}",
                        KIND_NAMES.join(", ")
                    )));
                }
                q.kind = Some(value);
            }
            "types" => {
                let mut t = Types { event: false, alert: false, anomaly: false, device_status: false };
                for part in value.split(',') {
                    match part {
                        "event" => t.event = true,
                        "alert" => t.alert = true,
                        "anomaly" => t.anomaly = true,
                        "device_status" => t.device_status = true,
                        _ => {
                            return Err(ApiError::invalid_parameter(
                                "types must be a comma-separated subset of event,alert,anomaly,device_status",
                            ));
                        }
                    }
                }
                q.types = t;
            }
            _ => {
                let s = value
                    .parse::<u64>()
                    .ok()
                    .filter(|s| *s <= MAX_DURATION_S && value.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| ApiError::invalid_parameter("duration_s must be 0..=86400 seconds"))?;
                q.duration = Some(Duration::from_secs(s));
            }
        }
    }
    Ok(q)
}

/// Live events, alerts, anomalies and device status as server-sent events (only those of cameras
/// the caller may see).
#[utoipa::path(get, path = "/api/v1/stream", tag = "events", params(StreamParams),
    extensions(("x-permission" = json!("events:read"))),
    responses((status = 200, description = "`text/event-stream`: `event: event|alert|anomaly|device_status`, \
`data:` one JSON object each; keep-alive comments every 15 s", content_type = "text/event-stream", body = String)))]
pub async fn stream_events(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(pairs) = params.map_err(|_| ApiError::invalid_parameter("malformed query string"))?;
    let query = parse_stream_query(pairs)?;
    // Subscribed before the answer starts: whatever is committed after `: ready` is in it.
    let rx = state.bus.subscribe("stream");
    let (tx, mut out) = mpsc::channel::<Event>(CLIENT_QUEUE);
    let _ = tx.try_send(Event::default().comment("ready"));
    let deadline = query.duration.map(|d| Instant::now() + d);
    let filter = Filter { query, scope: principal.scope.clone(), fleet: state.fleet.clone(), cache: HashMap::new() };
    let credential = Credential { auth: state.auth.clone(), principal };
    tokio::spawn(forward(rx, tx, filter, deadline, credential, state.shutdown.clone()));
    let body = futures::stream::poll_fn(move |cx| out.poll_recv(cx).map(|e| e.map(Ok::<_, Infallible>)));
    Ok(Sse::new(body).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response())
}

/// The credential a stream was opened with, checked again while it lasts.
struct Credential {
    auth: std::sync::Arc<crate::auth::AuthService>,
    principal: Principal,
}

impl Credential {
    /// Resolves when the credential no longer holds (revoked, or expired).
    async fn ended(&self) {
        let mut changes = self.auth.revocations();
        let expiry = self.principal.expires_at_ms.map(|e| {
            let left = u64::try_from(e.saturating_sub(self.auth.now())).unwrap_or(0);
            Instant::now() + Duration::from_millis(left)
        });
        let expired = async move {
            match expiry {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expired);
        loop {
            if !self.auth.still_valid(&self.principal) {
                return;
            }
            tokio::select! {
                () = &mut expired => return,
                changed = changes.changed() => if changed.is_err() {
                    // The service is gone: nothing will revoke anything any more.
                    std::future::pending::<()>().await;
                },
            }
        }
    }
}

/// Moves what the client may see from the bus to its queue, until the client leaves, falls
/// behind, its duration is over, or its credential ends.
async fn forward(
    mut rx: BusReceiver,
    tx: mpsc::Sender<Event>,
    mut filter: Filter,
    deadline: Option<Instant>,
    credential: Credential,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    metrics::gauge!(STREAM_CLIENTS).increment(1.0);
    let ended = credential.ended();
    tokio::pin!(ended);
    let stopping = async move {
        // A dropped sender (no shutdown signal at all) never stops the stream.
        if shutdown.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(stopping);
    let until = async move {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until);
    'outer: loop {
        let delivered = tokio::select! {
            _ = tx.closed() => break,
            _ = &mut until => break,
            _ = &mut stopping => break,
            () = &mut ended => {
                metrics::counter!(STREAM_CREDENTIAL_ENDED).increment(1);
                let _ = tx.try_send(Event::default().event("end").data("credential revoked or expired"));
                break;
            }
            m = rx.recv() => match m { Some(m) => m, None => break },
        };
        for event in filter.events_of(&delivered.message).await {
            match tx.try_send(event) {
                Ok(()) => metrics::counter!(STREAM_MESSAGES).increment(1),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    metrics::counter!(STREAM_DROPPED).increment(1);
                    tracing::info!("GET /api/v1/stream: dropping a client that does not keep up");
                    break 'outer;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => break 'outer,
            }
        }
    }
    metrics::gauge!(STREAM_CLIENTS).decrement(1.0);
}

/// One stream's filters and scope, with a short-lived cache of camera sites.
struct Filter {
    query: StreamQuery,
    scope: Scope,
    fleet: Fleet,
    /// `(device, camera)` → effective site; `(device, "")` → whether the scope sees a camera of
    /// the device (`Some("")`) or not (`None`).
    cache: HashMap<(String, String), (Option<String>, Instant)>,
}

impl Filter {
    /// The SSE messages of one bus message that this client gets.
    async fn events_of(&mut self, message: &BusMessage) -> Vec<Event> {
        let mut out = Vec::new();
        match message {
            BusMessage::Events(batch) if self.query.types.event => {
                let device = batch.device.as_str();
                if self.query.device.as_deref().is_some_and(|d| d != device) {
                    return out;
                }
                for e in &batch.events {
                    if self.query.kind.as_deref().is_some_and(|k| k != e.kind.name()) {
                        continue;
                    }
                    if !self.camera_matches(device, &e.camera).await {
                        continue;
                    }
                    let public = public_event(device, e, batch.committed_at_ms);
                    if let Ok(ev) = Event::default().event("event").id(public.id()).json_data(&public.0) {
                        out.push(ev);
                    }
                }
            }
            BusMessage::Alert { alert } if self.query.types.alert => {
                if self.value_matches(alert).await
                    && let Ok(ev) = Event::default().event("alert").json_data(alert)
                {
                    out.push(ev);
                }
            }
            BusMessage::Anomaly { anomaly } if self.query.types.anomaly => {
                if self.value_matches(anomaly).await
                    && let Ok(ev) = Event::default().event("anomaly").json_data(anomaly)
                {
                    out.push(ev);
                }
            }
            BusMessage::DeviceStatus { device, online, at_ms } if self.query.types.device_status => {
                let filtered = self.query.device.as_deref().is_some_and(|d| d != device)
                    || self.query.camera.is_some()
                    || self.query.site.is_some();
                if !filtered
                    && self.device_visible(device).await
                    && let Ok(ev) = Event::default().event("device_status").json_data(serde_json::json!({
                        "device_id": device, "online": online, "at_ms": at_ms
                    }))
                {
                    out.push(ev);
                }
            }
            _ => {}
        }
        out
    }

    /// Whether an alert or anomaly passes the filters and the scope.
    async fn value_matches(&mut self, v: &serde_json::Value) -> bool {
        let (device, camera) = crate::export::kafka::device_and_camera(v);
        if self.query.device.is_some() && self.query.device.as_deref() != device {
            return false;
        }
        match (device, camera) {
            (Some(d), Some(c)) => {
                let (d, c) = (d.to_owned(), c.to_owned());
                self.camera_matches(&d, &c).await
            }
            _ => self.query.camera.is_none() && self.query.site.is_none() && self.scope == Scope::All,
        }
    }

    /// Camera and site filters and the scope, for a camera of a device.
    async fn camera_matches(&mut self, device: &str, camera: &str) -> bool {
        if self.query.camera.as_deref().is_some_and(|c| c != camera) {
            return false;
        }
        if self.query.site.is_none() && self.scope == Scope::All {
            return true;
        }
        let site = self.site_of(device, camera).await;
        if let Some(want) = &self.query.site
            && site.as_deref() != Some(want.as_str())
        {
            return false;
        }
        self.scope.allows_camera(device, camera, site.as_deref())
    }

    async fn site_of(&mut self, device: &str, camera: &str) -> Option<String> {
        let key = (device.to_owned(), camera.to_owned());
        if let Some((site, at)) = self.cache.get(&key)
            && at.elapsed() < LOOKUP_TTL
        {
            return site.clone();
        }
        let site = match self.fleet.get_camera(device, camera, &Scope::All).await {
            Ok(c) => c.site_id,
            Err(StoreError::NotFound(_)) => None,
            Err(e) => {
                tracing::warn!(error = %e, "GET /api/v1/stream: camera lookup failed");
                None
            }
        };
        self.remember(key, site.clone());
        site
    }

    async fn device_visible(&mut self, device: &str) -> bool {
        if self.scope == Scope::All {
            return true;
        }
        let key = (device.to_owned(), String::new());
        if let Some((seen, at)) = self.cache.get(&key)
            && at.elapsed() < LOOKUP_TTL
        {
            return seen.is_some();
        }
        let visible = match self.fleet.list_cameras(&self.scope, Some(device), None).await {
            Ok(cams) => !cams.is_empty(),
            Err(e) => {
                tracing::warn!(error = %e, "GET /api/v1/stream: camera lookup failed");
                false
            }
        };
        self.remember(key, visible.then(String::new));
        visible
    }

    fn remember(&mut self, key: (String, String), value: Option<String>) {
        if self.cache.len() > 10_000 {
            self.cache.clear();
        }
        self.cache.insert(key, (value, Instant::now()));
    }
}

/// An event as the REST API shows it.
pub struct PublicEvent(pub StoredEvent);

impl PublicEvent {
    fn id(&self) -> String {
        format!("{}:{}", self.0.device_id, self.0.seq)
    }
}

/// The public JSON form of an event from the bus (see [`StoredEvent`]).
pub fn public_event(device: &str, e: &EventEnvelope, committed_at_ms: i64) -> PublicEvent {
    PublicEvent(StoredEvent {
        row_id: 0,
        device_id: device.to_owned(),
        seq: e.seq,
        camera: e.camera.clone(),
        kind: e.kind.name().to_owned(),
        label: e.kind.object().map(|o| o.label.clone()),
        observed_at_ms: e.observed_at_ms,
        ingested_at_ms: committed_at_ms,
        payload: e.kind.payload_json(),
        has_snapshot: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Result<StreamQuery, ApiError> {
        parse_stream_query(pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect())
    }

    #[test]
    fn stream_filters_parse() {
        let got =
            q(&[("device", "box-1"), ("kind", "counts"), ("types", "event,alert"), ("duration_s", "5"), ("site", "")])
                .expect("valid");
        assert_eq!(got.device.as_deref(), Some("box-1"));
        assert_eq!(got.kind.as_deref(), Some("counts"));
        assert_eq!(got.site, None);
        assert_eq!(got.types, Types { event: true, alert: true, anomaly: false, device_status: false });
        assert_eq!(got.duration, Some(Duration::from_secs(5)));
        for bad in [
            &[("kind", "nope")][..],
            &[("types", "event,")],
            &[("duration_s", "86401")],
            &[("duration_s", "+1")],
            &[("device", "a"), ("device", "b")],
            &[("limit", "1")],
        ] {
            assert!(q(bad).is_err(), "{bad:?}");
        }
    }
}
