//! Durable buffering between the event pipeline and the uplink: the SQLite outbox.
//!
//! See [`outbox`] for the contract (format, invariants, acknowledgement point, eviction).
//!
//! May depend on: no other module of the agent (its-shared only); every other stage may use it.

pub mod outbox;

pub use outbox::{
    AckOutcome, AppendOutcome, DEFAULT_MAX_SNAPSHOT_BYTES, NewEvent, Outbox, OutboxConfig, OutboxError, OutboxStats,
    SCHEMA_VERSION, SNAPSHOT_KIND, SnapshotImages, read_stats,
};
