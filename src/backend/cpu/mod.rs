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
use rayon::prelude::*;

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

/// Elements per rayon task of the element-wise kernels (a task costs more than 16k adds).
const CHUNK: usize = 16_384;

/// `f` over `x` element by element, in parallel chunks.
pub fn par_map<T: Elem>(x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, &v)| *o = f(v)));
    out
}

/// `f` over `a` and `b` element by element, in parallel chunks.
pub fn par_map2<T: Elem>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    assert_eq!(a.len(), b.len(), "par_map2: lengths differ");
    let mut out = vec![T::zero(); a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            o.iter_mut()
                .zip(a.iter().zip(b))
                .for_each(|(o, (&p, &q))| *o = f(p, q))
        });
    out
}

/// `f` over `a`, `b` and `c` element by element, in parallel chunks.
pub fn par_map3<T: Elem>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> T + Sync) -> Vec<T> {
    assert!(
        a.len() == b.len() && a.len() == c.len(),
        "par_map3: lengths differ"
    );
    let mut out = vec![T::zero(); a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(
            a.par_chunks(CHUNK)
                .zip(b.par_chunks(CHUNK).zip(c.par_chunks(CHUNK))),
        )
        .for_each(|(o, (a, (b, c)))| {
            o.iter_mut()
                .zip(a.iter().zip(b.iter().zip(c)))
                .for_each(|(o, (&p, (&q, &r)))| *o = f(p, q, r))
        });
    out
}
