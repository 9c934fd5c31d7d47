//! Authentication: the bounded password hashing pool.

use metrics::Unit;

use super::Metric;

/// Password hashing requests waiting for a worker.
pub const HASH_QUEUE: &str = "its_auth_password_hash_queue";
/// Password hashing requests refused because the queue was full.
pub const HASH_BUSY: &str = "its_auth_password_hash_busy_total";

pub(super) const METRICS: &[Metric] = &[
    Metric::gauge(HASH_QUEUE, Unit::Count, "Password hashing requests waiting for a worker"),
    Metric::counter(
        HASH_BUSY,
        Unit::Count,
        "Password hashing requests refused at once (answered 503) because every worker was busy and the queue full",
    ),
];
