//! Event storage: one [`EventStore`] trait, one implementation per backend (SQLite, PostgreSQL).
//!
//! - The ingest path calls [`EventStore::record_hello`] when a device connects (its answer is the
//!   high-water mark the session acknowledges first), [`EventStore::insert_events`] for every
//!   accepted batch (one transaction, idempotent on `(device_id, seq)`, durable when it returns)
//!   and [`EventStore::record_health`] for heartbeats.
//! - The REST API reads with [`EventStore::list_devices`] and [`EventStore::query_events`]
//!   (keyset pagination, newest first, with an opaque cursor; filters on device, camera, kind,
//!   site, class, zone, line, direction, speed, snapshot and time, within the caller's
//!   [`Scope`]).
//! - Sites, devices and cameras as managed resources, the health history and whether a device is
//!   disabled: [`Fleet`] (written once for both backends, see [`fleet`]).
//! - Snapshots: the ingest puts an event's pictures into object storage (see
//!   [`crate::snapshots`]), then records where with [`EventStore::record_snapshot`] (idempotent on
//!   `(device_id, seq)`, durable when it returns) and only then confirms to the agent; the API
//!   finds them with [`EventStore::snapshot_for_event`].
//!
//! Both backends keep the same schema (see `migrations/sqlite` and `migrations/postgres`) and
//! pass the same test suite (`tests/storage.rs`).
//!
//! This module is the only one that writes SQL. Inside, one file per group of tables, written
//! once for both backends with [`on_db!`](crate::store::db) where the SQL is the same: [`fleet`]
//! (sites, devices, cameras, health history), [`auth`] (users, sessions, keys, audit),
//! [`alerts`] (rules, channels, alerts, deliveries), [`rollups`] (metrics, anomalies and their
//! dirty marks), [`mqtt_credentials`], [`export_cursor`], [`retention`] (policy, passes, size),
//! [`sealed`] (which columns are encrypted); what differs per backend lives in [`sqlite`] and
//! [`postgres`] (with TimescaleDB, [`postgres::timescale`]). Rows are decoded from
//! `sqlx::FromRow` structs; every list pages with one [`PageCursor`] and filters by the caller's
//! [`Scope`] with one condition ([`scope`]). Outside this module a [`Db`] is an opaque handle
//! from which these stores are made.
//!
//! Dependencies: [`crate::model`], [`crate::vault`], [`crate::pki`] (device ids),
//! [`crate::snapshots`] (retention deletes objects), [`crate::telemetry`], [`crate::fsutil`].
//! Never analytics, alerts, auth, bus or http.

use std::sync::Arc;

use async_trait::async_trait;
use its_shared::event::{DeviceHealth, EventEnvelope, EventKind, KIND_NAMES};
use its_shared::wire::{Heartbeat, Hello};
use serde::Serialize;
use serde::ser::SerializeStruct as _;
use sqlx::QueryBuilder;

pub mod alerts;
pub mod auth;
pub mod cursor;
pub mod db;
mod events;
pub mod export_cursor;
pub mod fleet;
pub mod mqtt_credentials;
pub mod postgres;
pub mod retention;
pub mod rollups;
pub mod scope;
pub mod sealed;
pub mod sqlite;

pub use cursor::PageCursor;
pub use db::{Db, Pools};
pub use fleet::{
    CameraDetail, CameraPatch, DeviceDetail, DevicePatch, Fleet, HealthSample, MAX_HEALTH_HISTORY_LIMIT, SiteRecord,
};
pub(crate) use scope::push_events_scope;

pub use postgres::PostgresStore;
pub use retention::{Retention, RetentionPolicy, RetentionReason, RetentionReport, RetentionRun, StorageSize};
pub use sqlite::SqliteStore;

/// Default page size of [`EventStore::query_events`].
pub const DEFAULT_PAGE_LIMIT: u32 = 100;
/// Largest page size of [`EventStore::query_events`].
pub const MAX_PAGE_LIMIT: u32 = 1000;

/// Everything that can go wrong in storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL names no supported backend or is malformed.
    #[error("invalid database configuration: {0}")]
    Config(String),
    /// The database cannot be reached right now (connect or I/O failure, pool timeout or closed).
    /// Retrying later may succeed.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Applying the schema migrations failed.
    #[error("schema migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// The query's parameters are invalid (unknown kind, limit out of range, `from` after `to`).
    /// The message is safe to show to the caller.
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// The pagination cursor was not issued by this service (malformed or tampered with).
    #[error("invalid pagination cursor")]
    BadCursor,
    /// A value from a device cannot be stored (e.g. a sequence number above `i64::MAX`).
    #[error("value cannot be stored: {0}")]
    InvalidData(String),
    /// A stored row could not be decoded (corrupt JSON, negative sequence number, ...).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Any other database error.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// The thing named does not exist (the message names it and is safe to show).
    #[error("not found: {0}")]
    NotFound(String),
    /// The change conflicts with what is stored (a name already taken, ...); safe to show.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The caller's scope does not cover what the change touches or where it would move it
    /// (the message is safe to show).
    #[error("forbidden: {0}")]
    Forbidden(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            sqlx::Error::Configuration(c) => StoreError::Config(c.to_string()),
            sqlx::Error::Migrate(m) => StoreError::Migration(*m),
            other => StoreError::Database(other),
        }
    }
}

/// Result of [`EventStore::insert_events`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InsertOutcome {
    /// Events newly stored.
    pub inserted: u64,
    /// Events of the batch already stored before (same `(device_id, seq)`), left unchanged.
    pub duplicates: u64,
    /// Sequence numbers of the events newly stored, ascending: what goes on the bus.
    pub new_seqs: Vec<u64>,
}

impl InsertOutcome {
    /// From the batch size and the `RETURNING seq` of the insert.
    pub(crate) fn from_new_seqs(batch: usize, new: Vec<i64>) -> Result<Self, StoreError> {
        let mut new_seqs = new.into_iter().map(seq_from_db).collect::<Result<Vec<_>, _>>()?;
        new_seqs.sort_unstable();
        let inserted = new_seqs.len() as u64;
        Ok(Self { inserted, duplicates: (batch as u64).saturating_sub(inserted), new_seqs })
    }
}

/// One device as the aggregator knows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceRecord {
    pub device_id: String,
    /// First hello (or heartbeat), Unix ms, aggregator clock.
    pub first_seen_ms: i64,
    /// Latest hello or heartbeat, Unix ms, aggregator clock.
    pub last_seen_ms: i64,
    pub agent_version: String,
    pub model: String,
    pub cameras: Vec<String>,
    /// Latest heartbeat's health report.
    pub last_health: Option<DeviceHealth>,
    /// When that heartbeat arrived, Unix ms, aggregator clock.
    pub last_health_ms: Option<i64>,
    /// Highest sequence number stored for the device (0 if none).
    pub high_water_seq: u64,
}

/// A camera as grants and scopes name it: the device that serves it and its id on that device.
/// Written `device/camera` in the API (device ids never contain `/`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
pub struct CameraRef {
    pub device_id: String,
    pub camera: String,
}

impl CameraRef {
    /// Parses `device/camera` (a valid device id, a non-empty camera id of at most 128 bytes).
    pub fn parse(s: &str) -> Option<Self> {
        let (device, camera) = s.split_once('/')?;
        crate::pki::validate_device_id(device).ok()?;
        if camera.is_empty() || camera.len() > 128 || camera.chars().any(char::is_control) {
            return None;
        }
        Some(Self { device_id: device.to_owned(), camera: camera.to_owned() })
    }
}

impl std::fmt::Display for CameraRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.device_id, self.camera)
    }
}

/// What a caller may see. `All` for unrestricted roles; `Limited` for a viewer or integrator
/// granted some sites and/or cameras: it sees the cameras of those sites (a camera's site is its
/// own assignment, else its device's) and the cameras named, and nothing else. An empty
/// `Limited` sees nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Scope {
    #[default]
    All,
    Limited {
        sites: Vec<String>,
        cameras: Vec<CameraRef>,
    },
}

/// Filter and page of [`EventStore::query_events`]. Every field is optional; the filters given
/// all apply (AND).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventQuery {
    pub device: Option<String>,
    pub camera: Option<String>,
    /// One of [`KIND_NAMES`].
    pub kind: Option<String>,
    /// Events of the cameras whose effective site (their own assignment, else their device's)
    /// is this one.
    pub site: Option<String>,
    /// The object class (`car`, `truck`, ...); API parameter `class`.
    pub label: Option<String>,
    /// The zone of zone events, speed measurements with a zone, wrong way, congestion, occupancy.
    pub zone: Option<String>,
    /// The line of line crossings and counts.
    pub line: Option<String>,
    /// `in` or `out` (line crossings).
    pub direction: Option<String>,
    /// Inclusive bounds on the event's speed: `speed_kmh` of a line crossing, speed measurement
    /// or wrong way, `mean_speed_kmh` of congestion. Events without a speed never match them.
    pub min_speed_kmh: Option<f64>,
    pub max_speed_kmh: Option<f64>,
    /// Only events with (`true`) or without (`false`) a snapshot.
    pub has_snapshot: Option<bool>,
    /// What the caller may see (from its credentials, never from the query string). An empty
    /// [`Scope::Limited`] matches nothing.
    pub scope: Scope,
    /// Inclusive lower bound on `observed_at_ms`.
    pub from_ms: Option<i64>,
    /// Exclusive upper bound on `observed_at_ms`.
    pub to_ms: Option<i64>,
    /// Page size, 1..=[`MAX_PAGE_LIMIT`]; [`DEFAULT_PAGE_LIMIT`] when absent.
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A page of events, newest first (by `observed_at_ms`, then storage order).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventPage {
    pub events: Vec<StoredEvent>,
    /// Present when more events match: pass it as [`EventQuery::cursor`] for the next page.
    pub next_cursor: Option<String>,
}

/// How the API names an event: `"<device>:<seq>"` (device ids never contain `:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventId {
    pub device_id: String,
    pub seq: u64,
}

impl EventId {
    /// Parses `"<device>:<seq>"`: a valid device id ([`crate::pki::validate_device_id`]) and a
    /// sequence number in decimal digits (no sign, no leading `+`). `None` when malformed.
    pub fn parse(s: &str) -> Option<Self> {
        let (device, seq) = s.rsplit_once(':')?;
        crate::pki::validate_device_id(device).ok()?;
        if seq.is_empty() || seq.len() > 20 || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Self { device_id: device.to_owned(), seq: seq.parse().ok()? })
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.device_id, self.seq)
    }
}

/// One stored event. Serializes to the public JSON form:
/// `{"id": "<device>:<seq>", "device_id", "seq", "camera", "kind", "label", "@timestamp",
/// "observed_at_ms", "ingested_at_ms", "payload", "has_snapshot"}`; with `has_snapshot` the
/// pictures are at `GET /api/v1/events/{id}/snapshot`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Storage row id (pagination tie-breaker; not part of the public form).
    pub row_id: i64,
    pub device_id: String,
    pub seq: u64,
    pub camera: String,
    pub kind: String,
    pub label: Option<String>,
    pub observed_at_ms: i64,
    pub ingested_at_ms: i64,
    pub payload: serde_json::Value,
    /// A snapshot of this event is stored.
    pub has_snapshot: bool,
}

impl Serialize for StoredEvent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("StoredEvent", 11)?;
        s.serialize_field("id", &format!("{}:{}", self.device_id, self.seq))?;
        s.serialize_field("device_id", &self.device_id)?;
        s.serialize_field("seq", &self.seq)?;
        s.serialize_field("camera", &self.camera)?;
        s.serialize_field("kind", &self.kind)?;
        s.serialize_field("label", &self.label)?;
        s.serialize_field("@timestamp", &format_timestamp_ms(self.observed_at_ms))?;
        s.serialize_field("observed_at_ms", &self.observed_at_ms)?;
        s.serialize_field("ingested_at_ms", &self.ingested_at_ms)?;
        s.serialize_field("payload", &self.payload)?;
        s.serialize_field("has_snapshot", &self.has_snapshot)?;
        s.end()
    }
}

/// What is stored for one device (tests and fault tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EventSummary {
    /// Rows stored.
    pub total: u64,
    /// Distinct sequence numbers stored (equals `total` while the unique key holds).
    pub distinct_seqs: u64,
    pub min_seq: Option<u64>,
    pub max_seq: Option<u64>,
}

/// A snapshot to record: its pictures are already in object storage under these keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSnapshot<'a> {
    /// Sequence number of the event the pictures belong to.
    pub seq: u64,
    pub camera: &'a str,
    /// Capture time, Unix ms, agent clock.
    pub taken_at_ms: i64,
    pub full_key: &'a str,
    pub full_bytes: u64,
    /// Key and size of the crop, if the agent sent one.
    pub crop: Option<(&'a str, u64)>,
}

/// Where the pictures of one event are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotRecord {
    pub device_id: String,
    pub seq: u64,
    pub camera: String,
    pub taken_at_ms: i64,
    pub full_key: String,
    pub full_bytes: u64,
    pub crop_key: Option<String>,
    pub crop_bytes: Option<u64>,
    /// When the aggregator recorded it, Unix ms, aggregator clock.
    pub stored_at_ms: i64,
}

/// Answer of [`EventStore::snapshot_for_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotLookup {
    /// No such event is stored.
    NoEvent,
    /// The event is stored, without a snapshot.
    NoSnapshot,
    Found(SnapshotRecord),
}

/// Storage of devices and events. Object safe: the service holds an `Arc<dyn EventStore>`.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Upserts the device row (`first_seen_ms` kept; `last_seen_ms`, agent version, model and
    /// cameras updated) and returns the high-water mark: the highest `seq` stored for the device
    /// (0 if none).
    async fn record_hello(&self, device_id: &str, hello: &Hello, now_ms: i64) -> Result<u64, StoreError>;

    /// Stores a batch in ONE transaction, skipping events whose `(device_id, seq)` is already
    /// stored. Durable when it returns `Ok`: the caller acknowledges only then.
    async fn insert_events(
        &self,
        device_id: &str,
        events: &[EventEnvelope],
        now_ms: i64,
    ) -> Result<InsertOutcome, StoreError> {
        let rows = prepare_rows(events)?;
        if rows.is_empty() {
            return Ok(InsertOutcome::default());
        }
        match &self.db().pools {
            Pools::Sqlite { writer, .. } => sqlite::insert_events(writer, device_id, events, rows, now_ms).await,
            Pools::Postgres(pool) => postgres::insert_events(pool, device_id, events, rows, now_ms).await,
        }
    }

    /// Stores the heartbeat's health report on the device row (creating the row if needed).
    async fn record_health(&self, device_id: &str, hb: &Heartbeat, now_ms: i64) -> Result<(), StoreError>;

    /// Highest `seq` stored for the device (0 if none).
    async fn high_water(&self, device_id: &str) -> Result<u64, StoreError> {
        events::high_water(&self.db(), device_id).await
    }

    /// All devices, ordered by id.
    async fn list_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        events::list_devices(&self.db()).await
    }

    /// One page of events matching the query, newest first.
    async fn query_events(&self, q: &EventQuery) -> Result<EventPage, StoreError> {
        events::query_events(&self.db(), q).await
    }

    /// Rows, distinct sequence numbers and min/max `seq` stored for a device.
    async fn device_event_summary(&self, device_id: &str) -> Result<EventSummary, StoreError> {
        events::device_event_summary(&self.db(), device_id).await
    }

    /// All sequence numbers stored for a device, ascending.
    async fn device_seqs(&self, device_id: &str) -> Result<Vec<u64>, StoreError> {
        events::device_seqs(&self.db(), device_id).await
    }

    /// Records the snapshot of event `snap.seq` of the device, whose pictures are already in
    /// object storage. Idempotent on `(device_id, seq)`: when a snapshot is already recorded,
    /// nothing changes and the answer is `false`. Durable when it returns `Ok`: the caller
    /// confirms to the agent only then.
    async fn record_snapshot(&self, device_id: &str, snap: &NewSnapshot<'_>, now_ms: i64) -> Result<bool, StoreError> {
        events::record_snapshot(&self.db(), device_id, snap, now_ms).await
    }

    /// Whether a snapshot of event `seq` of the device is recorded.
    async fn has_snapshot(&self, device_id: &str, seq: u64) -> Result<bool, StoreError> {
        events::has_snapshot(&self.db(), device_id, seq).await
    }

    /// The snapshot of an event, telling apart an event that is not stored (even if pictures
    /// for it arrived) from one without a snapshot.
    async fn snapshot_for_event(&self, id: &EventId) -> Result<SnapshotLookup, StoreError> {
        events::snapshot_for_event(&self.db(), id).await
    }

    /// A cheap round trip to the database (health checks).
    async fn ping(&self) -> Result<(), StoreError> {
        events::ping(&self.db()).await
    }

    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;

    /// The connection pools, for the storage written once for both backends (see [`db`]).
    fn db(&self) -> Db;
}

/// Opens (and migrates) the store named by `url`:
/// - `sqlite://path/to/file.db` (created if missing; WAL, `synchronous=FULL`, foreign keys on),
/// - `sqlite::memory:` (one private in-memory database, for tests),
/// - `postgres://...` or `postgresql://...`.
///
/// `vault` seals the secret columns ([`sealed`]); see [`crate::vault`] for where it comes from.
pub async fn open_store(url: &str, vault: crate::vault::Vault) -> Result<Arc<dyn EventStore>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(url, vault).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::open(url, vault).await?))
    } else {
        Err(StoreError::Config("database URL must start with sqlite: or postgres://".to_owned()))
    }
}

/// Opens the store with the key ring of `source` ([`crate::vault`]) and seals what is not
/// sealed with its active key yet ([`sealed::seal_all`]). The key file is created (mode 0600) only
/// when it is missing and the database holds nothing sealed; a database that holds secrets sealed
/// with keys the ring lacks is refused, naming them.
pub async fn open_store_with_secrets(
    url: &str,
    source: &crate::vault::KeySource,
) -> Result<Arc<dyn EventStore>, StoreError> {
    let (vault, created) = crate::vault::Vault::load(source, true)?;
    let store = open_store(url, vault.clone()).await?;
    let in_use = sealed::key_ids_in_use(&store.db()).await?;
    let missing: Vec<&String> = in_use.iter().filter(|k| !vault.key_ids().contains(k)).collect();
    if !missing.is_empty() {
        if created && let crate::vault::KeySource::File(path) = source {
            let _ = std::fs::remove_file(path);
        }
        return Err(StoreError::Config(format!(
            "the database holds secrets sealed with key(s) {missing:?}, which the key ring {} lacks \
             (restore the key file the database was used with, or set {})",
            source.describe(),
            crate::vault::KEYRING_ENV
        )));
    }
    if created {
        tracing::warn!(
            key_file = %source.describe(),
            "created the secrets key file: back it up, apart from the database (without it the stored secrets cannot be read)"
        );
    }
    let report = sealed::seal_all(&store.db()).await?;
    if report.plain + report.resealed > 0 {
        tracing::info!(plain = report.plain, resealed = report.resealed, "sealed stored secrets with the active key");
    }
    Ok(store)
}

// ---------------------------------------------------------------------------------------------
// Shared by the backends.

/// An event prepared for insertion: every conversion that can fail is done before the
/// transaction starts.
#[derive(Debug)]
pub(crate) struct RowIn<'a> {
    pub seq: i64,
    pub camera: &'a str,
    pub kind: &'static str,
    pub observed_at_ms: i64,
    pub label: Option<&'a str>,
    pub payload: String,
    /// Filter columns (see [`filter_columns`]).
    pub zone: Option<&'a str>,
    pub line: Option<&'a str>,
    pub direction: Option<&'static str>,
    pub speed_kmh: Option<f64>,
}

/// The filter columns of an event: `(zone, line, direction, speed_kmh)`. The speed is the one
/// the payload shows: `speed_kmh` of a line crossing, speed measurement or wrong way,
/// `mean_speed_kmh` of congestion; as `f64` with the value of its shortest decimal form (the
/// payload's `55.3`, not the `55.29999923706055` of a plain widening), so that a filter bound
/// written as the payload shows it matches. Non-finite speeds (`null` in the payload) are none.
pub(crate) fn filter_columns(kind: &EventKind) -> (Option<&str>, Option<&str>, Option<&'static str>, Option<f64>) {
    fn speed(v: Option<f32>) -> Option<f64> {
        v.filter(|v| v.is_finite()).and_then(|v| v.to_string().parse::<f64>().ok())
    }
    match kind {
        EventKind::LineCrossing { line, direction, speed_kmh, .. } => {
            (None, Some(line), Some(direction.as_str()), speed(*speed_kmh))
        }
        EventKind::SpeedMeasurement { speed_kmh, zone, .. } => (zone.as_deref(), None, None, speed(Some(*speed_kmh))),
        EventKind::ZoneEnter { zone, .. }
        | EventKind::ZoneExit { zone, .. }
        | EventKind::ZoneDwell { zone, .. }
        | EventKind::StoppedVehicle { zone, .. }
        | EventKind::ZoneOccupancy { zone, .. } => (Some(zone), None, None, None),
        EventKind::WrongWay { zone, speed_kmh, .. } => (Some(zone), None, None, speed(*speed_kmh)),
        EventKind::Congestion { zone, mean_speed_kmh, .. } => (Some(zone), None, None, speed(*mean_speed_kmh)),
        EventKind::Counts { line, .. } => (None, Some(line), None, None),
        EventKind::ObjectTrack { .. } | EventKind::DeviceHealth(_) => (None, None, None, None),
    }
}

pub(crate) fn prepare_rows(events: &[EventEnvelope]) -> Result<Vec<RowIn<'_>>, StoreError> {
    events
        .iter()
        .map(|e| {
            let seq = seq_to_db(e.seq)?;
            let payload = payload_text(&e.kind)
                .map_err(|err| StoreError::InvalidData(format!("payload of seq {}: {err}", e.seq)))?;
            let (zone, line, direction, speed_kmh) = filter_columns(&e.kind);
            Ok(RowIn {
                seq,
                camera: &e.camera,
                kind: e.kind.name(),
                observed_at_ms: e.observed_at_ms,
                label: e.kind.object().map(|o| o.label.as_str()),
                payload,
                zone,
                line,
                direction,
                speed_kmh,
            })
        })
        .collect()
}

/// The public `payload` ([`EventKind::payload_json`]) as JSON text, without building a
/// `serde_json::Value` first (three times faster on the ingest path): the externally tagged form
/// is `{"<kind name>":<payload>}`, so the payload is that text without its wrapper. `f32` fields
/// keep their shortest form (`0.1`, where the detour through `f64` gives `0.10000000149011612`).
pub(crate) fn payload_text(kind: &EventKind) -> Result<String, serde_json::Error> {
    let mut text = serde_json::to_string(kind)?;
    let name = kind.name();
    let wrapped = text.len() > name.len() + 5
        && text.starts_with("{\"")
        && text[2..].starts_with(name)
        && text[2 + name.len()..].starts_with("\":")
        && text.ends_with('}');
    if !wrapped {
        return serde_json::to_string(&kind.payload_json());
    }
    text.pop();
    text.drain(..name.len() + 4);
    Ok(text)
}

pub(crate) fn seq_to_db(seq: u64) -> Result<i64, StoreError> {
    i64::try_from(seq).map_err(|_| StoreError::InvalidData(format!("sequence number {seq} exceeds i64::MAX")))
}

pub(crate) fn seq_from_db(seq: i64) -> Result<u64, StoreError> {
    u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("negative sequence number {seq}")))
}

pub(crate) fn count_from_db(n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("negative count {n}")))
}

pub(crate) fn cameras_json(cameras: &[String]) -> Result<String, StoreError> {
    serde_json::to_string(cameras).map_err(|e| StoreError::InvalidData(format!("cameras: {e}")))
}

/// The cameras of a hello, each once, in their order (a hello may repeat one).
pub(crate) fn distinct_cameras(cameras: &[String]) -> Vec<&str> {
    let mut seen = std::collections::HashSet::with_capacity(cameras.len());
    cameras.iter().map(String::as_str).filter(|c| seen.insert(*c)).collect()
}

pub(crate) fn health_json(health: &DeviceHealth) -> Result<String, StoreError> {
    serde_json::to_string(health).map_err(|e| StoreError::InvalidData(format!("health: {e}")))
}

/// Row of the devices table as both backends select it (JSON columns as text, and the highest
/// stored sequence number as `high_water`).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct DeviceRow {
    device_id: String,
    first_seen_ms: i64,
    last_seen_ms: i64,
    agent_version: String,
    model: String,
    cameras: String,
    last_health: Option<String>,
    last_health_ms: Option<i64>,
    high_water: i64,
}

pub(crate) fn device_from_row(row: DeviceRow) -> Result<DeviceRecord, StoreError> {
    let DeviceRow {
        device_id,
        first_seen_ms,
        last_seen_ms,
        agent_version,
        model,
        cameras,
        last_health: health,
        last_health_ms,
        high_water: hw,
    } = row;
    let cameras: Vec<String> = serde_json::from_str(&cameras)
        .map_err(|e| StoreError::Corrupt(format!("cameras of device {device_id}: {e}")))?;
    let last_health = health
        .map(|h| serde_json::from_str::<DeviceHealth>(&h))
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("health of device {device_id}: {e}")))?;
    Ok(DeviceRecord {
        device_id,
        first_seen_ms,
        last_seen_ms,
        agent_version,
        model,
        cameras,
        last_health,
        last_health_ms,
        high_water_seq: seq_from_db(hw)?,
    })
}

/// Row of the events table as both backends select it (payload as text, then whether a
/// snapshot is recorded, 0 or 1).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct EventRow {
    id: i64,
    device_id: String,
    seq: i64,
    camera: String,
    kind: String,
    label: Option<String>,
    observed_at_ms: i64,
    ingested_at_ms: i64,
    payload: String,
    has_snapshot: i64,
}

/// The last column of [`EventRow`], for a query `FROM events` (the same SQL on both backends).
pub(crate) const HAS_SNAPSHOT_COLUMN: &str = "CAST(CASE WHEN EXISTS (SELECT 1 FROM snapshots s \
     WHERE s.device_id = events.device_id AND s.seq = events.seq) THEN 1 ELSE 0 END AS BIGINT)";

pub(crate) fn event_from_row(row: EventRow) -> Result<StoredEvent, StoreError> {
    let EventRow {
        id: row_id,
        device_id,
        seq,
        camera,
        kind,
        label,
        observed_at_ms,
        ingested_at_ms,
        payload,
        has_snapshot,
    } = row;
    let payload = serde_json::from_str(&payload)
        .map_err(|e| StoreError::Corrupt(format!("payload of event row {row_id}: {e}")))?;
    Ok(StoredEvent {
        row_id,
        device_id,
        seq: seq_from_db(seq)?,
        camera,
        kind,
        label,
        observed_at_ms,
        ingested_at_ms,
        payload,
        has_snapshot: has_snapshot != 0,
    })
}

/// Row of the snapshots table as both backends select it: `camera, taken_at_ms, full_key,
/// full_bytes, crop_key, crop_bytes, stored_at_ms`.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct SnapshotRow {
    camera: String,
    taken_at_ms: i64,
    full_key: String,
    full_bytes: i64,
    crop_key: Option<String>,
    crop_bytes: Option<i64>,
    stored_at_ms: i64,
}

pub(crate) fn snapshot_from_row(id: &EventId, row: SnapshotRow) -> Result<SnapshotRecord, StoreError> {
    let SnapshotRow { camera, taken_at_ms, full_key, full_bytes, crop_key, crop_bytes, stored_at_ms } = row;
    Ok(SnapshotRecord {
        device_id: id.device_id.clone(),
        seq: id.seq,
        camera,
        taken_at_ms,
        full_key,
        full_bytes: count_from_db(full_bytes)?,
        crop_key,
        crop_bytes: crop_bytes.map(count_from_db).transpose()?,
        stored_at_ms,
    })
}

/// A snapshot's sizes as the database stores them.
pub(crate) fn snapshot_sizes(snap: &NewSnapshot<'_>) -> Result<(i64, Option<i64>), StoreError> {
    let size = |n: u64| i64::try_from(n).map_err(|_| StoreError::InvalidData(format!("snapshot size {n}")));
    Ok((size(snap.full_bytes)?, snap.crop.map(|(_, n)| size(n)).transpose()?))
}

/// An [`EventQuery`] after validation.
#[derive(Debug, Clone)]
pub(crate) struct ValidQuery<'a> {
    pub device: Option<&'a str>,
    pub camera: Option<&'a str>,
    pub kind: Option<&'a str>,
    pub site: Option<&'a str>,
    pub label: Option<&'a str>,
    pub zone: Option<&'a str>,
    pub line: Option<&'a str>,
    pub direction: Option<&'a str>,
    pub min_speed_kmh: Option<f64>,
    pub max_speed_kmh: Option<f64>,
    pub has_snapshot: Option<bool>,
    pub scope: &'a Scope,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub limit: u32,
    pub cursor: Option<PageCursor>,
}

impl ValidQuery<'_> {
    /// Whether no event can match without asking the database: an empty [`Scope::Limited`], or
    /// a value no stored row holds (NUL: PostgreSQL stores none and refuses it as a parameter).
    pub(crate) fn matches_nothing(&self) -> bool {
        let texts = [self.device, self.camera, self.site, self.label, self.zone, self.line];
        if texts.into_iter().flatten().any(|s| s.contains('\0')) {
            return true;
        }
        match self.scope {
            Scope::All => false,
            Scope::Limited { sites, cameras } => {
                // Values with NUL match nothing; the rest still may.
                let sites = sites.iter().filter(|s| !s.contains('\0')).count();
                let cameras =
                    cameras.iter().filter(|c| !c.device_id.contains('\0') && !c.camera.contains('\0')).count();
                sites == 0 && cameras == 0
            }
        }
    }
}

/// Pushes the conditions (` AND ...`, every value a bound parameter), the order and the limit
/// of [`EventStore::query_events`] after `SELECT .. FROM events WHERE <something true>`: the same
/// SQL on both backends.
pub(crate) fn push_event_filters<DB>(qb: &mut QueryBuilder<DB>, v: &ValidQuery<'_>)
where
    DB: sqlx::Database,
    for<'t> &'t str: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> i64: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> f64: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    let texts = [
        ("events.device_id", v.device),
        ("events.camera", v.camera),
        ("events.kind", v.kind),
        ("events.label", v.label),
        ("events.zone", v.zone),
        ("events.line", v.line),
        ("events.direction", v.direction),
    ];
    for (column, value) in texts {
        if let Some(value) = value {
            qb.push(" AND ").push(column).push(" = ").push_bind(value);
        }
    }
    if let Some(site) = v.site {
        qb.push(
            " AND EXISTS (SELECT 1 FROM cameras fc WHERE fc.device_id = events.device_id \
             AND fc.camera = events.camera AND fc.site_id = ",
        )
        .push_bind(site)
        .push(")");
    }
    if let Some(min) = v.min_speed_kmh {
        qb.push(" AND events.speed_kmh >= ").push_bind(min);
    }
    if let Some(max) = v.max_speed_kmh {
        qb.push(" AND events.speed_kmh <= ").push_bind(max);
    }
    if let Some(has) = v.has_snapshot {
        qb.push(if has { " AND EXISTS" } else { " AND NOT EXISTS" })
            .push(" (SELECT 1 FROM snapshots hs WHERE hs.device_id = events.device_id AND hs.seq = events.seq)");
    }
    push_events_scope(qb, v.scope);
    if let Some(from) = v.from_ms {
        qb.push(" AND events.observed_at_ms >= ").push_bind(from);
    }
    if let Some(to) = v.to_ms {
        qb.push(" AND events.observed_at_ms < ").push_bind(to);
    }
    if let Some(c) = v.cursor {
        qb.push(" AND (events.observed_at_ms, events.id) < (").push_bind(c.key_ms).push(", ").push_bind(c.id).push(")");
    }
    qb.push(" ORDER BY events.observed_at_ms DESC, events.id DESC LIMIT ").push_bind(i64::from(v.limit) + 1);
}

/// `TRUE` on both backends (`1 = 1`: SQLite has no boolean type before 3.23's keywords).
const TRUE_SQL: &str = "1 = 1";

/// Start of the event listing query of both backends: `payload_expr` is the payload as text.
pub(crate) fn event_select_sql(payload_expr: &str) -> String {
    format!(
        "SELECT id, device_id, seq, camera, kind, label, observed_at_ms, ingested_at_ms, {payload_expr} AS payload, \
         {HAS_SNAPSHOT_COLUMN} AS has_snapshot FROM events WHERE {TRUE_SQL}"
    )
}

impl EventQuery {
    pub(crate) fn validate(&self) -> Result<ValidQuery<'_>, StoreError> {
        if let Some(kind) = &self.kind
            && !KIND_NAMES.contains(&kind.as_str())
        {
            return Err(StoreError::InvalidQuery(format!("unknown kind; expected one of {}", KIND_NAMES.join(", "))));
        }
        let limit = self.limit.unwrap_or(DEFAULT_PAGE_LIMIT);
        if !(1..=MAX_PAGE_LIMIT).contains(&limit) {
            return Err(StoreError::InvalidQuery(format!("limit must be between 1 and {MAX_PAGE_LIMIT}")));
        }
        if let (Some(from), Some(to)) = (self.from_ms, self.to_ms)
            && from > to
        {
            return Err(StoreError::InvalidQuery("from must not be after to".to_owned()));
        }
        if let Some(direction) = &self.direction
            && !matches!(direction.as_str(), "in" | "out")
        {
            return Err(StoreError::InvalidQuery("direction must be in or out".to_owned()));
        }
        for (name, bound) in [("min_speed", self.min_speed_kmh), ("max_speed", self.max_speed_kmh)] {
            if bound.is_some_and(|b| !b.is_finite()) {
                return Err(StoreError::InvalidQuery(format!("{name} must be a finite number")));
            }
        }
        if let (Some(min), Some(max)) = (self.min_speed_kmh, self.max_speed_kmh)
            && min > max
        {
            return Err(StoreError::InvalidQuery("min_speed must not be above max_speed".to_owned()));
        }
        let cursor = self.cursor.as_deref().map(PageCursor::decode).transpose()?;
        Ok(ValidQuery {
            device: self.device.as_deref(),
            camera: self.camera.as_deref(),
            kind: self.kind.as_deref(),
            site: self.site.as_deref(),
            label: self.label.as_deref(),
            zone: self.zone.as_deref(),
            line: self.line.as_deref(),
            direction: self.direction.as_deref(),
            min_speed_kmh: self.min_speed_kmh,
            max_speed_kmh: self.max_speed_kmh,
            has_snapshot: self.has_snapshot,
            scope: &self.scope,
            from_ms: self.from_ms,
            to_ms: self.to_ms,
            limit,
            cursor,
        })
    }
}

/// Turns `limit + 1` rows into a page: the extra row only says that there is a next page.
pub(crate) fn page_from_rows(rows: Vec<EventRow>, limit: u32) -> Result<EventPage, StoreError> {
    let limit = limit as usize;
    let more = rows.len() > limit;
    let events = rows.into_iter().take(limit).map(event_from_row).collect::<Result<Vec<_>, _>>()?;
    let next_cursor = match events.last() {
        Some(last) if more => Some(PageCursor::new(last.observed_at_ms, last.row_id).encode()),
        _ => None,
    };
    Ok(EventPage { events, next_cursor })
}

/// Formats Unix milliseconds as RFC 3339 in UTC with millisecond precision
/// (`2023-11-14T22:13:20.123Z`). Total: years outside 0..=9999 are written as they are.
pub fn format_timestamp_ms(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let ms_of_day = ms.rem_euclid(86_400_000);
    // Civil from days (H. Hinnant), proleptic Gregorian.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, rest) = (ms_of_day / 3_600_000, ms_of_day % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, milli) = (rest / 1000, rest % 1000);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_as_rfc3339() {
        assert_eq!(format_timestamp_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_timestamp_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(format_timestamp_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(format_timestamp_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        // Total on the whole range.
        let _ = format_timestamp_ms(i64::MIN);
        let _ = format_timestamp_ms(i64::MAX);
    }

    #[test]
    fn payload_text_is_payload_json() {
        use its_shared::event::{ClassCount, Direction, ObjectRef, Phase, TrackPhase};
        let object = ObjectRef { track_id: 1, label: "c\"a}r".into(), score: 0.5, bbox: [0.0, 0.1, 0.2, 0.3] };
        let kinds = [
            EventKind::LineCrossing {
                line: "l".into(),
                object: object.clone(),
                direction: Direction::Out,
                speed_kmh: None,
            },
            EventKind::SpeedMeasurement { object: object.clone(), speed_kmh: 1.5, zone: Some("z".into()) },
            EventKind::ZoneEnter { zone: "z".into(), object: object.clone() },
            EventKind::ZoneExit { zone: "z".into(), object: object.clone(), dwell_s: 2.0 },
            EventKind::ZoneDwell { zone: "z".into(), object: object.clone(), dwell_s: 2.0 },
            EventKind::StoppedVehicle { zone: "z".into(), object: object.clone(), stopped_s: 3.0 },
            EventKind::WrongWay { zone: "z".into(), object: object.clone(), distance_m: 4.0, speed_kmh: Some(5.0) },
            EventKind::Congestion {
                zone: "z".into(),
                phase: Phase::Cleared,
                occupancy: 3,
                mean_speed_kmh: None,
                queue_length_m: None,
            },
            EventKind::Counts {
                line: "l".into(),
                interval_s: 60,
                counts: vec![ClassCount { label: "car".into(), direction: Direction::In, count: 4 }],
            },
            EventKind::ObjectTrack {
                phase: TrackPhase::End,
                object,
                first_seen_ms: 1_700_000_000_000,
                duration_s: 4.5,
                frames: 41,
                path: vec![[0.1, 0.9], [0.4, 0.6]],
            },
            EventKind::DeviceHealth(DeviceHealth { agent_version: "1".into(), ..Default::default() }),
            EventKind::ZoneOccupancy {
                zone: "z".into(),
                interval_s: 60,
                mean: 1.25,
                max: 3,
                occupied: 0.5,
                entered: 7,
            },
        ];
        assert_eq!(kinds.len(), KIND_NAMES.len());
        for k in kinds {
            let text = payload_text(&k).expect("payload text");
            let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
            assert!(v.is_object(), "{text}");
            assert!(same_at_f32(&v, &k.payload_json()), "{}: {v} vs {}", k.name(), k.payload_json());
        }
    }

    /// Equal, numbers compared at f32 precision: the text form writes an `f32` field as `0.1`
    /// where `payload_json` (through `f64`) has `0.10000000149011612`.
    fn same_at_f32(a: &serde_json::Value, b: &serde_json::Value) -> bool {
        use serde_json::Value as V;
        match (a, b) {
            (V::Number(x), V::Number(y)) => x.as_f64().map(|f| f as f32) == y.as_f64().map(|f| f as f32),
            (V::Array(x), V::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_at_f32(x, y)),
            (V::Object(x), V::Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_at_f32(v, w)))
            }
            _ => a == b,
        }
    }

    #[test]
    fn cursor_round_trip_and_rejects() {
        let c = PageCursor::new(-5, 42);
        assert_eq!(PageCursor::decode(&c.encode()).expect("decode"), c);
        for bad in ["", "!!!", "YWJj", "MTow", "MTo", "eDox", "MToyOjM", "MTogMg"] {
            assert!(matches!(PageCursor::decode(bad), Err(StoreError::BadCursor)), "{bad}");
        }
    }
}
