//! `its-shared`: the contract between `its-agent` and `its-aggregator`.
//!
//! - [`event`]: the traffic event model (wire form bincode, public form JSON);
//! - [`wire`]: length-prefixed, versioned frames with a hard size limit;
//! - [`session`]: the uplink session as sans-IO state machines for both ends;
//! - [`geometry`]: plane geometry for the analytics: camera calibration (image <-> ground
//!   homography with reprojection error), count-line crossings and zones.
//!
//! This crate does no I/O and reads no clock: time is always an argument.

pub mod config;
pub mod event;
pub mod geometry;
pub mod session;
pub mod wire;

pub use event::{DeviceHealth, EventEnvelope, EventKind};
pub use wire::Frame;
