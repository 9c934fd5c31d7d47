//! The in-process bus: what this aggregator has just committed, for everything that acts on it
//! or hands it on (alert rules, MQTT for third parties, Kafka export, live views, rollups).
//!
//! A message is published only after its database commit, so nothing downstream ever sees an
//! event that storage could still lose. The bus is a bounded broadcast: a consumer that falls
//! more than [`BUS_CAPACITY`] messages behind loses the oldest ones and is told how many
//! ([`BusReceiver::recv`] counts them in [`crate::telemetry`]); consumers that must not lose
//! anything (Kafka export, rollups) read the database and use the bus only as a wake-up.
//!
//! Messages carry their [`Origin`]: `Local` for what this replica committed, `Remote` for what
//! another replica committed and Redis fanned out to this one. Only live views take remote
//! messages; everything that acts (alerts, exports, MQTT) takes local ones, so each commit is
//! acted on exactly once across the replicas.

use std::sync::Arc;

use its_shared::event::{DeviceHealth, EventEnvelope};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Messages kept for a slow consumer before it loses the oldest.
pub const BUS_CAPACITY: usize = 8192;

/// What happened, as the bus carries it (also the JSON that Redis fans out between replicas).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BusMessage {
    /// Events of one device newly committed (duplicates that storage refused are not included).
    Events(CommittedEvents),
    /// A device's health report was stored.
    Health { device: String, at_ms: i64, health: DeviceHealth },
    /// A device connected (`online: true`) or its connection ended.
    DeviceStatus { device: String, online: bool, at_ms: i64 },
    /// An alert was opened, acknowledged, resolved or escalated (the alert's public JSON form).
    Alert { alert: serde_json::Value },
    /// The analytics flagged something unusual (the anomaly's public JSON form, see
    /// [`crate::analytics`]).
    Anomaly { anomaly: serde_json::Value },
    /// A rollup bucket was (re)computed: the metric row's public JSON form as
    /// `GET /api/v1/metrics` serves it (see [`crate::analytics`]).
    Rollup { rollup: serde_json::Value },
}

/// Events of one device, committed together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommittedEvents {
    /// From the device's client certificate (or its broker credentials on the MQTT uplink).
    pub device: String,
    pub events: Vec<EventEnvelope>,
    /// When the commit finished, Unix ms (aggregator clock).
    pub committed_at_ms: i64,
}

/// Where a message was committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// This replica.
    Local,
    /// Another replica, via Redis.
    Remote,
}

/// A message with its origin.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub origin: Origin,
    pub message: Arc<BusMessage>,
}

/// The bus: cheap to clone, every clone publishes to the same subscribers.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Delivered>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(BUS_CAPACITY);
        Self { tx }
    }

    /// Publishes what this replica committed.
    pub fn publish(&self, message: BusMessage) {
        self.send(Origin::Local, Arc::new(message));
    }

    /// Publishes what another replica committed (called by the Redis fan-out only).
    pub fn publish_remote(&self, message: Arc<BusMessage>) {
        self.send(Origin::Remote, message);
    }

    fn send(&self, origin: Origin, message: Arc<BusMessage>) {
        // An error only means nobody listens right now.
        let _ = self.tx.send(Delivered { origin, message });
    }

    /// A new subscriber; it sees what is published from now on. `name` labels its losses.
    pub fn subscribe(&self, name: &'static str) -> BusReceiver {
        BusReceiver { rx: self.tx.subscribe(), name }
    }
}

/// One subscriber.
#[derive(Debug)]
pub struct BusReceiver {
    rx: broadcast::Receiver<Delivered>,
    name: &'static str,
}

impl BusReceiver {
    /// The next message; `None` once every publisher is gone. Messages lost because this
    /// subscriber fell behind are counted (`its_bus_lagged_total{consumer}`) and logged, and the
    /// receiver goes on with the oldest message still kept.
    pub async fn recv(&mut self) -> Option<Delivered> {
        loop {
            match self.rx.recv().await {
                Ok(m) => return Some(m),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    crate::telemetry::bus_lagged(self.name, n);
                    tracing::warn!(consumer = self.name, lost = n, "fell behind the event bus");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next message committed by this replica (remote ones are skipped).
    pub async fn recv_local(&mut self) -> Option<Arc<BusMessage>> {
        loop {
            let m = self.recv().await?;
            if m.origin == Origin::Local {
                return Some(m.message);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(device: &str) -> BusMessage {
        BusMessage::DeviceStatus { device: device.into(), online: true, at_ms: 1 }
    }

    #[tokio::test]
    async fn subscribers_see_messages_after_they_subscribed_with_origin() {
        let bus = EventBus::new();
        bus.publish(status("early"));
        let mut rx = bus.subscribe("test");
        bus.publish(status("a"));
        bus.publish_remote(Arc::new(status("b")));
        bus.publish(status("c"));
        let first = rx.recv().await.expect("message");
        assert_eq!((first.origin, &*first.message), (Origin::Local, &status("a")));
        let second = rx.recv().await.expect("message");
        assert_eq!(second.origin, Origin::Remote);
        // recv_local skips the remote one.
        let mut local = bus.subscribe("local");
        bus.publish_remote(Arc::new(status("x")));
        bus.publish(status("y"));
        assert_eq!(&*local.recv_local().await.expect("local"), &status("y"));
    }

    #[tokio::test]
    async fn a_lagging_subscriber_goes_on_with_what_is_kept() {
        let bus = EventBus::new();
        let mut rx = bus.subscribe("slow");
        for i in 0..(BUS_CAPACITY + 10) {
            bus.publish(BusMessage::DeviceStatus { device: "d".into(), online: true, at_ms: i as i64 });
        }
        let m = rx.recv().await.expect("message");
        let BusMessage::DeviceStatus { at_ms, .. } = &*m.message else { panic!("unexpected message") };
        assert_eq!(*at_ms, 10, "the 10 oldest were lost, the rest kept");
    }

    #[test]
    fn messages_round_trip_through_json() {
        let m = BusMessage::Events(CommittedEvents { device: "d".into(), events: vec![], committed_at_ms: 5 });
        let text = serde_json::to_string(&m).expect("json");
        assert!(text.contains(r#""type":"events""#), "{text}");
        assert_eq!(serde_json::from_str::<BusMessage>(&text).expect("parse"), m);
    }
}
