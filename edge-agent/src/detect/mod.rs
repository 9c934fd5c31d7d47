//! Detect stage: frames in, boxes out.
//!
//! ```text
//! Picture --Preprocessor--> input tensor --InferenceBackend--> raw outputs --decode + NMS--> Detections
//! ```
//!
//! The model is described by a [`manifest::ModelManifest`]; the network runs on one of the
//! [`backend`]s (tract everywhere; ONNX Runtime and its TensorRT execution provider behind
//! features). [`Detector`] is what the rest of the agent sees.
//!
//! - [`manifest`]: the model's description; [`preprocess`]: pictures (or regions of them) to
//!   input tensors; [`backend`]: running the network; [`decode`]: outputs to boxes, with NMS;
//!   [`regions`]: where in a camera's picture to detect (tiles over the road at a resolution
//!   where far vehicles are big enough, motion- and track-guided), and merging the tiles' boxes;
//!   [`still`]: detection on photos and single frames, and drawing boxes.
//!
//! May depend on: the `decode` stage (`crate::decode`: the pictures it detects on).

pub mod backend;
pub mod decode;
pub mod manifest;
pub mod preprocess;
pub mod regions;
pub mod still;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::decode::Picture;
pub use backend::{BackendError, BackendKind, BackendOptions, InferenceBackend, Outputs, load_backend};
use decode::{Candidate, DecodeError, decode_ssd, decode_yolo, nms_per_class};
pub use manifest::{DecoderSpec, ManifestError, ModelManifest};
pub use preprocess::Rect;
use preprocess::{InputTensor, Preprocessor, empty_tensor};

/// One detected object, in the pixels of the picture it was found in.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    pub class_id: usize,
    pub label: Arc<str>,
    pub score: f32,
    /// `[x1, y1, x2, y2]` in source pixels.
    pub bbox: [f32; 4],
}

/// Time spent in each step of one detection.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DetectTimings {
    pub preprocess: Duration,
    pub inference: Duration,
    pub postprocess: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// The inference backend failed on this frame.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The model's outputs do not match its manifest.
    #[error("model outputs do not match the manifest: {0}")]
    Decode(#[from] DecodeError),
}

/// Finds objects in pictures.
pub trait Detector: Send {
    /// Detections with a score of at least `min_score` (per-class NMS applied), and the time each
    /// step took.
    fn detect(
        &mut self,
        picture: &Picture<'_>,
        min_score: f32,
    ) -> Result<(Vec<Detection>, DetectTimings), DetectError> {
        let (w, h) = picture.size();
        self.detect_region(picture, Rect::full(w, h), min_score)
    }
    /// As [`Detector::detect`], on `region` of the picture only (read at the region's own
    /// resolution); boxes in the picture's pixels, inside the region.
    fn detect_region(
        &mut self,
        picture: &Picture<'_>,
        region: Rect,
        min_score: f32,
    ) -> Result<(Vec<Detection>, DetectTimings), DetectError>;
    /// The model's manifest.
    fn manifest(&self) -> &Arc<ModelManifest>;
    /// Backend name, for logs and benchmarks.
    fn backend_name(&self) -> &'static str;
}

/// A manifest-described model on an inference backend.
pub struct ModelDetector {
    manifest: Arc<ModelManifest>,
    backend: Box<dyn InferenceBackend>,
    pre: Preprocessor,
    input: InputTensor,
    candidates: Vec<Candidate>,
    /// At most this many boxes per frame after NMS (TF-OD-API's default for this family is 100).
    pub max_detections: usize,
}

impl std::fmt::Debug for ModelDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelDetector")
            .field("model", &self.manifest.name)
            .field("backend", &self.backend.name())
            .finish()
    }
}

impl ModelDetector {
    pub fn new(manifest: Arc<ModelManifest>, backend: Box<dyn InferenceBackend>) -> Self {
        let pre = Preprocessor::new(manifest.input.clone());
        let input = empty_tensor(&manifest.input);
        Self { manifest, backend, pre, input, candidates: Vec::new(), max_detections: 100 }
    }

    /// Loads the model of `manifest` (checksum checked) on the backend `options` name.
    pub fn load(manifest: Arc<ModelManifest>, options: &BackendOptions) -> Result<Self, BackendError> {
        let backend = load_backend(&manifest, options)?;
        Ok(Self::new(manifest, backend))
    }

    fn decode(&mut self, outputs: &Outputs, min_score: f32) -> Result<(), DetectError> {
        let m = &self.manifest;
        self.candidates.clear();
        match &m.decoder {
            DecoderSpec::Ssd { anchors, scales, background_column, .. } => decode_ssd(
                outputs.get(0)?,
                outputs.get(1)?,
                anchors,
                *scales,
                *background_column,
                (m.input.width, m.input.height),
                min_score,
                &mut self.candidates,
            )?,
            DecoderSpec::Yolo { layout, .. } => {
                decode_yolo(outputs.get(0)?, *layout, m.class_count(), min_score, &mut self.candidates)?
            }
        }
        Ok(())
    }
}

/// Loads `count` detectors of `manifest`: on the backend `kinds[0]`, or, when it does not load
/// (not compiled in, library missing, no GPU), on the next kind that does; every failure is
/// logged with its reason. All detectors use the first kind that loaded.
pub fn load_detectors(
    manifest: &Arc<ModelManifest>,
    kinds: &[BackendKind],
    options: &BackendOptions,
    count: usize,
) -> Result<Vec<Box<dyn Detector>>, BackendError> {
    let mut last = None;
    for (i, &kind) in kinds.iter().enumerate() {
        let opts = BackendOptions { kind, ..options.clone() };
        match ModelDetector::load(manifest.clone(), &opts) {
            Ok(first) => {
                let mut out: Vec<Box<dyn Detector>> = vec![Box::new(first)];
                for _ in 1..count.max(1) {
                    out.push(Box::new(ModelDetector::load(manifest.clone(), &opts)?));
                }
                return Ok(out);
            }
            Err(e) if i + 1 < kinds.len() => {
                tracing::warn!(backend = kind.as_str(), error = %e, "detector backend unavailable; trying the next");
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or(BackendError::NotCompiled { backend: "any", feature: "tract" }))
}

impl Detector for ModelDetector {
    fn detect_region(
        &mut self,
        picture: &Picture<'_>,
        region: Rect,
        min_score: f32,
    ) -> Result<(Vec<Detection>, DetectTimings), DetectError> {
        let t0 = Instant::now();
        let transform = self.pre.run_region(picture, region, &mut self.input);
        let t1 = Instant::now();
        let outputs = self.backend.run(&self.input)?;
        let t2 = Instant::now();
        self.decode(&outputs, min_score)?;
        let kept = nms_per_class(&mut self.candidates, self.manifest.nms_iou, self.max_detections);
        let detections = kept
            .into_iter()
            .filter_map(|c| {
                let label = self.manifest.label(c.class_id)?.clone();
                let bbox = transform.to_source(c.bbox);
                (bbox[2] > bbox[0] && bbox[3] > bbox[1]).then_some(Detection {
                    class_id: c.class_id,
                    label,
                    score: c.score,
                    bbox,
                })
            })
            .collect();
        let t3 = Instant::now();
        Ok((detections, DetectTimings { preprocess: t1 - t0, inference: t2 - t1, postprocess: t3 - t2 }))
    }

    fn manifest(&self) -> &Arc<ModelManifest> {
        &self.manifest
    }

    fn backend_name(&self) -> &'static str {
        self.backend.name()
    }
}
