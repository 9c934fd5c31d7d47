//! Retention by age and by size, run against both backends (SQLite in a temporary directory, a
//! fresh PostgreSQL database per test, as in `tests/storage.rs`), and its configuration.

use its_testkit::server as common;

use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use its_aggregator::config::{RawConfig, parse_byte_size};
use its_aggregator::snapshots::SnapshotObjects;
use its_aggregator::store::{
    EventStore, NewSnapshot, PostgresStore, Retention, RetentionPolicy, RetentionReason, StorageSize, StoreError,
};
use its_shared::event::{Direction, ObjectRef};
use its_shared::wire::Heartbeat;
use its_shared::{DeviceHealth, EventEnvelope, EventKind};
use sqlx::Connection as _;

use common::{PgDatabase, both_backends};

both_backends!(
    age_deletes_exactly_the_old_rows_and_their_objects,
    nothing_deleted_records_no_run,
    size_retention_deletes_oldest_first_until_under_the_limit,
    newest_event_of_each_device_is_kept,
    periodic_task_runs_at_start_and_stops_on_shutdown,
);

// ---------------------------------------------------------------------------------------------
// Fixtures

const T0: i64 = 1_700_000_000_000;
const DAY: i64 = 86_400_000;

fn ev(seq: u64, observed_at_ms: i64) -> EventEnvelope {
    let object = ObjectRef { track_id: seq, label: "car".into(), score: 0.9, bbox: [0.1, 0.2, 0.3, 0.4] };
    EventEnvelope {
        seq,
        camera: "cam-1".into(),
        observed_at_ms,
        kind: EventKind::LineCrossing { line: "north".into(), object, direction: Direction::In, speed_kmh: Some(48.0) },
    }
}

fn heartbeat(at_ms: i64) -> Heartbeat {
    Heartbeat { sent_at_ms: at_ms, health: DeviceHealth { agent_version: "1.0".into(), ..Default::default() } }
}

/// Stores the pictures of event `seq` of `device` (a full frame of `full` bytes, a crop of `crop`
/// bytes if any) and records the row, as the ingest does.
async fn snapshot(
    store: &Arc<dyn EventStore>,
    objects: &SnapshotObjects,
    device: &str,
    seq: u64,
    taken_at_ms: i64,
    full: usize,
    crop: Option<usize>,
) {
    let full_key = SnapshotObjects::full_key(device, seq).expect("key");
    objects.put(&full_key, vec![0xAB; full]).await.expect("put full");
    let crop_key = SnapshotObjects::crop_key(device, seq).expect("key");
    if let Some(n) = crop {
        objects.put(&crop_key, vec![0xCD; n]).await.expect("put crop");
    }
    let snap = NewSnapshot {
        seq,
        camera: "cam-1",
        taken_at_ms,
        full_key: full_key.as_ref(),
        full_bytes: full as u64,
        crop: crop.map(|n| (crop_key.as_ref(), n as u64)),
    };
    assert!(store.record_snapshot(device, &snap, taken_at_ms).await.expect("record snapshot"));
}

fn object_exists(root: &Path, device: &str, file: &str) -> bool {
    root.join("snapshots").join(device).join(file).is_file()
}

fn policy(max_age_days: Option<i64>, max_total_bytes: Option<u64>, batch: usize) -> RetentionPolicy {
    RetentionPolicy {
        max_age: max_age_days.map(|d| Duration::from_millis((d * DAY) as u64)),
        max_total_bytes,
        interval: Duration::from_secs(60),
        batch,
    }
}

/// What size retention counts in the store now (rows of each table).
async fn counted(store: &Arc<dyn EventStore>) -> StorageSize {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = SnapshotObjects::local(dir.path()).expect("objects");
    Retention::new(store.db(), objects, RetentionPolicy::off()).measure().await.expect("measure")
}

async fn health_count(store: &Arc<dyn EventStore>) -> i64 {
    i64::try_from(counted(store).await.health_rows).expect("count")
}

/// The snapshot rows stored, as (device, seq), ascending: those of `device` for the sequence
/// numbers in `seqs`, which must be all the rows there are.
async fn snapshot_rows(store: &Arc<dyn EventStore>, device: &str, seqs: RangeInclusive<u64>) -> Vec<(String, i64)> {
    let mut rows = Vec::new();
    for seq in seqs.clone() {
        if store.has_snapshot(device, seq).await.expect("has snapshot") {
            rows.push((device.to_owned(), i64::try_from(seq).expect("seq")));
        }
    }
    assert_eq!(counted(store).await.snapshots, rows.len() as u64, "snapshot rows besides {device} {seqs:?}");
    rows
}

// ---------------------------------------------------------------------------------------------
// Tests

async fn age_deletes_exactly_the_old_rows_and_their_objects(store: Arc<dyn EventStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = SnapshotObjects::local(dir.path()).expect("objects");
    // dev-a: one event a day for ten days, a heartbeat with each.
    let events: Vec<EventEnvelope> = (1..=10).map(|d| ev(d, T0 + d as i64 * DAY)).collect();
    store.insert_events("dev-a", &events, T0).await.expect("insert");
    for d in 1..=10 {
        store.record_health("dev-a", &heartbeat(T0 + d * DAY), T0 + d * DAY).await.expect("health");
    }
    // Pictures of old events 2 (with a crop) and 5, of new event 9; pictures without an event,
    // one old (100) and one new (101); and an old event whose row names an invalid key.
    snapshot(&store, &objects, "dev-a", 2, T0 + 2 * DAY, 3000, Some(500)).await;
    snapshot(&store, &objects, "dev-a", 5, T0 + 5 * DAY, 4000, None).await;
    snapshot(&store, &objects, "dev-a", 9, T0 + 9 * DAY, 5000, Some(700)).await;
    snapshot(&store, &objects, "dev-a", 100, T0 + DAY, 6000, None).await;
    snapshot(&store, &objects, "dev-a", 101, T0 + 10 * DAY, 7000, None).await;
    let bad = NewSnapshot {
        seq: 3,
        camera: "cam-1",
        taken_at_ms: T0 + 3 * DAY,
        full_key: "snapshots//invalid",
        full_bytes: 100,
        crop: None,
    };
    assert!(store.record_snapshot("dev-a", &bad, T0).await.expect("record"));

    // Five days kept: events 1..=5 (observed up to T0 + 5 days) are older than the cutoff.
    let now = T0 + 10 * DAY + 3_600_000;
    let retention = Retention::new(store.db(), objects.clone(), policy(Some(5), None, 2));
    let report = retention.run_once(now).await.expect("run");
    assert_eq!(report.runs.len(), 1, "{report:?}");
    let run = report.run(RetentionReason::Age).expect("age run");
    assert_eq!((run.deleted_events, run.deleted_health, run.deleted_snapshots), (5, 5, 4), "{run:?}");
    assert_eq!(run.oldest_kept_ms, Some(T0 + 6 * DAY));
    assert_eq!(run.started_at_ms, now);
    assert!(run.finished_at_ms >= now);
    // Snapshot bytes: 3000 + 500 + 4000 + 6000 + 100, plus the rows' estimated bytes.
    assert!(run.freed_bytes >= 13_600, "{run:?}");
    assert!(
        run.detail.contains("5 events observed 2023-11-15T22:13:20.000Z to 2023-11-19T22:13:20.000Z"),
        "{}",
        run.detail
    );
    assert!(run.detail.contains("5 health reports, 4 snapshots (1 without an event)"), "{}", run.detail);
    assert!(run.detail.contains("4 objects deleted, 0 missing, 1 failed"), "{}", run.detail);
    assert_eq!(report.object_failures, 1);
    assert_eq!(report.kept_high_water, 0);

    assert_eq!(store.device_seqs("dev-a").await.expect("seqs"), (6..=10).collect::<Vec<u64>>());
    assert_eq!(health_count(&store).await, 5);
    assert_eq!(snapshot_rows(&store, "dev-a", 1..=101).await, vec![("dev-a".to_owned(), 9), ("dev-a".to_owned(), 101)]);
    let root = dir.path();
    for gone in ["2.jpg", "2-crop.jpg", "5.jpg", "100.jpg"] {
        assert!(!object_exists(root, "dev-a", gone), "{gone} still there");
    }
    for kept in ["9.jpg", "9-crop.jpg", "101.jpg"] {
        assert!(object_exists(root, "dev-a", kept), "{kept} deleted");
    }

    let runs = retention.list_runs(10).await.expect("list");
    assert_eq!(runs, report.runs);
    // Again at the same time: nothing to delete, nothing recorded.
    let again = retention.run_once(now).await.expect("run again");
    assert!(again.runs.is_empty(), "{again:?}");
    assert_eq!(retention.list_runs(10).await.expect("list").len(), 1);
    assert!(matches!(retention.list_runs(0).await, Err(StoreError::InvalidQuery(_))));
    // Devices are never deleted.
    assert_eq!(store.list_devices().await.expect("devices").len(), 1);
}

async fn nothing_deleted_records_no_run(store: Arc<dyn EventStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = SnapshotObjects::local(dir.path()).expect("objects");
    let events: Vec<EventEnvelope> = (1..=20).map(|s| ev(s, T0 + s as i64 * 1000)).collect();
    store.insert_events("dev-a", &events, T0).await.expect("insert");
    snapshot(&store, &objects, "dev-a", 3, T0, 1000, None).await;
    store.record_health("dev-a", &heartbeat(T0), T0).await.expect("health");
    let retention = Retention::new(store.db(), objects.clone(), policy(Some(30), Some(1 << 40), 1000));
    let report = retention.run_once(T0 + DAY).await.expect("run");
    assert!(report.runs.is_empty(), "{report:?}");
    let size = report.size_before.expect("measured");
    assert_eq!((size.events, size.health_rows, size.snapshots, size.snapshot_bytes), (20, 1, 1, 1000));
    assert!(size.db_bytes > 0 && size.event_row_bytes > 0, "{size:?}");
    assert!(retention.list_runs(100).await.expect("list").is_empty());
    // With the policy off nothing is looked at.
    let off = Retention::new(store.db(), objects, RetentionPolicy::off());
    assert_eq!(off.run_once(i64::MAX).await.expect("run"), Default::default());
    assert_eq!(store.device_seqs("dev-a").await.expect("seqs").len(), 20);
}

async fn size_retention_deletes_oldest_first_until_under_the_limit(store: Arc<dyn EventStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = SnapshotObjects::local(dir.path()).expect("objects");
    const N: u64 = 200;
    let events: Vec<EventEnvelope> = (1..=N).map(|s| ev(s, T0 + s as i64 * 60_000)).collect();
    store.insert_events("dev-a", &events, T0).await.expect("insert");
    for s in 1..=N {
        snapshot(&store, &objects, "dev-a", s, T0 + s as i64 * 60_000, 10_000, None).await;
    }
    let probe = Retention::new(store.db(), objects.clone(), policy(None, None, 50));
    let before = probe.measure().await.expect("measure");
    assert_eq!((before.events, before.snapshots, before.snapshot_bytes), (N, N, N * 10_000));
    let limit = before.total() / 2;

    let retention = Retention::new(store.db(), objects.clone(), policy(None, Some(limit), 50));
    let report = retention.run_once(T0 + DAY).await.expect("run");
    let run = report.run(RetentionReason::Size).expect("size run").clone();
    assert_eq!(report.runs.len(), 1);
    let after = retention.measure().await.expect("measure");
    assert!(after.total() <= limit, "{after:?} above {limit}");
    assert_eq!(report.size_before.map(|s| s.total()), Some(before.total()));

    // Oldest first: what is left is the newest events, each with its snapshot.
    let seqs = store.device_seqs("dev-a").await.expect("seqs");
    let kept = seqs.len() as u64;
    assert!(kept > 0 && kept < N, "{kept}");
    assert_eq!(seqs, (N - kept + 1..=N).collect::<Vec<u64>>());
    assert_eq!(run.deleted_events, N - kept);
    assert_eq!(run.deleted_snapshots, N - kept);
    assert_eq!(run.deleted_health, 0);
    assert_eq!(run.oldest_kept_ms, Some(T0 + (N - kept + 1) as i64 * 60_000));
    assert!(run.freed_bytes >= (N - kept) * 10_000, "{run:?}");
    // Not far below the low-water mark either: 95% of the limit minus about one event.
    let per_event = before.total() / N;
    assert!(after.total() + 2 * per_event >= limit * 95 / 100, "{after:?} far below {limit}");
    for s in 1..=N {
        assert_eq!(object_exists(dir.path(), "dev-a", &format!("{s}.jpg")), s > N - kept, "object {s}");
    }
    assert_eq!(snapshot_rows(&store, "dev-a", 1..=N).await.len() as u64, kept);
    assert_eq!(retention.list_runs(5).await.expect("list"), vec![run]);

    // Under the limit now: the next tick deletes nothing.
    let again = retention.run_once(T0 + DAY).await.expect("run again");
    assert!(again.runs.is_empty(), "{again:?}");
}

async fn newest_event_of_each_device_is_kept(store: Arc<dyn EventStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = SnapshotObjects::local(dir.path()).expect("objects");
    // A device silent for a year: all its events are old.
    let old: Vec<EventEnvelope> = (1..=5).map(|s| ev(s, T0 + s as i64)).collect();
    store.insert_events("dev-quiet", &old, T0).await.expect("insert");
    snapshot(&store, &objects, "dev-quiet", 5, T0, 1000, None).await;
    let now = T0 + 365 * DAY;
    let retention = Retention::new(store.db(), objects.clone(), policy(Some(90), None, 1000));
    let report = retention.run_once(now).await.expect("run");
    let run = report.run(RetentionReason::Age).expect("age run");
    assert_eq!(run.deleted_events, 4);
    assert_eq!(report.kept_high_water, 1);
    assert!(run.detail.contains("1 older events kept as their device's newest"), "{}", run.detail);
    // The high-water mark the ingest tells the agent is unchanged, and the kept event keeps its
    // pictures.
    assert_eq!(store.high_water("dev-quiet").await.expect("hw"), 5);
    assert!(store.has_snapshot("dev-quiet", 5).await.expect("has"));
    assert!(object_exists(dir.path(), "dev-quiet", "5.jpg"));

    // Size pressure cannot take it either: nothing deletable, nothing recorded.
    let tiny = Retention::new(store.db(), objects, policy(None, Some(1), 1000));
    let report = tiny.run_once(now).await.expect("run");
    assert!(report.runs.is_empty(), "{report:?}");
    assert_eq!(store.device_seqs("dev-quiet").await.expect("seqs"), vec![5]);
}

async fn periodic_task_runs_at_start_and_stops_on_shutdown(store: Arc<dyn EventStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = SnapshotObjects::local(dir.path()).expect("objects");
    // Events from 2001 and from now: the task runs with the wall clock.
    let now = its_aggregator::unix_ms();
    store.insert_events("dev-a", &[ev(1, 1_000_000_000_000), ev(2, now)], now).await.expect("insert");
    let retention = Retention::new(store.db(), objects, policy(Some(1), None, 1000));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(retention.clone().run(shutdown));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while retention.list_runs(10).await.expect("list").is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no run recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.device_seqs("dev-a").await.expect("seqs"), vec![2]);
    stop.send(true).expect("send");
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("stops on shutdown").expect("task");
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL without TimescaleDB

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_without_timescale_uses_plain_tables() {
    let db = PgDatabase::create("its_retention").await;
    let url = db.url.clone();
    let outcome = tokio::spawn(async move {
        let store = PostgresStore::open(&url, its_aggregator::vault::Vault::ephemeral()).await.expect("open");
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        let available: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')")
                .fetch_one(&mut conn)
                .await
                .expect("query");
        assert_eq!(store.timescale(), available, "detection follows pg_available_extensions");
        if !available {
            // The plain schema: the events keep their (device_id, seq) key, no extension.
            let key: Vec<String> = sqlx::query_scalar(
                "SELECT a.attname::text FROM pg_constraint c JOIN pg_attribute a \
                 ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey) \
                 WHERE c.conname = 'events_device_seq' ORDER BY a.attname",
            )
            .fetch_all(&mut conn)
            .await
            .expect("constraint");
            assert_eq!(key, vec!["device_id".to_owned(), "seq".to_owned()]);
            let installed: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')")
                    .fetch_one(&mut conn)
                    .await
                    .expect("query");
            assert!(!installed);
        }
    })
    .await;
    db.drop_db().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// The TimescaleDB path changes the events' keys before `create_hypertable`. TimescaleDB is not
/// installed here, but the key change itself runs on plain PostgreSQL: with it, a resent batch is
/// still recognised (same `observed_at_ms`) and retention still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hypertable_keys_keep_the_ingest_idempotent() {
    let db = PgDatabase::create("its_retention").await;
    let url = db.url.clone();
    let outcome = tokio::spawn(async move {
        let store: Arc<dyn EventStore> =
            Arc::new(PostgresStore::open(&url, its_aggregator::vault::Vault::ephemeral()).await.expect("open"));
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        for sql in its_aggregator::store::postgres::timescale::HYPERTABLE_EVENT_KEYS {
            sqlx::query(*sql).execute(&mut conn).await.expect(sql);
        }
        let events: Vec<EventEnvelope> = (1..=10).map(|d| ev(d, T0 + d as i64 * DAY)).collect();
        let first = store.insert_events("dev-a", &events, T0).await.expect("insert");
        assert_eq!((first.inserted, first.duplicates), (10, 0));
        let again = store.insert_events("dev-a", &events, T0).await.expect("resend");
        assert_eq!((again.inserted, again.duplicates), (0, 10));
        assert_eq!(store.high_water("dev-a").await.expect("hw"), 10);

        let dir = tempfile::tempdir().expect("tempdir");
        let objects = SnapshotObjects::local(dir.path()).expect("objects");
        snapshot(&store, &objects, "dev-a", 2, T0 + 2 * DAY, 100, None).await;
        let retention = Retention::new(store.db(), objects, policy(Some(5), Some(1 << 20), 3));
        let report = retention.run_once(T0 + 10 * DAY + 1).await.expect("run");
        let run = report.run(RetentionReason::Age).expect("age run");
        assert_eq!((run.deleted_events, run.deleted_snapshots), (5, 1));
        assert_eq!(store.device_seqs("dev-a").await.expect("seqs"), (6..=10).collect::<Vec<u64>>());
    })
    .await;
    db.drop_db().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[test]
fn sizes_parse_with_decimal_and_binary_units() {
    let ok = [
        ("0", 0),
        ("1234", 1234),
        ("50GB", 50_000_000_000),
        ("50 gb", 50_000_000_000),
        ("500MiB", 500 * 1024 * 1024),
        ("1.5TB", 1_500_000_000_000),
        ("1.5 GiB", 1_610_612_736),
        ("2k", 2000),
        ("3Ki", 3072),
        ("7 B", 7),
        (" 10MB ", 10_000_000),
        ("16TiB", 16 << 40),
    ];
    for (text, want) in ok {
        assert_eq!(parse_byte_size(text), Ok(want), "{text}");
    }
    for bad in ["", "GB", "-5GB", "5 parsecs", "1.2.3GB", "5.GB", ".5GB", "99999999999TB", "1e9", "5 G B"] {
        assert!(parse_byte_size(bad).is_err(), "{bad:?} accepted");
    }
}

fn load(vars: &[(&str, &str)]) -> RawConfig {
    RawConfig::load(None, vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))).expect("parses")
}

#[test]
fn retention_config_defaults_values_and_errors() {
    let cfg = RawConfig::default().validate("defaults").expect("valid");
    assert_eq!(cfg.retention.max_age, Some(Duration::from_secs(90 * 86_400)));
    assert_eq!(cfg.retention.max_total_bytes, None);
    assert_eq!(cfg.retention.interval, Duration::from_secs(300));

    let cfg = load(&[
        ("ITS_AGGREGATOR__RETENTION__MAX_AGE_DAYS", "0"),
        ("ITS_AGGREGATOR__RETENTION__MAX_TOTAL_BYTES", "50GB"),
        ("ITS_AGGREGATOR__RETENTION__INTERVAL_S", "10"),
    ])
    .validate("env")
    .expect("valid");
    assert_eq!(cfg.retention.max_age, None);
    assert_eq!(cfg.retention.max_total_bytes, Some(50_000_000_000));
    assert_eq!(cfg.retention.interval, Duration::from_secs(10));

    let cfg = load(&[("ITS_AGGREGATOR__RETENTION__MAX_TOTAL_BYTES", "2147483648")]).validate("env").expect("valid");
    assert_eq!(cfg.retention.max_total_bytes, Some(1 << 31));

    // TOML: a string or an integer.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("aggregator.toml");
    std::fs::write(&path, "[retention]\nmax_age_days = 30\nmax_total_bytes = \"500MiB\"\n").expect("write");
    let cfg = RawConfig::load(Some(&path), Vec::new()).expect("parses").validate("file").expect("valid");
    assert_eq!(cfg.retention.max_age, Some(Duration::from_secs(30 * 86_400)));
    assert_eq!(cfg.retention.max_total_bytes, Some(500 << 20));
    std::fs::write(&path, "[retention]\nmax_total_bytes = 1073741824\n").expect("write");
    let cfg = RawConfig::load(Some(&path), Vec::new()).expect("parses").validate("file").expect("valid");
    assert_eq!(cfg.retention.max_total_bytes, Some(1 << 30));
    // Unknown keys are refused.
    std::fs::write(&path, "[retention]\nmax_size = 5\n").expect("write");
    assert!(RawConfig::load(Some(&path), Vec::new()).is_err());

    // Every problem at once, with its path.
    let err = load(&[
        ("ITS_AGGREGATOR__RETENTION__MAX_AGE_DAYS", "100000"),
        ("ITS_AGGREGATOR__RETENTION__MAX_TOTAL_BYTES", "12 parsecs"),
        ("ITS_AGGREGATOR__RETENTION__INTERVAL_S", "5"),
    ])
    .validate("env")
    .expect_err("invalid");
    let paths: Vec<&str> = err.issues.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(paths, vec!["retention.max_age_days", "retention.interval_s", "retention.max_total_bytes"]);
    for (value, needle) in [("-1", "negative"), ("100", "less than 1 MiB"), ("5 GB B", "not a size")] {
        let err = load(&[("ITS_AGGREGATOR__RETENTION__MAX_TOTAL_BYTES", value)]).validate("env").expect_err(value);
        let issue = &err.issues[0];
        assert_eq!(issue.path, "retention.max_total_bytes");
        assert!(issue.message.contains(needle), "{value}: {}", issue.message);
    }
}
