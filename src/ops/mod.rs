//! Differentiable ops: each file holds an op family's forward and backward side by side.
//! Every op takes the tape, computes its output on the CPU backend and records its backward.

pub mod act;
pub mod batch_norm;
pub mod channel;
pub mod concat;
pub mod conv;
pub mod dfc;
pub mod dropout;
pub mod elementwise;
pub mod linear;
pub mod loss;
pub mod max_pool;
pub mod pool;
pub mod rep_conv;

pub use act::{hard_sigmoid, relu, relu6, sigmoid};
pub use batch_norm::{batch_norm_eval, batch_norm_train, BatchStats};
pub use channel::{channel_shuffle, slice_channels, split_channels};
pub use concat::concat_channels;
pub use conv::{conv2d, Conv2dArgs};
pub use dfc::{dfc_gate, DfcBn};
pub use dropout::dropout;
pub use elementwise::{add, gather, mul, mul_channel, reshape, scale};
pub use linear::linear;
pub use loss::{cross_entropy, cross_entropy_soft, kd_loss};
pub use max_pool::max_pool2d;
pub use pool::{avg_pool2x2, global_avg_pool, upsample_nearest};
pub use rep_conv::{rep_conv, rep_conv_1x1, rep_conv_dw, RepBranches};
