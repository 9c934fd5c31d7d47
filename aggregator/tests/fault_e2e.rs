//! The ack chain under faults, with the real programs: an aggregator process and an agent
//! process with its synthetic source, joined through a UDP relay that can cut the link.
//! During the run both processes are killed with SIGKILL several times and the link is cut long
//! enough for the outbox to fill and evict. Afterwards:
//! - every stored event is stored once (no duplicate (device, seq));
//! - nothing is stored that was never produced (every stored seq <= the outbox's last assigned);
//! - the counters add up: produced = stored + evicted (the outbox is empty at the end);
//! - eviction really happened, and was counted.
//!
//! Runs against SQLite and against the machine's PostgreSQL.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Proc, UdpRelay, agent_bin, aggregator_bin, wait_ready};
use its_aggregator::pki::Pki;
use its_aggregator::store::open_store;

const DEVICE: &str = "fault-box";
/// Events the synthetic source produces in total (across agent restarts).
const LIMIT: u64 = 40_000;

struct Env {
    root: PathBuf,
    database_url: String,
    quic_port: u16,
    log: PathBuf,
}

impl Env {
    fn start_aggregator(&mut self) -> Proc {
        let ready = self.root.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Command::new(aggregator_bin());
        cmd.arg("serve")
            .arg("--ready-file")
            .arg(&ready)
            .env("ITS_AGGREGATOR__DATABASE_URL", &self.database_url)
            .env("ITS_AGGREGATOR__PKI_DIR", self.root.join("pki"))
            .env("ITS_AGGREGATOR__QUIC__LISTEN", format!("127.0.0.1:{}", self.quic_port))
            .env("ITS_AGGREGATOR__QUIC__IDLE_TIMEOUT_MS", "3000")
            .env("ITS_AGGREGATOR__HTTP__LISTEN", "127.0.0.1:0")
            // The embedded MQTT broker on any free port (its default may be taken).
            .env("ITS_AGGREGATOR__MQTT__LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "info");
        let p = Proc::spawn("aggregator", cmd, &self.log);
        // After a kill -9 the port is free at once (UDP); retry a few times anyway.
        let addrs = wait_ready(&ready, &self.log);
        self.quic_port = addrs.quic.port();
        p
    }

    fn start_agent(&self, relay: &UdpRelay) -> Proc {
        self.start_agent_with(relay, &[])
    }

    /// The agent with extra environment overrides (later ones win).
    fn start_agent_with(&self, relay: &UdpRelay, extra: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("run")
            .env("ITS_AGENT__DEVICE_BUNDLE", self.root.join("bundle"))
            .env("ITS_AGENT__UPLINK__AGGREGATOR", relay.addr.to_string())
            .env("ITS_AGENT__UPLINK__JITTER", "false")
            .env("ITS_AGENT__UPLINK__BACKOFF_BASE_MS", "50")
            .env("ITS_AGENT__UPLINK__BACKOFF_CAP_MS", "400")
            .env("ITS_AGENT__UPLINK__IDLE_TIMEOUT_MS", "2000")
            .env("ITS_AGENT__UPLINK__KEEP_ALIVE_MS", "300")
            .env("ITS_AGENT__UPLINK__ACK_TIMEOUT_MS", "2000")
            .env("ITS_AGENT__UPLINK__MAX_BATCH_EVENTS", "500")
            .env("ITS_AGENT__UPLINK__HEARTBEAT_INTERVAL_S", "1")
            .env("ITS_AGENT__OUTBOX__PATH", self.outbox())
            // 1 MiB is ~9,000 events here: a link cut of a few seconds at 2,500 events/s fills it.
            .env("ITS_AGENT__OUTBOX__MAX_BYTES", (1024 * 1024).to_string())
            .env("ITS_AGENT__OUTBOX__RESERVE_AHEAD", "1000")
            .env("ITS_AGENT__SYNTHETIC__ENABLED", "true")
            .env("ITS_AGENT__SYNTHETIC__RATE_PER_S", "2500")
            .env("ITS_AGENT__SYNTHETIC__LIMIT", LIMIT.to_string())
            .env("ITS_AGENT__SYNTHETIC__CAMERAS", "[\"cam-a\", \"cam-b\"]")
            .env("ITS_AGENT__HEALTH__INTERVAL_S", "2")
            .env("RUST_LOG", "info");
        cmd.envs(extra.iter().copied());
        Proc::spawn("agent", cmd, &self.log)
    }

    fn outbox(&self) -> PathBuf {
        self.root.join("outbox.db")
    }
}

fn outbox_stats(path: &Path) -> its_agent::buffer::OutboxStats {
    its_agent::buffer::read_stats(path).expect("outbox readable")
}

fn sleep(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

async fn run_fault_scenario(database_url: String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let pki = Pki::new(root.join("pki"));
    pki.init(&[]).expect("pki init");
    pki.enroll(DEVICE, &root.join("bundle"), 30).expect("enroll");
    let log = root.join("processes.log");
    let mut env = Env { root: root.clone(), database_url: database_url.clone(), quic_port: 0, log: log.clone() };

    let mut aggregator = env.start_aggregator();
    let relay = UdpRelay::start(format!("127.0.0.1:{}", env.quic_port).parse().expect("addr")).await;
    let mut agent = env.start_agent(&relay);

    let (mut agent_kills, mut aggregator_kills) = (0, 0);
    let plan: &[(&str, u64)] = &[
        ("run", 1500),
        ("kill-agent", 700),
        ("kill-aggregator", 1200),
        ("run", 1000),
        ("cut-link", 6000),
        ("heal-link", 1500),
        ("kill-agent", 300),
        ("kill-aggregator", 800),
        ("kill-agent", 500),
        ("kill-aggregator", 300),
        ("run", 1000),
    ];
    tokio::task::block_in_place(|| {
        for (step, ms) in plan {
            match *step {
                "kill-agent" => {
                    agent.kill9();
                    agent_kills += 1;
                    sleep(*ms);
                    agent = env.start_agent(&relay);
                }
                "kill-aggregator" => {
                    aggregator.kill9();
                    aggregator_kills += 1;
                    sleep(*ms);
                    aggregator = env.start_aggregator();
                }
                "cut-link" => {
                    relay.set_cut(true);
                    sleep(*ms);
                }
                "heal-link" => {
                    relay.set_cut(false);
                    sleep(*ms);
                }
                _ => sleep(*ms),
            }
        }
        // Let the source reach its limit and the outbox drain.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = outbox_stats(&env.outbox());
            if s.produced_total >= LIMIT && s.pending_events == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "did not drain: {s:?}\nlog tail:\n{}", tail(&log));
            sleep(200);
        }
        agent.terminate();
        // A health report committed between the check above and the stop is durable but unsent:
        // a last run without health reports delivers it, so the outbox ends empty.
        if outbox_stats(&env.outbox()).pending_events > 0 {
            let mut last = env.start_agent_with(&relay, &[("ITS_AGENT__HEALTH__INTERVAL_S", "3600")]);
            let deadline = Instant::now() + Duration::from_secs(30);
            while outbox_stats(&env.outbox()).pending_events > 0 {
                assert!(Instant::now() < deadline, "the last events did not drain\nlog tail:\n{}", tail(&log));
                sleep(100);
            }
            last.terminate();
        }
        aggregator.terminate();
    });

    let stats = outbox_stats(&env.outbox());
    let store = open_store(&database_url, its_aggregator::vault::Vault::ephemeral()).await.expect("open store");
    let summary = store.device_event_summary(DEVICE).await.expect("summary");
    let seqs = store.device_seqs(DEVICE).await.expect("seqs");
    println!(
        "agent kills {agent_kills}, aggregator kills {aggregator_kills}; produced {} stored {} evicted {} ({:?})",
        stats.produced_total, summary.total, stats.evicted_total, stats.evicted_by_kind
    );
    assert_eq!(summary.total, summary.distinct_seqs, "an event is stored twice");
    assert_eq!(seqs.len() as u64, summary.total);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert!(seqs.iter().all(|&s| s >= 1 && s <= stats.produced_total), "a stored seq was never produced");
    assert_eq!(stats.pending_events, 0);
    assert!(stats.evicted_total > 0, "the link cut should have filled the outbox and evicted");
    assert_eq!(
        stats.produced_total,
        summary.total + stats.evicted_total,
        "produced = stored + evicted must hold exactly"
    );
    // Evicted snapshots are counted under their own key, not in evicted_total (none here).
    let events_evicted: u64 =
        stats.evicted_by_kind.iter().filter(|(k, _)| *k != its_agent::buffer::SNAPSHOT_KIND).map(|(_, n)| n).sum();
    assert_eq!(events_evicted, stats.evicted_total);
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_and_link_cuts_lose_nothing_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("agg.db").display());
    run_fault_scenario(url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_and_link_cuts_lose_nothing_postgres() {
    let db = common::PgDatabase::create("its_fault").await;
    run_fault_scenario(db.url.clone()).await;
    db.drop_db().await;
}
