//! The delivery worker: takes due deliveries from the database, attempts each on its channel,
//! records every attempt, retries with exponential backoff and dead-letters.
//!
//! **Webhooks.** `POST <url>` with the JSON body `{"event": "alert.opened" | "alert.escalated",
//! "alert": {...}}` (the alert's public form when the delivery was queued; the same bytes on
//! every retry) and the headers
//! - `X-ITS-Timestamp: <Unix seconds when the attempt was made>`,
//! - `X-ITS-Signature: sha256=<hex of HMAC-SHA256(key = the channel's secret,
//!   message = "<X-ITS-Timestamp>.<raw body>")>`,
//! - `X-ITS-Delivery: <delivery id>` (the same on retries: use it to drop duplicates) and
//!   `X-ITS-Attempt: <n>`.
//!
//! A receiver recomputes the HMAC over the timestamp, a `.` and the raw body bytes, compares in
//! constant time, and refuses a timestamp too far from its clock (5 minutes, say): a captured
//! request cannot be replayed later, and the timestamp cannot be changed without the secret.
//! 2xx is delivered; 408, 429, 5xx, redirects and network errors are retried; any other 4xx is a
//! permanent failure (dead-lettered at once).
//!
//! **MQTT.** A QoS 1 publish of the same body to `its/v1/alerts/{severity}` (or the channel's
//! topic, `{severity}` replaced), delivered when the broker's PUBACK arrives.
//!
//! **E-mail.** A plain-text message over SMTP (lettre, rustls), subject
//! `[ITS <severity>] <title>`; the SMTP server's permanent (5xx) answers are permanent failures.
//!
//! Retries wait `retry_base_ms * 2^(n-1)` (at most `retry_max_ms`) after the n-th failed
//! attempt; after the channel's `max_attempts` the delivery is dead (listed by
//! `GET /api/v1/alert-deliveries/dead`, put back with `POST .../{id}/retry`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{Notify, watch};

use super::AlertsConfig;
use super::model::{ChannelTarget, SmtpSecurity, SmtpSpec};
use super::store::{AlertStore, AttemptResult, Delivery};
use crate::clock::SharedClock;
use crate::store::{Db, StoreError};
use crate::telemetry::alerts::{DELIVERY_ATTEMPTS_TOTAL, DELIVERY_LATENCY_SECONDS};

/// How long a taken delivery is leased to this worker beyond its time limit.
const LEASE_MARGIN_MS: i64 = 30_000;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "X-ITS-Signature";
/// The header carrying the signed timestamp.
pub const TIMESTAMP_HEADER: &str = "X-ITS-Timestamp";

/// `sha256=<hex>` of HMAC-SHA256 over `"<timestamp>.<body>"` with `secret`.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let mut ctx = aws_lc_rs::hmac::Context::with_key(&key);
    ctx.update(timestamp.as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let mut out = String::from("sha256=");
    for b in tag.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The delivery worker.
pub struct Notifier {
    store: AlertStore,
    cfg: AlertsConfig,
    /// Where "now" comes from: due and retry times, the webhook timestamp.
    clock: SharedClock,
    wake: Arc<Notify>,
    http: Option<reqwest::Client>,
}

impl Notifier {
    pub fn new(db: Db, cfg: AlertsConfig, clock: SharedClock, wake: Arc<Notify>) -> Self {
        // reqwest's rustls takes the process's default provider: the one the rest uses.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.delivery_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            // Names resolve only to addresses notifications may reach (see `targets`).
            .dns_resolver(cfg.targets.resolver())
            .no_proxy()
            .user_agent(concat!("its-aggregator/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| tracing::error!(error = %e, "no HTTP client for webhooks"))
            .ok();
        Self { store: AlertStore::new(db), cfg, clock, wake, http }
    }

    /// Runs until shutdown; attempts in flight finish first.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let me = Arc::new(self);
        let mut inflight = tokio::task::JoinSet::new();
        let poll = Duration::from_millis(me.cfg.poll_interval_ms);
        loop {
            if *shutdown.borrow() {
                break;
            }
            let mut wait = poll;
            let free = me.cfg.concurrency.saturating_sub(inflight.len());
            if free > 0 {
                let now = me.clock.now_ms();
                let lease = now + i64::try_from(me.cfg.delivery_timeout_ms).unwrap_or(i64::MAX / 4) + LEASE_MARGIN_MS;
                match me.store.claim_due(now, lease, i64::try_from(free).unwrap_or(1)).await {
                    Ok(batch) => {
                        let full = batch.len() == free;
                        for d in batch {
                            let me = Arc::clone(&me);
                            inflight.spawn(async move { me.attempt(d).await });
                        }
                        if !full && let Ok(Some(next)) = me.store.next_due_ms().await {
                            let until = u64::try_from(next - me.clock.now_ms()).unwrap_or(0);
                            wait = wait.min(Duration::from_millis(until));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "reading the alert delivery queue"),
                }
            }
            tokio::select! {
                _ = me.wake.notified() => {}
                _ = super::delivery_wake().notified() => {}
                Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
        while inflight.join_next().await.is_some() {}
    }

    async fn attempt(&self, d: Delivery) {
        let started = Instant::now();
        let channel = match self.store.get_channel(d.channel_id).await {
            Ok(c) => Some(c),
            Err(StoreError::NotFound(_)) => None,
            Err(e) => {
                // The lease runs out and the delivery is taken again.
                tracing::warn!(error = %e, delivery = d.delivery_id, "reading an alert channel");
                return;
            }
        };
        let n = d.attempts + 1;
        let (kind, max_attempts, result) = match &channel {
            None => (
                "none",
                1,
                AttemptResult {
                    delivered: false,
                    permanent: true,
                    http_status: None,
                    error: Some(format!("channel {} no longer exists", d.channel_id)),
                    latency_ms: 0,
                },
            ),
            Some(c) => {
                let limit = Duration::from_millis(self.cfg.delivery_timeout_ms);
                let r = match tokio::time::timeout(limit, self.send(&c.spec.target, &d, n)).await {
                    Ok(r) => r,
                    Err(_) => Outcome::retry(None, format!("no answer within {} ms", self.cfg.delivery_timeout_ms)),
                };
                let result = AttemptResult {
                    delivered: r.delivered,
                    permanent: r.permanent,
                    http_status: r.http_status,
                    error: r.error,
                    latency_ms: i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX),
                };
                (c.spec.target.kind(), c.spec.max_attempts(), result)
            }
        };
        let now = self.clock.now_ms();
        let round = u32::try_from((n - d.round_start).max(1)).unwrap_or(u32::MAX);
        let backoff = self
            .cfg
            .retry_base_ms
            .saturating_mul(1u64.checked_shl(round.saturating_sub(1).min(40)).unwrap_or(u64::MAX))
            .min(self.cfg.retry_max_ms);
        let retry_at = now.saturating_add(i64::try_from(backoff).unwrap_or(i64::MAX / 4));
        match self.store.record_attempt(&d, &result, max_attempts, retry_at, now).await {
            Ok(state) => {
                let outcome = match state {
                    "pending" => "retry",
                    other => other,
                };
                metrics::counter!(DELIVERY_ATTEMPTS_TOTAL, "kind" => kind, "outcome" => outcome).increment(1);
                if result.delivered {
                    metrics::histogram!(DELIVERY_LATENCY_SECONDS, "kind" => kind)
                        .record((now - d.created_at_ms).max(0) as f64 / 1000.0);
                }
                if state == "dead" {
                    tracing::warn!(
                        delivery = d.delivery_id,
                        alert = d.alert_id,
                        channel = d.channel_id,
                        error = result.error.as_deref().unwrap_or(""),
                        "alert delivery dead-lettered"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, delivery = d.delivery_id, "recording an alert delivery attempt"),
        }
    }

    async fn send(&self, target: &ChannelTarget, d: &Delivery, attempt: i64) -> Outcome {
        match target {
            ChannelTarget::Webhook { url, secret } => self.webhook(url, secret, d, attempt).await,
            ChannelTarget::Mqtt { broker, username, password, topic } => {
                mqtt(&self.cfg.targets, broker, username.as_deref(), password.as_deref(), topic.as_deref(), d).await
            }
            ChannelTarget::Email { to, smtp } => match smtp.as_ref().or(self.cfg.smtp.as_ref()) {
                Some(server) => {
                    if let Err(e) = self.cfg.targets.resolve(&server.host, server.port).await {
                        return Outcome::permanent(None, e);
                    }
                    email(server, to, d, self.cfg.delivery_timeout_ms).await
                }
                None => Outcome::permanent(None, "no SMTP server: set [alerts.smtp] or the channel's smtp".into()),
            },
        }
    }

    async fn webhook(&self, url: &str, secret: &str, d: &Delivery, attempt: i64) -> Outcome {
        let Some(http) = &self.http else { return Outcome::retry(None, "no HTTP client".into()) };
        // An address literal never reaches the resolver: check it here.
        if let Some(host) = url::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_owned))
            && let Err(e) = self.cfg.targets.check_host(&host)
        {
            return Outcome::permanent(None, e);
        }
        let timestamp = (self.clock.now_ms() / 1000).to_string();
        let signature = sign(secret.as_bytes(), &timestamp, d.payload.as_bytes());
        let resp = http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, &timestamp)
            .header(SIGNATURE_HEADER, signature)
            .header("X-ITS-Delivery", d.delivery_id.to_string())
            .header("X-ITS-Attempt", attempt.to_string())
            .body(d.payload.clone())
            .send()
            .await;
        match resp {
            Ok(r) => {
                let status = r.status().as_u16();
                if r.status().is_success() {
                    Outcome { delivered: true, permanent: false, http_status: Some(status), error: None }
                } else if r.status().is_client_error() && status != 408 && status != 429 {
                    Outcome::permanent(Some(status), format!("HTTP {status}"))
                } else {
                    Outcome::retry(Some(status), format!("HTTP {status}"))
                }
            }
            Err(e) => Outcome::retry(None, error_chain(&e)),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// What one attempt gave.
struct Outcome {
    delivered: bool,
    permanent: bool,
    http_status: Option<u16>,
    error: Option<String>,
}

impl Outcome {
    fn retry(http_status: Option<u16>, error: String) -> Self {
        Self { delivered: false, permanent: false, http_status, error: Some(error) }
    }

    fn permanent(http_status: Option<u16>, error: String) -> Self {
        Self { delivered: false, permanent: true, http_status, error: Some(error) }
    }

    fn delivered() -> Self {
        Self { delivered: true, permanent: false, http_status: None, error: None }
    }
}

fn payload_severity(d: &Delivery) -> (Value, String) {
    let v: Value = serde_json::from_str(&d.payload).unwrap_or(Value::Null);
    let severity = v["alert"]["severity"].as_str().unwrap_or("info").to_owned();
    (v, severity)
}

async fn mqtt(
    targets: &super::targets::TargetPolicy,
    broker: &str,
    username: Option<&str>,
    password: Option<&str>,
    topic: Option<&str>,
    d: &Delivery,
) -> Outcome {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let Some(rest) = broker.strip_prefix("mqtt://") else {
        return Outcome::permanent(None, format!("unsupported broker URL {broker}"));
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(p) => (h, p),
            Err(_) => return Outcome::permanent(None, format!("bad port in {broker}")),
        },
        None => (rest, 1883),
    };
    // Connect to an address the policy allows (the name resolved here, not again later).
    let addr = match targets.resolve(host, port).await {
        Ok(addrs) => match addrs.first() {
            Some(a) => *a,
            None => return Outcome::retry(None, format!("{host}: no address")),
        },
        Err(e) if e.contains("not allowed") => return Outcome::permanent(None, e),
        Err(e) => return Outcome::retry(None, e),
    };
    let (_, severity) = payload_severity(d);
    let topic = topic.unwrap_or("its/v1/alerts/{severity}").replace("{severity}", &severity);
    let client_id = format!("its-alerts-{}-{}", d.delivery_id, rand::random::<u32>());
    let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(10));
    if let Some(u) = username {
        opts.set_credentials(u, password.unwrap_or(""));
    }
    let (client, mut events) = AsyncClient::new(opts, 10);
    if let Err(e) = client.publish(topic, QoS::AtLeastOnce, false, d.payload.clone().into_bytes()).await {
        return Outcome::retry(None, format!("MQTT publish: {e}"));
    }
    let outcome = loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => break Outcome::delivered(),
            Ok(Event::Incoming(Packet::ConnAck(ack))) if ack.code != rumqttc::ConnectReturnCode::Success => {
                let permanent = matches!(
                    ack.code,
                    rumqttc::ConnectReturnCode::BadUserNamePassword | rumqttc::ConnectReturnCode::NotAuthorized
                );
                let e = format!("MQTT broker refused the connection: {:?}", ack.code);
                break if permanent { Outcome::permanent(None, e) } else { Outcome::retry(None, e) };
            }
            Ok(_) => {}
            Err(e) => break Outcome::retry(None, format!("MQTT: {e}")),
        }
    };
    if outcome.delivered {
        let _ = client.disconnect().await;
        // Flush the DISCONNECT (best effort).
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            while let Ok(ev) = events.poll().await {
                if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
    outcome
}

async fn email(server: &SmtpSpec, to: &[String], d: &Delivery, timeout_ms: u64) -> Outcome {
    use lettre::message::header::ContentType;
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
    let (v, severity) = payload_severity(d);
    let alert = &v["alert"];
    let title = alert["title"].as_str().unwrap_or("alert");
    let event = v["event"].as_str().unwrap_or("alert.opened");
    let subject = format!("[ITS {severity}]{} {title}", if event == "alert.escalated" { " ESCALATED:" } else { "" });
    let body = format!(
        "{title}\n\nRule: {}\nSeverity: {severity}\nSubject: {}\nOpened: {}\nAlert id: {}\n\n{}\n",
        alert["rule_name"].as_str().unwrap_or(""),
        alert["subject"].as_str().unwrap_or(""),
        alert["opened_at"].as_str().unwrap_or(""),
        alert["alert_id"],
        serde_json::to_string_pretty(&v).unwrap_or_default(),
    );
    let from = match server.from.parse() {
        Ok(f) => f,
        Err(e) => return Outcome::permanent(None, format!("from address: {e}")),
    };
    let mut builder = Message::builder().from(from).subject(subject).header(ContentType::TEXT_PLAIN);
    for addr in to {
        match addr.parse() {
            Ok(a) => builder = builder.to(a),
            Err(e) => return Outcome::permanent(None, format!("address {addr}: {e}")),
        }
    }
    let message = match builder.body(body) {
        Ok(m) => m,
        Err(e) => return Outcome::permanent(None, format!("building the message: {e}")),
    };
    let transport = match server.security {
        SmtpSecurity::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&server.host),
        SmtpSecurity::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&server.host),
        SmtpSecurity::None => Ok(AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&server.host)),
    };
    let mut transport = match transport {
        Ok(t) => t.port(server.port).timeout(Some(Duration::from_millis(timeout_ms))),
        Err(e) => return Outcome::permanent(None, format!("SMTP: {e}")),
    };
    if let Some(user) = &server.username {
        transport = transport.credentials(Credentials::new(user.clone(), server.password.clone().unwrap_or_default()));
    }
    match transport.build().send(message).await {
        Ok(_) => Outcome::delivered(),
        Err(e) if e.is_permanent() => Outcome::permanent(None, format!("SMTP: {}", error_chain(&e))),
        Err(e) => Outcome::retry(None, format!("SMTP: {}", error_chain(&e))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: Python's hmac.new(b"Jefe", b'1700000000.{"a":1}', sha256).
        let sig = super::sign(b"Jefe", "1700000000", br#"{"a":1}"#);
        assert_eq!(sig, "sha256=fa5f6481efc59da48b19c9dc10196c9953e5651f8304b3a318b6b87d70272e0a");
    }
}
