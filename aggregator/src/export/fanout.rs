//! Redis pub/sub fan-out of the bus between aggregator replicas.
//!
//! Each replica publishes what it committed itself (the LOCAL messages of its
//! [`EventBus`](crate::bus::EventBus)) to one Redis channel, as JSON
//! `{"replica": "<id>", "message": <BusMessage>}`, and subscribes to the same channel: messages
//! of other replicas are republished on its bus with
//! [`EventBus::publish_remote`](crate::bus::EventBus::publish_remote), its own are dropped (no
//! echo). Remote messages feed live views only (`GET /api/v1/stream`); everything that acts or
//! exports takes local messages, so each commit is acted on once across the replicas.
//!
//! Pub/sub is fire-and-forget: while Redis cannot be reached, messages are not fanned out (they are
//! stored, and the REST API and the exports still have them). Both directions reconnect with
//! exponential backoff; failures are counted in [`FANOUT_ERRORS`], messages in
//! [`FANOUT_PUBLISHED`] and [`FANOUT_RECEIVED`].

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use its_shared::config::ConfigErrors;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::bus::{BusMessage, EventBus};
use crate::telemetry::export::{FANOUT_DROPPED, FANOUT_ERRORS, FANOUT_PUBLISHED, FANOUT_RECEIVED};

/// Default channel name.
pub const DEFAULT_CHANNEL: &str = "its-aggregator:bus";

/// `[redis]` as written in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRedis {
    /// `redis://[user:password@]host:port[/db]`; empty (the default): no fan-out.
    pub url: String,
    /// The pub/sub channel every replica of one deployment shares.
    pub channel: String,
    /// This replica's id (`[A-Za-z0-9._-]`, 1..=64); empty (the default): a random one at start.
    pub replica_id: String,
    /// Longest wait between reconnection attempts, ms (100..=60000).
    pub reconnect_max_ms: u64,
}

impl Default for RawRedis {
    fn default() -> Self {
        Self {
            url: String::new(),
            channel: DEFAULT_CHANNEL.to_owned(),
            replica_id: String::new(),
            reconnect_max_ms: 5000,
        }
    }
}

/// `[redis]`, validated.
#[derive(Debug, Clone, Default)]
pub struct RedisConfig {
    /// `None`: fan-out off.
    pub url: Option<String>,
    pub channel: String,
    /// Empty: random at start.
    pub replica_id: String,
    pub reconnect_max: Duration,
}

impl RawRedis {
    /// The validated settings; problems are pushed to `e` with their paths.
    pub fn validate(&self, e: &mut ConfigErrors) -> RedisConfig {
        let url = self.url.trim();
        let url = if url.is_empty() {
            None
        } else if !(url.starts_with("redis://") || url.starts_with("redis+unix://") || url.starts_with("unix://")) {
            e.push("redis.url", "must be redis://HOST:PORT[/DB] (or redis+unix:///PATH)");
            None
        } else if let Err(err) = redis::Client::open(url) {
            e.push("redis.url", format!("invalid: {err}"));
            None
        } else {
            Some(url.to_owned())
        };
        e.check(
            !self.channel.is_empty() && self.channel.len() <= 256 && !self.channel.chars().any(char::is_control),
            "redis.channel",
            || "must be 1 to 256 characters without control characters".to_owned(),
        );
        e.check(
            self.replica_id.is_empty()
                || (self.replica_id.len() <= 64
                    && self.replica_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))),
            "redis.replica_id",
            || "must be empty or 1 to 64 of [A-Za-z0-9._-]".to_owned(),
        );
        e.check((100..=60_000).contains(&self.reconnect_max_ms), "redis.reconnect_max_ms", || {
            "must be 100..=60000".to_owned()
        });
        RedisConfig {
            url,
            channel: self.channel.clone(),
            replica_id: self.replica_id.clone(),
            reconnect_max: Duration::from_millis(self.reconnect_max_ms),
        }
    }
}

/// What goes over the channel (as published).
#[derive(Debug, Serialize)]
pub struct OutEnvelope<'a> {
    /// The replica that committed it.
    pub replica: &'a str,
    pub message: &'a BusMessage,
}

/// What goes over the channel (as received).
#[derive(Debug, Deserialize)]
pub struct Envelope {
    pub replica: String,
    pub message: BusMessage,
}

fn error(op: &'static str) {
    metrics::counter!(FANOUT_ERRORS, "op" => op).increment(1);
}

/// The fan-out of one replica: a publisher and a subscriber task, until shutdown.
pub struct Fanout {
    client: redis::Client,
    channel: String,
    replica: String,
    reconnect_max: Duration,
    bus: EventBus,
}

impl Fanout {
    /// `None` when `[redis] url` is empty.
    pub fn new(cfg: &RedisConfig, bus: EventBus) -> anyhow::Result<Option<Self>> {
        let Some(url) = &cfg.url else { return Ok(None) };
        let client = redis::Client::open(url.as_str())?;
        let replica = if cfg.replica_id.is_empty() {
            format!("r-{:016x}", rand::random::<u64>())
        } else {
            cfg.replica_id.clone()
        };
        Ok(Some(Self { client, channel: cfg.channel.clone(), replica, reconnect_max: cfg.reconnect_max, bus }))
    }

    /// This replica's id on the channel.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Runs both directions until `shutdown` turns true.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        tracing::info!(channel = %self.channel, replica = %self.replica, "redis fan-out on");
        let this = Arc::new(self);
        // Subscribe to the bus before anything else, so nothing committed from now on is missed.
        let rx = this.bus.subscribe("redis-fanout");
        let publisher = tokio::spawn(Arc::clone(&this).publish_loop(rx, shutdown.clone()));
        let subscriber = tokio::spawn(Arc::clone(&this).subscribe_loop(shutdown));
        let _ = tokio::join!(publisher, subscriber);
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = Duration::from_millis(100).saturating_mul(1u32 << attempt.min(10));
        base.min(self.reconnect_max)
    }

    async fn publish_loop(self: Arc<Self>, mut rx: crate::bus::BusReceiver, mut shutdown: watch::Receiver<bool>) {
        let mut conn: Option<redis::aio::MultiplexedConnection> = None;
        let mut attempt = 0u32;
        let mut retry_at = tokio::time::Instant::now();
        loop {
            let message = tokio::select! {
                m = rx.recv_local() => match m { Some(m) => m, None => return },
                _ = shutdown.wait_for(|s| *s) => return,
            };
            if conn.is_none() {
                if tokio::time::Instant::now() < retry_at {
                    metrics::counter!(FANOUT_DROPPED).increment(1);
                    continue;
                }
                match self.client.get_multiplexed_async_connection().await {
                    Ok(c) => {
                        attempt = 0;
                        conn = Some(c);
                    }
                    Err(err) => {
                        error("connect");
                        tracing::warn!(error = %err, "redis fan-out: cannot connect to publish");
                        retry_at = tokio::time::Instant::now() + self.backoff(attempt);
                        attempt = attempt.saturating_add(1);
                        metrics::counter!(FANOUT_DROPPED).increment(1);
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            let text = match serde_json::to_string(&OutEnvelope { replica: self.replica.as_str(), message: &message }) {
                Ok(t) => t,
                Err(err) => {
                    error("encode");
                    tracing::warn!(error = %err, "redis fan-out: cannot encode a bus message");
                    continue;
                }
            };
            let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH").arg(&self.channel).arg(text).query_async(c).await;
            match sent {
                Ok(_) => metrics::counter!(FANOUT_PUBLISHED).increment(1),
                Err(err) => {
                    error("publish");
                    metrics::counter!(FANOUT_DROPPED).increment(1);
                    tracing::warn!(error = %err, "redis fan-out: publish failed; reconnecting");
                    conn = None;
                    retry_at = tokio::time::Instant::now() + self.backoff(attempt);
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    async fn subscribe_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut attempt = 0u32;
        loop {
            let connected = tokio::select! {
                r = self.subscribe_once() => r,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            match connected {
                // The stream ended after a working subscription: start the backoff afresh.
                Ok(()) => attempt = 0,
                Err(err) => {
                    error("subscribe");
                    tracing::warn!(error = %err, "redis fan-out: subscription failed");
                }
            }
            let wait = self.backoff(attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// One subscription: until the connection ends. `Err` when it could not be set up.
    async fn subscribe_once(&self) -> redis::RedisResult<()> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(&self.channel).await?;
        tracing::info!(channel = %self.channel, "redis fan-out subscribed");
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let payload: Vec<u8> = msg.get_payload_bytes().to_vec();
            match serde_json::from_slice::<Envelope>(&payload) {
                Ok(env) if env.replica == self.replica => {}
                Ok(env) => {
                    metrics::counter!(FANOUT_RECEIVED).increment(1);
                    self.bus.publish_remote(Arc::new(env.message));
                }
                Err(err) => {
                    error("decode");
                    tracing::warn!(error = %err, "redis fan-out: undecodable message on the channel");
                }
            }
        }
        tracing::warn!("redis fan-out: subscription connection ended; reconnecting");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(raw: &RawRedis) -> (RedisConfig, Vec<String>) {
        let mut e = ConfigErrors::new("test");
        let cfg = raw.validate(&mut e);
        (cfg, e.issues.iter().map(|i| i.path.clone()).collect())
    }

    #[test]
    fn off_by_default_and_checked() {
        let (cfg, errors) = validate(&RawRedis::default());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(cfg.url, None);
        let raw = RawRedis {
            url: "http://127.0.0.1:6379".into(),
            channel: String::new(),
            replica_id: "a b".into(),
            reconnect_max_ms: 5,
        };
        let (_, errors) = validate(&raw);
        assert_eq!(errors, vec!["redis.url", "redis.channel", "redis.replica_id", "redis.reconnect_max_ms"]);
        let raw = RawRedis { url: "redis://127.0.0.1:6390/2".into(), ..RawRedis::default() };
        let (cfg, errors) = validate(&raw);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(cfg.url.as_deref(), Some("redis://127.0.0.1:6390/2"));
    }

    #[test]
    fn envelopes_round_trip() {
        let m = BusMessage::DeviceStatus { device: "d".into(), online: true, at_ms: 3 };
        let text = serde_json::to_string(&OutEnvelope { replica: "r1", message: &m }).expect("json");
        let back: Envelope = serde_json::from_str(&text).expect("parse");
        assert_eq!((back.replica.as_str(), back.message), ("r1", m));
    }
}
