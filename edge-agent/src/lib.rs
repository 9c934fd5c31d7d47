//! `its-agent`: the edge agent. Stages (each a module with its config, runtime and tests):
//! [`source`] → [`buffer`] → [`uplink`]; [`agent`] wires them together.

pub mod agent;
pub mod buffer;
pub mod config;
pub mod source;
pub mod uplink;
