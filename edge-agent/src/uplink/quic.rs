//! QUIC transport of the uplink: connect with mutual TLS, run the uplink session (the
//! driver of `driver.rs`) over one bidirectional stream per connection, reconnect with capped
//! exponential backoff.
//!
//! Snapshots go beside it: once the session is welcomed, a task of the connection uploads the
//! outbox's pending snapshots, each on a unidirectional stream of its own with a lower priority
//! than the control stream, at most [`SnapshotWindowConfig::max_in_flight`] unconfirmed at a time
//! ([`SnapshotWindow`] decides). The control loop never waits for it: it only forwards the
//! aggregator's `SnapshotStored` confirmations, and the task deletes the confirmed snapshots.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, anyhow};
use its_shared::session::{AgentSessionConfig, Backoff, SnapshotWindow, SnapshotWindowConfig};
use its_shared::wire::{self, Frame, FrameDecoder, Hello};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::driver::{EndCause, SessionLink, UplinkDriver, now_std};
pub use super::driver::{HealthFn, UplinkHandle};
use super::tls::{DeviceBundle, client_config};
use crate::buffer::Outbox;

/// How the uplink reaches the aggregator.
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// `host:port` of the aggregator's QUIC listener.
    pub aggregator: String,
    /// Name the aggregator's certificate must carry.
    pub server_name: String,
    pub bundle: DeviceBundle,
    pub session: AgentSessionConfig,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Randomise reconnect delays (off in tests so they are reproducible).
    pub jitter: bool,
    /// A connection with no traffic for this long is dead (QUIC idle timeout).
    pub idle_timeout: Duration,
    /// Keep-alive interval, well under `idle_timeout`.
    pub keep_alive: Duration,
    pub agent_version: String,
    pub model: String,
    pub cameras: Vec<String>,
}

impl UplinkConfig {
    /// The Hello of this agent (the transports fill in the sequence numbers at each session).
    pub(super) fn hello(&self) -> Hello {
        Hello {
            agent_version: self.agent_version.clone(),
            model: self.model.clone(),
            cameras: self.cameras.clone(),
            last_acked_seq: 0,
            last_assigned_seq: 0,
        }
    }

    /// The driver of this uplink's session.
    pub(super) fn driver(&self, outbox: Arc<Outbox>, handle: Arc<UplinkHandle>, health: HealthFn) -> UplinkDriver {
        UplinkDriver::new(self.session.clone(), self.hello(), outbox, handle, health)
    }
}

/// Priority of the control stream (quinn's default); snapshot streams get a lower one.
const CONTROL_PRIORITY: i32 = 0;
/// Priority of snapshot streams: their bytes go out only when the control stream has none queued.
const SNAPSHOT_PRIORITY: i32 = -1;
/// Pause before the snapshot task retries after the outbox failed (e.g. busy beyond its timeout).
const SNAPSHOT_RETRY: Duration = Duration::from_secs(1);
/// Confirmations the control loop may queue for the snapshot task (it never waits on it: a
/// confirmation that finds the queue full is dropped, and the snapshot is uploaded again later).
const STORED_QUEUE: usize = 256;

/// Runs until `shutdown` turns true. Never returns an error for network trouble: it reconnects.
pub async fn run_uplink(
    cfg: UplinkConfig,
    outbox: Arc<Outbox>,
    handle: Arc<UplinkHandle>,
    health: HealthFn,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let tls = client_config(&cfg.bundle).context("loading the device bundle")?;
    let quic_tls = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| anyhow!("QUIC TLS: {e}"))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic_tls));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(cfg.keep_alive));
    transport.max_idle_timeout(Some(cfg.idle_timeout.try_into().map_err(|e| anyhow!("idle timeout: {e}"))?));
    client.transport_config(Arc::new(transport));

    let mut driver = cfg.driver(outbox.clone(), handle.clone(), health);
    let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_cap, if cfg.jitter { 0.5 } else { 0.0 });
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        // The driver has done the session's bookkeeping (counters, `connected`) when this returns.
        let outcome = connect_and_drive(&cfg, &client, &mut driver, &outbox, &handle, &mut shutdown).await;
        match outcome {
            Ok(Ended::Shutdown) => return Ok(()),
            Ok(Ended::Welcomed(reason)) => {
                backoff.reset();
                tracing::warn!(reason = %reason, "uplink connection ended");
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), attempt = backoff.attempts() + 1, "uplink connection failed");
            }
        }
        let delay = backoff.next_delay(rand::random::<f64>());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

enum Ended {
    Shutdown,
    /// The session had been welcomed, then ended for this reason.
    Welcomed(String),
}

async fn connect_and_drive(
    cfg: &UplinkConfig,
    client: &quinn::ClientConfig,
    driver: &mut UplinkDriver,
    outbox: &Arc<Outbox>,
    handle: &Arc<UplinkHandle>,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<Ended> {
    let addr: SocketAddr = tokio::net::lookup_host(&cfg.aggregator)
        .await
        .with_context(|| format!("resolving {}", cfg.aggregator))?
        .next()
        .ok_or_else(|| anyhow!("{} resolves to no address", cfg.aggregator))?;
    let bind: SocketAddr = if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let mut endpoint = quinn::Endpoint::client(bind).context("binding the UDP socket")?;
    endpoint.set_default_client_config(client.clone());
    let conn = endpoint
        .connect(addr, &cfg.server_name)
        .context("starting the QUIC handshake")?
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (send, recv) = conn.open_bi().await.context("opening the control stream")?;
    send.set_priority(CONTROL_PRIORITY).context("setting the control stream's priority")?;
    handle.connected.store(true, Ordering::Relaxed);
    tracing::info!(%addr, "uplink connected");

    let (tx, rx) = mpsc::channel::<Result<Frame, String>>(64);
    let reader = tokio::spawn(read_frames(recv, tx));
    let snapshots = SnapshotTask { conn: conn.clone(), outbox: outbox.clone(), handle: handle.clone(), task: None };
    let mut link = ControlStream { send, frames: rx, snapshots, buf: Vec::with_capacity(256 * 1024) };
    let end = driver.run_session(&mut link, shutdown).await;
    reader.abort();
    if let Some((task, _)) = link.snapshots.task.take() {
        task.abort();
    }
    let error = match end.cause {
        EndCause::Shutdown => None,
        EndCause::Failed(e) | EndCause::Broken(e) => Some(e),
        EndCause::Lost(reason) => Some(anyhow!(reason)),
    };
    let reason = match &error {
        None => "shutdown".to_string(),
        Some(e) => format!("{e:#}"),
    };
    conn.close(0u32.into(), reason.as_bytes());
    // Give the close frame a moment to leave; never block shutdown on it.
    let _ = tokio::time::timeout(Duration::from_millis(200), endpoint.wait_idle()).await;
    match error {
        None => Ok(Ended::Shutdown),
        Some(_) if end.welcomed => Ok(Ended::Welcomed(reason)),
        Some(e) => Err(e),
    }
}

/// The QUIC side of one uplink session: the control stream, and the connection's snapshot
/// uploader beside it.
struct ControlStream {
    send: quinn::SendStream,
    /// Frames from the control stream's reader task, or why it stopped.
    frames: mpsc::Receiver<Result<Frame, String>>,
    snapshots: SnapshotTask,
    buf: Vec<u8>,
}

impl SessionLink for ControlStream {
    const NAME: &'static str = "uplink";

    async fn send(&mut self, frame: &Frame) -> Result<(), EndCause> {
        self.buf.clear();
        wire::encode_into(frame, &mut self.buf).map_err(|e| EndCause::Broken(e.into()))?;
        self.send.write_all(&self.buf).await.context("writing to the aggregator").map_err(EndCause::Failed)
    }

    async fn recv(&mut self) -> Result<Frame, EndCause> {
        match self.frames.recv().await {
            Some(Ok(f)) => Ok(f),
            Some(Err(e)) => Err(EndCause::Lost(e)),
            None => Err(EndCause::Lost("reader stopped".into())),
        }
    }

    fn welcomed(&mut self) {
        self.snapshots.start();
    }

    fn snapshot_stored(&mut self, seq: u64) {
        self.snapshots.stored(seq);
    }

    async fn close(&mut self) {
        let _ = self.send.finish();
    }
}

async fn read_frames(mut recv: quinn::RecvStream, tx: mpsc::Sender<Result<Frame, String>>) {
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match recv.read(&mut buf).await {
            Ok(Some(n)) => decoder.extend(&buf[..n]),
            Ok(None) => {
                let _ = tx.send(Err("aggregator closed the stream".into())).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(format!("reading: {e}"))).await;
                return;
            }
        }
        loop {
            match decoder.next_frame() {
                Ok(Some(f)) => {
                    if tx.send(Ok(f)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(format!("bad frame from aggregator: {e}"))).await;
                    return;
                }
            }
        }
    }
}

/// The connection's snapshot uploader: started once the session is welcomed.
struct SnapshotTask {
    conn: quinn::Connection,
    outbox: Arc<Outbox>,
    handle: Arc<UplinkHandle>,
    /// The running task and the queue of confirmations to it.
    task: Option<(tokio::task::JoinHandle<()>, mpsc::Sender<u64>)>,
}

impl SnapshotTask {
    fn start(&mut self) {
        let (tx, rx) = mpsc::channel(STORED_QUEUE);
        let (conn, outbox, handle) = (self.conn.clone(), self.outbox.clone(), self.handle.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = upload_snapshots(conn, outbox, handle, rx, SnapshotWindowConfig::default()).await {
                // The control loop notices a dead connection on its own; only log here.
                tracing::warn!(error = %format!("{e:#}"), "snapshot uploads stopped");
            }
        });
        self.task = Some((task, tx));
    }

    /// Hands a confirmation to the uploader without waiting.
    fn stored(&self, seq: u64) {
        match &self.task {
            Some((_, tx)) => {
                if tx.try_send(seq).is_err() {
                    tracing::debug!(seq, "snapshot confirmation queue full: the snapshot will be uploaded again");
                }
            }
            None => tracing::debug!(seq, "snapshot confirmation before the session was ready: ignored"),
        }
    }
}

/// Uploads pending snapshots over `conn` until the connection ends (see the module docs).
async fn upload_snapshots(
    conn: quinn::Connection,
    outbox: Arc<Outbox>,
    handle: Arc<UplinkHandle>,
    mut stored: mpsc::Receiver<u64>,
    cfg: SnapshotWindowConfig,
) -> anyhow::Result<()> {
    let mut window = SnapshotWindow::new(cfg);
    let mut writes: tokio::task::JoinSet<(u64, Result<(), String>)> = tokio::task::JoinSet::new();
    loop {
        while let Some(req) = window.poll_request() {
            let ob = outbox.clone();
            let loaded = match tokio::task::spawn_blocking(move || ob.read_snapshots_after(req.after, req.max)).await? {
                Ok(loaded) => loaded,
                Err(e) => {
                    tracing::warn!(error = %e, "reading snapshots from the outbox failed; retrying");
                    tokio::time::sleep(SNAPSHOT_RETRY).await;
                    continue;
                }
            };
            let seqs: Vec<u64> = loaded.iter().map(|u| u.seq).collect();
            let fresh = window.handle_loaded(req, &seqs);
            for upload in loaded.into_iter().filter(|u| fresh.contains(&u.seq)) {
                handle.snapshot_uploads.fetch_add(1, Ordering::Relaxed);
                let conn = conn.clone();
                writes.spawn(async move {
                    let seq = upload.seq;
                    (seq, write_snapshot(&conn, upload).await.map_err(|e| format!("{e:#}")))
                });
            }
        }
        let deadline = window.poll_timeout().map(Instant::from_std);
        tokio::select! {
            seq = stored.recv() => {
                let Some(seq) = seq else { return Ok(()) }; // the control loop ended
                let ob = outbox.clone();
                match tokio::task::spawn_blocking(move || ob.snapshot_stored(seq)).await? {
                    Ok(deleted) => {
                        if deleted {
                            handle.snapshots_stored.fetch_add(1, Ordering::Relaxed);
                        }
                        window.handle_stored(seq);
                    }
                    // Still in the outbox and in the window: uploaded again after the confirmation
                    // timeout, confirmed again by the aggregator, deleted then.
                    Err(e) => tracing::warn!(seq, error = %e, "deleting a confirmed snapshot failed"),
                }
            }
            Some(done) = writes.join_next(), if !writes.is_empty() => match done {
                Ok((seq, Ok(()))) => window.handle_written(now_std(), seq),
                Ok((seq, Err(e))) => {
                    tracing::debug!(seq, error = %e, "snapshot upload failed; it will be uploaded again");
                    window.handle_write_failed(now_std(), seq);
                }
                Err(e) => anyhow::bail!("snapshot upload task: {e}"),
            },
            _ = handle.snapshots_appended.notified() => window.handle_appended(),
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                window.handle_timeout(now_std());
            }
            reason = conn.closed() => {
                tracing::debug!(%reason, "connection closed: snapshot uploads end");
                return Ok(());
            }
        }
    }
}

/// One snapshot on a unidirectional stream of its own, at the snapshot priority.
async fn write_snapshot(conn: &quinn::Connection, upload: wire::SnapshotUpload) -> anyhow::Result<()> {
    let seq = upload.seq;
    let bytes = wire::encode(&Frame::Snapshot(upload)).with_context(|| format!("encoding snapshot {seq}"))?;
    let mut stream = conn.open_uni().await.context("opening a snapshot stream")?;
    stream.set_priority(SNAPSHOT_PRIORITY).context("setting the snapshot stream's priority")?;
    stream.write_all(&bytes).await.with_context(|| format!("writing snapshot {seq}"))?;
    stream.finish().with_context(|| format!("finishing snapshot {seq}"))?;
    Ok(())
}
