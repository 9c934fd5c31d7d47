//! Storage: what retention deletes and the storage size it measures.

use metrics::{Unit, counter, gauge};

use super::Metric;

pub const RETENTION_DELETED_EVENTS: &str = "its_retention_deleted_events_total";
pub const RETENTION_DELETED_HEALTH: &str = "its_retention_deleted_health_total";
pub const RETENTION_DELETED_SNAPSHOTS: &str = "its_retention_deleted_snapshots_total";
pub const RETENTION_DELETED_BYTES: &str = "its_retention_deleted_bytes_total";
pub const RETENTION_RUNS: &str = "its_retention_runs_total";
pub const RETENTION_OBJECT_FAILURES: &str = "its_retention_object_delete_failures_total";
pub const RETENTION_FAILURES: &str = "its_retention_failures_total";
pub const STORAGE_BYTES: &str = "its_storage_bytes";

pub(super) const METRICS: &[Metric] = &[
    Metric::counter(RETENTION_DELETED_EVENTS, Unit::Count, "Events deleted by retention, by reason: age, size"),
    Metric::counter(
        RETENTION_DELETED_HEALTH,
        Unit::Count,
        "Device health history rows deleted by retention, by reason: age, size",
    ),
    Metric::counter(
        RETENTION_DELETED_SNAPSHOTS,
        Unit::Count,
        "Snapshot rows (and their objects) deleted by retention, by reason: age, size",
    ),
    Metric::counter(
        RETENTION_DELETED_BYTES,
        Unit::Bytes,
        "Bytes freed by retention (snapshot objects exactly, database rows estimated), by reason: age, size",
    ),
    Metric::counter(RETENTION_RUNS, Unit::Count, "Retention runs that deleted something, by reason: age, size"),
    Metric::counter(
        RETENTION_OBJECT_FAILURES,
        Unit::Count,
        "Snapshot objects whose deletion failed after their rows were deleted (left in object storage; logged)",
    ),
    Metric::counter(
        RETENTION_FAILURES,
        Unit::Count,
        "Retention runs that failed (database errors); retried next interval",
    ),
    Metric::gauge(
        STORAGE_BYTES,
        Unit::Bytes,
        "Storage that size retention counts (database and snapshot bytes), measured by its last run, by part: database, snapshots",
    ),
];

/// One retention run that deleted something. `reason`: `age` or `size`.
pub fn retention_run(reason: &'static str, events: u64, health: u64, snapshots: u64, bytes: u64) {
    counter!(RETENTION_RUNS, "reason" => reason).increment(1);
    counter!(RETENTION_DELETED_EVENTS, "reason" => reason).increment(events);
    counter!(RETENTION_DELETED_HEALTH, "reason" => reason).increment(health);
    counter!(RETENTION_DELETED_SNAPSHOTS, "reason" => reason).increment(snapshots);
    counter!(RETENTION_DELETED_BYTES, "reason" => reason).increment(bytes);
}

pub fn retention_object_failures(n: u64) {
    counter!(RETENTION_OBJECT_FAILURES).increment(n);
}

pub fn retention_failed() {
    counter!(RETENTION_FAILURES).increment(1);
}

/// What size retention measured: database and snapshot bytes.
pub fn storage_bytes(database: u64, snapshots: u64) {
    gauge!(STORAGE_BYTES, "part" => "database").set(database as f64);
    gauge!(STORAGE_BYTES, "part" => "snapshots").set(snapshots as f64);
}
