//! MQTT transport of the uplink, for sites where UDP (so QUIC) is blocked: the same uplink
//! session and the same ack chain (the driver of `driver.rs`), carried through a broker.
//!
//! - Every frame the session sends is one MQTT message published with QoS 1 on
//!   [`up_topic`]`(device)`: the uplink session's id (8 bytes, big endian, random per session)
//!   followed by the encoded [`Frame`] (length prefix included). The aggregator's bridge answers
//!   on [`down_topic`]`(device)`, which the agent subscribes to (QoS 1) before it sends its
//!   `Hello`, with the id of the session it serves. The id replaces what a QUIC connection gives
//!   for free: frames of an earlier session (still queued somewhere when the agent started a new
//!   one) are dropped by either side, so a welcome is never taken from an older session and the
//!   bridge never commits a batch of an older session after it welcomed a newer one.
//! - The broker's PUBACK means nothing to the outbox: rows are deleted only on the aggregator's
//!   `Ack`, which the bridge publishes only after its database commit.
//! - The device is the MQTT username (and client id): the broker's ACL ties the username to the
//!   topics `its/uplink/{username}/...` (Mosquitto: `pattern write its/uplink/%u/up` and
//!   `pattern read its/uplink/%u/down`), so a device can neither write as another nor read
//!   another's acknowledgements. See `docs/mqtt-uplink.md`.
//! - The MQTT session is clean (not persistent): reliability comes from the uplink session
//!   (go-back-N resends, the aggregator's dedupe on `(device, seq)`), and a persistent session
//!   would only replay stale frames of an earlier uplink session. Every (re)connect subscribes
//!   again and starts a new uplink session with a `Hello`.
//! - When the aggregator restarts while the broker connection stays up, its bridge has no session
//!   for the device and answers a frame with `Refuse` ([`NO_SESSION_REASON`]): the agent then
//!   starts a new uplink session (a new `Hello`) on the same broker connection.
//! - Snapshots are not carried over MQTT (yet): they stay in the outbox within its picture budget
//!   and are uploaded when the box uses QUIC again, or evicted (and counted) when the budget is full.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::anyhow;
use its_shared::session::Backoff;
use its_shared::wire::{self, Frame};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::driver::{EndCause, HealthFn, SessionLink, UplinkHandle};
use super::quic::UplinkConfig;
use crate::buffer::Outbox;

/// Reason of the `Refuse` the aggregator's bridge sends for a frame of a device it has no session
/// for (it restarted, or the session expired): start a new session. Same text in the aggregator.
pub const NO_SESSION_REASON: &str = "no session: send hello";

/// Largest MQTT packet either way: one maximum wire frame plus the MQTT header and topic.
pub const MAX_PACKET: usize = wire::MAX_FRAME_LEN + 1024;

/// Requests the MQTT client may queue for its connection.
const REQUEST_QUEUE: usize = 64;

pub use its_shared::wire::mqtt::{SESSION_ID_LEN, decode_message, down_topic, encode_message, up_topic};

/// How the agent reaches the broker (the session settings are those of [`UplinkConfig`]).
#[derive(Clone)]
pub struct MqttUplinkConfig {
    pub host: String,
    pub port: u16,
    /// TLS (`mqtts://`): the PEM file of the CA(s) the broker's certificate must chain to.
    pub tls_ca: Option<PathBuf>,
    /// The MQTT username: the device id (also the client id and the topics' device segment).
    pub username: String,
    pub password: String,
    /// MQTT keep-alive: a broker connection silent for 1.5 times this is dead.
    pub keep_alive: Duration,
}

impl std::fmt::Debug for MqttUplinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttUplinkConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls_ca", &self.tls_ca)
            .field("username", &self.username)
            .field("password", &"***")
            .field("keep_alive", &self.keep_alive)
            .finish()
    }
}

fn mqtt_options(m: &MqttUplinkConfig) -> anyhow::Result<MqttOptions> {
    let mut opts = MqttOptions::new(m.username.clone(), m.host.clone(), m.port);
    opts.set_credentials(m.username.clone(), m.password.clone())
        .set_clean_session(true)
        .set_keep_alive(m.keep_alive)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    if let Some(ca) = &m.tls_ca {
        let tls = its_hostio::tls::mqtt_client_config(ca)?;
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(tls))));
    }
    Ok(opts)
}

/// What the broker connection reports to the session loop.
#[derive(Debug)]
enum Link {
    /// Connected and subscribed to the down topic: a session may start.
    Up,
    /// A message on the down topic.
    Down(Vec<u8>),
    /// The broker connection failed or ended (the link task reconnects on its own).
    Lost(String),
}

/// Polls the MQTT event loop: reconnects with backoff, subscribes after every connect.
async fn run_link(
    mut eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    down: String,
    tx: mpsc::Sender<Link>,
    mut backoff: Backoff,
) {
    let mut subscribed = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                subscribed = false;
                if let Err(e) = client.try_subscribe(down.clone(), QoS::AtLeastOnce) {
                    tracing::warn!(error = %e, "queueing the subscription failed");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let granted = ack.return_codes.iter().all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_)));
                if !granted {
                    // The broker's ACL does not let this username read its down topic.
                    let _ = tx.send(Link::Lost(format!("subscription to {down} refused"))).await;
                    tokio::time::sleep(backoff.next_delay(rand::random::<f64>())).await;
                    let _ = client.try_subscribe(down.clone(), QoS::AtLeastOnce);
                    continue;
                }
                if !subscribed {
                    subscribed = true;
                    if tx.send(Link::Up).await.is_err() {
                        return;
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == down => {
                if tx.send(Link::Down(p.payload.to_vec())).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                subscribed = false;
                if tx.send(Link::Lost(e.to_string())).await.is_err() {
                    return;
                }
                tokio::time::sleep(backoff.next_delay(rand::random::<f64>())).await;
            }
        }
    }
}

/// Runs until `shutdown` turns true. Network trouble never ends it: it reconnects.
pub async fn run_mqtt_uplink(
    cfg: UplinkConfig,
    mqtt: MqttUplinkConfig,
    outbox: Arc<Outbox>,
    handle: Arc<UplinkHandle>,
    health: HealthFn,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let device = mqtt.username.clone();
    let (up, down) = (up_topic(&device), down_topic(&device));
    let opts = mqtt_options(&mqtt)?;
    let (client, eventloop) = AsyncClient::new(opts, REQUEST_QUEUE);
    let (tx, events) = mpsc::channel(256);
    let jitter = if cfg.jitter { 0.5 } else { 0.0 };
    let link_task = tokio::spawn(run_link(
        eventloop,
        client.clone(),
        down,
        tx,
        Backoff::new(cfg.backoff_base, cfg.backoff_cap, jitter),
    ));
    let _link_task = AbortOnDrop(link_task);
    tracing::info!(broker = %format!("{}:{}", mqtt.host, mqtt.port), tls = mqtt.tls_ca.is_some(), device = %device, "MQTT uplink starting");

    let mut driver = cfg.driver(outbox, handle.clone(), health);
    let mut link =
        BrokerLink { client, up, events, handle, link_up: false, session_id: 0, buf: Vec::with_capacity(256 * 1024) };
    // Delays between uplink sessions on one broker connection (refused, or no progress).
    let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_cap, jitter);
    // When a new session may start after one ended on this connection.
    let mut restart_at: Option<Instant> = None;
    loop {
        if link.link_up && restart_at.is_none_or(|t| Instant::now() >= t) {
            restart_at = None;
            link.session_id = rand::random::<u64>();
            let end = driver.run_session(&mut link, &mut shutdown).await;
            if end.welcomed {
                backoff.reset();
            }
            match end.cause {
                EndCause::Shutdown => return Ok(()),
                EndCause::Failed(e) => {
                    tracing::warn!(reason = %format!("{e:#}"), "MQTT uplink session ended");
                    restart_at = Some(Instant::now() + backoff.next_delay(rand::random::<f64>()));
                }
                // The broker connection is gone: the next session starts when it is back.
                EndCause::Lost(reason) => tracing::warn!(%reason, "MQTT uplink session ended"),
                EndCause::Broken(e) => return Err(e),
            }
            continue;
        }
        let deadline = restart_at.filter(|_| link.link_up);
        tokio::select! {
            ev = link.next(false) => match ev {
                Some(Err(EndCause::Broken(e))) => return Err(e),
                Some(Err(_)) => restart_at = None,
                Some(Ok(_)) | None => {}
            },
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {}
            _ = shutdown.changed() => {
                link.close().await;
                return Ok(());
            }
        }
    }
}

/// The broker connection as the link of the uplink sessions it carries, one at a time.
struct BrokerLink {
    client: AsyncClient,
    /// The device's up topic.
    up: String,
    /// What the link task reports.
    events: mpsc::Receiver<Link>,
    handle: Arc<UplinkHandle>,
    /// Connected to the broker and subscribed to the down topic.
    link_up: bool,
    /// Id of the running (or last) uplink session.
    session_id: u64,
    buf: Vec<u8>,
}

impl BrokerLink {
    /// Takes one report of the link task: a frame of the running session (`active`), why no
    /// session can run on the link now, or nothing to act on.
    async fn next(&mut self, active: bool) -> Option<Result<Frame, EndCause>> {
        match self.events.recv().await {
            Some(Link::Up) => {
                tracing::info!("MQTT uplink connected to the broker");
                self.link_up = true;
                None
            }
            Some(Link::Down(bytes)) => match decode_message(&bytes) {
                Ok((id, frame)) if active && id == self.session_id => Some(Ok(frame)),
                Ok((_, frame)) => {
                    tracing::debug!(frame = frame.name(), "frame of another session: ignored");
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "malformed message from the aggregator: dropped");
                    None
                }
            },
            Some(Link::Lost(reason)) => {
                if self.link_up || active {
                    tracing::warn!(%reason, "MQTT uplink lost the broker");
                } else {
                    tracing::warn!(%reason, "MQTT uplink cannot reach the broker");
                }
                self.link_up = false;
                Some(Err(EndCause::Lost(reason)))
            }
            None => Some(Err(EndCause::Broken(anyhow!("the MQTT link task stopped")))),
        }
    }
}

impl SessionLink for BrokerLink {
    const NAME: &'static str = "MQTT uplink";

    async fn send(&mut self, frame: &Frame) -> Result<(), EndCause> {
        encode_message(self.session_id, frame, &mut self.buf).map_err(|e| EndCause::Broken(e.into()))?;
        // A full queue is a link in trouble: the frame is lost like on a broken link, and the
        // session's timeouts send it again.
        if self.client.try_publish(self.up.as_str(), QoS::AtLeastOnce, false, self.buf.as_slice()).is_err() {
            tracing::debug!(frame = frame.name(), "MQTT request queue full: frame dropped");
        }
        Ok(())
    }

    async fn recv(&mut self) -> Result<Frame, EndCause> {
        loop {
            if let Some(next) = self.next(true).await {
                return next;
            }
        }
    }

    fn welcomed(&mut self) {
        self.handle.connected.store(true, Ordering::Relaxed);
    }

    async fn close(&mut self) {
        self.handle.connected.store(false, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_millis(200), self.client.disconnect()).await;
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_appears_in_debug_output() {
        let cfg = MqttUplinkConfig {
            host: "h".into(),
            port: 1,
            tls_ca: None,
            username: "box-1".into(),
            password: "hunter2".into(),
            keep_alive: Duration::from_secs(30),
        };
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }
}
