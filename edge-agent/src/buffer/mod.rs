//! Durable buffering between the event pipeline and the uplink: the SQLite outbox.
//!
//! See [`outbox`] for the contract (format, invariants, acknowledgement point, eviction).

pub mod outbox;
#[doc(hidden)]
pub mod stress;

pub use outbox::{
    AckOutcome, AppendOutcome, DEFAULT_MAX_SNAPSHOT_BYTES, NewEvent, Outbox, OutboxConfig, OutboxError, OutboxStats,
    SCHEMA_VERSION, SNAPSHOT_KIND, SnapshotImages, read_stats,
};
