//! Latency from an agent's commit of an event to a webhook's receipt of the alert it fires, and
//! to a third-party MQTT subscriber's receipt of the event, at 1,000 events/s: the real programs
//! (an `its-agent` process with its synthetic source, an `its-aggregator` process with SQLite and
//! its embedded MQTT broker), a webhook receiver and an MQTT client (rumqttc) in this process.
//!
//! ```text
//! cargo bench -p its-e2e --bench notify_latency -- [--rate 1000] [--duration 30] [--warmup 5]
//! ```
//!
//! The agent's synthetic source stamps each batch's `observed_at_ms` right before the outbox
//! commit of that batch, so "from the commit" includes the commit itself (an upper bound by a few
//! milliseconds). Events are spread over the 11 road kinds; an alert rule on `wrong_way` (no
//! dedupe) fires on about 1 in 11, each delivered to the webhook; every event goes to MQTT.
//!
//! Peers, side by side in the same run, same rates: the machine's Mosquitto relaying messages
//! from a rumqttc publisher to a rumqttc subscriber (the floor of any MQTT path), and a plain
//! HTTP POST from reqwest to the same webhook receiver (the floor of any webhook path).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::routing::post;
use serde_json::{Value, json};

const DEVICE: &str = "latency-box";
const SITE: &str = "bench-site";
const USER: &str = "bench-admin";
const PASSWORD: &str = "bench-admin-password-1";

struct Args {
    rate: u32,
    duration: u64,
    warmup: u64,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args { rate: 1000, duration: 30, warmup: 5 };
    let mut it = std::env::args().skip(1);
    while let Some(name) = it.next() {
        let mut value = || it.next().with_context(|| format!("{name} needs a value"));
        match name.as_str() {
            "--rate" => a.rate = value()?.parse()?,
            "--duration" => a.duration = value()?.parse()?,
            "--warmup" => a.warmup = value()?.parse()?,
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn unix_ms_f() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
}

/// Receipts: (when received, Unix ms with fraction; the latency in ms).
#[derive(Default, Clone)]
struct Samples(Arc<Mutex<Vec<(f64, f64)>>>);

impl Samples {
    fn push(&self, at: f64, latency: f64) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push((at, latency));
    }

    /// Latencies of the receipts within [from, to).
    fn window(&self, from: f64, to: f64) -> Vec<f64> {
        let v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        v.iter().filter(|(at, _)| *at >= from && *at < to).map(|(_, l)| *l).collect()
    }
}

struct Stats {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    let q =
        |p: f64| if v.is_empty() { f64::NAN } else { v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1] };
    Stats { n: v.len(), p50: q(0.5), p90: q(0.9), p99: q(0.99), max: v.last().copied().unwrap_or(f64::NAN) }
}

fn row(name: &str, s: &Stats) -> String {
    format!("| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} |", s.n, s.p50, s.p90, s.p99, s.max)
}

/// `@timestamp` (RFC 3339) as Unix ms.
fn rfc3339_ms(s: &str) -> Option<f64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some(t.unix_timestamp_nanos() as f64 / 1e6)
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        for _ in 0..50 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Both programs, built (release, as this benchmark) if they are not up to date.
fn binaries() -> anyhow::Result<(PathBuf, PathBuf)> {
    Ok((its_testkit::bins::aggregator_bin(), its_testkit::bins::agent_bin()))
}

async fn wait_ready(path: &Path) -> anyhow::Result<Value> {
    for _ in 0..300 {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str::<Value>(&text)
        {
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the aggregator did not get ready")
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{path}: {status} {v}");
        }
        Ok(v)
    }
}

/// Webhook receiver: records each alert's latency from its event's commit.
async fn webhook_server(samples: Samples, floor: Samples) -> anyhow::Result<SocketAddr> {
    let app = axum::Router::new()
        .route(
            "/hook",
            post(move |body: axum::body::Bytes| {
                let samples = samples.clone();
                async move {
                    let now = unix_ms_f();
                    if let Ok(v) = serde_json::from_slice::<Value>(&body)
                        && let Some(at) = v["alert"]["details"]["event"]["observed_at_ms"].as_f64()
                    {
                        samples.push(now, now - at);
                    }
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        )
        .route(
            "/floor",
            post(move |body: axum::body::Bytes| {
                let floor = floor.clone();
                async move {
                    let now = unix_ms_f();
                    if let Ok(v) = serde_json::from_slice::<Value>(&body)
                        && let Some(at) = v["sent_ms"].as_f64()
                    {
                        floor.push(now, now - at);
                    }
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// An MQTT subscriber recording latencies; `at` reads the commit (or send) time of a payload.
fn mqtt_subscriber(
    addr: (String, u16),
    credentials: Option<(String, String)>,
    filter: String,
    samples: Samples,
    at: fn(&Value) -> Option<f64>,
) -> tokio::sync::oneshot::Receiver<()> {
    let mut opts = rumqttc::MqttOptions::new(format!("bench-sub-{}", std::process::id()), addr.0, addr.1);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    if let Some((u, p)) = credentials {
        opts.set_credentials(u, p);
    }
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10_000);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    let _ = client.subscribe(filter.clone(), rumqttc::QoS::AtLeastOnce).await;
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let now = unix_ms_f();
                    if let Ok(v) = serde_json::from_slice::<Value>(&p.payload)
                        && let Some(t) = at(&v)
                    {
                        samples.push(now, now - t);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("subscriber: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    ready_rx
}

fn event_time(v: &Value) -> Option<f64> {
    v["observed_at_ms"].as_f64().or_else(|| v["@timestamp"].as_str().and_then(rfc3339_ms))
}

fn sent_time(v: &Value) -> Option<f64> {
    v["sent_ms"].as_f64()
}

async fn run(a: Args) -> anyhow::Result<()> {
    let (aggregator_bin, agent_bin) = binaries()?;
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let pki = its_aggregator::pki::Pki::new(root.join("pki"));
    pki.init(&[])?;
    pki.enroll(DEVICE, &root.join("bundle"), 30)?;
    let db = format!("sqlite://{}", root.join("events.db").display());
    let log = std::fs::File::create(root.join("processes.log"))?;
    let aggregator_env = |cmd: &mut Command| {
        cmd.env("ITS_AGGREGATOR__DATABASE_URL", &db).env("ITS_AGGREGATOR__PKI_DIR", root.join("pki"));
    };
    let mut add = Command::new(&aggregator_bin);
    add.args(["user", "add", USER, "--role", "admin", "--password-stdin"]).stdin(Stdio::piped());
    aggregator_env(&mut add);
    let mut child = add.spawn()?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().context("stdin")?;
        writeln!(stdin, "{PASSWORD}")?;
    }
    if !child.wait()?.success() {
        bail!("user add failed");
    }
    let ready = root.join("ready.json");
    let mut cmd = Command::new(&aggregator_bin);
    cmd.arg("serve").arg("--ready-file").arg(&ready);
    aggregator_env(&mut cmd);
    cmd.env("ITS_AGGREGATOR__QUIC__LISTEN", "127.0.0.1:0")
        .env("ITS_AGGREGATOR__HTTP__LISTEN", "127.0.0.1:0")
        .env("ITS_AGGREGATOR__MQTT__LISTEN", "127.0.0.1:0")
        // The webhook receiver of this bench listens on loopback.
        .env("ITS_AGGREGATOR__ALERTS__ALLOWED_TARGET_NETWORKS", "[\"127.0.0.1\"]")
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?);
    let _aggregator = Proc(cmd.spawn()?);
    let addrs = wait_ready(&ready).await?;
    let http: SocketAddr = serde_json::from_value(addrs["http"].clone())?;
    let quic: SocketAddr = serde_json::from_value(addrs["quic"].clone())?;
    let mqtt: SocketAddr = serde_json::from_value(addrs["mqtt"].clone()).context("no embedded MQTT broker")?;

    let client = reqwest::Client::new();
    let login: Value = client
        .post(format!("http://{http}/api/v1/auth/login"))
        .json(&json!({ "username": USER, "password": PASSWORD }))
        .send()
        .await?
        .json()
        .await?;
    let token = login["access_token"].as_str().context("access token")?.to_owned();
    let api = Api { http: client.clone(), base: format!("http://{http}"), token };

    let (hook_samples, hook_floor) = (Samples::default(), Samples::default());
    let hook = webhook_server(hook_samples.clone(), hook_floor.clone()).await?;
    let channel = api
        .call(
            reqwest::Method::POST,
            "/api/v1/alert-channels",
            Some(json!({ "name": "bench hook", "target": { "kind": "webhook", "url": format!("http://{hook}/hook"), "secret": "bench-secret-0123456789" } })),
        )
        .await?;
    let channel_id = channel["channel_id"].as_i64().context("channel id")?;
    api.call(
        reqwest::Method::POST,
        "/api/v1/alert-rules",
        Some(json!({ "name": "every wrong-way driver", "severity": "critical", "dedupe_window_s": 0,
            "condition": { "type": "event", "kinds": ["wrong_way"] }, "channels": [channel_id] })),
    )
    .await?;
    api.call(reqwest::Method::POST, "/api/v1/sites", Some(json!({ "site_id": SITE, "name": "Bench site" }))).await?;
    let cred = api
        .call(
            reqwest::Method::POST,
            "/api/v1/mqtt/credentials",
            Some(json!({ "username": "bench-sub", "sites": [SITE] })),
        )
        .await?;
    let mqtt_password = cred["password"].as_str().context("mqtt password")?.to_owned();

    // The agent: synthetic source at the rate, four cameras, every road kind.
    let mut agent = Command::new(&agent_bin);
    agent
        .arg("run")
        .env("ITS_AGENT__DEVICE_BUNDLE", root.join("bundle"))
        .env("ITS_AGENT__UPLINK__AGGREGATOR", quic.to_string())
        .env("ITS_AGENT__OUTBOX__PATH", root.join("outbox.db"))
        .env("ITS_AGENT__SYNTHETIC__ENABLED", "true")
        .env("ITS_AGENT__SYNTHETIC__RATE_PER_S", a.rate.to_string())
        .env("ITS_AGENT__SYNTHETIC__CAMERAS", "[\"cam-1\", \"cam-2\", \"cam-3\", \"cam-4\"]")
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?);
    let agent = Proc(agent.spawn()?);
    // The device appears with its first hello: put it on the site.
    let mut placed = false;
    for _ in 0..100 {
        if api
            .call(reqwest::Method::PATCH, &format!("/api/v1/devices/{DEVICE}"), Some(json!({ "site_id": SITE })))
            .await
            .is_ok()
        {
            placed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !placed {
        bail!("the device never connected (see {})", root.join("processes.log").display());
    }
    let mqtt_samples = Samples::default();
    let subscribed = mqtt_subscriber(
        (mqtt.ip().to_string(), mqtt.port()),
        Some(("bench-sub".into(), mqtt_password)),
        format!("its/v1/{SITE}/+/events/#"),
        mqtt_samples.clone(),
        event_time,
    );
    tokio::time::timeout(Duration::from_secs(10), subscribed).await.context("MQTT subscription")??;
    tokio::time::sleep(Duration::from_secs(a.warmup)).await;
    let from = unix_ms_f();
    tokio::time::sleep(Duration::from_secs(a.duration)).await;
    let to = unix_ms_f();
    drop(agent);
    let hook_lat = stats(hook_samples.window(from, to));
    let mqtt_lat = stats(mqtt_samples.window(from, to));
    let stored: Value = api.call(reqwest::Method::GET, "/api/v1/system/storage", None).await.unwrap_or(Value::Null);

    // Peers, same rates: Mosquitto relaying rumqttc to rumqttc; a plain POST to the receiver.
    let peer_samples = Samples::default();
    let topic = format!("its-bench/{}", std::process::id());
    let peer_sub = mqtt_subscriber(("127.0.0.1".into(), 1883), None, topic.clone(), peer_samples.clone(), sent_time);
    tokio::time::timeout(Duration::from_secs(10), peer_sub).await.context("Mosquitto subscription")??;
    let mut opts = rumqttc::MqttOptions::new(format!("bench-pub-{}", std::process::id()), "127.0.0.1", 1883);
    opts.set_keep_alive(Duration::from_secs(30));
    let (publisher, mut eventloop) = rumqttc::AsyncClient::new(opts, 10_000);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let alert_rate = (hook_lat.n as f64 / a.duration as f64).max(1.0);
    let post_client = reqwest::Client::new();
    let started = Instant::now();
    let peer_from = unix_ms_f() + 1000.0 * a.warmup.min(2) as f64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let (mut sent_mqtt, mut sent_http) = (0f64, 0f64);
    while started.elapsed() < Duration::from_secs(a.duration + a.warmup.min(2)) {
        tick.tick().await;
        let t = started.elapsed().as_secs_f64();
        while sent_mqtt < t * f64::from(a.rate) {
            sent_mqtt += 1.0;
            let body = json!({ "sent_ms": unix_ms_f(), "kind": "line_crossing", "camera": "cam-1", "label": "car",
                "box": [0.1, 0.2, 0.3, 0.4], "score": 0.9, "speed": 50.0, "direction": "in", "zone": null });
            let _ = publisher.try_publish(topic.clone(), rumqttc::QoS::AtLeastOnce, false, body.to_string());
        }
        while sent_http < t * alert_rate {
            sent_http += 1.0;
            let c = post_client.clone();
            let url = format!("http://{hook}/floor");
            tokio::spawn(async move {
                let _ = c.post(url).json(&json!({ "sent_ms": unix_ms_f(), "pad": "x".repeat(900) })).send().await;
            });
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peer_to = unix_ms_f() - 500.0;
    let mqtt_peer = stats(peer_samples.window(peer_from, peer_to));
    let hook_peer = stats(hook_floor.window(peer_from, peer_to));

    println!(
        "rate {} events/s for {} s (after {} s warm-up); storage: {}",
        a.rate, a.duration, a.warmup, stored["size"]
    );
    println!("| path | receipts | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    println!("{}", row("agent commit → webhook (alert on wrong_way)", &hook_lat));
    println!("{}", row("agent commit → MQTT subscriber (every event)", &mqtt_lat));
    println!("{}", row("peer: HTTP POST → same receiver", &hook_peer));
    println!("{}", row("peer: rumqttc → Mosquitto → rumqttc", &mqtt_peer));
    println!(
        "ratios (ours / peer): webhook p50 {:.1}x p99 {:.1}x; MQTT p50 {:.1}x p99 {:.1}x",
        hook_lat.p50 / hook_peer.p50,
        hook_lat.p99 / hook_peer.p99,
        mqtt_lat.p50 / mqtt_peer.p50,
        mqtt_lat.p99 / mqtt_peer.p99
    );
    println!("target p99 < 100 ms: webhook {}, MQTT {}", hook_lat.p99 < 100.0, mqtt_lat.p99 < 100.0);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(a))
}
