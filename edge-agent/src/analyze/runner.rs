//! The analyze stage's runtime: one thread turns every camera's frame results into events (and
//! the pictures some of them carry), in order per camera, and hands them to the committer.
//!
//! Scenes can change while it runs ([`SceneBoard`], hot reload): a camera whose scene changed
//! reports its counts so far and starts afresh on the new lines and zones; the other cameras do
//! not notice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::scene::SceneAnalyzer;
use super::snapshot::encode_snapshot;
use super::tracks::track_events;
use crate::analyze::config::SceneSpec;
use crate::buffer::{NewEvent, SnapshotImages};
use crate::pipeline::FrameResult;

/// The scenes the analyze stage applies, by camera id; replaced as a whole on reload.
#[derive(Debug, Default)]
pub struct SceneBoard {
    scenes: Mutex<HashMap<String, SceneSpec>>,
    generation: AtomicU64,
}

impl SceneBoard {
    /// Publishes a new set of scenes (cameras absent from it get an empty scene).
    pub fn replace(&self, scenes: HashMap<String, SceneSpec>) {
        *self.scenes.lock().unwrap_or_else(|p| p.into_inner()) = scenes;
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn get(&self, camera: &str) -> SceneSpec {
        self.scenes.lock().unwrap_or_else(|p| p.into_inner()).get(camera).cloned().unwrap_or_default()
    }
}

/// Events ready to commit, with the pictures of some of them (index into `events`).
#[derive(Debug, Default)]
pub struct Analyzed {
    pub events: Vec<NewEvent>,
    pub snapshots: Vec<(usize, SnapshotImages)>,
}

struct CameraAnalysis {
    generation: u64,
    analyzer: SceneAnalyzer,
}

/// Runs until `results` closes (the pipeline stopped) or `out` is gone. Blocking: run it on its
/// own thread.
pub fn run_analysis(mut results: mpsc::Receiver<FrameResult>, board: Arc<SceneBoard>, out: mpsc::Sender<Analyzed>) {
    let mut cameras: HashMap<Arc<str>, CameraAnalysis> = HashMap::new();
    while let Some(r) = results.blocking_recv() {
        let mut batch = Analyzed { events: track_events(&r), snapshots: Vec::new() };
        let generation = board.generation();
        let cam = cameras.entry(r.camera_id.clone()).or_insert_with(|| CameraAnalysis {
            generation,
            analyzer: SceneAnalyzer::new(&r.camera_id, board.get(&r.camera_id)),
        });
        if cam.generation != generation {
            cam.generation = generation;
            let spec = board.get(&r.camera_id);
            if &spec != cam.analyzer.spec() {
                tracing::info!(camera = %r.camera_id, lines = spec.lines.len(), zones = spec.zones.len(), "scene reconfigured");
                batch.events.extend(cam.analyzer.reconfigure(spec, r.wall_ms).into_iter().map(|a| a.event));
            }
        }
        for a in cam.analyzer.process(&r) {
            if let (Some(ask), Some(frame)) = (a.snapshot, r.frame.as_deref()) {
                match encode_snapshot(frame, ask.bbox) {
                    Ok(j) => {
                        let images = SnapshotImages { taken_at_ms: r.wall_ms, full_jpeg: j.full, crop_jpeg: j.crop };
                        batch.snapshots.push((batch.events.len(), images));
                    }
                    Err(e) => {
                        tracing::warn!(camera = %r.camera_id, error = %e, "snapshot not encoded; event sent without it");
                    }
                }
            }
            batch.events.push(a.event);
        }
        if batch.events.is_empty() {
            continue;
        }
        if out.blocking_send(batch).is_err() {
            return;
        }
    }
}
