//! PostgreSQL backend.
//!
//! A batch is one `INSERT .. SELECT FROM UNNEST(arrays) ON CONFLICT DO NOTHING` statement: one
//! round trip and one (implicit) transaction per batch, durable at return with the default
//! `synchronous_commit = on`.
//!
//! PostgreSQL text and JSONB cannot hold NUL characters; values from devices that contain one
//! have it replaced by U+FFFD instead of failing the batch forever.

use std::borrow::Cow;
use std::time::Duration;

use async_trait::async_trait;
use its_shared::EventEnvelope;
use its_shared::wire::{Heartbeat, Hello};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, QueryBuilder};

use super::{
    DeviceRecord, DeviceRow, EventId, EventPage, EventQuery, EventRow, EventStore, EventSummary, InsertOutcome,
    NewSnapshot, SnapshotLookup, SnapshotRow, StoreError, cameras_json, count_from_db, device_from_row,
    distinct_cameras, event_select_sql, health_json, page_from_rows, prepare_rows, push_event_filters, seq_from_db,
    seq_to_db, snapshot_from_row, snapshot_sizes,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Connections of the pool.
const MAX_CONNECTIONS: u32 = 8;

/// [`EventStore`] on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Events and health history are TimescaleDB hypertables.
    timescale: bool,
    vault: crate::vault::Vault,
}

impl PostgresStore {
    /// Connects to `postgres://...`, applies migrations, and turns the events and the health
    /// history into TimescaleDB hypertables when the extension is available (see
    /// [`super::retention::timescale_setup`]); plain tables otherwise.
    pub async fn open(url: &str, vault: crate::vault::Vault) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        MIGRATOR.run(&pool).await?;
        let timescale = super::retention::timescale_setup(&pool).await?;
        if timescale {
            tracing::info!("PostgreSQL storage: TimescaleDB hypertables (events, device_health; one-day chunks)");
        } else {
            tracing::info!("PostgreSQL storage: plain tables (TimescaleDB not available)");
        }
        Ok(Self { pool, timescale, vault })
    }

    /// Whether the events and the health history are TimescaleDB hypertables.
    pub fn timescale(&self) -> bool {
        self.timescale
    }
}

/// Text as PostgreSQL can store it: NUL replaced.
fn pg_text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') { Cow::Owned(s.replace('\0', "\u{FFFD}")) } else { Cow::Borrowed(s) }
}

/// JSON text as JSONB can store it: serde_json writes NUL as `\u0000`, which JSONB rejects.
fn pg_json(text: String) -> String {
    if !text.contains("\\u0000") {
        return text;
    }
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) if s.contains('\0') => {
                *s = s.replace('\0', "\u{FFFD}");
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            serde_json::Value::Object(m) => {
                let old = std::mem::take(m);
                for (k, mut val) in old {
                    strip(&mut val);
                    m.insert(pg_text(&k).into_owned(), val);
                }
            }
            _ => {}
        }
    }
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(mut v) => {
            strip(&mut v);
            serde_json::to_string(&v).unwrap_or(text)
        }
        Err(_) => text,
    }
}

#[async_trait]
impl EventStore for PostgresStore {
    async fn record_hello(&self, device_id: &str, hello: &Hello, now_ms: i64) -> Result<u64, StoreError> {
        let device_id = pg_text(device_id);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO devices (device_id, first_seen_ms, last_seen_ms, agent_version, model, cameras) \
             VALUES ($1, $2, $2, $3, $4, $5::jsonb) \
             ON CONFLICT (device_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms, \
             agent_version = excluded.agent_version, model = excluded.model, cameras = excluded.cameras",
        )
        .bind(device_id.as_ref())
        .bind(now_ms)
        .bind(pg_text(&hello.agent_version).as_ref())
        .bind(pg_text(&hello.model).as_ref())
        .bind(pg_json(cameras_json(&hello.cameras)?))
        .execute(&mut *tx)
        .await?;
        // The cameras announced now; the others stay, marked as no longer announced. Distinct
        // after NUL replacement: one statement cannot update a row twice.
        let cameras: Vec<String> = hello.cameras.iter().map(|c| pg_text(c).into_owned()).collect();
        let cameras: Vec<String> = distinct_cameras(&cameras).into_iter().map(str::to_owned).collect();
        sqlx::query("UPDATE cameras SET announced = 0 WHERE device_id = $1 AND announced <> 0")
            .bind(device_id.as_ref())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO cameras (device_id, camera, site_id, first_seen_ms, last_announced_ms, announced) \
             SELECT $1, u.camera, (SELECT site_id FROM devices WHERE device_id = $1), $2, $2, 1 \
             FROM UNNEST($3::text[]) AS u(camera) \
             ON CONFLICT (device_id, camera) DO UPDATE SET last_announced_ms = excluded.last_announced_ms, \
             announced = 1",
        )
        .bind(device_id.as_ref())
        .bind(now_ms)
        .bind(cameras)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.high_water(&device_id).await
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
        let n = rows.len();
        let mut seqs = Vec::with_capacity(n);
        let mut cameras = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        let mut observed = Vec::with_capacity(n);
        let mut labels = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut zones = Vec::with_capacity(n);
        let mut lines = Vec::with_capacity(n);
        let mut directions = Vec::with_capacity(n);
        let mut speeds = Vec::with_capacity(n);
        for r in rows {
            seqs.push(r.seq);
            cameras.push(pg_text(r.camera).into_owned());
            kinds.push(r.kind);
            observed.push(r.observed_at_ms);
            labels.push(r.label.map(|l| pg_text(l).into_owned()));
            payloads.push(pg_json(r.payload));
            zones.push(r.zone.map(|z| pg_text(z).into_owned()));
            lines.push(r.line.map(|l| pg_text(l).into_owned()));
            directions.push(r.direction);
            speeds.push(r.speed_kmh);
        }
        // No conflict target: the key is (device_id, seq) on plain tables and
        // (device_id, seq, observed_at_ms) on a TimescaleDB hypertable (see `retention::timescale_setup`).
        let mut tx = self.pool.begin().await?;
        let new: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO events (device_id, seq, camera, kind, observed_at_ms, ingested_at_ms, label, payload, \
             zone, line, direction, speed_kmh) \
             SELECT $1, u.seq, u.camera, u.kind, u.observed_at_ms, $2, u.label, u.payload::jsonb, \
             u.zone, u.line, u.direction, u.speed_kmh \
             FROM UNNEST($3::bigint[], $4::text[], $5::text[], $6::bigint[], $7::text[], $8::text[], \
             $9::text[], $10::text[], $11::text[], $12::float8[]) \
             AS u(seq, camera, kind, observed_at_ms, label, payload, zone, line, direction, speed_kmh) \
             ON CONFLICT DO NOTHING RETURNING seq",
        )
        .bind(pg_text(device_id).as_ref())
        .bind(now_ms)
        .bind(seqs)
        .bind(cameras)
        .bind(kinds)
        .bind(observed)
        .bind(labels)
        .bind(payloads)
        .bind(zones)
        .bind(lines)
        .bind(directions)
        .bind(speeds)
        .fetch_all(&mut *tx)
        .await?;
        let outcome = InsertOutcome::from_new_seqs(n, new)?;
        for (camera, resolution_s, bucket_ms) in crate::analytics::rollup_marks(events, &outcome.new_seqs) {
            sqlx::query(crate::analytics::MARK_DIRTY_SQL)
                .bind(pg_text(device_id).as_ref())
                .bind(pg_text(camera).as_ref())
                .bind(resolution_s)
                .bind(bucket_ms)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(outcome)
    }

    async fn record_health(&self, device_id: &str, hb: &Heartbeat, now_ms: i64) -> Result<(), StoreError> {
        let cameras: Vec<String> = hb.health.cameras.iter().map(|c| c.camera.clone()).collect();
        // One statement: the device row and the history row (a data-modifying CTE).
        sqlx::query(
            "WITH device AS ( \
                INSERT INTO devices (device_id, first_seen_ms, last_seen_ms, agent_version, cameras, last_health, \
                last_health_ms) VALUES ($1, $2, $2, $3, $4::jsonb, $5::jsonb, $2) \
                ON CONFLICT (device_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms, \
                last_health = excluded.last_health, last_health_ms = excluded.last_health_ms \
                RETURNING 1 \
             ) \
             INSERT INTO device_health (device_id, at_ms, report) SELECT $1, $2, $5::jsonb FROM device",
        )
        .bind(pg_text(device_id).as_ref())
        .bind(now_ms)
        .bind(pg_text(&hb.health.agent_version).as_ref())
        .bind(pg_json(cameras_json(&cameras)?))
        .bind(pg_json(health_json(&hb.health)?))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn high_water(&self, device_id: &str) -> Result<u64, StoreError> {
        let (hw,): (i64,) = sqlx::query_as("SELECT COALESCE(MAX(seq), 0)::bigint FROM events WHERE device_id = $1")
            .bind(pg_text(device_id).as_ref())
            .fetch_one(&self.pool)
            .await?;
        seq_from_db(hw)
    }

    async fn list_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let rows: Vec<DeviceRow> = sqlx::query_as(
            "SELECT d.device_id, d.first_seen_ms, d.last_seen_ms, d.agent_version, d.model, d.cameras::text, \
             d.last_health::text, d.last_health_ms, \
             COALESCE((SELECT MAX(e.seq) FROM events e WHERE e.device_id = d.device_id), 0)::bigint \
             FROM devices d ORDER BY d.device_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(device_from_row).collect()
    }

    async fn query_events(&self, q: &EventQuery) -> Result<EventPage, StoreError> {
        let v = q.validate()?;
        // Nothing stored contains NUL (see `pg_text`), and PostgreSQL refuses it as a parameter.
        if v.matches_nothing() {
            return Ok(EventPage { events: Vec::new(), next_cursor: None });
        }
        let mut qb = QueryBuilder::<Postgres>::new(event_select_sql("payload::text"));
        push_event_filters(&mut qb, &v);
        let rows: Vec<EventRow> = qb.build_query_as().fetch_all(&self.pool).await?;
        page_from_rows(rows, v.limit)
    }

    async fn device_event_summary(&self, device_id: &str) -> Result<EventSummary, StoreError> {
        let (total, distinct, min, max): (i64, i64, Option<i64>, Option<i64>) =
            sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT seq), MIN(seq), MAX(seq) FROM events WHERE device_id = $1")
                .bind(pg_text(device_id).as_ref())
                .fetch_one(&self.pool)
                .await?;
        Ok(EventSummary {
            total: count_from_db(total)?,
            distinct_seqs: count_from_db(distinct)?,
            min_seq: min.map(seq_from_db).transpose()?,
            max_seq: max.map(seq_from_db).transpose()?,
        })
    }

    async fn device_seqs(&self, device_id: &str) -> Result<Vec<u64>, StoreError> {
        let seqs: Vec<(i64,)> = sqlx::query_as("SELECT seq FROM events WHERE device_id = $1 ORDER BY seq")
            .bind(pg_text(device_id).as_ref())
            .fetch_all(&self.pool)
            .await?;
        seqs.into_iter().map(|(s,)| seq_from_db(s)).collect()
    }

    async fn record_snapshot(&self, device_id: &str, snap: &NewSnapshot<'_>, now_ms: i64) -> Result<bool, StoreError> {
        let (full_bytes, crop_bytes) = snapshot_sizes(snap)?;
        let result = sqlx::query(
            "INSERT INTO snapshots (device_id, seq, camera, taken_at_ms, full_key, full_bytes, crop_key, crop_bytes, \
             stored_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (device_id, seq) DO NOTHING",
        )
        .bind(pg_text(device_id).as_ref())
        .bind(seq_to_db(snap.seq)?)
        .bind(pg_text(snap.camera).as_ref())
        .bind(snap.taken_at_ms)
        .bind(snap.full_key)
        .bind(full_bytes)
        .bind(snap.crop.map(|(key, _)| key))
        .bind(crop_bytes)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn has_snapshot(&self, device_id: &str, seq: u64) -> Result<bool, StoreError> {
        let row: Option<(i64,)> = sqlx::query_as("SELECT 1::bigint FROM snapshots WHERE device_id = $1 AND seq = $2")
            .bind(pg_text(device_id).as_ref())
            .bind(seq_to_db(seq)?)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    async fn snapshot_for_event(&self, id: &EventId) -> Result<SnapshotLookup, StoreError> {
        let Ok(seq) = seq_to_db(id.seq) else {
            return Ok(SnapshotLookup::NoEvent); // nothing is stored above i64::MAX
        };
        let event: Option<(i64,)> = sqlx::query_as("SELECT 1::bigint FROM events WHERE device_id = $1 AND seq = $2")
            .bind(pg_text(&id.device_id).as_ref())
            .bind(seq)
            .fetch_optional(&self.pool)
            .await?;
        if event.is_none() {
            return Ok(SnapshotLookup::NoEvent);
        }
        let row: Option<SnapshotRow> = sqlx::query_as(
            "SELECT camera, taken_at_ms, full_key, full_bytes, crop_key, crop_bytes, stored_at_ms \
             FROM snapshots WHERE device_id = $1 AND seq = $2",
        )
        .bind(pg_text(&id.device_id).as_ref())
        .bind(seq)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(SnapshotLookup::Found(snapshot_from_row(id, row)?)),
            None => Ok(SnapshotLookup::NoSnapshot),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn db(&self) -> super::Db {
        super::Db::new(super::Pools::Postgres(self.pool.clone()), self.vault.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_replaced_in_text_and_json() {
        assert_eq!(pg_text("a\0b"), "a\u{FFFD}b");
        assert!(matches!(pg_text("ab"), Cow::Borrowed(_)));
        let j = serde_json::to_string(&serde_json::json!({"k\u{0}": ["x\u{0}", 1]})).expect("json");
        let fixed = pg_json(j);
        assert!(!fixed.contains("\\u0000"), "{fixed}");
    }
}
