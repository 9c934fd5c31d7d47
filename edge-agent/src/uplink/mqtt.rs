//! MQTT transport of the uplink, for sites where UDP (so QUIC) is blocked: the same
//! [`AgentSession`] and the same ack chain, carried through a broker.
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

use crate::unix_ms;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, anyhow};
use its_shared::session::{AgentEvent, AgentSession, Backoff};
use its_shared::wire::{self, Hello};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::quic::{HealthFn, UplinkConfig, UplinkHandle};
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

/// The TLS client configuration: trusts only the CA(s) in `ca`.
fn tls_config(ca: &std::path::Path) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))? {
        let cert = cert.with_context(|| format!("reading {}", ca.display()))?;
        roots.add(cert).with_context(|| format!("{}: unusable CA certificate", ca.display()))?;
    }
    if roots.is_empty() {
        anyhow::bail!("{}: no certificate in file", ca.display());
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("TLS configuration: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn mqtt_options(m: &MqttUplinkConfig) -> anyhow::Result<MqttOptions> {
    let mut opts = MqttOptions::new(m.username.clone(), m.host.clone(), m.port);
    opts.set_credentials(m.username.clone(), m.password.clone())
        .set_clean_session(true)
        .set_keep_alive(m.keep_alive)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    if let Some(ca) = &m.tls_ca {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(tls_config(ca)?))));
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
    let (tx, mut link) = mpsc::channel(256);
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

    let mut session = AgentSession::new(cfg.session.clone(), outbox.stats().acked);
    // Delays between uplink sessions on one broker connection (refused, or no progress).
    let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_cap, jitter);
    let mut link_up = false;
    // An uplink session is running (Hello sent, not yet ended).
    let mut active = false;
    let mut welcomed = false;
    // Id of the running (or last) uplink session.
    let mut session_id: u64 = 0;
    // When a new session may start after one ended on this connection.
    let mut restart_at: Option<Instant> = None;
    let mut buf = Vec::with_capacity(256 * 1024);
    loop {
        if link_up && !active && restart_at.is_none_or(|t| Instant::now() >= t) {
            restart_at = None;
            active = true;
            welcomed = false;
            session_id = rand::random::<u64>();
            start_session(&cfg, &mut session, &outbox);
        }
        while let Some(frame) = session.poll_transmit() {
            encode_message(session_id, &frame, &mut buf)?;
            // A full queue is a link in trouble: the frame is lost like on a broken link, and the
            // session's timeouts send it again.
            if client.try_publish(up.as_str(), QoS::AtLeastOnce, false, buf.as_slice()).is_err() {
                tracing::debug!(frame = frame.name(), "MQTT request queue full: frame dropped");
            }
        }
        let mut end: Option<String> = None;
        while let Some(ev) = session.poll_event() {
            match ev {
                AgentEvent::Acked(up_to) => {
                    let ob = outbox.clone();
                    let outcome = tokio::task::spawn_blocking(move || ob.ack(up_to)).await??;
                    if outcome.renumbered > 0 {
                        tracing::warn!(
                            aggregator_has = up_to,
                            renumbered = outcome.renumbered,
                            "the aggregator holds more events than this outbox ever assigned (outbox reset?): renumbered pending events after it"
                        );
                    }
                    handle.acked.store(up_to, Ordering::Relaxed);
                }
                AgentEvent::HeartbeatDue => session.send_heartbeat(Instant::now().into_std(), unix_ms(), health()),
                AgentEvent::LinkDead => end = Some("no acknowledgement through repeated resends".into()),
                AgentEvent::Refused(reason) => end = Some(format!("aggregator refused the session: {reason}")),
                // Snapshots do not travel over MQTT; nothing was uploaded to confirm.
                AgentEvent::SnapshotStored(_) => {}
            }
        }
        if let Some(reason) = end.filter(|_| active) {
            end_session(&mut session, &handle, welcomed, &reason);
            active = false;
            restart_at = Some(Instant::now() + backoff.next_delay(rand::random::<f64>()));
            continue;
        }
        if active && !welcomed && session.is_streaming() {
            welcomed = true;
            backoff.reset();
            handle.connected.store(true, Ordering::Relaxed);
            outbox.welcome(session.acked());
            tracing::info!(acked = session.acked(), "MQTT uplink session ready");
        }
        if let Some(req) = session.poll_batch_request() {
            let ob = outbox.clone();
            // Reading for send puts the rows in "limbo" atomically with the read (see quic.rs).
            let events = tokio::task::spawn_blocking(move || ob.read_for_send(req.after, req.max_events)).await??;
            session.handle_batch_loaded(Instant::now().into_std(), req, events);
            continue;
        }
        handle.resends.store(session.stats().resends, Ordering::Relaxed);
        let deadline = match (session.poll_timeout().map(Instant::from_std), restart_at.filter(|_| link_up)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            ev = link.recv() => match ev {
                Some(Link::Up) => {
                    tracing::info!("MQTT uplink connected to the broker");
                    link_up = true;
                }
                Some(Link::Down(bytes)) => match decode_message(&bytes) {
                    Ok((id, frame)) if active && id == session_id => session.handle_frame(frame),
                    Ok((_, frame)) => tracing::debug!(frame = frame.name(), "frame of another session: ignored"),
                    Err(e) => tracing::warn!(error = %e, "malformed message from the aggregator: dropped"),
                },
                Some(Link::Lost(reason)) => {
                    if link_up || active {
                        tracing::warn!(%reason, "MQTT uplink lost the broker");
                    } else {
                        tracing::warn!(%reason, "MQTT uplink cannot reach the broker");
                    }
                    link_up = false;
                    if active {
                        end_session(&mut session, &handle, welcomed, &reason);
                        active = false;
                    }
                    restart_at = None;
                }
                None => return Err(anyhow!("the MQTT link task stopped")),
            },
            _ = handle.appended.notified() => session.handle_outbox_appended(),
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                session.handle_timeout(Instant::now().into_std());
            }
            _ = shutdown.changed() => {
                handle.connected.store(false, Ordering::Relaxed);
                let _ = tokio::time::timeout(Duration::from_millis(200), client.disconnect()).await;
                return Ok(());
            }
        }
    }
}

fn start_session(cfg: &UplinkConfig, session: &mut AgentSession, outbox: &Outbox) {
    let stats = outbox.stats();
    session.handle_connected(
        Instant::now().into_std(),
        Hello {
            agent_version: cfg.agent_version.clone(),
            model: cfg.model.clone(),
            cameras: cfg.cameras.clone(),
            last_acked_seq: stats.acked,
            last_assigned_seq: stats.produced_total,
        },
    );
}

fn end_session(session: &mut AgentSession, handle: &UplinkHandle, welcomed: bool, reason: &str) {
    session.handle_disconnected();
    handle.connected.store(false, Ordering::Relaxed);
    handle.resends.store(session.stats().resends, Ordering::Relaxed);
    if welcomed {
        handle.reconnects.fetch_add(1, Ordering::Relaxed);
    }
    tracing::warn!(%reason, "MQTT uplink session ended");
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
