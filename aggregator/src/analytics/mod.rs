//! Traffic metrics and anomaly detection.
//!
//! **Rollups.** Per camera, line, class and direction (line crossings: counts, mean and 85th
//! percentile speed) and per camera and zone (zone occupancy: the time-weighted fraction of
//! frames with a road user in the zone, and the road users that entered), over 1 minute,
//! 15 minutes and 1 hour, in `metric_rollups`. They are incremental and exact: the ingest
//! transaction that stores events also marks their camera's buckets dirty at each resolution
//! (`rollup_dirty`, see [`crate::store::rollups::rollup_marks`]), so a committed event can never be missed, however late
//! it arrives (an agent flushing hours of outbox after an outage); the worker
//! ([`Analytics::run`]) recomputes each dirty bucket from the stored events (idempotent) and
//! removes the mark only if no new event marked it meanwhile. Minutes are recomputed at once; a
//! live quarter hour or hour at most every 10 s / 60 s (each recomputation reads the whole
//! bucket), a closed one at once. On PostgreSQL one replica at a time runs a pass (an advisory
//! lock).
//! Each recomputed row is published on the bus ([`crate::bus::BusMessage::Rollup`]) for alert
//! rules. TimescaleDB continuous aggregates are not used: they cannot compute an exact 85th
//! percentile incrementally, and these rollups work the same on every backend.
//!
//! **Anomalies** ([`anomaly`]): unusual volumes by time of week and sudden speed drops, per
//! camera and line, checked when a bucket closes (plus [`RawAnalytics::check_delay_s`] for late
//! events), stored once in `anomalies` and published on the bus
//! ([`crate::bus::BusMessage::Anomaly`]) like events: live views, MQTT and alert rules see them.
//!
//! `GET /api/v1/metrics` and `GET /api/v1/anomalies` serve both ([`query_metrics`],
//! [`query_anomalies`]).
//!
//! Inside: [`config`] (`[analytics]` and its validation), [`worker`] (the passes), [`rollup`]
//! and [`anomaly`] (the arithmetic, no I/O). The tables are read and written by
//! [`crate::store::rollups`].
//!
//! Dependencies: store, bus, model, telemetry. Never http, config, alerts.

pub mod anomaly;
pub mod config;
pub mod rollup;
pub mod worker;

pub use crate::model::Resolution;
pub use crate::store::rollups::{
    AnomalyPage, AnomalyQuery, AnomalyRow, MetricPage, MetricQuery, MetricRow, feeds_rollups, rollup_marks,
};
pub use config::{AnalyticsConfig, RawAnalytics};
pub use worker::{Analytics, PassReport};

use crate::store::rollups::RollupRows;
use crate::store::{Db, StoreError};

/// The kinds of anomaly.
pub const ANOMALY_KINDS: &[&str] = &["volume_high", "volume_low", "speed_drop"];

/// Rollups matching `q`, oldest bucket first.
pub async fn query_metrics(db: &Db, q: &MetricQuery) -> Result<MetricPage, StoreError> {
    RollupRows::new(db.clone()).query_metrics(q).await
}

/// Anomalies matching `q`, newest bucket first.
pub async fn query_anomalies(db: &Db, q: &AnomalyQuery) -> Result<AnomalyPage, StoreError> {
    RollupRows::new(db.clone()).query_anomalies(q).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use its_shared::event::{Direction, ObjectRef};
    use its_shared::event::{EventEnvelope, EventKind};

    fn crossing(seq: u64, camera: &str, at: i64) -> EventEnvelope {
        EventEnvelope {
            seq,
            camera: camera.into(),
            observed_at_ms: at,
            kind: EventKind::LineCrossing {
                line: "l".into(),
                object: ObjectRef { track_id: 1, label: "car".into(), score: 0.9, bbox: [0.0; 4] },
                direction: Direction::In,
                speed_kmh: None,
            },
        }
    }

    #[test]
    fn marks_are_the_distinct_buckets_of_new_rollup_events_at_every_resolution() {
        let mut health = crossing(4, "a", 0);
        health.kind = EventKind::DeviceHealth(Default::default());
        let events = vec![crossing(1, "a", 61_000), crossing(2, "a", 119_999), crossing(3, "b", 120_000), health];
        let marks = rollup_marks(&events, &[1, 2, 3, 4]);
        assert_eq!(
            marks.into_iter().collect::<Vec<_>>(),
            vec![("a", 60, 60_000), ("a", 900, 0), ("a", 3600, 0), ("b", 60, 120_000), ("b", 900, 0), ("b", 3600, 0)]
        );
        // Duplicates (not newly stored) mark nothing.
        assert!(rollup_marks(&events, &[4]).is_empty());
    }

    #[test]
    fn resolutions_bucket_and_parse() {
        assert_eq!(Resolution::QuarterHour.bucket(1_000_000), 900_000);
        assert_eq!(Resolution::Hour.bucket(-1), -3_600_000);
        assert_eq!(Resolution::parse("1h"), Some(Resolution::Hour));
        assert_eq!(Resolution::parse("5m"), None);
    }
}
