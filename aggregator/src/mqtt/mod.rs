//! MQTT: the embedded broker, topics for third parties, integrator credentials; [`uplink`] is
//! the aggregator's side of the agents' MQTT uplink.
//!
//! What third parties get (JSON, QoS 1; see [`topics`] for the exact names and payloads):
//! - `its/v1/{site}/{camera}/events/{kind}`: one message per committed event (`counts` events go
//!   to `its/v1/{site}/{camera}/counts` instead; analytics anomalies to `.../events/anomaly`);
//! - `its/v1/devices/{device}/status`: retained, `{"status":"online"|"offline",...}`;
//! - `its/v1/alerts/{severity}`: alerts as the alert engine publishes them;
//! - `its/v1/aggregator/{id}/status`: retained, `online` while this aggregator's MQTT connection is
//!   up; its last will (retained) says `offline` when the connection drops without a goodbye,
//!   so subscribers learn that the aggregator itself vanished.
//!
//! Where it goes ([`MqttMode`]): to the **embedded** broker by default ([`broker`], rumqttd behind
//! an MQTT-aware front in this process that authenticates every CONNECT against the integrator
//! credentials ([`credentials`]), authorises every SUBSCRIBE and every delivery against the
//! credential's sites, keeps the sessions of a credential deleted and created again apart, closes
//! the connections of a credential that no longer holds, and caps connections:
//! `max_connections`, `max_connections_per_client`),
//! to an **external** broker (Mosquitto, EMQX: its own password and ACL files, which
//! `its-aggregator mqtt mosquitto-config` writes from the same credentials), or nowhere (`off`).
//!
//! Inside: [`broker`] (the embedded broker's front: logins, ACLs, limits), [`acl`], [`topics`],
//! [`publish`] (events, counts, status and alerts for third parties), [`credentials`]
//! (integrators' logins; their rows are [`crate::store::mqtt_credentials`]), [`uplink`] (the
//! aggregator's side of the agents' MQTT uplink, committing through [`crate::ingest`]).
//!
//! Dependencies: store, bus, auth (secret helpers), ingest, certs, pki, telemetry. Never http or
//! config.

use std::net::SocketAddr;
use std::path::PathBuf;
#[cfg(feature = "embedded-mqtt")]
use std::sync::Arc;

use its_shared::config::ConfigErrors;
use serde::Deserialize;
use tokio::sync::watch;

use crate::bus::EventBus;
use crate::certs::TlsFiles;
use crate::store::Db;

pub mod acl;
#[cfg(feature = "embedded-mqtt")]
pub mod broker;
pub mod credentials;
pub mod publish;
pub mod topics;
pub mod uplink;

/// Default address of the embedded broker: loopback only (integrators on other hosts need
/// `listen` on another address, which then needs `tls_cert` and `tls_key`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8472";
/// Default `max_connections` of the embedded broker: far above what integrators of one
/// deployment open, while rumqttd's tables for that many stay small (a few MB).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Default `max_connections_per_client`: an integrator runs a few consumers per credential (one
/// per service, and a spare during a deploy); more is a leak or a reconnect loop, which must not
/// take the connections of the others.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: u32 = 16;
/// Largest `max_connections`: rumqttd allocates its per-connection tables up front for that many.
pub const MAX_CONNECTIONS_LIMIT: u32 = 100_000;

/// `[mqtt]` as written in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawMqtt {
    /// `embedded` (default), `external` or `off`.
    pub mode: String,
    /// Embedded broker: where MQTT clients connect (MQTT 3.1.1 over TCP, or TLS with
    /// `tls_cert`/`tls_key`). Default `127.0.0.1:8472`; a non-loopback address needs TLS.
    pub listen: String,
    /// Embedded broker: PEM certificate chain (leaf first) for MQTT over TLS.
    pub tls_cert: Option<PathBuf>,
    /// Embedded broker: PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Embedded broker: most client connections open at once (1 to 100000). Default 10000.
    pub max_connections: u32,
    /// Embedded broker: most connections open at once with one credential (1 to
    /// `max_connections`). Default 16.
    pub max_connections_per_client: u32,
    /// External broker: `mqtt://HOST:PORT` or `mqtts://HOST:PORT` (TLS, checked against the
    /// system roots or `ca_file`).
    pub url: String,
    /// External broker: user name and password of the aggregator's own connection.
    pub username: String,
    pub password: String,
    /// External broker: PEM CA certificate(s) to trust for `mqtts://` instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// This aggregator's id in `its/v1/aggregator/{id}/status` and in its MQTT client id
    /// (`[A-Za-z0-9._-]`, 1 to 64). Empty (default): the host name. Replicas sharing an external
    /// broker need distinct ids.
    pub id: String,
    /// `[mqtt.uplink]`: agents that drain their outbox through a broker.
    pub uplink: uplink::RawMqttUplink,
}

impl Default for RawMqtt {
    fn default() -> Self {
        Self {
            // Without the embedded broker compiled in, MQTT is off unless configured.
            mode: if cfg!(feature = "embedded-mqtt") { "embedded" } else { "off" }.into(),
            listen: DEFAULT_LISTEN.into(),
            tls_cert: None,
            tls_key: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            url: String::new(),
            username: String::new(),
            password: String::new(),
            ca_file: None,
            id: String::new(),
            uplink: Default::default(),
        }
    }
}

/// Where the aggregator publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MqttMode {
    /// No MQTT at all.
    Off,
    /// The broker inside this process ([`broker`]).
    Embedded,
    /// A broker elsewhere.
    External(ExternalBroker),
}

/// An external broker and the aggregator's credentials there.
#[derive(Clone, PartialEq, Eq)]
pub struct ExternalBroker {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for ExternalBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalBroker")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("username", &self.username)
            .field("password", &if self.password.is_empty() { "" } else { "***" })
            .finish()
    }
}

/// `[mqtt]`, validated. `Default` is `off` (for programs and tests that build a configuration
/// in code); the configuration file's default is the embedded broker on [`DEFAULT_LISTEN`].
#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub mode: MqttMode,
    /// Embedded broker: the front's address (port 0: any free port).
    pub listen: SocketAddr,
    /// Embedded broker: TLS certificate and key.
    pub tls: Option<TlsFiles>,
    /// Embedded broker: most client connections at once; over it, CONNACK 3.
    pub max_connections: usize,
    /// Embedded broker: most connections at once per credential (principal); over it, CONNACK 3.
    pub max_connections_per_client: usize,
    /// `its/v1/aggregator/{id}/status`.
    pub id: String,
    pub uplink: uplink::MqttUplinkConfig,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            mode: MqttMode::Off,
            listen: SocketAddr::from(([127, 0, 0, 1], 8472)),
            tls: None,
            // The configuration file's defaults (see there).
            max_connections: DEFAULT_MAX_CONNECTIONS as usize,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT as usize,
            id: default_id(),
            uplink: Default::default(),
        }
    }
}

/// The host name as an id (`aggregator` when there is none usable).
fn default_id() -> String {
    let host =
        std::env::var("HOSTNAME").ok().or_else(|| std::fs::read_to_string("/etc/hostname").ok()).unwrap_or_default();
    let id: String = host
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .take(64)
        .collect();
    if id.is_empty() { "aggregator".into() } else { id }
}

impl RawMqtt {
    /// The validated settings; problems are pushed to `e` with their paths.
    pub fn validate(&self, e: &mut ConfigErrors) -> MqttConfig {
        let uplink = self.uplink.validate(e);
        let mut cfg = MqttConfig { uplink, ..MqttConfig::default() };
        cfg.id = if self.id.is_empty() {
            default_id()
        } else {
            if crate::pki::validate_device_id(&self.id).is_err() {
                e.push("mqtt.id", "1 to 64 characters of A-Z, a-z, 0-9, '.', '_', '-'");
            }
            self.id.clone()
        };
        if self.max_connections == 0 || self.max_connections > MAX_CONNECTIONS_LIMIT {
            e.push("mqtt.max_connections", format!("{}: expected 1 to {MAX_CONNECTIONS_LIMIT}", self.max_connections));
        } else {
            cfg.max_connections = self.max_connections as usize;
        }
        if self.max_connections_per_client == 0 || self.max_connections_per_client > self.max_connections {
            e.push(
                "mqtt.max_connections_per_client",
                format!(
                    "{}: expected 1 to max_connections ({})",
                    self.max_connections_per_client, self.max_connections
                ),
            );
        } else {
            cfg.max_connections_per_client = self.max_connections_per_client as usize;
        }
        match self.listen.parse::<SocketAddr>() {
            Ok(a) => cfg.listen = a,
            Err(_) => e.push("mqtt.listen", format!("{:?} is not an IP:port address", self.listen)),
        }
        let set = |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
        match (set(&self.tls_cert), set(&self.tls_key)) {
            (None, None) => {}
            (Some(_), None) => e.push("mqtt.tls_key", "tls_cert is set: set tls_key to its private key (PEM) too"),
            (None, Some(_)) => {
                e.push("mqtt.tls_cert", "tls_key is set: set tls_cert to the certificate chain (PEM) too")
            }
            (Some(cert), Some(key)) => {
                let files = TlsFiles { cert, key };
                match files.load() {
                    Ok(_) => cfg.tls = Some(files),
                    Err(errs) => {
                        for err in errs {
                            e.push(format!("mqtt.{}", err.field()), err.to_string());
                        }
                    }
                }
            }
        }
        match self.mode.as_str() {
            "off" => cfg.mode = MqttMode::Off,
            "embedded" => {
                cfg.mode = MqttMode::Embedded;
                if !cfg!(feature = "embedded-mqtt") {
                    e.push(
                        "mqtt.mode",
                        "this build has no embedded broker (feature embedded-mqtt): use external or off",
                    );
                }
                if !cfg.listen.ip().is_loopback() && set(&self.tls_cert).is_none() {
                    e.push(
                        "mqtt.listen",
                        format!(
                            "{} is not a loopback address: set mqtt.tls_cert and mqtt.tls_key so that integrators' \
                             passwords travel encrypted, or listen on 127.0.0.1",
                            cfg.listen
                        ),
                    );
                }
            }
            "external" => match parse_url(&self.url) {
                Ok((host, port, tls)) => {
                    cfg.mode = MqttMode::External(ExternalBroker {
                        host,
                        port,
                        tls,
                        ca_file: set(&self.ca_file),
                        username: self.username.clone(),
                        password: self.password.clone(),
                    });
                    if self.username.is_empty() != self.password.is_empty() {
                        e.push("mqtt.password", "give both username and password, or neither");
                    }
                    if set(&self.ca_file).is_some() && !tls {
                        e.push("mqtt.ca_file", "only used with an mqtts:// url");
                    }
                }
                Err(m) => e.push("mqtt.url", m),
            },
            other => e.push("mqtt.mode", format!("{other:?}: expected \"embedded\", \"external\" or \"off\"")),
        }
        cfg
    }
}

/// `mqtt://host:port` / `mqtts://host:port` (port defaults 1883 / 8883).
fn parse_url(url: &str) -> Result<(String, u16, bool), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return Err(format!("{url:?}: expected mqtt://HOST:PORT or mqtts://HOST:PORT"));
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') || rest.contains('@') || rest.is_empty() {
        return Err(format!("{url:?}: expected mqtt://HOST:PORT (credentials go in mqtt.username/password)"));
    }
    let default_port = if tls { 8883 } else { 1883 };
    // [v6]:port, host:port, host
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, p) = v6.split_once(']').ok_or_else(|| format!("{url:?}: unclosed '['"))?;
        (h.to_owned(), p.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (rest.to_owned(), None),
        }
    };
    let port = match port {
        None => default_port,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("{url:?}: bad port"))?,
    };
    if host.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    Ok((host, port, tls))
}

/// What [`start`] started.
#[derive(Clone, Default)]
pub struct MqttHandle {
    /// The embedded broker (its front's address, its authenticators).
    #[cfg(feature = "embedded-mqtt")]
    pub broker: Option<Arc<broker::Broker>>,
    /// Where clients connect: the embedded broker's front, else `None`.
    pub listen: Option<SocketAddr>,
}

impl MqttHandle {
    /// The address third parties connect to (embedded broker only).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen
    }
}

/// Starts MQTT as configured: the embedded broker (with the integrator authenticator) and the
/// publisher that turns bus messages into MQTT messages. Their tasks go into `tasks`.
pub async fn start(
    cfg: &MqttConfig,
    db: Db,
    bus: &EventBus,
    shutdown: watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<MqttHandle> {
    match &cfg.mode {
        MqttMode::Off => Ok(MqttHandle::default()),
        MqttMode::External(ext) => {
            let options = publish::external_options(ext, &cfg.id)?;
            let publisher = publish::Publisher::new(db.clone(), cfg.id.clone());
            tasks.spawn(publisher.run(options, bus.subscribe("mqtt-publish"), shutdown));
            tracing::info!(host = %ext.host, port = ext.port, tls = ext.tls, "publishing MQTT to an external broker");
            Ok(MqttHandle::default())
        }
        #[cfg(feature = "embedded-mqtt")]
        MqttMode::Embedded => {
            let limits = broker::Limits {
                total: cfg.max_connections,
                per_principal: cfg.max_connections_per_client,
                persistent_per_generation: broker::MAX_PERSISTENT_SESSIONS,
            };
            let broker = broker::Broker::start(cfg.listen, cfg.tls.clone(), limits, shutdown.clone(), tasks).await?;
            broker.add_authenticator(Arc::new(credentials::IntegratorAuthenticator::new(db.clone())));
            let options = broker.internal_options(&format!("its-aggregator-{}", cfg.id));
            let publisher = publish::Publisher::new(db.clone(), cfg.id.clone());
            tasks.spawn(publisher.run(options, bus.subscribe("mqtt-publish"), shutdown));
            let listen = broker.listen;
            tracing::info!(listen = %listen, tls = cfg.tls.is_some(), "embedded MQTT broker listening");
            Ok(MqttHandle { broker: Some(broker), listen: Some(listen) })
        }
        #[cfg(not(feature = "embedded-mqtt"))]
        MqttMode::Embedded => anyhow::bail!("this build has no embedded MQTT broker (feature embedded-mqtt)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_url("mqtt://127.0.0.1:1883"), Ok(("127.0.0.1".into(), 1883, false)));
        assert_eq!(parse_url("mqtts://broker.example"), Ok(("broker.example".into(), 8883, true)));
        assert_eq!(parse_url("mqtt://[::1]:1884"), Ok(("::1".into(), 1884, false)));
        assert!(parse_url("http://x").is_err());
        assert!(parse_url("mqtt://u:p@x:1").is_err());
        assert!(parse_url("mqtt://x:0").is_err());
    }

    #[test]
    fn defaults_and_errors() {
        let mut e = ConfigErrors::default();
        let cfg = RawMqtt::default().validate(&mut e);
        assert!(e.is_empty(), "{e:?}");
        let expected = if cfg!(feature = "embedded-mqtt") { MqttMode::Embedded } else { MqttMode::Off };
        assert_eq!(cfg.mode, expected);
        assert_eq!(cfg.listen.to_string(), DEFAULT_LISTEN);

        let raw = RawMqtt { mode: "external".into(), url: "tcp://x".into(), ..RawMqtt::default() };
        let mut e = ConfigErrors::default();
        raw.validate(&mut e);
        assert!(format!("{e:?}").contains("mqtt.url"), "{e:?}");

        let raw = RawMqtt { listen: "0.0.0.0:8472".into(), mode: "bogus".into(), ..RawMqtt::default() };
        let mut e = ConfigErrors::default();
        raw.validate(&mut e);
        assert!(format!("{e:?}").contains("mqtt.mode"), "{e:?}");
        let raw = RawMqtt { listen: "0.0.0.0:8472".into(), ..RawMqtt::default() };
        let mut e = ConfigErrors::default();
        raw.validate(&mut e);
        assert!(format!("{e:?}").contains("mqtt.listen"), "{e:?}");
    }

    #[test]
    fn connection_limits() {
        let cfg = RawMqtt::default().validate(&mut ConfigErrors::default());
        assert_eq!((cfg.max_connections, cfg.max_connections_per_client), (10_000, 16));
        let raw = RawMqtt { max_connections: 3, max_connections_per_client: 2, ..RawMqtt::default() };
        let mut e = ConfigErrors::default();
        let cfg = raw.validate(&mut e);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!((cfg.max_connections, cfg.max_connections_per_client), (3, 2));
        for (total, per, paths) in [
            (0, 1, vec!["mqtt.max_connections", "mqtt.max_connections_per_client"]),
            (10, 0, vec!["mqtt.max_connections_per_client"]),
            (10, 11, vec!["mqtt.max_connections_per_client"]),
            (MAX_CONNECTIONS_LIMIT + 1, 16, vec!["mqtt.max_connections"]),
        ] {
            let raw = RawMqtt { max_connections: total, max_connections_per_client: per, ..RawMqtt::default() };
            let mut e = ConfigErrors::default();
            raw.validate(&mut e);
            let got: Vec<&str> = e.issues.iter().map(|i| i.path.as_str()).collect();
            assert_eq!(got, paths, "{total} {per}");
        }
    }
}
