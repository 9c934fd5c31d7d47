//! Alert rules, alerts and notifications, in-process (the API through its router, the engine and
//! the delivery worker on a bus of the test's own) against real peers: an HTTP server of the test
//! that checks the webhook signature with its own HMAC code, the machine's Mosquitto, and
//! aiosmtpd (`scripts/setup-test-peers`). Storage on both backends.
//!
//! Time: the engine and the worker take "now" from the clock the test gives them. Tests of what
//! happens after a while (escalation, devices offline) give a `ManualClock` and move it; the
//! escalation test also runs periodic checks itself (`Engine::check`) to count them. Nothing
//! sleeps for a guessed time: waits are for a condition (an alert listed, a webhook received),
//! bounded by a deadline.

use its_testkit::server as common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use its_aggregator::alerts::AlertsConfig;
use its_aggregator::alerts::engine::Engine;
use its_aggregator::alerts::targets::TargetPolicy;
use its_aggregator::auth::{AuthConfig, LoginOutcome, Role};
use its_aggregator::bus::{BusMessage, CommittedEvents, EventBus};
use its_aggregator::clock::{Clock as _, ManualClock, SharedClock, SystemClock};
use its_aggregator::store::{CameraRef, EventStore, Scope};
use its_shared::event::{CameraHealth, ObjectRef};
use its_shared::{DeviceHealth, EventEnvelope, EventKind};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tower::ServiceExt as _;

common::both_backends!(
    webhook_is_signed_and_recorded,
    lifecycle_ack_resolve_over_the_api,
    dedupe_window_bumps_the_open_alert,
    suppression_opens_nothing_and_counts,
    escalation_notifies_once,
    retries_then_dead_letter_then_retry,
    device_conditions_open_and_resolve,
    metric_and_anomaly_conditions,
    validation_errors_name_the_field,
    viewers_see_alerts_of_their_cameras,
    mqtt_channel_publishes_qos1,
    email_channel_sends_mail,
    pending_deliveries_survive_a_restart,
);

// ---------------------------------------------------------------------------------------------
// The app, the engine and calls.

fn test_config() -> AlertsConfig {
    AlertsConfig {
        check_interval_ms: 150,
        poll_interval_ms: 100,
        retry_base_ms: 50,
        retry_max_ms: 200,
        delivery_timeout_ms: 5_000,
        // The receivers of these tests listen on loopback.
        targets: TargetPolicy { allowed: vec!["127.0.0.1".parse().expect("net")] },
        ..AlertsConfig::default()
    }
}

struct App {
    router: Router,
    token: String,
    bus: EventBus,
    store: Arc<dyn EventStore>,
    auth: Arc<its_aggregator::auth::AuthService>,
    shutdown: watch::Sender<bool>,
    engine: Option<tokio::task::JoinHandle<()>>,
    /// Where the engine and the delivery worker take "now".
    clock: SharedClock,
}

impl App {
    async fn new(store: Arc<dyn EventStore>) -> Self {
        Self::with_clock(store, SystemClock::shared()).await
    }

    async fn with_clock(store: Arc<dyn EventStore>, clock: SharedClock) -> Self {
        let snapshots = its_aggregator::snapshots::SnapshotObjects::with_store(
            Arc::new(object_store::memory::InMemory::new()),
            "memory",
        );
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
        let (mut state, token) =
            common::test_state(Arc::clone(&store), snapshots, metrics, AuthConfig::default()).await;
        let bus = EventBus::new();
        state.bus = bus.clone();
        state.alert_targets = test_config().targets;
        let auth = Arc::clone(&state.auth);
        let router = its_aggregator::http::router(state);
        let (shutdown, _) = watch::channel(false);
        let mut app = Self { router, token, bus, store, auth, shutdown, engine: None, clock };
        app.start_engine();
        app
    }

    fn start_engine(&mut self) {
        self.shutdown.send_replace(false);
        let service = its_aggregator::alerts::service(
            self.store.db(),
            self.bus.clone(),
            test_config(),
            Arc::clone(&self.clock),
            self.shutdown.subscribe(),
        );
        self.engine = Some(tokio::spawn(service));
    }

    /// An engine of the test's own on the same database, bus and clock (as another replica's):
    /// the test runs its periodic check ([`Engine::check`]) when it wants, at the clock's time.
    fn checker(&self) -> Engine {
        Engine::new(
            self.store.db(),
            self.bus.clone(),
            test_config(),
            Arc::clone(&self.clock),
            Arc::new(tokio::sync::Notify::new()),
        )
    }

    async fn stop_engine(&mut self) {
        self.shutdown.send_replace(true);
        if let Some(h) = self.engine.take() {
            tokio::time::timeout(Duration::from_secs(10), h).await.expect("engine stops").expect("engine");
        }
    }

    async fn call(&self, method: Method, uri: &str, token: &str, body: Option<Value>) -> (StatusCode, Value) {
        let req = Request::builder().method(method).uri(uri).header(header::AUTHORIZATION, format!("Bearer {token}"));
        let req = match body {
            Some(b) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&b).expect("json")))
                .expect("request"),
            None => req.body(Body::empty()).expect("request"),
        };
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20).await.expect("body");
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn get(&self, uri: &str) -> Value {
        let (s, v) = self.call(Method::GET, uri, &self.token, None).await;
        assert_eq!(s, StatusCode::OK, "GET {uri}: {v}");
        v
    }

    async fn post(&self, uri: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, uri, &self.token, Some(body)).await
    }

    async fn channel(&self, spec: Value) -> i64 {
        let (s, v) = self.post("/api/v1/alert-channels", spec).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["channel_id"].as_i64().expect("channel id")
    }

    async fn rule(&self, spec: Value) -> i64 {
        let (s, v) = self.post("/api/v1/alert-rules", spec).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["rule_id"].as_i64().expect("rule id")
    }

    async fn alerts(&self, query: &str) -> Vec<Value> {
        self.get(&format!("/api/v1/alerts{query}")).await["alerts"].as_array().expect("alerts").clone()
    }

    /// Waits until `check` holds for the alerts that `query` lists.
    async fn wait_alerts(&self, query: &str, what: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        for _ in 0..200 {
            let alerts = self.alerts(query).await;
            if check(&alerts) {
                return alerts;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{what}: {:#?}", self.alerts(query).await);
    }

    async fn deliveries(&self, alert_id: i64) -> Vec<Value> {
        self.get(&format!("/api/v1/alerts/{alert_id}/deliveries")).await["deliveries"]
            .as_array()
            .expect("deliveries")
            .clone()
    }

    async fn wait_delivery_state(&self, alert_id: i64, state: &str) -> Vec<Value> {
        for _ in 0..200 {
            let d = self.deliveries(alert_id).await;
            if !d.is_empty() && d.iter().all(|d| d["state"] == state) {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("deliveries of alert {alert_id} not {state}: {:#?}", self.deliveries(alert_id).await);
    }

    async fn user(&self, name: &str, role: Role, scope: &Scope) -> String {
        self.auth.create_user(name, "a long enough password 1", role, scope).await.expect("user");
        match self.auth.login(name, "a long enough password 1", None).await.expect("login") {
            LoginOutcome::Tokens(t) => t.access_token,
            LoginOutcome::MfaRequired { .. } => panic!("no MFA expected"),
        }
    }

    fn events(&self, device: &str, events: Vec<EventEnvelope>) {
        self.bus.publish(BusMessage::Events(CommittedEvents {
            device: device.into(),
            events,
            committed_at_ms: its_aggregator::unix_ms(),
        }));
    }

    fn health(&self, device: &str, health: DeviceHealth) {
        self.bus.publish(BusMessage::Health { device: device.into(), at_ms: its_aggregator::unix_ms(), health });
    }
}

fn object(label: &str) -> ObjectRef {
    ObjectRef { track_id: 1, label: label.into(), score: 0.9, bbox: [0.1, 0.1, 0.2, 0.2] }
}

fn wrong_way(seq: u64, camera: &str, label: &str, speed: Option<f32>) -> EventEnvelope {
    EventEnvelope {
        seq,
        camera: camera.into(),
        observed_at_ms: its_aggregator::unix_ms(),
        kind: EventKind::WrongWay { zone: "ramp".into(), object: object(label), distance_m: 30.0, speed_kmh: speed },
    }
}

fn camera(name: &str, state: &str, fps: f32) -> CameraHealth {
    CameraHealth { camera: name.into(), state: state.into(), fps, ..Default::default() }
}

// ---------------------------------------------------------------------------------------------
// A webhook receiver with its own HMAC-SHA256 (RFC 2104 over sha2), not the service's code.

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new().chain_update(&ipad).chain_update(message).finalize();
    Sha256::new().chain_update(&opad).chain_update(inner).finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: Vec<u8>,
    /// When it arrived, Unix ms.
    at_ms: i64,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("webhook body is JSON")
    }

    /// Checks `X-ITS-Signature` against the test's own HMAC of `"<X-ITS-Timestamp>.<body>"`.
    fn signature_ok(&self, secret: &str) -> bool {
        let ts = self.headers.get("x-its-timestamp").and_then(|v| v.to_str().ok()).unwrap_or("");
        let mut msg = ts.as_bytes().to_vec();
        msg.push(b'.');
        msg.extend_from_slice(&self.body);
        let want = format!("sha256={}", hex(&hmac_sha256(secret.as_bytes(), &msg)));
        self.headers.get("x-its-signature").and_then(|v| v.to_str().ok()) == Some(want.as_str())
    }
}

struct Hook {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    got: Arc<Mutex<VecDeque<Received>>>,
    /// Told when a request arrives.
    arrived: Arc<tokio::sync::Notify>,
    _task: tokio::task::JoinHandle<()>,
}

impl Hook {
    async fn start() -> Self {
        let status = Arc::new(AtomicU16::new(200));
        let got: Arc<Mutex<VecDeque<Received>>> = Arc::default();
        let arrived = Arc::new(tokio::sync::Notify::new());
        let (s, g, a) = (Arc::clone(&status), Arc::clone(&got), Arc::clone(&arrived));
        let app = Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let (s, g, a) = (Arc::clone(&s), Arc::clone(&g), Arc::clone(&a));
                async move {
                    g.lock().expect("lock").push_back(Received {
                        headers,
                        body: body.to_vec(),
                        at_ms: its_aggregator::unix_ms(),
                    });
                    a.notify_one();
                    StatusCode::from_u16(s.load(Ordering::SeqCst)).expect("status")
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, status, got, arrived, _task: task }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn count(&self) -> usize {
        self.got.lock().expect("lock").len()
    }

    /// The next request received, waiting for it up to 10 s.
    async fn next(&self) -> Received {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.got.lock().expect("lock").pop_front() {
                return r;
            }
            // A request that arrives after the look above leaves a permit: no wake-up is lost.
            if tokio::time::timeout_at(deadline, self.arrived.notified()).await.is_err() {
                panic!("no webhook arrived at {}", self.url());
            }
        }
    }
}

fn webhook(name: &str, hook: &Hook, secret: &str) -> Value {
    json!({ "name": name, "target": { "kind": "webhook", "url": hook.url(), "secret": secret } })
}

fn wrong_way_rule(name: &str, severity: &str, channels: &[i64]) -> Value {
    json!({
        "name": name,
        "severity": severity,
        "condition": { "type": "event", "kinds": ["wrong_way"] },
        "channels": channels,
    })
}

// ---------------------------------------------------------------------------------------------
// The suites.

async fn webhook_is_signed_and_recorded(store: Arc<dyn EventStore>) {
    let app = App::new(store).await;
    let hook = Hook::start().await;
    let ch = app.channel(webhook("ops hook", &hook, "s3cret-key")).await;
    let listed = app.get("/api/v1/alert-channels").await;
    assert!(!listed.to_string().contains("s3cret-key"), "secrets are never shown: {listed}");
    let rule = app
        .rule(json!({
            "name": "Fast wrong-way trucks",
            "severity": "critical",
            "condition": { "type": "event", "kinds": ["wrong_way"], "classes": ["truck"], "speed_above_kmh": 50 },
            "channels": [ch],
        }))
        .await;
    let mut bus = app.bus.subscribe("test");
    // Not matching: a car, a slow truck, a truck without a speed. Matching: a fast truck.
    app.events(
        "dev-a",
        vec![
            wrong_way(1, "cam-1", "car", Some(80.0)),
            wrong_way(2, "cam-1", "truck", Some(30.0)),
            wrong_way(3, "cam-1", "truck", None),
            wrong_way(4, "cam-1", "truck", Some(70.0)),
        ],
    );
    let got = hook.next().await;
    assert!(got.signature_ok("s3cret-key"), "signature verifies with the test's own HMAC: {:?}", got.headers);
    assert!(!got.signature_ok("another key"));
    let ts: i64 = got.headers["x-its-timestamp"].to_str().expect("ts").parse().expect("unix seconds");
    assert!((ts - its_aggregator::unix_ms() / 1000).abs() < 60, "a current timestamp");
    let body = got.json();
    assert_eq!(body["event"], "alert.opened");
    assert_eq!(body["alert"]["rule_id"], rule);
    assert_eq!(body["alert"]["severity"], "critical");
    assert_eq!(body["alert"]["subject"], "camera:dev-a/cam-1");
    assert_eq!(body["alert"]["details"]["event"]["id"], "dev-a:4");
    // A tampered body does not verify.
    let mut tampered = got.clone();
    tampered.body = got.body.iter().map(|b| if *b == b'4' { b'5' } else { *b }).collect();
    assert!(!tampered.signature_ok("s3cret-key"));

    let alerts = app.alerts("").await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let id = alerts[0]["alert_id"].as_i64().expect("id");
    let d = app.wait_delivery_state(id, "delivered").await;
    let log = d[0]["attempt_log"].as_array().expect("attempts");
    assert_eq!(log.len(), 1);
    assert_eq!((log[0]["attempt"].as_i64(), log[0]["outcome"].as_str()), (Some(1), Some("delivered")));
    assert_eq!(log[0]["http_status"], 200);
    assert!(log[0]["latency_ms"].as_i64().is_some());
    assert_eq!(got.headers["x-its-delivery"].to_str().expect("id"), d[0]["delivery_id"].to_string());
    // The alert was published on the bus.
    let opened = loop {
        let m = tokio::time::timeout(Duration::from_secs(5), bus.recv()).await.expect("bus").expect("open");
        if let BusMessage::Alert { alert } = &*m.message {
            break alert.clone();
        }
    };
    assert_eq!((opened["event"].as_str(), opened["alert_id"].as_i64()), (Some("opened"), Some(id)));
}

async fn lifecycle_ack_resolve_over_the_api(store: Arc<dyn EventStore>) {
    let app = App::new(store).await;
    app.rule(wrong_way_rule("wrong way", "warning", &[])).await;
    let mut bus = app.bus.subscribe("test");
    app.events("dev-a", vec![wrong_way(1, "cam-1", "car", None)]);
    let a = app.wait_alerts("?state=open", "an open alert", |a| a.len() == 1).await;
    let id = a[0]["alert_id"].as_i64().expect("id");
    assert_eq!(a[0]["acknowledged_by"], Value::Null);

    let operator = app.user("op-1", Role::Operator, &Scope::All).await;
    let viewer = app.user("viewer-1", Role::Viewer, &Scope::All).await;
    let (s, _) = app.call(Method::POST, &format!("/api/v1/alerts/{id}/ack"), &viewer, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "viewers cannot acknowledge");
    let before = its_aggregator::unix_ms();
    let (s, v) = app.call(Method::POST, &format!("/api/v1/alerts/{id}/ack"), &operator, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "acknowledged");
    assert_eq!(v["acknowledged_by"], "user:op-1");
    assert!(v["acknowledged_at_ms"].as_i64().expect("when") >= before);
    let (s, v) = app.call(Method::POST, &format!("/api/v1/alerts/{id}/ack"), &operator, None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")), "acknowledged once");
    assert!(app.alerts("?state=open").await.is_empty());
    assert_eq!(app.alerts("?state=acknowledged").await.len(), 1);

    let (s, v) = app.post(&format!("/api/v1/alerts/{id}/resolve"), json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["state"].as_str(), v["resolved_by"].as_str()), (Some("resolved"), Some("user:test-admin")));
    assert!(v["resolved_at_ms"].as_i64().expect("when") >= before);
    let (s, _) = app.post(&format!("/api/v1/alerts/{id}/resolve"), json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = app.post("/api/v1/alerts/999999/ack", json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let got = app.get(&format!("/api/v1/alerts/{id}")).await;
    assert_eq!(got["acknowledged_by"], "user:op-1");

    // Every change went on the bus, in order.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(5), bus.recv()).await.expect("bus").expect("open");
        if let BusMessage::Alert { alert } = &*m.message {
            seen.push(alert["event"].as_str().expect("event").to_owned());
        }
    }
    assert_eq!(seen, ["opened", "acknowledged", "resolved"]);

    // Pagination and filters.
    for seq in 2..=6 {
        app.events("dev-b", vec![wrong_way(seq, &format!("cam-{seq}"), "car", None)]);
    }
    app.wait_alerts("?device=dev-b", "five alerts", |a| a.len() == 5).await;
    let page1 = app.get("/api/v1/alerts?device=dev-b&limit=2").await;
    let page2 = app
        .get(&format!("/api/v1/alerts?device=dev-b&limit=2&cursor={}", page1["next_cursor"].as_str().expect("c")))
        .await;
    let page3 = app
        .get(&format!("/api/v1/alerts?device=dev-b&limit=2&cursor={}", page2["next_cursor"].as_str().expect("c")))
        .await;
    assert_eq!(page3["next_cursor"], Value::Null);
    let ids: Vec<i64> = [&page1, &page2, &page3]
        .iter()
        .flat_map(|p| p["alerts"].as_array().expect("alerts").iter().map(|a| a["alert_id"].as_i64().expect("id")))
        .collect();
    assert_eq!(ids.len(), 5);
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first, no repeats: {ids:?}");
    assert_eq!(app.alerts("?severity=critical").await.len(), 0);
    assert_eq!(app.alerts("?severity=warning&camera=cam-3").await.len(), 1);
    let (s, _) = app.call(Method::GET, "/api/v1/alerts?state=closed", &app.token, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

async fn dedupe_window_bumps_the_open_alert(store: Arc<dyn EventStore>) {
    let app = App::new(store).await;
    let r1 = app
        .rule(json!({ "name": "dedupe", "severity": "info", "dedupe_window_s": 300,
        "condition": { "type": "event", "kinds": ["wrong_way"] } }))
        .await;
    for seq in 1..=3 {
        app.events("dev-a", vec![wrong_way(seq, "cam-1", "car", None)]);
    }
    app.events("dev-a", vec![wrong_way(4, "cam-2", "car", None)]);
    let q = format!("?rule={r1}");
    let alerts = app
        .wait_alerts(&q, "one alert per camera, counted", |a| {
            a.len() == 2 && a.iter().any(|x| x["count"] == 3) && a.iter().any(|x| x["count"] == 1)
        })
        .await;
    let cam1 = alerts.iter().find(|a| a["camera"] == "cam-1").expect("cam-1");
    assert_eq!(cam1["count"], 3);
    assert!(cam1["last_seen_ms"].as_i64() >= cam1["opened_at_ms"].as_i64());
    // A resolved alert is not bumped: the next firing opens a new one.
    let id = cam1["alert_id"].as_i64().expect("id");
    assert_eq!(app.post(&format!("/api/v1/alerts/{id}/resolve"), json!({})).await.0, StatusCode::OK);
    app.events("dev-a", vec![wrong_way(5, "cam-1", "car", None)]);
    app.wait_alerts(&q, "a new alert after resolution", |a| a.len() == 3).await;

    // Window 0: every firing opens an alert.
    let r2 = app
        .rule(json!({ "name": "no dedupe", "severity": "info", "dedupe_window_s": 0,
        "condition": { "type": "event", "kinds": ["zone_enter"] } }))
        .await;
    for seq in 10..13 {
        app.events(
            "dev-a",
            vec![EventEnvelope {
                seq,
                camera: "cam-1".into(),
                observed_at_ms: 1,
                kind: EventKind::ZoneEnter { zone: "z".into(), object: object("car") },
            }],
        );
    }
    app.wait_alerts(&format!("?rule={r2}"), "three alerts", |a| a.len() == 3).await;
}

async fn suppression_opens_nothing_and_counts(store: Arc<dyn EventStore>) {
    let app = App::new(store).await;
    // All day, every day, in a fixed offset: always suppressed.
    let quiet = app
        .rule(json!({ "name": "quiet", "severity": "warning",
        "condition": { "type": "event", "kinds": ["wrong_way"] },
        "suppression": { "utc_offset": "+05:30", "windows": [{ "from": "00:00", "to": "24:00" }] } }))
        .await;
    // Never suppressed: a window on no day but... one that is always in the past minute is not
    // possible, so a window of one minute twelve hours from now.
    let now_min = (its_aggregator::unix_ms() / 60_000) % 1440;
    let other = (now_min + 720) % 1440;
    let t = |m: i64| format!("{:02}:{:02}", m / 60, m % 60);
    let loud = app
        .rule(json!({ "name": "loud", "severity": "warning",
        "condition": { "type": "event", "kinds": ["wrong_way"] },
        "suppression": { "windows": [{ "from": t(other), "to": t((other + 1) % 1440) }] } }))
        .await;
    for seq in 1..=3 {
        app.events("dev-a", vec![wrong_way(seq, "cam-1", "car", None)]);
    }
    app.wait_alerts(&format!("?rule={loud}"), "the loud rule opens", |a| a.len() == 1).await;
    for _ in 0..100 {
        if app.get(&format!("/api/v1/alert-rules/{quiet}")).await["suppressed_total"] == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.get(&format!("/api/v1/alert-rules/{quiet}")).await["suppressed_total"], 3);
    assert!(app.alerts(&format!("?rule={quiet}")).await.is_empty(), "no alert opens while suppressed");
    assert_eq!(app.get(&format!("/api/v1/alert-rules/{loud}")).await["suppressed_total"], 0);
}

async fn escalation_notifies_once(store: Arc<dyn EventStore>) {
    // Time stands still unless the test moves it: nothing is due until it does.
    let clock = ManualClock::at_system_time();
    let app = App::with_clock(store, clock.shared()).await;
    let mut checker = app.checker();
    let (first, pager) = (Hook::start().await, Hook::start().await);
    let ch = app.channel(webhook("first", &first, "k1")).await;
    let esc = app.channel(webhook("pager", &pager, "k2")).await;
    let rule = app
        .rule(json!({ "name": "critical wrong way", "severity": "critical", "dedupe_window_s": 0,
        "condition": { "type": "event", "kinds": ["wrong_way"] }, "channels": [ch],
        "escalation": { "after_s": 3, "channels": [esc] } }))
        .await;
    app.events("dev-a", vec![wrong_way(1, "cam-1", "car", None)]);
    app.events("dev-a", vec![wrong_way(2, "cam-2", "car", None)]);
    let alerts = app.wait_alerts(&format!("?rule={rule}"), "two alerts", |a| a.len() == 2).await;
    // One is acknowledged at once (well within the 3 s): it is not escalated.
    let acked = alerts.iter().find(|a| a["camera"] == "cam-2").expect("cam-2")["alert_id"].as_i64().expect("id");
    let open = alerts.iter().find(|a| a["camera"] == "cam-1").expect("cam-1")["alert_id"].as_i64().expect("id");
    assert_eq!(app.post(&format!("/api/v1/alerts/{acked}/ack"), json!({})).await.0, StatusCode::OK);
    clock.advance(Duration::from_secs(3));
    checker.check(clock.now_ms()).await.expect("check");
    let got = pager.next().await;
    assert!(got.signature_ok("k2"));
    assert_eq!(got.json()["event"], "alert.escalated");
    assert_eq!(got.json()["alert"]["alert_id"], open);
    // Several more checks pass: still once.
    for _ in 0..3 {
        clock.advance(Duration::from_secs(60));
        checker.check(clock.now_ms()).await.expect("check");
    }
    let a = app.get(&format!("/api/v1/alerts/{open}")).await;
    assert!(a["escalated_at_ms"].as_i64().is_some());
    assert_eq!(app.get(&format!("/api/v1/alerts/{acked}")).await["escalated_at_ms"], Value::Null);
    // Every delivery queued by then is attempted before the pager is counted.
    let d = app.wait_delivery_state(open, "delivered").await;
    let reasons: Vec<&str> = d.iter().map(|d| d["reason"].as_str().expect("reason")).collect();
    assert_eq!(reasons, ["opened", "escalated"]);
    app.wait_delivery_state(acked, "delivered").await;
    assert_eq!(pager.count(), 0, "escalated once");
    assert_eq!(first.count(), 2, "both alerts were notified when opened");
}

async fn retries_then_dead_letter_then_retry(store: Arc<dyn EventStore>) {
    let app = App::new(store).await;
    let hook = Hook::start().await;
    hook.status.store(500, Ordering::SeqCst);
    let mut spec = webhook("flaky", &hook, "k");
    spec["max_attempts"] = json!(3);
    let ch = app.channel(spec).await;
    app.rule(wrong_way_rule("r", "warning", &[ch])).await;
    app.events("dev-a", vec![wrong_way(1, "cam-1", "car", None)]);
    let a = app.wait_alerts("", "an alert", |a| a.len() == 1).await;
    let id = a[0]["alert_id"].as_i64().expect("id");
    let d = app.wait_delivery_state(id, "dead").await;
    let log = d[0]["attempt_log"].as_array().expect("log");
    let outcomes: Vec<&str> = log.iter().map(|a| a["outcome"].as_str().expect("outcome")).collect();
    assert_eq!(outcomes, ["retry", "retry", "dead"]);
    assert!(log.iter().all(|a| a["http_status"] == 500));
    assert_eq!(hook.count(), 3, "three attempts reached the server");
    let dead = app.get("/api/v1/alert-deliveries/dead").await;
    let dead = dead["deliveries"].as_array().expect("dead");
    assert_eq!(dead.len(), 1);
    let delivery = dead[0]["delivery_id"].as_i64().expect("id");

    // Back to healthy: a retry of the dead letter is delivered.
    hook.status.store(204, Ordering::SeqCst);
    let (s, v) = app.post(&format!("/api/v1/alert-deliveries/{delivery}/retry"), json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let d = app.wait_delivery_state(id, "delivered").await;
    assert_eq!(d[0]["attempt_log"].as_array().expect("log").len(), 4);
    let (s, _) = app.post(&format!("/api/v1/alert-deliveries/{delivery}/retry"), json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "only dead letters are retried");
    assert!(app.get("/api/v1/alert-deliveries/dead").await["deliveries"].as_array().expect("d").is_empty());

    // A 4xx (other than 408/429) is permanent: dead after one attempt.
    hook.status.store(404, Ordering::SeqCst);
    app.events("dev-a", vec![wrong_way(2, "cam-9", "car", None)]);
    let a = app.wait_alerts("?camera=cam-9", "an alert", |a| a.len() == 1).await;
    let d = app.wait_delivery_state(a[0]["alert_id"].as_i64().expect("id"), "dead").await;
    assert_eq!(d[0]["attempts"], 1);
    assert_eq!(d[0]["attempt_log"][0]["http_status"], 404);
}

async fn device_conditions_open_and_resolve(store: Arc<dyn EventStore>) {
    let clock = ManualClock::at_system_time();
    let app = App::with_clock(Arc::clone(&store), clock.shared()).await;
    let down =
        app.rule(json!({ "name": "down", "severity": "critical", "condition": { "type": "camera_down" } })).await;
    let fps =
        app.rule(json!({ "name": "fps", "severity": "warning", "condition": { "type": "fps_below", "fps": 5 } })).await;
    let hot = app
        .rule(json!({ "name": "hot", "severity": "warning",
        "condition": { "type": "temperature_above", "celsius": 80 } }))
        .await;
    let evict =
        app.rule(json!({ "name": "evict", "severity": "warning", "condition": { "type": "buffer_evicting" } })).await;
    let offline = app
        .rule(json!({ "name": "offline", "severity": "critical",
        "condition": { "type": "device_offline", "minutes": 5 }, "filter": { "devices": ["dev-old"] } }))
        .await;

    let healthy = |evicted: u64| DeviceHealth {
        cameras: vec![camera("cam-1", "streaming", 12.0), camera("cam-2", "streaming", 12.0)],
        temperature_c: Some(50.0),
        evicted_total: evicted,
        ..Default::default()
    };
    app.health("dev-a", healthy(0));
    let sick = DeviceHealth {
        cameras: vec![camera("cam-1", "reconnecting", 0.0), camera("cam-2", "streaming", 2.0)],
        temperature_c: Some(85.5),
        evicted_total: 40,
        ..Default::default()
    };
    app.health("dev-a", sick.clone());
    // Still evicting (45 > 40), still down, hot and slow: the same alerts, bumped.
    app.health("dev-a", DeviceHealth { evicted_total: 45, ..sick });
    // Four alerts open with the first sick report; wait for the second report's bump too.
    let open = app
        .wait_alerts("?state=open", "four device alerts, the camera one bumped", |a| {
            a.len() == 4 && a.iter().any(|x| x["rule_id"] == down && x["count"] == 2)
        })
        .await;
    let by_rule = |r: i64| open.iter().find(|a| a["rule_id"] == r).cloned().expect("alert of the rule");
    assert_eq!(by_rule(down)["subject"], "camera:dev-a/cam-1");
    assert_eq!(by_rule(down)["count"], 2, "the second report bumps the open alert");
    assert_eq!(by_rule(fps)["subject"], "camera:dev-a/cam-2");
    assert_eq!(by_rule(hot)["subject"], "device:dev-a");
    assert_eq!(by_rule(evict)["subject"], "device:dev-a");

    // Everything clears: resolved by the system.
    app.health("dev-a", healthy(45));
    let resolved = app.wait_alerts("?state=resolved", "all four resolved", |a| a.len() == 4).await;
    assert!(resolved.iter().all(|a| a["resolved_by"] == "system"), "{resolved:?}");

    // Offline for 5 minutes: a device last seen 10 minutes ago; resolved when it connects.
    let hello = its_shared::wire::Hello {
        agent_version: "1.0.0".into(),
        model: "m".into(),
        cameras: vec!["cam-1".into()],
        last_acked_seq: 0,
        last_assigned_seq: 0,
    };
    store.record_hello("dev-old", &hello, clock.now_ms()).await.expect("hello");
    // Ten minutes pass for the engine: its next periodic check finds the device silent.
    clock.advance(Duration::from_secs(600));
    let a = app.wait_alerts(&format!("?rule={offline}&state=open"), "offline alert", |a| a.len() == 1).await;
    assert_eq!(a[0]["subject"], "device:dev-old");
    store.record_hello("dev-old", &hello, clock.now_ms()).await.expect("hello");
    app.bus.publish(BusMessage::DeviceStatus { device: "dev-old".into(), online: true, at_ms: clock.now_ms() });
    let a = app
        .wait_alerts(&format!("?rule={offline}"), "offline alert resolved", |a| {
            a.len() == 1 && a[0]["state"] == "resolved"
        })
        .await;
    assert_eq!(a[0]["resolved_by"], "system");
}

async fn metric_and_anomaly_conditions(store: Arc<dyn EventStore>) {
    let app = App::new(store).await;
    let volume = app.rule(json!({ "name": "volume", "severity": "warning",
        "condition": { "type": "metric", "metric": "count", "op": "above", "value": 100, "resolution": "15m", "class": "truck" } })).await;
    let slow = app
        .rule(json!({ "name": "slow", "severity": "info",
        "condition": { "type": "metric", "metric": "speed_mean_kmh", "op": "below", "value": 20 } }))
        .await;
    let anomaly = app
        .rule(json!({ "name": "anomaly", "severity": "critical",
        "condition": { "type": "anomaly", "kinds": ["volume_high", "speed_drop"], "min_score": 4 } }))
        .await;
    let rollup = |resolution: &str, class: &str, count: u64, speed: f64| {
        json!({ "resolution": resolution, "start": "2026-11-27T10:00:00Z", "start_ms": 1_795_000_000_000_i64,
            "device": "dev-a", "camera": "cam-1", "line": "north", "zone": null, "class": class, "direction": "in",
            "count": count, "speed_mean_kmh": speed, "speed_p85_kmh": speed + 5.0, "occupancy": null })
    };
    for r in [
        rollup("15m", "truck", 150, 50.0), // volume fires
        rollup("1m", "truck", 150, 50.0),  // wrong resolution
        rollup("15m", "car", 500, 50.0),   // wrong class
        rollup("15m", "truck", 90, 50.0),  // below the threshold
        rollup("1h", "car", 10, 12.0),     // slow fires
    ] {
        app.bus.publish(BusMessage::Rollup { rollup: r });
    }
    let anomaly_of = |kind: &str, score: f64| {
        json!({ "id": 1, "kind": kind, "device": "dev-a", "camera": "cam-2", "line": "north",
            "start_ms": 1_795_000_000_000_i64, "value": 300, "baseline": 100, "score": score })
    };
    for a in [anomaly_of("volume_high", 6.5), anomaly_of("volume_low", 9.0), anomaly_of("speed_drop", 2.0)] {
        app.bus.publish(BusMessage::Anomaly { anomaly: a });
    }
    let all = app.wait_alerts("", "three alerts", |a| a.len() == 3).await;
    let of = |r: i64| all.iter().filter(|a| a["rule_id"] == r).cloned().collect::<Vec<_>>();
    assert_eq!(of(volume).len(), 1);
    assert_eq!(of(volume)[0]["details"]["rollup"]["count"], 150);
    assert_eq!(of(slow).len(), 1);
    assert_eq!(of(anomaly).len(), 1);
    assert_eq!(of(anomaly)[0]["subject"], "camera:dev-a/cam-2");
    assert_eq!(of(anomaly)[0]["details"]["anomaly"]["kind"], "volume_high");
}

async fn validation_errors_name_the_field(store: Arc<dyn EventStore>) {
    let app = App::new(store).await;
    let cases = [
        (
            json!({ "name": "x", "severity": "warning", "condition": { "type": "event", "kinds": ["nope"] } }),
            "condition.kinds[0]",
        ),
        (
            json!({ "name": "x", "severity": "warning", "condition": { "type": "event", "speed_above_kmh": -1 } }),
            "condition.speed_above_kmh",
        ),
        (json!({ "name": " ", "severity": "warning", "condition": { "type": "camera_down" } }), "name"),
        (
            json!({ "name": "x", "severity": "warning", "condition": { "type": "device_offline", "minutes": 0 } }),
            "condition.minutes",
        ),
        (
            json!({ "name": "x", "severity": "warning", "condition": { "type": "camera_down" },
            "suppression": { "windows": [{ "from": "25:00", "to": "06:00" }] } }),
            "suppression.windows[0].from",
        ),
        (
            json!({ "name": "x", "severity": "warning", "condition": { "type": "camera_down" },
            "escalation": { "after_s": 0, "channels": [1] } }),
            "escalation.after_s",
        ),
        (
            json!({ "name": "x", "severity": "warning", "condition": { "type": "camera_down" }, "filter": { "sites": [""] } }),
            "filter.sites[0]",
        ),
        // Shape errors name the path too (the JSON body's own errors).
        (json!({ "name": "x", "severity": "loud", "condition": { "type": "camera_down" } }), "severity"),
        (json!({ "name": "x", "severity": "info", "condition": { "type": "camera_down" }, "colour": "red" }), "colour"),
        (json!({ "name": "x", "severity": "info", "condition": { "type": "fps_below", "fps": "low" } }), "condition"),
    ];
    for (body, path) in cases {
        let (s, v) = app.post("/api/v1/alert-rules", body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} -> {v}");
        let message = v["error"]["message"].as_str().expect("message");
        assert!(message.contains(path), "{path} in {message:?} for {body}");
    }
    let (s, v) = app.post("/api/v1/alert-rules", wrong_way_rule("r", "info", &[424242])).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("unknown_channel")), "{v}");
    assert!(v["error"]["message"].as_str().expect("m").contains("channels[0]"));
    for (target, path) in [
        (json!({ "kind": "webhook", "url": "ftp://x.example/", "secret": "k" }), "target.url"),
        (json!({ "kind": "webhook", "url": "http://x.example/", "secret": "" }), "target.secret"),
        (json!({ "kind": "mqtt", "broker": "tcp://x:1" }), "target.broker"),
        (json!({ "kind": "mqtt", "broker": "mqtt://x:1", "topic": "a/#" }), "target.topic"),
        (json!({ "kind": "email", "to": ["not an address"] }), "target.to[0]"),
        (json!({ "kind": "email", "to": [] }), "target.to"),
    ] {
        let (s, v) = app.post("/api/v1/alert-channels", json!({ "name": "c", "target": target })).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["error"]["message"].as_str().expect("m").contains(path), "{path}: {v}");
    }

    // CRUD: create, read, replace, delete; a channel in use cannot be deleted.
    let hook = Hook::start().await;
    let ch = app.channel(webhook("c", &hook, "k")).await;
    let id = app.rule(wrong_way_rule("first", "info", &[ch])).await;
    let (s, v) = app.call(Method::PUT, &format!("/api/v1/alert-rules/{id}"), &app.token,
        Some(json!({ "name": "second", "severity": "critical", "enabled": false, "condition": { "type": "camera_down" } }))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let got = app.get(&format!("/api/v1/alert-rules/{id}")).await;
    assert_eq!(
        (got["name"].as_str(), got["severity"].as_str(), got["enabled"].as_bool()),
        (Some("second"), Some("critical"), Some(false))
    );
    assert_eq!(got["created_by"], "user:test-admin");
    let id2 = app.rule(wrong_way_rule("uses the channel", "info", &[ch])).await;
    let (s, _) = app.call(Method::DELETE, &format!("/api/v1/alert-channels/{ch}"), &app.token, None).await;
    assert_eq!(s, StatusCode::CONFLICT);
    for r in [id, id2] {
        let (s, _) = app.call(Method::DELETE, &format!("/api/v1/alert-rules/{r}"), &app.token, None).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
    }
    let (s, _) = app.call(Method::GET, &format!("/api/v1/alert-rules/{id}"), &app.token, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app.call(Method::DELETE, &format!("/api/v1/alert-channels/{ch}"), &app.token, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(app.get("/api/v1/alert-rules").await["rules"].as_array().expect("rules").is_empty());
}

async fn viewers_see_alerts_of_their_cameras(store: Arc<dyn EventStore>) {
    let app = App::new(store).await;
    app.rule(wrong_way_rule("r", "warning", &[])).await;
    app.events("dev-a", vec![wrong_way(1, "cam-1", "car", None)]);
    app.events("dev-b", vec![wrong_way(1, "cam-9", "car", None)]);
    let all = app.wait_alerts("", "two alerts", |a| a.len() == 2).await;
    let scope = Scope::Limited {
        sites: vec![],
        cameras: vec![CameraRef { device_id: "dev-a".into(), camera: "cam-1".into() }],
    };
    let viewer = app.user("scoped", Role::Viewer, &scope).await;
    let (s, v) = app.call(Method::GET, "/api/v1/alerts", &viewer, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let seen = v["alerts"].as_array().expect("alerts");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["device_id"], "dev-a");
    let hidden = all.iter().find(|a| a["device_id"] == "dev-b").expect("dev-b")["alert_id"].as_i64().expect("id");
    let (s, _) = app.call(Method::GET, &format!("/api/v1/alerts/{hidden}"), &viewer, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "outside the scope is not found");
    let (s, _) = app.call(Method::GET, &format!("/api/v1/alerts/{hidden}/deliveries"), &viewer, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app.call(Method::GET, "/api/v1/alert-rules", &viewer, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "viewers do not read rules");
}

async fn mqtt_channel_publishes_qos1(store: Arc<dyn EventStore>) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let app = App::new(store).await;
    let tag = common::unique_name("alerts");
    let topic = format!("its-test/{tag}/{{severity}}");
    let mut opts = MqttOptions::new(format!("sub-{tag}"), "127.0.0.1", 1883);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(opts, 10);
    client.subscribe(format!("its-test/{tag}/+"), QoS::AtLeastOnce).await.expect("subscribe");
    tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(events.poll().await.expect("mqtt"), Event::Incoming(Packet::SubAck(_))) {}
    })
    .await
    .expect("subscribed at Mosquitto");
    let ch = app.channel(json!({ "name": "broker", "target": { "kind": "mqtt", "broker": "mqtt://127.0.0.1:1883", "topic": topic } })).await;
    app.rule(wrong_way_rule("mqtt", "critical", &[ch])).await;
    app.events("dev-a", vec![wrong_way(1, "cam-1", "car", None)]);
    let first = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = events.poll().await.expect("mqtt") {
                break p;
            }
        }
    })
    .await;
    let Ok(publish) = first else {
        let a = app.alerts("").await;
        panic!("no MQTT message; deliveries: {:#?}", app.deliveries(a[0]["alert_id"].as_i64().expect("id")).await);
    };
    assert_eq!(publish.topic, format!("its-test/{tag}/critical"));
    let body: Value = serde_json::from_slice(&publish.payload).expect("json");
    assert_eq!(body["alert"]["subject"], "camera:dev-a/cam-1");
    let a = app.alerts("").await;
    let d = app.wait_delivery_state(a[0]["alert_id"].as_i64().expect("id"), "delivered").await;
    assert_eq!(d[0]["attempt_log"][0]["outcome"], "delivered");

    // The default topic: its/v1/alerts/{severity}.
    client.subscribe("its/v1/alerts/info", QoS::AtLeastOnce).await.expect("subscribe");
    tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(events.poll().await.expect("mqtt"), Event::Incoming(Packet::SubAck(_))) {}
    })
    .await
    .expect("subscribed");
    let ch = app
        .channel(json!({ "name": "default topic", "target": { "kind": "mqtt", "broker": "mqtt://127.0.0.1" } }))
        .await;
    app.rule(json!({ "name": "info", "severity": "info", "channels": [ch],
        "condition": { "type": "event", "kinds": ["zone_enter"], "zones": [tag.clone()] } }))
        .await;
    app.events(
        "dev-a",
        vec![EventEnvelope {
            seq: 2,
            camera: "cam-1".into(),
            observed_at_ms: 1,
            kind: EventKind::ZoneEnter { zone: tag.clone(), object: object("car") },
        }],
    );
    let publish = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = events.poll().await.expect("mqtt")
                && p.topic == "its/v1/alerts/info"
            {
                let body: Value = serde_json::from_slice(&p.payload).expect("json");
                if body["alert"]["details"]["event"]["payload"]["zone"] == tag.as_str() {
                    break p;
                }
            }
        }
    })
    .await
    .expect("a message on the default topic");
    assert_eq!(publish.qos, QoS::AtLeastOnce);
}

/// aiosmtpd's Python: `$ITS_AIOSMTPD_PYTHON`, else where `scripts/setup-test-peers` links it.
fn aiosmtpd_python() -> std::path::PathBuf {
    let p = std::env::var_os("ITS_AIOSMTPD_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/aiosmtpd/bin/python"));
    assert!(p.exists(), "aiosmtpd is not installed at {}: run scripts/setup-test-peers", p.display());
    p
}

async fn email_channel_sends_mail(store: Arc<dyn EventStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr").port()
    };
    let log = dir.path().join("smtpd.log");
    let mut cmd = std::process::Command::new(aiosmtpd_python());
    cmd.args(["-u", "-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")]);
    let _smtpd = common::Proc::spawn("aiosmtpd", cmd, &log);
    // Wait until it listens.
    for i in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            break;
        }
        assert!(i < 99, "aiosmtpd did not start: {}", std::fs::read_to_string(&log).unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let app = App::new(store).await;
    let ch = app
        .channel(json!({ "name": "mail", "target": { "kind": "email", "to": ["oncall@example.net", "ops@example.net"],
            "smtp": { "host": "127.0.0.1", "port": port, "security": "none", "from": "its@example.net" } } }))
        .await;
    app.rule(wrong_way_rule("Mail me", "critical", &[ch])).await;
    app.events("dev-a", vec![wrong_way(1, "cam-1", "car", None)]);
    let a = app.wait_alerts("", "an alert", |a| a.len() == 1).await;
    app.wait_delivery_state(a[0]["alert_id"].as_i64().expect("id"), "delivered").await;
    let mut text = String::new();
    for _ in 0..100 {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("Subject:") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(text.contains("Subject: [ITS critical] wrong_way on dev-a/cam-1"), "{text}");
    assert!(text.contains("oncall@example.net") && text.contains("ops@example.net"), "{text}");
    assert!(text.contains("From: its@example.net"), "{text}");
    assert!(text.contains("Rule: Mail me"), "{text}");
}

async fn pending_deliveries_survive_a_restart(store: Arc<dyn EventStore>) {
    let mut app = App::new(store).await;
    let hook = Hook::start().await;
    let mut spec = webhook("later", &hook, "k");
    spec["max_attempts"] = json!(50);
    let ch = app.channel(spec).await;
    app.rule(wrong_way_rule("r", "warning", &[ch])).await;
    // The receiver refuses for now: the delivery stays pending (retried).
    hook.status.store(503, Ordering::SeqCst);
    app.events("dev-a", vec![wrong_way(1, "cam-1", "car", None)]);
    let a = app.wait_alerts("", "an alert", |a| a.len() == 1).await;
    let id = a[0]["alert_id"].as_i64().expect("id");
    for _ in 0..200 {
        if hook.count() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    app.stop_engine().await;
    let d = app.deliveries(id).await;
    assert_eq!(d[0]["state"], "pending", "{d:?}");
    // A new engine (as after a restart) picks the delivery up from the database.
    hook.status.store(200, Ordering::SeqCst);
    app.start_engine();
    let d = app.wait_delivery_state(id, "delivered").await;
    let log = d[0]["attempt_log"].as_array().expect("log");
    assert_eq!(log.last().expect("last")["outcome"], "delivered");
    assert!(log.len() >= 2);
}

/// Not a test: the latency from the bus publish of a commit to the webhook's receipt, at
/// 1,000 events/s for 10 s, `ITS_ALERTS_MATCH_EVERY` of them matching a rule (default 10: 100
/// alerts/s), each opening an alert. Prints p50/p99/max. Run with
/// `cargo nextest run -p its-aggregator --test alerts --run-ignored only latency`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn latency_commit_to_webhook() {
    let every: u64 = std::env::var("ITS_ALERTS_MATCH_EVERY").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("events.db").display());
    let store =
        its_aggregator::store::open_store(&url, its_aggregator::vault::Vault::ephemeral()).await.expect("store");
    let app = App::new(store).await;
    let hook = Hook::start().await;
    let ch = app.channel(webhook("bench", &hook, "k")).await;
    app.rule(json!({ "name": "bench", "severity": "warning", "dedupe_window_s": 0, "channels": [ch],
        "condition": { "type": "event", "kinds": ["wrong_way"] } }))
        .await;
    let mut seq = 0u64;
    let mut expected = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for _ in 0..1000 {
        tick.tick().await;
        let now = its_aggregator::unix_ms();
        let batch: Vec<EventEnvelope> = (0..10)
            .map(|_| {
                seq += 1;
                let mut e = wrong_way(seq, &format!("cam-{}", seq % 8), "car", None);
                if !seq.is_multiple_of(every) {
                    e.kind = EventKind::ZoneEnter { zone: "z".into(), object: object("car") };
                }
                e.observed_at_ms = now;
                e
            })
            .collect();
        expected += batch.iter().filter(|e| e.kind.name() == "wrong_way").count();
        app.events("dev-a", batch);
    }
    let mut lat = Vec::new();
    while lat.len() < expected {
        let r = hook.next().await;
        let received = r.at_ms;
        let sent = r.json()["alert"]["details"]["event"]["observed_at_ms"].as_i64().expect("t");
        lat.push(received - sent);
    }
    lat.sort_unstable();
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "commit -> webhook, {} alerts at {} alerts/s within 1000 events/s: p50 {} ms, p99 {} ms, max {} ms",
        lat.len(),
        1000 / every,
        q(0.5),
        q(0.99),
        lat[lat.len() - 1]
    );
}
