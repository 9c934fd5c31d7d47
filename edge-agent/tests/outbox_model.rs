//! The outbox against an in-memory model of its contract (proptest), plus named corner cases.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use its_agent::buffer::{NewEvent, Outbox, OutboxConfig, OutboxError, OutboxStats, SCHEMA_VERSION, read_stats};
use its_shared::event::{ClassCount, Direction, ObjectRef};
use its_shared::{DeviceHealth, EventEnvelope, EventKind};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Event generation

fn object(track_id: u64) -> ObjectRef {
    ObjectRef { track_id, label: "car".into(), score: 0.5, bbox: [0.1, 0.2, 0.3, 0.4] }
}

/// An event of one of four kinds whose encoded size grows with `size`.
fn event(kind: u8, size: u16, n: u64) -> NewEvent {
    let text = "x".repeat(usize::from(size));
    let kind = match kind % 4 {
        0 => EventKind::LineCrossing { line: text, object: object(n), direction: Direction::In, speed_kmh: None },
        1 => EventKind::ZoneEnter { zone: text, object: object(n) },
        2 => EventKind::Counts {
            line: "l".into(),
            interval_s: 60,
            counts: vec![ClassCount { label: text, direction: Direction::Out, count: 3 }],
        },
        _ => EventKind::DeviceHealth(DeviceHealth { agent_version: text, uptime_s: n, ..DeviceHealth::default() }),
    };
    NewEvent { camera: format!("cam-{}", n % 3), observed_at_ms: 1_000 + n as i64, kind }
}

fn body_len(env: &EventEnvelope) -> u64 {
    bincode::serde::encode_to_vec(env, bincode::config::standard()).expect("encode").len() as u64
}

// ---------------------------------------------------------------------------------------------
// The model

#[derive(Debug, Clone)]
struct Row {
    env: EventEnvelope,
    committed_ms: i64,
    len: u64,
}

#[derive(Debug, Clone)]
struct Model {
    max_bytes: u64,
    max_age_ms: i64,
    reserve_ahead: u64,
    rows: BTreeMap<u64, Row>,
    next_seq: u64,
    acked: u64,
    sent_reserved: u64,
    limbo: u64,
    evicted_total: u64,
    evicted_by_kind: BTreeMap<String, u64>,
}

impl Model {
    fn new(cfg: &OutboxConfig) -> Self {
        Self {
            max_bytes: cfg.max_bytes,
            max_age_ms: cfg.max_age.as_millis() as i64,
            reserve_ahead: cfg.reserve_ahead,
            rows: BTreeMap::new(),
            next_seq: 1,
            acked: 0,
            sent_reserved: 0,
            limbo: 0,
            evicted_total: 0,
            evicted_by_kind: BTreeMap::new(),
        }
    }

    fn bytes(&self) -> u64 {
        self.rows.values().map(|r| r.len).sum()
    }

    fn stats(&self) -> OutboxStats {
        OutboxStats {
            produced_total: self.next_seq - 1,
            acked: self.acked,
            pending_events: self.rows.len() as u64,
            pending_bytes: self.bytes(),
            oldest_committed_ms: self.rows.values().map(|r| r.committed_ms).min(),
            evicted_total: self.evicted_total,
            evicted_by_kind: self.evicted_by_kind.clone(),
            // This model has no snapshots (their tests are beside the outbox).
            pending_snapshots: 0,
            pending_snapshot_bytes: 0,
            snapshots_evicted: 0,
        }
    }

    fn evict(&mut self, seq: u64) {
        let row = self.rows.remove(&seq).expect("evicting a present row");
        self.evicted_total += 1;
        *self.evicted_by_kind.entry(row.env.kind.name().to_string()).or_insert(0) += 1;
    }

    /// Returns (first, last, evicted).
    fn append(&mut self, events: &[NewEvent], now_ms: i64) -> (u64, u64, u64) {
        let first = self.next_seq;
        if events.is_empty() {
            return (first, first - 1, 0);
        }
        let committed_ms = self.rows.values().next_back().map_or(now_ms, |r| r.committed_ms.max(now_ms));
        for e in events {
            let env = EventEnvelope {
                seq: self.next_seq,
                camera: e.camera.clone(),
                observed_at_ms: e.observed_at_ms,
                kind: e.kind.clone(),
            };
            let len = body_len(&env);
            self.rows.insert(self.next_seq, Row { env, committed_ms, len });
            self.next_seq += 1;
        }
        let mut evicted = 0;
        while self.bytes() > self.max_bytes {
            let Some(seq) = self.rows.range(self.limbo + 1..).next().map(|(s, _)| *s) else {
                break;
            };
            self.evict(seq);
            evicted += 1;
        }
        (first, self.next_seq - 1, evicted)
    }

    /// Returns (deleted, renumbered).
    fn ack(&mut self, up_to: u64) -> (u64, u64) {
        if up_to <= self.acked {
            return (0, 0);
        }
        if up_to >= self.next_seq {
            let rows = std::mem::take(&mut self.rows);
            let n = rows.len() as u64;
            for (i, mut row) in rows.into_values().enumerate() {
                row.env.seq = up_to + 1 + i as u64;
                row.len = body_len(&row.env);
                self.rows.insert(row.env.seq, row);
            }
            self.next_seq = up_to + 1 + n;
            self.acked = up_to;
            self.sent_reserved = up_to;
            self.limbo = up_to;
            return (0, n);
        }
        let keep = self.rows.split_off(&(up_to + 1));
        let deleted = self.rows.len() as u64;
        self.rows = keep;
        self.acked = up_to;
        self.limbo = self.limbo.max(up_to);
        (deleted, 0)
    }

    fn mark_sending(&mut self, last: u64) {
        self.limbo = self.limbo.max(last);
        if last > self.sent_reserved {
            self.sent_reserved = last + self.reserve_ahead;
        }
    }

    fn read_after(&self, after: u64, max: usize) -> Vec<EventEnvelope> {
        self.rows.range(after.saturating_add(1)..).take(max).map(|(_, r)| r.env.clone()).collect()
    }

    fn welcome(&mut self, acked: u64) {
        self.limbo = acked.max(self.acked);
    }

    fn evict_expired(&mut self, now_ms: i64) -> u64 {
        let cutoff = now_ms - self.max_age_ms;
        let expired: Vec<u64> =
            self.rows.range(self.limbo + 1..).filter(|(_, r)| r.committed_ms < cutoff).map(|(s, _)| *s).collect();
        for s in &expired {
            self.evict(*s);
        }
        expired.len() as u64
    }

    fn reopen(&mut self) {
        self.limbo = self.acked.max(self.sent_reserved);
    }
}

// ---------------------------------------------------------------------------------------------
// Operations

#[derive(Debug, Clone)]
enum Op {
    /// Events as (kind, size); the clock moves by `dt` ms first (backwards sometimes).
    Append(Vec<(u8, u16)>, i64),
    /// Acknowledge a value below, inside or beyond the assigned range.
    Ack(AckSel),
    /// Mark a pending row (chosen by fraction) as being sent.
    MarkSending(u16),
    /// Read-and-mark up to `max` rows after a pending row chosen by fraction.
    ReadForSend(u16, u8),
    /// A welcome acknowledging what the outbox has acked (the connection was re-established).
    Welcome,
    /// Advance the clock and evict what expired.
    EvictExpired(i64),
    Reopen,
}

#[derive(Debug, Clone)]
enum AckSel {
    Stale(u16),
    Within(u16),
    Beyond(u8),
}

fn op() -> impl Strategy<Value = Op> {
    let events = proptest::collection::vec((0u8..4, prop_oneof![3 => 0u16..40, 1 => 40u16..400]), 0..8);
    prop_oneof![
        6 => (events, -50i64..300).prop_map(|(e, dt)| Op::Append(e, dt)),
        3 => any::<u16>().prop_map(|f| Op::Ack(AckSel::Within(f))),
        1 => any::<u16>().prop_map(|f| Op::Ack(AckSel::Stale(f))),
        1 => (0u8..20).prop_map(|b| Op::Ack(AckSel::Beyond(b))),
        3 => any::<u16>().prop_map(Op::MarkSending),
        2 => (any::<u16>(), 1u8..6).prop_map(|(f, m)| Op::ReadForSend(f, m)),
        2 => Just(Op::Welcome),
        2 => (0i64..1500).prop_map(Op::EvictExpired),
        1 => Just(Op::Reopen),
    ]
}

/// A pending seq chosen by fraction, if any.
fn pick(model: &Model, frac: u16) -> Option<u64> {
    let n = model.rows.len();
    (n > 0).then(|| *model.rows.keys().nth(usize::from(frac) % n).expect("index in range"))
}

fn pending(outbox: &Outbox) -> Vec<EventEnvelope> {
    outbox.read_after(0, usize::MAX).expect("read_after")
}

fn config(dir: &Path, max_bytes: u64, reserve_ahead: u64) -> OutboxConfig {
    OutboxConfig { path: dir.join("outbox.db"), max_bytes, max_age: Duration::from_millis(1000), reserve_ahead }
}

fn run_ops(ops: Vec<Op>, max_bytes: u64, reserve_ahead: u64) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), max_bytes, reserve_ahead);
    let mut outbox = Outbox::open(cfg.clone()).expect("open");
    let mut model = Model::new(&cfg);
    let mut now = 1_000_000i64;
    let mut n = 0u64;
    // Seqs that may be stored by the aggregator (sent, not cleared by a welcome or renumbering).
    let mut in_limbo: BTreeSet<u64> = BTreeSet::new();

    for (i, op) in ops.into_iter().enumerate() {
        let before: BTreeSet<u64> = model.rows.keys().copied().collect();
        let mut removed_by_ack = BTreeSet::new();
        match &op {
            Op::Append(spec, dt) => {
                now += dt;
                let events: Vec<NewEvent> = spec
                    .iter()
                    .map(|(k, s)| {
                        n += 1;
                        event(*k, *s, n)
                    })
                    .collect();
                let got = outbox.append(&events, now).expect("append");
                let (first, last, evicted) = model.append(&events, now);
                prop_assert_eq!((got.first_seq, got.last_seq, got.evicted), (first, last, evicted), "op {}", i);
            }
            Op::Ack(sel) => {
                let k = match *sel {
                    AckSel::Stale(f) => u64::from(f) % (model.acked + 1),
                    AckSel::Within(f) => {
                        let span = model.next_seq - 1 - model.acked;
                        if span == 0 { model.acked } else { model.acked + 1 + u64::from(f) % span }
                    }
                    AckSel::Beyond(b) => model.next_seq + u64::from(b),
                };
                let got = outbox.ack(k).expect("ack");
                let (deleted, renumbered) = model.ack(k);
                prop_assert_eq!((got.deleted, got.renumbered), (deleted, renumbered), "op {} ack {}", i, k);
                if k >= model.acked && renumbered == 0 {
                    removed_by_ack = before.range(..=k).copied().collect();
                    in_limbo.retain(|s| *s > k);
                }
                if matches!(sel, AckSel::Beyond(_)) {
                    // Renumbered: nothing of the new numbering was sent.
                    in_limbo.clear();
                    removed_by_ack.clear();
                }
            }
            Op::MarkSending(f) => {
                if let Some(last) = pick(&model, *f) {
                    outbox.mark_sending(last).expect("mark_sending");
                    model.mark_sending(last);
                    in_limbo.extend(before.range(..=last));
                }
            }
            Op::ReadForSend(f, max) => {
                let after = pick(&model, *f).map_or(model.acked, |s| s.saturating_sub(1));
                let got = outbox.read_for_send(after, usize::from(*max)).expect("read_for_send");
                let want = model.read_after(after, usize::from(*max));
                prop_assert_eq!(&got, &want, "op {}", i);
                if let Some(last) = want.last() {
                    model.mark_sending(last.seq);
                    in_limbo.extend(before.range(..=last.seq));
                }
            }
            Op::Welcome => {
                let acked = model.acked;
                outbox.welcome(acked);
                model.welcome(acked);
                in_limbo.retain(|s| *s <= acked);
            }
            Op::EvictExpired(advance) => {
                now += advance;
                let got = outbox.evict_expired(now).expect("evict_expired");
                prop_assert_eq!(got, model.evict_expired(now), "op {}", i);
            }
            Op::Reopen => {
                drop(outbox);
                outbox = Outbox::open(cfg.clone()).expect("reopen");
                model.reopen();
            }
        }

        // Same rows, same bodies, same counters, same limbo.
        let got = pending(&outbox);
        let want = model.read_after(0, usize::MAX);
        prop_assert_eq!(&got, &want, "rows after op {}: {:?}", i, op);
        prop_assert_eq!(outbox.stats(), model.stats(), "stats after op {}: {:?}", i, op);
        prop_assert_eq!(outbox.limbo_high(), model.limbo, "limbo after op {}: {:?}", i, op);

        // Nothing that may be stored by the aggregator was evicted.
        if !matches!(op, Op::Ack(AckSel::Beyond(_))) {
            let after: BTreeSet<u64> = model.rows.keys().copied().collect();
            let evicted: BTreeSet<u64> =
                before.difference(&after).filter(|s| !removed_by_ack.contains(s)).copied().collect();
            prop_assert!(
                evicted.is_disjoint(&in_limbo),
                "op {}: evicted {:?} while in limbo {:?}",
                i,
                evicted,
                in_limbo
            );
        }
    }
    outbox.integrity_check().expect("integrity");
    let persisted = read_stats(&cfg.path).expect("read_stats");
    prop_assert_eq!(persisted, model.stats());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn outbox_matches_model(
        ops in proptest::collection::vec(op(), 1..40),
        max_bytes in prop_oneof![Just(300u64), Just(1500), Just(1u64 << 40)],
        reserve_ahead in prop_oneof![Just(0u64), Just(3), Just(100)],
    ) {
        run_ops(ops, max_bytes, reserve_ahead)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Named corner cases

fn small_events(n: u64) -> Vec<NewEvent> {
    (0..n).map(|i| event(i as u8, 10, i)).collect()
}

fn seqs(outbox: &Outbox) -> Vec<u64> {
    pending(outbox).iter().map(|e| e.seq).collect()
}

#[test]
fn outbox_is_send_and_sync() {
    fn assert<T: Send + Sync>() {}
    assert::<Outbox>();
}

#[test]
fn sequence_numbers_start_at_one_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), 1 << 30, 10);
    let outbox = Outbox::open(cfg.clone()).expect("open");
    let out = outbox.append(&small_events(3), 5).expect("append");
    assert_eq!((out.first_seq, out.last_seq, out.evicted), (1, 3, 0));
    let empty = outbox.append(&[], 5).expect("empty append");
    assert_eq!((empty.first_seq, empty.last_seq), (4, 3));
    drop(outbox);
    let outbox = Outbox::open(cfg).expect("reopen");
    let out = outbox.append(&small_events(2), 6).expect("append");
    assert_eq!((out.first_seq, out.last_seq), (4, 5));
    assert_eq!(seqs(&outbox), vec![1, 2, 3, 4, 5]);
    assert_eq!(outbox.stats().produced_total, 5);
}

#[test]
fn ack_beyond_next_seq_renumbers_rows_and_bodies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), 1 << 30, 10);
    let outbox = Outbox::open(cfg.clone()).expect("open");
    outbox.append(&small_events(4), 100).expect("append");
    outbox.ack(1).expect("ack 1");
    outbox.mark_sending(3).expect("mark");
    let before: Vec<EventEnvelope> = pending(&outbox);

    // The aggregator holds 1000 events of this device: the outbox must have been reset.
    let out = outbox.ack(1000).expect("ack 1000");
    assert_eq!((out.deleted, out.renumbered), (0, 3));
    let after = pending(&outbox);
    assert_eq!(after.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1001, 1002, 1003]);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(EventEnvelope { seq: a.seq, ..b.clone() }, *a, "only seq changes");
    }
    let s = outbox.stats();
    assert_eq!((s.produced_total, s.acked, s.pending_events), (1003, 1000, 3));
    assert_eq!(s.pending_bytes, after.iter().map(body_len).sum::<u64>());
    assert_eq!(outbox.limbo_high(), 1000, "nothing of the new numbering was sent");

    // Persisted, and the next append continues after the renumbered rows.
    drop(outbox);
    let outbox = Outbox::open(cfg).expect("reopen");
    assert_eq!(outbox.limbo_high(), 1000);
    assert_eq!(outbox.append(&small_events(1), 101).expect("append").first_seq, 1004);
    let out = outbox.ack(1002).expect("ack 1002");
    assert_eq!((out.deleted, out.renumbered), (2, 0));
    assert_eq!(seqs(&outbox), vec![1003, 1004]);

    // An empty outbox renumbers nothing but still moves next_seq.
    outbox.ack(1004).expect("ack all");
    let out = outbox.ack(5000).expect("ack 5000");
    assert_eq!((out.deleted, out.renumbered), (0, 0));
    assert_eq!(outbox.append(&small_events(1), 102).expect("append").first_seq, 5001);
    outbox.integrity_check().expect("integrity");
}

#[test]
fn absurd_ack_is_refused_without_changing_anything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Outbox::open(config(dir.path(), 1 << 30, 10)).expect("open");
    outbox.append(&small_events(2), 1).expect("append");
    let before = outbox.stats();
    for bad in [u64::MAX, i64::MAX as u64] {
        assert!(matches!(outbox.ack(bad), Err(OutboxError::SeqOutOfRange(_))), "ack {bad}");
    }
    assert_eq!(outbox.stats(), before);
    assert_eq!(seqs(&outbox), vec![1, 2]);
    assert!(outbox.read_after(u64::MAX, 10).expect("read").is_empty());
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), 1 << 30, 10);
    {
        let conn = rusqlite::Connection::open(&cfg.path).expect("sqlite");
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).expect("user_version");
    }
    match Outbox::open(cfg) {
        Err(e @ OutboxError::SchemaTooNew { found, supported }) => {
            assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
            assert!(e.to_string().contains("newer than this agent supports"), "{e}");
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

#[test]
fn limbo_rows_are_never_evicted_until_welcome() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), 400, 0);
    let outbox = Outbox::open(cfg.clone()).expect("open");
    outbox.append(&small_events(5), 1).expect("append");
    let sent = outbox.read_for_send(0, 3).expect("read_for_send");
    assert_eq!(sent.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(outbox.limbo_high(), 3);

    // Fill far beyond max_bytes: 1..=3 stay, everything else above them goes oldest first.
    for round in 0..20 {
        outbox.append(&small_events(5), 2 + round).expect("append");
    }
    let present = seqs(&outbox);
    assert_eq!(&present[..3], &[1, 2, 3]);
    assert!(outbox.stats().pending_bytes <= 400);
    assert!(present[3] > 4, "the oldest unsent rows went first: {present:?}");

    // After a restart the reservation still protects them (reserve_ahead 0: exactly up to 3).
    drop(outbox);
    let outbox = Outbox::open(cfg).expect("reopen");
    assert_eq!(outbox.limbo_high(), 3);
    outbox.append(&small_events(5), 30).expect("append");
    assert_eq!(&seqs(&outbox)[..3], &[1, 2, 3]);

    // The aggregator's welcome says it holds nothing: they may go now.
    outbox.welcome(0);
    outbox.append(&small_events(5), 31).expect("append");
    assert!(!seqs(&outbox).contains(&1));
    outbox.integrity_check().expect("integrity");
}

#[test]
fn limbo_alone_over_max_bytes_is_kept_and_a_huge_event_is_evicted_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let big = config(dir.path(), 1 << 30, 0);
    let outbox = Outbox::open(big.clone()).expect("open");
    outbox.append(&[event(0, 300, 1)], 1).expect("append");
    outbox.mark_sending(1).expect("mark");
    drop(outbox);

    // Reopened with a limit smaller than the row that may be at the aggregator already.
    let outbox = Outbox::open(OutboxConfig { max_bytes: 100, ..big }).expect("reopen");
    assert_eq!(outbox.limbo_high(), 1);
    let out = outbox.append(&[event(1, 10, 2)], 2).expect("append");
    assert_eq!(out.evicted, 1, "the small new event goes, the big limbo row stays");
    assert_eq!(seqs(&outbox), vec![1]);
    assert!(outbox.stats().pending_bytes > 100);

    // Larger than max_bytes and not in limbo: accepted, then evicted in the same transaction.
    let out = outbox.append(&[event(2, 300, 3)], 3).expect("append");
    assert_eq!((out.first_seq, out.last_seq, out.evicted), (3, 3, 1));
    let s = outbox.stats();
    assert_eq!((s.produced_total, s.pending_events, s.evicted_total), (3, 1, 2));
    let kinds: Vec<(&str, u64)> = s.evicted_by_kind.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(kinds, vec![("counts", 1), ("zone_enter", 1)]);
}

#[test]
fn counters_persist_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), 200, 50);
    let outbox = Outbox::open(cfg.clone()).expect("open");
    for round in 0..10 {
        outbox.append(&small_events(4), round).expect("append");
    }
    let first_pending = seqs(&outbox)[0];
    outbox.ack(first_pending + 1).expect("ack");
    outbox.mark_sending(first_pending + 2).expect("mark");
    let before = outbox.stats();
    assert!(before.evicted_total > 0);
    assert_eq!(before.evicted_total, before.evicted_by_kind.values().sum::<u64>());
    assert_eq!(before.evicted_by_kind.len(), 4, "{:?}", before.evicted_by_kind);
    drop(outbox);
    let outbox = Outbox::open(cfg.clone()).expect("reopen");
    assert_eq!(outbox.stats(), before);
    assert_eq!(outbox.limbo_high(), first_pending + 2 + 50, "sent_reserved with reserve_ahead");
    assert_eq!(read_stats(&cfg.path).expect("read_stats"), before);
}

#[test]
fn age_eviction_with_a_clock_going_backwards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Outbox::open(config(dir.path(), 1 << 30, 0)).expect("open");
    outbox.append(&small_events(2), 10_000).expect("append");
    // The clock steps back an hour: the new rows are stamped no older than the previous ones.
    outbox.append(&small_events(2), 10_000 - 3_600_000).expect("append");
    assert_eq!(outbox.stats().oldest_committed_ms, Some(10_000));
    assert_eq!(outbox.evict_expired(10_999).expect("evict"), 0);
    outbox.mark_sending(1).expect("mark");
    assert_eq!(outbox.evict_expired(11_001).expect("evict"), 3, "all but the limbo row");
    assert_eq!(seqs(&outbox), vec![1]);
    outbox.append(&small_events(1), 20_000).expect("append");
    let s = outbox.stats();
    assert_eq!((s.oldest_committed_ms, s.evicted_total), (Some(10_000), 3));
}

/// Appends that evict run concurrently with `read_for_send`: nothing read for sending is evicted.
#[test]
fn read_for_send_is_atomic_against_concurrent_eviction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Arc::new(Outbox::open(config(dir.path(), 2_000, 0)).expect("open"));
    let writer = {
        let ob = outbox.clone();
        std::thread::spawn(move || {
            for round in 0..150 {
                ob.append(&small_events(5), round).expect("append");
            }
        })
    };
    let mut sent = BTreeSet::new();
    let mut after = 0;
    while !writer.is_finished() {
        let batch = outbox.read_for_send(after, 7).expect("read_for_send");
        if let Some(last) = batch.last() {
            after = last.seq;
        }
        sent.extend(batch.iter().map(|e| e.seq));
    }
    writer.join().expect("writer thread");
    let present: BTreeSet<u64> = seqs(&outbox).into_iter().collect();
    assert!(outbox.stats().evicted_total > 0, "the test must evict");
    assert!(!sent.is_empty());
    let lost: Vec<&u64> = sent.difference(&present).collect();
    assert!(lost.is_empty(), "sent rows evicted: {lost:?}");
}

/// A batch read for sending always fits in one wire frame: bodies past the first are bounded by
/// `MAX_BATCH_BYTES`, and what is left comes with the next read.
#[test]
fn read_for_send_bounds_a_batch_by_bytes() {
    use its_shared::wire::{EventBatch, Frame, MAX_BATCH_BYTES, MAX_FRAME_LEN, encode};
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Outbox::open(config(dir.path(), 64 * 1024 * 1024, 16)).expect("open");
    let big = |n| {
        let mut e = event(1, 1, n);
        e.kind = EventKind::ZoneEnter { zone: "z".repeat(MAX_BATCH_BYTES / 3), object: object(n) };
        e
    };
    outbox.append(&[big(1), big(2), big(3), big(4)], 1_000).expect("append");
    let first = outbox.read_for_send(0, 100).expect("read");
    // Each body is a little over a third of the budget: two fit, a third would not.
    assert_eq!(first.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    let frame = encode(&Frame::EventBatch(EventBatch { after: 0, events: first })).expect("fits in a frame");
    assert!(frame.len() <= MAX_FRAME_LEN);
    let rest = outbox.read_for_send(2, 100).expect("read");
    assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4]);
    // The byte bound does not apply to plain reads.
    assert_eq!(outbox.read_after(0, 100).expect("read").len(), 4);
}
