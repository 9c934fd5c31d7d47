//! Configuration reload without a restart.
//!
//! The agent watches its configuration file (and reloads at once on SIGHUP). A new file is
//! validated whole first: if anything is wrong, every problem is logged with its path and the
//! running configuration stays, untouched. A valid one is applied camera by camera:
//!
//! - a camera added is started, a camera removed is stopped (its open tracks are ended and its
//!   counts so far reported), a camera whose stream settings changed is restarted;
//! - a camera whose scene changed (calibration, lines, zones, thresholds) keeps its stream and
//!   tracks; its analysis starts afresh on the new scene after reporting its counts so far;
//! - every other camera is not touched at all: no reconnect, no gap, no lost track.
//!
//! Settings that need a restart (detector, tracker, uplink, outbox, device bundle, health,
//! synthetic source) are reported as such and keep their running values.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use its_shared::config::ConfigErrors;
use tokio::sync::mpsc;

use crate::analyze::runner::SceneBoard;
use crate::config::{AgentConfig, RawConfig, VisionConfig};
use crate::pipeline::{CameraSpec, FrameResult, VisionPipeline};
use crate::vision::start_vision;

/// What one reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Cameras restarted because their stream settings changed.
    pub restarted: Vec<String>,
    /// Cameras whose scene changed (stream untouched).
    pub rescened: Vec<String>,
    /// Sections that changed but take effect only at the next restart.
    pub needs_restart: Vec<&'static str>,
}

impl ReloadReport {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Why a reload was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file could not be read or parsed.
    #[error("{0}")]
    Load(#[from] crate::config::ConfigError),
    /// The file is invalid: every problem with its path.
    #[error("{0}")]
    Invalid(ConfigErrors),
    /// Starting a camera failed (no thread could be started).
    #[error("starting camera {camera}: {source}")]
    Start { camera: String, source: std::io::Error },
    /// Starting the detectors for the first cameras failed.
    #[error("starting the cameras: {0:#}")]
    Vision(anyhow::Error),
}

/// The running vision part of the agent, as far as a reload can change it.
pub struct LiveVision {
    raw: RawConfig,
    source: String,
    vision: Option<VisionConfig>,
    pipeline: Arc<RwLock<Option<Arc<VisionPipeline>>>>,
    board: Arc<SceneBoard>,
    results: mpsc::Sender<FrameResult>,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for LiveVision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveVision").field("source", &self.source).finish_non_exhaustive()
    }
}

/// The running pipeline, shared with the health report (`None` while no camera runs).
pub type PipelineSlot = Arc<RwLock<Option<Arc<VisionPipeline>>>>;

fn scene_map(v: &VisionConfig) -> HashMap<String, crate::analyze::SceneSpec> {
    v.cameras.iter().zip(&v.scenes).map(|(c, s)| (c.id.clone(), s.clone())).collect()
}

impl LiveVision {
    /// Starts the cameras of `cfg` (if any). `raw` is what `cfg` was validated from.
    pub fn start(
        raw: RawConfig,
        source: String,
        cfg: &AgentConfig,
        board: Arc<SceneBoard>,
        results: mpsc::Sender<FrameResult>,
        rt: tokio::runtime::Handle,
    ) -> anyhow::Result<Self> {
        let mut live = Self { raw, source, vision: None, pipeline: Arc::new(RwLock::new(None)), board, results, rt };
        for line in describe_scenes(cfg) {
            tracing::info!("{line}");
        }
        if let Some(v) = &cfg.vision {
            live.board.replace(scene_map(v));
            let p = start_vision(v, live.results.clone(), live.rt.clone())?;
            p.keep_open();
            *live.pipeline.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(p));
            live.vision = Some(v.clone());
        }
        Ok(live)
    }

    pub fn pipeline(&self) -> PipelineSlot {
        self.pipeline.clone()
    }

    fn current(&self) -> Option<Arc<VisionPipeline>> {
        self.pipeline.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Validates `new` and applies what changed (see the module docs). On error nothing changes.
    pub fn apply(&mut self, new: RawConfig) -> Result<ReloadReport, ReloadError> {
        let cfg = new.validate(&self.source).map_err(ReloadError::Invalid)?;
        let mut report = ReloadReport::default();
        let (old, raw) = (&self.raw, &new);
        for (name, changed) in [
            ("device_bundle", old.device_bundle != raw.device_bundle),
            ("uplink", old.uplink != raw.uplink),
            ("outbox", old.outbox != raw.outbox),
            ("synthetic", old.synthetic != raw.synthetic),
            ("health", old.health != raw.health),
            ("detector", old.detector != raw.detector),
            ("tracker", old.tracker != raw.tracker),
        ] {
            if changed {
                report.needs_restart.push(name);
            }
        }
        let empty = Vec::new();
        let old_cams = self.vision.as_ref().map_or(&empty, |v| &v.cameras);
        let new_cams = cfg.vision.as_ref().map_or(&empty, |v| &v.cameras);
        let old_scenes = self.vision.as_ref().map(scene_map).unwrap_or_default();
        let new_scenes = cfg.vision.as_ref().map(scene_map).unwrap_or_default();
        let pipeline = self.current();
        match (&pipeline, &cfg.vision) {
            (None, Some(v)) => {
                // The first cameras: load the detectors and start.
                self.board.replace(new_scenes.clone());
                let p = start_vision(v, self.results.clone(), self.rt.clone()).map_err(ReloadError::Vision)?;
                p.keep_open();
                *self.pipeline.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(p));
                report.added = v.cameras.iter().map(|c| c.id.clone()).collect();
            }
            (Some(p), _) => {
                for c in old_cams {
                    match new_cams.iter().find(|n| n.id == c.id) {
                        None => {
                            p.remove_camera(&c.id);
                            report.removed.push(c.id.clone());
                        }
                        Some(n) if !same_stream(n, c) => {
                            p.remove_camera(&c.id);
                            report.restarted.push(c.id.clone());
                        }
                        // Detection follows the scene: new tiles, same stream.
                        Some(n) if n.detection != c.detection => {
                            p.set_detection(&n.id, n.detection.clone());
                        }
                        Some(_) => {}
                    }
                }
                // Scenes first, so a (re)started camera's first frame meets its new scene.
                self.board.replace(new_scenes.clone());
                for n in new_cams {
                    let old = old_cams.iter().find(|c| c.id == n.id);
                    if old.is_none_or(|c| !same_stream(n, c)) {
                        p.add_camera(n.clone())
                            .map_err(|source| ReloadError::Start { camera: n.id.clone(), source })?;
                        if old.is_none() {
                            report.added.push(n.id.clone());
                        }
                    }
                }
            }
            (None, None) => {}
        }
        for (id, spec) in &new_scenes {
            if old_scenes.get(id).is_some_and(|o| o != spec) && !report.restarted.contains(id) {
                report.rescened.push(id.clone());
            }
        }
        self.raw = new;
        if cfg.vision.is_some() {
            self.vision = cfg.vision;
        } else if let Some(v) = &mut self.vision {
            // Every camera removed: the detectors stay loaded for cameras that may come back.
            v.cameras.clear();
            v.scenes.clear();
        }
        Ok(report)
    }

    /// Stops every camera and waits for them.
    pub fn stop(&self) {
        if let Some(p) = self.pipeline.write().unwrap_or_else(|e| e.into_inner()).take() {
            p.stop();
        }
    }
}

/// One line per camera: what its scene measures and how good its calibration is.
pub fn describe_scenes(cfg: &AgentConfig) -> Vec<String> {
    use crate::detect::regions::{ModelInput, plan_tiles};
    let Some(v) = &cfg.vision else { return Vec::new() };
    v.cameras
        .iter()
        .zip(&v.scenes)
        .map(|(c, s)| {
            let cal = match &s.calibration {
                Some(cal) => format!(
                    "calibrated: reprojection error {:.3} m mean, {:.3} m at worst (point {}), {:.2} px mean",
                    cal.reprojection.mean_m, cal.reprojection.max_m, cal.reprojection.worst, cal.reprojection.mean_px
                ),
                None => "not calibrated (no speeds or distances)".to_string(),
            };
            let detection = match s.image_size {
                Some(size) => {
                    let plan = plan_tiles(&c.detection, size, ModelInput::of(&v.manifest.input));
                    let tiles: Vec<String> = plan
                        .tiles
                        .iter()
                        .map(|t| format!("[{}, {}, {}, {}]", t.rect.x, t.rect.y, t.rect.width, t.rect.height))
                        .collect();
                    let size_note = plan
                        .vehicle_px
                        .map_or(String::new(), |px| format!(", a car at least {px:.0} px wide in the model's input"));
                    format!(
                        "detection at {}x{}: {} tile(s) {}{size_note}",
                        size.0,
                        size.1,
                        tiles.len(),
                        tiles.join(" ")
                    )
                }
                None => "detection: tiles planned on the first frame (the scene has no image_size)".to_string(),
            };
            format!("camera {}: {} line(s), {} zone(s); {cal}; {detection}", c.id, s.lines.len(), s.zones.len())
        })
        .collect()
}

/// The same camera stream (everything but the detection settings, which change in place).
fn same_stream(a: &CameraSpec, b: &CameraSpec) -> bool {
    CameraSpec { detection: b.detection.clone(), ..a.clone() } == *b
}

/// Where the configuration comes from, for reloads.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    /// Environment overrides, as at start (they apply to every reload).
    pub env: Vec<(String, String)>,
}

impl ConfigFile {
    /// A fingerprint of the file (its bytes), to notice changes; `None` if unreadable.
    pub fn fingerprint(&self) -> Option<Vec<u8>> {
        std::fs::read(&self.path).ok()
    }

    pub fn load(&self) -> Result<RawConfig, crate::config::ConfigError> {
        RawConfig::load(Some(&self.path), self.env.clone())
    }
}
