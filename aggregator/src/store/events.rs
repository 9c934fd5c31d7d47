//! The event-store reads and writes whose SQL is the same on both backends (written once with
//! [`on_db!`]): the [`super::EventStore`] methods that are not backend-specific are the trait's
//! own, and call these. Text parameters go through
//! [`text`]: PostgreSQL refuses NUL in text, so it is replaced there as on insert.

use std::borrow::Cow;

use super::db::on_db;
use super::{
    Db, DeviceRecord, DeviceRow, EventId, EventPage, EventQuery, EventRow, EventSummary, NewSnapshot, SnapshotLookup,
    SnapshotRow, StoreError, count_from_db, device_from_row, event_select_sql, page_from_rows, push_event_filters,
    seq_from_db, seq_to_db, snapshot_from_row, snapshot_sizes,
};

/// A text parameter as the backend stores it.
fn text<'a>(db: &Db, s: &'a str) -> Cow<'a, str> {
    if db.is_postgres() { super::postgres::pg_text(s) } else { Cow::Borrowed(s) }
}

pub(super) async fn high_water(db: &Db, device_id: &str) -> Result<u64, StoreError> {
    let hw: i64 = on_db!(db.read(), pool => sqlx::query_scalar(
        "SELECT CAST(COALESCE(MAX(seq), 0) AS BIGINT) FROM events WHERE device_id = $1")
        .bind(text(db, device_id).as_ref())
        .fetch_one(pool)
        .await)?;
    seq_from_db(hw)
}

pub(super) async fn list_devices(db: &Db) -> Result<Vec<DeviceRecord>, StoreError> {
    let rows: Vec<DeviceRow> = on_db!(db.read(), pool => sqlx::query_as(
        "SELECT d.device_id, d.first_seen_ms, d.last_seen_ms, d.agent_version, d.model, \
         CAST(d.cameras AS TEXT) AS cameras, CAST(d.last_health AS TEXT) AS last_health, d.last_health_ms, \
         CAST(COALESCE((SELECT MAX(e.seq) FROM events e WHERE e.device_id = d.device_id), 0) AS BIGINT) AS high_water \
         FROM devices d ORDER BY d.device_id")
        .fetch_all(pool)
        .await)?;
    rows.into_iter().map(device_from_row).collect()
}

pub(super) async fn query_events(db: &Db, q: &EventQuery) -> Result<EventPage, StoreError> {
    let v = q.validate()?;
    // Nothing stored contains NUL (PostgreSQL refuses it as a parameter).
    if v.matches_nothing() {
        return Ok(EventPage { events: Vec::new(), next_cursor: None });
    }
    let rows: Vec<EventRow> = on_db!(db.read(), pool => {
        let mut qb = sqlx::QueryBuilder::new(event_select_sql("CAST(payload AS TEXT)"));
        push_event_filters(&mut qb, &v);
        qb.build_query_as().fetch_all(pool).await
    })?;
    page_from_rows(rows, v.limit)
}

pub(super) async fn device_event_summary(db: &Db, device_id: &str) -> Result<EventSummary, StoreError> {
    let (total, distinct, min, max): (i64, i64, Option<i64>, Option<i64>) = on_db!(db.read(), pool => sqlx::query_as(
        "SELECT COUNT(*), COUNT(DISTINCT seq), MIN(seq), MAX(seq) FROM events WHERE device_id = $1")
        .bind(text(db, device_id).as_ref())
        .fetch_one(pool)
        .await)?;
    Ok(EventSummary {
        total: count_from_db(total)?,
        distinct_seqs: count_from_db(distinct)?,
        min_seq: min.map(seq_from_db).transpose()?,
        max_seq: max.map(seq_from_db).transpose()?,
    })
}

pub(super) async fn device_seqs(db: &Db, device_id: &str) -> Result<Vec<u64>, StoreError> {
    let seqs: Vec<i64> = on_db!(db.read(), pool => sqlx::query_scalar(
        "SELECT seq FROM events WHERE device_id = $1 ORDER BY seq")
        .bind(text(db, device_id).as_ref())
        .fetch_all(pool)
        .await)?;
    seqs.into_iter().map(seq_from_db).collect()
}

pub(super) async fn record_snapshot(
    db: &Db,
    device_id: &str,
    snap: &NewSnapshot<'_>,
    now_ms: i64,
) -> Result<bool, StoreError> {
    let (full_bytes, crop_bytes) = snapshot_sizes(snap)?;
    let seq = seq_to_db(snap.seq)?;
    let n = on_db!(db.write(), pool => sqlx::query(
        "INSERT INTO snapshots (device_id, seq, camera, taken_at_ms, full_key, full_bytes, crop_key, crop_bytes, \
         stored_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (device_id, seq) DO NOTHING")
        .bind(text(db, device_id).as_ref())
        .bind(seq)
        .bind(text(db, snap.camera).as_ref())
        .bind(snap.taken_at_ms)
        .bind(snap.full_key)
        .bind(full_bytes)
        .bind(snap.crop.map(|(key, _)| key))
        .bind(crop_bytes)
        .bind(now_ms)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(n == 1)
}

pub(super) async fn has_snapshot(db: &Db, device_id: &str, seq: u64) -> Result<bool, StoreError> {
    let seq = seq_to_db(seq)?;
    let row: Option<i64> = on_db!(db.read(), pool => sqlx::query_scalar(
        "SELECT CAST(1 AS BIGINT) FROM snapshots WHERE device_id = $1 AND seq = $2")
        .bind(text(db, device_id).as_ref())
        .bind(seq)
        .fetch_optional(pool)
        .await)?;
    Ok(row.is_some())
}

pub(super) async fn snapshot_for_event(db: &Db, id: &EventId) -> Result<SnapshotLookup, StoreError> {
    let Ok(seq) = seq_to_db(id.seq) else {
        return Ok(SnapshotLookup::NoEvent); // nothing is stored above i64::MAX
    };
    let device = text(db, &id.device_id);
    let event: Option<i64> = on_db!(db.read(), pool => sqlx::query_scalar(
        "SELECT CAST(1 AS BIGINT) FROM events WHERE device_id = $1 AND seq = $2")
        .bind(device.as_ref())
        .bind(seq)
        .fetch_optional(pool)
        .await)?;
    if event.is_none() {
        return Ok(SnapshotLookup::NoEvent);
    }
    let row: Option<SnapshotRow> = on_db!(db.read(), pool => sqlx::query_as(
        "SELECT camera, taken_at_ms, full_key, full_bytes, crop_key, crop_bytes, stored_at_ms \
         FROM snapshots WHERE device_id = $1 AND seq = $2")
        .bind(device.as_ref())
        .bind(seq)
        .fetch_optional(pool)
        .await)?;
    match row {
        Some(row) => Ok(SnapshotLookup::Found(snapshot_from_row(id, row)?)),
        None => Ok(SnapshotLookup::NoSnapshot),
    }
}

pub(super) async fn ping(db: &Db) -> Result<(), StoreError> {
    on_db!(db.read(), pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))?;
    Ok(())
}
