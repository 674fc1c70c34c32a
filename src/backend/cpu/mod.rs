//! The CPU backend: kernels on plain slices, generic over f32/f64 (f64 is what the gradient
//! checks run in). [`Cpu`] implements every family of `backend::api`.
pub mod act;
pub mod batch_norm;
pub mod channel;
pub mod conv;
pub mod elementwise;
pub mod gemm;
pub mod loss;
pub mod optim;
pub mod pool;
pub mod reduce;
pub mod rep_conv;
pub mod rep_conv_1x1;

use super::{Backend, Elem};

/// The CPU backend (rayon's global thread pool).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// The CPU backend, for dispatch.
pub static CPU: Cpu = Cpu;

impl<T: Elem> Backend<T> for Cpu {
    type Buf = [T];
    type Owned = Vec<T>;
    type Stats = super::api::HostStats;
    fn name(&self) -> &'static str {
        "cpu"
    }
}

/// Smallest number of `work`-sized items one rayon task should take: below ~16k elements a
/// task costs more to schedule than to run (7x7 planes are common in these networks).
pub fn min_len(work: usize) -> usize {
    (16_384 / work.max(1)).max(1)
}
