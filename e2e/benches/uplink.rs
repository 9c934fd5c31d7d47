//! Uplink benchmark: events from the agent's outbox into the aggregator's storage, over the real
//! QUIC uplink with mutual TLS, against SQLite and PostgreSQL; and, side by side, the same events
//! pushed through the machine's Mosquitto broker (MQTT QoS 1) into the same storage.
//!
//! ```text
//! cargo bench -p its-e2e --bench uplink -- [--events N] [--backends sqlite,postgres] [--no-mqtt]
//! ```
//! PostgreSQL: `ITS_TEST_PG_URL` (default postgres://postgres@127.0.0.1:5432/test; a scratch
//! database is created and dropped). Mosquitto: `ITS_BENCH_MQTT` (default 127.0.0.1:1883).

use its_aggregator::unix_ms;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use its_agent::buffer::{NewEvent, Outbox, OutboxConfig};
use its_agent::source::synthetic::{SYNTHETIC_KINDS, synthetic_event};
use its_agent::uplink::quic::HealthFn;
use its_agent::uplink::tls::DeviceBundle;
use its_agent::uplink::{UplinkConfig, UplinkHandle, run_uplink};
use its_aggregator::store::{EventQuery, EventStore, open_store};
use its_shared::EventEnvelope;
use its_shared::session::AgentSessionConfig;
use its_testkit::server::TestServer;
use rand::Rng;
use tokio::sync::watch;

fn events(n: usize, at: i64) -> Vec<NewEvent> {
    let mut rng = rand::rng();
    (0..n)
        .map(|i| {
            let kind = SYNTHETIC_KINDS[rng.random_range(0..SYNTHETIC_KINDS.len())];
            NewEvent { camera: format!("cam-{}", i % 4), observed_at_ms: at, kind: synthetic_event(&mut rng, kind) }
        })
        .collect()
}

/// The aggregator under test, storing into `database_url`.
type Setup = TestServer;

async fn setup(database_url: &str) -> anyhow::Result<Setup> {
    TestServer::start_with(|_, cfg| cfg.database_url = database_url.to_string()).await
}

/// Session tuning under test (`--batch`, `--window`); the agent's defaults otherwise.
static SESSION: std::sync::OnceLock<AgentSessionConfig> = std::sync::OnceLock::new();

fn uplink_config(s: &Setup, bundle: &std::path::Path) -> UplinkConfig {
    UplinkConfig {
        aggregator: s.server.addrs.quic.to_string(),
        server_name: "its-aggregator".into(),
        bundle: DeviceBundle::in_dir(bundle),
        session: SESSION.get().cloned().unwrap_or_default(),
        backoff_base: Duration::from_millis(50),
        backoff_cap: Duration::from_millis(500),
        jitter: false,
        idle_timeout: Duration::from_secs(10),
        keep_alive: Duration::from_secs(2),
        agent_version: "bench".into(),
        model: "none".into(),
        cameras: vec![],
    }
}

async fn wait_stored(store: &dyn EventStore, device: &str, n: u64, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        // The highest stored seq is an index lookup (a COUNT would load the database under test);
        // the aggregator stores a device's events in order, so it reaching n means all are in.
        let hw = store.high_water(device).await?;
        if hw >= n {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "only up to seq {hw} of {n} stored");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn open_outbox(root: &std::path::Path, name: &str) -> anyhow::Result<Arc<Outbox>> {
    let mut cfg = OutboxConfig::new(root.join(name));
    cfg.max_bytes = 4 * 1024 * 1024 * 1024;
    Ok(Arc::new(Outbox::open(cfg)?))
}

struct Drain {
    append_per_s: f64,
    drain_per_s: f64,
}

/// Pre-fills an outbox with `n` events, then measures the drain to storage.
async fn quic_drain(s: &Setup, n: usize) -> anyhow::Result<Drain> {
    let device = "bench-drain";
    let bundle = s.root.join(device);
    s.pki.enroll(device, &bundle, 1)?;
    let outbox = open_outbox(&s.root, "drain.db")?;
    let t = Instant::now();
    for chunk in 0..n.div_ceil(5000) {
        let k = (n - chunk * 5000).min(5000);
        let ob = outbox.clone();
        tokio::task::spawn_blocking(move || ob.append(&events(k, unix_ms()), unix_ms())).await??;
    }
    let append_per_s = n as f64 / t.elapsed().as_secs_f64();
    let handle = Arc::new(UplinkHandle::default());
    let (tx, rx) = watch::channel(false);
    let health: HealthFn = Arc::new(its_shared::DeviceHealth::default);
    let t = Instant::now();
    let task = tokio::spawn(run_uplink(uplink_config(s, &bundle), outbox.clone(), handle, health, rx));
    wait_stored(s.server.store.as_ref(), device, n as u64, Duration::from_secs(600)).await?;
    let drain_per_s = n as f64 / t.elapsed().as_secs_f64();
    let _ = tx.send(true);
    task.await??;
    Ok(Drain { append_per_s, drain_per_s })
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Produces at `rate` events/s for `secs` while the uplink runs; returns (p50, p99, max) of
/// stored_at - committed_at in ms, and the number of events.
async fn quic_latency(s: &Setup, rate: u64, secs: u64) -> anyhow::Result<(i64, i64, i64, usize)> {
    let device = format!("bench-live-{rate}");
    let bundle = s.root.join(&device);
    s.pki.enroll(&device, &bundle, 1)?;
    let outbox = open_outbox(&s.root, &format!("{device}.db"))?;
    let handle = Arc::new(UplinkHandle::default());
    let (tx, rx) = watch::channel(false);
    let health: HealthFn = Arc::new(its_shared::DeviceHealth::default);
    let task = tokio::spawn(run_uplink(uplink_config(s, &bundle), outbox.clone(), handle.clone(), health, rx));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tick = Duration::from_millis(5);
    let per_tick = (rate as f64 * tick.as_secs_f64()).max(1.0) as usize;
    let mut interval = tokio::time::interval(tick);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut produced = 0usize;
    while Instant::now() < end {
        interval.tick().await;
        let ob = outbox.clone();
        // observed_at is taken just before the commit: the figure includes the agent's own fsync.
        tokio::task::spawn_blocking(move || ob.append(&events(per_tick, unix_ms()), unix_ms())).await??;
        produced += per_tick;
        handle.appended.notify_one();
    }
    wait_stored(s.server.store.as_ref(), &device, produced as u64, Duration::from_secs(120)).await?;
    let _ = tx.send(true);
    task.await??;
    let mut lat = Vec::with_capacity(produced);
    let mut q = EventQuery { device: Some(device.clone()), limit: Some(1000), ..EventQuery::default() };
    loop {
        let page = s.server.store.query_events(&q).await?;
        lat.extend(page.events.iter().map(|e| e.ingested_at_ms - e.observed_at_ms));
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => break,
        }
    }
    lat.sort_unstable();
    Ok((percentile(&lat, 0.5), percentile(&lat, 0.99), lat.last().copied().unwrap_or(0), lat.len()))
}

/// Messages in flight end to end on the MQTT path (below Mosquitto's default queue of 1000).
const MQTT_WINDOW: u64 = 500;

/// The peer path: the same events, one MQTT message each with QoS 1, through Mosquitto, into
/// the same storage by a subscriber that commits in batches of up to 2,000.
async fn mqtt_drain(store: Arc<dyn EventStore>, broker: &str, n: usize) -> anyhow::Result<f64> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let (host, port) = broker.rsplit_once(':').context("ITS_BENCH_MQTT is host:port")?;
    let port: u16 = port.parse()?;
    let topic = format!("its-bench/{}/events", std::process::id());
    let device = "bench-mqtt";

    let mut sub_opts = MqttOptions::new(format!("its-bench-sub-{}", std::process::id()), host, port);
    sub_opts.set_keep_alive(Duration::from_secs(30));
    sub_opts.set_max_packet_size(1 << 20, 1 << 20);
    let (sub, mut sub_loop) = AsyncClient::new(sub_opts, 10_000);
    sub.subscribe(&topic, QoS::AtLeastOnce).await?;
    // Wait for SUBACK.
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = sub_loop.poll().await? {
            break;
        }
    }
    // The event loop runs on its own (its poll future must not be cancelled); publishes reach
    // the consumer through a channel, which can be waited on with a timeout.
    let (ptx, mut prx) = tokio::sync::mpsc::channel::<bytes::Bytes>(10_000);
    let sub_driver = tokio::spawn(async move {
        loop {
            match sub_loop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if ptx.send(p.payload).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("subscriber: {e}");
                    return;
                }
            }
        }
    });
    let stored = Arc::new(AtomicU64::new(0));
    let stored2 = stored.clone();
    let consumer = tokio::spawn(async move {
        let mut batch: Vec<EventEnvelope> = Vec::with_capacity(2000);
        loop {
            let next = tokio::time::timeout(Duration::from_millis(5), prx.recv()).await;
            let idle = next.is_err();
            match next {
                Ok(Some(payload)) => {
                    let (e, _): (EventEnvelope, usize) =
                        bincode::serde::decode_from_slice(&payload, bincode::config::standard())?;
                    batch.push(e);
                }
                Ok(None) => anyhow::bail!("subscriber stopped"),
                Err(_) => {}
            }
            if batch.len() >= 2000 || (!batch.is_empty() && idle) {
                store.insert_events(device, &batch, unix_ms()).await?;
                // (counted here rather than polled from the database, for the same reason)
                let total = stored2.fetch_add(batch.len() as u64, Ordering::Relaxed) + batch.len() as u64;
                batch.clear();
                if total >= n as u64 {
                    return Ok::<_, anyhow::Error>(());
                }
            }
        }
    });

    let payloads: Vec<Vec<u8>> = events(n, unix_ms())
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let env =
                EventEnvelope { seq: i as u64 + 1, camera: e.camera, observed_at_ms: e.observed_at_ms, kind: e.kind };
            bincode::serde::encode_to_vec(&env, bincode::config::standard()).unwrap_or_default()
        })
        .collect();
    let mut pub_opts = MqttOptions::new(format!("its-bench-pub-{}", std::process::id()), host, port);
    pub_opts.set_keep_alive(Duration::from_secs(30));
    pub_opts.set_inflight(1000);
    let (publ, mut pub_loop) = AsyncClient::new(pub_opts, 10_000);
    let pub_driver = tokio::spawn(async move {
        loop {
            if pub_loop.poll().await.is_err() {
                return;
            }
        }
    });
    let t = Instant::now();
    // End-to-end flow control, as the QUIC uplink has: at most MQTT_WINDOW messages published
    // but not yet stored. Without it the broker's default per-client queue (max_queued_messages
    // 1000) overflows for the slower subscriber and Mosquitto drops QoS 1 messages.
    // A message the broker dropped would stall the window: give up after 10 s without progress
    // and report how many were lost.
    let stalled = |since: Instant| since.elapsed() > Duration::from_secs(10);
    let mut progress = (0u64, Instant::now());
    for (i, p) in payloads.into_iter().enumerate() {
        loop {
            let done = stored.load(Ordering::Relaxed);
            if done != progress.0 {
                progress = (done, Instant::now());
            }
            if (i as u64) < done + MQTT_WINDOW {
                break;
            }
            anyhow::ensure!(!stalled(progress.1), "MQTT path lost {} of {i} published messages", i as u64 - done);
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        publ.publish(&topic, QoS::AtLeastOnce, false, p).await?;
    }
    while !consumer.is_finished() {
        let done = stored.load(Ordering::Relaxed);
        if done != progress.0 {
            progress = (done, Instant::now());
        }
        anyhow::ensure!(!stalled(progress.1), "MQTT path lost {} of {n} published messages", n as u64 - done);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    consumer.await??;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    pub_driver.abort();
    sub_driver.abort();
    Ok(rate)
}

async fn pg_scratch(admin: &str) -> anyhow::Result<(String, String)> {
    use sqlx::Connection;
    let name = format!("its_bench_{}", std::process::id());
    let mut c = sqlx::PgConnection::connect(admin).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")))
        .execute(&mut c)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\""))).execute(&mut c).await?;
    let base = admin.rsplit_once('/').map(|(b, _)| b.to_string()).context("admin url has a database")?;
    Ok((format!("{base}/{name}"), name))
}

async fn pg_drop(admin: &str, name: &str) {
    use sqlx::Connection;
    if let Ok(mut c) = sqlx::PgConnection::connect(admin).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")))
            .execute(&mut c)
            .await;
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let n: usize = arg("--events").map(|v| v.parse()).transpose()?.unwrap_or(200_000);
    let backends = arg("--backends").unwrap_or_else(|| "sqlite,postgres".into());
    let mqtt = !args.iter().any(|a| a == "--no-mqtt");
    let mut session = AgentSessionConfig::default();
    if let Some(b) = arg("--batch") {
        session.max_batch_events = b.parse()?;
    }
    if let Some(w) = arg("--window") {
        session.window_batches = w.parse()?;
    }
    let _ = SESSION.set(session.clone());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        println!(
            "uplink benchmark: {n} events per run, batches of {} events, window {} batches, {} cores",
            session.max_batch_events,
            session.window_batches,
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        );
        let admin = std::env::var("ITS_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let mut sqlite_quic = None;
        for backend in backends.split(',').filter(|b| !b.is_empty() && *b != "none") {
            let tmp = tempfile::tempdir()?;
            let (url, pg_name) = match backend {
                "sqlite" => (format!("sqlite://{}", tmp.path().join("agg.db").display()), None),
                "postgres" => {
                    let (u, name) = pg_scratch(&admin).await?;
                    (u, Some(name))
                }
                other => anyhow::bail!("unknown backend {other}"),
            };
            let s = setup(&url).await?;
            let d = quic_drain(&s, n).await?;
            println!("| QUIC uplink → {backend} | outbox append {:.0} ev/s | outbox → storage {:.0} ev/s |", d.append_per_s, d.drain_per_s);
            if backend == "sqlite" {
                sqlite_quic = Some(d.drain_per_s);
            }
            for rate in [1_000u64, 10_000, 20_000] {
                let (p50, p99, max, count) = quic_latency(&s, rate, 10).await?;
                println!("| QUIC uplink → {backend} at {rate} ev/s | {count} events | commit→stored p50 {p50} ms, p99 {p99} ms, max {max} ms |");
            }
            drop(s);
            if let Some(name) = pg_name {
                pg_drop(&admin, &name).await;
            }
        }
        if mqtt {
            let broker = std::env::var("ITS_BENCH_MQTT").unwrap_or_else(|_| "127.0.0.1:1883".into());
            let tmp = tempfile::tempdir()?;
            let store = open_store(&format!("sqlite://{}", tmp.path().join("mqtt.db").display()), its_aggregator::vault::Vault::ephemeral()).await?;
            let rate = mqtt_drain(store, &broker, n).await?;
            println!("| Mosquitto QoS 1 → sqlite | {rate:.0} ev/s |");
            if let Some(q) = sqlite_quic {
                println!("| ratio QUIC uplink / Mosquitto (sqlite) | {:.2}x |", q / rate);
            }
        }
        Ok(())
    })
}
