//! `its-aggregator demo`: the whole flow on one machine with the embedded defaults.
//!
//! Creates a CA, enrolls a device, starts the aggregator (SQLite, QUIC on loopback, HTTP API),
//! starts a real `its-agent` process watching a camera (by default the bundled street clip,
//! looped in real time; or any RTSP URL) with the real detector and tracker, shows the road users
//! it reports arriving at the aggregator, takes the aggregator down for a few seconds (the agent
//! keeps counting into its outbox), brings it back (the outbox drains), and ends with the
//! ack-chain check: every event the agent committed is stored exactly once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::watch;

use crate::config::ServerConfig;
use crate::ingest::IngestConfig;
use crate::pki::Pki;
use crate::server::Server;
use crate::store::{EventQuery, EventStore};

pub const DEMO_DEVICE: &str = "demo-box-1";

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub dir: Option<PathBuf>,
    pub duration: Duration,
    /// Synthetic events per second on top of the cameras (0: none).
    pub rate_per_s: f64,
    /// rtsp:// URLs or video files; empty: the bundled street clip.
    pub cameras: Vec<String>,
    /// Model manifest; `None`: the bundled one.
    pub model: Option<PathBuf>,
    pub backend: String,
    pub http: SocketAddr,
}

/// The bundled street clip and model, relative to the project's root.
const DEMO_CLIP: &str = "media/vtest-street-768x576-10fps.mp4";
const DEMO_MODEL: &str = "models/ssd-mobilenet-v2-coco/model.toml";

/// Finds a file of the project (`media/...`, `models/...`): from the working directory, or
/// upwards from the executable (`target/release/` sits two levels below the project root).
pub fn project_file(rel: &str) -> anyhow::Result<PathBuf> {
    let mut roots = vec![std::env::current_dir().unwrap_or_default()];
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).take(4).map(Path::to_path_buf));
    }
    roots
        .iter()
        .map(|r| r.join(rel))
        .find(|p| p.is_file())
        .with_context(|| format!("{rel} not found (run the demo from the project's directory)"))
}

/// A TOML string literal.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The bundled clip's scene: a count line across the road the pedestrians walk along and a zone
/// over the road where standing a while is reported (with pictures, so the snapshot endpoint has
/// something to show). Counts every 10 s so they show up quickly.
const DEMO_SCENE: &str = r#"
[cameras.scene]
image_size = [768, 576]
counts_interval_s = 10
snapshot_kinds = ["line_crossing", "zone_dwell"]
[[cameras.scene.lines]]
name = "road-east"
points = [[470.0, 150.0], [540.0, 440.0]]
in_side = "left"
classes = ["person"]
[[cameras.scene.zones]]
name = "road"
polygon = [[0.0, 190.0], [330.0, 185.0], [600.0, 150.0], [700.0, 115.0], [768.0, 250.0], [768.0, 480.0], [420.0, 320.0], [0.0, 235.0]]
classes = ["person"]
dwell_s = 15
"#;

/// The agent's configuration for the demo (`scene`: the bundled clip's count line and zone).
fn agent_config(cameras: &[String], model: &Path, backend: &str, scene: bool) -> String {
    let mut out = String::from("[detector]\n");
    out += &format!("model = {}\nbackend = {}\n", toml_str(&model.display().to_string()), toml_str(backend));
    for (i, url) in cameras.iter().enumerate() {
        out += &format!("\n[[cameras]]\nid = \"cam-{}\"\nurl = {}\n", i + 1, toml_str(url));
        if scene {
            out += DEMO_SCENE;
        }
    }
    out
}

/// The `its-agent` binary next to this one (cargo builds both into the same directory).
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating this executable")?;
    let dir = me.parent().context("executable has no directory")?;
    let agent = dir.join(format!("its-agent{}", std::env::consts::EXE_SUFFIX));
    if !agent.is_file() {
        bail!("{} not found: build both programs (`cargo build --release --bins`)", agent.display());
    }
    Ok(agent)
}

struct AgentProcess {
    child: Child,
}

impl AgentProcess {
    fn terminate(&mut self) {
        // SIGTERM: the agent finishes its current transaction and exits cleanly.
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.terminate();
        }
    }
}

/// The agent's outbox counters, from `its-agent outbox-stats` (a blocking child process, so it
/// runs off the async worker's cooperative path).
fn outbox_stats(agent: &Path, outbox: &Path) -> Option<serde_json::Value> {
    tokio::task::block_in_place(|| {
        let out =
            Command::new(agent).arg("outbox-stats").arg("--path").arg(outbox).stderr(Stdio::null()).output().ok()?;
        serde_json::from_slice(&out.stdout).ok()
    })
}

fn server_config(dir: &Path, quic: SocketAddr, http: SocketAddr) -> ServerConfig {
    // The sections the demo does not change take their defaults (so the embedded MQTT broker
    // listens on its default address).
    ServerConfig {
        database_url: format!("sqlite://{}", dir.join("events.db").display()),
        pki_dir: dir.join("pki"),
        ingest: IngestConfig { listen: quic, idle_timeout: Duration::from_secs(10), ..IngestConfig::default() },
        http_listen: http,
        http_tls: None,
        http_trusted_proxies: Vec::new(),
        snapshots: crate::snapshots::SnapshotLocation::Local(dir.to_path_buf()),
        retention: crate::store::RetentionPolicy::off(),
        auth: crate::auth::AuthConfig::default(),
        mqtt: demo_mqtt(),
        ..ServerConfig::default()
    }
}

/// The embedded MQTT broker on its default address, or on any free port when that is taken.
fn demo_mqtt() -> crate::mqtt::MqttConfig {
    let default = crate::mqtt::RawMqtt::default();
    let listen = match std::net::TcpListener::bind(default.listen.as_str()) {
        Ok(_) => default.listen.clone(),
        Err(_) => "127.0.0.1:0".to_owned(),
    };
    crate::mqtt::RawMqtt { listen, ..default }.validate(&mut its_shared::config::ConfigErrors::new("demo"))
}

/// Creates the demo's admin (a fresh random password each run) and a read-only API key, and says
/// how to use them: the API answers nothing without credentials.
async fn demo_credentials(server: &Server, http: SocketAddr) -> anyhow::Result<()> {
    use crate::auth::{AuthService, Permission, PermissionSet, Principal, Role, Subject};
    let auth = AuthService::open(server.store.db(), crate::auth::AuthConfig::default()).await?;
    let password = crate::auth::secrets::random_token(12);
    match auth.store.user_by_name("demo").await? {
        Some(u) => {
            let hash = auth.hash_password(&password).await?;
            auth.store.set_password(u.user_id, &hash, crate::unix_ms()).await?;
        }
        None => {
            auth.create_user("demo", &password, Role::Admin, &crate::store::Scope::All).await?;
        }
    }
    let creator = Principal {
        subject: Subject::User { user_id: 0, username: "demo".into(), role: Role::Admin, session_id: String::new() },
        permissions: PermissionSet::all(),
        scope: crate::store::Scope::All,
        mfa_enrolment_only: false,
        expires_at_ms: None,
    };
    let perms = PermissionSet::of(&[Permission::EventsRead, Permission::DevicesRead, Permission::MetricsRead]);
    let (_, key) = auth
        .create_api_key(
            &creator,
            "demo (read-only)",
            perms,
            crate::store::Scope::All,
            Some(crate::unix_ms() + 86_400_000),
        )
        .await?;
    println!("  API user: admin \"demo\", password {password}");
    println!(
        "    sign in:  curl -s -XPOST http://{http}/api/v1/auth/login -H 'content-type: application/json' -d '{{\"username\":\"demo\",\"password\":\"{password}\"}}'"
    );
    println!("  API key (events:read, devices:read, metrics:read; expires in a day):");
    println!("    curl -s -H 'X-API-Key: {key}' 'http://{http}/api/v1/events?limit=5'");
    println!("    curl -s -H 'X-API-Key: {key}' 'http://{http}/api/v1/metrics?resolution=1m'   (traffic metrics)");
    println!("  the API document: http://{http}/api/v1/openapi.json; without a credential the API answers 401");
    Ok(())
}

/// What the analytics reported so far: crossings by direction, the latest counts, dwell
/// reports, and where the newest picture can be fetched.
async fn traffic_summary(store: &dyn EventStore, http: SocketAddr) -> Option<String> {
    let page = |kind: &str| EventQuery { kind: Some(kind.into()), limit: Some(500), ..EventQuery::default() };
    let crossings = store.query_events(&page("line_crossing")).await.ok()?.events;
    let dwell = store.query_events(&page("zone_dwell")).await.ok()?.events;
    let counts = store.query_events(&EventQuery { limit: Some(1), ..page("counts") }).await.ok()?.events;
    if crossings.is_empty() && dwell.is_empty() && counts.is_empty() {
        return None;
    }
    let dir = |d: &str| crossings.iter().filter(|e| e.payload["direction"] == d).count();
    let mut out = format!("crossings in {} / out {}, standing in the road {}", dir("in"), dir("out"), dwell.len());
    if let Some(c) = counts.first() {
        let per: Vec<String> = c.payload["counts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| {
                        format!(
                            "{} {} {}",
                            x["count"],
                            x["label"].as_str().unwrap_or("?"),
                            x["direction"].as_str().unwrap_or("?")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out += &format!(
            "; last {} s count: {}",
            c.payload["interval_s"],
            if per.is_empty() { "none".into() } else { per.join(", ") }
        );
    }
    if let Some(e) = crossings.iter().chain(&dwell).filter(|e| e.has_snapshot).max_by_key(|e| e.observed_at_ms) {
        out += &format!("; picture (with the key): http://{http}/api/v1/events/{}:{}/snapshot", e.device_id, e.seq);
    }
    Some(out)
}

/// The road users seen since the last call: new tracks by label, and the newest one.
async fn latest_tracks(store: &dyn EventStore, seen_up_to: &mut i64) -> String {
    let q = EventQuery {
        kind: Some("object_track".into()),
        from_ms: Some(*seen_up_to + 1),
        limit: Some(500),
        ..EventQuery::default()
    };
    let page = match store.query_events(&q).await {
        Ok(p) => p,
        Err(e) => return format!("query failed: {e}"),
    };
    let mut new_by_label: std::collections::BTreeMap<String, u32> = Default::default();
    let mut newest: Option<String> = None;
    let mut top = *seen_up_to;
    for e in &page.events {
        let ts = e.observed_at_ms;
        if ts <= *seen_up_to {
            continue;
        }
        top = top.max(ts);
        let p = &e.payload;
        if p.get("phase").and_then(|v| v.as_str()) != Some("new") {
            continue;
        }
        let o = p.get("object");
        let label = o.and_then(|o| o.get("label")).and_then(|l| l.as_str()).unwrap_or("?").to_string();
        if newest.is_none() {
            let id = o.and_then(|o| o.get("track_id")).and_then(|v| v.as_u64()).unwrap_or(0);
            let score = o.and_then(|o| o.get("score")).and_then(|v| v.as_f64()).unwrap_or(0.0);
            newest = Some(format!("newest: {} {label} #{id} ({score:.2})", e.camera));
        }
        *new_by_label.entry(label).or_default() += 1;
    }
    *seen_up_to = top;
    if new_by_label.is_empty() {
        return String::new();
    }
    let counts: Vec<String> = new_by_label.iter().map(|(l, n)| format!("{n} {l}")).collect();
    format!("new road users: {}; {}", counts.join(", "), newest.unwrap_or_default())
}

pub async fn run_demo(opts: DemoOptions, metrics: metrics_exporter_prometheus::PrometheusHandle) -> anyhow::Result<()> {
    let dir = match &opts.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("its-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let agent_bin = agent_binary()?;
    let cameras = if opts.cameras.is_empty() {
        vec![project_file(DEMO_CLIP)?.display().to_string()]
    } else {
        opts.cameras.clone()
    };
    let model = match &opts.model {
        Some(m) => m.clone(),
        None => project_file(DEMO_MODEL)?,
    };
    println!("ITS Camera AI demo — working directory {}", dir.display());

    let pki = Pki::new(dir.join("pki"));
    if !pki.is_initialised() {
        pki.init(&[])?;
        println!("  created the fleet CA and the aggregator's certificate in {}", pki.dir().display());
    }
    let bundle_dir = dir.join("agent").join("device");
    pki.enroll(DEMO_DEVICE, &bundle_dir, 365)?;
    println!("  enrolled device {DEMO_DEVICE}: bundle in {}", bundle_dir.display());

    let (stop_tx, stop_rx) = watch::channel(false);
    let quic_any: SocketAddr = ([127, 0, 0, 1], 0).into();
    let http = match std::net::TcpListener::bind(opts.http) {
        Ok(l) => {
            drop(l);
            opts.http
        }
        Err(_) => ([127, 0, 0, 1], 0).into(),
    };
    let mut server = Server::start(&server_config(&dir, quic_any, http), metrics.clone(), None, stop_rx).await?;
    let quic = server.addrs.quic;
    println!("  aggregator: QUIC {quic} (mutual TLS), API http://{}/api/v1/events", server.addrs.http);
    demo_credentials(&server, server.addrs.http).await?;
    if let Some(mqtt) = server.addrs.mqtt {
        println!(
            "  MQTT for third parties: broker {mqtt}, topics its/v1/{{site}}/{{camera}}/events/{{kind}} \
             (logins for integrators: POST /api/v1/mqtt/credentials)"
        );
    }

    let outbox = dir.join("agent").join("outbox.db");
    let config = dir.join("agent").join("agent.toml");
    std::fs::write(&config, agent_config(&cameras, &model, &opts.backend, opts.cameras.is_empty()))
        .with_context(|| format!("writing {}", config.display()))?;
    let synthetic = opts.rate_per_s > 0.0;
    let child = Command::new(&agent_bin)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("ITS_AGENT__DEVICE_BUNDLE", &bundle_dir)
        .env("ITS_AGENT__UPLINK__AGGREGATOR", quic.to_string())
        .env("ITS_AGENT__UPLINK__HEARTBEAT_INTERVAL_S", "2")
        .env("ITS_AGENT__UPLINK__BACKOFF_CAP_MS", "1000")
        .env("ITS_AGENT__OUTBOX__PATH", &outbox)
        .env("ITS_AGENT__SYNTHETIC__ENABLED", synthetic.to_string())
        .env("ITS_AGENT__SYNTHETIC__RATE_PER_S", opts.rate_per_s.max(1.0).to_string())
        .env("ITS_AGENT__SYNTHETIC__CAMERAS", "[\"synthetic\"]")
        .env("ITS_AGENT__HEALTH__INTERVAL_S", "5")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", agent_bin.display()))?;
    let mut agent = AgentProcess { child };
    println!("  agent started: model {}, backend {}", model.display(), opts.backend);
    for (i, c) in cameras.iter().enumerate() {
        println!("    cam-{}: {c}", i + 1);
    }
    if synthetic {
        println!("    plus {} synthetic events/s", opts.rate_per_s);
    }
    println!("  (loading the model takes a few seconds; then road users appear as object_track events)\n");

    let started = Instant::now();
    let outage_at = opts.duration / 3;
    let outage_len = Duration::from_secs(5);
    let mut outage_done = false;
    let mut stop_tx = stop_tx;
    let mut seen_up_to = 0i64;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let t = started.elapsed();
        let stored = server.store.device_event_summary(DEMO_DEVICE).await.map(|s| s.total).unwrap_or(0);
        let ob = outbox_stats(&agent_bin, &outbox);
        let pending = ob.as_ref().and_then(|v| v["pending_events"].as_u64()).unwrap_or(0);
        let produced = ob.as_ref().and_then(|v| v["produced_total"].as_u64()).unwrap_or(0);
        println!(
            "  t={:>3}s  produced {produced:>5}  stored {stored:>5}  waiting {pending:>4}  {}",
            t.as_secs(),
            latest_tracks(server.store.as_ref(), &mut seen_up_to).await
        );
        if let Some(line) = traffic_summary(server.store.as_ref(), server.addrs.http).await {
            println!("          {line}");
        }
        if !outage_done && !opts.duration.is_zero() && t >= outage_at {
            outage_done = true;
            println!(
                "\n  -- stopping the aggregator for {} s: the agent keeps counting into its outbox --",
                outage_len.as_secs()
            );
            let _ = stop_tx.send(true);
            server.wait().await?;
            for _ in 0..(outage_len.as_secs() / 2).max(1) {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let ob = outbox_stats(&agent_bin, &outbox);
                let pending = ob.as_ref().and_then(|v| v["pending_events"].as_u64()).unwrap_or(0);
                println!("  aggregator down: {pending} events waiting in the agent's outbox");
            }
            let (tx, rx) = watch::channel(false);
            stop_tx = tx;
            // The old endpoint may hold the UDP port for a moment after closing.
            let mut attempt = 0;
            server = loop {
                match Server::start(&server_config(&dir, quic, http), metrics.clone(), None, rx.clone()).await {
                    Ok(s) => break s,
                    Err(e) if attempt < 20 => {
                        attempt += 1;
                        tracing::debug!(error = %format!("{e:#}"), "restart not yet possible");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            println!("  -- aggregator back on the same address: the outbox drains --\n");
        }
        if !opts.duration.is_zero() && t >= opts.duration {
            break;
        }
    }
    tokio::task::block_in_place(|| agent.terminate());
    println!("\n  agent stopped; starting it again without cameras so the outbox drains completely");
    let child = Command::new(&agent_bin)
        .env("ITS_AGENT__CAMERAS", "[]")
        .env("ITS_AGENT__DEVICE_BUNDLE", &bundle_dir)
        .env("ITS_AGENT__UPLINK__AGGREGATOR", server.addrs.quic.to_string())
        .env("ITS_AGENT__OUTBOX__PATH", &outbox)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", agent_bin.display()))?;
    let mut agent = AgentProcess { child };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pending = outbox_stats(&agent_bin, &outbox).and_then(|v| v["pending_events"].as_u64());
        if pending == Some(0) {
            break;
        }
    }
    tokio::task::block_in_place(|| agent.terminate());
    let summary = server.store.device_event_summary(DEMO_DEVICE).await?;
    let ob = outbox_stats(&agent_bin, &outbox).unwrap_or_default();
    let produced = ob["produced_total"].as_u64().unwrap_or(0);
    let evicted = ob["evicted_total"].as_u64().unwrap_or(0);
    let pending = ob["pending_events"].as_u64().unwrap_or(0);
    println!(
        "  produced {produced}, stored {} ({} distinct), waiting in outbox {pending}, evicted {evicted}",
        summary.total, summary.distinct_seqs
    );
    let _ = stop_tx.send(true);
    server.wait().await?;
    if summary.total == summary.distinct_seqs && pending == 0 && summary.total + evicted == produced {
        println!("  ack chain holds: every event the agent committed is stored exactly once.");
        Ok(())
    } else {
        bail!(
            "ack chain check failed: produced {produced}, stored {}, waiting {pending}, evicted {evicted}",
            summary.total
        )
    }
}
