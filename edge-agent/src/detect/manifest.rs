//! Model manifests: what a detector model is and how to feed and read it.
//!
//! A manifest is a TOML file beside the model (`models/<name>/model.toml`). It names the model
//! file and its SHA-256 (checked before the model is loaded), the input tensor (size, layout,
//! element type, colour order, how a frame is fitted to it, normalisation), the output decoder
//! (`ssd`: TF Object Detection API box coder with anchors; `yolo`: ultralytics-style one-tensor
//! output), the class names, which classes are road users, and the model's licence and origin.
//!
//! Loading checks everything and reports every problem at once, each with its key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use its_shared::config::ConfigErrors;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The manifest as written in TOML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManifest {
    /// Short model name, reported by the agent to the aggregator.
    pub name: String,
    /// Model file (ONNX), relative to the manifest's directory.
    pub file: PathBuf,
    /// Lower-case hex SHA-256 of the model file.
    pub sha256: String,
    /// Licence of the weights (and of the training data where it differs).
    pub licence: String,
    /// Where the model comes from: upstream project, version, conversion steps.
    pub origin: String,
    pub input: RawInput,
    pub output: RawOutput,
    pub classes: RawClasses,
    #[serde(default)]
    pub defaults: RawDefaults,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInput {
    /// Name of the input tensor in the model graph.
    pub name: String,
    pub width: u32,
    pub height: u32,
    /// `nhwc` or `nchw`.
    pub layout: String,
    /// `u8` (the graph normalises) or `f32` (normalised here with `mean` and `std`).
    pub dtype: String,
    /// `rgb` or `bgr`.
    pub colour: String,
    /// `stretch` (fill the input, aspect ratio not kept) or `letterbox` (kept, padded).
    pub resize: String,
    /// Pixel value of letterbox padding (114 is what ultralytics models are trained with).
    #[serde(default = "default_pad")]
    pub pad_value: u8,
    /// f32 inputs: value = (pixel - mean) / std, per channel in the model's colour order.
    #[serde(default)]
    pub mean: Option<[f32; 3]>,
    #[serde(default)]
    pub std: Option<[f32; 3]>,
}

fn default_pad() -> u8 {
    114
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutput {
    /// `ssd` or `yolo`.
    pub decoder: String,
    /// ssd: box encodings output `[1, N, 4]` or `[1, N, 1, 4]` as (ty, tx, th, tw).
    #[serde(default)]
    pub boxes: Option<String>,
    /// ssd: class scores output `[1, N, C]`, activation already applied in the graph.
    #[serde(default)]
    pub scores: Option<String>,
    /// ssd: anchors file, N x (y_center, x_center, height, width) normalised, little-endian f32.
    #[serde(default)]
    pub anchors: Option<PathBuf>,
    /// ssd: box coder scales (y, x, h, w); TF-OD-API default 10, 10, 5, 5.
    #[serde(default)]
    pub box_scales: Option<[f32; 4]>,
    /// ssd: score column 0 is the background class (TF-OD-API), so column c is class c - 1.
    #[serde(default)]
    pub background_column: Option<bool>,
    /// yolo: the output tensor, `[1, 4 + C, N]` (`channels_first`, ultralytics v8/v11 export) or
    /// `[1, N, 4 + C]` (`channels_last`); boxes as centre x, centre y, width, height in input pixels.
    #[serde(default)]
    pub tensor: Option<String>,
    #[serde(default)]
    pub layout: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClasses {
    /// Labels file relative to the manifest, one `index label` (or just `label`) per line;
    /// indices without a line have no label and their detections are dropped.
    pub labels: PathBuf,
    /// Classes that are road users: only these are tracked and turned into traffic events.
    pub road_users: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    /// Confidence above which a detection counts as a real object.
    pub score_threshold: f32,
    /// IoU above which two boxes of one class are the same object (per-class NMS).
    pub nms_iou: f32,
}

impl Default for RawDefaults {
    fn default() -> Self {
        Self { score_threshold: 0.5, nms_iou: 0.5 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Nhwc,
    Nchw,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InputType {
    U8,
    F32 { mean: [f32; 3], std: [f32; 3] },
}

impl InputType {
    pub fn is_u8(&self) -> bool {
        matches!(self, InputType::U8)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColourOrder {
    Rgb,
    Bgr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeMode {
    Stretch,
    Letterbox { pad: u8 },
}

/// How a frame becomes the model's input tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub layout: Layout,
    pub dtype: InputType,
    pub colour: ColourOrder,
    pub resize: ResizeMode,
}

impl InputSpec {
    /// The input tensor's shape.
    pub fn shape(&self) -> [usize; 4] {
        let (w, h) = (self.width as usize, self.height as usize);
        match self.layout {
            Layout::Nhwc => [1, h, w, 3],
            Layout::Nchw => [1, 3, h, w],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YoloLayout {
    /// `[1, 4 + C, N]`: ultralytics v8/v11 ONNX export.
    ChannelsFirst,
    /// `[1, N, 4 + C]`.
    ChannelsLast,
}

/// How raw outputs become boxes.
#[derive(Debug, Clone, PartialEq)]
pub enum DecoderSpec {
    Ssd { boxes: String, scores: String, anchors: Arc<[[f32; 4]]>, scales: [f32; 4], background_column: bool },
    Yolo { tensor: String, layout: YoloLayout },
}

impl DecoderSpec {
    /// Names of the outputs the decoder reads, in the order it reads them.
    pub fn output_names(&self) -> Vec<&str> {
        match self {
            DecoderSpec::Ssd { boxes, scores, .. } => vec![boxes, scores],
            DecoderSpec::Yolo { tensor, .. } => vec![tensor],
        }
    }
}

/// A validated manifest.
#[derive(Debug, Clone)]
pub struct ModelManifest {
    pub name: String,
    /// Absolute (or manifest-relative resolved) path of the model file.
    pub model_path: PathBuf,
    pub sha256: String,
    pub licence: String,
    pub origin: String,
    pub input: InputSpec,
    pub decoder: DecoderSpec,
    /// Label of each class id; `None` where the labels file has no entry.
    pub labels: Vec<Option<Arc<str>>>,
    /// Whether each class id is a road user.
    pub road_user: Vec<bool>,
    pub score_threshold: f32,
    pub nms_iou: f32,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The manifest or a file it names could not be read.
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    /// The manifest is not valid TOML or has unknown keys.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// The manifest parsed but its values are wrong (every problem listed).
    #[error("{0}")]
    Invalid(ConfigErrors),
    /// The model file is not the one the manifest describes.
    #[error("{path}: SHA-256 is {actual}, the manifest expects {expected}; refusing to load a different model")]
    Checksum { path: PathBuf, expected: String, actual: String },
}

fn read_err(path: &Path, e: impl std::fmt::Display) -> ManifestError {
    ManifestError::Read { path: path.to_path_buf(), message: e.to_string() }
}

impl ModelManifest {
    /// Reads and validates the manifest at `path` (the model file's checksum is checked by
    /// [`ModelManifest::read_model`], when the model is loaded).
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|e| read_err(path, e))?;
        let raw: RawManifest = toml::from_str(&text)
            .map_err(|e| ManifestError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        raw.validate(dir, &path.display().to_string())
    }

    /// Reads the model file and checks its SHA-256 against the manifest.
    pub fn read_model(&self) -> Result<Vec<u8>, ManifestError> {
        let bytes = std::fs::read(&self.model_path).map_err(|e| read_err(&self.model_path, e))?;
        let actual = hex(&Sha256::digest(&bytes));
        if actual != self.sha256 {
            return Err(ManifestError::Checksum {
                path: self.model_path.clone(),
                expected: self.sha256.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// The label of `class_id`, if it has one.
    pub fn label(&self, class_id: usize) -> Option<&Arc<str>> {
        self.labels.get(class_id).and_then(|l| l.as_ref())
    }

    pub fn is_road_user(&self, class_id: usize) -> bool {
        self.road_user.get(class_id).copied().unwrap_or(false)
    }

    /// Number of classes the model outputs (after the background column, for SSD).
    pub fn class_count(&self) -> usize {
        self.labels.len()
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl RawManifest {
    /// Validates against the files in `dir`; every problem is reported at once.
    pub fn validate(self, dir: &Path, source: &str) -> Result<ModelManifest, ManifestError> {
        let mut e = ConfigErrors::new(source);
        e.check(!self.name.trim().is_empty(), "name", || "must not be empty".into());
        let model_path = dir.join(&self.file);
        e.check(model_path.is_file(), "file", || format!("{} does not exist", model_path.display()));
        let sha_ok = self.sha256.len() == 64 && self.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        e.check(sha_ok, "sha256", || "must be 64 hex digits".into());
        e.check(!self.licence.trim().is_empty(), "licence", || "must say the model's licence".into());
        e.check(!self.origin.trim().is_empty(), "origin", || "must say where the model comes from".into());

        let i = &self.input;
        e.check((16..=4096).contains(&i.width), "input.width", || format!("{} is outside 16..=4096", i.width));
        e.check((16..=4096).contains(&i.height), "input.height", || format!("{} is outside 16..=4096", i.height));
        let layout = match i.layout.as_str() {
            "nhwc" => Some(Layout::Nhwc),
            "nchw" => Some(Layout::Nchw),
            other => {
                e.push("input.layout", format!("{other:?} is not one of nhwc, nchw"));
                None
            }
        };
        let dtype = match (i.dtype.as_str(), i.mean, i.std) {
            ("u8", None, None) => Some(InputType::U8),
            ("u8", _, _) => {
                e.push("input.mean", "mean/std apply to f32 inputs only (a u8 graph normalises itself)");
                None
            }
            ("f32", mean, std) => {
                let (mean, std) = (mean.unwrap_or([0.0; 3]), std.unwrap_or([255.0; 3]));
                e.check(std.iter().all(|s| s.is_finite() && *s != 0.0), "input.std", || "must be non-zero".into());
                Some(InputType::F32 { mean, std })
            }
            (other, _, _) => {
                e.push("input.dtype", format!("{other:?} is not one of u8, f32"));
                None
            }
        };
        let colour = match i.colour.as_str() {
            "rgb" => Some(ColourOrder::Rgb),
            "bgr" => Some(ColourOrder::Bgr),
            other => {
                e.push("input.colour", format!("{other:?} is not one of rgb, bgr"));
                None
            }
        };
        let resize = match i.resize.as_str() {
            "stretch" => Some(ResizeMode::Stretch),
            "letterbox" => Some(ResizeMode::Letterbox { pad: i.pad_value }),
            other => {
                e.push("input.resize", format!("{other:?} is not one of stretch, letterbox"));
                None
            }
        };

        let labels_path = dir.join(&self.classes.labels);
        let labels = match std::fs::read_to_string(&labels_path) {
            Ok(text) => match parse_labels(&text) {
                Ok(l) => l,
                Err(msg) => {
                    e.push("classes.labels", format!("{}: {msg}", labels_path.display()));
                    Vec::new()
                }
            },
            Err(err) => {
                e.push("classes.labels", format!("{}: {err}", labels_path.display()));
                Vec::new()
            }
        };
        let mut road_user = vec![false; labels.len()];
        for (k, name) in self.classes.road_users.iter().enumerate() {
            match labels.iter().position(|l| l.as_deref() == Some(name.as_str())) {
                Some(idx) => road_user[idx] = true,
                None if labels.is_empty() => {}
                None => e.push(format!("classes.road_users[{k}]"), format!("{name:?} is not a label of this model")),
            }
        }
        e.check(!self.classes.road_users.is_empty(), "classes.road_users", || "must name at least one class".into());

        let o = &self.output;
        let decoder = match o.decoder.as_str() {
            "ssd" => {
                let need = |e: &mut ConfigErrors, v: &Option<String>, key: &str| {
                    if v.is_none() {
                        e.push(format!("output.{key}"), "required for the ssd decoder");
                    }
                    v.clone().unwrap_or_default()
                };
                let boxes = need(&mut e, &o.boxes, "boxes");
                let scores = need(&mut e, &o.scores, "scores");
                let anchors = match &o.anchors {
                    None => {
                        e.push("output.anchors", "required for the ssd decoder");
                        Vec::new()
                    }
                    Some(p) => {
                        let p = dir.join(p);
                        match std::fs::read(&p) {
                            Ok(bytes) if bytes.len() % 16 == 0 && !bytes.is_empty() => parse_anchors(&bytes),
                            Ok(bytes) => {
                                e.push(
                                    "output.anchors",
                                    format!(
                                        "{}: {} bytes is not a whole number of 4 x f32 anchors",
                                        p.display(),
                                        bytes.len()
                                    ),
                                );
                                Vec::new()
                            }
                            Err(err) => {
                                e.push("output.anchors", format!("{}: {err}", p.display()));
                                Vec::new()
                            }
                        }
                    }
                };
                if anchors.iter().any(|a| a.iter().any(|v| !v.is_finite()) || a[2] <= 0.0 || a[3] <= 0.0) {
                    e.push("output.anchors", "anchors must be finite with positive height and width");
                }
                let scales = o.box_scales.unwrap_or([10.0, 10.0, 5.0, 5.0]);
                e.check(scales.iter().all(|s| s.is_finite() && *s > 0.0), "output.box_scales", || {
                    "must be positive".into()
                });
                for key in ["tensor", "layout"] {
                    let set = if key == "tensor" { o.tensor.is_some() } else { o.layout.is_some() };
                    e.check(!set, &format!("output.{key}"), || "applies to the yolo decoder only".into());
                }
                Some(DecoderSpec::Ssd {
                    boxes,
                    scores,
                    anchors: anchors.into(),
                    scales,
                    background_column: o.background_column.unwrap_or(true),
                })
            }
            "yolo" => {
                let tensor = o.tensor.clone().unwrap_or_default();
                e.check(o.tensor.is_some(), "output.tensor", || "required for the yolo decoder".into());
                let layout = match o.layout.as_deref().unwrap_or("channels_first") {
                    "channels_first" => YoloLayout::ChannelsFirst,
                    "channels_last" => YoloLayout::ChannelsLast,
                    other => {
                        e.push("output.layout", format!("{other:?} is not one of channels_first, channels_last"));
                        YoloLayout::ChannelsFirst
                    }
                };
                for (key, set) in
                    [("boxes", o.boxes.is_some()), ("scores", o.scores.is_some()), ("anchors", o.anchors.is_some())]
                {
                    e.check(!set, &format!("output.{key}"), || "applies to the ssd decoder only".into());
                }
                Some(DecoderSpec::Yolo { tensor, layout })
            }
            other => {
                e.push("output.decoder", format!("{other:?} is not one of ssd, yolo"));
                None
            }
        };

        let d = &self.defaults;
        e.check(d.score_threshold > 0.0 && d.score_threshold < 1.0, "defaults.score_threshold", || {
            format!("{} is outside (0, 1)", d.score_threshold)
        });
        e.check(d.nms_iou > 0.0 && d.nms_iou <= 1.0, "defaults.nms_iou", || format!("{} is outside (0, 1]", d.nms_iou));

        match (layout, dtype, colour, resize, decoder) {
            (Some(layout), Some(dtype), Some(colour), Some(resize), Some(decoder)) if e.is_empty() => {
                Ok(ModelManifest {
                    name: self.name,
                    model_path,
                    sha256: self.sha256.to_ascii_lowercase(),
                    licence: self.licence,
                    origin: self.origin,
                    input: InputSpec {
                        name: i.name.clone(),
                        width: i.width,
                        height: i.height,
                        layout,
                        dtype,
                        colour,
                        resize,
                    },
                    decoder,
                    labels,
                    road_user,
                    score_threshold: d.score_threshold,
                    nms_iou: d.nms_iou,
                })
            }
            _ => Err(ManifestError::Invalid(e)),
        }
    }
}

/// Parses a labels file: `index label` per line (indices may skip), or one bare label per line
/// (index = line number). Blank lines are ignored in the indexed form only.
pub fn parse_labels(text: &str) -> Result<Vec<Option<Arc<str>>>, String> {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let indexed = lines.iter().all(|l| {
        l.split_once(char::is_whitespace).is_some_and(|(i, rest)| i.parse::<usize>().is_ok() && !rest.trim().is_empty())
    });
    let mut out: Vec<Option<Arc<str>>> = Vec::new();
    if indexed {
        for (n, l) in lines.iter().enumerate() {
            let Some((i, rest)) = l.split_once(char::is_whitespace) else { continue };
            let idx: usize = i.parse().map_err(|_| format!("line {}: bad index", n + 1))?;
            if idx > 100_000 {
                return Err(format!("line {}: index {idx} is implausibly large", n + 1));
            }
            if out.len() <= idx {
                out.resize(idx + 1, None);
            }
            if out[idx].is_some() {
                return Err(format!("line {}: index {idx} appears twice", n + 1));
            }
            out[idx] = Some(Arc::from(rest.trim()));
        }
    } else {
        out = lines.iter().map(|l| Some(Arc::from(*l))).collect();
    }
    if out.is_empty() {
        return Err("no labels".into());
    }
    Ok(out)
}

fn parse_anchors(bytes: &[u8]) -> Vec<[f32; 4]> {
    bytes
        .chunks_exact(16)
        .map(|c| {
            let f = |k: usize| f32::from_le_bytes([c[4 * k], c[4 * k + 1], c[4 * k + 2], c[4 * k + 3]]);
            [f(0), f(1), f(2), f(3)]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn shipped_manifest_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/ssd-mobilenet-v2-coco/model.toml")
    }

    #[test]
    fn the_shipped_manifest_loads_and_its_model_matches_the_checksum() {
        let m = ModelManifest::load(&shipped_manifest_path()).expect("shipped manifest is valid");
        assert_eq!(m.input.shape(), [1, 300, 300, 3]);
        assert_eq!(m.label(0).map(|l| &**l), Some("person"));
        assert_eq!(m.label(7).map(|l| &**l), Some("truck"));
        assert_eq!(m.label(11), None, "COCO's label file skips index 11");
        assert!(m.is_road_user(2) && !m.is_road_user(16), "car is a road user, a dog is not");
        match &m.decoder {
            DecoderSpec::Ssd { anchors, .. } => assert_eq!(anchors.len(), 1917),
            other => panic!("unexpected decoder {other:?}"),
        }
        assert_eq!(m.read_model().expect("checksum matches").len(), 24_272_592);
    }

    #[test]
    fn a_model_file_that_differs_from_the_manifest_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = shipped_manifest_path();
        let src_dir = src.parent().expect("dir");
        for f in ["model.toml", "coco_labels.txt", "ssd_v2_anchors_yxhw_f32le.bin"] {
            std::fs::copy(src_dir.join(f), dir.path().join(f)).expect("copy");
        }
        std::fs::write(dir.path().join("ssd_mobilenet_v2_coco_raw_float.onnx"), b"not the model").expect("write");
        let m = ModelManifest::load(&dir.path().join("model.toml")).expect("manifest itself is valid");
        let err = m.read_model().expect_err("checksum differs");
        assert!(matches!(err, ManifestError::Checksum { .. }), "{err}");
        assert!(err.to_string().contains("refusing"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("labels.txt"), "car\nperson\n").expect("write");
        let toml = r#"
            name = ""
            file = "missing.onnx"
            sha256 = "abc"
            licence = "MIT"
            origin = "test"
            [input]
            name = "images"
            width = 8
            height = 640
            layout = "hwc"
            dtype = "u8"
            colour = "rgb"
            resize = "crop"
            [output]
            decoder = "yolo"
            anchors = "a.bin"
            [classes]
            labels = "labels.txt"
            road_users = ["car", "tractor"]
            [defaults]
            score_threshold = 1.5
            nms_iou = 0.5
        "#;
        let raw: RawManifest = toml::from_str(toml).expect("parses");
        let err = match raw.validate(dir.path(), "m.toml") {
            Err(ManifestError::Invalid(e)) => e,
            other => panic!("expected invalid, got {other:?}"),
        };
        let paths: Vec<&str> = err.issues.iter().map(|i| i.path.as_str()).collect();
        for want in [
            "name",
            "file",
            "sha256",
            "input.width",
            "input.layout",
            "input.resize",
            "output.tensor",
            "output.anchors",
            "classes.road_users[1]",
            "defaults.score_threshold",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
    }

    #[test]
    fn labels_files_in_both_forms() {
        let indexed = parse_labels("0  person\n2 car\n").expect("indexed");
        assert_eq!(indexed.len(), 3);
        assert_eq!(indexed[1], None);
        assert_eq!(indexed[2].as_deref(), Some("car"));
        let bare = parse_labels("person\nbicycle\ntraffic light\n").expect("bare");
        assert_eq!(bare[2].as_deref(), Some("traffic light"));
        assert!(parse_labels("0 a\n0 b\n").is_err(), "duplicate index");
        assert!(parse_labels("\n\n").is_err(), "empty");
    }
}
