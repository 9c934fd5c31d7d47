//! The ONNX Runtime backend (feature `onnxruntime`), and its TensorRT execution provider for
//! Jetson (feature `tensorrt`).
//!
//! The runtime is loaded at run time (`ort` with `load-dynamic`): nothing is downloaded or linked
//! at build time. The library is taken from, in order: `detector.onnxruntime_library` in the
//! agent's configuration, `ORT_DYLIB_PATH`, then the usual install locations. The PyPI
//! `onnxruntime` wheel ships one (`onnxruntime/capi/libonnxruntime.so.*`); on Jetson,
//! `onnxruntime-gpu` built for JetPack ships one with the CUDA and TensorRT providers.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;

use super::{BackendError, BackendKind, BackendOptions, InferenceBackend, Outputs};
use crate::detect::manifest::ModelManifest;
use crate::detect::preprocess::InputTensor;

/// Where ONNX Runtime is looked for when neither the configuration nor `ORT_DYLIB_PATH` says.
pub const STANDARD_LOCATIONS: &[&str] = &[
    "/usr/local/lib/libonnxruntime.so",
    "/usr/lib/libonnxruntime.so",
    "/usr/lib/aarch64-linux-gnu/libonnxruntime.so",
    "/usr/lib/x86_64-linux-gnu/libonnxruntime.so",
    "/opt/onnxruntime/lib/libonnxruntime.so",
];

/// Places next to the agent's executable where a package may put the library: `lib/` beside
/// `bin/`, or the executable's own directory.
fn beside_executable() -> Vec<PathBuf> {
    let Ok(exe) = std::env::current_exe() else { return Vec::new() };
    let Some(dir) = exe.parent() else { return Vec::new() };
    let mut v = vec![dir.join("libonnxruntime.so")];
    if let Some(up) = dir.parent() {
        v.push(up.join("lib/its-agent/libonnxruntime.so"));
        v.push(up.join("lib/libonnxruntime.so"));
    }
    v
}

/// The library to load: the explicit path, `ORT_DYLIB_PATH`, beside the executable, or the first
/// standard location that exists.
pub fn find_library(explicit: Option<&Path>) -> Result<PathBuf, BackendError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(BackendError::Library(format!("detector.onnxruntime_library: {} does not exist", p.display())))
        };
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from) {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(BackendError::Library(format!("ORT_DYLIB_PATH: {} does not exist", p.display())))
        };
    }
    beside_executable()
        .into_iter()
        .chain(STANDARD_LOCATIONS.iter().map(PathBuf::from))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            BackendError::Library(format!(
                "ONNX Runtime (libonnxruntime.so >= 1.17) not found: set detector.onnxruntime_library or \
             ORT_DYLIB_PATH, or install it beside the executable or in one of {}; \
             `scripts/fetch-onnxruntime` extracts it from the PyPI wheel",
                STANDARD_LOCATIONS.join(", ")
            ))
        })
}

/// ONNX Runtime allows one environment per process; the first library loaded is the one used.
static ENVIRONMENT: OnceLock<Result<(Environment, PathBuf), String>> = OnceLock::new();

fn environment(library: &Path) -> Result<&'static Environment, BackendError> {
    let entry = ENVIRONMENT.get_or_init(|| {
        let builder = ort::init_from(library).map_err(|e| format!("loading {}: {e}", library.display()))?;
        builder
            .with_name("its-agent")
            .build()
            .map(|env| (env, library.to_path_buf()))
            .map_err(|e| format!("starting ONNX Runtime from {}: {e}", library.display()))
    });
    match entry {
        Ok((env, loaded)) if loaded == library => Ok(env),
        Ok((_, loaded)) => Err(BackendError::Library(format!(
            "ONNX Runtime is already loaded from {} in this process; cannot also load {}",
            loaded.display(),
            library.display()
        ))),
        Err(e) => Err(BackendError::Library(e.clone())),
    }
}

pub struct OrtBackend {
    session: Session,
    input_name: String,
    output_names: Vec<String>,
    name: &'static str,
}

fn session(env: &Environment, bytes: &[u8], options: &BackendOptions) -> ort::Result<Session> {
    let mut builder = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .with_intra_threads(options.threads.max(1))?
        .with_inter_threads(1)?;
    if options.kind == BackendKind::TensorRt {
        builder = builder.with_execution_providers(tensorrt_providers(options))?;
    }
    builder.commit_from_memory(bytes)
}

#[cfg(feature = "tensorrt")]
fn tensorrt_providers(options: &BackendOptions) -> Vec<ort::ep::ExecutionProviderDispatch> {
    use ort::ep;
    let cache = options.tensorrt_cache.display().to_string();
    vec![
        // Engines are built once per model, GPU and TensorRT version, then loaded from the cache.
        ep::TensorRT::default()
            .with_device_id(0)
            .with_fp16(options.tensorrt_fp16)
            .with_engine_cache(true)
            .with_engine_cache_path(&cache)
            .with_timing_cache(true)
            .with_timing_cache_path(&cache)
            .build()
            .error_on_failure(),
        // Nodes TensorRT does not take run on CUDA rather than the CPU.
        ep::CUDA::default().with_device_id(0).build(),
    ]
}

#[cfg(not(feature = "tensorrt"))]
fn tensorrt_providers(_options: &BackendOptions) -> Vec<ort::ep::ExecutionProviderDispatch> {
    Vec::new()
}

impl OrtBackend {
    pub fn load(manifest: &ModelManifest, options: &BackendOptions) -> Result<Self, BackendError> {
        let name = if options.kind == BackendKind::TensorRt { "tensorrt" } else { "onnxruntime" };
        let library = find_library(options.onnxruntime_library.as_deref())?;
        let env = environment(&library)?;
        let bytes = manifest.read_model()?;
        if options.kind == BackendKind::TensorRt {
            std::fs::create_dir_all(&options.tensorrt_cache).map_err(|e| BackendError::Load {
                backend: name,
                message: format!("creating the engine cache {}: {e}", options.tensorrt_cache.display()),
            })?;
        }
        let session =
            session(env, &bytes, options).map_err(|e| BackendError::Load { backend: name, message: e.to_string() })?;
        let input_name =
            session.inputs().iter().map(|o| o.name().to_string()).find(|n| *n == manifest.input.name).ok_or_else(
                || BackendError::Load {
                    backend: name,
                    message: format!("the model has no input named {:?}", manifest.input.name),
                },
            )?;
        let have: Vec<String> = session.outputs().iter().map(|o| o.name().to_string()).collect();
        let mut output_names = Vec::new();
        for want in manifest.decoder.output_names() {
            if !have.iter().any(|h| h == want) {
                return Err(BackendError::MissingOutput(want.to_string()));
            }
            output_names.push(want.to_string());
        }
        Ok(Self { session, input_name, output_names, name })
    }
}

impl InferenceBackend for OrtBackend {
    fn name(&self) -> &'static str {
        self.name
    }

    fn run(&mut self, input: &InputTensor) -> Result<Outputs, BackendError> {
        let err = |e: ort::Error| BackendError::Run { backend: self.name, message: e.to_string() };
        let value = match input {
            InputTensor::U8 { shape, data } => {
                TensorRef::from_array_view((*shape, data.as_slice())).map_err(err)?.into_dyn()
            }
            InputTensor::F32 { shape, data } => {
                TensorRef::from_array_view((*shape, data.as_slice())).map_err(err)?.into_dyn()
            }
        };
        let name = self.name;
        let outputs = self
            .session
            .run(ort::inputs! { self.input_name.as_str() => value })
            .map_err(|e| BackendError::Run { backend: name, message: e.to_string() })?;
        let mut tensors = Vec::with_capacity(self.output_names.len());
        for want in &self.output_names {
            let v = outputs.get(want.as_str()).ok_or_else(|| BackendError::MissingOutput(want.clone()))?;
            let (shape, data) = v
                .try_extract_tensor::<f32>()
                .map_err(|e| BackendError::Run { backend: name, message: e.to_string() })?;
            tensors.push((shape.iter().map(|&d| d.max(0) as usize).collect(), data.to_vec()));
        }
        Ok(Outputs { tensors })
    }
}
