//! The stored size of PostgreSQL rows, for size retention: the average of the newest rows plus
//! their share of the indexes (plain tables or TimescaleDB hypertables).

use crate::store::StoreError;

/// Rows sampled for the average row size (PostgreSQL).
const SAMPLE_ROWS: i64 = 1000;
/// Per-row overhead added to the sampled tuple size (PostgreSQL): the line pointer.
const PG_ROW_OVERHEAD: u64 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PgTable {
    Events,
    DeviceHealth,
    Snapshots,
}

impl PgTable {
    fn name(self) -> &'static str {
        match self {
            PgTable::Events => "events",
            PgTable::DeviceHealth => "device_health",
            PgTable::Snapshots => "snapshots",
        }
    }

    /// Average stored size of the newest rows (at most [`SAMPLE_ROWS`]).
    fn sample_sql(self) -> &'static str {
        match self {
            PgTable::Events => {
                "SELECT CAST(COALESCE(AVG(pg_column_size(t.*)), 0) AS BIGINT) FROM \
                 (SELECT * FROM events ORDER BY observed_at_ms DESC LIMIT $1) t"
            }
            PgTable::DeviceHealth => {
                "SELECT CAST(COALESCE(AVG(pg_column_size(t.*)), 0) AS BIGINT) FROM \
                 (SELECT * FROM device_health ORDER BY at_ms DESC LIMIT $1) t"
            }
            PgTable::Snapshots => {
                "SELECT CAST(COALESCE(AVG(pg_column_size(t.*)), 0) AS BIGINT) FROM \
                 (SELECT * FROM snapshots ORDER BY taken_at_ms DESC LIMIT $1) t"
            }
        }
    }

    /// Total size (with indexes) and heap size (with TOAST) of a plain table.
    fn plain_size_sql(self) -> &'static str {
        match self {
            PgTable::Events => "SELECT pg_total_relation_size('events'), pg_table_size('events')",
            PgTable::DeviceHealth => "SELECT pg_total_relation_size('device_health'), pg_table_size('device_health')",
            PgTable::Snapshots => "SELECT pg_total_relation_size('snapshots'), pg_table_size('snapshots')",
        }
    }

    /// The same for a hypertable (its chunks).
    fn hyper_size_sql(self) -> &'static str {
        match self {
            PgTable::Events => {
                "SELECT CAST(COALESCE(total_bytes, 0) AS BIGINT), \
                 CAST(COALESCE(table_bytes, 0) + COALESCE(toast_bytes, 0) AS BIGINT) \
                 FROM hypertable_detailed_size('events')"
            }
            PgTable::DeviceHealth => {
                "SELECT CAST(COALESCE(total_bytes, 0) AS BIGINT), \
                 CAST(COALESCE(table_bytes, 0) + COALESCE(toast_bytes, 0) AS BIGINT) \
                 FROM hypertable_detailed_size('device_health')"
            }
            PgTable::Snapshots => {
                "SELECT CAST(COALESCE(total_bytes, 0) AS BIGINT), \
                 CAST(COALESCE(table_bytes, 0) + COALESCE(toast_bytes, 0) AS BIGINT) \
                 FROM hypertable_detailed_size('snapshots')"
            }
        }
    }
}

/// Estimated bytes of one row with its share of the indexes.
pub(crate) async fn row_bytes(pool: &sqlx::PgPool, table: PgTable, hyper: &[String]) -> Result<u64, StoreError> {
    let avg: i64 = sqlx::query_scalar(table.sample_sql()).bind(SAMPLE_ROWS).fetch_one(pool).await?;
    if avg <= 0 {
        return Ok(0);
    }
    let sql = if hyper.iter().any(|t| t == table.name()) { table.hyper_size_sql() } else { table.plain_size_sql() };
    let sizes: Option<(i64, i64)> = sqlx::query_as(sql).fetch_optional(pool).await?;
    let (total, heap) = sizes.unwrap_or((0, 0));
    // Indexes cost in proportion to the rows: total / heap, within sane bounds.
    let factor = if heap > 0 && total >= heap { (total as f64 / heap as f64).min(20.0) } else { 1.0 };
    let row = (avg as u64).saturating_add(PG_ROW_OVERHEAD);
    Ok((row as f64 * factor).round() as u64)
}
