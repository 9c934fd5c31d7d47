//! Every metric the aggregator exports. Each is declared once, here, with its name, kind, unit and
//! HELP text, one file per area:
//!
//! - [`ingest`]: agent connections, batches, events and snapshots (QUIC and the MQTT uplink);
//! - [`storage`]: retention and the storage size it measures;
//! - [`http`]: the API's requests and connections, and the live stream (`GET /api/v1/stream`);
//! - [`bus`]: the in-process bus;
//! - [`export`]: Redis fan-out and Kafka export;
//! - [`mqtt`]: the MQTT front of the embedded broker, third-party publishing, the uplink bridge;
//! - [`alerts`]: alert firings and notification deliveries;
//! - [`auth`]: the password hashing pool.
//!
//! The rest of the crate records through these constants (or the helpers of [`ingest`],
//! [`storage`], [`http`] and [`bus`]), never through a name of its own.
//!
//! Dependencies: none inside the crate (a leaf), so every module may use it.

pub mod alerts;
pub mod auth;
pub mod bus;
pub mod export;
pub mod http;
pub mod ingest;
pub mod mqtt;
pub mod storage;

pub use bus::*;
pub use http::*;
pub use ingest::*;
pub use storage::*;

use metrics::Unit;

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric's declaration: what `/metrics` prints in its `# HELP` and `# TYPE` lines.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Unit,
    pub help: &'static str,
}

impl Metric {
    pub const fn counter(name: &'static str, unit: Unit, help: &'static str) -> Self {
        Self { name, kind: Kind::Counter, unit, help }
    }

    pub const fn gauge(name: &'static str, unit: Unit, help: &'static str) -> Self {
        Self { name, kind: Kind::Gauge, unit, help }
    }

    pub const fn histogram(name: &'static str, unit: Unit, help: &'static str) -> Self {
        Self { name, kind: Kind::Histogram, unit, help }
    }
}

/// Every declared metric, area by area.
pub fn all() -> impl Iterator<Item = &'static Metric> {
    [
        ingest::METRICS,
        storage::METRICS,
        http::METRICS,
        bus::METRICS,
        export::METRICS,
        mqtt::METRICS,
        alerts::METRICS,
        auth::METRICS,
    ]
    .into_iter()
    .flatten()
}

/// Registers every description (call once at start-up, after installing the recorder).
pub fn describe() {
    for m in all() {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.unit, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.unit, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.unit, m.help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_declared_once_with_help_and_a_conventional_name() {
        let mut seen = std::collections::HashSet::new();
        for m in all() {
            assert!(seen.insert(m.name), "{} declared twice", m.name);
            assert!(m.name.starts_with("its_"), "{} lacks the its_ prefix", m.name);
            assert!(m.help.len() >= 10, "{} has no real HELP text", m.name);
            match m.kind {
                Kind::Counter => assert!(m.name.ends_with("_total"), "counter {} must end in _total", m.name),
                Kind::Histogram if m.unit == Unit::Seconds => {
                    assert!(m.name.ends_with("_seconds"), "{} measures seconds", m.name)
                }
                _ => assert!(!m.name.ends_with("_total"), "{} is not a counter", m.name),
            }
            if m.unit == Unit::Bytes {
                assert!(m.name.contains("bytes"), "{} measures bytes", m.name);
            }
        }
        assert!(seen.len() >= 50, "only {} metrics declared", seen.len());
    }
}
