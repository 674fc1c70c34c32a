//! Compute backends. The CPU backend (rayon) is complete and is the reference for every other one.
pub mod cpu;
