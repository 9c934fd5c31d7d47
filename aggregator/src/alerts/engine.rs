//! The rule engine: what this replica committed (bus, `recv_local`) against the enabled rules,
//! plus a periodic check for devices offline too long, escalations and rule reloads. "Now" is
//! read from the engine's [`Clock`](crate::clock::Clock), once per message or check, and handed
//! down; the periodic check runs on a `tokio::time` interval (or is called directly:
//! [`Engine::check`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use its_shared::event::{DeviceHealth, EventEnvelope};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use super::AlertsConfig;
use super::model::{Comparison, Condition, SubjectFilter};
use super::rules::{CompiledRule, RuleSet};
use super::store::{Alert, AlertStore, Fired, Firing};
use crate::bus::{BusMessage, BusReceiver, EventBus};
use crate::clock::SharedClock;
use crate::store::{Db, StoreError};
use crate::telemetry::alerts::{
    ALERTS_DEDUPED_TOTAL, ALERTS_ESCALATED_TOTAL, ALERTS_OPENED_TOTAL, ALERTS_SUPPRESSED_TOTAL,
};

/// What a firing is about.
struct Subject<'a> {
    device: &'a str,
    camera: Option<&'a str>,
}

impl Subject<'_> {
    fn key(&self) -> String {
        match self.camera {
            Some(c) => format!("camera:{}/{c}", self.device),
            None => format!("device:{}", self.device),
        }
    }

    fn label(&self) -> String {
        match self.camera {
            Some(c) => format!("{}/{c}", self.device),
            None => self.device.to_owned(),
        }
    }
}

/// The engine's state.
pub struct Engine {
    store: AlertStore,
    bus: EventBus,
    cfg: AlertsConfig,
    clock: SharedClock,
    wake: Arc<Notify>,
    /// The enabled rules, compiled.
    rules: RuleSet,
    generation: u64,
    /// (device, camera) -> effective site.
    sites: HashMap<(String, String), Option<String>>,
    /// Last `evicted_total` seen per device.
    evicted: HashMap<String, u64>,
    /// (rule, subject) of device conditions that may have an unresolved alert.
    maybe_open: HashSet<(i64, String)>,
}

impl Engine {
    pub fn new(db: Db, bus: EventBus, cfg: AlertsConfig, clock: SharedClock, wake: Arc<Notify>) -> Self {
        Self {
            store: AlertStore::new(db),
            bus,
            cfg,
            clock,
            wake,
            rules: RuleSet::default(),
            generation: u64::MAX,
            sites: HashMap::new(),
            evicted: HashMap::new(),
            maybe_open: HashSet::new(),
        }
    }

    /// Runs until shutdown or until the bus closes.
    pub async fn run(mut self, mut rx: BusReceiver, mut shutdown: watch::Receiver<bool>) {
        if let Err(e) = self.reload().await {
            tracing::warn!(error = %e, "loading alert rules");
        }
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.check_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *shutdown.borrow() {
                break;
            }
            tokio::select! {
                m = rx.recv_local() => {
                    let Some(m) = m else { break };
                    if super::rules_generation() != self.generation
                        && let Err(e) = self.reload().await
                    {
                        tracing::warn!(error = %e, "reloading alert rules");
                    }
                    let now = self.clock.now_ms();
                    if let Err(e) = self.handle(&m, now).await {
                        tracing::warn!(error = %e, "evaluating alert rules");
                    }
                }
                _ = tick.tick() => {
                    let now = self.clock.now_ms();
                    if let Err(e) = self.check(now).await {
                        tracing::warn!(error = %e, "periodic alert check");
                    }
                }
                _ = shutdown.changed() => {}
            }
        }
    }

    async fn reload(&mut self) -> Result<(), StoreError> {
        let generation = super::rules_generation();
        self.rules.load(self.store.list_rules().await?);
        self.sites = self.store.camera_sites().await?.into_iter().map(|(d, c, s)| ((d, c), s)).collect();
        self.maybe_open.clear();
        let rules = self.rules.current();
        for r in rules.iter().filter(|r| r.spec.condition.is_device()) {
            for s in self.store.unresolved_subjects(r.rule_id).await? {
                self.maybe_open.insert((r.rule_id, s));
            }
        }
        self.generation = generation;
        Ok(())
    }

    fn publish(&self, alert: &Alert, event: &str) {
        let mut v = alert.to_json();
        if let Some(o) = v.as_object_mut() {
            o.insert("event".into(), event.into());
        }
        self.bus.publish(BusMessage::Alert { alert: v });
    }

    fn allows(&self, f: &SubjectFilter, s: &Subject<'_>) -> bool {
        if !f.devices.is_empty() && !f.devices.iter().any(|d| d == s.device) {
            return false;
        }
        let device_cameras = || self.sites.keys().filter(|(d, _)| d == s.device).map(|(_, c)| c.as_str());
        if !f.cameras.is_empty() {
            let names = |c: &str| f.cameras.iter().any(|x| x == c || *x == format!("{}/{c}", s.device));
            let ok = match s.camera {
                Some(c) => names(c),
                None => device_cameras().any(names),
            };
            if !ok {
                return false;
            }
        }
        if !f.sites.is_empty() {
            let in_sites = |c: &str| {
                self.sites
                    .get(&(s.device.to_owned(), c.to_owned()))
                    .and_then(|site| site.as_deref())
                    .is_some_and(|site| f.sites.iter().any(|x| x == site))
            };
            let ok = match s.camera {
                Some(c) => in_sites(c),
                None => device_cameras().any(in_sites),
            };
            if !ok {
                return false;
            }
        }
        true
    }

    /// A rule fired for a subject: suppressed, folded into an open alert, or a new alert.
    async fn fire(
        &mut self,
        rule: &CompiledRule,
        s: &Subject<'_>,
        title: &str,
        details: Value,
        now: i64,
    ) -> Result<(), StoreError> {
        if rule.suppressed_at(now) {
            metrics::counter!(ALERTS_SUPPRESSED_TOTAL).increment(1);
            return self.store.count_suppressed(rule.rule_id).await;
        }
        let device_condition = rule.spec.condition.is_device();
        let dedupe_since_ms = if device_condition {
            None
        } else if rule.spec.dedupe_window_s == 0 {
            Some(i64::MAX)
        } else {
            Some(now - i64::from(rule.spec.dedupe_window_s) * 1000)
        };
        let subject = s.key();
        let firing = Firing {
            rule_id: rule.rule_id,
            rule_name: &rule.spec.name,
            severity: rule.spec.severity,
            subject: &subject,
            device_id: Some(s.device),
            camera: s.camera,
            title,
            details: &details,
            dedupe_since_ms,
            channels: &rule.spec.channels,
        };
        let rule_id = rule.rule_id;
        match self.store.fire(&firing, now).await? {
            Fired::Opened(alert) => {
                metrics::counter!(ALERTS_OPENED_TOTAL, "severity" => alert.severity.clone()).increment(1);
                self.wake.notify_one();
                self.publish(&alert, "opened");
            }
            Fired::Bumped(_) => metrics::counter!(ALERTS_DEDUPED_TOTAL).increment(1),
        }
        if device_condition {
            self.maybe_open.insert((rule_id, subject));
        }
        Ok(())
    }

    /// A device condition cleared for a subject: resolve its alerts.
    async fn clear(&mut self, rule: &CompiledRule, s: &Subject<'_>, now: i64) -> Result<(), StoreError> {
        let key = (rule.rule_id, s.key());
        if !self.maybe_open.remove(&key) {
            return Ok(());
        }
        for alert in self.store.resolve_cleared(key.0, &key.1, now).await? {
            self.publish(&alert, "resolved");
        }
        Ok(())
    }

    /// Evaluates one message from the bus at `now` (Unix ms).
    pub async fn handle(&mut self, m: &BusMessage, now: i64) -> Result<(), StoreError> {
        match m {
            BusMessage::Events(batch) => {
                for ev in &batch.events {
                    self.on_event(&batch.device, ev, now).await?;
                }
            }
            BusMessage::Health { device, health, .. } => self.on_health(device, health, now).await?,
            BusMessage::DeviceStatus { device, online: true, .. } => self.device_seen(device, now).await?,
            BusMessage::DeviceStatus { .. } => {}
            BusMessage::Rollup { rollup } => self.on_rollup(rollup, now).await?,
            BusMessage::Anomaly { anomaly } => self.on_anomaly(anomaly, now).await?,
            BusMessage::Alert { .. } => {}
        }
        Ok(())
    }

    async fn on_event(&mut self, device: &str, ev: &EventEnvelope, now: i64) -> Result<(), StoreError> {
        let kind = ev.kind.name();
        let label = ev.kind.object().map(|o| o.label.as_str());
        let (zone, line, _, speed) = crate::store::filter_columns(&ev.kind);
        let rules = self.rules.current();
        for rule in rules.iter() {
            let ok = rule.matches_event(kind, label, zone, line, speed);
            let s = Subject { device, camera: Some(&ev.camera) };
            if !ok || !self.allows(&rule.spec.filter, &s) {
                continue;
            }
            let mut title = format!("{kind} on {}", s.label());
            if let Some(v) = speed {
                title.push_str(&format!(" at {v:.0} km/h"));
            }
            let details = json!({ "event": {
                "id": format!("{device}:{}", ev.seq),
                "device_id": device,
                "camera": ev.camera,
                "kind": kind,
                "label": label,
                "observed_at_ms": ev.observed_at_ms,
                "payload": ev.kind.payload_json(),
            }});
            self.fire(rule, &s, &title, details, now).await?;
        }
        Ok(())
    }

    async fn device_seen(&mut self, device: &str, now: i64) -> Result<(), StoreError> {
        let rules = self.rules.current();
        for rule in rules.iter() {
            if matches!(rule.spec.condition, Condition::DeviceOffline { .. }) {
                self.clear(rule, &Subject { device, camera: None }, now).await?;
            }
        }
        Ok(())
    }

    async fn on_health(&mut self, device: &str, h: &DeviceHealth, now: i64) -> Result<(), StoreError> {
        self.device_seen(device, now).await?;
        let previous_evicted = self.evicted.insert(device.to_owned(), h.evicted_total);
        let rules = self.rules.current();
        for rule in rules.iter() {
            match rule.spec.condition {
                Condition::CameraDown {} => {
                    for c in &h.cameras {
                        let s = Subject { device, camera: Some(&c.camera) };
                        if !self.allows(&rule.spec.filter, &s) {
                            continue;
                        }
                        if c.state == "streaming" {
                            self.clear(rule, &s, now).await?;
                        } else {
                            let title = format!("camera {} is {}", s.label(), c.state);
                            let details = json!({ "camera": c.camera, "state": c.state, "last_error": c.last_error });
                            self.fire(rule, &s, &title, details, now).await?;
                        }
                    }
                }
                Condition::FpsBelow { fps } => {
                    for c in h.cameras.iter().filter(|c| c.state == "streaming") {
                        let s = Subject { device, camera: Some(&c.camera) };
                        if !self.allows(&rule.spec.filter, &s) {
                            continue;
                        }
                        if f64::from(c.fps) < fps {
                            let title = format!("camera {} analyses {:.1} fps (below {fps})", s.label(), c.fps);
                            self.fire(rule, &s, &title, json!({ "camera": c.camera, "fps": c.fps, "limit": fps }), now)
                                .await?;
                        } else {
                            self.clear(rule, &s, now).await?;
                        }
                    }
                }
                Condition::TemperatureAbove { celsius } => {
                    let s = Subject { device, camera: None };
                    if !self.allows(&rule.spec.filter, &s) {
                        continue;
                    }
                    match h.temperature_c {
                        Some(t) if f64::from(t) > celsius => {
                            let title = format!("device {device} at {t:.1} °C (above {celsius})");
                            self.fire(rule, &s, &title, json!({ "temperature_c": t, "limit": celsius }), now).await?;
                        }
                        _ => self.clear(rule, &s, now).await?,
                    }
                }
                Condition::BufferEvicting {} => {
                    let s = Subject { device, camera: None };
                    if !self.allows(&rule.spec.filter, &s) {
                        continue;
                    }
                    match previous_evicted {
                        Some(before) if h.evicted_total > before => {
                            let title = format!("device {device} evicted {} buffered events", h.evicted_total - before);
                            let details = json!({ "evicted_total": h.evicted_total, "previous": before,
                                "outbox_events": h.outbox_events });
                            self.fire(rule, &s, &title, details, now).await?;
                        }
                        Some(_) => self.clear(rule, &s, now).await?,
                        None => {}
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn on_rollup(&mut self, r: &Value, now: i64) -> Result<(), StoreError> {
        let (Some(device), Some(camera)) = (r["device"].as_str(), r["camera"].as_str()) else { return Ok(()) };
        let rules = self.rules.current();
        for rule in rules.iter() {
            let Condition::Metric { metric, op, value, resolution, class, line, zone } = &rule.spec.condition else {
                continue;
            };
            let same = |want: &Option<String>, field: &str| want.as_ref().is_none_or(|w| r[field].as_str() == Some(w));
            if resolution.is_some_and(|res| r["resolution"].as_str() != Some(res.as_str()))
                || !same(class, "class")
                || !same(line, "line")
                || !same(zone, "zone")
            {
                continue;
            }
            let Some(v) = r[metric.field()].as_f64() else { continue };
            let hit = match op {
                Comparison::Above => v > *value,
                Comparison::Below => v < *value,
            };
            let s = Subject { device, camera: Some(camera) };
            if !hit || !self.allows(&rule.spec.filter, &s) {
                continue;
            }
            let title = format!(
                "{} {} {} on {} ({} from {})",
                metric.field(),
                v,
                match op {
                    Comparison::Above => format!("above {value}"),
                    Comparison::Below => format!("below {value}"),
                },
                s.label(),
                r["resolution"].as_str().unwrap_or("?"),
                r["start"].as_str().unwrap_or("?"),
            );
            self.fire(rule, &s, &title, json!({ "rollup": r }), now).await?;
        }
        Ok(())
    }

    async fn on_anomaly(&mut self, a: &Value, now: i64) -> Result<(), StoreError> {
        let (Some(device), Some(camera), Some(kind)) = (a["device"].as_str(), a["camera"].as_str(), a["kind"].as_str())
        else {
            return Ok(());
        };
        let score = a["score"].as_f64().unwrap_or(0.0);
        let rules = self.rules.current();
        for rule in rules.iter() {
            let Condition::Anomaly { kinds, min_score } = &rule.spec.condition else { continue };
            if (!kinds.is_empty() && !kinds.iter().any(|k| k.as_str() == kind))
                || min_score.is_some_and(|m| score.abs() < m)
            {
                continue;
            }
            let s = Subject { device, camera: Some(camera) };
            if !self.allows(&rule.spec.filter, &s) {
                continue;
            }
            let title = format!("{kind} on {} (score {score:.1})", s.label());
            self.fire(rule, &s, &title, json!({ "anomaly": a }), now).await?;
        }
        Ok(())
    }

    /// The periodic check at `now` (Unix ms): a reload of rules and camera sites, devices offline
    /// too long, escalations.
    pub async fn check(&mut self, now: i64) -> Result<(), StoreError> {
        self.reload().await?;
        let rules = self.rules.current();
        let has_offline_rules = rules.iter().any(|r| matches!(r.spec.condition, Condition::DeviceOffline { .. }));
        if has_offline_rules {
            let devices = self.store.devices_last_seen().await?;
            for rule in rules.iter() {
                let Condition::DeviceOffline { minutes } = rule.spec.condition else { continue };
                for (device, last_seen) in &devices {
                    let s = Subject { device, camera: None };
                    if !self.allows(&rule.spec.filter, &s) {
                        continue;
                    }
                    let silent_ms = now - last_seen;
                    if silent_ms >= i64::from(minutes) * 60_000 {
                        let title = format!("device {device} offline for {} min", silent_ms / 60_000);
                        let details = json!({ "last_seen_ms": last_seen, "minutes": minutes });
                        self.fire(rule, &s, &title, details, now).await?;
                    } else {
                        self.clear(rule, &s, now).await?;
                    }
                }
            }
        }
        for r in rules.iter() {
            let Some(esc) = &r.spec.escalation else { continue };
            if r.spec.severity != super::Severity::Critical {
                continue;
            }
            let before = now - i64::from(esc.after_s) * 1000;
            for alert in self.store.escalate_due(r.rule_id, before, &esc.channels, now).await? {
                metrics::counter!(ALERTS_ESCALATED_TOTAL).increment(1);
                self.wake.notify_one();
                self.publish(&alert, "escalated");
            }
        }
        Ok(())
    }
}
