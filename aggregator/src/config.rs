//! Aggregator configuration, in two phases: [`RawConfig`] (TOML, unknown fields refused,
//! environment overrides `ITS_AGGREGATOR__SECTION__KEY=value`) and the validated [`ServerConfig`].
//! Validation reports every problem at once with its path.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use its_shared::config::{ConfigErrors, parse_toml_with_env};
use serde::Deserialize;

use crate::ingest::IngestConfig;
use crate::snapshots::SnapshotLocation;

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
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            database_url: "sqlite:///var/lib/its-aggregator/events.db".into(),
            pki_dir: PathBuf::from("/var/lib/its-aggregator/pki"),
            quic: RawQuic::default(),
            http: RawHttp::default(),
            snapshots: RawSnapshots::default(),
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
}

impl Default for RawQuic {
    fn default() -> Self {
        Self { listen: "0.0.0.0:8471".into(), idle_timeout_ms: 30_000 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawHttp {
    /// Loopback only: this release has no user authentication, so the API must not be exposed.
    /// Put a reverse proxy with authentication in front of it if it must be reached remotely.
    pub listen: String,
}

impl Default for RawHttp {
    fn default() -> Self {
        Self { listen: "127.0.0.1:8470".into() }
    }
}

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
    pub snapshots: SnapshotLocation,
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
        let text = match path {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| ConfigError::Read { path: p.to_path_buf(), message: e.to_string() })?,
            ),
            None => None,
        };
        let source = path.map_or("<defaults>".to_string(), |p| p.display().to_string());
        parse_toml_with_env(&source, text.as_deref(), ENV_PREFIX, env)
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
        let http: Option<SocketAddr> = self.http.listen.parse().ok();
        match http {
            None => e.push("http.listen", format!("{:?} is not an IP:port address", self.http.listen)),
            Some(a) if !a.ip().is_loopback() => e.push(
                "http.listen",
                format!("{a} is not a loopback address: the API has no authentication in this release; keep it on 127.0.0.1 and put an authenticating reverse proxy in front"),
            ),
            Some(_) => {}
        }
        let snapshots = match self.snapshot_location() {
            Ok(loc) => Some(loc),
            Err(message) => {
                e.push("snapshots.url", message);
                None
            }
        };
        match (e.is_empty(), quic, http, snapshots) {
            (true, Some(quic), Some(http), Some(snapshots)) => Ok(ServerConfig {
                database_url: url.clone(),
                pki_dir: self.pki_dir.clone(),
                ingest: IngestConfig { listen: quic, idle_timeout: Duration::from_millis(self.quic.idle_timeout_ms) },
                http_listen: http,
                snapshots,
            }),
            _ => Err(e),
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
}
