//! Sign-in floods against the real aggregator (release build, SQLite): the process's memory and
//! the answer times under 1,000 concurrent wrong-password requests, and a legitimate user's
//! sign-in latency meanwhile.
//!
//! ```text
//! cargo build --release --bins
//! cargo bench -p its-aggregator --bench signin_flood -- [--requests 1000]
//! ```
//!
//! Scenarios, each against a fresh `its-aggregator serve`:
//! - **one account**: 1,000 concurrent wrong passwords for one account from one address (the
//!   reproduced attack): the lockout must hold, and almost nothing is hashed;
//! - **spread**: 1,000 concurrent wrong passwords for 1,000 names from 1,000 loopback addresses
//!   (127.0.x.y), so that neither limit stops them: the worst case for the hashing pool.
//!
//! During each flood a legitimate user signs in every 100 ms from another address (127.0.0.2).
//! Memory is the process's resident set (`VmRSS`) before and after, and its peak (`VmHWM`).
//!
//! Peer, side by side in the same run: the same flood against a minimal server that verifies the
//! same argon2id hash the way the aggregator did before the pool (one `spawn_blocking` per
//! request, unbounded), in a process of its own (this bench re-executed with `ITS_BENCH_PEER=1`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

const ADMIN: &str = "flood-admin";
const LEGIT: &str = "legit-user";
const PASSWORD: &str = "flood-bench-password-1";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `VmRSS` and `VmHWM` of a process, KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn quantile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

async fn wait_ready(path: &Path) -> anyhow::Result<Value> {
    for _ in 0..300 {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str::<Value>(&text)
        {
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{} not written", path.display())
}

/// A fresh aggregator with an admin and the legitimate user; (process, HTTP address).
async fn aggregator(root: &Path) -> anyhow::Result<(Proc, SocketAddr)> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_its-aggregator"));
    let pki = its_aggregator::pki::Pki::new(root.join("pki"));
    pki.init(&[])?;
    let db = format!("sqlite://{}", root.join("events.db").display());
    for (user, role) in [(ADMIN, "admin"), (LEGIT, "viewer")] {
        let mut add = Command::new(&bin);
        add.args(["user", "add", user, "--role", role, "--password-stdin"])
            .env("ITS_AGGREGATOR__DATABASE_URL", &db)
            .env("ITS_AGGREGATOR__PKI_DIR", root.join("pki"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null());
        let mut child = add.spawn()?;
        {
            use std::io::Write as _;
            writeln!(child.stdin.take().context("stdin")?, "{PASSWORD}")?;
        }
        if !child.wait()?.success() {
            bail!("user add {user} failed");
        }
    }
    let ready = root.join("ready.json");
    let log = std::fs::File::create(root.join("aggregator.log"))?;
    let mut cmd = Command::new(&bin);
    cmd.arg("serve")
        .arg("--ready-file")
        .arg(&ready)
        .env("ITS_AGGREGATOR__DATABASE_URL", &db)
        .env("ITS_AGGREGATOR__PKI_DIR", root.join("pki"))
        .env("ITS_AGGREGATOR__QUIC__LISTEN", "127.0.0.1:0")
        .env("ITS_AGGREGATOR__HTTP__LISTEN", "127.0.0.1:0")
        .env("ITS_AGGREGATOR__MQTT__MODE", "off")
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone()?)
        .stderr(log);
    let proc = Proc(cmd.spawn()?);
    let addrs = wait_ready(&ready).await?;
    Ok((proc, serde_json::from_value(addrs["http"].clone())?))
}

/// The peer: verifies every sign-in against one argon2id hash on tokio's blocking pool, one task
/// per request, as the aggregator did before its bounded pool.
async fn peer_main() -> anyhow::Result<()> {
    use axum::routing::post;
    let hash = its_aggregator::auth::secrets::hash_password("the peer's password 123").map_err(anyhow::Error::msg)?;
    let app = axum::Router::new().route(
        "/api/v1/auth/login",
        post(move |axum::Json(body): axum::Json<Value>| {
            let hash = hash.clone();
            async move {
                let pw = body["password"].as_str().unwrap_or("").to_owned();
                let ok =
                    tokio::task::spawn_blocking(move || its_aggregator::auth::secrets::verify_password(&pw, &hash))
                        .await
                        .unwrap_or(false);
                if ok { axum::http::StatusCode::OK } else { axum::http::StatusCode::UNAUTHORIZED }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

async fn peer() -> anyhow::Result<(Proc, SocketAddr)> {
    let mut child = Command::new(std::env::current_exe()?)
        .env("ITS_BENCH_PEER", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    {
        use std::io::BufRead as _;
        std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    }
    Ok((Proc(child), line.trim().parse()?))
}

fn client_from(addr: IpAddr) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .local_address(addr)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(120))
        .build()?)
}

struct Outcome {
    by_status: std::collections::BTreeMap<u16, usize>,
    errors: usize,
    answer_ms: Vec<f64>,
    took_s: f64,
    rss_before_kib: u64,
    rss_after_kib: u64,
    peak_kib: u64,
    legit_ms: Vec<f64>,
    legit_refused: usize,
}

/// `n` concurrent wrong-password sign-ins (one account from one address, or `spread` over names
/// and addresses) while the legitimate user signs in every 100 ms.
async fn flood(pid: u32, http: SocketAddr, n: usize, spread: bool, legit: bool) -> anyhow::Result<Outcome> {
    let url = format!("http://{http}/api/v1/auth/login");
    let (rss_before_kib, _) = memory_kib(pid);
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let addr = if spread {
            Ipv4Addr::new(127, 10 + (i / 65_536) as u8, ((i / 256) % 256) as u8, (i % 256) as u8 + 1)
        } else {
            Ipv4Addr::new(127, 0, 0, 1)
        };
        clients.push(client_from(IpAddr::V4(addr))?);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let legit_task = {
        let (stop, url) = (stop.clone(), url.clone());
        let client = client_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))?;
        tokio::spawn(async move {
            let (mut ok, mut refused) = (Vec::new(), 0usize);
            while legit && !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let t = Instant::now();
                match client.post(&url).json(&json!({ "username": LEGIT, "password": PASSWORD })).send().await {
                    Ok(r) if r.status().is_success() => ok.push(t.elapsed().as_secs_f64() * 1000.0),
                    _ => refused += 1,
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (ok, refused)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for (i, client) in clients.into_iter().enumerate() {
        let url = url.clone();
        let user = if spread { format!("guess-{i}") } else { ADMIN.to_owned() };
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r =
                client.post(&url).json(&json!({ "username": user, "password": "a wrong password 123" })).send().await;
            (r.map(|r| r.status().as_u16()).ok(), t.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let sampler = {
        let done = stop.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                peak = peak.max(memory_kib(pid).0);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        })
    };
    let mut by_status = std::collections::BTreeMap::new();
    let (mut errors, mut answer_ms) = (0, Vec::with_capacity(n));
    for t in tasks {
        let (status, ms) = t.await?;
        match status {
            Some(s) => *by_status.entry(s).or_insert(0) += 1,
            None => errors += 1,
        }
        answer_ms.push(ms);
    }
    let took_s = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let sampled_peak = sampler.await?;
    let (legit_ms, legit_refused) = legit_task.await?;
    let (rss_after_kib, hwm) = memory_kib(pid);
    Ok(Outcome {
        by_status,
        errors,
        answer_ms,
        took_s,
        rss_before_kib,
        rss_after_kib,
        peak_kib: sampled_peak.max(hwm),
        legit_ms,
        legit_refused,
    })
}

fn report(name: &str, mut o: Outcome) {
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "| {name} | {:?} (errors {}) | {:.1} s | {:.0} / {:.0} / {:.0} | {:.0} → peak {:.0} → {:.0} | {} |",
        o.by_status,
        o.errors,
        o.took_s,
        quantile(&mut o.answer_ms, 0.5),
        quantile(&mut o.answer_ms, 0.99),
        quantile(&mut o.answer_ms, 1.0),
        mib(o.rss_before_kib),
        mib(o.peak_kib),
        mib(o.rss_after_kib),
        if o.legit_ms.is_empty() && o.legit_refused == 0 {
            "-".to_owned()
        } else {
            format!(
                "{} ok (p50 {:.0} ms, p99 {:.0} ms), {} refused",
                o.legit_ms.len(),
                quantile(&mut o.legit_ms, 0.5),
                quantile(&mut o.legit_ms, 0.99),
                o.legit_refused
            )
        }
    );
}

async fn run(requests: usize) -> anyhow::Result<()> {
    println!("sign-in flood, {requests} concurrent requests; {} CPUs", std::thread::available_parallelism()?.get());
    println!(
        "| scenario | answers by status | flood took | answer ms p50 / p99 / max | RSS MiB before → peak → after | legitimate sign-ins (every 100 ms, from another address) |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, spread) in
        [("aggregator, one account, one address", false), ("aggregator, 1,000 names from 1,000 addresses", true)]
    {
        let dir = tempfile::tempdir()?;
        let (proc, http) = aggregator(dir.path()).await?;
        report(name, flood(proc.0.id(), http, requests, spread, true).await?);
    }
    let (proc, http) = peer().await?;
    report("peer: one spawn_blocking argon2 per request", flood(proc.0.id(), http, requests, true, false).await?);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if std::env::var("ITS_BENCH_PEER").is_ok() {
        return rt.block_on(peer_main());
    }
    let mut requests = 1000;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--requests" => requests = it.next().context("--requests needs a value")?.parse()?,
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    rt.block_on(run(requests))
}
