//! The interface every compute backend implements: the CPU backend (`backend::cpu::Cpu`, on
//! slices) and the CUDA backend (`backend::cuda::Gpu`, on device buffers). One trait per op
//! family, each method one kernel (or a fixed sequence of kernels) on plain buffers and sizes;
//! shape checks and the autograd tape live above, in `ops/<family>.rs`, written once for every
//! backend. Which backend runs is decided in one place: `tensor::storage` (`on_backend!`).

pub mod act;
pub mod batch_norm;
pub mod channel;
pub mod conv;
pub mod dfc;
pub mod elementwise;
pub mod loss;
pub mod optim;
pub mod pool;
pub mod rep_conv;

pub use act::{Activation, Unary};
pub use batch_norm::{BatchNorm, BatchNormGrads, BnDims};
pub use channel::Channel;
pub use conv::{Conv, ConvGeom, ConvGrads, LinearDims};
pub use dfc::{DfcGate, GateBn};
pub use elementwise::Elementwise;
pub use loss::Loss;
pub use optim::Optim;
pub use pool::{Dims4, MaxPoolGeom, Pool};
pub use rep_conv::{FusedRep1x1, FusedRepDw, Rep1x1Geom, RepDwGeom, RepGrads};

use crate::backend::Elem;

/// A compute backend for element type `T` (the CUDA backend stores f32 whatever `T` is; f64
/// tensors are for the CPU's gradient checks).
pub trait Backend<T: Elem>: Sync + 'static {
    /// A read-only buffer of this backend: `[T]` on the CPU, a device buffer on CUDA.
    type Buf: ?Sized;
    /// A buffer a kernel returns: `Vec<T>` on the CPU, a device buffer on CUDA.
    type Owned: Send + Sync + 'static;
    /// Per-channel batch statistics of a train-mode BN (f64 mean and biased variance), kept
    /// where they were taken: the running-statistics update reads them there.
    type Stats: Send + Sync + 'static;
    /// "cpu" or "cuda" (for messages).
    fn name(&self) -> &'static str;
}

/// Batch statistics on the host: per-channel mean and biased variance.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostStats {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}
