//! PostgreSQL backend.
//!
//! A batch is one `INSERT .. SELECT FROM UNNEST(arrays) ON CONFLICT DO NOTHING` statement: one
//! round trip and one (implicit) transaction per batch, durable at return with the default
//! `synchronous_commit = on`.
//!
//! PostgreSQL text and JSONB cannot hold NUL characters; values from devices that contain one
//! have it replaced by U+FFFD instead of failing the batch forever.
//!
//! Inside: this file (opening, the event insert, the advisory lock, text and JSON cleaning),
//! [`timescale`] (TimescaleDB: hypertables, their keys, the health history's retention), [`size`]
//! (live-byte estimates for size retention). Everything PostgreSQL-only lives here; the rest of
//! [`crate::store`] writes one SQL text for both backends. May use: the rest of the store.

use std::borrow::Cow;
use std::time::Duration;

use async_trait::async_trait;
use its_shared::EventEnvelope;
use its_shared::wire::{Heartbeat, Hello};
use sqlx::postgres::{PgPool, PgPoolOptions};

pub mod size;
pub mod timescale;

use super::{EventStore, InsertOutcome, RowIn, StoreError, cameras_json, distinct_cameras, health_json};

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
    /// [`timescale::setup`]); plain tables otherwise.
    pub async fn open(url: &str, vault: crate::vault::Vault) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        MIGRATOR.run(&pool).await?;
        let timescale = timescale::setup(&pool).await?;
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
/// Runs `work` under the session advisory lock `key` if it is free (`None` when another session
/// holds it): one replica at a time does what `work` does.
pub(super) async fn with_advisory_lock<T, F>(pool: &PgPool, key: i64, work: F) -> Result<Option<T>, StoreError>
where
    F: Future<Output = Result<T, StoreError>>,
{
    let mut conn = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(key).fetch_one(&mut *conn).await?;
    if !locked {
        return Ok(None);
    }
    let result = work.await;
    if sqlx::query("SELECT pg_advisory_unlock($1)").bind(key).execute(&mut *conn).await.is_err() {
        // Closing the session releases its locks.
        let _ = conn.detach();
    }
    result.map(Some)
}

pub(in crate::store) fn pg_text(s: &str) -> Cow<'_, str> {
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

/// [`EventStore::insert_events`] on PostgreSQL, for the rows of `events` ([`super::prepare_rows`], not
/// empty): one statement over arrays (UNNEST), one transaction.
pub(super) async fn insert_events(
    pool: &PgPool,
    device_id: &str,
    events: &[EventEnvelope],
    rows: Vec<RowIn<'_>>,
    now_ms: i64,
) -> Result<InsertOutcome, StoreError> {
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
    // (device_id, seq, observed_at_ms) on a TimescaleDB hypertable (see `timescale::setup`).
    let mut tx = pool.begin().await?;
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
    super::rollups::mark_dirty!(tx, pg_text, device_id, events, &outcome.new_seqs, now_ms);
    tx.commit().await?;
    Ok(outcome)
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
