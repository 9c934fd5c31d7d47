//! The traffic event model: what an agent observes and the aggregator stores.
//!
//! Two encodings of the same types:
//! - bincode (the wire form, inside [`crate::wire::Frame`]): compact, externally tagged enums;
//! - JSON (the public form, on the REST API and MQTT): `kind` as a snake_case name and the kind's
//!   payload as an object, see [`EventKind::name`] and [`EventKind::payload_json`].
//!
//! Nothing here may use serde attributes that bincode cannot honour (`skip_serializing_if`,
//! `flatten`, internally tagged enums): the same derive serves both encodings.

use serde::{Deserialize, Serialize};

/// One traffic event as it travels from the agent's outbox to the aggregator's store.
///
/// The device is not a field: the aggregator takes it from the client certificate of the
/// connection that carried the event, never from anything the client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// Per-device sequence number, assigned by the agent's outbox at commit (1, 2, 3, ...).
    /// Together with the device id it is the event's identity and the storage's unique key.
    pub seq: u64,
    /// Camera that observed the event (the agent's configured camera id).
    pub camera: String,
    /// When the event happened on the road (Unix milliseconds, agent clock).
    pub observed_at_ms: i64,
    /// What happened.
    pub kind: EventKind,
}

/// A road user as a detector and tracker saw it; the field names follow what users know from
/// Frigate and DeepStream (`label`, `score`, `box`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectRef {
    /// Tracker id, unique per camera while the agent runs.
    pub track_id: u64,
    /// Class name from the model's label set (`car`, `truck`, `person`, ...).
    pub label: String,
    /// Detector confidence 0..1.
    pub score: f32,
    /// Box in normalised image coordinates `[x_min, y_min, x_max, y_max]`, each 0..1.
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
}

/// Direction of travel across a count line, relative to the side the line calls "in".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    In,
    Out,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

/// Phase of a condition that has a start and an end (congestion).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Started,
    Ongoing,
    Cleared,
}

/// Phase of a tracked road user's life, as Frigate reports its objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackPhase {
    /// The tracker confirmed a new road user.
    New,
    /// The road user left the picture (or was lost for longer than the tracker waits).
    End,
}

/// One counter of a periodic count report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassCount {
    pub label: String,
    pub direction: Direction,
    pub count: u32,
}

/// Per-kind eviction counter carried in [`DeviceHealth`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindCount {
    pub kind: String,
    pub count: u64,
}

/// State of one camera as the agent sees it. Fields missing from a stored report (written by an
/// older agent) read as their defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CameraHealth {
    pub camera: String,
    /// `connecting`, `streaming`, `reconnecting`, `ended`, `stopped`, `failed`.
    pub state: String,
    /// Frames per second run through detection over the last report interval.
    pub fps: f32,
    /// Frames per second decoded over the last report interval.
    pub decoded_fps: f32,
    /// Times this camera's stream was lost (and reconnected) since the agent started.
    pub reconnects: u64,
    /// Connection attempts to the camera that failed since the agent started.
    pub connect_failures: u64,
    /// Frames not analysed because detection was behind (oldest dropped first), since start.
    pub frames_dropped: u64,
    /// Access units dropped before decoding because the decoder was behind, since start.
    pub units_dropped: u64,
    /// Access units the decoder could not decode (corrupt video), since start.
    pub decode_errors: u64,
    /// Mean time from a frame's arrival to its detections, over the last report interval (ms).
    pub lag_ms: f32,
    /// Regions of the picture the detector runs on (tiles over the road; 1: the whole frame).
    pub detection_tiles: u32,
    /// Detector runs per detected frame over the last report interval: what detection costs
    /// (at most `detection_tiles`; fewer where nothing moved).
    pub inferences_per_frame: f32,
    /// The last reason the stream was lost or failed.
    pub last_error: Option<String>,
}

/// The agent's own report on itself, sent as a heartbeat and stored as an event. Fields missing
/// from a stored report (written by an older agent) read as their defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceHealth {
    /// Agent version (semver).
    pub agent_version: String,
    pub uptime_s: u64,
    /// Events ever committed to the outbox (the highest sequence number assigned).
    pub produced_total: u64,
    /// Events waiting in the outbox for an acknowledgement.
    pub outbox_events: u64,
    /// Bytes of event bodies waiting in the outbox.
    pub outbox_bytes: u64,
    /// Age of the oldest waiting event, seconds (0 when empty).
    pub outbox_oldest_age_s: u64,
    /// Highest sequence number the aggregator acknowledged.
    pub acked_seq: u64,
    /// Events dropped from a full or too-old outbox before acknowledgement, ever.
    pub evicted_total: u64,
    /// The same, per event kind.
    pub evicted_by_kind: Vec<KindCount>,
    /// Uplink reconnects since the agent started.
    pub uplink_reconnects: u64,
    pub cameras: Vec<CameraHealth>,
    /// SoC temperature where the board exposes one.
    pub temperature_c: Option<f32>,
}

/// What happened. Every variant is one `kind` in the public form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A road user crossed a count line.
    LineCrossing {
        line: String,
        object: ObjectRef,
        direction: Direction,
        /// Speed at the crossing, km/h, when the camera is calibrated.
        speed_kmh: Option<f32>,
    },
    /// A speed measured over a calibrated stretch.
    SpeedMeasurement {
        object: ObjectRef,
        speed_kmh: f32,
        /// Zone or lane the measurement belongs to, if any.
        zone: Option<String>,
    },
    ZoneEnter {
        zone: String,
        object: ObjectRef,
    },
    ZoneExit {
        zone: String,
        object: ObjectRef,
        dwell_s: f32,
    },
    /// A road user has stayed in a zone past the zone's dwell threshold.
    ZoneDwell {
        zone: String,
        object: ObjectRef,
        dwell_s: f32,
    },
    /// A vehicle has stood still where stopping is abnormal.
    StoppedVehicle {
        zone: String,
        object: ObjectRef,
        stopped_s: f32,
    },
    /// Movement against the zone's direction over at least the configured distance.
    WrongWay {
        zone: String,
        object: ObjectRef,
        distance_m: f32,
        speed_kmh: Option<f32>,
    },
    /// Congestion or queue in a zone.
    Congestion {
        zone: String,
        phase: Phase,
        occupancy: u32,
        mean_speed_kmh: Option<f32>,
        queue_length_m: Option<f32>,
    },
    /// Periodic counts per line, class and direction.
    Counts {
        line: String,
        interval_s: u32,
        counts: Vec<ClassCount>,
    },
    /// A road user the tracker followed: once when its track is confirmed (`new`) and once when
    /// it ends (`end`, with its duration and path).
    ObjectTrack {
        phase: TrackPhase,
        /// `new`: the first confirmed box; `end`: the last box, with the track's mean score.
        object: ObjectRef,
        /// When the road user was first seen (Unix milliseconds, agent clock).
        first_seen_ms: i64,
        /// Seconds from first to last sighting (0 for `new`).
        duration_s: f32,
        /// Frames in which the detector saw it.
        frames: u32,
        /// `end` only: bottom-centre points of its boxes (normalised image coordinates), at
        /// most 16, first and last included. Empty for `new`.
        path: Vec<[f32; 2]>,
    },
    /// The agent's health report.
    DeviceHealth(DeviceHealth),
    /// Periodic occupancy of a zone (declared after `DeviceHealth` so the binary encoding of
    /// every older kind, in outboxes written before it existed, stays the same).
    ZoneOccupancy {
        zone: String,
        interval_s: u32,
        /// Road users in the zone, averaged over the analysed frames of the interval.
        mean: f32,
        /// Most road users in the zone at once.
        max: u32,
        /// Fraction of the analysed frames with at least one road user in the zone (0..1), the
        /// "occupancy" of a loop detector.
        occupied: f32,
        /// Road users that entered the zone during the interval.
        entered: u32,
    },
}

/// All kind names, `device_health` last.
pub const KIND_NAMES: &[&str] = &[
    "line_crossing",
    "speed_measurement",
    "zone_enter",
    "zone_exit",
    "zone_dwell",
    "stopped_vehicle",
    "wrong_way",
    "congestion",
    "counts",
    "object_track",
    "zone_occupancy",
    "device_health",
];

/// The kinds that describe the road (all but the agent's own `device_health`).
pub const ROAD_KINDS: &[&str] = KIND_NAMES.split_at(KIND_NAMES.len() - 1).0;

impl EventKind {
    /// The snake_case name of this kind, as used in JSON, MQTT topics and API filters.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::LineCrossing { .. } => "line_crossing",
            EventKind::SpeedMeasurement { .. } => "speed_measurement",
            EventKind::ZoneEnter { .. } => "zone_enter",
            EventKind::ZoneExit { .. } => "zone_exit",
            EventKind::ZoneDwell { .. } => "zone_dwell",
            EventKind::StoppedVehicle { .. } => "stopped_vehicle",
            EventKind::WrongWay { .. } => "wrong_way",
            EventKind::Congestion { .. } => "congestion",
            EventKind::Counts { .. } => "counts",
            EventKind::ObjectTrack { .. } => "object_track",
            EventKind::DeviceHealth(_) => "device_health",
            EventKind::ZoneOccupancy { .. } => "zone_occupancy",
        }
    }

    /// The kind's own fields as a JSON object (the public `payload`).
    pub fn payload_json(&self) -> serde_json::Value {
        // Externally tagged: `{"line_crossing": {...}}`; take the inner value.
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut map)) => map.remove(self.name()).unwrap_or(serde_json::Value::Null),
            _ => serde_json::Value::Null,
        }
    }

    /// The road user this event is about, if it is about one.
    pub fn object(&self) -> Option<&ObjectRef> {
        match self {
            EventKind::LineCrossing { object, .. }
            | EventKind::SpeedMeasurement { object, .. }
            | EventKind::ZoneEnter { object, .. }
            | EventKind::ZoneExit { object, .. }
            | EventKind::ZoneDwell { object, .. }
            | EventKind::StoppedVehicle { object, .. }
            | EventKind::WrongWay { object, .. }
            | EventKind::ObjectTrack { object, .. } => Some(object),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crossing() -> EventKind {
        EventKind::LineCrossing {
            line: "north".into(),
            object: ObjectRef { track_id: 7, label: "car".into(), score: 0.9, bbox: [0.1, 0.2, 0.3, 0.4] },
            direction: Direction::In,
            speed_kmh: Some(48.5),
        }
    }

    #[test]
    fn payload_json_is_the_inner_object_with_frigate_field_names() {
        let p = crossing().payload_json();
        assert_eq!(p["line"], "north");
        assert_eq!(p["direction"], "in");
        assert_eq!(p["object"]["label"], "car");
        assert_eq!(p["object"]["box"][2].as_f64().map(|v| v as f32), Some(0.3));
    }

    #[test]
    fn kind_names_match_serde_names() {
        let all = [
            crossing(),
            EventKind::DeviceHealth(DeviceHealth::default()),
            EventKind::Counts { line: "l".into(), interval_s: 60, counts: vec![] },
        ];
        for k in all {
            let v = serde_json::to_value(&k).expect("serialize");
            let tag = v.as_object().and_then(|m| m.keys().next().cloned()).expect("tag");
            assert_eq!(tag, k.name());
            assert!(KIND_NAMES.contains(&k.name()));
        }
    }

    #[test]
    fn road_kinds_are_every_kind_but_device_health() {
        let mut all: Vec<&str> = ROAD_KINDS.to_vec();
        all.push("device_health");
        all.sort_unstable();
        let mut names = KIND_NAMES.to_vec();
        names.sort_unstable();
        assert_eq!(all, names);
    }

    #[test]
    fn a_stored_camera_report_of_an_older_agent_still_reads() {
        let old = r#"{"camera":"cam-1","state":"streaming","fps":14.5,"reconnects":2}"#;
        let h: CameraHealth = serde_json::from_str(old).expect("old report parses");
        assert_eq!((h.camera.as_str(), h.reconnects, h.frames_dropped, h.last_error), ("cam-1", 2, 0, None));
    }

    #[test]
    fn bincode_round_trip() {
        let e = EventEnvelope { seq: 42, camera: "cam-1".into(), observed_at_ms: 1_700_000_000_000, kind: crossing() };
        let bytes = bincode::serde::encode_to_vec(&e, bincode::config::standard()).expect("encode");
        let (back, n): (EventEnvelope, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).expect("decode");
        assert_eq!(n, bytes.len());
        assert_eq!(back, e);
    }
}
