//! Kafka export of committed events (and, optionally, alerts and anomalies).
//!
//! # Delivery
//!
//! Events are exported **from the database**, not from the in-memory bus: an export cursor in
//! the `export_cursors` table (migration 0009) holds the highest `events.id` up to which every
//! event was acknowledged by the brokers (`acks=all`). Each round reads the events after the
//! cursor in `id` order, produces them, waits until the brokers acknowledged every one, and only
//! then advances the cursor. The bus (`bus.subscribe("kafka")`) is only a low-latency wake-up;
//! a poll every `poll_interval_ms` catches anything else.
//!
//! - **At least once** across aggregator crashes and broker outages: a crash after the brokers
//!   acknowledged a batch but before the cursor moved sends that batch again on restart.
//!   Consumers dedupe by the message's `id` (`<device>:<seq>`, also the REST API's event id).
//!   The producer is idempotent (`enable.idempotence=true`), so its own retries add no
//!   duplicates.
//! - **Order per camera**: messages are keyed `<device>/<camera>` (one partition per key), sent in
//!   `id` order, and the idempotent producer keeps the order of retried batches.
//! - **Gaps** in `events.id`: on PostgreSQL, ids come from a sequence when the insert runs, so a
//!   transaction that commits late leaves a hole that fills in later (and a duplicate skipped by
//!   `ON CONFLICT DO NOTHING`, or a rolled-back batch, leaves one that never fills). The exporter
//!   stops at a hole and waits up to `gap_grace_ms` for it to fill before it goes past; an insert
//!   that takes longer than that to commit is exported out of `id` order. SQLite has one writer
//!   and never has such holes (a hole there was deleted by retention): no wait.
//! - One exporter per cursor across replicas sharing a database: a lease on the cursor row
//!   (owner, `lease_until_ms`), renewed every round; the cursor moves only for its holder.
//! - Alerts and anomalies (`alerts_topic`, `anomalies_topic`) come from the bus (local
//!   messages): best effort, not replayed after a crash.
//!
//! Payload: the event's public JSON, as `GET /api/v1/events` shows it ([`StoredEvent`]),
//! `has_snapshot` as it is when exported. Message timestamp: `observed_at_ms`.
//!
//! Metrics: [`KAFKA_EXPORTED`], [`KAFKA_FAILED`], [`KAFKA_LAG`].

use std::collections::BTreeMap;
use std::time::Duration;

use its_shared::config::ConfigErrors;
use serde::Deserialize;

use crate::store::StoredEvent;
pub use crate::store::export_cursor::{Cursor, LEASE, StartFrom};
use crate::telemetry::export::{KAFKA_EXPORTED, KAFKA_FAILED, KAFKA_LAG};

/// `[kafka]` as written in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawKafka {
    /// Export on (default off).
    pub enabled: bool,
    /// Bootstrap brokers, `host:port` each (required when enabled).
    pub brokers: Vec<String>,
    /// Topic of the events.
    pub events_topic: String,
    /// Topic of alerts; empty (the default): not exported.
    pub alerts_topic: String,
    /// Topic of anomalies; empty (the default): not exported.
    pub anomalies_topic: String,
    /// The producer's `client.id`.
    pub client_id: String,
    /// Most events per round (1..=10000).
    pub batch_size: u32,
    /// The producer's `linger.ms` (0..=10000).
    pub linger_ms: u32,
    /// How long a hole in the events' ids may stay open before the export goes past it, ms.
    pub gap_grace_ms: u64,
    /// Rounds without a wake-up from the bus, ms (50..=60000).
    pub poll_interval_ms: u64,
    /// Where a cursor that does not exist yet starts: `earliest` or `latest`.
    pub start: StartFrom,
    /// Further librdkafka properties, passed through (security: `security.protocol`,
    /// `sasl.mechanism`, `sasl.username`, `sasl.password`, `ssl.ca.location`, ...).
    pub properties: BTreeMap<String, String>,
}

impl Default for RawKafka {
    fn default() -> Self {
        Self {
            enabled: false,
            brokers: Vec::new(),
            events_topic: "its.events".to_owned(),
            alerts_topic: String::new(),
            anomalies_topic: String::new(),
            client_id: "its-aggregator".to_owned(),
            batch_size: 500,
            linger_ms: 20,
            gap_grace_ms: 5000,
            poll_interval_ms: 1000,
            start: StartFrom::Earliest,
            properties: BTreeMap::new(),
        }
    }
}

/// `[kafka]`, validated.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub enabled: bool,
    /// Comma-separated, as librdkafka takes them.
    pub brokers: String,
    pub events_topic: String,
    pub alerts_topic: Option<String>,
    pub anomalies_topic: Option<String>,
    pub client_id: String,
    pub batch_size: u32,
    pub linger_ms: u32,
    pub gap_grace: Duration,
    pub poll_interval: Duration,
    pub start: StartFrom,
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        RawKafka::default().validate(&mut ConfigErrors::new("defaults"))
    }
}

/// Properties `[kafka]` sets itself (delivery guarantees and its own keys).
const RESERVED: &[&str] =
    &["bootstrap.servers", "client.id", "enable.idempotence", "acks", "request.required.acks", "linger.ms"];

fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn valid_broker(b: &str) -> bool {
    let Some((host, port)) = b.rsplit_once(':') else { return false };
    !host.is_empty()
        && !host.contains(',')
        && !host.chars().any(char::is_whitespace)
        && port.parse::<u16>().is_ok_and(|p| p > 0)
}

impl RawKafka {
    /// The validated settings; problems are pushed to `e` with their paths.
    pub fn validate(&self, e: &mut ConfigErrors) -> KafkaConfig {
        if self.enabled && !cfg!(feature = "kafka") {
            e.push("kafka.enabled", "this build has no Kafka support (cargo feature `kafka`)");
        }
        if self.enabled && self.brokers.is_empty() {
            e.push("kafka.brokers", "at least one broker (host:port) is needed when enabled");
        }
        for (i, b) in self.brokers.iter().enumerate() {
            e.check(valid_broker(b), &format!("kafka.brokers[{i}]"), || format!("{b:?} is not host:port"));
        }
        let topic = |e: &mut ConfigErrors, path: &str, t: &str, optional: bool| -> Option<String> {
            if optional && t.is_empty() {
                return None;
            }
            e.check(valid_topic(t), path, || "a topic name: 1 to 249 of [A-Za-z0-9._-]".to_owned());
            Some(t.to_owned())
        };
        let events_topic = topic(e, "kafka.events_topic", &self.events_topic, false).unwrap_or_default();
        let alerts_topic = topic(e, "kafka.alerts_topic", &self.alerts_topic, true);
        let anomalies_topic = topic(e, "kafka.anomalies_topic", &self.anomalies_topic, true);
        e.check(
            !self.client_id.is_empty() && self.client_id.len() <= 255 && !self.client_id.chars().any(char::is_control),
            "kafka.client_id",
            || "1 to 255 characters without control characters".to_owned(),
        );
        e.check((1..=10_000).contains(&self.batch_size), "kafka.batch_size", || "must be 1..=10000".to_owned());
        e.check(self.linger_ms <= 10_000, "kafka.linger_ms", || "must be 0..=10000".to_owned());
        e.check(self.gap_grace_ms <= 600_000, "kafka.gap_grace_ms", || "must be 0..=600000".to_owned());
        e.check((50..=60_000).contains(&self.poll_interval_ms), "kafka.poll_interval_ms", || {
            "must be 50..=60000".to_owned()
        });
        for (k, v) in &self.properties {
            let path = format!("kafka.properties.\"{k}\"");
            if RESERVED.contains(&k.as_str()) {
                e.push(path, "set by [kafka] itself (brokers, client_id, linger_ms; idempotence and acks=all always)");
            } else if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
                e.push(path, "not a librdkafka property name");
            } else if v.chars().any(|c| c == '\0') {
                e.push(path, "contains NUL");
            }
        }
        KafkaConfig {
            enabled: self.enabled,
            brokers: self.brokers.join(","),
            events_topic,
            alerts_topic,
            anomalies_topic,
            client_id: self.client_id.clone(),
            batch_size: self.batch_size,
            linger_ms: self.linger_ms,
            gap_grace: Duration::from_millis(self.gap_grace_ms),
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            start: self.start,
            properties: self.properties.clone(),
        }
    }
}

/// The events of `rows` (ascending ids after `cursor`) that can be exported now: the run of
/// consecutive ids right after the cursor. A hole right after the cursor is gone past only when
/// `skip_hole` (it stayed open for the grace period, or the backend never has late commits).
/// Returns the events to send and whether a hole stopped the run before the end of `rows`.
pub fn exportable(cursor: i64, rows: &[StoredEvent], skip_hole: bool) -> (usize, bool) {
    let mut expected = cursor + 1;
    let mut n = 0;
    for (i, r) in rows.iter().enumerate() {
        if r.row_id != expected && !(i == 0 && skip_hole) {
            return (n, true);
        }
        expected = r.row_id + 1;
        n += 1;
    }
    (n, false)
}

/// The name a replica holds the export lease under: stable across restarts of the same replica
/// (so that one restarting after a crash takes its lease back at once) and distinct between
/// replicas: `[redis] replica_id` when set, else the host name and the HTTP port.
pub fn lease_owner(replica_id: &str, http_port: u16) -> String {
    if !replica_id.is_empty() {
        return replica_id.to_owned();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "aggregator".to_owned());
    format!("{host}:{http_port}")
}

/// `device/camera` of an alert's or anomaly's JSON (`device_id` or `device`, and `camera`).
pub fn device_and_camera(v: &serde_json::Value) -> (Option<&str>, Option<&str>) {
    let device = v.get("device_id").or_else(|| v.get("device")).and_then(|d| d.as_str());
    let camera = v.get("camera").and_then(|c| c.as_str());
    (device, camera)
}

#[cfg(feature = "kafka")]
pub use producer::KafkaExporter;

#[cfg(feature = "kafka")]
mod producer {
    use std::sync::Arc;
    use std::time::Duration;

    use rdkafka::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
    use tokio::sync::{Notify, watch};
    use tokio::time::Instant;

    use super::{Cursor, KAFKA_EXPORTED, KAFKA_FAILED, KAFKA_LAG, KafkaConfig, device_and_camera, exportable};
    use crate::bus::{BusMessage, EventBus};
    use crate::store::Db;

    /// The exporter of one aggregator: events from the database, alerts and anomalies from the
    /// bus.
    pub struct KafkaExporter {
        cfg: KafkaConfig,
        /// Replaced after a fatal error (an idempotent producer that lost its sequence state,
        /// e.g. a broker that restarted without its data).
        producer: std::sync::Mutex<FutureProducer>,
        cursor: Cursor,
        /// SQLite never has late commits: a hole is gone past at once.
        late_commits: bool,
    }

    impl KafkaExporter {
        /// The producer (it connects lazily) and the cursor `kafka:<events_topic>`. `owner` names
        /// this replica in the cursor's lease.
        pub fn new(cfg: &KafkaConfig, db: Db, owner: &str) -> anyhow::Result<Self> {
            let producer = std::sync::Mutex::new(create_producer(cfg)?);
            let cursor = Cursor::new(db, format!("kafka:{}", cfg.events_topic), owner);
            let late_commits = cursor.late_commits();
            Ok(Self { cfg: cfg.clone(), producer, cursor, late_commits })
        }

        fn producer(&self) -> FutureProducer {
            match self.producer.lock() {
                Ok(p) => p.clone(),
                Err(poisoned) => poisoned.into_inner().clone(),
            }
        }

        /// Replaces the producer after a failed round: an idempotent producer whose messages
        /// timed out (or that failed fatally) may not recover its sequence state with a broker
        /// that restarted, and the round sends everything after the cursor again anyway.
        fn renew(&self) {
            if let Some((code, reason)) = self.producer().client().fatal_error() {
                tracing::warn!(?code, %reason, "kafka export: producer failed fatally");
            }
            match create_producer(&self.cfg) {
                Ok(p) => {
                    let old = match self.producer.lock() {
                        Ok(mut slot) => std::mem::replace(&mut *slot, p),
                        Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), p),
                    };
                    // Dropping a producer purges and flushes it (blocking, up to 500 ms).
                    tokio::task::spawn_blocking(move || drop(old));
                }
                Err(e) => tracing::warn!(error = %e, "kafka export: cannot create a producer"),
            }
        }

        /// The cursor this exporter moves.
        pub fn cursor(&self) -> &Cursor {
            &self.cursor
        }

        /// Exports until `shutdown` turns true.
        pub async fn run(self, bus: EventBus, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
            tracing::info!(brokers = %self.cfg.brokers, topic = %self.cfg.events_topic, "kafka export on");
            let wake = Arc::new(Notify::new());
            let side = tokio::spawn(side_channel(
                self.cfg.clone(),
                self.producer(),
                bus.subscribe("kafka"),
                Arc::clone(&wake),
                shutdown.clone(),
            ));
            let mut state = State { hole: None, failures: 0 };
            let mut created = false;
            loop {
                if *shutdown.borrow() {
                    break;
                }
                let wait = if !created {
                    match self.cursor.ensure(self.cfg.start, crate::unix_ms()).await {
                        Ok(()) => {
                            created = true;
                            Duration::ZERO
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "kafka export: cannot create the cursor");
                            Duration::from_secs(1)
                        }
                    }
                } else {
                    match self.round(&mut state).await {
                        Ok(Round::More) => Duration::ZERO,
                        Ok(Round::Idle) => self.cfg.poll_interval,
                        Ok(Round::Hole) => self.cfg.poll_interval.min(Duration::from_millis(200)),
                        Err(e) => {
                            self.renew();
                            state.failures = state.failures.saturating_add(1);
                            let backoff = Duration::from_millis(200).saturating_mul(1 << state.failures.min(7));
                            tracing::warn!(error = %e, "kafka export round failed; retrying");
                            backoff.min(Duration::from_secs(30))
                        }
                    }
                };
                if wait.is_zero() {
                    tokio::task::yield_now().await;
                    continue;
                }
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait_for(|s| *s) => break,
                }
            }
            side.abort();
            if let Err(e) = self.cursor.release().await {
                tracing::warn!(error = %e, "kafka export: cannot release the cursor lease");
            }
            Ok(())
        }

        /// One round: lease, read, produce, wait for the acknowledgements, advance.
        async fn round(&self, state: &mut State) -> anyhow::Result<Round> {
            let Some(cursor) = self.cursor.lease(crate::unix_ms()).await? else {
                return Ok(Round::Idle); // another replica exports
            };
            let rows = self.cursor.events_after(cursor, self.cfg.batch_size).await?;
            let skip = match state.hole {
                _ if !self.late_commits => true,
                Some((at, since)) if at == cursor => since.elapsed() >= self.cfg.gap_grace,
                _ => false,
            };
            let (n, hole) = exportable(cursor, &rows, skip);
            if n == 0 {
                self.lag(cursor).await;
                if hole {
                    if !matches!(state.hole, Some((at, _)) if at == cursor) {
                        state.hole = Some((cursor, Instant::now()));
                    }
                    return Ok(Round::Hole);
                }
                return Ok(Round::Idle);
            }
            if skip && rows.first().is_some_and(|r| r.row_id != cursor + 1) {
                tracing::info!(
                    after = cursor,
                    next = rows.first().map(|r| r.row_id),
                    "kafka export: going past ids that never committed"
                );
            }
            state.hole = None;
            let batch = &rows[..n];
            let topic = self.cfg.events_topic.as_str();
            let producer = self.producer();
            let mut pending = Vec::with_capacity(batch.len());
            for ev in batch {
                let key = format!("{}/{}", ev.device_id, ev.camera);
                let payload = serde_json::to_vec(ev)?;
                let record = FutureRecord::to(topic).key(&key).payload(&payload).timestamp(ev.observed_at_ms);
                match producer.send_result(record) {
                    Ok(f) => pending.push((ev.row_id, f)),
                    Err((e, _)) => {
                        // Local queue full or similar: send what was queued, the rest next round.
                        tracing::warn!(error = %e, "kafka export: cannot queue a message");
                        break;
                    }
                }
            }
            let mut acked_to = cursor;
            let mut ok = 0u64;
            let mut failed = 0u64;
            let mut first_error = None;
            for (id, f) in pending {
                match f.await {
                    Ok(Ok(_)) if failed == 0 => {
                        acked_to = id;
                        ok += 1;
                    }
                    Ok(Ok(_)) => ok += 1,
                    Ok(Err((e, _))) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                    Err(_) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| "delivery canceled".to_owned());
                    }
                }
            }
            metrics::counter!(KAFKA_EXPORTED, "topic" => topic.to_owned()).increment(ok);
            if failed > 0 {
                metrics::counter!(KAFKA_FAILED, "topic" => topic.to_owned()).increment(failed);
            }
            if acked_to > cursor && !self.cursor.advance(acked_to, crate::unix_ms()).await? {
                tracing::warn!("kafka export: lost the cursor lease; another replica exports");
                return Ok(Round::Idle);
            }
            self.lag(acked_to).await;
            if let Some(e) = first_error {
                anyhow::bail!("{failed} message(s) not acknowledged: {e}");
            }
            state.failures = 0;
            Ok(if rows.len() as u32 >= self.cfg.batch_size || n < rows.len() { Round::More } else { Round::Idle })
        }

        async fn lag(&self, cursor: i64) {
            if let Ok(max) = self.cursor.max_event_id().await {
                metrics::gauge!(KAFKA_LAG).set((max - cursor).max(0) as f64);
            }
        }
    }

    fn create_producer(cfg: &KafkaConfig) -> anyhow::Result<FutureProducer> {
        let mut cc = ClientConfig::new();
        for (k, v) in &cfg.properties {
            cc.set(k, v);
        }
        cc.set("bootstrap.servers", &cfg.brokers)
            .set("client.id", &cfg.client_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", cfg.linger_ms.to_string());
        // Deliveries not acknowledged within this fail, and the round sends them again from the
        // cursor (librdkafka's default, 5 minutes, would hold the export that long).
        if !cfg.properties.contains_key("message.timeout.ms") && !cfg.properties.contains_key("delivery.timeout.ms") {
            cc.set("message.timeout.ms", "30000");
        }
        Ok(cc.create()?)
    }

    struct State {
        /// A hole right after this cursor position, first seen then.
        hole: Option<(i64, Instant)>,
        failures: u32,
    }

    enum Round {
        More,
        Idle,
        Hole,
    }

    /// Wakes the exporter on new events and sends alerts and anomalies (best effort).
    async fn side_channel(
        cfg: KafkaConfig,
        producer: FutureProducer,
        mut rx: crate::bus::BusReceiver,
        wake: Arc<Notify>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let m = tokio::select! {
                m = rx.recv_local() => match m { Some(m) => m, None => return },
                _ = shutdown.wait_for(|s| *s) => return,
            };
            let (topic, value) = match &*m {
                BusMessage::Events(_) => {
                    wake.notify_one();
                    continue;
                }
                BusMessage::Alert { alert } => (cfg.alerts_topic.clone(), alert.clone()),
                BusMessage::Anomaly { anomaly } => (cfg.anomalies_topic.clone(), anomaly.clone()),
                _ => continue,
            };
            let Some(topic) = topic else { continue };
            let producer = producer.clone();
            tokio::spawn(async move {
                let key = match device_and_camera(&value) {
                    (Some(d), Some(c)) => format!("{d}/{c}"),
                    (Some(d), None) => d.to_owned(),
                    _ => value.get("id").map(|v| v.to_string()).unwrap_or_default(),
                };
                let Ok(payload) = serde_json::to_vec(&value) else { return };
                let record = FutureRecord::to(&topic).key(&key).payload(&payload);
                match producer.send(record, Duration::from_secs(5)).await {
                    Ok(_) => metrics::counter!(KAFKA_EXPORTED, "topic" => topic.clone()).increment(1),
                    Err((e, _)) => {
                        metrics::counter!(KAFKA_FAILED, "topic" => topic.clone()).increment(1);
                        tracing::warn!(error = %e, topic = %topic, "kafka export: message not acknowledged");
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(raw: &RawKafka) -> (KafkaConfig, Vec<String>) {
        let mut e = ConfigErrors::new("test");
        let cfg = raw.validate(&mut e);
        (cfg, e.issues.iter().map(|i| i.path.clone()).collect())
    }

    #[test]
    fn off_by_default_and_every_problem_is_reported() {
        let (cfg, errors) = validate(&RawKafka::default());
        assert!(errors.is_empty(), "{errors:?}");
        assert!(!cfg.enabled);
        assert_eq!((cfg.events_topic.as_str(), cfg.alerts_topic.as_deref()), ("its.events", None));
        let mut properties = BTreeMap::new();
        properties.insert("acks".to_owned(), "1".to_owned());
        properties.insert("security.protocol".to_owned(), "SASL_SSL".to_owned());
        let raw = RawKafka {
            enabled: true,
            brokers: vec!["kafka-1:9092".into(), "nope".into()],
            events_topic: "bad topic".into(),
            alerts_topic: "its.alerts".into(),
            batch_size: 0,
            poll_interval_ms: 1,
            properties,
            ..RawKafka::default()
        };
        let (cfg, errors) = validate(&raw);
        assert_eq!(
            errors,
            vec![
                "kafka.brokers[1]",
                "kafka.events_topic",
                "kafka.batch_size",
                "kafka.poll_interval_ms",
                "kafka.properties.\"acks\""
            ]
        );
        assert_eq!(cfg.alerts_topic.as_deref(), Some("its.alerts"));
        let (_, errors) = validate(&RawKafka { enabled: true, ..RawKafka::default() });
        assert_eq!(errors, vec!["kafka.brokers"]);
    }

    fn ev(row_id: i64) -> StoredEvent {
        StoredEvent {
            row_id,
            device_id: "d".into(),
            seq: row_id as u64,
            camera: "c".into(),
            kind: "counts".into(),
            label: None,
            observed_at_ms: 0,
            ingested_at_ms: 0,
            payload: serde_json::json!({}),
            has_snapshot: false,
        }
    }

    #[test]
    fn the_export_stops_at_holes_until_told_to_go_past() {
        let rows: Vec<_> = [5, 6, 8, 9].into_iter().map(ev).collect();
        assert_eq!(exportable(4, &rows, false), (2, true), "5 and 6, then a hole at 7");
        assert_eq!(exportable(6, &rows[2..], false), (0, true), "hole at 7 right after the cursor");
        assert_eq!(exportable(6, &rows[2..], true), (2, false), "gone past 7");
        assert_eq!(exportable(3, &rows, false), (0, true), "hole at 4");
        assert_eq!(exportable(3, &rows, true), (2, true), "past 4, stops at 7");
        assert_eq!(exportable(9, &[], false), (0, false));
    }

    #[test]
    fn alerts_name_their_camera() {
        let v = serde_json::json!({"device": "box-1", "camera": "cam-a"});
        assert_eq!(device_and_camera(&v), (Some("box-1"), Some("cam-a")));
        let v = serde_json::json!({"device_id": "box-1"});
        assert_eq!(device_and_camera(&v), (Some("box-1"), None));
    }
}
