//! Analyze stage: tracked road users in, traffic events out.
//!
//! - [`tracks`]: every road user the tracker follows, when its track is confirmed and when it
//!   ends (`object_track` events, with the path it took);
//! - [`config`]: a camera's scene (calibration, count lines, zones) as configured and validated;
//! - [`scene`]: [`SceneAnalyzer`], the traffic events of one camera (crossings, counts, speeds,
//!   zones, stopped vehicles, wrong-way drivers, congestion);
//! - [`speed`]: robust speed from ground positions;
//! - [`snapshot`]: the JPEG pictures attached to events;
//! - [`runner`]: the stage's thread, with scenes that can be replaced while it runs.
//!
//! The analytics' accuracy against synthetic footage with ground truth is measured in
//! `its-testkit` (`accuracy`), outside the product.
//!
//! May depend on: `pipeline` (its `FrameResult`s), `buffer` (the events it makes), `detect` and
//! `decode` (the boxes and pictures of snapshots).

pub mod config;
pub mod runner;
pub mod scene;
pub mod snapshot;
pub mod speed;
pub mod tracks;

pub use config::{RawScene, SceneSpec};
pub use scene::{AnalyzedEvent, SceneAnalyzer, SnapshotAsk};
pub use tracks::track_events;
