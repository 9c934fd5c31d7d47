//! Rules as the engine evaluates them. A rule is compiled once per version ([`RuleSet::load`]
//! keeps the compiled form of every rule whose spec did not change): its suppression windows
//! parsed into minutes and a day mask, so that matching a firing parses no text. Everything here
//! is pure: no I/O, and "now" is an argument.

use std::collections::HashMap;
use std::sync::Arc;

use super::model::{Condition, RuleSpec, Suppression, minutes_of, offset_seconds};
use super::store::RuleRecord;

/// An enabled rule, ready to match.
#[derive(Debug)]
pub struct CompiledRule {
    pub rule_id: i64,
    pub spec: RuleSpec,
    suppression: Option<CompiledSuppression>,
}

impl CompiledRule {
    pub fn new(rule_id: i64, spec: RuleSpec) -> Self {
        let suppression = spec.suppression.as_ref().map(CompiledSuppression::new);
        Self { rule_id, spec, suppression }
    }

    /// Whether a firing at `now_ms` (Unix ms) is suppressed.
    pub fn suppressed_at(&self, now_ms: i64) -> bool {
        self.suppression.as_ref().is_some_and(|s| s.is_active(now_ms))
    }

    /// Whether an event (its kind name, object label, zone, line and speed) meets an event
    /// condition: every non-empty list names the value, and the speed is above the limit.
    /// Always false for the other conditions.
    pub fn matches_event(
        &self,
        kind: &str,
        label: Option<&str>,
        zone: Option<&str>,
        line: Option<&str>,
        speed: Option<f64>,
    ) -> bool {
        let Condition::Event { kinds, classes, zones, lines, speed_above_kmh } = &self.spec.condition else {
            return false;
        };
        let one_of =
            |list: &[String], v: Option<&str>| list.is_empty() || v.is_some_and(|v| list.iter().any(|x| x == v));
        one_of(kinds, Some(kind))
            && one_of(classes, label)
            && one_of(zones, zone)
            && one_of(lines, line)
            && speed_above_kmh.is_none_or(|limit| speed.is_some_and(|s| s > limit))
    }
}

/// The enabled rules of the engine, each compiled once per version.
#[derive(Debug, Default)]
pub struct RuleSet {
    rules: Arc<[Arc<CompiledRule>]>,
    /// Rules compiled since the set was created (tests look at it).
    compiled_total: u64,
}

impl RuleSet {
    /// Replaces the rules with the enabled ones of `records`. A rule whose spec is unchanged keeps
    /// its compiled form; a new or changed rule is compiled.
    pub fn load(&mut self, records: impl IntoIterator<Item = RuleRecord>) {
        let mut previous: HashMap<i64, Arc<CompiledRule>> =
            self.rules.iter().map(|r| (r.rule_id, Arc::clone(r))).collect();
        let mut compiled = 0;
        self.rules = records
            .into_iter()
            .filter(|r| r.spec.enabled)
            .map(|r| match previous.remove(&r.rule_id) {
                Some(c) if c.spec == r.spec => c,
                _ => {
                    compiled += 1;
                    Arc::new(CompiledRule::new(r.rule_id, r.spec))
                }
            })
            .collect();
        self.compiled_total += compiled;
    }

    /// The rules now (cheap to clone: the engine holds them while it evaluates one message).
    pub fn current(&self) -> Arc<[Arc<CompiledRule>]> {
        Arc::clone(&self.rules)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<CompiledRule>> {
        self.rules.iter()
    }

    /// How many rules were compiled since the set was created.
    pub fn compiled_total(&self) -> u64 {
        self.compiled_total
    }
}

/// [`Suppression`] parsed: the offset in seconds and each window in minutes of the day.
#[derive(Debug, Clone)]
pub struct CompiledSuppression {
    /// Seconds east of UTC; `None` (an offset that does not parse) suppresses nothing.
    offset_s: Option<i64>,
    windows: Vec<CompiledWindow>,
}

#[derive(Debug, Clone)]
struct CompiledWindow {
    /// Bit `d` set: on weekday `d` (0 = Monday); 0: every day.
    days: u8,
    /// Minutes of `from` and `to`; a window with one that does not parse is never active.
    from: Option<i64>,
    to: Option<i64>,
}

impl CompiledWindow {
    fn on(&self, weekday: i64) -> bool {
        self.days == 0 || (0..7).contains(&weekday) && self.days & (1 << weekday) != 0
    }
}

impl CompiledSuppression {
    pub fn new(s: &Suppression) -> Self {
        Self {
            offset_s: offset_seconds(&s.utc_offset),
            windows: s
                .windows
                .iter()
                .map(|w| CompiledWindow {
                    days: w.days.iter().fold(0u8, |m, d| m | (1 << d.index())),
                    from: minutes_of(&w.from),
                    to: minutes_of(&w.to),
                })
                .collect(),
        }
    }

    /// Whether `now_ms` (Unix ms) falls in one of the windows.
    pub fn is_active(&self, now_ms: i64) -> bool {
        let Some(offset) = self.offset_s else { return false };
        let local_s = now_ms.div_euclid(1000) + offset;
        let day = local_s.div_euclid(86_400);
        // 1970-01-01 was a Thursday (index 3, Monday = 0).
        let weekday = (day + 3).rem_euclid(7);
        let minute = local_s.rem_euclid(86_400) / 60;
        self.windows.iter().any(|w| {
            let (Some(from), Some(to)) = (w.from, w.to) else { return false };
            if from < to {
                w.on(weekday) && minute >= from && minute < to
            } else {
                // Past midnight: the part of today after `from` (started today) and the part
                // before `to` (started yesterday).
                (w.on(weekday) && minute >= from) || (w.on((weekday + 6) % 7) && minute < to)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::model::{SuppressionWindow, Weekday};

    #[test]
    fn suppression_windows() {
        // 2023-11-14T22:13:20Z is a Tuesday.
        let t = 1_700_000_000_000;
        let s = |offset: &str, days: Vec<Weekday>, from: &str, to: &str| {
            CompiledSuppression::new(&Suppression {
                utc_offset: offset.into(),
                windows: vec![SuppressionWindow { days, from: from.into(), to: to.into() }],
            })
        };
        assert!(s("UTC", vec![], "22:00", "23:00").is_active(t));
        assert!(!s("UTC", vec![], "22:30", "23:00").is_active(t));
        assert!(s("UTC", vec![Weekday::Tue], "22:00", "06:00").is_active(t));
        assert!(!s("UTC", vec![Weekday::Mon], "22:00", "06:00").is_active(t));
        // +02:00: 00:13 on Wednesday, inside Tuesday's overnight window.
        assert!(s("+02:00", vec![Weekday::Tue], "22:00", "06:00").is_active(t));
        assert!(!s("+02:00", vec![Weekday::Wed], "22:00", "06:00").is_active(t));
        assert!(s("+02:00", vec![Weekday::Wed], "00:00", "24:00").is_active(t));
        assert!(s("-05:00", vec![Weekday::Tue], "17:00", "18:00").is_active(t));
    }

    fn record(rule_id: i64, name: &str, enabled: bool) -> RuleRecord {
        let spec: RuleSpec = serde_json::from_value(serde_json::json!({
            "name": name, "severity": "warning", "enabled": enabled,
            "condition": { "type": "event", "kinds": ["wrong_way"], "classes": ["truck"], "speed_above_kmh": 50 },
            "suppression": { "utc_offset": "+01:00", "windows": [{ "days": ["mon"], "from": "22:00", "to": "06:00" }] },
        }))
        .expect("rule");
        RuleRecord { rule_id, spec, suppressed_total: 0, created_by: None, created_at_ms: 0, updated_at_ms: 0 }
    }

    #[test]
    fn a_rule_is_compiled_once_per_version() {
        let mut set = RuleSet::default();
        set.load([record(1, "a", true), record(2, "b", true), record(3, "off", false)]);
        assert_eq!(set.compiled_total(), 2, "disabled rules are not compiled");
        let first = set.current();
        assert_eq!(first.iter().map(|r| r.rule_id).collect::<Vec<_>>(), [1, 2]);

        // The periodic reload finds the same rules: nothing is compiled again, the same compiled
        // forms are kept (and a counter bump of the record is not a new version).
        let mut again = record(1, "a", true);
        again.suppressed_total = 7;
        set.load([again, record(2, "b", true), record(3, "off", false)]);
        assert_eq!(set.compiled_total(), 2);
        let second = set.current();
        assert!(first.iter().zip(second.iter()).all(|(a, b)| Arc::ptr_eq(a, b)));

        // A changed rule is compiled again; the others are kept.
        set.load([record(1, "a", true), record(2, "b renamed", true)]);
        assert_eq!(set.compiled_total(), 3);
        let third = set.current();
        assert!(Arc::ptr_eq(&first[0], &third[0]));
        assert!(!Arc::ptr_eq(&first[1], &third[1]));
        assert_eq!(third[1].spec.name, "b renamed");

        // Deleted or disabled: gone; enabled again: compiled again.
        set.load([record(2, "b renamed", false)]);
        assert!(set.current().is_empty());
        set.load([record(2, "b renamed", true)]);
        assert_eq!(set.compiled_total(), 4);
    }

    #[test]
    fn compiled_rule_matches_events_and_its_suppression() {
        let r = CompiledRule::new(1, record(1, "a", true).spec);
        assert!(r.matches_event("wrong_way", Some("truck"), Some("ramp"), None, Some(70.0)));
        assert!(!r.matches_event("wrong_way", Some("car"), Some("ramp"), None, Some(70.0)));
        assert!(!r.matches_event("wrong_way", Some("truck"), None, None, Some(30.0)));
        assert!(!r.matches_event("wrong_way", Some("truck"), None, None, None));
        assert!(!r.matches_event("zone_enter", Some("truck"), None, None, Some(70.0)));
        // Monday 2023-11-13 23:30 at +01:00 is 22:30 UTC; Tuesday 22:30 local is not in Monday's window.
        let monday_2330_local = 1_699_914_600_000;
        assert!(r.suppressed_at(monday_2330_local));
        assert!(!r.suppressed_at(monday_2330_local + 86_400_000));
    }
}
