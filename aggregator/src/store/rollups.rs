//! The analytics tables: dirty marks (`rollup_dirty`, written by the ingest transaction), rollups
//! (`metric_rollups`), anomalies (`anomalies`) and the worker's progress (`analytics_state`).
//! What the rows mean and when they are recomputed is [`crate::analytics`]'s; here is only how
//! they are read and written. Portable SQL, both backends.

use std::collections::BTreeSet;

use its_shared::event::{EventEnvelope, EventKind};
use sqlx::QueryBuilder;

use super::cursor::PageCursor;
use super::{Db, Scope, StoreError, format_timestamp_ms};
use crate::model::Resolution;
use crate::store::db::on_db;

/// Largest page of [`RollupRows::query_metrics`] and [`RollupRows::query_anomalies`].
const MAX_PAGE: u32 = 1000;

/// Kinds that feed the rollups.
pub fn feeds_rollups(kind: &EventKind) -> bool {
    matches!(kind, EventKind::LineCrossing { .. } | EventKind::ZoneOccupancy { .. })
}

/// Marks a camera's bucket dirty (run in the ingest transaction, per [`rollup_marks`] entry,
/// bound: device, camera, resolution in seconds, bucket start, now).
pub(super) const MARK_DIRTY_SQL: &str = "INSERT INTO rollup_dirty (device_id, camera, resolution_s, bucket_ms, gen, \
     since_ms) VALUES ($1, $2, $3, $4, 1, $5) \
     ON CONFLICT (device_id, camera, resolution_s, bucket_ms) DO UPDATE SET gen = rollup_dirty.gen + 1";

/// Marks the rollup buckets that the newly stored events of a batch fall in as dirty
/// ([`rollup_marks`], [`MARK_DIRTY_SQL`]), inside the batch's transaction `$tx`, on either
/// backend: `$text` makes a text parameter as the backend stores it. Returns from the calling
/// function (with `?`) on an error.
macro_rules! mark_dirty {
    ($tx:expr, $text:expr, $device:expr, $events:expr, $new_seqs:expr, $now_ms:expr) => {
        for (camera, resolution_s, bucket_ms) in $crate::store::rollups::rollup_marks($events, $new_seqs) {
            sqlx::query($crate::store::rollups::MARK_DIRTY_SQL)
                .bind($text($device).as_ref())
                .bind($text(camera).as_ref())
                .bind(resolution_s)
                .bind(bucket_ms)
                .bind($now_ms)
                .execute(&mut *$tx)
                .await?;
        }
    };
}
pub(in crate::store) use mark_dirty;

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

/// One stored event as the rollups need it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct EventSample {
    pub kind: String,
    pub label: Option<String>,
    pub line: Option<String>,
    pub zone: Option<String>,
    pub direction: Option<String>,
    pub speed_kmh: Option<f64>,
    /// The payload (JSON text): read for zone occupancy only.
    pub payload: Option<String>,
}

/// A camera's bucket marked dirty by the ingest.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DirtyMark {
    pub device_id: String,
    pub camera: String,
    pub resolution_s: i64,
    pub bucket_ms: i64,
    /// Bumped by every commit that marks the bucket again.
    pub generation: i64,
    /// When the bucket was first marked.
    pub since_ms: i64,
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

#[derive(sqlx::FromRow)]
struct RollupDbRow {
    id: i64,
    resolution_s: i64,
    bucket_ms: i64,
    device_id: String,
    camera: String,
    line: String,
    zone: String,
    label: String,
    direction: String,
    count: i64,
    speed_samples: i64,
    speed_mean_kmh: Option<f64>,
    speed_p85_kmh: Option<f64>,
    occupancy: Option<f64>,
}

impl MetricRow {
    /// A row of `res`'s bucket starting at `bucket_ms`; empty strings of the key mean "none".
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        res: Resolution,
        bucket_ms: i64,
        device: &str,
        camera: &str,
        line: String,
        zone: String,
        class: String,
        direction: String,
    ) -> Self {
        Self {
            id: 0,
            resolution: res.name(),
            start: format_timestamp_ms(bucket_ms),
            start_ms: bucket_ms,
            end_ms: bucket_ms + res.millis(),
            device: device.to_owned(),
            camera: camera.to_owned(),
            line: non_empty(line),
            zone: non_empty(zone),
            class: non_empty(class),
            direction: non_empty(direction),
            count: 0,
            speed_samples: 0,
            speed_mean_kmh: None,
            speed_p85_kmh: None,
            occupancy: None,
        }
    }

    fn from_db(r: RollupDbRow) -> Result<Self, StoreError> {
        let res = Resolution::from_seconds(r.resolution_s)
            .ok_or_else(|| StoreError::InvalidData(format!("rollup resolution {} s", r.resolution_s)))?;
        let mut row = Self::new(res, r.bucket_ms, &r.device_id, &r.camera, r.line, r.zone, r.label, r.direction);
        row.id = r.id;
        row.count = u64::try_from(r.count).unwrap_or(0);
        row.speed_samples = u64::try_from(r.speed_samples).unwrap_or(0);
        row.speed_mean_kmh = r.speed_mean_kmh;
        row.speed_p85_kmh = r.speed_p85_kmh;
        row.occupancy = r.occupancy;
        Ok(row)
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

/// An anomaly to store: what the analytics found in one line's bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAnomaly {
    pub kind: &'static str,
    pub device: String,
    pub camera: String,
    pub line: String,
    pub resolution: Resolution,
    pub bucket_ms: i64,
    pub value: f64,
    pub baseline: f64,
    pub spread: f64,
    pub score: f64,
    pub samples: u64,
}

#[derive(sqlx::FromRow)]
struct AnomalyDbRow {
    id: i64,
    kind: String,
    device_id: String,
    camera: String,
    line: String,
    resolution_s: i64,
    bucket_ms: i64,
    value: f64,
    baseline: f64,
    spread: f64,
    score: f64,
    samples: i64,
    detected_at_ms: i64,
}

impl AnomalyRow {
    fn from_db(r: AnomalyDbRow) -> Self {
        Self {
            id: format!("anomaly:{}", r.id),
            kind: r.kind,
            device: r.device_id,
            camera: r.camera,
            line: r.line,
            resolution: Resolution::from_seconds(r.resolution_s).map_or("?", Resolution::name),
            start: format_timestamp_ms(r.bucket_ms),
            start_ms: r.bucket_ms,
            value: r.value,
            baseline: r.baseline,
            spread: r.spread,
            score: r.score,
            samples: u64::try_from(r.samples).unwrap_or(0),
            detected_at: format_timestamp_ms(r.detected_at_ms),
            detected_at_ms: r.detected_at_ms,
        }
    }
}

/// A line's crossings in one 15-minute bucket.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct LineCount {
    pub device_id: String,
    pub camera: String,
    pub line: String,
    pub bucket_ms: i64,
    pub count: i64,
}

/// A camera that reported counts in a bucket.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, sqlx::FromRow)]
pub struct CameraBucket {
    pub device_id: String,
    pub camera: String,
    pub bucket_ms: i64,
}

/// A line's measured speeds in one minute: how many, and their sum.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct LineSpeeds {
    pub device_id: String,
    pub camera: String,
    pub line: String,
    pub bucket_ms: i64,
    pub samples: i64,
    pub sum_kmh: f64,
}

/// Filters and page of [`RollupRows::query_metrics`] (all optional, all apply).
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

/// Filters and page of [`RollupRows::query_anomalies`].
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

/// The analytics tables of one database.
#[derive(Debug, Clone)]
pub struct RollupRows {
    db: Db,
}

impl RollupRows {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Runs `pass` unless another replica is running one: on PostgreSQL under a session advisory
    /// lock on `key` (`None`: another replica holds it); on SQLite (one process) always.
    pub async fn exclusive<T, F>(&self, key: i64, pass: F) -> Result<Option<T>, StoreError>
    where
        F: Future<Output = Result<T, StoreError>>,
    {
        match self.db.postgres() {
            Some(pool) => super::postgres::with_advisory_lock(pool, key, pass).await,
            None => pass.await.map(Some),
        }
    }

    /// Every dirty mark, oldest bucket first.
    pub async fn dirty_marks(&self) -> Result<Vec<DirtyMark>, StoreError> {
        Ok(on_db!(self.db.read(), pool => sqlx::query_as(
            "SELECT device_id, camera, resolution_s, bucket_ms, gen AS generation, since_ms FROM rollup_dirty ORDER BY bucket_ms")
            .fetch_all(pool)
            .await)?)
    }

    /// The events of a camera's bucket that feed the rollups (read from the reader pool, so the
    /// ingest is never held up).
    pub async fn bucket_events(
        &self,
        device: &str,
        camera: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<EventSample>, StoreError> {
        let payload = if self.db.is_postgres() { "payload::text" } else { "payload" };
        let sql = format!(
            "SELECT kind, label, line, zone, direction, speed_kmh, \
             CASE WHEN kind = 'zone_occupancy' THEN {payload} END AS payload FROM events \
             WHERE camera = $1 AND device_id = $2 AND observed_at_ms >= $3 AND observed_at_ms < $4 \
             AND kind IN ('line_crossing', 'zone_occupancy')"
        );
        Ok(on_db!(self.db.read(), pool => sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(camera)
            .bind(device)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all(pool)
            .await)?)
    }

    /// In one short transaction: upserts `rows` and deletes the marks of `done` where no new
    /// event marked them meanwhile (same `gen`; those are recomputed later).
    pub async fn write(&self, rows: &[MetricRow], done: &[DirtyMark], now_ms: i64) -> Result<(), StoreError> {
        on_db!(self.db.write(), pool => {
            let mut tx = pool.begin().await?;
            for row in rows {
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
            for m in done {
                sqlx::query(
                    "DELETE FROM rollup_dirty WHERE device_id = $1 AND camera = $2 AND resolution_s = $3 \
                     AND bucket_ms = $4 AND gen = $5",
                )
                .bind(m.device_id.as_str())
                .bind(m.camera.as_str())
                .bind(m.resolution_s)
                .bind(m.bucket_ms)
                .bind(m.generation)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok::<_, StoreError>(())
        })
    }

    /// A progress value of the worker.
    pub async fn state(&self, name: &str) -> Result<Option<i64>, StoreError> {
        Ok(on_db!(self.db.read(), pool =>
            sqlx::query_scalar("SELECT value FROM analytics_state WHERE name = $1").bind(name).fetch_optional(pool).await)?)
    }

    pub async fn set_state(&self, name: &str, value: i64) -> Result<(), StoreError> {
        on_db!(self.db.write(), pool => sqlx::query(
            "INSERT INTO analytics_state (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
            .bind(name).bind(value).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Crossings per line in each of the 15-minute `buckets`, and which cameras reported counts
    /// at all in each (a line with no crossings where its camera reported counts as 0).
    pub async fn line_counts(&self, buckets: &[i64]) -> Result<(Vec<LineCount>, Vec<CameraBucket>), StoreError> {
        Ok(on_db!(self.db.read(), pool => {
            let mut qb = QueryBuilder::new(
                "SELECT device_id, camera, line, bucket_ms, CAST(SUM(count) AS BIGINT) AS count FROM metric_rollups \
                 WHERE resolution_s = 900 AND line <> '' AND bucket_ms IN (",
            );
            push_list(&mut qb, buckets);
            qb.push(") GROUP BY device_id, camera, line, bucket_ms");
            let counts = qb.build_query_as().fetch_all(pool).await?;
            let mut qa = QueryBuilder::new(
                "SELECT DISTINCT device_id, camera, bucket_ms FROM metric_rollups \
                 WHERE resolution_s = 900 AND bucket_ms IN (",
            );
            push_list(&mut qa, buckets);
            qa.push(")");
            let active = qa.build_query_as().fetch_all(pool).await?;
            Ok::<_, sqlx::Error>((counts, active))
        })?)
    }

    /// Measured speeds per line and minute, for the minutes from `from_ms` to `to_ms` inclusive.
    pub async fn line_speeds(&self, from_ms: i64, to_ms: i64) -> Result<Vec<LineSpeeds>, StoreError> {
        Ok(on_db!(self.db.read(), pool => sqlx::query_as(
            "SELECT device_id, camera, line, bucket_ms, CAST(SUM(speed_samples) AS BIGINT) AS samples, \
             SUM(speed_mean_kmh * speed_samples) AS sum_kmh FROM metric_rollups \
             WHERE resolution_s = 60 AND line <> '' AND speed_samples > 0 AND bucket_ms >= $1 AND bucket_ms <= $2 \
             GROUP BY device_id, camera, line, bucket_ms")
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all(pool)
            .await)?)
    }

    /// Stores an anomaly once: `None` when the same one (kind, line, bucket) is stored already.
    pub async fn insert_anomaly(&self, a: NewAnomaly, now_ms: i64) -> Result<Option<AnomalyRow>, StoreError> {
        let id: Option<i64> = on_db!(self.db.write(), pool => sqlx::query_scalar(
            "INSERT INTO anomalies (kind, device_id, camera, line, resolution_s, bucket_ms, value, baseline, spread, \
             score, samples, detected_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (kind, device_id, camera, line, bucket_ms) DO NOTHING RETURNING id")
            .bind(a.kind)
            .bind(a.device.as_str())
            .bind(a.camera.as_str())
            .bind(a.line.as_str())
            .bind(a.resolution.seconds())
            .bind(a.bucket_ms)
            .bind(a.value)
            .bind(a.baseline)
            .bind(a.spread)
            .bind(a.score)
            .bind(i64::try_from(a.samples).unwrap_or(i64::MAX))
            .bind(now_ms)
            .fetch_optional(pool)
            .await)?;
        Ok(id.map(|id| {
            AnomalyRow::from_db(AnomalyDbRow {
                id,
                kind: a.kind.to_owned(),
                device_id: a.device,
                camera: a.camera,
                line: a.line,
                resolution_s: a.resolution.seconds(),
                bucket_ms: a.bucket_ms,
                value: a.value,
                baseline: a.baseline,
                spread: a.spread,
                score: a.score,
                samples: i64::try_from(a.samples).unwrap_or(i64::MAX),
                detected_at_ms: now_ms,
            })
        }))
    }

    /// Rollups matching `q`.
    pub async fn query_metrics(&self, q: &MetricQuery) -> Result<MetricPage, StoreError> {
        let limit = q.limit.clamp(1, MAX_PAGE);
        let res = q.resolution.unwrap_or(Resolution::QuarterHour);
        let page: Vec<RollupDbRow> = on_db!(self.db.read(), pool => {
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
            push_page(&mut qb, q.from_ms, q.to_ms, q.after, Order::Oldest, limit);
            qb.build_query_as().fetch_all(pool).await
        })?;
        let mut metrics = page.into_iter().map(MetricRow::from_db).collect::<Result<Vec<_>, _>>()?;
        let next_cursor = if metrics.len() > limit as usize {
            metrics.truncate(limit as usize);
            metrics.last().map(|m| PageCursor::new(m.start_ms, m.id).encode())
        } else {
            None
        };
        Ok(MetricPage { metrics, next_cursor })
    }

    /// Anomalies matching `q`.
    pub async fn query_anomalies(&self, q: &AnomalyQuery) -> Result<AnomalyPage, StoreError> {
        let limit = q.limit.clamp(1, MAX_PAGE);
        let rows: Vec<AnomalyDbRow> = on_db!(self.db.read(), pool => {
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
            push_page(&mut qb, q.from_ms, q.to_ms, q.before, Order::Newest, limit);
            qb.build_query_as().fetch_all(pool).await
        })?;
        let mut anomalies: Vec<(i64, AnomalyRow)> = rows.into_iter().map(|r| (r.id, AnomalyRow::from_db(r))).collect();
        let next_cursor = if anomalies.len() > limit as usize {
            anomalies.truncate(limit as usize);
            anomalies.last().map(|(id, a)| PageCursor::new(a.start_ms, *id).encode())
        } else {
            None
        };
        Ok(AnomalyPage { anomalies: anomalies.into_iter().map(|(_, a)| a).collect(), next_cursor })
    }
}

/// Which end of the time series a page starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    Oldest,
    Newest,
}

/// Pushes the time range, the position after the previous page (`(bucket_ms, id)`), the order
/// and the limit (one more row than the page, to know whether another follows) of a query
/// `FROM <table> r`.
fn push_page<DB>(
    qb: &mut QueryBuilder<DB>,
    from_ms: Option<i64>,
    to_ms: Option<i64>,
    after: Option<(i64, i64)>,
    order: Order,
    limit: u32,
) where
    DB: sqlx::Database,
    for<'t> i64: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    if let Some(from) = from_ms {
        qb.push(" AND r.bucket_ms >= ").push_bind(from);
    }
    if let Some(to) = to_ms {
        qb.push(" AND r.bucket_ms < ").push_bind(to);
    }
    let (cmp, dir) = match order {
        Order::Oldest => (">", ""),
        Order::Newest => ("<", " DESC"),
    };
    if let Some((b, id)) = after {
        qb.push(format!(" AND (r.bucket_ms {cmp} ")).push_bind(b);
        qb.push(" OR (r.bucket_ms = ").push_bind(b).push(format!(" AND r.id {cmp} ")).push_bind(id).push("))");
    }
    qb.push(format!(" ORDER BY r.bucket_ms{dir}, r.id{dir} LIMIT ")).push_bind(i64::from(limit) + 1);
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
    super::scope::push_scope_condition(qb, scope, "r", super::scope::Rows::Camera);
}
