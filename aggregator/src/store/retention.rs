//! Retention: deletes old data by age and by total size, on either backend, and says exactly what
//! it deleted.
//!
//! - **Age** (`[retention] max_age_days`): events observed before `now - max_age`, the health
//!   history rows reported before it, the snapshot rows of the deleted events and snapshot rows
//!   without an event taken before it, with their objects (full frame and crop).
//! - **Size** (`[retention] max_total_bytes`): when the database bytes plus the snapshot bytes
//!   exceed the limit, the oldest events (with their snapshots), and the health history and
//!   snapshot rows without an event as old as them, until the total is under a low-water mark
//!   ([`LOW_WATER_PERCENT`] of the limit, so that it does not run at every tick).
//!
//! The size counted leaves out the audit log and the sign-in throttle (on SQLite they are measured
//! with `dbstat` and subtracted; PostgreSQL's estimate counts only the tables retention deletes
//! from): the audit log has a retention of its own (`[audit]`), and what an unauthenticated
//! caller can make grow must never cost stored events.
//!
//! What it never deletes: devices, cameras, sites, users, keys, the audit log, and the newest
//! event of each device (the one with its highest sequence number). That event is the device's
//! high-water mark: the ingest acknowledges it to the agent when the agent connects, and a device
//! whose events were all deleted would be told "nothing stored" while its agent resumes after the
//! events it already had acknowledged, and the session would drop every batch as out of order.
//! Such kept events are counted in the report (`kept_high_water`).
//!
//! Deletion works in bounded batches, each its own transaction (never one huge one). Within a
//! batch the rows are deleted first, then (after the commit) the objects they named: a failure in
//! between leaves an object without a row (wasted space, logged and counted), never a row that
//! points at a missing object.
//!
//! Every pass that deletes something records one `retention_runs` row ([`list_runs`]), logs one
//! `info` line naming what it deleted (counts, time range, bytes) and counts it in the
//! `its_retention_*` metrics.
//!
//! Database bytes: SQLite counts the pages in use, `(page_count - freelist_count) * page_size`,
//! exact. PostgreSQL does not give deleted space back to the file system (it reuses it), so its
//! relation sizes would not shrink after a deletion and size retention would go on deleting; it is
//! estimated instead, per table, as rows x (the average size of the newest rows + line pointer) x
//! (the table's total size / its heap size, i.e. with its indexes). The bytes freed by a run are
//! the snapshot bytes of the deleted rows (exact) plus rows x those per-row estimates.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use super::{Db, Pools, StoreError, count_from_db, format_timestamp_ms};
use crate::on_db;
use crate::snapshots::SnapshotObjects;

/// Size retention deletes until the total is at most this percentage of the limit.
pub const LOW_WATER_PERCENT: u64 = 95;
/// Default number of events (or health rows, or orphan snapshot rows) per deletion transaction.
pub const DEFAULT_BATCH: usize = 1000;
/// Default time between runs.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);
/// Default age limit (90 days).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(90 * 86_400);
/// Most measure-and-delete rounds of one size pass (each round re-measures).
const MAX_SIZE_ROUNDS: usize = 8;
/// Snapshot objects deleted concurrently.
const OBJECT_DELETE_CONCURRENCY: usize = 32;
/// Rows sampled for the average row size (PostgreSQL).
const SAMPLE_ROWS: i64 = 1000;
/// Per-row overhead added to the sampled tuple size (PostgreSQL): the line pointer.
const PG_ROW_OVERHEAD: u64 = 4;

/// What retention keeps. `None` turns a limit off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Delete what is older than this.
    pub max_age: Option<Duration>,
    /// Keep the database plus the snapshot objects under this many bytes.
    pub max_total_bytes: Option<u64>,
    /// Time between runs.
    pub interval: Duration,
    /// Rows per deletion transaction (at least 1).
    pub batch: usize,
}

impl Default for RetentionPolicy {
    /// 90 days, no size limit, every 5 minutes, batches of 1000.
    fn default() -> Self {
        Self { max_age: Some(DEFAULT_MAX_AGE), max_total_bytes: None, interval: DEFAULT_INTERVAL, batch: DEFAULT_BATCH }
    }
}

impl RetentionPolicy {
    /// Nothing is ever deleted.
    pub fn off() -> Self {
        Self { max_age: None, max_total_bytes: None, ..Self::default() }
    }

    /// A limit is set.
    pub fn enabled(&self) -> bool {
        self.max_age.is_some() || self.max_total_bytes.is_some()
    }

    /// Events observed before this are too old (`None`: no age limit).
    pub fn cutoff_ms(&self, now_ms: i64) -> Option<i64> {
        self.max_age.map(|age| now_ms.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX)))
    }

    /// The total size retention brings the storage down to once it is above the limit.
    pub fn low_water_bytes(&self) -> Option<u64> {
        self.max_total_bytes.map(|max| (u128::from(max) * u128::from(LOW_WATER_PERCENT) / 100) as u64)
    }
}

/// Why a run deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RetentionReason {
    Age,
    Size,
}

impl RetentionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RetentionReason::Age => "age",
            RetentionReason::Size => "size",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "age" => Ok(RetentionReason::Age),
            "size" => Ok(RetentionReason::Size),
            other => Err(StoreError::Corrupt(format!("retention run reason {other:?}"))),
        }
    }
}

/// One recorded run (a row of `retention_runs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct RetentionRun {
    pub id: i64,
    /// The `now` of the run, Unix ms.
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    pub reason: RetentionReason,
    pub deleted_events: u64,
    /// Health history rows.
    pub deleted_health: u64,
    /// Snapshot rows (each with a full frame and possibly a crop object).
    pub deleted_snapshots: u64,
    /// Snapshot object bytes (exact) plus the estimated database bytes of the deleted rows.
    pub freed_bytes: u64,
    /// `observed_at_ms` of the oldest event left after the run (`None`: no event left).
    pub oldest_kept_ms: Option<i64>,
    /// What was deleted, in words (the run's log line).
    pub detail: String,
}

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

/// Result of [`Retention::run_once`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    /// The runs recorded: at most one per reason, none when nothing was deleted.
    pub runs: Vec<RetentionRun>,
    /// Storage measured before the size pass (size limit set).
    pub size_before: Option<StorageSize>,
    /// Storage measured after the size pass, when it deleted something.
    pub size_after: Option<StorageSize>,
    /// Snapshot objects that could not be deleted (their rows are gone); logged.
    pub object_failures: u64,
    /// Events older than the age cutoff kept because each is its device's newest (high-water) event.
    pub kept_high_water: u64,
}

impl RetentionReport {
    /// The run recorded for `reason`, if it deleted anything.
    pub fn run(&self, reason: RetentionReason) -> Option<&RetentionRun> {
        self.runs.iter().find(|r| r.reason == reason)
    }
}

/// The periodic retention task and its passes.
#[derive(Debug, Clone)]
pub struct Retention {
    db: Db,
    snapshots: SnapshotObjects,
    policy: RetentionPolicy,
    /// Set on shutdown: the current pass stops after its batch.
    stop: Arc<AtomicBool>,
}

/// What one pass deleted so far.
#[derive(Debug, Default)]
struct Tally {
    events: u64,
    health: u64,
    snapshots: u64,
    /// Of which snapshot rows had no event.
    orphan_snapshots: u64,
    snapshot_bytes: u64,
    oldest_ms: Option<i64>,
    newest_ms: Option<i64>,
    objects_deleted: u64,
    objects_missing: u64,
    object_failures: u64,
    batches: u64,
}

impl Tally {
    fn add_events(&mut self, b: &EventBatch) {
        self.events += b.events;
        self.oldest_ms = min_opt(self.oldest_ms, b.oldest_ms);
        self.newest_ms = max_opt(self.newest_ms, b.newest_ms);
        self.batches += 1;
    }

    fn add_snapshots(&mut self, rows: &[SnapshotKeys], orphans: bool) {
        self.snapshots += rows.len() as u64;
        if orphans {
            self.orphan_snapshots += rows.len() as u64;
        }
        self.snapshot_bytes = self.snapshot_bytes.saturating_add(rows.iter().map(SnapshotKeys::bytes).sum::<u64>());
    }

    fn deleted_anything(&self) -> bool {
        self.events + self.health + self.snapshots > 0
    }

    /// Snapshot bytes plus the estimated database bytes of the rows.
    fn freed_bytes(&self, size: &StorageSize) -> u64 {
        self.snapshot_bytes
            .saturating_add(self.events.saturating_mul(size.event_row_bytes))
            .saturating_add(self.health.saturating_mul(size.health_row_bytes))
            .saturating_add(self.snapshots.saturating_mul(size.snapshot_row_bytes))
    }
}

fn min_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

fn max_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    }
}

/// A deleted snapshot row: its objects and their sizes.
#[derive(Debug, Clone, sqlx::FromRow)]
struct SnapshotKeys {
    full_key: String,
    full_bytes: i64,
    crop_key: Option<String>,
    crop_bytes: Option<i64>,
}

impl SnapshotKeys {
    fn bytes(&self) -> u64 {
        let n = |b: i64| u64::try_from(b).unwrap_or(0);
        n(self.full_bytes).saturating_add(self.crop_bytes.map_or(0, n))
    }
}

/// What one event batch deleted (committed).
#[derive(Debug, Default)]
struct EventBatch {
    events: u64,
    oldest_ms: Option<i64>,
    newest_ms: Option<i64>,
    snapshots: Vec<SnapshotKeys>,
}

impl Retention {
    pub fn new(db: Db, snapshots: SnapshotObjects, policy: RetentionPolicy) -> Self {
        Self { db, snapshots, policy, stop: Arc::new(AtomicBool::new(false)) }
    }

    pub fn policy(&self) -> &RetentionPolicy {
        &self.policy
    }

    /// The recorded runs, newest first (at most `limit`, 1..=1000).
    pub async fn list_runs(&self, limit: u32) -> Result<Vec<RetentionRun>, StoreError> {
        list_runs(&self.db, limit).await
    }

    /// The periodic task: a run at start, then one every `interval`, until `shutdown` turns true
    /// (a pass in progress stops after its current batch and records what it did). Errors are
    /// logged and the next interval tries again. Returns at once when the policy is off.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        if !self.policy.enabled() {
            tracing::info!("retention off: no max_age_days, no max_total_bytes");
            return;
        }
        tracing::info!(
            max_age_days = self.policy.max_age.map(|a| a.as_secs() / 86_400),
            max_total_bytes = self.policy.max_total_bytes,
            interval_s = self.policy.interval.as_secs(),
            backend = self.db.backend(),
            "retention on"
        );
        if let Err(e) = self.sync_timescale_policy().await {
            tracing::warn!(error = %e, "could not set the TimescaleDB retention policy; deleting by rows only");
        }
        let mut ticks = tokio::time::interval(self.policy.interval.max(Duration::from_secs(1)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *shutdown.borrow() {
                return;
            }
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.changed() => return,
            }
            let work = self.run_once(crate::unix_ms());
            tokio::pin!(work);
            let result = tokio::select! {
                r = &mut work => r,
                _ = shutdown.changed() => {
                    self.stop.store(true, Ordering::Relaxed);
                    work.await
                }
            };
            if let Err(e) = result {
                crate::telemetry::retention_failed();
                tracing::warn!(error = %e, "retention run failed; trying again in {:?}", self.policy.interval);
            }
        }
    }

    /// One age pass then one size pass, as `now_ms` sees it. Records a run per pass that deleted
    /// something.
    pub async fn run_once(&self, now_ms: i64) -> Result<RetentionReport, StoreError> {
        let mut report = RetentionReport::default();
        if let Some(cutoff) = self.policy.cutoff_ms(now_ms) {
            self.age_pass(now_ms, cutoff, &mut report).await?;
        }
        if let Some(max) = self.policy.max_total_bytes {
            self.size_pass(now_ms, max, &mut report).await?;
        }
        Ok(report)
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn batch(&self) -> usize {
        self.policy.batch.max(1)
    }

    async fn age_pass(&self, now_ms: i64, cutoff: i64, report: &mut RetentionReport) -> Result<(), StoreError> {
        let started = Instant::now();
        let mut tally = Tally::default();
        let batch = self.batch();
        while !self.stopped() {
            let b = self.delete_event_batch(cutoff, batch).await?;
            let n = b.events;
            if n == 0 {
                break;
            }
            tally.add_events(&b);
            tally.add_snapshots(&b.snapshots, false);
            self.delete_objects(&b.snapshots, &mut tally).await;
            if n < batch as u64 {
                break;
            }
        }
        self.delete_health_before(cutoff, &mut tally).await?;
        self.delete_orphan_snapshots_before(cutoff, &mut tally).await?;
        report.kept_high_water = self.count_events_before(cutoff).await?;
        report.object_failures += tally.object_failures;
        if !tally.deleted_anything() {
            return Ok(());
        }
        let size = self.measure().await?;
        let freed = tally.freed_bytes(&size);
        let detail = format!(
            "age: older than {} (max age {}): {}; {} bytes freed ({} snapshot bytes, {} estimated database bytes){}",
            format_timestamp_ms(cutoff),
            human_duration(self.policy.max_age.unwrap_or_default()),
            describe(&tally),
            freed,
            tally.snapshot_bytes,
            freed.saturating_sub(tally.snapshot_bytes),
            kept_note(report.kept_high_water),
        );
        let run = self.record(RetentionReason::Age, now_ms, started, &tally, freed, detail).await?;
        report.runs.push(run);
        Ok(())
    }

    async fn size_pass(&self, now_ms: i64, max: u64, report: &mut RetentionReport) -> Result<(), StoreError> {
        let started = Instant::now();
        let mut size = self.measure().await?;
        crate::telemetry::storage_bytes(size.db_bytes, size.snapshot_bytes);
        report.size_before = Some(size);
        if size.total() <= max {
            return Ok(());
        }
        let before = size;
        let target = self.policy.low_water_bytes().unwrap_or(max);
        let batch = self.batch() as u64;
        let mut tally = Tally::default();
        'rounds: for _ in 0..MAX_SIZE_ROUNDS {
            // Bytes to free, by the estimates of this measurement.
            let mut remaining = size.total().saturating_sub(target);
            // Everything counted against the events: the average cost of one.
            let per_event = (size.total() / size.events.max(1)).max(1);
            while remaining > 0 {
                if self.stopped() {
                    break 'rounds;
                }
                let n = remaining.div_ceil(per_event).clamp(1, batch) as usize;
                let b = self.delete_event_batch(i64::MAX, n).await?;
                if b.events == 0 {
                    break 'rounds; // only the devices' newest events are left
                }
                let mut step = Tally::default();
                step.add_events(&b);
                step.add_snapshots(&b.snapshots, false);
                self.delete_objects(&b.snapshots, &mut step).await;
                // What is as old as the events deleted goes with them.
                if let Some(newest) = b.newest_ms {
                    let before = newest.saturating_add(1);
                    self.delete_health_before(before, &mut step).await?;
                    self.delete_orphan_snapshots_before(before, &mut step).await?;
                }
                remaining = remaining.saturating_sub(step.freed_bytes(&size));
                merge(&mut tally, step);
            }
            size = self.measure().await?;
            if size.total() <= max {
                break;
            }
        }
        crate::telemetry::storage_bytes(size.db_bytes, size.snapshot_bytes);
        report.object_failures += tally.object_failures;
        if !tally.deleted_anything() {
            if size.total() > max {
                tracing::warn!(
                    total_bytes = size.total(),
                    max_total_bytes = max,
                    "storage above max_total_bytes and nothing left that retention may delete"
                );
            }
            return Ok(());
        }
        report.size_after = Some(size);
        let freed = tally.freed_bytes(&before);
        let still = if size.total() > max { " (still above the limit)" } else { "" };
        let detail = format!(
            "size: total {} bytes above the limit {} (low water {}): {}; {} bytes freed ({} snapshot bytes, {} \
             estimated database bytes); total now {} bytes{}",
            before.total(),
            max,
            target,
            describe(&tally),
            freed,
            tally.snapshot_bytes,
            freed.saturating_sub(tally.snapshot_bytes),
            size.total(),
            still,
        );
        let run = self.record(RetentionReason::Size, now_ms, started, &tally, freed, detail).await?;
        report.runs.push(run);
        Ok(())
    }

    /// Deletes the oldest `limit` events observed before `before` (never a device's newest), with
    /// their snapshot rows, in one transaction. Objects are left to the caller.
    async fn delete_event_batch(&self, before: i64, limit: usize) -> Result<EventBatch, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        on_db!(self.db.write(), pool => {
            let mut tx = pool.begin().await?;
            let rows: Vec<(i64, i64)> = sqlx::query_as(
                "SELECT id, observed_at_ms FROM events WHERE observed_at_ms < $1 \
                 AND seq < (SELECT MAX(h.seq) FROM events h WHERE h.device_id = events.device_id) \
                 ORDER BY observed_at_ms, id LIMIT $2",
            )
            .bind(before)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
            let (Some(oldest), Some(newest)) =
                (rows.iter().map(|r| r.1).min(), rows.iter().map(|r| r.1).max())
            else {
                return Ok(EventBatch::default());
            };
            let mut qb = sqlx::QueryBuilder::new(
                "DELETE FROM snapshots WHERE EXISTS (SELECT 1 FROM events e WHERE e.device_id = snapshots.device_id \
                 AND e.seq = snapshots.seq AND e.observed_at_ms >= ",
            );
            qb.push_bind(oldest).push(" AND e.observed_at_ms <= ").push_bind(newest).push(" AND e.id IN (");
            let mut ids = qb.separated(", ");
            for (id, _) in &rows {
                ids.push_bind(*id);
            }
            qb.push(")) RETURNING full_key, full_bytes, crop_key, crop_bytes");
            let snapshots: Vec<SnapshotKeys> = qb.build_query_as().fetch_all(&mut *tx).await?;
            let mut qb = sqlx::QueryBuilder::new("DELETE FROM events WHERE observed_at_ms >= ");
            qb.push_bind(oldest).push(" AND observed_at_ms <= ").push_bind(newest).push(" AND id IN (");
            let mut ids = qb.separated(", ");
            for (id, _) in &rows {
                ids.push_bind(*id);
            }
            qb.push(")");
            let events = qb.build().execute(&mut *tx).await?.rows_affected();
            tx.commit().await?;
            Ok(EventBatch { events, oldest_ms: Some(oldest), newest_ms: Some(newest), snapshots })
        })
    }

    /// Deletes the health history reported before `before`, in batches.
    async fn delete_health_before(&self, before: i64, tally: &mut Tally) -> Result<(), StoreError> {
        let batch = i64::try_from(self.batch()).unwrap_or(i64::MAX);
        while !self.stopped() {
            // The batch ends at the time of its last row (rows of that same millisecond go too).
            let last: Option<i64> = on_db!(self.db.read(), pool => {
                sqlx::query_scalar(
                    "SELECT at_ms FROM device_health WHERE at_ms < $1 ORDER BY at_ms LIMIT 1 OFFSET $2",
                )
                .bind(before)
                .bind(batch - 1)
                .fetch_optional(pool)
                .await
            })?;
            let upto = last.unwrap_or(before.saturating_sub(1));
            let n = on_db!(self.db.write(), pool => {
                sqlx::query("DELETE FROM device_health WHERE at_ms < $1 AND at_ms <= $2")
                    .bind(before)
                    .bind(upto)
                    .execute(pool)
                    .await
                    .map(|r| r.rows_affected())
            })?;
            tally.health += n;
            if last.is_none() || n == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Deletes snapshot rows without an event taken before `before`, in batches, then their
    /// objects.
    async fn delete_orphan_snapshots_before(&self, before: i64, tally: &mut Tally) -> Result<(), StoreError> {
        let batch = i64::try_from(self.batch()).unwrap_or(i64::MAX);
        while !self.stopped() {
            let rows: Vec<SnapshotKeys> = on_db!(self.db.write(), pool => {
                sqlx::query_as(
                    "DELETE FROM snapshots WHERE (device_id, seq) IN (SELECT s.device_id, s.seq FROM snapshots s \
                     WHERE s.taken_at_ms < $1 AND NOT EXISTS (SELECT 1 FROM events e \
                     WHERE e.device_id = s.device_id AND e.seq = s.seq) ORDER BY s.taken_at_ms LIMIT $2) \
                     RETURNING full_key, full_bytes, crop_key, crop_bytes",
                )
                .bind(before)
                .bind(batch)
                .fetch_all(pool)
                .await
            })?;
            tally.add_snapshots(&rows, true);
            self.delete_objects(&rows, tally).await;
            if (rows.len() as i64) < batch {
                break;
            }
        }
        Ok(())
    }

    /// Deletes the objects of deleted snapshot rows; failures are logged and counted.
    async fn delete_objects(&self, rows: &[SnapshotKeys], tally: &mut Tally) {
        let keys: Vec<String> =
            rows.iter().flat_map(|r| std::iter::once(r.full_key.clone()).chain(r.crop_key.clone())).collect();
        for chunk in keys.chunks(OBJECT_DELETE_CONCURRENCY) {
            let mut set = tokio::task::JoinSet::new();
            for key in chunk {
                let objects = self.snapshots.clone();
                let key = key.clone();
                set.spawn(async move {
                    let r = objects.delete(&key).await;
                    (key, r)
                });
            }
            while let Some(joined) = set.join_next().await {
                match joined {
                    Ok((_, Ok(true))) => tally.objects_deleted += 1,
                    Ok((_, Ok(false))) => tally.objects_missing += 1,
                    Ok((key, Err(e))) => {
                        tally.object_failures += 1;
                        tracing::warn!(key, error = %e, "retention: could not delete a snapshot object (its row is deleted)");
                    }
                    Err(e) => {
                        tally.object_failures += 1;
                        tracing::warn!(error = %e, "retention: object deletion task failed");
                    }
                }
            }
        }
    }

    async fn count_events_before(&self, before: i64) -> Result<u64, StoreError> {
        let n: i64 = on_db!(self.db.read(), pool => {
            sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE observed_at_ms < $1").bind(before).fetch_one(pool).await
        })?;
        count_from_db(n)
    }

    /// Records a run, logs it and counts it.
    async fn record(
        &self,
        reason: RetentionReason,
        now_ms: i64,
        started: Instant,
        tally: &Tally,
        freed: u64,
        detail: String,
    ) -> Result<RetentionRun, StoreError> {
        let finished_at_ms = now_ms.saturating_add(i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX));
        let oldest_kept_ms: Option<i64> = on_db!(self.db.read(), pool => {
            sqlx::query_scalar("SELECT MIN(observed_at_ms) FROM events").fetch_one(pool).await
        })?;
        let db_count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let id: i64 = on_db!(self.db.write(), pool => {
            sqlx::query_scalar(
                "INSERT INTO retention_runs (started_at_ms, finished_at_ms, reason, deleted_events, deleted_health, \
                 deleted_snapshots, freed_bytes, oldest_kept_ms, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 RETURNING id",
            )
            .bind(now_ms)
            .bind(finished_at_ms)
            .bind(reason.as_str())
            .bind(db_count(tally.events))
            .bind(db_count(tally.health))
            .bind(db_count(tally.snapshots))
            .bind(db_count(freed))
            .bind(oldest_kept_ms)
            .bind(&detail)
            .fetch_one(pool)
            .await
        })?;
        crate::telemetry::retention_run(reason.as_str(), tally.events, tally.health, tally.snapshots, freed);
        crate::telemetry::retention_object_failures(tally.object_failures);
        tracing::info!(
            run = id,
            reason = reason.as_str(),
            deleted_events = tally.events,
            deleted_health = tally.health,
            deleted_snapshots = tally.snapshots,
            freed_bytes = freed,
            observed_from = tally.oldest_ms.map(format_timestamp_ms),
            observed_to = tally.newest_ms.map(format_timestamp_ms),
            oldest_kept = oldest_kept_ms.map(format_timestamp_ms),
            object_failures = tally.object_failures,
            "retention deleted {detail}"
        );
        Ok(RetentionRun {
            id,
            started_at_ms: now_ms,
            finished_at_ms,
            reason,
            deleted_events: tally.events,
            deleted_health: tally.health,
            deleted_snapshots: tally.snapshots,
            freed_bytes: freed,
            oldest_kept_ms,
            detail,
        })
    }

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
                let hyper = hypertables(pool).await?;
                size.event_row_bytes = pg_row_bytes(pool, PgTable::Events, &hyper).await?;
                size.health_row_bytes = pg_row_bytes(pool, PgTable::DeviceHealth, &hyper).await?;
                size.snapshot_row_bytes = pg_row_bytes(pool, PgTable::Snapshots, &hyper).await?;
                size.db_bytes = size
                    .events
                    .saturating_mul(size.event_row_bytes)
                    .saturating_add(size.health_rows.saturating_mul(size.health_row_bytes))
                    .saturating_add(size.snapshots.saturating_mul(size.snapshot_row_bytes));
            }
        }
        Ok(size)
    }

    /// With TimescaleDB: drop the health history's chunks older than the age limit (or no policy
    /// when there is none). The events hypertable gets no chunk-dropping policy: it would drop the
    /// devices' newest events too (see the module documentation); the row deletion covers it.
    async fn sync_timescale_policy(&self) -> Result<(), StoreError> {
        let Some(pool) = self.db.postgres() else { return Ok(()) };
        let hyper = hypertables(pool).await?;
        if !hyper.iter().any(|t| t == "device_health") {
            return Ok(());
        }
        sqlx::query("SELECT remove_retention_policy('device_health', if_exists => true)").execute(pool).await?;
        if let Some(age) = self.policy.max_age {
            let ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
            sqlx::query(
                "SELECT add_retention_policy('device_health', drop_after => $1::bigint, if_not_exists => true)",
            )
            .bind(ms)
            .execute(pool)
            .await?;
            tracing::info!(drop_after_ms = ms, "TimescaleDB retention policy on device_health");
        }
        Ok(())
    }
}

/// Adds a step's counts to the pass's.
fn merge(into: &mut Tally, step: Tally) {
    into.events += step.events;
    into.health += step.health;
    into.snapshots += step.snapshots;
    into.orphan_snapshots += step.orphan_snapshots;
    into.snapshot_bytes = into.snapshot_bytes.saturating_add(step.snapshot_bytes);
    into.oldest_ms = min_opt(into.oldest_ms, step.oldest_ms);
    into.newest_ms = max_opt(into.newest_ms, step.newest_ms);
    into.objects_deleted += step.objects_deleted;
    into.objects_missing += step.objects_missing;
    into.object_failures += step.object_failures;
    into.batches += step.batches;
}

/// "12 events observed 2024-01-01T..Z to 2024-01-02T..Z in 1 batch, 3 health reports, 2 snapshots
/// (1 without an event), 3 objects deleted, 0 missing, 0 failed".
fn describe(t: &Tally) -> String {
    let events = match (t.oldest_ms, t.newest_ms) {
        (Some(a), Some(b)) => format!(
            "{} events observed {} to {} in {} batch(es)",
            t.events,
            format_timestamp_ms(a),
            format_timestamp_ms(b),
            t.batches
        ),
        _ => format!("{} events", t.events),
    };
    format!(
        "{events}, {} health reports, {} snapshots ({} without an event), {} objects deleted, {} missing, {} failed",
        t.health, t.snapshots, t.orphan_snapshots, t.objects_deleted, t.objects_missing, t.object_failures
    )
}

fn kept_note(kept: u64) -> String {
    if kept == 0 { String::new() } else { format!("; {kept} older events kept as their device's newest") }
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(86_400) { format!("{} d", s / 86_400) } else { format!("{s} s") }
}

/// The recorded runs, newest first (at most `limit`, 1..=1000).
pub async fn list_runs(db: &Db, limit: u32) -> Result<Vec<RetentionRun>, StoreError> {
    if !(1..=1000).contains(&limit) {
        return Err(StoreError::InvalidQuery("limit must be between 1 and 1000".to_owned()));
    }
    type Row = (i64, i64, i64, String, i64, i64, i64, i64, Option<i64>, String);
    let rows: Vec<Row> = on_db!(db.read(), pool => {
        sqlx::query_as(
            "SELECT id, started_at_ms, finished_at_ms, reason, deleted_events, deleted_health, deleted_snapshots, \
             freed_bytes, oldest_kept_ms, detail FROM retention_runs ORDER BY id DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await
    })?;
    rows.into_iter()
        .map(|(id, started, finished, reason, events, health, snapshots, freed, oldest, detail)| {
            Ok(RetentionRun {
                id,
                started_at_ms: started,
                finished_at_ms: finished,
                reason: RetentionReason::parse(&reason)?,
                deleted_events: count_from_db(events)?,
                deleted_health: count_from_db(health)?,
                deleted_snapshots: count_from_db(snapshots)?,
                freed_bytes: count_from_db(freed)?,
                oldest_kept_ms: oldest,
                detail,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL sizes and TimescaleDB

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PgTable {
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
async fn pg_row_bytes(pool: &sqlx::PgPool, table: PgTable, hyper: &[String]) -> Result<u64, StoreError> {
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

/// The hypertables of the current schema (empty without TimescaleDB).
async fn hypertables(pool: &sqlx::PgPool) -> Result<Vec<String>, StoreError> {
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
pub(crate) async fn timescale_setup(pool: &sqlx::PgPool) -> Result<bool, StoreError> {
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
    if let Err(e) = timescale_convert(pool).await {
        tracing::warn!(error = %e, "TimescaleDB: converting to hypertables failed; using the tables as they are");
    }
    Ok(hypertables(pool).await?.iter().any(|t| t == "events"))
}

/// The conversion of [`timescale_setup`], one transaction.
async fn timescale_convert(pool: &sqlx::PgPool) -> Result<(), StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_cutoff_and_low_water() {
        let p = RetentionPolicy {
            max_age: Some(Duration::from_secs(86_400)),
            max_total_bytes: Some(1000),
            ..RetentionPolicy::default()
        };
        assert_eq!(p.cutoff_ms(100_000_000), Some(100_000_000 - 86_400_000));
        assert_eq!(p.low_water_bytes(), Some(950));
        assert!(p.enabled());
        assert!(!RetentionPolicy::off().enabled());
        assert_eq!(RetentionPolicy::off().cutoff_ms(5), None);
        let huge = RetentionPolicy { max_age: Some(Duration::MAX), ..RetentionPolicy::default() };
        assert_eq!(huge.cutoff_ms(0), Some(-i64::MAX));
        let max = RetentionPolicy { max_total_bytes: Some(u64::MAX), ..RetentionPolicy::default() };
        assert_eq!(max.low_water_bytes(), Some((u128::from(u64::MAX) * 95 / 100) as u64));
    }

    #[test]
    fn describe_names_counts_and_range() {
        let t = Tally {
            events: 3,
            health: 2,
            snapshots: 1,
            orphan_snapshots: 1,
            oldest_ms: Some(0),
            newest_ms: Some(1000),
            objects_deleted: 2,
            batches: 1,
            ..Tally::default()
        };
        let text = describe(&t);
        assert!(text.starts_with("3 events observed 1970-01-01T00:00:00.000Z to 1970-01-01T00:00:01.000Z"), "{text}");
        assert!(text.contains("2 health reports, 1 snapshots (1 without an event), 2 objects deleted"), "{text}");
    }
}
