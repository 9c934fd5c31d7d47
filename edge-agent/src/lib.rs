//! `its-agent`: the edge agent. Stages (each a module with its config, runtime and tests):
//! [`source`] → [`decode`] → [`detect`] → [`track`] → [`analyze`] → [`buffer`] → [`uplink`];
//! [`pipeline`] runs the vision stages per camera, [`agent`] wires everything together and
//! [`reload`] applies configuration changes without a restart; [`vision`] starts the cameras
//! from the configuration, which [`config`] reads and validates; [`evaluate`] runs a camera's
//! recording through the same stages and compares its counts with a person's (acceptance test).
//!
//! Dependencies between these modules go one way (`scripts/modcycles` finds any cycle): each may
//! use the modules on its row and nothing else of this crate.
//!
//! | module | may depend on |
//! |---|---|
//! | [`buffer`] | nothing (its-shared only) |
//! | [`uplink`] | `buffer` |
//! | [`source`] | `buffer`, `uplink` (the synthetic load generator writes events directly) |
//! | [`decode`] | `source` |
//! | [`detect`] | `decode` |
//! | [`track`] | `detect` |
//! | [`pipeline`] | `source`, `decode`, `detect`, `track` |
//! | [`analyze`] | `buffer`, `decode`, `detect`, `pipeline` |
//! | [`config`] | the stages whose settings it validates: `analyze`, `buffer`, `detect`, `pipeline`, `source`, `track`, `uplink` |
//! | [`vision`] | `config`, `detect`, `pipeline` |
//! | [`reload`] | `analyze`, `config`, `detect` (the tiles `check-config` prints), `pipeline`, `vision` |
//! | [`evaluate`] | `analyze`, `config`, `pipeline`, `source`, `vision` |
//! | [`agent`] | any of the above |

pub mod agent;
pub mod analyze;
pub mod buffer;
pub mod config;
pub mod decode;
pub mod detect;
pub mod evaluate;
pub mod pipeline;
pub mod reload;
pub mod source;
pub mod track;
pub mod uplink;
pub mod vision;

/// Wall-clock time in Unix milliseconds: event timestamps, never durations (those use
/// `tokio::time::Instant`, which tests can pause).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
