//! One storage test suite, run against both backends: SQLite (a file in a temporary directory)
//! and PostgreSQL (a fresh database per test, created through the admin connection named by
//! `ITS_TEST_PG_URL` and dropped afterwards).

use its_testkit::server as common;

use std::sync::Arc;
use std::time::Instant;

use its_aggregator::store::{
    CameraPatch, CameraRef, DevicePatch, EventId, EventQuery, EventStore, Fleet, NewSnapshot, Scope, SnapshotLookup,
    StoreError, open_store,
};
use its_shared::event::{CameraHealth, ClassCount, Direction, ObjectRef, Phase};
use its_shared::wire::{Heartbeat, Hello};
use its_shared::{DeviceHealth, EventEnvelope, EventKind};

use common::{Backend, both_backends, run, with_database};

both_backends!(
    idempotent_insert,
    high_water_per_device,
    hello_upserts_the_device,
    health_is_recorded,
    query_filters,
    pagination_walks_every_event_once_in_order,
    pagination_with_filters_and_exact_pages,
    invalid_queries_are_refused,
    cursor_tampering_is_an_error,
    injection_looking_values_are_just_values,
    unicode_and_nul_strings,
    out_of_range_seq_stores_nothing,
    concurrent_overlapping_batches,
    event_json_public_form,
    snapshots_are_recorded_once_per_event,
    snapshot_lookup_tells_missing_event_from_missing_snapshot,
    event_filters_alone_and_combined,
    invalid_event_filters_are_refused,
    injection_looking_filter_values_match_nothing,
    site_filter_follows_device_and_camera_sites,
    scopes_limit_events_devices_and_cameras,
    sites_are_managed,
    device_patches,
    cameras_follow_hellos_and_patches,
    disabled_devices_are_listed,
    health_history_is_kept,
);

// ---------------------------------------------------------------------------------------------
// Fixtures

const T0: i64 = 1_700_000_000_000;

fn object(track_id: u64, label: &str) -> ObjectRef {
    ObjectRef { track_id, label: label.to_owned(), score: 0.75, bbox: [0.1, 0.2, 0.3, 0.4] }
}

/// A kind per `i % 5`, covering events with and without an object.
fn kind(i: u64) -> EventKind {
    match i % 5 {
        0 => EventKind::LineCrossing {
            line: "north".into(),
            object: object(i, "car"),
            direction: Direction::In,
            speed_kmh: Some(50.0),
        },
        1 => EventKind::ZoneEnter { zone: "junction".into(), object: object(i, "truck") },
        2 => EventKind::Congestion {
            zone: "junction".into(),
            phase: Phase::Started,
            occupancy: 7,
            mean_speed_kmh: None,
            queue_length_m: Some(30.0),
        },
        3 => EventKind::Counts {
            line: "north".into(),
            interval_s: 60,
            counts: vec![ClassCount { label: "car".into(), direction: Direction::Out, count: 3 }],
        },
        _ => EventKind::SpeedMeasurement { object: object(i, "car"), speed_kmh: 61.5, zone: None },
    }
}

fn ev(seq: u64, camera: &str, observed_at_ms: i64) -> EventEnvelope {
    EventEnvelope { seq, camera: camera.to_owned(), observed_at_ms, kind: kind(seq) }
}

fn batch(seqs: std::ops::RangeInclusive<u64>) -> Vec<EventEnvelope> {
    seqs.map(|s| ev(s, "cam-1", T0 + s as i64)).collect()
}

fn hello(version: &str, cameras: &[&str]) -> Hello {
    Hello {
        agent_version: version.to_owned(),
        model: "yolo11n".to_owned(),
        cameras: cameras.iter().map(|c| (*c).to_owned()).collect(),
        last_acked_seq: 0,
        last_assigned_seq: 0,
    }
}

/// Every event matching `q`, walking all pages.
async fn walk(store: &Arc<dyn EventStore>, mut q: EventQuery) -> Vec<its_aggregator::store::StoredEvent> {
    let mut all = Vec::new();
    for _ in 0..10_000 {
        let page = store.query_events(&q).await.expect("query page");
        all.extend(page.events);
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => return all,
        }
    }
    panic!("pagination did not terminate");
}

// ---------------------------------------------------------------------------------------------
// Tests

async fn idempotent_insert(store: Arc<dyn EventStore>) {
    let b = batch(1..=100);
    let first = store.insert_events("dev-a", &b, T0).await.expect("insert");
    assert_eq!((first.inserted, first.duplicates), (100, 0));
    let again = store.insert_events("dev-a", &b, T0 + 1).await.expect("insert again");
    assert_eq!((again.inserted, again.duplicates), (0, 100));
    let overlap = store.insert_events("dev-a", &batch(51..=150), T0 + 2).await.expect("overlap");
    assert_eq!((overlap.inserted, overlap.duplicates), (50, 50));
    let empty = store.insert_events("dev-a", &[], T0).await.expect("empty");
    assert_eq!((empty.inserted, empty.duplicates), (0, 0));

    let s = store.device_event_summary("dev-a").await.expect("summary");
    assert_eq!((s.total, s.distinct_seqs, s.min_seq, s.max_seq), (150, 150, Some(1), Some(150)));
    let seqs = store.device_seqs("dev-a").await.expect("seqs");
    assert_eq!(seqs, (1..=150).collect::<Vec<u64>>());

    // The first copy wins: a resend does not change ingested_at.
    let page = store
        .query_events(&EventQuery { device: Some("dev-a".into()), limit: Some(1000), ..Default::default() })
        .await
        .expect("query");
    assert!(page.events.iter().filter(|e| e.seq <= 50).all(|e| e.ingested_at_ms == T0));

    // The same seq on another device is another event.
    let other = store.insert_events("dev-b", &batch(1..=10), T0).await.expect("other device");
    assert_eq!(other.inserted, 10);
    let empty = store.device_event_summary("nobody").await.expect("summary");
    assert_eq!((empty.total, empty.min_seq, empty.max_seq), (0, None, None));
    assert!(store.device_seqs("nobody").await.expect("seqs").is_empty());
}

async fn high_water_per_device(store: Arc<dyn EventStore>) {
    assert_eq!(store.high_water("dev-a").await.expect("hw"), 0);
    store.insert_events("dev-a", &batch(1..=10), T0).await.expect("insert");
    assert_eq!(store.high_water("dev-a").await.expect("hw"), 10);
    assert_eq!(store.high_water("dev-b").await.expect("hw"), 0);
    // A gap (evicted on the device) still moves the mark to the highest stored seq.
    store.insert_events("dev-a", &batch(20..=25), T0).await.expect("insert");
    assert_eq!(store.high_water("dev-a").await.expect("hw"), 25);
    store.insert_events("dev-b", &batch(1..=3), T0).await.expect("insert");
    assert_eq!(store.high_water("dev-b").await.expect("hw"), 3);
    assert_eq!(store.high_water("dev-a").await.expect("hw"), 25);
}

async fn hello_upserts_the_device(store: Arc<dyn EventStore>) {
    assert!(store.list_devices().await.expect("list").is_empty());
    let hw = store.record_hello("dev-a", &hello("1.0.0", &["cam-1"]), T0).await.expect("hello");
    assert_eq!(hw, 0);
    store.insert_events("dev-a", &batch(1..=42), T0 + 10).await.expect("insert");
    let hw = store.record_hello("dev-a", &hello("1.1.0", &["cam-1", "cam-2"]), T0 + 1000).await.expect("hello again");
    assert_eq!(hw, 42);
    store.record_hello("dev-b", &hello("0.9.0", &[]), T0 + 500).await.expect("hello b");

    let devices = store.list_devices().await.expect("list");
    assert_eq!(devices.len(), 2);
    let a = &devices[0];
    assert_eq!(a.device_id, "dev-a");
    assert_eq!(a.first_seen_ms, T0);
    assert_eq!(a.last_seen_ms, T0 + 1000);
    assert_eq!(a.agent_version, "1.1.0");
    assert_eq!(a.model, "yolo11n");
    assert_eq!(a.cameras, vec!["cam-1".to_owned(), "cam-2".to_owned()]);
    assert_eq!(a.high_water_seq, 42);
    assert_eq!(a.last_health, None);
    assert_eq!(a.last_health_ms, None);
    let b = &devices[1];
    assert_eq!((b.device_id.as_str(), b.high_water_seq, b.cameras.len()), ("dev-b", 0, 0));
}

async fn health_is_recorded(store: Arc<dyn EventStore>) {
    store.record_hello("dev-a", &hello("1.0.0", &["cam-1"]), T0).await.expect("hello");
    let health = DeviceHealth {
        agent_version: "1.0.0".into(),
        uptime_s: 3600,
        produced_total: 1000,
        outbox_events: 12,
        acked_seq: 988,
        cameras: vec![CameraHealth {
            camera: "cam-1".into(),
            state: "streaming".into(),
            fps: 14.5,
            reconnects: 2,
            ..CameraHealth::default()
        }],
        temperature_c: Some(61.25),
        ..Default::default()
    };
    let hb = Heartbeat { sent_at_ms: T0 + 100, health: health.clone() };
    store.record_health("dev-a", &hb, T0 + 200).await.expect("health");
    // A heartbeat from a device never seen creates its row.
    store.record_health("dev-z", &hb, T0 + 300).await.expect("health of unknown device");

    let devices = store.list_devices().await.expect("list");
    let a = devices.iter().find(|d| d.device_id == "dev-a").expect("dev-a");
    assert_eq!(a.last_health.as_ref(), Some(&health));
    assert_eq!(a.last_health_ms, Some(T0 + 200));
    assert_eq!((a.first_seen_ms, a.last_seen_ms), (T0, T0 + 200));
    assert_eq!((a.model.as_str(), a.cameras.len()), ("yolo11n", 1));
    let z = devices.iter().find(|d| d.device_id == "dev-z").expect("dev-z");
    assert_eq!((z.first_seen_ms, z.last_health_ms), (T0 + 300, Some(T0 + 300)));
    assert_eq!(z.cameras, vec!["cam-1".to_owned()]);

    // A later heartbeat replaces the report.
    let newer = Heartbeat { sent_at_ms: T0 + 900, health: DeviceHealth { uptime_s: 3700, ..health.clone() } };
    store.record_health("dev-a", &newer, T0 + 1000).await.expect("health");
    let devices = store.list_devices().await.expect("list");
    let a = devices.iter().find(|d| d.device_id == "dev-a").expect("dev-a");
    assert_eq!(a.last_health.as_ref().map(|h| h.uptime_s), Some(3700));
}

/// dev-a: 60 events on cam-1/cam-2 alternating; dev-b: 40 events on cam-1. Times interleave.
async fn seed_two_devices(store: &Arc<dyn EventStore>) {
    let a: Vec<_> =
        (1..=60u64).map(|s| ev(s, if s.is_multiple_of(2) { "cam-2" } else { "cam-1" }, T0 + (s as i64) * 10)).collect();
    let b: Vec<_> = (1..=40u64).map(|s| ev(s, "cam-1", T0 + (s as i64) * 10 + 5)).collect();
    store.insert_events("dev-a", &a, T0).await.expect("insert a");
    store.insert_events("dev-b", &b, T0).await.expect("insert b");
}

async fn query_filters(store: Arc<dyn EventStore>) {
    seed_two_devices(&store).await;
    let q = |f: fn(&mut EventQuery)| {
        let mut q = EventQuery { limit: Some(1000), ..Default::default() };
        f(&mut q);
        q
    };
    let all = store.query_events(&q(|_| {})).await.expect("all");
    assert_eq!(all.events.len(), 100);
    assert!(all.next_cursor.is_none());
    assert!(all.events.windows(2).all(|w| w[0].observed_at_ms >= w[1].observed_at_ms));

    let by_dev = store.query_events(&q(|q| q.device = Some("dev-a".into()))).await.expect("device");
    assert_eq!(by_dev.events.len(), 60);
    assert!(by_dev.events.iter().all(|e| e.device_id == "dev-a"));

    let by_cam = store.query_events(&q(|q| q.camera = Some("cam-2".into()))).await.expect("camera");
    assert_eq!(by_cam.events.len(), 30);

    let dev_cam = store
        .query_events(&q(|q| {
            q.device = Some("dev-b".into());
            q.camera = Some("cam-1".into());
        }))
        .await
        .expect("device+camera");
    assert_eq!(dev_cam.events.len(), 40);

    // kind(i) is line_crossing for seq % 5 == 0: 12 on dev-a, 8 on dev-b.
    let by_kind = store.query_events(&q(|q| q.kind = Some("line_crossing".into()))).await.expect("kind");
    assert_eq!(by_kind.events.len(), 20);
    assert!(by_kind.events.iter().all(|e| e.kind == "line_crossing" && e.label.as_deref() == Some("car")));
    let counts = store.query_events(&q(|q| q.kind = Some("counts".into()))).await.expect("kind");
    assert!(counts.events.iter().all(|e| e.label.is_none()));
    let none = store.query_events(&q(|q| q.kind = Some("wrong_way".into()))).await.expect("kind");
    assert!(none.events.is_empty());

    // from inclusive, to exclusive. dev-a times: T0+10..=T0+600 step 10.
    let window = store
        .query_events(&q(|q| {
            q.device = Some("dev-a".into());
            q.from_ms = Some(T0 + 100);
            q.to_ms = Some(T0 + 200);
        }))
        .await
        .expect("window");
    let seqs: Vec<u64> = window.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (10..20).rev().collect::<Vec<u64>>());
    let from_only = store.query_events(&q(|q| q.from_ms = Some(T0 + 595))).await.expect("from");
    assert_eq!(from_only.events.len(), 1);
    let empty_window = store
        .query_events(&q(|q| {
            q.from_ms = Some(T0 + 100);
            q.to_ms = Some(T0 + 100);
        }))
        .await
        .expect("empty window");
    assert!(empty_window.events.is_empty());

    let unknown = store.query_events(&q(|q| q.device = Some("dev-x".into()))).await.expect("unknown");
    assert!(unknown.events.is_empty() && unknown.next_cursor.is_none());
}

async fn pagination_walks_every_event_once_in_order(store: Arc<dyn EventStore>) {
    // 1,037 events in batches, with many identical timestamps (ties broken by storage order).
    let events: Vec<_> = (1..=1037u64).map(|s| ev(s, "cam-1", T0 + (s as i64 / 7))).collect();
    for chunk in events.chunks(250) {
        store.insert_events("dev-a", chunk, T0).await.expect("insert");
    }
    let got = walk(&store, EventQuery { limit: Some(100), ..Default::default() }).await;
    assert_eq!(got.len(), 1037);
    let mut seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
    // Newest first; within one timestamp, the later-stored row first.
    assert!(
        got.windows(2).all(|w| (w[0].observed_at_ms, w[0].row_id) > (w[1].observed_at_ms, w[1].row_id)),
        "not strictly ordered"
    );
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs, (1..=1037).collect::<Vec<u64>>());
    // Default page size.
    let first = store.query_events(&EventQuery::default()).await.expect("default page");
    assert_eq!(first.events.len(), 100);
    assert!(first.next_cursor.is_some());
}

async fn pagination_with_filters_and_exact_pages(store: Arc<dyn EventStore>) {
    seed_two_devices(&store).await;
    // 60 events of dev-a in pages of 20: exactly three pages, no empty fourth.
    let mut q = EventQuery { device: Some("dev-a".into()), limit: Some(20), ..Default::default() };
    let mut pages = 0;
    let mut seen = Vec::new();
    loop {
        let page = store.query_events(&q).await.expect("page");
        pages += 1;
        assert_eq!(page.events.len(), 20);
        seen.extend(page.events.iter().map(|e| e.seq));
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, (1..=60).rev().collect::<Vec<u64>>());

    // Filters with a window and limit 1.
    let got = walk(
        &store,
        EventQuery {
            camera: Some("cam-1".into()),
            from_ms: Some(T0 + 100),
            to_ms: Some(T0 + 300),
            limit: Some(1),
            ..Default::default()
        },
    )
    .await;
    // dev-a odd seqs 11..=29 (10) and dev-b seqs 10..=29 (times +5: 105..=295, 20).
    assert_eq!(got.len(), 30);
    assert!(got.iter().all(|e| e.camera == "cam-1"));
}

async fn invalid_queries_are_refused(store: Arc<dyn EventStore>) {
    let cases = [
        EventQuery { kind: Some("car".into()), ..Default::default() },
        EventQuery { kind: Some("LINE_CROSSING".into()), ..Default::default() },
        EventQuery { kind: Some("' OR 1=1 --".into()), ..Default::default() },
        EventQuery { limit: Some(0), ..Default::default() },
        EventQuery { limit: Some(1001), ..Default::default() },
        EventQuery { from_ms: Some(10), to_ms: Some(9), ..Default::default() },
    ];
    for q in cases {
        match store.query_events(&q).await {
            Err(StoreError::InvalidQuery(_)) => {}
            other => panic!("{q:?}: expected InvalidQuery, got {other:?}"),
        }
    }
    for limit in [1, 1000] {
        store
            .query_events(&EventQuery { limit: Some(limit), ..Default::default() })
            .await
            .expect("limit at the bounds");
    }
}

async fn cursor_tampering_is_an_error(store: Arc<dyn EventStore>) {
    store.insert_events("dev-a", &batch(1..=30), T0).await.expect("insert");
    let page = store.query_events(&EventQuery { limit: Some(10), ..Default::default() }).await.expect("page");
    let cursor = page.next_cursor.expect("cursor");
    // The genuine cursor works.
    store
        .query_events(&EventQuery { limit: Some(10), cursor: Some(cursor.clone()), ..Default::default() })
        .await
        .expect("genuine cursor");

    let mut tampered = vec![
        "".to_owned(),
        "not base64!".to_owned(),
        format!("{cursor}A"),
        cursor.chars().rev().collect::<String>(),
        "A".repeat(10_000),
        "' OR 1=1 --".to_owned(),
        "MTo".to_owned(),                             // "1:"
        "eDox".to_owned(),                            // "x:1"
        "MToyOjM".to_owned(),                         // "1:2:3"
        "MTow".to_owned(),                            // "1:0"
        "LTE6LTE".to_owned(),                         // "-1:-1"
        "OTk5OTk5OTk5OTk5OTk5OTk5OTk5OjE".to_owned(), // i64 overflow
    ];
    tampered.push(format!("*{}", &cursor[1..]));
    tampered.push(cursor[..cursor.len() - 1].to_owned());
    for bad in tampered {
        let result = store.query_events(&EventQuery { cursor: Some(bad.clone()), ..Default::default() }).await;
        assert!(
            matches!(result, Err(StoreError::BadCursor)),
            "{bad:?}: expected BadCursor, got {:?}",
            result.map(|p| p.events.len())
        );
    }
}

async fn injection_looking_values_are_just_values(store: Arc<dyn EventStore>) {
    let evil_cam = "cam'); DROP TABLE events; --";
    let evil_dev = "dev\" OR \"1\"=\"1";
    store.insert_events(evil_dev, &[ev(1, evil_cam, T0), ev(2, "cam-1", T0 + 1)], T0).await.expect("insert");
    store.record_hello(evil_dev, &hello("1'; --", &[evil_cam]), T0).await.expect("hello");
    for v in ["' OR '1'='1", "' OR 1=1 --", "\"; DROP TABLE events; --", "%", "_", "*", "\\"] {
        for q in [
            EventQuery { device: Some(v.into()), ..Default::default() },
            EventQuery { camera: Some(v.into()), ..Default::default() },
        ] {
            let page = store.query_events(&q).await.expect("injection-looking filter is a value");
            assert!(page.events.is_empty(), "{q:?} matched {:?}", page.events);
        }
    }
    let page = store
        .query_events(&EventQuery {
            device: Some(evil_dev.into()),
            camera: Some(evil_cam.into()),
            ..Default::default()
        })
        .await
        .expect("exact match");
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.events[0].camera, evil_cam);
    let devices = store.list_devices().await.expect("list");
    assert_eq!(devices[0].device_id, evil_dev);
    assert_eq!(devices[0].agent_version, "1'; --");
    assert_eq!(store.device_event_summary(evil_dev).await.expect("summary").total, 2);
}

async fn unicode_and_nul_strings(store: Arc<dyn EventStore>) {
    let cams = ["Kamera Süd – Ausfahrt", "東京-交差点-1", "🚗🚦", "caméra\u{202e}rtl"];
    let events: Vec<_> = cams.iter().enumerate().map(|(i, c)| ev(i as u64 + 1, c, T0 + i as i64)).collect();
    store.insert_events("gerät-ü", &events, T0).await.expect("insert unicode");
    store.record_hello("gerät-ü", &hello("1.0.0", &cams), T0).await.expect("hello");
    for cam in cams {
        let page = store
            .query_events(&EventQuery { camera: Some(cam.into()), ..Default::default() })
            .await
            .expect("query unicode");
        assert_eq!(page.events.len(), 1, "{cam}");
        assert_eq!(page.events[0].camera, cam);
        assert_eq!(page.events[0].device_id, "gerät-ü");
    }
    let devices = store.list_devices().await.expect("list");
    assert_eq!(devices[0].cameras, cams.iter().map(|c| (*c).to_owned()).collect::<Vec<_>>());

    // NUL in device-provided strings never fails a batch (PostgreSQL cannot store it: replaced).
    let nul = EventEnvelope {
        seq: 10,
        camera: "cam\0x".into(),
        observed_at_ms: T0,
        kind: EventKind::ZoneEnter { zone: "z\0".into(), object: object(1, "c\0r") },
    };
    let out = store.insert_events("gerät-ü", &[nul], T0).await.expect("insert with NUL");
    assert_eq!(out.inserted, 1);
    let hb = Heartbeat { sent_at_ms: T0, health: DeviceHealth { agent_version: "1\0".into(), ..Default::default() } };
    store.record_health("gerät-ü", &hb, T0).await.expect("health with NUL");
    let page = store
        .query_events(&EventQuery { camera: Some("cam\0x".into()), ..Default::default() })
        .await
        .expect("query with NUL is a value");
    assert!(page.events.len() <= 1);
    assert_eq!(store.high_water("gerät-ü").await.expect("hw"), 10);
}

async fn out_of_range_seq_stores_nothing(store: Arc<dyn EventStore>) {
    let mut b = batch(1..=5);
    b.push(ev(u64::MAX, "cam-1", T0));
    match store.insert_events("dev-a", &b, T0).await {
        Err(StoreError::InvalidData(_)) => {}
        other => panic!("expected InvalidData, got {other:?}"),
    }
    assert_eq!(store.device_event_summary("dev-a").await.expect("summary").total, 0);
    let max = i64::MAX as u64;
    let out = store.insert_events("dev-a", &[ev(max, "cam-1", T0)], T0).await.expect("i64::MAX");
    assert_eq!(out.inserted, 1);
    assert_eq!(store.high_water("dev-a").await.expect("hw"), max);
}

async fn concurrent_overlapping_batches(store: Arc<dyn EventStore>) {
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut inserted = 0;
            // Each task covers 1..=3000 in its own order of 500-event batches.
            for i in 0..6u64 {
                let k = (i + t) % 6;
                let out = store
                    .insert_events("dev-a", &batch(k * 500 + 1..=k * 500 + 500), T0)
                    .await
                    .expect("concurrent insert");
                assert_eq!(out.inserted + out.duplicates, 500);
                inserted += out.inserted;
            }
            inserted
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    assert_eq!(total, 3000);
    let s = store.device_event_summary("dev-a").await.expect("summary");
    assert_eq!((s.total, s.distinct_seqs, s.max_seq), (3000, 3000, Some(3000)));
}

async fn event_json_public_form(store: Arc<dyn EventStore>) {
    store.insert_events("dev-a", &[ev(5, "cam-1", T0 + 123)], T0 + 999).await.expect("insert");
    let page = store.query_events(&EventQuery::default()).await.expect("query");
    let v = serde_json::to_value(&page.events[0]).expect("json");
    assert_eq!(v["id"], "dev-a:5");
    assert_eq!(v["device_id"], "dev-a");
    assert_eq!(v["seq"], 5);
    assert_eq!(v["camera"], "cam-1");
    assert_eq!(v["kind"], "line_crossing");
    assert_eq!(v["label"], "car");
    assert_eq!(v["@timestamp"], "2023-11-14T22:13:20.123Z");
    assert_eq!(v["observed_at_ms"], T0 + 123);
    assert_eq!(v["ingested_at_ms"], T0 + 999);
    // f32 fields in their shortest form (0.1, not 0.10000000149011612).
    assert_eq!(
        v["payload"],
        serde_json::json!({
            "line": "north",
            "object": {"track_id": 5, "label": "car", "score": 0.75, "box": [0.1, 0.2, 0.3, 0.4]},
            "direction": "in",
            "speed_kmh": 50.0
        })
    );
    assert!(v.get("row_id").is_none());
    let page_json = serde_json::to_value(&page).expect("page json");
    assert!(page_json["next_cursor"].is_null());
}

fn snap<'a>(seq: u64, full_key: &'a str, crop: Option<(&'a str, u64)>) -> NewSnapshot<'a> {
    NewSnapshot { seq, camera: "cam-1", taken_at_ms: T0 + 5, full_key, full_bytes: 12_345, crop }
}

fn id(device: &str, seq: u64) -> EventId {
    EventId { device_id: device.to_owned(), seq }
}

async fn snapshots_are_recorded_once_per_event(store: Arc<dyn EventStore>) {
    assert!(!store.has_snapshot("dev-a", 5).await.expect("has"));
    let first = snap(5, "snapshots/dev-a/5.jpg", Some(("snapshots/dev-a/5-crop.jpg", 678)));
    assert!(store.record_snapshot("dev-a", &first, T0 + 10).await.expect("record"));
    // Again (an upload repeated by the agent): nothing changes, reported as not inserted.
    let again = snap(5, "elsewhere.jpg", None);
    assert!(!store.record_snapshot("dev-a", &again, T0 + 20).await.expect("record again"));
    assert!(store.has_snapshot("dev-a", 5).await.expect("has"));
    assert!(!store.has_snapshot("dev-b", 5).await.expect("other device"));
    assert!(!store.has_snapshot("dev-a", 6).await.expect("other seq"));
    store.insert_events("dev-a", &[ev(5, "cam-1", T0)], T0).await.expect("insert");
    let SnapshotLookup::Found(rec) = store.snapshot_for_event(&id("dev-a", 5)).await.expect("lookup") else {
        panic!("snapshot not found");
    };
    assert_eq!((rec.device_id.as_str(), rec.seq, rec.camera.as_str()), ("dev-a", 5, "cam-1"));
    assert_eq!((rec.taken_at_ms, rec.stored_at_ms), (T0 + 5, T0 + 10));
    assert_eq!((rec.full_key.as_str(), rec.full_bytes), ("snapshots/dev-a/5.jpg", 12_345));
    assert_eq!((rec.crop_key.as_deref(), rec.crop_bytes), (Some("snapshots/dev-a/5-crop.jpg"), Some(678)));
    // A sequence number no database can hold is refused, not wrapped.
    let huge = snap(u64::MAX, "k", None);
    assert!(matches!(store.record_snapshot("dev-a", &huge, T0).await, Err(StoreError::InvalidData(_))));
    // Text the device chose is stored as text (NUL replaced on PostgreSQL, as for events).
    let odd = NewSnapshot { camera: "Tür-Süd \u{0} '; DROP TABLE snapshots; --", ..snap(7, "k7", None) };
    assert!(store.record_snapshot("dev-a", &odd, T0).await.expect("odd camera"));
    assert!(store.has_snapshot("dev-a", 7).await.expect("has"));
}

async fn snapshot_lookup_tells_missing_event_from_missing_snapshot(store: Arc<dyn EventStore>) {
    store.insert_events("dev-a", &batch(1..=4), T0).await.expect("insert");
    // Pictures that arrived for an event that is not stored (yet, or evicted on the agent).
    assert!(store.record_snapshot("dev-a", &snap(9, "k9", None), T0).await.expect("record"));
    assert!(store.record_snapshot("dev-a", &snap(2, "k2", None), T0).await.expect("record"));
    assert_eq!(store.snapshot_for_event(&id("dev-a", 9)).await.expect("lookup"), SnapshotLookup::NoEvent);
    assert_eq!(store.snapshot_for_event(&id("dev-b", 2)).await.expect("lookup"), SnapshotLookup::NoEvent);
    assert_eq!(store.snapshot_for_event(&id("dev-a", u64::MAX)).await.expect("lookup"), SnapshotLookup::NoEvent);
    assert_eq!(store.snapshot_for_event(&id("dev-a", 3)).await.expect("lookup"), SnapshotLookup::NoSnapshot);
    match store.snapshot_for_event(&id("dev-a", 2)).await.expect("lookup") {
        SnapshotLookup::Found(rec) => {
            assert_eq!((rec.full_key.as_str(), rec.crop_key, rec.crop_bytes), ("k2", None, None))
        }
        other => panic!("{other:?}"),
    }
    // The listing flags the events that have one; the event arriving after its pictures too.
    store.insert_events("dev-a", &[ev(9, "cam-1", T0 + 100)], T0).await.expect("insert 9");
    let page =
        store.query_events(&EventQuery { device: Some("dev-a".into()), ..EventQuery::default() }).await.expect("q");
    let flags: Vec<(u64, bool)> = page.events.iter().map(|e| (e.seq, e.has_snapshot)).collect();
    let mut flags = flags;
    flags.sort_unstable();
    assert_eq!(flags, vec![(1, false), (2, true), (3, false), (4, false), (9, true)]);
    let v = serde_json::to_value(page.events.iter().find(|e| e.seq == 2).expect("event 2")).expect("json");
    assert_eq!(v["has_snapshot"], true);
}

// ---------------------------------------------------------------------------------------------
// Event filters, sites, devices and cameras (the fleet)

fn fleet(store: &Arc<dyn EventStore>) -> Fleet {
    Fleet::new(store.db())
}

fn at(seq: u64, camera: &str, observed_at_ms: i64, kind: EventKind) -> EventEnvelope {
    EventEnvelope { seq, camera: camera.to_owned(), observed_at_ms, kind }
}

/// The ten kinds of one round of [`seed_filter_events`], by `seq % 10` (10 as 0).
fn filter_kind(i: u64) -> EventKind {
    match i % 10 {
        1 => EventKind::LineCrossing {
            line: "north".into(),
            object: object(i, "car"),
            direction: Direction::In,
            speed_kmh: Some(50.0),
        },
        2 => EventKind::LineCrossing {
            line: "north".into(),
            object: object(i, "truck"),
            direction: Direction::Out,
            speed_kmh: Some(80.3),
        },
        3 => EventKind::LineCrossing {
            line: "south".into(),
            object: object(i, "car"),
            direction: Direction::In,
            speed_kmh: None,
        },
        4 => EventKind::SpeedMeasurement { object: object(i, "car"), speed_kmh: 61.5, zone: Some("junction".into()) },
        5 => EventKind::SpeedMeasurement { object: object(i, "truck"), speed_kmh: 95.0, zone: None },
        6 => EventKind::ZoneEnter { zone: "junction".into(), object: object(i, "truck") },
        7 => EventKind::Congestion {
            zone: "junction".into(),
            phase: Phase::Started,
            occupancy: 9,
            mean_speed_kmh: Some(12.0),
            queue_length_m: None,
        },
        8 => EventKind::WrongWay {
            zone: "ramp".into(),
            object: object(i, "car"),
            distance_m: 20.0,
            speed_kmh: Some(30.0),
        },
        9 => EventKind::Counts {
            line: "north".into(),
            interval_s: 60,
            counts: vec![ClassCount { label: "car".into(), direction: Direction::In, count: 2 }],
        },
        _ => EventKind::ZoneOccupancy {
            zone: "junction".into(),
            interval_s: 60,
            mean: 1.5,
            max: 3,
            occupied: 0.5,
            entered: 4,
        },
    }
}

/// dev-a, cam-1: three rounds of the ten kinds (seqs 1..=30, one every 10 ms); snapshots of
/// seqs 1 and 6.
async fn seed_filter_events(store: &Arc<dyn EventStore>) {
    let events: Vec<_> = (1..=30u64).map(|s| at(s, "cam-1", T0 + s as i64 * 10, filter_kind(s))).collect();
    store.insert_events("dev-a", &events, T0).await.expect("insert");
    for seq in [1, 6] {
        let s = NewSnapshot { seq, camera: "cam-1", taken_at_ms: T0, full_key: "k", full_bytes: 1, crop: None };
        store.record_snapshot("dev-a", &s, T0).await.expect("snapshot");
    }
}

/// The seqs matching `q` (all pages of `limit`), newest first.
async fn seqs_of(store: &Arc<dyn EventStore>, q: &EventQuery, limit: u32) -> Vec<u64> {
    walk(store, EventQuery { limit: Some(limit), ..q.clone() }).await.iter().map(|e| e.seq).collect()
}

/// The seqs of the three rounds whose `seq % 10` (10 as 0) is in `residues`, newest first.
fn rounds(residues: &[u64]) -> Vec<u64> {
    (1..=30u64).rev().filter(|s| residues.contains(&(s % 10))).collect()
}

async fn event_filters_alone_and_combined(store: Arc<dyn EventStore>) {
    seed_filter_events(&store).await;
    let cases: Vec<(EventQuery, Vec<u64>)> = vec![
        (EventQuery { zone: Some("junction".into()), ..Default::default() }, rounds(&[4, 6, 7, 0])),
        (EventQuery { zone: Some("ramp".into()), ..Default::default() }, rounds(&[8])),
        (EventQuery { line: Some("north".into()), ..Default::default() }, rounds(&[1, 2, 9])),
        (EventQuery { line: Some("south".into()), ..Default::default() }, rounds(&[3])),
        (EventQuery { direction: Some("in".into()), ..Default::default() }, rounds(&[1, 3])),
        (EventQuery { direction: Some("out".into()), ..Default::default() }, rounds(&[2])),
        (EventQuery { label: Some("car".into()), ..Default::default() }, rounds(&[1, 3, 4, 8])),
        (EventQuery { label: Some("truck".into()), ..Default::default() }, rounds(&[2, 5, 6])),
        (EventQuery { min_speed_kmh: Some(60.0), ..Default::default() }, rounds(&[2, 4, 5])),
        (EventQuery { max_speed_kmh: Some(50.0), ..Default::default() }, rounds(&[1, 7, 8])),
        // Inclusive bounds, at the values the payload shows (80.3 as stored from an f32).
        (EventQuery { min_speed_kmh: Some(50.0), max_speed_kmh: Some(61.5), ..Default::default() }, rounds(&[1, 4])),
        (EventQuery { min_speed_kmh: Some(80.3), max_speed_kmh: Some(80.3), ..Default::default() }, rounds(&[2])),
        (EventQuery { has_snapshot: Some(true), ..Default::default() }, vec![6, 1]),
        (
            EventQuery { has_snapshot: Some(false), ..Default::default() },
            (1..=30u64).rev().filter(|s| ![1, 6].contains(s)).collect(),
        ),
        // Combined.
        (
            EventQuery {
                line: Some("north".into()),
                direction: Some("out".into()),
                label: Some("truck".into()),
                ..Default::default()
            },
            rounds(&[2]),
        ),
        (EventQuery { zone: Some("junction".into()), label: Some("truck".into()), ..Default::default() }, rounds(&[6])),
        (
            EventQuery { zone: Some("junction".into()), min_speed_kmh: Some(10.0), ..Default::default() },
            rounds(&[4, 7]),
        ),
        (EventQuery { label: Some("car".into()), max_speed_kmh: Some(55.0), ..Default::default() }, rounds(&[1, 8])),
        (
            EventQuery { kind: Some("congestion".into()), zone: Some("junction".into()), ..Default::default() },
            rounds(&[7]),
        ),
        (EventQuery { zone: Some("junction".into()), has_snapshot: Some(true), ..Default::default() }, vec![6]),
        (
            EventQuery {
                line: Some("north".into()),
                from_ms: Some(T0 + 100),
                to_ms: Some(T0 + 250),
                ..Default::default()
            },
            vec![22, 21, 19, 12, 11],
        ),
        (EventQuery { zone: Some("junction".into()), line: Some("north".into()), ..Default::default() }, vec![]),
        (EventQuery { zone: Some("nowhere".into()), ..Default::default() }, vec![]),
        (EventQuery { label: Some("bicycle".into()), ..Default::default() }, vec![]),
        (EventQuery { min_speed_kmh: Some(95.5), ..Default::default() }, vec![]),
    ];
    for (q, want) in cases {
        // One page, and walked in pages of 1 and 2: the same events in the same order.
        assert_eq!(seqs_of(&store, &q, 1000).await, want, "{q:?}");
        assert_eq!(seqs_of(&store, &q, 2).await, want, "{q:?} in pages of 2");
        assert_eq!(seqs_of(&store, &q, 1).await, want, "{q:?} in pages of 1");
    }
    // Page boundaries are exact: 12 junction events in pages of 4 are three full pages.
    let mut q = EventQuery { zone: Some("junction".into()), limit: Some(4), ..Default::default() };
    let mut pages = Vec::new();
    loop {
        let page = store.query_events(&q).await.expect("page");
        pages.push(page.events.len());
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(pages, vec![4, 4, 4]);
}

async fn invalid_event_filters_are_refused(store: Arc<dyn EventStore>) {
    let cases = [
        EventQuery { direction: Some("up".into()), ..Default::default() },
        EventQuery { direction: Some("IN".into()), ..Default::default() },
        EventQuery { direction: Some("' OR 1=1 --".into()), ..Default::default() },
        EventQuery { min_speed_kmh: Some(f64::NAN), ..Default::default() },
        EventQuery { max_speed_kmh: Some(f64::INFINITY), ..Default::default() },
        EventQuery { min_speed_kmh: Some(f64::NEG_INFINITY), ..Default::default() },
        EventQuery { min_speed_kmh: Some(60.0), max_speed_kmh: Some(50.0), ..Default::default() },
    ];
    for q in cases {
        match store.query_events(&q).await {
            Err(StoreError::InvalidQuery(_)) => {}
            other => panic!("{q:?}: expected InvalidQuery, got {other:?}"),
        }
    }
    store
        .query_events(&EventQuery { min_speed_kmh: Some(50.0), max_speed_kmh: Some(50.0), ..Default::default() })
        .await
        .expect("equal bounds");
}

async fn injection_looking_filter_values_match_nothing(store: Arc<dyn EventStore>) {
    seed_filter_events(&store).await;
    let evil_zone = "z'); DROP TABLE events; --";
    store.record_hello("dev-a", &hello("1", &["cam-1"]), T0).await.expect("hello");
    store
        .insert_events(
            "dev-a",
            &[at(100, "cam-1", T0, EventKind::ZoneEnter { zone: evil_zone.into(), object: object(1, "c'ar") })],
            T0,
        )
        .await
        .expect("insert");
    let values =
        ["' OR '1'='1", "' OR 1=1 --", "\"; DROP TABLE events; --", "%", "_", "*", "\\", "junction'--", "a\0b"];
    for v in values {
        let queries = [
            EventQuery { site: Some(v.into()), ..Default::default() },
            EventQuery { label: Some(v.into()), ..Default::default() },
            EventQuery { zone: Some(v.into()), ..Default::default() },
            EventQuery { line: Some(v.into()), ..Default::default() },
            EventQuery { scope: Scope::Limited { sites: vec![v.into()], cameras: vec![] }, ..Default::default() },
            EventQuery {
                scope: Scope::Limited {
                    sites: vec![],
                    cameras: vec![CameraRef { device_id: v.into(), camera: v.into() }],
                },
                ..Default::default()
            },
        ];
        for q in queries {
            let page = store.query_events(&q).await.expect("injection-looking filter is a value");
            assert!(page.events.is_empty(), "{q:?} matched {:?}", page.events);
        }
    }
    // The tables are intact and an exact value matches.
    let page =
        store.query_events(&EventQuery { zone: Some(evil_zone.into()), ..Default::default() }).await.expect("exact");
    assert_eq!(page.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![100]);
    let page =
        store.query_events(&EventQuery { label: Some("c'ar".into()), ..Default::default() }).await.expect("exact");
    assert_eq!(page.events.len(), 1);
    assert_eq!(store.device_event_summary("dev-a").await.expect("summary").total, 31);
    // Fleet lookups with such values are not found, never errors.
    let f = fleet(&store);
    for v in values {
        assert!(matches!(f.get_device(v, &Scope::All).await, Err(StoreError::NotFound(_))), "{v:?}");
        assert!(matches!(f.get_site(v).await, Err(StoreError::NotFound(_))), "{v:?}");
        assert!(f.list_cameras(&Scope::All, Some(v), None).await.expect("cameras").is_empty());
        assert!(f.list_cameras(&Scope::All, None, Some(v)).await.expect("cameras").is_empty());
        assert!(!f.is_device_disabled(v).await.expect("disabled"));
        let site = DevicePatch { site_id: Some(Some(v.into())), ..Default::default() };
        assert!(
            matches!(
                f.update_device("dev-a", &site, &its_aggregator::store::Scope::All, T0).await,
                Err(StoreError::InvalidQuery(_))
            ),
            "{v:?}"
        );
    }
}

/// Sites north and south; dev-a (cam-1, cam-2) in north with cam-2 overridden to south; dev-b
/// (cam-1) without a site. Events: dev-a cam-1 seqs 1..=4, cam-2 5..=8, cam-9 (never announced)
/// 9; dev-b cam-1 1..=3.
async fn seed_sites(store: &Arc<dyn EventStore>) -> Fleet {
    let f = fleet(store);
    f.create_site("north", "North junction", T0).await.expect("site");
    f.create_site("south", "South junction", T0).await.expect("site");
    store.record_hello("dev-a", &hello("1.0.0", &["cam-1", "cam-2"]), T0).await.expect("hello");
    store.record_hello("dev-b", &hello("1.0.0", &["cam-1"]), T0).await.expect("hello");
    let north = DevicePatch { site_id: Some(Some("north".into())), ..Default::default() };
    f.update_device("dev-a", &north, &its_aggregator::store::Scope::All, T0).await.expect("assign");
    let south = CameraPatch { site_id: Some(Some("south".into())), ..Default::default() };
    f.update_camera("dev-a", "cam-2", &south, &its_aggregator::store::Scope::All).await.expect("override");
    let camera = |s: u64| match s {
        1..=4 => "cam-1",
        5..=8 => "cam-2",
        _ => "cam-9",
    };
    let a: Vec<_> = (1..=9u64).map(|s| ev(s, camera(s), T0 + s as i64 * 10)).collect();
    store.insert_events("dev-a", &a, T0).await.expect("insert a");
    let b: Vec<_> = (1..=3u64).map(|s| ev(s, "cam-1", T0 + s as i64 * 10 + 5)).collect();
    store.insert_events("dev-b", &b, T0).await.expect("insert b");
    f
}

/// `(device, seq)` of every event matching `q`, newest first, walked in pages of 2.
async fn ids_of(store: &Arc<dyn EventStore>, q: EventQuery) -> Vec<(String, u64)> {
    walk(store, EventQuery { limit: Some(2), ..q }).await.into_iter().map(|e| (e.device_id, e.seq)).collect()
}

fn ids(device: &str, seqs: &[u64]) -> Vec<(String, u64)> {
    seqs.iter().map(|s| (device.to_owned(), *s)).collect()
}

async fn site_filter_follows_device_and_camera_sites(store: Arc<dyn EventStore>) {
    let f = seed_sites(&store).await;
    let site = |s: &str| EventQuery { site: Some(s.into()), ..Default::default() };
    assert_eq!(ids_of(&store, site("north")).await, ids("dev-a", &[4, 3, 2, 1]));
    assert_eq!(ids_of(&store, site("south")).await, ids("dev-a", &[8, 7, 6, 5]));
    assert!(ids_of(&store, site("west")).await.is_empty());
    // With other filters.
    let q = EventQuery { kind: Some("line_crossing".into()), ..site("south") };
    assert_eq!(ids_of(&store, q).await, ids("dev-a", &[5]));

    // dev-b joins south: its events follow.
    let to = |s: Option<&str>| DevicePatch { site_id: Some(s.map(str::to_owned)), ..Default::default() };
    f.update_device("dev-b", &to(Some("south")), &its_aggregator::store::Scope::All, T0).await.expect("assign b");
    let south = ids_of(&store, site("south")).await;
    assert_eq!(south.len(), 7);
    assert!(south.windows(2).all(|w| w[0] != w[1]));
    // dev-a moves to south: cam-1 follows, cam-2 keeps its own site (south as well).
    f.update_device("dev-a", &to(Some("south")), &its_aggregator::store::Scope::All, T0).await.expect("move a");
    assert!(ids_of(&store, site("north")).await.is_empty());
    assert_eq!(ids_of(&store, site("south")).await.len(), 11);
    // cam-2 follows its device again, dev-a moves back north: both cameras are north.
    f.update_camera(
        "dev-a",
        "cam-2",
        &CameraPatch { site_id: Some(None), ..Default::default() },
        &its_aggregator::store::Scope::All,
    )
    .await
    .expect("clear");
    f.update_device("dev-a", &to(Some("north")), &its_aggregator::store::Scope::All, T0).await.expect("back");
    assert_eq!(ids_of(&store, site("north")).await, ids("dev-a", &[8, 7, 6, 5, 4, 3, 2, 1]));
    // Unassigned: no site.
    f.update_device("dev-a", &to(None), &its_aggregator::store::Scope::All, T0).await.expect("unassign");
    assert!(ids_of(&store, site("north")).await.is_empty());
    let cams = f.list_cameras(&Scope::All, Some("dev-a"), None).await.expect("cameras");
    assert!(cams.iter().all(|c| c.site_id.is_none() && c.site_override.is_none()), "{cams:?}");
}

async fn scopes_limit_events_devices_and_cameras(store: Arc<dyn EventStore>) {
    let f = seed_sites(&store).await;
    let scoped = |scope: Scope| EventQuery { scope, ..Default::default() };
    let limited = |sites: &[&str], cameras: &[&str]| Scope::Limited {
        sites: sites.iter().map(|s| (*s).to_owned()).collect(),
        cameras: cameras.iter().map(|c| CameraRef::parse(c).expect("camera ref")).collect(),
    };
    assert_eq!(ids_of(&store, scoped(Scope::All)).await.len(), 12);
    assert_eq!(ids_of(&store, scoped(limited(&["north"], &[]))).await, ids("dev-a", &[4, 3, 2, 1]));
    assert_eq!(ids_of(&store, scoped(limited(&[], &["dev-b/cam-1"]))).await, ids("dev-b", &[3, 2, 1]));
    // A granted camera needs no row (cam-9 was never announced).
    assert_eq!(ids_of(&store, scoped(limited(&[], &["dev-a/cam-9"]))).await, ids("dev-a", &[9]));
    // Sites and cameras together: the union; with a filter: the intersection.
    let both = limited(&["south"], &["dev-b/cam-1"]);
    let got = ids_of(&store, scoped(both.clone())).await;
    let mut want = ids("dev-a", &[8, 7, 6, 5]);
    want.extend(ids("dev-b", &[3, 2, 1]));
    let mut sorted = got.clone();
    sorted.sort();
    want.sort();
    assert_eq!(sorted, want);
    let q = EventQuery { device: Some("dev-b".into()), ..scoped(both.clone()) };
    assert_eq!(ids_of(&store, q).await, ids("dev-b", &[3, 2, 1]));
    let q = EventQuery { site: Some("north".into()), ..scoped(both.clone()) };
    assert!(ids_of(&store, q).await.is_empty());
    // Nothing granted: nothing, whatever the filters.
    let empty = limited(&[], &[]);
    assert!(ids_of(&store, scoped(empty.clone())).await.is_empty());
    let q = EventQuery { device: Some("dev-a".into()), site: Some("north".into()), ..scoped(empty.clone()) };
    assert!(ids_of(&store, q).await.is_empty());
    assert!(ids_of(&store, scoped(limited(&["west"], &["dev-c/cam-1"]))).await.is_empty());

    // Single events.
    let north = limited(&["north"], &[]);
    assert!(f.event_visible(&id("dev-a", 1), &north).await.expect("visible"));
    assert!(!f.event_visible(&id("dev-a", 5), &north).await.expect("other site"));
    assert!(!f.event_visible(&id("dev-b", 1), &north).await.expect("other device"));
    assert!(!f.event_visible(&id("dev-a", 99), &Scope::All).await.expect("missing"));
    assert!(!f.event_visible(&id("dev-a", u64::MAX), &Scope::All).await.expect("huge"));
    assert!(f.event_visible(&id("dev-b", 1), &Scope::All).await.expect("all"));
    assert!(f.event_visible(&id("dev-a", 9), &limited(&[], &["dev-a/cam-9"])).await.expect("granted camera"));
    assert!(!f.event_visible(&id("dev-a", 1), &empty).await.expect("empty"));

    // Devices: seen through at least one camera, with only those cameras.
    let devices = f.list_devices(&Scope::All).await.expect("all devices");
    assert_eq!(devices.iter().map(|d| d.device_id.as_str()).collect::<Vec<_>>(), vec!["dev-a", "dev-b"]);
    assert_eq!(devices[0].cameras.len(), 2);
    let devices = f.list_devices(&north).await.expect("north devices");
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].device_id, "dev-a");
    assert_eq!(devices[0].cameras.iter().map(|c| c.camera.as_str()).collect::<Vec<_>>(), vec!["cam-1"]);
    let devices = f.list_devices(&limited(&[], &["dev-b/cam-1"])).await.expect("granted devices");
    assert_eq!(devices.iter().map(|d| d.device_id.as_str()).collect::<Vec<_>>(), vec!["dev-b"]);
    assert!(f.list_devices(&empty).await.expect("none").is_empty());
    assert_eq!(f.get_device("dev-a", &north).await.expect("visible device").cameras.len(), 1);
    for (device, scope) in [("dev-b", &north), ("dev-a", &empty), ("dev-x", &Scope::All)] {
        assert!(matches!(f.get_device(device, scope).await, Err(StoreError::NotFound(_))), "{device} {scope:?}");
    }
    // Cameras.
    let cams = f.list_cameras(&both, None, None).await.expect("cameras");
    let names: Vec<_> = cams.iter().map(|c| format!("{}/{}", c.device_id, c.camera)).collect();
    assert_eq!(names, vec!["dev-a/cam-2", "dev-b/cam-1"]);
    assert_eq!(f.list_cameras(&Scope::All, None, Some("south")).await.expect("south").len(), 1);
    assert_eq!(f.list_cameras(&Scope::All, Some("dev-a"), Some("north")).await.expect("a north").len(), 1);
    assert!(f.list_cameras(&empty, None, None).await.expect("none").is_empty());
    assert!(matches!(f.get_camera("dev-a", "cam-1", &both).await, Err(StoreError::NotFound(_))));
    assert_eq!(f.get_camera("dev-a", "cam-2", &both).await.expect("visible camera").site_id.as_deref(), Some("south"));
}

async fn sites_are_managed(store: Arc<dyn EventStore>) {
    let f = fleet(&store);
    assert!(f.list_sites().await.expect("none").is_empty());
    let s = f.create_site("north-1", "  North junction ", T0).await.expect("create");
    assert_eq!((s.site_id.as_str(), s.name.as_str(), s.created_at_ms), ("north-1", "North junction", T0));
    assert!(matches!(f.create_site("north-1", "Again", T0 + 1).await, Err(StoreError::Conflict(_))));
    for bad in ["", "a b", "a/b", "x'--", &"x".repeat(65), "é"] {
        assert!(matches!(f.create_site(bad, "Name", T0).await, Err(StoreError::InvalidQuery(_))), "{bad:?}");
    }
    for bad in ["", "   ", "a\nb"] {
        assert!(matches!(f.create_site("s2", bad, T0).await, Err(StoreError::InvalidQuery(_))), "{bad:?}");
    }
    f.create_site("a.site_2", "Second", T0 + 5).await.expect("second");
    let sites = f.list_sites().await.expect("list");
    assert_eq!(sites.iter().map(|s| s.site_id.as_str()).collect::<Vec<_>>(), vec!["a.site_2", "north-1"]);
    let renamed = f.rename_site("north-1", "North").await.expect("rename");
    assert_eq!((renamed.name.as_str(), renamed.created_at_ms), ("North", T0));
    assert!(matches!(f.rename_site("nope", "X").await, Err(StoreError::NotFound(_))));
    assert!(matches!(f.rename_site("north-1", "").await, Err(StoreError::InvalidQuery(_))));

    // In use: a device, then a camera of its own.
    store.record_hello("dev-a", &hello("1", &["cam-1", "cam-2"]), T0).await.expect("hello");
    let assign = DevicePatch { site_id: Some(Some("north-1".into())), ..Default::default() };
    f.update_device("dev-a", &assign, &its_aggregator::store::Scope::All, T0).await.expect("assign");
    let counted = f.get_site("north-1").await.expect("get");
    assert_eq!((counted.devices, counted.cameras), (1, 2));
    assert!(matches!(f.delete_site("north-1").await, Err(StoreError::Conflict(_))));
    f.update_device(
        "dev-a",
        &DevicePatch { site_id: Some(None), ..Default::default() },
        &its_aggregator::store::Scope::All,
        T0,
    )
    .await
    .expect("unassign");
    let own = CameraPatch { site_id: Some(Some("north-1".into())), ..Default::default() };
    f.update_camera("dev-a", "cam-2", &own, &its_aggregator::store::Scope::All).await.expect("camera site");
    assert!(matches!(f.delete_site("north-1").await, Err(StoreError::Conflict(_))));
    f.update_camera(
        "dev-a",
        "cam-2",
        &CameraPatch { site_id: Some(None), ..Default::default() },
        &its_aggregator::store::Scope::All,
    )
    .await
    .expect("clear");
    f.delete_site("north-1").await.expect("delete");
    assert!(matches!(f.delete_site("north-1").await, Err(StoreError::NotFound(_))));
    assert!(matches!(f.get_site("north-1").await, Err(StoreError::NotFound(_))));
    assert_eq!(f.list_sites().await.expect("list").len(), 1);
}

async fn device_patches(store: Arc<dyn EventStore>) {
    let f = fleet(&store);
    f.create_site("north", "North", T0).await.expect("site");
    store.record_hello("dev-a", &hello("1.2.0", &["cam-1"]), T0).await.expect("hello");
    store.insert_events("dev-a", &batch(1..=5), T0).await.expect("insert");
    let d = f.get_device("dev-a", &Scope::All).await.expect("get");
    assert_eq!((d.name.as_deref(), d.site_id.as_deref(), d.disabled, d.disabled_at_ms), (None, None, false, None));
    assert_eq!((d.agent_version.as_str(), d.model.as_str(), d.high_water_seq), ("1.2.0", "yolo11n", 5));
    assert_eq!((d.first_seen_ms, d.last_seen_ms, d.online), (T0, T0, false));
    assert_eq!(d.cameras.len(), 1);

    let patch = |name: Option<Option<&str>>, site: Option<Option<&str>>, disabled: Option<bool>| DevicePatch {
        name: name.map(|n| n.map(str::to_owned)),
        site_id: site.map(|s| s.map(str::to_owned)),
        disabled,
    };
    let d = f
        .update_device(
            "dev-a",
            &patch(Some(Some(" Gate 3 ")), Some(Some("north")), None),
            &its_aggregator::store::Scope::All,
            T0 + 1,
        )
        .await
        .expect("p");
    assert_eq!((d.name.as_deref(), d.site_id.as_deref()), (Some("Gate 3"), Some("north")));
    assert_eq!(d.cameras[0].site_id.as_deref(), Some("north"));
    // Absent fields stay.
    let d = f
        .update_device("dev-a", &patch(None, None, None), &its_aggregator::store::Scope::All, T0 + 2)
        .await
        .expect("empty patch");
    assert_eq!((d.name.as_deref(), d.site_id.as_deref()), (Some("Gate 3"), Some("north")));
    // Disabling keeps the first time; enabling clears it.
    let d = f
        .update_device("dev-a", &patch(None, None, Some(true)), &its_aggregator::store::Scope::All, T0 + 3)
        .await
        .expect("disable");
    assert_eq!((d.disabled, d.disabled_at_ms), (true, Some(T0 + 3)));
    let d = f
        .update_device("dev-a", &patch(None, None, Some(true)), &its_aggregator::store::Scope::All, T0 + 4)
        .await
        .expect("disable again");
    assert_eq!(d.disabled_at_ms, Some(T0 + 3));
    assert!(f.is_device_disabled("dev-a").await.expect("disabled"));
    let d = f
        .update_device("dev-a", &patch(Some(None), Some(None), Some(false)), &its_aggregator::store::Scope::All, T0 + 5)
        .await
        .expect("clear");
    assert_eq!((d.name, d.site_id, d.disabled, d.disabled_at_ms), (None, None, false, None));
    assert_eq!(d.cameras[0].site_id, None);
    assert!(!f.is_device_disabled("dev-a").await.expect("enabled"));
    // Errors change nothing.
    match f
        .update_device(
            "dev-a",
            &patch(Some(Some("X")), Some(Some("west")), Some(true)),
            &its_aggregator::store::Scope::All,
            T0,
        )
        .await
    {
        Err(StoreError::InvalidQuery(msg)) => assert!(msg.contains("west"), "{msg}"),
        other => panic!("expected InvalidQuery, got {other:?}"),
    }
    let d = f.get_device("dev-a", &Scope::All).await.expect("unchanged");
    assert_eq!((d.name, d.disabled), (None, false));
    assert!(matches!(
        f.update_device("dev-a", &patch(Some(Some("")), None, None), &its_aggregator::store::Scope::All, T0).await,
        Err(StoreError::InvalidQuery(_))
    ));
    assert!(matches!(
        f.update_device("dev-x", &patch(None, None, Some(true)), &its_aggregator::store::Scope::All, T0).await,
        Err(StoreError::NotFound(_))
    ));
    // Online: seen within the last minute.
    let now = its_aggregator::unix_ms();
    store.record_hello("dev-b", &hello("1", &[]), now).await.expect("hello now");
    assert!(f.get_device("dev-b", &Scope::All).await.expect("b").online);
    let v = serde_json::to_value(f.get_device("dev-b", &Scope::All).await.expect("b")).expect("json");
    for key in ["device_id", "name", "site_id", "disabled", "disabled_at_ms", "online", "last_health", "cameras"] {
        assert!(v.get(key).is_some(), "{key} missing in {v}");
    }
}

async fn cameras_follow_hellos_and_patches(store: Arc<dyn EventStore>) {
    let f = fleet(&store);
    f.create_site("north", "North", T0).await.expect("site");
    f.create_site("south", "South", T0).await.expect("site");
    store.record_hello("dev-a", &hello("1", &["cam-1", "cam-2"]), T0).await.expect("hello");
    f.update_device(
        "dev-a",
        &DevicePatch { site_id: Some(Some("north".into())), ..Default::default() },
        &its_aggregator::store::Scope::All,
        T0,
    )
    .await
    .expect("assign");
    // cam-1 no longer announced (kept), cam-3 new (in the device's site), cam-2 repeated.
    store.record_hello("dev-a", &hello("1", &["cam-2", "cam-3", "cam-3"]), T0 + 100).await.expect("hello again");
    let cams = f.list_cameras(&Scope::All, Some("dev-a"), None).await.expect("cameras");
    let summary: Vec<_> = cams
        .iter()
        .map(|c| (c.camera.as_str(), c.announced, c.first_seen_ms, c.last_announced_ms, c.site_id.as_deref()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("cam-1", false, T0, T0, Some("north")),
            ("cam-2", true, T0, T0 + 100, Some("north")),
            ("cam-3", true, T0 + 100, T0 + 100, Some("north")),
        ]
    );
    // Name and own site.
    let patch = CameraPatch { name: Some(Some("Entrance".into())), site_id: Some(Some("south".into())) };
    let c = f.update_camera("dev-a", "cam-2", &patch, &its_aggregator::store::Scope::All).await.expect("patch");
    assert_eq!(
        (c.name.as_deref(), c.site_id.as_deref(), c.site_override.as_deref()),
        (Some("Entrance"), Some("south"), Some("south"))
    );
    // The device's site changes: cameras without their own follow, cam-2 does not.
    f.update_device(
        "dev-a",
        &DevicePatch { site_id: Some(None), ..Default::default() },
        &its_aggregator::store::Scope::All,
        T0,
    )
    .await
    .expect("unassign");
    let sites: Vec<_> = f
        .list_cameras(&Scope::All, Some("dev-a"), None)
        .await
        .expect("cameras")
        .into_iter()
        .map(|c| (c.camera, c.site_id))
        .collect();
    assert_eq!(
        sites,
        vec![("cam-1".to_owned(), None), ("cam-2".to_owned(), Some("south".to_owned())), ("cam-3".to_owned(), None)]
    );
    // Back to the device's site; the name stays until cleared.
    let c = f
        .update_camera(
            "dev-a",
            "cam-2",
            &CameraPatch { site_id: Some(None), ..Default::default() },
            &its_aggregator::store::Scope::All,
        )
        .await
        .expect("p");
    assert_eq!((c.name.as_deref(), c.site_id, c.site_override), (Some("Entrance"), None, None));
    let c = f
        .update_camera(
            "dev-a",
            "cam-2",
            &CameraPatch { name: Some(None), ..Default::default() },
            &its_aggregator::store::Scope::All,
        )
        .await
        .expect("p");
    assert_eq!(c.name, None);
    // Errors.
    let west = CameraPatch { site_id: Some(Some("west".into())), ..Default::default() };
    assert!(matches!(
        f.update_camera("dev-a", "cam-2", &west, &its_aggregator::store::Scope::All).await,
        Err(StoreError::InvalidQuery(_))
    ));
    assert!(matches!(
        f.update_camera("dev-a", "cam-9", &CameraPatch::default(), &its_aggregator::store::Scope::All).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        f.update_camera("dev-x", "cam-1", &CameraPatch::default(), &its_aggregator::store::Scope::All).await,
        Err(StoreError::NotFound(_))
    ));
    let bad_name = CameraPatch { name: Some(Some("\u{7}".into())), ..Default::default() };
    assert!(matches!(
        f.update_camera("dev-a", "cam-2", &bad_name, &its_aggregator::store::Scope::All).await,
        Err(StoreError::InvalidQuery(_))
    ));
}

async fn disabled_devices_are_listed(store: Arc<dyn EventStore>) {
    let f = fleet(&store);
    assert!(f.disabled_devices().await.expect("none").is_empty());
    for d in ["dev-c", "dev-a", "dev-b"] {
        store.record_hello(d, &hello("1", &["cam-1"]), T0).await.expect("hello");
    }
    let disable = |on: bool| DevicePatch { disabled: Some(on), ..Default::default() };
    f.update_device("dev-c", &disable(true), &its_aggregator::store::Scope::All, T0).await.expect("disable c");
    f.update_device("dev-a", &disable(true), &its_aggregator::store::Scope::All, T0).await.expect("disable a");
    assert_eq!(f.disabled_devices().await.expect("list"), vec!["dev-a".to_owned(), "dev-c".to_owned()]);
    assert!(f.is_device_disabled("dev-c").await.expect("c"));
    assert!(!f.is_device_disabled("dev-b").await.expect("b"));
    assert!(!f.is_device_disabled("never-seen").await.expect("unknown"));
    f.update_device("dev-c", &disable(false), &its_aggregator::store::Scope::All, T0).await.expect("enable c");
    assert_eq!(f.disabled_devices().await.expect("list"), vec!["dev-a".to_owned()]);
    // A hello does not enable a device again.
    store.record_hello("dev-a", &hello("2", &["cam-1"]), T0 + 1).await.expect("hello");
    assert!(f.is_device_disabled("dev-a").await.expect("still disabled"));
}

async fn health_history_is_kept(store: Arc<dyn EventStore>) {
    let f = fleet(&store);
    store.record_hello("dev-a", &hello("1", &["cam-1"]), T0).await.expect("hello");
    for i in 0..5u64 {
        let health = DeviceHealth { agent_version: "1".into(), uptime_s: i * 60, ..Default::default() };
        let hb = Heartbeat { sent_at_ms: T0, health };
        store.record_health("dev-a", &hb, T0 + i as i64 * 1000).await.expect("health");
    }
    let uptimes =
        |samples: &[its_aggregator::store::HealthSample]| samples.iter().map(|s| s.report.uptime_s).collect::<Vec<_>>();
    let all = f.health_history("dev-a", None, None, 100, &its_aggregator::store::Scope::All).await.expect("all");
    assert_eq!(uptimes(&all), vec![240, 180, 120, 60, 0]);
    assert_eq!(all[0].at_ms, T0 + 4000);
    let window = f
        .health_history("dev-a", Some(T0 + 1000), Some(T0 + 3000), 100, &its_aggregator::store::Scope::All)
        .await
        .expect("window");
    assert_eq!(uptimes(&window), vec![120, 60]);
    let latest = f.health_history("dev-a", None, None, 2, &its_aggregator::store::Scope::All).await.expect("latest");
    assert_eq!(uptimes(&latest), vec![240, 180]);
    let d = f.get_device("dev-a", &Scope::All).await.expect("device");
    assert_eq!((d.last_health.map(|h| h.uptime_s), d.last_health_ms), (Some(240), Some(T0 + 4000)));
    // A device known only from heartbeats has a history too; an unknown one is not found.
    let hb = Heartbeat { sent_at_ms: T0, health: DeviceHealth::default() };
    store.record_health("dev-z", &hb, T0).await.expect("health z");
    assert_eq!(
        f.health_history("dev-z", None, None, 10, &its_aggregator::store::Scope::All).await.expect("z").len(),
        1
    );
    assert!(matches!(
        f.health_history("dev-x", None, None, 10, &its_aggregator::store::Scope::All).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(
        f.health_history("dev-a", Some(T0 + 10_000), None, 10, &its_aggregator::store::Scope::All)
            .await
            .expect("empty")
            .is_empty()
    );
    for (from, to, limit) in [(None, None, 0), (None, None, 10_001), (Some(T0 + 1), Some(T0), 10)] {
        assert!(
            matches!(
                f.health_history("dev-a", from, to, limit, &its_aggregator::store::Scope::All).await,
                Err(StoreError::InvalidQuery(_))
            ),
            "{from:?} {to:?} {limit}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Backend-specific

#[tokio::test]
async fn sqlite_file_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("nested-not-needed.db").display());
    {
        let store = open_store(&url, its_aggregator::vault::Vault::ephemeral()).await.expect("open");
        store.record_hello("dev-a", &hello("1.0.0", &["cam-1"]), T0).await.expect("hello");
        store.insert_events("dev-a", &batch(1..=7), T0).await.expect("insert");
    }
    let store =
        open_store(&url, its_aggregator::vault::Vault::ephemeral()).await.expect("reopen (migrations already applied)");
    assert_eq!(store.high_water("dev-a").await.expect("hw"), 7);
    assert_eq!(store.list_devices().await.expect("list").len(), 1);
}

#[tokio::test]
async fn sqlite_in_memory_works() {
    let store = open_store("sqlite::memory:", its_aggregator::vault::Vault::ephemeral()).await.expect("open memory");
    store.insert_events("dev-a", &batch(1..=3), T0).await.expect("insert");
    assert_eq!(store.high_water("dev-a").await.expect("hw"), 3);
    store.ping().await.expect("ping");
}

#[tokio::test]
async fn bad_urls_are_config_errors() {
    for url in ["mysql://x", "", "http://localhost"] {
        assert!(
            matches!(open_store(url, its_aggregator::vault::Vault::ephemeral()).await, Err(StoreError::Config(_))),
            "{url}"
        );
    }
}

#[test]
fn database_name_is_replaced_in_urls() {
    assert_eq!(with_database("postgres://u@h:5432/test", "x"), "postgres://u@h:5432/x");
    assert_eq!(with_database("postgres://u@h/test?sslmode=disable", "x"), "postgres://u@h/x?sslmode=disable");
    assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
}

// ---------------------------------------------------------------------------------------------
// Micro benchmark: `cargo test -p its-aggregator --test storage -- --ignored --nocapture bench`

async fn bench(store: Arc<dyn EventStore>) {
    // ITS_BENCH_BATCHES=500 for a larger table.
    let batches_n: u64 = std::env::var("ITS_BENCH_BATCHES").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    const PER_BATCH: u64 = 2000;
    let batches: Vec<Vec<EventEnvelope>> =
        (0..batches_n).map(|b| batch(b * PER_BATCH + 1..=(b + 1) * PER_BATCH)).collect();
    let start = Instant::now();
    for b in &batches {
        store.insert_events("dev-bench", b, T0).await.expect("insert");
    }
    let secs = start.elapsed().as_secs_f64();
    let n = batches_n * PER_BATCH;
    println!("{}: {n} events in {batches_n} batches: {secs:.2} s = {:.0} events/s", store.backend(), n as f64 / secs);
    assert_eq!(store.device_event_summary("dev-bench").await.expect("summary").total, n);
}

#[tokio::test]
#[ignore = "benchmark"]
async fn bench_insert_sqlite() {
    run(Backend::Sqlite, bench).await;
}

#[tokio::test]
#[ignore = "benchmark"]
async fn bench_insert_postgres() {
    run(Backend::Postgres, bench).await;
}
