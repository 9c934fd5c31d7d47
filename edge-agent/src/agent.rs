//! The agent's runtime: wires the stages together and runs them until shutdown.
//!
//! ```text
//! cameras --pipeline--> FrameResults --analyze--> events --append--> buffer (SQLite outbox) --read--> uplink (QUIC)
//! synthetic source ------------------------------------------^                 ^---- delete on ack ----'
//! ```

use crate::unix_ms;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context;
use its_shared::event::{CameraHealth, DeviceHealth, EventKind, KindCount};
use tokio::sync::{mpsc, watch};

use crate::buffer::{NewEvent, Outbox};
use crate::config::{AgentConfig, BackendChoice, VisionConfig};
use crate::detect::{BackendKind, load_detectors};
use crate::pipeline::{CameraStats, DropCounter, FrameResult, VisionPipeline, VisionSettings};
use crate::source::run_synthetic;
use crate::uplink::quic::HealthFn;
use crate::uplink::{UplinkHandle, run_uplink};

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
        cameras: match vision {
            Some(v) => v.report(),
            None => cameras
                .iter()
                .map(|c| CameraHealth { camera: c.clone(), state: "synthetic".into(), ..CameraHealth::default() })
                .collect(),
        },
        temperature_c: read_soc_temperature(),
    }
}

/// Reads the cameras' counters for health reports; rates are over the time since the last report.
pub struct CameraMonitor {
    ids: Vec<String>,
    stats: Vec<Arc<CameraStats>>,
    drops: DropCounter,
    last: std::sync::Mutex<(Instant, Vec<[u64; 3]>)>,
}

impl std::fmt::Debug for CameraMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CameraMonitor").field("cameras", &self.ids).finish()
    }
}

impl CameraMonitor {
    pub fn new(pipeline: &VisionPipeline) -> Self {
        Self {
            ids: pipeline.cameras.iter().map(|c| c.id.clone()).collect(),
            stats: pipeline.stats.clone(),
            drops: pipeline.drop_counter(),
            last: std::sync::Mutex::new((Instant::now(), vec![[0; 3]; pipeline.cameras.len()])),
        }
    }

    /// Per-camera health; frame rates and lag over the interval since the previous call.
    pub fn report(&self) -> Vec<CameraHealth> {
        let now = Instant::now();
        let Ok(mut last) = self.last.lock() else { return Vec::new() };
        let secs = now.duration_since(last.0).as_secs_f32().max(1e-3);
        last.0 = now;
        let mut out = Vec::with_capacity(self.ids.len());
        for (i, (id, s)) in self.ids.iter().zip(&self.stats).enumerate() {
            let cur = [
                s.frames_decoded.load(Ordering::Relaxed),
                s.frames_detected.load(Ordering::Relaxed),
                s.lag_us_total.load(Ordering::Relaxed),
            ];
            let prev = last.1.get(i).copied().unwrap_or([0; 3]);
            let detected = cur[1].saturating_sub(prev[1]);
            out.push(CameraHealth {
                camera: id.clone(),
                state: s.source.state().to_string(),
                fps: detected as f32 / secs,
                decoded_fps: cur[0].saturating_sub(prev[0]) as f32 / secs,
                reconnects: s.source.reconnects.load(Ordering::Relaxed),
                connect_failures: s.source.connect_failures.load(Ordering::Relaxed),
                frames_dropped: self.drops.dropped(i),
                units_dropped: s.source.units_dropped.load(Ordering::Relaxed),
                decode_errors: s.decode_errors.load(Ordering::Relaxed),
                lag_ms: if detected > 0 {
                    cur[2].saturating_sub(prev[2]) as f32 / detected as f32 / 1000.0
                } else {
                    0.0
                },
                last_error: s.source.last_error.lock().ok().and_then(|g| g.clone()),
            });
            if let Some(p) = last.1.get_mut(i) {
                *p = cur;
            }
        }
        out
    }
}

/// Loads `workers` detectors on the configured backend, or on the best that loads (`auto`).
pub fn load_configured_detectors(
    v: &VisionConfig,
    workers: usize,
) -> anyhow::Result<Vec<Box<dyn crate::detect::Detector>>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads =
        if v.backend_options.threads > 0 { v.backend_options.threads } else { (cores / workers.max(1)).max(1) };
    let kinds: Vec<BackendKind> = match v.backend {
        BackendChoice::Only(k) => vec![k],
        BackendChoice::Auto => BackendKind::compiled_fastest_first(),
    };
    let options = crate::detect::BackendOptions { threads, ..v.backend_options.clone() };
    let detectors = load_detectors(&v.manifest, &kinds, &options, workers)
        .with_context(|| format!("loading the detector {}", v.manifest.model_path.display()))?;
    tracing::info!(
        model = %v.manifest.name,
        backend = detectors.first().map_or("none", |d| d.backend_name()),
        workers,
        threads,
        "detector loaded"
    );
    Ok(detectors)
}

/// Loads the detectors (the configured backend, or the best that loads) and starts the cameras.
pub fn start_vision(
    v: &VisionConfig,
    results: mpsc::Sender<FrameResult>,
    rt: tokio::runtime::Handle,
) -> anyhow::Result<VisionPipeline> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = if v.workers > 0 { v.workers } else { cores.min(v.cameras.len()).max(1) };
    let detectors = load_configured_detectors(v, workers)?;
    tracing::info!(cameras = v.cameras.len(), workers, "starting the cameras");
    let settings = VisionSettings { tracker: v.tracker, merged_classes: v.merged_classes.clone() };
    Ok(VisionPipeline::start(v.cameras.clone(), detectors, settings, results, rt)?)
}

/// Turns frame results into events and commits them, one transaction per `tick`.
async fn commit_track_events(
    mut results: mpsc::Receiver<FrameResult>,
    outbox: Arc<Outbox>,
    uplink: Arc<UplinkHandle>,
    tick: std::time::Duration,
) -> anyhow::Result<()> {
    let mut batch: Vec<NewEvent> = Vec::new();
    let mut open = true;
    while open {
        // Block for the first result, then take whatever else arrives within the tick.
        match results.recv().await {
            Some(r) => batch.extend(crate::analyze::track_events(&r)),
            None => open = false,
        }
        let deadline = tokio::time::Instant::now() + tick;
        while open {
            match tokio::time::timeout_at(deadline, results.recv()).await {
                Ok(Some(r)) => batch.extend(crate::analyze::track_events(&r)),
                Ok(None) => open = false,
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let events = std::mem::take(&mut batch);
        let ob = outbox.clone();
        let outcome = tokio::task::spawn_blocking(move || ob.append(&events, unix_ms())).await??;
        if outcome.evicted > 0 {
            tracing::warn!(evicted = outcome.evicted, "outbox full: evicted the oldest unsent events");
        }
        uplink.appended.notify_one();
    }
    Ok(())
}

/// SoC temperature from the first thermal zone, where the board has one (Jetson does).
fn read_soc_temperature() -> Option<f32> {
    let text = std::fs::read_to_string("/sys/class/thermal/thermal_zone0/temp").ok()?;
    text.trim().parse::<f32>().ok().map(|milli| milli / 1000.0)
}

/// Runs the agent until `shutdown` becomes true.
pub async fn run_agent(cfg: AgentConfig, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let outbox_cfg = cfg.outbox.clone();
    if let Some(dir) = outbox_cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let outbox = Arc::new(
        tokio::task::spawn_blocking(move || Outbox::open(outbox_cfg))
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

    let mut pipeline = None;
    if let Some(v) = cfg.vision.clone() {
        let (tx, rx) = mpsc::channel(256);
        let rt = tokio::runtime::Handle::current();
        let p = tokio::task::spawn_blocking(move || start_vision(&v, tx, rt)).await??;
        tasks.spawn(commit_track_events(rx, outbox.clone(), uplink.clone(), std::time::Duration::from_millis(50)));
        pipeline = Some(p);
    }
    let monitor = pipeline.as_ref().map(|p| Arc::new(CameraMonitor::new(p)));
    let health: HealthFn = {
        let (ob, up, cams, mon) = (outbox.clone(), uplink.clone(), cameras.clone(), monitor.clone());
        Arc::new(move || health_report(&ob, &up, started, &cams, mon.as_deref()))
    };

    tasks.spawn(run_uplink(cfg.uplink.clone(), outbox.clone(), uplink.clone(), health.clone(), shutdown.clone()));
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
    // Stop the cameras when shutdown is asked (the event task then drains and ends).
    if let Some(p) = pipeline {
        let mut sd = shutdown.clone();
        tasks.spawn(async move {
            while !*sd.borrow() {
                if sd.changed().await.is_err() {
                    break;
                }
            }
            tokio::task::spawn_blocking(move || p.stop()).await?;
            Ok(())
        });
    }
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
