//! Running a recording through the agent's own pipeline: the camera is built from the agent
//! configuration as the agent builds it ([`RawConfig::validate`]), its source replaced by the
//! recording read once and as fast as detection takes the frames, none dropped; the detector is
//! loaded as [`crate::vision`] loads it; [`VisionPipeline`] decodes, detects and tracks; and the
//! camera's [`SceneAnalyzer`] turns the tracks into line crossings, as in the running agent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use its_shared::config::ConfigErrors;
use its_shared::event::EventKind;
use tokio::sync::mpsc;

use super::EvaluateError;
use super::compare::Crossing;
use crate::analyze::{RawScene, SceneAnalyzer, SceneSpec};
use crate::config::{RawCamera, RawConfig, RawUplink, RawUplinkMqtt, VisionConfig};
use crate::pipeline::{CameraStats, VisionPipeline, VisionSettings};

/// The camera id a recording of no configured camera runs under.
const RECORDING_CAMERA: &str = "recording";
/// Results waiting for the analyzer (the detector is far slower than the analyzer).
const RESULTS_CHANNEL: usize = 64;
/// Progress is logged every this much of the recording (ms).
const PROGRESS_EVERY_MS: i64 = 60_000;

/// Where the scene comes from.
#[derive(Debug, Clone)]
pub enum SceneSource {
    /// `[cameras.scene]` of this camera of the configuration.
    Camera(String),
    /// A file holding one scene table; with the detection settings of `camera` when given, else
    /// those of a camera with every default.
    File { path: PathBuf, camera: Option<String> },
}

/// What runs: the recording as the configured camera, with its scene and the detector.
#[derive(Debug, Clone)]
pub struct EvaluationPlan {
    pub recording: PathBuf,
    pub camera_id: String,
    /// Where the scene came from, for the report (`agent.toml: cameras[2].scene`, `scene.toml`).
    pub scene_source: String,
    pub scene: SceneSpec,
    pub vision: VisionConfig,
}

impl EvaluationPlan {
    /// Names of the scene's count lines.
    pub fn line_names(&self) -> Vec<String> {
        self.scene.lines.iter().map(|l| l.name.clone()).collect()
    }
}

/// The configuration of one camera, `camera` (`None`: one of every default), whose source is the
/// recording, with the configuration's detector and tracker, validated as the agent validates it.
///
/// Only the camera, detector and tracker of `raw` matter here; the rest (uplink, outbox, the
/// other cameras) is replaced by defaults that need nothing on this machine (an uplink through a
/// broker that is never contacted), so an engineer can evaluate on a laptop without the box's
/// device certificate.
pub fn plan(
    raw: &RawConfig,
    source: &str,
    recording: &Path,
    scene: &SceneSource,
    file_fps: Option<f64>,
) -> Result<EvaluationPlan, EvaluateError> {
    if !recording.is_file() {
        return Err(EvaluateError::Recording(format!("{} is not a readable file", recording.display())));
    }
    let url = recording
        .to_str()
        .filter(|u| !u.contains("://"))
        .ok_or_else(|| EvaluateError::Recording(format!("{}: give a local file path", recording.display())))?;
    let pick = |id: &str| -> Result<(usize, RawCamera), EvaluateError> {
        let known: Vec<&str> = raw.cameras.iter().map(|c| c.id.as_str()).collect();
        raw.cameras.iter().position(|c| c.id == id).map(|i| (i, raw.cameras[i].clone())).ok_or_else(|| {
            EvaluateError::Usage(format!(
                "{source} has no camera {id:?} (its cameras: {})",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ))
        })
    };
    let (index, mut camera, scene_file) = match scene {
        SceneSource::Camera(id) => {
            let (i, c) = pick(id)?;
            (Some(i), c, None)
        }
        SceneSource::File { path, camera } => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| EvaluateError::Scene(format!("{}: cannot be read: {e}", path.display())))?;
            let table: RawScene = toml::from_str(&text)
                .map_err(|e| EvaluateError::Scene(format!("{}: {}", path.display(), e.to_string().trim_end())))?;
            let (index, mut c) = match camera {
                Some(id) => {
                    let (i, c) = pick(id)?;
                    (Some(i), c)
                }
                None => (None, RawCamera { id: RECORDING_CAMERA.into(), ..RawCamera::default() }),
            };
            c.scene = table;
            (index, c, Some(path.display().to_string()))
        }
    };
    camera.url = url.to_string();
    camera.looped = false;
    camera.realtime = false;
    if let Some(fps) = file_fps {
        camera.file_fps = fps;
    }
    let camera_id = camera.id.clone();
    let offline = RawConfig {
        cameras: vec![camera],
        detector: raw.detector.clone(),
        tracker: raw.tracker.clone(),
        uplink: RawUplink {
            transport: "mqtt".into(),
            mqtt: RawUplinkMqtt {
                broker: "mqtt://localhost".into(),
                username: "evaluate".into(),
                password: "unused".into(),
                ..RawUplinkMqtt::default()
            },
            ..RawUplink::default()
        },
        ..RawConfig::default()
    };
    let cfg = offline.validate(source).map_err(|e| EvaluateError::Config(renamed(e, index, scene_file.as_deref())))?;
    let vision = cfg.vision.ok_or_else(|| EvaluateError::Usage("no camera to evaluate".into()))?;
    let scene = vision.scenes.first().cloned().ok_or_else(|| EvaluateError::Usage("the camera has no scene".into()))?;
    if scene.lines.is_empty() {
        return Err(EvaluateError::Scene(format!(
            "the scene of camera {camera_id:?} has no count line: nothing to compare"
        )));
    }
    let scene_source = match (&scene_file, index) {
        (Some(f), _) => f.clone(),
        (None, Some(i)) => format!("{source}: cameras[{i}].scene"),
        (None, None) => source.to_string(),
    };
    Ok(EvaluationPlan { recording: recording.to_path_buf(), camera_id, scene_source, scene, vision })
}

/// The evaluated camera is `cameras[0]` of the reduced configuration: its problems are reported
/// at the camera's place in the real file, or in the scene file.
fn renamed(mut e: ConfigErrors, index: Option<usize>, scene_file: Option<&str>) -> ConfigErrors {
    if let Some(f) = scene_file {
        e.source = format!("{} and {f}", e.source);
    }
    for issue in &mut e.issues {
        let rest = issue.path.strip_prefix("cameras[0]").map(str::to_string);
        if let Some(rest) = rest {
            issue.path = match (rest.strip_prefix(".scene"), scene_file, index) {
                (Some(s), Some(f), _) => format!("{f}: {}", s.trim_start_matches('.')),
                (_, _, Some(i)) => format!("cameras[{i}]{rest}"),
                (_, _, None) => format!("camera{rest}"),
            };
        }
    }
    e
}

/// What the pipeline made of the recording.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub crossings: Vec<Crossing>,
    pub backend: String,
    pub frames_decoded: u64,
    pub frames_detected: u64,
    pub decode_errors: u64,
    pub detect_errors: u64,
    /// Frames dropped from the detection queue: 0 for a recording (it waits instead).
    pub frames_dropped: u64,
    /// Detector runs per detected frame (several when the picture is detected in tiles; fewer
    /// where nothing moved); `None` when no frame was detected.
    pub inferences_per_frame: Option<f64>,
    /// Tiles of the camera's detection plan at the end (1: the whole frame).
    pub detection_tiles: u64,
    /// Stream time of the last frame, from the first, ms.
    pub last_frame_ms: i64,
    /// How long the evaluation took, seconds (decode, detection, tracking, analysis).
    pub processing_s: f64,
}

/// Detector runs per detected frame (above 1 when the picture is detected in tiles).
fn inferences_per_frame(stats: &CameraStats) -> Option<f64> {
    let frames = stats.frames_detected.load(Ordering::Relaxed);
    (frames > 0).then(|| stats.inferences.load(Ordering::Relaxed) as f64 / frames as f64)
}

/// Runs the recording through the pipeline and the analyzer; returns the crossings, each timed
/// from the first frame of the recording.
pub fn run_recording(plan: &EvaluationPlan) -> Result<RunOutcome, EvaluateError> {
    let t0 = Instant::now();
    let v = &plan.vision;
    // One camera: one detector (a camera's frames are detected in order).
    let detectors =
        crate::vision::load_configured_detectors(v, 1).map_err(|e| EvaluateError::Detector(format!("{e:#}")))?;
    let backend = detectors.first().map_or("none", |d| d.backend_name()).to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| EvaluateError::Pipeline(format!("starting the runtime: {e}")))?;
    let settings = VisionSettings { tracker: v.tracker, merged_classes: v.merged_classes.clone() };
    let (tx, mut rx) = mpsc::channel(RESULTS_CHANNEL);
    let pipeline = VisionPipeline::start(v.cameras.clone(), detectors, settings, tx, rt.handle().clone())
        .map_err(|e| EvaluateError::Pipeline(format!("starting the pipeline: {e}")))?;
    let stats: Option<Arc<CameraStats>> = pipeline.stats().first().cloned();
    let mut analyzer = SceneAnalyzer::new(&plan.camera_id, plan.scene.clone());
    // Wall-clock time of the first frame: a recording read faster than real time keeps its own
    // timestamps (see `StreamClock`), so event times minus this are offsets into the recording.
    let mut first_ms: Option<i64> = None;
    let mut last_frame_ms = 0;
    let mut next_progress = PROGRESS_EVERY_MS;
    let mut crossings = Vec::new();
    while let Some(r) = rx.blocking_recv() {
        let wall0 = *first_ms.get_or_insert(r.wall_ms);
        if !r.end_of_stream {
            last_frame_ms = last_frame_ms.max(r.wall_ms - wall0);
        }
        if last_frame_ms >= next_progress {
            let fps = stats.as_ref().map_or(0, |s| s.frames_decoded.load(Ordering::Relaxed)) as f64
                / t0.elapsed().as_secs_f64().max(1e-3);
            tracing::info!(
                at = %super::truth::format_time(last_frame_ms),
                crossings = crossings.len(),
                frames_per_s = %format!("{fps:.1}"),
                "evaluating"
            );
            next_progress = (last_frame_ms / PROGRESS_EVERY_MS + 1) * PROGRESS_EVERY_MS;
        }
        for a in analyzer.process(&r) {
            if let EventKind::LineCrossing { line, object, direction, speed_kmh } = a.event.kind {
                crossings.push(Crossing {
                    t_ms: a.event.observed_at_ms - wall0,
                    line,
                    direction,
                    class: object.label,
                    speed_kmh: speed_kmh.map(f64::from),
                });
            }
        }
    }
    let frames_dropped = pipeline.frames_dropped(0);
    pipeline.join();
    crossings.sort_by_key(|c| c.t_ms);
    let Some(stats) = stats else {
        return Err(EvaluateError::Pipeline("the camera did not start".into()));
    };
    if stats.source.state() == "failed" {
        let why = stats.source.last_error.lock().ok().and_then(|g| g.clone()).unwrap_or_default();
        return Err(EvaluateError::Recording(format!("{}: not read to its end: {why}", plan.recording.display())));
    }
    let frames_decoded = stats.frames_decoded.load(Ordering::Relaxed);
    if frames_decoded == 0 {
        return Err(EvaluateError::Recording(format!("{}: no frame could be decoded", plan.recording.display())));
    }
    Ok(RunOutcome {
        crossings,
        backend,
        frames_decoded,
        frames_detected: stats.frames_detected.load(Ordering::Relaxed),
        decode_errors: stats.decode_errors.load(Ordering::Relaxed),
        detect_errors: stats.detect_errors.load(Ordering::Relaxed),
        frames_dropped,
        inferences_per_frame: inferences_per_frame(&stats),
        detection_tiles: stats.detection_tiles.load(Ordering::Relaxed),
        last_frame_ms,
        processing_s: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_of_the_reduced_configuration_are_named_where_they_are_written() {
        let mut e = ConfigErrors::new("agent.toml");
        e.push("cameras[0].scene.lines[1].in_side", "bad");
        e.push("cameras[0].detect_fps", "bad");
        e.push("detector.model", "bad");
        let r = renamed(e.clone(), Some(3), None);
        let paths: Vec<&str> = r.issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["cameras[3].scene.lines[1].in_side", "cameras[3].detect_fps", "detector.model"]);
        let r = renamed(e, None, Some("scene.toml"));
        let paths: Vec<&str> = r.issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["scene.toml: lines[1].in_side", "camera.detect_fps", "detector.model"]);
        assert_eq!(r.source, "agent.toml and scene.toml");
    }
}
