//! CPU kernels on plain slices, generic over f32/f64 (f64 is what the gradient checks run in).
pub mod conv;
pub mod gemm;
pub mod reduce;

/// Smallest number of `work`-sized items one rayon task should take: below ~16k elements a
/// task costs more to schedule than to run (7x7 planes are common in these networks).
pub fn min_len(work: usize) -> usize {
    (16_384 / work.max(1)).max(1)
}
