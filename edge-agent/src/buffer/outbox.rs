//! The agent's durable outbox: every event the agent produces is committed here before it counts
//! as produced, and leaves only when the aggregator acknowledged it or when it is evicted (outbox
//! full or too old), which is counted. Events may carry a snapshot (JPEG pictures), kept in a
//! table of its own under the same rules: committed with its event, deleted when the aggregator
//! confirmed it stored it, or evicted and counted.
//!
//! # On-disk format
//!
//! One SQLite database (bundled SQLite) in WAL mode with `synchronous=FULL` (a COMMIT returns only
//! after the WAL is fsynced) and a `busy_timeout`. `PRAGMA user_version` holds the schema version
//! ([`SCHEMA_VERSION`]); a database with a newer version is refused with
//! [`OutboxError::SchemaTooNew`] instead of being misread (an agent downgraded after an update).
//!
//! ```sql
//! CREATE TABLE outbox(seq INTEGER PRIMARY KEY, kind TEXT NOT NULL,
//!                     committed_ms INTEGER NOT NULL, body BLOB NOT NULL);
//! CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
//! -- since schema version 2:
//! CREATE TABLE snapshots(seq INTEGER PRIMARY KEY, camera TEXT NOT NULL, taken_at_ms INTEGER NOT NULL,
//!                        committed_ms INTEGER NOT NULL, full BLOB NOT NULL, crop BLOB);
//! ```
//!
//! Schema versions: 1 (events only), 2 (`snapshots`). Opening a version-1 database creates the
//! `snapshots` table and sets version 2 in one transaction (in place; nothing else changes).
//!
//! - `outbox.body` is `bincode::serde::encode_to_vec(&envelope, bincode::config::standard())` of
//!   the whole [`EventEnvelope`], its `seq` included (always equal to the row's `seq`); `kind` is
//!   [`EventKind::name`]; `committed_ms` is the append's clock (see the invariants).
//! - `meta` rows: `next_seq` (the next sequence number to assign), `acked` (highest sequence number
//!   the aggregator acknowledged), `sent_reserved` (see *limbo*), `evicted_total` and one
//!   `evicted:<kind>` per kind that was ever evicted; evicted snapshots count under
//!   `evicted:snapshot` (and never in `evicted_total`, which counts events).
//! - `snapshots` rows: the pictures of the event with the same `seq` (its camera and capture time,
//!   the full frame and an optional crop, both JPEG, checked with
//!   [`its_shared::wire::SnapshotUpload::check`] before they are stored), and `committed_ms` as for
//!   the event. The row is independent of the event's row once committed: acknowledging or
//!   evicting the event leaves the snapshot to be sent (the aggregator may hold the event).
//!
//! # Invariants
//!
//! - Sequence numbers start at 1 and are assigned at commit, in the same transaction that bumps
//!   `next_seq`, so they are unique and never reused (except by the renumbering below, which moves
//!   rows *above* everything ever assigned). `produced_total = next_seq - 1`.
//! - `acked < every pending seq < next_seq`; `acked < next_seq`.
//! - `committed_ms` never decreases with `seq`: an append stamps `max(now_ms, committed_ms of the
//!   newest pending row)`, so a clock stepping backwards cannot make newer rows look older. The
//!   oldest pending row is therefore the lowest pending seq, and age eviction removes a prefix.
//! - The in-memory counters behind [`Outbox::stats`] (pending events and bytes, oldest row, eviction
//!   counters, `acked`, `next_seq`) are loaded from the database at open and changed only after the
//!   transaction that changed the database committed: they are exact. Bytes are the sum of
//!   `length(body)` of pending rows. The same holds for the snapshot counters (pending snapshots,
//!   their bytes `length(full) + length(crop)`, the oldest one).
//! - Every snapshot's `seq` was assigned to an event of this outbox: `seq < next_seq`.
//!
//! # Point of acknowledgement
//!
//! An event is accepted (produced) exactly when [`Outbox::append`] returns `Ok`: the transaction
//! holding it has committed and been fsynced. `append` writes the whole slice in one transaction
//! (one fsync for many events), so a slice is accepted entirely or not at all. An `Err` means none
//! of the slice was accepted. [`Outbox::append_with_snapshots`] commits the snapshots of some of
//! the events in that same transaction: events and their snapshots are accepted together or not
//! at all.
//!
//! A snapshot leaves the outbox through [`Outbox::snapshot_stored`], which the uplink calls only
//! when the aggregator reported that the picture and its row are durably stored.
//!
//! # What a crash can lose
//!
//! Nothing that was accepted: a crash (kill -9, power loss on a storage that honours fsync) can
//! only lose an `append` that had not returned yet, and then the whole slice and its sequence
//! numbers are gone together (no gap: `next_seq` rolls back with the rows). Acks, evictions and
//! renumbering are single transactions as well, and are either fully done or not at all; an ack
//! lost to a crash only causes a resend that the aggregator filters as duplicates. The same for
//! snapshots: a confirmation lost to a crash only causes an upload again, which the aggregator
//! stores once (its key is the device and the `seq`).
//!
//! # Limbo
//!
//! Rows that were put on the wire may be stored by the aggregator before their ack arrives. Such a
//! row must never be evicted, or it would be both stored and counted as evicted. `limbo_high` (in
//! memory) bounds them: every row with `seq <= limbo_high` is never evicted.
//! - [`Outbox::mark_sending`]`(last)` (or [`Outbox::read_for_send`], which reads and marks in one
//!   step) raises `limbo_high` to `last` before a batch ending at `last` goes on the wire. If `last`
//!   exceeds the persisted `sent_reserved`, it first persists `sent_reserved = last + reserve_ahead`
//!   (a rare, small write, like a sequence cache), so a restart can bound what the previous process
//!   may have sent: at open, `limbo_high = max(acked, sent_reserved)`.
//! - [`Outbox::welcome`]`(acked)`, after the aggregator's first ack on a new connection (what its
//!   storage holds): nothing beyond it can be stored any more, so `limbo_high = max(acked, acked
//!   of the outbox)`, in memory only.
//! - Use [`Outbox::read_for_send`] rather than [`Outbox::read_after`] + [`Outbox::mark_sending`]
//!   when evictions can run concurrently: between a separate read and mark, an eviction could
//!   delete rows that are then sent anyway. `read_for_send` holds the eviction gate while it reads
//!   and marks, so that cannot happen.
//! - If the limbo rows alone exceed `max_bytes`, the outbox stays over `max_bytes` (by at most
//!   the uplink window) rather than evicting them.
//!
//! # Eviction
//!
//! - By size: after an append, while `pending_bytes > max_bytes`, the oldest rows with
//!   `seq > limbo_high` are deleted, in the append's own transaction (the rows just appended are
//!   eligible too: an event larger than `max_bytes` with nothing else to evict is accepted and
//!   evicted at once, and counted).
//! - By age: [`Outbox::evict_expired`] deletes rows with `committed_ms < now_ms - max_age` and
//!   `seq > limbo_high`, oldest first.
//! - Every eviction deletes in one transaction that also adds the count to `evicted_total` and to
//!   `evicted:<kind>` per kind, so the counters are exactly the rows removed other than by acks.
//!   Counters are cumulative over the life of the database and never reset.
//!
//! Snapshots have a budget of their own, `max_snapshot_bytes` ([`DEFAULT_MAX_SNAPSHOT_BYTES`],
//! see [`Outbox::open_with_snapshot_budget`]), so pictures never crowd out events:
//! - By size: after an append, while the pending snapshots' bytes exceed it, the oldest snapshots
//!   (lowest `seq`, the ones just appended included) are deleted in the append's transaction.
//! - By age: [`Outbox::evict_expired`] also deletes snapshots committed before `now - max_age`.
//! - When a renumbering (below) finds snapshots whose event is no longer pending, they are deleted:
//!   their `seq` now names another event at the aggregator.
//! - Each is counted in `evicted:snapshot` ([`OutboxStats::snapshots_evicted`] and
//!   `evicted_by_kind["snapshot"]`, which the health report carries), never in `evicted_total`.
//!   So `evicted_total` is the sum of `evicted_by_kind` over the event kinds, that is over every
//!   key but `snapshot`.
//! - Snapshots have no limbo: one evicted while its upload was under way may still reach the
//!   aggregator. Such a snapshot is then both stored and counted as evicted: the snapshot counter
//!   can over-count by at most the upload window, never under-count.
//!
//! # Acknowledgement and renumbering
//!
//! [`Outbox::ack`]`(up_to)` deletes rows with `seq <= up_to` and records `acked = up_to`. If
//! `up_to >= next_seq`, the aggregator holds more of this device than the outbox ever assigned: the
//! outbox was reset (new disk, deleted file) while the aggregator kept the device's events. Deleting
//! would then drop events the aggregator never saw, so instead every pending row is renumbered, in
//! order and without gaps, to `up_to + 1, up_to + 2, ...` (row and body), `next_seq` moves past
//! them, `acked = up_to`, and `limbo_high = sent_reserved = up_to` (nothing of the new numbering has
//! been sent). `produced_total` jumps accordingly: it counts sequence numbers, not events. Snapshots
//! of pending events move with them to the new numbers, in the same transaction; others are
//! evicted (see *Eviction*).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use its_shared::wire::{SnapshotError, SnapshotUpload};
use its_shared::{EventEnvelope, EventKind};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params};
use serde::Serialize;

/// Schema version written to `PRAGMA user_version`.
pub const SCHEMA_VERSION: u32 = 2;

/// Default budget of snapshot bytes: 128 MiB, about 1,000 snapshots of a 1080p frame and a crop
/// (~130 KB together), or a day of a busy camera's pictures at one snapshot every 90 s. Half the
/// events' default budget: pictures are the first thing to give up on a small disk, and the events
/// (which carry the counts) keep their own budget whatever the pictures do.
pub const DEFAULT_MAX_SNAPSHOT_BYTES: u64 = 128 * 1024 * 1024;

/// Kind name under which evicted snapshots are counted in `evicted_by_kind`.
pub const SNAPSHOT_KIND: &str = "snapshot";

/// How long a statement waits for a lock held by another connection before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Decoding limit for bodies read back (a corrupt length prefix must not allocate gigabytes).
const MAX_BODY_LEN: usize = its_shared::wire::MAX_FRAME_LEN;

/// Rows renumbered per statement batch (bounds memory during a renumbering).
const RENUMBER_CHUNK: i64 = 1024;

/// Where the outbox lives and how large it may grow.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Database file; the directory is created if missing. SQLite adds `-wal` and `-shm` next to it.
    pub path: PathBuf,
    /// Most bytes of event bodies kept before the oldest unsent rows are evicted.
    pub max_bytes: u64,
    /// Rows committed longer ago than this are evicted by [`Outbox::evict_expired`].
    pub max_age: Duration,
    /// How far `sent_reserved` is persisted beyond the batch being sent; larger means fewer writes,
    /// and more rows protected from eviction after a restart.
    pub reserve_ahead: u64,
}

impl OutboxConfig {
    /// Defaults: 256 MiB, 7 days, 16,384 sequence numbers reserved ahead (two uplink windows).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_bytes: 256 * 1024 * 1024,
            max_age: Duration::from_secs(7 * 24 * 3600),
            reserve_ahead: 16_384,
        }
    }
}

/// An event to commit; the outbox gives it its sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub camera: String,
    pub observed_at_ms: i64,
    pub kind: EventKind,
}

/// The pictures of one event, given to [`Outbox::append_with_snapshots`].
#[derive(Clone, PartialEq)]
pub struct SnapshotImages {
    /// When the frame was captured, Unix ms.
    pub taken_at_ms: i64,
    /// The full frame with the event's box drawn, JPEG.
    pub full_jpeg: Vec<u8>,
    /// A crop of the road user, JPEG.
    pub crop_jpeg: Option<Vec<u8>>,
}

impl std::fmt::Debug for SnapshotImages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotImages")
            .field("taken_at_ms", &self.taken_at_ms)
            .field("full_jpeg_len", &self.full_jpeg.len())
            .field("crop_jpeg_len", &self.crop_jpeg.as_ref().map(Vec::len))
            .finish()
    }
}

/// Result of [`Outbox::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Sequence number of the first event of the slice.
    pub first_seq: u64,
    /// Sequence number of the last event (`first_seq - 1` for an empty slice).
    pub last_seq: u64,
    /// Rows evicted by size in the same transaction (possibly some of this slice).
    pub evicted: u64,
    /// Snapshots evicted by size in the same transaction (possibly some of this append's).
    pub snapshots_evicted: u64,
}

/// Result of [`Outbox::ack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AckOutcome {
    /// Rows deleted because they are acknowledged.
    pub deleted: u64,
    /// Rows renumbered above the acknowledgement (outbox reset detected); 0 normally.
    pub renumbered: u64,
}

/// The outbox's counters, exact at the moment they are taken.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct OutboxStats {
    /// Highest sequence number ever assigned (`next_seq - 1`).
    pub produced_total: u64,
    /// Highest sequence number the aggregator acknowledged.
    pub acked: u64,
    /// Rows waiting for an acknowledgement.
    pub pending_events: u64,
    /// Sum of the body lengths of those rows.
    pub pending_bytes: u64,
    /// `committed_ms` of the oldest pending row.
    pub oldest_committed_ms: Option<i64>,
    /// Rows ever evicted (size or age).
    pub evicted_total: u64,
    /// The same per kind name, plus `snapshot` for evicted snapshots (not in `evicted_total`);
    /// kinds never evicted are absent.
    pub evicted_by_kind: BTreeMap<String, u64>,
    /// Snapshots waiting for the aggregator's confirmation.
    pub pending_snapshots: u64,
    /// Bytes of their pictures (full frames and crops).
    pub pending_snapshot_bytes: u64,
    /// Snapshots ever evicted (budget, age, renumbering); equals `evicted_by_kind["snapshot"]`.
    pub snapshots_evicted: u64,
}

/// Everything that can go wrong with the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// SQLite failed (I/O error, disk full, database locked beyond the busy timeout, ...).
    #[error("outbox database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The outbox directory could not be created.
    #[error("outbox directory: {0}")]
    Io(#[from] std::io::Error),
    /// An event could not be encoded (never expected for the event model).
    #[error("encoding event: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// A stored body does not decode as an event envelope.
    #[error("outbox row {seq}: body does not decode: {source}")]
    Decode {
        seq: u64,
        #[source]
        source: bincode::error::DecodeError,
    },
    /// The database was written by a newer agent with a schema this build does not know.
    #[error(
        "outbox schema version {found} is newer than this agent supports ({supported}); \
         refusing to open it (was the agent downgraded?)"
    )]
    SchemaTooNew { found: u32, supported: u32 },
    /// SQLite refused WAL mode (e.g. a filesystem without shared memory support).
    #[error("outbox needs WAL journal mode, SQLite kept {0:?}")]
    NoWal(String),
    /// The stored data contradicts the outbox's invariants (corruption or a foreign file).
    #[error("outbox is inconsistent: {0}")]
    Corrupt(String),
    /// `PRAGMA integrity_check` reported problems.
    #[error("outbox integrity check failed: {0}")]
    Integrity(String),
    /// A sequence number beyond what SQLite can store (2^63 - 1) was requested, e.g. an
    /// acknowledgement of `u64::MAX` from a confused aggregator.
    #[error("sequence number {0} out of range")]
    SeqOutOfRange(u64),
    /// A snapshot given to [`Outbox::append_with_snapshots`] names no event of the slice, or an
    /// event that already has one.
    #[error("snapshot for event index {index} of a slice of {len}: out of range or given twice")]
    SnapshotIndex { index: usize, len: usize },
    /// A snapshot given to [`Outbox::append_with_snapshots`] breaks the wire limits (too large,
    /// not a JPEG); the aggregator would refuse it.
    #[error("snapshot for event index {index}: {source}")]
    Snapshot {
        index: usize,
        #[source]
        source: SnapshotError,
    },
}

/// In-memory mirror of the database, plus `limbo_high`.
///
/// All fields but `limbo_high` are written only by a holder of the writer connection, after its
/// transaction committed.
#[derive(Debug, Clone, Default)]
struct State {
    next_seq: u64,
    acked: u64,
    sent_reserved: u64,
    pending_events: u64,
    pending_bytes: u64,
    oldest_committed_ms: Option<i64>,
    newest_committed_ms: Option<i64>,
    evicted_total: u64,
    evicted_by_kind: BTreeMap<String, u64>,
    pending_snapshots: u64,
    pending_snapshot_bytes: u64,
    oldest_snapshot_ms: Option<i64>,
    /// Rows with `seq <= limbo_high` may be stored by the aggregator: never evicted.
    limbo_high: u64,
}

impl State {
    fn stats(&self) -> OutboxStats {
        OutboxStats {
            produced_total: self.next_seq - 1,
            acked: self.acked,
            pending_events: self.pending_events,
            pending_bytes: self.pending_bytes,
            oldest_committed_ms: self.oldest_committed_ms,
            evicted_total: self.evicted_total,
            evicted_by_kind: self.evicted_by_kind.clone(),
            pending_snapshots: self.pending_snapshots,
            pending_snapshot_bytes: self.pending_snapshot_bytes,
            snapshots_evicted: self.evicted_by_kind.get(SNAPSHOT_KIND).copied().unwrap_or(0),
        }
    }
}

/// The durable outbox. `Send + Sync`; all methods block (call them from `spawn_blocking`).
///
/// Lock order: `writer` -> `evict_gate` -> `reader` -> `state`; `snapshot_reader` is taken alone.
pub struct Outbox {
    cfg: OutboxConfig,
    /// Most bytes of pending snapshots (see *Eviction*).
    max_snapshot_bytes: u64,
    /// Appends, acks, evictions, reservation writes.
    writer: Mutex<Connection>,
    /// Reads, so they proceed while the writer waits for an fsync.
    reader: Mutex<Connection>,
    /// Reads of snapshots (megabytes of pictures), so they never hold up reads of events.
    snapshot_reader: Mutex<Connection>,
    /// Held by an eviction from choosing its rows until its state is published, and by
    /// [`Outbox::read_for_send`] / [`Outbox::mark_sending`] while they raise `limbo_high`.
    evict_gate: Mutex<()>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("path", &self.cfg.path).finish_non_exhaustive()
    }
}

/// Borrowed mirror of [`EventEnvelope`]: same fields in the same order, so the same bincode bytes,
/// without cloning the event.
#[derive(Serialize)]
struct EnvelopeRef<'a> {
    seq: u64,
    camera: &'a str,
    observed_at_ms: i64,
    kind: &'a EventKind,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code path panics while holding a lock with state half-updated, so a poisoned lock (a
    // panic elsewhere) still guards consistent data.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn to_i64(v: u64) -> Result<i64, OutboxError> {
    i64::try_from(v).map_err(|_| OutboxError::SeqOutOfRange(v))
}

fn to_u64(v: i64, what: &str) -> Result<u64, OutboxError> {
    u64::try_from(v).map_err(|_| OutboxError::Corrupt(format!("{what} is negative ({v})")))
}

fn encode_body(seq: u64, camera: &str, observed_at_ms: i64, kind: &EventKind) -> Result<Vec<u8>, OutboxError> {
    let env = EnvelopeRef { seq, camera, observed_at_ms, kind };
    Ok(bincode::serde::encode_to_vec(&env, bincode::config::standard())?)
}

fn decode_body(seq: u64, body: &[u8]) -> Result<EventEnvelope, OutboxError> {
    let cfg = bincode::config::standard().with_limit::<MAX_BODY_LEN>();
    let (env, used): (EventEnvelope, usize) =
        bincode::serde::decode_from_slice(body, cfg).map_err(|source| OutboxError::Decode { seq, source })?;
    if used != body.len() {
        return Err(OutboxError::Corrupt(format!("row {seq}: {} trailing bytes in body", body.len() - used)));
    }
    if env.seq != seq {
        return Err(OutboxError::Corrupt(format!("row {seq} holds an event with seq {}", env.seq)));
    }
    Ok(env)
}

fn meta_get(conn: &Connection, key: &str) -> Result<i64, OutboxError> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()?
        .ok_or_else(|| OutboxError::Corrupt(format!("meta key {key:?} missing")))
}

fn meta_set(tx: &Transaction<'_>, key: &str, value: i64) -> Result<(), OutboxError> {
    tx.prepare_cached(
        "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])?;
    Ok(())
}

fn meta_add(tx: &Transaction<'_>, key: &str, delta: u64) -> Result<(), OutboxError> {
    tx.prepare_cached(
        "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
    )?
    .execute(params![key, to_i64(delta)?])?;
    Ok(())
}

/// `committed_ms` of the lowest and of the highest pending row.
fn ends(conn: &Connection) -> Result<(Option<i64>, Option<i64>), OutboxError> {
    let oldest = conn
        .prepare_cached("SELECT committed_ms FROM outbox ORDER BY seq ASC LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()?;
    let newest = conn
        .prepare_cached("SELECT committed_ms FROM outbox ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok((oldest, newest))
}

/// What one eviction removed.
#[derive(Debug, Default)]
struct Evicted {
    rows: u64,
    bytes: u64,
    by_kind: BTreeMap<String, u64>,
}

/// Deletes rows `above < seq <= up_to` as evicted and counts them in `meta`, inside `tx`.
fn evict_range(tx: &Transaction<'_>, above: u64, up_to: u64) -> Result<Evicted, OutboxError> {
    let mut ev = Evicted::default();
    {
        let mut stmt =
            tx.prepare_cached("DELETE FROM outbox WHERE seq > ?1 AND seq <= ?2 RETURNING kind, length(body)")?;
        let mut rows = stmt.query(params![to_i64(above)?, to_i64(up_to)?])?;
        while let Some(row) = rows.next()? {
            let kind: String = row.get(0)?;
            let len: i64 = row.get(1)?;
            ev.rows += 1;
            ev.bytes += to_u64(len, "body length")?;
            *ev.by_kind.entry(kind).or_insert(0) += 1;
        }
    }
    if ev.rows > 0 {
        meta_add(tx, "evicted_total", ev.rows)?;
        for (kind, n) in &ev.by_kind {
            meta_add(tx, &format!("evicted:{kind}"), *n)?;
        }
    }
    Ok(ev)
}

/// What one eviction of snapshots removed.
#[derive(Debug, Default, Clone, Copy)]
struct SnapshotsEvicted {
    rows: u64,
    bytes: u64,
}

/// Bytes of a snapshot row, as SQL.
const SNAPSHOT_LEN_SQL: &str = "length(full) + coalesce(length(crop), 0)";

/// Deletes the snapshots `DELETE FROM snapshots WHERE <filter>` selects as evicted and counts
/// them in `meta` (`evicted:snapshot`), inside `tx`.
fn evict_snapshots(
    tx: &Transaction<'_>,
    filter: &str,
    param: impl rusqlite::ToSql,
) -> Result<SnapshotsEvicted, OutboxError> {
    let mut ev = SnapshotsEvicted::default();
    {
        let sql = format!("DELETE FROM snapshots WHERE {filter} RETURNING {SNAPSHOT_LEN_SQL}");
        let mut stmt = tx.prepare_cached(&sql)?;
        let mut rows = stmt.query([param])?;
        while let Some(row) = rows.next()? {
            ev.rows += 1;
            ev.bytes += to_u64(row.get(0)?, "snapshot length")?;
        }
    }
    if ev.rows > 0 {
        meta_add(tx, &format!("evicted:{SNAPSHOT_KIND}"), ev.rows)?;
    }
    Ok(ev)
}

/// `committed_ms` of the oldest pending snapshot (lowest `seq`; `committed_ms` is non-decreasing in
/// `seq` for snapshots as for events).
fn oldest_snapshot(conn: &Connection) -> Result<Option<i64>, OutboxError> {
    Ok(conn
        .prepare_cached("SELECT committed_ms FROM snapshots ORDER BY seq ASC LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()?)
}

impl State {
    fn apply_snapshots_evicted(&mut self, ev: SnapshotsEvicted) {
        self.pending_snapshots -= ev.rows;
        self.pending_snapshot_bytes -= ev.bytes;
        if ev.rows > 0 {
            *self.evicted_by_kind.entry(SNAPSHOT_KIND.to_owned()).or_insert(0) += ev.rows;
        }
    }

    fn apply_evicted(&mut self, ev: Evicted) {
        self.pending_events -= ev.rows;
        self.pending_bytes -= ev.bytes;
        self.evicted_total += ev.rows;
        for (kind, n) in ev.by_kind {
            *self.evicted_by_kind.entry(kind).or_insert(0) += n;
        }
    }
}

impl Outbox {
    /// Opens (creating if needed) the outbox at `cfg.path`, checks its schema version and its
    /// invariants, and loads the counters. Snapshots get [`DEFAULT_MAX_SNAPSHOT_BYTES`].
    pub fn open(cfg: OutboxConfig) -> Result<Self, OutboxError> {
        Self::open_with_snapshot_budget(cfg, DEFAULT_MAX_SNAPSHOT_BYTES)
    }

    /// [`Outbox::open`] with a budget of `max_snapshot_bytes` for pending snapshots (see
    /// *Eviction* in the module docs).
    pub fn open_with_snapshot_budget(cfg: OutboxConfig, max_snapshot_bytes: u64) -> Result<Self, OutboxError> {
        if let Some(dir) = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut writer = Connection::open(&cfg.path)?;
        writer.busy_timeout(BUSY_TIMEOUT)?;
        check_version(&writer)?;
        let mode: String = writer.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(OutboxError::NoWal(mode));
        }
        writer.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut writer)?;
        let mut state = load_state(&writer, true)?;
        state.limbo_high = state.acked.max(state.sent_reserved);

        let open_reader = || -> Result<Connection, OutboxError> {
            let reader = Connection::open(&cfg.path)?;
            reader.busy_timeout(BUSY_TIMEOUT)?;
            reader.pragma_update(None, "query_only", true)?;
            Ok(reader)
        };
        let reader = open_reader()?;
        let snapshot_reader = open_reader()?;

        Ok(Self {
            cfg,
            max_snapshot_bytes,
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            snapshot_reader: Mutex::new(snapshot_reader),
            evict_gate: Mutex::new(()),
            state: Mutex::new(state),
        })
    }

    pub fn config(&self) -> &OutboxConfig {
        &self.cfg
    }

    pub fn path(&self) -> &Path {
        &self.cfg.path
    }

    /// The budget of pending snapshot bytes.
    pub fn max_snapshot_bytes(&self) -> u64 {
        self.max_snapshot_bytes
    }

    /// Commits `events` in one transaction, in order, assigning consecutive sequence numbers;
    /// then, in the same transaction, evicts by size if the outbox is over `max_bytes`.
    /// Accepted exactly when this returns `Ok` (see the module docs). An empty slice writes
    /// nothing.
    pub fn append(&self, events: &[NewEvent], now_ms: i64) -> Result<AppendOutcome, OutboxError> {
        self.append_with_snapshots(events, Vec::new(), now_ms)
    }

    /// Like [`Outbox::append`], plus snapshots for some of the events: `(index into events,
    /// images)`, committed in the SAME transaction as the events and keyed by the event's
    /// sequence number. Then, still in that transaction, snapshots are evicted oldest first while
    /// their bytes exceed the snapshot budget (counted, see the module docs).
    ///
    /// Refused before anything is written ([`OutboxError::SnapshotIndex`],
    /// [`OutboxError::Snapshot`]) when an index is out of range or repeated, or a snapshot breaks
    /// the wire limits ([`its_shared::wire::SnapshotUpload::check`]: at most
    /// [`its_shared::wire::MAX_SNAPSHOT_BYTES`] of JPEG, full frame and crop together).
    pub fn append_with_snapshots(
        &self,
        events: &[NewEvent],
        snapshots: Vec<(usize, SnapshotImages)>,
        now_ms: i64,
    ) -> Result<AppendOutcome, OutboxError> {
        let mut w = lock(&self.writer);
        let snap = lock(&self.state).clone();
        let first = snap.next_seq;
        let mut uploads = Vec::with_capacity(snapshots.len());
        let mut seen = std::collections::BTreeSet::new();
        for (index, images) in snapshots {
            let Some(event) = events.get(index).filter(|_| seen.insert(index)) else {
                return Err(OutboxError::SnapshotIndex { index, len: events.len() });
            };
            let upload = SnapshotUpload {
                seq: first.saturating_add(index as u64),
                camera: event.camera.clone(),
                taken_at_ms: images.taken_at_ms,
                full_jpeg: images.full_jpeg,
                crop_jpeg: images.crop_jpeg,
            };
            upload.check().map_err(|source| OutboxError::Snapshot { index, source })?;
            uploads.push(upload);
        }
        if events.is_empty() {
            return Ok(AppendOutcome { first_seq: first, last_seq: first - 1, evicted: 0, snapshots_evicted: 0 });
        }
        let n = events.len() as u64;
        let next = first.checked_add(n).ok_or(OutboxError::SeqOutOfRange(u64::MAX))?;
        to_i64(next)?;
        let committed_ms = snap.newest_committed_ms.map_or(now_ms, |newest| newest.max(now_ms));

        let tx = w.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut added_bytes = 0u64;
        {
            let mut insert =
                tx.prepare_cached("INSERT INTO outbox(seq, kind, committed_ms, body) VALUES (?1, ?2, ?3, ?4)")?;
            for (seq, e) in (first..next).zip(events) {
                let body = encode_body(seq, &e.camera, e.observed_at_ms, &e.kind)?;
                added_bytes += body.len() as u64;
                insert.execute(params![to_i64(seq)?, e.kind.name(), committed_ms, body])?;
            }
        }
        let mut added_snapshot_bytes = 0u64;
        if !uploads.is_empty() {
            let mut insert = tx.prepare_cached(
                "INSERT INTO snapshots(seq, camera, taken_at_ms, committed_ms, full, crop) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for u in &uploads {
                added_snapshot_bytes += u.image_bytes() as u64;
                insert.execute(params![
                    to_i64(u.seq)?,
                    u.camera,
                    u.taken_at_ms,
                    committed_ms,
                    u.full_jpeg,
                    u.crop_jpeg
                ])?;
            }
        }
        meta_set(&tx, "next_seq", to_i64(next)?)?;

        let mut new = snap;
        new.next_seq = next;
        new.pending_events += n;
        new.pending_bytes += added_bytes;
        new.oldest_committed_ms = new.oldest_committed_ms.or(Some(committed_ms));
        new.newest_committed_ms = Some(committed_ms);
        new.pending_snapshots += uploads.len() as u64;
        new.pending_snapshot_bytes += added_snapshot_bytes;
        if !uploads.is_empty() {
            new.oldest_snapshot_ms = new.oldest_snapshot_ms.or(Some(committed_ms));
        }

        // Held from choosing the rows to evict until the new state is published.
        let mut gate: Option<MutexGuard<'_, ()>> = None;
        let mut evicted = 0;
        if new.pending_bytes > self.cfg.max_bytes {
            gate = Some(lock(&self.evict_gate));
            let limbo = lock(&self.state).limbo_high;
            let need = new.pending_bytes - self.cfg.max_bytes;
            let mut cutoff = None;
            {
                let mut scan = tx.prepare_cached("SELECT seq, length(body) FROM outbox WHERE seq > ?1 ORDER BY seq")?;
                let mut rows = scan.query([to_i64(limbo)?])?;
                let mut freed = 0u64;
                while freed < need {
                    let Some(row) = rows.next()? else { break };
                    cutoff = Some(to_u64(row.get(0)?, "seq")?);
                    freed += to_u64(row.get(1)?, "body length")?;
                }
            }
            if let Some(cutoff) = cutoff {
                let ev = evict_range(&tx, limbo, cutoff)?;
                evicted = ev.rows;
                let (oldest, newest) = ends(&tx)?;
                new.apply_evicted(ev);
                new.oldest_committed_ms = oldest;
                new.newest_committed_ms = newest;
            }
        }
        let mut snapshots_evicted = 0;
        if new.pending_snapshot_bytes > self.max_snapshot_bytes {
            let need = new.pending_snapshot_bytes - self.max_snapshot_bytes;
            let mut cutoff = None;
            {
                let sql = format!("SELECT seq, {SNAPSHOT_LEN_SQL} FROM snapshots ORDER BY seq");
                let mut scan = tx.prepare_cached(&sql)?;
                let mut rows = scan.query([])?;
                let mut freed = 0u64;
                while freed < need {
                    let Some(row) = rows.next()? else { break };
                    cutoff = Some(row.get::<_, i64>(0)?);
                    freed += to_u64(row.get(1)?, "snapshot length")?;
                }
            }
            if let Some(cutoff) = cutoff {
                let ev = evict_snapshots(&tx, "seq <= ?1", cutoff)?;
                snapshots_evicted = ev.rows;
                new.apply_snapshots_evicted(ev);
                new.oldest_snapshot_ms = oldest_snapshot(&tx)?;
            }
        }
        tx.commit()?;
        self.publish(new);
        drop(gate);
        Ok(AppendOutcome { first_seq: first, last_seq: next - 1, evicted, snapshots_evicted })
    }

    /// Up to `max` pending snapshots with `seq > after`, ascending, ready to upload.
    pub fn read_snapshots_after(&self, after: u64, max: usize) -> Result<Vec<SnapshotUpload>, OutboxError> {
        let Ok(after) = i64::try_from(after) else {
            return Ok(Vec::new());
        };
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let r = lock(&self.snapshot_reader);
        let mut stmt = r.prepare_cached(
            "SELECT seq, camera, taken_at_ms, full, crop FROM snapshots WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut rows = stmt.query(params![after, limit])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(SnapshotUpload {
                seq: to_u64(row.get(0)?, "snapshot seq")?,
                camera: row.get(1)?,
                taken_at_ms: row.get(2)?,
                full_jpeg: row.get(3)?,
                crop_jpeg: row.get(4)?,
            });
        }
        Ok(out)
    }

    /// The aggregator stored the snapshot of event `seq`: delete it. Returns whether there was
    /// one (false for a repeated confirmation, or one of a snapshot evicted meanwhile).
    pub fn snapshot_stored(&self, seq: u64) -> Result<bool, OutboxError> {
        let Ok(seq) = i64::try_from(seq) else {
            return Ok(false);
        };
        let mut w = lock(&self.writer);
        let tx = w.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let sql = format!("DELETE FROM snapshots WHERE seq = ?1 RETURNING {SNAPSHOT_LEN_SQL}");
        let bytes: Option<i64> = tx.prepare_cached(&sql)?.query_row([seq], |r| r.get(0)).optional()?;
        let Some(bytes) = bytes else {
            return Ok(false); // dropping `tx` rolls the empty transaction back
        };
        let bytes = to_u64(bytes, "snapshot length")?;
        let oldest = oldest_snapshot(&tx)?;
        tx.commit()?;
        let mut st = lock(&self.state);
        st.pending_snapshots -= 1;
        st.pending_snapshot_bytes -= bytes;
        st.oldest_snapshot_ms = oldest;
        Ok(true)
    }

    /// Stores the writer-owned fields of `new`; `limbo_high` is kept as it is now.
    fn publish(&self, new: State) {
        let mut st = lock(&self.state);
        let limbo = st.limbo_high;
        *st = State { limbo_high: limbo, ..new };
    }

    /// Up to `max` events with `seq > after`, ascending. Does not mark them as sent: see
    /// [`Outbox::read_for_send`].
    pub fn read_after(&self, after: u64, max: usize) -> Result<Vec<EventEnvelope>, OutboxError> {
        let r = lock(&self.reader);
        read_rows(&r, after, max, usize::MAX)
    }

    /// [`Outbox::read_after`] and [`Outbox::mark_sending`] of the last event read, with no eviction
    /// in between: what this returns may be sent. Use this for the uplink. The events' encoded
    /// size is also bounded by [`its_shared::wire::MAX_BATCH_BYTES`] (at least one event is
    /// returned), so a batch always fits in one wire frame.
    pub fn read_for_send(&self, after: u64, max: usize) -> Result<Vec<EventEnvelope>, OutboxError> {
        let events = {
            let _gate = lock(&self.evict_gate);
            let events = {
                let r = lock(&self.reader);
                read_rows(&r, after, max, its_shared::wire::MAX_BATCH_BYTES)?
            };
            if let Some(last) = events.last() {
                let mut st = lock(&self.state);
                st.limbo_high = st.limbo_high.max(last.seq);
            }
            events
        };
        if let Some(last) = events.last() {
            self.reserve(last.seq)?;
        }
        Ok(events)
    }

    /// A batch ending at `last_seq` (a sequence number read from this outbox) is about to go on
    /// the wire: rows up to it are never evicted until [`Outbox::welcome`] or an ack covers them.
    /// Returns after the reservation is durable. Racy against concurrent evictions if the batch was
    /// read separately: prefer [`Outbox::read_for_send`].
    pub fn mark_sending(&self, last_seq: u64) -> Result<(), OutboxError> {
        {
            let _gate = lock(&self.evict_gate);
            let mut st = lock(&self.state);
            st.limbo_high = st.limbo_high.max(last_seq);
        }
        self.reserve(last_seq)
    }

    /// Persists `sent_reserved = last + reserve_ahead` if `last` is beyond it.
    fn reserve(&self, last: u64) -> Result<(), OutboxError> {
        let mut w = lock(&self.writer);
        let current = lock(&self.state).sent_reserved;
        if last <= current {
            return Ok(());
        }
        let reserved = last.saturating_add(self.cfg.reserve_ahead).min(i64::MAX as u64);
        let tx = w.transaction_with_behavior(TransactionBehavior::Immediate)?;
        meta_set(&tx, "sent_reserved", to_i64(reserved)?)?;
        tx.commit()?;
        lock(&self.state).sent_reserved = reserved;
        Ok(())
    }

    /// The aggregator's welcome on a new connection acknowledged `acked`: nothing sent beyond it
    /// can be stored, so limbo shrinks to it (in memory; the persisted reservation stays).
    pub fn welcome(&self, acked: u64) {
        let mut st = lock(&self.state);
        st.limbo_high = acked.max(st.acked);
    }

    /// The aggregator stored everything up to `up_to`: delete those rows (or renumber, see the
    /// module docs).
    pub fn ack(&self, up_to: u64) -> Result<AckOutcome, OutboxError> {
        let mut w = lock(&self.writer);
        let snap = lock(&self.state).clone();
        if up_to <= snap.acked {
            return Ok(AckOutcome::default());
        }
        if up_to >= snap.next_seq {
            return self.renumber(&mut w, snap, up_to);
        }
        let tx = w.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (mut deleted, mut bytes) = (0u64, 0u64);
        {
            let mut stmt = tx.prepare_cached("DELETE FROM outbox WHERE seq <= ?1 RETURNING length(body)")?;
            let mut rows = stmt.query([to_i64(up_to)?])?;
            while let Some(row) = rows.next()? {
                deleted += 1;
                bytes += to_u64(row.get(0)?, "body length")?;
            }
        }
        meta_set(&tx, "acked", to_i64(up_to)?)?;
        let (oldest, newest) = ends(&tx)?;
        tx.commit()?;
        let mut st = lock(&self.state);
        st.acked = up_to;
        st.pending_events -= deleted;
        st.pending_bytes -= bytes;
        st.oldest_committed_ms = oldest;
        st.newest_committed_ms = newest;
        st.limbo_high = st.limbo_high.max(up_to);
        Ok(AckOutcome { deleted, renumbered: 0 })
    }

    fn renumber(&self, w: &mut Connection, snap: State, up_to: u64) -> Result<AckOutcome, OutboxError> {
        let new_next = up_to
            .checked_add(1)
            .and_then(|v| v.checked_add(snap.pending_events))
            .ok_or(OutboxError::SeqOutOfRange(up_to))?;
        if to_i64(new_next).is_err() {
            return Err(OutboxError::SeqOutOfRange(up_to));
        }
        let old_next = to_i64(snap.next_seq)?;
        let tx = w.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Snapshots whose event is no longer pending would keep a number that now names another
        // event at the aggregator: evicted (counted). The others move with their events below.
        let orphans = evict_snapshots(&tx, "seq NOT IN (SELECT seq FROM outbox) AND seq < ?1", old_next)?;
        let mut new_seq = up_to;
        let mut renumbered = 0u64;
        let mut bytes = 0u64;
        let mut after = 0i64;
        loop {
            // Renumbered rows land above `old_next`, so the scan never meets them again.
            let chunk: Vec<(i64, Vec<u8>)> = tx
                .prepare_cached("SELECT seq, body FROM outbox WHERE seq > ?1 AND seq < ?2 ORDER BY seq LIMIT ?3")?
                .query_map(params![after, old_next, RENUMBER_CHUNK], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let Some(&(last, _)) = chunk.last() else {
                break;
            };
            let mut update = tx.prepare_cached("UPDATE outbox SET seq = ?1, body = ?2 WHERE seq = ?3")?;
            let mut move_snapshot = tx.prepare_cached("UPDATE snapshots SET seq = ?1 WHERE seq = ?2")?;
            for (old, body) in chunk {
                let mut env = decode_body(to_u64(old, "seq")?, &body)?;
                new_seq += 1;
                env.seq = new_seq;
                let body = encode_body(env.seq, &env.camera, env.observed_at_ms, &env.kind)?;
                bytes += body.len() as u64;
                update.execute(params![to_i64(new_seq)?, body, old])?;
                move_snapshot.execute(params![to_i64(new_seq)?, old])?;
                renumbered += 1;
            }
            after = last;
        }
        if renumbered != snap.pending_events {
            return Err(OutboxError::Corrupt(format!(
                "renumbering found {renumbered} rows below next_seq, expected {}",
                snap.pending_events
            )));
        }
        meta_set(&tx, "next_seq", to_i64(new_next)?)?;
        meta_set(&tx, "acked", to_i64(up_to)?)?;
        meta_set(&tx, "sent_reserved", to_i64(up_to)?)?;
        // Hold the gate across the commit and the state update, so no reader of the new numbering
        // can raise limbo before it is reset here.
        let oldest_snapshot_ms = oldest_snapshot(&tx)?;
        let _gate = lock(&self.evict_gate);
        tx.commit()?;
        let mut st = lock(&self.state);
        st.next_seq = new_next;
        st.acked = up_to;
        st.sent_reserved = up_to;
        st.pending_bytes = bytes;
        st.limbo_high = up_to;
        st.apply_snapshots_evicted(orphans);
        st.oldest_snapshot_ms = oldest_snapshot_ms;
        Ok(AckOutcome { deleted: 0, renumbered })
    }

    /// Evicts rows committed before `now_ms - max_age`, oldest first, never a limbo row, and
    /// snapshots committed before then (counted under `snapshot`, see the module docs). Returns
    /// how many events it evicted.
    pub fn evict_expired(&self, now_ms: i64) -> Result<u64, OutboxError> {
        let mut w = lock(&self.writer);
        let snap = lock(&self.state).clone();
        let max_age_ms = i64::try_from(self.cfg.max_age.as_millis()).unwrap_or(i64::MAX);
        let cutoff_ms = now_ms.saturating_sub(max_age_ms);
        let events_due = snap.oldest_committed_ms.is_some_and(|oldest| oldest < cutoff_ms);
        let snapshots_due = snap.oldest_snapshot_ms.is_some_and(|oldest| oldest < cutoff_ms);
        if !events_due && !snapshots_due {
            return Ok(0);
        }
        let tx = w.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let _gate = lock(&self.evict_gate);
        let limbo = lock(&self.state).limbo_high;
        let mut cutoff = None;
        if events_due {
            let mut scan = tx.prepare_cached("SELECT seq, committed_ms FROM outbox WHERE seq > ?1 ORDER BY seq")?;
            let mut rows = scan.query([to_i64(limbo)?])?;
            while let Some(row) = rows.next()? {
                let committed: i64 = row.get(1)?;
                if committed >= cutoff_ms {
                    break; // committed_ms is non-decreasing in seq
                }
                cutoff = Some(to_u64(row.get(0)?, "seq")?);
            }
        }
        let ev = cutoff.map(|cutoff| evict_range(&tx, limbo, cutoff)).transpose()?;
        let snap_ev = if snapshots_due {
            evict_snapshots(&tx, "committed_ms < ?1", cutoff_ms)?
        } else {
            SnapshotsEvicted::default()
        };
        if ev.is_none() && snap_ev.rows == 0 {
            return Ok(0); // dropping `tx` rolls the empty transaction back
        }
        let (oldest, newest) = ends(&tx)?;
        let oldest_snapshot_ms = oldest_snapshot(&tx)?;
        tx.commit()?;
        let mut new = snap;
        let n = ev.as_ref().map_or(0, |e| e.rows);
        if let Some(ev) = ev {
            new.apply_evicted(ev);
        }
        new.apply_snapshots_evicted(snap_ev);
        new.oldest_committed_ms = oldest;
        new.newest_committed_ms = newest;
        new.oldest_snapshot_ms = oldest_snapshot_ms;
        self.publish(new);
        Ok(n)
    }

    /// The counters (no I/O).
    pub fn stats(&self) -> OutboxStats {
        lock(&self.state).stats()
    }

    /// Rows up to this sequence number are never evicted (see *Limbo* in the module docs).
    pub fn limbo_high(&self) -> u64 {
        lock(&self.state).limbo_high
    }

    /// `PRAGMA integrity_check` returned `ok`.
    pub fn integrity_check(&self) -> Result<(), OutboxError> {
        let r = lock(&self.reader);
        let mut stmt = r.prepare("PRAGMA integrity_check")?;
        let lines: Vec<String> = stmt.query_map([], |row| row.get(0))?.collect::<Result<_, _>>()?;
        if lines.len() == 1 && lines[0] == "ok" { Ok(()) } else { Err(OutboxError::Integrity(lines.join("; "))) }
    }
}

/// The counters of the outbox at `path`, read from the database (not from a running agent's memory),
/// without creating or changing anything: works while an agent has the outbox open.
pub fn read_stats(path: &Path) -> Result<OutboxStats, OutboxError> {
    let open = |flags: OpenFlags| Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX);
    // Read-write (without create) lets SQLite recover a WAL left by a crash; read-only is the
    // fallback for a user who may not write the directory.
    let mut conn = open(OpenFlags::SQLITE_OPEN_READ_WRITE).or_else(|_| open(OpenFlags::SQLITE_OPEN_READ_ONLY))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "query_only", true)?;
    let version = check_version(&conn)?;
    if version == 0 {
        return Err(OutboxError::Corrupt("not an outbox (schema version 0)".into()));
    }
    let tx = conn.transaction()?; // one snapshot for all the queries
    // A version-1 outbox (an older agent still running, not yet migrated) has no snapshots.
    let st = load_state(&tx, version >= 2)?;
    tx.finish()?;
    Ok(st.stats())
}

/// Rows above `after`, at most `max` of them and, past the first, at most `max_bytes` of bodies.
fn read_rows(conn: &Connection, after: u64, max: usize, max_bytes: usize) -> Result<Vec<EventEnvelope>, OutboxError> {
    let Ok(after) = i64::try_from(after) else {
        return Ok(Vec::new()); // nothing can be stored above i64::MAX
    };
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare_cached("SELECT seq, body FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
    let mut rows = stmt.query(params![after, limit])?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some(row) = rows.next()? {
        let seq = to_u64(row.get(0)?, "seq")?;
        let rusqlite::types::ValueRef::Blob(body) = row.get_ref(1)? else {
            return Err(OutboxError::Corrupt(format!("row {seq}: body is not a blob")));
        };
        bytes = bytes.saturating_add(body.len());
        if bytes > max_bytes && !out.is_empty() {
            break;
        }
        out.push(decode_body(seq, body)?);
    }
    Ok(out)
}

fn check_version(conn: &Connection) -> Result<u32, OutboxError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let found = u32::try_from(found).map_err(|_| OutboxError::Corrupt(format!("user_version {found}")))?;
    if found > SCHEMA_VERSION {
        return Err(OutboxError::SchemaTooNew { found, supported: SCHEMA_VERSION });
    }
    Ok(found)
}

/// Schema version 2: the snapshots table.
const CREATE_SNAPSHOTS: &str = "CREATE TABLE snapshots(seq INTEGER PRIMARY KEY, camera TEXT NOT NULL,
                                taken_at_ms INTEGER NOT NULL, committed_ms INTEGER NOT NULL,
                                full BLOB NOT NULL, crop BLOB);";

fn migrate(conn: &mut Connection) -> Result<(), OutboxError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Checked again under the write lock: another process may have migrated it meanwhile.
    let found = check_version(&tx)?;
    if found == 0 {
        tx.execute_batch(
            "CREATE TABLE outbox(seq INTEGER PRIMARY KEY, kind TEXT NOT NULL,
                                 committed_ms INTEGER NOT NULL, body BLOB NOT NULL);
             CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT INTO meta(key, value) VALUES
                 ('next_seq', 1), ('acked', 0), ('sent_reserved', 0), ('evicted_total', 0);",
        )?;
    }
    if found < 2 {
        tx.execute_batch(CREATE_SNAPSHOTS)?;
    }
    if found < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    tx.commit()?;
    Ok(())
}

fn load_state(conn: &Connection, has_snapshots: bool) -> Result<State, OutboxError> {
    let next_seq = to_u64(meta_get(conn, "next_seq")?, "next_seq")?;
    let acked = to_u64(meta_get(conn, "acked")?, "acked")?;
    let sent_reserved = to_u64(meta_get(conn, "sent_reserved")?, "sent_reserved")?;
    let evicted_total = to_u64(meta_get(conn, "evicted_total")?, "evicted_total")?;
    let mut evicted_by_kind = BTreeMap::new();
    {
        let mut stmt = conn.prepare("SELECT key, value FROM meta WHERE key LIKE 'evicted:%'")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let key: String = row.get(0)?;
            let value = to_u64(row.get(1)?, &key)?;
            if let Some(kind) = key.strip_prefix("evicted:")
                && value > 0
            {
                evicted_by_kind.insert(kind.to_owned(), value);
            }
        }
    }
    let (count, bytes, min_seq, max_seq): (i64, i64, Option<i64>, Option<i64>) =
        conn.query_row("SELECT count(*), coalesce(sum(length(body)), 0), min(seq), max(seq) FROM outbox", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?;
    if next_seq == 0 || acked >= next_seq {
        return Err(OutboxError::Corrupt(format!("next_seq {next_seq} with acked {acked}")));
    }
    if let (Some(lo), Some(hi)) = (min_seq, max_seq)
        && (lo <= to_i64(acked)? || hi >= to_i64(next_seq)?)
    {
        return Err(OutboxError::Corrupt(format!(
            "pending seqs {lo}..={hi} outside acked {acked} .. next_seq {next_seq}"
        )));
    }
    let (oldest_committed_ms, newest_committed_ms) = ends(conn)?;
    let (snapshots, snapshot_bytes, max_snapshot_seq, oldest_snapshot_ms) = if has_snapshots {
        let sql = format!("SELECT count(*), coalesce(sum({SNAPSHOT_LEN_SQL}), 0), max(seq) FROM snapshots");
        let (n, b, hi): (i64, i64, Option<i64>) =
            conn.query_row(&sql, [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        (to_u64(n, "snapshot count")?, to_u64(b, "snapshot byte sum")?, hi, oldest_snapshot(conn)?)
    } else {
        (0, 0, None, None)
    };
    if let Some(hi) = max_snapshot_seq
        && hi >= to_i64(next_seq)?
    {
        return Err(OutboxError::Corrupt(format!("snapshot seq {hi} at or beyond next_seq {next_seq}")));
    }
    Ok(State {
        next_seq,
        acked,
        sent_reserved,
        pending_events: to_u64(count, "row count")?,
        pending_bytes: to_u64(bytes, "byte sum")?,
        oldest_committed_ms,
        newest_committed_ms,
        evicted_total,
        evicted_by_kind,
        pending_snapshots: snapshots,
        pending_snapshot_bytes: snapshot_bytes,
        oldest_snapshot_ms,
        limbo_high: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use its_shared::event::ObjectRef;

    /// A real JPEG of `w` x `h` pixels; `seed` varies the content (and so the bytes).
    fn jpeg(w: u32, h: u32, seed: u8) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x as u8).wrapping_mul(seed), (y as u8).wrapping_add(seed), seed.wrapping_mul(31)])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg).expect("encode jpeg");
        out.into_inner()
    }

    fn images(seed: u8, crop: bool) -> SnapshotImages {
        SnapshotImages {
            taken_at_ms: 1_000 + i64::from(seed),
            full_jpeg: jpeg(64, 48, seed),
            crop_jpeg: crop.then(|| jpeg(16, 16, seed)),
        }
    }

    fn event(camera: &str, i: u64) -> NewEvent {
        NewEvent {
            camera: camera.into(),
            observed_at_ms: 500 + i as i64,
            kind: EventKind::ZoneEnter {
                zone: "z".into(),
                object: ObjectRef { track_id: i, label: "car".into(), score: 0.9, bbox: [0.1, 0.2, 0.3, 0.4] },
            },
        }
    }

    fn events(n: u64) -> Vec<NewEvent> {
        (0..n).map(|i| event(if i % 2 == 0 { "cam-a" } else { "cam-b" }, i)).collect()
    }

    fn open(dir: &Path) -> Outbox {
        Outbox::open(OutboxConfig::new(dir.join("outbox.db"))).expect("open")
    }

    fn seqs(ups: &[SnapshotUpload]) -> Vec<u64> {
        ups.iter().map(|u| u.seq).collect()
    }

    #[test]
    fn snapshots_are_committed_with_their_events_and_keyed_by_seq() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = open(dir.path());
        outbox.append(&events(2), 10).expect("append");
        let (a, b) = (images(1, true), images(2, false));
        let out = outbox
            .append_with_snapshots(&events(3), vec![(2, b.clone()), (0, a.clone())], 20)
            .expect("append with snapshots");
        assert_eq!((out.first_seq, out.last_seq, out.evicted, out.snapshots_evicted), (3, 5, 0, 0));
        let ups = outbox.read_snapshots_after(0, 10).expect("read");
        assert_eq!(seqs(&ups), vec![3, 5]);
        assert_eq!(
            (ups[0].camera.as_str(), ups[0].taken_at_ms, &ups[0].full_jpeg, &ups[0].crop_jpeg),
            ("cam-a", a.taken_at_ms, &a.full_jpeg, &a.crop_jpeg)
        );
        assert_eq!((ups[1].camera.as_str(), &ups[1].full_jpeg, &ups[1].crop_jpeg), ("cam-a", &b.full_jpeg, &None));
        assert!(ups.iter().all(|u| u.check().is_ok()));
        assert_eq!(seqs(&outbox.read_snapshots_after(3, 10).expect("read")), vec![5]);
        assert_eq!(seqs(&outbox.read_snapshots_after(0, 1).expect("read")), vec![3]);
        assert!(outbox.read_snapshots_after(u64::MAX, 1).expect("read").is_empty());
        let s = outbox.stats();
        assert_eq!(s.pending_snapshots, 2);
        let bytes = a.full_jpeg.len() + a.crop_jpeg.as_ref().map_or(0, Vec::len) + b.full_jpeg.len();
        assert_eq!(s.pending_snapshot_bytes, bytes as u64);
        assert_eq!(s.pending_events, 5);
    }

    #[test]
    fn bad_snapshots_refuse_the_whole_append() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = open(dir.path());
        let before = outbox.stats();
        let err = outbox.append_with_snapshots(&events(2), vec![(2, images(1, false))], 1);
        assert!(matches!(err, Err(OutboxError::SnapshotIndex { index: 2, len: 2 })), "{err:?}");
        let err = outbox.append_with_snapshots(&events(2), vec![(1, images(1, false)), (1, images(2, false))], 1);
        assert!(matches!(err, Err(OutboxError::SnapshotIndex { index: 1, .. })), "{err:?}");
        let png = SnapshotImages { full_jpeg: b"\x89PNG\r\n\x1a\n".to_vec(), ..images(1, false) };
        let err = outbox.append_with_snapshots(&events(2), vec![(0, png)], 1);
        assert!(
            matches!(err, Err(OutboxError::Snapshot { index: 0, source: SnapshotError::NotJpeg("full") })),
            "{err:?}"
        );
        let mut huge = images(1, false);
        huge.full_jpeg.resize(its_shared::wire::MAX_SNAPSHOT_BYTES + 1, 0);
        let err = outbox.append_with_snapshots(&events(1), vec![(0, huge)], 1);
        assert!(matches!(err, Err(OutboxError::Snapshot { source: SnapshotError::TooLarge(_), .. })), "{err:?}");
        let err = outbox.append_with_snapshots(&[], vec![(0, images(1, false))], 1);
        assert!(matches!(err, Err(OutboxError::SnapshotIndex { index: 0, len: 0 })), "{err:?}");
        assert_eq!(outbox.stats(), before);
        assert!(outbox.read_after(0, 10).expect("read").is_empty());
    }

    /// A failure inside the transaction (here a trigger standing in for a full disk while the
    /// snapshot is written) leaves neither the events nor the snapshots, nor a gap in the numbers.
    #[test]
    fn events_and_snapshots_share_one_transaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = open(dir.path());
        let side = Connection::open(dir.path().join("outbox.db")).expect("side connection");
        side.execute_batch(
            "CREATE TRIGGER fail BEFORE INSERT ON snapshots BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
        )
        .expect("trigger");
        let err = outbox.append_with_snapshots(&events(3), vec![(1, images(1, true))], 10);
        assert!(matches!(err, Err(OutboxError::Sqlite(_))), "{err:?}");
        assert!(outbox.read_after(0, 10).expect("read").is_empty(), "events rolled back with the snapshot");
        assert_eq!(outbox.stats(), OutboxStats::default());
        side.execute_batch("DROP TRIGGER fail;").expect("drop trigger");
        let out = outbox.append_with_snapshots(&events(3), vec![(1, images(1, true))], 10).expect("append");
        assert_eq!(out.first_seq, 1, "no sequence number was used up");
        assert_eq!(seqs(&outbox.read_snapshots_after(0, 10).expect("read")), vec![2]);
        drop(outbox);
        let reopened = open(dir.path());
        assert_eq!(reopened.stats().pending_snapshots, 1);
    }

    #[test]
    fn a_stored_snapshot_is_deleted_and_only_then() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = open(dir.path());
        outbox.append_with_snapshots(&events(3), vec![(0, images(1, true)), (2, images(2, true))], 10).expect("append");
        // Acknowledging the events leaves their snapshots to be sent.
        outbox.ack(3).expect("ack");
        assert_eq!(outbox.stats().pending_events, 0);
        assert_eq!(seqs(&outbox.read_snapshots_after(0, 10).expect("read")), vec![1, 3]);
        let bytes3 = outbox.read_snapshots_after(2, 1).expect("read")[0].image_bytes() as u64;
        assert!(outbox.snapshot_stored(1).expect("stored"));
        assert!(!outbox.snapshot_stored(1).expect("again"), "a repeated confirmation deletes nothing");
        assert!(!outbox.snapshot_stored(2).expect("none"), "event 2 had no snapshot");
        assert!(!outbox.snapshot_stored(u64::MAX).expect("out of range"));
        let s = outbox.stats();
        assert_eq!((s.pending_snapshots, s.pending_snapshot_bytes, s.snapshots_evicted), (1, bytes3, 0));
        drop(outbox);
        let outbox = open(dir.path());
        assert_eq!(seqs(&outbox.read_snapshots_after(0, 10).expect("read")), vec![3]);
        assert_eq!(outbox.stats(), s, "the counters survive a reopen");
        assert!(outbox.snapshot_stored(3).expect("stored"));
        assert_eq!(outbox.stats().pending_snapshot_bytes, 0);
        assert_eq!(read_stats(&dir.path().join("outbox.db")).expect("read_stats"), outbox.stats());
    }

    #[test]
    fn over_budget_the_oldest_snapshots_are_evicted_and_counted_apart_from_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = images(1, true);
        let size = (one.full_jpeg.len() + one.crop_jpeg.as_ref().map_or(0, Vec::len)) as u64;
        // Room for three snapshots of this size (the seeds change the bytes a little).
        let budget = size * 3 + size / 2;
        let outbox =
            Outbox::open_with_snapshot_budget(OutboxConfig::new(dir.path().join("outbox.db")), budget).expect("open");
        assert_eq!(outbox.max_snapshot_bytes(), budget);
        for i in 0..3u8 {
            let out = outbox.append_with_snapshots(&events(1), vec![(0, images(1 + i % 2, true))], 10).expect("append");
            assert_eq!(out.snapshots_evicted, 0);
        }
        let out = outbox
            .append_with_snapshots(&events(2), vec![(0, images(1, true)), (1, images(2, true))], 20)
            .expect("append");
        assert_eq!((out.evicted, out.snapshots_evicted), (0, 2));
        assert_eq!(seqs(&outbox.read_snapshots_after(0, 10).expect("read")), vec![3, 4, 5]);
        let s = outbox.stats();
        assert!(s.pending_snapshot_bytes <= budget);
        assert_eq!(s.snapshots_evicted, 2);
        assert_eq!(s.evicted_by_kind.get(SNAPSHOT_KIND), Some(&2));
        assert_eq!(s.evicted_total, 0, "evicted_total counts events only");
        assert_eq!(s.pending_events, 5, "events are not evicted for pictures");
        // A snapshot larger than the whole budget is accepted and evicted at once, counted.
        let tiny = Outbox::open_with_snapshot_budget(OutboxConfig::new(dir.path().join("tiny.db")), 10).expect("open");
        let out = tiny.append_with_snapshots(&events(1), vec![(0, images(3, false))], 1).expect("append");
        assert_eq!(out.snapshots_evicted, 1);
        assert_eq!(tiny.stats().pending_snapshots, 0);
        assert_eq!(tiny.stats().pending_events, 1);
        drop(outbox);
        let persisted = read_stats(&dir.path().join("outbox.db")).expect("read_stats");
        assert_eq!(persisted, s);
    }

    #[test]
    fn old_snapshots_are_evicted_by_age_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = OutboxConfig::new(dir.path().join("outbox.db"));
        cfg.max_age = Duration::from_millis(1000);
        let outbox = Outbox::open(cfg).expect("open");
        outbox.append_with_snapshots(&events(1), vec![(0, images(1, false))], 10_000).expect("append");
        outbox.ack(1).expect("ack");
        outbox.append_with_snapshots(&events(1), vec![(0, images(2, false))], 10_500).expect("append");
        assert_eq!(outbox.evict_expired(11_000).expect("evict"), 0);
        assert_eq!(outbox.stats().pending_snapshots, 2);
        // Event 2 is old now too, but it is evicted as an event; its snapshot as a snapshot.
        assert_eq!(outbox.evict_expired(11_600).expect("evict"), 1);
        let s = outbox.stats();
        assert_eq!((s.pending_snapshots, s.snapshots_evicted, s.evicted_total), (0, 2, 1));
        assert_eq!(outbox.evict_expired(20_000).expect("evict"), 0);
        assert_eq!(outbox.stats(), s);
    }

    /// After an outbox reset the aggregator's ack renumbers the pending events; their snapshots
    /// move with them, and a snapshot whose event is gone is evicted, not left under a number
    /// that now names another event.
    #[test]
    fn renumbering_moves_snapshots_with_their_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = open(dir.path());
        let imgs: Vec<SnapshotImages> = (1..=3).map(|i| images(i, true)).collect();
        let snaps = imgs.iter().cloned().enumerate().collect();
        outbox.append_with_snapshots(&events(3), snaps, 10).expect("append");
        outbox.ack(1).expect("ack"); // event 1 gone, its snapshot pending
        outbox.welcome(1);
        let out = outbox.ack(100).expect("renumber");
        assert_eq!(out.renumbered, 2);
        let ups = outbox.read_snapshots_after(0, 10).expect("read");
        assert_eq!(seqs(&ups), vec![101, 102]);
        assert_eq!(ups[0].full_jpeg, imgs[1].full_jpeg);
        assert_eq!(ups[1].full_jpeg, imgs[2].full_jpeg);
        let s = outbox.stats();
        assert_eq!((s.pending_snapshots, s.snapshots_evicted, s.evicted_total), (2, 1, 0));
        let expected =
            imgs[1..].iter().map(|i| i.full_jpeg.len() + i.crop_jpeg.as_ref().map_or(0, Vec::len)).sum::<usize>();
        assert_eq!(s.pending_snapshot_bytes, expected as u64);
        drop(outbox);
        assert_eq!(open(dir.path()).stats(), s);
    }

    /// A database written by the previous agent (schema version 1) is migrated in place: its
    /// events, counters and numbering stay; snapshots can be added.
    #[test]
    fn a_version_1_outbox_is_migrated_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("outbox.db");
        {
            let conn = Connection::open(&path).expect("create v1");
            conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0)).expect("wal");
            conn.execute_batch(
                "CREATE TABLE outbox(seq INTEGER PRIMARY KEY, kind TEXT NOT NULL,
                                     committed_ms INTEGER NOT NULL, body BLOB NOT NULL);
                 CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 INSERT INTO meta(key, value) VALUES
                     ('next_seq', 8), ('acked', 5), ('sent_reserved', 6), ('evicted_total', 1),
                     ('evicted:zone_enter', 1);
                 PRAGMA user_version = 1;",
            )
            .expect("v1 schema");
            for seq in [6u64, 7] {
                let e = event("cam-a", seq);
                let body = encode_body(seq, &e.camera, e.observed_at_ms, &e.kind).expect("body");
                conn.execute(
                    "INSERT INTO outbox(seq, kind, committed_ms, body) VALUES (?1, ?2, ?3, ?4)",
                    params![seq as i64, e.kind.name(), 100, body],
                )
                .expect("row");
            }
        }
        // An older agent may still run: stats read without migrating.
        let before = read_stats(&path).expect("read v1 stats");
        assert_eq!((before.produced_total, before.acked, before.pending_events), (7, 5, 2));
        assert_eq!(before.pending_snapshots, 0);

        let outbox = open(dir.path());
        let version: i64 = lock(&outbox.reader).query_row("PRAGMA user_version", [], |r| r.get(0)).expect("version");
        assert_eq!(version, i64::from(SCHEMA_VERSION));
        assert_eq!(outbox.stats(), before);
        assert_eq!(outbox.read_after(0, 10).expect("read").iter().map(|e| e.seq).collect::<Vec<_>>(), vec![6, 7]);
        let out = outbox.append_with_snapshots(&events(1), vec![(0, images(1, true))], 200).expect("append");
        assert_eq!(out.first_seq, 8);
        assert_eq!(seqs(&outbox.read_snapshots_after(0, 10).expect("read")), vec![8]);
        drop(outbox);
        // Opening again (already version 2) changes nothing.
        let again = open(dir.path());
        assert_eq!(again.stats().pending_snapshots, 1);
        assert_eq!(again.stats().evicted_total, 1);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(open(dir.path()));
        let conn = Connection::open(dir.path().join("outbox.db")).expect("open");
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).expect("bump");
        drop(conn);
        let err = Outbox::open(OutboxConfig::new(dir.path().join("outbox.db")));
        assert!(matches!(err, Err(OutboxError::SchemaTooNew { .. })), "{err:?}");
    }

    #[test]
    fn a_snapshot_beyond_next_seq_is_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(open(dir.path()));
        let conn = Connection::open(dir.path().join("outbox.db")).expect("open");
        conn.execute(
            "INSERT INTO snapshots(seq, camera, taken_at_ms, committed_ms, full) VALUES (9, 'c', 0, 0, x'FFD8FF')",
            [],
        )
        .expect("insert");
        drop(conn);
        let err = Outbox::open(OutboxConfig::new(dir.path().join("outbox.db")));
        assert!(matches!(err, Err(OutboxError::Corrupt(_))), "{err:?}");
    }
}
