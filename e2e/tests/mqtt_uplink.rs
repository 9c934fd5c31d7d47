//! The MQTT uplink with the real programs and a real broker: a private Mosquitto (password file
//! and ACL tying each device to `its/uplink/{device}/...`), an aggregator process running the
//! bridge, and an agent process with `transport = "mqtt"` and its synthetic source.
//!
//! - Faults: the agent and the aggregator are killed with SIGKILL several times during traffic,
//!   and the broker is killed and restarted after a cut long enough for the outbox to fill and
//!   evict. Afterwards the ack-chain invariants hold exactly as over QUIC (`fault_e2e.rs`): no
//!   duplicate (device, seq), nothing stored that was never produced, and produced = stored +
//!   evicted once the outbox drained. SQLite and PostgreSQL.
//! - Hostile clients, driven by hand: a device cannot publish into another device's topic nor
//!   read its acknowledgements (the broker's ACL), malformed messages and protocol errors are
//!   dropped or end only that device's session, duplicate and out-of-order batches are handled,
//!   and after an aggregator restart a frame without session is refused so that the agent sends a
//!   new `Hello`, which is welcomed with what storage holds.

use its_testkit::server as common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Proc, wait_ready};
use its_aggregator::mqtt::uplink::{decode_message, encode_message};
use its_aggregator::pki::Pki;
use its_aggregator::store::open_store;
use its_e2e::fault::{
    Scenario, aggregator, assert_lossless, drain, outbox_stats, run_plan, sleep, synthetic_agent, tail,
};
use its_shared::event::{EventEnvelope, EventKind, ObjectRef};
use its_shared::wire::{self, Ack, EventBatch, Frame, Hello};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const MOSQUITTO_PASSWD: &str = "/usr/bin/mosquitto_passwd";
const AGGREGATOR_USER: (&str, &str) = ("its-aggregator", "aggregator-secret");
const DEVICE: &str = "fault-box";
const DEVICE_PASSWORD: &str = "fault-box-secret";
/// Events the synthetic source produces in total (across agent restarts).
const LIMIT: u64 = 40_000;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A private Mosquitto on a free port: password file, ACL, no persistence.
struct Mosquitto {
    conf: PathBuf,
    port: u16,
    log: PathBuf,
    proc: Option<Proc>,
    tls: bool,
}

impl Mosquitto {
    /// `users`: (name, password); the aggregator's user is added.
    fn new(dir: &Path, users: &[(&str, &str)], log: &Path) -> Self {
        Self::with_tls(dir, users, log, None)
    }

    /// With `tls` (the `pki init` directory), the listener is TLS with the aggregator's server
    /// certificate (names `localhost` and `127.0.0.1`, issued by the fleet CA).
    fn with_tls(dir: &Path, users: &[(&str, &str)], log: &Path, tls: Option<&Pki>) -> Self {
        assert!(Path::new(MOSQUITTO).is_file(), "{MOSQUITTO} missing: run scripts/setup-test-peers");
        std::fs::create_dir_all(dir).expect("broker dir");
        let passwd = dir.join("passwd");
        let mut first = true;
        for (user, password) in std::iter::once(&AGGREGATOR_USER).chain(users) {
            let mut cmd = Command::new(MOSQUITTO_PASSWD);
            if first {
                cmd.arg("-c");
            }
            first = false;
            let status = cmd.arg("-b").arg(&passwd).arg(user).arg(password).status().expect("mosquitto_passwd");
            assert!(status.success(), "mosquitto_passwd failed");
        }
        let acl = dir.join("acl");
        // The aggregator's bridge reads every device's up topic and writes every down topic; a
        // device (its username) writes only its up topic and reads only its down topic.
        std::fs::write(
            &acl,
            format!(
                "user {}\ntopic readwrite its/uplink/#\n\npattern write its/uplink/%u/up\npattern read its/uplink/%u/down\n",
                AGGREGATOR_USER.0
            ),
        )
        .expect("acl");
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        let tls_lines = tls.map_or(String::new(), |pki| {
            format!(
                "certfile {}\nkeyfile {}\n",
                pki.server_cert_path().display(),
                pki.dir().join("server.key").display()
            )
        });
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n{tls_lines}allow_anonymous false\npassword_file {}\nacl_file {}\npersistence false\nuser root\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n",
                passwd.display(),
                acl.display()
            ),
        )
        .expect("conf");
        Self { conf, port, log: log.to_path_buf(), proc: None, tls: tls.is_some() }
    }

    fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", if self.tls { "mqtts" } else { "mqtt" }, self.port)
    }

    fn start(&mut self) {
        let mut cmd = Command::new(MOSQUITTO);
        cmd.arg("-c").arg(&self.conf);
        self.proc = Some(Proc::spawn("mosquitto", cmd, &self.log));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not listen; log:\n{}", tail(&self.log));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }
}

struct Env {
    root: PathBuf,
    database_url: String,
    broker_url: String,
    log: PathBuf,
    /// Extra settings of the aggregator.
    aggregator_env: Vec<(String, String)>,
}

/// The aggregator's PKI (its CA and server certificate), created once per test directory.
fn pki(root: &Path) -> Pki {
    let pki = Pki::new(root.join("pki"));
    if !pki.is_initialised() {
        pki.init(&[]).expect("pki init");
    }
    pki
}

impl Env {
    fn new(root: &Path, database_url: &str, broker: &Mosquitto) -> Self {
        pki(root);
        Self {
            root: root.to_path_buf(),
            database_url: database_url.to_owned(),
            broker_url: broker.url(),
            log: root.join("processes.log"),
            aggregator_env: Vec::new(),
        }
    }

    fn start_aggregator(&self) -> Proc {
        let mut cmd = aggregator(&self.root, &self.database_url);
        cmd.env("ITS_AGGREGATOR__QUIC__LISTEN", "127.0.0.1:0")
            .env("ITS_AGGREGATOR__MQTT__MODE", "off")
            .env("ITS_AGGREGATOR__MQTT__UPLINK__ENABLED", "true")
            .env("ITS_AGGREGATOR__MQTT__UPLINK__BROKER", &self.broker_url)
            .env("ITS_AGGREGATOR__MQTT__UPLINK__USERNAME", AGGREGATOR_USER.0)
            .env("ITS_AGGREGATOR__MQTT__UPLINK__PASSWORD", AGGREGATOR_USER.1)
            .env("ITS_AGGREGATOR__MQTT__UPLINK__KEEP_ALIVE_S", "2");
        cmd.envs(self.aggregator_env.iter().map(|(k, v)| (k, v)));
        let p = Proc::spawn("aggregator", cmd, &self.log);
        wait_ready(&self.root.join("ready.json"), &self.log);
        p
    }

    fn start_agent(&self) -> Proc {
        self.start_agent_with(&[])
    }

    /// The agent with extra environment overrides (later ones win).
    fn start_agent_with(&self, extra: &[(&str, &str)]) -> Proc {
        let mut cmd = synthetic_agent(&self.outbox(), LIMIT);
        cmd.env("ITS_AGENT__DEVICE_BUNDLE", self.root.join("no-bundle"))
            .env("ITS_AGENT__UPLINK__TRANSPORT", "mqtt")
            .env("ITS_AGENT__UPLINK__MQTT__BROKER", &self.broker_url)
            .env("ITS_AGENT__UPLINK__MQTT__USERNAME", DEVICE)
            .env("ITS_AGENT__UPLINK__MQTT__PASSWORD", DEVICE_PASSWORD)
            .env("ITS_AGENT__UPLINK__MQTT__KEEP_ALIVE_S", "2");
        cmd.envs(extra.iter().copied());
        Proc::spawn("agent", cmd, &self.log)
    }

    fn outbox(&self) -> PathBuf {
        self.root.join("outbox.db")
    }
}

/// The MQTT scenario: the agent and the aggregator meet at a broker that can be killed.
struct Mqtt<'a> {
    env: &'a Env,
    broker: &'a mut Mosquitto,
    broker_kills: u32,
}

impl Scenario for Mqtt<'_> {
    fn start_agent(&mut self) -> Proc {
        self.env.start_agent()
    }

    fn start_aggregator(&mut self) -> Proc {
        self.env.start_aggregator()
    }

    fn step(&mut self, step: &str, ms: u64) {
        match step {
            "kill-broker" => {
                self.broker.kill9();
                self.broker_kills += 1;
            }
            "restart-broker" => self.broker.start(),
            other => panic!("unknown step {other}"),
        }
        sleep(ms);
    }
}

async fn run_fault_scenario(database_url: String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let log = root.join("processes.log");
    let mut broker = Mosquitto::new(&root.join("broker"), &[(DEVICE, DEVICE_PASSWORD)], &log);
    broker.start();
    let env = Env::new(&root, &database_url, &broker);
    let mut aggregator = env.start_aggregator();
    let mut agent = env.start_agent();

    // Every aggregator kill comes after a run, so that it lands while batches are in flight.
    let plan: &[(&str, u64)] = &[
        ("run", 1500),
        ("kill-agent", 700),
        ("run", 1500),
        ("kill-aggregator", 1200),
        ("run", 1000),
        // At 2,500 events/s, 9 s is about 22,000 events: more than twice what the 1 MiB outbox holds.
        ("kill-broker", 9000),
        ("restart-broker", 1500),
        ("kill-agent", 300),
        ("run", 1200),
        ("kill-aggregator", 800),
        ("run", 1200),
        ("kill-aggregator", 300),
        ("kill-agent", 500),
        ("run", 1000),
    ];
    let (kills, broker_kills) = tokio::task::block_in_place(|| {
        let mut scenario = Mqtt { env: &env, broker: &mut broker, broker_kills: 0 };
        let kills = run_plan(&mut scenario, plan, &mut agent, &mut aggregator);
        let broker_kills = scenario.broker_kills;
        // Let the source reach its limit and the outbox drain.
        drain(&env.outbox(), LIMIT, &log, agent, || env.start_agent_with(&[("ITS_AGENT__HEALTH__INTERVAL_S", "3600")]));
        aggregator.terminate();
        broker.kill9();
        (kills, broker_kills)
    });

    let (stats, summary) = assert_lossless(&database_url, DEVICE, &env.outbox(), &log, "the broker outage").await;
    println!(
        "agent kills {}, aggregator kills {}, broker kills {broker_kills}; produced {} stored {} evicted {} ({:?})",
        kills.agent, kills.aggregator, stats.produced_total, summary.total, stats.evicted_total, stats.evicted_by_kind
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    println!(
        "agent sessions welcomed {}, refused for want of a session {}, broker losses seen by the agent {}",
        count("MQTT uplink session ready"),
        count("refused the session: no session"),
        count("MQTT uplink lost the broker"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_kill9_and_broker_outage_lose_nothing_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("agg.db").display());
    run_fault_scenario(url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_kill9_and_broker_outage_lose_nothing_postgres() {
    let db = common::PgDatabase::create("its_mqtt_uplink").await;
    run_fault_scenario(db.url.clone()).await;
    db.drop_db().await;
}

/// What a hand-driven MQTT client sees.
#[derive(Debug)]
enum Seen {
    Message(String, Vec<u8>),
    SubAck(bool),
}

/// An MQTT client driven by the test, playing a device (or an attacker).
struct Client {
    client: AsyncClient,
    seen: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    async fn connect(port: u16, user: &str, password: &str) -> Self {
        let mut opts = MqttOptions::new(format!("test-{user}"), "127.0.0.1", port);
        opts.set_credentials(user, password)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(wire::MAX_FRAME_LEN + 1024, wire::MAX_FRAME_LEN + 1024);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (tx, seen) = mpsc::unbounded_channel();
        let (connected_tx, connected) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut connected_tx = Some(connected_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(c) = connected_tx.take() {
                            let _ = c.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Seen::Message(p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(Event::Incoming(Packet::SubAck(a))) => {
                        let ok = a.return_codes.iter().all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_)));
                        let _ = tx.send(Seen::SubAck(ok));
                    }
                    Ok(_) => {}
                    // The broker went away (the end of a test): whoever still waits sees the end.
                    Err(_) => return,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), connected).await.expect("connack in time").expect("connected");
        Self { client, seen, task }
    }

    /// Subscribes (QoS 1) and returns whether the broker granted it.
    async fn subscribe(&mut self, topic: &str) -> bool {
        self.client.subscribe(topic, QoS::AtLeastOnce).await.expect("subscribe");
        match tokio::time::timeout(Duration::from_secs(10), self.seen.recv()).await.expect("suback in time") {
            Some(Seen::SubAck(ok)) => ok,
            Some(other) => panic!("unexpected before the SUBACK: {other:?}"),
            None => panic!("client ended"),
        }
    }

    async fn publish(&self, topic: &str, bytes: Vec<u8>) {
        self.client.publish(topic, QoS::AtLeastOnce, false, bytes).await.expect("publish");
    }

    /// A frame of session `id` on `device`'s up topic.
    async fn send(&self, device: &str, id: u64, frame: &Frame) {
        self.publish(&format!("its/uplink/{device}/up"), encode_message(id, frame).expect("encode")).await;
    }

    /// The next message (topic, session id, frame), if one comes within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<(String, u64, Frame)> {
        match tokio::time::timeout(wait, self.seen.recv()).await {
            Ok(Some(Seen::Message(topic, bytes))) => {
                let (id, frame) = decode_message(&bytes).expect("a message of the uplink");
                Some((topic, id, frame))
            }
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            Ok(None) => panic!("client ended"),
            Err(_) => None,
        }
    }

    /// The next frame on `topic` (others are ignored) within 15 s, with its session id.
    async fn expect_on(&mut self, topic: &str) -> (u64, Frame) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some((t, id, f)) if t == topic => return (id, f),
                Some(_) => continue,
                None => panic!("nothing on {topic} within 15 s"),
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn hello() -> Frame {
    Frame::Hello(Hello {
        agent_version: "test".into(),
        model: "none".into(),
        cameras: vec!["cam-1".into()],
        last_acked_seq: 0,
        last_assigned_seq: 0,
    })
}

fn batch(after: u64, seqs: std::ops::RangeInclusive<u64>) -> Frame {
    let events = seqs
        .map(|seq| EventEnvelope {
            seq,
            camera: "cam-1".into(),
            // Recent: retention (90 days by default) must not delete them.
            observed_at_ms: its_aggregator::unix_ms() - 60_000 + seq as i64,
            kind: EventKind::ZoneEnter {
                zone: "junction".into(),
                object: ObjectRef { track_id: seq, label: "car".into(), score: 0.9, bbox: [0.0, 0.0, 0.5, 0.5] },
            },
        })
        .collect();
    Frame::EventBatch(EventBatch { after, events })
}

fn ack(up_to: u64) -> Frame {
    Frame::Ack(Ack { up_to })
}

/// Sends `Hello` for session `id` until the bridge (which may still be connecting) welcomes it;
/// returns the welcome.
async fn hello_until_welcomed(c: &mut Client, device: &str, id: u64) -> Frame {
    let down = format!("its/uplink/{device}/down");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        c.send(device, id, &hello()).await;
        while let Some((topic, got, frame)) = c.next(Duration::from_millis(500)).await {
            if topic == down && got == id && matches!(frame, Frame::Ack(_)) {
                // Welcomes of Hellos sent again meanwhile: each started a fresh session.
                while c.next(Duration::from_millis(700)).await.is_some() {}
                return frame;
            }
        }
        assert!(Instant::now() < deadline, "the bridge never welcomed {device}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_confined_to_their_topics_and_bad_frames_do_not_stop_the_bridge() {
    assert_eq!(
        its_agent::uplink::mqtt::NO_SESSION_REASON,
        its_aggregator::mqtt::uplink::NO_SESSION_REASON,
        "agent and aggregator must agree on the no-session refusal"
    );
    let mut agent_encoded = Vec::new();
    its_agent::uplink::mqtt::encode_message(9, &hello(), &mut agent_encoded).expect("encode");
    assert_eq!(agent_encoded, encode_message(9, &hello()).expect("encode"), "agent and aggregator share the format");

    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let log = root.join("processes.log");
    let mut broker = Mosquitto::new(&root.join("broker"), &[("mallory", "mallory-pw"), ("victim", "victim-pw")], &log);
    tokio::task::block_in_place(|| broker.start());
    let url = format!("sqlite://{}", root.join("agg.db").display());
    let env = Env::new(&root, &url, &broker);
    let mut aggregator = tokio::task::block_in_place(|| env.start_aggregator());
    let (mine, down) = ("mallory", "its/uplink/mallory/down");

    let mut mallory = Client::connect(broker.port, "mallory", "mallory-pw").await;
    assert!(mallory.subscribe(down).await, "a device reads its own down topic");
    // Whether or not the broker grants this, nothing may arrive on it (checked below).
    let _ = mallory.subscribe("its/uplink/victim/down").await;
    assert_eq!(hello_until_welcomed(&mut mallory, mine, 1).await, ack(0));

    // Into the victim's topic: the ACL drops it (the broker still acknowledges QoS 1).
    mallory.send("victim", 1, &hello()).await;
    mallory.send("victim", 1, &batch(0, 1..=5)).await;

    // Malformed messages are dropped without ending anything.
    mallory.publish("its/uplink/mallory/up", b"not a frame".to_vec()).await;
    mallory.publish("its/uplink/mallory/up", vec![0xFF; 16]).await;
    mallory.publish("its/uplink/mallory/up", vec![0; 3]).await;
    let mut trailing = encode_message(1, &ack(1)).expect("encode");
    trailing.push(0);
    mallory.publish("its/uplink/mallory/up", trailing).await;
    mallory.send(mine, 1, &batch(0, 1..=3)).await;
    assert_eq!(mallory.expect_on(down).await, (1, ack(3)), "the session survived bad messages");
    // A QoS 1 duplicate is acknowledged again, stored once.
    mallory.send(mine, 1, &batch(0, 1..=3)).await;
    assert_eq!(mallory.expect_on(down).await, (1, ack(3)));
    // A batch beyond a gap is dropped (no ack); the next in order is acknowledged.
    mallory.send(mine, 1, &batch(10, 11..=12)).await;
    mallory.send(mine, 1, &batch(3, 4..=5)).await;
    assert_eq!(mallory.expect_on(down).await, (1, ack(5)));
    // A frame an agent never sends ends the session with a reason; a new Hello starts another.
    mallory.send(mine, 1, &ack(2)).await;
    match mallory.expect_on(down).await {
        (1, Frame::Refuse { reason }) => assert!(reason.contains("unexpected"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    mallory.send(mine, 2, &hello()).await;
    assert_eq!(mallory.expect_on(down).await, (2, ack(5)), "welcomed with what storage holds");
    // A batch of the earlier session is dropped: only session 2's batch is acknowledged, once.
    mallory.send(mine, 1, &batch(5, 6..=6)).await;
    mallory.send(mine, 2, &batch(5, 6..=6)).await;
    mallory.send(mine, 2, &batch(6, 7..=7)).await;
    assert_eq!(mallory.expect_on(down).await, (2, ack(6)));
    assert_eq!(mallory.expect_on(down).await, (2, ack(7)), "a stale batch was processed");

    // The victim's own session starts from nothing: none of mallory's frames reached it.
    let mut victim = Client::connect(broker.port, "victim", "victim-pw").await;
    assert!(victim.subscribe("its/uplink/victim/down").await);
    assert_eq!(hello_until_welcomed(&mut victim, "victim", 77).await, ack(0));
    victim.send("victim", 77, &batch(0, 1..=2)).await;
    assert_eq!(victim.expect_on("its/uplink/victim/down").await, (77, ack(2)));
    // Mallory cannot read the victim's acknowledgements.
    while let Some((topic, _, frame)) = mallory.next(Duration::from_millis(500)).await {
        assert_ne!(topic, "its/uplink/victim/down", "mallory read the victim's {frame:?}");
    }

    // The aggregator restarts under a live broker connection: a frame without a session is
    // refused so that the agent sends a new Hello, welcomed with what storage holds.
    tokio::task::block_in_place(|| {
        aggregator.kill9();
        aggregator = env.start_aggregator();
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let refusal = loop {
        mallory.send(mine, 2, &batch(7, 8..=8)).await;
        if let Some((_, id, f @ Frame::Refuse { .. })) = mallory.next(Duration::from_millis(500)).await {
            break (id, f);
        }
        assert!(Instant::now() < deadline, "no refusal after the restart\n{}", tail(&log));
    };
    assert_eq!(refusal, (2, Frame::Refuse { reason: its_aggregator::mqtt::uplink::NO_SESSION_REASON.into() }));
    mallory.send(mine, 3, &hello()).await;
    let welcome = loop {
        match mallory.expect_on(down).await {
            (2, Frame::Refuse { .. }) => continue, // answers to batches sent before the Hello
            other => break other,
        }
    };
    assert_eq!(welcome, (3, ack(7)));
    mallory.send(mine, 3, &batch(7, 8..=9)).await;
    assert_eq!(mallory.expect_on(down).await, (3, ack(9)));

    tokio::task::block_in_place(|| {
        aggregator.terminate();
        broker.kill9();
    });
    let store = open_store(&url, its_aggregator::vault::Vault::ephemeral()).await.expect("open store");
    assert_eq!(store.device_seqs("mallory").await.expect("seqs"), (1..=9).collect::<Vec<u64>>());
    assert_eq!(store.device_seqs("victim").await.expect("seqs"), vec![1, 2], "only the victim's own events");
}

/// TLS on both broker connections: the agent trusts the broker through its device bundle's CA
/// (the default), the bridge through `ca`. Everything produced arrives, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uplink_runs_over_tls() {
    const EVENTS: u64 = 3000;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let log = root.join("processes.log");
    let pki = pki(&root);
    pki.enroll(DEVICE, &root.join("bundle"), 30).expect("enroll");
    let mut broker = Mosquitto::with_tls(&root.join("broker"), &[(DEVICE, DEVICE_PASSWORD)], &log, Some(&pki));
    tokio::task::block_in_place(|| broker.start());
    let url = format!("sqlite://{}", root.join("agg.db").display());
    let mut env = Env::new(&root, &url, &broker);
    assert!(env.broker_url.starts_with("mqtts://"));
    env.aggregator_env.push(("ITS_AGGREGATOR__MQTT__UPLINK__CA".into(), pki.ca_cert_path().display().to_string()));
    let bundle = root.join("bundle").display().to_string();
    let limit = EVENTS.to_string();
    tokio::task::block_in_place(|| {
        let mut aggregator = env.start_aggregator();
        let mut agent = env.start_agent_with(&[
            ("ITS_AGENT__DEVICE_BUNDLE", bundle.as_str()),
            ("ITS_AGENT__SYNTHETIC__RATE_PER_S", "1000"),
            ("ITS_AGENT__SYNTHETIC__LIMIT", limit.as_str()),
            ("ITS_AGENT__HEALTH__INTERVAL_S", "3600"),
        ]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // The outbox exists once the agent has started.
            let s = its_agent::buffer::read_stats(&env.outbox()).ok();
            if s.as_ref().is_some_and(|s| s.produced_total >= EVENTS && s.pending_events == 0) {
                break;
            }
            assert!(Instant::now() < deadline, "did not drain over TLS: {s:?}\nlog tail:\n{}", tail(&log));
            sleep(200);
        }
        agent.terminate();
        aggregator.terminate();
        broker.kill9();
    });
    let stats = outbox_stats(&env.outbox());
    let store = open_store(&url, its_aggregator::vault::Vault::ephemeral()).await.expect("open store");
    let seqs = store.device_seqs(DEVICE).await.expect("seqs");
    assert_eq!(stats.evicted_total, 0);
    assert_eq!(seqs, (1..=stats.produced_total).collect::<Vec<u64>>(), "every event arrived once over TLS");
}

/// A device disabled while its MQTT uplink session runs loses it within about a second: its next
/// frames are refused with `device disabled` and nothing more of it is stored, as over QUIC. Once
/// enabled again it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_disabled_during_its_session_is_cut_off() {
    use its_aggregator::store::{DevicePatch, Fleet, Scope};
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let log = root.join("processes.log");
    let mut broker = Mosquitto::new(&root.join("broker"), &[("dee", "dee-pw")], &log);
    tokio::task::block_in_place(|| broker.start());
    let url = format!("sqlite://{}", root.join("agg.db").display());
    let env = Env::new(&root, &url, &broker);
    let mut aggregator = tokio::task::block_in_place(|| env.start_aggregator());
    let down = "its/uplink/dee/down";
    let mut dee = Client::connect(broker.port, "dee", "dee-pw").await;
    assert!(dee.subscribe(down).await);
    assert_eq!(hello_until_welcomed(&mut dee, "dee", 1).await, ack(0));
    dee.send("dee", 1, &batch(0, 1..=3)).await;
    assert_eq!(dee.expect_on(down).await, (1, ack(3)));

    let store = open_store(&url, its_aggregator::vault::Vault::ephemeral()).await.expect("open store");
    let fleet = Fleet::new(store.db());
    let disable = |on: bool| DevicePatch { disabled: Some(on), ..DevicePatch::default() };
    fleet.update_device("dee", &disable(true), &Scope::All, its_aggregator::unix_ms()).await.expect("disable");
    // The bridge reads the disabled devices every second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    dee.send("dee", 1, &batch(3, 4..=6)).await;
    match dee.expect_on(down).await {
        (1, Frame::Refuse { reason }) => assert!(reason.contains("device disabled"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A new session is refused too, and nothing of the batch was stored.
    dee.send("dee", 2, &hello()).await;
    match dee.expect_on(down).await {
        (2, Frame::Refuse { reason }) => assert!(reason.contains("device disabled"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(store.device_seqs("dee").await.expect("seqs"), vec![1, 2, 3]);

    fleet.update_device("dee", &disable(false), &Scope::All, its_aggregator::unix_ms()).await.expect("enable");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(hello_until_welcomed(&mut dee, "dee", 3).await, ack(3), "served again once enabled");
    tokio::task::block_in_place(|| {
        aggregator.terminate();
        broker.kill9();
    });
}
