//! ghostv3: a training and deployment engine for compact image classifiers (GhostNetV3 and its
//! re-parameterized training form), with its own tensors, autograd tape and CPU backend.

pub mod autograd;
pub mod backend;
pub mod data;
pub mod dist;
pub mod infer;
pub mod io;
pub mod models;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod reparam;
pub mod study;
pub mod tensor;
pub mod train;

pub use autograd::{Grads, Tape, Var};
pub use tensor::{Elem, Tensor};
