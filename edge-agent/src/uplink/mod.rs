//! Uplink stage: ships the outbox to the aggregator. The session logic is
//! `its_shared::session::AgentSession`; this stage only moves frames and rows, over QUIC
//! ([`quic`], the default) or through an MQTT broker ([`mqtt`], for sites where UDP is blocked).
//!
//! - `driver` (private): runs the session and the ack chain's step 2 (outbox deletes on `Ack`,
//!   the welcome, batch reads) once for both transports, over a small link trait;
//! - [`quic`]: connections with mutual TLS, the control stream, snapshot uploads beside it;
//! - [`mqtt`]: the broker connection, one uplink session after another on it;
//! - [`tls`]: the device's TLS identity (the enrolment bundle).
//!
//! May depend on: `buffer` (the outbox it ships).

mod driver;
pub mod mqtt;
pub mod quic;
pub mod tls;

pub use mqtt::{MqttUplinkConfig, run_mqtt_uplink};
pub use quic::{UplinkConfig, UplinkHandle, run_uplink};
