//! Analyze stage: tracked road users in, traffic events out.
//!
//! [`tracks`] reports every road user the tracker follows, when its track is confirmed and when
//! it ends (`object_track` events, with the path it took).

pub mod tracks;

pub use tracks::track_events;
