//! The agent's runtime: wires the stages together and runs them until shutdown.
//!
//! ```text
//! cameras --pipeline--> FrameResults --analyze--> events --append--> buffer (SQLite outbox) --read--> uplink (QUIC or MQTT)
//! synthetic source ------------------------------------------^                 ^---- delete on ack ----'
//! ```

use crate::unix_ms;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context;
use its_shared::event::{CameraHealth, DeviceHealth, EventKind, KindCount};
use tokio::sync::{Notify, mpsc, watch};

use crate::analyze::runner::{Analyzed, SceneBoard, run_analysis};
use crate::buffer::{NewEvent, Outbox};
use crate::config::{AgentConfig, RawConfig};
use crate::pipeline::FrameResult;
use crate::reload::{ConfigFile, LiveVision, PipelineSlot};
use crate::source::run_synthetic;
use crate::uplink::quic::HealthFn;
use crate::uplink::{UplinkHandle, run_mqtt_uplink, run_uplink};
/// Moved to [`crate::vision`]; still reachable here.
pub use crate::vision::{load_configured_detectors, start_vision};

/// The health report from the outbox, uplink and camera counters.
pub fn health_report(
    outbox: &Outbox,
    uplink: &UplinkHandle,
    started: Instant,
    cameras: &[String],
    vision: Option<&CameraMonitor>,
) -> DeviceHealth {
    let s = outbox.stats();
    let now = unix_ms();
    DeviceHealth {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_s: started.elapsed().as_secs(),
        produced_total: s.produced_total,
        outbox_events: s.pending_events,
        outbox_bytes: s.pending_bytes,
        outbox_oldest_age_s: s.oldest_committed_ms.map_or(0, |t| ((now - t).max(0) / 1000) as u64),
        acked_seq: s.acked,
        evicted_total: s.evicted_total,
        evicted_by_kind: s.evicted_by_kind.iter().map(|(k, v)| KindCount { kind: k.clone(), count: *v }).collect(),
        uplink_reconnects: uplink.reconnects.load(Ordering::Relaxed),
        cameras: match vision.map(CameraMonitor::report) {
            Some(v) if !v.is_empty() => v,
            _ => cameras
                .iter()
                .map(|c| CameraHealth { camera: c.clone(), state: "synthetic".into(), ..CameraHealth::default() })
                .collect(),
        },
        temperature_c: read_soc_temperature(),
    }
}

/// Reads the cameras' counters for health reports; rates are over the time since the last report.
pub struct CameraMonitor {
    pipeline: PipelineSlot,
    /// Time of the last report and, per camera id, the counters then.
    last: std::sync::Mutex<(Instant, HashMap<String, [u64; 4]>)>,
}

impl std::fmt::Debug for CameraMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CameraMonitor").finish_non_exhaustive()
    }
}

impl CameraMonitor {
    pub fn new(pipeline: PipelineSlot) -> Self {
        Self { pipeline, last: std::sync::Mutex::new((Instant::now(), HashMap::new())) }
    }

    /// Per-camera health; frame rates and lag over the interval since the previous call.
    pub fn report(&self) -> Vec<CameraHealth> {
        let now = Instant::now();
        let Ok(mut last) = self.last.lock() else { return Vec::new() };
        let secs = now.duration_since(last.0).as_secs_f32().max(1e-3);
        last.0 = now;
        let Some(pipeline) = self.pipeline.read().ok().and_then(|p| p.clone()) else { return Vec::new() };
        let drops = pipeline.drop_counter();
        let mut out = Vec::new();
        let mut seen = HashMap::new();
        for (slot, spec, s) in pipeline.cameras() {
            let cur = [
                s.frames_decoded.load(Ordering::Relaxed),
                s.frames_detected.load(Ordering::Relaxed),
                s.lag_us_total.load(Ordering::Relaxed),
                s.inferences.load(Ordering::Relaxed),
            ];
            let prev = last.1.get(&spec.id).copied().unwrap_or([0; 4]);
            let detected = cur[1].saturating_sub(prev[1]);
            out.push(CameraHealth {
                camera: spec.id.clone(),
                state: s.source.state().to_string(),
                fps: detected as f32 / secs,
                decoded_fps: cur[0].saturating_sub(prev[0]) as f32 / secs,
                reconnects: s.source.reconnects.load(Ordering::Relaxed),
                connect_failures: s.source.connect_failures.load(Ordering::Relaxed),
                frames_dropped: drops.dropped(slot),
                units_dropped: s.source.units_dropped.load(Ordering::Relaxed),
                decode_errors: s.decode_errors.load(Ordering::Relaxed),
                lag_ms: if detected > 0 {
                    cur[2].saturating_sub(prev[2]) as f32 / detected as f32 / 1000.0
                } else {
                    0.0
                },
                detection_tiles: s.detection_tiles.load(Ordering::Relaxed) as u32,
                inferences_per_frame: if detected > 0 {
                    cur[3].saturating_sub(prev[3]) as f32 / detected as f32
                } else {
                    0.0
                },
                last_error: s.source.last_error.lock().ok().and_then(|g| g.clone()),
            });
            seen.insert(spec.id, cur);
        }
        last.1 = seen;
        out
    }
}

/// Commits analysed events (and their pictures), one transaction per `tick`.
async fn commit_events(
    mut analyzed: mpsc::Receiver<Analyzed>,
    outbox: Arc<Outbox>,
    uplink: Arc<UplinkHandle>,
    tick: std::time::Duration,
) -> anyhow::Result<()> {
    let mut batch = Analyzed::default();
    let mut open = true;
    let add = |batch: &mut Analyzed, a: Analyzed| {
        let base = batch.events.len();
        batch.events.extend(a.events);
        batch.snapshots.extend(a.snapshots.into_iter().map(|(i, s)| (base + i, s)));
    };
    while open {
        // Block for the first result, then take whatever else arrives within the tick.
        match analyzed.recv().await {
            Some(a) => add(&mut batch, a),
            None => open = false,
        }
        let deadline = tokio::time::Instant::now() + tick;
        while open {
            match tokio::time::timeout_at(deadline, analyzed.recv()).await {
                Ok(Some(a)) => add(&mut batch, a),
                Ok(None) => open = false,
                Err(_) => break,
            }
        }
        if batch.events.is_empty() {
            continue;
        }
        let Analyzed { events, snapshots } = std::mem::take(&mut batch);
        let pictures = !snapshots.is_empty();
        let ob = outbox.clone();
        let outcome =
            tokio::task::spawn_blocking(move || ob.append_with_snapshots(&events, snapshots, unix_ms())).await??;
        if outcome.evicted > 0 {
            tracing::warn!(evicted = outcome.evicted, "outbox full: evicted the oldest unsent events");
        }
        uplink.appended.notify_one();
        if pictures {
            uplink.snapshots_appended.notify_one();
        }
    }
    Ok(())
}

/// Starts the analyze stage on its own thread: frame results in, analysed events out.
pub fn start_analysis(
    results: mpsc::Receiver<FrameResult>,
    board: Arc<SceneBoard>,
) -> std::io::Result<(std::thread::JoinHandle<()>, mpsc::Receiver<Analyzed>)> {
    let (tx, rx) = mpsc::channel(64);
    let handle = std::thread::Builder::new().name("analyze".into()).spawn(move || run_analysis(results, board, tx))?;
    Ok((handle, rx))
}

/// SoC temperature from the first thermal zone, where the board has one (Jetson does).
fn read_soc_temperature() -> Option<f32> {
    let text = std::fs::read_to_string("/sys/class/thermal/thermal_zone0/temp").ok()?;
    text.trim().parse::<f32>().ok().map(|milli| milli / 1000.0)
}

/// How the running agent finds its configuration again (hot reload).
#[derive(Debug, Clone)]
pub struct Reloading {
    /// The raw form the running configuration was validated from.
    pub raw: RawConfig,
    /// Name of the configuration in messages.
    pub source: String,
    /// The file to watch (`None`: embedded defaults, nothing to reload).
    pub file: Option<ConfigFile>,
    /// Reload now (SIGHUP).
    pub now: Arc<Notify>,
    /// How often the file is checked for changes.
    pub poll: std::time::Duration,
}

/// Runs the agent until `shutdown` becomes true.
pub async fn run_agent(cfg: AgentConfig, reload: Reloading, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let (outbox_cfg, snapshot_budget) = (cfg.outbox.clone(), cfg.max_snapshot_bytes);
    if let Some(dir) = outbox_cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let outbox = Arc::new(
        tokio::task::spawn_blocking(move || Outbox::open_with_snapshot_budget(outbox_cfg, snapshot_budget))
            .await?
            .with_context(|| format!("opening the outbox {}", cfg.outbox.path.display()))?,
    );
    let s = outbox.stats();
    tracing::info!(
        pending = s.pending_events,
        produced = s.produced_total,
        acked = s.acked,
        evicted = s.evicted_total,
        "outbox open"
    );
    let uplink = Arc::new(UplinkHandle::default());
    let started = Instant::now();
    let cameras = cfg.uplink.cameras.clone();
    let mut tasks = tokio::task::JoinSet::new();

    // Short: results hold their frame (for snapshots) until analysed.
    let (tx, rx) = mpsc::channel(16);
    let board = Arc::new(SceneBoard::default());
    let (_analysis, analyzed) = start_analysis(rx, board.clone())?;
    tasks.spawn(commit_events(analyzed, outbox.clone(), uplink.clone(), std::time::Duration::from_millis(50)));
    let live = {
        let (raw, source, cfg2, rt) =
            (reload.raw.clone(), reload.source.clone(), cfg.clone(), tokio::runtime::Handle::current());
        tokio::task::spawn_blocking(move || LiveVision::start(raw, source, &cfg2, board, tx, rt)).await??
    };
    let monitor = Some(Arc::new(CameraMonitor::new(live.pipeline())));
    let health: HealthFn = {
        let (ob, up, cams, mon) = (outbox.clone(), uplink.clone(), cameras.clone(), monitor.clone());
        Arc::new(move || health_report(&ob, &up, started, &cams, mon.as_deref()))
    };

    match cfg.mqtt_uplink.clone() {
        Some(mqtt) => tasks.spawn(run_mqtt_uplink(
            cfg.uplink.clone(),
            mqtt,
            outbox.clone(),
            uplink.clone(),
            health.clone(),
            shutdown.clone(),
        )),
        None => tasks.spawn(run_uplink(
            cfg.uplink.clone(),
            outbox.clone(),
            uplink.clone(),
            health.clone(),
            shutdown.clone(),
        )),
    };
    if let Some(syn) = cfg.synthetic.clone() {
        let (ob, up, sd) = (outbox.clone(), uplink.clone(), shutdown.clone());
        tasks.spawn(async move { run_synthetic(syn, ob, up, sd).await.map(|_| ()) });
    }
    {
        let (ob, up, mut sd) = (outbox.clone(), uplink.clone(), shutdown.clone());
        let interval = cfg.health_interval;
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = sd.changed() => return Ok(()),
                }
                let report = health();
                let now = unix_ms();
                let ob2 = ob.clone();
                let (expired, _) = tokio::task::spawn_blocking(move || {
                    let expired = ob2.evict_expired(now)?;
                    let ev =
                        NewEvent { camera: String::new(), observed_at_ms: now, kind: EventKind::DeviceHealth(report) };
                    ob2.append(std::slice::from_ref(&ev), now).map(|o| (expired, o))
                })
                .await??;
                if expired > 0 {
                    tracing::warn!(expired, "evicted events older than outbox.max_age_h");
                }
                up.appended.notify_one();
            }
        });
    }
    // Reload the configuration when its file changes (or on SIGHUP); stop the cameras when
    // shutdown is asked (the analysis and commit tasks then drain and end).
    tasks.spawn(watch_config(live, reload, shutdown.clone()));
    while let Some(res) = tasks.join_next().await {
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %format!("{e:#}"), "agent stage failed");
                return Err(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Applies configuration changes until shutdown, then stops the cameras.
async fn watch_config(live: LiveVision, reload: Reloading, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let live = Arc::new(std::sync::Mutex::new(live));
    let mut last = reload.file.as_ref().and_then(ConfigFile::fingerprint);
    loop {
        let forced = tokio::select! {
            _ = tokio::time::sleep(reload.poll) => false,
            _ = reload.now.notified() => true,
            _ = async { while !*shutdown.borrow() { if shutdown.changed().await.is_err() { break; } } } => break,
        };
        let Some(file) = reload.file.clone() else { continue };
        let now = file.fingerprint();
        if now.is_none() || (now == last && !forced) {
            continue; // unreadable (being rewritten?) or unchanged
        }
        last = now;
        let l = live.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let raw = file.load()?;
            l.lock().unwrap_or_else(|e| e.into_inner()).apply(raw)
        })
        .await?;
        match outcome {
            Ok(r) if r.is_empty() => tracing::info!("configuration reloaded: nothing changed"),
            Ok(r) => {
                tracing::info!(
                    added = ?r.added, removed = ?r.removed, restarted = ?r.restarted, rescened = ?r.rescened,
                    "configuration reloaded; other cameras untouched"
                );
                if !r.needs_restart.is_empty() {
                    tracing::warn!(sections = ?r.needs_restart, "these settings changed and take effect at the next restart");
                }
            }
            Err(e) => tracing::error!("configuration change refused, the running configuration stays:\n{e}"),
        }
    }
    tokio::task::spawn_blocking(move || live.lock().unwrap_or_else(|e| e.into_inner()).stop()).await?;
    Ok(())
}
