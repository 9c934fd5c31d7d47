//! Track stage: per-frame detections in, object identities over time out.
//!
//! ```text
//! [TrackInput] + frame time --Tracker (ByteTrack)--> TrackerOutput { tracks, started, ended }
//! ```
//!
//! The tracker is of the ByteTrack family: a constant-velocity Kalman filter per object predicts
//! where each box should be, and detections are assigned to predictions by IoU in two stages,
//! high-score boxes first, then low-score boxes for the objects still unmatched, so partly
//! occluded objects keep their identity instead of being dropped. Time is in seconds throughout,
//! so dropped frames and a varying frame rate only change how far the filter predicts.
//!
//! - [`bytetrack`]: the [`Tracker`], its [`TrackerConfig`] and what it reports per frame;
//! - [`kalman`]: the box Kalman filter ([`BoxKalman`]);
//! - [`assignment`]: optimal linear assignment with a cost threshold.
//!
//! The tracker is measured against ground truth (CLEAR MOT, IDF1) in `its-testkit` (`mot`).
//!
//! Everything here is plain `std` Rust with no I/O, so it runs the same on the device and in
//! tests.
//!
//! May depend on: `detect` (its boxes).

pub mod assignment;
pub mod bytetrack;
pub mod kalman;

pub use crate::detect::decode::iou;
pub use assignment::{Assignment, solve, solve_max_matching};
pub use bytetrack::{EndedTrack, TrackInput, TrackedObject, Tracker, TrackerConfig, TrackerOutput};
pub use kalman::BoxKalman;
