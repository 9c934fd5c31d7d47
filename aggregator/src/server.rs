//! Runs the aggregator: storage, the QUIC ingest listener and the HTTP API, until shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use crate::config::ServerConfig;
use crate::http::transport::{self, ReloadingCert};
use crate::http::{AppState, router};
use crate::pki::Pki;
use crate::snapshots::SnapshotObjects;
use crate::store::EventStore;

/// Where the listeners actually bound (port 0 in the configuration picks a free port).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct BoundAddrs {
    pub quic: SocketAddr,
    pub http: SocketAddr,
    /// The embedded MQTT broker (`None`: `[mqtt] mode` is not `embedded`).
    #[serde(default)]
    pub mqtt: Option<SocketAddr>,
}

/// Installs the process-wide Prometheus recorder (once per process).
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    crate::telemetry::describe();
    Ok(handle)
}

/// A running aggregator.
pub struct Server {
    pub addrs: BoundAddrs,
    pub store: Arc<dyn EventStore>,
    /// MQTT for third parties (the embedded broker's handle, for other modules' authenticators).
    pub mqtt: crate::mqtt::MqttHandle,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
}

impl Server {
    /// Opens storage, binds both listeners and starts serving.
    pub async fn start(
        cfg: &ServerConfig,
        metrics: PrometheusHandle,
        ready_file: Option<PathBuf>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let pki = Pki::new(&cfg.pki_dir);
        if !pki.can_serve() {
            anyhow::bail!(
                "no CA or server certificate in {}: run `its-aggregator pki init` first",
                cfg.pki_dir.display()
            );
        }
        let store = crate::store::open_store_with_secrets(&cfg.database_url, &cfg.secrets_source())
            .await
            .with_context(|| format!("opening {}", redact(&cfg.database_url)))?;
        let snapshots = SnapshotObjects::open(&cfg.snapshots)
            .with_context(|| format!("opening the snapshot store {}", cfg.snapshots))?;
        // Before binding, so a bad certificate file stops the start with its path.
        let https = match &cfg.http_tls {
            Some(files) => Some(ReloadingCert::load(files.clone())?),
            None => None,
        };
        let endpoint = crate::ingest::bind(&pki, &cfg.ingest)?;
        let quic = endpoint.local_addr().context("QUIC local address")?;
        let listener = tokio::net::TcpListener::bind(cfg.http_listen)
            .await
            .with_context(|| format!("binding HTTP on {}", cfg.http_listen))?;
        let http = listener.local_addr().context("HTTP local address")?;
        let mut addrs = BoundAddrs { quic, http, mqtt: None };
        let scheme = if https.is_some() { "https" } else { "http" };
        tracing::info!(quic = %quic, http = %http, scheme, backend = store.backend(), snapshots = snapshots.location(), "aggregator listening");

        let mut tasks = tokio::task::JoinSet::new();
        let bus = crate::bus::EventBus::new();
        tasks.spawn(crate::ingest::serve(
            endpoint,
            pki,
            cfg.ingest.clone(),
            store.clone(),
            snapshots.clone(),
            bus.clone(),
            shutdown.clone(),
        ));
        let retention = crate::store::Retention::new(store.db(), snapshots.clone(), cfg.retention.clone());
        let retention_shutdown = shutdown.clone();
        tasks.spawn(async move {
            retention.run(retention_shutdown).await;
            Ok(())
        });
        if cfg.alerts.enabled {
            let alerts = crate::alerts::service(
                store.db(),
                bus.clone(),
                cfg.alerts.clone(),
                crate::clock::SystemClock::shared(),
                shutdown.clone(),
            );
            tasks.spawn(async move {
                alerts.await;
                Ok(())
            });
        }
        let analytics = crate::analytics::Analytics::new(store.db(), bus.clone(), cfg.analytics.clone());
        tasks.spawn({
            let sd = shutdown.clone();
            async move {
                analytics.run(sd).await;
                Ok(())
            }
        });
        // MQTT for third parties (embedded broker by default; see crate::mqtt).
        let mqtt = crate::mqtt::start(&cfg.mqtt, store.db(), &bus, shutdown.clone(), &mut tasks).await?;
        addrs.mqtt = mqtt.listen_addr();
        // The agents' MQTT uplink (off by default; see crate::mqtt::uplink).
        if cfg.mqtt.uplink.enabled {
            let uplink = cfg.mqtt.uplink.clone();
            tasks.spawn(crate::mqtt::uplink::run(uplink, store.clone(), bus.clone(), shutdown.clone()));
        }
        // Redis fan-out between replicas and Kafka export (both off by default).
        if let Some(fanout) = crate::export::fanout::Fanout::new(&cfg.redis, bus.clone())? {
            let sd = shutdown.clone();
            tasks.spawn(async move {
                fanout.run(sd).await;
                Ok(())
            });
        }
        #[cfg(feature = "kafka")]
        if cfg.kafka.enabled {
            let owner = crate::export::kafka::lease_owner(&cfg.redis.replica_id, http.port());
            let exporter = crate::export::kafka::KafkaExporter::new(&cfg.kafka, store.db(), &owner)
                .context("starting the Kafka producer")?;
            tasks.spawn(exporter.run(bus.clone(), shutdown.clone()));
        }
        let auth =
            crate::auth::AuthService::open(store.db(), cfg.auth.clone()).await.context("opening the user store")?;
        if auth.store.count_users().await? == 0 {
            tracing::warn!("no users yet: create the first admin with `its-aggregator user add <name> --role admin`");
        }
        tasks.spawn({
            let auth = Arc::clone(&auth);
            let sd = shutdown.clone();
            async move {
                auth.run_upkeep(sd).await;
                Ok(())
            }
        });
        let access =
            crate::http::access_map().map_err(|e| anyhow::anyhow!("endpoints without a declared permission: {e}"))?;
        let app = router(AppState {
            store: store.clone(),
            snapshots,
            metrics,
            trusted_proxies: Arc::new(cfg.http_trusted_proxies.clone()),
            auth,
            fleet: crate::store::fleet::Fleet::new(store.db()),
            access: Arc::new(access),
            bus: bus.clone(),
            shutdown: shutdown.clone(),
            alert_targets: cfg.alerts.targets.clone(),
        });
        let tls = match https {
            Some(cert) => {
                let tls = transport::server_config(Arc::clone(&cert))?;
                tasks.spawn(cert.watch(transport::RELOAD_INTERVAL, shutdown.clone()));
                Some(tls)
            }
            None => None,
        };
        tasks.spawn(transport::serve(listener, app, tls, cfg.http_limits, shutdown.clone()));
        if let Some(path) = ready_file {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec(&addrs)?).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(Self { addrs, store, mqtt, tasks })
    }

    /// Waits until every task ended (after shutdown), returning the first error.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        while let Some(r) = self.tasks.join_next().await {
            r??;
        }
        Ok(())
    }
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..s + 3], user, &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_passwords_only() {
        assert_eq!(super::redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(super::redact("sqlite:///x.db"), "sqlite:///x.db");
    }
}
