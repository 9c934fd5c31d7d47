//! `its-testkit`: what tests and benchmarks need and the product does not. Never a dependency of a
//! program, only a dev-dependency.
//!
//! - [`bins`]: the workspace's programs (`its-agent`, `its-aggregator`), built on demand, for
//!   tests that run them as processes;
//! - [`rtsp`]: a real RTSP server (GStreamer's) streaming the street clip, a camera stand-in;
//! - [`server`] (feature `server`): an aggregator for tests, in-process or as a process, with the
//!   helpers around it (relays that cut or throttle the link, per-test PostgreSQL databases, the
//!   test admin);
//! - [`footage`] (feature `vision`): synthetic camera footage with ground truth (real pictures,
//!   known motion), encoded to H.264 and replayed through the agent's real pipeline;
//! - [`mot`] (feature `vision`): CLEAR MOT and IDF1, the tracker against ground truth;
//! - [`accuracy`] (feature `vision`): the traffic analytics against the truth of traffic footage.
//!
//! "Scene" keeps its one meaning, the agent's: a camera's lines, zones and calibration. The
//! synthetic clips here are *footage*.
//!
//! The binary `outbox-writer` (feature `vision`) appends to an outbox until killed, for the
//! kill -9 test of the outbox; `make-scenes` (feature `vision`) writes the four-lane clips of
//! [`footage::far`] as H.264 with their truth tables and scene configuration.

pub mod bins;
pub mod rtsp;

#[cfg(feature = "vision")]
pub mod accuracy;
#[cfg(feature = "vision")]
pub mod footage;
#[cfg(feature = "vision")]
pub mod mot;
#[cfg(feature = "server")]
pub mod server;
