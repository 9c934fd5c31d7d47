//! TimescaleDB: turning the events and the health history into hypertables when the extension
//! is there, and the health history's chunk retention policy.

use crate::store::StoreError;

/// The hypertables of the current schema (empty without TimescaleDB).
pub(crate) async fn hypertables(pool: &sqlx::PgPool) -> Result<Vec<String>, StoreError> {
    let installed: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')")
            .fetch_one(pool)
            .await?;
    if !installed {
        return Ok(Vec::new());
    }
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(hypertable_name AS TEXT) FROM timescaledb_information.hypertables \
         WHERE hypertable_schema = current_schema()",
    )
    .fetch_all(pool)
    .await?;
    Ok(names)
}

/// The events' keys as a hypertable needs them (each unique constraint contains the time column),
/// applied before `create_hypertable`. Public for the test that checks, on plain PostgreSQL, that
/// the ingest stays idempotent and retention works with them.
#[doc(hidden)]
pub const HYPERTABLE_EVENT_KEYS: &[&str] = &[
    "ALTER TABLE events DROP CONSTRAINT events_device_seq",
    "ALTER TABLE events DROP CONSTRAINT events_pkey",
    "ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (id, observed_at_ms)",
    "ALTER TABLE events ADD CONSTRAINT events_device_seq UNIQUE (device_id, seq, observed_at_ms)",
];

/// Key of the advisory lock that serialises the TimescaleDB conversion between aggregators
/// starting at once.
const TIMESCALE_LOCK_KEY: i64 = 0x6974_735f_7473_6462; // "its_tsdb"

/// TimescaleDB set-up, run by [`super::PostgresStore::open`] after the migrations. Returns
/// whether the events table is a hypertable (the health history is converted with it).
///
/// When the `timescaledb` extension is available (and can be created): events become a hypertable
/// on `observed_at_ms` and the health history one on `at_ms`, one-day chunks (86,400,000 ms),
/// existing rows migrated, with `its_unix_now_ms()` as their integer "now". A hypertable's unique
/// constraints must contain its time column, so the events' keys become
/// `PRIMARY KEY (id, observed_at_ms)` (the identity stays unique by itself) and
/// `UNIQUE (device_id, seq, observed_at_ms)`: the ingest stays idempotent because a resent event
/// carries the same `observed_at_ms` (it comes from the agent's outbox unchanged), and it inserts
/// with `ON CONFLICT DO NOTHING`, which needs no particular constraint. Everything is one
/// transaction under an advisory lock, and skipped for a table that is already a hypertable.
///
/// Without the extension (or when creating it fails, e.g. it is not in
/// `shared_preload_libraries` or the user may not create it) the plain tables are used.
pub(crate) async fn setup(pool: &sqlx::PgPool) -> Result<bool, StoreError> {
    let available: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')")
            .fetch_one(pool)
            .await?;
    if !available {
        return Ok(false);
    }
    if let Err(e) = sqlx::query("CREATE EXTENSION IF NOT EXISTS timescaledb").execute(pool).await {
        tracing::warn!(error = %e, "TimescaleDB is available but the extension could not be created; using plain tables");
        return Ok(false);
    }
    // A failed conversion is rolled back whole: the plain tables stay and keep working.
    if let Err(e) = convert(pool).await {
        tracing::warn!(error = %e, "TimescaleDB: converting to hypertables failed; using the tables as they are");
    }
    Ok(hypertables(pool).await?.iter().any(|t| t == "events"))
}

/// The conversion of [`setup`], one transaction.
async fn convert(pool: &sqlx::PgPool) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(TIMESCALE_LOCK_KEY).execute(&mut *tx).await?;
    let hyper: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(hypertable_name AS TEXT) FROM timescaledb_information.hypertables \
         WHERE hypertable_schema = current_schema()",
    )
    .fetch_all(&mut *tx)
    .await?;
    if !hyper.iter().any(|t| t == "events") {
        tracing::info!("TimescaleDB: converting events into a hypertable (existing rows are moved into chunks)");
        for sql in HYPERTABLE_EVENT_KEYS {
            sqlx::query(*sql).execute(&mut *tx).await?;
        }
        sqlx::query(
            "SELECT create_hypertable('events', 'observed_at_ms', chunk_time_interval => CAST(86400000 AS BIGINT), \
             create_default_indexes => false, migrate_data => true, if_not_exists => true)",
        )
        .execute(&mut *tx)
        .await?;
    }
    if !hyper.iter().any(|t| t == "device_health") {
        tracing::info!("TimescaleDB: converting device_health into a hypertable");
        sqlx::query(
            "SELECT create_hypertable('device_health', 'at_ms', chunk_time_interval => CAST(86400000 AS BIGINT), \
             create_default_indexes => false, migrate_data => true, if_not_exists => true)",
        )
        .execute(&mut *tx)
        .await?;
    }
    for sql in [
        "CREATE OR REPLACE FUNCTION its_unix_now_ms() RETURNS BIGINT LANGUAGE SQL STABLE AS \
         $$ SELECT CAST(floor(extract(epoch FROM now()) * 1000) AS BIGINT) $$",
        "SELECT set_integer_now_func('events', 'its_unix_now_ms', replace_if_exists => true)",
        "SELECT set_integer_now_func('device_health', 'its_unix_now_ms', replace_if_exists => true)",
    ] {
        sqlx::query(sql).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// With TimescaleDB: drop the health history's chunks older than `max_age` (or no policy when
/// there is none). The events hypertable gets no chunk-dropping policy: it would drop the
/// devices' newest events too (see [`crate::store::retention`]); the row deletion covers it.
pub(crate) async fn sync_health_retention(
    pool: &sqlx::PgPool,
    max_age: Option<std::time::Duration>,
) -> Result<(), StoreError> {
    let hyper = hypertables(pool).await?;
    if !hyper.iter().any(|t| t == "device_health") {
        return Ok(());
    }
    sqlx::query("SELECT remove_retention_policy('device_health', if_exists => true)").execute(pool).await?;
    if let Some(age) = max_age {
        let ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        sqlx::query("SELECT add_retention_policy('device_health', drop_after => $1::bigint, if_not_exists => true)")
            .bind(ms)
            .execute(pool)
            .await?;
        tracing::info!(drop_after_ms = ms, "TimescaleDB retention policy on device_health");
    }
    Ok(())
}
