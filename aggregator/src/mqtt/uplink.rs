//! The aggregator's side of the agents' MQTT uplink (agents at sites where UDP is blocked): a
//! bridge that is one MQTT client of the broker, subscribed to `its/uplink/+/up`.
//!
//! Each message on `its/uplink/{device}/up` is one frame of that device's uplink session: the
//! session's id (8 bytes, big endian, chosen by the agent for each session) followed by one
//! encoded wire frame ([`decode_message`]). The bridge answers with the id of the session it
//! serves, and drops frames of any other session of the device: with no connection to delimit a
//! session (as QUIC has), the id is what keeps a frame of an earlier session, still queued in the
//! broker or the agent's client, from being committed after a newer session was welcomed, and a
//! stale welcome from being taken as the answer to a newer `Hello`.
//!
//! The device identity is the topic's device segment, which the broker's ACL ties to the device's
//! credential (Mosquitto: `pattern write its/uplink/%u/up`, `pattern read its/uplink/%u/down`; the
//! bridge's own user gets `topic readwrite its/uplink/#`; see `docs/mqtt-uplink.md`). Nothing in
//! the payload can change it.
//!
//! The ack chain is the QUIC one: one [`IngestSession`] per device decides what to commit; the
//! bridge commits through [`ingest::commit_batch`] and only then publishes the session's frames
//! (`Ack`, ...) on `its/uplink/{device}/down`, QoS 1. The broker's PUBACK to the agent means
//! nothing for deletion. Specific to MQTT:
//! - A `Hello` always starts a new session for its device (the agent reconnected or restarted its
//!   session). Any other frame of a device without a session (this aggregator restarted, or the
//!   session expired) is answered with `Refuse` ([`NO_SESSION_REASON`], at most once a second per
//!   device): the agent then sends a new `Hello` on the same broker connection. A frame of another
//!   session than the current one is dropped (counted as `stale`).
//! - QoS 1 may deliver a message twice or, across reconnects, out of order: the session drops a
//!   batch whose `after` it has not reached (the agent resends), filters events below its
//!   watermark, and storage dedupes on `(device, seq)` in any case.
//! - A message that is not a frame, a frame the session refuses, or a topic that names no valid
//!   device is counted (`its_mqtt_uplink_dropped_total{reason}`), logged and dropped; a protocol
//!   error ends that device's session (`Refuse` with the reason), never the bridge.
//! - Each device's frames are handled in order by a task of its own (devices do not wait for each
//!   other's commits); a device silent for `session_idle_s` loses its task and session. A
//!   device's queue holds [`DEVICE_QUEUE`] frames: beyond that (a storage stall) frames are
//!   dropped and counted, and the agent's resends bring them again.
//! - Snapshots are not carried over MQTT (the agent keeps them in its outbox).
//! - A device disabled while its session runs loses it within about a second: the bridge reads
//!   the disabled devices every second, refuses the next frame of such a device with
//!   `device disabled` and drops its session, as the QUIC ingest closes its connection. (The
//!   broker connection itself belongs to the broker: take the device's broker credential away
//!   too, or it can keep publishing frames that are refused.)
//!
//! The bridge's MQTT session is clean: what arrives while the aggregator is down is lost, which the
//! agents' resends repair. Every (re)connect subscribes again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use its_shared::config::ConfigErrors;
use its_shared::session::{Backoff, IngestAction, IngestSession};
use its_shared::wire::{self, Frame, WireError};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::bus::{BusMessage, EventBus};
use crate::ingest;
use crate::store::{EventStore, Fleet};
use crate::telemetry::mqtt::UPLINK_DROPPED;
use crate::unix_ms;

/// Reason of the `Refuse` for a frame of a device without a session: the agent sends a new
/// `Hello`. The agent (`its_agent::uplink::mqtt::NO_SESSION_REASON`) compares the same text.
pub const NO_SESSION_REASON: &str = "no session: send hello";
/// Why a disabled device's `Hello` is refused (as over QUIC).
const DEVICE_DISABLED_REASON: &str = "device disabled";
/// The bridge's subscription.
pub const UP_FILTER: &str = "its/uplink/+/up";
/// Largest MQTT packet either way: one maximum wire frame plus the MQTT header and topic.
pub const MAX_PACKET: usize = wire::MAX_FRAME_LEN + 1024;
/// Frames one device may have waiting for its task. The agent keeps `window_batches` (4 by
/// default) batches unacknowledged, plus a heartbeat or two.
pub const DEVICE_QUEUE: usize = 32;

pub use its_shared::wire::mqtt::{SESSION_ID_LEN, decode_message, down_topic};

/// One MQTT message of the uplink ([`its_shared::wire::mqtt`]): the session id, then the frame.
pub fn encode_message(session: u64, frame: &Frame) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    its_shared::wire::mqtt::encode_message(session, frame, &mut out)?;
    Ok(out)
}

/// The device of an `its/uplink/{device}/up` topic, when it is one and names a valid device id.
pub fn device_of(topic: &str) -> Option<&str> {
    let device = its_shared::wire::mqtt::device_of_up_topic(topic)?;
    crate::pki::validate_device_id(device).ok()?;
    Some(device)
}

/// `[mqtt.uplink]` as written in the configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawMqttUplink {
    /// Run the bridge (off by default: only sites whose agents use `transport = "mqtt"` need it).
    pub enabled: bool,
    /// `mqtt://host[:1883]` or `mqtts://host[:8883]` (required when enabled: the embedded broker
    /// does not let devices publish, so the uplink needs a broker such as Mosquitto).
    pub broker: String,
    /// The bridge's broker user; the ACL must let it read `its/uplink/+/up` and write
    /// `its/uplink/+/down`.
    pub username: String,
    /// Its password, or better `password_file` (one of the two; both empty: no credentials).
    pub password: String,
    pub password_file: PathBuf,
    /// PEM CA certificate(s) of the broker's certificate (`mqtts://` only).
    pub ca: PathBuf,
    /// MQTT client id; empty: `its-aggregator-uplink-{pid}` (unique per process).
    pub client_id: String,
    /// A device silent for this many seconds loses its session (agents send heartbeats every
    /// 15 s by default, so only a gone agent expires); its next frame is refused and it starts a
    /// new one.
    pub session_idle_s: u64,
    /// MQTT keep-alive in seconds.
    pub keep_alive_s: u64,
}

impl Default for RawMqttUplink {
    fn default() -> Self {
        Self {
            enabled: false,
            broker: String::new(),
            username: "its-aggregator".into(),
            password: String::new(),
            password_file: PathBuf::new(),
            ca: PathBuf::new(),
            client_id: String::new(),
            session_idle_s: 300,
            keep_alive_s: 15,
        }
    }
}

/// `[mqtt.uplink]`, validated.
#[derive(Clone, Default)]
pub struct MqttUplinkConfig {
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    /// `mqtts://`: the CA file.
    pub tls_ca: Option<PathBuf>,
    /// User and password (none when the username is empty).
    pub credentials: Option<(String, String)>,
    pub client_id: String,
    pub session_idle: Duration,
    pub keep_alive: Duration,
}

impl std::fmt::Debug for MqttUplinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttUplinkConfig")
            .field("enabled", &self.enabled)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls_ca", &self.tls_ca)
            .field("username", &self.credentials.as_ref().map(|(u, _)| u))
            .field("client_id", &self.client_id)
            .field("session_idle", &self.session_idle)
            .field("keep_alive", &self.keep_alive)
            .finish()
    }
}

impl RawMqttUplink {
    /// The validated settings; problems are pushed to `e` with their paths. Only an enabled
    /// bridge has its files read.
    pub fn validate(&self, e: &mut ConfigErrors) -> MqttUplinkConfig {
        const P: &str = "mqtt.uplink";
        let broker = self.broker.as_str();
        let (mut host, mut port, mut tls) = (String::new(), 0, false);
        match url::Url::parse(broker) {
            _ if broker.is_empty() => e.check(!self.enabled, &format!("{P}.broker"), || {
                "required when enabled: the URL of a broker that lets devices publish (e.g. Mosquitto); the embedded broker does not".into()
            }),
            Ok(u) if matches!(u.scheme(), "mqtt" | "mqtts") && u.host_str().is_some_and(|h| !h.is_empty()) => {
                tls = u.scheme() == "mqtts";
                let bare = (u.path().is_empty() || u.path() == "/")
                    && u.query().is_none()
                    && u.username().is_empty()
                    && u.password().is_none();
                e.check(bare, &format!("{P}.broker"), || {
                    "must be mqtt://host[:port] or mqtts://host[:port], without path, query or credentials".into()
                });
                host = u.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
                port = u.port().unwrap_or(if tls { 8883 } else { 1883 });
            }
            _ => e.push(format!("{P}.broker"), format!("{broker:?} is not mqtt://host[:port] or mqtts://host[:port]")),
        }
        e.check((1..=86_400).contains(&self.session_idle_s), &format!("{P}.session_idle_s"), || {
            format!("{} is outside 1..=86400", self.session_idle_s)
        });
        e.check((1..=3600).contains(&self.keep_alive_s), &format!("{P}.keep_alive_s"), || {
            format!("{} is outside 1..=3600", self.keep_alive_s)
        });
        e.check(
            self.client_id.len() <= 128 && !self.client_id.contains(['+', '#', '/']),
            &format!("{P}.client_id"),
            || "must be at most 128 characters without '+', '#' or '/'".into(),
        );
        let file_set = !self.password_file.as_os_str().is_empty();
        e.check(self.password.is_empty() || !file_set, &format!("{P}.password"), || {
            "set password or password_file, not both".into()
        });
        e.check(self.username.is_empty() <= (self.password.is_empty() && !file_set), &format!("{P}.password"), || {
            "a password needs a username".into()
        });
        let mut password = self.password.clone();
        if self.enabled && file_set {
            match std::fs::read_to_string(&self.password_file) {
                Ok(p) if !p.trim().is_empty() => password = p.trim().to_string(),
                Ok(_) => e.push(format!("{P}.password_file"), format!("{} is empty", self.password_file.display())),
                Err(err) => e.push(format!("{P}.password_file"), format!("{}: {err}", self.password_file.display())),
            }
        }
        let ca_set = !self.ca.as_os_str().is_empty();
        if tls {
            e.check(ca_set, &format!("{P}.ca"), || "an mqtts:// broker needs the CA of its certificate".into());
            if self.enabled && ca_set && !self.ca.is_file() {
                e.push(format!("{P}.ca"), format!("{} is missing", self.ca.display()));
            }
        } else {
            e.check(!ca_set, &format!("{P}.ca"), || "set only with an mqtts:// broker".into());
        }
        MqttUplinkConfig {
            enabled: self.enabled,
            host,
            port,
            tls_ca: tls.then(|| self.ca.clone()),
            credentials: (!self.username.is_empty()).then(|| (self.username.clone(), password)),
            client_id: if self.client_id.is_empty() {
                format!("its-aggregator-uplink-{}", std::process::id())
            } else {
                self.client_id.clone()
            },
            session_idle: Duration::from_secs(self.session_idle_s),
            keep_alive: Duration::from_secs(self.keep_alive_s),
        }
    }
}

fn mqtt_options(cfg: &MqttUplinkConfig) -> anyhow::Result<MqttOptions> {
    let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_clean_session(true).set_keep_alive(cfg.keep_alive).set_max_packet_size(MAX_PACKET, MAX_PACKET);
    if let Some((user, password)) = &cfg.credentials {
        opts.set_credentials(user.clone(), password.clone());
    }
    if let Some(ca) = &cfg.tls_ca {
        let tls = its_hostio::tls::mqtt_client_config(ca)?;
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(tls))));
    }
    Ok(opts)
}

fn dropped(reason: &'static str) {
    metrics::counter!(UPLINK_DROPPED, "reason" => reason).increment(1);
}

/// What a device's task works with.
#[derive(Clone)]
struct Shared {
    client: AsyncClient,
    store: Arc<dyn EventStore>,
    fleet: Fleet,
    bus: EventBus,
    idle: Duration,
    /// The devices disabled now (read every second).
    disabled: Arc<std::sync::RwLock<std::collections::HashSet<String>>>,
}

impl Shared {
    fn is_disabled(&self, device: &str) -> bool {
        self.disabled.read().unwrap_or_else(|p| p.into_inner()).contains(device)
    }
}

/// Reads the disabled devices every second into `shared.disabled` until dropped.
async fn watch_disabled(shared: Shared) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match shared.fleet.disabled_devices().await {
            Ok(list) => *shared.disabled.write().unwrap_or_else(|p| p.into_inner()) = list.into_iter().collect(),
            Err(e) => tracing::warn!(error = %e, "MQTT uplink: reading the disabled devices failed"),
        }
    }
}

/// Runs the bridge until `shutdown`. Broker trouble never ends it: it reconnects.
pub async fn run(
    cfg: MqttUplinkConfig,
    store: Arc<dyn EventStore>,
    bus: EventBus,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let opts = mqtt_options(&cfg)?;
    let (client, eventloop) = AsyncClient::new(opts, 1024);
    let shared = Shared {
        client: client.clone(),
        fleet: Fleet::new(store.db()),
        store,
        bus,
        idle: cfg.session_idle,
        disabled: Arc::default(),
    };
    let watcher = tokio::spawn(watch_disabled(shared.clone()));
    let _watcher = AbortOnDrop(watcher);
    tracing::info!(broker = %format!("{}:{}", cfg.host, cfg.port), tls = cfg.tls_ca.is_some(), client_id = %cfg.client_id, "MQTT uplink bridge starting");
    tokio::select! {
        () = bridge(eventloop, shared) => Ok(()),
        _ = shutdown.changed() => {
            let _ = tokio::time::timeout(Duration::from_millis(200), client.disconnect()).await;
            Ok(())
        }
    }
}

async fn bridge(mut eventloop: rumqttc::EventLoop, shared: Shared) {
    let mut devices: HashMap<String, mpsc::Sender<bytes::Bytes>> = HashMap::new();
    // One connection, usually to a nearby broker: retry often, agents wait on it.
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 0.5);
    let mut last_sweep = Instant::now();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                tracing::info!("MQTT uplink bridge connected to the broker");
                if let Err(e) = shared.client.try_subscribe(UP_FILTER, QoS::AtLeastOnce) {
                    tracing::error!(error = %e, "queueing the uplink subscription failed");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                    tracing::error!(filter = UP_FILTER, "the broker refused the bridge's subscription (check its ACL)");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => dispatch(&mut devices, &shared, &p.topic, p.payload),
            Ok(_) => {}
            Err(e) => {
                let delay = backoff.next_delay(rand::random::<f64>());
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "MQTT uplink bridge lost the broker");
                tokio::time::sleep(delay).await;
            }
        }
        if last_sweep.elapsed() >= Duration::from_secs(10) {
            last_sweep = Instant::now();
            devices.retain(|_, tx| !tx.is_closed());
        }
    }
}

/// Hands a message to its device's task (started if it has none).
fn dispatch(
    devices: &mut HashMap<String, mpsc::Sender<bytes::Bytes>>,
    shared: &Shared,
    topic: &str,
    payload: bytes::Bytes,
) {
    let Some(device) = device_of(topic) else {
        dropped("topic");
        tracing::warn!(topic, "message on an uplink topic that names no device: dropped");
        return;
    };
    let payload = match devices.get(device) {
        Some(tx) => match tx.try_send(payload) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => {
                dropped("busy");
                tracing::debug!(device, "device queue full: frame dropped (the agent resends)");
                return;
            }
            // The task expired: a new one takes over (the old one has finished).
            Err(mpsc::error::TrySendError::Closed(p)) => p,
        },
        None => payload,
    };
    let (tx, rx) = mpsc::channel(DEVICE_QUEUE);
    if tx.try_send(payload).is_err() {
        return; // cannot happen: a new channel with room
    }
    devices.insert(device.to_owned(), tx);
    tokio::spawn(device_task(device.to_owned(), rx, shared.clone()));
}

/// One device's uplink: its frames in order, its session, until it has been idle for a while.
async fn device_task(device: String, mut rx: mpsc::Receiver<bytes::Bytes>, shared: Shared) {
    let down = down_topic(&device);
    // The current session and its id.
    let mut session: Option<(u64, IngestSession)> = None;
    let mut last_refusal: Option<Instant> = None;
    let mut online = false;
    loop {
        let payload = tokio::select! {
            p = rx.recv() => p,
            _ = tokio::time::sleep(shared.idle) => None,
        };
        let Some(payload) = payload else { break };
        let (id, frame) = match decode_message(&payload) {
            Ok(m) => m,
            Err(e) => {
                dropped("malformed");
                tracing::warn!(device, error = %e, bytes = payload.len(), "malformed uplink message: dropped");
                continue;
            }
        };
        drop(payload);
        if matches!(frame, Frame::Hello(_)) {
            if let Some((_, old)) = session.replace((id, IngestSession::new())) {
                crate::telemetry::session_closed(&old.stats());
            }
        } else if session.is_none() {
            dropped("no_session");
            if last_refusal.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                last_refusal = Some(Instant::now());
                publish(&shared.client, &down, id, &Frame::Refuse { reason: NO_SESSION_REASON.into() }).await;
            }
            continue;
        }
        let Some((current, s)) = session.as_mut() else { continue };
        if id != *current {
            dropped("stale");
            tracing::debug!(device, frame = frame.name(), "frame of an earlier session: dropped");
            continue;
        }
        let current = *current;
        if shared.is_disabled(&device) {
            crate::telemetry::disabled_device_refused("live");
            tracing::info!(device, "MQTT uplink: the device is disabled; its session ends");
            if let Some((_, old)) = session.take() {
                crate::telemetry::session_closed(&old.stats());
            }
            publish(&shared.client, &down, current, &Frame::Refuse { reason: DEVICE_DISABLED_REASON.into() }).await;
            continue;
        }
        match handle(&device, s, frame, &shared).await {
            Ok(()) => {
                while let Some(f) = s.poll_transmit() {
                    if !online && matches!(f, Frame::Ack(_)) {
                        online = true;
                        shared.bus.publish(BusMessage::DeviceStatus {
                            device: device.clone(),
                            online: true,
                            at_ms: unix_ms(),
                        });
                    }
                    publish(&shared.client, &down, current, &f).await;
                }
            }
            Err(Ended::Refused(reason)) => {
                if let Some((_, old)) = session.take() {
                    crate::telemetry::session_closed(&old.stats());
                }
                publish(&shared.client, &down, current, &Frame::Refuse { reason }).await;
            }
        }
    }
    if let Some((_, old)) = session.take() {
        crate::telemetry::session_closed(&old.stats());
    }
    if online {
        shared.bus.publish(BusMessage::DeviceStatus { device, online: false, at_ms: unix_ms() });
    }
}

/// Why a device's session ended; the reason is sent to the agent.
enum Ended {
    Refused(String),
}

/// Acts on one frame: commits, stores, and leaves the answers in the session's queue.
async fn handle(device: &str, s: &mut IngestSession, frame: Frame, shared: &Shared) -> Result<(), Ended> {
    let store = shared.store.as_ref();
    let action = s.handle_frame(frame).map_err(|e| {
        if matches!(e, its_shared::session::IngestError::BadHello(_)) {
            crate::telemetry::hello_refused();
        }
        dropped("protocol");
        tracing::warn!(device, error = %e, "uplink protocol error: session ended");
        Ended::Refused(e.to_string())
    })?;
    let storage = |e: anyhow::Error| {
        tracing::warn!(device, error = %format!("{e:#}"), "storing uplink data failed: session ended");
        Ended::Refused(format!("storage error: {e:#}"))
    };
    match action {
        Some(IngestAction::LoadHighWater(hello)) => {
            if shared.fleet.is_device_disabled(device).await.map_err(|e| storage(e.into()))? {
                crate::telemetry::disabled_device_refused("connect");
                return Err(Ended::Refused(DEVICE_DISABLED_REASON.into()));
            }
            let hw = store.record_hello(device, &hello, unix_ms()).await.map_err(|e| storage(e.into()))?;
            tracing::info!(device, high_water = hw, agent_acked = hello.last_acked_seq, version = %hello.agent_version, "MQTT uplink session ready");
            s.handle_high_water(hw);
        }
        Some(IngestAction::Commit { events, up_to }) => {
            ingest::commit_batch(store, &shared.bus, device, events).await.map_err(storage)?;
            s.handle_committed(up_to);
        }
        Some(IngestAction::Health(hb)) => {
            ingest::record_health(store, &shared.bus, device, &hb).await.map_err(storage)?
        }
        None => crate::telemetry::batch_out_of_order(),
    }
    Ok(())
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Publishes one frame of session `id` to a device (QoS 1). A failure is logged: the agent's
/// timeouts recover.
async fn publish(client: &AsyncClient, topic: &str, id: u64, frame: &Frame) {
    match encode_message(id, frame) {
        Ok(bytes) => {
            if let Err(e) = client.publish(topic, QoS::AtLeastOnce, false, bytes).await {
                tracing::warn!(topic, error = %e, "publishing to the agent failed");
            }
        }
        Err(e) => tracing::error!(topic, error = %e, "encoding a frame failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_up_topics_of_valid_devices_name_a_device() {
        assert_eq!(device_of("its/uplink/box-1/up"), Some("box-1"));
        for bad in
            ["its/uplink/box-1/down", "its/uplink//up", "its/uplink/a b/up", "x/its/uplink/a/up", "its/uplink/a/b/up"]
        {
            assert_eq!(device_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn messages_are_the_session_id_then_one_frame() {
        let frame = Frame::Refuse { reason: NO_SESSION_REASON.into() };
        let bytes = encode_message(42, &frame).expect("encode");
        assert_eq!(&bytes[..SESSION_ID_LEN], &42u64.to_be_bytes());
        assert_eq!(decode_message(&bytes).expect("decode"), (42, frame));
        assert!(decode_message(&bytes[..3]).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode_message(&trailing).is_err());
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let raw = RawMqttUplink {
            enabled: true,
            broker: "mqtts://broker.example/path".into(),
            password: "x".into(),
            password_file: "/nonexistent/pw".into(),
            session_idle_s: 0,
            keep_alive_s: 0,
            client_id: "a/b".into(),
            ..RawMqttUplink::default()
        };
        let mut e = ConfigErrors::new("test");
        let _ = raw.validate(&mut e);
        let paths: Vec<&str> = e.issues.iter().map(|i| i.path.as_str()).collect();
        for want in [
            "mqtt.uplink.broker",
            "mqtt.uplink.session_idle_s",
            "mqtt.uplink.keep_alive_s",
            "mqtt.uplink.client_id",
            "mqtt.uplink.password",
            "mqtt.uplink.password_file",
            "mqtt.uplink.ca",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
    }

    #[test]
    fn the_defaults_are_valid_and_off() {
        let mut e = ConfigErrors::new("test");
        let cfg = RawMqttUplink::default().validate(&mut e);
        assert!(e.is_empty(), "{e}");
        assert!(!cfg.enabled);
        let mut e = ConfigErrors::new("test");
        let _ = RawMqttUplink { enabled: true, ..RawMqttUplink::default() }.validate(&mut e);
        assert_eq!(e.issues.iter().map(|i| i.path.as_str()).collect::<Vec<_>>(), vec!["mqtt.uplink.broker"]);
        let mut e = ConfigErrors::new("test");
        let cfg =
            RawMqttUplink { enabled: true, broker: "mqtt://[::1]".into(), ..RawMqttUplink::default() }.validate(&mut e);
        assert!(e.is_empty(), "{e}");
        assert_eq!((cfg.host.as_str(), cfg.port, cfg.tls_ca.is_none()), ("::1", 1883, true));
        let mut e = ConfigErrors::new("test");
        let cfg = RawMqttUplink { password: "hunter2".into(), ..RawMqttUplink::default() }.validate(&mut e);
        assert!(e.is_empty(), "{e}");
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }
}
