//! `its-e2e`: the agent and the aggregator tested together. Nothing here ships; the crate exists
//! for its `tests/` and `benches/`:
//!
//! - the uplink end to end (`mtls`, `snapshots_e2e`, the `uplink` benchmark): the agent's QUIC
//!   uplink against an aggregator started in-process ([`its_testkit::server::TestServer`]);
//! - the real programs (`fault_e2e`, `vision_e2e`, `fanout`, `notify_e2e`, `mqtt_uplink`, the
//!   `notify_latency` benchmark): `its-agent` and `its-aggregator` processes, built on demand
//!   ([`its_testkit::bins`]);
//! - MQTT (`mqtt_publish`, `mqtt_uplink`): the aggregator's broker and bridge with the agent's
//!   MQTT uplink.
//!
//! [`fault`] holds what the two fault scenarios share; [`agent`] an agent in the test's process
//! (outbox and uplink) for the tests that choose its events.
//!
//! Helpers shared with the aggregator's own tests live in `its-testkit` (feature `server`), the
//! synthetic footage with ground truth in `its-testkit` (feature `vision`).

pub mod agent;
pub mod fault;
