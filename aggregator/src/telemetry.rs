//! Every metric the aggregator exports, emitted from one place, with its name and unit.

use std::time::Duration;

use its_shared::session::IngestStats;
use metrics::{counter, gauge, histogram};

pub const CONNECTIONS_TOTAL: &str = "its_ingest_connections_total";
pub const CONNECTIONS_ACTIVE: &str = "its_ingest_connections_active";
pub const HANDSHAKES_REFUSED: &str = "its_ingest_handshakes_refused_total";
pub const DISABLED_REFUSED: &str = "its_ingest_disabled_device_refused_total";
pub const REVOKED_CLOSED: &str = "its_ingest_revoked_certificate_closed_total";
pub const CONNECTIONS_LIMITED: &str = "its_ingest_connections_limited_total";
pub const HELLO_REFUSED: &str = "its_ingest_hello_refused_total";
pub const EVENTS_STORED: &str = "its_ingest_events_stored_total";
pub const EVENTS_DUPLICATE: &str = "its_ingest_events_duplicate_total";
pub const BATCHES_COMMITTED: &str = "its_ingest_batches_committed_total";
pub const BATCHES_OUT_OF_ORDER: &str = "its_ingest_batches_out_of_order_total";
pub const COMMIT_SECONDS: &str = "its_ingest_commit_seconds";
pub const SNAPSHOTS_STORED: &str = "its_ingest_snapshots_stored_total";
pub const SNAPSHOT_BYTES_STORED: &str = "its_ingest_snapshot_bytes_stored_total";
pub const SNAPSHOTS_DUPLICATE: &str = "its_ingest_snapshots_duplicate_total";
pub const SNAPSHOTS_REFUSED: &str = "its_ingest_snapshots_refused_total";
pub const SNAPSHOTS_FAILED: &str = "its_ingest_snapshots_failed_total";
pub const SNAPSHOT_STORE_SECONDS: &str = "its_ingest_snapshot_store_seconds";
pub const RETENTION_DELETED_EVENTS: &str = "its_retention_deleted_events_total";
pub const RETENTION_DELETED_HEALTH: &str = "its_retention_deleted_health_total";
pub const RETENTION_DELETED_SNAPSHOTS: &str = "its_retention_deleted_snapshots_total";
pub const RETENTION_DELETED_BYTES: &str = "its_retention_deleted_bytes_total";
pub const RETENTION_RUNS: &str = "its_retention_runs_total";
pub const RETENTION_OBJECT_FAILURES: &str = "its_retention_object_delete_failures_total";
pub const RETENTION_FAILURES: &str = "its_retention_failures_total";
pub const STORAGE_BYTES: &str = "its_storage_bytes";
pub const BUS_LAGGED: &str = "its_bus_lagged_total";
pub const HTTP_CONNECTIONS_OPEN: &str = "its_http_connections_open";
pub const HTTP_CONNECTIONS_REFUSED: &str = "its_http_connections_refused_total";
pub const HTTP_TIMEOUTS: &str = "its_http_timeouts_total";

/// Registers descriptions (call once at start-up, after installing the recorder).
pub fn describe() {
    crate::export::describe();
    #[cfg(feature = "embedded-mqtt")]
    crate::mqtt::broker::describe();
    metrics::describe_counter!(CONNECTIONS_TOTAL, "Agent connections accepted after mutual TLS");
    metrics::describe_gauge!(CONNECTIONS_ACTIVE, "Agent connections open now");
    metrics::describe_counter!(
        HANDSHAKES_REFUSED,
        "QUIC/TLS handshakes refused (unknown, expired or revoked certificates, bad ALPN)"
    );
    metrics::describe_counter!(
        DISABLED_REFUSED,
        "Connections of disabled devices refused after mutual TLS (at: connect) or closed when the device was disabled (at: live)"
    );
    metrics::describe_counter!(
        REVOKED_CLOSED,
        "Live agent connections closed because their client certificate was revoked"
    );
    metrics::describe_counter!(
        CONNECTIONS_LIMITED,
        "Agent connections refused or closed by a limit (limit: total = handshake refused at [quic] max_connections, device = a device's oldest connection closed at [quic] max_connections_per_device)"
    );
    metrics::describe_counter!(
        HELLO_REFUSED,
        "Sessions refused because their Hello broke the limits (too many cameras, overlong names)"
    );
    crate::auth::hashing::describe();
    metrics::describe_counter!(
        BUS_LAGGED,
        "Bus messages a consumer lost because it fell behind (label consumer); durable consumers catch up from the database"
    );
    metrics::describe_gauge!(HTTP_CONNECTIONS_OPEN, "HTTP API connections open now (TLS handshakes included)");
    metrics::describe_counter!(
        HTTP_CONNECTIONS_REFUSED,
        "HTTP API connections closed as soon as accepted because [http] max_connections were open"
    );
    metrics::describe_counter!(
        HTTP_TIMEOUTS,
        "HTTP API connections and requests cut off by a timeout, by phase: handshake (TLS), header (a request head, \
         or the next one on an idle keep-alive connection, not within [http] header_timeout_s), body (a request body \
         not whole within [http] body_timeout_s)"
    );
    metrics::describe_counter!(EVENTS_STORED, "Events committed to storage");
    metrics::describe_counter!(EVENTS_DUPLICATE, "Events received again after they were stored (resends), dropped");
    metrics::describe_counter!(BATCHES_COMMITTED, "Event batches committed");
    metrics::describe_counter!(BATCHES_OUT_OF_ORDER, "Event batches dropped because an earlier batch was missing");
    metrics::describe_histogram!(COMMIT_SECONDS, metrics::Unit::Seconds, "Time to commit one event batch");
    metrics::describe_counter!(SNAPSHOTS_STORED, "Event snapshots stored (objects written and row committed)");
    metrics::describe_counter!(
        SNAPSHOT_BYTES_STORED,
        metrics::Unit::Bytes,
        "JPEG bytes of the snapshots stored (full frames and crops)"
    );
    metrics::describe_counter!(
        SNAPSHOTS_DUPLICATE,
        "Snapshots received again after they were stored (uploads repeated by the agent); confirmed, not rewritten"
    );
    metrics::describe_counter!(
        SNAPSHOTS_REFUSED,
        "Snapshot streams refused, by reason: too_large, malformed (not one snapshot frame), invalid (limits or not a JPEG)"
    );
    metrics::describe_counter!(
        SNAPSHOTS_FAILED,
        "Snapshots that could not be stored (object store or database failure); the agent uploads them again"
    );
    metrics::describe_histogram!(
        SNAPSHOT_STORE_SECONDS,
        metrics::Unit::Seconds,
        "Time to store one snapshot (objects and row)"
    );
    metrics::describe_counter!(RETENTION_DELETED_EVENTS, "Events deleted by retention, by reason: age, size");
    metrics::describe_counter!(
        RETENTION_DELETED_HEALTH,
        "Device health history rows deleted by retention, by reason: age, size"
    );
    metrics::describe_counter!(
        RETENTION_DELETED_SNAPSHOTS,
        "Snapshot rows (and their objects) deleted by retention, by reason: age, size"
    );
    metrics::describe_counter!(
        RETENTION_DELETED_BYTES,
        metrics::Unit::Bytes,
        "Bytes freed by retention (snapshot objects exactly, database rows estimated), by reason: age, size"
    );
    metrics::describe_counter!(RETENTION_RUNS, "Retention runs that deleted something, by reason: age, size");
    metrics::describe_counter!(
        RETENTION_OBJECT_FAILURES,
        "Snapshot objects whose deletion failed after their rows were deleted (left in object storage; logged)"
    );
    metrics::describe_counter!(
        RETENTION_FAILURES,
        "Retention runs that failed (database errors); retried next interval"
    );
    metrics::describe_gauge!(
        STORAGE_BYTES,
        metrics::Unit::Bytes,
        "Storage that size retention counts (database and snapshot bytes), measured by its last run, by part: database, snapshots"
    );
}

pub fn handshake_refused() {
    counter!(HANDSHAKES_REFUSED).increment(1);
}

/// A disabled device's connection refused. `at`: `connect` (refused after mutual TLS) or `live`
/// (closed when the device was disabled).
pub fn disabled_device_refused(at: &'static str) {
    counter!(DISABLED_REFUSED, "at" => at).increment(1);
}

/// A live connection closed because its certificate was revoked.
pub fn revoked_certificate_closed() {
    counter!(REVOKED_CLOSED).increment(1);
}

/// A connection refused or closed by a limit: `total` or `device`.
pub fn connection_limited(limit: &'static str) {
    counter!(CONNECTIONS_LIMITED, "limit" => limit).increment(1);
}

/// A session refused because of its Hello.
pub fn hello_refused() {
    counter!(HELLO_REFUSED).increment(1);
}

/// Counts a connection while it lives.
pub struct ConnectionGuard;

impl ConnectionGuard {
    pub fn new() -> Self {
        counter!(CONNECTIONS_TOTAL).increment(1);
        gauge!(CONNECTIONS_ACTIVE).increment(1.0);
        ConnectionGuard
    }
}

impl Default for ConnectionGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        gauge!(CONNECTIONS_ACTIVE).decrement(1.0);
    }
}

/// An HTTP API connection closed as soon as accepted: `[http] max_connections` were open.
pub fn http_connection_refused() {
    counter!(HTTP_CONNECTIONS_REFUSED).increment(1);
}

/// An HTTP API connection or request cut off by a timeout. `phase`: `handshake`, `header` or
/// `body`.
pub fn http_timeout(phase: &'static str) {
    counter!(HTTP_TIMEOUTS, "phase" => phase).increment(1);
}

/// Counts an HTTP API connection while it is open.
pub struct HttpConnectionOpen;

impl HttpConnectionOpen {
    pub fn new() -> Self {
        gauge!(HTTP_CONNECTIONS_OPEN).increment(1.0);
        HttpConnectionOpen
    }
}

impl Default for HttpConnectionOpen {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for HttpConnectionOpen {
    fn drop(&mut self) {
        gauge!(HTTP_CONNECTIONS_OPEN).decrement(1.0);
    }
}

pub fn batch_committed(inserted: u64, duplicates: u64, took: Duration) {
    counter!(EVENTS_STORED).increment(inserted);
    counter!(EVENTS_DUPLICATE).increment(duplicates);
    counter!(BATCHES_COMMITTED).increment(1);
    histogram!(COMMIT_SECONDS).record(took.as_secs_f64());
}

pub fn snapshot_stored(bytes: u64, took: Duration) {
    counter!(SNAPSHOTS_STORED).increment(1);
    counter!(SNAPSHOT_BYTES_STORED).increment(bytes);
    histogram!(SNAPSHOT_STORE_SECONDS).record(took.as_secs_f64());
}

pub fn snapshot_duplicate() {
    counter!(SNAPSHOTS_DUPLICATE).increment(1);
}

/// `reason`: `too_large`, `malformed` or `invalid`.
pub fn snapshot_refused(reason: &'static str) {
    counter!(SNAPSHOTS_REFUSED, "reason" => reason).increment(1);
}

pub fn snapshot_failed() {
    counter!(SNAPSHOTS_FAILED).increment(1);
}

pub fn batch_out_of_order() {
    counter!(BATCHES_OUT_OF_ORDER).increment(1);
}

/// Duplicates the session filtered before storage (its watermark) count as duplicates too.
pub fn session_closed(stats: &IngestStats) {
    counter!(EVENTS_DUPLICATE).increment(stats.duplicates);
}

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

/// A bus consumer fell `n` messages behind and lost them.
pub fn bus_lagged(consumer: &'static str, n: u64) {
    counter!(BUS_LAGGED, "consumer" => consumer).increment(n);
}
