//! Both ends of the uplink session driven over a simulated link that loses, duplicates, delays
//! (and so reorders) frames and disconnects, with an outbox that evicts under pressure.
//!
//! After the chaos the link heals and the simulation runs until the outbox is empty. Checked:
//! every acknowledged sequence number is stored; no sequence number is committed twice; every
//! produced event is either stored or evicted, never both; nothing is stored that was not produced.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use its_shared::event::{EventEnvelope, EventKind};
use its_shared::session::{AgentEvent, AgentSession, AgentSessionConfig, IngestAction, IngestSession};
use its_shared::wire::{self, Frame, Hello};
use proptest::prelude::*;

/// xorshift64*: deterministic randomness from the proptest-chosen seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Debug, Clone, Copy)]
struct Chaos {
    loss: f64,
    dup: f64,
    max_delay_ticks: u64,
    disconnect: f64,
    outbox_cap: usize,
}

struct Link {
    to_agg: VecDeque<(u64, Frame)>,
    to_agent: VecDeque<(u64, Frame)>,
}

impl Link {
    fn send(q: &mut VecDeque<(u64, Frame)>, rng: &mut Rng, chaos: Option<Chaos>, tick: u64, f: Frame) {
        // Every frame crosses the real encoder and decoder.
        let bytes = wire::encode(&f).expect("encode");
        let mut d = wire::FrameDecoder::new();
        d.extend(&bytes);
        let f = d.next_frame().expect("decode").expect("complete");
        let Some(c) = chaos else {
            q.push_back((tick + 1, f));
            return;
        };
        if rng.chance(c.loss) {
            return;
        }
        let copies = if rng.chance(c.dup) { 2 } else { 1 };
        for _ in 0..copies {
            let at = tick + 1 + rng.below(c.max_delay_ticks);
            q.push_back((at, f.clone()));
        }
    }

    fn due(q: &mut VecDeque<(u64, Frame)>, tick: u64) -> Vec<Frame> {
        let mut out = Vec::new();
        let mut keep = VecDeque::new();
        while let Some((at, f)) = q.pop_front() {
            if at <= tick { out.push(f) } else { keep.push_back((at, f)) }
        }
        *q = keep;
        out
    }
}

struct World {
    rng: Rng,
    t0: Instant,
    agent: AgentSession,
    agg: Option<IngestSession>,
    link: Link,
    connected: bool,
    awaiting_welcome: bool,
    outbox: BTreeMap<u64, EventEnvelope>,
    next_seq: u64,
    /// Highest sequence number that may have reached the aggregator without an ack yet.
    limbo_high: u64,
    evicted: BTreeSet<u64>,
    stored: BTreeMap<u64, u32>,
    acked_ever: u64,
}

impl World {
    fn new(seed: u64) -> Self {
        let cfg = AgentSessionConfig {
            max_batch_events: 7,
            window_batches: 3,
            ack_timeout: Duration::from_millis(40),
            max_resends_without_progress: 4,
            heartbeat_interval: Duration::from_millis(25),
        };
        Self {
            rng: Rng(seed | 1),
            t0: Instant::now(),
            agent: AgentSession::new(cfg, 0),
            agg: None,
            link: Link { to_agg: VecDeque::new(), to_agent: VecDeque::new() },
            connected: false,
            awaiting_welcome: false,
            outbox: BTreeMap::new(),
            next_seq: 1,
            limbo_high: 0,
            evicted: BTreeSet::new(),
            stored: BTreeMap::new(),
            acked_ever: 0,
        }
    }

    fn now(&self, tick: u64) -> Instant {
        self.t0 + Duration::from_millis(tick)
    }

    fn produce(&mut self, n: u64, tick: u64, cap: usize) {
        for _ in 0..n {
            let seq = self.next_seq;
            self.next_seq += 1;
            let kind = EventKind::Counts { line: "l".into(), interval_s: 60, counts: vec![] };
            self.outbox.insert(seq, EventEnvelope { seq, camera: "c".into(), observed_at_ms: tick as i64, kind });
        }
        // Oldest-first eviction that never touches rows which may be in flight.
        while self.outbox.len() > cap {
            let victim = self.outbox.range(self.limbo_high + 1..).next().map(|(s, _)| *s);
            let Some(seq) = victim else { break };
            self.outbox.remove(&seq);
            self.evicted.insert(seq);
        }
        self.agent.handle_outbox_appended();
    }

    fn disconnect(&mut self) {
        self.connected = false;
        self.agg = None;
        self.link.to_agg.clear();
        self.link.to_agent.clear();
        self.agent.handle_disconnected();
    }

    fn connect(&mut self, tick: u64) {
        self.connected = true;
        self.awaiting_welcome = true;
        self.agg = Some(IngestSession::new());
        let hello = Hello {
            agent_version: "test".into(),
            model: "none".into(),
            cameras: vec!["c".into()],
            last_acked_seq: 0,
            last_assigned_seq: self.next_seq - 1,
        };
        self.agent.handle_connected(self.now(tick), hello);
    }

    fn step(&mut self, tick: u64, chaos: Option<Chaos>) {
        let now = self.now(tick);
        // Aggregator receives.
        for f in Link::due(&mut self.link.to_agg, tick) {
            let Some(agg) = self.agg.as_mut() else { break };
            let action = match agg.handle_frame(f) {
                Ok(a) => a,
                Err(_) => {
                    // What the aggregator's driver does: close the connection. A lost Hello
                    // (possible only on this lossy simulated link) ends here.
                    assert!(chaos.is_some(), "protocol violation on a clean link");
                    self.disconnect();
                    return;
                }
            };
            match action {
                Some(IngestAction::LoadHighWater(_)) => {
                    let hw = self.stored.keys().next_back().copied().unwrap_or(0);
                    agg.handle_high_water(hw);
                }
                Some(IngestAction::Commit { events, up_to }) => {
                    for e in events {
                        *self.stored.entry(e.seq).or_insert(0) += 1;
                        assert_eq!(self.stored[&e.seq], 1, "seq {} committed twice", e.seq);
                    }
                    agg.handle_committed(up_to);
                }
                Some(IngestAction::Health(_)) | None => {}
            }
        }
        if let Some(agg) = self.agg.as_mut() {
            while let Some(f) = agg.poll_transmit() {
                Link::send(&mut self.link.to_agent, &mut self.rng, chaos, tick, f);
            }
        }
        // Agent receives.
        for f in Link::due(&mut self.link.to_agent, tick) {
            self.agent.handle_frame(f);
        }
        if self.awaiting_welcome && self.agent.is_streaming() {
            self.awaiting_welcome = false;
            self.limbo_high = self.agent.acked();
        }
        if self.agent.poll_timeout().is_some_and(|t| t <= now) {
            self.agent.handle_timeout(now);
        }
        let mut dead = false;
        while let Some(ev) = self.agent.poll_event() {
            match ev {
                AgentEvent::Acked(up_to) => {
                    assert!(up_to < self.next_seq, "ack {up_to} beyond anything produced");
                    for s in self.stored.range(..=up_to).map(|(s, _)| *s).collect::<Vec<_>>() {
                        assert!(self.stored.contains_key(&s));
                    }
                    self.outbox.retain(|s, _| *s > up_to);
                    self.acked_ever = self.acked_ever.max(up_to);
                }
                AgentEvent::HeartbeatDue => self.agent.send_heartbeat(now, 0, Default::default()),
                AgentEvent::LinkDead => dead = true,
                AgentEvent::Refused(r) => panic!("refused: {r}"),
                AgentEvent::SnapshotStored(seq) => panic!("no snapshots on this link, yet stored {seq}"),
            }
        }
        while let Some(req) = self.agent.poll_batch_request() {
            let events: Vec<EventEnvelope> =
                self.outbox.range(req.after + 1..).take(req.max_events).map(|(_, e)| e.clone()).collect();
            self.agent.handle_batch_loaded(now, req, events);
            self.limbo_high = self.limbo_high.max(self.agent.sent_up_to());
        }
        while let Some(f) = self.agent.poll_transmit() {
            if self.connected {
                Link::send(&mut self.link.to_agg, &mut self.rng, chaos, tick, f);
            }
        }
        if dead {
            self.disconnect();
        }
    }
}

/// Returns (events evicted, resends) so callers can check the chaos was real.
fn run(seed: u64, chaos: Chaos, chaos_ticks: u64) -> (usize, u64) {
    let mut w = World::new(seed);
    let mut tick = 0;
    let mut reconnect_at = Some(0);
    while tick < chaos_ticks {
        if reconnect_at.is_some_and(|t| t <= tick) {
            reconnect_at = None;
            w.connect(tick);
        }
        let n = w.rng.below(4);
        w.produce(n, tick, chaos.outbox_cap);
        w.step(tick, Some(chaos));
        if w.connected && w.rng.chance(chaos.disconnect) {
            w.disconnect();
        }
        if !w.connected && reconnect_at.is_none() {
            reconnect_at = Some(tick + 1 + w.rng.below(50));
        }
        // Every acknowledged sequence number is stored (or was evicted before it was ever sent,
        // which the watermark skips).
        for (&s, _) in w.stored.range(..=w.acked_ever) {
            assert!(!w.evicted.contains(&s), "seq {s} both stored and evicted");
        }
        tick += 1;
    }
    // Heal: a fresh connection over a clean link until the outbox drains.
    w.disconnect();
    w.connect(tick);
    let deadline = tick + 100_000;
    while !(w.outbox.is_empty() && w.link.to_agg.is_empty() && w.link.to_agent.is_empty()) {
        assert!(w.connected, "a clean link was declared dead");
        w.step(tick, None);
        tick += 1;
        assert!(tick < deadline, "did not drain: outbox {} acked {}", w.outbox.len(), w.agent.acked());
    }
    let produced: BTreeSet<u64> = (1..w.next_seq).collect();
    let stored: BTreeSet<u64> = w.stored.keys().copied().collect();
    assert!(stored.is_disjoint(&w.evicted), "an event is both stored and counted evicted");
    let union: BTreeSet<u64> = stored.union(&w.evicted).copied().collect();
    assert_eq!(union, produced, "produced = stored + evicted");
    assert!(w.stored.values().all(|&c| c == 1));
    assert_eq!(w.agent.acked(), stored.last().copied().unwrap_or(0), "everything stored was acknowledged");
    (w.evicted.len(), w.agent.stats().resends)
}

#[test]
fn clean_link_delivers_everything_once() {
    let (evicted, resends) =
        run(7, Chaos { loss: 0.0, dup: 0.0, max_delay_ticks: 1, disconnect: 0.0, outbox_cap: 1_000_000 }, 2_000);
    assert_eq!((evicted, resends), (0, 0));
}

#[test]
fn heavy_chaos_with_eviction() {
    let (mut evicted, mut resends) = (0, 0);
    for seed in 1..40 {
        let (e, r) =
            run(seed, Chaos { loss: 0.2, dup: 0.2, max_delay_ticks: 30, disconnect: 0.01, outbox_cap: 40 }, 3_000);
        evicted += e;
        resends += r;
    }
    assert!(evicted > 0 && resends > 0, "the chaos must evict and resend: {evicted} {resends}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn random_links_keep_the_ack_chain(
        seed in any::<u64>(),
        loss in 0.0f64..0.4,
        dup in 0.0f64..0.4,
        max_delay_ticks in 1u64..40,
        disconnect in 0.0f64..0.03,
        outbox_cap in 10usize..2000,
    ) {
        let _ = run(seed, Chaos { loss, dup, max_delay_ticks, disconnect, outbox_cap }, 1_500);
    }
}
