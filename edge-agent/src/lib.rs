//! `its-agent`: the edge agent. Stages (each a module with its config, runtime and tests):
//! [`source`] → [`buffer`] → [`uplink`]; [`agent`] wires them together.

pub mod agent;
pub mod buffer;
pub mod config;
pub mod source;
pub mod uplink;

/// Wall-clock time in Unix milliseconds: event timestamps, never durations (those use
/// `tokio::time::Instant`, which tests can pause).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
