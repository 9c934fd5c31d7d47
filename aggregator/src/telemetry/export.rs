//! Export: Redis fan-out between replicas and Kafka export.

use metrics::Unit;

use super::Metric;

/// Messages this replica published to Redis.
pub const FANOUT_PUBLISHED: &str = "its_fanout_published_total";
/// Other replicas' messages republished on this replica's bus.
pub const FANOUT_RECEIVED: &str = "its_fanout_received_total";
/// Failures (label `op`: `connect`, `publish`, `subscribe`, `decode`).
pub const FANOUT_ERRORS: &str = "its_fanout_errors_total";
/// Local messages not fanned out because Redis could not be reached.
pub const FANOUT_DROPPED: &str = "its_fanout_dropped_total";
/// Messages acknowledged by the Kafka brokers (label `topic`).
pub const KAFKA_EXPORTED: &str = "its_kafka_exported_total";
/// Messages the brokers did not acknowledge (sent again later; label `topic`).
pub const KAFKA_FAILED: &str = "its_kafka_failed_total";
/// Events stored but not yet exported (highest `events.id` minus the cursor).
pub const KAFKA_LAG: &str = "its_kafka_lag_events";

pub(super) const METRICS: &[Metric] = &[
    Metric::counter(FANOUT_PUBLISHED, Unit::Count, "Bus messages this replica published to Redis"),
    Metric::counter(FANOUT_RECEIVED, Unit::Count, "Messages of other replicas received from Redis and put on the bus"),
    Metric::counter(
        FANOUT_ERRORS,
        Unit::Count,
        "Redis fan-out failures (label op: connect, publish, subscribe, decode)",
    ),
    Metric::counter(FANOUT_DROPPED, Unit::Count, "Local bus messages not fanned out because Redis was unreachable"),
    Metric::counter(
        KAFKA_EXPORTED,
        Unit::Count,
        "Messages exported to Kafka and acknowledged by the brokers (label topic)",
    ),
    Metric::counter(
        KAFKA_FAILED,
        Unit::Count,
        "Messages Kafka did not acknowledge; events are sent again (label topic)",
    ),
    Metric::gauge(KAFKA_LAG, Unit::Count, "Events stored but not yet acknowledged by Kafka"),
];
