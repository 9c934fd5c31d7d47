//! `its-aggregator`: the central service.
//!
//! The modules in layers; a module uses only modules of the layers below its own, never one
//! above, so there is no import circle (`scripts/modcycles` checks it in CI):
//!
//! | layer | modules | what they are |
//! | --- | --- | --- |
//! | leaves | [`telemetry`], [`clock`], [`netaddr`], [`fsutil`], [`certs`], [`vault`], [`pki`], [`model`] | metric declarations, time, addresses, files, serving certificates, the secret key ring, the fleet CA, domain types |
//! | storage | [`snapshots`], [`store`] | object storage of event pictures; every SQL statement of the crate (both backends, typed rows, one cursor, one scope condition) |
//! | bus | [`bus`] | what this replica has just committed |
//! | services | [`auth`], [`ingest`], [`analytics`], [`export`], [`alerts`], [`mqtt`] | sign-in and permissions; QUIC ingest (mutual TLS, exactly-once); rollups and anomalies; Kafka and Redis; alert rules and notifications; MQTT for third parties and the MQTT uplink |
//! | API | [`http`] | the REST API, its transport and `/metrics` |
//! | wiring | [`config`], [`server`], [`demo`] | the configuration file (each section's type comes from the module that owns it), start-up, the README's demo |
//!
//! Within the services, [`mqtt`] may use [`auth`] and [`ingest`]; no service uses another
//! otherwise, nor [`config`] or [`http`].

pub mod alerts;
pub mod analytics;
pub mod auth;
pub mod bus;
pub mod certs;
pub mod clock;
pub mod config;
pub mod demo;
pub mod export;
pub mod fsutil;
pub mod http;
pub mod ingest;
pub mod model;
pub mod mqtt;
pub mod netaddr;
pub mod pki;
pub mod server;
pub mod snapshots;
pub mod store;
pub mod telemetry;
pub mod vault;

/// Wall-clock time in Unix milliseconds: event timestamps, never durations (those use
/// `tokio::time::Instant`, which tests can pause).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
