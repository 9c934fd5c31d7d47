//! SQLite backend.
//!
//! One writer connection (every write is serialised by SQLite anyway; a single writer never
//! meets `SQLITE_BUSY` on lock upgrade) and a small pool of readers, WAL journal with
//! `synchronous=FULL` so that a committed batch survives a power cut before it is acknowledged.
//! Batches are inserted with multi-row `INSERT .. ON CONFLICT DO NOTHING` statements.

use std::str::FromStr as _;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use its_shared::EventEnvelope;
use its_shared::wire::{Heartbeat, Hello};
use sqlx::Arguments as _;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::{EventStore, InsertOutcome, RowIn, StoreError, cameras_json, distinct_cameras, health_json};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Bound parameters per event row of the insert statement. (Positional `?` only: with numbered
/// `?NNN` parameters the driver looks up every parameter's name, quadratic in their number.)
const PARAMS_PER_ROW: usize = 12;
/// Most rows in one insert statement: 512 × 12 parameters, far under SQLite's
/// `SQLITE_MAX_VARIABLE_NUMBER` (32,766).
const MAX_ROWS_PER_STATEMENT: usize = 512;
const _: () = assert!(MAX_ROWS_PER_STATEMENT * PARAMS_PER_ROW <= 32_766);

/// Insert statements for 1, 2, 4, .., 512 rows. A batch is inserted in power-of-two chunks, so
/// only these ten statement texts exist: each is prepared once per connection and then reused
/// from the statement cache, whatever the batch sizes.
fn insert_statements() -> &'static [String] {
    static SQL: OnceLock<Vec<String>> = OnceLock::new();
    SQL.get_or_init(|| {
        let mut all = Vec::new();
        let mut rows = 1;
        while rows <= MAX_ROWS_PER_STATEMENT {
            let row = format!("({})", ["?"; PARAMS_PER_ROW].join(", "));
            let mut sql = String::with_capacity(200 + rows * (row.len() + 2));
            sql.push_str(
                "INSERT INTO events (device_id, ingested_at_ms, seq, camera, kind, observed_at_ms, label, payload, \
                 zone, line, direction, speed_kmh) VALUES ",
            );
            for i in 0..rows {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&row);
            }
            sql.push_str(" ON CONFLICT (device_id, seq) DO NOTHING RETURNING seq");
            all.push(sql);
            rows *= 2;
        }
        all
    })
}

/// Readers of a file database.
const READERS: u32 = 4;

/// [`EventStore`] on SQLite.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    vault: crate::vault::Vault,
}

impl SqliteStore {
    /// Opens `sqlite://path` (created if missing, mode 0600: the file holds hashes and sealed
    /// secrets, see [`crate::fsutil`]) or `sqlite::memory:` and applies migrations.
    pub async fn open(url: &str, vault: crate::vault::Vault) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            // 64 MiB page cache per connection (default 2 MiB): the four time indexes are written
            // at several places per batch, and their pages stay cached between batches.
            .pragma("cache_size", "-65536")
            // Deleted or replaced content is overwritten where that costs no extra I/O: a secret
            // sealed in place of its plain form does not linger in the page (see `sealed`).
            .pragma("secure_delete", "FAST");
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        if !in_memory {
            let file = opts.get_filename();
            crate::fsutil::private_database_file(file)
                .map_err(|e| StoreError::Config(format!("{}: {e}", file.display())))?;
        }
        let writer_opts =
            SqlitePoolOptions::new().max_connections(1).min_connections(1).acquire_timeout(Duration::from_secs(30));
        let (writer, reader) = if in_memory {
            // An in-memory database lives as long as its connection: keep exactly one forever.
            let pool = writer_opts.idle_timeout(None).max_lifetime(None).connect_with(opts).await?;
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
        Ok(Self { writer, reader, vault })
    }
}

/// Shares the text of repeated values (cameras, kinds, labels: a handful per batch) between the
/// rows' bound parameters instead of copying it for every row.
#[derive(Default)]
struct Interner(Vec<Arc<str>>);

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.iter().find(|a| a.as_ref() == s) {
            return Arc::clone(a);
        }
        let a: Arc<str> = Arc::from(s);
        if self.0.len() < 64 {
            self.0.push(Arc::clone(&a));
        }
        a
    }
}

fn bind_rows<'a>(
    args: &mut SqliteArguments,
    device_id: &str,
    now_ms: i64,
    rows: impl Iterator<Item = RowIn<'a>>,
    strings: &mut Interner,
) -> Result<(), String> {
    let e = |e: sqlx::error::BoxDynError| format!("binding an event: {e}");
    let device_id = strings.get(device_id);
    for r in rows {
        args.add(Arc::clone(&device_id)).map_err(e)?;
        args.add(now_ms).map_err(e)?;
        args.add(r.seq).map_err(e)?;
        args.add(strings.get(r.camera)).map_err(e)?;
        args.add(strings.get(r.kind)).map_err(e)?;
        args.add(r.observed_at_ms).map_err(e)?;
        args.add(r.label.map(|l| strings.get(l))).map_err(e)?;
        args.add(r.payload).map_err(e)?;
        args.add(r.zone.map(|z| strings.get(z))).map_err(e)?;
        args.add(r.line.map(|l| strings.get(l))).map_err(e)?;
        args.add(r.direction).map_err(e)?;
        args.add(r.speed_kmh).map_err(e)?;
    }
    Ok(())
}

/// [`EventStore::insert_events`] on SQLite, for the rows of `events` ([`super::prepare_rows`], not empty):
/// chunks of a power of two rows per statement, one transaction.
pub(super) async fn insert_events(
    writer: &SqlitePool,
    device_id: &str,
    events: &[EventEnvelope],
    rows: Vec<RowIn<'_>>,
    now_ms: i64,
) -> Result<InsertOutcome, StoreError> {
    let statements = insert_statements();
    let total = rows.len();
    let mut strings = Interner::default();
    let mut rows = rows.into_iter();
    let mut left = total;
    let mut tx = writer.begin().await?;
    let mut new: Vec<i64> = Vec::with_capacity(total);
    while left > 0 {
        // Largest power of two <= min(left, MAX_ROWS_PER_STATEMENT).
        let level = left.min(MAX_ROWS_PER_STATEMENT).ilog2() as usize;
        let n = 1usize << level;
        left -= n;
        let sql =
            statements.get(level).ok_or_else(|| StoreError::InvalidData("insert chunk out of range".to_owned()))?;
        let mut args = SqliteArguments::default();
        args.reserve(n * PARAMS_PER_ROW, 0);
        bind_rows(&mut args, device_id, now_ms, rows.by_ref().take(n), &mut strings)
            .map_err(StoreError::InvalidData)?;
        new.extend(sqlx::query_scalar_with::<_, i64, _>(sql.as_str(), args).fetch_all(&mut *tx).await?);
    }
    let outcome = InsertOutcome::from_new_seqs(total, new)?;
    super::rollups::mark_dirty!(tx, std::borrow::Cow::<str>::Borrowed, device_id, events, &outcome.new_seqs, now_ms);
    tx.commit().await?;
    Ok(outcome)
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn record_hello(&self, device_id: &str, hello: &Hello, now_ms: i64) -> Result<u64, StoreError> {
        let mut tx = self.writer.begin().await?;
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
        .execute(&mut *tx)
        .await?;
        // The cameras announced now; the others stay, marked as no longer announced.
        sqlx::query("UPDATE cameras SET announced = 0 WHERE device_id = ? AND announced <> 0")
            .bind(device_id)
            .execute(&mut *tx)
            .await?;
        for camera in distinct_cameras(&hello.cameras) {
            sqlx::query(
                "INSERT INTO cameras (device_id, camera, site_id, first_seen_ms, last_announced_ms, announced) \
                 VALUES (?1, ?2, (SELECT site_id FROM devices WHERE device_id = ?1), ?3, ?3, 1) \
                 ON CONFLICT (device_id, camera) DO UPDATE SET last_announced_ms = excluded.last_announced_ms, \
                 announced = 1",
            )
            .bind(device_id)
            .bind(camera)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.high_water(device_id).await
    }

    async fn record_health(&self, device_id: &str, hb: &Heartbeat, now_ms: i64) -> Result<(), StoreError> {
        let cameras: Vec<String> = hb.health.cameras.iter().map(|c| c.camera.clone()).collect();
        let report = health_json(&hb.health)?;
        let mut tx = self.writer.begin().await?;
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
        .bind(report.as_str())
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO device_health (device_id, at_ms, report) VALUES (?, ?, ?)")
            .bind(device_id)
            .bind(now_ms)
            .bind(report)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn db(&self) -> super::Db {
        super::Db::new(
            super::Pools::Sqlite { writer: self.writer.clone(), reader: self.reader.clone() },
            self.vault.clone(),
        )
    }
}
