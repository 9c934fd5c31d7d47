//! What size retention counts: rows and bytes, measured per backend (SQLite: the file's pages;
//! PostgreSQL: sampled row sizes, see [`crate::store::postgres::size`]).

use serde::Serialize;

use super::Retention;
use crate::store::db::on_db;
use crate::store::{Pools, StoreError, count_from_db};

/// What size retention counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct StorageSize {
    /// Database bytes: SQLite, the pages in use (the whole file); PostgreSQL, the estimated live
    /// bytes of the events, health history and snapshot tables with their indexes.
    pub db_bytes: u64,
    /// Sum of the snapshot rows' `full_bytes + crop_bytes`.
    pub snapshot_bytes: u64,
    pub events: u64,
    pub health_rows: u64,
    pub snapshots: u64,
    /// Estimated database bytes per row of each table.
    pub event_row_bytes: u64,
    pub health_row_bytes: u64,
    pub snapshot_row_bytes: u64,
}

impl StorageSize {
    pub fn total(&self) -> u64 {
        self.db_bytes.saturating_add(self.snapshot_bytes)
    }
}

impl Retention {
    /// What size retention counts now (see [`StorageSize`]).
    pub async fn measure(&self) -> Result<StorageSize, StoreError> {
        let pool = self.db.read();
        let (events, health, snapshots, snapshot_bytes): (i64, i64, i64, i64) = on_db!(pool, pool => {
            sqlx::query_as(
                "SELECT (SELECT COUNT(*) FROM events), (SELECT COUNT(*) FROM device_health), \
                 (SELECT COUNT(*) FROM snapshots), \
                 (SELECT CAST(COALESCE(SUM(full_bytes + COALESCE(crop_bytes, 0)), 0) AS BIGINT) FROM snapshots)",
            )
            .fetch_one(pool)
            .await
        })?;
        let mut size = StorageSize {
            events: count_from_db(events)?,
            health_rows: count_from_db(health)?,
            snapshots: count_from_db(snapshots)?,
            snapshot_bytes: count_from_db(snapshot_bytes)?,
            ..StorageSize::default()
        };
        match &self.db.pools {
            Pools::Sqlite { reader, .. } => {
                let pragma = |name: &'static str| async move {
                    let v: i64 = sqlx::query_scalar(name).fetch_one(reader).await?;
                    Ok::<u64, StoreError>(u64::try_from(v).unwrap_or(0))
                };
                let pages = pragma("PRAGMA page_count").await?;
                let free = pragma("PRAGMA freelist_count").await?;
                let page_size = pragma("PRAGMA page_size").await?;
                // What retention does not manage (the audit log and sign-in throttle, which
                // anyone can make grow and which have their own limits) is not counted: it must
                // never make size retention delete events.
                let names: Vec<String> = sqlx::query_scalar(
                    "SELECT name FROM sqlite_schema WHERE tbl_name IN ('audit_log', 'login_throttle') AND rootpage > 0",
                )
                .fetch_all(reader)
                .await?;
                let mut unmanaged: u64 = 0;
                for name in &names {
                    let bytes: i64 = sqlx::query_scalar(
                        "SELECT CAST(COALESCE(SUM(pgsize), 0) AS BIGINT) FROM dbstat WHERE name = $1",
                    )
                    .bind(name)
                    .fetch_one(reader)
                    .await?;
                    unmanaged = unmanaged.saturating_add(u64::try_from(bytes).unwrap_or(0));
                }
                size.db_bytes = pages.saturating_sub(free).saturating_mul(page_size).saturating_sub(unmanaged);
                // The file holds everything: one average for every row.
                let rows = size.events + size.health_rows + size.snapshots;
                let per_row = size.db_bytes.checked_div(rows).unwrap_or(0);
                size.event_row_bytes = per_row;
                size.health_row_bytes = per_row;
                size.snapshot_row_bytes = per_row;
            }
            Pools::Postgres(pool) => {
                let hyper = crate::store::postgres::timescale::hypertables(pool).await?;
                size.event_row_bytes = crate::store::postgres::size::row_bytes(
                    pool,
                    crate::store::postgres::size::PgTable::Events,
                    &hyper,
                )
                .await?;
                size.health_row_bytes = crate::store::postgres::size::row_bytes(
                    pool,
                    crate::store::postgres::size::PgTable::DeviceHealth,
                    &hyper,
                )
                .await?;
                size.snapshot_row_bytes = crate::store::postgres::size::row_bytes(
                    pool,
                    crate::store::postgres::size::PgTable::Snapshots,
                    &hyper,
                )
                .await?;
                size.db_bytes = size
                    .events
                    .saturating_mul(size.event_row_bytes)
                    .saturating_add(size.health_rows.saturating_mul(size.health_row_bytes))
                    .saturating_add(size.snapshots.saturating_mul(size.snapshot_row_bytes));
            }
        }
        Ok(size)
    }
}
