//! End to end, with the real programs and real peers: synthetic traffic footage with a
//! wrong-way car (real vehicle pictures encoded to H.264) is played to an `its-agent` process,
//! which decodes, detects, tracks and analyses it and sends its events over QUIC to an
//! `its-aggregator` process. There an alert rule on wrong-way drivers fires; the webhook server
//! of this test receives a correctly signed body (checked with its own HMAC-SHA256); `mosquitto_sub`
//! (the Debian client) subscribed to the site's topics on the embedded broker, with an
//! integrator's credentials, receives the event; a Kafka consumer reading the export topic from
//! a `tansu` broker receives it; and the alert is acknowledged over the API.
#![cfg(all(feature = "kafka", feature = "embedded-mqtt"))]

use its_testkit::server as common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use common::{Proc, add_admin_cli, admin_client, agent_bin, aggregator_bin, free_port, tansu_bin, wait_ready};
use hmac_check::verify;
use its_aggregator::pki::Pki;
use its_testkit::footage::encode_footage;
use its_testkit::footage::library::Library;
use its_testkit::footage::traffic::TrafficFootage;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::{Value, json};

const DEVICE: &str = "roadside-7";
const SITE: &str = "ring-road";
const SECRET: &str = "e2e-webhook-secret-0123456789";
const TOPIC: &str = "its-events-e2e";

/// HMAC-SHA256 as a receiver would write it (RFC 2104 over SHA-256), independent of the
/// aggregator's code.
mod hmac_check {
    use sha2::{Digest, Sha256};

    pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
        let mut k = [0u8; 64];
        if key.len() > 64 {
            k[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let (mut inner, mut outer) = (Sha256::new(), Sha256::new());
        inner.update(k.map(|b| b ^ 0x36));
        inner.update(message);
        outer.update(k.map(|b| b ^ 0x5c));
        outer.update(inner.finalize());
        outer.finalize().into()
    }

    /// `X-ITS-Signature: sha256=<hex>` over `<X-ITS-Timestamp>.<body>`.
    pub fn verify(secret: &str, timestamp: &str, body: &[u8], signature: &str) -> bool {
        let mut message = timestamp.as_bytes().to_vec();
        message.push(b'.');
        message.extend_from_slice(body);
        let want: String = hmac_sha256(secret.as_bytes(), &message).iter().map(|b| format!("{b:02x}")).collect();
        signature.strip_prefix("sha256=") == Some(want.as_str())
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The agent's configuration: the footage file as a camera, with the footage's survey as the
/// camera's scene (the calibration points, the count lines and the lanes with their permitted
/// direction).
fn agent_config(video: &Path, footage: &TrafficFootage) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = root.join("models/ssd-mobilenet-v2-coco/model.toml");
    let l = &footage.layout;
    let pt = |p: &[f64; 2]| format!("[{:.3}, {:.3}]", p[0], p[1]);
    let pts = |ps: &[[f64; 2]]| format!("[{}]", ps.iter().map(pt).collect::<Vec<_>>().join(", "));
    let mut out = format!(
        "[detector]\nmodel = {:?}\n\n[[cameras]]\nid = \"cam-1\"\nurl = {:?}\nloop = false\nrealtime = false\nfile_fps = {}\n\n\
         [cameras.scene]\nimage_size = [{}, {}]\n",
        model.display().to_string(),
        video.display().to_string(),
        footage.footage.fps,
        l.image_size.0,
        l.image_size.1
    );
    for (image, ground) in &l.calibration {
        out += &format!("[[cameras.scene.calibration]]\nimage = {}\nground = {}\n", pt(image), pt(ground));
    }
    for line in &l.lines {
        out += &format!(
            "[[cameras.scene.lines]]\nname = {:?}\npoints = {}\nin_side = {:?}\n",
            line.name,
            pts(&line.image),
            line.in_side
        );
    }
    for z in &l.zones {
        out += &format!("[[cameras.scene.zones]]\nname = {:?}\npolygon = {}\n", z.name, pts(&z.image));
        if let Some(d) = &z.direction {
            out += &format!("direction = {}\n", pts(d));
        }
    }
    out
}

/// A webhook request as received: its headers and raw body.
type Received = (HeaderMap, Vec<u8>);

#[derive(Default, Clone)]
struct Hooks(Arc<Mutex<Vec<Received>>>);

async fn webhook_server(hooks: Hooks) -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let hooks = hooks.clone();
            async move {
                hooks.0.lock().expect("lock").push((headers, body.to_vec()));
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// Creates the export topic (as an operator would: Kafka brokers often refuse to auto-create).
async fn create_topic(bootstrap: &str) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("admin client");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let new = NewTopic::new(TOPIC, 2, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
        match admin.create_topics([&new], &opts).await {
            Ok(results) if results.iter().all(|r| r.is_ok()) => return,
            other => assert!(Instant::now() < deadline, "create topic: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads the export topic from the beginning on a thread of its own.
fn kafka_consumer(bootstrap: String, seen: Arc<Mutex<Vec<Value>>>, stop: Arc<std::sync::atomic::AtomicBool>) {
    std::thread::spawn(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "e2e-reader")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        let mut assigned = false;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if !assigned {
                // The topic exists once the exporter has created or produced to it.
                if let Ok(md) = consumer.fetch_metadata(Some(TOPIC), Duration::from_secs(2))
                    && let Some(t) = md.topics().first()
                    && !t.partitions().is_empty()
                {
                    let mut tpl = TopicPartitionList::new();
                    for p in t.partitions() {
                        tpl.add_partition_offset(TOPIC, p.id(), Offset::Beginning).expect("partition");
                    }
                    consumer.assign(&tpl).expect("assign");
                    assigned = true;
                } else {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            }
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100))
                && let Ok(v) = serde_json::from_slice::<Value>(m.payload().unwrap_or_default())
            {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                seen.lock().expect("lock").push(json!({ "key": key, "body": v }));
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_way_driver_reaches_the_webhook_mqtt_and_kafka_and_is_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let log = root.join("processes.log");

    // The footage, encoded as a camera would send it.
    let media = Path::new(env!("CARGO_MANIFEST_DIR")).join("../media");
    let lib = Library::load(&media).expect("media");
    let footage = lib.traffic_wrong_way();
    assert!(!footage.truth.wrong_way.is_empty(), "the scene has a wrong-way driver");
    let video = root.join("wrong-way.264");
    encode_footage(&footage.footage, &video, 26, 30).expect("encode");
    let config = root.join("agent.toml");
    std::fs::write(&config, agent_config(&video, &footage)).expect("agent config");

    // Kafka-protocol broker.
    let kafka_port = free_port();
    let url = format!("tcp://127.0.0.1:{kafka_port}");
    let mut tansu = Command::new(tansu_bin());
    tansu.args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine"]).args([
        "memory://tansu/",
        "--cluster-id",
        "its-e2e",
    ]);
    let _tansu = Proc::spawn("tansu", tansu, &log);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", kafka_port)).is_err() {
        assert!(Instant::now() < deadline, "tansu did not listen:\n{}", tail(&log));
        std::thread::sleep(Duration::from_millis(50));
    }

    create_topic(&format!("127.0.0.1:{kafka_port}")).await;

    // The aggregator: SQLite, embedded MQTT broker, Kafka export, alerts.
    let pki = Pki::new(root.join("pki"));
    pki.init(&[]).expect("pki init");
    pki.enroll(DEVICE, &root.join("bundle"), 30).expect("enroll");
    let database_url = format!("sqlite://{}", root.join("events.db").display());
    let envs: Vec<(&str, std::ffi::OsString)> = vec![
        ("ITS_AGGREGATOR__DATABASE_URL", database_url.clone().into()),
        ("ITS_AGGREGATOR__PKI_DIR", root.join("pki").into_os_string()),
    ];
    add_admin_cli(&envs);
    let ready = root.join("ready.json");
    let mut cmd = Command::new(aggregator_bin());
    cmd.arg("serve")
        .arg("--ready-file")
        .arg(&ready)
        .envs(envs.iter().map(|(k, v)| (*k, v)))
        .env("ITS_AGGREGATOR__QUIC__LISTEN", "127.0.0.1:0")
        .env("ITS_AGGREGATOR__HTTP__LISTEN", "127.0.0.1:0")
        .env("ITS_AGGREGATOR__MQTT__LISTEN", "127.0.0.1:0")
        .env("ITS_AGGREGATOR__KAFKA__ENABLED", "true")
        .env("ITS_AGGREGATOR__KAFKA__BROKERS", format!("[\"127.0.0.1:{kafka_port}\"]"))
        .env("ITS_AGGREGATOR__KAFKA__EVENTS_TOPIC", TOPIC)
        // The webhook receiver listens on loopback.
        .env("ITS_AGGREGATOR__ALERTS__ALLOWED_TARGET_NETWORKS", "[\"127.0.0.1\"]")
        .env("RUST_LOG", "info");
    let _aggregator = Proc::spawn("aggregator", cmd, &log);
    let addrs = wait_ready(&ready, &log);
    let mqtt = addrs.mqtt.expect("the embedded MQTT broker is on by default");
    let api = format!("http://{}", addrs.http);
    let http = admin_client(addrs.http).await;

    // The traffic centre's set-up: a site, a webhook channel, a rule, an integrator's MQTT login.
    let ok = |r: reqwest::Response| async move {
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{status} {v}");
        v
    };
    let hooks = Hooks::default();
    let hook = webhook_server(hooks.clone()).await;
    ok(http
        .post(format!("{api}/api/v1/sites"))
        .json(&json!({ "site_id": SITE, "name": "Ring road" }))
        .send()
        .await
        .expect("site"))
    .await;
    let channel = ok(http
        .post(format!("{api}/api/v1/alert-channels"))
        .json(&json!({ "name": "control room", "target": { "kind": "webhook", "url": format!("http://{hook}/hook"), "secret": SECRET } }))
        .send()
        .await
        .expect("channel"))
    .await;
    let rule = ok(http
        .post(format!("{api}/api/v1/alert-rules"))
        .json(&json!({ "name": "Wrong-way driver", "severity": "critical",
            "condition": { "type": "event", "kinds": ["wrong_way"] }, "channels": [channel["channel_id"]] }))
        .send()
        .await
        .expect("rule"))
    .await;
    let cred = ok(http
        .post(format!("{api}/api/v1/mqtt/credentials"))
        .json(&json!({ "username": "city-app", "sites": [SITE] }))
        .send()
        .await
        .expect("credential"))
    .await;
    let mqtt_password = cred["password"].as_str().expect("password").to_owned();

    // The agent connects; its device goes on the site before any road user appears (the agent
    // waits: the footage is started only after the placement).
    let agent_log = root.join("agent.log");
    let mut agent_cmd = Command::new(agent_bin());
    agent_cmd
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("ITS_AGENT__DEVICE_BUNDLE", root.join("bundle"))
        .env("ITS_AGENT__UPLINK__AGGREGATOR", addrs.quic.to_string())
        .env("ITS_AGENT__OUTBOX__PATH", root.join("outbox.db"))
        .env("ITS_AGENT__HEALTH__INTERVAL_S", "1")
        .env("RUST_LOG", "info");
    // First a run without cameras registers the device (its hello), so it can be placed.
    let mut hello_cmd = Command::new(agent_bin());
    hello_cmd
        .arg("run")
        .env("ITS_AGENT__DEVICE_BUNDLE", root.join("bundle"))
        .env("ITS_AGENT__UPLINK__AGGREGATOR", addrs.quic.to_string())
        .env("ITS_AGENT__OUTBOX__PATH", root.join("outbox.db"))
        .env("ITS_AGENT__HEALTH__INTERVAL_S", "1")
        .env("RUST_LOG", "info");
    let mut hello = Proc::spawn("agent-hello", hello_cmd, &agent_log);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = http
            .patch(format!("{api}/api/v1/devices/{DEVICE}"))
            .json(&json!({ "site_id": SITE }))
            .send()
            .await
            .expect("place device");
        if r.status().is_success() {
            break;
        }
        assert!(Instant::now() < deadline, "the device never said hello:\n{}", tail(&agent_log));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    hello.terminate();

    // mosquitto_sub with the integrator's login: its site's events (and, refused, another's).
    let mqtt_out = root.join("mosquitto_sub.out");
    let sub = Command::new("mosquitto_sub")
        .args(["-h", &mqtt.ip().to_string(), "-p", &mqtt.port().to_string(), "-u", "city-app", "-P", &mqtt_password])
        .args(["-q", "1", "-v", "-t", &format!("its/v1/{SITE}/+/events/wrong_way"), "-i", "city-app-e2e"])
        .stdout(std::fs::File::create(&mqtt_out).expect("out"))
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)");
    let mut sub = scopeguard(sub);

    let kafka_seen = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    kafka_consumer(format!("127.0.0.1:{kafka_port}"), kafka_seen.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Play the footage.
    let _agent = Proc::spawn("agent", agent_cmd, &agent_log);

    // 1. The webhook: a signed alert naming the wrong-way event.
    let deadline = Instant::now() + Duration::from_secs(240);
    let (headers, body) = loop {
        if let Some(first) = hooks.0.lock().expect("lock").first().cloned() {
            break first;
        }
        assert!(Instant::now() < deadline, "no webhook; agent log:\n{}\n{}", tail(&agent_log), tail(&log));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let (timestamp, signature) = (header("x-its-timestamp"), header("x-its-signature"));
    assert!(verify(SECRET, &timestamp, &body, &signature), "bad signature {signature} over {timestamp}");
    assert!(!verify("another-secret", &timestamp, &body, &signature), "the check can fail");
    let alert: Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(alert["event"], "alert.opened", "{alert}");
    let event = &alert["alert"]["details"]["event"];
    assert_eq!(
        (&event["kind"], &event["device_id"], &event["camera"]),
        (&json!("wrong_way"), &json!(DEVICE), &json!("cam-1"))
    );
    let event_id = event["id"].as_str().expect("event id").to_owned();
    let alert_id = alert["alert"]["alert_id"].as_i64().expect("alert id");
    assert_eq!(alert["alert"]["rule_id"], rule["rule_id"], "{alert}");

    // 2. MQTT: the same event on its site's topic.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mqtt_line = loop {
        let text = std::fs::read_to_string(&mqtt_out).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(&event_id)) {
            break line.to_owned();
        }
        assert!(Instant::now() < deadline, "mosquitto_sub got no wrong-way event: {text:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (topic, payload) = mqtt_line.split_once(' ').expect("-v prints the topic first");
    assert_eq!(topic, format!("its/v1/{SITE}/cam-1/events/wrong_way"));
    let payload: Value = serde_json::from_str(payload).expect("JSON payload");
    assert_eq!(
        (&payload["id"], &payload["kind"], &payload["camera"]),
        (&json!(event_id), &json!("wrong_way"), &json!("cam-1"))
    );
    assert!(payload["@timestamp"].is_string() && payload["label"].is_string(), "{payload}");

    // 3. Kafka: the export topic has it, keyed by its camera.
    let deadline = Instant::now() + Duration::from_secs(60);
    let record = loop {
        if let Some(r) = kafka_seen.lock().expect("lock").iter().find(|r| r["body"]["id"] == event_id.as_str()).cloned()
        {
            break r;
        }
        assert!(Instant::now() < deadline, "the Kafka consumer never saw {event_id}:\n{}", tail(&log));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(record["key"], format!("{DEVICE}/cam-1"));
    assert_eq!(record["body"]["kind"], "wrong_way");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    // 4. The operator acknowledges the alert over the API.
    let alert_path = format!("{api}/api/v1/alerts/{alert_id}");
    let acked = ok(http.post(format!("{alert_path}/ack")).json(&json!({})).send().await.expect("ack")).await;
    assert_eq!(acked["state"], "acknowledged", "{acked}");
    assert_eq!(acked["acknowledged_by"], format!("user:{}", common::TEST_ADMIN.0), "{acked}");
    let shown = ok(http.get(&alert_path).send().await.expect("get")).await;
    assert_eq!(shown["state"], "acknowledged");
    let deliveries = ok(http.get(format!("{alert_path}/deliveries")).send().await.expect("deliveries")).await;
    assert!(deliveries.to_string().contains("delivered"), "{deliveries}");
    sub.kill();
}

/// Kills the child when dropped.
struct Guard(std::process::Child);

impl Guard {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn scopeguard(child: std::process::Child) -> Guard {
    Guard(child)
}
