//! `its-aggregator`: the central service. Modules: [`pki`] (the fleet CA), [`ingest`] (QUIC with
//! mutual TLS, exactly-once), [`store`] (SQLite / PostgreSQL), [`http`] (REST API and metrics),
//! [`server`] (wiring), [`demo`] (the README's demo).

pub mod config;
pub mod demo;
pub mod http;
pub mod ingest;
pub mod pki;
pub mod server;
pub mod store;
pub mod telemetry;
