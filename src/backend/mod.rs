//! Compute backends, the bottom layer: element types, the backend interface (`api`, one trait
//! per op family), the CPU backend (rayon; the reference every other backend is tested against)
//! and the CUDA backend (kernels, launchers, device memory; loaded at run time and optional).
//! Nothing here knows tensors, the tape, layers or models.
pub mod api;
pub mod cpu;
pub mod cuda;
pub mod dtype;
pub mod trace;

pub use api::Backend;
pub use dtype::{DType, Elem};
