//! `its-hostio`: the host I/O that `its-agent` and `its-aggregator` both do, written once, so that
//! `its-shared` (the contract) stays free of I/O.
//!
//! - [`tls`]: trust anchors from a CA PEM file, and the rustls client configuration of an
//!   MQTT-over-TLS client (the agent's MQTT uplink, the aggregator's uplink bridge);
//! - [`config_file`]: reading a configuration file, with its path in every error and as the name
//!   parse errors carry (parsing and validation stay with each program and `its-shared`);
//! - [`logging`]: the programs' log output (standard error, filtered by `RUST_LOG`).
//!
//! Dependencies: rustls, rustls-pki-types, tracing-subscriber, thiserror, and no workspace crate
//! (both programs depend on this one; it must never depend on them or on `its-shared`).

pub mod config_file;
pub mod logging;
pub mod tls;
