//! CPU kernels on plain slices, generic over f32/f64 (f64 is what the gradient checks run in).
pub mod conv;
pub mod gemm;
