//! Topic names and payloads for third parties, and MQTT topic-filter arithmetic for the ACLs.
//!
//! Topics (all under [`ROOT`] = `its/v1`):
//! - `its/v1/{site}/{camera}/events/{kind}`: one message per event (`kind` as in the API:
//!   `line_crossing`, `zone_enter`, ...; `anomaly` for the analytics' anomalies);
//! - `its/v1/{site}/{camera}/counts`: the agents' periodic `counts` events;
//! - `its/v1/devices/{device}/status` (retained);
//! - `its/v1/alerts/{severity}`;
//! - `its/v1/aggregator/{id}/status` (retained; the aggregator connection's last will).
//!
//! Segments taken from data are made safe ([`segment`]): `/`, `+`, `#`, `%`, control characters
//! and a leading `$` are percent-encoded (so two different values never share a topic and no
//! value can add a level or a wildcard). `{site}` is the camera's effective site
//! ([`crate::store::Fleet`]); a camera without a site is under [`UNASSIGNED`]. A site whose id
//! is one of the words the topic tree uses at that level (`devices`, `alerts`, `aggregator`,
//! `_unassigned`) is written with a `~` before it (`its/v1/~alerts/...`): site ids never contain
//! `~`, so this cannot collide with another site.

use its_shared::event::{EventEnvelope, EventKind};
use serde_json::{Value, json};

/// The first two levels of every topic.
pub const ROOT: &str = "its/v1";
/// The `{site}` segment of cameras without a site.
pub const UNASSIGNED: &str = "_unassigned";
/// Words the tree uses at the `{site}` level.
const RESERVED_SITE_SEGMENTS: &[&str] = &["devices", "alerts", "aggregator", UNASSIGNED];

/// A value as one topic level: percent-encodes `%`, `/`, `+`, `#`, control characters (NUL
/// included) and a leading `$` (UTF-8 bytes, upper-case hex); an empty value becomes `%00`.
pub fn segment(value: &str) -> String {
    if value.is_empty() {
        return "%00".into();
    }
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.chars().enumerate() {
        let encode = matches!(c, '%' | '/' | '+' | '#') || c.is_control() || (i == 0 && c == '$');
        if encode {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `{site}` segment of a camera's site (`None`: [`UNASSIGNED`]).
pub fn site_segment(site: Option<&str>) -> String {
    match site {
        None => UNASSIGNED.to_owned(),
        Some(s) if RESERVED_SITE_SEGMENTS.contains(&s) => format!("~{}", segment(s)),
        Some(s) => segment(s),
    }
}

/// `its/v1/{site}/{camera}/events/{kind}`, or `its/v1/{site}/{camera}/counts` for `counts`.
pub fn event_topic(site: Option<&str>, camera: &str, kind: &str) -> String {
    let (site, camera) = (site_segment(site), segment(camera));
    if kind == "counts" {
        format!("{ROOT}/{site}/{camera}/counts")
    } else {
        format!("{ROOT}/{site}/{camera}/events/{}", segment(kind))
    }
}

/// `its/v1/devices/{device}/status`.
pub fn device_status_topic(device: &str) -> String {
    format!("{ROOT}/devices/{}/status", segment(device))
}

/// `its/v1/alerts/{severity}`.
pub fn alert_topic(severity: &str) -> String {
    format!("{ROOT}/alerts/{}", segment(severity))
}

/// `its/v1/aggregator/{id}/status`.
pub fn aggregator_status_topic(id: &str) -> String {
    format!("{ROOT}/aggregator/{}/status", segment(id))
}

/// The filter that covers everything of one site: `its/v1/{site}/#`.
pub fn site_filter(site: &str) -> String {
    format!("{ROOT}/{}/#", site_segment(Some(site)))
}

/// The public JSON of one event, with the field names users know from Frigate and DeepStream:
/// `id` (`device:seq`), `kind`, `device`, `site`, `camera`, `seq`, `@timestamp` (RFC 3339, UTC,
/// when it happened on the road), `observed_at_ms`, `label`, `score`, `box`, `track_id`,
/// `speed` (km/h), `direction`, `zone`, `line` (`null` when the kind has none), and `payload`
/// (the kind's own fields, as the REST API serves them).
pub fn event_payload(device: &str, site: Option<&str>, e: &EventEnvelope) -> Value {
    let object = e.kind.object();
    let (speed, direction, zone, line) = match &e.kind {
        EventKind::LineCrossing { line, direction, speed_kmh, .. } => {
            (*speed_kmh, Some(direction.as_str()), None, Some(line.as_str()))
        }
        EventKind::SpeedMeasurement { speed_kmh, zone, .. } => (Some(*speed_kmh), None, zone.as_deref(), None),
        EventKind::ZoneEnter { zone, .. }
        | EventKind::ZoneExit { zone, .. }
        | EventKind::ZoneDwell { zone, .. }
        | EventKind::StoppedVehicle { zone, .. }
        | EventKind::ZoneOccupancy { zone, .. } => (None, None, Some(zone.as_str()), None),
        EventKind::WrongWay { zone, speed_kmh, .. } => (*speed_kmh, None, Some(zone.as_str()), None),
        EventKind::Congestion { zone, mean_speed_kmh, .. } => (*mean_speed_kmh, None, Some(zone.as_str()), None),
        EventKind::Counts { line, .. } => (None, None, None, Some(line.as_str())),
        EventKind::ObjectTrack { .. } | EventKind::DeviceHealth(_) => (None, None, None, None),
    };
    json!({
        "id": format!("{device}:{}", e.seq),
        "kind": e.kind.name(),
        "device": device,
        "site": site,
        "camera": e.camera,
        "seq": e.seq,
        "@timestamp": crate::store::format_timestamp_ms(e.observed_at_ms),
        "observed_at_ms": e.observed_at_ms,
        "label": object.map(|o| o.label.as_str()),
        "score": object.map(|o| o.score),
        "box": object.map(|o| o.bbox),
        "track_id": object.map(|o| o.track_id),
        "speed": speed,
        "direction": direction,
        "zone": zone,
        "line": line,
        "payload": e.kind.payload_json(),
    })
}

/// `its/v1/devices/{device}/status`'s payload.
pub fn device_status_payload(device: &str, online: bool, at_ms: i64) -> Value {
    json!({
        "device": device,
        "status": if online { "online" } else { "offline" },
        "online": online,
        "@timestamp": crate::store::format_timestamp_ms(at_ms),
        "at_ms": at_ms,
    })
}

/// `its/v1/aggregator/{id}/status`'s payload (`at_ms` is `None` in the last will, which is
/// written before anything happened).
pub fn aggregator_status_payload(id: &str, online: bool, at_ms: Option<i64>) -> Value {
    json!({
        "aggregator": id,
        "status": if online { "online" } else { "offline" },
        "online": online,
        "@timestamp": at_ms.map(crate::store::format_timestamp_ms),
        "at_ms": at_ms,
    })
}

/// Whether `filter` is a valid MQTT topic filter: not empty, `#` only as the whole last level,
/// `+` only as a whole level, no NUL.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') || filter.len() > 65_535 {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return false;
        }
        if level.contains('+') && *level != "+" {
            return false;
        }
    }
    true
}

/// Whether every topic that `filter` matches is also matched by `allowed` (both valid filters):
/// the subscription stays within what the ACL grants. Topics starting with `$` are matched only
/// by filters that start with the same literal (as brokers do).
pub fn filter_within(filter: &str, allowed: &str) -> bool {
    let f: Vec<&str> = filter.split('/').collect();
    let a: Vec<&str> = allowed.split('/').collect();
    let mut i = 0;
    loop {
        match (f.get(i), a.get(i)) {
            // `x/#` in the ACL also matches `x` itself, and anything below.
            (_, Some(&"#")) => return !(i == 0 && f.first().is_some_and(|l| l.starts_with('$'))),
            (Some(&"#"), _) => return false,
            (Some(fl), Some(al)) => {
                if *al == "+" {
                    if i == 0 && fl.starts_with('$') {
                        return false;
                    }
                } else if fl != al {
                    // A `+` in the filter is broader than a literal.
                    return false;
                }
            }
            (None, None) => return true,
            // The filter is shorter or longer than a wildcard-free ACL entry.
            _ => return false,
        }
        i += 1;
    }
}

/// Whether a topic name (no wildcards) is matched by `filter`.
pub fn topic_matches(topic: &str, filter: &str) -> bool {
    !topic.contains(['+', '#']) && filter_within(topic, filter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use its_shared::event::{Direction, ObjectRef};

    #[test]
    fn segments_cannot_add_levels_or_wildcards() {
        assert_eq!(segment("cam-1"), "cam-1");
        assert_eq!(segment("a/b+c#d%"), "a%2Fb%2Bc%23d%25");
        assert_eq!(segment("$SYS"), "%24SYS");
        assert_eq!(segment("x$"), "x$");
        assert_eq!(segment(""), "%00");
        assert_eq!(segment("é\n"), "é%0A");
        assert_ne!(segment("a/b"), segment("a%2Fb"));
        assert_eq!(site_segment(None), "_unassigned");
        assert_eq!(site_segment(Some("_unassigned")), "~_unassigned");
        assert_eq!(site_segment(Some("alerts")), "~alerts");
        assert_eq!(event_topic(Some("north"), "cam/1", "line_crossing"), "its/v1/north/cam%2F1/events/line_crossing");
        assert_eq!(event_topic(None, "c", "counts"), "its/v1/_unassigned/c/counts");
        assert_eq!(device_status_topic("d+1"), "its/v1/devices/d%2B1/status");
        assert_eq!(alert_topic("critical"), "its/v1/alerts/critical");
    }

    #[test]
    fn filters() {
        assert!(valid_filter("its/v1/+/cam/#"));
        assert!(valid_filter("#"));
        assert!(!valid_filter("its/v1/a#"));
        assert!(!valid_filter("its/#/x"));
        assert!(!valid_filter("its/v1+/x"));
        assert!(!valid_filter(""));
        let site = "its/v1/north/#";
        assert!(filter_within("its/v1/north/#", site));
        assert!(filter_within("its/v1/north", site));
        assert!(filter_within("its/v1/north/+/events/#", site));
        assert!(filter_within("its/v1/north/cam-1/counts", site));
        assert!(!filter_within("its/v1/south/#", site));
        assert!(!filter_within("its/v1/+/#", site));
        assert!(!filter_within("its/v1/#", site));
        assert!(!filter_within("#", site));
        assert!(!filter_within("its/+/north/#", site));
        assert!(!filter_within("its/v1/northx/#", site));
        let status = "its/v1/aggregator/+/status";
        assert!(filter_within("its/v1/aggregator/a1/status", status));
        assert!(filter_within("its/v1/aggregator/+/status", status));
        assert!(!filter_within("its/v1/aggregator/#", status));
        assert!(!filter_within("its/v1/aggregator/a1/status/x", status));
        assert!(!filter_within("its/v1/aggregator/a1", status));
        assert!(!filter_within("$SYS/x", "#"));
        assert!(!filter_within("$SYS/x", "+/x"));
        assert!(topic_matches("its/v1/north/c/counts", site));
        assert!(!topic_matches("its/v1/north/+", site));
    }

    #[test]
    fn payload_has_frigate_fields() {
        let e = EventEnvelope {
            seq: 42,
            camera: "cam-1".into(),
            observed_at_ms: 1_700_000_000_123,
            kind: EventKind::LineCrossing {
                line: "l1".into(),
                object: ObjectRef { track_id: 7, label: "car".into(), score: 0.5, bbox: [0.1, 0.2, 0.3, 0.4] },
                direction: Direction::Out,
                speed_kmh: Some(50.0),
            },
        };
        let p = event_payload("dev-1", Some("north"), &e);
        assert_eq!(p["id"], "dev-1:42");
        assert_eq!(p["kind"], "line_crossing");
        assert_eq!(p["site"], "north");
        assert_eq!(p["camera"], "cam-1");
        assert_eq!(p["label"], "car");
        assert_eq!(p["score"], 0.5);
        assert_eq!(p["box"][2].as_f64().map(|v| (v * 10.0).round()), Some(3.0));
        assert_eq!(p["speed"], 50.0);
        assert_eq!(p["direction"], "out");
        assert_eq!(p["zone"], Value::Null);
        assert_eq!(p["@timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(p["payload"]["line"], "l1");
    }
}
