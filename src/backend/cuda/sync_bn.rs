//! Synchronized BatchNorm (`train.sync_bn`, torch.nn.SyncBatchNorm's semantics): while a group
//! is set, every train-mode BN of this process sums its per-split f64 partial sums over the
//! ranks before finalizing them, in the forward (sum x, sum x^2: the global batch's mean and
//! variance) and in the backward (sum gy, sum gy (x - mean): the dx of the global batch). The
//! weight gradients stay per rank (the gradient all-reduce averages them, as DDP does). The
//! fused re-parameterized kernels keep their statistics to themselves, so they step aside
//! while a group is set and their branches run as separate convs and BNs.
//!
//! Every rank must run the same BNs on batches of the same shape (the per-split layout of the
//! partial sums follows it): the trainer checks the batch sizes agree before each step.

use super::nccl::Nccl;
use std::sync::{Arc, RwLock};

static GROUP: RwLock<Option<Arc<Nccl>>> = RwLock::new(None);

/// Synchronizes the batch statistics over `group`'s ranks from now on (None: per rank again).
pub fn set(group: Option<Arc<Nccl>>) {
    *GROUP.write().unwrap_or_else(|e| e.into_inner()) = group;
}

/// The group train-mode BNs synchronize over, if any.
pub fn group() -> Option<Arc<Nccl>> {
    GROUP.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Whether BN statistics are synchronized now (the fused kernels step aside).
pub fn active() -> bool {
    GROUP.read().map(|g| g.is_some()).unwrap_or(true)
}
