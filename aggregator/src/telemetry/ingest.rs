//! Ingest: agent connections (QUIC with mutual TLS, and the MQTT uplink bridge), event batches and
//! snapshots.

use std::time::Duration;

use its_shared::session::IngestStats;
use metrics::{Unit, counter, gauge, histogram};

use super::Metric;

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

pub(super) const METRICS: &[Metric] = &[
    Metric::counter(CONNECTIONS_TOTAL, Unit::Count, "Agent connections accepted after mutual TLS"),
    Metric::gauge(CONNECTIONS_ACTIVE, Unit::Count, "Agent connections open now"),
    Metric::counter(
        HANDSHAKES_REFUSED,
        Unit::Count,
        "QUIC/TLS handshakes refused (unknown, expired or revoked certificates, bad ALPN)",
    ),
    Metric::counter(
        DISABLED_REFUSED,
        Unit::Count,
        "Connections of disabled devices refused after mutual TLS (at: connect) or closed when the device was disabled (at: live)",
    ),
    Metric::counter(
        REVOKED_CLOSED,
        Unit::Count,
        "Live agent connections closed because their client certificate was revoked",
    ),
    Metric::counter(
        CONNECTIONS_LIMITED,
        Unit::Count,
        "Agent connections refused or closed by a limit (limit: total = handshake refused at [quic] max_connections, device = a device's oldest connection closed at [quic] max_connections_per_device)",
    ),
    Metric::counter(
        HELLO_REFUSED,
        Unit::Count,
        "Sessions refused because their Hello broke the limits (too many cameras, overlong names)",
    ),
    Metric::counter(EVENTS_STORED, Unit::Count, "Events committed to storage"),
    Metric::counter(EVENTS_DUPLICATE, Unit::Count, "Events received again after they were stored (resends), dropped"),
    Metric::counter(BATCHES_COMMITTED, Unit::Count, "Event batches committed"),
    Metric::counter(BATCHES_OUT_OF_ORDER, Unit::Count, "Event batches dropped because an earlier batch was missing"),
    Metric::histogram(COMMIT_SECONDS, Unit::Seconds, "Time to commit one event batch"),
    Metric::counter(SNAPSHOTS_STORED, Unit::Count, "Event snapshots stored (objects written and row committed)"),
    Metric::counter(SNAPSHOT_BYTES_STORED, Unit::Bytes, "JPEG bytes of the snapshots stored (full frames and crops)"),
    Metric::counter(
        SNAPSHOTS_DUPLICATE,
        Unit::Count,
        "Snapshots received again after they were stored (uploads repeated by the agent); confirmed, not rewritten",
    ),
    Metric::counter(
        SNAPSHOTS_REFUSED,
        Unit::Count,
        "Snapshot streams refused, by reason: too_large, malformed (not one snapshot frame), invalid (limits or not a JPEG)",
    ),
    Metric::counter(
        SNAPSHOTS_FAILED,
        Unit::Count,
        "Snapshots that could not be stored (object store or database failure); the agent uploads them again",
    ),
    Metric::histogram(SNAPSHOT_STORE_SECONDS, Unit::Seconds, "Time to store one snapshot (objects and row)"),
];

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
