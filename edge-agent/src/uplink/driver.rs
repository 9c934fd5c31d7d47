//! The uplink driver: runs the [`AgentSession`] over any transport, and does step 2 of the ack
//! chain once for all of them.
//!
//! One [`UplinkDriver`] lives as long as the uplink and owns the session (its acknowledgement
//! watermark and counters survive reconnects). A transport hands it one [`SessionLink`] per uplink
//! session (QUIC: one per connection; MQTT: one per `Hello` on a broker connection that may carry
//! several), and [`UplinkDriver::run_session`] drives it from the `Hello` to the end:
//!
//! 1. the session's frames go out through [`SessionLink::send`], the aggregator's come in through
//!    [`SessionLink::recv`];
//! 2. on `Ack` the acknowledged rows are deleted from the outbox (or renumbered after them, when
//!    the aggregator holds more than this outbox ever assigned); the welcome (the first `Ack`)
//!    shrinks the outbox's limbo and is told to the link ([`SessionLink::welcomed`]); the session's
//!    batch requests are read from the outbox ("limbo" from that read on); heartbeats carry the
//!    health report;
//! 3. at the end, whatever the cause, the session is told it is disconnected and the shared
//!    [`UplinkHandle`] counters are updated; what to do next (reconnect, start a new session,
//!    stop) is the transport's decision, from the [`SessionEnd`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::anyhow;
use its_shared::session::{AgentEvent, AgentSession, AgentSessionConfig, BatchRequest};
use its_shared::wire::{Frame, Hello};
use its_shared::{DeviceHealth, EventEnvelope};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::buffer::Outbox;
use crate::unix_ms;

/// State the uplink shares with the rest of the agent.
#[derive(Debug, Default)]
pub struct UplinkHandle {
    /// Wakes the uplink when the outbox has new rows (producers call `notify_one`).
    pub appended: Notify,
    /// Wakes the snapshot uploader when the outbox has new snapshots: producers that append
    /// snapshots call `notify_one` on it as well as on `appended`.
    pub snapshots_appended: Notify,
    pub connected: AtomicBool,
    /// Connections that ended (for any reason) since start.
    pub reconnects: AtomicU64,
    /// Highest acknowledged sequence number.
    pub acked: AtomicU64,
    pub resends: AtomicU64,
    /// Snapshots the aggregator confirmed and the outbox deleted, since start.
    pub snapshots_stored: AtomicU64,
    /// Snapshot uploads started (streams opened), since start; more than `snapshots_stored`
    /// when uploads are repeated after a reconnect or a timeout.
    pub snapshot_uploads: AtomicU64,
}

/// Produces the health report sent in heartbeats.
pub type HealthFn = Arc<dyn Fn() -> DeviceHealth + Send + Sync>;

/// The current time as the session takes it (tokio's clock, so tests can pause it).
pub(super) fn now_std() -> std::time::Instant {
    Instant::now().into_std()
}

/// Why an uplink session ended.
#[derive(Debug)]
pub(super) enum EndCause {
    /// Shutdown was asked (the link was closed with [`SessionLink::close`]).
    Shutdown,
    /// The session failed: no acknowledgement through repeated resends, the aggregator refused
    /// it, or the link could not send.
    Failed(anyhow::Error),
    /// The link went away (closed, unreadable, the broker lost); the reason as logged.
    Lost(String),
    /// The agent's side broke: the outbox failed, or a frame could not be encoded.
    Broken(anyhow::Error),
}

/// How an uplink session ended.
#[derive(Debug)]
pub(super) struct SessionEnd {
    /// The aggregator had welcomed the session (it was streaming).
    pub welcomed: bool,
    pub cause: EndCause,
}

/// What the driver needs from a transport for one uplink session.
pub(super) trait SessionLink {
    /// The uplink's name in log messages ("uplink", "MQTT uplink").
    const NAME: &'static str;
    /// Sends one frame of the session.
    async fn send(&mut self, frame: &Frame) -> Result<(), EndCause>;
    /// The next frame of this session from the aggregator, or why there will be none. Must be
    /// cancel-safe: the driver waits on it beside timers and the outbox.
    async fn recv(&mut self) -> Result<Frame, EndCause>;
    /// The aggregator welcomed the session (its welcome's ack is applied to the outbox).
    fn welcomed(&mut self) {}
    /// The aggregator stored the snapshot of event `seq`.
    fn snapshot_stored(&mut self, _seq: u64) {}
    /// Shutdown: ends the link politely, without waiting long.
    async fn close(&mut self);
}

/// Runs the agent's uplink session over the transports' links (see the module docs).
pub(super) struct UplinkDriver {
    session: AgentSession,
    /// The Hello of every session; its sequence numbers are filled in from the outbox at start.
    hello: Hello,
    outbox: Arc<Outbox>,
    handle: Arc<UplinkHandle>,
    health: HealthFn,
}

impl UplinkDriver {
    /// A driver whose session starts from what the outbox knows was acknowledged.
    pub fn new(
        cfg: AgentSessionConfig,
        hello: Hello,
        outbox: Arc<Outbox>,
        handle: Arc<UplinkHandle>,
        health: HealthFn,
    ) -> Self {
        let session = AgentSession::new(cfg, outbox.stats().acked);
        Self { session, hello, outbox, handle, health }
    }

    /// Runs one uplink session over `link`, from its `Hello` until it ends or `shutdown` changes,
    /// then does the end-of-session bookkeeping.
    pub async fn run_session<L: SessionLink>(
        &mut self,
        link: &mut L,
        shutdown: &mut watch::Receiver<bool>,
    ) -> SessionEnd {
        let stats = self.outbox.stats();
        let hello =
            Hello { last_acked_seq: stats.acked, last_assigned_seq: stats.produced_total, ..self.hello.clone() };
        self.session.handle_connected(now_std(), hello);
        let cause = self.drive(link, shutdown).await;
        let welcomed = self.session.is_streaming();
        self.session.handle_disconnected();
        self.handle.connected.store(false, Ordering::Relaxed);
        self.handle.resends.store(self.session.stats().resends, Ordering::Relaxed);
        if welcomed && !matches!(cause, EndCause::Shutdown) {
            self.handle.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        SessionEnd { welcomed, cause }
    }

    async fn drive<L: SessionLink>(&mut self, link: &mut L, shutdown: &mut watch::Receiver<bool>) -> EndCause {
        let mut welcomed = false;
        loop {
            while let Some(frame) = self.session.poll_transmit() {
                if let Err(cause) = link.send(&frame).await {
                    return cause;
                }
            }
            // Every event is handled (acks applied) before an end is acted on; the first end wins.
            let mut end = None;
            while let Some(ev) = self.session.poll_event() {
                match ev {
                    AgentEvent::Acked(up_to) => {
                        if let Err(e) = self.apply_ack(up_to).await {
                            return EndCause::Broken(e);
                        }
                    }
                    AgentEvent::HeartbeatDue => self.session.send_heartbeat(now_std(), unix_ms(), (self.health)()),
                    AgentEvent::LinkDead => {
                        end.get_or_insert_with(|| anyhow!("no acknowledgement through repeated resends"));
                    }
                    AgentEvent::Refused(reason) => {
                        end.get_or_insert_with(|| anyhow!("aggregator refused the session: {reason}"));
                    }
                    AgentEvent::SnapshotStored(seq) => link.snapshot_stored(seq),
                }
            }
            if let Some(e) = end {
                return EndCause::Failed(e);
            }
            if !welcomed && self.session.is_streaming() {
                welcomed = true;
                self.outbox.welcome(self.session.acked());
                tracing::info!(acked = self.session.acked(), "{} session ready", L::NAME);
                // After the welcome's ack was applied: a renumbering has moved the snapshots too.
                link.welcomed();
            }
            if let Some(req) = self.session.poll_batch_request() {
                let events = match self.read_batch(req).await {
                    Ok(events) => events,
                    Err(e) => return EndCause::Broken(e),
                };
                self.session.handle_batch_loaded(now_std(), req, events);
                continue;
            }
            self.handle.resends.store(self.session.stats().resends, Ordering::Relaxed);
            let deadline = self.session.poll_timeout().map(Instant::from_std);
            tokio::select! {
                frame = link.recv() => match frame {
                    Ok(f) => self.session.handle_frame(f),
                    Err(cause) => return cause,
                },
                _ = self.handle.appended.notified() => self.session.handle_outbox_appended(),
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    self.session.handle_timeout(now_std());
                }
                _ = shutdown.changed() => {
                    link.close().await;
                    return EndCause::Shutdown;
                }
            }
        }
    }

    /// Reads the batch the session asked for. Reading for send puts the rows in "limbo" atomically
    /// with the read: from now on they may be stored without us hearing about it, so eviction
    /// must not touch them.
    async fn read_batch(&self, req: BatchRequest) -> anyhow::Result<Vec<EventEnvelope>> {
        let ob = self.outbox.clone();
        Ok(tokio::task::spawn_blocking(move || ob.read_for_send(req.after, req.max_events)).await??)
    }

    /// Deletes the acknowledged rows from the outbox (or renumbers, see [`Outbox::ack`]).
    async fn apply_ack(&self, up_to: u64) -> anyhow::Result<()> {
        let ob = self.outbox.clone();
        let outcome = tokio::task::spawn_blocking(move || ob.ack(up_to)).await??;
        if outcome.renumbered > 0 {
            tracing::warn!(
                aggregator_has = up_to,
                renumbered = outcome.renumbered,
                "the aggregator holds more events than this outbox ever assigned (outbox reset?): renumbered pending events after it"
            );
        }
        self.handle.acked.store(up_to, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use its_shared::event::{Direction, EventKind, ObjectRef};
    use its_shared::wire::{Ack, Frame, Hello};
    use tokio::sync::{mpsc, watch};

    use super::*;
    use crate::buffer::{NewEvent, OutboxConfig};

    /// A link of the test's own: what the driver sends goes to `sent`; what the test puts in
    /// `incoming` is what the aggregator says; closing `incoming` loses the link.
    struct TestLink {
        sent: mpsc::UnboundedSender<Frame>,
        incoming: mpsc::UnboundedReceiver<Frame>,
        welcomed: bool,
    }

    impl SessionLink for TestLink {
        const NAME: &'static str = "test uplink";

        async fn send(&mut self, frame: &Frame) -> Result<(), EndCause> {
            self.sent.send(frame.clone()).map_err(|_| EndCause::Lost("test ended".into()))
        }

        async fn recv(&mut self) -> Result<Frame, EndCause> {
            self.incoming.recv().await.ok_or_else(|| EndCause::Lost("link closed".into()))
        }

        fn welcomed(&mut self) {
            self.welcomed = true;
        }

        async fn close(&mut self) {}
    }

    fn link() -> (TestLink, mpsc::UnboundedReceiver<Frame>, mpsc::UnboundedSender<Frame>) {
        let (sent, sent_rx) = mpsc::unbounded_channel();
        let (incoming_tx, incoming) = mpsc::unbounded_channel();
        (TestLink { sent, incoming, welcomed: false }, sent_rx, incoming_tx)
    }

    fn outbox(dir: &tempfile::TempDir, events: usize) -> Arc<Outbox> {
        let outbox = Outbox::open(OutboxConfig::new(dir.path().join("outbox.db"))).expect("outbox");
        let events: Vec<NewEvent> = (0..events)
            .map(|i| NewEvent {
                camera: "cam-1".into(),
                observed_at_ms: 1_700_000_000_000 + i as i64,
                kind: EventKind::LineCrossing {
                    line: "north".into(),
                    object: ObjectRef {
                        track_id: i as u64,
                        label: "car".into(),
                        score: 0.9,
                        bbox: [0.1, 0.2, 0.3, 0.4],
                    },
                    direction: Direction::In,
                    speed_kmh: None,
                },
            })
            .collect();
        if !events.is_empty() {
            outbox.append(&events, 1_700_000_000_000).expect("append");
        }
        Arc::new(outbox)
    }

    fn driver(outbox: &Arc<Outbox>) -> (UplinkDriver, Arc<UplinkHandle>) {
        let handle = Arc::new(UplinkHandle::default());
        let hello = Hello {
            agent_version: "test".into(),
            model: "none".into(),
            cameras: vec!["cam-1".into()],
            last_acked_seq: 0,
            last_assigned_seq: 0,
        };
        let health: HealthFn = Arc::new(DeviceHealth::default);
        let d = UplinkDriver::new(AgentSessionConfig::default(), hello, outbox.clone(), handle.clone(), health);
        (d, handle)
    }

    /// Step 2 of the ack chain, once for every transport: the Hello carries the outbox's numbers,
    /// the welcome is told to the link, the batch is read from the outbox, and its ack deletes the
    /// rows and moves the shared watermark.
    #[tokio::test]
    async fn acks_delete_the_rows_and_the_welcome_is_told_to_the_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = outbox(&dir, 10);
        let (mut driver, handle) = driver(&outbox);
        let (mut link, mut sent, incoming) = link();
        let (_shutdown_tx, mut shutdown) = watch::channel(false);
        let aggregator = async move {
            let Some(Frame::Hello(h)) = sent.recv().await else { panic!("no hello") };
            assert_eq!((h.last_acked_seq, h.last_assigned_seq), (0, 10));
            incoming.send(Frame::Ack(Ack { up_to: 0 })).expect("welcome");
            let batch = loop {
                match sent.recv().await {
                    Some(Frame::EventBatch(b)) => break b,
                    Some(_) => continue,
                    None => panic!("no batch"),
                }
            };
            assert_eq!(batch.events.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
            incoming.send(Frame::Ack(Ack { up_to: 10 })).expect("ack");
            // Then the link goes away: the driver applies the ack it already has, then ends.
        };
        let (end, ()) = tokio::join!(driver.run_session(&mut link, &mut shutdown), aggregator);
        assert!(end.welcomed);
        assert!(matches!(end.cause, EndCause::Lost(_)), "{:?}", end.cause);
        assert!(link.welcomed, "the link was told of the welcome");
        assert_eq!(outbox.stats().pending_events, 0, "acknowledged rows are deleted");
        assert_eq!(outbox.stats().acked, 10);
        assert_eq!(handle.acked.load(Ordering::Relaxed), 10);
        assert!(!handle.connected.load(Ordering::Relaxed));
        assert_eq!(handle.reconnects.load(Ordering::Relaxed), 1, "a welcomed session that ended counts");
    }

    /// With no welcome the session gives up after one acknowledgement timeout, as the session
    /// config says: time is paused, so the 10 s pass at once and exactly.
    #[tokio::test(start_paused = true)]
    async fn no_welcome_ends_the_session_after_the_ack_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = outbox(&dir, 0);
        let (mut driver, handle) = driver(&outbox);
        let (mut link, mut sent, _incoming) = link();
        let (_shutdown_tx, mut shutdown) = watch::channel(false);
        let started = Instant::now();
        let end = driver.run_session(&mut link, &mut shutdown).await;
        let waited = started.elapsed();
        assert!(matches!(sent.try_recv(), Ok(Frame::Hello(_))));
        assert!(!end.welcomed);
        assert!(!link.welcomed);
        match end.cause {
            EndCause::Failed(e) => assert!(e.to_string().contains("no acknowledgement"), "{e}"),
            other => panic!("{other:?}"),
        }
        let timeout = AgentSessionConfig::default().ack_timeout;
        assert!(waited >= timeout && waited < timeout + Duration::from_secs(1), "{waited:?}");
        assert_eq!(handle.reconnects.load(Ordering::Relaxed), 0, "a session never welcomed is no reconnect");
    }
}
