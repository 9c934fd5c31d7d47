//! Uplink stage: ships the outbox to the aggregator. The session logic is
//! `its_shared::session::AgentSession`; this stage only moves frames and rows.

pub mod quic;
pub mod tls;

pub use quic::{UplinkConfig, UplinkHandle, run_uplink};
