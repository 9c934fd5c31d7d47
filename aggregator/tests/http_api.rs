//! The REST API, called without a socket (`tower::ServiceExt::oneshot`) over a SQLite store,
//! authenticated as an admin (the state is built by `common::test_state`, as the binary does).

use its_testkit::server as common;

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use its_aggregator::auth::AuthConfig;
use its_aggregator::http::router;
use its_aggregator::snapshots::SnapshotObjects;
use its_aggregator::store::{
    Db, DeviceRecord, EventId, EventPage, EventQuery, EventStore, EventSummary, Fleet, InsertOutcome, NewSnapshot,
    SnapshotLookup, StoreError, open_store,
};
use its_aggregator::telemetry::http::HTTP_REQUESTS_TOTAL;
use its_shared::event::ObjectRef;
use its_shared::wire::{Heartbeat, Hello};
use its_shared::{DeviceHealth, EventEnvelope, EventKind};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::Value;
use tower::ServiceExt as _;

const T0: i64 = 1_700_000_000_000;

/// The process-wide recorder (installed once; tests run in parallel threads).
fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().expect("install recorder")).clone()
}

/// The router and the admin's access token every request carries.
struct App {
    router: Router,
    token: String,
    /// A database directory the app's stores use, removed with the app.
    _dir: Option<tempfile::TempDir>,
}

fn event(seq: u64, camera: &str, observed_at_ms: i64) -> EventEnvelope {
    let object = ObjectRef { track_id: seq, label: "car".into(), score: 0.9, bbox: [0.0, 0.0, 0.5, 0.5] };
    let kind = if seq.is_multiple_of(2) {
        EventKind::ZoneEnter { zone: "junction".into(), object }
    } else {
        EventKind::SpeedMeasurement { object, speed_kmh: 42.0, zone: Some("lane-1".into()) }
    };
    EventEnvelope { seq, camera: camera.to_owned(), observed_at_ms, kind }
}

/// Snapshot objects in memory.
fn memory_objects() -> SnapshotObjects {
    SnapshotObjects::with_store(Arc::new(object_store::memory::InMemory::new()), "memory")
}

/// A router over an in-memory SQLite store holding 250 events of `dev-a` (cam-1 and Tür-Süd)
/// and 10 of `dev-b`.
async fn app() -> (App, Arc<dyn EventStore>) {
    let (router, store, _) = app_with_objects().await;
    (router, store)
}

async fn app_with_objects() -> (App, Arc<dyn EventStore>, SnapshotObjects) {
    let store = open_store("sqlite::memory:", its_aggregator::vault::Vault::ephemeral()).await.expect("open store");
    let hello = Hello {
        agent_version: "1.2.3".into(),
        model: "yolo11n".into(),
        cameras: vec!["cam-1".into(), "Tür-Süd".into()],
        last_acked_seq: 0,
        last_assigned_seq: 0,
    };
    store.record_hello("dev-a", &hello, T0).await.expect("hello");
    let a: Vec<_> = (1..=250u64)
        .map(|s| event(s, if s.is_multiple_of(5) { "Tür-Süd" } else { "cam-1" }, T0 + s as i64 * 1000))
        .collect();
    store.insert_events("dev-a", &a, T0).await.expect("insert a");
    let b: Vec<_> = (1..=10u64).map(|s| event(s, "cam-1", T0 + s as i64 * 1000 + 1)).collect();
    store.insert_events("dev-b", &b, T0).await.expect("insert b");
    store
        .record_health(
            "dev-a",
            &Heartbeat { sent_at_ms: T0, health: DeviceHealth { uptime_s: 9, ..Default::default() } },
            T0,
        )
        .await
        .expect("health");
    let objects = memory_objects();
    let (state, token) =
        common::test_state(Arc::clone(&store), objects.clone(), metrics_handle(), AuthConfig::default()).await;
    (App { router: router(state), token, _dir: None }, store, objects)
}

async fn call(app: &App, method: &str, uri: &str) -> (StatusCode, Option<String>, Vec<u8>) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {}", app.token))
        .body(Body::empty())
        .expect("request");
    let resp = app.router.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let ctype = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = axum::body::to_bytes(resp.into_body(), 16 * 1024 * 1024).await.expect("body");
    (status, ctype, body.to_vec())
}

async fn get_json(app: &App, uri: &str) -> (StatusCode, Value) {
    let (status, ctype, body) = call(app, "GET", uri).await;
    assert_eq!(ctype.as_deref(), Some("application/json"), "{uri}");
    let v = serde_json::from_slice(&body).expect("JSON body");
    (status, v)
}

/// Asserts the error shape and returns the code.
fn error_code(v: &Value) -> &str {
    let err = v.get("error").and_then(Value::as_object).expect("error object");
    assert!(err.get("message").and_then(Value::as_str).is_some_and(|m| !m.is_empty()), "{v}");
    assert_eq!(err.len(), 2, "{v}");
    err.get("code").and_then(Value::as_str).expect("code")
}

#[tokio::test]
async fn healthz_reports_backend() {
    let (app, _) = app().await;
    let (status, v) = get_json(&app, "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v, serde_json::json!({"status": "ok", "backend": "sqlite"}));
}

#[tokio::test]
async fn devices_are_listed() {
    let (app, _) = app().await;
    let (status, v) = get_json(&app, "/api/v1/devices").await;
    assert_eq!(status, StatusCode::OK);
    let devices = v["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 1, "dev-b sent no hello: {v}");
    let d = &devices[0];
    assert_eq!(d["device_id"], "dev-a");
    assert_eq!(d["agent_version"], "1.2.3");
    let cameras: Vec<&str> =
        d["cameras"].as_array().expect("cameras").iter().filter_map(|c| c["camera"].as_str()).collect();
    assert_eq!(cameras, ["Tür-Süd", "cam-1"], "by id, byte order: {v}");
    assert!(
        d["cameras"].as_array().expect("cameras").iter().all(|c| c["device_id"] == "dev-a" && c["announced"] == true)
    );
    assert_eq!(d["high_water_seq"], 250);
    assert_eq!(d["last_health"]["uptime_s"], 9);
    assert_eq!(d["first_seen_ms"], T0);
}

#[tokio::test]
async fn events_are_filtered_and_shaped() {
    let (app, _) = app().await;
    let (status, v) =
        get_json(&app, "/api/v1/events?device=dev-a&camera=T%C3%BCr-S%C3%BCd&kind=zone_enter&limit=1000").await;
    assert_eq!(status, StatusCode::OK);
    let events = v["events"].as_array().expect("events");
    // seq % 5 == 0 and even: multiples of 10 up to 250.
    assert_eq!(events.len(), 25);
    assert!(v["next_cursor"].is_null());
    let e = &events[0];
    assert_eq!(e["id"], "dev-a:250");
    assert_eq!(e["camera"], "Tür-Süd");
    assert_eq!(e["kind"], "zone_enter");
    assert_eq!(e["label"], "car");
    assert_eq!(e["@timestamp"], "2023-11-14T22:17:30.000Z");
    assert_eq!(e["payload"]["zone"], "junction");

    // Time window by RFC 3339 and by Unix ms give the same answer; `to` is exclusive.
    let (_, by_rfc) =
        get_json(&app, "/api/v1/events?device=dev-a&from=2023-11-14T22:13:30Z&to=2023-11-14T23:13:40%2B01:00").await;
    let (_, by_ms) =
        get_json(&app, &format!("/api/v1/events?device=dev-a&from={}&to={}", T0 + 10_000, T0 + 20_000)).await;
    assert_eq!(by_rfc, by_ms);
    let seqs: Vec<u64> = by_ms["events"].as_array().expect("events").iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs, (10..20).rev().collect::<Vec<u64>>());

    // Empty values count as absent.
    let (status, v) = get_json(&app, "/api/v1/events?device=&kind=&limit=").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["events"].as_array().map(Vec::len), Some(100));

    // Injection-looking values are values.
    let (status, v) = get_json(&app, "/api/v1/events?device=%27%20OR%201%3D1%20--").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["events"].as_array().map(Vec::len), Some(0));
}

#[tokio::test]
async fn pagination_through_http() {
    let (app, _) = app().await;
    let mut uri = "/api/v1/events?limit=37".to_owned();
    let mut ids = Vec::new();
    let mut last_ts = i64::MAX;
    for _ in 0..100 {
        let (status, v) = get_json(&app, &uri).await;
        assert_eq!(status, StatusCode::OK);
        for e in v["events"].as_array().expect("events") {
            let ts = e["observed_at_ms"].as_i64().expect("ts");
            assert!(ts <= last_ts);
            last_ts = ts;
            ids.push(e["id"].as_str().expect("id").to_owned());
        }
        match v["next_cursor"].as_str() {
            Some(c) => uri = format!("/api/v1/events?limit=37&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(ids.len(), 260);
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 260);
}

#[tokio::test]
async fn bad_requests_are_400_with_json_errors() {
    let (app, _) = app().await;
    let cases = [
        ("/api/v1/events?kind=car", "invalid_parameter"),
        ("/api/v1/events?limit=0", "invalid_parameter"),
        ("/api/v1/events?limit=1001", "invalid_parameter"),
        ("/api/v1/events?limit=-1", "invalid_parameter"),
        ("/api/v1/events?limit=ten", "invalid_parameter"),
        ("/api/v1/events?limit=99999999999999999999", "invalid_parameter"),
        ("/api/v1/events?from=yesterday", "invalid_parameter"),
        ("/api/v1/events?to=2023-13-45T00:00:00Z", "invalid_parameter"),
        ("/api/v1/events?from=99999999999999999999999", "invalid_parameter"),
        ("/api/v1/events?from=2000&to=1000", "invalid_parameter"),
        ("/api/v1/events?device=a&device=b", "invalid_parameter"),
        ("/api/v1/events?cursor=not-a-cursor", "invalid_cursor"),
        ("/api/v1/events?cursor=eDox", "invalid_cursor"),
        ("/api/v1/events?cursor=%FF%FE", "invalid_cursor"),
        ("/api/v1/events?devices=dev-a", "unknown_parameter"),
        ("/api/v1/events?DEVICE=dev-a", "unknown_parameter"),
        ("/api/v1/events?device=dev-a&x", "unknown_parameter"),
    ];
    for (uri, code) in cases {
        let (status, v) = get_json(&app, uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {v}");
        assert_eq!(error_code(&v), code, "{uri}: {v}");
    }
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let (app, _) = app().await;
    for uri in ["/", "/api/v1/event", "/api/v1/events/", "/api/v2/events", "/%FF", "/api/v1/devices/dev-a/nothing"] {
        let (status, v) = get_json(&app, uri).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(error_code(&v), "not_found");
    }
    let (status, ctype, body) = call(&app, "POST", "/api/v1/events").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(ctype.as_deref(), Some("application/json"));
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(error_code(&v), "method_not_allowed");
}

#[tokio::test]
async fn the_api_needs_a_credential() {
    let (app, _) = app().await;
    let anonymous = App { router: app.router.clone(), token: String::new(), _dir: None };
    for uri in ["/api/v1/events", "/api/v1/devices", "/api/v1/events/dev-a:10/snapshot"] {
        let req = Request::builder().uri(uri).body(Body::empty()).expect("request");
        let resp = app.router.clone().oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{uri}");
        assert!(resp.headers().contains_key(header::WWW_AUTHENTICATE), "{uri}");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(error_code(&v), "unauthenticated", "{uri}");
        // A malformed bearer token is refused the same way, with its own code.
        let (status, v) = get_json(&anonymous, uri).await;
        assert_eq!((status, error_code(&v)), (StatusCode::UNAUTHORIZED, "invalid_token"), "{uri}");
    }
    // Health and metrics stay public.
    let (status, _) = get_json(&anonymous, "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(&anonymous, "GET", "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = get_json(&app, "/api/v1/devices/dev-a").await;
    assert_eq!((status, &v["device_id"]), (StatusCode::OK, &Value::from("dev-a")));
}

/// A route in the router that nobody declared in the OpenAPI document is refused to everyone,
/// the admin included, and its handler never runs; the listed public routes outside the document
/// still answer without a credential.
#[tokio::test]
async fn undeclared_routes_are_refused_and_the_listed_public_ones_answer() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let store = open_store("sqlite::memory:", its_aggregator::vault::Vault::ephemeral()).await.expect("open store");
    let (state, token) = common::test_state(store, memory_objects(), metrics_handle(), AuthConfig::default()).await;
    let ran = Arc::new(AtomicUsize::new(0));
    let extra = Router::new().route(
        "/api/v1/undeclared",
        axum::routing::get({
            let ran = Arc::clone(&ran);
            move || async move {
                ran.fetch_add(1, Ordering::SeqCst);
                "served"
            }
        }),
    );
    let with_extra = App { router: its_aggregator::http::router_with(state, extra), token, _dir: None };
    let anonymous = App { router: with_extra.router.clone(), token: String::new(), _dir: None };
    let request = |method: &str, uri: &str, token: Option<&str>| {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        b.body(Body::empty()).expect("request")
    };
    for method in ["GET", "HEAD"] {
        let resp = anonymous.router.clone().oneshot(request(method, "/api/v1/undeclared", None)).await.expect("call");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{method} without a credential");
        let resp = with_extra
            .router
            .clone()
            .oneshot(request(method, "/api/v1/undeclared", Some(&with_extra.token)))
            .await
            .expect("call");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{method} as admin");
    }
    let (status, v) = get_json(&with_extra, "/api/v1/undeclared").await;
    assert_eq!((status, error_code(&v)), (StatusCode::FORBIDDEN, "forbidden"));
    assert_eq!(ran.load(Ordering::SeqCst), 0, "the handler of an undeclared route never runs");

    // The public routes outside the document, GET and HEAD, with no credential.
    for uri in ["/metrics", "/api/v1/openapi.json", "/healthz"] {
        for method in ["GET", "HEAD"] {
            let resp = anonymous.router.clone().oneshot(request(method, uri, None)).await.expect("call");
            assert_eq!(resp.status(), StatusCode::OK, "{method} {uri}");
        }
    }
    // The documented API is unchanged by the extra route.
    let (status, _) = get_json(&with_extra, "/api/v1/devices").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    let (app, _) = app().await;
    get_json(&app, "/healthz").await;
    get_json(&app, "/api/v1/events?kind=nope").await;
    get_json(&app, "/no/such/route").await;
    let (status, ctype, body) = call(&app, "GET", "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(ctype.is_some_and(|c| c.starts_with("text/plain")));
    let text = String::from_utf8(body).expect("utf8");
    assert!(text.contains(HTTP_REQUESTS_TOTAL), "{text}");
    for needle in [
        "route=\"/healthz\",status=\"200\"",
        "route=\"/api/v1/events\",status=\"400\"",
        "route=\"unmatched\",status=\"404\"",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(HTTP_REQUESTS_TOTAL) && l.contains(needle)),
            "{needle} missing in:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Failures of the store: 503 for an unreachable database, 500 without internals otherwise.

struct BrokenStore {
    unreachable: bool,
    /// The pools of a working store (authentication keeps working).
    db: Db,
}

impl BrokenStore {
    fn err(&self) -> StoreError {
        if self.unreachable {
            StoreError::Unavailable(sqlx::Error::PoolTimedOut)
        } else {
            StoreError::Corrupt("secret table xyz_internal is broken".into())
        }
    }
}

#[async_trait]
impl EventStore for BrokenStore {
    async fn record_hello(&self, _: &str, _: &Hello, _: i64) -> Result<u64, StoreError> {
        Err(self.err())
    }
    async fn insert_events(&self, _: &str, _: &[EventEnvelope], _: i64) -> Result<InsertOutcome, StoreError> {
        Err(self.err())
    }
    async fn record_health(&self, _: &str, _: &Heartbeat, _: i64) -> Result<(), StoreError> {
        Err(self.err())
    }
    async fn high_water(&self, _: &str) -> Result<u64, StoreError> {
        Err(self.err())
    }
    async fn list_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        Err(self.err())
    }
    async fn query_events(&self, _: &EventQuery) -> Result<EventPage, StoreError> {
        Err(self.err())
    }
    async fn device_event_summary(&self, _: &str) -> Result<EventSummary, StoreError> {
        Err(self.err())
    }
    async fn device_seqs(&self, _: &str) -> Result<Vec<u64>, StoreError> {
        Err(self.err())
    }
    async fn record_snapshot(&self, _: &str, _: &NewSnapshot<'_>, _: i64) -> Result<bool, StoreError> {
        Err(self.err())
    }
    async fn has_snapshot(&self, _: &str, _: u64) -> Result<bool, StoreError> {
        Err(self.err())
    }
    async fn snapshot_for_event(&self, _: &EventId) -> Result<SnapshotLookup, StoreError> {
        Err(self.err())
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Err(self.err())
    }
    fn backend(&self) -> &'static str {
        "broken"
    }
    fn db(&self) -> Db {
        self.db.clone()
    }
}

/// An app whose event store fails (unreachable or corrupt) and whose fleet runs on a database
/// that fails the same way, while sign-in and tokens work.
async fn broken_app(unreachable: bool) -> App {
    let good = open_store("sqlite::memory:", its_aggregator::vault::Vault::ephemeral()).await.expect("open store");
    let (mut state, token) =
        common::test_state(Arc::clone(&good), memory_objects(), metrics_handle(), AuthConfig::default()).await;
    state.store = Arc::new(BrokenStore { unreachable, db: good.db() });
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("fleet.db").display());
    let fleet_store = open_store(&url, its_aggregator::vault::Vault::ephemeral()).await.expect("open store");
    let hello = Hello {
        agent_version: "1".into(),
        model: "m".into(),
        cameras: vec!["cam-1".into()],
        last_acked_seq: 0,
        last_assigned_seq: 0,
    };
    fleet_store.record_hello("dev-a", &hello, T0).await.expect("hello");
    if unreachable {
        fleet_store.db().close().await;
    } else {
        // A connection of its own: outside the store, the database is reached only through SQL.
        let writer = sqlx::SqlitePool::connect(&url).await.expect("connect");
        sqlx::query("UPDATE devices SET last_health = '{\"secret\": \"xyz_internal' WHERE device_id = 'dev-a'")
            .execute(&writer)
            .await
            .expect("corrupt the health report");
    }
    state.fleet = Fleet::new(fleet_store.db());
    App { router: router(state), token, _dir: Some(dir) }
}

#[tokio::test]
async fn unreachable_database_is_503() {
    let app = broken_app(true).await;
    for uri in [
        "/healthz",
        "/api/v1/devices",
        "/api/v1/devices/dev-a",
        "/api/v1/sites",
        "/api/v1/events",
        "/api/v1/events/dev-a:1/snapshot",
    ] {
        let (status, v) = get_json(&app, uri).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{uri}");
        assert_eq!(error_code(&v), "unavailable");
    }
}

#[tokio::test]
async fn internal_failures_are_500_without_internals() {
    let app = broken_app(false).await;
    for uri in
        ["/api/v1/devices", "/api/v1/devices/dev-a", "/api/v1/events?device=x", "/api/v1/events/dev-a:1/snapshot"]
    {
        let (status, ctype, body) = call(&app, "GET", uri).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{uri}");
        assert_eq!(ctype.as_deref(), Some("application/json"));
        let text = String::from_utf8(body).expect("utf8");
        assert!(!text.contains("xyz_internal"), "{text}");
        let v: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(error_code(&v), "internal");
    }
    // Parameter errors are still 400: they are checked before the store is called... or by it.
    let (status, _) = get_json(&app, "/api/v1/events?bogus=1").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

// ---------------------------------------------------------------------------------------------
// Snapshots: GET /api/v1/events/{id}/snapshot

/// A real JPEG whose bytes depend on `seed`.
fn jpeg(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8 ^ seed, y as u8, seed]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).expect("encode");
    out.into_inner()
}

/// Stores pictures the way the ingest does: objects first, then the row.
async fn put_snapshot(
    store: &Arc<dyn EventStore>,
    objects: &SnapshotObjects,
    device: &str,
    seq: u64,
    full: &[u8],
    crop: Option<&[u8]>,
) {
    let full_key = SnapshotObjects::full_key(device, seq).expect("key");
    objects.put(&full_key, full.to_vec()).await.expect("put full");
    let crop_key = SnapshotObjects::crop_key(device, seq).expect("key").to_string();
    if let Some(c) = crop {
        objects.put(&crop_key.as_str().into(), c.to_vec()).await.expect("put crop");
    }
    let full_key = full_key.to_string();
    let snap = NewSnapshot {
        seq,
        camera: "cam-1",
        taken_at_ms: T0,
        full_key: &full_key,
        full_bytes: full.len() as u64,
        crop: crop.map(|c| (crop_key.as_str(), c.len() as u64)),
    };
    assert!(store.record_snapshot(device, &snap, T0).await.expect("record"));
}

#[tokio::test]
async fn snapshots_are_served_as_jpeg() {
    let (app, store, objects) = app_with_objects().await;
    let (full, crop) = (jpeg(64, 48, 1), jpeg(16, 16, 2));
    put_snapshot(&store, &objects, "dev-a", 10, &full, Some(&crop)).await;
    put_snapshot(&store, &objects, "dev-a", 12, &jpeg(32, 32, 3), None).await;

    for uri in ["/api/v1/events/dev-a:10/snapshot", "/api/v1/events/dev-a%3A10/snapshot?variant=full"] {
        let (status, ctype, body) = call(&app, "GET", uri).await;
        assert_eq!((status, ctype.as_deref()), (StatusCode::OK, Some("image/jpeg")), "{uri}");
        assert_eq!(body, full, "{uri}");
    }
    let (status, ctype, body) = call(&app, "GET", "/api/v1/events/dev-a:10/snapshot?variant=crop").await;
    assert_eq!((status, ctype.as_deref()), (StatusCode::OK, Some("image/jpeg")));
    assert_eq!(body, crop);
    let (status, _, body) = call(&app, "HEAD", "/api/v1/events/dev-a:10/snapshot").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty());

    // The listing says which events have one.
    let (_, v) = get_json(&app, "/api/v1/events?device=dev-a&from=1700000009000&to=1700000013000").await;
    let flags: Vec<(String, bool)> = v["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| (e["id"].as_str().expect("id").to_owned(), e["has_snapshot"].as_bool().expect("has_snapshot")))
        .collect();
    assert_eq!(
        flags,
        vec![
            ("dev-a:12".to_owned(), true),
            ("dev-a:11".to_owned(), false),
            ("dev-a:10".to_owned(), true),
            ("dev-a:9".to_owned(), false)
        ]
    );
}

#[tokio::test]
async fn snapshot_errors_say_what_is_missing() {
    let (app, store, objects) = app_with_objects().await;
    put_snapshot(&store, &objects, "dev-a", 12, &jpeg(32, 32, 3), None).await;
    // Pictures of an event that is not stored (the agent evicted it) are not served.
    put_snapshot(&store, &objects, "dev-a", 999, &jpeg(32, 32, 4), None).await;
    for (uri, code) in [
        ("/api/v1/events/dev-a:11/snapshot", "snapshot_not_found"),
        ("/api/v1/events/dev-a:12/snapshot?variant=crop", "snapshot_not_found"),
        ("/api/v1/events/dev-a:999/snapshot", "event_not_found"),
        ("/api/v1/events/dev-z:1/snapshot", "event_not_found"),
        ("/api/v1/events/..:1/snapshot", "event_not_found"),
        ("/api/v1/events/dev-a:18446744073709551615/snapshot", "event_not_found"),
    ] {
        let (status, v) = get_json(&app, uri).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(error_code(&v), code, "{uri}");
    }
    for (uri, code) in [
        ("/api/v1/events/dev-a/snapshot", "invalid_parameter"),
        ("/api/v1/events/dev-a:x/snapshot", "invalid_parameter"),
        ("/api/v1/events/dev-a:-1/snapshot", "invalid_parameter"),
        ("/api/v1/events/dev%2Fa:1/snapshot", "invalid_parameter"),
        ("/api/v1/events/dev-a:12/snapshot?variant=thumb", "invalid_parameter"),
        ("/api/v1/events/dev-a:12/snapshot?variant=crop&variant=full", "invalid_parameter"),
        ("/api/v1/events/dev-a:12/snapshot?size=1", "unknown_parameter"),
    ] {
        let (status, v) = get_json(&app, uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(error_code(&v), code, "{uri}");
    }
    let (status, v) = {
        let (status, _, body) = call(&app, "POST", "/api/v1/events/dev-a:12/snapshot").await;
        (status, serde_json::from_slice::<Value>(&body).expect("json"))
    };
    assert_eq!((status, error_code(&v)), (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"));
    // A row whose object is gone is an internal error, not a 404.
    let full_key = SnapshotObjects::full_key("dev-a", 20).expect("key").to_string();
    let snap = NewSnapshot { seq: 20, camera: "c", taken_at_ms: T0, full_key: &full_key, full_bytes: 3, crop: None };
    store.record_snapshot("dev-a", &snap, T0).await.expect("record");
    let (status, v) = get_json(&app, "/api/v1/events/dev-a:20/snapshot").await;
    assert_eq!((status, error_code(&v)), (StatusCode::INTERNAL_SERVER_ERROR, "internal"));
}
