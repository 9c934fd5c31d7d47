//! Alert rules, alerts and their notifications.
//!
//! What is inside:
//! - [`engine`]: evaluates what this replica committed (bus) against the rules, and a periodic
//!   check (devices offline, escalations, rule reloads); opens, bumps and resolves alerts.
//! - [`rules`]: the rules as the engine evaluates them, compiled once per version; matching of
//!   events and suppression windows (pure).
//! - [`notify`]: the delivery worker (webhook, MQTT, e-mail), with retries and dead letters.
//! - [`targets`]: where channels may connect (the network policy and its resolver).
//! - [`store`]: the alert tables, through [`AlertStore`].
//! - [`model`]: the rule and channel types, re-exported from [`crate::model::alerts`].
//! - here: the `[alerts]` configuration and [`service`], which runs the engine and the worker.
//!
//! May depend on: [`crate::store`], [`crate::bus`], [`crate::model`], [`crate::clock`],
//! [`crate::telemetry`], [`crate::netaddr`]. Never on `http` or `config` (they depend on this).
//! "Now" comes from the [`Clock`](crate::clock::Clock) given to [`service`]; periodic work runs
//! on `tokio::time` intervals.
//!
//! How it works:
//! - **Rules** ([`model::RuleSpec`]) are data, managed over the API (`/api/v1/alert-rules`,
//!   `rules:write`): a condition on events, on metrics (rollups and anomalies from
//!   [`crate::analytics`]) or on devices (offline, camera down, buffer evicting, fps collapsed,
//!   temperature), a filter (devices, cameras, sites), a severity, a dedupe window, suppression
//!   windows, the channels to notify and an escalation for critical alerts.
//! - **The engine** ([`engine`]) reads what this replica committed from the bus
//!   (`recv_local`): events, health reports and device connections, rollups and anomalies; a
//!   periodic check finds devices offline for too long and critical alerts to escalate. A firing
//!   either opens an alert (queuing its deliveries in the same transaction) or, for the same
//!   rule and subject within the dedupe window, bumps the `count` of the alert that is not
//!   resolved. Device conditions resolve their alert (as `system`) when they clear. Every alert
//!   that opens, is acknowledged, resolved or escalated is published on the bus
//!   ([`crate::bus::BusMessage::Alert`]).
//! - **Alerts** go `open` -> `acknowledged` -> `resolved` (or straight to `resolved`), with who
//!   and when, over `/api/v1/alerts` (`alerts:read`, `alerts:ack`), scoped like events.
//! - **Deliveries** ([`notify`]) live in the database (`alert_deliveries`): a worker, woken as
//!   soon as an alert opens, attempts each on its channel (webhook, MQTT, e-mail), records every
//!   attempt (`alert_delivery_attempts`), retries with exponential backoff and dead-letters after
//!   the channel's `max_attempts`; pending deliveries survive a restart.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use its_shared::config::ConfigErrors;
use serde::Deserialize;
use tokio::sync::{Notify, watch};

use crate::bus::EventBus;
use crate::clock::SharedClock;
use crate::store::Db;

pub mod engine;
pub mod notify;
pub mod rules;
pub mod targets;

/// The rule and channel types (now in [`crate::model::alerts`]); this path stays for callers.
pub mod model {
    pub use crate::model::alerts::schema::*;
    pub use crate::model::alerts::*;
}

pub use crate::store::alerts as store;
pub use model::{ChannelSpec, RuleSpec, Severity};
pub use store::{Alert, AlertStore};

/// `[alerts]` as written in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAlerts {
    /// Evaluate rules and deliver notifications (default true; with no rules nothing happens).
    pub enabled: bool,
    /// Milliseconds between the periodic checks: devices offline, escalations, rule reloads
    /// (100..=600000; default 10000).
    pub check_interval_ms: u64,
    /// Longest wait of the delivery worker between looks at the queue when nothing wakes it
    /// (50..=60000; default 1000).
    pub poll_interval_ms: u64,
    /// Delay before the first retry of a failed delivery; doubles with each attempt
    /// (10..=3600000; default 2000).
    pub retry_base_ms: u64,
    /// Longest delay between retries (>= retry_base_ms, <= 86400000; default 600000).
    pub retry_max_ms: u64,
    /// Time limit of one delivery attempt (100..=120000; default 10000).
    pub delivery_timeout_ms: u64,
    /// Deliveries attempted at once (1..=256; default 16).
    pub concurrency: usize,
    /// The SMTP server of e-mail channels that do not name one.
    pub smtp: Option<model::SmtpSpec>,
    /// Networks (CIDRs or addresses) channels may reach although they are loopback or
    /// link-local, e.g. `["127.0.0.1"]` for a relay on this host (default none: see
    /// [`targets`]).
    pub allowed_target_networks: Vec<String>,
}

impl Default for RawAlerts {
    fn default() -> Self {
        Self {
            enabled: true,
            check_interval_ms: 10_000,
            poll_interval_ms: 1_000,
            retry_base_ms: 2_000,
            retry_max_ms: 600_000,
            delivery_timeout_ms: 10_000,
            concurrency: 16,
            smtp: None,
            allowed_target_networks: Vec::new(),
        }
    }
}

/// `[alerts]`, validated.
#[derive(Debug, Clone)]
pub struct AlertsConfig {
    pub enabled: bool,
    pub check_interval_ms: u64,
    pub poll_interval_ms: u64,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    pub delivery_timeout_ms: u64,
    pub concurrency: usize,
    pub smtp: Option<model::SmtpSpec>,
    /// Where channels may connect.
    pub targets: targets::TargetPolicy,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        RawAlerts::default().validate(&mut ConfigErrors::default())
    }
}

impl RawAlerts {
    /// The validated settings; problems are pushed to `e` with their paths.
    pub fn validate(&self, e: &mut ConfigErrors) -> AlertsConfig {
        let range = |e: &mut ConfigErrors, path: &str, v: u64, lo: u64, hi: u64| {
            e.check((lo..=hi).contains(&v), path, || format!("must be between {lo} and {hi}, not {v}"));
        };
        range(e, "alerts.check_interval_ms", self.check_interval_ms, 100, 600_000);
        range(e, "alerts.poll_interval_ms", self.poll_interval_ms, 50, 60_000);
        range(e, "alerts.retry_base_ms", self.retry_base_ms, 10, 3_600_000);
        range(e, "alerts.retry_max_ms", self.retry_max_ms, self.retry_base_ms.max(10), 86_400_000);
        range(e, "alerts.delivery_timeout_ms", self.delivery_timeout_ms, 100, 120_000);
        e.check((1..=256).contains(&self.concurrency), "alerts.concurrency", || {
            format!("must be between 1 and 256, not {}", self.concurrency)
        });
        if let Some(smtp) = &self.smtp {
            let mut problems = Vec::new();
            smtp.check("alerts.smtp", &mut problems);
            for p in problems {
                e.push(p.path, p.message);
            }
        }
        let mut allowed = Vec::new();
        for (i, n) in self.allowed_target_networks.iter().enumerate() {
            match n.parse::<crate::netaddr::IpNet>() {
                Ok(net) => allowed.push(net),
                Err(err) => e.push(format!("alerts.allowed_target_networks[{i}]"), err.to_string()),
            }
        }
        AlertsConfig {
            enabled: self.enabled,
            check_interval_ms: self.check_interval_ms,
            poll_interval_ms: self.poll_interval_ms,
            retry_base_ms: self.retry_base_ms,
            retry_max_ms: self.retry_max_ms,
            delivery_timeout_ms: self.delivery_timeout_ms,
            concurrency: self.concurrency,
            smtp: self.smtp.clone(),
            targets: targets::TargetPolicy { allowed },
        }
    }
}

/// Bumped by every change of a rule through the API: the engine reloads its rules when it sees a
/// new value (and on every periodic check, for changes made through another replica).
static RULES_GENERATION: AtomicU64 = AtomicU64::new(0);

/// Wakes the delivery workers of this process (a dead letter put back in the queue).
static DELIVERY_WAKE: LazyLock<Notify> = LazyLock::new(Notify::new);

/// Tells the engines of this process that rules changed.
pub fn rules_changed() {
    RULES_GENERATION.fetch_add(1, Ordering::SeqCst);
}

pub(crate) fn rules_generation() -> u64 {
    RULES_GENERATION.load(Ordering::SeqCst)
}

/// Wakes the delivery workers of this process.
pub fn wake_deliveries() {
    DELIVERY_WAKE.notify_waiters();
}

pub(crate) fn delivery_wake() -> &'static Notify {
    &DELIVERY_WAKE
}

/// The alert engine and the delivery worker, until `shutdown`. Subscribes to the bus before it
/// returns, so nothing published after this call is missed.
///
/// `clock` is where both take "now" (alert times, offline devices, escalations, retry times):
/// [`SystemClock`](crate::clock::SystemClock) in the server, a
/// [`ManualClock`](crate::clock::ManualClock) in tests.
pub fn service(
    db: Db,
    bus: EventBus,
    cfg: AlertsConfig,
    clock: SharedClock,
    shutdown: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let rx = bus.subscribe("alerts");
    let wake = std::sync::Arc::new(Notify::new());
    let engine =
        engine::Engine::new(db.clone(), bus, cfg.clone(), std::sync::Arc::clone(&clock), std::sync::Arc::clone(&wake));
    let notifier = notify::Notifier::new(db, cfg, clock, wake);
    let sd = shutdown.clone();
    async move {
        tokio::join!(engine.run(rx, sd), notifier.run(shutdown));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_checks_every_field() {
        let raw: RawAlerts = toml::from_str(
            "check_interval_ms = 5\nretry_base_ms = 1000\nretry_max_ms = 10\nconcurrency = 0\n\
             [smtp]\nhost = \"bad host\"\nfrom = \"x\"\n",
        )
        .expect("parse");
        let mut e = ConfigErrors::default();
        raw.validate(&mut e);
        let paths: Vec<&str> = e.issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "alerts.check_interval_ms",
                "alerts.retry_max_ms",
                "alerts.concurrency",
                "alerts.smtp.host",
                "alerts.smtp.from"
            ]
        );
        let mut e = ConfigErrors::default();
        RawAlerts::default().validate(&mut e);
        assert!(e.is_empty(), "{e:?}");
    }
}
