//! Source stage: where events come from. For now the synthetic source, a load generator that
//! lets the whole chain run before video exists; camera sources join it later.

pub mod synthetic;

pub use synthetic::{SyntheticConfig, run_synthetic};
