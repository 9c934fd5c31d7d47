//! The publisher: what this replica committed (the bus, local messages only), as MQTT messages
//! for third parties ([`super::topics`]), QoS 1, through one MQTT connection (to the embedded
//! broker or an external one).
//!
//! The connection's last will is `its/v1/aggregator/{id}/status` = `offline` (retained); after
//! each CONNACK the publisher sets it `online` (retained), and on a clean shutdown `offline`
//! again before disconnecting. Publishing never blocks the bus: when the client's queue is full
//! (the broker unreachable for long), messages are dropped and counted
//! (`its_mqtt_dropped_total`); what the broker did not acknowledge yet is resent by the client
//! after a reconnect.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
use serde_json::Value;
use tokio::sync::watch;

use super::ExternalBroker;
use super::topics;
use crate::bus::{BusMessage, BusReceiver};
use crate::store::{Db, Fleet, Scope, StoreError};
use crate::telemetry::mqtt::{CONNECTION_ERRORS, DROPPED, PUBLISHED};

/// How long a camera's site is trusted after reading it.
pub const SITE_TTL: Duration = Duration::from_secs(5);
/// Messages the client queues while the broker is slow or away.
pub const QUEUE: usize = 10_000;

/// Options for an external broker.
pub fn external_options(ext: &ExternalBroker, id: &str) -> anyhow::Result<MqttOptions> {
    let mut o = MqttOptions::new(format!("its-aggregator-{id}"), ext.host.clone(), ext.port);
    if !ext.username.is_empty() {
        o.set_credentials(ext.username.clone(), ext.password.clone());
    }
    if ext.tls {
        use rustls_pki_types::pem::PemObject as _;
        let path = ext.ca_file.clone().unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(&path)
            .with_context(|| format!("mqtt.ca_file: reading {}", path.display()))?
        {
            let cert = cert.with_context(|| format!("mqtt.ca_file: {}", path.display()))?;
            roots.add(cert).with_context(|| format!("mqtt.ca_file: {}", path.display()))?;
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(cfg))));
    }
    Ok(o)
}

/// Turns bus messages into MQTT messages.
pub struct Publisher {
    fleet: Fleet,
    id: String,
    sites: HashMap<(String, String), (Instant, Option<String>)>,
}

impl Publisher {
    pub fn new(db: Db, id: String) -> Self {
        Self { fleet: Fleet::new(db), id, sites: HashMap::new() }
    }

    /// The effective site of a camera (cached for [`SITE_TTL`]).
    async fn site(&mut self, device: &str, camera: &str) -> Option<String> {
        let key = (device.to_owned(), camera.to_owned());
        if let Some((at, site)) = self.sites.get(&key)
            && at.elapsed() < SITE_TTL
        {
            return site.clone();
        }
        let site = match self.fleet.get_camera(device, camera, &Scope::All).await {
            Ok(c) => c.site_id,
            Err(StoreError::NotFound(_)) => None,
            Err(e) => {
                tracing::warn!(error = %e, device, camera, "MQTT: cannot read the camera's site");
                return None;
            }
        };
        if self.sites.len() > 100_000 {
            self.sites.clear();
        }
        self.sites.insert(key, (Instant::now(), site.clone()));
        site
    }

    /// The MQTT messages of one bus message: (topic, retained, JSON).
    pub async fn messages(&mut self, m: &BusMessage) -> Vec<(String, bool, Value)> {
        let mut out = Vec::new();
        match m {
            BusMessage::Events(batch) => {
                for e in &batch.events {
                    if matches!(e.kind, its_shared::event::EventKind::DeviceHealth(_)) {
                        continue;
                    }
                    let site = self.site(&batch.device, &e.camera).await;
                    let topic = topics::event_topic(site.as_deref(), &e.camera, e.kind.name());
                    out.push((topic, false, topics::event_payload(&batch.device, site.as_deref(), e)));
                }
            }
            BusMessage::DeviceStatus { device, online, at_ms } => {
                out.push((
                    topics::device_status_topic(device),
                    true,
                    topics::device_status_payload(device, *online, *at_ms),
                ));
            }
            BusMessage::Alert { alert } => {
                let severity = alert.get("severity").and_then(Value::as_str).unwrap_or("unknown");
                out.push((topics::alert_topic(severity), false, alert.clone()));
            }
            BusMessage::Anomaly { anomaly } => {
                let device = anomaly.get("device").and_then(Value::as_str);
                let camera = anomaly.get("camera").and_then(Value::as_str);
                if let (Some(device), Some(camera)) = (device, camera) {
                    let site = self.site(device, camera).await;
                    let mut payload = anomaly.clone();
                    if let Value::Object(map) = &mut payload {
                        map.entry("kind").or_insert_with(|| "anomaly".into());
                        map.entry("site").or_insert_with(|| site.clone().into());
                    }
                    out.push((topics::event_topic(site.as_deref(), camera, "anomaly"), false, payload));
                }
            }
            BusMessage::Health { .. } | BusMessage::Rollup { .. } => {}
        }
        out
    }

    /// Runs until `shutdown`: connects with `options` (the last will is set here) and publishes
    /// what `rx` delivers.
    pub async fn run(
        mut self,
        mut options: MqttOptions,
        mut rx: BusReceiver,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let status_topic = topics::aggregator_status_topic(&self.id);
        let offline = serde_json::to_vec(&topics::aggregator_status_payload(&self.id, false, None))?;
        options
            .set_last_will(LastWill::new(status_topic.clone(), offline, QoS::AtLeastOnce, true))
            .set_keep_alive(Duration::from_secs(15))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, eventloop) = AsyncClient::new(options, QUEUE);
        let (done_tx, done_rx) = watch::channel(false);
        let driver = tokio::spawn(drive(eventloop, client.clone(), self.id.clone(), status_topic.clone(), done_rx));
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                m = rx.recv_local() => {
                    let Some(m) = m else { break };
                    for (topic, retain, payload) in self.messages(&m).await {
                        publish(&client, topic, retain, &payload);
                    }
                }
            }
        }
        let offline = topics::aggregator_status_payload(&self.id, false, Some(crate::unix_ms()));
        publish(&client, status_topic, true, &offline);
        let _ = client.try_disconnect();
        let _ = done_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(3), driver).await;
        Ok(())
    }
}

fn publish(client: &AsyncClient, topic: String, retain: bool, payload: &Value) {
    let bytes = match serde_json::to_vec(payload) {
        Ok(b) => b,
        Err(_) => return,
    };
    match client.try_publish(topic, QoS::AtLeastOnce, retain, bytes) {
        Ok(()) => metrics::counter!(PUBLISHED).increment(1),
        Err(e) => {
            metrics::counter!(DROPPED).increment(1);
            tracing::debug!(error = %e, "MQTT: message dropped");
        }
    }
}

/// Polls the connection: reconnects after errors (backing off to 5 s), marks the aggregator
/// online after each CONNACK, and after `done` only finishes sending (until the DISCONNECT).
async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    id: String,
    status_topic: String,
    done: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if failures > 0 {
                    tracing::info!("MQTT: connected again");
                }
                failures = 0;
                tracing::debug!(?ack, "MQTT: connected");
                let online = topics::aggregator_status_payload(&id, true, Some(crate::unix_ms()));
                publish(&client, status_topic.clone(), true, &online);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                if *done.borrow() {
                    return;
                }
                failures += 1;
                if failures == 1 {
                    tracing::warn!(error = %e, "MQTT: connection failed; retrying");
                }
                metrics::counter!(CONNECTION_ERRORS).increment(1);
                let wait = Duration::from_millis(200u64.saturating_mul(1 << failures.min(5)).min(5_000));
                tokio::time::sleep(wait).await;
            }
        }
    }
}
