//! Starting the vision part of the agent from its validated configuration: the detectors (on the
//! configured backend, or the best one that loads) and the cameras' [`VisionPipeline`]. The agent
//! starts it at launch, [`crate::reload`] when the first cameras arrive with a new configuration.
//!
//! May depend on: `config`, `detect`, `pipeline`.

use anyhow::Context;
use tokio::sync::mpsc;

use crate::config::{BackendChoice, VisionConfig};
use crate::detect::{BackendKind, BackendOptions, Detector, load_detectors};
use crate::pipeline::{FrameResult, VisionPipeline, VisionSettings};

/// Loads `workers` detectors on the configured backend, or on the best that loads (`auto`).
pub fn load_configured_detectors(v: &VisionConfig, workers: usize) -> anyhow::Result<Vec<Box<dyn Detector>>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads =
        if v.backend_options.threads > 0 { v.backend_options.threads } else { (cores / workers.max(1)).max(1) };
    let kinds: Vec<BackendKind> = match v.backend {
        BackendChoice::Only(k) => vec![k],
        BackendChoice::Auto => BackendKind::compiled_fastest_first(),
    };
    let options = BackendOptions { threads, ..v.backend_options.clone() };
    let detectors = load_detectors(&v.manifest, &kinds, &options, workers)
        .with_context(|| format!("loading the detector {}", v.manifest.model_path.display()))?;
    tracing::info!(
        model = %v.manifest.name,
        backend = detectors.first().map_or("none", |d| d.backend_name()),
        workers,
        threads,
        "detector loaded"
    );
    Ok(detectors)
}

/// Loads the detectors (the configured backend, or the best that loads) and starts the cameras.
pub fn start_vision(
    v: &VisionConfig,
    results: mpsc::Sender<FrameResult>,
    rt: tokio::runtime::Handle,
) -> anyhow::Result<VisionPipeline> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = if v.workers > 0 { v.workers } else { cores.min(v.cameras.len()).max(1) };
    let detectors = load_configured_detectors(v, workers)?;
    tracing::info!(cameras = v.cameras.len(), workers, "starting the cameras");
    let settings = VisionSettings { tracker: v.tracker, merged_classes: v.merged_classes.clone() };
    Ok(VisionPipeline::start(v.cameras.clone(), detectors, settings, results, rt)?)
}
