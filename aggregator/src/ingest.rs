//! QUIC ingest: accepts agents over mutual TLS, runs one [`IngestSession`] per connection, and
//! acknowledges only what storage has committed.
//!
//! The device identity is the common name of the client certificate that rustls verified
//! against the fleet CA and the current CRL; nothing the agent sends can change it. A device an
//! operator disabled ([`crate::store::Fleet::update_device`]) is refused right after the
//! handshake (a `Refuse` frame with reason `device disabled`, then the connection is closed), and
//! its live connections are closed within about a second of the change. The same holds for a
//! revoked certificate: the CRL is read again within a second of `device revoke` rewriting it
//! (by content), new handshakes with the certificate fail, and the live connections made with it
//! are closed. A connection also ends when its certificate expires (checked every second).
//!
//! Limits, so that one certificate (or a stolen one) cannot hold unbounded resources: at most
//! `[quic] max_connections` connections in all (a handshake beyond it is refused before any
//! TLS work) and `[quic] max_connections_per_device` per device (a device's oldest connection
//! is closed when a newer one would exceed it; a reconnecting agent's earlier connection is
//! usually dead anyway); one control stream per connection; no snapshot stream before the
//! session's `Hello` was accepted (the stream credit is given only then); a `Hello` is checked
//! against [`wire::Hello::check`] (bounded camera list and text lengths) by the session.
//!
//! Snapshots arrive beside the control stream, each alone on a unidirectional stream, and are
//! handled concurrently with it: the stream is read up to [`wire::MAX_SNAPSHOT_FRAME_LEN`] (a longer
//! one is stopped before more is buffered), must hold exactly one [`Frame::Snapshot`] that passes
//! [`wire::SnapshotUpload::check`] (limits, JPEG magic bytes), and is then stored: the pictures
//! into object storage, then the row ([`EventStore::record_snapshot`]). Only then does the control
//! stream carry [`Frame::SnapshotStored`] for it, and the agent deletes its copy. A snapshot
//! already recorded is confirmed without being written again. A refused snapshot is counted and
//! its stream stopped; a storage failure is counted and not confirmed (the agent uploads it again
//! later); neither ends the connection, so pictures never hold up events.

use crate::unix_ms;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use its_shared::session::{IngestAction, IngestSession};
use its_shared::wire::{self, Frame, FrameDecoder};
use tokio::sync::{mpsc, watch};

use crate::bus::{BusMessage, CommittedEvents, EventBus};
use crate::pki::{Pki, device_id_from_cert};
use crate::snapshots::SnapshotObjects;
use crate::store::{EventStore, Fleet, NewSnapshot};
use crate::telemetry;

/// Concurrent snapshot streams per connection. The agent keeps at most 4 in flight; 8 bound what a
/// misbehaving agent can make us buffer to 8 x [`wire::MAX_SNAPSHOT_FRAME_LEN`] (about 24 MiB).
const MAX_SNAPSHOT_STREAMS: u32 = 8;
/// A snapshot stream must be complete within this: 10 minutes, enough for the agent's window of
/// 4 x 3 MiB sharing a 200 kbit/s cellular link (about 8 minutes). A stalled stream is dropped
/// and the agent uploads the snapshot again.
const SNAPSHOT_STREAM_TIMEOUT: Duration = Duration::from_secs(600);
/// Application error code with which a refused snapshot stream is stopped.
const SNAPSHOT_REFUSED_CODE: u32 = 1;
/// Confirmations waiting for the control stream.
const STORED_QUEUE: usize = 64;

/// One slot per device: a device has at most one live session on this aggregator.
///
/// When a device reconnects while its previous connection still lingers here (the agent noticed
/// the loss first), the new session must not load the storage watermark until the old one has
/// finished its commit in progress: otherwise the welcome could understate what is stored, and
/// the agent could evict (and count) an event that the old session stores right after.
/// The new session bumps the generation, wakes the old one, and takes the lock once it is gone.
#[derive(Default)]
struct DeviceSlot {
    lock: tokio::sync::Mutex<()>,
    generation: std::sync::atomic::AtomicU64,
    preempt: tokio::sync::Notify,
}

/// One live connection: the connection, the serial number of its client certificate, and its
/// order of arrival.
#[derive(Clone)]
struct LiveConnection {
    conn: quinn::Connection,
    serial: String,
    arrival: u64,
    /// When the client certificate expires, Unix seconds: the connection ends then.
    not_after_s: i64,
}

/// Live connections by device, then by [`quinn::Connection::stable_id`] (a reconnecting device
/// may briefly have two).
type LiveConnections = std::collections::HashMap<String, std::collections::HashMap<usize, LiveConnection>>;

#[derive(Clone)]
pub struct DeviceSessions {
    slots: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<DeviceSlot>>>>,
    /// Every connection from its device's identification to its end, so that disabling a
    /// device or revoking its certificate closes it.
    live: Arc<std::sync::Mutex<LiveConnections>>,
    /// The serial numbers the current CRL names (checked again at registration: a handshake
    /// made just before a reload is not missed).
    revoked: Arc<std::sync::RwLock<std::collections::HashSet<String>>>,
    arrivals: Arc<std::sync::atomic::AtomicU64>,
    per_device: usize,
}

impl DeviceSessions {
    fn new(per_device: usize, revoked: std::collections::HashSet<String>) -> Self {
        Self {
            slots: Arc::default(),
            live: Arc::default(),
            revoked: Arc::new(std::sync::RwLock::new(revoked)),
            arrivals: Arc::default(),
            per_device: per_device.max(1),
        }
    }

    fn slot(&self, device: &str) -> Arc<DeviceSlot> {
        let mut map = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(device.to_string()).or_default().clone()
    }

    /// Registers a live connection until the returned guard is dropped. A connection whose
    /// certificate the current CRL names is closed at once; the device's oldest connections are
    /// closed beyond the per-device limit.
    fn register(&self, device: &str, conn: &quinn::Connection, cert: &PeerCert) -> LiveRegistration {
        let serial = cert.serial.as_str();
        let arrival = self.arrivals.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let excess: Vec<quinn::Connection> = {
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            let conns = live.entry(device.to_owned()).or_default();
            conns.insert(
                conn.stable_id(),
                LiveConnection {
                    conn: conn.clone(),
                    serial: serial.to_owned(),
                    arrival,
                    not_after_s: cert.not_after_s,
                },
            );
            let mut by_age: Vec<(u64, usize)> = conns.iter().map(|(id, c)| (c.arrival, *id)).collect();
            by_age.sort_unstable();
            let over = by_age.len().saturating_sub(self.per_device);
            by_age.iter().take(over).filter_map(|(_, id)| conns.remove(id)).map(|c| c.conn).collect()
        };
        for old in excess {
            telemetry::connection_limited("device");
            old.close(SUPERSEDED_CODE.into(), b"too many connections of this device: a newer one replaced it");
        }
        if self.revoked.read().unwrap_or_else(|p| p.into_inner()).contains(serial) {
            telemetry::revoked_certificate_closed();
            conn.close(CERT_REVOKED_CODE.into(), CERT_REVOKED_REASON.as_bytes());
        }
        LiveRegistration { sessions: self.clone(), device: device.to_owned(), id: conn.stable_id() }
    }

    /// Closes the live connections whose client certificate has expired by `now_s` (Unix
    /// seconds); returns how many.
    fn close_expired(&self, now_s: i64) -> usize {
        let conns: Vec<quinn::Connection> = {
            let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            live.values().flat_map(|m| m.values()).filter(|c| c.not_after_s <= now_s).map(|c| c.conn.clone()).collect()
        };
        for conn in &conns {
            conn.close(CERT_EXPIRED_CODE.into(), b"certificate expired");
        }
        conns.len()
    }

    /// Takes the CRL's serial numbers and closes the live connections made with any of them;
    /// returns how many were closed.
    fn revoke(&self, revoked: std::collections::HashSet<String>) -> usize {
        let conns: Vec<quinn::Connection> = {
            let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            live.values()
                .flat_map(|m| m.values())
                .filter(|c| revoked.contains(&c.serial))
                .map(|c| c.conn.clone())
                .collect()
        };
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = revoked;
        for conn in &conns {
            telemetry::revoked_certificate_closed();
            conn.close(CERT_REVOKED_CODE.into(), CERT_REVOKED_REASON.as_bytes());
        }
        conns.len()
    }

    /// Whether any connection is live.
    fn any_live(&self) -> bool {
        !self.live.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Closes the live connections of these devices; returns how many were closed.
    fn close_devices(&self, devices: &[String], reason: &str) -> usize {
        let conns: Vec<quinn::Connection> = {
            let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            devices.iter().filter_map(|d| live.get(d)).flat_map(|m| m.values().map(|c| c.conn.clone())).collect()
        };
        for conn in &conns {
            conn.close(DEVICE_DISABLED_CODE.into(), reason.as_bytes());
        }
        conns.len()
    }
}

/// Removes its connection from [`DeviceSessions`] when dropped.
struct LiveRegistration {
    sessions: DeviceSessions,
    device: String,
    id: usize,
}

impl Drop for LiveRegistration {
    fn drop(&mut self) {
        let mut live = self.sessions.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(conns) = live.get_mut(&self.device) {
            conns.remove(&self.id);
            if conns.is_empty() {
                live.remove(&self.device);
            }
        }
    }
}

/// Application error code with which the connection of a disabled device is closed.
const DEVICE_DISABLED_CODE: u32 = 2;
/// Application error code with which a connection whose certificate was revoked is closed.
const CERT_REVOKED_CODE: u32 = 3;
/// ... and its reason.
const CERT_REVOKED_REASON: &str = "certificate revoked";
/// Application error code with which a device's oldest connection is closed beyond the limit.
const SUPERSEDED_CODE: u32 = 4;
/// Application error code with which a connection is closed when its certificate expires.
const CERT_EXPIRED_CODE: u32 = 5;
/// What a disabled device is told (the `Refuse` frame and the close reason).
const DEVICE_DISABLED_REASON: &str = "device disabled";

/// Closes the live connections of the devices that are disabled now.
async fn close_disabled(fleet: Fleet, sessions: DeviceSessions) {
    if !sessions.any_live() {
        return;
    }
    match fleet.disabled_devices().await {
        Ok(disabled) => {
            let closed = sessions.close_devices(&disabled, DEVICE_DISABLED_REASON);
            for _ in 0..closed {
                telemetry::disabled_device_refused("live");
            }
            if closed > 0 {
                tracing::info!(connections = closed, "closed the connections of disabled devices");
            }
        }
        Err(e) => tracing::warn!(error = %e, "checking for disabled devices failed"),
    }
}

/// Tells a disabled device why on its control stream (when it opens one soon), then closes.
async fn refuse_disabled(conn: &quinn::Connection) {
    if let Ok(Ok((mut send, _recv))) = tokio::time::timeout(Duration::from_secs(2), conn.accept_bi()).await {
        let mut buf = Vec::new();
        if wire::encode_into(&Frame::Refuse { reason: DEVICE_DISABLED_REASON.to_owned() }, &mut buf).is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(500), send.write_all(&buf)).await;
            // Wait (briefly) until the agent has the frame, so the close does not cut it off.
            if send.finish().is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            }
        }
    }
    conn.close(DEVICE_DISABLED_CODE.into(), DEVICE_DISABLED_REASON.as_bytes());
}

/// Transport settings of the listener.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub listen: SocketAddr,
    /// Silent connections are closed after this long; agents send keep-alives well within it.
    pub idle_timeout: Duration,
    /// Connections open at once, all devices together; a handshake beyond it is refused.
    pub max_connections: usize,
    /// Connections of one device at once; its oldest is closed beyond it.
    pub max_connections_per_device: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8471)),
            idle_timeout: Duration::from_secs(30),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_device: DEFAULT_MAX_CONNECTIONS_PER_DEVICE,
        }
    }
}

/// Default of `[quic] max_connections`: a large fleet on one replica (each connection costs tens
/// of KiB when idle), far below the file and memory limits of a small server.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default of `[quic] max_connections_per_device`: the live one and one reconnecting.
pub const DEFAULT_MAX_CONNECTIONS_PER_DEVICE: usize = 2;

fn server_config(pki: &Pki, idle: Duration) -> anyhow::Result<quinn::ServerConfig> {
    let tls = pki.server_tls_config()?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| anyhow!("QUIC TLS: {e}"))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(idle.try_into().map_err(|e| anyhow!("idle timeout: {e}"))?));
    // One control stream per agent. Unidirectional streams carry snapshots, one each: none until
    // the session's Hello was accepted (see `run_session`).
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// Binds the QUIC listener.
pub fn bind(pki: &Pki, cfg: &IngestConfig) -> anyhow::Result<quinn::Endpoint> {
    let server = server_config(pki, cfg.idle_timeout)?;
    quinn::Endpoint::server(server, cfg.listen).with_context(|| format!("binding QUIC on {}", cfg.listen))
}

/// Accepts connections until `shutdown`; reloads the CRL when `pki revoke` rewrites it.
pub async fn serve(
    endpoint: quinn::Endpoint,
    pki: Pki,
    cfg: IngestConfig,
    store: Arc<dyn EventStore>,
    snapshots: SnapshotObjects,
    bus: EventBus,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut stamp = pki.revocation_stamp();
    let revoked = pki.revoked_serials().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "reading the revocation list's serial numbers failed");
        Default::default()
    });
    let sessions = DeviceSessions::new(cfg.max_connections_per_device, revoked);
    let fleet = Fleet::new(store.db());
    let mut reload = tokio::time::interval(Duration::from_secs(1));
    let mut disabled_check: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { return Ok(()) };
                if endpoint.open_connections() >= cfg.max_connections {
                    telemetry::connection_limited("total");
                    incoming.refuse();
                    continue;
                }
                let (store, sessions, snapshots, fleet, bus) =
                    (store.clone(), sessions.clone(), snapshots.clone(), fleet.clone(), bus.clone());
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    if let Err(e) = handle_connection(incoming, store, snapshots, sessions, fleet, bus).await {
                        tracing::info!(%remote, error = %format!("{e:#}"), "agent connection ended");
                    }
                });
            }
            _ = reload.tick() => {
                // Devices disabled meanwhile lose their connections (in a task of its own: a slow
                // database must not hold up accepting; one check at a time).
                if disabled_check.as_ref().is_none_or(|h| h.is_finished()) {
                    disabled_check = Some(tokio::spawn(close_disabled(fleet.clone(), sessions.clone())));
                }
                let expired = sessions.close_expired(unix_ms() / 1000);
                if expired > 0 {
                    tracing::info!(connections = expired, "closed the connections of expired certificates");
                }
                let now = pki.revocation_stamp();
                if now != stamp {
                    match server_config(&pki, cfg.idle_timeout) {
                        Ok(sc) => {
                            endpoint.set_server_config(Some(sc));
                            stamp = now;
                            tracing::info!("revocation list changed: reloaded the TLS configuration");
                            match pki.revoked_serials() {
                                Ok(serials) => {
                                    let closed = sessions.revoke(serials);
                                    if closed > 0 {
                                        tracing::info!(connections = closed, "closed the connections of revoked certificates");
                                    }
                                }
                                Err(e) => tracing::error!(error = %e, "reading the revoked serial numbers failed"),
                            }
                        }
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "reloading the TLS configuration failed; keeping the old one"),
                    }
                }
            }
            _ = shutdown.changed() => {
                endpoint.close(0u32.into(), b"aggregator shutting down");
                return Ok(());
            }
        }
    }
}

async fn handle_connection(
    incoming: quinn::Incoming,
    store: Arc<dyn EventStore>,
    snapshots: SnapshotObjects,
    sessions: DeviceSessions,
    fleet: Fleet,
    bus: EventBus,
) -> anyhow::Result<()> {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            telemetry::handshake_refused();
            return Err(anyhow!("handshake refused: {e}"));
        }
    };
    let cert = peer_identity(&conn)?;
    let device = cert.device.clone();
    // Registered before the check: a device disabled right after it is closed by the next sweep.
    let _live = sessions.register(&device, &conn, &cert);
    if fleet.is_device_disabled(&device).await.context("checking whether the device is disabled")? {
        telemetry::disabled_device_refused("connect");
        refuse_disabled(&conn).await;
        return Err(anyhow!("device {device} is disabled: connection refused"));
    }
    let _active = telemetry::ConnectionGuard::new();
    tracing::info!(device = %device, remote = %conn.remote_address(), "agent connected");
    let (stored_tx, mut stored_rx) = mpsc::channel(STORED_QUEUE);
    let uploads =
        SnapshotIngest { conn: conn.clone(), device: device.clone(), store: store.clone(), objects: snapshots };
    let _uploads = AbortOnDrop(tokio::spawn(uploads.run(stored_tx)));
    let (mut send, mut recv) = conn.accept_bi().await.context("waiting for the control stream")?;
    let slot = sessions.slot(&device);
    let generation = slot.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    slot.preempt.notify_waiters();
    let _exclusive = slot.lock.lock().await;
    let mut session = IngestSession::new();
    let _online = OnlineStatus::announce(&bus, &device);
    let link = SessionLink { device: &device, store: store.as_ref(), bus: &bus, slot: &slot, generation, conn: &conn };
    let result = run_session(&link, &mut session, &mut send, &mut recv, &mut stored_rx).await;
    let stats = session.stats();
    telemetry::session_closed(&stats);
    match result {
        Ok(()) => {
            conn.close(0u32.into(), b"bye");
            Ok(())
        }
        Err(e) => {
            let msg = format!("{e:#}");
            // Best effort: tell the agent why, then close.
            let mut buf = Vec::new();
            if wire::encode_into(&Frame::Refuse { reason: msg.clone() }, &mut buf).is_ok() {
                let _ = tokio::time::timeout(Duration::from_millis(200), send.write_all(&buf)).await;
            }
            conn.close(1u32.into(), msg.as_bytes());
            Err(e.context(format!("device {device}")))
        }
    }
}

/// What the ingest needs of a verified client certificate.
struct PeerCert {
    device: String,
    serial: String,
    not_after_s: i64,
}

/// The device id, serial number and expiry of a verified peer's certificate.
fn peer_identity(conn: &quinn::Connection) -> anyhow::Result<PeerCert> {
    let identity = conn.peer_identity().ok_or_else(|| anyhow!("no client certificate"))?;
    let certs = identity
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .map_err(|_| anyhow!("unexpected peer identity type"))?;
    let leaf = certs.first().ok_or_else(|| anyhow!("empty client certificate chain"))?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| anyhow!("client certificate: {e}"))?;
    Ok(PeerCert {
        device: device_id_from_cert(leaf)?,
        serial: crate::pki::cert_serial_hex(leaf)?,
        not_after_s: parsed.validity().not_after.timestamp(),
    })
}

/// Publishes a device's `online` status on the bus, and `offline` when dropped.
struct OnlineStatus {
    bus: EventBus,
    device: String,
}

impl OnlineStatus {
    fn announce(bus: &EventBus, device: &str) -> Self {
        bus.publish(BusMessage::DeviceStatus { device: device.to_owned(), online: true, at_ms: unix_ms() });
        Self { bus: bus.clone(), device: device.to_owned() }
    }
}

impl Drop for OnlineStatus {
    fn drop(&mut self) {
        let device = std::mem::take(&mut self.device);
        self.bus.publish(BusMessage::DeviceStatus { device, online: false, at_ms: unix_ms() });
    }
}

/// What one session works with.
struct SessionLink<'a> {
    device: &'a str,
    store: &'a dyn EventStore,
    bus: &'a EventBus,
    slot: &'a DeviceSlot,
    generation: u64,
    conn: &'a quinn::Connection,
}

/// Stores a batch and publishes what was newly stored on the bus (after the commit).
pub async fn commit_batch(
    store: &dyn EventStore,
    bus: &EventBus,
    device: &str,
    events: Vec<its_shared::event::EventEnvelope>,
) -> anyhow::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    let outcome = store.insert_events(device, &events, unix_ms()).await?;
    telemetry::batch_committed(outcome.inserted, outcome.duplicates, started.elapsed());
    if outcome.inserted == 0 {
        return Ok(());
    }
    let events = if outcome.duplicates == 0 {
        events
    } else {
        events.into_iter().filter(|e| outcome.new_seqs.binary_search(&e.seq).is_ok()).collect()
    };
    bus.publish(BusMessage::Events(CommittedEvents { device: device.to_owned(), events, committed_at_ms: unix_ms() }));
    Ok(())
}

/// Stores a heartbeat and publishes it on the bus.
pub async fn record_health(
    store: &dyn EventStore,
    bus: &EventBus,
    device: &str,
    hb: &its_shared::wire::Heartbeat,
) -> anyhow::Result<()> {
    let now = unix_ms();
    store.record_health(device, hb, now).await?;
    bus.publish(BusMessage::Health { device: device.to_owned(), at_ms: now, health: hb.health.clone() });
    Ok(())
}

async fn run_session(
    link: &SessionLink<'_>,
    session: &mut IngestSession,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    stored: &mut mpsc::Receiver<u64>,
) -> anyhow::Result<()> {
    let SessionLink { device, store, bus, slot, generation, conn } = *link;
    let mut decoder = FrameDecoder::new();
    let mut chunk = vec![0u8; 256 * 1024];
    let mut out = Vec::with_capacity(64);
    let superseded = || slot.generation.load(std::sync::atomic::Ordering::SeqCst) != generation;
    loop {
        if superseded() {
            anyhow::bail!("superseded by a newer connection of the same device");
        }
        let read = tokio::select! {
            r = recv.read(&mut chunk) => r.context("reading from the agent")?,
            Some(seq) = stored.recv() => {
                session.handle_snapshot_stored(seq);
                flush(session, send, &mut out).await?;
                continue;
            }
            _ = slot.preempt.notified() => continue,
        };
        let Some(n) = read else {
            return Ok(()); // the agent finished the stream
        };
        decoder.extend(&chunk[..n]);
        while let Some(frame) = decoder.next_frame().context("decoding a frame")? {
            let action = session.handle_frame(frame).inspect_err(|e| {
                if matches!(e, its_shared::session::IngestError::BadHello(_)) {
                    telemetry::hello_refused();
                }
            })?;
            match action {
                Some(IngestAction::LoadHighWater(hello)) => {
                    let hw = store.record_hello(device, &hello, unix_ms()).await?;
                    tracing::info!(device, high_water = hw, agent_acked = hello.last_acked_seq, version = %hello.agent_version, "session ready");
                    session.handle_high_water(hw);
                    // Snapshots only within an accepted session.
                    conn.set_max_concurrent_uni_streams(MAX_SNAPSHOT_STREAMS.into());
                }
                Some(IngestAction::Commit { events, up_to }) => {
                    commit_batch(store, bus, device, events).await?;
                    session.handle_committed(up_to);
                }
                Some(IngestAction::Health(hb)) => record_health(store, bus, device, &hb).await?,
                None => telemetry::batch_out_of_order(),
            }
            flush(session, send, &mut out).await?;
        }
    }
}

/// Writes the frames the session queued.
async fn flush(session: &mut IngestSession, send: &mut quinn::SendStream, out: &mut Vec<u8>) -> anyhow::Result<()> {
    while let Some(f) = session.poll_transmit() {
        out.clear();
        wire::encode_into(&f, out)?;
        send.write_all(out).await.context("writing to the agent")?;
    }
    Ok(())
}

/// Aborts the task when dropped (the connection's snapshot streams end with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a snapshot stream was not confirmed.
#[derive(Debug, thiserror::Error)]
enum SnapshotStreamError {
    /// The agent sent something that is not an acceptable snapshot (metric label, message).
    #[error("refused ({0}): {1}")]
    Refused(&'static str, String),
    /// The stream broke (connection lost, reset, timed out): nothing to count.
    #[error("stream: {0}")]
    Stream(String),
    /// Object storage or the database failed; the agent uploads it again later.
    #[error("storing: {0:#}")]
    Storage(anyhow::Error),
}

/// The snapshot streams of one connection.
struct SnapshotIngest {
    conn: quinn::Connection,
    device: String,
    store: Arc<dyn EventStore>,
    objects: SnapshotObjects,
}

impl SnapshotIngest {
    /// Accepts snapshot streams until the connection ends, each handled in a task of its own
    /// (the transport admits [`MAX_SNAPSHOT_STREAMS`] at once); stored ones go to `stored`.
    async fn run(self, stored: mpsc::Sender<u64>) {
        let this = Arc::new(self);
        let mut streams = tokio::task::JoinSet::new();
        loop {
            let accepted = tokio::select! {
                a = this.conn.accept_uni() => a,
                Some(_) = streams.join_next(), if !streams.is_empty() => continue,
            };
            let mut stream = match accepted {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(device = %this.device, error = %e, "no more snapshot streams");
                    return;
                }
            };
            let (this, stored) = (this.clone(), stored.clone());
            streams.spawn(async move {
                match this.receive(&mut stream).await {
                    Ok(seq) => {
                        // The control stream may be gone: the agent then uploads it again.
                        let _ = stored.send(seq).await;
                    }
                    Err(SnapshotStreamError::Refused(reason, message)) => {
                        telemetry::snapshot_refused(reason);
                        tracing::warn!(device = %this.device, reason, %message, "snapshot refused");
                        let _ = stream.stop(SNAPSHOT_REFUSED_CODE.into());
                    }
                    Err(e @ SnapshotStreamError::Storage(_)) => {
                        telemetry::snapshot_failed();
                        tracing::warn!(device = %this.device, error = %e, "snapshot not stored; the agent will upload it again");
                    }
                    Err(e @ SnapshotStreamError::Stream(_)) => {
                        tracing::debug!(device = %this.device, error = %e, "snapshot stream ended early");
                    }
                }
            });
        }
    }

    /// Reads, checks and stores one snapshot stream; returns the event's `seq` once the pictures
    /// and their row are durable.
    async fn receive(&self, stream: &mut quinn::RecvStream) -> Result<u64, SnapshotStreamError> {
        let read = tokio::time::timeout(SNAPSHOT_STREAM_TIMEOUT, stream.read_to_end(wire::MAX_SNAPSHOT_FRAME_LEN));
        let bytes = match read.await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(quinn::ReadToEndError::TooLong)) => {
                return Err(SnapshotStreamError::Refused(
                    "too_large",
                    format!("stream longer than {} bytes", wire::MAX_SNAPSHOT_FRAME_LEN),
                ));
            }
            Ok(Err(quinn::ReadToEndError::Read(e))) => return Err(SnapshotStreamError::Stream(e.to_string())),
            Err(_) => return Err(SnapshotStreamError::Stream("timed out".into())),
        };
        let upload = match wire::decode_one(&bytes) {
            Ok(Frame::Snapshot(upload)) => upload,
            Ok(other) => {
                return Err(SnapshotStreamError::Refused(
                    "malformed",
                    format!("a {} frame on a snapshot stream", other.name()),
                ));
            }
            Err(e) => return Err(SnapshotStreamError::Refused("malformed", e.to_string())),
        };
        drop(bytes);
        upload.check().map_err(|e| SnapshotStreamError::Refused("invalid", e.to_string()))?;
        let seq = upload.seq;
        let started = Instant::now();
        let device = self.device.as_str();
        if self.store.has_snapshot(device, seq).await.map_err(|e| SnapshotStreamError::Storage(e.into()))? {
            telemetry::snapshot_duplicate();
            return Ok(seq);
        }
        let storage = |e: crate::snapshots::SnapshotStoreError| SnapshotStreamError::Storage(e.into());
        let full_key = SnapshotObjects::full_key(device, seq).map_err(storage)?;
        let full_bytes = upload.full_jpeg.len() as u64;
        let crop = match upload.crop_jpeg {
            Some(crop) => Some((SnapshotObjects::crop_key(device, seq).map_err(storage)?, crop)),
            None => None,
        };
        let crop_meta = crop.as_ref().map(|(key, bytes)| (key.to_string(), bytes.len() as u64));
        self.objects.put(&full_key, upload.full_jpeg).await.map_err(storage)?;
        if let Some((key, bytes)) = crop {
            self.objects.put(&key, bytes).await.map_err(storage)?;
        }
        let full_key = full_key.to_string();
        let record = NewSnapshot {
            seq,
            camera: &upload.camera,
            taken_at_ms: upload.taken_at_ms,
            full_key: &full_key,
            full_bytes,
            crop: crop_meta.as_ref().map(|(k, n)| (k.as_str(), *n)),
        };
        let inserted = self
            .store
            .record_snapshot(device, &record, unix_ms())
            .await
            .map_err(|e| SnapshotStreamError::Storage(e.into()))?;
        if inserted {
            let bytes = full_bytes + crop_meta.as_ref().map_or(0, |(_, n)| *n);
            telemetry::snapshot_stored(bytes, started.elapsed());
        } else {
            telemetry::snapshot_duplicate();
        }
        Ok(seq)
    }
}
