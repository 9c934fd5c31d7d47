//! MQTT for third parties end to end, with real parts: two agents' outboxes and QUIC uplinks,
//! the aggregator's ingest and storage, its embedded broker (rumqttd behind the ACL front) or the
//! machine's Mosquitto (127.0.0.1:1883), and the Debian `mosquitto_sub` / `mosquitto_pub`
//! clients with an integrator's credentials made through the REST API.
//!
//! - An integrator scoped to site `north` receives the events of the north camera (JSON fields
//!   checked); a subscription to the south site, to `#` or to the south device's status is
//!   refused in the SUBACK; a wrong password is refused at CONNECT; its PUBLISH never reaches
//!   subscribers; a late subscriber sees the retained device and aggregator status; a revoked
//!   credential cannot connect.
//! - Credentials deleted and created again (rumqttc clients in the test): a persistent session
//!   made under the earlier credential is not resumed and delivers nothing of a site the new one
//!   lacks (the reproduced ACL bypass); an open connection of a credential created again with
//!   fewer sites is closed within about the front's recheck interval.
//! - Limits: over `max_connections_per_client` or `max_connections` a CONNECT gets CONNACK 3,
//!   and a place is free again once a connection closes; a credential keeps at most
//!   `MAX_PERSISTENT_SESSIONS` persistent client ids, beyond that a client gets a clean session.
//! - External mode: the aggregator publishes to Mosquitto, a plain subscriber receives.
//! - `its-aggregator mqtt mosquitto-config` writes files a real Mosquitto accepts.
//! - The credential table on both backends.

use its_testkit::server as common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::both_backends;
use its_agent::buffer::NewEvent;
use its_aggregator::config::RawConfig;
use its_aggregator::pki::Pki;
use its_aggregator::server::Server;
use its_e2e::agent::{Agent, uplink_config};
use its_shared::event::{ClassCount, Direction, EventKind, ObjectRef};
use rumqttc::{AsyncClient, ConnAck, ConnectReturnCode, ConnectionError, Event, Incoming, MqttOptions, QoS};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

const SUB: &str = "/usr/bin/mosquitto_sub";
const PUB: &str = "/usr/bin/mosquitto_pub";

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    server: Server,
    http: reqwest::Client,
    _stop: watch::Sender<bool>,
}

async fn fixture(mqtt_env: &[(&str, String)]) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let pki = Pki::new(root.join("pki"));
    pki.init(&[]).expect("pki init");
    for d in ["dev-north", "dev-south"] {
        pki.enroll(d, &root.join(d), 30).expect("enroll");
    }
    let mut env: Vec<(String, String)> = vec![
        ("ITS_AGGREGATOR__DATABASE_URL".into(), format!("sqlite://{}", root.join("events.db").display())),
        ("ITS_AGGREGATOR__PKI_DIR".into(), root.join("pki").display().to_string()),
        ("ITS_AGGREGATOR__QUIC__LISTEN".into(), "127.0.0.1:0".into()),
        ("ITS_AGGREGATOR__HTTP__LISTEN".into(), "127.0.0.1:0".into()),
        ("ITS_AGGREGATOR__SNAPSHOTS__URL".into(), format!("file://{}", root.join("objects").display())),
    ];
    env.extend(mqtt_env.iter().map(|(k, v)| (format!("ITS_AGGREGATOR__MQTT__{k}"), v.clone())));
    let cfg = RawConfig::load(None, env).expect("config").validate("test").expect("valid config");
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
    let (stop, rx) = watch::channel(false);
    let server = Server::start(&cfg, metrics, None, rx).await.expect("server");
    common::add_admin(server.store.db()).await;
    let http = common::admin_client(server.addrs.http).await;
    Fixture { _dir: dir, root, server, http, _stop: stop }
}

impl Fixture {
    fn api(&self, path: &str) -> String {
        format!("http://{}/api/v1{path}", self.server.addrs.http)
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, self.api(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// Waits until the device said hello (so its cameras exist), then assigns it a site.
    async fn assign(&self, device: &str, site: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.call(reqwest::Method::GET, &format!("/devices/{device}"), None).await;
            if status == 200 && body["cameras"].as_array().is_some_and(|c| !c.is_empty()) {
                break;
            }
            assert!(Instant::now() < deadline, "device {device} never said hello: {status} {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (status, body) =
            self.call(reqwest::Method::PATCH, &format!("/devices/{device}"), Some(json!({ "site_id": site }))).await;
        assert_eq!(status, 200, "{body}");
    }
}

impl Fixture {
    /// Creates sites `north` and `south`, starts an agent in each (cameras `cam-n`, `cam-s`)
    /// and waits until both are assigned.
    async fn two_sites(&self) -> (Agent, Agent) {
        for (site, name) in [("north", "North junction"), ("south", "South junction")] {
            let (status, body) =
                self.call(reqwest::Method::POST, "/sites", Some(json!({ "site_id": site, "name": name }))).await;
            assert_eq!(status, 201, "{body}");
        }
        let north = start_agent(&self.root, "dev-north", "cam-n", self.server.addrs.quic);
        let south = start_agent(&self.root, "dev-south", "cam-s", self.server.addrs.quic);
        self.assign("dev-north", "north").await;
        self.assign("dev-south", "south").await;
        (north, south)
    }

    /// Creates an integrator credential through the API; returns its password.
    async fn credential(&self, username: &str, sites: &[&str]) -> String {
        let (status, body) = self
            .call(reqwest::Method::POST, "/mqtt/credentials", Some(json!({ "username": username, "sites": sites })))
            .await;
        assert_eq!(status, 201, "{body}");
        body["password"].as_str().expect("password").to_owned()
    }

    /// Deletes a credential and creates it again with `sites`; returns the new password.
    async fn recreate(&self, username: &str, sites: &[&str]) -> String {
        let (status, body) = self.call(reqwest::Method::DELETE, &format!("/mqtt/credentials/{username}"), None).await;
        assert_eq!(status, 204, "{body}");
        self.credential(username, sites).await
    }

    fn mqtt_port(&self) -> u16 {
        self.server.addrs.mqtt.expect("embedded broker").port()
    }
}

/// A real MQTT client (rumqttc) whose event loop runs in a task; what it receives (and how its
/// connection ended) comes out of `events`.
struct Client {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Incoming, ConnectionError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    fn start(options: MqttOptions) -> Self {
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        // No reconnection: the test sees how it ended.
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        });
        Self { client, events, task }
    }

    /// An integrator's client of the front.
    fn integrator(port: u16, id: &str, user: &str, password: &str, clean_session: bool) -> Self {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_credentials(user, password);
        o.set_clean_session(clean_session);
        o.set_keep_alive(Duration::from_secs(30));
        Self::start(o)
    }

    /// The next event within `within` (`None`: nothing came).
    async fn next(&mut self, within: Duration) -> Option<Result<Incoming, ConnectionError>> {
        tokio::time::timeout(within, self.events.recv()).await.ok().flatten()
    }

    /// The CONNACK, or how the connection failed.
    async fn connack(&mut self) -> Result<ConnAck, String> {
        match self.next(Duration::from_secs(10)).await {
            Some(Ok(Incoming::ConnAck(ack))) => Ok(ack),
            Some(Err(ConnectionError::ConnectionRefused(code))) => Err(format!("refused {code:?}")),
            other => Err(format!("no CONNACK: {other:?}")),
        }
    }

    /// Subscribes and waits for the SUBACK; returns its return codes.
    async fn subscribe(&mut self, filter: &str) -> Vec<rumqttc::SubscribeReasonCode> {
        self.client.subscribe(filter, QoS::AtLeastOnce).await.expect("subscribe");
        loop {
            match self.next(Duration::from_secs(10)).await {
                Some(Ok(Incoming::SubAck(ack))) => return ack.return_codes,
                Some(Ok(_)) => {}
                other => panic!("no SUBACK for {filter}: {other:?}"),
            }
        }
    }

    /// Sends DISCONNECT and waits until the connection is gone.
    async fn disconnect(mut self) {
        self.client.disconnect().await.expect("disconnect");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match self.next(Duration::from_millis(200)).await {
                Some(Err(_)) => break,
                _ if self.task.is_finished() => break,
                _ => {}
            }
        }
        self.task.abort();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_created_again_does_not_resume_the_earlier_session() {
    let f = fixture(&[("MODE", "embedded".into()), ("LISTEN", "127.0.0.1:0".into())]).await;
    let port = f.mqtt_port();
    let (north, south) = f.two_sites().await;

    // Under the first credential (both sites): a persistent session subscribed to both.
    let password = f.credential("acme", &["north", "south"]).await;
    let mut c = Client::integrator(port, "acme-consumer", "acme", &password, false);
    c.connack().await.expect("connected");
    let granted = rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce);
    assert_eq!(c.subscribe("its/v1/north/#").await, vec![granted]);
    assert_eq!(c.subscribe("its/v1/south/#").await, vec![granted]);
    c.disconnect().await;
    // The session is kept while the client is away (so what follows is meaningful).
    let mut c = Client::integrator(port, "acme-consumer", "acme", &password, false);
    assert!(c.connack().await.expect("connected").session_present, "the persistent session is resumed");
    c.disconnect().await;

    // Deleted and created again without the north site.
    let password = f.recreate("acme", &["south"]).await;

    // Everything published, as rumqttd sees it (straight to it, no ACL).
    let broker = f.server.mqtt.broker.as_ref().expect("embedded broker");
    let mut observer = Client::start(broker.internal_options("test-observer"));
    observer.connack().await.expect("observer connected");
    observer.subscribe("its/v1/#").await;

    // The same client id and clean session 0, no SUBSCRIBE: a new session.
    let mut c = Client::integrator(port, "acme-consumer", "acme", &password, false);
    let ack = c.connack().await.expect("connected");
    assert!(!ack.session_present, "the session of the earlier credential was resumed");

    // A north event is published by the aggregator ...
    north.append(vec![crossing("cam-n", 1)], Vec::new()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "the north event was never published");
        if let Some(Ok(Incoming::Publish(p))) = observer.next(Duration::from_millis(500)).await
            && p.topic == "its/v1/north/cam-n/events/line_crossing"
        {
            break;
        }
    }
    // ... then, once the client subscribed within its new grant, a south one.
    let mut received = Vec::new();
    let codes = {
        c.client.subscribe("its/v1/south/#", QoS::AtLeastOnce).await.expect("subscribe");
        loop {
            match c.next(Duration::from_secs(10)).await {
                Some(Ok(Incoming::SubAck(ack))) => break ack.return_codes,
                Some(Ok(Incoming::Publish(p))) => received.push(p.topic),
                Some(Ok(_)) => {}
                other => panic!("no SUBACK: {other:?}"),
            }
        }
    };
    assert_eq!(codes, vec![granted]);
    south.append(vec![crossing("cam-s", 1)], Vec::new()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !received.iter().any(|t| t == "its/v1/south/cam-s/events/line_crossing") {
        assert!(Instant::now() < deadline, "the south event never arrived: {received:?}");
        match c.next(Duration::from_millis(500)).await {
            Some(Ok(Incoming::Publish(p))) => received.push(p.topic),
            Some(Err(e)) => panic!("connection ended: {e:?}"),
            _ => {}
        }
    }
    // A little longer, for anything late.
    while let Some(Ok(ev)) = c.next(Duration::from_secs(1)).await {
        if let Incoming::Publish(p) = ev {
            received.push(p.topic);
        }
    }
    assert!(!received.iter().any(|t| t.starts_with("its/v1/north/")), "north messages delivered: {received:?}");
    // Nothing but what the new subscription covers.
    assert!(received.iter().all(|t| t.starts_with("its/v1/south/")), "{received:?}");

    let _ = north.stop().await;
    let _ = south.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_end_when_their_credential_is_created_again_with_fewer_sites() {
    let f = fixture(&[("MODE", "embedded".into()), ("LISTEN", "127.0.0.1:0".into())]).await;
    let port = f.mqtt_port();
    for site in ["north", "south"] {
        let (status, body) =
            f.call(reqwest::Method::POST, "/sites", Some(json!({ "site_id": site, "name": site }))).await;
        assert_eq!(status, 201, "{body}");
    }
    let password = f.credential("acme", &["north", "south"]).await;
    let mut c = Client::integrator(port, "acme-live", "acme", &password, true);
    c.connack().await.expect("connected");
    c.subscribe("its/v1/south/#").await;
    // Open longer than one recheck before the change: the credential as it was still holds.
    assert!(c.next(its_aggregator::mqtt::broker::RECHECK + Duration::from_secs(1)).await.is_none(), "closed early");

    f.recreate("acme", &["south"]).await;
    let changed = Instant::now();
    // The front checks every RECHECK, reading the credential at most CACHE_TTL old.
    let bound = its_aggregator::mqtt::broker::RECHECK + its_aggregator::mqtt::credentials::CACHE_TTL;
    let ended = loop {
        match c.next(bound + Duration::from_secs(5)).await {
            Some(Ok(_)) => {}
            Some(Err(e)) => break e,
            None => panic!("still open {:?} after the credential was created again", changed.elapsed()),
        }
    };
    let took = changed.elapsed();
    assert!(took <= bound + Duration::from_secs(2), "closed after {took:?} ({ended:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_answer_connack_3() {
    let f = fixture(&[
        ("MODE", "embedded".into()),
        ("LISTEN", "127.0.0.1:0".into()),
        ("MAX_CONNECTIONS", "3".into()),
        ("MAX_CONNECTIONS_PER_CLIENT", "2".into()),
    ])
    .await;
    let port = f.mqtt_port();
    let acme = f.credential("acme", &[]).await;
    let beta = f.credential("beta", &[]).await;

    let mut a1 = Client::integrator(port, "a1", "acme", &acme, true);
    a1.connack().await.expect("a1");
    let mut a2 = Client::integrator(port, "a2", "acme", &acme, true);
    a2.connack().await.expect("a2");
    // A third of the same credential: over max_connections_per_client.
    let mut a3 = Client::integrator(port, "a3", "acme", &acme, true);
    assert_eq!(a3.connack().await, Err(format!("refused {:?}", ConnectReturnCode::ServiceUnavailable)));
    // Another credential: its first one fits, then max_connections is reached.
    let mut b1 = Client::integrator(port, "b1", "beta", &beta, true);
    b1.connack().await.expect("b1");
    let mut b2 = Client::integrator(port, "b2", "beta", &beta, true);
    assert_eq!(b2.connack().await, Err(format!("refused {:?}", ConnectReturnCode::ServiceUnavailable)));
    // mosquitto_sub sees the same answer.
    let (code, out) = attempt(&f.root, "over-limit", port, "beta", &beta, "its/v1/aggregator/+/status").await;
    assert!(out.contains("received CONNACK (3)"), "{out}");
    assert_ne!(code, Some(0), "{out}");
    // The refused ones took no place: once one closes, the next fits.
    a1.disconnect().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut a4 = Client::integrator(port, "a4", "acme", &acme, true);
        match a4.connack().await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "no place after a disconnect: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((a2, b1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_client_ids_per_credential_are_capped() {
    let f = fixture(&[("MODE", "embedded".into()), ("LISTEN", "127.0.0.1:0".into())]).await;
    let port = f.mqtt_port();
    let password = f.credential("acme", &[]).await;
    let cap = its_aggregator::mqtt::broker::MAX_PERSISTENT_SESSIONS;
    for i in 0..=cap {
        let mut c = Client::integrator(port, &format!("p{i}"), "acme", &password, false);
        assert!(!c.connack().await.expect("connected").session_present);
        c.subscribe("its/v1/aggregator/+/status").await;
        c.disconnect().await;
    }
    // Let rumqttd put the last sessions away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut first = Client::integrator(port, "p0", "acme", &password, false);
    assert!(first.connack().await.expect("p0").session_present, "one of the first {cap} keeps its session");
    first.disconnect().await;
    let mut over = Client::integrator(port, &format!("p{cap}"), "acme", &password, false);
    assert!(!over.connack().await.expect("over").session_present, "the id over the cap was given a clean session");
}

/// One agent: an outbox in `root/device` (the device's bundle there too) and its QUIC uplink.
fn start_agent(root: &Path, device: &str, camera: &str, aggregator: SocketAddr) -> Agent {
    let dir = root.join(device);
    Agent::start(&dir, uplink_config(aggregator, &dir, &[camera]))
}

fn crossing(camera: &str, track_id: u64) -> NewEvent {
    NewEvent {
        camera: camera.into(),
        observed_at_ms: 1_700_000_000_123,
        kind: EventKind::LineCrossing {
            line: "stop-line".into(),
            object: ObjectRef { track_id, label: "car".into(), score: 0.875, bbox: [0.25, 0.5, 0.75, 1.0] },
            direction: Direction::In,
            speed_kmh: Some(42.5),
        },
    }
}

fn counts(camera: &str) -> NewEvent {
    NewEvent {
        camera: camera.into(),
        observed_at_ms: 1_700_000_060_000,
        kind: EventKind::Counts {
            line: "stop-line".into(),
            interval_s: 60,
            counts: vec![ClassCount { label: "car".into(), direction: Direction::In, count: 3 }],
        },
    }
}

/// A running `mosquitto_sub -d -v`: its debug lines tell when the SUBACK came.
struct Sub {
    child: std::process::Child,
    out: PathBuf,
}

impl Sub {
    fn start(dir: &Path, name: &str, port: u16, user: &str, password: &str, topics: &[&str], count: u32) -> Self {
        let out = dir.join(format!("{name}.out"));
        // Line-buffered, so the debug lines can be watched while it runs.
        let mut cmd = Command::new("/usr/bin/stdbuf");
        cmd.args(["-oL", SUB]);
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-d", "-v", "-W", "60"]).args([
            "-i",
            name,
            "-C",
            &count.to_string(),
        ]);
        if !user.is_empty() {
            cmd.args(["-u", user, "-P", password]);
        }
        for t in topics {
            cmd.args(["-t", t]);
        }
        let file = std::fs::File::create(&out).expect("sub output");
        let child = cmd
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .expect("mosquitto_sub");
        Self { child, out }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits until the output contains `needle`.
    async fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.output();
            if out.contains(needle) {
                return out;
            }
            assert!(Instant::now() < deadline, "no {needle:?} from mosquitto_sub; output:\n{out}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the process to end: (exit code, output).
    async fn finish(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status.code(), self.output());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("mosquitto_sub did not end; output:\n{}", self.output());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The messages received: (topic, JSON payload), from the `-v` lines.
    fn messages(out: &str) -> Vec<(String, Value)> {
        out.lines()
            .filter(|l| l.starts_with("its/"))
            .filter_map(|l| l.split_once(' '))
            .map(|(t, p)| (t.to_owned(), serde_json::from_str(p).unwrap_or(Value::Null)))
            .collect()
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `mosquitto_sub` for a single subscription attempt that should be refused at SUBSCRIBE
/// or CONNECT; returns (exit code, output).
async fn attempt(dir: &Path, name: &str, port: u16, user: &str, password: &str, topic: &str) -> (Option<i32>, String) {
    let sub = Sub::start(dir, name, port, user, password, &[topic], 1);
    sub.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_serves_integrators_within_their_sites() {
    let f = fixture(&[("MODE", "embedded".into()), ("LISTEN", "127.0.0.1:0".into()), ("ID", "agg-test".into())]).await;
    let port = f.server.addrs.mqtt.expect("embedded broker address").port();
    for (site, name) in [("north", "North junction"), ("south", "South junction")] {
        let (status, body) =
            f.call(reqwest::Method::POST, "/sites", Some(json!({ "site_id": site, "name": name }))).await;
        assert_eq!(status, 201, "{body}");
    }
    let quic = f.server.addrs.quic;
    let north = start_agent(&f.root, "dev-north", "cam-n", quic);
    let south = start_agent(&f.root, "dev-south", "cam-s", quic);
    f.assign("dev-north", "north").await;
    f.assign("dev-south", "south").await;

    // The integrator's credential, scoped to the north site.
    let (status, body) = f
        .call(
            reqwest::Method::POST,
            "/mqtt/credentials",
            Some(json!({ "username": "acme", "sites": ["north"], "alerts": false })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let password = body["password"].as_str().expect("password shown once").to_owned();
    assert!(password.len() >= 32);
    let (status, body) = f.call(reqwest::Method::GET, "/mqtt/credentials", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["credentials"][0]["username"], "acme");
    assert_eq!(body["credentials"][0]["sites"], json!(["north"]));
    assert!(body["credentials"][0].get("password").is_none(), "{body}");
    let (status, _) = f
        .call(reqwest::Method::POST, "/mqtt/credentials", Some(json!({ "username": "bad", "sites": ["nowhere"] })))
        .await;
    assert_eq!(status, 404, "an unknown site is refused");
    let (status, _) =
        f.call(reqwest::Method::POST, "/mqtt/credentials", Some(json!({ "username": "acme", "sites": [] }))).await;
    assert_eq!(status, 409, "a taken name is refused");

    // Wrong password: refused at CONNECT (CONNACK 4).
    let (code, out) = attempt(&f.root, "wrong-pw", port, "acme", "not-the-password", "its/v1/north/#").await;
    assert!(out.contains("received CONNACK (4)"), "{out}");
    assert_ne!(code, Some(0), "{out}");
    let (code, out) = attempt(&f.root, "anonymous", port, "", "", "its/v1/north/#").await;
    assert!(out.contains("received CONNACK (5)"), "{out}");
    assert_ne!(code, Some(0), "{out}");

    // Subscriptions outside the grant: refused in the SUBACK (mosquitto_sub says so and exits 1).
    for (name, topic) in [
        ("south", "its/v1/south/#"),
        ("everything", "#"),
        ("any-site", "its/v1/+/cam-s/#"),
        ("south-status", "its/v1/devices/dev-south/status"),
        ("alerts", "its/v1/alerts/#"),
    ] {
        let (code, out) = attempt(&f.root, name, port, "acme", &password, topic).await;
        assert!(out.contains("received CONNACK (0)"), "{topic}: {out}");
        // mosquitto_sub 2.0 reports the refusal (return code 128 in the SUBACK), disconnects
        // and exits 0.
        assert!(out.contains("Subscribed (mid: 1): 128"), "{topic}: {out}");
        assert!(out.contains("All subscription requests were denied."), "{topic}: {out}");
        assert_eq!(code, Some(0), "{topic}: {out}");
        assert!(Sub::messages(&out).is_empty(), "{topic}: {out}");
    }

    // Within the grant: events of the north camera, one message per event.
    let sub = Sub::start(&f.root, "north-events", port, "acme", &password, &["its/v1/north/#"], 2);
    sub.wait_for("Subscribed (mid: 1): 1").await;
    // A publish by the integrator is dropped (acknowledged, not delivered): the first message the
    // subscriber sees is the real event committed after it.
    let out = Command::new(PUB)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-u", "acme", "-P", &password, "-q", "1"])
        .args(["-t", "its/v1/north/cam-n/events/line_crossing", "-m", r#"{"id":"forged"}"#])
        .output()
        .expect("mosquitto_pub");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    south.append(vec![crossing("cam-s", 1)], Vec::new()).await;
    north.append(vec![crossing("cam-n", 7), counts("cam-n")], Vec::new()).await;
    let (code, out) = sub.finish().await;
    assert_eq!(code, Some(0), "{out}");
    let msgs = Sub::messages(&out);
    assert_eq!(msgs.len(), 2, "{out}");
    let (topic, e) = &msgs[0];
    assert_eq!(topic, "its/v1/north/cam-n/events/line_crossing", "{out}");
    assert_eq!(e["id"], "dev-north:1");
    assert_eq!(e["kind"], "line_crossing");
    assert_eq!(e["device"], "dev-north");
    assert_eq!(e["site"], "north");
    assert_eq!(e["camera"], "cam-n");
    assert_eq!(e["label"], "car");
    assert_eq!(e["score"], 0.875);
    assert_eq!(e["box"], json!([0.25, 0.5, 0.75, 1.0]));
    assert_eq!(e["speed"], 42.5);
    assert_eq!(e["direction"], "in");
    assert_eq!(e["zone"], Value::Null);
    assert_eq!(e["@timestamp"], "2023-11-14T22:13:20.123Z");
    assert_eq!(e["payload"]["line"], "stop-line");
    let (topic, c) = &msgs[1];
    assert_eq!(topic, "its/v1/north/cam-n/counts", "{out}");
    assert_eq!(c["id"], "dev-north:2");
    assert_eq!(c["payload"]["counts"][0]["count"], 3);

    // A late subscriber gets the retained status of the north device and of the aggregator.
    let sub = Sub::start(
        &f.root,
        "late",
        port,
        "acme",
        &password,
        &["its/v1/devices/dev-north/status", "its/v1/aggregator/+/status"],
        2,
    );
    let (code, out) = sub.finish().await;
    assert_eq!(code, Some(0), "{out}");
    let msgs = Sub::messages(&out);
    let device = msgs.iter().find(|(t, _)| t == "its/v1/devices/dev-north/status").expect("device status");
    assert_eq!(device.1["status"], "online", "{out}");
    assert_eq!(device.1["device"], "dev-north");
    let agg = msgs.iter().find(|(t, _)| t == "its/v1/aggregator/agg-test/status").expect("aggregator status");
    assert_eq!(agg.1["status"], "online", "{out}");
    assert!(out.contains("r1"), "retained flag in the debug line: {out}");

    // Revoked: the next CONNECT is refused.
    let (status, _) = f.call(reqwest::Method::DELETE, "/mqtt/credentials/acme", None).await;
    assert_eq!(status, 204);
    let (status, _) = f.call(reqwest::Method::DELETE, "/mqtt/credentials/acme", None).await;
    assert_eq!(status, 404);
    let (code, out) = attempt(&f.root, "revoked", port, "acme", &password, "its/v1/north/#").await;
    assert!(out.contains("received CONNACK (4)"), "{out}");
    assert_ne!(code, Some(0), "{out}");

    let _ = north.stop().await;
    let _ = south.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_mode_publishes_to_mosquitto() {
    let id = format!("ext-{}-{}", std::process::id(), its_aggregator::unix_ms());
    let f = fixture(&[("MODE", "external".into()), ("URL", "mqtt://127.0.0.1:1883".into()), ("ID", id.clone())]).await;
    assert_eq!(f.server.addrs.mqtt, None);
    // A camera id unique to this run, so other runs on the shared broker do not interfere.
    let camera = format!("cam-{id}");
    let sub = Sub::start(&f.root, "external", 1883, "", "", &[&format!("its/v1/+/{camera}/#")], 1);
    sub.wait_for("Subscribed (mid: 1)").await;
    let agent = start_agent(&f.root, "dev-north", &camera, f.server.addrs.quic);
    agent.append(vec![crossing(&camera, 3)], Vec::new()).await;
    let (code, out) = sub.finish().await;
    assert_eq!(code, Some(0), "{out}");
    let msgs = Sub::messages(&out);
    assert_eq!(msgs.len(), 1, "{out}");
    assert_eq!(msgs[0].0, format!("its/v1/_unassigned/{camera}/events/line_crossing"));
    assert_eq!(msgs[0].1["id"], "dev-north:1");
    assert_eq!(msgs[0].1["site"], Value::Null);
    // The aggregator's own retained status.
    let sub = Sub::start(&f.root, "external-status", 1883, "", "", &[&format!("its/v1/aggregator/{id}/status")], 1);
    let (code, out) = sub.finish().await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(Sub::messages(&out)[0].1["status"], "online", "{out}");
    let _ = agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_speaks_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("certificate");
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("key");
    let f = fixture(&[
        ("MODE", "embedded".into()),
        ("LISTEN", "127.0.0.1:0".into()),
        ("TLS_CERT", cert_path.display().to_string()),
        ("TLS_KEY", key_path.display().to_string()),
    ])
    .await;
    let port = f.server.addrs.mqtt.expect("embedded broker").port();
    let (status, _) = f.call(reqwest::Method::POST, "/sites", Some(json!({ "site_id": "north", "name": "N" }))).await;
    assert_eq!(status, 201);
    let (status, body) = f
        .call(reqwest::Method::POST, "/mqtt/credentials", Some(json!({ "username": "acme", "sites": ["north"] })))
        .await;
    assert_eq!(status, 201, "{body}");
    let password = body["password"].as_str().expect("password");
    // Over TLS, checked against the certificate: CONNACK 0 and the aggregator's retained status.
    let out = Command::new(SUB)
        .args(["-h", "localhost", "-p", &port.to_string(), "--cafile"])
        .arg(&cert_path)
        .args(["-u", "acme", "-P", password, "-t", "its/v1/aggregator/+/status", "-C", "1", "-W", "30", "-d", "-v"])
        .output()
        .expect("mosquitto_sub");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("received CONNACK (0)"), "{text}");
    assert_eq!(Sub::messages(&text).len(), 1, "{text}");
    // Plain MQTT on the TLS port gets nowhere.
    let out = Command::new(SUB)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-u",
            "acme",
            "-P",
            password,
            "-t",
            "x",
            "-C",
            "1",
            "-W",
            "5",
        ])
        .output()
        .expect("mosquitto_sub");
    assert!(!out.status.success(), "plain MQTT on the TLS port");
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_config_files_work_with_mosquitto() {
    let f = fixture(&[("MODE", "off".into())]).await;
    let (status, _) =
        f.call(reqwest::Method::POST, "/sites", Some(json!({ "site_id": "north", "name": "North" }))).await;
    assert_eq!(status, 201);
    let (status, body) = f
        .call(reqwest::Method::POST, "/mqtt/credentials", Some(json!({ "username": "acme", "sites": ["north"] })))
        .await;
    assert_eq!(status, 201, "{body}");
    let password = body["password"].as_str().expect("password").to_owned();
    let out_dir = f.root.join("mosquitto");
    let out = Command::new(common::aggregator_bin())
        .args(["mqtt", "mosquitto-config", "--out"])
        .arg(&out_dir)
        .env("ITS_AGGREGATOR__DATABASE_URL", format!("sqlite://{}", f.root.join("events.db").display()))
        .env("ITS_AGGREGATOR__PKI_DIR", f.root.join("pki"))
        .env("ITS_AGGREGATOR__MQTT__MODE", "external")
        .env("ITS_AGGREGATOR__MQTT__URL", "mqtt://127.0.0.1:1")
        .env("ITS_AGGREGATOR__MQTT__USERNAME", "aggregator")
        .env("ITS_AGGREGATOR__MQTT__PASSWORD", "aggregator-secret")
        .output()
        .expect("its-aggregator mqtt mosquitto-config");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let passwd = std::fs::read_to_string(out_dir.join("passwd")).expect("passwd");
    assert!(passwd.lines().any(|l| l.starts_with("acme:$7$101$")), "{passwd}");
    let acl = std::fs::read_to_string(out_dir.join("acl")).expect("acl");
    assert!(acl.contains("user acme\ntopic read its/v1/north/#\n"), "{acl}");

    // A real Mosquitto with these files.
    let port = free_port();
    let conf = f.root.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\nacl_file {}\npersistence false\n{}",
            out_dir.join("passwd").display(),
            out_dir.join("acl").display(),
            // As root, Mosquitto would drop to the `mosquitto` user, which cannot read the
            // temporary directory.
            if running_as_root() { "user root\n" } else { "" }
        ),
    )
    .expect("conf");
    let log = f.root.join("mosquitto.log");
    let mut broker = common::Proc::spawn(
        "mosquitto",
        {
            let mut c = Command::new("/usr/sbin/mosquitto");
            c.arg("-c").arg(&conf);
            c
        },
        &log,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "mosquitto did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let sub = Sub::start(&f.root, "mosq-ok", port, "acme", &password, &["its/v1/north/#"], 1);
    sub.wait_for("Subscribed (mid: 1)").await;
    // The aggregator's user may publish there; the integrator receives it.
    let out = Command::new(PUB)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-u", "aggregator", "-P", "aggregator-secret", "-q", "1"])
        .args(["-t", "its/v1/north/cam-n/counts", "-m", r#"{"id":"x:1"}"#])
        .output()
        .expect("mosquitto_pub");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, out) = sub.finish().await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(Sub::messages(&out)[0].0, "its/v1/north/cam-n/counts");
    let (code, out) = attempt(&f.root, "mosq-wrong", port, "acme", "wrong", "its/v1/north/#").await;
    assert!(out.contains("CONNACK (5)") || out.contains("CONNACK (4)"), "{out}");
    assert_ne!(code, Some(0));
    broker.terminate();
}

async fn credential_store(store: Arc<dyn its_aggregator::store::EventStore>) {
    use its_aggregator::mqtt::credentials::CredentialStore;
    let creds = CredentialStore::new(store.db());
    let (c, password) =
        creds.create("acme", &["b".into(), "a".into(), "a".into()], true, Some("cli"), 5).await.expect("create");
    assert_eq!(c.sites, vec!["a".to_string(), "b".to_string()]);
    assert!(creds.create("acme", &[], false, None, 6).await.is_err(), "conflict");
    assert!(creds.create("bad name", &[], false, None, 6).await.is_err(), "invalid name");
    let got = creds.get("acme").await.expect("get").expect("present");
    assert_eq!(got.credential, c);
    assert_eq!(got.secret_sha256, its_aggregator::auth::secrets::sha256_hex(&password));
    assert!(got.mosquitto_hash.starts_with("$7$101$"));
    assert_eq!(creds.list().await.expect("list").len(), 1);
    assert!(creds.delete("acme").await.expect("delete"));
    assert!(!creds.delete("acme").await.expect("delete again"));
    assert!(creds.get("acme").await.expect("get").is_none());
}

both_backends!(credential_store);
