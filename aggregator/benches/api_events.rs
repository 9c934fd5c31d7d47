//! `GET /api/v1/events` with filters at 1,000,000 stored events: the real server (HTTP, JWT or
//! API key, the store, JSON) under `wrk`, side by side with the same queries run directly on the
//! database: through `EventStore::query_events`, and as the bare SQL through sqlx. Also the cost
//! of authenticating a request (RS256 JWT verification, API key lookup).
//!
//! ```text
//! apt-get install -y wrk
//! cargo bench -p its-aggregator --bench api_events -- [--events 1000000] [--duration 20]
//!     [--c1-duration 5] [--connections 16] [--dir /var/tmp/its-api-bench]
//!     [--postgres postgres://postgres@127.0.0.1:5432/postgres] [--no-sqlite] [--cases a,b,..]
//! ```
//!
//! The events are seeded once per backend through `insert_events` (batches of 1,000, 20 devices
//! × 4 cameras, one day of observed times, deterministic) and the database is kept for the next
//! run: the SQLite file in `--dir`, the PostgreSQL database `its_api_bench_<events>` next to the
//! one `--postgres` names (drop it by hand when done).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use its_aggregator::auth::tokens::AUDIENCE_ACCESS;
use its_aggregator::auth::{
    AccessClaims, AuthConfig, AuthService, Permission, PermissionSet, Principal, Role, Subject,
};
use its_aggregator::store::{Db, EventQuery, EventStore, Scope, open_store};
use its_shared::EventEnvelope;
use its_shared::event::{ClassCount, Direction, EventKind, ObjectRef, Phase, TrackPhase};
use its_shared::wire::Hello;
use its_testkit::server::TestServer;
use metrics_exporter_prometheus::PrometheusHandle;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DEVICES: usize = 20;
const CAMERAS: usize = 4;
const BATCH: usize = 1000;
const DAY_MS: i64 = 86_400_000;
/// 2026-03-02T00:00:00Z: the seeded day starts here.
const BASE_MS: i64 = 1_772_409_600_000;
const USER: &str = "api-bench";
const PASSWORD: &str = "api-bench-password-1";

// ---------------------------------------------------------------------------------------------
// Seeding.

fn device_id(d: usize) -> String {
    format!("bench-dev-{d:02}")
}

fn gauss(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn pick<'a>(rng: &mut StdRng, items: &[(&'a str, u32)]) -> &'a str {
    let total: u32 = items.iter().map(|(_, w)| w).sum();
    let mut r = rng.random_range(0..total);
    for (item, w) in items {
        if r < *w {
            return item;
        }
        r -= w;
    }
    items[0].0
}

const LABELS: &[(&str, u32)] =
    &[("car", 72), ("truck", 9), ("bus", 3), ("motorcycle", 5), ("bicycle", 4), ("person", 7)];

fn object(rng: &mut StdRng, label: &str) -> ObjectRef {
    let x: f32 = rng.random_range(0.0..0.8);
    let y: f32 = rng.random_range(0.0..0.8);
    ObjectRef {
        track_id: rng.random_range(1..1_000_000),
        label: label.to_owned(),
        score: rng.random_range(0.5..0.99),
        bbox: [x, y, x + rng.random_range(0.05..0.2), y + rng.random_range(0.05..0.2)],
    }
}

/// km/h, one decimal, by class: vehicles around 50 (heavy ones slower), bicycles 18, people 5.
fn speed(rng: &mut StdRng, label: &str) -> f32 {
    let (mean, sd) = match label {
        "person" => (5.0, 1.5),
        "bicycle" => (18.0, 5.0),
        "truck" | "bus" => (45.0, 12.0),
        _ => (52.0, 15.0),
    };
    ((mean + sd * gauss(rng)).clamp(2.0, 180.0) * 10.0).round() as f32 / 10.0
}

fn zone(rng: &mut StdRng) -> String {
    format!("lane-{}", rng.random_range(1..=2))
}

fn line(rng: &mut StdRng) -> String {
    ["stop-line", "exit-line"][rng.random_range(0..2)].to_owned()
}

fn direction(rng: &mut StdRng) -> Direction {
    if rng.random_bool(0.5) { Direction::In } else { Direction::Out }
}

/// One event: 55% line crossings (class, direction, speed), 10% speed measurements, 18% zone
/// events, 5% per-minute counts, 7% finished tracks, 3% zone occupancy, 2% incidents.
fn event(rng: &mut StdRng, seq: u64, observed_at_ms: i64) -> EventEnvelope {
    let camera = format!("cam-{}", rng.random_range(0..CAMERAS));
    let label = pick(rng, LABELS);
    let r = rng.random_range(0..1000);
    let kind = match r {
        0..550 => EventKind::LineCrossing {
            line: line(rng),
            object: object(rng, label),
            direction: direction(rng),
            speed_kmh: rng.random_bool(0.95).then(|| speed(rng, label)),
        },
        550..650 => EventKind::SpeedMeasurement {
            object: object(rng, label),
            speed_kmh: speed(rng, label),
            zone: Some(zone(rng)),
        },
        650..740 => EventKind::ZoneEnter { zone: zone(rng), object: object(rng, label) },
        740..830 => {
            EventKind::ZoneExit { zone: zone(rng), object: object(rng, label), dwell_s: rng.random_range(1.0..20.0) }
        }
        830..850 => {
            EventKind::ZoneDwell { zone: zone(rng), object: object(rng, label), dwell_s: rng.random_range(20.0..90.0) }
        }
        850..900 => EventKind::Counts {
            line: line(rng),
            interval_s: 60,
            counts: ["car", "truck", "bus"]
                .iter()
                .flat_map(|l| [Direction::In, Direction::Out].map(|d| (l, d)))
                .map(|(l, d)| ClassCount { label: (*l).to_owned(), direction: d, count: rng.random_range(0..40) })
                .collect(),
        },
        900..970 => EventKind::ObjectTrack {
            phase: TrackPhase::End,
            object: object(rng, label),
            first_seen_ms: observed_at_ms - rng.random_range(1000..20_000),
            duration_s: rng.random_range(1.0..20.0),
            frames: rng.random_range(10..200),
            path: (0..8).map(|_| [rng.random_range(0.0..1.0), rng.random_range(0.0..1.0)]).collect(),
        },
        970..1000 if r < 980 => EventKind::StoppedVehicle {
            zone: zone(rng),
            object: object(rng, label),
            stopped_s: rng.random_range(10.0..120.0),
        },
        970..1000 if r < 985 => EventKind::WrongWay {
            zone: zone(rng),
            object: object(rng, label),
            distance_m: rng.random_range(10.0..40.0),
            speed_kmh: Some(speed(rng, label)),
        },
        970..1000 if r < 990 => EventKind::Congestion {
            zone: zone(rng),
            phase: [Phase::Started, Phase::Ongoing, Phase::Cleared][rng.random_range(0..3)],
            occupancy: rng.random_range(4..12),
            mean_speed_kmh: Some(rng.random_range(2.0..10.0)),
            queue_length_m: Some(rng.random_range(10.0..80.0)),
        },
        _ => EventKind::ZoneOccupancy {
            zone: zone(rng),
            interval_s: 60,
            mean: rng.random_range(0.0..4.0),
            max: rng.random_range(0..8),
            occupied: rng.random_range(0.0..1.0),
            entered: rng.random_range(0..30),
        },
    };
    EventEnvelope { seq, camera, observed_at_ms, kind }
}

/// Batch `k` of device `d` (deterministic): its events `k*BATCH+1..`, observed in time order,
/// spread evenly over the day.
fn batch(per_device: usize, d: usize, k: usize) -> Vec<EventEnvelope> {
    let mut rng = StdRng::seed_from_u64(((d as u64) << 32) | k as u64);
    let slot = (DAY_MS / per_device as i64).max(1);
    (k * BATCH..((k + 1) * BATCH).min(per_device))
        .map(|i| {
            let t = BASE_MS + i as i64 * DAY_MS / per_device as i64 + rng.random_range(0..slot);
            event(&mut rng, i as u64 + 1, t)
        })
        .collect()
}

/// Stores `events` events: every device's batch `k` before any batch `k+1`, as a live fleet
/// delivers them (storage order follows time within about half an hour).
async fn seed(store: &dyn EventStore, events: usize) -> anyhow::Result<Duration> {
    let cameras: Vec<String> = (0..CAMERAS).map(|c| format!("cam-{c}")).collect();
    for d in 0..DEVICES {
        let hello = Hello {
            agent_version: "bench".into(),
            model: "ssd-mobilenet-v2".into(),
            cameras: cameras.clone(),
            last_acked_seq: 0,
            last_assigned_seq: 0,
        };
        store.record_hello(&device_id(d), &hello, BASE_MS).await?;
    }
    let per_device = events / DEVICES;
    let t = Instant::now();
    let mut done = 0usize;
    for k in 0..per_device.div_ceil(BATCH) {
        for d in 0..DEVICES {
            let b = batch(per_device, d, k);
            let ingested = b.last().map_or(BASE_MS, |e| e.observed_at_ms + 1500);
            let out = store.insert_events(&device_id(d), &b, ingested).await?;
            done += out.inserted as usize;
        }
        if (k + 1) % 10 == 0 {
            eprintln!("  seeded {done} events ({:.0}/s)", done as f64 / t.elapsed().as_secs_f64());
        }
    }
    Ok(t.elapsed())
}

/// The peer: the database reached with plain sqlx, beside the aggregator's store.
#[derive(Clone)]
enum RawDb {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl RawDb {
    fn is_postgres(&self) -> bool {
        matches!(self, RawDb::Postgres(_))
    }

    async fn connect(url: &str) -> anyhow::Result<Self> {
        Ok(if url.starts_with("sqlite:") {
            RawDb::Sqlite(sqlx::SqlitePool::connect(url).await?)
        } else {
            RawDb::Postgres(sqlx::PgPool::connect(url).await?)
        })
    }
}

async fn count_events(db: &RawDb) -> anyhow::Result<i64> {
    Ok(match db {
        RawDb::Sqlite(reader) => sqlx::query_scalar("SELECT COUNT(*) FROM events").fetch_one(reader).await?,
        RawDb::Postgres(p) => sqlx::query_scalar("SELECT COUNT(*) FROM events").fetch_one(p).await?,
    })
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SeedMeta {
    events: usize,
    seed_s: f64,
    seeded_at_ms: i64,
}

/// Opens the seeded database behind `url`, seeding it first when it does not hold `events`
/// events. Returns the seeding time and whether it was this run's.
async fn ensure_seeded(url: &str, meta_path: &Path, events: usize) -> anyhow::Result<(f64, bool)> {
    let store = open_store(url, its_aggregator::vault::Vault::ephemeral()).await?;
    let raw = RawDb::connect(url).await?;
    let n = count_events(&raw).await?;
    let meta: Option<SeedMeta> = std::fs::read(meta_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(m) = meta
        && n == events as i64
        && m.events == events
    {
        return Ok((m.seed_s, false));
    }
    anyhow::ensure!(n == 0, "{url} holds {n} events, not {events}: remove it (or drop it) and run again");
    eprintln!("seeding {events} events into {} ...", its_aggregator::server::redact(url));
    let took = seed(store.as_ref(), events).await?;
    if let RawDb::Postgres(p) = &raw {
        // What autovacuum would have done by the time a day of events is queried.
        sqlx::query("ANALYZE events").execute(p).await?;
    }
    let meta = SeedMeta { events, seed_s: took.as_secs_f64(), seeded_at_ms: its_aggregator::unix_ms() };
    std::fs::write(meta_path, serde_json::to_vec(&meta)?)?;
    Ok((meta.seed_s, true))
}

async fn pg_database(admin: &str, events: usize) -> anyhow::Result<String> {
    use sqlx::Connection;
    let name = format!("its_api_bench_{events}");
    let mut c = sqlx::PgConnection::connect(admin).await.context("connecting to --postgres")?;
    let exists: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1").bind(&name).fetch_optional(&mut c).await?;
    if exists.is_none() {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\""))).execute(&mut c).await?;
    }
    let base = admin.rsplit_once('/').map(|(b, _)| b.to_string()).context("the --postgres URL names a database")?;
    Ok(format!("{base}/{name}"))
}

// ---------------------------------------------------------------------------------------------
// The queries.

struct Case {
    id: &'static str,
    what: &'static str,
    q: EventQuery,
}

fn cases(all: &[String]) -> Vec<Case> {
    let h = 3_600_000;
    let list = vec![
        Case {
            id: "newest",
            what: "no filter, newest page",
            q: EventQuery { limit: Some(100), ..EventQuery::default() },
        },
        Case {
            id: "camera-kind-time",
            what: "camera + kind + 2 h window",
            q: EventQuery {
                camera: Some("cam-3".into()),
                kind: Some("line_crossing".into()),
                from_ms: Some(BASE_MS + 14 * h),
                to_ms: Some(BASE_MS + 16 * h),
                limit: Some(100),
                ..EventQuery::default()
            },
        },
        Case {
            id: "class-dir-speed",
            what: "class + direction + speed range",
            q: EventQuery {
                label: Some("truck".into()),
                direction: Some("in".into()),
                min_speed_kmh: Some(60.0),
                max_speed_kmh: Some(90.0),
                limit: Some(100),
                ..EventQuery::default()
            },
        },
        Case {
            id: "deep-cursor",
            what: "kind, page 2,001 by cursor",
            q: EventQuery { kind: Some("line_crossing".into()), limit: Some(100), ..EventQuery::default() },
        },
        Case {
            id: "rare-scan",
            what: "class + min speed matching ~0 rows",
            q: EventQuery {
                label: Some("bus".into()),
                min_speed_kmh: Some(110.0),
                limit: Some(100),
                ..EventQuery::default()
            },
        },
    ];
    if all.is_empty() { list } else { list.into_iter().filter(|c| all.iter().any(|a| a == c.id)).collect() }
}

/// The query string the API takes for `q`.
fn query_string(q: &EventQuery) -> String {
    let mut p: Vec<(&str, String)> = Vec::new();
    let mut text = |name: &'static str, v: &Option<String>| {
        if let Some(v) = v {
            p.push((name, v.clone()));
        }
    };
    text("device", &q.device);
    text("camera", &q.camera);
    text("kind", &q.kind);
    text("class", &q.label);
    text("direction", &q.direction);
    text("cursor", &q.cursor);
    if let Some(v) = q.min_speed_kmh {
        p.push(("min_speed", v.to_string()));
    }
    if let Some(v) = q.max_speed_kmh {
        p.push(("max_speed", v.to_string()));
    }
    if let Some(v) = q.from_ms {
        p.push(("from", v.to_string()));
    }
    if let Some(v) = q.to_ms {
        p.push(("to", v.to_string()));
    }
    if let Some(v) = q.limit {
        p.push(("limit", v.to_string()));
    }
    // Every value here is URL-safe (names, numbers, base64url cursors).
    p.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
}

#[derive(Clone, Debug)]
enum Val {
    Text(String),
    Int(i64),
    Real(f64),
}

/// The SQL `query_events` runs for `q` (the same text, `$n` parameters: both backends take
/// them), for the filters the cases use.
fn raw_sql(q: &EventQuery, postgres: bool) -> anyhow::Result<(String, Vec<Val>)> {
    let payload = if postgres { "payload::text" } else { "payload" };
    let mut sql = format!(
        "SELECT id, device_id, seq, camera, kind, label, observed_at_ms, ingested_at_ms, {payload}, \
         CAST(CASE WHEN EXISTS (SELECT 1 FROM snapshots s WHERE s.device_id = events.device_id AND s.seq = events.seq) \
         THEN 1 ELSE 0 END AS BIGINT) FROM events WHERE 1 = 1"
    );
    let mut binds = Vec::new();
    let mut cond = |sql: &mut String, text: &str, v: Val| {
        binds.push(v);
        sql.push_str(&format!("{text}${}", binds.len()));
    };
    for (col, v) in [
        ("device_id", &q.device),
        ("camera", &q.camera),
        ("kind", &q.kind),
        ("label", &q.label),
        ("zone", &q.zone),
        ("line", &q.line),
        ("direction", &q.direction),
    ] {
        if let Some(v) = v {
            cond(&mut sql, &format!(" AND events.{col} = "), Val::Text(v.clone()));
        }
    }
    anyhow::ensure!(q.site.is_none() && q.has_snapshot.is_none() && q.scope == Scope::All, "not mirrored here");
    if let Some(v) = q.min_speed_kmh {
        cond(&mut sql, " AND events.speed_kmh >= ", Val::Real(v));
    }
    if let Some(v) = q.max_speed_kmh {
        cond(&mut sql, " AND events.speed_kmh <= ", Val::Real(v));
    }
    if let Some(v) = q.from_ms {
        cond(&mut sql, " AND events.observed_at_ms >= ", Val::Int(v));
    }
    if let Some(v) = q.to_ms {
        cond(&mut sql, " AND events.observed_at_ms < ", Val::Int(v));
    }
    if let Some(c) = &q.cursor {
        let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(c)?;
        let text = String::from_utf8(text)?;
        let (t, id) = text.split_once(':').context("cursor")?;
        cond(&mut sql, " AND (events.observed_at_ms, events.id) < (", Val::Int(t.parse()?));
        cond(&mut sql, ", ", Val::Int(id.parse()?));
        sql.push(')');
    }
    cond(
        &mut sql,
        " ORDER BY events.observed_at_ms DESC, events.id DESC LIMIT ",
        Val::Int(i64::from(q.limit.unwrap_or(100)) + 1),
    );
    Ok((sql, binds))
}

type Row = (i64, String, i64, String, String, Option<String>, i64, i64, String, i64);

/// Runs the SQL and returns the rows (as `query_events` reads them, without decoding payloads).
async fn run_raw(db: &RawDb, sql: &'static str, binds: &[Val]) -> anyhow::Result<usize> {
    macro_rules! bound {
        ($q:expr) => {{
            let mut q = $q;
            for v in binds {
                q = match v {
                    Val::Text(s) => q.bind(s.clone()),
                    Val::Int(i) => q.bind(*i),
                    Val::Real(f) => q.bind(*f),
                };
            }
            q
        }};
    }
    Ok(match db {
        RawDb::Sqlite(reader) => bound!(sqlx::query_as::<_, Row>(sql)).fetch_all(reader).await?.len(),
        RawDb::Postgres(p) => bound!(sqlx::query_as::<_, Row>(sql)).fetch_all(p).await?.len(),
    })
}

async fn plan(db: &RawDb, sql: &str, binds: &[Val]) -> anyhow::Result<Vec<String>> {
    macro_rules! bound {
        ($q:expr) => {{
            let mut q = $q;
            for v in binds {
                q = match v {
                    Val::Text(s) => q.bind(s.clone()),
                    Val::Int(i) => q.bind(*i),
                    Val::Real(f) => q.bind(*f),
                };
            }
            q
        }};
    }
    Ok(match db {
        RawDb::Sqlite(reader) => {
            let q =
                sqlx::query_as::<_, (i64, i64, i64, String)>(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")));
            bound!(q).fetch_all(reader).await?.into_iter().map(|r| r.3).collect()
        }
        RawDb::Postgres(p) => {
            let q = sqlx::query_as::<_, (String,)>(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")));
            bound!(q).fetch_all(p).await?.into_iter().map(|r| r.0).collect()
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Measuring.

#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    mean_ms: f64,
    requests: u64,
    /// Failed requests (non-2xx answers, socket errors, store errors).
    errors: u64,
    /// CPU time per request, ms.
    cpu: CpuPerRequest,
}

/// CPU time used during a measurement, per request: this process (the server, or the store
/// loop), wrk, and the PostgreSQL server's processes.
#[derive(Debug, Clone, Copy, Default)]
struct CpuPerRequest {
    own_ms: f64,
    wrk_ms: f64,
    postgres_ms: f64,
    /// Cores' worth of CPU the rest of the machine used meanwhile (other processes: should be ~0).
    other_cores: f64,
}

/// CPU clock ticks so far (USER_HZ, 100 per second on Linux).
#[derive(Debug, Clone, Copy, Default)]
struct Ticks {
    own: u64,
    children: u64,
    postgres: u64,
    /// Busy ticks of the whole machine (`/proc/stat`).
    machine: u64,
    at: Option<Instant>,
}

/// utime + stime (and cutime + cstime) of a `/proc/<pid>/stat` line.
fn stat_ticks(stat: &str) -> (u64, u64) {
    let f: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect())
        .unwrap_or_default();
    let g = |i: usize| f.get(i).copied().unwrap_or(0);
    (g(11) + g(12), g(13) + g(14))
}

fn ticks(postgres: bool) -> Ticks {
    let (own, children) = stat_ticks(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default());
    let mut pg = 0;
    if postgres && let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if !e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
            if stat.contains("(postgres)") {
                pg += stat_ticks(&stat).0;
            }
        }
    }
    let machine = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_owned();
            // cpu user nice system idle iowait irq softirq steal
            let v: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
            Some(v.iter().take(8).sum::<u64>() - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0))
        })
        .unwrap_or(0);
    Ticks { own, children, postgres: pg, machine, at: Some(Instant::now()) }
}

impl Ticks {
    fn per_request(self, later: Ticks, requests: u64) -> CpuPerRequest {
        let ms = |a: u64, b: u64| b.saturating_sub(a) as f64 * 10.0 / requests.max(1) as f64;
        let ours =
            (later.own + later.children + later.postgres).saturating_sub(self.own + self.children + self.postgres);
        let other = later.machine.saturating_sub(self.machine).saturating_sub(ours);
        let secs = match (self.at, later.at) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 1.0,
        };
        CpuPerRequest {
            own_ms: ms(self.own, later.own),
            wrk_ms: ms(self.children, later.children),
            postgres_ms: ms(self.postgres, later.postgres),
            other_cores: other as f64 / 100.0 / secs.max(0.001),
        }
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

/// `conc` tasks call `f` back to back for `dur`.
async fn closed_loop<F, Fut>(conc: usize, dur: Duration, postgres: bool, f: F) -> anyhow::Result<Stats>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<usize>> + Send,
{
    let before = ticks(postgres);
    let start = Instant::now();
    let end = start + dur;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conc {
        let f = f.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < end {
                let t = Instant::now();
                match f().await {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
                    Err(e) => {
                        if errors == 0 {
                            eprintln!("  request failed: {e:#}");
                        }
                        errors += 1;
                    }
                }
            }
            (lat, errors)
        });
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        let (l, e) = r?;
        lat.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = before.per_request(ticks(postgres), lat.len() as u64 + errors);
    lat.sort_by(f64::total_cmp);
    Ok(Stats {
        rps: lat.len() as f64 / elapsed,
        p50_ms: pct(&lat, 0.5),
        p99_ms: pct(&lat, 0.99),
        mean_ms: lat.iter().sum::<f64>() / lat.len().max(1) as f64,
        requests: lat.len() as u64,
        errors,
        cpu,
    })
}

#[derive(Debug, Clone, Copy, Default)]
struct WrkStats {
    s: Stats,
    bytes_per_request: f64,
}

fn wrk_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

fn wrk_bytes(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "B" => n,
        "KB" => n * 1024.0,
        "MB" => n * 1024.0 * 1024.0,
        "GB" => n * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    })
}

/// Runs wrk and reads requests/s, p50, p99, the mean latency, the bytes per response and the
/// failed requests (non-2xx answers, socket errors), then waits for the database to settle.
async fn wrk(
    url: &str,
    header: &str,
    threads: usize,
    conns: usize,
    secs: u64,
    db: &RawDb,
    store: &Db,
) -> anyhow::Result<WrkStats> {
    let before = ticks(db.is_postgres());
    let out = tokio::process::Command::new("wrk")
        .args(["-t", &threads.to_string(), "-c", &conns.to_string(), "-d", &format!("{secs}s")])
        .args(["--latency", "--timeout", "30s", "-H", header, url])
        .output()
        .await
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(out.status.success(), "wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    let mut w = WrkStats::default();
    let mut seen_mean = false;
    for line in text.lines() {
        let t = line.trim();
        let fields: Vec<&str> = t.split_whitespace().collect();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            w.s.rps = v.trim().parse()?;
        } else if fields.first() == Some(&"50%") {
            w.s.p50_ms = fields.get(1).and_then(|v| wrk_duration_ms(v)).context("p50")?;
        } else if fields.first() == Some(&"99%") {
            w.s.p99_ms = fields.get(1).and_then(|v| wrk_duration_ms(v)).context("p99")?;
        } else if fields.first() == Some(&"Latency") && fields.len() >= 2 && !seen_mean {
            // "Latency   5.12ms  1.23ms  30.00ms  80.00%" (thread stats: the mean first)
            w.s.mean_ms = wrk_duration_ms(fields[1]).unwrap_or(0.0);
            seen_mean = true;
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            w.s.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // "Socket errors: connect 0, read 0, write 0, timeout 0"
            w.s.errors += v.split(',').filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok()).sum::<u64>();
        } else if t.contains("requests in") {
            // "31234 requests in 20.00s, 250.00MB read"
            w.s.requests = fields.first().and_then(|v| v.parse().ok()).unwrap_or(0);
            let read =
                fields.iter().position(|f| *f == "read").and_then(|i| fields.get(i - 1)).and_then(|v| wrk_bytes(v));
            w.bytes_per_request = read.unwrap_or(0.0) / w.s.requests.max(1) as f64;
        }
    }
    anyhow::ensure!(w.s.rps > 0.0 && w.s.p99_ms > 0.0, "could not read wrk's output:\n{text}");
    if w.s.errors > 0 {
        eprintln!("  wrk saw {} failed requests:\n{text}", w.s.errors);
    }
    w.s.cpu = before.per_request(ticks(db.is_postgres()), w.s.requests);
    // The queries of requests wrk abandoned at the end of its run still run to their end: let
    // them finish before the next measurement.
    store.wait_idle().await?;
    Ok(w)
}

fn median_ns(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (pct(&v, 0.5), pct(&v, 0.99))
}

// ---------------------------------------------------------------------------------------------

struct Opts {
    events: usize,
    duration: u64,
    c1_duration: u64,
    connections: usize,
    dir: PathBuf,
    postgres: Option<String>,
    sqlite: bool,
    cases: Vec<String>,
    auth_calls: usize,
}

struct Measured {
    case: &'static str,
    what: &'static str,
    rows: usize,
    api: WrkStats,
    api_key: Option<WrkStats>,
    store: Stats,
    sql: Stats,
    api1: WrkStats,
    store1: Stats,
    sql1: Stats,
    json_us: f64,
}

/// The server on the seeded database `url`, in a temporary directory; retention is off (the
/// test server's default: the seeded day is in the past, nothing may be deleted under the
/// benchmark).
async fn start_server(url: &str, metrics: PrometheusHandle) -> anyhow::Result<TestServer> {
    TestServer::start_with_metrics(metrics, |_, cfg| {
        cfg.database_url = url.to_string();
        // Long enough for the whole run (the default is 10 minutes).
        cfg.auth = AuthConfig { access_ttl: Duration::from_secs(3600), ..AuthConfig::default() };
    })
    .await
}

async fn bench_backend(o: &Opts, backend: &str, url: &str, metrics: PrometheusHandle) -> anyhow::Result<()> {
    let meta = o.dir.join(format!("seed-{backend}-{}.json", o.events));
    let (seed_s, fresh) = ensure_seeded(url, &meta, o.events).await?;
    println!(
        "\n## {backend}: {} events, seeded {} in {seed_s:.1} s ({:.0} events/s)",
        o.events,
        if fresh { "now" } else { "by an earlier run" },
        o.events as f64 / seed_s
    );
    let TestServer { dir: _tmp, server, stop, .. } = start_server(url, metrics).await?;
    let addr = server.addrs.http;
    let store = server.store.clone();
    let db = RawDb::connect(url).await?;

    // A user (analyst: events:read) and an API key with events:read only.
    let auth = AuthService::open(store.db(), AuthConfig::default()).await?;
    let user_id = match auth.store.user_by_name(USER).await? {
        Some(u) => u.user_id,
        None => auth.create_user(USER, PASSWORD, Role::Analyst, &Scope::All).await?,
    };
    let http = reqwest::Client::new();
    let login: serde_json::Value = http
        .post(format!("http://{addr}/api/v1/auth/login"))
        .json(&serde_json::json!({ "username": USER, "password": PASSWORD }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = login["access_token"].as_str().context("no access token")?.to_owned();
    let creator = Principal {
        subject: Subject::User { user_id, username: USER.into(), role: Role::Analyst, session_id: String::new() },
        permissions: Role::Analyst.permissions(),
        scope: Scope::All,
        mfa_enrolment_only: false,
        expires_at_ms: None,
    };
    let (_, api_key) = auth
        .create_api_key(&creator, "api-bench", PermissionSet::of(&[Permission::EventsRead]), Scope::All, None)
        .await?;
    let bearer = format!("Authorization: Bearer {token}");
    let key_header = format!("X-API-Key: {api_key}");

    let mut results = Vec::new();
    for mut case in cases(&o.cases) {
        if case.id == "deep-cursor" {
            // The cursor after 200,000 matching events at 1,000,000 stored (pages of 1,000 walk
            // there faster; the cursor is the last event's position, whatever the page size).
            let mut q = EventQuery { limit: Some(1000), ..case.q.clone() };
            for _ in 0..(o.events / 5000).max(1) {
                q.cursor = store.query_events(&q).await?.next_cursor;
                anyhow::ensure!(q.cursor.is_some(), "too few line crossings for the deep page");
            }
            case.q.cursor = q.cursor;
        }
        let q = Arc::new(case.q);
        let url_q = format!("http://{addr}/api/v1/events?{}", query_string(&q));
        let page = store.query_events(&q).await?;
        let rows = page.events.len();
        // Check the API answers the same page.
        let body: serde_json::Value = http
            .get(&url_q)
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        anyhow::ensure!(body["events"].as_array().map(Vec::len) == Some(rows), "API and store disagree on {}", case.id);
        let (sql, binds) = raw_sql(&q, backend == "postgres")?;
        let sql: &'static str = Box::leak(sql.into_boxed_str());
        anyhow::ensure!(run_raw(&db, sql, &binds).await?.min(rows + 1) >= rows, "raw SQL returns fewer rows");
        println!("\n{} ({}): {rows} rows\n  GET /api/v1/events?{}", case.id, case.what, query_string(&q));
        for p in plan(&db, sql, &binds).await? {
            println!("  plan: {p}");
        }
        // Serialising the page to JSON (the API's work that the store does not do).
        let mut ser = Vec::new();
        for _ in 0..200 {
            let t = Instant::now();
            std::hint::black_box(serde_json::to_vec(&page)?);
            ser.push(t.elapsed().as_nanos() as f64);
        }
        let json_us = median_ns(ser).0 / 1000.0;

        let dur = Duration::from_secs(o.duration);
        let pg = backend == "postgres";
        let api = wrk(&url_q, &bearer, 2, o.connections, o.duration, &db, &store.db()).await?;
        eprintln!(
            "  API (JWT), {} conns: {:.0} req/s, p99 {:.2} ms (other processes: {:.2} cores)",
            o.connections, api.s.rps, api.s.p99_ms, api.s.cpu.other_cores
        );
        let api_key = if case.id == "camera-kind-time" {
            let k = wrk(&url_q, &key_header, 2, o.connections, o.duration, &db, &store.db()).await?;
            eprintln!("  API (API key): {:.0} req/s, p99 {:.2} ms", k.s.rps, k.s.p99_ms);
            Some(k)
        } else {
            None
        };
        let st = store.clone();
        let qq = q.clone();
        let f_store = move || {
            let st = st.clone();
            let q = qq.clone();
            async move { Ok(st.query_events(&q).await?.events.len()) }
        };
        let store_s = closed_loop(o.connections, dur, pg, f_store.clone()).await?;
        eprintln!(
            "  store: {:.0} req/s, p99 {:.2} ms (other processes: {:.2} cores)",
            store_s.rps, store_s.p99_ms, store_s.cpu.other_cores
        );
        let binds = Arc::new(binds);
        let db2 = db.clone();
        let f_sql = move || {
            let db = db2.clone();
            let binds = binds.clone();
            async move { run_raw(&db, sql, &binds).await }
        };
        let sql_s = closed_loop(o.connections, dur, pg, f_sql.clone()).await?;
        eprintln!(
            "  SQL: {:.0} req/s, p99 {:.2} ms (other processes: {:.2} cores)",
            sql_s.rps, sql_s.p99_ms, sql_s.cpu.other_cores
        );
        // One at a time; slow queries get the long duration, for more than a handful of samples.
        let c1 = if api.s.p50_ms > 100.0 { o.duration } else { o.c1_duration };
        let api1 = wrk(&url_q, &bearer, 1, 1, c1, &db, &store.db()).await?;
        let store1 = closed_loop(1, Duration::from_secs(c1), pg, f_store).await?;
        let sql1 = closed_loop(1, Duration::from_secs(c1), pg, f_sql).await?;
        eprintln!(
            "  one at a time: API mean {:.2} ms, store mean {:.2} ms, SQL mean {:.2} ms",
            api1.s.mean_ms, store1.mean_ms, sql1.mean_ms
        );
        results.push(Measured {
            case: case.id,
            what: case.what,
            rows,
            api,
            api_key,
            store: store_s,
            sql: sql_s,
            api1,
            store1,
            sql1,
            json_us,
        });
    }

    // Authentication, one call at a time.
    let n = o.auth_calls;
    let jwt_header = format!("Bearer {token}");
    let key_bearer = format!("Bearer {api_key}");
    let mut verify = Vec::with_capacity(n);
    let mut jwt = Vec::with_capacity(n);
    let mut key = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        std::hint::black_box(auth.keys.verify::<AccessClaims>(&token, AUDIENCE_ACCESS)?);
        verify.push(t.elapsed().as_nanos() as f64);
    }
    for _ in 0..n {
        let t = Instant::now();
        std::hint::black_box(auth.authenticate(Some(&jwt_header), None).await?);
        jwt.push(t.elapsed().as_nanos() as f64);
    }
    for _ in 0..n {
        let t = Instant::now();
        std::hint::black_box(auth.authenticate(Some(&key_bearer), None).await?);
        key.push(t.elapsed().as_nanos() as f64);
    }
    let (verify_med, verify_p99) = median_ns(verify);
    let (jwt_med, jwt_p99) = median_ns(jwt);
    let (key_med, key_p99) = median_ns(key);

    let _ = stop.send(true);
    server.wait().await?;

    let pg = backend == "postgres";
    println!(
        "\n### {backend}: {} events; {} connections (wrk -t2 -c{}; {} tasks on the store), {} s per measurement\n",
        o.events, o.connections, o.connections, o.connections, o.duration
    );
    println!(
        "| query | rows | API req/s | API p50 ms | API p99 ms | store req/s | store p50 ms | store p99 ms | SQL req/s | SQL p50 ms | SQL p99 ms | API/store req/s | API/store p99 | API/SQL req/s | failed (API/store/SQL) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} ({}) | {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {}/{}/{} |",
            r.case,
            r.what,
            r.rows,
            r.api.s.rps,
            r.api.s.p50_ms,
            r.api.s.p99_ms,
            r.store.rps,
            r.store.p50_ms,
            r.store.p99_ms,
            r.sql.rps,
            r.sql.p50_ms,
            r.sql.p99_ms,
            r.api.s.rps / r.store.rps,
            r.api.s.p99_ms / r.store.p99_ms,
            r.api.s.rps / r.sql.rps,
            r.api.s.errors,
            r.store.errors,
            r.sql.errors,
        );
    }
    for r in &results {
        if let Some(k) = &r.api_key {
            println!(
                "\nSame {} query with an API key (X-API-Key): {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {:.3} ms CPU per request in the server (JWT: {:.0} req/s, p99 {:.2} ms, {:.3} ms).",
                r.case,
                k.s.rps,
                k.s.p50_ms,
                k.s.p99_ms,
                k.s.cpu.own_ms,
                r.api.s.rps,
                r.api.s.p99_ms,
                r.api.s.cpu.own_ms
            );
        }
    }
    println!(
        "\nCPU time per request during those runs, ms (this process: the server, or the store loop{}):\n",
        if pg { "; PostgreSQL: its server processes" } else { "" }
    );
    if pg {
        println!(
            "| query | API: server | API: PostgreSQL | API: wrk | store | store: PostgreSQL | SQL | SQL: PostgreSQL | API/store, server + PostgreSQL | other processes, cores (API/store/SQL) |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
    } else {
        println!(
            "| query | API: server | API: wrk | store | SQL | API server / store | other processes, cores (API/store/SQL) |"
        );
        println!("|---|---|---|---|---|---|---|");
    }
    for r in &results {
        let (a, s_, q) = (r.api.s.cpu, r.store.cpu, r.sql.cpu);
        let other = format!("{:.2}/{:.2}/{:.2}", a.other_cores, s_.other_cores, q.other_cores);
        if pg {
            println!(
                "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {other} |",
                r.case,
                a.own_ms,
                a.postgres_ms,
                a.wrk_ms,
                s_.own_ms,
                s_.postgres_ms,
                q.own_ms,
                q.postgres_ms,
                (a.own_ms + a.postgres_ms) / (s_.own_ms + s_.postgres_ms)
            );
        } else {
            println!(
                "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {other} |",
                r.case,
                a.own_ms,
                a.wrk_ms,
                s_.own_ms,
                q.own_ms,
                a.own_ms / s_.own_ms
            );
        }
    }
    println!("\nOne request at a time (wrk -t1 -c1; one task on the store), and what the API adds:\n");
    println!(
        "| query | API mean ms | store mean ms | SQL mean ms | API - store ms | response bytes | JSON encode ms | JWT auth share of API |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.3} | {:.1}% |",
            r.case,
            r.api1.s.mean_ms,
            r.store1.mean_ms,
            r.sql1.mean_ms,
            r.api1.s.mean_ms - r.store1.mean_ms,
            r.api.bytes_per_request,
            r.json_us / 1000.0,
            100.0 * jwt_med / 1e6 / r.api1.s.mean_ms
        );
    }
    println!("\nAuthentication, {n} calls one after another:\n");
    println!("| | median µs | p99 µs |");
    println!("|---|---|---|");
    println!("| RS256 verify alone (`KeyRing::verify`) | {:.1} | {:.1} |", verify_med / 1e3, verify_p99 / 1e3);
    println!("| `authenticate` with the JWT | {:.1} | {:.1} |", jwt_med / 1e3, jwt_p99 / 1e3);
    println!("| `authenticate` with the API key (lookup + SHA-256) | {:.1} | {:.1} |", key_med / 1e3, key_p99 / 1e3);
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{cpu}, {cores} cores")
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let o = Opts {
        events: arg("--events").map(|v| v.parse()).transpose()?.unwrap_or(1_000_000),
        duration: arg("--duration").map(|v| v.parse()).transpose()?.unwrap_or(20),
        c1_duration: arg("--c1-duration").map(|v| v.parse()).transpose()?.unwrap_or(5),
        connections: arg("--connections").map(|v| v.parse()).transpose()?.unwrap_or(16),
        dir: arg("--dir").map_or_else(|| PathBuf::from("/var/tmp/its-api-bench"), PathBuf::from),
        postgres: arg("--postgres"),
        sqlite: !args.iter().any(|a| a == "--no-sqlite"),
        cases: arg("--cases").map(|c| c.split(',').map(str::to_owned).collect()).unwrap_or_default(),
        auth_calls: arg("--auth-calls").map(|v| v.parse()).transpose()?.unwrap_or(10_000),
    };
    anyhow::ensure!(o.events.is_multiple_of(DEVICES) && o.events >= 10 * DEVICES, "--events: a multiple of {DEVICES}");
    std::fs::create_dir_all(&o.dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        println!("# GET /api/v1/events benchmark — {}", machine());
        // The process-wide recorder, as the binary installs it: the request metrics are recorded.
        let metrics = its_aggregator::server::install_metrics()?;
        if o.sqlite {
            let path = o.dir.join(format!("events-{}.db", o.events));
            let url = format!("sqlite://{}", path.display());
            bench_backend(&o, "sqlite", &url, metrics.clone()).await?;
        }
        if let Some(admin) = &o.postgres {
            let url = pg_database(admin, o.events).await?;
            bench_backend(&o, "postgres", &url, metrics.clone()).await?;
        }
        Ok(())
    })
}
