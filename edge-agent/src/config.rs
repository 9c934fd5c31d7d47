//! Agent configuration, in two phases: [`RawConfig`] is the TOML form (every field optional,
//! unknown fields refused, environment overrides `ITS_AGENT__SECTION__KEY=value`), and
//! [`AgentConfig`] is the validated form. Validation reports every problem at once with its path.

use std::path::{Path, PathBuf};
use std::time::Duration;

use its_shared::config::{ConfigErrors, parse_toml_with_env};
use its_shared::session::AgentSessionConfig;
use serde::Deserialize;

use crate::buffer::OutboxConfig;
use crate::source::SyntheticConfig;
use crate::source::synthetic::SYNTHETIC_KINDS;
use crate::uplink::UplinkConfig;
use crate::uplink::tls::DeviceBundle;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "ITS_AGENT__";

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Directory with `device.pem`, `device.key` and `ca.pem` from `its-aggregator device enroll`.
    pub device_bundle: PathBuf,
    pub uplink: RawUplink,
    pub outbox: RawOutbox,
    pub synthetic: RawSynthetic,
    pub health: RawHealth,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            device_bundle: PathBuf::from("/etc/its-agent/device"),
            uplink: RawUplink::default(),
            outbox: RawOutbox::default(),
            synthetic: RawSynthetic::default(),
            health: RawHealth::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawUplink {
    /// `host:port` of the aggregator's QUIC listener (the aggregator's default port is 8471).
    pub aggregator: String,
    /// Name on the aggregator's certificate (`pki init` always includes `its-aggregator`).
    pub server_name: String,
    /// Events per batch; see `AgentSessionConfig` for the reasoning behind the defaults.
    pub max_batch_events: usize,
    pub window_batches: usize,
    pub ack_timeout_ms: u64,
    pub heartbeat_interval_s: u64,
    /// First reconnect delay; doubles per failure up to `backoff_cap_ms`.
    pub backoff_base_ms: u64,
    /// 30 s cap: a fleet reconnecting after an aggregator restart spreads out, and a box is
    /// never more than half a minute late to notice the aggregator is back.
    pub backoff_cap_ms: u64,
    /// Randomise delays (on by default so a fleet does not reconnect in lockstep).
    pub jitter: bool,
    /// A silent connection is declared dead after this long (20 s: several missed keep-alives).
    pub idle_timeout_ms: u64,
    pub keep_alive_ms: u64,
}

impl Default for RawUplink {
    fn default() -> Self {
        let s = AgentSessionConfig::default();
        Self {
            aggregator: "127.0.0.1:8471".into(),
            server_name: "its-aggregator".into(),
            max_batch_events: s.max_batch_events,
            window_batches: s.window_batches,
            ack_timeout_ms: s.ack_timeout.as_millis() as u64,
            heartbeat_interval_s: s.heartbeat_interval.as_secs(),
            backoff_base_ms: 250,
            backoff_cap_ms: 30_000,
            jitter: true,
            idle_timeout_ms: 20_000,
            keep_alive_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawOutbox {
    pub path: PathBuf,
    /// 512 MiB holds about five million events: days of a busy junction's events offline.
    pub max_bytes: u64,
    /// Events older than a week are of little use to a traffic centre; they are evicted (and
    /// counted) rather than kept forever.
    pub max_age_h: u64,
    /// Sequence numbers reserved per write of the "sent" mark (see the outbox's contract).
    pub reserve_ahead: u64,
}

impl Default for RawOutbox {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/var/lib/its-agent/outbox.db"),
            max_bytes: 512 * 1024 * 1024,
            max_age_h: 168,
            reserve_ahead: 8192,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSynthetic {
    /// Off by default: a real box counts real traffic.
    pub enabled: bool,
    pub rate_per_s: f64,
    pub cameras: Vec<String>,
    pub kinds: Vec<String>,
    /// Stop after this many events in total (0 = never).
    pub limit: u64,
    /// Events of one tick are committed in one transaction (10 ms: 100 commits/s at most).
    pub tick_ms: u64,
}

impl Default for RawSynthetic {
    fn default() -> Self {
        Self {
            enabled: false,
            rate_per_s: 20.0,
            cameras: vec!["cam-1".into()],
            kinds: SYNTHETIC_KINDS.iter().map(|s| s.to_string()).collect(),
            limit: 0,
            tick_ms: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawHealth {
    /// A device_health event every 60 s: enough for a fleet view, cheap on a metered link.
    pub interval_s: u64,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self { interval_s: 60 }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub uplink: UplinkConfig,
    pub outbox: OutboxConfig,
    pub synthetic: Option<SyntheticConfig>,
    pub health_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{0}")]
    Invalid(ConfigErrors),
}

impl RawConfig {
    /// Reads `path` (or the defaults when `None`), applies environment overrides, parses.
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

    /// Checks everything and builds the validated form, or reports every problem.
    pub fn validate(&self, source: &str) -> Result<AgentConfig, ConfigErrors> {
        let mut e = ConfigErrors::new(source);
        let u = &self.uplink;
        e.check(
            u.aggregator.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)),
            "uplink.aggregator",
            || format!("{:?} is not host:port", u.aggregator),
        );
        e.check(!u.server_name.is_empty(), "uplink.server_name", || "must not be empty".into());
        e.check((1..=20_000).contains(&u.max_batch_events), "uplink.max_batch_events", || {
            format!("{} is outside 1..=20000 (a batch must fit in one wire frame)", u.max_batch_events)
        });
        e.check((1..=64).contains(&u.window_batches), "uplink.window_batches", || {
            format!("{} is outside 1..=64", u.window_batches)
        });
        e.check(u.ack_timeout_ms >= 100, "uplink.ack_timeout_ms", || "must be at least 100".into());
        e.check(u.heartbeat_interval_s >= 1, "uplink.heartbeat_interval_s", || "must be at least 1".into());
        e.check(u.backoff_base_ms >= 1, "uplink.backoff_base_ms", || "must be at least 1".into());
        e.check(u.backoff_cap_ms >= u.backoff_base_ms, "uplink.backoff_cap_ms", || {
            "must be at least backoff_base_ms".into()
        });
        e.check(u.keep_alive_ms >= 100, "uplink.keep_alive_ms", || "must be at least 100".into());
        e.check(u.idle_timeout_ms > u.keep_alive_ms, "uplink.idle_timeout_ms", || {
            "must be greater than keep_alive_ms".into()
        });
        let bundle = DeviceBundle::in_dir(&self.device_bundle);
        for missing in bundle.missing() {
            e.push(
                "device_bundle",
                format!("{} is missing (run `its-aggregator device enroll` and copy the bundle)", missing.display()),
            );
        }
        let o = &self.outbox;
        e.check(o.max_bytes >= 1024 * 1024, "outbox.max_bytes", || format!("{} is below 1 MiB", o.max_bytes));
        e.check(o.max_age_h >= 1, "outbox.max_age_h", || "must be at least 1".into());
        e.check(o.reserve_ahead >= 1, "outbox.reserve_ahead", || "must be at least 1".into());
        e.check(o.path.file_name().is_some(), "outbox.path", || "must name a file".into());
        let s = &self.synthetic;
        if s.enabled {
            e.check(s.rate_per_s > 0.0 && s.rate_per_s <= 1_000_000.0, "synthetic.rate_per_s", || {
                format!("{} is outside (0, 1000000]", s.rate_per_s)
            });
            e.check(!s.cameras.is_empty(), "synthetic.cameras", || "must name at least one camera".into());
            e.check(!s.kinds.is_empty(), "synthetic.kinds", || "must name at least one kind".into());
            e.check((1..=1000).contains(&s.tick_ms), "synthetic.tick_ms", || "must be in 1..=1000".into());
        }
        for (i, k) in s.kinds.iter().enumerate() {
            e.check(SYNTHETIC_KINDS.contains(&k.as_str()), &format!("synthetic.kinds[{i}]"), || {
                format!("unknown kind {k:?}; known: {}", SYNTHETIC_KINDS.join(", "))
            });
        }
        e.check(self.health.interval_s >= 1, "health.interval_s", || "must be at least 1".into());
        if !e.is_empty() {
            return Err(e);
        }
        let cameras = if s.enabled { s.cameras.clone() } else { Vec::new() };
        Ok(AgentConfig {
            uplink: UplinkConfig {
                aggregator: u.aggregator.clone(),
                server_name: u.server_name.clone(),
                bundle,
                session: AgentSessionConfig {
                    max_batch_events: u.max_batch_events,
                    window_batches: u.window_batches,
                    ack_timeout: Duration::from_millis(u.ack_timeout_ms),
                    heartbeat_interval: Duration::from_secs(u.heartbeat_interval_s),
                    ..AgentSessionConfig::default()
                },
                backoff_base: Duration::from_millis(u.backoff_base_ms),
                backoff_cap: Duration::from_millis(u.backoff_cap_ms),
                jitter: u.jitter,
                idle_timeout: Duration::from_millis(u.idle_timeout_ms),
                keep_alive: Duration::from_millis(u.keep_alive_ms),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                model: "none".into(),
                cameras: cameras.clone(),
            },
            outbox: OutboxConfig {
                path: o.path.clone(),
                max_bytes: o.max_bytes,
                max_age: Duration::from_secs(o.max_age_h * 3600),
                reserve_ahead: o.reserve_ahead,
            },
            synthetic: s.enabled.then(|| SyntheticConfig {
                rate_per_s: s.rate_per_s,
                cameras,
                kinds: s.kinds.clone(),
                limit: (s.limit > 0).then_some(s.limit),
                tick: Duration::from_millis(s.tick_ms),
            }),
            health_interval: Duration::from_secs(self.health.interval_s),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let toml = r#"
            device_bundle = "/nonexistent"
            [uplink]
            aggregator = "nohost"
            window_batches = 0
            [outbox]
            max_bytes = 10
            [synthetic]
            enabled = true
            rate_per_s = -1.0
            kinds = ["line_crossing", "teleport"]
        "#;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, toml).expect("write");
        let raw = RawConfig::load(Some(&p), Vec::new()).expect("parses");
        let err = raw.validate("agent.toml").expect_err("invalid");
        let paths: Vec<&str> = err.issues.iter().map(|i| i.path.as_str()).collect();
        for want in [
            "uplink.aggregator",
            "uplink.window_batches",
            "device_bundle",
            "outbox.max_bytes",
            "synthetic.rate_per_s",
            "synthetic.kinds[1]",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
    }

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, "[outbox]\nmax_byte = 5\n").expect("write");
        let err = RawConfig::load(Some(&p), Vec::new()).expect_err("unknown field");
        assert!(err.to_string().contains("max_byte"), "{err}");
    }

    #[test]
    fn environment_overrides_apply() {
        let raw =
            RawConfig::load(None, vec![("ITS_AGENT__UPLINK__AGGREGATOR".into(), "10.0.0.1:9000".into())]).expect("ok");
        assert_eq!(raw.uplink.aggregator, "10.0.0.1:9000");
    }
}
