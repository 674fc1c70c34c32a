//! Weights and tensors in safetensors files, with timm's names; atomic writes.

pub mod atomic;
pub mod weights;

pub use atomic::write_atomic;
pub use weights::{
    load_state, load_state_from, parse_tensors, read_tensors, save_state, write_tensors,
    TensorData, CHECKSUMS_KEY,
};
