//! Inference backends: run the network on an input tensor, return its outputs.
//!
//! | backend | feature | runs on | needs at run time |
//! |---|---|---|---|
//! | [`BackendKind::Tract`] | `tract` (default) | any CPU | nothing |
//! | [`BackendKind::OnnxRuntime`] | `onnxruntime` | CPU | `libonnxruntime.so` >= 1.17 |
//! | [`BackendKind::TensorRt`] | `tensorrt` | NVIDIA GPU / Jetson | onnxruntime-gpu with the TensorRT EP |
//!
//! May depend on: `detect`'s [`manifest`](crate::detect::manifest) and
//! [`preprocess`](crate::detect::preprocess); nothing outside `detect`.

#[cfg(feature = "onnxruntime")]
pub mod ort;
#[cfg(feature = "tract")]
pub mod tract;

use std::path::PathBuf;

use crate::detect::manifest::{ManifestError, ModelManifest};
use crate::detect::preprocess::InputTensor;

/// Which backend runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Tract,
    OnnxRuntime,
    TensorRt,
}

impl BackendKind {
    pub const NAMES: &'static [&'static str] = &["tract", "onnxruntime", "tensorrt"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tract" => Some(Self::Tract),
            "onnxruntime" => Some(Self::OnnxRuntime),
            "tensorrt" => Some(Self::TensorRt),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tract => "tract",
            Self::OnnxRuntime => "onnxruntime",
            Self::TensorRt => "tensorrt",
        }
    }

    /// The backends of this build, fastest first (what `auto` tries, in order).
    pub fn compiled_fastest_first() -> Vec<Self> {
        [Self::TensorRt, Self::OnnxRuntime, Self::Tract].into_iter().filter(|k| k.compiled_in().1).collect()
    }

    /// The cargo feature this backend needs, and whether this build has it.
    pub fn compiled_in(self) -> (&'static str, bool) {
        match self {
            Self::Tract => ("tract", cfg!(feature = "tract")),
            Self::OnnxRuntime => ("onnxruntime", cfg!(feature = "onnxruntime")),
            Self::TensorRt => ("tensorrt", cfg!(feature = "tensorrt")),
        }
    }
}

/// How to load a backend.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendOptions {
    pub kind: BackendKind,
    /// Threads one inference may use (intra-op). With several detector workers, 1 each is best.
    pub threads: usize,
    /// ONNX Runtime's shared library; `None`: `ORT_DYLIB_PATH`, then the standard locations.
    pub onnxruntime_library: Option<PathBuf>,
    /// TensorRT: where built engines are cached (so a box builds them once, not at every start).
    pub tensorrt_cache: PathBuf,
    /// TensorRT: allow FP16 kernels (Jetson's GPUs are much faster in FP16).
    pub tensorrt_fp16: bool,
}

impl Default for BackendOptions {
    fn default() -> Self {
        Self {
            kind: BackendKind::Tract,
            threads: 1,
            onnxruntime_library: None,
            tensorrt_cache: PathBuf::from("/var/lib/its-agent/trt-cache"),
            tensorrt_fp16: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The model file or manifest is unusable.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// This build does not include the backend.
    #[error("the {backend} backend is not in this build (rebuild with `--features {feature}`)")]
    NotCompiled { backend: &'static str, feature: &'static str },
    /// The runtime library could not be found or loaded.
    #[error("{0}")]
    Library(String),
    /// The model could not be prepared for this backend.
    #[error("loading the model on {backend}: {message}")]
    Load { backend: &'static str, message: String },
    /// Inference failed.
    #[error("inference on {backend} failed: {message}")]
    Run { backend: &'static str, message: String },
    /// The model lacks an output the manifest names.
    #[error("the model has no output named {0:?}")]
    MissingOutput(String),
}

/// Output tensors in the order the decoder reads them (see `DecoderSpec::output_names`).
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    pub tensors: Vec<(Vec<usize>, Vec<f32>)>,
}

impl Outputs {
    /// The data of output `i`.
    pub fn get(&self, i: usize) -> Result<&[f32], BackendError> {
        self.tensors.get(i).map(|(_, d)| d.as_slice()).ok_or_else(|| BackendError::MissingOutput(format!("#{i}")))
    }
}

/// Runs a network.
pub trait InferenceBackend: Send {
    fn name(&self) -> &'static str;
    fn run(&mut self, input: &InputTensor) -> Result<Outputs, BackendError>;
}

/// Loads the model of `manifest` (checksum checked) on the backend `options.kind`.
pub fn load_backend(
    manifest: &ModelManifest,
    options: &BackendOptions,
) -> Result<Box<dyn InferenceBackend>, BackendError> {
    let (feature, compiled) = options.kind.compiled_in();
    if !compiled {
        return Err(BackendError::NotCompiled { backend: options.kind.as_str(), feature });
    }
    match options.kind {
        #[cfg(feature = "tract")]
        BackendKind::Tract => Ok(Box::new(tract::TractBackend::load(manifest, options)?)),
        #[cfg(feature = "onnxruntime")]
        BackendKind::OnnxRuntime | BackendKind::TensorRt => Ok(Box::new(ort::OrtBackend::load(manifest, options)?)),
        #[allow(unreachable_patterns)]
        _ => Err(BackendError::NotCompiled { backend: options.kind.as_str(), feature }),
    }
}
