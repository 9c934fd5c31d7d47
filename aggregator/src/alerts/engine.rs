//! The rule engine: what this replica committed (bus, `recv_local`) against the enabled rules,
//! plus a periodic check for devices offline too long, escalations and rule reloads.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use its_shared::event::{DeviceHealth, EventEnvelope};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use super::AlertsConfig;
use super::model::{Comparison, Condition, SubjectFilter};
use super::store::{Alert, AlertStore, Fired, Firing, RuleRecord};
use crate::bus::{BusMessage, BusReceiver, EventBus};
use crate::store::{Db, StoreError};
use crate::unix_ms;

/// Alerts opened, label `severity`.
pub const ALERTS_OPENED_TOTAL: &str = "its_alerts_opened_total";
/// Firings folded into an alert that was already open.
pub const ALERTS_DEDUPED_TOTAL: &str = "its_alerts_deduplicated_total";
/// Firings that suppression kept from opening an alert.
pub const ALERTS_SUPPRESSED_TOTAL: &str = "its_alerts_suppressed_total";
/// Alerts escalated.
pub const ALERTS_ESCALATED_TOTAL: &str = "its_alerts_escalated_total";

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
    wake: Arc<Notify>,
    rules: Vec<RuleRecord>,
    generation: u64,
    /// (device, camera) -> effective site.
    sites: HashMap<(String, String), Option<String>>,
    /// Last `evicted_total` seen per device.
    evicted: HashMap<String, u64>,
    /// (rule, subject) of device conditions that may have an unresolved alert.
    maybe_open: HashSet<(i64, String)>,
}

impl Engine {
    pub fn new(db: Db, bus: EventBus, cfg: AlertsConfig, wake: Arc<Notify>) -> Self {
        Self {
            store: AlertStore::new(db),
            bus,
            cfg,
            wake,
            rules: Vec::new(),
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
                    if let Err(e) = self.handle(&m).await {
                        tracing::warn!(error = %e, "evaluating alert rules");
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = self.periodic().await {
                        tracing::warn!(error = %e, "periodic alert check");
                    }
                }
                _ = shutdown.changed() => {}
            }
        }
    }

    async fn reload(&mut self) -> Result<(), StoreError> {
        let generation = super::rules_generation();
        self.rules = self.store.list_rules().await?.into_iter().filter(|r| r.spec.enabled).collect();
        self.sites = self.store.camera_sites().await?.into_iter().map(|(d, c, s)| ((d, c), s)).collect();
        self.maybe_open.clear();
        for r in self.rules.iter().filter(|r| r.spec.condition.is_device()) {
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
    async fn fire(&mut self, rule_idx: usize, s: &Subject<'_>, title: &str, details: Value) -> Result<(), StoreError> {
        let now = unix_ms();
        let rule = &self.rules[rule_idx];
        if rule.spec.suppression.as_ref().is_some_and(|sup| sup.is_active(now)) {
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
    async fn clear(&mut self, rule_idx: usize, s: &Subject<'_>) -> Result<(), StoreError> {
        let key = (self.rules[rule_idx].rule_id, s.key());
        if !self.maybe_open.remove(&key) {
            return Ok(());
        }
        for alert in self.store.resolve_cleared(key.0, &key.1, unix_ms()).await? {
            self.publish(&alert, "resolved");
        }
        Ok(())
    }

    async fn handle(&mut self, m: &BusMessage) -> Result<(), StoreError> {
        match m {
            BusMessage::Events(batch) => {
                for ev in &batch.events {
                    self.on_event(&batch.device, ev).await?;
                }
            }
            BusMessage::Health { device, health, .. } => self.on_health(device, health).await?,
            BusMessage::DeviceStatus { device, online: true, .. } => self.device_seen(device).await?,
            BusMessage::DeviceStatus { .. } => {}
            BusMessage::Rollup { rollup } => self.on_rollup(rollup).await?,
            BusMessage::Anomaly { anomaly } => self.on_anomaly(anomaly).await?,
            BusMessage::Alert { .. } => {}
        }
        Ok(())
    }

    async fn on_event(&mut self, device: &str, ev: &EventEnvelope) -> Result<(), StoreError> {
        let kind = ev.kind.name();
        let label = ev.kind.object().map(|o| o.label.as_str());
        let (zone, line, _, speed) = crate::store::filter_columns(&ev.kind);
        for i in 0..self.rules.len() {
            let Condition::Event { kinds, classes, zones, lines, speed_above_kmh } = &self.rules[i].spec.condition
            else {
                continue;
            };
            let one_of =
                |list: &[String], v: Option<&str>| list.is_empty() || v.is_some_and(|v| list.iter().any(|x| x == v));
            let ok = one_of(kinds, Some(kind))
                && one_of(classes, label)
                && one_of(zones, zone)
                && one_of(lines, line)
                && speed_above_kmh.is_none_or(|limit| speed.is_some_and(|s| s > limit));
            let s = Subject { device, camera: Some(&ev.camera) };
            if !ok || !self.allows(&self.rules[i].spec.filter, &s) {
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
            self.fire(i, &s, &title, details).await?;
        }
        Ok(())
    }

    async fn device_seen(&mut self, device: &str) -> Result<(), StoreError> {
        for i in 0..self.rules.len() {
            if matches!(self.rules[i].spec.condition, Condition::DeviceOffline { .. }) {
                self.clear(i, &Subject { device, camera: None }).await?;
            }
        }
        Ok(())
    }

    async fn on_health(&mut self, device: &str, h: &DeviceHealth) -> Result<(), StoreError> {
        self.device_seen(device).await?;
        let previous_evicted = self.evicted.insert(device.to_owned(), h.evicted_total);
        for i in 0..self.rules.len() {
            match self.rules[i].spec.condition.clone() {
                Condition::CameraDown {} => {
                    for c in &h.cameras {
                        let s = Subject { device, camera: Some(&c.camera) };
                        if !self.allows(&self.rules[i].spec.filter, &s) {
                            continue;
                        }
                        if c.state == "streaming" {
                            self.clear(i, &s).await?;
                        } else {
                            let title = format!("camera {} is {}", s.label(), c.state);
                            let details = json!({ "camera": c.camera, "state": c.state, "last_error": c.last_error });
                            self.fire(i, &s, &title, details).await?;
                        }
                    }
                }
                Condition::FpsBelow { fps } => {
                    for c in h.cameras.iter().filter(|c| c.state == "streaming") {
                        let s = Subject { device, camera: Some(&c.camera) };
                        if !self.allows(&self.rules[i].spec.filter, &s) {
                            continue;
                        }
                        if f64::from(c.fps) < fps {
                            let title = format!("camera {} analyses {:.1} fps (below {fps})", s.label(), c.fps);
                            self.fire(i, &s, &title, json!({ "camera": c.camera, "fps": c.fps, "limit": fps })).await?;
                        } else {
                            self.clear(i, &s).await?;
                        }
                    }
                }
                Condition::TemperatureAbove { celsius } => {
                    let s = Subject { device, camera: None };
                    if !self.allows(&self.rules[i].spec.filter, &s) {
                        continue;
                    }
                    match h.temperature_c {
                        Some(t) if f64::from(t) > celsius => {
                            let title = format!("device {device} at {t:.1} °C (above {celsius})");
                            self.fire(i, &s, &title, json!({ "temperature_c": t, "limit": celsius })).await?;
                        }
                        _ => self.clear(i, &s).await?,
                    }
                }
                Condition::BufferEvicting {} => {
                    let s = Subject { device, camera: None };
                    if !self.allows(&self.rules[i].spec.filter, &s) {
                        continue;
                    }
                    match previous_evicted {
                        Some(before) if h.evicted_total > before => {
                            let title = format!("device {device} evicted {} buffered events", h.evicted_total - before);
                            let details = json!({ "evicted_total": h.evicted_total, "previous": before,
                                "outbox_events": h.outbox_events });
                            self.fire(i, &s, &title, details).await?;
                        }
                        Some(_) => self.clear(i, &s).await?,
                        None => {}
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn on_rollup(&mut self, r: &Value) -> Result<(), StoreError> {
        let (Some(device), Some(camera)) = (r["device"].as_str(), r["camera"].as_str()) else { return Ok(()) };
        for i in 0..self.rules.len() {
            let Condition::Metric { metric, op, value, resolution, class, line, zone } = &self.rules[i].spec.condition
            else {
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
            if !hit || !self.allows(&self.rules[i].spec.filter, &s) {
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
            self.fire(i, &s, &title, json!({ "rollup": r })).await?;
        }
        Ok(())
    }

    async fn on_anomaly(&mut self, a: &Value) -> Result<(), StoreError> {
        let (Some(device), Some(camera), Some(kind)) = (a["device"].as_str(), a["camera"].as_str(), a["kind"].as_str())
        else {
            return Ok(());
        };
        let score = a["score"].as_f64().unwrap_or(0.0);
        for i in 0..self.rules.len() {
            let Condition::Anomaly { kinds, min_score } = &self.rules[i].spec.condition else { continue };
            if (!kinds.is_empty() && !kinds.iter().any(|k| k.as_str() == kind))
                || min_score.is_some_and(|m| score.abs() < m)
            {
                continue;
            }
            let s = Subject { device, camera: Some(camera) };
            if !self.allows(&self.rules[i].spec.filter, &s) {
                continue;
            }
            let title = format!("{kind} on {} (score {score:.1})", s.label());
            self.fire(i, &s, &title, json!({ "anomaly": a })).await?;
        }
        Ok(())
    }

    /// Devices offline too long, escalations, and a reload of rules and camera sites.
    async fn periodic(&mut self) -> Result<(), StoreError> {
        self.reload().await?;
        let now = unix_ms();
        let has_offline_rules = self.rules.iter().any(|r| matches!(r.spec.condition, Condition::DeviceOffline { .. }));
        if has_offline_rules {
            let devices = self.store.devices_last_seen().await?;
            for i in 0..self.rules.len() {
                let Condition::DeviceOffline { minutes } = self.rules[i].spec.condition else { continue };
                for (device, last_seen) in &devices {
                    let s = Subject { device, camera: None };
                    if !self.allows(&self.rules[i].spec.filter, &s) {
                        continue;
                    }
                    let silent_ms = now - last_seen;
                    if silent_ms >= i64::from(minutes) * 60_000 {
                        let title = format!("device {device} offline for {} min", silent_ms / 60_000);
                        let details = json!({ "last_seen_ms": last_seen, "minutes": minutes });
                        self.fire(i, &s, &title, details).await?;
                    } else {
                        self.clear(i, &s).await?;
                    }
                }
            }
        }
        for r in &self.rules {
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
