//! The age and size passes: batches of deletions, each its own transaction, then the snapshot
//! objects of what was deleted; and the record of each run.

use std::time::{Duration, Instant};

use super::Retention;
use super::measure::StorageSize;
use super::policy::{RetentionReason, RetentionReport, RetentionRun};
use crate::store::db::on_db;
use crate::store::{StoreError, count_from_db, format_timestamp_ms};

/// Most measure-and-delete rounds of one size pass (each round re-measures).
const MAX_SIZE_ROUNDS: usize = 8;
/// Snapshot objects deleted concurrently.
const OBJECT_DELETE_CONCURRENCY: usize = 32;

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
    pub(super) async fn age_pass(
        &self,
        now_ms: i64,
        cutoff: i64,
        report: &mut RetentionReport,
    ) -> Result<(), StoreError> {
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

    pub(super) async fn size_pass(
        &self,
        now_ms: i64,
        max: u64,
        report: &mut RetentionReport,
    ) -> Result<(), StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
