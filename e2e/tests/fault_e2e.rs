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

use its_testkit::server as common;

use std::path::PathBuf;

use common::{Proc, UdpRelay, wait_ready};
use its_aggregator::pki::Pki;
use its_e2e::fault::{Scenario, aggregator, assert_lossless, drain, run_plan, sleep, synthetic_agent};

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
        let mut cmd = aggregator(&self.root, &self.database_url);
        cmd.env("ITS_AGGREGATOR__QUIC__LISTEN", format!("127.0.0.1:{}", self.quic_port))
            .env("ITS_AGGREGATOR__QUIC__IDLE_TIMEOUT_MS", "3000")
            // The embedded MQTT broker on any free port (its default may be taken).
            .env("ITS_AGGREGATOR__MQTT__LISTEN", "127.0.0.1:0");
        let p = Proc::spawn("aggregator", cmd, &self.log);
        // After a kill -9 the port is free at once (UDP); retry a few times anyway.
        let addrs = wait_ready(&self.root.join("ready.json"), &self.log);
        self.quic_port = addrs.quic.port();
        p
    }

    fn start_agent(&self, relay: &UdpRelay) -> Proc {
        self.start_agent_with(relay, &[])
    }

    /// The agent with extra environment overrides (later ones win).
    fn start_agent_with(&self, relay: &UdpRelay, extra: &[(&str, &str)]) -> Proc {
        let mut cmd = synthetic_agent(&self.outbox(), LIMIT);
        cmd.env("ITS_AGENT__DEVICE_BUNDLE", self.root.join("bundle"))
            .env("ITS_AGENT__UPLINK__AGGREGATOR", relay.addr.to_string())
            .env("ITS_AGENT__UPLINK__IDLE_TIMEOUT_MS", "2000")
            .env("ITS_AGENT__UPLINK__KEEP_ALIVE_MS", "300");
        cmd.envs(extra.iter().copied());
        Proc::spawn("agent", cmd, &self.log)
    }

    fn outbox(&self) -> PathBuf {
        self.root.join("outbox.db")
    }
}

/// The QUIC scenario: the agent reaches the aggregator through a relay that can cut the link.
struct Quic<'a> {
    env: &'a mut Env,
    relay: &'a UdpRelay,
}

impl Scenario for Quic<'_> {
    fn start_agent(&mut self) -> Proc {
        self.env.start_agent(self.relay)
    }

    fn start_aggregator(&mut self) -> Proc {
        self.env.start_aggregator()
    }

    fn step(&mut self, step: &str, ms: u64) {
        match step {
            "cut-link" => self.relay.set_cut(true),
            "heal-link" => self.relay.set_cut(false),
            other => panic!("unknown step {other}"),
        }
        sleep(ms);
    }
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
    let kills = tokio::task::block_in_place(|| {
        let kills = run_plan(&mut Quic { env: &mut env, relay: &relay }, plan, &mut agent, &mut aggregator);
        // Let the source reach its limit and the outbox drain.
        drain(&env.outbox(), LIMIT, &log, agent, || {
            env.start_agent_with(&relay, &[("ITS_AGENT__HEALTH__INTERVAL_S", "3600")])
        });
        aggregator.terminate();
        kills
    });

    let (stats, summary) = assert_lossless(&database_url, DEVICE, &env.outbox(), &log, "the link cut").await;
    println!(
        "agent kills {}, aggregator kills {}; produced {} stored {} evicted {} ({:?})",
        kills.agent, kills.aggregator, stats.produced_total, summary.total, stats.evicted_total, stats.evicted_by_kind
    );
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
