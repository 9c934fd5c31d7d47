//! The uplink session as sans-IO state machines: no sockets, no clock, no storage of their own.
//!
//! [`AgentSession`] decides what the agent sends and when; [`IngestSession`] decides what the
//! aggregator commits and acknowledges. The async drivers in `its-agent` and `its-aggregator`
//! only move frames and rows; tests drive both machines over a simulated link.
//!
//! # The ack chain
//! - The agent's outbox assigns sequence numbers at commit; the agent sends events in sequence
//!   order in [`EventBatch`]es whose `after` field chains each batch to the one before.
//! - The aggregator accepts a batch only if it already holds everything up to the batch's `after`
//!   (otherwise a batch was lost or reordered: it drops this one and waits for the resend), commits
//!   the events above its watermark, and only then acknowledges the batch's last sequence number.
//! - The agent deletes rows up to an acknowledged sequence number, never before.
//! - On (re)connect the aggregator's first frame is an [`Ack`] of what its storage already holds for
//!   the device, so the agent resumes right after it.
//! - When an acknowledgement does not come within `ack_timeout`, the agent goes back to the last
//!   acknowledged sequence number and sends again (go-back-N); duplicates this causes are filtered
//!   by the aggregator's watermark, and across connections by the storage's unique key.
//!
//! # Snapshots
//! Pictures of events travel beside this chain, never in it: the agent uploads each on a
//! unidirectional stream of its own ([`SnapshotWindow`] decides which and when), the aggregator
//! stores the picture and its row and only then sends [`Frame::SnapshotStored`] on the control
//! stream ([`IngestSession::handle_snapshot_stored`]), and the agent deletes its copy only on that
//! ([`AgentEvent::SnapshotStored`]). Anything not confirmed is uploaded again (after
//! `confirm_timeout`, or on the next connection); the aggregator's store is idempotent on
//! `(device, seq)`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::event::{DeviceHealth, EventEnvelope};
use crate::wire::{Ack, EventBatch, Frame, Heartbeat, Hello};

/// Tuning of the agent side. Defaults are sized for one QUIC stream on a cellular link.
#[derive(Debug, Clone)]
pub struct AgentSessionConfig {
    /// Most events in one batch. 4,000 events of ~110 bytes is ~440 KB: large enough to amortise
    /// a database commit (one fsync) on the aggregator, small enough to resend cheaply. Measured:
    /// 4,000 drains an outbox into SQLite ~20% faster than 2,000 (BENCHMARKS.md).
    pub max_batch_events: usize,
    /// Batches sent but not yet acknowledged. Four keep the aggregator busy while the agent
    /// deletes acknowledged rows, without a large resend after a reconnect.
    pub window_batches: usize,
    /// How long to wait for the acknowledgement of the oldest batch before resending from the
    /// last acknowledged sequence number. Commits take milliseconds; 10 s covers a stalled link.
    pub ack_timeout: Duration,
    /// Resends in a row without progress after which the link is declared dead.
    pub max_resends_without_progress: u32,
    /// How often a heartbeat (device health) is sent.
    pub heartbeat_interval: Duration,
}

impl Default for AgentSessionConfig {
    fn default() -> Self {
        Self {
            max_batch_events: 4000,
            window_batches: 4,
            ack_timeout: Duration::from_secs(10),
            max_resends_without_progress: 3,
            heartbeat_interval: Duration::from_secs(15),
        }
    }
}

/// Something the driver must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// Everything up to and including this sequence number is committed by the aggregator:
    /// delete it from the outbox. The first ack of a connection may exceed anything the outbox
    /// ever assigned (the box's outbox was reset while the aggregator kept its events): the
    /// outbox must then renumber its rows above it rather than delete them.
    Acked(u64),
    /// A heartbeat is due: call [`AgentSession::send_heartbeat`].
    HeartbeatDue,
    /// The link made no progress through several resends: close it and reconnect.
    LinkDead,
    /// The aggregator refused the session.
    Refused(String),
    /// The aggregator durably stored the snapshot of this event: delete it from the outbox and
    /// tell the connection's [`SnapshotWindow`].
    SnapshotStored(u64),
}

/// What to load from the outbox next: up to `max_events` events with `seq > after`, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRequest {
    pub after: u64,
    pub max_events: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentState {
    Disconnected,
    /// Hello sent, waiting for the aggregator's first Ack.
    AwaitingWelcome,
    Streaming,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    last: u64,
    sent_at: Instant,
}

/// Counters the agent reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentStats {
    pub batches_sent: u64,
    pub events_sent: u64,
    /// Times the session went back to the last acknowledgement and sent again.
    pub resends: u64,
    pub connects: u64,
}

/// The agent side of the uplink session.
#[derive(Debug)]
pub struct AgentSession {
    cfg: AgentSessionConfig,
    state: AgentState,
    /// Highest sequence number the aggregator acknowledged.
    acked: u64,
    /// Highest sequence number sent on this connection (the next request starts after it).
    sent_up_to: u64,
    in_flight: VecDeque<InFlight>,
    /// When the Hello went out, while the welcome is awaited.
    hello_sent_at: Option<Instant>,
    /// The last load returned nothing: wait for [`AgentSession::handle_outbox_appended`].
    caught_up: bool,
    resends_without_progress: u32,
    next_heartbeat: Option<Instant>,
    heartbeat_due: bool,
    transmit: VecDeque<Frame>,
    events: VecDeque<AgentEvent>,
    stats: AgentStats,
}

impl AgentSession {
    /// `acked` is what the outbox knows was acknowledged (its lowest remaining seq - 1).
    pub fn new(cfg: AgentSessionConfig, acked: u64) -> Self {
        Self {
            cfg,
            state: AgentState::Disconnected,
            acked,
            sent_up_to: acked,
            in_flight: VecDeque::new(),
            hello_sent_at: None,
            caught_up: false,
            resends_without_progress: 0,
            next_heartbeat: None,
            heartbeat_due: false,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            stats: AgentStats::default(),
        }
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Highest sequence number sent on the current connection.
    pub fn sent_up_to(&self) -> u64 {
        self.sent_up_to
    }

    pub fn stats(&self) -> AgentStats {
        self.stats
    }

    pub fn is_streaming(&self) -> bool {
        self.state == AgentState::Streaming
    }

    /// A new connection is up: the Hello goes first.
    pub fn handle_connected(&mut self, now: Instant, mut hello: Hello) {
        self.reset_connection();
        hello.last_acked_seq = self.acked;
        self.transmit.push_back(Frame::Hello(hello));
        self.state = AgentState::AwaitingWelcome;
        self.hello_sent_at = Some(now);
        self.stats.connects += 1;
        self.next_heartbeat = Some(now + self.cfg.heartbeat_interval);
    }

    /// The connection is gone. Everything unacknowledged will be sent again on the next one.
    pub fn handle_disconnected(&mut self) {
        self.reset_connection();
        self.state = AgentState::Disconnected;
        self.next_heartbeat = None;
    }

    fn reset_connection(&mut self) {
        self.in_flight.clear();
        self.hello_sent_at = None;
        self.sent_up_to = self.acked;
        self.transmit.clear();
        self.caught_up = false;
        self.resends_without_progress = 0;
        self.heartbeat_due = false;
    }

    /// The outbox has new rows.
    pub fn handle_outbox_appended(&mut self) {
        self.caught_up = false;
    }

    /// A frame arrived from the aggregator.
    pub fn handle_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Ack(Ack { up_to }) => self.handle_ack(up_to),
            Frame::Refuse { reason } => self.events.push_back(AgentEvent::Refused(reason)),
            Frame::SnapshotStored { seq } if self.state != AgentState::Disconnected => {
                self.events.push_back(AgentEvent::SnapshotStored(seq));
            }
            // Config and OTA offers are handled by later stages; anything else from the
            // aggregator is ignored rather than trusted.
            _ => {}
        }
    }

    fn handle_ack(&mut self, up_to: u64) {
        if self.state == AgentState::AwaitingWelcome {
            // The welcome: what storage holds. It may exceed what we knew was acknowledged
            // (acks lost before a disconnect) and is trusted as is.
            self.state = AgentState::Streaming;
            self.hello_sent_at = None;
        } else if up_to > self.sent_up_to {
            // An ack for something never sent on this connection: ignore it; acknowledging rows
            // we did not send would delete them unsent.
            return;
        }
        if up_to > self.acked {
            self.acked = up_to;
            self.sent_up_to = self.sent_up_to.max(up_to);
            self.resends_without_progress = 0;
            while self.in_flight.front().is_some_and(|b| b.last <= up_to) {
                self.in_flight.pop_front();
            }
            self.events.push_back(AgentEvent::Acked(up_to));
        }
    }

    /// What the driver should load from the outbox next, if anything.
    pub fn poll_batch_request(&self) -> Option<BatchRequest> {
        (self.state == AgentState::Streaming && !self.caught_up && self.in_flight.len() < self.cfg.window_batches)
            .then_some(BatchRequest { after: self.sent_up_to, max_events: self.cfg.max_batch_events })
    }

    /// The result of a [`BatchRequest`]. An empty result means the outbox has nothing more.
    /// Events must be those with `seq > request.after`, in order.
    pub fn handle_batch_loaded(&mut self, now: Instant, request: BatchRequest, events: Vec<EventEnvelope>) {
        if request.after != self.sent_up_to || self.state != AgentState::Streaming {
            return; // stale: the connection changed while loading
        }
        let Some(last) = events.last().map(|e| e.seq) else {
            self.caught_up = true;
            return;
        };
        self.stats.batches_sent += 1;
        self.stats.events_sent += events.len() as u64;
        self.in_flight.push_back(InFlight { last, sent_at: now });
        self.sent_up_to = last;
        self.transmit.push_back(Frame::EventBatch(EventBatch { after: request.after, events }));
    }

    pub fn send_heartbeat(&mut self, now: Instant, sent_at_ms: i64, health: DeviceHealth) {
        self.heartbeat_due = false;
        if self.state != AgentState::Disconnected {
            self.transmit.push_back(Frame::Heartbeat(Heartbeat { sent_at_ms, health }));
            self.next_heartbeat = Some(now + self.cfg.heartbeat_interval);
        }
    }

    /// When [`AgentSession::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let ack = self.in_flight.front().map(|b| b.sent_at).or(self.hello_sent_at).map(|t| t + self.cfg.ack_timeout);
        match (ack, self.next_heartbeat.filter(|_| !self.heartbeat_due)) {
            (Some(a), Some(h)) => Some(a.min(h)),
            (a, h) => a.or(h),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.hello_sent_at.is_some_and(|t| now >= t + self.cfg.ack_timeout) {
            // No welcome: the aggregator is not serving this connection.
            self.hello_sent_at = None;
            self.events.push_back(AgentEvent::LinkDead);
        }
        if self.in_flight.front().is_some_and(|b| now >= b.sent_at + self.cfg.ack_timeout) {
            self.stats.resends += 1;
            self.resends_without_progress += 1;
            self.in_flight.clear();
            self.sent_up_to = self.acked;
            self.caught_up = false;
            if self.resends_without_progress > self.cfg.max_resends_without_progress {
                self.events.push_back(AgentEvent::LinkDead);
            }
        }
        if !self.heartbeat_due && self.next_heartbeat.is_some_and(|t| now >= t) {
            self.heartbeat_due = true;
            self.events.push_back(AgentEvent::HeartbeatDue);
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
    }
}

/// What the aggregator's driver must do for a frame.
#[derive(Debug, Clone, PartialEq)]
pub enum IngestAction {
    /// Record the device's Hello and call [`IngestSession::handle_high_water`] with the highest
    /// sequence number storage holds for it.
    LoadHighWater(Hello),
    /// Commit these events (duplicates already removed), then call
    /// [`IngestSession::handle_committed`] with `up_to`.
    Commit { events: Vec<EventEnvelope>, up_to: u64 },
    /// Store the device's health.
    Health(Heartbeat),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IngestError {
    #[error("first frame must be hello, got {0}")]
    NoHello(&'static str),
    #[error("second hello on one session")]
    DuplicateHello,
    #[error("hello refused: {0}")]
    BadHello(crate::wire::HelloError),
    #[error("event batch before the session was ready")]
    BatchBeforeReady,
    #[error("event batch with sequence numbers out of order")]
    MalformedBatch,
    #[error("unexpected frame {0} from an agent")]
    Unexpected(&'static str),
}

/// Counters of the aggregator side, per connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestStats {
    pub batches_accepted: u64,
    /// Events dropped because the watermark showed they were already stored.
    pub duplicates: u64,
    /// Batches dropped because an earlier batch was missing (the agent resends).
    pub out_of_order: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IngestState {
    AwaitHello,
    LoadingHighWater,
    Ready,
}

/// The aggregator side of one agent connection.
#[derive(Debug)]
pub struct IngestSession {
    state: IngestState,
    /// Highest sequence number handed to a commit (accepted into the contiguous prefix).
    accepted: u64,
    /// Highest sequence number committed.
    committed: u64,
    transmit: VecDeque<Frame>,
    stats: IngestStats,
}

impl Default for IngestSession {
    fn default() -> Self {
        Self::new()
    }
}

impl IngestSession {
    pub fn new() -> Self {
        Self {
            state: IngestState::AwaitHello,
            accepted: 0,
            committed: 0,
            transmit: VecDeque::new(),
            stats: IngestStats::default(),
        }
    }

    pub fn stats(&self) -> IngestStats {
        self.stats
    }

    pub fn committed(&self) -> u64 {
        self.committed
    }

    pub fn handle_frame(&mut self, frame: Frame) -> Result<Option<IngestAction>, IngestError> {
        match (self.state, frame) {
            (IngestState::AwaitHello, Frame::Hello(h)) => {
                h.check().map_err(IngestError::BadHello)?;
                self.state = IngestState::LoadingHighWater;
                Ok(Some(IngestAction::LoadHighWater(h)))
            }
            (IngestState::AwaitHello, other) => Err(IngestError::NoHello(other.name())),
            (_, Frame::Hello(_)) => Err(IngestError::DuplicateHello),
            (IngestState::LoadingHighWater, Frame::EventBatch(_)) => Err(IngestError::BatchBeforeReady),
            (IngestState::Ready, Frame::EventBatch(batch)) => {
                if !batch.is_well_formed() {
                    return Err(IngestError::MalformedBatch);
                }
                if batch.after > self.accepted {
                    // Something between our watermark and this batch is missing.
                    self.stats.out_of_order += 1;
                    return Ok(None);
                }
                let last = batch.last_seq();
                let before = batch.events.len();
                let accepted = self.accepted;
                let events: Vec<EventEnvelope> = batch.events.into_iter().filter(|e| e.seq > accepted).collect();
                self.stats.duplicates += (before - events.len()) as u64;
                self.stats.batches_accepted += 1;
                if last > self.accepted {
                    self.accepted = last;
                }
                Ok(Some(IngestAction::Commit { events, up_to: last.max(accepted) }))
            }
            (_, Frame::Heartbeat(h)) => Ok(Some(IngestAction::Health(h))),
            (_, other) => Err(IngestError::Unexpected(other.name())),
        }
    }

    /// Storage holds everything of this device up to `high_water`: tell the agent.
    pub fn handle_high_water(&mut self, high_water: u64) {
        self.state = IngestState::Ready;
        self.accepted = high_water;
        self.committed = high_water;
        self.transmit.push_back(Frame::Ack(Ack { up_to: high_water }));
    }

    /// The snapshot of event `seq` of this device and its row are durably stored (the driver
    /// stores snapshots from their own streams): tell the agent, which then deletes its copy.
    pub fn handle_snapshot_stored(&mut self, seq: u64) {
        self.transmit.push_back(Frame::SnapshotStored { seq });
    }

    /// A [`IngestAction::Commit`] is durable.
    pub fn handle_committed(&mut self, up_to: u64) {
        if up_to > self.committed {
            self.committed = up_to;
        }
        self.transmit.push_back(Frame::Ack(Ack { up_to: self.committed }));
    }

    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }
}

/// Tuning of the agent's snapshot uploads.
#[derive(Debug, Clone)]
pub struct SnapshotWindowConfig {
    /// Snapshots uploaded and not yet confirmed, at most. Four keep a link busy while the
    /// aggregator stores the previous ones, and bound what is resent after a loss to 4 x 3 MiB.
    pub max_in_flight: usize,
    /// How long after its stream was finished a snapshot may stay unconfirmed before it is
    /// uploaded again. Storing takes milliseconds (a local file or one S3 PUT); a minute covers a
    /// slow object store without resending pictures that are merely queued.
    pub confirm_timeout: Duration,
}

impl Default for SnapshotWindowConfig {
    fn default() -> Self {
        Self { max_in_flight: 4, confirm_timeout: Duration::from_secs(60) }
    }
}

/// What to load from the outbox next: up to `max` snapshots with `seq > after`, ascending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotRequest {
    pub after: u64,
    pub max: usize,
}

/// Counters of one connection's snapshot uploads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Streams handed to the driver to upload.
    pub uploads: u64,
    /// Confirmations received for snapshots of this window.
    pub confirmed: u64,
    /// Uploads whose stream failed (the snapshot is retried after `confirm_timeout`).
    pub failed: u64,
    /// Times unconfirmed snapshots timed out and the window went back to upload them again.
    pub rewinds: u64,
}

/// Which snapshots the agent uploads, per connection: a window of at most `max_in_flight`
/// snapshots that are being written or wait for [`Frame::SnapshotStored`], in ascending `seq`.
///
/// The driver loads what [`SnapshotWindow::poll_request`] asks for, passes the loaded sequence
/// numbers to [`SnapshotWindow::handle_loaded`], uploads those it returns, and reports each
/// stream's end ([`SnapshotWindow::handle_written`] / [`SnapshotWindow::handle_write_failed`]) and
/// each confirmation ([`SnapshotWindow::handle_stored`], after deleting the outbox's copy). A new
/// connection starts a new window from `seq` 0, so everything unconfirmed is uploaded again.
#[derive(Debug)]
pub struct SnapshotWindow {
    cfg: SnapshotWindowConfig,
    /// Highest `seq` loaded on this connection: the next request starts after it.
    after: u64,
    /// Handed to the driver, stream not yet finished.
    writing: BTreeSet<u64>,
    /// Stream finished (or failed), confirmation awaited; the instant the wait started.
    unconfirmed: BTreeMap<u64, Instant>,
    /// The last load returned nothing: wait for [`SnapshotWindow::handle_appended`].
    caught_up: bool,
    stats: SnapshotStats,
}

impl SnapshotWindow {
    pub fn new(cfg: SnapshotWindowConfig) -> Self {
        Self {
            cfg,
            after: 0,
            writing: BTreeSet::new(),
            unconfirmed: BTreeMap::new(),
            caught_up: false,
            stats: SnapshotStats::default(),
        }
    }

    pub fn stats(&self) -> SnapshotStats {
        self.stats
    }

    /// Snapshots being written or awaiting confirmation.
    pub fn in_flight(&self) -> usize {
        self.writing.len() + self.unconfirmed.len()
    }

    /// What to load next, if anything.
    pub fn poll_request(&self) -> Option<SnapshotRequest> {
        let free = self.cfg.max_in_flight.saturating_sub(self.in_flight());
        (!self.caught_up && free > 0).then_some(SnapshotRequest { after: self.after, max: free })
    }

    /// The result of a [`SnapshotRequest`]: the `seq`s of the snapshots loaded, ascending, all
    /// above `request.after`. Returns those to upload now (a snapshot still being written from
    /// before a rewind is not uploaded twice at once); empty for a stale request.
    pub fn handle_loaded(&mut self, request: SnapshotRequest, seqs: &[u64]) -> Vec<u64> {
        if request.after != self.after {
            return Vec::new(); // stale: a rewind happened while loading
        }
        let Some(&last) = seqs.last() else {
            self.caught_up = true;
            return Vec::new();
        };
        self.after = self.after.max(last);
        let fresh: Vec<u64> = seqs
            .iter()
            .copied()
            .filter(|s| *s > request.after && !self.writing.contains(s) && !self.unconfirmed.contains_key(s))
            .collect();
        self.writing.extend(fresh.iter().copied());
        self.stats.uploads += fresh.len() as u64;
        fresh
    }

    /// The stream of `seq` was finished: the confirmation is awaited from `now`.
    pub fn handle_written(&mut self, now: Instant, seq: u64) {
        if self.writing.remove(&seq) {
            self.unconfirmed.insert(seq, now);
        }
    }

    /// The stream of `seq` failed (reset by the peer, or the write failed): it stays in the
    /// outbox and is uploaded again once `confirm_timeout` has passed (not at once: a refusal
    /// would otherwise loop), or on the next connection.
    pub fn handle_write_failed(&mut self, now: Instant, seq: u64) {
        if self.writing.remove(&seq) {
            self.stats.failed += 1;
            self.unconfirmed.insert(seq, now);
        }
    }

    /// The aggregator stored the snapshot of `seq` (and the driver deleted the outbox's copy).
    pub fn handle_stored(&mut self, seq: u64) {
        let was_writing = self.writing.remove(&seq);
        if self.unconfirmed.remove(&seq).is_some() || was_writing {
            self.stats.confirmed += 1;
        }
    }

    /// The outbox has new snapshots.
    pub fn handle_appended(&mut self) {
        self.caught_up = false;
    }

    /// When [`SnapshotWindow::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.unconfirmed.values().min().map(|t| *t + self.cfg.confirm_timeout)
    }

    /// Unconfirmed snapshots whose wait is over are forgotten and the window goes back to just
    /// before the lowest of them, so the next loads upload again whatever the outbox still holds
    /// from there (confirmed ones are gone from it).
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<u64> =
            self.unconfirmed.iter().filter(|(_, t)| now >= **t + self.cfg.confirm_timeout).map(|(s, _)| *s).collect();
        let Some(&lowest) = expired.first() else { return };
        for s in &expired {
            self.unconfirmed.remove(s);
        }
        self.after = self.after.min(lowest - 1);
        self.caught_up = false;
        self.stats.rewinds += 1;
    }
}

/// Capped exponential backoff for reconnects. Jitter comes from the caller (`rand01` in 0..1) so
/// tests can switch it off.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    /// Fraction of the delay that is randomised (0 = no jitter, 0.5 = delay in 50%..100%).
    jitter: f64,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration, jitter: f64) -> Self {
        Self { base, cap, jitter: jitter.clamp(0.0, 1.0), attempt: 0 }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self, rand01: f64) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(20));
        self.attempt = self.attempt.saturating_add(1);
        let full = exp.min(self.cap);
        full.mul_f64(1.0 - self.jitter * rand01.clamp(0.0, 1.0))
    }

    /// The connection succeeded: start from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 0.0);
        let d: Vec<u128> = (0..6).map(|_| b.next_delay(0.7).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(0.0).as_millis(), 100);
        let mut j = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 0.5);
        assert_eq!(j.next_delay(1.0).as_millis(), 50);
    }

    fn window(max: usize) -> SnapshotWindow {
        SnapshotWindow::new(SnapshotWindowConfig { max_in_flight: max, confirm_timeout: Duration::from_secs(60) })
    }

    /// Loads from a simulated outbox holding `pending`, the way the driver does.
    fn load(w: &mut SnapshotWindow, pending: &BTreeSet<u64>) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(req) = w.poll_request() {
            let seqs: Vec<u64> = pending.range(req.after + 1..).take(req.max).copied().collect();
            let fresh = w.handle_loaded(req, &seqs);
            if seqs.is_empty() {
                break;
            }
            out.extend(fresh);
        }
        out
    }

    #[test]
    fn snapshot_window_uploads_in_order_within_its_limit() {
        let t0 = Instant::now();
        let mut pending: BTreeSet<u64> = [3, 5, 8, 9, 12, 20].into();
        let mut w = window(4);
        assert_eq!(load(&mut w, &pending), vec![3, 5, 8, 9]);
        assert_eq!(w.poll_request(), None, "window full");
        w.handle_written(t0, 3);
        assert_eq!(w.poll_request(), None, "written but unconfirmed still counts");
        pending.remove(&3);
        w.handle_stored(3);
        assert_eq!(load(&mut w, &pending), vec![12]);
        pending.remove(&5);
        w.handle_stored(5); // confirmed before the driver saw its stream finish
        assert_eq!(load(&mut w, &pending), vec![20]);
        // Caught up: nothing more is asked until the outbox has new snapshots.
        pending.remove(&8);
        w.handle_stored(8);
        assert_eq!(load(&mut w, &pending), Vec::<u64>::new());
        assert_eq!(w.poll_request(), None);
        pending.insert(21);
        w.handle_appended();
        assert_eq!(load(&mut w, &pending), vec![21]);
        assert_eq!(w.stats().uploads, 7);
        assert_eq!(w.stats().confirmed, 3);
    }

    #[test]
    fn unconfirmed_snapshots_are_uploaded_again_after_the_timeout() {
        let t0 = Instant::now();
        let mut pending: BTreeSet<u64> = [1, 2, 3].into();
        let mut w = window(2);
        assert_eq!(load(&mut w, &pending), vec![1, 2]);
        w.handle_written(t0, 1);
        w.handle_write_failed(t0 + Duration::from_secs(1), 2);
        assert_eq!(w.poll_timeout(), Some(t0 + Duration::from_secs(60)));
        w.handle_timeout(t0 + Duration::from_secs(59));
        assert_eq!(w.poll_request(), None, "nothing expired yet");
        // 1 was stored meanwhile, but its confirmation was lost.
        pending.remove(&1);
        w.handle_timeout(t0 + Duration::from_secs(60));
        assert_eq!(w.stats().rewinds, 1);
        // Only 1 expired: the window goes back to it; 2 still waits.
        assert_eq!(load(&mut w, &pending), vec![3]);
        w.handle_timeout(t0 + Duration::from_secs(61));
        assert_eq!(w.stats().rewinds, 2);
        w.handle_written(t0 + Duration::from_secs(61), 3);
        assert_eq!(load(&mut w, &pending), vec![2]);
        assert_eq!(w.stats().failed, 1);
    }

    #[test]
    fn a_snapshot_still_being_written_is_not_uploaded_twice_after_a_rewind() {
        let t0 = Instant::now();
        let pending: BTreeSet<u64> = [1, 2].into();
        let mut w = window(4);
        assert_eq!(load(&mut w, &pending), vec![1, 2]);
        w.handle_written(t0, 1);
        w.handle_timeout(t0 + Duration::from_secs(60));
        // 2 is still being written: only 1 goes again.
        assert_eq!(load(&mut w, &pending), vec![1]);
        // A stale load (from before a rewind) uploads nothing.
        let req = SnapshotRequest { after: 99, max: 1 };
        assert_eq!(w.handle_loaded(req, &[100]), Vec::<u64>::new());
    }

    #[test]
    fn snapshot_stored_reaches_the_agent_and_is_queued_by_the_ingest() {
        let mut ingest = IngestSession::new();
        ingest.handle_snapshot_stored(7);
        assert_eq!(ingest.poll_transmit(), Some(Frame::SnapshotStored { seq: 7 }));
        let mut agent = AgentSession::new(AgentSessionConfig::default(), 0);
        agent.handle_frame(Frame::SnapshotStored { seq: 7 });
        assert_eq!(agent.poll_event(), None, "ignored while disconnected");
        agent.handle_connected(
            Instant::now(),
            Hello {
                agent_version: "t".into(),
                model: "m".into(),
                cameras: vec![],
                last_acked_seq: 0,
                last_assigned_seq: 0,
            },
        );
        agent.handle_frame(Frame::SnapshotStored { seq: 7 });
        assert_eq!(agent.poll_event(), Some(AgentEvent::SnapshotStored(7)));
        // Snapshots never travel on the control stream.
        let mut ingest = IngestSession::new();
        let hello = Hello {
            agent_version: "t".into(),
            model: "m".into(),
            cameras: vec![],
            last_acked_seq: 0,
            last_assigned_seq: 0,
        };
        ingest.handle_frame(Frame::Hello(hello)).expect("hello");
        ingest.handle_high_water(0);
        let snap = crate::wire::SnapshotUpload {
            seq: 1,
            camera: "c".into(),
            taken_at_ms: 0,
            full_jpeg: vec![0xFF, 0xD8, 0xFF],
            crop_jpeg: None,
        };
        assert_eq!(ingest.handle_frame(Frame::Snapshot(snap)), Err(IngestError::Unexpected("snapshot")));
    }

    #[test]
    fn ingest_refuses_batches_before_hello() {
        let mut s = IngestSession::new();
        let err = s.handle_frame(Frame::EventBatch(EventBatch { after: 0, events: vec![] }));
        assert_eq!(err, Err(IngestError::NoHello("event_batch")));
    }

    #[test]
    fn ingest_refuses_a_hello_beyond_the_limits() {
        use crate::wire::{HelloError, MAX_HELLO_CAMERAS};
        let hello = |cameras: Vec<String>| Hello {
            agent_version: "1.0.0".into(),
            model: "m".into(),
            cameras,
            last_acked_seq: 0,
            last_assigned_seq: 0,
        };
        let many: Vec<String> = (0..=MAX_HELLO_CAMERAS).map(|i| format!("cam-{i}")).collect();
        let mut s = IngestSession::new();
        assert_eq!(
            s.handle_frame(Frame::Hello(hello(many.clone()))),
            Err(IngestError::BadHello(HelloError::TooManyCameras(MAX_HELLO_CAMERAS + 1)))
        );
        for bad in [vec![String::new()], vec!["a\nb".into()], vec!["x".repeat(129)], vec!["a".into(), "a".into()]] {
            let mut s = IngestSession::new();
            assert!(
                matches!(s.handle_frame(Frame::Hello(hello(bad.clone()))), Err(IngestError::BadHello(_))),
                "{bad:?}"
            );
        }
        let mut long = hello(vec![]);
        long.model = "m".repeat(257);
        assert!(matches!(IngestSession::new().handle_frame(Frame::Hello(long)), Err(IngestError::BadHello(_))));
        let mut s = IngestSession::new();
        let fine = many[..MAX_HELLO_CAMERAS].to_vec();
        assert!(matches!(s.handle_frame(Frame::Hello(hello(fine))), Ok(Some(IngestAction::LoadHighWater(_)))));
    }
}
