//! Synthetic event source: plausible traffic events at a configured rate and mix of kinds,
//! committed to the outbox in batches. It is the load generator for benchmarks and fault tests.

use crate::unix_ms;
use std::sync::Arc;
use std::time::Duration;

use its_shared::event::{ClassCount, Direction, EventKind, ObjectRef, Phase, TrackPhase};
use rand::Rng;
use tokio::sync::watch;

use crate::buffer::{NewEvent, Outbox};
use crate::uplink::UplinkHandle;

/// Event kinds the synthetic source can produce: every road kind (`device_health` is the agent's
/// own report).
pub const SYNTHETIC_KINDS: &[&str] = its_shared::event::ROAD_KINDS;

#[derive(Debug, Clone)]
pub struct SyntheticConfig {
    /// Events per second across all cameras.
    pub rate_per_s: f64,
    pub cameras: Vec<String>,
    /// Kinds to produce, drawn uniformly.
    pub kinds: Vec<String>,
    /// Stop once the outbox has assigned this many sequence numbers in total (across restarts).
    pub limit: Option<u64>,
    /// Commit interval: events generated within one tick share one transaction.
    pub tick: Duration,
}

fn object(rng: &mut impl Rng, label: &str) -> ObjectRef {
    let x: f32 = rng.random_range(0.0..0.8);
    let y: f32 = rng.random_range(0.0..0.8);
    ObjectRef {
        track_id: rng.random_range(1..100_000),
        label: label.to_string(),
        score: rng.random_range(0.5..0.99),
        bbox: [x, y, x + 0.1, y + 0.15],
    }
}

/// One synthetic event of `kind`.
pub fn synthetic_event(rng: &mut impl Rng, kind: &str) -> EventKind {
    const LABELS: [&str; 5] = ["car", "car", "truck", "bus", "motorcycle"];
    let label = LABELS[rng.random_range(0..LABELS.len())];
    let dir = if rng.random_bool(0.5) { Direction::In } else { Direction::Out };
    match kind {
        "speed_measurement" => EventKind::SpeedMeasurement {
            object: object(rng, label),
            speed_kmh: rng.random_range(20.0..110.0),
            zone: Some("lane-1".into()),
        },
        "zone_enter" => EventKind::ZoneEnter { zone: "junction".into(), object: object(rng, label) },
        "zone_exit" => EventKind::ZoneExit {
            zone: "junction".into(),
            object: object(rng, label),
            dwell_s: rng.random_range(1.0..20.0),
        },
        "zone_dwell" => EventKind::ZoneDwell {
            zone: "junction".into(),
            object: object(rng, label),
            dwell_s: rng.random_range(20.0..60.0),
        },
        "stopped_vehicle" => EventKind::StoppedVehicle {
            zone: "hard-shoulder".into(),
            object: object(rng, label),
            stopped_s: rng.random_range(30.0..300.0),
        },
        "wrong_way" => EventKind::WrongWay {
            zone: "ramp".into(),
            object: object(rng, label),
            distance_m: rng.random_range(10.0..60.0),
            speed_kmh: Some(rng.random_range(20.0..80.0)),
        },
        "congestion" => EventKind::Congestion {
            zone: "approach".into(),
            phase: Phase::Started,
            occupancy: rng.random_range(5..40),
            mean_speed_kmh: Some(rng.random_range(3.0..15.0)),
            queue_length_m: Some(rng.random_range(20.0..200.0)),
        },
        "object_track" => EventKind::ObjectTrack {
            phase: if rng.random_bool(0.5) { TrackPhase::New } else { TrackPhase::End },
            object: object(rng, label),
            first_seen_ms: crate::unix_ms() - rng.random_range(0..20_000),
            duration_s: rng.random_range(0.0..20.0),
            frames: rng.random_range(3..200),
            path: vec![[0.2, 0.9], [0.5, 0.6], [0.7, 0.4]],
        },
        "zone_occupancy" => EventKind::ZoneOccupancy {
            zone: "junction".into(),
            interval_s: 60,
            mean: rng.random_range(0.0..6.0),
            max: rng.random_range(0..12),
            occupied: rng.random_range(0.0..1.0),
            entered: rng.random_range(0..30),
        },
        "counts" => EventKind::Counts {
            line: "stop-line".into(),
            interval_s: 60,
            counts: vec![
                ClassCount { label: "car".into(), direction: Direction::In, count: rng.random_range(0..40) },
                ClassCount { label: "truck".into(), direction: Direction::In, count: rng.random_range(0..5) },
            ],
        },
        _ => EventKind::LineCrossing {
            line: "stop-line".into(),
            object: object(rng, label),
            direction: dir,
            speed_kmh: Some(rng.random_range(20.0..90.0)),
        },
    }
}

/// Produces events until `shutdown` or the limit. Returns the number of events committed.
pub async fn run_synthetic(
    cfg: SyntheticConfig,
    outbox: Arc<Outbox>,
    uplink: Arc<UplinkHandle>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<u64> {
    let mut interval = tokio::time::interval(cfg.tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut carry = 0.0f64;
    let mut committed = 0u64;
    // Cameras take turns across batches (a tick often holds a single event).
    let mut next_camera = 0usize;
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return Ok(committed),
        }
        let now = tokio::time::Instant::now();
        // Rate from elapsed time, so a slow commit does not lower the offered load.
        carry += cfg.rate_per_s * (now - last).as_secs_f64();
        last = now;
        let mut n = carry.floor() as u64;
        carry -= n as f64;
        if let Some(limit) = cfg.limit {
            let produced = outbox.stats().produced_total;
            if produced >= limit {
                tracing::info!(produced, "synthetic source reached its limit");
                let _ = shutdown.changed().await;
                return Ok(committed);
            }
            n = n.min(limit - produced);
        }
        if n == 0 {
            continue;
        }
        let at = unix_ms();
        let batch: Vec<NewEvent> = {
            let mut rng = rand::rng();
            (0..n)
                .map(|i| {
                    let kind = &cfg.kinds[rng.random_range(0..cfg.kinds.len())];
                    NewEvent {
                        camera: cfg.cameras[(next_camera + i as usize) % cfg.cameras.len()].clone(),
                        observed_at_ms: at,
                        kind: synthetic_event(&mut rng, kind),
                    }
                })
                .collect()
        };
        next_camera = (next_camera + n as usize) % cfg.cameras.len();
        let ob = outbox.clone();
        let outcome = tokio::task::spawn_blocking(move || ob.append(&batch, at)).await??;
        committed += n;
        if outcome.evicted > 0 {
            tracing::warn!(evicted = outcome.evicted, "outbox full: evicted the oldest unsent events");
        }
        uplink.appended.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_synthetic_kind_produces_that_kind() {
        let mut rng = rand::rng();
        for k in SYNTHETIC_KINDS {
            assert_eq!(synthetic_event(&mut rng, k).name(), *k);
        }
    }
}
