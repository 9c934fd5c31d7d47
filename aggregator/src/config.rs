//! Aggregator configuration, in two phases: [`RawConfig`] (TOML, unknown fields refused,
//! environment overrides `ITS_AGGREGATOR__SECTION__KEY=value`) and the validated [`ServerConfig`].
//! Validation reports every problem at once with its path.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use its_hostio::config_file::read_config_file;
use its_shared::config::{ConfigErrors, parse_toml_with_env};
use serde::Deserialize;

use crate::http::client_addr::IpNet;
use crate::http::transport::{Limits as HttpLimits, TlsFiles};
use crate::ingest::IngestConfig;
use crate::snapshots::SnapshotLocation;
use crate::store::retention::RetentionPolicy;

pub const ENV_PREFIX: &str = "ITS_AGGREGATOR__";

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// `sqlite://PATH` (the default: one file, zero set-up) or `postgres://...` for production.
    pub database_url: String,
    /// The CA, server certificate, device register and CRL (`its-aggregator pki init`).
    pub pki_dir: PathBuf,
    pub quic: RawQuic,
    pub http: RawHttp,
    pub snapshots: RawSnapshots,
    pub retention: RawRetention,
    pub auth: RawAuth,
    pub analytics: crate::analytics::RawAnalytics,
    pub alerts: crate::alerts::RawAlerts,
    pub mqtt: crate::mqtt::RawMqtt,
    pub kafka: crate::export::kafka::RawKafka,
    pub redis: crate::export::fanout::RawRedis,
    pub secrets: RawSecrets,
    pub audit: RawAudit,
}

/// `[audit]`: the audit log's own retention (the events' retention never touches it, and it
/// never makes room by deleting events).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAudit {
    /// Delete entries older than this many days (default 365: a year of who-did-what; 0 = keep).
    pub max_age_days: u64,
    /// Keep at most this many entries, the newest (default 1000000, a few hundred MB; 0 = no
    /// limit).
    pub max_rows: u64,
}

impl Default for RawAudit {
    fn default() -> Self {
        Self { max_age_days: 365, max_rows: 1_000_000 }
    }
}

/// `[secrets]`: the key ring that seals the secrets stored in the database (see
/// [`crate::vault`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSecrets {
    /// The key ring file (mode 0600; created with a fresh key at the first start). Empty (the
    /// default): `secrets.key` in `pki_dir`, beside the CA key and apart from the database and
    /// its backups. The environment variable `ITS_AGGREGATOR_SECRETS_KEYRING`, when set, holds
    /// the ring itself and takes precedence (several replicas share one ring).
    pub key_file: Option<PathBuf>,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            database_url: "sqlite:///var/lib/its-aggregator/events.db".into(),
            pki_dir: PathBuf::from("/var/lib/its-aggregator/pki"),
            quic: RawQuic::default(),
            http: RawHttp::default(),
            snapshots: RawSnapshots::default(),
            retention: RawRetention::default(),
            auth: RawAuth::default(),
            analytics: Default::default(),
            alerts: Default::default(),
            mqtt: Default::default(),
            kafka: Default::default(),
            redis: Default::default(),
            secrets: Default::default(),
            audit: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawQuic {
    /// Agents connect here. All interfaces by default: every connection needs a client
    /// certificate from the fleet CA. UDP 8471 collides with nothing common.
    pub listen: String,
    /// 30 s: agents keep alive every 5 s, so a silent connection is gone.
    pub idle_timeout_ms: u64,
    /// Connections at once, all devices together (default 10000: a large fleet per replica,
    /// far below the memory of a small server); a handshake beyond it is refused.
    pub max_connections: usize,
    /// Connections of one device at once (default 2: the live one and one reconnecting); the
    /// device's oldest is closed beyond it.
    pub max_connections_per_device: usize,
}

impl Default for RawQuic {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8471".into(),
            idle_timeout_ms: 30_000,
            max_connections: crate::ingest::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_device: crate::ingest::DEFAULT_MAX_CONNECTIONS_PER_DEVICE,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawHttp {
    /// Where the API listens. A loopback address (the default) serves plain HTTP, for a reverse
    /// proxy on the same host; any other address needs `tls_cert` and `tls_key` (HTTPS).
    pub listen: String,
    /// PEM certificate chain for HTTPS (leaf first). Set with `tls_key`; the files are reloaded
    /// when they change, so a renewed certificate needs no restart.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` (PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<PathBuf>,
    /// Reverse proxies (IP addresses or CIDRs, e.g. `["127.0.0.1", "10.0.0.0/8"]`) whose
    /// `X-Forwarded-For` / `Forwarded` header names the client. Empty (the default): the TCP peer
    /// is the client, and the headers are ignored.
    pub trusted_proxies: Vec<String>,
    /// Seconds a client has to send a request head (1..=300; default 30): the first one of a
    /// connection (HTTP/1 or HTTP/2) and every later HTTP/1 one. An HTTP/1 keep-alive
    /// connection idle this long is closed.
    pub header_timeout_s: u64,
    /// Seconds a request body has to arrive whole after its head (1..=3600; default 60): 408 and,
    /// for HTTP/1, the connection closed otherwise. Responses (event streams) are not timed.
    pub body_timeout_s: u64,
    /// Connections open at once, TLS handshakes included (1..=1000000; default 1024). One more is
    /// accepted and closed at once (counted in `its_http_connections_refused_total`).
    pub max_connections: u64,
}

impl Default for RawHttp {
    fn default() -> Self {
        // The limits' defaults, and why, are in `crate::http::transport`.
        let limits = HttpLimits::default();
        Self {
            listen: "127.0.0.1:8470".into(),
            tls_cert: None,
            tls_key: None,
            trusted_proxies: Vec::new(),
            header_timeout_s: limits.header_timeout.as_secs(),
            body_timeout_s: limits.body_timeout.as_secs(),
            max_connections: limits.max_connections as u64,
        }
    }
}

impl RawHttp {
    /// The timeouts and the connection cap of every listener.
    fn limits(&self, e: &mut ConfigErrors) -> HttpLimits {
        e.check((1..=300).contains(&self.header_timeout_s), "http.header_timeout_s", || {
            "must be between 1 and 300".into()
        });
        e.check((1..=3600).contains(&self.body_timeout_s), "http.body_timeout_s", || {
            "must be between 1 and 3600".into()
        });
        e.check((1..=MAX_HTTP_CONNECTIONS).contains(&self.max_connections), "http.max_connections", || {
            format!("must be between 1 and {MAX_HTTP_CONNECTIONS}")
        });
        HttpLimits {
            header_timeout: Duration::from_secs(self.header_timeout_s),
            body_timeout: Duration::from_secs(self.body_timeout_s),
            max_connections: usize::try_from(self.max_connections.clamp(1, MAX_HTTP_CONNECTIONS)).unwrap_or(1),
        }
    }
}

/// Most `[http] max_connections` accepted: beyond it the descriptor limit of any ordinary host
/// is met first, so a larger value is surely a mistake.
const MAX_HTTP_CONNECTIONS: u64 = 1_000_000;

/// Where event snapshots (JPEG pictures) are kept.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSnapshots {
    /// `file:///ABSOLUTE/DIR` (a local directory, created if missing) or `s3://BUCKET[/PREFIX]`
    /// (S3 or an S3-compatible store such as MinIO; credentials, region and endpoint from the
    /// standard environment variables `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`). Objects are `snapshots/{device}/{seq}.jpg` and
    /// `snapshots/{device}/{seq}-crop.jpg` under it. Empty (the default): the directory of the
    /// SQLite database file, so pictures sit in a `snapshots/` directory beside `events.db` and
    /// one backup covers both; with PostgreSQL or an in-memory database, the parent directory of
    /// `pki_dir` (the aggregator's data directory in the default layout).
    pub url: String,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub database_url: String,
    pub pki_dir: PathBuf,
    pub ingest: IngestConfig,
    pub http_listen: SocketAddr,
    /// HTTPS certificate and key; `None`: plain HTTP (loopback only).
    pub http_tls: Option<TlsFiles>,
    /// Whose forwarding headers are believed (see [`crate::http::client_addr`]).
    pub http_trusted_proxies: Vec<IpNet>,
    /// Header and body timeouts, connection cap (see [`crate::http::transport`]).
    pub http_limits: HttpLimits,
    pub snapshots: SnapshotLocation,
    /// What is deleted, and when (see [`crate::store::retention`]).
    pub retention: RetentionPolicy,
    /// Token lifetimes, key rotation, sign-in throttling (see [`crate::auth`]).
    pub auth: crate::auth::AuthConfig,
    /// Rollups and anomaly detection (see [`crate::analytics`]).
    pub analytics: crate::analytics::AnalyticsConfig,
    /// Alert rules and notifications (see [`crate::alerts`]).
    pub alerts: crate::alerts::AlertsConfig,
    /// The MQTT broker and topics (see [`crate::mqtt`]).
    pub mqtt: crate::mqtt::MqttConfig,
    /// Kafka export (see [`crate::export::kafka`]).
    pub kafka: crate::export::kafka::KafkaConfig,
    /// Fan-out between replicas (see [`crate::export::fanout`]).
    pub redis: crate::export::fanout::RedisConfig,
    /// The key ring file of the sealed secrets (see [`crate::vault`]); `None`: `secrets.key` in
    /// `pki_dir`.
    pub secrets_key_file: Option<PathBuf>,
}

impl ServerConfig {
    /// Where the key ring comes from: `ITS_AGGREGATOR_SECRETS_KEYRING` or the key file.
    pub fn secrets_source(&self) -> crate::vault::KeySource {
        let file = self.secrets_key_file.clone().unwrap_or_else(|| self.pki_dir.join("secrets.key"));
        crate::vault::KeySource::from_env_or_file(&file)
    }
}

impl Default for ServerConfig {
    /// The embedded defaults ([`RawConfig::default`], validated; a unit test keeps them valid).
    fn default() -> Self {
        RawConfig::default().validate("defaults").unwrap_or_else(|e| panic!("the embedded defaults are invalid: {e}"))
    }
}

impl ServerConfig {
    /// The same with `[mqtt] mode = "off"`: for a server embedded in a test or a benchmark, where
    /// the default broker port may be taken (by another one running beside it).
    pub fn with_mqtt_off(mut self) -> Self {
        let raw = crate::mqtt::RawMqtt { mode: "off".into(), ..Default::default() };
        self.mqtt = raw.validate(&mut ConfigErrors::new("mqtt off"));
        self
    }
}

/// `[auth]`: token lifetimes, signing key rotation and sign-in throttling.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAuth {
    /// Access token lifetime, seconds (60..=3600; default 600).
    pub access_token_ttl_s: u64,
    /// Session lifetime: sign in again after this many days (1..=90; default 14).
    pub session_ttl_days: u64,
    /// Rotate the token signing key after this many days (0 = only by hand; default 30).
    pub key_rotation_days: u64,
    /// Failed sign-ins per account within `throttle_window_s` before it is locked (default 5).
    pub max_failures_per_account: u32,
    /// Failed sign-ins per client address within `throttle_window_s` before it is locked (default 20).
    pub max_failures_per_address: u32,
    /// Window of the failure counts, seconds (default 900).
    pub throttle_window_s: u64,
    /// How long a lockout lasts, seconds (default 900).
    pub lockout_s: u64,
    /// Name shown by authenticator apps (default "ITS Camera AI").
    pub issuer_name: String,
    /// Password hashing workers; each holds 19 MiB while it works (default: one per CPU, at most
    /// 16: argon2 is CPU-bound, more workers only add memory). 0 = the default.
    pub hash_workers: usize,
    /// Password checks that may wait for a worker; beyond it they are answered 503 at once
    /// (default 64: a few seconds of sign-ins).
    pub hash_queue: usize,
}

impl Default for RawAuth {
    fn default() -> Self {
        let d = crate::auth::AuthConfig::default();
        Self {
            access_token_ttl_s: d.access_ttl.as_secs(),
            session_ttl_days: d.session_ttl.as_secs() / 86_400,
            key_rotation_days: d.key_rotation.as_secs() / 86_400,
            max_failures_per_account: 5,
            max_failures_per_address: 20,
            throttle_window_s: d.throttle_window.as_secs(),
            lockout_s: d.lockout.as_secs(),
            issuer_name: d.issuer_name,
            hash_workers: 0,
            hash_queue: d.hash_queue,
        }
    }
}

impl RawAuth {
    fn validate(&self, e: &mut ConfigErrors) -> crate::auth::AuthConfig {
        let a = self;
        e.check((60..=3600).contains(&a.access_token_ttl_s), "auth.access_token_ttl_s", || {
            "must be between 60 and 3600".into()
        });
        e.check((1..=90).contains(&a.session_ttl_days), "auth.session_ttl_days", || "must be between 1 and 90".into());
        e.check(a.key_rotation_days <= 3650, "auth.key_rotation_days", || {
            "must be at most 3650 (0 = only by hand)".into()
        });
        e.check((1..=100).contains(&a.max_failures_per_account), "auth.max_failures_per_account", || {
            "must be between 1 and 100".into()
        });
        e.check((1..=10_000).contains(&a.max_failures_per_address), "auth.max_failures_per_address", || {
            "must be between 1 and 10000".into()
        });
        e.check((10..=86_400).contains(&a.throttle_window_s), "auth.throttle_window_s", || {
            "must be between 10 and 86400".into()
        });
        e.check((1..=86_400).contains(&a.lockout_s), "auth.lockout_s", || "must be between 1 and 86400".into());
        e.check(
            !a.issuer_name.trim().is_empty() && a.issuer_name.len() <= 64 && !a.issuer_name.contains(':'),
            "auth.issuer_name",
            || "1 to 64 characters, no ':'".into(),
        );
        e.check(a.hash_workers <= 64, "auth.hash_workers", || "must be at most 64 (0 = one per CPU)".into());
        e.check((1..=10_000).contains(&a.hash_queue), "auth.hash_queue", || "must be between 1 and 10000".into());
        let defaults = crate::auth::AuthConfig::default();
        crate::auth::AuthConfig {
            hash_workers: if a.hash_workers == 0 { defaults.hash_workers } else { a.hash_workers },
            hash_queue: a.hash_queue,
            access_ttl: Duration::from_secs(a.access_token_ttl_s),
            session_ttl: Duration::from_secs(a.session_ttl_days * 86_400),
            key_rotation: Duration::from_secs(a.key_rotation_days * 86_400),
            max_failures_per_account: i64::from(a.max_failures_per_account),
            max_failures_per_addr: i64::from(a.max_failures_per_address),
            throttle_window: Duration::from_secs(a.throttle_window_s),
            lockout: Duration::from_secs(a.lockout_s),
            issuer_name: a.issuer_name.trim().to_owned(),
            ..crate::auth::AuthConfig::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

impl RawConfig {
    pub fn load<I>(path: Option<&Path>, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let doc =
            read_config_file(path).map_err(|e| ConfigError::Read { message: e.source.to_string(), path: e.path })?;
        parse_toml_with_env(&doc.source, doc.text.as_deref(), ENV_PREFIX, env)
            .map_err(|e| ConfigError::Parse { path: e.document, message: e.message })
    }

    pub fn validate(&self, source: &str) -> Result<ServerConfig, ConfigErrors> {
        let mut e = ConfigErrors::new(source);
        let url = &self.database_url;
        e.check(
            url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://"),
            "database_url",
            || format!("{url:?}: use sqlite://PATH or postgres://USER@HOST/DB"),
        );
        let quic: Option<SocketAddr> = self.quic.listen.parse().ok();
        e.check(quic.is_some(), "quic.listen", || format!("{:?} is not an IP:port address", self.quic.listen));
        e.check(self.quic.idle_timeout_ms >= 1000, "quic.idle_timeout_ms", || "must be at least 1000".into());
        e.check((1..=1_000_000).contains(&self.quic.max_connections), "quic.max_connections", || {
            "must be between 1 and 1000000".into()
        });
        e.check((1..=16).contains(&self.quic.max_connections_per_device), "quic.max_connections_per_device", || {
            "must be between 1 and 16".into()
        });
        let http: Option<SocketAddr> = self.http.listen.parse().ok();
        let http_tls = self.http_tls(http, &mut e);
        let mut trusted_proxies = Vec::new();
        for (i, entry) in self.http.trusted_proxies.iter().enumerate() {
            match entry.parse::<IpNet>() {
                Ok(net) => trusted_proxies.push(net),
                Err(err) => e.push(format!("http.trusted_proxies[{i}]"), err.to_string()),
            }
        }
        let http_limits = self.http.limits(&mut e);
        let snapshots = match self.snapshot_location() {
            Ok(loc) => Some(loc),
            Err(message) => {
                e.push("snapshots.url", message);
                None
            }
        };
        let retention = self.retention.policy(&mut e);
        let mut auth = self.auth.validate(&mut e);
        e.check(self.audit.max_age_days <= MAX_AGE_DAYS, "audit.max_age_days", || {
            format!("at most {MAX_AGE_DAYS} (0 = keep)")
        });
        e.check(self.audit.max_rows <= 1_000_000_000, "audit.max_rows", || "at most 1000000000 (0 = no limit)".into());
        auth.audit_max_age = (self.audit.max_age_days > 0)
            .then(|| Duration::from_secs(self.audit.max_age_days.min(MAX_AGE_DAYS) * 86_400));
        auth.audit_max_rows = (self.audit.max_rows > 0).then_some(self.audit.max_rows);
        let analytics = self.analytics.validate(&mut e);
        let alerts = self.alerts.validate(&mut e);
        let mqtt = self.mqtt.validate(&mut e);
        let kafka = self.kafka.validate(&mut e);
        let redis = self.redis.validate(&mut e);
        match (e.is_empty(), quic, http, snapshots) {
            (true, Some(quic), Some(http), Some(snapshots)) => Ok(ServerConfig {
                database_url: url.clone(),
                pki_dir: self.pki_dir.clone(),
                ingest: IngestConfig {
                    listen: quic,
                    idle_timeout: Duration::from_millis(self.quic.idle_timeout_ms),
                    max_connections: self.quic.max_connections,
                    max_connections_per_device: self.quic.max_connections_per_device,
                },
                http_listen: http,
                http_tls,
                http_trusted_proxies: trusted_proxies,
                http_limits,
                snapshots,
                retention,
                auth,
                analytics,
                alerts,
                mqtt,
                kafka,
                redis,
                secrets_key_file: self.secrets.key_file.clone().filter(|p| !p.as_os_str().is_empty()),
            }),
            _ => Err(e),
        }
    }

    /// `[http]` listen address against `tls_cert` / `tls_key`: a non-loopback address needs both,
    /// they come together, and the files must be a usable certificate chain and its key.
    fn http_tls(&self, listen: Option<SocketAddr>, e: &mut ConfigErrors) -> Option<TlsFiles> {
        let set = |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
        let (cert, key) = (set(&self.http.tls_cert), set(&self.http.tls_key));
        match listen {
            None => e.push("http.listen", format!("{:?} is not an IP:port address", self.http.listen)),
            Some(a) if !a.ip().is_loopback() && cert.is_none() && key.is_none() => e.push(
                "http.listen",
                format!(
                    "{a} is not a loopback address: set http.tls_cert and http.tls_key to serve HTTPS on it, \
                     or bind to 127.0.0.1 behind a reverse proxy that terminates TLS"
                ),
            ),
            Some(_) => {}
        }
        let files = match (cert, key) {
            (None, None) => return None,
            (Some(_), None) => {
                e.push("http.tls_key", "tls_cert is set: set tls_key to its private key (PEM) too");
                return None;
            }
            (None, Some(_)) => {
                e.push("http.tls_cert", "tls_key is set: set tls_cert to the certificate chain (PEM) too");
                return None;
            }
            (Some(cert), Some(key)) => TlsFiles { cert, key },
        };
        match files.load() {
            Ok(_) => Some(files),
            Err(errors) => {
                for err in errors {
                    e.push(format!("http.{}", err.field()), err.detail());
                }
                None
            }
        }
    }

    /// `[snapshots] url`, or the default beside the database (see [`RawSnapshots::url`]).
    fn snapshot_location(&self) -> Result<SnapshotLocation, String> {
        let url = self.snapshots.url.trim();
        if url.is_empty() {
            return Ok(SnapshotLocation::Local(default_snapshot_dir(&self.database_url, &self.pki_dir)));
        }
        let parsed = url::Url::parse(url).map_err(|err| format!("{url:?} is not a URL: {err}"))?;
        match parsed.scheme() {
            "file" => {
                let has_host = parsed.host_str().is_some_and(|h| !h.is_empty() && h != "localhost");
                match parsed.to_file_path() {
                    Ok(dir) if !has_host && dir.is_absolute() => Ok(SnapshotLocation::Local(dir)),
                    _ => Err(format!("{url:?}: use file:///ABSOLUTE/DIRECTORY")),
                }
            }
            "s3" => {
                let bucket = parsed.host_str().unwrap_or_default().to_owned();
                if bucket.is_empty() {
                    return Err(format!("{url:?}: use s3://BUCKET or s3://BUCKET/PREFIX"));
                }
                if parsed.query().is_some() || parsed.fragment().is_some() {
                    return Err(format!("{url:?}: S3 settings come from the AWS_* environment variables, not the URL"));
                }
                let prefix = parsed.path().trim_matches('/').to_owned();
                Ok(SnapshotLocation::S3 { bucket, prefix })
            }
            other => Err(format!("{url:?}: scheme {other:?} is not supported; use file:///DIR or s3://BUCKET/PREFIX")),
        }
    }
}

/// Retention of events, health history and snapshots (see [`crate::store::retention`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRetention {
    /// Delete events, health reports and snapshots older than this many days (by the time the
    /// device observed them). 0 turns age retention off. Default 90.
    pub max_age_days: u64,
    /// Keep the database plus the snapshot pictures under this size: an integer (bytes) or a
    /// string with a unit, `"50GB"` (10^9), `"500MiB"` (2^20), `"1.5 TB"`. Above it, the oldest
    /// events and their pictures are deleted until the total is under 95% of it. 0 (the
    /// default) turns size retention off.
    pub max_total_bytes: RawByteSize,
    /// Seconds between retention runs (at least 10). Default 300.
    pub interval_s: u64,
}

impl Default for RawRetention {
    fn default() -> Self {
        Self { max_age_days: 90, max_total_bytes: RawByteSize::Bytes(0), interval_s: 300 }
    }
}

/// A size as written in the configuration: bytes, or a string with a unit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RawByteSize {
    Bytes(i64),
    Text(String),
}

/// Longest age accepted (100 years): beyond it the cutoff would not fit in Unix milliseconds.
const MAX_AGE_DAYS: u64 = 36_500;
/// Smallest size limit accepted (a smaller one is surely a unit mistake).
const MIN_TOTAL_BYTES: u64 = 1 << 20;

impl RawRetention {
    /// The policy, or the problems (pushed to `e` with their paths; then the policy returned is
    /// meaningless).
    pub fn policy(&self, e: &mut ConfigErrors) -> RetentionPolicy {
        e.check(self.max_age_days <= MAX_AGE_DAYS, "retention.max_age_days", || {
            format!("{} days is more than {MAX_AGE_DAYS}; use 0 to turn age retention off", self.max_age_days)
        });
        e.check(self.interval_s >= 10, "retention.interval_s", || "must be at least 10".into());
        let max_total_bytes = match &self.max_total_bytes {
            RawByteSize::Bytes(n) => u64::try_from(*n).map_err(|_| format!("{n} is negative")),
            RawByteSize::Text(text) => parse_byte_size(text),
        };
        let max_total_bytes = match max_total_bytes {
            Ok(0) => None,
            Ok(n) if n < MIN_TOTAL_BYTES => {
                e.push(
                    "retention.max_total_bytes",
                    format!("{n} bytes is less than 1 MiB; write a unit (\"50GB\", \"500MiB\") or 0 to turn it off"),
                );
                None
            }
            Ok(n) => Some(n),
            Err(message) => {
                e.push("retention.max_total_bytes", message);
                None
            }
        };
        RetentionPolicy {
            max_age: (self.max_age_days > 0 && self.max_age_days <= MAX_AGE_DAYS)
                .then(|| Duration::from_secs(self.max_age_days * 86_400)),
            max_total_bytes,
            interval: Duration::from_secs(self.interval_s),
            ..RetentionPolicy::default()
        }
    }
}

/// Parses a size: digits (with an optional fraction), optional spaces, an optional unit:
/// `B`; `k`/`kB`, `M`/`MB`, `G`/`GB`, `T`/`TB` (powers of 1000); `Ki`/`KiB`, `Mi`/`MiB`,
/// `Gi`/`GiB`, `Ti`/`TiB` (powers of 1024). Units are case-insensitive. `"50GB"` is
/// 50,000,000,000 bytes, `"500MiB"` 524,288,000.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim_start());
    let bad = || format!("{text:?} is not a size; write bytes or a number with a unit, e.g. \"50GB\" or \"500MiB\"");
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() || (number.contains('.') && frac.is_empty()) || frac.contains('.') || frac.len() > 9 {
        return Err(bad());
    }
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    let too_large = || format!("{text:?} is too large");
    let int: u64 = int.parse().map_err(|_| too_large())?;
    let whole = int.checked_mul(multiplier).ok_or_else(too_large)?;
    let fraction = if frac.is_empty() {
        0
    } else {
        let digits: u64 = frac.parse().map_err(|_| bad())?;
        let scale = 10u128.pow(frac.len() as u32);
        (u128::from(digits) * u128::from(multiplier) / scale) as u64
    };
    whole.checked_add(fraction).ok_or_else(too_large)
}

/// The directory of the SQLite database file, else the parent of `pki_dir` (else `pki_dir`).
fn default_snapshot_dir(database_url: &str, pki_dir: &Path) -> PathBuf {
    let sqlite_file = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))
        .map(|rest| rest.split('?').next().unwrap_or(rest))
        .filter(|path| !path.is_empty() && !path.contains(":memory:"));
    let base = match sqlite_file {
        Some(file) => Path::new(file).parent().map(Path::to_path_buf),
        None => pki_dir.parent().map(Path::to_path_buf),
    };
    match base {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        Some(_) => PathBuf::from("."),
        None => pki_dir.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_errors_at_once() {
        let raw: RawConfig = RawConfig::load(
            None,
            vec![
                ("ITS_AGGREGATOR__DATABASE_URL".into(), "mysql://x".into()),
                ("ITS_AGGREGATOR__QUIC__LISTEN".into(), "nope".into()),
                ("ITS_AGGREGATOR__HTTP__LISTEN".into(), "0.0.0.0:80".into()),
            ],
        )
        .expect("parses");
        let err = raw.validate("env").expect_err("invalid");
        let paths: Vec<&str> = err.issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, vec!["database_url", "quic.listen", "http.listen"]);
    }

    /// A self-signed certificate and its key in `dir`, as `(cert, key)` paths.
    fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
        let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&cert, c.cert.pem()).expect("write cert");
        std::fs::write(&key, c.signing_key.serialize_pem()).expect("write key");
        (cert, key)
    }

    fn http_with(vars: &[(&str, &str)]) -> Result<ServerConfig, Vec<(String, String)>> {
        let env = vars.iter().map(|(k, v)| (format!("ITS_AGGREGATOR__HTTP__{k}"), v.to_string()));
        let raw = RawConfig::load(None, env).expect("parses");
        raw.validate("env").map_err(|e| e.issues.into_iter().map(|i| (i.path, i.message)).collect())
    }

    fn paths<T>(r: Result<T, Vec<(String, String)>>) -> Vec<String> {
        r.err().unwrap_or_default().into_iter().map(|(p, _)| p).collect()
    }

    #[test]
    fn non_loopback_http_needs_tls() {
        let issues = http_with(&[("LISTEN", "0.0.0.0:8470")]).expect_err("refused");
        assert_eq!(issues.len(), 1, "{issues:?}");
        let (path, message) = &issues[0];
        assert_eq!(path, "http.listen");
        assert!(message.contains("tls_cert") && message.contains("127.0.0.1"), "{message}");
        assert_eq!(paths(http_with(&[("LISTEN", "[::]:8470")])), ["http.listen"]);
        assert_eq!(paths(http_with(&[("LISTEN", "192.0.2.10:443")])), ["http.listen"]);
        // Loopback, v4 or v6, needs nothing.
        let cfg = http_with(&[("LISTEN", "[::1]:8470")]).expect("loopback");
        assert_eq!(cfg.http_tls, None);
        assert!(cfg.http_trusted_proxies.is_empty());
    }

    #[test]
    fn non_loopback_http_with_tls_is_accepted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = self_signed(dir.path(), "api");
        let (c, k) = (cert.to_str().expect("utf-8"), key.to_str().expect("utf-8"));
        let cfg = http_with(&[("LISTEN", "0.0.0.0:443"), ("TLS_CERT", c), ("TLS_KEY", k)]).expect("valid");
        assert_eq!(cfg.http_listen, "0.0.0.0:443".parse().expect("addr"));
        assert_eq!(cfg.http_tls, Some(TlsFiles { cert: cert.clone(), key: key.clone() }));
        // TLS on loopback is fine too.
        let cfg = http_with(&[("TLS_CERT", c), ("TLS_KEY", k)]).expect("valid");
        assert_eq!(cfg.http_tls, Some(TlsFiles { cert, key }));
    }

    #[test]
    fn tls_cert_and_key_come_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = self_signed(dir.path(), "api");
        let (c, k) = (cert.to_str().expect("utf-8"), key.to_str().expect("utf-8"));
        assert_eq!(paths(http_with(&[("LISTEN", "0.0.0.0:443"), ("TLS_KEY", k)])), ["http.tls_cert"]);
        assert_eq!(paths(http_with(&[("LISTEN", "0.0.0.0:443"), ("TLS_CERT", c)])), ["http.tls_key"]);
        assert_eq!(paths(http_with(&[("TLS_KEY", k)])), ["http.tls_cert"]);
        // An empty value (an environment override clearing it) is unset.
        assert_eq!(paths(http_with(&[("LISTEN", "0.0.0.0:443"), ("TLS_CERT", ""), ("TLS_KEY", "")])), ["http.listen"]);
    }

    #[test]
    fn tls_files_must_be_usable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = self_signed(dir.path(), "api");
        let (_, other_key) = self_signed(dir.path(), "other");
        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").expect("write");
        let s = |p: &Path| p.to_str().expect("utf-8").to_owned();
        let listen = ("LISTEN", "0.0.0.0:443");

        // Both missing: both reported, each naming its file.
        let issues = http_with(&[listen, ("TLS_CERT", &s(&missing)), ("TLS_KEY", &s(&garbage))]).expect_err("refused");
        let got: Vec<&str> = issues.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(got, ["http.tls_cert", "http.tls_key"]);
        assert!(issues[0].1.contains(&s(&missing)), "{issues:?}");
        assert!(issues[1].1.contains(&s(&garbage)), "{issues:?}");

        // A key where the certificate should be, and the other way round.
        assert_eq!(paths(http_with(&[listen, ("TLS_CERT", &s(&key)), ("TLS_KEY", &s(&key))])), ["http.tls_cert"]);
        assert_eq!(paths(http_with(&[listen, ("TLS_CERT", &s(&cert)), ("TLS_KEY", &s(&cert))])), ["http.tls_key"]);

        // The key of another certificate.
        let issues = http_with(&[listen, ("TLS_CERT", &s(&cert)), ("TLS_KEY", &s(&other_key))]).expect_err("refused");
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].0, "http.tls_key");
        assert!(issues[0].1.contains("does not belong") && issues[0].1.contains(&s(&cert)), "{issues:?}");
    }

    #[test]
    fn trusted_proxies() {
        let cfg = http_with(&[("TRUSTED_PROXIES", r#"["127.0.0.1", "10.0.0.0/8", "fd00::/8"]"#)]).expect("valid");
        let got: Vec<String> = cfg.http_trusted_proxies.iter().map(ToString::to_string).collect();
        assert_eq!(got, ["127.0.0.1/32", "10.0.0.0/8", "fd00::/8"]);
        let issues = http_with(&[("TRUSTED_PROXIES", r#"["127.0.0.1", "proxy.local", "10.0.0.1/8", "10.0.0.0/40"]"#)])
            .expect_err("refused");
        let got: Vec<&str> = issues.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(got, ["http.trusted_proxies[1]", "http.trusted_proxies[2]", "http.trusted_proxies[3]"]);
        assert!(issues[1].1.contains("10.0.0.0/8"), "the network is suggested: {issues:?}");
    }

    #[test]
    fn http_limits() {
        let cfg =
            http_with(&[("HEADER_TIMEOUT_S", "2"), ("BODY_TIMEOUT_S", "3"), ("MAX_CONNECTIONS", "8")]).expect("valid");
        let want = HttpLimits {
            header_timeout: Duration::from_secs(2),
            body_timeout: Duration::from_secs(3),
            max_connections: 8,
        };
        assert_eq!(cfg.http_limits, want);
        assert_eq!(http_with(&[]).expect("defaults").http_limits, HttpLimits::default());
        let issues = http_with(&[("HEADER_TIMEOUT_S", "0"), ("BODY_TIMEOUT_S", "3601"), ("MAX_CONNECTIONS", "0")])
            .expect_err("bad");
        let got: Vec<&str> = issues.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(got, ["http.header_timeout_s", "http.body_timeout_s", "http.max_connections"]);
        assert_eq!(paths(http_with(&[("HEADER_TIMEOUT_S", "301")])), ["http.header_timeout_s"]);
        assert_eq!(paths(http_with(&[("BODY_TIMEOUT_S", "0")])), ["http.body_timeout_s"]);
        assert_eq!(paths(http_with(&[("MAX_CONNECTIONS", "1000001")])), ["http.max_connections"]);
    }

    #[test]
    fn defaults_are_valid() {
        let cfg = RawConfig::default().validate("defaults").expect("valid");
        assert_eq!(cfg.snapshots, SnapshotLocation::Local(PathBuf::from("/var/lib/its-aggregator")));
    }

    fn snapshots_with(database_url: &str, url: &str) -> Result<SnapshotLocation, Vec<String>> {
        let raw = RawConfig::load(
            None,
            vec![
                ("ITS_AGGREGATOR__DATABASE_URL".into(), database_url.into()),
                ("ITS_AGGREGATOR__PKI_DIR".into(), "/srv/its/pki".into()),
                ("ITS_AGGREGATOR__SNAPSHOTS__URL".into(), url.into()),
            ],
        )
        .expect("parses");
        raw.validate("env").map(|c| c.snapshots).map_err(|e| e.issues.iter().map(|i| i.path.clone()).collect())
    }

    #[test]
    fn snapshot_location_defaults_beside_the_database() {
        let local = |p: &str| Ok(SnapshotLocation::Local(PathBuf::from(p)));
        assert_eq!(snapshots_with("sqlite:///data/agg/events.db", ""), local("/data/agg"));
        assert_eq!(snapshots_with("sqlite:///data/agg/events.db?mode=rwc", ""), local("/data/agg"));
        assert_eq!(snapshots_with("sqlite://events.db", ""), local("."));
        assert_eq!(snapshots_with("sqlite::memory:", ""), local("/srv/its"));
        assert_eq!(snapshots_with("postgres://u@h/db", ""), local("/srv/its"));
    }

    #[test]
    fn snapshot_urls() {
        assert_eq!(
            snapshots_with("postgres://u@h/db", "file:///mnt/pictures"),
            Ok(SnapshotLocation::Local(PathBuf::from("/mnt/pictures")))
        );
        assert_eq!(
            snapshots_with("postgres://u@h/db", "s3://its-pictures/prod/eu"),
            Ok(SnapshotLocation::S3 { bucket: "its-pictures".into(), prefix: "prod/eu".into() })
        );
        assert_eq!(
            snapshots_with("postgres://u@h/db", "s3://its-pictures"),
            Ok(SnapshotLocation::S3 { bucket: "its-pictures".into(), prefix: String::new() })
        );
        for bad in ["relative/dir", "file://host/dir", "gs://bucket", "s3:///prefix", "s3://b/p?region=x", "ftp://x"] {
            assert_eq!(snapshots_with("postgres://u@h/db", bad), Err(vec!["snapshots.url".to_string()]), "{bad}");
        }
    }

    #[test]
    fn the_example_file_is_valid_and_shows_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/aggregator.toml.example");
        let raw = RawConfig::load(Some(&path), Vec::<(String, String)>::new()).expect("parses");
        let cfg = raw.validate("example").expect("valid");
        let defaults = RawConfig::default().validate("defaults").expect("valid");
        assert_eq!(format!("{:?}", cfg.auth), format!("{:?}", defaults.auth));
        assert_eq!(format!("{:?}", cfg.ingest), format!("{:?}", defaults.ingest));
        assert_eq!(cfg.secrets_key_file, defaults.secrets_key_file);
        assert_eq!(cfg.http_listen, defaults.http_listen);
        assert_eq!(cfg.http_limits, defaults.http_limits);
        assert_eq!(format!("{:?}", cfg.retention), format!("{:?}", defaults.retention));
        assert_eq!(format!("{:?}", cfg.kafka), format!("{:?}", defaults.kafka));
        assert_eq!(format!("{:?}", cfg.alerts), format!("{:?}", defaults.alerts));
        assert_eq!(format!("{:?}", cfg.redis), format!("{:?}", defaults.redis));
        assert_eq!(cfg.analytics, defaults.analytics);
        assert_eq!(format!("{:?}", cfg.mqtt.uplink), format!("{:?}", defaults.mqtt.uplink));
        assert_eq!(
            (&cfg.mqtt.mode, cfg.mqtt.listen, &cfg.mqtt.id, cfg.mqtt.tls.is_some()),
            (&defaults.mqtt.mode, defaults.mqtt.listen, &defaults.mqtt.id, defaults.mqtt.tls.is_some())
        );
        assert_eq!(
            (cfg.mqtt.max_connections, cfg.mqtt.max_connections_per_client),
            (defaults.mqtt.max_connections, defaults.mqtt.max_connections_per_client)
        );
    }

    #[test]
    fn limits_audit_and_targets_are_checked() {
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| (format!("ITS_AGGREGATOR__{k}"), (*v).to_owned())).collect()
        };
        let raw = RawConfig::load(
            None,
            env(&[
                ("QUIC__MAX_CONNECTIONS", "0"),
                ("QUIC__MAX_CONNECTIONS_PER_DEVICE", "17"),
                ("AUTH__HASH_QUEUE", "0"),
                ("AUDIT__MAX_AGE_DAYS", "99999999"),
                ("ALERTS__ALLOWED_TARGET_NETWORKS", r#"["127.0.0.1", "not-a-net"]"#),
            ]),
        )
        .expect("parses");
        let err = raw.validate("env").expect_err("invalid");
        let paths: Vec<&str> = err.issues.iter().map(|i| i.path.as_str()).collect();
        for want in [
            "quic.max_connections",
            "quic.max_connections_per_device",
            "auth.hash_queue",
            "audit.max_age_days",
            "alerts.allowed_target_networks[1]",
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
        let raw = RawConfig::load(
            None,
            env(&[("AUDIT__MAX_ROWS", "0"), ("AUDIT__MAX_AGE_DAYS", "0"), ("SECRETS__KEY_FILE", "/etc/its/ring")]),
        )
        .expect("parses");
        let cfg = raw.validate("env").expect("valid");
        assert_eq!((cfg.auth.audit_max_age, cfg.auth.audit_max_rows), (None, None));
        assert_eq!(cfg.secrets_source(), crate::vault::KeySource::from_env_or_file(Path::new("/etc/its/ring")));
        let defaults = ServerConfig::default();
        assert_eq!(defaults.secrets_key_file, None);
        assert!(
            matches!(defaults.secrets_source(), crate::vault::KeySource::File(p) if p.ends_with("pki/secrets.key"))
                || std::env::var(crate::vault::KEYRING_ENV).is_ok()
        );
    }

    #[test]
    fn auth_settings_are_checked() {
        let raw = RawConfig::load(
            None,
            vec![
                ("ITS_AGGREGATOR__AUTH__ACCESS_TOKEN_TTL_S".into(), "5".into()),
                ("ITS_AGGREGATOR__AUTH__LOCKOUT_S".into(), "0".into()),
            ],
        )
        .expect("parses");
        let err = raw.validate("env").expect_err("invalid");
        let paths: Vec<&str> = err.issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, vec!["auth.access_token_ttl_s", "auth.lockout_s"]);
    }
}
