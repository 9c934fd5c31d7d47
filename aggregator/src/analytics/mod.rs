//! Traffic metrics and anomaly detection.
//!
//! **Rollups.** Per camera, line, class and direction (line crossings: counts, mean and 85th
//! percentile speed) and per camera and zone (zone occupancy: the time-weighted fraction of
//! frames with a road user in the zone, and the road users that entered), over 1 minute,
//! 15 minutes and 1 hour, in `metric_rollups`. They are incremental and exact: the ingest
//! transaction that stores events also marks their camera's buckets dirty at each resolution
//! (`rollup_dirty`, see [`rollup_marks`]), so a committed event can never be missed, however late
//! it arrives (an agent flushing hours of outbox after an outage); the worker
//! ([`Analytics::run`]) recomputes each dirty bucket from the stored events (idempotent) and
//! removes the mark only if no new event marked it meanwhile. Minutes are recomputed at once; a
//! live quarter hour or hour at most every 10 s / 60 s (each recomputation reads the whole
//! bucket), a closed one at once. On PostgreSQL one replica at a time runs a pass (an advisory
//! lock).
//! Each recomputed row is published on the bus ([`crate::bus::BusMessage::Rollup`]) for alert
//! rules. TimescaleDB continuous aggregates are not used: they cannot compute an exact 85th
//! percentile incrementally, and these rollups work the same on every backend.
//!
//! **Anomalies** ([`anomaly`]): unusual volumes by time of week and sudden speed drops, per
//! camera and line, checked when a bucket closes (plus [`RawAnalytics::check_delay_s`] for late
//! events), stored once in `anomalies` and published on the bus
//! ([`crate::bus::BusMessage::Anomaly`]) like events: live views, MQTT and alert rules see them.
//!
//! `GET /api/v1/metrics` and `GET /api/v1/anomalies` serve both ([`crate::http::metrics_api`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use its_shared::config::ConfigErrors;
use its_shared::event::{EventEnvelope, EventKind};
use serde::Deserialize;
use sqlx::QueryBuilder;

use crate::bus::{BusMessage, EventBus};
use crate::on_db;
use crate::store::db::Db;
use crate::store::{Scope, StoreError, format_timestamp_ms};

pub mod anomaly;
pub mod rollup;

use anomaly::Thresholds;
use rollup::{EventSample, RollupFigures, SeriesKey};

/// `[analytics]` as written in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAnalytics {
    /// Compute rollups and look for anomalies (default true).
    pub enabled: bool,
    /// Milliseconds between passes of the worker when nothing wakes it (100..=60000; default 1000).
    pub interval_ms: u64,
    /// |robust score| from which a value is an anomaly (2..=20; default 3.5).
    pub anomaly_score: f64,
    /// Weeks of history of a volume baseline (2..=52; default 8).
    pub baseline_weeks: u32,
    /// Fewest baseline samples before anything is judged (3..=200; default 6).
    pub min_baseline_samples: u32,
    /// Minutes before a minute that form its speed baseline (5..=240; default 30).
    pub speed_window_minutes: u32,
    /// A speed drop must also be below this fraction of the baseline (0.1..=0.95; default 0.6).
    pub speed_drop_ratio: f64,
    /// Fewest measured crossings in a minute for a speed verdict (1..=1000; default 3).
    pub min_speed_crossings: u64,
    /// Seconds after a bucket closes before it is checked, for late events (0..=3600; default 30).
    pub check_delay_s: u64,
}

impl Default for RawAnalytics {
    fn default() -> Self {
        let t = Thresholds::default();
        Self {
            enabled: true,
            interval_ms: 1000,
            anomaly_score: t.score,
            baseline_weeks: 8,
            min_baseline_samples: t.min_samples as u32,
            speed_window_minutes: 30,
            speed_drop_ratio: t.speed_drop_ratio,
            min_speed_crossings: t.min_crossings,
            check_delay_s: 30,
        }
    }
}

/// `[analytics]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalyticsConfig {
    pub enabled: bool,
    pub interval: Duration,
    pub thresholds: Thresholds,
    pub baseline_weeks: u32,
    pub speed_window: Duration,
    pub check_delay: Duration,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        let mut e = ConfigErrors::new("defaults");
        RawAnalytics::default().validate(&mut e)
    }
}

impl RawAnalytics {
    /// The validated settings; problems are pushed to `e` with their paths.
    pub fn validate(&self, e: &mut ConfigErrors) -> AnalyticsConfig {
        let a = self;
        e.check((100..=60_000).contains(&a.interval_ms), "analytics.interval_ms", || {
            "must be between 100 and 60000".into()
        });
        e.check((2.0..=20.0).contains(&a.anomaly_score), "analytics.anomaly_score", || {
            "must be between 2 and 20".into()
        });
        e.check((2..=52).contains(&a.baseline_weeks), "analytics.baseline_weeks", || "must be between 2 and 52".into());
        e.check((3..=200).contains(&a.min_baseline_samples), "analytics.min_baseline_samples", || {
            "must be between 3 and 200".into()
        });
        e.check((5..=240).contains(&a.speed_window_minutes), "analytics.speed_window_minutes", || {
            "must be between 5 and 240".into()
        });
        e.check((0.1..=0.95).contains(&a.speed_drop_ratio), "analytics.speed_drop_ratio", || {
            "must be between 0.1 and 0.95".into()
        });
        e.check((1..=1000).contains(&a.min_speed_crossings), "analytics.min_speed_crossings", || {
            "must be between 1 and 1000".into()
        });
        e.check(a.check_delay_s <= 3600, "analytics.check_delay_s", || "must be at most 3600".into());
        AnalyticsConfig {
            enabled: a.enabled,
            interval: Duration::from_millis(a.interval_ms),
            thresholds: Thresholds {
                score: a.anomaly_score,
                min_samples: a.min_baseline_samples as usize,
                speed_drop_ratio: a.speed_drop_ratio,
                min_crossings: a.min_speed_crossings,
            },
            baseline_weeks: a.baseline_weeks,
            speed_window: Duration::from_secs(u64::from(a.speed_window_minutes) * 60),
            check_delay: Duration::from_secs(a.check_delay_s),
        }
    }
}

/// A rollup resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resolution {
    Minute,
    QuarterHour,
    Hour,
}

impl Resolution {
    pub const ALL: [Resolution; 3] = [Resolution::Minute, Resolution::QuarterHour, Resolution::Hour];

    pub fn seconds(self) -> i64 {
        match self {
            Resolution::Minute => 60,
            Resolution::QuarterHour => 900,
            Resolution::Hour => 3600,
        }
    }

    pub fn millis(self) -> i64 {
        self.seconds() * 1000
    }

    /// `1m`, `15m`, `1h`: the API's names.
    pub fn name(self) -> &'static str {
        match self {
            Resolution::Minute => "1m",
            Resolution::QuarterHour => "15m",
            Resolution::Hour => "1h",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == s)
    }

    fn from_seconds(s: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.seconds() == s)
    }

    /// Start of the bucket that holds `ms`.
    pub fn bucket(self, ms: i64) -> i64 {
        ms.div_euclid(self.millis()) * self.millis()
    }
}

/// Kinds that feed the rollups.
pub fn feeds_rollups(kind: &EventKind) -> bool {
    matches!(kind, EventKind::LineCrossing { .. } | EventKind::ZoneOccupancy { .. })
}

/// Marks a camera's bucket dirty (run in the ingest transaction, per [`rollup_marks`] entry,
/// bound: device, camera, resolution in seconds, bucket start, now).
pub const MARK_DIRTY_SQL: &str = "INSERT INTO rollup_dirty (device_id, camera, resolution_s, bucket_ms, gen, since_ms) \
     VALUES ($1, $2, $3, $4, 1, $5) \
     ON CONFLICT (device_id, camera, resolution_s, bucket_ms) DO UPDATE SET gen = rollup_dirty.gen + 1";

/// The distinct (camera, resolution in seconds, bucket start) of the newly stored events
/// (`new_seqs`, ascending) that feed the rollups.
pub fn rollup_marks<'a>(events: &'a [EventEnvelope], new_seqs: &[u64]) -> BTreeSet<(&'a str, i64, i64)> {
    let mut out = BTreeSet::new();
    for e in events.iter().filter(|e| feeds_rollups(&e.kind) && new_seqs.binary_search(&e.seq).is_ok()) {
        for res in Resolution::ALL {
            out.insert((e.camera.as_str(), res.seconds(), res.bucket(e.observed_at_ms)));
        }
    }
    out
}

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

/// One rollup row, as `GET /api/v1/metrics` serves it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MetricRow {
    #[serde(skip)]
    pub id: i64,
    pub resolution: &'static str,
    /// Bucket start, RFC 3339.
    pub start: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub device: String,
    /// Camera id on the device.
    pub camera: String,
    /// Line crossings: the line; `null` for zone occupancy.
    pub line: Option<String>,
    /// Zone occupancy: the zone; `null` for line crossings.
    pub zone: Option<String>,
    pub class: Option<String>,
    pub direction: Option<String>,
    /// Crossings, or road users that entered the zone.
    pub count: u64,
    pub speed_samples: u64,
    pub speed_mean_kmh: Option<f64>,
    pub speed_p85_kmh: Option<f64>,
    pub occupancy: Option<f64>,
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

type RollupDbRow =
    (i64, i64, i64, String, String, String, String, String, String, i64, i64, Option<f64>, Option<f64>, Option<f64>);

impl MetricRow {
    fn from_db(r: RollupDbRow) -> Result<Self, StoreError> {
        let (id, res_s, bucket, device, camera, line, zone, label, direction, count, samples, mean, p85, occ) = r;
        let res = Resolution::from_seconds(res_s)
            .ok_or_else(|| StoreError::InvalidData(format!("rollup resolution {res_s} s")))?;
        Ok(Self {
            id,
            resolution: res.name(),
            start: format_timestamp_ms(bucket),
            start_ms: bucket,
            end_ms: bucket + res.millis(),
            device,
            camera,
            line: non_empty(line),
            zone: non_empty(zone),
            class: non_empty(label),
            direction: non_empty(direction),
            count: u64::try_from(count).unwrap_or(0),
            speed_samples: u64::try_from(samples).unwrap_or(0),
            speed_mean_kmh: mean,
            speed_p85_kmh: p85,
            occupancy: occ,
        })
    }

    fn computed(res: Resolution, bucket: i64, device: &str, camera: &str, key: SeriesKey, f: RollupFigures) -> Self {
        Self {
            id: 0,
            resolution: res.name(),
            start: format_timestamp_ms(bucket),
            start_ms: bucket,
            end_ms: bucket + res.millis(),
            device: device.to_owned(),
            camera: camera.to_owned(),
            line: non_empty(key.line),
            zone: non_empty(key.zone),
            class: non_empty(key.label),
            direction: non_empty(key.direction),
            count: f.count,
            speed_samples: f.speed_samples,
            speed_mean_kmh: f.speed_mean_kmh,
            speed_p85_kmh: f.speed_p85_kmh,
            occupancy: f.occupancy,
        }
    }
}

/// One anomaly, as `GET /api/v1/anomalies` and the bus carry it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AnomalyRow {
    /// `anomaly:<n>`.
    pub id: String,
    /// `volume_high`, `volume_low` or `speed_drop`.
    pub kind: String,
    pub device: String,
    pub camera: String,
    pub line: String,
    pub resolution: &'static str,
    pub start: String,
    pub start_ms: i64,
    /// The count (volume) or mean speed in km/h (speed drop) of the bucket.
    pub value: f64,
    /// The baseline's median.
    pub baseline: f64,
    /// The baseline's spread (1.4826 × MAD, floored).
    pub spread: f64,
    /// (value − baseline) / spread.
    pub score: f64,
    /// Baseline samples.
    pub samples: u64,
    #[serde(rename = "@timestamp")]
    pub detected_at: String,
    pub detected_at_ms: i64,
}

type AnomalyDbRow = (i64, String, String, String, String, i64, i64, f64, f64, f64, f64, i64, i64);

impl AnomalyRow {
    fn from_db(r: AnomalyDbRow) -> Self {
        let (id, kind, device, camera, line, res_s, bucket, value, baseline, spread, score, samples, detected) = r;
        Self {
            id: format!("anomaly:{id}"),
            kind,
            device,
            camera,
            line,
            resolution: Resolution::from_seconds(res_s).map_or("?", Resolution::name),
            start: format_timestamp_ms(bucket),
            start_ms: bucket,
            value,
            baseline,
            spread,
            score,
            samples: u64::try_from(samples).unwrap_or(0),
            detected_at: format_timestamp_ms(detected),
            detected_at_ms: detected,
        }
    }
}

/// Most dirty marks taken per pass.
const MARKS_PER_PASS: i64 = 2000;
/// Most closed buckets checked for anomalies per pass (per resolution).
const BUCKETS_PER_PASS: i64 = 96;
/// Advisory lock key that keeps replicas' workers from running passes at once (PostgreSQL).
const PG_LOCK_KEY: i64 = 0x1750_a11a_1f71_c500;

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
    db: Db,
    bus: EventBus,
    cfg: AnalyticsConfig,
}

impl Analytics {
    pub fn new(db: Db, bus: EventBus, cfg: AnalyticsConfig) -> Self {
        Self { db, bus, cfg }
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
    /// closed since the last pass for anomalies. Publishes what it wrote. On PostgreSQL one
    /// replica at a time runs a pass (a session advisory lock); the others skip.
    pub async fn run_pass(&self, now_ms: i64) -> Result<PassReport, StoreError> {
        let Some(pool) = self.db.postgres() else {
            return self.pass(now_ms).await;
        };
        let mut conn = pool.acquire().await?;
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(PG_LOCK_KEY).fetch_one(&mut *conn).await?;
        if !locked {
            return Ok(PassReport { skipped: true, ..PassReport::default() });
        }
        let result = self.pass(now_ms).await;
        if sqlx::query("SELECT pg_advisory_unlock($1)").bind(PG_LOCK_KEY).execute(&mut *conn).await.is_err() {
            // Closing the session releases its locks.
            let _ = conn.detach();
        }
        result
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
    /// had closed before (late events). The events are read outside any write transaction (on
    /// SQLite from the reader pool, so ingest is never held up); then, in one short
    /// transaction, the rows are upserted and the marks deleted where no new event marked them
    /// meanwhile (those are recomputed by a later pass). Returns the rows written, the buckets
    /// recomputed and whether more marks are due.
    async fn rollup_pass(&self, now_ms: i64) -> Result<(Vec<MetricRow>, usize, bool), StoreError> {
        let payload = if self.db.is_postgres() { "payload::text" } else { "payload" };
        let events_sql = format!(
            "SELECT kind, label, line, zone, direction, speed_kmh, \
             CASE WHEN kind = 'zone_occupancy' THEN {payload} END FROM events \
             WHERE camera = $1 AND device_id = $2 AND observed_at_ms >= $3 AND observed_at_ms < $4 \
             AND kind IN ('line_crossing', 'zone_occupancy')"
        );
        type Mark = (String, String, i64, i64, i64, i64);
        let marks: Vec<Mark> = on_db!(self.db.read(), pool => sqlx::query_as(
            "SELECT device_id, camera, resolution_s, bucket_ms, gen, since_ms FROM rollup_dirty ORDER BY bucket_ms")
            .fetch_all(pool)
            .await)?;
        let due: Vec<(Resolution, Mark)> = marks
            .into_iter()
            .filter_map(|m| Resolution::from_seconds(m.2).map(|r| (r, m)))
            .filter(|(r, m)| now_ms - m.5 >= recompute_delay_ms(*r) || m.3 + r.millis() <= m.5)
            .collect();
        let more = due.len() > MARKS_PER_PASS as usize;
        let due = &due[..due.len().min(MARKS_PER_PASS as usize)];
        if due.is_empty() {
            return Ok((Vec::new(), 0, false));
        }
        let mut computed = Vec::with_capacity(due.len());
        for (res, (device, camera, _, bucket, _, _)) in due {
            type Sample =
                (String, Option<String>, Option<String>, Option<String>, Option<String>, Option<f64>, Option<String>);
            let samples: Vec<Sample> = on_db!(self.db.read(), pool => sqlx::query_as(sqlx::AssertSqlSafe(events_sql.as_str()))
                .bind(camera.as_str())
                .bind(device.as_str())
                .bind(*bucket)
                .bind(*bucket + res.millis())
                .fetch_all(pool)
                .await)?;
            let samples: Vec<EventSample> = samples
                .into_iter()
                .map(|(kind, label, line, zone, direction, speed_kmh, payload)| EventSample {
                    kind,
                    label,
                    line,
                    zone,
                    direction,
                    speed_kmh,
                    payload,
                })
                .collect();
            for (key, f) in rollup::compute(&samples) {
                computed.push(MetricRow::computed(*res, *bucket, device, camera, key, f));
            }
        }
        on_db!(self.db.write(), pool => {
            let mut tx = pool.begin().await?;
            for row in &computed {
                sqlx::query(
                    "INSERT INTO metric_rollups (resolution_s, bucket_ms, device_id, camera, line, zone, label, \
                     direction, count, speed_samples, speed_mean_kmh, speed_p85_kmh, occupancy, updated_at_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
                     ON CONFLICT (resolution_s, device_id, camera, bucket_ms, line, zone, label, direction) \
                     DO UPDATE SET count = excluded.count, speed_samples = excluded.speed_samples, \
                     speed_mean_kmh = excluded.speed_mean_kmh, speed_p85_kmh = excluded.speed_p85_kmh, \
                     occupancy = excluded.occupancy, updated_at_ms = excluded.updated_at_ms",
                )
                .bind((row.end_ms - row.start_ms) / 1000)
                .bind(row.start_ms)
                .bind(row.device.as_str())
                .bind(row.camera.as_str())
                .bind(row.line.as_deref().unwrap_or(""))
                .bind(row.zone.as_deref().unwrap_or(""))
                .bind(row.class.as_deref().unwrap_or(""))
                .bind(row.direction.as_deref().unwrap_or(""))
                .bind(i64::try_from(row.count).unwrap_or(i64::MAX))
                .bind(i64::try_from(row.speed_samples).unwrap_or(i64::MAX))
                .bind(row.speed_mean_kmh)
                .bind(row.speed_p85_kmh)
                .bind(row.occupancy)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            }
            for (res, (device, camera, _, bucket, gen_read, _)) in due {
                sqlx::query(
                    "DELETE FROM rollup_dirty WHERE device_id = $1 AND camera = $2 AND resolution_s = $3 \
                     AND bucket_ms = $4 AND gen = $5",
                )
                .bind(device.as_str())
                .bind(camera.as_str())
                .bind(res.seconds())
                .bind(*bucket)
                .bind(*gen_read)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok::<_, StoreError>(())
        })?;
        Ok((computed, due.len(), more))
    }

    /// Reads a progress value.
    async fn state(&self, name: &str) -> Result<Option<i64>, StoreError> {
        let v: Option<i64> = on_db!(self.db.read(), pool =>
            sqlx::query_scalar("SELECT value FROM analytics_state WHERE name = $1").bind(name).fetch_optional(pool).await)?;
        Ok(v)
    }

    async fn set_state(&self, name: &str, value: i64) -> Result<(), StoreError> {
        on_db!(self.db.write(), pool => sqlx::query(
            "INSERT INTO analytics_state (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
            .bind(name).bind(value).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Checks the closed 15-minute buckets (volume) and minutes (speed) not checked yet.
    async fn anomaly_pass(&self, now_ms: i64) -> Result<Vec<AnomalyRow>, StoreError> {
        let delay = i64::try_from(self.cfg.check_delay.as_millis()).unwrap_or(i64::MAX);
        let mut found = Vec::new();
        for (res, name) in [(Resolution::QuarterHour, "volume_checked_ms"), (Resolution::Minute, "speed_checked_ms")] {
            // The newest bucket that has closed (plus the delay for late events).
            let newest = res.bucket(now_ms.saturating_sub(delay)) - res.millis();
            // First run: start with the latest closed bucket rather than all of history.
            let checked = self.state(name).await?.unwrap_or(newest - res.millis());
            let first = (checked + res.millis()).max(newest - (BUCKETS_PER_PASS - 1) * res.millis());
            let mut bucket = first;
            while bucket <= newest {
                let rows = match res {
                    Resolution::QuarterHour => self.check_volume(bucket).await?,
                    _ => self.check_speed(bucket).await?,
                };
                for row in rows {
                    if let Some(stored) = self.record_anomaly(row, now_ms).await? {
                        found.push(stored);
                    }
                }
                self.set_state(name, bucket).await?;
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
        // Counts per line and bucket, and which cameras reported at all in each bucket (a line
        // with no crossings in a bucket where its camera reported counts as 0).
        let (counts, active): (Vec<LineCount>, Vec<CameraBucket>) = on_db!(self.db.read(), pool => {
            let mut qb = QueryBuilder::new(
                "SELECT device_id, camera, line, bucket_ms, CAST(SUM(count) AS BIGINT) FROM metric_rollups \
                 WHERE resolution_s = 900 AND line <> '' AND bucket_ms IN (",
            );
            push_list(&mut qb, &all);
            qb.push(") GROUP BY device_id, camera, line, bucket_ms");
            let counts = qb.build_query_as().fetch_all(pool).await?;
            let mut qa = QueryBuilder::new(
                "SELECT DISTINCT device_id, camera, bucket_ms FROM metric_rollups \
                 WHERE resolution_s = 900 AND bucket_ms IN (",
            );
            push_list(&mut qa, &all);
            qa.push(")");
            let active = qa.build_query_as().fetch_all(pool).await?;
            Ok::<_, sqlx::Error>((counts, active))
        })?;
        let active: BTreeSet<(String, String, i64)> = active.into_iter().collect();
        let mut series: BTreeMap<LineKey, HashMap<i64, f64>> = BTreeMap::new();
        for (device, camera, line, b, n) in counts {
            series.entry((device, camera, line)).or_default().insert(b, n as f64);
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
                out.push(NewAnomaly { verdict: v, device, camera, line, res, bucket, value });
            }
        }
        Ok(out)
    }

    /// Speed-drop verdicts of the lines in the minute `bucket`.
    async fn check_speed(&self, bucket: i64) -> Result<Vec<NewAnomaly>, StoreError> {
        let res = Resolution::Minute;
        let window = i64::try_from(self.cfg.speed_window.as_millis()).unwrap_or(i64::MAX);
        let rows: Vec<(String, String, String, i64, i64, f64)> = on_db!(self.db.read(), pool => sqlx::query_as(
            "SELECT device_id, camera, line, bucket_ms, CAST(SUM(speed_samples) AS BIGINT), \
             SUM(speed_mean_kmh * speed_samples) FROM metric_rollups \
             WHERE resolution_s = 60 AND line <> '' AND speed_samples > 0 AND bucket_ms >= $1 AND bucket_ms <= $2 \
             GROUP BY device_id, camera, line, bucket_ms")
            .bind(bucket - window)
            .bind(bucket)
            .fetch_all(pool)
            .await)?;
        let mut series: BTreeMap<LineKey, Vec<(i64, i64, f64)>> = BTreeMap::new();
        for (device, camera, line, b, n, sum) in rows {
            series.entry((device, camera, line)).or_default().push((b, n, sum));
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
                out.push(NewAnomaly { verdict: v, device, camera, line, res, bucket, value });
            }
        }
        Ok(out)
    }

    /// Stores an anomaly once (a bucket checked again finds the same one and stores nothing).
    async fn record_anomaly(&self, a: NewAnomaly, now_ms: i64) -> Result<Option<AnomalyRow>, StoreError> {
        let id: Option<i64> = on_db!(self.db.write(), pool => sqlx::query_scalar(
            "INSERT INTO anomalies (kind, device_id, camera, line, resolution_s, bucket_ms, value, baseline, spread, \
             score, samples, detected_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (kind, device_id, camera, line, bucket_ms) DO NOTHING RETURNING id")
            .bind(a.verdict.kind)
            .bind(a.device.as_str())
            .bind(a.camera.as_str())
            .bind(a.line.as_str())
            .bind(a.res.seconds())
            .bind(a.bucket)
            .bind(a.value)
            .bind(a.verdict.baseline.median)
            .bind(a.verdict.baseline.spread)
            .bind(a.verdict.score)
            .bind(a.verdict.baseline.samples as i64)
            .bind(now_ms)
            .fetch_optional(pool)
            .await)?;
        Ok(id.map(|id| {
            AnomalyRow::from_db((
                id,
                a.verdict.kind.to_owned(),
                a.device,
                a.camera,
                a.line,
                a.res.seconds(),
                a.bucket,
                a.value,
                a.verdict.baseline.median,
                a.verdict.baseline.spread,
                a.verdict.score,
                a.verdict.baseline.samples as i64,
                now_ms,
            ))
        }))
    }
}

/// (device, camera, line).
type LineKey = (String, String, String);
/// (device, camera, line, bucket, count).
type LineCount = (String, String, String, i64, i64);
/// (device, camera, bucket).
type CameraBucket = (String, String, i64);

struct NewAnomaly {
    verdict: anomaly::Verdict,
    device: String,
    camera: String,
    line: String,
    res: Resolution,
    bucket: i64,
    value: f64,
}

fn push_list<DB>(qb: &mut QueryBuilder<DB>, values: &[i64])
where
    DB: sqlx::Database,
    for<'t> i64: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            qb.push(", ");
        }
        qb.push_bind(*v);
    }
}

/// Filters and page of [`query_metrics`] (all optional, all apply).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricQuery {
    pub resolution: Option<Resolution>,
    pub device: Option<String>,
    pub camera: Option<String>,
    pub site: Option<String>,
    pub class: Option<String>,
    pub line: Option<String>,
    pub zone: Option<String>,
    pub direction: Option<String>,
    /// Inclusive lower bound on the bucket start.
    pub from_ms: Option<i64>,
    /// Exclusive upper bound on the bucket start.
    pub to_ms: Option<i64>,
    pub limit: u32,
    /// `(bucket_ms, id)` of the last row of the previous page.
    pub after: Option<(i64, i64)>,
    pub scope: Scope,
}

/// A page of rollups, oldest bucket first (a time series), and the cursor of the next page.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MetricPage {
    pub metrics: Vec<MetricRow>,
    pub next_cursor: Option<String>,
}

/// Encodes a `(bucket_ms, id)` position as a cursor.
pub fn encode_cursor(bucket_ms: i64, id: i64) -> String {
    format!("{bucket_ms}.{id}")
}

/// Decodes [`encode_cursor`]'s form.
pub fn decode_cursor(s: &str) -> Option<(i64, i64)> {
    let (a, b) = s.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Pushes ` AND col = value` for each filter given, the site and the caller's scope, for a query
/// `FROM <table> r` whose rows have `device_id` and `camera`.
fn push_camera_filters<DB>(
    qb: &mut QueryBuilder<DB>,
    device: Option<&str>,
    camera: Option<&str>,
    site: Option<&str>,
    scope: &Scope,
) where
    DB: sqlx::Database,
    for<'t> &'t str: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    for (col, v) in [("r.device_id", device), ("r.camera", camera)] {
        if let Some(v) = v {
            qb.push(" AND ").push(col).push(" = ").push_bind(v);
        }
    }
    if let Some(site) = site {
        qb.push(" AND EXISTS (SELECT 1 FROM cameras fc WHERE fc.device_id = r.device_id AND fc.camera = r.camera AND fc.site_id = ")
            .push_bind(site)
            .push(")");
    }
    crate::store::push_scope_condition_on(qb, scope, "r");
}

/// Rollups matching `q`.
pub async fn query_metrics(db: &Db, q: &MetricQuery) -> Result<MetricPage, StoreError> {
    let limit = q.limit.clamp(1, 1000);
    let res = q.resolution.unwrap_or(Resolution::QuarterHour);
    let page: Vec<RollupDbRow> = on_db!(db.read(), pool => {
        let mut qb = QueryBuilder::new(
            "SELECT r.id, r.resolution_s, r.bucket_ms, r.device_id, r.camera, r.line, r.zone, r.label, r.direction, \
             r.count, r.speed_samples, r.speed_mean_kmh, r.speed_p85_kmh, r.occupancy FROM metric_rollups r WHERE r.resolution_s = ",
        );
        qb.push_bind(res.seconds());
        push_camera_filters(&mut qb, q.device.as_deref(), q.camera.as_deref(), q.site.as_deref(), &q.scope);
        for (col, v) in [("r.label", &q.class), ("r.line", &q.line), ("r.zone", &q.zone), ("r.direction", &q.direction)] {
            if let Some(v) = v {
                qb.push(" AND ").push(col).push(" = ").push_bind(v.as_str());
            }
        }
        if let Some(from) = q.from_ms {
            qb.push(" AND r.bucket_ms >= ").push_bind(from);
        }
        if let Some(to) = q.to_ms {
            qb.push(" AND r.bucket_ms < ").push_bind(to);
        }
        if let Some((b, id)) = q.after {
            qb.push(" AND (r.bucket_ms > ").push_bind(b).push(" OR (r.bucket_ms = ").push_bind(b).push(" AND r.id > ").push_bind(id).push("))");
        }
        qb.push(" ORDER BY r.bucket_ms, r.id LIMIT ").push_bind(i64::from(limit) + 1);
        qb.build_query_as().fetch_all(pool).await
    })?;
    let mut metrics = page.into_iter().map(MetricRow::from_db).collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if metrics.len() > limit as usize {
        metrics.truncate(limit as usize);
        metrics.last().map(|m| encode_cursor(m.start_ms, m.id))
    } else {
        None
    };
    Ok(MetricPage { metrics, next_cursor })
}

/// Filters and page of [`query_anomalies`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnomalyQuery {
    pub kind: Option<String>,
    pub device: Option<String>,
    pub camera: Option<String>,
    pub site: Option<String>,
    pub line: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub limit: u32,
    /// `(bucket_ms, id)` of the last row of the previous page (newest first).
    pub before: Option<(i64, i64)>,
    pub scope: Scope,
}

/// A page of anomalies, newest bucket first.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AnomalyPage {
    pub anomalies: Vec<AnomalyRow>,
    pub next_cursor: Option<String>,
}

/// The kinds of anomaly.
pub const ANOMALY_KINDS: &[&str] = &["volume_high", "volume_low", "speed_drop"];

/// Anomalies matching `q`.
pub async fn query_anomalies(db: &Db, q: &AnomalyQuery) -> Result<AnomalyPage, StoreError> {
    let limit = q.limit.clamp(1, 1000);
    let rows: Vec<AnomalyDbRow> = on_db!(db.read(), pool => {
        let mut qb = QueryBuilder::new(
            "SELECT r.id, r.kind, r.device_id, r.camera, r.line, r.resolution_s, r.bucket_ms, r.value, r.baseline, \
             r.spread, r.score, r.samples, r.detected_at_ms FROM anomalies r WHERE 1 = 1",
        );
        push_camera_filters(&mut qb, q.device.as_deref(), q.camera.as_deref(), q.site.as_deref(), &q.scope);
        for (col, v) in [("r.kind", &q.kind), ("r.line", &q.line)] {
            if let Some(v) = v {
                qb.push(" AND ").push(col).push(" = ").push_bind(v.as_str());
            }
        }
        if let Some(from) = q.from_ms {
            qb.push(" AND r.bucket_ms >= ").push_bind(from);
        }
        if let Some(to) = q.to_ms {
            qb.push(" AND r.bucket_ms < ").push_bind(to);
        }
        if let Some((b, id)) = q.before {
            qb.push(" AND (r.bucket_ms < ").push_bind(b).push(" OR (r.bucket_ms = ").push_bind(b).push(" AND r.id < ").push_bind(id).push("))");
        }
        qb.push(" ORDER BY r.bucket_ms DESC, r.id DESC LIMIT ").push_bind(i64::from(limit) + 1);
        qb.build_query_as().fetch_all(pool).await
    })?;
    let mut anomalies: Vec<(i64, AnomalyRow)> = rows.into_iter().map(|r| (r.0, AnomalyRow::from_db(r))).collect();
    let next_cursor = if anomalies.len() > limit as usize {
        anomalies.truncate(limit as usize);
        anomalies.last().map(|(id, a)| encode_cursor(a.start_ms, *id))
    } else {
        None
    };
    Ok(AnomalyPage { anomalies: anomalies.into_iter().map(|(_, a)| a).collect(), next_cursor })
}

#[cfg(test)]
mod tests {
    use super::*;
    use its_shared::event::{Direction, ObjectRef};

    fn crossing(seq: u64, camera: &str, at: i64) -> EventEnvelope {
        EventEnvelope {
            seq,
            camera: camera.into(),
            observed_at_ms: at,
            kind: EventKind::LineCrossing {
                line: "l".into(),
                object: ObjectRef { track_id: 1, label: "car".into(), score: 0.9, bbox: [0.0; 4] },
                direction: Direction::In,
                speed_kmh: None,
            },
        }
    }

    #[test]
    fn marks_are_the_distinct_buckets_of_new_rollup_events_at_every_resolution() {
        let mut health = crossing(4, "a", 0);
        health.kind = EventKind::DeviceHealth(Default::default());
        let events = vec![crossing(1, "a", 61_000), crossing(2, "a", 119_999), crossing(3, "b", 120_000), health];
        let marks = rollup_marks(&events, &[1, 2, 3, 4]);
        assert_eq!(
            marks.into_iter().collect::<Vec<_>>(),
            vec![("a", 60, 60_000), ("a", 900, 0), ("a", 3600, 0), ("b", 60, 120_000), ("b", 900, 0), ("b", 3600, 0)]
        );
        // Duplicates (not newly stored) mark nothing.
        assert!(rollup_marks(&events, &[4]).is_empty());
    }

    #[test]
    fn resolutions_bucket_and_parse() {
        assert_eq!(Resolution::QuarterHour.bucket(1_000_000), 900_000);
        assert_eq!(Resolution::Hour.bucket(-1), -3_600_000);
        assert_eq!(Resolution::parse("1h"), Some(Resolution::Hour));
        assert_eq!(Resolution::parse("5m"), None);
        assert_eq!(decode_cursor(&encode_cursor(-5, 7)), Some((-5, 7)));
        assert_eq!(decode_cursor("x.1"), None);
    }

    #[test]
    fn bad_settings_are_all_reported_with_their_paths() {
        let raw = RawAnalytics { interval_ms: 5, anomaly_score: 0.5, speed_drop_ratio: 2.0, ..Default::default() };
        let mut e = ConfigErrors::new("test");
        raw.validate(&mut e);
        let paths: Vec<&str> = e.issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, vec!["analytics.interval_ms", "analytics.anomaly_score", "analytics.speed_drop_ratio"]);
    }
}
