//! The in-process bus.

use metrics::{Unit, counter};

use super::Metric;

pub const BUS_LAGGED: &str = "its_bus_lagged_total";

pub(super) const METRICS: &[Metric] = &[Metric::counter(
    BUS_LAGGED,
    Unit::Count,
    "Bus messages a consumer lost because it fell behind (label consumer); durable consumers catch up from the database",
)];

/// A bus consumer fell `n` messages behind and lost them.
pub fn bus_lagged(consumer: &'static str, n: u64) {
    counter!(BUS_LAGGED, "consumer" => consumer).increment(n);
}
