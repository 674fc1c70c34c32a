//! Compute backends. The CPU backend (rayon) is complete and is the reference for every other one;
//! the CUDA backend (kernels, launchers, device memory) is loaded at run time and optional.
pub mod cpu;
pub mod cuda;
