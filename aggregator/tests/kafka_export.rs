//! Kafka export against a real Kafka-protocol broker (`tansu` 0.6, installed by
//! scripts/setup-test-peers as .deps/tansu; `ITS_TANSU` names another binary), read back with a
//! real Kafka consumer (librdkafka), on both storage backends.
//!
//! Events go through the aggregator's ingest commit path (`ingest::commit_batch`: store, then the
//! bus), the exporter ([`KafkaExporter`]) reads them from the database after its cursor.
//!
//! - Every committed event arrives, keyed `device/camera`, as its public JSON with `id`, and each
//!   camera's events arrive in order (after dropping redeliveries: at least once).
//! - Re-sent duplicates (on PostgreSQL they leave holes in the ids that never fill) do not stop the
//!   export: it goes past a hole after the grace period.
//! - The broker is killed (SIGKILL) while the export runs and events keep being committed: while
//!   it is down the cursor does not move; after it restarts, every event committed since arrives.
//!   tansu here stores in memory (the only storage this build has besides S3), so a restarted
//!   broker starts empty: what it acknowledged before the kill was checked on the first broker
//!   (everything up to the cursor was read back there before the kill), and what came after on the
//!   second; together they are every event.
//! - The exporter is aborted (as in a crash) and started again: the cursor resumes where the
//!   broker's acknowledgements left it (nothing from before the broker restart is sent again,
//!   everything after arrives).

#![cfg(feature = "kafka")]

use its_testkit::server as common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Proc, free_port, tansu_bin};
use its_aggregator::bus::EventBus;
use its_aggregator::export::kafka::{KafkaConfig, KafkaExporter, RawKafka};
use its_aggregator::store::EventStore;
use its_shared::event::{EventEnvelope, EventKind, ObjectRef};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::watch;

const PARTITIONS: i32 = 3;
const CAMERAS: [(&str, &str); 3] = [("box-1", "cam-a"), ("box-1", "cam-b"), ("box-2", "cam-a")];

/// A tansu broker on loopback, storing in memory.
fn start_broker(port: u16, log: &Path) -> Proc {
    let url = format!("tcp://127.0.0.1:{port}");
    let mut cmd = std::process::Command::new(tansu_bin());
    cmd.args(["broker", "--listener-url", &url, "--advertised-listener-url", &url]).args([
        "--storage-engine",
        "memory://tansu/",
        "--cluster-id",
        "its-test",
    ]);
    let proc = Proc::spawn("tansu", cmd, log);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "tansu did not listen; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    proc
}

async fn create_topic(bootstrap: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("admin client");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let new = NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
        match admin.create_topics([&new], &opts).await {
            Ok(results) if results.iter().all(|r| r.is_ok()) => return,
            Ok(results) => {
                if results.iter().any(|r| matches!(r, Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)))) {
                    return;
                }
                assert!(Instant::now() < deadline, "create topic {topic}: {results:?}");
            }
            Err(e) => assert!(Instant::now() < deadline, "create topic {topic}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One message as read back.
#[derive(Debug, Clone)]
struct Got {
    key: String,
    id: String,
    device: String,
    seq: u64,
    camera: String,
    body: serde_json::Value,
}

/// A consumer reading every partition from the beginning, on its own thread.
struct Collector {
    got: Arc<Mutex<Vec<Got>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    fn start(bootstrap: &str, topic: &str) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", common::unique_name("its-test"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Beginning).expect("partition");
        }
        consumer.assign(&tpl).expect("assign");
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let got = Arc::clone(&got);
            let stop = Arc::clone(&stop);
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(m) = consumer.poll(Duration::from_millis(100)) else { continue };
                    let Ok(m) = m else { continue };
                    let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                    let body: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())
                        .unwrap_or_else(|e| panic!("payload is not JSON: {e}"));
                    let g = Got {
                        key,
                        id: body["id"].as_str().expect("id").to_owned(),
                        device: body["device_id"].as_str().expect("device_id").to_owned(),
                        seq: body["seq"].as_u64().expect("seq"),
                        camera: body["camera"].as_str().expect("camera").to_owned(),
                        body,
                    };
                    got.lock().expect("lock").push(g);
                }
            }
        });
        Self { got, stop, thread: Some(thread) }
    }

    fn ids(&self) -> BTreeSet<String> {
        self.got.lock().expect("lock").iter().map(|g| g.id.clone()).collect()
    }

    fn all(&self) -> Vec<Got> {
        self.got.lock().expect("lock").clone()
    }

    async fn wait_for(&self, want: &BTreeSet<String>, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let have = self.ids();
            let missing: Vec<_> = want.difference(&have).collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {} events never arrived, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(5)]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stop(mut self) -> Vec<Got> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("consumer thread");
        }
        self.all()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Keys are `device/camera`, the payload is the public JSON, and each camera's events come in
/// order once redeliveries are dropped.
fn check_keys_and_order(got: &[Got]) {
    let mut first_seen: HashMap<String, Vec<u64>> = HashMap::new();
    let mut seen = BTreeSet::new();
    for g in got {
        assert_eq!(g.key, format!("{}/{}", g.device, g.camera), "key of {}", g.id);
        assert_eq!(g.id, format!("{}:{}", g.device, g.seq));
        for field in ["kind", "label", "@timestamp", "observed_at_ms", "ingested_at_ms", "payload", "has_snapshot"] {
            assert!(g.body.get(field).is_some(), "{field} missing in {}", g.body);
        }
        assert_eq!(g.body["kind"], "stopped_vehicle");
        if seen.insert(g.id.clone()) {
            first_seen.entry(g.key.clone()).or_default().push(g.seq);
        }
    }
    for (key, seqs) in first_seen {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted, "events of {key} out of order");
    }
}

/// Commits events through the ingest path and remembers their ids.
struct Committer {
    store: Arc<dyn EventStore>,
    bus: EventBus,
    next_seq: BTreeMap<&'static str, u64>,
    committed: BTreeSet<String>,
    last_batch: Option<(&'static str, Vec<EventEnvelope>)>,
}

impl Committer {
    /// `n` events per camera, one batch per device.
    async fn commit(&mut self, n: u64) -> BTreeSet<String> {
        let mut ids = BTreeSet::new();
        for device in ["box-1", "box-2"] {
            let mut batch = Vec::new();
            for i in 0..n {
                for (d, camera) in CAMERAS {
                    if d != device {
                        continue;
                    }
                    let seq = self.next_seq.entry(device).or_insert(0);
                    *seq += 1;
                    batch.push(EventEnvelope {
                        seq: *seq,
                        camera: camera.to_owned(),
                        observed_at_ms: 1_700_000_000_000 + (*seq as i64) * 10,
                        kind: EventKind::StoppedVehicle {
                            zone: "shoulder".into(),
                            object: ObjectRef {
                                track_id: i,
                                label: "car".into(),
                                score: 0.9,
                                bbox: [0.1, 0.2, 0.3, 0.4],
                            },
                            stopped_s: 30.0,
                        },
                    });
                    ids.insert(format!("{device}:{seq}"));
                }
            }
            its_aggregator::ingest::commit_batch(&*self.store, &self.bus, device, batch.clone()).await.expect("commit");
            self.last_batch = Some((device, batch));
        }
        self.committed.extend(ids.iter().cloned());
        ids
    }

    /// Sends the last batch again: stored already, so nothing new (on PostgreSQL the skipped
    /// rows still take ids: holes).
    async fn resend_last(&self) {
        let (device, batch) = self.last_batch.clone().expect("a batch");
        let outcome = self.store.insert_events(device, &batch, its_aggregator::unix_ms()).await.expect("resend");
        assert_eq!(outcome.inserted, 0);
    }
}

fn exporter_config(bootstrap: &str, topic: &str) -> KafkaConfig {
    let mut raw = RawKafka {
        enabled: true,
        brokers: vec![bootstrap.to_owned()],
        events_topic: topic.to_owned(),
        batch_size: 16,
        linger_ms: 5,
        gap_grace_ms: 500,
        poll_interval_ms: 200,
        ..RawKafka::default()
    };
    // Reconnect quickly after the broker restarts.
    raw.properties.insert("reconnect.backoff.max.ms".into(), "500".into());
    // Deliveries stuck with the dead broker fail soon, and are sent again from the cursor.
    raw.properties.insert("message.timeout.ms".into(), "5000".into());
    let mut e = its_shared::config::ConfigErrors::new("test");
    let cfg = raw.validate(&mut e);
    assert!(e.is_empty(), "{:?}", e.issues);
    cfg
}

struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn start_exporter(cfg: &KafkaConfig, store: &Arc<dyn EventStore>, bus: &EventBus, owner: &str) -> Running {
    let exporter = KafkaExporter::new(cfg, store.db(), owner).expect("exporter");
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(exporter.run(bus.clone(), rx));
    Running { stop, task }
}

async fn cursor_of(store: &Arc<dyn EventStore>, topic: &str) -> i64 {
    its_aggregator::export::kafka::Cursor::new(store.db(), format!("kafka:{topic}"), "reader")
        .position()
        .await
        .expect("cursor")
        .unwrap_or(0)
}

async fn max_id(store: &Arc<dyn EventStore>) -> i64 {
    its_aggregator::export::kafka::Cursor::new(store.db(), "none", "reader").max_event_id().await.expect("max id")
}

async fn wait_cursor_at_max(store: &Arc<dyn EventStore>, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (c, m) = (cursor_of(store, topic).await, max_id(store).await);
        if c == m {
            return;
        }
        assert!(Instant::now() < deadline, "the cursor stays at {c}, below the highest id {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn export_survives_broker_restart_and_exporter_crash(store: Arc<dyn EventStore>) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "its_aggregator=info".into()))
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("tansu.log");
    let port = free_port();
    let bootstrap = format!("127.0.0.1:{port}");
    let topic = format!("its-events-{}", rand_suffix());
    let mut broker = start_broker(port, &log);
    create_topic(&bootstrap, &topic).await;

    let bus = EventBus::new();
    let mut c = Committer {
        store: Arc::clone(&store),
        bus: bus.clone(),
        next_seq: BTreeMap::new(),
        committed: BTreeSet::new(),
        last_batch: None,
    };
    // Stored before the exporter first runs: `start = earliest` exports them too.
    let mut phase1 = c.commit(4).await;
    let cfg = exporter_config(&bootstrap, &topic);
    let exporter = start_exporter(&cfg, &store, &bus, "replica-1");
    let first = Collector::start(&bootstrap, &topic);
    phase1.extend(c.commit(5).await);
    c.resend_last().await;
    phase1.extend(c.commit(3).await);
    first.wait_for(&phase1, "before the broker restart").await;
    wait_cursor_at_max(&store, &topic).await;
    let before_kill = first.stop();
    check_keys_and_order(&before_kill);
    let acked_before_kill = cursor_of(&store, &topic).await;

    // The broker dies while events keep coming: the exporter cannot deliver, the cursor stays.
    broker.kill9();
    let mut phase2 = BTreeSet::new();
    for _ in 0..4 {
        phase2.extend(c.commit(2).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(cursor_of(&store, &topic).await, acked_before_kill, "nothing is acknowledged while the broker is down");
    assert!(max_id(&store).await > acked_before_kill);

    // A new broker on the same address (empty: memory storage).
    let _broker2 = start_broker(port, &log);
    create_topic(&bootstrap, &topic).await;
    let second = Collector::start(&bootstrap, &topic);
    phase2.extend(c.commit(3).await);
    second.wait_for(&phase2, "after the broker restart").await;
    wait_cursor_at_max(&store, &topic).await;

    // The exporter crashes (aborted mid-flight) and starts again: the cursor resumes.
    exporter.task.abort();
    let _ = exporter.task.await;
    drop(exporter.stop);
    let mut phase3 = c.commit(4).await;
    let exporter = start_exporter(&cfg, &store, &bus, "replica-1");
    phase3.extend(c.commit(2).await);
    second.wait_for(&phase3, "after the exporter restarted").await;
    wait_cursor_at_max(&store, &topic).await;
    let _ = exporter.stop.send(true);
    exporter.task.await.expect("join").expect("exporter ends cleanly");

    let after = second.stop();
    check_keys_and_order(&after);
    let second_ids: BTreeSet<String> = after.iter().map(|g| g.id.clone()).collect();
    assert!(
        phase1.is_disjoint(&second_ids),
        "events acknowledged before the broker restart were sent again: the cursor did not hold"
    );
    let all: BTreeSet<String> = before_kill.iter().map(|g| g.id.clone()).chain(second_ids).collect();
    let missing: Vec<_> = c.committed.difference(&all).collect();
    assert!(missing.is_empty(), "committed but never exported: {missing:?}");
    println!(
        "exported {} events ({} messages read back, {} before the broker restart)",
        c.committed.len(),
        before_kill.len() + after.len(),
        before_kill.len()
    );
}

fn rand_suffix() -> String {
    common::unique_name("t").replace('_', "-")
}

common::both_backends!(export_survives_broker_restart_and_exporter_crash);
