//! Uplink stage: ships the outbox to the aggregator. The session logic is
//! `its_shared::session::AgentSession`; this stage only moves frames and rows, over QUIC
//! ([`quic`], the default) or through an MQTT broker ([`mqtt`], for sites where UDP is blocked).

pub mod mqtt;
pub mod quic;
pub mod tls;

pub use mqtt::{MqttUplinkConfig, run_mqtt_uplink};
pub use quic::{UplinkConfig, UplinkHandle, run_uplink};
