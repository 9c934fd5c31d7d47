//! An agent in the test's process: an outbox and its QUIC uplink, without the vision stages, for
//! tests that decide exactly which events the agent commits (`mqtt_publish`, `snapshots_e2e`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use its_agent::buffer::{NewEvent, Outbox, OutboxConfig, SnapshotImages};
use its_agent::uplink::quic::HealthFn;
use its_agent::uplink::tls::DeviceBundle;
use its_agent::uplink::{UplinkConfig, UplinkHandle, run_uplink};
use its_shared::session::AgentSessionConfig;
use tokio::sync::watch;

/// The uplink as the tests tune it: the device bundle in `bundle_dir`, `cameras` announced, quick
/// reconnects (50 to 500 ms, no jitter), a 10 s acknowledgement and idle timeout, keep-alives every
/// second.
pub fn uplink_config(aggregator: SocketAddr, bundle_dir: &Path, cameras: &[&str]) -> UplinkConfig {
    UplinkConfig {
        aggregator: aggregator.to_string(),
        server_name: "its-aggregator".into(),
        bundle: DeviceBundle::in_dir(bundle_dir),
        session: AgentSessionConfig { ack_timeout: Duration::from_secs(10), ..AgentSessionConfig::default() },
        backoff_base: Duration::from_millis(50),
        backoff_cap: Duration::from_millis(500),
        jitter: false,
        idle_timeout: Duration::from_secs(10),
        keep_alive: Duration::from_secs(1),
        agent_version: "test".into(),
        model: "none".into(),
        cameras: cameras.iter().map(|c| (*c).to_owned()).collect(),
    }
}

/// An outbox and its uplink task.
pub struct Agent {
    pub outbox: Arc<Outbox>,
    pub handle: Arc<UplinkHandle>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Agent {
    /// Opens the outbox `outbox.db` in `dir` and starts its uplink with `cfg`.
    pub fn start(dir: &Path, cfg: UplinkConfig) -> Self {
        let outbox = Arc::new(Outbox::open(OutboxConfig::new(dir.join("outbox.db"))).expect("outbox"));
        let handle = Arc::new(UplinkHandle::default());
        let health: HealthFn = Arc::new(its_shared::DeviceHealth::default);
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(run_uplink(cfg, outbox.clone(), handle.clone(), health, rx));
        Self { outbox, handle, stop, task }
    }

    /// Commits events (and snapshots of some of them, `(index, images)`) in one transaction and
    /// wakes the uplink, as the agent does; the first and last sequence numbers given.
    pub async fn append(&self, events: Vec<NewEvent>, snapshots: Vec<(usize, SnapshotImages)>) -> (u64, u64) {
        let ob = self.outbox.clone();
        let pictures = !snapshots.is_empty();
        let out = tokio::task::spawn_blocking(move || {
            ob.append_with_snapshots(&events, snapshots, its_aggregator::unix_ms())
        })
        .await
        .expect("join")
        .expect("append");
        self.handle.appended.notify_one();
        if pictures {
            self.handle.snapshots_appended.notify_one();
        }
        (out.first_seq, out.last_seq)
    }

    /// Stops the uplink; what its task ended with.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await?
    }
}
