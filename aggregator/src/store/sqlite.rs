//! SQLite backend.
//!
//! One writer connection (every write is serialised by SQLite anyway; a single writer never
//! meets `SQLITE_BUSY` on lock upgrade) and a small pool of readers, WAL journal with
//! `synchronous=FULL` so that a committed batch survives a power cut before it is acknowledged.
//! Batches are inserted with multi-row `INSERT .. ON CONFLICT DO NOTHING` statements.

use std::str::FromStr as _;
use std::time::Duration;

use async_trait::async_trait;
use its_shared::EventEnvelope;
use its_shared::wire::{Heartbeat, Hello};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite};

use super::{
    DeviceRecord, DeviceRow, EventPage, EventQuery, EventRow, EventStore, EventSummary, InsertOutcome, StoreError,
    cameras_json, count_from_db, device_from_row, health_json, page_from_rows, prepare_rows, seq_from_db,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Bound parameters per event row of the insert statement.
const PARAMS_PER_ROW: usize = 8;
/// SQLite's default `SQLITE_MAX_VARIABLE_NUMBER` since 3.32.
const MAX_PARAMS: usize = 32_766;
/// Rows per insert statement: a full default batch (2,000 events) is two statements of the same
/// text, so the prepared statement is cached and reused.
const ROWS_PER_STATEMENT: usize = {
    let max = MAX_PARAMS / PARAMS_PER_ROW;
    if max < 1000 { max } else { 1000 }
};
/// Readers of a file database.
const READERS: u32 = 4;

/// [`EventStore`] on SQLite.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    /// Opens `sqlite://path` (created if missing) or `sqlite::memory:` and applies migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let writer_opts = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30));
        let (writer, reader) = if in_memory {
            // An in-memory database lives as long as its connection: keep exactly one forever.
            let pool = writer_opts
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(opts)
                .await?;
            (pool.clone(), pool)
        } else {
            let writer = writer_opts.connect_with(opts.clone()).await?;
            let reader = SqlitePoolOptions::new()
                .max_connections(READERS)
                .acquire_timeout(Duration::from_secs(10))
                .connect_lazy_with(opts);
            (writer, reader)
        };
        MIGRATOR.run(&writer).await?;
        Ok(Self { writer, reader })
    }
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn record_hello(&self, device_id: &str, hello: &Hello, now_ms: i64) -> Result<u64, StoreError> {
        sqlx::query(
            "INSERT INTO devices (device_id, first_seen_ms, last_seen_ms, agent_version, model, cameras) \
             VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (device_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms, \
             agent_version = excluded.agent_version, model = excluded.model, cameras = excluded.cameras",
        )
        .bind(device_id)
        .bind(now_ms)
        .bind(now_ms)
        .bind(hello.agent_version.as_str())
        .bind(hello.model.as_str())
        .bind(cameras_json(&hello.cameras)?)
        .execute(&self.writer)
        .await?;
        self.high_water(device_id).await
    }

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
        let mut tx = self.writer.begin().await?;
        let mut inserted = 0u64;
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "INSERT INTO events (device_id, seq, camera, kind, observed_at_ms, ingested_at_ms, label, payload) ",
            );
            qb.push_values(chunk, |mut b, r| {
                b.push_bind(device_id)
                    .push_bind(r.seq)
                    .push_bind(r.camera)
                    .push_bind(r.kind)
                    .push_bind(r.observed_at_ms)
                    .push_bind(now_ms)
                    .push_bind(r.label)
                    .push_bind(r.payload.as_str());
            });
            qb.push(" ON CONFLICT (device_id, seq) DO NOTHING");
            inserted += qb.build().execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        let total = rows.len() as u64;
        Ok(InsertOutcome { inserted, duplicates: total.saturating_sub(inserted) })
    }

    async fn record_health(&self, device_id: &str, hb: &Heartbeat, now_ms: i64) -> Result<(), StoreError> {
        let cameras: Vec<String> = hb.health.cameras.iter().map(|c| c.camera.clone()).collect();
        sqlx::query(
            "INSERT INTO devices (device_id, first_seen_ms, last_seen_ms, agent_version, cameras, last_health, last_health_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (device_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms, \
             last_health = excluded.last_health, last_health_ms = excluded.last_health_ms",
        )
        .bind(device_id)
        .bind(now_ms)
        .bind(now_ms)
        .bind(hb.health.agent_version.as_str())
        .bind(cameras_json(&cameras)?)
        .bind(health_json(&hb.health)?)
        .bind(now_ms)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn high_water(&self, device_id: &str) -> Result<u64, StoreError> {
        let (hw,): (i64,) = sqlx::query_as("SELECT COALESCE(MAX(seq), 0) FROM events WHERE device_id = ?")
            .bind(device_id)
            .fetch_one(&self.reader)
            .await?;
        seq_from_db(hw)
    }

    async fn list_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let rows: Vec<DeviceRow> = sqlx::query_as(
            "SELECT d.device_id, d.first_seen_ms, d.last_seen_ms, d.agent_version, d.model, d.cameras, \
             d.last_health, d.last_health_ms, \
             COALESCE((SELECT MAX(e.seq) FROM events e WHERE e.device_id = d.device_id), 0) \
             FROM devices d ORDER BY d.device_id",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter().map(device_from_row).collect()
    }

    async fn query_events(&self, q: &EventQuery) -> Result<EventPage, StoreError> {
        let v = q.validate()?;
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT id, device_id, seq, camera, kind, label, observed_at_ms, ingested_at_ms, payload \
             FROM events WHERE 1 = 1",
        );
        if let Some(device) = v.device {
            qb.push(" AND device_id = ").push_bind(device);
        }
        if let Some(camera) = v.camera {
            qb.push(" AND camera = ").push_bind(camera);
        }
        if let Some(kind) = v.kind {
            qb.push(" AND kind = ").push_bind(kind);
        }
        if let Some(from) = v.from_ms {
            qb.push(" AND observed_at_ms >= ").push_bind(from);
        }
        if let Some(to) = v.to_ms {
            qb.push(" AND observed_at_ms < ").push_bind(to);
        }
        if let Some(c) = v.cursor {
            qb.push(" AND (observed_at_ms, id) < (")
                .push_bind(c.observed_at_ms)
                .push(", ")
                .push_bind(c.id)
                .push(")");
        }
        qb.push(" ORDER BY observed_at_ms DESC, id DESC LIMIT ")
            .push_bind(i64::from(v.limit) + 1);
        let rows: Vec<EventRow> = qb.build_query_as().fetch_all(&self.reader).await?;
        page_from_rows(rows, v.limit)
    }

    async fn device_event_summary(&self, device_id: &str) -> Result<EventSummary, StoreError> {
        let (total, distinct, min, max): (i64, i64, Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(*), COUNT(DISTINCT seq), MIN(seq), MAX(seq) FROM events WHERE device_id = ?",
        )
        .bind(device_id)
        .fetch_one(&self.reader)
        .await?;
        Ok(EventSummary {
            total: count_from_db(total)?,
            distinct_seqs: count_from_db(distinct)?,
            min_seq: min.map(seq_from_db).transpose()?,
            max_seq: max.map(seq_from_db).transpose()?,
        })
    }

    async fn device_seqs(&self, device_id: &str) -> Result<Vec<u64>, StoreError> {
        let seqs: Vec<(i64,)> = sqlx::query_as("SELECT seq FROM events WHERE device_id = ? ORDER BY seq")
            .bind(device_id)
            .fetch_all(&self.reader)
            .await?;
        seqs.into_iter().map(|(s,)| seq_from_db(s)).collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }
}
