//! Losses on [N, C] logits, averaged over the batch: cross-entropy against hard labels with
//! label smoothing, against soft targets, and the knowledge-distillation loss. Each returns the
//! loss (a buffer of 1 value) and its gradient with respect to the logits for an upstream
//! gradient of 1, computed in the same pass (each row's log-softmax in f64).

use super::Backend;
use crate::backend::Elem;
use anyhow::Result;

pub trait Loss<T: Elem>: Backend<T> {
    /// Mean cross-entropy of z [n, c] against the smoothed one-hot targets of `labels` (PyTorch's
    /// `label_smoothing`: (1 - smoothing) at the label plus smoothing / c everywhere); `nc` =
    /// (n, c). Returns (loss [1], dz [n, c]).
    fn cross_entropy(
        &self,
        z: &Self::Buf,
        labels: &[usize],
        smoothing: f64,
        nc: (usize, usize),
    ) -> Result<(Self::Owned, Self::Owned)>;
    /// Mean cross-entropy of z [n, c] against per-row target distributions q [n, c] (which need
    /// not sum to 1). Returns (loss [1], dz [n, c]).
    fn cross_entropy_soft(
        &self,
        z: &Self::Buf,
        q: &Self::Buf,
        nc: (usize, usize),
    ) -> Result<(Self::Owned, Self::Owned)>;
    /// `t^2 * KL(softmax(zt / t) || softmax(zs / t))` averaged over the rows of the student zs
    /// and the teacher zt (both [n, c]); the gradient is the student's, t (p_s - p_t) / n.
    /// Returns (loss [1], dzs [n, c]).
    fn kd_loss(
        &self,
        zs: &Self::Buf,
        zt: &Self::Buf,
        nc: (usize, usize),
        t: f64,
    ) -> Result<(Self::Owned, Self::Owned)>;
}
