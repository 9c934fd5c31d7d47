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
//!
//! Inside: [`policy`] (what to keep, what a run reports), `passes` (the age and size passes and
//! their deletions), `measure` (what size retention counts, per backend), this file (the periodic
//! task and the run log). TimescaleDB's own retention policy is set by
//! [`super::postgres::timescale`]. May use: the rest of [`crate::store`] (rows, the backends'
//! size estimates), [`crate::snapshots`] (deleting objects), [`crate::telemetry`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use super::{Db, StoreError, count_from_db};
use crate::snapshots::SnapshotObjects;
use crate::store::db::on_db;

mod measure;
mod passes;
pub mod policy;

pub use measure::StorageSize;
pub use policy::{
    DEFAULT_BATCH, DEFAULT_INTERVAL, DEFAULT_MAX_AGE, LOW_WATER_PERCENT, RetentionPolicy, RetentionReason,
    RetentionReport, RetentionRun,
};

/// The periodic retention task and its passes.
#[derive(Debug, Clone)]
pub struct Retention {
    db: Db,
    snapshots: SnapshotObjects,
    policy: RetentionPolicy,
    /// Set on shutdown: the current pass stops after its batch.
    stop: Arc<AtomicBool>,
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

    /// With TimescaleDB: drop the health history's chunks older than the age limit (or no policy
    /// when there is none). The events hypertable gets no chunk-dropping policy: it would drop the
    /// devices' newest events too (see the module documentation); the row deletion covers it.
    async fn sync_timescale_policy(&self) -> Result<(), StoreError> {
        match self.db.postgres() {
            Some(pool) => super::postgres::timescale::sync_health_retention(pool, self.policy.max_age).await,
            None => Ok(()),
        }
    }
}

/// The recorded runs, newest first (at most `limit`, 1..=1000).
pub async fn list_runs(db: &Db, limit: u32) -> Result<Vec<RetentionRun>, StoreError> {
    if !(1..=1000).contains(&limit) {
        return Err(StoreError::InvalidQuery("limit must be between 1 and 1000".to_owned()));
    }
    #[derive(sqlx::FromRow)]
    struct Row {
        id: i64,
        started_at_ms: i64,
        finished_at_ms: i64,
        reason: String,
        deleted_events: i64,
        deleted_health: i64,
        deleted_snapshots: i64,
        freed_bytes: i64,
        oldest_kept_ms: Option<i64>,
        detail: String,
    }
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
        .map(|r| {
            Ok(RetentionRun {
                id: r.id,
                started_at_ms: r.started_at_ms,
                finished_at_ms: r.finished_at_ms,
                reason: RetentionReason::parse(&r.reason)?,
                deleted_events: count_from_db(r.deleted_events)?,
                deleted_health: count_from_db(r.deleted_health)?,
                deleted_snapshots: count_from_db(r.deleted_snapshots)?,
                freed_bytes: count_from_db(r.freed_bytes)?,
                oldest_kept_ms: r.oldest_kept_ms,
                detail: r.detail,
            })
        })
        .collect()
}
