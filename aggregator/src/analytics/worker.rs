//! The rollup and anomaly worker: when a dirty bucket is due, recomputing it from its events,
//! checking closed buckets for anomalies, publishing what it wrote. The rows themselves are read
//! and written by [`crate::store::rollups`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use crate::analytics::anomaly;
use crate::analytics::config::AnalyticsConfig;
use crate::analytics::rollup;
use crate::bus::{BusMessage, EventBus};
use crate::model::Resolution;
use crate::store::rollups::{AnomalyRow, DirtyMark, MetricRow, NewAnomaly, RollupRows, feeds_rollups};
use crate::store::{Db, StoreError};

/// Most dirty marks taken per pass.
const MARKS_PER_PASS: usize = 2000;
/// Most closed buckets checked for anomalies per pass (per resolution).
const BUCKETS_PER_PASS: i64 = 96;
/// Lock key that keeps replicas' workers from running passes at once (PostgreSQL).
const PASS_LOCK_KEY: i64 = 0x1750_a11a_1f71_c500;

/// How long a dirty bucket may wait before it is recomputed: a minute at once, a quarter hour
/// at most every 10 s, an hour at most every 60 s (each recomputation reads all of the bucket's
/// events, so busy cameras must not recompute their hour on every commit).
fn recompute_delay_ms(res: Resolution) -> i64 {
    match res {
        Resolution::Minute => 0,
        Resolution::QuarterHour => 10_000,
        Resolution::Hour => 60_000,
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PassReport {
    /// Buckets recomputed (all resolutions).
    pub buckets: usize,
    /// Rows written.
    pub rows: usize,
    /// Anomalies newly found.
    pub anomalies: Vec<AnomalyRow>,
    /// Another replica held the lock: nothing done.
    pub skipped: bool,
}

/// The rollup and anomaly worker.
#[derive(Clone)]
pub struct Analytics {
    rows: RollupRows,
    bus: EventBus,
    cfg: AnalyticsConfig,
}

impl Analytics {
    pub fn new(db: Db, bus: EventBus, cfg: AnalyticsConfig) -> Self {
        Self { rows: RollupRows::new(db), bus, cfg }
    }

    /// Runs passes until `shutdown`: every `interval`, and soon after committed events that feed
    /// the rollups (at most one pass per 200 ms).
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        if !self.cfg.enabled {
            return;
        }
        let mut rx = self.bus.subscribe("analytics");
        let mut tick = tokio::time::interval(self.cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u32;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                m = rx.recv_local() => {
                    match m.as_deref() {
                        Some(BusMessage::Events(c)) if c.events.iter().any(|e| feeds_rollups(&e.kind)) => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Some(_) => continue,
                        None => return,
                    }
                }
                _ = shutdown.changed() => return,
            }
            match self.run_pass(crate::unix_ms()).await {
                Ok(_) => failures = 0,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "analytics pass failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(failures.min(20)))).await;
                }
            }
        }
    }

    /// One pass at `now_ms`: recomputes the dirty buckets that are due, then checks the buckets
    /// closed since the last pass for anomalies. Publishes what it wrote. One replica at a time
    /// runs a pass (see [`RollupRows::exclusive`]); the others skip.
    pub async fn run_pass(&self, now_ms: i64) -> Result<PassReport, StoreError> {
        Ok(self
            .rows
            .exclusive(PASS_LOCK_KEY, self.pass(now_ms))
            .await?
            .unwrap_or(PassReport { skipped: true, ..PassReport::default() }))
    }

    async fn pass(&self, now_ms: i64) -> Result<PassReport, StoreError> {
        let mut report = PassReport::default();
        loop {
            let (rows, buckets, more) = self.rollup_pass(now_ms).await?;
            report.buckets += buckets;
            report.rows += rows.len();
            for row in rows {
                if let Ok(rollup) = serde_json::to_value(&row) {
                    self.bus.publish(BusMessage::Rollup { rollup });
                }
            }
            if !more {
                break;
            }
        }
        report.anomalies = self.anomaly_pass(now_ms).await?;
        for a in &report.anomalies {
            if let Ok(anomaly) = serde_json::to_value(a) {
                self.bus.publish(BusMessage::Anomaly { anomaly });
            }
        }
        Ok(report)
    }

    /// Recomputes up to [`MARKS_PER_PASS`] dirty buckets that are due: minutes at once; a
    /// quarter hour or an hour [`recompute_delay_ms`] after it became dirty, or at once when it
    /// had closed before (late events). The events are read outside any write transaction; then,
    /// in one short transaction, the rows are upserted and the marks deleted where no new event
    /// marked them meanwhile (those are recomputed by a later pass). Returns the rows written,
    /// the buckets recomputed and whether more marks are due.
    async fn rollup_pass(&self, now_ms: i64) -> Result<(Vec<MetricRow>, usize, bool), StoreError> {
        let due: Vec<(Resolution, DirtyMark)> = self
            .rows
            .dirty_marks()
            .await?
            .into_iter()
            .filter_map(|m| Resolution::from_seconds(m.resolution_s).map(|r| (r, m)))
            .filter(|(r, m)| now_ms - m.since_ms >= recompute_delay_ms(*r) || m.bucket_ms + r.millis() <= m.since_ms)
            .collect();
        let more = due.len() > MARKS_PER_PASS;
        let due = &due[..due.len().min(MARKS_PER_PASS)];
        if due.is_empty() {
            return Ok((Vec::new(), 0, false));
        }
        let mut computed = Vec::with_capacity(due.len());
        for (res, m) in due {
            let samples =
                self.rows.bucket_events(&m.device_id, &m.camera, m.bucket_ms, m.bucket_ms + res.millis()).await?;
            for (key, f) in rollup::compute(&samples) {
                let mut row = MetricRow::new(
                    *res,
                    m.bucket_ms,
                    &m.device_id,
                    &m.camera,
                    key.line,
                    key.zone,
                    key.label,
                    key.direction,
                );
                row.count = f.count;
                row.speed_samples = f.speed_samples;
                row.speed_mean_kmh = f.speed_mean_kmh;
                row.speed_p85_kmh = f.speed_p85_kmh;
                row.occupancy = f.occupancy;
                computed.push(row);
            }
        }
        let done: Vec<DirtyMark> = due.iter().map(|(_, m)| m.clone()).collect();
        self.rows.write(&computed, &done, now_ms).await?;
        Ok((computed, due.len(), more))
    }

    /// Checks the closed 15-minute buckets (volume) and minutes (speed) not checked yet.
    async fn anomaly_pass(&self, now_ms: i64) -> Result<Vec<AnomalyRow>, StoreError> {
        let delay = i64::try_from(self.cfg.check_delay.as_millis()).unwrap_or(i64::MAX);
        let mut found = Vec::new();
        for (res, name) in [(Resolution::QuarterHour, "volume_checked_ms"), (Resolution::Minute, "speed_checked_ms")] {
            // The newest bucket that has closed (plus the delay for late events).
            let newest = res.bucket(now_ms.saturating_sub(delay)) - res.millis();
            // First run: start with the latest closed bucket rather than all of history.
            let checked = self.rows.state(name).await?.unwrap_or(newest - res.millis());
            let first = (checked + res.millis()).max(newest - (BUCKETS_PER_PASS - 1) * res.millis());
            let mut bucket = first;
            while bucket <= newest {
                let rows = match res {
                    Resolution::QuarterHour => self.check_volume(bucket).await?,
                    _ => self.check_speed(bucket).await?,
                };
                for row in rows {
                    if let Some(stored) = self.rows.insert_anomaly(row, now_ms).await? {
                        found.push(stored);
                    }
                }
                self.rows.set_state(name, bucket).await?;
                bucket += res.millis();
            }
        }
        Ok(found)
    }

    /// Volume verdicts of the lines in the 15-minute bucket `bucket`.
    async fn check_volume(&self, bucket: i64) -> Result<Vec<NewAnomaly>, StoreError> {
        let res = Resolution::QuarterHour;
        let base = anomaly::time_of_week_buckets(bucket, res.millis(), self.cfg.baseline_weeks);
        let mut all = base.clone();
        all.push(bucket);
        let (counts, active) = self.rows.line_counts(&all).await?;
        let active: BTreeSet<(String, String, i64)> =
            active.into_iter().map(|c| (c.device_id, c.camera, c.bucket_ms)).collect();
        let mut series: BTreeMap<LineKey, HashMap<i64, f64>> = BTreeMap::new();
        for c in counts {
            series.entry((c.device_id, c.camera, c.line)).or_default().insert(c.bucket_ms, c.count as f64);
        }
        let mut out = Vec::new();
        for ((device, camera, line), by_bucket) in series {
            let reported = |b: i64| active.contains(&(device.clone(), camera.clone(), b));
            if !reported(bucket) {
                continue; // the camera sent nothing at all: that is a device problem, not traffic
            }
            let value = by_bucket.get(&bucket).copied().unwrap_or(0.0);
            let samples: Vec<f64> =
                base.iter().filter(|b| reported(**b)).map(|b| by_bucket.get(b).copied().unwrap_or(0.0)).collect();
            if let Some(v) = anomaly::volume(value, &samples, &self.cfg.thresholds) {
                out.push(new_anomaly(v, device, camera, line, res, bucket, value));
            }
        }
        Ok(out)
    }

    /// Speed-drop verdicts of the lines in the minute `bucket`.
    async fn check_speed(&self, bucket: i64) -> Result<Vec<NewAnomaly>, StoreError> {
        let res = Resolution::Minute;
        let window = i64::try_from(self.cfg.speed_window.as_millis()).unwrap_or(i64::MAX);
        let rows = self.rows.line_speeds(bucket - window, bucket).await?;
        let mut series: BTreeMap<LineKey, Vec<(i64, i64, f64)>> = BTreeMap::new();
        for r in rows {
            series.entry((r.device_id, r.camera, r.line)).or_default().push((r.bucket_ms, r.samples, r.sum_kmh));
        }
        let mut out = Vec::new();
        for ((device, camera, line), minutes) in series {
            let Some(&(_, n, sum)) = minutes.iter().find(|(b, _, _)| *b == bucket) else { continue };
            if n <= 0 {
                continue;
            }
            let value = sum / n as f64;
            let history: Vec<f64> =
                minutes.iter().filter(|(b, m, _)| *b < bucket && *m > 0).map(|(_, m, s)| s / *m as f64).collect();
            let crossings = u64::try_from(n).unwrap_or(0);
            if let Some(v) = anomaly::speed_drop(value, crossings, &history, &self.cfg.thresholds) {
                out.push(new_anomaly(v, device, camera, line, res, bucket, value));
            }
        }
        Ok(out)
    }
}

/// (device, camera, line).
type LineKey = (String, String, String);

fn new_anomaly(
    v: anomaly::Verdict,
    device: String,
    camera: String,
    line: String,
    resolution: Resolution,
    bucket_ms: i64,
    value: f64,
) -> NewAnomaly {
    NewAnomaly {
        kind: v.kind,
        device,
        camera,
        line,
        resolution,
        bucket_ms,
        value,
        baseline: v.baseline.median,
        spread: v.baseline.spread,
        score: v.score,
        samples: v.baseline.samples as u64,
    }
}
