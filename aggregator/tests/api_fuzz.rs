//! The REST API against its own OpenAPI document, with the real binary over a seeded SQLite
//! database:
//! - schemathesis (`scripts/setup-test-peers` installs it) fuzzes every operation with valid and
//!   invalid data and runs all its checks: no 5xx, every status code, content type, header and
//!   body as documented, invalid data refused, valid data accepted, authentication enforced;
//! - SQL injection through every filter of `GET /api/v1/events` answers 200 with no event or 400
//!   with the error form (never 5xx, never everything), and leaves the events table intact; on
//!   SQLite and on the machine's PostgreSQL.

use its_testkit::server as common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Proc, aggregator_bin, wait_ready};
use its_aggregator::store::{CameraPatch, DevicePatch, EventStore, Fleet, NewSnapshot, open_store};
use its_shared::event::{ClassCount, Direction, ObjectRef, Phase};
use its_shared::wire::{Heartbeat, Hello};
use its_shared::{DeviceHealth, EventEnvelope, EventKind};
use serde_json::Value;

const ADMIN: (&str, &str) = ("fuzz-admin", "fuzz-admin-password");
/// A second user for the operations that change or sign out a user (the admin must stay signed in).
const VICTIM: (&str, &str) = ("fuzz-victim", "fuzz-victim-password");
/// Events seeded per device.
const EVENTS_PER_DEVICE: u64 = 40;

/// The schemathesis executable: `$ITS_SCHEMATHESIS`, else where `scripts/setup-test-peers` links it.
fn schemathesis() -> PathBuf {
    let path = std::env::var_os("ITS_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/schemathesis/bin/schemathesis"));
    assert!(
        path.is_file(),
        "schemathesis is not installed at {}: run scripts/setup-test-peers (or set ITS_SCHEMATHESIS)",
        path.display()
    );
    path
}

/// A running aggregator over a seeded database, with its admin signed in.
struct Server {
    _proc: Proc,
    http: SocketAddr,
    token: String,
    database_url: String,
    root: PathBuf,
    log: PathBuf,
}

impl Server {
    async fn start(root: &Path, database_url: &str) -> Self {
        let config = root.join("aggregator.toml");
        std::fs::write(
            &config,
            format!(
                "database_url = {db:?}\npki_dir = {pki:?}\n[quic]\nlisten = \"127.0.0.1:0\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
                 [mqtt]\nlisten = \"127.0.0.1:0\"\n[snapshots]\nurl = {snaps:?}\n",
                db = database_url,
                pki = root.join("pki").display().to_string(),
                snaps = format!("file://{}", root.join("objects").display()),
            ),
        )
        .expect("write config");
        let cli = |args: &[&str], stdin: Option<&str>| {
            let mut cmd = Command::new(aggregator_bin());
            cmd.arg("-c").arg(&config).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
            let mut child = cmd.spawn().expect("its-aggregator");
            if let Some(text) = stdin {
                child.stdin.take().expect("stdin").write_all(format!("{text}\n").as_bytes()).expect("stdin");
            }
            let out = child.wait_with_output().expect("its-aggregator");
            assert!(out.status.success(), "its-aggregator {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        cli(&["pki", "init"], None);
        seed(database_url, &root.join("objects")).await;
        cli(&["user", "add", ADMIN.0, "--role", "admin", "--password-stdin"], Some(ADMIN.1));
        cli(&["user", "add", VICTIM.0, "--role", "viewer", "--password-stdin"], Some(VICTIM.1));

        let (ready, log) = (root.join("ready.json"), root.join("aggregator.log"));
        let mut cmd = Command::new(aggregator_bin());
        cmd.arg("-c").arg(&config).arg("serve").arg("--ready-file").arg(&ready).env("RUST_LOG", "warn");
        let proc = Proc::spawn("aggregator", cmd, &log);
        let http = tokio::task::block_in_place(|| wait_ready(&ready, &log)).http;

        let resp = reqwest::Client::new()
            .post(format!("http://{http}/api/v1/auth/login"))
            .json(&serde_json::json!({ "username": ADMIN.0, "password": ADMIN.1 }))
            .send()
            .await
            .expect("login");
        assert_eq!(resp.status().as_u16(), 200, "login");
        let body: Value = resp.json().await.expect("login body");
        let token = body["access_token"].as_str().expect("access token").to_owned();
        Self { _proc: proc, http, token, database_url: database_url.to_owned(), root: root.to_owned(), log }
    }

    fn client(&self) -> reqwest::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            reqwest::header::HeaderValue::from_str(&format!("Bearer {}", self.token)).expect("header"),
        );
        reqwest::Client::builder().default_headers(headers).timeout(Duration::from_secs(30)).build().expect("client")
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

fn object(track_id: u64, label: &str) -> ObjectRef {
    ObjectRef { track_id, label: label.to_owned(), score: 0.8, bbox: [0.1, 0.2, 0.3, 0.4] }
}

/// Event kinds in turn, with lines, zones, directions, speeds and classes to filter on.
fn kind(seq: u64) -> EventKind {
    let label = ["car", "truck", "bus", "person"][(seq % 4) as usize];
    match seq % 7 {
        0 => EventKind::LineCrossing {
            line: "north".into(),
            object: object(seq, label),
            direction: if seq.is_multiple_of(2) { Direction::In } else { Direction::Out },
            speed_kmh: Some(30.0 + seq as f32),
        },
        1 => EventKind::SpeedMeasurement { object: object(seq, label), speed_kmh: 55.5, zone: Some("lane-1".into()) },
        2 => EventKind::ZoneEnter { zone: "junction".into(), object: object(seq, label) },
        3 => EventKind::StoppedVehicle { zone: "shoulder".into(), object: object(seq, label), stopped_s: 42.0 },
        4 => EventKind::Congestion {
            zone: "junction".into(),
            phase: Phase::Started,
            occupancy: 9,
            mean_speed_kmh: Some(8.5),
            queue_length_m: Some(40.0),
        },
        5 => EventKind::Counts {
            line: "north".into(),
            interval_s: 60,
            counts: vec![ClassCount { label: "car".into(), direction: Direction::In, count: 12 }],
        },
        _ => EventKind::WrongWay { zone: "ramp".into(), object: object(seq, label), distance_m: 25.0, speed_kmh: None },
    }
}

/// Two devices with three cameras, events of several kinds, a health report, two sites (one
/// device and one camera assigned) and a snapshot of `box-1:1` (full frame and crop).
async fn seed(database_url: &str, objects: &Path) {
    // An hour ago: retention (90 days by default) keeps them.
    let t0 = its_aggregator::unix_ms() - 3_600_000;
    let store = open_store(database_url, its_aggregator::vault::Vault::ephemeral()).await.expect("open store");
    for (device, cameras) in [("box-1", &["cam-a", "cam-b"][..]), ("box-2", &["cam-c"][..])] {
        let hello = Hello {
            agent_version: "1.0.0".into(),
            model: "yolo11n".into(),
            cameras: cameras.iter().map(|c| (*c).to_owned()).collect(),
            last_acked_seq: 0,
            last_assigned_seq: 0,
        };
        store.record_hello(device, &hello, t0).await.expect("hello");
        let events: Vec<EventEnvelope> = (1..=EVENTS_PER_DEVICE)
            .map(|seq| EventEnvelope {
                seq,
                camera: cameras[(seq as usize) % cameras.len()].to_owned(),
                observed_at_ms: t0 + seq as i64 * 1000,
                kind: kind(seq),
            })
            .collect();
        store.insert_events(device, &events, t0 + 60_000).await.expect("insert events");
        let hb = Heartbeat { sent_at_ms: t0, health: DeviceHealth { uptime_s: 60, ..Default::default() } };
        store.record_health(device, &hb, t0 + 1000).await.expect("health");
    }
    let fleet = Fleet::new(store.db());
    fleet.create_site("north", "North junction", t0).await.expect("site");
    fleet.create_site("south", "South ramp", t0).await.expect("site");
    let patch = DevicePatch { site_id: Some(Some("north".into())), ..Default::default() };
    fleet.update_device("box-1", &patch, &its_aggregator::store::Scope::All, t0).await.expect("assign device");
    let patch = CameraPatch { site_id: Some(Some("south".into())), name: Some(Some("Ramp".into())) };
    fleet.update_camera("box-2", "cam-c", &patch, &its_aggregator::store::Scope::All).await.expect("assign camera");

    let jpeg: &[u8] =
        &[0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10, b'J', b'F', b'I', b'F', 0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 0xFF, 0xD9];
    let dir = objects.join("snapshots/box-1");
    std::fs::create_dir_all(&dir).expect("snapshot dir");
    std::fs::write(dir.join("1.jpg"), jpeg).expect("snapshot");
    std::fs::write(dir.join("1-crop.jpg"), jpeg).expect("crop");
    let snap = NewSnapshot {
        seq: 1,
        camera: "cam-b",
        taken_at_ms: t0 + 1000,
        full_key: "snapshots/box-1/1.jpg",
        full_bytes: jpeg.len() as u64,
        crop: Some(("snapshots/box-1/1-crop.jpg", jpeg.len() as u64)),
    };
    assert!(store.record_snapshot("box-1", &snap, t0 + 2000).await.expect("snapshot"), "snapshot recorded");
}

async fn event_count(store: &dyn EventStore) -> u64 {
    let mut n = 0;
    for device in ["box-1", "box-2"] {
        n += store.device_event_summary(device).await.expect("summary").total;
    }
    n
}

/// schemathesis' configuration (`schemathesis.toml`): which checks run where, and the seeded
/// identifiers it should try besides the ones it makes up.
fn schemathesis_config(victim_id: i64, api_key_id: &str) -> String {
    format!(
        r#"
# Every check. (Given on the command line, `--checks all` would also override the per-operation
# exceptions below.)
[checks]
enabled = true

# Generated data is thrown away: each run is the same for the same seed and binary.
[cache]
enabled = false

[dictionaries]
devices = {{ values = ["box-1", "box-2"] }}
cameras = {{ values = ["cam-a", "cam-b", "cam-c"] }}
sites = {{ values = ["north", "south"] }}
events = {{ values = ["box-1:1", "box-1:2", "box-2:7"] }}
roles = {{ values = ["operator", "analyst", "viewer", "integrator", "device"] }}
api_keys = {{ values = ["{api_key_id}"] }}

# Half of the time, identifiers that exist (else only 404s would be seen).
[parameters]
"path.device" = {{ dictionary = "devices", probability = 0.5 }}
"path.camera" = {{ dictionary = "cameras", probability = 0.5 }}
"path.site" = {{ dictionary = "sites", probability = 0.5 }}
"query.device" = {{ dictionary = "devices", probability = 0.3 }}
"query.camera" = {{ dictionary = "cameras", probability = 0.3 }}
"query.site" = {{ dictionary = "sites", probability = 0.3 }}

[[operations]]
include-operation-id = "event_snapshot"
parameters = {{ "path.id" = {{ dictionary = "events", probability = 0.5 }} }}

# The live stream stays open until `duration_s` is over (by default until the client leaves):
# pinned to 0 here, so that every case answers at once with just the `: ready` comment, while the
# other parameters are generated as for any operation.
[[operations]]
include-operation-id = "stream_events"
parameters = {{ "query.duration_s" = 0 }}

[[operations]]
include-operation-id = "revoke_api_key"
parameters = {{ "path.id" = {{ dictionary = "api_keys", probability = 0.3 }} }}

# Changing a user (any change signs them out) or resetting their MFA: only the second user, so
# that the admin whose token the run uses stays signed in and enabled.
[[operations]]
include-operation-id = ["update_user", "reset_mfa"]
parameters = {{ "path.id" = {victim_id} }}

# Requiring MFA for the admin role would leave the run's admin able only to enrol: other roles.
[[operations]]
include-operation-id = "set_role_policy"
parameters = {{ "path.role" = {{ dictionary = "roles", probability = 1.0 }} }}

# `positive_data_acceptance` (schema-valid data must be accepted) is off only where the API
# checks what JSON Schema cannot say about a request, and answers 400 as documented:
# - list_events, device_health: `from` after `to` and `min_speed` above `max_speed` (a relation
#   between parameters), and the events `cursor`, an opaque token only the service issues;
# - list_metrics, list_anomalies: their `cursor` too;
# - update_device, update_camera: `site_id` must name an existing site;
# - create_user, update_user: a password must not be one repeated character, and grants are only
#   for the viewer and integrator roles;
# - create_channel, update_channel: a target may not be a loopback or link-local address.
[[operations]]
include-operation-id = ["list_events", "device_health", "list_metrics", "list_anomalies", "update_device", "update_camera", "create_user", "update_user", "create_channel", "update_channel"]
checks.positive_data_acceptance.enabled = false
"#
    )
}

/// Runs schemathesis against the server; `Err` with its report when it fails.
fn run_schemathesis(server: &Server, config: &Path) -> Result<String, String> {
    let seed = std::env::var("ITS_API_FUZZ_SEED").unwrap_or_else(|_| "20240501".to_owned());
    let max_examples = std::env::var("ITS_API_FUZZ_MAX_EXAMPLES").unwrap_or_else(|_| "30".to_owned());
    println!("schemathesis seed {seed}, {max_examples} examples per operation");
    let work = server.root.join("schemathesis");
    std::fs::create_dir_all(&work).expect("work dir");
    let mut cmd = Command::new(schemathesis());
    cmd.current_dir(&work)
        .arg("--config-file")
        .arg(config)
        .arg("run")
        .arg(server.url("/api/v1/openapi.json"))
        .args(["--header", &format!("Authorization: Bearer {}", server.token)])
        // Valid and invalid data, 30 cases per operation and phase, the same cases every run
        // (ITS_API_FUZZ_SEED picks others, ITS_API_FUZZ_MAX_EXAMPLES makes a longer run).
        .args(["--mode", "all", "--max-examples", &max_examples, "--seed", &seed])
        .args(["--generation-database", "none", "--request-timeout", "20"])
        // Signing out revokes the session whose token every request of the run carries: all that
        // follows would be 401. The other operations on the caller's own account stay in, as
        // they cannot succeed with made-up data: a password change needs the current password,
        // MFA confirm and disable need a code of an enrolled secret. A key rotation keeps the
        // tokens signed with older keys valid until they expire. Changing a user, resetting MFA
        // and role policies are pointed at the second user and other roles by the configuration.
        .args(["--exclude-operation-id", "logout"])
        .args(["--continue-on-failure", "--no-color", "--output-truncate", "false"])
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("starting schemathesis: {e}"));
    let pid = child.id();
    // A bound on the whole run (it takes well under a minute on 2 cores).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let limit = if max_examples == "30" { 240 } else { 3600 };
    let out = match rx.recv_timeout(Duration::from_secs(limit)) {
        Ok(out) => out.expect("schemathesis output"),
        Err(_) => {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
            return Err(format!("schemathesis did not finish within {limit} s"));
        }
    };
    let report = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() { Ok(report) } else { Err(report) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_survives_schemathesis() {
    let schemathesis_path = schemathesis();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("agg.db").display());
    let server = Server::start(dir.path(), &url).await;
    let client = server.client();

    let users: Value = client.get(server.url("/api/v1/users")).send().await.expect("users").json().await.expect("json");
    let victim_id = users["users"]
        .as_array()
        .expect("users")
        .iter()
        .find(|u| u["username"] == VICTIM.0)
        .and_then(|u| u["user_id"].as_i64())
        .expect("the second user");
    let key: Value = client
        .post(server.url("/api/v1/api-keys"))
        .json(&serde_json::json!({ "name": "fuzz", "permissions": ["events:read"] }))
        .send()
        .await
        .expect("api key")
        .json()
        .await
        .expect("json");
    let key_id = key["key_id"].as_str().expect("key id").to_owned();

    let config = dir.path().join("schemathesis.toml");
    std::fs::write(&config, schemathesis_config(victim_id, &key_id)).expect("config");
    println!("schemathesis: {}", schemathesis_path.display());
    let started = Instant::now();
    let outcome = tokio::task::block_in_place(|| run_schemathesis(&server, &config));
    match outcome {
        Ok(report) => println!("{report}"),
        Err(report) => {
            panic!("schemathesis found problems:\n{report}\n\naggregator log tail:\n{}", server.log_tail())
        }
    }
    println!("schemathesis took {:.1} s", started.elapsed().as_secs_f64());

    // The run signed nobody out that it should not have, and the service is still whole.
    let me = client.get(server.url("/api/v1/auth/me")).send().await.expect("me");
    assert_eq!(me.status().as_u16(), 200, "the admin is still signed in");
    let health = client.get(server.url("/healthz")).send().await.expect("healthz");
    assert_eq!(health.status().as_u16(), 200);
}

/// The filters of `GET /api/v1/events`.
const FILTERS: &[&str] = &[
    "device",
    "camera",
    "kind",
    "site",
    "class",
    "zone",
    "line",
    "direction",
    "from",
    "to",
    "cursor",
    "min_speed",
    "max_speed",
    "has_snapshot",
];

fn injection_payloads() -> Vec<String> {
    let mut p: Vec<String> = [
        "' OR 1=1 --",
        "' OR '1'='1",
        "box-1' OR '1'='1",
        "\"; DROP TABLE events; --",
        "'; DROP TABLE events; --",
        "1; DELETE FROM events",
        "1) UNION SELECT NULL, NULL, NULL --",
        "' UNION SELECT username, password_hash FROM users --",
        "1 OR 1=1",
        "%' OR '%'='",
        "%",
        "_",
        "*",
        "\\",
        "box-1\0",
        "\0' OR 1=1 --",
        "\0",
        "'||(SELECT sqlite_version())||'",
        "'; SELECT pg_sleep(5); --",
        "$1",
        "?",
        "1e999",
        "NaN",
        "-1 OR 1=1",
        "true OR 1=1",
        "Tür' OR 'ü'='ü",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    p.push("' OR 1=1 -- ".repeat(1000)); // 12 KB, about 36 KB in the URL
    p.push("A".repeat(16 * 1024));
    p
}

/// Every filter with every payload: 200 with no event or 400 with the error form; the events
/// table intact afterwards.
async fn injection_through_filters(database_url: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), database_url).await;
    let client = server.client();
    let store = open_store(&server.database_url, its_aggregator::vault::Vault::ephemeral()).await.expect("open store");
    let before = event_count(store.as_ref()).await;
    assert_eq!(before, 2 * EVENTS_PER_DEVICE);

    // A real filter matches (the test is not vacuous), and the unfiltered list is not empty.
    let get = |query: Vec<(String, String)>| {
        let (client, url) = (client.clone(), server.url("/api/v1/events"));
        async move {
            let resp = client.get(url).query(&query).send().await.expect("events request");
            let status = resp.status().as_u16();
            let body = resp.text().await.expect("body");
            (status, body)
        }
    };
    let (status, body) = get(vec![("device".into(), "box-1".into()), ("limit".into(), "1000".into())]).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["events"].as_array().map(Vec::len), Some(EVENTS_PER_DEVICE as usize));

    let mut outcomes = std::collections::BTreeMap::<(&str, u16), usize>::new();
    for filter in FILTERS {
        for payload in injection_payloads() {
            let (status, body) =
                get(vec![((*filter).to_owned(), payload.clone()), ("limit".into(), "1000".into())]).await;
            let shown: String = payload.chars().take(60).collect();
            let v: Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("{filter}={shown:?}: {status} with a body that is not JSON ({e}): {body}"));
            match status {
                200 => {
                    let events = v["events"].as_array().unwrap_or_else(|| panic!("{filter}={shown:?}: {body}"));
                    assert!(events.is_empty(), "{filter}={shown:?} matched {} events", events.len());
                }
                400 => {
                    let err = v["error"].as_object().unwrap_or_else(|| panic!("{filter}={shown:?}: {body}"));
                    assert!(err["code"].as_str().is_some_and(|c| !c.is_empty()), "{filter}={shown:?}: {body}");
                    assert!(err["message"].as_str().is_some(), "{filter}={shown:?}: {body}");
                    assert_eq!(err.len(), 2, "{filter}={shown:?}: {body}");
                }
                _ => panic!("{filter}={shown:?}: {status} {body}\nlog tail:\n{}", server.log_tail()),
            }
            *outcomes.entry((*filter, status)).or_default() += 1;
        }
    }
    // Names that are not filters are refused, whatever they hold.
    for name in ["' OR 1=1 --", "device' OR '1'='1", "device;DROP TABLE events", "scope"] {
        let (status, body) = get(vec![(name.to_owned(), "x".into())]).await;
        assert_eq!(status, 400, "{name:?}: {body}");
        assert!(body.contains("unknown_parameter"), "{name:?}: {body}");
    }
    println!("{outcomes:?}");
    // Text filters compare values: an injection names nothing, so the answer is an empty page.
    for filter in ["device", "camera", "site", "class", "zone", "line"] {
        assert_eq!(outcomes.get(&(filter, 200)), Some(&injection_payloads().len()), "{filter}: {outcomes:?}");
    }

    assert_eq!(event_count(store.as_ref()).await, before, "the events table changed");
    let (status, body) = get(vec![("limit".into(), "1000".into())]).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["events"].as_array().map(Vec::len), Some(before as usize), "every event still listed");
    let resp = reqwest::Client::new()
        .post(server.url("/api/v1/auth/login"))
        .json(&serde_json::json!({ "username": VICTIM.0, "password": VICTIM.1 }))
        .send()
        .await
        .expect("login");
    assert_eq!(resp.status().as_u16(), 200, "the users table is intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_injection_through_event_filters_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    injection_through_filters(&format!("sqlite://{}", dir.path().join("agg.db").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_injection_through_event_filters_postgres() {
    let db = common::PgDatabase::create("its_injection").await;
    injection_through_filters(&db.url).await;
    db.drop_db().await;
}
