//! Redis fan-out between two aggregator replicas and the live stream, with the real programs:
//! two aggregator processes (each with its own SQLite database: the fan-out needs no shared one),
//! the machine's Redis (127.0.0.1:6379, `ITS_TEST_REDIS_URL` for another; a channel of its own per
//! run), a real agent (its synthetic source) connected to replica A only, and SSE clients on both
//! replicas' `GET /api/v1/stream`.
//!
//! - B's stream shows every event A stored, once each, though B's own database has none of them
//!   (they came through Redis), and A's device coming online.
//! - A's own stream shows each event exactly once: A drops its own messages coming back from Redis.
//! - The stream's filters hold on the remote side too (a `camera` filter on B).

use its_testkit::server as common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Proc, TEST_ADMIN, add_admin_cli, agent_bin, aggregator_bin, wait_ready};
use its_aggregator::pki::Pki;

const DEVICE: &str = "fan-box";
const LIMIT: u64 = 120;

fn redis_url() -> String {
    std::env::var("ITS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

struct Replica {
    _proc: Proc,
    http: std::net::SocketAddr,
    quic: std::net::SocketAddr,
}

fn start_replica(root: &Path, name: &str, channel: &str, log: &Path) -> Replica {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("dir");
    let pki = Pki::new(dir.join("pki"));
    pki.init(&[]).expect("pki init");
    let envs: Vec<(&str, std::ffi::OsString)> = vec![
        ("ITS_AGGREGATOR__DATABASE_URL", format!("sqlite://{}", dir.join("events.db").display()).into()),
        ("ITS_AGGREGATOR__PKI_DIR", dir.join("pki").into()),
        ("ITS_AGGREGATOR__QUIC__LISTEN", "127.0.0.1:0".into()),
        ("ITS_AGGREGATOR__HTTP__LISTEN", "127.0.0.1:0".into()),
        ("ITS_AGGREGATOR__REDIS__URL", redis_url().into()),
        ("ITS_AGGREGATOR__REDIS__CHANNEL", channel.into()),
        ("ITS_AGGREGATOR__REDIS__REPLICA_ID", name.into()),
        // Not needed here, and its default port is fixed.
        ("ITS_AGGREGATOR__MQTT__MODE", "off".into()),
        ("RUST_LOG", "info".into()),
    ];
    add_admin_cli(&envs);
    if name == "a" {
        pki.enroll(DEVICE, &root.join("bundle"), 30).expect("enroll");
    }
    let ready = dir.join("ready.json");
    let mut cmd = Command::new(aggregator_bin());
    cmd.arg("serve").arg("--ready-file").arg(&ready);
    for (k, v) in &envs {
        cmd.env(k, v);
    }
    let proc = Proc::spawn("aggregator", cmd, log);
    let addrs = wait_ready(&ready, log);
    Replica { _proc: proc, http: addrs.http, quic: addrs.quic }
}

fn start_agent(root: &Path, aggregator: std::net::SocketAddr, log: &Path) -> Proc {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("run")
        .env("ITS_AGENT__DEVICE_BUNDLE", root.join("bundle"))
        .env("ITS_AGENT__UPLINK__AGGREGATOR", aggregator.to_string())
        .env("ITS_AGENT__UPLINK__JITTER", "false")
        .env("ITS_AGENT__UPLINK__BACKOFF_BASE_MS", "50")
        .env("ITS_AGENT__UPLINK__BACKOFF_CAP_MS", "400")
        .env("ITS_AGENT__OUTBOX__PATH", root.join("outbox.db"))
        .env("ITS_AGENT__SYNTHETIC__ENABLED", "true")
        .env("ITS_AGENT__SYNTHETIC__RATE_PER_S", "100")
        .env("ITS_AGENT__SYNTHETIC__LIMIT", LIMIT.to_string())
        .env("ITS_AGENT__SYNTHETIC__CAMERAS", "[\"cam-a\", \"cam-b\"]")
        .env("RUST_LOG", "info");
    Proc::spawn("agent", cmd, log)
}

async fn token(http: std::net::SocketAddr) -> String {
    let resp = reqwest::Client::new()
        .post(format!("http://{http}/api/v1/auth/login"))
        .json(&serde_json::json!({ "username": TEST_ADMIN.0, "password": TEST_ADMIN.1 }))
        .send()
        .await
        .expect("login");
    assert_eq!(resp.status().as_u16(), 200, "login");
    let body: serde_json::Value = resp.json().await.expect("login body");
    body["access_token"].as_str().expect("token").to_owned()
}

/// One SSE message.
#[derive(Debug, Clone)]
struct Sse {
    event: String,
    data: serde_json::Value,
}

/// Reads a stream in the background, parsing its messages.
struct StreamReader {
    got: Arc<Mutex<Vec<Sse>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StreamReader {
    /// Connects and returns once the stream said `: ready` (subscribed).
    async fn open(http: std::net::SocketAddr, query: &str) -> Self {
        let token = token(http).await;
        let mut resp = reqwest::Client::new()
            .get(format!("http://{http}/api/v1/stream{query}"))
            .bearer_auth(token)
            .send()
            .await
            .expect("stream");
        assert_eq!(resp.status().as_u16(), 200, "stream");
        let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        assert!(ctype.starts_with("text/event-stream"), "{ctype}");
        let mut buf = String::new();
        // Up to the first blank line: the `: ready` comment.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !buf.contains("\n\n") {
            assert!(Instant::now() < deadline, "no ready comment");
            let chunk = resp.chunk().await.expect("chunk").expect("stream open");
            buf.push_str(&String::from_utf8_lossy(&chunk));
        }
        assert!(buf.starts_with(": ready") || buf.starts_with(":ready"), "{buf:?}");
        let got = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let got = Arc::clone(&got);
            async move {
                while let Ok(Some(chunk)) = resp.chunk().await {
                    buf.push_str(&String::from_utf8_lossy(&chunk));
                    while let Some(end) = buf.find("\n\n") {
                        let frame: String = buf.drain(..end + 2).collect();
                        let (mut event, mut data) = (String::from("message"), String::new());
                        for line in frame.lines() {
                            if let Some(v) = line.strip_prefix("event:") {
                                event = v.trim().to_owned();
                            } else if let Some(v) = line.strip_prefix("data:") {
                                data.push_str(v.trim_start());
                            }
                        }
                        if data.is_empty() {
                            continue; // a comment (ready, keep-alive)
                        }
                        let data = serde_json::from_str(&data).unwrap_or_else(|e| panic!("data {data:?}: {e}"));
                        got.lock().expect("lock").push(Sse { event, data });
                    }
                }
            }
        });
        Self { got, task }
    }

    fn all(&self) -> Vec<Sse> {
        self.got.lock().expect("lock").clone()
    }

    /// How many times each event id was streamed.
    fn event_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for m in self.all().into_iter().filter(|m| m.event == "event") {
            *counts.entry(m.data["id"].as_str().expect("id").to_owned()).or_insert(0) += 1;
        }
        counts
    }

    async fn wait_events(&self, want: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.event_counts().len() < want {
            assert!(Instant::now() < deadline, "{what}: {} of {want} events streamed", self.event_counts().len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_stream_each_others_events_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root: PathBuf = dir.path().to_path_buf();
    let log = root.join("processes.log");
    let channel = common::unique_name("its-fanout-test");
    let a = start_replica(&root, "a", &channel, &log);
    let b = start_replica(&root, "b", &channel, &log);

    let on_b = StreamReader::open(b.http, "").await;
    let on_a = StreamReader::open(a.http, "").await;
    let on_b_cam = StreamReader::open(b.http, "?camera=cam-b&types=event").await;
    // Both replicas' subscriptions to Redis are up when a message of each crosses.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        if log_text.matches("redis fan-out subscribed").count() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the replicas did not subscribe to Redis; log:\n{log_text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let _agent = start_agent(&root, a.quic, &log);
    on_b.wait_events(LIMIT as usize, "replica B's stream").await;
    on_a.wait_events(LIMIT as usize, "replica A's stream").await;
    // Let any echo arrive before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let want: Vec<String> = (1..=LIMIT).map(|s| format!("{DEVICE}:{s}")).collect();
    for (name, reader) in [("A", &on_a), ("B", &on_b)] {
        let counts = reader.event_counts();
        assert_eq!(
            counts.keys().cloned().collect::<std::collections::BTreeSet<_>>(),
            want.iter().cloned().collect(),
            "{name}"
        );
        let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
        assert!(repeated.is_empty(), "replica {name} streamed events more than once: {repeated:?}");
        let all = reader.all();
        let status: Vec<_> = all.iter().filter(|m| m.event == "device_status").collect();
        assert!(
            status.iter().any(|m| m.data["device_id"] == DEVICE && m.data["online"] == true),
            "replica {name}: no device_status online: {status:?}"
        );
        // The public JSON of an event.
        let e = all.iter().find(|m| m.event == "event").expect("an event");
        for field in ["id", "device_id", "seq", "camera", "kind", "@timestamp", "observed_at_ms", "payload"] {
            assert!(e.data.get(field).is_some(), "{field} missing in {}", e.data);
        }
    }
    // The camera filter: exactly cam-b's events (the synthetic source takes turns between cameras).
    let want_cam: std::collections::BTreeSet<String> = on_b
        .all()
        .into_iter()
        .filter(|m| m.event == "event" && m.data["camera"] == "cam-b")
        .filter_map(|m| m.data["id"].as_str().map(str::to_owned))
        .collect();
    assert!(!want_cam.is_empty(), "the agent sent no cam-b events");
    let deadline = Instant::now() + Duration::from_secs(20);
    while on_b_cam.event_counts().keys().cloned().collect::<std::collections::BTreeSet<_>>() != want_cam {
        assert!(Instant::now() < deadline, "the camera-filtered stream: {:?} of {want_cam:?}", on_b_cam.event_counts());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cam = on_b_cam.all();
    assert!(
        cam.iter().all(|m| m.event == "event" && m.data["camera"] == "cam-b"),
        "the filter let other messages through"
    );

    // B stored none of them: they reached its stream through Redis.
    let token_b = token(b.http).await;
    let page: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{}/api/v1/events?limit=5", b.http))
        .bearer_auth(token_b)
        .send()
        .await
        .expect("events")
        .json()
        .await
        .expect("json");
    assert_eq!(page["events"].as_array().map(Vec::len), Some(0), "{page}");
}
