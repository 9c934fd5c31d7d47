//! Aggregator configuration, in two phases: [`RawConfig`] (TOML, unknown fields refused,
//! environment overrides `ITS_AGGREGATOR__SECTION__KEY=value`) and the validated [`ServerConfig`].
//! Validation reports every problem at once with its path.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use its_shared::config::{ConfigErrors, parse_toml_with_env};
use serde::Deserialize;

use crate::ingest::IngestConfig;

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
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            database_url: "sqlite:///var/lib/its-aggregator/events.db".into(),
            pki_dir: PathBuf::from("/var/lib/its-aggregator/pki"),
            quic: RawQuic::default(),
            http: RawHttp::default(),
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

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub database_url: String,
    pub pki_dir: PathBuf,
    pub ingest: IngestConfig,
    pub http_listen: SocketAddr,
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
        match (e.is_empty(), quic, http) {
            (true, Some(quic), Some(http)) => Ok(ServerConfig {
                database_url: url.clone(),
                pki_dir: self.pki_dir.clone(),
                ingest: IngestConfig { listen: quic, idle_timeout: Duration::from_millis(self.quic.idle_timeout_ms) },
                http_listen: http,
            }),
            _ => Err(e),
        }
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
        assert!(RawConfig::default().validate("defaults").is_ok());
    }
}
