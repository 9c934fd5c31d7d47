//! Alert rules and notification channels as data: their JSON form (the API's request bodies,
//! stored as they are), with validation that names the path of every bad field.
//!
//! Every check here is also said by the OpenAPI schema of the type (patterns, bounds, lengths),
//! so that what the schema accepts the API accepts, and the other way round; the schemas of the
//! constrained values are in [`schema`]. What a rule matches, and when its suppression is
//! active, is the engine's business (`crate::alerts::rules`).

use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use super::Resolution;

use self::schema::{
    BrokerUrl, EmailAddress, EventKindName, FilterText, HostText, IdNumber, NameText, SecretText, TimeOfDay, TopicText,
    UtcOffsetText, WebhookUrl,
};

pub mod schema;

/// Longest list in a rule or channel (kinds, classes, zones, channels, windows, recipients).
pub const MAX_ITEMS: usize = 32;
/// Longest free text in a filter (class, zone, line, device, camera, site), in characters.
pub const MAX_TEXT: usize = 128;
/// Longest name, in characters.
pub const MAX_NAME: usize = 128;
/// Longest dedupe window and escalation delay: 30 days.
pub const MAX_WINDOW_S: u32 = 30 * 86_400;
/// Most delivery attempts a channel may ask for.
pub const MAX_ATTEMPTS: u32 = 50;
/// The default number of attempts before a delivery is dead-lettered.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// A problem in a request body: the path of the field (`condition.speed_above_kmh`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

fn err(path: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError { path: path.into(), message: message.into() }
}

/// How bad an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "info" => Some(Severity::Info),
            "warning" => Some(Severity::Warning),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

const URL_PATTERN: &str = r"^https?://([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?(/[A-Za-z0-9._~%!$&'()*+,;=:@/-]*)?(\?[A-Za-z0-9._~%!$&'()*+,;=:@/?-]*)?$|^https?://((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?(/[A-Za-z0-9._~%!$&'()*+,;=:@/-]*)?(\?[A-Za-z0-9._~%!$&'()*+,;=:@/?-]*)?$";
const BROKER_PATTERN: &str = r"^mqtt://[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?$";
const TOPIC_PATTERN: &str = r"^[^+#\x00]{1,256}$";
const EMAIL_PATTERN: &str = r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$";
const HOST_PATTERN: &str = r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$";
const SECRET_PATTERN: &str = r"^[^\x00-\x1f\x7f]{1,256}$";
const TIME_PATTERN: &str = r"^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$";
const OFFSET_PATTERN: &str = r"^(UTC|Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$";

/// A pattern of the schema (the `pattern` of a string), compiled once, on first use.
pub(crate) struct Pattern {
    /// The regular expression as the schema states it.
    pub(crate) source: &'static str,
    regex: LazyLock<Option<regex::Regex>>,
}

impl Pattern {
    /// Whether `value` matches. The patterns are constants: one that does not compile (a bug
    /// caught by the unit tests) matches nothing.
    pub(crate) fn is_match(&self, value: &str) -> bool {
        self.regex.as_ref().is_some_and(|r| r.is_match(value))
    }
}

macro_rules! patterns {
    ($($name:ident = $source:ident;)*) => {
        $(pub(crate) static $name: Pattern =
            Pattern { source: $source, regex: LazyLock::new(|| regex::Regex::new($source).ok()) };)*
    };
}

patterns! {
    URL = URL_PATTERN;
    BROKER = BROKER_PATTERN;
    TOPIC = TOPIC_PATTERN;
    EMAIL = EMAIL_PATTERN;
    HOST = HOST_PATTERN;
    SECRET = SECRET_PATTERN;
    TIME = TIME_PATTERN;
    OFFSET = OFFSET_PATTERN;
}

// -- Whole numbers -------------------------------------------------------------------------------
// JSON Schema's `integer` admits `2.0` as well as `2`: both are taken.

fn whole(n: &serde_json::Number) -> Option<i128> {
    if let Some(v) = n.as_i64() {
        return Some(i128::from(v));
    }
    if let Some(v) = n.as_u64() {
        return Some(i128::from(v));
    }
    let f = n.as_f64()?;
    (f.is_finite() && f.fract() == 0.0 && f.abs() < 1e19).then_some(f as i128)
}

fn whole_in<'de, D: serde::Deserializer<'de>, T: TryFrom<i128>>(d: D) -> Result<T, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    whole(&n)
        .and_then(|v| T::try_from(v).ok())
        .ok_or_else(|| serde::de::Error::custom(format!("expected a whole number in range, found {n}")))
}

fn de_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    whole_in(d)
}

fn de_u16<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    whole_in(d)
}

fn de_opt_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match Option::<serde_json::Number>::deserialize(d)? {
        None => Ok(None),
        Some(n) => whole(&n)
            .and_then(|v| u32::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("expected a whole number in range, found {n}"))),
    }
}

fn de_ids<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<i64>, D::Error> {
    Vec::<serde_json::Number>::deserialize(d)?
        .into_iter()
        .map(|n| {
            whole(&n)
                .and_then(|v| i64::try_from(v).ok())
                .ok_or_else(|| serde::de::Error::custom(format!("expected an id, found {n}")))
        })
        .collect()
}

// -- Rules ---------------------------------------------------------------------------------------

/// An alert rule as the API takes and gives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// 1 to 128 characters without control characters (leading and trailing spaces are trimmed).
    #[schema(value_type = NameText, inline)]
    pub name: String,
    /// A disabled rule opens nothing (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    #[schema(inline)]
    pub severity: Severity,
    #[schema(inline)]
    pub condition: Condition,
    /// Which devices, cameras and sites the rule watches (all when empty).
    #[serde(default)]
    #[schema(inline)]
    pub filter: SubjectFilter,
    /// A firing for the same rule and subject (camera or device) within this many seconds of the
    /// latest firing of an alert that is not resolved bumps that alert's `count` instead of
    /// opening a new one (default 300; 0: every firing opens an alert). Device conditions keep
    /// one alert per subject while it is not resolved, whatever the window.
    #[serde(default = "default_dedupe", deserialize_with = "de_u32")]
    #[schema(minimum = 0, maximum = 2592000)]
    pub dedupe_window_s: u32,
    /// When firings open no alert (counted in the rule's `suppressed_total`).
    #[serde(default)]
    #[schema(inline)]
    pub suppression: Option<Suppression>,
    /// Channels notified when an alert opens.
    #[serde(default, deserialize_with = "de_ids")]
    #[schema(max_items = 32, value_type = Vec<IdNumber>, inline)]
    pub channels: Vec<i64>,
    /// For critical alerts: who is notified when one is not acknowledged in time.
    #[serde(default)]
    #[schema(inline)]
    pub escalation: Option<Escalation>,
}

fn yes() -> bool {
    true
}

fn default_dedupe() -> u32 {
    300
}

/// What makes a rule fire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Condition {
    /// A traffic event (every listed filter must match; an empty list matches all).
    Event {
        #[serde(default)]
        #[schema(value_type = Vec<EventKindName>, inline, max_items = 32)]
        kinds: Vec<String>,
        /// Object classes (labels): car, truck, person, ...
        #[serde(default)]
        #[schema(value_type = Vec<FilterText>, inline, max_items = 32)]
        classes: Vec<String>,
        #[serde(default)]
        #[schema(value_type = Vec<FilterText>, inline, max_items = 32)]
        zones: Vec<String>,
        #[serde(default)]
        #[schema(value_type = Vec<FilterText>, inline, max_items = 32)]
        lines: Vec<String>,
        /// Only events with a speed above this (km/h).
        #[serde(default)]
        #[schema(minimum = 0, maximum = 1000)]
        speed_above_kmh: Option<f64>,
    },
    /// A rollup bucket's value above or below a threshold.
    Metric {
        #[schema(inline)]
        metric: MetricName,
        #[schema(inline)]
        op: Comparison,
        #[schema(minimum = -1000000000, maximum = 1000000000)]
        value: f64,
        /// Only buckets of this resolution (all when absent).
        #[serde(default)]
        #[schema(inline)]
        resolution: Option<Resolution>,
        #[serde(default)]
        #[schema(value_type = Option<FilterText>, inline)]
        class: Option<String>,
        #[serde(default)]
        #[schema(value_type = Option<FilterText>, inline)]
        line: Option<String>,
        #[serde(default)]
        #[schema(value_type = Option<FilterText>, inline)]
        zone: Option<String>,
    },
    /// An anomaly the analytics flagged.
    Anomaly {
        #[serde(default)]
        #[schema(inline, max_items = 3)]
        kinds: Vec<AnomalyKind>,
        #[serde(default)]
        #[schema(minimum = 0, maximum = 1000000)]
        min_score: Option<f64>,
    },
    /// A device not seen (hello or heartbeat) for this many minutes; resolves when it is seen.
    DeviceOffline {
        #[serde(deserialize_with = "de_u32")]
        #[schema(minimum = 1, maximum = 43200)]
        minutes: u32,
    },
    /// A camera whose state in the device's health report is not `streaming`; resolves when it
    /// streams again.
    CameraDown {},
    /// A device whose buffer evicted events since its previous health report
    /// (`evicted_total` rising); resolves when a report shows no new evictions.
    BufferEvicting {},
    /// A streaming camera analysing fewer frames per second than this; resolves when it is back.
    FpsBelow {
        #[schema(minimum = 0, maximum = 1000)]
        fps: f64,
    },
    /// A device whose temperature is above this (°C); resolves when it is not.
    TemperatureAbove {
        #[schema(minimum = -100, maximum = 200)]
        celsius: f64,
    },
}

impl Condition {
    /// Whether the condition is about devices (resolved automatically when it clears).
    pub fn is_device(&self) -> bool {
        matches!(
            self,
            Condition::DeviceOffline { .. }
                | Condition::CameraDown {}
                | Condition::BufferEvicting {}
                | Condition::FpsBelow { .. }
                | Condition::TemperatureAbove { .. }
        )
    }
}

/// A rollup value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MetricName {
    Count,
    SpeedMeanKmh,
    SpeedP85Kmh,
    Occupancy,
}

impl MetricName {
    pub fn field(self) -> &'static str {
        match self {
            MetricName::Count => "count",
            MetricName::SpeedMeanKmh => "speed_mean_kmh",
            MetricName::SpeedP85Kmh => "speed_p85_kmh",
            MetricName::Occupancy => "occupancy",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Comparison {
    Above,
    Below,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    VolumeHigh,
    VolumeLow,
    SpeedDrop,
}

impl AnomalyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyKind::VolumeHigh => "volume_high",
            AnomalyKind::VolumeLow => "volume_low",
            AnomalyKind::SpeedDrop => "speed_drop",
        }
    }
}

/// Which subjects a rule watches; every non-empty list must match (a subject without a camera,
/// such as a device going offline, passes `cameras` and `sites` when one of its cameras does).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubjectFilter {
    /// Device ids.
    #[serde(default)]
    #[schema(value_type = Vec<FilterText>, inline, max_items = 32)]
    pub devices: Vec<String>,
    /// Cameras as `device/camera`, or a camera id on any device.
    #[serde(default)]
    #[schema(value_type = Vec<FilterText>, inline, max_items = 32)]
    pub cameras: Vec<String>,
    /// Sites (a camera's effective site).
    #[serde(default)]
    #[schema(value_type = Vec<FilterText>, inline, max_items = 32)]
    pub sites: Vec<String>,
}

/// When a rule is quiet: any of the windows, in a fixed offset from UTC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Suppression {
    /// `UTC` (default), `Z` or `+HH:MM` / `-HH:MM`. (IANA zone names are not supported: give
    /// the offset; a zone with daylight saving needs its rule changed twice a year.)
    #[serde(default = "utc")]
    #[schema(value_type = UtcOffsetText, inline)]
    pub utc_offset: String,
    #[schema(inline, min_items = 1, max_items = 32)]
    pub windows: Vec<SuppressionWindow>,
}

fn utc() -> String {
    "UTC".to_owned()
}

/// A weekly window: on the given days (all days when empty), from `from` to `to` local time. A
/// window whose end is not after its start runs past midnight into the next day.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SuppressionWindow {
    #[serde(default)]
    #[schema(inline, max_items = 7)]
    pub days: Vec<Weekday>,
    #[schema(value_type = TimeOfDay, inline)]
    pub from: String,
    #[schema(value_type = TimeOfDay, inline)]
    pub to: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    /// 0 = Monday.
    pub fn index(self) -> i64 {
        self as i64
    }
}

/// Escalation of critical alerts not acknowledged in time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Escalation {
    /// Seconds after opening (1 to 30 days).
    #[serde(deserialize_with = "de_u32")]
    #[schema(minimum = 1, maximum = 2592000)]
    pub after_s: u32,
    /// Channels notified, once.
    #[serde(deserialize_with = "de_ids")]
    #[schema(min_items = 1, max_items = 32, value_type = Vec<IdNumber>, inline)]
    pub channels: Vec<i64>,
}

fn check_list(path: &str, items: &[String], e: &mut Vec<FieldError>) {
    if items.len() > MAX_ITEMS {
        e.push(err(path, format!("at most {MAX_ITEMS} items")));
    }
    for (i, s) in items.iter().enumerate() {
        check_text(&format!("{path}[{i}]"), s, e);
    }
}

fn check_text(path: &str, s: &str, e: &mut Vec<FieldError>) {
    let n = s.chars().count();
    if n == 0 || n > MAX_TEXT {
        e.push(err(path, format!("1 to {MAX_TEXT} characters")));
    }
}

/// A name as stored: trimmed, 1 to [`MAX_NAME`] characters, no control characters.
fn check_name(path: &str, name: &mut String, e: &mut Vec<FieldError>) {
    let trimmed = name.trim().to_owned();
    if trimmed.is_empty() || name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
        e.push(err(path, format!("1 to {MAX_NAME} characters without control characters")));
    }
    *name = trimmed;
}

fn check_number(path: &str, v: f64, min: f64, max: f64, e: &mut Vec<FieldError>) {
    if !(v.is_finite() && v >= min && v <= max) {
        e.push(err(path, format!("a number from {min} to {max}")));
    }
}

fn check_channel_ids(path: &str, ids: &[i64], e: &mut Vec<FieldError>) {
    if ids.len() > MAX_ITEMS {
        e.push(err(path, format!("at most {MAX_ITEMS} channels")));
    }
    for (i, id) in ids.iter().enumerate() {
        if *id < 1 {
            e.push(err(format!("{path}[{i}]"), "a channel id (1 or more)"));
        }
    }
}

impl RuleSpec {
    /// Checks every field (all problems, each with its path) and normalises the name.
    pub fn validate(&mut self) -> Result<(), Vec<FieldError>> {
        let mut e = Vec::new();
        check_name("name", &mut self.name, &mut e);
        if self.dedupe_window_s > MAX_WINDOW_S {
            e.push(err("dedupe_window_s", format!("0 to {MAX_WINDOW_S} seconds")));
        }
        match &self.condition {
            Condition::Event { kinds, classes, zones, lines, speed_above_kmh } => {
                if kinds.len() > MAX_ITEMS {
                    e.push(err("condition.kinds", format!("at most {MAX_ITEMS} items")));
                }
                for (i, k) in kinds.iter().enumerate() {
                    if !its_shared::event::KIND_NAMES.contains(&k.as_str()) {
                        e.push(err(
                            format!("condition.kinds[{i}]"),
                            format!("unknown kind; expected one of {}", its_shared::event::KIND_NAMES.join(", ")),
                        ));
                    }
                }
                check_list("condition.classes", classes, &mut e);
                check_list("condition.zones", zones, &mut e);
                check_list("condition.lines", lines, &mut e);
                if let Some(v) = speed_above_kmh {
                    check_number("condition.speed_above_kmh", *v, 0.0, 1000.0, &mut e);
                }
            }
            Condition::Metric { value, class, line, zone, .. } => {
                check_number("condition.value", *value, -1e9, 1e9, &mut e);
                for (name, v) in [("class", class), ("line", line), ("zone", zone)] {
                    if let Some(v) = v {
                        check_text(&format!("condition.{name}"), v, &mut e);
                    }
                }
            }
            Condition::Anomaly { kinds, min_score } => {
                if kinds.len() > 3 {
                    e.push(err("condition.kinds", "at most 3 items"));
                }
                if let Some(v) = min_score {
                    check_number("condition.min_score", *v, 0.0, 1e6, &mut e);
                }
            }
            Condition::DeviceOffline { minutes } => {
                if !(1..=43_200).contains(minutes) {
                    e.push(err("condition.minutes", "1 to 43200 minutes"));
                }
            }
            Condition::CameraDown {} | Condition::BufferEvicting {} => {}
            Condition::FpsBelow { fps } => check_number("condition.fps", *fps, 0.0, 1000.0, &mut e),
            Condition::TemperatureAbove { celsius } => {
                check_number("condition.celsius", *celsius, -100.0, 200.0, &mut e)
            }
        }
        check_list("filter.devices", &self.filter.devices, &mut e);
        check_list("filter.cameras", &self.filter.cameras, &mut e);
        check_list("filter.sites", &self.filter.sites, &mut e);
        if let Some(s) = &self.suppression {
            if !OFFSET.is_match(&s.utc_offset) {
                e.push(err("suppression.utc_offset", "UTC, Z or +HH:MM / -HH:MM"));
            }
            if s.windows.is_empty() || s.windows.len() > MAX_ITEMS {
                e.push(err("suppression.windows", format!("1 to {MAX_ITEMS} windows")));
            }
            for (i, w) in s.windows.iter().enumerate() {
                if w.days.len() > 7 {
                    e.push(err(format!("suppression.windows[{i}].days"), "at most 7 days"));
                }
                for (name, t) in [("from", &w.from), ("to", &w.to)] {
                    if !TIME.is_match(t) {
                        e.push(err(format!("suppression.windows[{i}].{name}"), "a time of day HH:MM"));
                    }
                }
            }
        }
        check_channel_ids("channels", &self.channels, &mut e);
        if let Some(esc) = &self.escalation {
            if !(1..=MAX_WINDOW_S).contains(&esc.after_s) {
                e.push(err("escalation.after_s", format!("1 to {MAX_WINDOW_S} seconds")));
            }
            if esc.channels.is_empty() {
                e.push(err("escalation.channels", "at least one channel"));
            }
            check_channel_ids("escalation.channels", &esc.channels, &mut e);
        }
        if e.is_empty() { Ok(()) } else { Err(e) }
    }

    /// Every channel the rule names, with the path that names it.
    pub fn channel_refs(&self) -> Vec<(String, i64)> {
        let mut out: Vec<(String, i64)> =
            self.channels.iter().enumerate().map(|(i, c)| (format!("channels[{i}]"), *c)).collect();
        if let Some(esc) = &self.escalation {
            out.extend(esc.channels.iter().enumerate().map(|(i, c)| (format!("escalation.channels[{i}]"), *c)));
        }
        out
    }
}

/// Minutes of a `HH:MM` text (`24:00` is 1440).
pub fn minutes_of(t: &str) -> Option<i64> {
    let (h, m) = t.split_once(':')?;
    Some(h.parse::<i64>().ok()? * 60 + m.parse::<i64>().ok()?)
}

/// Seconds east of UTC of `UTC`, `Z`, `+HH:MM`, `-HH:MM`.
pub fn offset_seconds(text: &str) -> Option<i64> {
    match text {
        "UTC" | "Z" => Some(0),
        _ => {
            let sign = match text.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            Some(sign * minutes_of(text.get(1..)?)? * 60)
        }
    }
}

// -- Channels ------------------------------------------------------------------------------------

/// A notification channel as the API takes it. Secrets (`secret`, `password`) are stored but
/// never shown again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelSpec {
    /// 1 to 128 characters without control characters (leading and trailing spaces are trimmed).
    #[schema(value_type = NameText, inline)]
    pub name: String,
    /// Attempts before a delivery is dead-lettered (1 to 50, default 5).
    #[serde(default, deserialize_with = "de_opt_u32")]
    #[schema(minimum = 1, maximum = 50)]
    pub max_attempts: Option<u32>,
    #[schema(inline)]
    pub target: ChannelTarget,
}

/// Where notifications go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ChannelTarget {
    /// An HTTP POST of the alert as JSON, signed with the secret (see [`crate::alerts::notify`]).
    Webhook {
        #[schema(value_type = WebhookUrl, inline)]
        url: String,
        /// The HMAC-SHA256 key of `X-ITS-Signature`.
        #[schema(value_type = SecretText, inline)]
        secret: String,
    },
    /// A QoS 1 publish to an MQTT broker (delivered when the broker's PUBACK arrives).
    Mqtt {
        #[schema(value_type = BrokerUrl, inline)]
        broker: String,
        #[serde(default)]
        #[schema(value_type = Option<SecretText>, inline)]
        username: Option<String>,
        #[serde(default)]
        #[schema(value_type = Option<SecretText>, inline)]
        password: Option<String>,
        /// Default `its/v1/alerts/{severity}`.
        #[serde(default)]
        #[schema(value_type = Option<TopicText>, inline)]
        topic: Option<String>,
    },
    /// An e-mail over SMTP (the server from `[alerts.smtp]` unless the channel names one).
    Email {
        #[schema(value_type = Vec<EmailAddress>, inline, min_items = 1, max_items = 32)]
        to: Vec<String>,
        #[serde(default)]
        #[schema(inline)]
        smtp: Option<SmtpSpec>,
    },
}

impl ChannelTarget {
    pub fn kind(&self) -> &'static str {
        match self {
            ChannelTarget::Webhook { .. } => "webhook",
            ChannelTarget::Mqtt { .. } => "mqtt",
            ChannelTarget::Email { .. } => "email",
        }
    }
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SmtpSecurity {
    /// Plain connection upgraded with STARTTLS (required).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No encryption (local relays and tests only).
    None,
}

/// An SMTP server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SmtpSpec {
    #[schema(value_type = HostText, inline)]
    pub host: String,
    /// Default 587.
    #[serde(default = "smtp_port", deserialize_with = "de_u16")]
    #[schema(minimum = 1, maximum = 65535)]
    pub port: u16,
    #[serde(default)]
    #[schema(inline)]
    pub security: SmtpSecurity,
    #[schema(value_type = EmailAddress, inline)]
    pub from: String,
    #[serde(default)]
    #[schema(value_type = Option<SecretText>, inline)]
    pub username: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<SecretText>, inline)]
    pub password: Option<String>,
}

fn smtp_port() -> u16 {
    587
}

impl SmtpSpec {
    pub(crate) fn check(&self, path: &str, e: &mut Vec<FieldError>) {
        if !HOST.is_match(&self.host) {
            e.push(err(format!("{path}.host"), "a host name or IPv4 address"));
        }
        if self.port == 0 {
            e.push(err(format!("{path}.port"), "1 to 65535"));
        }
        if !EMAIL.is_match(&self.from) || self.from.len() > 254 {
            e.push(err(format!("{path}.from"), "an e-mail address"));
        }
        for (name, v) in [("username", &self.username), ("password", &self.password)] {
            if let Some(v) = v
                && !SECRET.is_match(v)
            {
                e.push(err(format!("{path}.{name}"), "1 to 256 characters without control characters"));
            }
        }
    }
}

impl ChannelSpec {
    /// Checks every field (all problems, each with its path) and normalises the name.
    pub fn validate(&mut self) -> Result<(), Vec<FieldError>> {
        let mut e = Vec::new();
        check_name("name", &mut self.name, &mut e);
        if let Some(n) = self.max_attempts
            && !(1..=MAX_ATTEMPTS).contains(&n)
        {
            e.push(err("max_attempts", format!("1 to {MAX_ATTEMPTS}")));
        }
        match &self.target {
            ChannelTarget::Webhook { url, secret } => {
                if url.len() > 2048 || !URL.is_match(url) || url::Url::parse(url).is_err() {
                    e.push(err("target.url", "an http:// or https:// URL"));
                }
                if !SECRET.is_match(secret) {
                    e.push(err("target.secret", "1 to 256 characters without control characters"));
                }
            }
            ChannelTarget::Mqtt { broker, username, password, topic } => {
                if broker.len() > 270 || !BROKER.is_match(broker) {
                    e.push(err("target.broker", "mqtt://host[:port]"));
                }
                for (name, v) in [("username", username), ("password", password)] {
                    if let Some(v) = v
                        && !SECRET.is_match(v)
                    {
                        e.push(err(format!("target.{name}"), "1 to 256 characters without control characters"));
                    }
                }
                if let Some(t) = topic
                    && !TOPIC.is_match(t)
                {
                    e.push(err("target.topic", "1 to 256 characters without +, # or NUL"));
                }
            }
            ChannelTarget::Email { to, smtp } => {
                if to.is_empty() || to.len() > MAX_ITEMS {
                    e.push(err("target.to", format!("1 to {MAX_ITEMS} addresses")));
                }
                for (i, a) in to.iter().enumerate() {
                    if a.len() > 254 || !EMAIL.is_match(a) {
                        e.push(err(format!("target.to[{i}]"), "an e-mail address"));
                    }
                }
                if let Some(s) = smtp {
                    s.check("target.smtp", &mut e);
                }
            }
        }
        if e.is_empty() { Ok(()) } else { Err(e) }
    }

    pub fn max_attempts(&self) -> u32 {
        self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS)
    }

    /// The JSON form without its secrets (`has_secret` / `has_password` say whether one is set).
    pub fn redacted(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let Some(t) = v.get_mut("target").and_then(|t| t.as_object_mut()) {
            if t.remove("secret").is_some() {
                t.insert("has_secret".into(), true.into());
            }
            if let Some(p) = t.remove("password") {
                t.insert("has_password".into(), (!p.is_null()).into());
            }
            if let Some(s) = t.get_mut("smtp").and_then(|s| s.as_object_mut())
                && let Some(p) = s.remove("password")
            {
                s.insert("has_password".into(), (!p.is_null()).into());
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_compile() {
        for p in [&URL, &BROKER, &TOPIC, &EMAIL, &HOST, &SECRET, &TIME, &OFFSET] {
            regex::Regex::new(p.source).expect("pattern");
            assert!(p.regex.is_some(), "{}", p.source);
        }
        assert!(URL.is_match("http://127.0.0.1:8080/hook?x=1"));
        assert!(URL.is_match("https://hooks.example.com/a/b"));
        assert!(!URL.is_match("ftp://example.com/"));
        assert!(!URL.is_match("http://999.1.1.1/"));
        assert!(BROKER.is_match("mqtt://127.0.0.1:1883"));
        assert!(EMAIL.is_match("ops@example.com"));
    }

    #[test]
    fn rule_validation_names_the_paths() {
        let mut rule: RuleSpec = serde_json::from_value(serde_json::json!({
            "name": "  ",
            "severity": "warning",
            "condition": { "type": "event", "kinds": ["wrong_way", "nope"], "speed_above_kmh": 5000.0 },
            "suppression": { "utc_offset": "+25:00", "windows": [{ "from": "22:00", "to": "7:00" }] },
            "escalation": { "after_s": 0, "channels": [] }
        }))
        .expect("parse");
        let errors = rule.validate().expect_err("invalid");
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "name",
            "condition.kinds[1]",
            "condition.speed_above_kmh",
            "suppression.utc_offset",
            "suppression.windows[0].to",
            "escalation.after_s",
            "escalation.channels",
        ] {
            assert!(paths.contains(&want), "{want} in {paths:?}");
        }
    }

    #[test]
    fn channel_secrets_are_not_shown() {
        let c: ChannelSpec = serde_json::from_value(serde_json::json!({
            "name": "ops", "target": { "kind": "webhook", "url": "http://127.0.0.1:9/x", "secret": "s3cret" }
        }))
        .expect("parse");
        let v = c.redacted();
        assert!(!v.to_string().contains("s3cret"), "{v}");
        assert_eq!(v["target"]["has_secret"], true);
    }
}
