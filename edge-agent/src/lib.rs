//! `its-agent`: the edge agent. Stages (each a module with its config, runtime and tests):
//! [`source`] → [`decode`] → [`detect`] → [`track`] → [`analyze`] → [`buffer`] → [`uplink`];
//! [`pipeline`] runs the vision stages per camera, [`agent`] wires everything together and
//! [`reload`] applies configuration changes without a restart.

pub mod agent;
pub mod analyze;
pub mod buffer;
pub mod config;
pub mod decode;
pub mod detect;
pub mod pipeline;
pub mod reload;
pub mod scene;
pub mod source;
pub mod track;
pub mod uplink;

/// Wall-clock time in Unix milliseconds: event timestamps, never durations (those use
/// `tokio::time::Instant`, which tests can pause).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
