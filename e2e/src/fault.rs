//! What the fault scenarios share (`fault_e2e` over QUIC, `mqtt_uplink` through a broker): an
//! agent process with its synthetic source tuned to fill a small outbox during an outage, a plan
//! of faults run step by step, the drain at the end and the loss-free check.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use its_agent::buffer::OutboxStats;
use its_aggregator::store::{EventSummary, open_store};
use its_testkit::server::{Proc, agent_bin, aggregator_bin};

/// The aggregator process of a fault scenario: `serve` on the database at `database_url` with its
/// fleet CA in `root/pki`, HTTP on a port the system picks, writing its bound addresses to the
/// ready file `root/ready.json` (removed first; wait for it with `its_testkit::server::wait_ready`).
/// The caller adds the ingest's own settings (QUIC address, MQTT).
pub fn aggregator(root: &Path, database_url: &str) -> Command {
    let ready = root.join("ready.json");
    let _ = std::fs::remove_file(&ready);
    let mut cmd = Command::new(aggregator_bin());
    cmd.arg("serve")
        .arg("--ready-file")
        .arg(&ready)
        .env("ITS_AGGREGATOR__DATABASE_URL", database_url)
        .env("ITS_AGGREGATOR__PKI_DIR", root.join("pki"))
        .env("ITS_AGGREGATOR__HTTP__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info");
    cmd
}

/// The agent process of a fault scenario: the synthetic source on two cameras at 2,500 events/s up
/// to `limit` events in all (across restarts), a 1 MiB outbox at `outbox` (some 9,000 events: an
/// outage of a few seconds fills it, so eviction happens), short backoff and acknowledgement
/// timeouts, batches of 500, a heartbeat every second and a health report every 2 s. The caller
/// adds the uplink's own settings (transport, address, identity).
pub fn synthetic_agent(outbox: &Path, limit: u64) -> Command {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("run")
        .env("ITS_AGENT__UPLINK__JITTER", "false")
        .env("ITS_AGENT__UPLINK__BACKOFF_BASE_MS", "50")
        .env("ITS_AGENT__UPLINK__BACKOFF_CAP_MS", "400")
        .env("ITS_AGENT__UPLINK__ACK_TIMEOUT_MS", "2000")
        .env("ITS_AGENT__UPLINK__MAX_BATCH_EVENTS", "500")
        .env("ITS_AGENT__UPLINK__HEARTBEAT_INTERVAL_S", "1")
        .env("ITS_AGENT__OUTBOX__PATH", outbox)
        .env("ITS_AGENT__OUTBOX__MAX_BYTES", (1024 * 1024).to_string())
        .env("ITS_AGENT__OUTBOX__RESERVE_AHEAD", "1000")
        .env("ITS_AGENT__SYNTHETIC__ENABLED", "true")
        .env("ITS_AGENT__SYNTHETIC__RATE_PER_S", "2500")
        .env("ITS_AGENT__SYNTHETIC__LIMIT", limit.to_string())
        .env("ITS_AGENT__SYNTHETIC__CAMERAS", "[\"cam-a\", \"cam-b\"]")
        .env("ITS_AGENT__HEALTH__INTERVAL_S", "2")
        .env("RUST_LOG", "info");
    cmd
}

/// The counters of the outbox at `path`, read from another process's database.
pub fn outbox_stats(path: &Path) -> OutboxStats {
    its_agent::buffer::read_stats(path).expect("outbox readable")
}

pub fn sleep(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// The last 40 lines of a log file (for failure messages).
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The processes of a fault scenario, as [`run_plan`] drives them.
pub trait Scenario {
    /// Starts an agent (after a kill).
    fn start_agent(&mut self) -> Proc;
    /// Starts an aggregator (after a kill), returning once it is ready.
    fn start_aggregator(&mut self) -> Proc;
    /// Does a step of this scenario's own (a link cut, a broker outage), then lets `ms` pass.
    fn step(&mut self, step: &str, ms: u64);
}

/// How many times [`run_plan`] killed each program.
#[derive(Debug, Default, Clone, Copy)]
pub struct Kills {
    pub agent: u32,
    pub aggregator: u32,
}

/// Runs a plan of `(step, ms)` on the running `agent` and `aggregator`: `"run"` lets `ms` pass;
/// `"kill-agent"` and `"kill-aggregator"` kill the program with SIGKILL, wait `ms` and start it
/// again; any other step is the scenario's own ([`Scenario::step`]).
pub fn run_plan(s: &mut impl Scenario, plan: &[(&str, u64)], agent: &mut Proc, aggregator: &mut Proc) -> Kills {
    let mut kills = Kills::default();
    for &(step, ms) in plan {
        match step {
            "run" => sleep(ms),
            "kill-agent" => {
                agent.kill9();
                kills.agent += 1;
                sleep(ms);
                *agent = s.start_agent();
            }
            "kill-aggregator" => {
                aggregator.kill9();
                kills.aggregator += 1;
                sleep(ms);
                *aggregator = s.start_aggregator();
            }
            other => s.step(other, ms),
        }
    }
    kills
}

/// The end of a scenario: waits (up to 2 min) until the source has produced `limit` events and the
/// outbox at `outbox` is empty, stops `agent`; a health report committed between that check and
/// the stop is durable but unsent, so a last agent from `quiet_agent` (started with health reports
/// off) delivers it and the outbox ends empty.
pub fn drain(outbox: &Path, limit: u64, log: &Path, mut agent: Proc, quiet_agent: impl FnOnce() -> Proc) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = outbox_stats(outbox);
        if s.produced_total >= limit && s.pending_events == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "did not drain: {s:?}\nlog tail:\n{}", tail(log));
        sleep(200);
    }
    agent.terminate();
    if outbox_stats(outbox).pending_events > 0 {
        let mut last = quiet_agent();
        let deadline = Instant::now() + Duration::from_secs(30);
        while outbox_stats(outbox).pending_events > 0 {
            assert!(Instant::now() < deadline, "the last events did not drain\nlog tail:\n{}", tail(log));
            sleep(100);
        }
        last.terminate();
    }
}

/// Checks the outcome of a scenario against the database at `database_url`: events of `device`
/// arrived (else the end of `log` is shown), every one is stored once, nothing is stored that was never produced, the outbox is empty, it did
/// evict (`outage` says what should have made it), and produced = stored + evicted exactly.
/// Returns the outbox's counters and the stored summary, for the scenario's report.
pub async fn assert_lossless(
    database_url: &str,
    device: &str,
    outbox: &Path,
    log: &Path,
    outage: &str,
) -> (OutboxStats, EventSummary) {
    let stats = outbox_stats(outbox);
    let store = open_store(database_url, its_aggregator::vault::Vault::ephemeral()).await.expect("open store");
    let summary = store.device_event_summary(device).await.expect("summary");
    let seqs = store.device_seqs(device).await.expect("seqs");
    assert!(summary.total > 0, "nothing arrived\nlog tail:\n{}", tail(log));
    assert_eq!(summary.total, summary.distinct_seqs, "an event is stored twice");
    assert_eq!(seqs.len() as u64, summary.total);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert!(seqs.iter().all(|&s| s >= 1 && s <= stats.produced_total), "a stored seq was never produced");
    assert_eq!(stats.pending_events, 0);
    assert!(stats.evicted_total > 0, "{outage} should have filled the outbox and evicted: {stats:?}");
    assert_eq!(
        stats.produced_total,
        summary.total + stats.evicted_total,
        "produced = stored + evicted must hold exactly"
    );
    // Evicted snapshots are counted under their own key, not in evicted_total (none here).
    let events_evicted: u64 =
        stats.evicted_by_kind.iter().filter(|(k, _)| *k != its_agent::buffer::SNAPSHOT_KIND).map(|(_, n)| n).sum();
    assert_eq!(events_evicted, stats.evicted_total);
    (stats, summary)
}
