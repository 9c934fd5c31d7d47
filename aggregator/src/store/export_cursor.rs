//! Export cursors (`export_cursors`): how far an exporter has handed the stored events on, and
//! which replica holds the export (a lease). Portable SQL, both backends.

use std::time::Duration;

use serde::Deserialize;

use super::{Db, StoreError, StoredEvent};
use crate::store::db::on_db;

/// Where a new cursor starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// Every event stored (the default).
    #[default]
    Earliest,
    /// Only events stored after the exporter first ran.
    Latest,
}

/// How long a replica holds the export after its last round.
pub const LEASE: Duration = Duration::from_secs(30);

/// The export cursor named `name` in `export_cursors`.
#[derive(Debug, Clone)]
pub struct Cursor {
    db: Db,
    name: String,
    owner: String,
}

impl Cursor {
    pub fn new(db: Db, name: impl Into<String>, owner: impl Into<String>) -> Self {
        Self { db, name: name.into(), owner: owner.into() }
    }

    /// Creates the cursor if missing (at 0, or at the highest id stored for `Latest`).
    pub async fn ensure(&self, start: StartFrom, now_ms: i64) -> Result<(), StoreError> {
        let initial = match start {
            StartFrom::Earliest => 0,
            StartFrom::Latest => self.max_event_id().await?,
        };
        on_db!(self.db.write(), pool => sqlx::query(
            "INSERT INTO export_cursors (name, last_id, owner, lease_until_ms, updated_at_ms) \
             VALUES ($1, $2, NULL, 0, $3) ON CONFLICT (name) DO NOTHING",
        )
        .bind(self.name.as_str())
        .bind(initial)
        .bind(now_ms)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Takes or renews the lease; the cursor's position when this replica holds it, `None` when
    /// another one does.
    pub async fn lease(&self, now_ms: i64) -> Result<Option<i64>, StoreError> {
        let until = now_ms.saturating_add(LEASE.as_millis() as i64);
        let row: Option<(i64,)> = on_db!(self.db.write(), pool => sqlx::query_as(
            "UPDATE export_cursors SET owner = $2, lease_until_ms = $3 \
             WHERE name = $1 AND (owner IS NULL OR owner = $2 OR lease_until_ms < $4) RETURNING last_id",
        )
        .bind(self.name.as_str())
        .bind(self.owner.as_str())
        .bind(until)
        .bind(now_ms)
        .fetch_optional(pool)
        .await)?;
        Ok(row.map(|(id,)| id))
    }

    /// Moves the cursor to `last_id` if this replica still holds the lease (`false` otherwise).
    pub async fn advance(&self, last_id: i64, now_ms: i64) -> Result<bool, StoreError> {
        let done = on_db!(self.db.write(), pool => sqlx::query(
            "UPDATE export_cursors SET last_id = $3, updated_at_ms = $4 \
             WHERE name = $1 AND owner = $2 AND last_id <= $3",
        )
        .bind(self.name.as_str())
        .bind(self.owner.as_str())
        .bind(last_id)
        .bind(now_ms)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Gives the lease up (clean shutdown), so another replica can take over at once.
    pub async fn release(&self) -> Result<(), StoreError> {
        on_db!(self.db.write(), pool => sqlx::query(
            "UPDATE export_cursors SET owner = NULL, lease_until_ms = 0 WHERE name = $1 AND owner = $2",
        )
        .bind(self.name.as_str())
        .bind(self.owner.as_str())
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// The cursor's position (tests, operators), `None` when it does not exist.
    pub async fn position(&self) -> Result<Option<i64>, StoreError> {
        let row: Option<(i64,)> = on_db!(self.db.read(), pool => sqlx::query_as(
            "SELECT last_id FROM export_cursors WHERE name = $1",
        )
        .bind(self.name.as_str())
        .fetch_optional(pool)
        .await)?;
        Ok(row.map(|(id,)| id))
    }

    /// Highest `events.id` (0 if none).
    pub async fn max_event_id(&self) -> Result<i64, StoreError> {
        let (id,): (i64,) = on_db!(self.db.read(), pool => sqlx::query_as(
            "SELECT CAST(COALESCE(MAX(id), 0) AS BIGINT) FROM events",
        )
        .fetch_one(pool)
        .await)?;
        Ok(id)
    }

    /// Whether a commit can become visible after a later id's (PostgreSQL assigns ids before
    /// commit; SQLite commits one writer at a time, in id order).
    pub fn late_commits(&self) -> bool {
        self.db.is_postgres()
    }

    /// Up to `limit` events after `after`, in `id` order.
    pub async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<StoredEvent>, StoreError> {
        let payload = if self.db.is_postgres() { "payload::text" } else { "payload" };
        let sql = format!("{} AND id > $1 ORDER BY id LIMIT $2", super::event_select_sql(payload));
        let rows: Vec<super::EventRow> = on_db!(self.db.read(), pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await)?;
        rows.into_iter().map(super::event_from_row).collect()
    }
}
