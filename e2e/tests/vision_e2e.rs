//! The whole chain with real programs and a real camera stand-in: a real RTSP server
//! (gst-rtsp-server through `scripts/rtsp-server`) streams the real street clip; an `its-agent`
//! process pulls it, decodes, detects and tracks; its `object_track` events arrive at an
//! `its-aggregator` process over QUIC and are served by its API. Then the RTSP server is killed:
//! the agent reports the camera as reconnecting in its health; the server comes back and the
//! agent recovers by itself, with the reconnect counted and new road users arriving.

use its_testkit::server as common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Proc, agent_bin, aggregator_bin, wait_ready};
use its_aggregator::pki::Pki;

const DEVICE: &str = "vision-box";

use its_testkit::rtsp::{RtspServer, free_tcp_port, project_root as root};

async fn get(http: &reqwest::Client, url: &str) -> serde_json::Value {
    match http.get(url).send().await {
        Ok(r) => r.json().await.unwrap_or(serde_json::Value::Null),
        Err(_) => serde_json::Value::Null,
    }
}

/// Fails the test with the processes' log when `deadline` has passed.
fn check_deadline(deadline: Instant, what: &str, log: &Path) {
    assert!(Instant::now() < deadline, "{what} in time; log tail:\n{}", tail(log));
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The camera's entry in the device's latest health report.
async fn camera_health(http: &reqwest::Client, api: &str) -> serde_json::Value {
    let devices = get(http, &format!("{api}/api/v1/devices")).await;
    devices["devices"]
        .as_array()
        .and_then(|list| list.iter().find(|d| d["device_id"] == DEVICE))
        .and_then(|d| d["last_health"]["cameras"].as_array().and_then(|c| c.first()).cloned())
        .unwrap_or(serde_json::Value::Null)
}

/// New `person` tracks from the camera observed at or after `from_ms`.
async fn people(http: &reqwest::Client, api: &str, from_ms: i64) -> usize {
    let page =
        get(http, &format!("{api}/api/v1/events?kind=object_track&camera=street&limit=500&from={from_ms}")).await;
    page["events"]
        .as_array()
        .map(|evs| {
            evs.iter().filter(|e| e["payload"]["phase"] == "new" && e["payload"]["object"]["label"] == "person").count()
        })
        .unwrap_or(0)
}

/// The whole picture as one zone whose entries carry pictures: the first road user tracked
/// produces a `zone_enter` with a snapshot.
const SCENE: &str = r#"
[cameras.scene]
image_size = [768, 576]
snapshot_kinds = ["zone_enter"]
[[cameras.scene.zones]]
name = "all"
polygon = [[0.0, 0.0], [768.0, 0.0], [768.0, 576.0], [0.0, 576.0]]
"#;

/// Waits for a `zone_enter` with a stored snapshot and checks the pictures the API serves.
async fn check_snapshot(http: &reqwest::Client, api: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        let page = get(http, &format!("{api}/api/v1/events?kind=zone_enter&camera=street&limit=50")).await;
        let with = page["events"].as_array().and_then(|evs| evs.iter().find(|e| e["has_snapshot"] == true).cloned());
        if let Some(e) = with {
            break e["id"].as_str().expect("id").to_string();
        }
        check_deadline(deadline, "a zone_enter event with its snapshot", log);
        pause().await;
    };
    let full = http.get(format!("{api}/api/v1/events/{id}/snapshot")).send().await.expect("GET snapshot");
    assert_eq!(full.status(), 200);
    assert_eq!(full.headers()["content-type"], "image/jpeg");
    let bytes = full.bytes().await.expect("body");
    let img = image::load_from_memory(&bytes).expect("a JPEG");
    assert_eq!((img.width(), img.height()), (768, 576), "the camera's full frame");
    let crop = http.get(format!("{api}/api/v1/events/{id}/snapshot?variant=crop")).send().await.expect("GET crop");
    assert_eq!(crop.status(), 200);
    let crop = image::load_from_memory(&crop.bytes().await.expect("body")).expect("a JPEG");
    assert!(crop.width() < 768 && crop.height() < 576, "a crop around the road user");
}

async fn pause() {
    tokio::time::sleep(Duration::from_millis(250)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_a_real_rtsp_camera_delivers_road_users_and_recovers_when_the_camera_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root_dir = dir.path();
    let pki = Pki::new(root_dir.join("pki"));
    pki.init(&[]).expect("pki init");
    pki.enroll(DEVICE, &root_dir.join("bundle"), 30).expect("enroll");
    let log = root_dir.join("processes.log");

    let ready = root_dir.join("ready.json");
    let envs: Vec<(&str, std::ffi::OsString)> = vec![
        ("ITS_AGGREGATOR__DATABASE_URL", format!("sqlite://{}", root_dir.join("agg.db").display()).into()),
        ("ITS_AGGREGATOR__PKI_DIR", root_dir.join("pki").into()),
        ("ITS_AGGREGATOR__QUIC__LISTEN", "127.0.0.1:0".into()),
        ("ITS_AGGREGATOR__HTTP__LISTEN", "127.0.0.1:0".into()),
        ("ITS_AGGREGATOR__MQTT__LISTEN", "127.0.0.1:0".into()),
    ];
    common::add_admin_cli(&envs);
    let mut cmd = Command::new(aggregator_bin());
    cmd.arg("serve").arg("--ready-file").arg(&ready).envs(envs.iter().map(|(k, v)| (k, v))).env("RUST_LOG", "info");
    let _aggregator = Proc::spawn("aggregator", cmd, &log);
    let addrs = wait_ready(&ready, &log);
    let api = format!("http://{}", addrs.http);

    let port = free_tcp_port();
    let server = RtspServer::start(port);
    let config = root_dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[detector]\nmodel = {:?}\nbackend = \"tract\"\n\n[[cameras]]\nid = \"street\"\nurl = \"rtsp://127.0.0.1:{port}/street\"\ndetect_fps = 5\nstall_timeout_s = 2\nbackoff_base_ms = 200\nbackoff_cap_ms = 1000\n{SCENE}",
            root().join("models/ssd-mobilenet-v2-coco/model.toml").display().to_string()
        ),
    )
    .expect("config");
    let mut cmd = Command::new(agent_bin());
    cmd.arg("--config")
        .arg(&config)
        .arg("run")
        .env("ITS_AGENT__DEVICE_BUNDLE", root_dir.join("bundle"))
        .env("ITS_AGENT__UPLINK__AGGREGATOR", addrs.quic.to_string())
        .env("ITS_AGENT__UPLINK__HEARTBEAT_INTERVAL_S", "1")
        .env("ITS_AGENT__OUTBOX__PATH", root_dir.join("outbox.db"))
        .env("ITS_AGENT__HEALTH__INTERVAL_S", "1")
        .env("RUST_LOG", "info");
    let _agent = Proc::spawn("agent", cmd, &log);

    let http = common::admin_client(addrs.http).await;
    // Real people from the real clip arrive at the aggregator as tracked road users.
    let deadline = Instant::now() + Duration::from_secs(60);
    while people(&http, &api, 0).await < 2 {
        check_deadline(deadline, "tracked people at the aggregator", &log);
        pause().await;
    }
    check_snapshot(&http, &api, &log).await;
    let page = get(&http, &format!("{api}/api/v1/events?kind=object_track&camera=street&limit=1")).await;
    let first = &page["events"][0];
    assert_eq!(first["device_id"], DEVICE, "{first}");
    assert_eq!(first["camera"], "street");
    let b = &first["payload"]["object"]["box"];
    assert!((0..4).all(|k| b[k].as_f64().is_some_and(|v| (0.0..=1.0).contains(&v))), "normalised box: {b}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while camera_health(&http, &api).await["state"] != "streaming" {
        check_deadline(deadline, "the camera reported streaming", &log);
        pause().await;
    }

    // The camera goes away: the agent notices and says so in its health.
    drop(server);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let h = camera_health(&http, &api).await;
        if h["state"] == "reconnecting" && h["reconnects"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        check_deadline(deadline, "the camera reported reconnecting", &log);
        pause().await;
    }
    let back_at = its_agent::unix_ms();

    // It comes back: the agent recovers by itself and new road users arrive.
    let _server = RtspServer::start(port);
    let deadline = Instant::now() + Duration::from_secs(60);
    while people(&http, &api, back_at).await < 1 {
        check_deadline(deadline, "people after the camera came back", &log);
        pause().await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while camera_health(&http, &api).await["state"] != "streaming" {
        check_deadline(deadline, "the camera reported streaming again", &log);
        pause().await;
    }
    let h = camera_health(&http, &api).await;
    assert!(h["reconnects"].as_u64().unwrap_or(0) >= 1, "{h}");
    assert!(h["last_error"].is_string(), "the reason of the loss is kept: {h}");
}
