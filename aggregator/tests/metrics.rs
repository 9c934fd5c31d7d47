//! Traffic metrics and anomalies on both backends: events stored through the ingest path, the
//! analytics worker run at a controlled time, results read through `GET /api/v1/metrics` and
//! `GET /api/v1/anomalies` as an admin (and narrowed for a viewer).

use its_testkit::server as common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use its_aggregator::analytics::{Analytics, AnalyticsConfig};
use its_aggregator::bus::{BusMessage, EventBus};
use its_aggregator::store::EventStore;
use its_shared::event::{Direction, ObjectRef};
use its_shared::{EventEnvelope, EventKind};
use serde_json::Value;
use tower::ServiceExt as _;

use common::both_backends;

both_backends!(
    rollups_are_exact_at_every_resolution_and_follow_late_events,
    an_unusual_volume_and_a_sudden_speed_drop_are_found_once,
    open_coarse_buckets_are_recomputed_at_most_every_few_seconds,
);

/// Monday 2023-11-13 00:00:00 UTC: a whole hour, a whole week boundary does not matter.
const T0: i64 = 1_699_833_600_000;
const MIN: i64 = 60_000;
const WEEK: i64 = 7 * 24 * 60 * MIN;

fn crossing(seq: u64, camera: &str, at: i64, label: &str, dir: Direction, speed: Option<f32>) -> EventEnvelope {
    EventEnvelope {
        seq,
        camera: camera.into(),
        observed_at_ms: at,
        kind: EventKind::LineCrossing {
            line: "north".into(),
            object: ObjectRef { track_id: seq, label: label.into(), score: 0.9, bbox: [0.1, 0.2, 0.3, 0.4] },
            direction: dir,
            speed_kmh: speed,
        },
    }
}

fn occupancy(seq: u64, camera: &str, at: i64, occupied: f32, entered: u32) -> EventEnvelope {
    EventEnvelope {
        seq,
        camera: camera.into(),
        observed_at_ms: at,
        kind: EventKind::ZoneOccupancy {
            zone: "stop-bar".into(),
            interval_s: 10,
            mean: 0.5,
            max: 2,
            occupied,
            entered,
        },
    }
}

struct Api {
    router: axum::Router,
    token: String,
}

impl Api {
    async fn new(store: Arc<dyn EventStore>) -> Self {
        let (router, _, token) = common::test_app(store).await;
        Self { router, token }
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        let req = Request::builder()
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .body(Body::empty())
            .expect("request");
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 16 << 20).await.expect("body");
        (status, serde_json::from_slice(&body).expect("JSON body"))
    }

    async fn metrics(&self, query: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        loop {
            let (status, v) = self.get(&format!("/api/v1/metrics?{query}&limit=7&cursor={cursor}")).await;
            assert_eq!(status, StatusCode::OK, "{v}");
            out.extend(v["metrics"].as_array().expect("metrics").iter().cloned());
            match v["next_cursor"].as_str() {
                Some(c) => cursor = c.to_owned(),
                None => return out,
            }
        }
    }
}

fn row<'a>(rows: &'a [Value], start_ms: i64, class: &str, dir: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["start_ms"] == start_ms && r["class"] == class && r["direction"] == dir)
        .unwrap_or_else(|| panic!("no row {start_ms} {class} {dir} in {rows:?}"))
}

async fn rollups_are_exact_at_every_resolution_and_follow_late_events(store: Arc<dyn EventStore>) {
    let bus = EventBus::new();
    let analytics = Analytics::new(store.db(), bus.clone(), AnalyticsConfig::default());
    // 20 minutes of traffic: minute m has m+1 cars in (speeds 40 + m .. ), 1 truck out, and an
    // occupancy report.
    let mut events = Vec::new();
    let mut seq = 0;
    let mut next = || {
        seq += 1;
        seq
    };
    for m in 0..20i64 {
        for k in 0..=m {
            let speed = if k == 0 { None } else { Some(40.0 + k as f32) };
            events.push(crossing(next(), "cam-1", T0 + m * MIN + k * 100, "car", Direction::In, speed));
        }
        events.push(crossing(next(), "cam-1", T0 + m * MIN + 30_000, "truck", Direction::Out, Some(30.0)));
        events.push(occupancy(next(), "cam-1", T0 + m * MIN + 50_000, if m < 10 { 0.2 } else { 0.6 }, 2));
    }
    store.insert_events("dev-a", &events, T0).await.expect("insert");
    // A resend of the same batch changes nothing.
    let again = store.insert_events("dev-a", &events, T0).await.expect("insert");
    assert_eq!(again.inserted, 0);
    let mut rx = bus.subscribe("test");
    let report = analytics.run_pass(T0 + 20 * MIN).await.expect("pass");
    assert!(report.rows > 0 && !report.skipped, "{report:?}");
    let Some(m) = rx.recv().await else { panic!("no bus message") };
    assert!(matches!(&*m.message, BusMessage::Rollup { .. }), "{m:?}");

    let api = Api::new(store.clone()).await;
    let minutes = api.metrics("resolution=1m&device=dev-a&camera=cam-1&line=north").await;
    // 20 minutes x (car in, truck out).
    assert_eq!(minutes.len(), 40, "{minutes:?}");
    let m5 = row(&minutes, T0 + 5 * MIN, "car", "in");
    assert_eq!(m5["count"], 6);
    assert_eq!(m5["speed_samples"], 5);
    assert_eq!(m5["speed_mean_kmh"], 43.0); // 41..45
    assert_eq!(m5["speed_p85_kmh"], 45.0); // rank ceil(4.25) = 5 of 5
    assert_eq!(m5["resolution"], "1m");
    assert_eq!(m5["start"], "2023-11-13T00:05:00.000Z");
    assert_eq!(m5["zone"], Value::Null);
    // Ordered oldest first across pages.
    let starts: Vec<i64> = minutes.iter().map(|r| r["start_ms"].as_i64().expect("start")).collect();
    assert!(starts.windows(2).all(|w| w[0] <= w[1]));

    // 15 minutes: the first bucket holds minutes 0..15: cars 1+2+..+15 = 120, speeds 41..(40+m).
    let quarter = api.metrics("resolution=15m&line=north&class=car").await;
    assert_eq!(quarter.len(), 2, "{quarter:?}");
    let q0 = row(&quarter, T0, "car", "in");
    assert_eq!(q0["count"], 120);
    let mut speeds: Vec<f64> = (0..15).flat_map(|m| (1..=m).map(|k| 40.0 + k as f64)).collect();
    assert_eq!(q0["speed_samples"], speeds.len());
    speeds.sort_by(f64::total_cmp);
    let p85 = speeds[(0.85 * speeds.len() as f64).ceil() as usize - 1];
    assert_eq!(q0["speed_p85_kmh"], p85);
    let mean = speeds.iter().sum::<f64>() / speeds.len() as f64;
    assert!((q0["speed_mean_kmh"].as_f64().expect("mean") - mean).abs() < 1e-9);

    // The hour, and occupancy: minutes 0..10 at 0.2, 10..20 at 0.6, equal intervals -> 0.4.
    let hour = api.metrics("resolution=1h&camera=cam-1").await;
    let zone = hour.iter().find(|r| r["zone"] == "stop-bar").expect("occupancy row");
    assert!((zone["occupancy"].as_f64().expect("occupancy") - 0.4).abs() < 1e-6, "{zone}");
    assert_eq!(zone["count"], 40);
    assert_eq!((&zone["line"], &zone["class"]), (&Value::Null, &Value::Null));
    assert_eq!(row(&hour, T0, "car", "in")["count"], 210);
    assert_eq!(row(&hour, T0, "truck", "out")["count"], 20);

    // A late event (an agent flushing its outbox after an outage) into minute 5.
    let late = vec![crossing(10_000, "cam-1", T0 + 5 * MIN + 59_000, "car", Direction::In, Some(100.0))];
    store.insert_events("dev-a", &late, T0 + 3 * 60 * MIN).await.expect("insert");
    analytics.run_pass(T0 + 3 * 60 * MIN).await.expect("pass");
    let minutes =
        api.metrics("resolution=1m&camera=cam-1&class=car&from=2023-11-13T00:05:00Z&to=2023-11-13T00:06:00Z").await;
    assert_eq!(minutes.len(), 1);
    assert_eq!((&minutes[0]["count"], &minutes[0]["speed_p85_kmh"]), (&Value::from(7), &Value::from(100.0)));
    let hour = api.metrics("resolution=1h&camera=cam-1&class=car").await;
    assert_eq!(row(&hour, T0, "car", "in")["count"], 211);

    // Bad requests are 400s with a reason.
    for bad in ["resolution=5m", "direction=up", "cursor=zzz", "from=yesterday", "limit=0", "colour=red"] {
        let (status, v) = api.get(&format!("/api/v1/metrics?{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    // Another device's camera of the same name is not mixed in.
    assert!(api.metrics("resolution=1h&device=dev-b").await.is_empty());
}

async fn an_unusual_volume_and_a_sudden_speed_drop_are_found_once(store: Arc<dyn EventStore>) {
    let bus = EventBus::new();
    let analytics = Analytics::new(store.db(), bus.clone(), AnalyticsConfig::default());
    // The week of interest starts at W; the slot is W + 08:00 (a quarter hour).
    let w = T0 + 4 * WEEK;
    let slot = w + 8 * 60 * MIN;
    let mut seq = 0u64;
    let mut events = Vec::new();
    // Four previous weeks: about 40 cars per quarter hour around the slot, and the slot itself.
    for week in 1..=4i64 {
        for d in -1..=1i64 {
            let start = slot - week * WEEK + d * 15 * MIN;
            let n = 38 + ((week + d) % 5);
            for k in 0..n {
                seq += 1;
                events.push(crossing(seq, "cam-1", start + k * 20_000, "car", Direction::In, Some(60.0)));
            }
        }
    }
    // This week's slot: 150 cars (a diverted route). Speeds fine for 14 minutes, then the
    // last minute crawls (an incident downstream).
    for k in 0..150i64 {
        let at = slot + k * 6_000;
        let speed = if at >= slot + 14 * MIN { 12.0 } else { 58.0 + (k % 5) as f32 };
        seq += 1;
        events.push(crossing(seq, "cam-1", at, "car", Direction::In, Some(speed)));
    }
    for chunk in events.chunks(500) {
        store.insert_events("dev-a", chunk, slot).await.expect("insert");
    }
    // Before the slot closes nothing is judged (first pass sets the starting point).
    let early = analytics.run_pass(slot + 10 * MIN).await.expect("pass");
    assert!(early.anomalies.is_empty(), "{:?}", early.anomalies);
    let mut rx = bus.subscribe("test");
    let report = analytics.run_pass(slot + 16 * MIN).await.expect("pass");
    let kinds: Vec<&str> = report.anomalies.iter().map(|a| a.kind.as_str()).collect();
    assert_eq!(kinds, vec!["volume_high", "speed_drop"], "{:?}", report.anomalies);
    let volume = &report.anomalies[0];
    assert_eq!((volume.value, volume.start_ms, volume.line.as_str()), (150.0, slot, "north"));
    assert!(volume.baseline > 35.0 && volume.baseline < 45.0, "{volume:?}");
    assert_eq!(volume.samples, 12);
    let drop = &report.anomalies[1];
    assert_eq!(drop.start_ms, slot + 14 * MIN);
    assert!(drop.value < 13.0 && drop.baseline > 55.0 && drop.score < -3.5, "{drop:?}");
    // Both went out on the bus.
    let mut published = Vec::new();
    while published.len() < 2 {
        let m = rx.recv().await.expect("bus");
        if let BusMessage::Anomaly { anomaly } = &*m.message {
            published.push(anomaly["kind"].as_str().expect("kind").to_owned());
        }
    }
    assert_eq!(published, vec!["volume_high", "speed_drop"]);
    // Checking again (a restart, another replica) finds nothing new.
    let again = analytics.run_pass(slot + 17 * MIN).await.expect("pass");
    assert!(again.anomalies.is_empty(), "{:?}", again.anomalies);

    let api = Api::new(store.clone()).await;
    let (status, v) = api.get("/api/v1/anomalies?camera=cam-1").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let listed: Vec<&str> =
        v["anomalies"].as_array().expect("list").iter().map(|a| a["kind"].as_str().unwrap_or("")).collect();
    assert_eq!(listed, vec!["speed_drop", "volume_high"], "newest first: {v}");
    let (_, v) = api.get("/api/v1/anomalies?kind=volume_low").await;
    assert_eq!(v["anomalies"].as_array().map(Vec::len), Some(0));
    let (status, _) = api.get("/api/v1/anomalies?kind=meteor").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

async fn open_coarse_buckets_are_recomputed_at_most_every_few_seconds(store: Arc<dyn EventStore>) {
    use its_aggregator::analytics::{MetricQuery, Resolution, query_metrics};
    let analytics = Analytics::new(store.db(), EventBus::new(), AnalyticsConfig::default());
    let db = store.db();
    let rows = |res: Resolution| {
        let db = db.clone();
        async move {
            let q = MetricQuery { resolution: Some(res), limit: 100, ..MetricQuery::default() };
            query_metrics(&db, &q).await.expect("query").metrics
        }
    };
    // Live traffic in the current minute of an open quarter hour and hour.
    let now = T0 + 30 * MIN + 5_000;
    let mut seq = 0;
    for k in 0..3 {
        seq += 1;
        let e = crossing(seq, "cam-1", now - 1_000 + k, "car", Direction::In, Some(50.0));
        store.insert_events("dev-a", &[e], now).await.expect("insert");
    }
    analytics.run_pass(now).await.expect("pass");
    assert_eq!(rows(Resolution::Minute).await.len(), 1, "a minute is recomputed at once");
    assert!(rows(Resolution::QuarterHour).await.is_empty(), "a live quarter hour waits");
    assert!(rows(Resolution::Hour).await.is_empty(), "a live hour waits");
    analytics.run_pass(now + 10_000).await.expect("pass");
    assert_eq!(rows(Resolution::QuarterHour).await.first().map(|r| r.count), Some(3));
    assert!(rows(Resolution::Hour).await.is_empty());
    // More traffic meanwhile: the hour, once due, counts everything committed so far.
    seq += 1;
    let e = crossing(seq, "cam-1", now + 20_000, "car", Direction::In, Some(50.0));
    store.insert_events("dev-a", &[e], now + 20_000).await.expect("insert");
    analytics.run_pass(now + 60_000).await.expect("pass");
    assert_eq!(rows(Resolution::Hour).await.first().map(|r| r.count), Some(4));
    assert_eq!(rows(Resolution::QuarterHour).await.first().map(|r| r.count), Some(4));
    // Marked again now: the quarter hour waits its 10 s, the minute does not.
    seq += 1;
    let e = crossing(seq, "cam-1", now + 61_000, "car", Direction::In, Some(50.0));
    store.insert_events("dev-a", &[e], now + 61_000).await.expect("insert");
    analytics.run_pass(now + 62_000).await.expect("pass");
    assert_eq!(rows(Resolution::QuarterHour).await.first().map(|r| r.count), Some(4));
    assert_eq!(rows(Resolution::Minute).await.iter().map(|r| r.count).sum::<u64>(), 5);
    analytics.run_pass(now + 71_000).await.expect("pass");
    assert_eq!(rows(Resolution::QuarterHour).await.first().map(|r| r.count), Some(5));
}
