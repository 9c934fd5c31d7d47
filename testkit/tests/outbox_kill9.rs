//! kill -9 at random points: every append that returned survives, the database is intact, and
//! sequence numbers have no gaps.
//!
//! The child is this crate's `outbox-writer` binary (the agent's outbox, appending batches in a
//! loop and printing `committed <first> <last>` after each append returned).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use its_agent::buffer::{Outbox, OutboxConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ROUNDS: usize = 25;

/// Runs one child for `delay`, kills it with SIGKILL, and returns the highest seq it reported.
fn one_round(path: &Path, batch: usize, delay: Duration) -> Option<u64> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-writer"))
        .arg("--path")
        .arg(path)
        .args(["--batch", &batch.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn outbox-writer");
    let stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut ranges = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                // A line cut by the kill has no newline: that append may not have returned.
                Ok(_) if !line.ends_with('\n') => break,
                Ok(_) => {
                    let mut parts = line.split_whitespace();
                    assert_eq!(parts.next(), Some("committed"), "unexpected line {line:?}");
                    let first: u64 = parts.next().and_then(|v| v.parse().ok()).expect("first seq");
                    let last: u64 = parts.next().and_then(|v| v.parse().ok()).expect("last seq");
                    ranges.push((first, last));
                }
            }
        }
        ranges
    });
    std::thread::sleep(delay);
    // std's Child::kill is SIGKILL on Unix.
    child.kill().expect("kill");
    let status = child.wait().expect("wait");
    assert!(!status.success(), "the writer must have been killed, not exited: {status}");
    let ranges = reader.join().expect("reader thread");
    for w in ranges.windows(2) {
        assert_eq!(w[1].0, w[0].1 + 1, "reported ranges are consecutive");
    }
    ranges.last().map(|r| r.1)
}

#[test]
fn killed_writer_loses_nothing_that_was_reported() {
    let seed: u64 =
        std::env::var("OUTBOX_KILL9_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    eprintln!("OUTBOX_KILL9_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox.db");
    let started = Instant::now();
    let mut reported_max = 0u64;
    let mut reporting_rounds = 0;

    for round in 0..ROUNDS {
        let delay = Duration::from_millis(rng.random_range(20..=300));
        let batch = rng.random_range(1..=200);
        if let Some(last) = one_round(&path, batch, delay) {
            assert!(last > reported_max, "round {round}: seqs continue after the previous round");
            reported_max = last;
            reporting_rounds += 1;
        }

        let outbox = Outbox::open(OutboxConfig::new(&path)).expect("open after kill");
        outbox.integrity_check().expect("integrity after kill");
        let stats = outbox.stats();
        let seqs: Vec<u64> = outbox.read_after(0, usize::MAX).expect("read all").iter().map(|e| e.seq).collect();
        // Nothing was acked or evicted: the rows are exactly 1..=produced_total.
        assert_eq!(stats.acked, 0);
        assert_eq!(stats.evicted_total, 0);
        assert_eq!(seqs.len() as u64, stats.produced_total, "round {round}: rows and next_seq agree");
        assert!(seqs.iter().copied().eq(1..=stats.produced_total), "round {round}: no gaps");
        assert!(
            stats.produced_total >= reported_max,
            "round {round}: reported up to {reported_max}, only {} survived",
            stats.produced_total
        );
        // The parent may have committed nothing itself; the next child continues from here.
        reported_max = reported_max.max(stats.produced_total);
    }
    assert!(reporting_rounds >= ROUNDS / 2, "too few rounds reported commits ({reporting_rounds}) to mean anything");
    eprintln!("{ROUNDS} kills, {reported_max} events, {:?}", started.elapsed());
}
