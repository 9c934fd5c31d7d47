//! Agent configuration, in two phases: [`RawConfig`] is the TOML form (every field optional,
//! unknown fields refused, environment overrides `ITS_AGENT__SECTION__KEY=value`), and
//! [`AgentConfig`] is the validated form. Validation reports every problem at once with its path.

use std::path::{Path, PathBuf};
use std::time::Duration;

use its_hostio::config_file::read_config_file;
use its_shared::config::{ConfigErrors, parse_toml_with_env};
use its_shared::session::AgentSessionConfig;
use serde::Deserialize;

use std::sync::Arc;

use crate::analyze::{RawScene, SceneSpec};
use crate::buffer::OutboxConfig;
use crate::detect::regions::{DetectionSpec, RegionMode, RoadModel};
use crate::detect::{BackendKind, BackendOptions, ModelManifest, Rect};
use crate::pipeline::CameraSpec;
use crate::source::SyntheticConfig;
use crate::source::synthetic::SYNTHETIC_KINDS;
use crate::source::{FileSpec, RtspSpec, RtspTransport, VideoSource};
use crate::track::TrackerConfig;
use crate::uplink::tls::DeviceBundle;
use crate::uplink::{MqttUplinkConfig, UplinkConfig};

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "ITS_AGENT__";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Directory with `device.pem`, `device.key` and `ca.pem` from `its-aggregator device enroll`.
    pub device_bundle: PathBuf,
    pub uplink: RawUplink,
    pub outbox: RawOutbox,
    pub synthetic: RawSynthetic,
    pub health: RawHealth,
    /// The cameras this box watches (none by default: a box is configured for its site).
    pub cameras: Vec<RawCamera>,
    pub detector: RawDetector,
    pub tracker: RawTracker,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            device_bundle: PathBuf::from("/etc/its-agent/device"),
            uplink: RawUplink::default(),
            outbox: RawOutbox::default(),
            synthetic: RawSynthetic::default(),
            health: RawHealth::default(),
            cameras: Vec::new(),
            detector: RawDetector::default(),
            tracker: RawTracker::default(),
        }
    }
}

/// One camera: an RTSP stream or a recording.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawCamera {
    /// Camera id, unique on this box; events carry it.
    pub id: String,
    /// `rtsp://[user:password@]host[:port]/path`, or the path of an `.mp4` or Annex-B `.264` file.
    pub url: String,
    /// RTSP transport: `tcp` (interleaved; works through NAT and firewalls, no packet loss) or
    /// `udp` (lower latency on a clean LAN).
    pub transport: String,
    /// Frames per second run through detection; 10 follows vehicles at urban speeds well and
    /// leaves CPU for more cameras. 0 = every frame.
    pub detect_fps: f64,
    /// No frame for this many seconds: the stream is declared stalled and reconnected. Cameras
    /// send several frames a second, so 5 s is a dead stream, not a slow one.
    pub stall_timeout_s: f64,
    /// DESCRIBE, SETUP and PLAY must each answer within this many seconds.
    pub connect_timeout_s: f64,
    /// First reconnect delay (ms); doubles per failure up to `backoff_cap_ms`.
    pub backoff_base_ms: u64,
    /// 30 s cap: a camera that comes back is picked up within half a minute.
    pub backoff_cap_ms: u64,
    /// Files: start again at the end.
    #[serde(rename = "loop")]
    pub looped: bool,
    /// Files: play at the recording's pace (true), or as fast as detection takes the frames,
    /// none dropped (false: replay and evaluation).
    pub realtime: bool,
    /// Annex-B files carry no timestamps: their frame rate.
    pub file_fps: f64,
    /// Frames that may wait for detection; under load the oldest is dropped (and counted).
    pub queue_frames: usize,
    /// What is measured on this camera's picture: calibration, count lines, zones.
    pub scene: RawScene,
    /// Where in the picture the detector runs.
    pub detection: RawDetection,
}

/// `[cameras.detection]`: where in a camera's picture the detector runs, and what it may cost.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawDetection {
    /// `auto`: tiles over the road the scene draws (its zones and count lines), sized with its
    /// calibration so far vehicles are big enough for the model (the whole frame when the scene
    /// draws nothing); `full`: the whole frame; `regions`: the rectangles of `regions`.
    pub mode: String,
    /// `mode = "regions"`: `[x, y, width, height]` in the pixels of the scene's `image_size`
    /// (of the frame when it has none).
    pub regions: Vec<[u32; 4]>,
    /// `auto`: the smallest a car may appear in the model's input (pixels wide). The shipped
    /// SSD finds cars reliably from about 60 px.
    pub min_vehicle_px: f32,
    /// `auto`: at most this many tiles; a road needing more gets them with smaller vehicles.
    pub max_tiles: usize,
    /// Run a tile only when something moved in it since the last detected frame or a vehicle
    /// is tracked in it (and every tile each `refresh_s`): most of the cost saved, nothing missed.
    pub motion: bool,
    pub refresh_s: f64,
}

impl Default for RawDetection {
    fn default() -> Self {
        let d = DetectionSpec::default();
        Self {
            mode: "auto".into(),
            regions: Vec::new(),
            min_vehicle_px: d.min_vehicle_px,
            max_tiles: d.max_tiles,
            motion: d.motion,
            refresh_s: d.refresh_s,
        }
    }
}

impl RawDetection {
    /// Checks the settings (`path`: `cameras[i].detection`) and builds the camera's detection
    /// spec for its validated `scene`.
    pub fn validate(&self, path: &str, scene: &SceneSpec, e: &mut ConfigErrors) -> DetectionSpec {
        e.check((16.0..=512.0).contains(&self.min_vehicle_px), &format!("{path}.min_vehicle_px"), || {
            format!("{} is outside 16..=512", self.min_vehicle_px)
        });
        e.check((1..=32).contains(&self.max_tiles), &format!("{path}.max_tiles"), || {
            format!("{} is outside 1..=32", self.max_tiles)
        });
        e.check((0.1..=60.0).contains(&self.refresh_s), &format!("{path}.refresh_s"), || {
            format!("{} is outside 0.1..=60", self.refresh_s)
        });
        let mut rects = Vec::new();
        for (k, &[x, y, w, h]) in self.regions.iter().enumerate() {
            let at = format!("{path}.regions[{k}]");
            e.check(w >= 32 && h >= 32, &at, || format!("{w} x {h} is smaller than 32 x 32"));
            if let Some((iw, ih)) = scene.image_size {
                e.check(x.saturating_add(w) <= iw && y.saturating_add(h) <= ih, &at, || {
                    format!("[{x}, {y}, {w}, {h}] reaches outside the scene's image_size {iw} x {ih}")
                });
            }
            rects.push(Rect::new(x, y, w, h));
        }
        let mode = match self.mode.as_str() {
            "auto" => {
                let road = RoadModel {
                    image_size: scene.image_size,
                    areas: scene.zones.iter().map(|z| (z.polygon.clone(), z.direction)).collect(),
                    lines: scene.lines.iter().map(|l| l.points.clone()).collect(),
                    calibration: scene.calibration.clone(),
                };
                RegionMode::Auto(Arc::new(road))
            }
            "full" => RegionMode::Full,
            "regions" => {
                e.check(!rects.is_empty(), &format!("{path}.regions"), || {
                    "mode = \"regions\" needs at least one rectangle".into()
                });
                RegionMode::Fixed { image_size: scene.image_size, rects }
            }
            other => {
                e.push(format!("{path}.mode"), format!("{other:?} is not one of auto, full, regions"));
                RegionMode::Full
            }
        };
        if self.mode != "regions" && !self.regions.is_empty() {
            e.push(format!("{path}.regions"), "rectangles are only used with mode = \"regions\"");
        }
        DetectionSpec {
            mode,
            min_vehicle_px: self.min_vehicle_px,
            max_tiles: self.max_tiles,
            motion: self.motion,
            refresh_s: self.refresh_s,
        }
    }
}

impl Default for RawCamera {
    fn default() -> Self {
        Self {
            id: String::new(),
            url: String::new(),
            transport: "tcp".into(),
            detect_fps: 10.0,
            stall_timeout_s: 5.0,
            connect_timeout_s: 10.0,
            backoff_base_ms: 500,
            backoff_cap_ms: 30_000,
            looped: true,
            realtime: true,
            file_fps: 10.0,
            queue_frames: 2,
            scene: RawScene::default(),
            detection: RawDetection::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawDetector {
    /// The model's manifest (`model.toml`, see models/README.md).
    pub model: PathBuf,
    /// `auto` (the fastest backend in this build that loads: tensorrt, onnxruntime, then
    /// tract), or one of `tract`, `onnxruntime`, `tensorrt`.
    pub backend: String,
    /// Detector workers, each with its own model session (0 = one per CPU core, at most one
    /// per camera: a camera's frames are detected in order).
    pub workers: usize,
    /// Threads per inference for ONNX Runtime (0 = cores / workers).
    pub threads: usize,
    /// ONNX Runtime's library; empty: `ORT_DYLIB_PATH`, then the standard locations.
    pub onnxruntime_library: PathBuf,
    /// Where TensorRT keeps built engines, so a box builds them once, not at every start.
    pub tensorrt_cache: PathBuf,
    /// Let TensorRT use FP16 kernels (Jetson GPUs are several times faster in FP16).
    pub tensorrt_fp16: bool,
    /// Confidence above which a detection is a road user for sure (0 = the model's default).
    pub score_threshold: f32,
}

impl Default for RawDetector {
    fn default() -> Self {
        Self {
            model: PathBuf::from("/usr/share/its-agent/models/ssd-mobilenet-v2-coco/model.toml"),
            backend: "auto".into(),
            workers: 0,
            threads: 0,
            onnxruntime_library: PathBuf::new(),
            tensorrt_cache: PathBuf::from("/var/lib/its-agent/trt-cache"),
            tensorrt_fp16: true,
            score_threshold: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawTracker {
    /// Detections between this and the score threshold only extend existing tracks (ByteTrack's
    /// second association); below it they are ignored.
    pub low_score: f32,
    /// Seconds a lost track is kept to be re-identified (bridges a vehicle passing behind another).
    pub max_lost_s: f32,
    /// Detections before a track gets an id (filters one-off false positives).
    pub min_hits: u32,
    /// Classes tracked as one (the detector may call one vehicle a car, then a truck).
    pub merge_classes: Vec<Vec<String>>,
}

impl Default for RawTracker {
    fn default() -> Self {
        let t = crate::track::TrackerConfig::default();
        Self {
            low_score: t.low_score,
            max_lost_s: t.max_lost_s,
            min_hits: t.min_hits,
            merge_classes: vec![vec!["car".into(), "truck".into(), "bus".into()]],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawUplink {
    /// `quic` (UDP straight to the aggregator) or `mqtt` (through a broker, `[uplink.mqtt]`, for
    /// sites where UDP is blocked). The session settings below apply to both.
    pub transport: String,
    /// `host:port` of the aggregator's QUIC listener (the aggregator's default port is 8471).
    pub aggregator: String,
    /// Name on the aggregator's certificate (`pki init` always includes `its-aggregator`).
    pub server_name: String,
    /// Events per batch; see `AgentSessionConfig` for the reasoning behind the defaults.
    pub max_batch_events: usize,
    pub window_batches: usize,
    pub ack_timeout_ms: u64,
    pub heartbeat_interval_s: u64,
    /// First reconnect delay; doubles per failure up to `backoff_cap_ms`.
    pub backoff_base_ms: u64,
    /// 30 s cap: a fleet reconnecting after an aggregator restart spreads out, and a box is
    /// never more than half a minute late to notice the aggregator is back.
    pub backoff_cap_ms: u64,
    /// Randomise delays (on by default so a fleet does not reconnect in lockstep).
    pub jitter: bool,
    /// A silent connection is declared dead after this long (20 s: several missed keep-alives).
    pub idle_timeout_ms: u64,
    pub keep_alive_ms: u64,
    /// `[uplink.mqtt]`: the broker, when `transport = "mqtt"`.
    pub mqtt: RawUplinkMqtt,
}

/// `[uplink.mqtt]`: how the agent reaches the MQTT broker that relays its uplink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawUplinkMqtt {
    /// `mqtts://host[:8883]` (TLS) or `mqtt://host[:1883]` (plain: only on a trusted network).
    pub broker: String,
    /// The device id: the broker's ACL ties it to the topics `its/uplink/{username}/...`.
    #[serde(deserialize_with = "scalar_string")]
    pub username: String,
    /// The broker password; prefer `password_file`.
    #[serde(deserialize_with = "scalar_string")]
    pub password: String,
    /// A file holding the password (surrounding whitespace is ignored).
    pub password_file: PathBuf,
    /// PEM CA certificate(s) the broker's certificate must chain to (`mqtts://`); empty: the
    /// device bundle's `ca.pem` (a broker certified by the fleet CA).
    pub ca: PathBuf,
    /// MQTT keep-alive in seconds; a broker connection silent for 1.5 times this is dead.
    pub keep_alive_s: u64,
}

impl Default for RawUplinkMqtt {
    fn default() -> Self {
        Self {
            broker: String::new(),
            username: String::new(),
            password: String::new(),
            password_file: PathBuf::new(),
            ca: PathBuf::new(),
            keep_alive_s: 15,
        }
    }
}

/// A string that an environment override may have turned into a number (`...__PASSWORD=1234`).
fn scalar_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Int(i64),
    }
    Ok(match Scalar::deserialize(d)? {
        Scalar::Text(s) => s,
        Scalar::Int(i) => i.to_string(),
    })
}

impl RawUplinkMqtt {
    /// Checks `[uplink.mqtt]` (used only with `transport = "mqtt"`); `bundle_ca` is the device
    /// bundle's CA, the default trust for `mqtts://`.
    fn validate(&self, bundle_ca: &Path, e: &mut ConfigErrors) -> Option<MqttUplinkConfig> {
        let broker = match url::Url::parse(&self.broker) {
            Ok(u) if matches!(u.scheme(), "mqtt" | "mqtts") && u.host_str().is_some_and(|h| !h.is_empty()) => {
                let tls = u.scheme() == "mqtts";
                let ok = (u.path().is_empty() || u.path() == "/")
                    && u.query().is_none()
                    && u.username().is_empty()
                    && u.password().is_none();
                e.check(ok, "uplink.mqtt.broker", || {
                    "must be mqtt://host[:port] or mqtts://host[:port], without path, query or credentials".into()
                });
                let host = u.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
                Some((host, u.port().unwrap_or(if tls { 8883 } else { 1883 }), tls))
            }
            _ => {
                e.push(
                    "uplink.mqtt.broker",
                    format!("{:?} is not mqtt://host[:port] or mqtts://host[:port]", self.broker),
                );
                None
            }
        };
        e.check(
            !self.username.is_empty()
                && self.username.len() <= 64
                && self.username.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "uplink.mqtt.username",
            || format!("{:?} must be the device id: 1-64 characters from A-Z a-z 0-9 . _ -", self.username),
        );
        let password = match (self.password.is_empty(), self.password_file.as_os_str().is_empty()) {
            (false, true) => Some(self.password.clone()),
            (true, false) => match std::fs::read_to_string(&self.password_file) {
                Ok(p) if !p.trim().is_empty() => Some(p.trim().to_string()),
                Ok(_) => {
                    e.push("uplink.mqtt.password_file", format!("{} is empty", self.password_file.display()));
                    None
                }
                Err(err) => {
                    e.push("uplink.mqtt.password_file", format!("{}: {err}", self.password_file.display()));
                    None
                }
            },
            (true, true) => {
                e.push("uplink.mqtt.password", "set password or password_file");
                None
            }
            (false, false) => {
                e.push("uplink.mqtt.password", "set password or password_file, not both");
                None
            }
        };
        e.check((1..=3600).contains(&self.keep_alive_s), "uplink.mqtt.keep_alive_s", || {
            format!("{} is outside 1..=3600", self.keep_alive_s)
        });
        let (host, port, tls) = broker?;
        let tls_ca = if tls {
            let (ca, path) = if self.ca.as_os_str().is_empty() {
                (bundle_ca.to_path_buf(), "device_bundle")
            } else {
                (self.ca.clone(), "uplink.mqtt.ca")
            };
            if !ca.is_file() {
                e.push(path, format!("{} is missing (the CA of the broker's certificate, for mqtts://)", ca.display()));
            }
            Some(ca)
        } else {
            e.check(self.ca.as_os_str().is_empty(), "uplink.mqtt.ca", || "set only with an mqtts:// broker".into());
            None
        };
        Some(MqttUplinkConfig {
            host,
            port,
            tls_ca,
            username: self.username.clone(),
            password: password?,
            keep_alive: Duration::from_secs(self.keep_alive_s),
        })
    }
}

impl Default for RawUplink {
    fn default() -> Self {
        let s = AgentSessionConfig::default();
        Self {
            transport: "quic".into(),
            aggregator: "127.0.0.1:8471".into(),
            server_name: "its-aggregator".into(),
            max_batch_events: s.max_batch_events,
            window_batches: s.window_batches,
            ack_timeout_ms: s.ack_timeout.as_millis() as u64,
            heartbeat_interval_s: s.heartbeat_interval.as_secs(),
            backoff_base_ms: 250,
            backoff_cap_ms: 30_000,
            jitter: true,
            idle_timeout_ms: 20_000,
            keep_alive_ms: 5_000,
            mqtt: RawUplinkMqtt::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawOutbox {
    pub path: PathBuf,
    /// 512 MiB holds about five million events: days of a busy junction's events offline.
    pub max_bytes: u64,
    /// Events older than a week are of little use to a traffic centre; they are evicted (and
    /// counted) rather than kept forever.
    pub max_age_h: u64,
    /// Sequence numbers reserved per write of the "sent" mark (see the outbox's contract).
    pub reserve_ahead: u64,
    /// Bytes of event pictures kept apart from `max_bytes` (pictures never crowd out events);
    /// 128 MiB holds about a thousand full-frame snapshots, days of incidents offline. Over it,
    /// the oldest pictures are dropped (counted as `snapshot` in the eviction counters).
    pub max_snapshot_bytes: u64,
}

impl Default for RawOutbox {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/var/lib/its-agent/outbox.db"),
            max_bytes: 512 * 1024 * 1024,
            max_age_h: 168,
            reserve_ahead: 8192,
            max_snapshot_bytes: crate::buffer::DEFAULT_MAX_SNAPSHOT_BYTES,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSynthetic {
    /// Off by default: a real box counts real traffic.
    pub enabled: bool,
    pub rate_per_s: f64,
    pub cameras: Vec<String>,
    pub kinds: Vec<String>,
    /// Stop after this many events in total (0 = never).
    pub limit: u64,
    /// Events of one tick are committed in one transaction (10 ms: 100 commits/s at most).
    pub tick_ms: u64,
}

impl Default for RawSynthetic {
    fn default() -> Self {
        Self {
            enabled: false,
            rate_per_s: 20.0,
            cameras: vec!["cam-1".into()],
            kinds: SYNTHETIC_KINDS.iter().map(|s| s.to_string()).collect(),
            limit: 0,
            tick_ms: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawHealth {
    /// A device_health event every 60 s: enough for a fleet view, cheap on a metered link.
    pub interval_s: u64,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self { interval_s: 60 }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub uplink: UplinkConfig,
    /// `Some`: the uplink goes through this MQTT broker instead of QUIC (`uplink.transport`).
    pub mqtt_uplink: Option<MqttUplinkConfig>,
    pub outbox: OutboxConfig,
    /// Budget of the outbox's pictures (bytes).
    pub max_snapshot_bytes: u64,
    pub synthetic: Option<SyntheticConfig>,
    pub health_interval: Duration,
    /// Cameras, detector and tracker; `None` when no camera is configured.
    pub vision: Option<VisionConfig>,
}

/// Which backend to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// The fastest compiled-in backend that loads.
    Auto,
    Only(BackendKind),
}

/// The validated vision configuration.
#[derive(Debug, Clone)]
pub struct VisionConfig {
    pub cameras: Vec<CameraSpec>,
    pub manifest: Arc<ModelManifest>,
    pub backend: BackendChoice,
    /// Backend options; `kind` is overwritten by the choice.
    pub backend_options: BackendOptions,
    pub workers: usize,
    pub tracker: TrackerConfig,
    pub merged_classes: Vec<Vec<usize>>,
    /// Each camera's scene, in the order of `cameras`.
    pub scenes: Vec<SceneSpec>,
}

impl RawCamera {
    /// Checks one camera (`path` is its key, e.g. `cameras[0]`) and builds its spec.
    fn validate(&self, path: &str, e: &mut ConfigErrors) -> Option<CameraSpec> {
        e.check(
            !self.id.is_empty()
                && self.id.len() <= 64
                && self.id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            &format!("{path}.id"),
            || format!("{:?} must be 1-64 characters of letters, digits, '-', '_' or '.'", self.id),
        );
        e.check(self.detect_fps >= 0.0 && self.detect_fps <= 120.0, &format!("{path}.detect_fps"), || {
            format!("{} is outside 0..=120", self.detect_fps)
        });
        e.check(
            self.stall_timeout_s >= 0.5 && self.stall_timeout_s <= 600.0,
            &format!("{path}.stall_timeout_s"),
            || format!("{} is outside 0.5..=600", self.stall_timeout_s),
        );
        e.check(
            self.connect_timeout_s >= 0.5 && self.connect_timeout_s <= 600.0,
            &format!("{path}.connect_timeout_s"),
            || format!("{} is outside 0.5..=600", self.connect_timeout_s),
        );
        e.check(self.backoff_base_ms >= 1, &format!("{path}.backoff_base_ms"), || "must be at least 1".into());
        e.check(self.backoff_cap_ms >= self.backoff_base_ms, &format!("{path}.backoff_cap_ms"), || {
            "must be at least backoff_base_ms".into()
        });
        e.check(self.file_fps > 0.0 && self.file_fps <= 240.0, &format!("{path}.file_fps"), || {
            format!("{} is outside (0, 240]", self.file_fps)
        });
        e.check((1..=64).contains(&self.queue_frames), &format!("{path}.queue_frames"), || {
            format!("{} is outside 1..=64", self.queue_frames)
        });
        let transport = match self.transport.as_str() {
            "tcp" => Some(RtspTransport::Tcp),
            "udp" => Some(RtspTransport::Udp),
            other => {
                e.push(format!("{path}.transport"), format!("{other:?} is not one of tcp, udp"));
                None
            }
        };
        // Out-of-range or NaN timeouts are reported above; the spec is built with a fallback so
        // every other problem is still found.
        let secs = |v: f64, fallback: f64| {
            Duration::try_from_secs_f64(v.clamp(0.5, 600.0)).unwrap_or(Duration::from_secs_f64(fallback))
        };
        let source = if self.url.starts_with("rtsps://") {
            e.push(format!("{path}.url"), "rtsps:// (RTSP over TLS) is not supported; use rtsp://");
            None
        } else if self.url.starts_with("rtsp://") {
            match url::Url::parse(&self.url) {
                Ok(u) if u.host_str().is_some() => {
                    let (url, username, password) = crate::source::rtsp::split_credentials(u);
                    Some(VideoSource::Rtsp(RtspSpec {
                        url,
                        username,
                        password,
                        transport: transport.unwrap_or(RtspTransport::Tcp),
                        connect_timeout: secs(self.connect_timeout_s, 10.0),
                        stall_timeout: secs(self.stall_timeout_s, 5.0),
                        backoff_base: Duration::from_millis(self.backoff_base_ms),
                        backoff_cap: Duration::from_millis(self.backoff_cap_ms),
                        jitter: true,
                    }))
                }
                Ok(_) => {
                    e.push(format!("{path}.url"), "an RTSP URL needs a host");
                    None
                }
                Err(err) => {
                    e.push(format!("{path}.url"), format!("not a valid URL: {err}"));
                    None
                }
            }
        } else if self.url.is_empty() {
            e.push(format!("{path}.url"), "must be an rtsp:// URL or a video file path");
            None
        } else if self.url.contains("://") && !self.url.starts_with("file://") {
            e.push(
                format!("{path}.url"),
                format!("{:?}: only rtsp:// URLs and files are supported", redact(&self.url)),
            );
            None
        } else {
            let p = PathBuf::from(self.url.strip_prefix("file://").unwrap_or(&self.url));
            e.check(p.is_file(), &format!("{path}.url"), || format!("{} is not a readable file", p.display()));
            Some(VideoSource::File(FileSpec {
                path: p,
                looped: self.looped,
                realtime: self.realtime,
                fps: self.file_fps,
            }))
        };
        Some(CameraSpec {
            id: self.id.clone(),
            source: source?,
            detect_fps: self.detect_fps,
            queue_frames: self.queue_frames,
            // Set from the scene once it is validated (`validate_vision`).
            detection: DetectionSpec::full(),
        })
    }
}

/// A URL with any password replaced, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

impl RawConfig {
    fn validate_vision(&self, e: &mut ConfigErrors) -> Option<VisionConfig> {
        if self.cameras.is_empty() {
            return None;
        }
        let mut cameras = Vec::new();
        e.check(self.cameras.len() <= its_shared::wire::MAX_HELLO_CAMERAS, "cameras", || {
            format!(
                "{} cameras; one box announces at most {} to the aggregator",
                self.cameras.len(),
                its_shared::wire::MAX_HELLO_CAMERAS
            )
        });
        for (i, c) in self.cameras.iter().enumerate() {
            if let Some(spec) = c.validate(&format!("cameras[{i}]"), e) {
                cameras.push(spec);
            }
        }
        for (i, c) in self.cameras.iter().enumerate() {
            if self.cameras[..i].iter().any(|o| o.id == c.id) {
                e.push(format!("cameras[{i}].id"), format!("{:?} is used by another camera", c.id));
            }
        }
        let d = &self.detector;
        let backend = match d.backend.as_str() {
            "auto" => Some(BackendChoice::Auto),
            other => match BackendKind::parse(other) {
                Some(k) => {
                    let (feature, compiled) = k.compiled_in();
                    e.check(compiled, "detector.backend", || {
                        format!("{other:?} is not in this build (rebuild with `--features {feature}`)")
                    });
                    Some(BackendChoice::Only(k))
                }
                None => {
                    e.push(
                        "detector.backend",
                        format!("{other:?} is not one of auto, {}", BackendKind::NAMES.join(", ")),
                    );
                    None
                }
            },
        };
        e.check(d.workers <= 64, "detector.workers", || format!("{} is above 64", d.workers));
        e.check(d.threads <= 256, "detector.threads", || format!("{} is above 256", d.threads));
        e.check((0.0..1.0).contains(&d.score_threshold), "detector.score_threshold", || {
            format!("{} is outside [0, 1)", d.score_threshold)
        });
        let manifest = match ModelManifest::load(&d.model) {
            Ok(m) => Some(Arc::new(m)),
            Err(err) => {
                e.push("detector.model", err.to_string().trim_end().to_string());
                None
            }
        };
        let t = &self.tracker;
        e.check(t.low_score > 0.0 && t.low_score < 1.0, "tracker.low_score", || {
            format!("{} is outside (0, 1)", t.low_score)
        });
        e.check(t.max_lost_s >= 0.0 && t.max_lost_s <= 60.0, "tracker.max_lost_s", || {
            format!("{} is outside 0..=60", t.max_lost_s)
        });
        e.check((1..=100).contains(&t.min_hits), "tracker.min_hits", || format!("{} is outside 1..=100", t.min_hits));
        let labels: Vec<&str> =
            manifest.as_ref().map(|m| m.labels.iter().flatten().map(|l| &**l).collect()).unwrap_or_default();
        let mut scenes = Vec::new();
        for (i, c) in self.cameras.iter().enumerate() {
            if let Some(spec) = c.scene.validate(&format!("cameras[{i}].scene"), &labels, e) {
                let detection = c.detection.validate(&format!("cameras[{i}].detection"), &spec, e);
                if let Some(cam) = cameras.iter_mut().find(|cam: &&mut CameraSpec| cam.id == c.id) {
                    cam.detection = detection;
                }
                scenes.push(spec);
            }
        }
        let manifest = manifest?;
        let high = if d.score_threshold > 0.0 { d.score_threshold } else { manifest.score_threshold };
        e.check(t.low_score <= high - 0.1, "tracker.low_score", || {
            format!("{} must be at least 0.1 below the detector's score threshold {high}", t.low_score)
        });
        let mut merged = Vec::new();
        for (i, set) in t.merge_classes.iter().enumerate() {
            let mut ids = Vec::new();
            for (j, name) in set.iter().enumerate() {
                match manifest.labels.iter().position(|l| l.as_deref() == Some(name.as_str())) {
                    Some(id) => ids.push(id),
                    None => e.push(
                        format!("tracker.merge_classes[{i}][{j}]"),
                        format!("{name:?} is not a label of the model"),
                    ),
                }
            }
            merged.push(ids);
        }
        let tracker = TrackerConfig {
            low_score: t.low_score,
            max_lost_s: t.max_lost_s,
            min_hits: t.min_hits,
            ..TrackerConfig::for_detector_threshold(high)
        };
        Some(VisionConfig {
            cameras,
            manifest,
            backend: backend?,
            backend_options: BackendOptions {
                kind: BackendKind::Tract,
                threads: d.threads,
                onnxruntime_library: (!d.onnxruntime_library.as_os_str().is_empty())
                    .then(|| d.onnxruntime_library.clone()),
                tensorrt_cache: d.tensorrt_cache.clone(),
                tensorrt_fp16: d.tensorrt_fp16,
            },
            workers: d.workers,
            tracker,
            merged_classes: merged,
            scenes,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{0}")]
    Invalid(ConfigErrors),
}

impl RawConfig {
    /// Reads `path` (or the defaults when `None`), applies environment overrides, parses.
    pub fn load<I>(path: Option<&Path>, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let doc =
            read_config_file(path).map_err(|e| ConfigError::Read { message: e.source.to_string(), path: e.path })?;
        parse_toml_with_env(&doc.source, doc.text.as_deref(), ENV_PREFIX, env)
            .map_err(|e| ConfigError::Parse { path: e.document, message: e.message })
    }

    /// Checks everything and builds the validated form, or reports every problem.
    pub fn validate(&self, source: &str) -> Result<AgentConfig, ConfigErrors> {
        let mut e = ConfigErrors::new(source);
        let u = &self.uplink;
        e.check(
            u.aggregator.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)),
            "uplink.aggregator",
            || format!("{:?} is not host:port", u.aggregator),
        );
        e.check(!u.server_name.is_empty(), "uplink.server_name", || "must not be empty".into());
        e.check((1..=20_000).contains(&u.max_batch_events), "uplink.max_batch_events", || {
            format!("{} is outside 1..=20000 (a batch must fit in one wire frame)", u.max_batch_events)
        });
        e.check((1..=64).contains(&u.window_batches), "uplink.window_batches", || {
            format!("{} is outside 1..=64", u.window_batches)
        });
        e.check(u.ack_timeout_ms >= 100, "uplink.ack_timeout_ms", || "must be at least 100".into());
        e.check(u.heartbeat_interval_s >= 1, "uplink.heartbeat_interval_s", || "must be at least 1".into());
        e.check(u.backoff_base_ms >= 1, "uplink.backoff_base_ms", || "must be at least 1".into());
        e.check(u.backoff_cap_ms >= u.backoff_base_ms, "uplink.backoff_cap_ms", || {
            "must be at least backoff_base_ms".into()
        });
        e.check(u.keep_alive_ms >= 100, "uplink.keep_alive_ms", || "must be at least 100".into());
        e.check(u.idle_timeout_ms > u.keep_alive_ms, "uplink.idle_timeout_ms", || {
            "must be greater than keep_alive_ms".into()
        });
        let bundle = DeviceBundle::in_dir(&self.device_bundle);
        let mqtt = match u.transport.as_str() {
            "quic" => {
                for missing in bundle.missing() {
                    e.push(
                        "device_bundle",
                        format!(
                            "{} is missing (run `its-aggregator device enroll` and copy the bundle)",
                            missing.display()
                        ),
                    );
                }
                None
            }
            // The device bundle serves only as the default CA of an mqtts:// broker.
            "mqtt" => u.mqtt.validate(&bundle.ca, &mut e),
            other => {
                e.push("uplink.transport", format!("{other:?} is not one of quic, mqtt"));
                None
            }
        };
        let o = &self.outbox;
        e.check(o.max_bytes >= 1024 * 1024, "outbox.max_bytes", || format!("{} is below 1 MiB", o.max_bytes));
        e.check(o.max_age_h >= 1, "outbox.max_age_h", || "must be at least 1".into());
        e.check(o.max_snapshot_bytes >= 4 * 1024 * 1024, "outbox.max_snapshot_bytes", || {
            format!("{} is below 4 MiB (one snapshot may take 3 MiB)", o.max_snapshot_bytes)
        });
        e.check(o.reserve_ahead >= 1, "outbox.reserve_ahead", || "must be at least 1".into());
        e.check(o.path.file_name().is_some(), "outbox.path", || "must name a file".into());
        let s = &self.synthetic;
        if s.enabled {
            e.check(s.rate_per_s > 0.0 && s.rate_per_s <= 1_000_000.0, "synthetic.rate_per_s", || {
                format!("{} is outside (0, 1000000]", s.rate_per_s)
            });
            e.check(!s.cameras.is_empty(), "synthetic.cameras", || "must name at least one camera".into());
            e.check(!s.kinds.is_empty(), "synthetic.kinds", || "must name at least one kind".into());
            e.check((1..=1000).contains(&s.tick_ms), "synthetic.tick_ms", || "must be in 1..=1000".into());
        }
        for (i, k) in s.kinds.iter().enumerate() {
            e.check(SYNTHETIC_KINDS.contains(&k.as_str()), &format!("synthetic.kinds[{i}]"), || {
                format!("unknown kind {k:?}; known: {}", SYNTHETIC_KINDS.join(", "))
            });
        }
        e.check(self.health.interval_s >= 1, "health.interval_s", || "must be at least 1".into());
        let vision = self.validate_vision(&mut e);
        if !e.is_empty() {
            return Err(e);
        }
        let mut cameras: Vec<String> = vision.iter().flat_map(|v| v.cameras.iter().map(|c| c.id.clone())).collect();
        if s.enabled {
            cameras.extend(s.cameras.iter().filter(|c| !cameras.contains(c)).cloned().collect::<Vec<_>>());
        }
        Ok(AgentConfig {
            uplink: UplinkConfig {
                aggregator: u.aggregator.clone(),
                server_name: u.server_name.clone(),
                bundle,
                session: AgentSessionConfig {
                    max_batch_events: u.max_batch_events,
                    window_batches: u.window_batches,
                    ack_timeout: Duration::from_millis(u.ack_timeout_ms),
                    heartbeat_interval: Duration::from_secs(u.heartbeat_interval_s),
                    ..AgentSessionConfig::default()
                },
                backoff_base: Duration::from_millis(u.backoff_base_ms),
                backoff_cap: Duration::from_millis(u.backoff_cap_ms),
                jitter: u.jitter,
                idle_timeout: Duration::from_millis(u.idle_timeout_ms),
                keep_alive: Duration::from_millis(u.keep_alive_ms),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                model: vision.as_ref().map_or("none".into(), |v| v.manifest.name.clone()),
                cameras,
            },
            mqtt_uplink: mqtt,
            outbox: OutboxConfig {
                path: o.path.clone(),
                max_bytes: o.max_bytes,
                max_age: Duration::from_secs(o.max_age_h * 3600),
                reserve_ahead: o.reserve_ahead,
            },
            max_snapshot_bytes: o.max_snapshot_bytes,
            synthetic: s.enabled.then(|| SyntheticConfig {
                rate_per_s: s.rate_per_s,
                cameras: s.cameras.clone(),
                kinds: s.kinds.clone(),
                limit: (s.limit > 0).then_some(s.limit),
                tick: Duration::from_millis(s.tick_ms),
            }),
            health_interval: Duration::from_secs(self.health.interval_s),
            vision,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let toml = r#"
            device_bundle = "/nonexistent"
            [uplink]
            aggregator = "nohost"
            window_batches = 0
            [outbox]
            max_bytes = 10
            [synthetic]
            enabled = true
            rate_per_s = -1.0
            kinds = ["line_crossing", "teleport"]
        "#;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, toml).expect("write");
        let raw = RawConfig::load(Some(&p), Vec::new()).expect("parses");
        let err = raw.validate("agent.toml").expect_err("invalid");
        let paths: Vec<&str> = err.issues.iter().map(|i| i.path.as_str()).collect();
        for want in [
            "uplink.aggregator",
            "uplink.window_batches",
            "device_bundle",
            "outbox.max_bytes",
            "synthetic.rate_per_s",
            "synthetic.kinds[1]",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
    }

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, "[outbox]\nmax_byte = 5\n").expect("write");
        let err = RawConfig::load(Some(&p), Vec::new()).expect_err("unknown field");
        assert!(err.to_string().contains("max_byte"), "{err}");
    }

    fn model_path() -> String {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/ssd-mobilenet-v2-coco/model.toml").display().to_string()
    }

    fn with_bundle(toml: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["device.pem", "device.key", "ca.pem"] {
            std::fs::write(dir.path().join(f), "x").expect("write");
        }
        let text = format!("device_bundle = {:?}\n{toml}", dir.path().display().to_string());
        (dir, text)
    }

    fn load_str(text: &str) -> RawConfig {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, text).expect("write");
        RawConfig::load(Some(&p), Vec::new()).expect("parses")
    }

    #[test]
    fn cameras_detector_and_tracker_problems_are_all_reported() {
        let clip = Path::new(env!("CARGO_MANIFEST_DIR")).join("../media/vtest-street-768x576-10fps.mp4");
        let (_bundle, text) = with_bundle(&format!(
            r#"
            [detector]
            model = {model:?}
            backend = "cuda"
            [tracker]
            low_score = 0.9
            merge_classes = [["car", "lorry"]]
            [[cameras]]
            id = "north gate"
            url = "rtsp://"
            transport = "quic"
            detect_fps = -1
            [[cameras]]
            id = "south"
            url = "/nonexistent/clip.mp4"
            [[cameras]]
            id = "south"
            url = {clip:?}
            [[cameras]]
            id = "east"
            url = "http://admin:hunter2@10.0.0.9/video"
            [[cameras]]
            id = "west"
            url = "rtsps://10.0.0.8/stream"
            stall_timeout_s = nan
            connect_timeout_s = inf
            "#,
            model = model_path(),
            clip = clip.display().to_string()
        ));
        let err = load_str(&text).validate("agent.toml").expect_err("invalid");
        let paths: Vec<&str> = err.issues.iter().map(|i| i.path.as_str()).collect();
        for want in [
            "detector.backend",
            "tracker.low_score",
            "tracker.merge_classes[0][1]",
            "cameras[0].id",
            "cameras[0].url",
            "cameras[0].transport",
            "cameras[0].detect_fps",
            "cameras[1].url",
            "cameras[2].id",
            "cameras[3].url",
            "cameras[4].url",
            "cameras[4].stall_timeout_s",
            "cameras[4].connect_timeout_s",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
        let text = err.to_string();
        assert!(!text.contains("hunter2"), "passwords never appear in messages: {text}");
    }

    #[test]
    fn a_valid_camera_configuration_builds_the_vision_plan() {
        let (_bundle, text) = with_bundle(&format!(
            r#"
            [detector]
            model = {model:?}
            backend = "tract"
            [[cameras]]
            id = "gate-1"
            url = "rtsp://viewer:s3cret@192.0.2.10:554/stream1"
            transport = "udp"
            detect_fps = 5
            "#,
            model = model_path()
        ));
        let cfg = load_str(&text).validate("agent.toml").expect("valid");
        let v = cfg.vision.expect("vision");
        assert_eq!(v.backend, BackendChoice::Only(BackendKind::Tract));
        assert_eq!(cfg.uplink.model, "ssd-mobilenet-v2-coco");
        assert_eq!(cfg.uplink.cameras, vec!["gate-1".to_string()]);
        let VideoSource::Rtsp(r) = &v.cameras[0].source else { panic!("rtsp") };
        assert_eq!(r.url.as_str(), "rtsp://192.0.2.10:554/stream1", "credentials are taken out of the URL");
        assert_eq!((r.username.as_deref(), r.password.as_deref()), (Some("viewer"), Some("s3cret")));
        assert_eq!(r.transport, RtspTransport::Udp);
        assert_eq!(v.tracker.new_track_score, 0.5, "tracks start at the model's threshold");
        assert!((v.tracker.high_score - 0.4).abs() < 1e-6, "and associate from a tenth below it");
        assert_eq!(v.merged_classes, vec![vec![2, 7, 5]], "car, truck, bus by class id");
    }

    #[test]
    fn the_example_configuration_shows_exactly_the_defaults() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/agent.toml.example");
        let parsed = RawConfig::load(Some(&example), Vec::new()).expect("the example parses");
        assert_eq!(format!("{parsed:?}"), format!("{:?}", RawConfig::default()), "example and defaults drifted apart");
    }

    #[test]
    fn the_mqtt_uplink_is_checked_and_needs_no_device_bundle() {
        let bad = load_str(
            r#"
            device_bundle = "/nonexistent"
            [uplink]
            transport = "mqtt"
            [uplink.mqtt]
            broker = "mqtts://broker.example/some/path"
            username = "box 1"
            password = "x"
            password_file = "/nonexistent/pw"
            keep_alive_s = 0
            "#,
        );
        let err = bad.validate("agent.toml").expect_err("invalid");
        let paths: Vec<&str> = err.issues.iter().map(|i| i.path.as_str()).collect();
        for want in ["uplink.mqtt.broker", "uplink.mqtt.username", "uplink.mqtt.password", "uplink.mqtt.keep_alive_s"] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
        assert!(paths.contains(&"device_bundle"), "mqtts:// without ca needs the bundle's CA: {paths:?}");
        let unknown = load_str("[uplink]\ntransport = \"udp\"\n").validate("agent.toml").expect_err("invalid");
        assert!(unknown.issues.iter().any(|i| i.path == "uplink.transport"), "{unknown}");

        let dir = tempfile::tempdir().expect("tempdir");
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").expect("write");
        let good = RawConfig::load(
            None,
            vec![
                ("ITS_AGENT__DEVICE_BUNDLE".into(), "/nonexistent".into()),
                ("ITS_AGENT__UPLINK__TRANSPORT".into(), "mqtt".into()),
                ("ITS_AGENT__UPLINK__MQTT__BROKER".into(), "mqtt://10.0.0.5".into()),
                ("ITS_AGENT__UPLINK__MQTT__USERNAME".into(), "1234".into()),
                ("ITS_AGENT__UPLINK__MQTT__PASSWORD_FILE".into(), pw.display().to_string()),
            ],
        )
        .expect("parses");
        let cfg = good.validate("env").expect("valid without a device bundle");
        let m = cfg.mqtt_uplink.expect("mqtt uplink");
        assert_eq!((m.host.as_str(), m.port, m.tls_ca.is_none()), ("10.0.0.5", 1883, true));
        assert_eq!((m.username.as_str(), m.password.as_str()), ("1234", "s3cret"));
        assert!(!format!("{m:?}").contains("s3cret"));
        let quic = RawConfig::load(None, Vec::new()).expect("parses").validate("defaults");
        assert!(quic.is_err_and(|e| e.issues.iter().any(|i| i.path == "device_bundle")), "QUIC needs the bundle");
    }

    #[test]
    fn environment_overrides_apply() {
        let raw =
            RawConfig::load(None, vec![("ITS_AGENT__UPLINK__AGGREGATOR".into(), "10.0.0.1:9000".into())]).expect("ok");
        assert_eq!(raw.uplink.aggregator, "10.0.0.1:9000");
    }
}
