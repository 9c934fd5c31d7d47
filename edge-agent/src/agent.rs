//! The agent's runtime: wires the stages together and runs them until shutdown.
//!
//! ```text
//! source (synthetic; cameras later) --append--> buffer (SQLite outbox) --read--> uplink (QUIC)
//!                                                     ^---------- delete on ack ------'
//! ```

use crate::unix_ms;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context;
use its_shared::event::{DeviceHealth, EventKind, KindCount};
use tokio::sync::watch;

use crate::buffer::{NewEvent, Outbox};
use crate::config::AgentConfig;
use crate::source::run_synthetic;
use crate::uplink::quic::HealthFn;
use crate::uplink::{UplinkHandle, run_uplink};

/// The health report from the outbox and uplink counters.
pub fn health_report(outbox: &Outbox, uplink: &UplinkHandle, started: Instant, cameras: &[String]) -> DeviceHealth {
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
        cameras: cameras
            .iter()
            .map(|c| its_shared::event::CameraHealth {
                camera: c.clone(),
                state: "synthetic".into(),
                fps: 0.0,
                reconnects: 0,
            })
            .collect(),
        temperature_c: read_soc_temperature(),
    }
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
    let health: HealthFn = {
        let (ob, up, cams) = (outbox.clone(), uplink.clone(), cameras.clone());
        Arc::new(move || health_report(&ob, &up, started, &cams))
    };

    let mut tasks = tokio::task::JoinSet::new();
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
