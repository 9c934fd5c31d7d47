//! Handing events on: Kafka export ([`kafka`]) and the fan-out between replicas ([`fanout`]).

pub mod fanout;
pub mod kafka;

/// Registers the descriptions of the export and fan-out metrics (and the live stream's).
pub fn describe() {
    kafka::describe();
    fanout::describe();
    crate::http::stream_api::describe();
}
