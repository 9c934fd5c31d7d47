//! QUIC ingest: accepts agents over mutual TLS, runs one [`IngestSession`] per connection, and
//! acknowledges only what storage has committed.
//!
//! The device identity is the common name of the client certificate that rustls verified
//! against the fleet CA and the current CRL; nothing the agent sends can change it.

use crate::unix_ms;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use its_shared::session::{IngestAction, IngestSession};
use its_shared::wire::{self, Frame, FrameDecoder};
use tokio::sync::watch;

use crate::pki::{Pki, device_id_from_cert};
use crate::store::EventStore;
use crate::telemetry;

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

#[derive(Default, Clone)]
pub struct DeviceSessions {
    slots: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<DeviceSlot>>>>,
}

impl DeviceSessions {
    fn slot(&self, device: &str) -> Arc<DeviceSlot> {
        let mut map = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(device.to_string()).or_default().clone()
    }
}

/// Transport settings of the listener.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub listen: SocketAddr,
    /// Silent connections are closed after this long; agents send keep-alives well within it.
    pub idle_timeout: Duration,
}

fn server_config(pki: &Pki, idle: Duration) -> anyhow::Result<quinn::ServerConfig> {
    let tls = pki.server_tls_config()?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| anyhow!("QUIC TLS: {e}"))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(idle.try_into().map_err(|e| anyhow!("idle timeout: {e}"))?));
    // One control stream per agent; a few unidirectional streams for later snapshot uploads.
    transport.max_concurrent_bidi_streams(4u32.into());
    transport.max_concurrent_uni_streams(16u32.into());
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
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut stamp = pki.revocation_stamp();
    let sessions = DeviceSessions::default();
    let mut reload = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { return Ok(()) };
                let (store, sessions) = (store.clone(), sessions.clone());
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    if let Err(e) = handle_connection(incoming, store, sessions).await {
                        tracing::info!(%remote, error = %format!("{e:#}"), "agent connection ended");
                    }
                });
            }
            _ = reload.tick() => {
                let now = pki.revocation_stamp();
                if now != stamp {
                    match server_config(&pki, cfg.idle_timeout) {
                        Ok(sc) => {
                            endpoint.set_server_config(Some(sc));
                            stamp = now;
                            tracing::info!("revocation list changed: reloaded the TLS configuration");
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
    sessions: DeviceSessions,
) -> anyhow::Result<()> {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            telemetry::handshake_refused();
            return Err(anyhow!("handshake refused: {e}"));
        }
    };
    let device = peer_device_id(&conn)?;
    let _active = telemetry::ConnectionGuard::new();
    tracing::info!(device = %device, remote = %conn.remote_address(), "agent connected");
    let (mut send, mut recv) = conn.accept_bi().await.context("waiting for the control stream")?;
    let slot = sessions.slot(&device);
    let generation = slot.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    slot.preempt.notify_waiters();
    let _exclusive = slot.lock.lock().await;
    let mut session = IngestSession::new();
    let result = run_session(&device, &mut session, &mut send, &mut recv, store.as_ref(), &slot, generation).await;
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

fn peer_device_id(conn: &quinn::Connection) -> anyhow::Result<String> {
    let identity = conn.peer_identity().ok_or_else(|| anyhow!("no client certificate"))?;
    let certs = identity
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .map_err(|_| anyhow!("unexpected peer identity type"))?;
    let leaf = certs.first().ok_or_else(|| anyhow!("empty client certificate chain"))?;
    Ok(device_id_from_cert(leaf)?)
}

async fn run_session(
    device: &str,
    session: &mut IngestSession,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    store: &dyn EventStore,
    slot: &DeviceSlot,
    generation: u64,
) -> anyhow::Result<()> {
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
            _ = slot.preempt.notified() => continue,
        };
        let Some(n) = read else {
            return Ok(()); // the agent finished the stream
        };
        decoder.extend(&chunk[..n]);
        while let Some(frame) = decoder.next_frame().context("decoding a frame")? {
            let action = session.handle_frame(frame)?;
            match action {
                Some(IngestAction::LoadHighWater(hello)) => {
                    let hw = store.record_hello(device, &hello, unix_ms()).await?;
                    tracing::info!(device, high_water = hw, agent_acked = hello.last_acked_seq, version = %hello.agent_version, "session ready");
                    session.handle_high_water(hw);
                }
                Some(IngestAction::Commit { events, up_to }) => {
                    if !events.is_empty() {
                        let started = Instant::now();
                        let outcome = store.insert_events(device, &events, unix_ms()).await?;
                        telemetry::batch_committed(outcome.inserted, outcome.duplicates, started.elapsed());
                    }
                    session.handle_committed(up_to);
                }
                Some(IngestAction::Health(hb)) => store.record_health(device, &hb, unix_ms()).await?,
                None => telemetry::batch_out_of_order(),
            }
            while let Some(f) = session.poll_transmit() {
                out.clear();
                wire::encode_into(&f, &mut out)?;
                send.write_all(&out).await.context("writing to the agent")?;
            }
        }
    }
}
