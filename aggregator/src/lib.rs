//! `its-aggregator`: the central service. Modules: [`pki`] (the fleet CA), [`ingest`] (QUIC with
//! mutual TLS, exactly-once), [`store`] (SQLite / PostgreSQL), [`snapshots`] (event pictures in
//! object storage), [`http`] (REST API and metrics), [`server`] (wiring), [`demo`] (the README's
//! demo).

pub mod alerts;
pub mod analytics;
pub mod auth;
pub mod bus;
pub mod config;
pub mod demo;
pub mod export;
pub mod fsutil;
pub mod http;
pub mod ingest;
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
