//! An aggregator for tests, and what its tests share: the server in-process ([`TestServer`]: a
//! temporary store, PKI, HTTP and QUIC on loopback ports), real processes ([`Proc`],
//! [`wait_ready`]), UDP relays that cut or throttle the link, PostgreSQL databases per test, both
//! storage backends ([`both_backends!`](crate::both_backends)), the test admin and the REST API's
//! state as the binary builds it.
//!
//! Used by the aggregator's integration tests (`use its_testkit::server as common;`) and by the
//! end-to-end tests of `its-e2e`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use its_aggregator::config::ServerConfig;
use its_aggregator::ingest::IngestConfig;
use its_aggregator::pki::Pki;
use its_aggregator::server::Server;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::UdpSocket;
use tokio::sync::watch;

pub use crate::bins::{agent_bin, aggregator_bin};
pub use crate::both_backends;

pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The admin connection for per-test databases: `ITS_TEST_PG_URL`, or [`DEFAULT_PG_URL`].
pub fn pg_admin_url() -> String {
    std::env::var("ITS_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned())
}

/// `postgres://user@host:port/db?params` with the database replaced.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, params) = match url.split_once('?') {
        Some((b, p)) => (b, Some(p)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match params {
        Some(p) => format!("{host_part}/{db}?{p}"),
        None => format!("{host_part}/{db}"),
    }
}

/// The `tansu` Kafka-protocol broker: `$ITS_TANSU`, else `.deps/tansu` (scripts/setup-test-peers).
pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ITS_TANSU") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/tansu/bin/tansu");
    if p.is_file() {
        return p;
    }
    let fallback = PathBuf::from("/var/cache/its-deps/tansu-0.6.0/bin/tansu");
    assert!(fallback.is_file(), "no tansu broker: run scripts/setup-test-peers (or set ITS_TANSU)");
    fallback
}

/// A TCP port free on loopback right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A database name unique to this process and call: `{prefix}_{pid}_{counter}_{nanos}`.
pub fn unique_name(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{prefix}_{}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed), nanos)
}

/// A fresh PostgreSQL database for one test, dropped at the end.
pub struct PgDatabase {
    pub url: String,
    name: String,
}

impl PgDatabase {
    pub async fn create(prefix: &str) -> Self {
        use sqlx::Connection;
        let name = unique_name(prefix);
        let admin = pg_admin_url();
        let mut conn = sqlx::PgConnection::connect(&admin).await.expect("PostgreSQL reachable (set ITS_TEST_PG_URL)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .expect("create database");
        Self { url: with_database(&admin, &name), name }
    }

    pub async fn drop_db(self) {
        use sqlx::Connection;
        if let Ok(mut conn) = sqlx::PgConnection::connect(&pg_admin_url()).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name)))
                .execute(&mut conn)
                .await;
        }
    }
}

/// The two storage backends a suite runs against.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    /// A file in a temporary directory.
    Sqlite,
    /// A fresh database per test ([`PgDatabase`]).
    Postgres,
}

/// Runs `test` against a fresh store of `backend`, cleaning up even when the test panics.
pub async fn run<F, Fut>(backend: Backend, test: F)
where
    F: FnOnce(std::sync::Arc<dyn its_aggregator::store::EventStore>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use its_aggregator::store::open_store;
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("tempdir");
            let url = format!("sqlite://{}", dir.path().join("events.db").display());
            let store = open_store(&url, its_aggregator::vault::Vault::ephemeral()).await.expect("open sqlite store");
            assert_eq!(store.backend(), "sqlite");
            let outcome = tokio::spawn(test(store)).await;
            drop(dir);
            if let Err(e) = outcome {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        Backend::Postgres => {
            let db = PgDatabase::create(&format!("its_{}", test_crate_name())).await;
            let store =
                open_store(&db.url, its_aggregator::vault::Vault::ephemeral()).await.expect("open postgres store");
            assert_eq!(store.backend(), "postgres");
            let outcome = tokio::spawn(test(store)).await;
            db.drop_db().await;
            if let Err(e) = outcome {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
}

/// The running test binary's crate name (`storage` for `tests/storage.rs`, whose executable is
/// `deps/storage-<hash>`), what `CARGO_CRATE_NAME` is when compiling it: names its databases.
fn test_crate_name() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe.as_deref().and_then(Path::file_stem).and_then(|s| s.to_str()).unwrap_or("test");
    stem.rsplit_once('-').map_or(stem, |(name, _hash)| name).replace('-', "_")
}

/// `both_backends!(a, b)` defines `sqlite::a`, `sqlite::b`, `postgres::a` and `postgres::b`, each
/// a test that [`run`]s the suite function `a` (or `b`) of the invoking module on that backend.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::server::run($crate::server::Backend::Sqlite, super::$name).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::server::run($crate::server::Backend::Postgres, super::$name).await;
                }
            )*
        }
    };
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
}

impl Proc {
    pub fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> Self {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
        let err = out.try_clone().expect("log file");
        cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err)).stdin(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self { child, name }
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill9();
        }
    }
}

/// The configuration of a test server whose files are all under `root`: SQLite in
/// `events.db`, the fleet CA in `pki/`, pictures in `objects/`; QUIC and HTTP (plain) on loopback
/// ports the system picks; a 10 s QUIC idle timeout; no retention; MQTT off (the default broker
/// port may be taken by a server beside it); everything else the embedded defaults.
pub fn server_config(root: &Path) -> ServerConfig {
    ServerConfig {
        database_url: format!("sqlite://{}", root.join("events.db").display()),
        pki_dir: root.join("pki"),
        ingest: IngestConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            idle_timeout: Duration::from_secs(10),
            ..IngestConfig::default()
        },
        http_listen: ([127, 0, 0, 1], 0).into(),
        http_tls: None,
        http_trusted_proxies: Vec::new(),
        snapshots: its_aggregator::snapshots::SnapshotLocation::Local(root.join("objects")),
        retention: its_aggregator::store::RetentionPolicy::off(),
        auth: its_aggregator::auth::AuthConfig::default(),
        ..ServerConfig::default()
    }
    .with_mqtt_off()
}

/// An aggregator started in this process for one test: a temporary directory with a fresh PKI
/// and store ([`server_config`]), the server listening on loopback. Dropping it drops the stop
/// sender (the server stops) and removes the directory; send `true` on [`stop`](Self::stop) to
/// stop it earlier and wait for it with `server.wait()`.
pub struct TestServer {
    /// The temporary directory; removed when dropped.
    pub dir: tempfile::TempDir,
    /// Its path: `pki/`, `events.db`, `objects/`, and whatever the test puts beside them.
    pub root: PathBuf,
    /// The fleet CA (initialised), to enroll devices with.
    pub pki: Pki,
    pub server: Server,
    /// The server's stop signal.
    pub stop: watch::Sender<bool>,
}

impl TestServer {
    /// The server with [`server_config`] as it is.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_, _| {}).await
    }

    /// The server with [`server_config`] changed by `configure` (given the directory, where it
    /// may write files the configuration names, such as TLS certificates) before it starts, and a
    /// metrics handle of its own (not installed as the process's recorder).
    pub async fn start_with(configure: impl FnOnce(&Path, &mut ServerConfig)) -> anyhow::Result<Self> {
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
        Self::start_with_metrics(metrics, configure).await
    }

    /// [`start_with`](Self::start_with), recording into `metrics` (a benchmark that reads the
    /// process's installed recorder).
    pub async fn start_with_metrics(
        metrics: PrometheusHandle,
        configure: impl FnOnce(&Path, &mut ServerConfig),
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().to_path_buf();
        let pki = Pki::new(root.join("pki"));
        pki.init(&[])?;
        let mut cfg = server_config(&root);
        configure(&root, &mut cfg);
        let (stop, rx) = watch::channel(false);
        let server = Server::start(&cfg, metrics, None, rx).await?;
        Ok(Self { dir, root, pki, server, stop })
    }
}

/// Waits for the aggregator's ready file and returns the bound addresses.
pub fn wait_ready(path: &Path, log: &Path) -> its_aggregator::server::BoundAddrs {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(bytes) = std::fs::read(path)
            && let Ok(addrs) = serde_json::from_slice(&bytes)
        {
            return addrs;
        }
        assert!(
            Instant::now() < deadline,
            "aggregator did not become ready; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A UDP relay between agents and the aggregator that can drop everything (a cut link).
pub struct UdpRelay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl UdpRelay {
    pub async fn start(upstream: SocketAddr) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind relay"));
        let addr = front.local_addr().expect("relay addr");
        let cut = Arc::new(AtomicBool::new(false));
        let cut2 = cut.clone();
        let task = tokio::spawn(async move {
            let mut peers: std::collections::HashMap<SocketAddr, Arc<UdpSocket>> = Default::default();
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf).await else { return };
                if cut2.load(Ordering::Relaxed) {
                    continue;
                }
                let back = match peers.get(&from) {
                    Some(s) => s.clone(),
                    None => {
                        let s = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind upstream"));
                        s.connect(upstream).await.expect("connect upstream");
                        let (s2, f2, c2) = (s.clone(), front.clone(), cut2.clone());
                        tokio::spawn(async move {
                            let mut b = vec![0u8; 65_536];
                            while let Ok(n) = s2.recv(&mut b).await {
                                if !c2.load(Ordering::Relaxed) {
                                    let _ = f2.send_to(&b[..n], from).await;
                                }
                            }
                        });
                        peers.insert(from, s.clone());
                        s
                    }
                };
                let _ = back.send(&buf[..n]).await;
            }
        });
        Self { addr, cut, task }
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A UDP relay for one agent whose agent-to-aggregator direction is a slow link: packets leave at
/// `bytes_per_s`, at most `queue` wait (more are dropped, as a router with a small buffer does),
/// so QUIC's congestion control sees a real bottleneck. The other direction is not limited.
pub struct ThrottledRelay {
    pub addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ThrottledRelay {
    pub async fn start(upstream: SocketAddr, bytes_per_s: u64, queue: usize) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind relay"));
        let addr = front.local_addr().expect("relay addr");
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind upstream"));
        back.connect(upstream).await.expect("connect upstream");
        let agent: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(queue.max(1));
        let mut tasks = Vec::new();
        let (f, a) = (front.clone(), agent.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = f.recv_from(&mut buf).await {
                *a.lock().unwrap_or_else(|p| p.into_inner()) = Some(from);
                let _ = tx.try_send(buf[..n].to_vec()); // full queue: dropped
            }
        }));
        let b = back.clone();
        tasks.push(tokio::spawn(async move {
            // Each packet occupies the link for len / rate; the next leaves after it.
            let mut free_at = tokio::time::Instant::now();
            while let Some(packet) = rx.recv().await {
                let now = tokio::time::Instant::now();
                if free_at < now {
                    free_at = now;
                }
                free_at += Duration::from_secs_f64(packet.len() as f64 / bytes_per_s as f64);
                tokio::time::sleep_until(free_at).await;
                let _ = b.send(&packet).await;
            }
        }));
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = back.recv(&mut buf).await {
                let to = *agent.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(to) = to {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        }));
        Self { addr, tasks }
    }
}

impl Drop for ThrottledRelay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Name and password of the admin the end-to-end tests create.
pub const TEST_ADMIN: (&str, &str) = ("test-admin", "test-admin-password");

/// Creates [`TEST_ADMIN`] in the aggregator's database (in-process servers).
pub async fn add_admin(db: its_aggregator::store::Db) {
    let auth = its_aggregator::auth::AuthService::open(db, its_aggregator::auth::AuthConfig::default())
        .await
        .expect("auth service");
    auth.create_user(TEST_ADMIN.0, TEST_ADMIN.1, its_aggregator::auth::Role::Admin, &its_aggregator::store::Scope::All)
        .await
        .expect("create the test admin");
}

/// Creates [`TEST_ADMIN`] with `its-aggregator user add --password-stdin`, with the environment
/// the server will run with (so it lands in the same database).
pub fn add_admin_cli(envs: &[(&str, std::ffi::OsString)]) {
    use std::io::Write as _;
    let mut cmd = Command::new(aggregator_bin());
    cmd.args(["user", "add", TEST_ADMIN.0, "--role", "admin", "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("its-aggregator user add");
    child.stdin.take().expect("stdin").write_all(format!("{}\n", TEST_ADMIN.1).as_bytes()).expect("password");
    let out = child.wait_with_output().expect("user add");
    assert!(out.status.success(), "user add failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Signs in as [`TEST_ADMIN`] and returns an HTTP client that sends its access token.
pub async fn admin_client(http: SocketAddr) -> reqwest::Client {
    let resp = reqwest::Client::new()
        .post(format!("http://{http}/api/v1/auth/login"))
        .json(&serde_json::json!({ "username": TEST_ADMIN.0, "password": TEST_ADMIN.1 }))
        .send()
        .await
        .expect("login request");
    assert_eq!(resp.status().as_u16(), 200, "login");
    let body: serde_json::Value = resp.json().await.expect("login body");
    let token = body["access_token"].as_str().expect("access token").to_owned();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    reqwest::Client::builder().default_headers(headers).timeout(Duration::from_secs(10)).build().expect("client")
}

/// The state of the REST API as the binary builds it (authentication, fleet, the access map from
/// the OpenAPI document) over `store`, for in-process tests that call the router with
/// `tower::ServiceExt::oneshot`. Creates [`TEST_ADMIN`] and returns an access token of it. The
/// state's fields are public: a test may swap one (a broken store) before building the router.
pub async fn test_state(
    store: Arc<dyn its_aggregator::store::EventStore>,
    snapshots: its_aggregator::snapshots::SnapshotObjects,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    config: its_aggregator::auth::AuthConfig,
) -> (its_aggregator::http::AppState, String) {
    use its_aggregator::auth::{AuthService, LoginOutcome, Role};
    let auth = AuthService::open(store.db(), config).await.expect("auth service");
    auth.create_user(TEST_ADMIN.0, TEST_ADMIN.1, Role::Admin, &its_aggregator::store::Scope::All)
        .await
        .expect("create the test admin");
    let token = match auth.login(TEST_ADMIN.0, TEST_ADMIN.1, None).await.expect("admin login") {
        LoginOutcome::Tokens(t) => t.access_token,
        LoginOutcome::MfaRequired { .. } => panic!("the test admin has no MFA"),
    };
    let access = its_aggregator::http::access_map().expect("every endpoint declares its permission");
    let state = its_aggregator::http::AppState {
        fleet: its_aggregator::store::Fleet::new(store.db()),
        store,
        snapshots,
        metrics,
        trusted_proxies: Arc::default(),
        auth,
        access: Arc::new(access),
        bus: its_aggregator::bus::EventBus::new(),
        shutdown: tokio::sync::watch::channel(false).1,
        alert_targets: its_aggregator::alerts::targets::TargetPolicy::default(),
    };
    (state, token)
}

/// [`test_state`] with snapshots in memory, a metrics handle of its own (not installed) and the
/// default auth configuration, as a router: (router, auth service, admin access token).
pub async fn test_app(
    store: Arc<dyn its_aggregator::store::EventStore>,
) -> (axum::Router, Arc<its_aggregator::auth::AuthService>, String) {
    let snapshots = its_aggregator::snapshots::SnapshotObjects::with_store(
        Arc::new(object_store::memory::InMemory::new()),
        "memory",
    );
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
    let (state, token) = test_state(store, snapshots, metrics, its_aggregator::auth::AuthConfig::default()).await;
    let auth = Arc::clone(&state.auth);
    (its_aggregator::http::router(state), auth, token)
}
