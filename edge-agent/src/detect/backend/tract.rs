//! The tract backend: pure-Rust ONNX inference, no system libraries. Single-threaded per
//! session; the agent gets parallelism from several detector workers.

use std::sync::Arc;

use tract_onnx::prelude::*;

use super::{BackendError, BackendOptions, InferenceBackend, Outputs};
use crate::detect::manifest::ModelManifest;
use crate::detect::preprocess::InputTensor;

pub struct TractBackend {
    plan: Arc<TypedSimplePlan>,
    /// Index of each decoder output among the plan's outputs.
    output_index: Vec<usize>,
}

fn load_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Load { backend: "tract", message: format!("{e:#}") }
}

fn run_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Run { backend: "tract", message: format!("{e:#}") }
}

/// The model typed with the manifest's concrete input shape (shared with the cost count).
pub fn typed_model(manifest: &ModelManifest, bytes: &[u8]) -> Result<TypedModel, BackendError> {
    let shape = manifest.input.shape();
    let dt = if manifest.input.dtype.is_u8() { u8::datum_type() } else { f32::datum_type() };
    tract_onnx::onnx()
        .model_for_read(&mut std::io::Cursor::new(bytes))
        .and_then(|m| m.with_input_fact(0, InferenceFact::dt_shape(dt, shape)))
        .and_then(|m| m.into_typed())
        .map_err(load_err)
}

/// Multiply-adds of one inference (convolutions and matrix products), as tract counts them.
pub fn multiply_adds(manifest: &ModelManifest) -> Result<u64, BackendError> {
    use tract_onnx::tract_core::ops::Cost;
    use tract_onnx::tract_core::ops::cnn::Conv;
    use tract_onnx::tract_core::ops::einsum::EinSum;
    let model = typed_model(manifest, &manifest.read_model()?)?.into_decluttered().map_err(load_err)?;
    let mut total = 0u64;
    for id in model.eval_order().map_err(load_err)? {
        let node = model.node(id);
        if !(node.op_is::<Conv>() || node.op_is::<EinSum>()) {
            continue;
        }
        let inputs = model.node_input_facts(id).map_err(load_err)?;
        for (kind, dim) in node.op.cost(&inputs).map_err(load_err)? {
            if let Cost::FMA(_) = kind {
                total += dim.to_i64().map_err(load_err)?.max(0) as u64;
            }
        }
    }
    Ok(total)
}

impl TractBackend {
    pub fn load(manifest: &ModelManifest, _options: &BackendOptions) -> Result<Self, BackendError> {
        let bytes = manifest.read_model()?;
        let typed = typed_model(manifest, &bytes)?;
        let outlets = typed.output_outlets().map_err(load_err)?.to_vec();
        let names: Vec<String> = outlets.iter().map(|o| typed.node(o.node).name.clone()).collect();
        let labels: Vec<Option<String>> = outlets.iter().map(|o| typed.outlet_label(*o).map(str::to_string)).collect();
        let mut output_index = Vec::new();
        for want in manifest.decoder.output_names() {
            let idx = names
                .iter()
                .zip(&labels)
                .position(|(n, l)| n == want || l.as_deref() == Some(want))
                .ok_or_else(|| BackendError::MissingOutput(want.to_string()))?;
            output_index.push(idx);
        }
        let plan = typed.into_optimized().and_then(|m| m.into_runnable()).map_err(load_err)?;
        Ok(Self { plan, output_index })
    }
}

impl InferenceBackend for TractBackend {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn run(&mut self, input: &InputTensor) -> Result<Outputs, BackendError> {
        let tensor = match input {
            InputTensor::U8 { shape, data } => Tensor::from_shape(shape, data),
            InputTensor::F32 { shape, data } => Tensor::from_shape(shape, data),
        }
        .map_err(run_err)?;
        let out = self.plan.run(tvec!(tensor.into_tvalue())).map_err(run_err)?;
        let mut tensors = Vec::with_capacity(self.output_index.len());
        for &i in &self.output_index {
            let v = out.get(i).ok_or_else(|| BackendError::MissingOutput(format!("#{i}")))?;
            let data = v.to_plain_array_view::<f32>().map_err(run_err)?;
            tensors.push((v.shape().to_vec(), data.iter().copied().collect()));
        }
        Ok(Outputs { tensors })
    }
}
