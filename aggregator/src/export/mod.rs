//! Handing events on: Kafka export ([`kafka`]) and the fan-out between replicas ([`fanout`]).
//!
//! Dependencies: store (events after a cursor, the export cursor and its lease), bus, telemetry.
//! Never http, config, alerts.

pub mod fanout;
pub mod kafka;
