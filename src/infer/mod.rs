//! Fast CPU inference for folded models: no tape, no gradients.
//!
//! `lower` turns a model into a small graph of fused nodes (`graph`), with every BatchNorm folded
//! into its conv; `exec::Engine` packs the weights for its NHWC kernels (`kernels`, SIMD per ISA
//! via `simd`), plans activation memory once per input shape and runs the graph. `onnx` writes
//! the same graph as an ONNX model.

pub mod bench;
pub mod exec;
pub mod graph;
pub mod kernels;
pub mod lower;
pub mod onnx;
pub mod simd;

pub use exec::{Engine, Profile};
pub use graph::{Act, Graph, Op};
pub use simd::Isa;

use crate::models::ghostnet::GhostNet;
use crate::models::Model;
use anyhow::Result;

/// An engine for any supported registered model (`lower::supports`), in either form.
pub fn model_engine(m: &Model) -> Result<Engine> {
    Ok(Engine::new(lower::model(m)?))
}

/// The inference graph of a GhostNet in either form (train form is folded first).
pub fn ghostnet_graph(net: &GhostNet, name: &str) -> Result<Graph> {
    lower::ghostnet(net, name)
}

/// An engine for a GhostNet in either form.
pub fn ghostnet_engine(net: &GhostNet, name: &str) -> Result<Engine> {
    Ok(Engine::new(ghostnet_graph(net, name)?))
}
