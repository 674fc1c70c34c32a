//! BatchNorm over (n, c, hw) buffers: train mode (batch statistics, biased variance, in f64),
//! eval mode (the per-channel affine map of the running statistics), the backward of both, and
//! PyTorch's running-statistics update (momentum, unbiased variance).

use super::Backend;
use crate::backend::Elem;
use anyhow::Result;

/// BN sizes `(n, c, hw)`: `hw` values per (sample, channel) plane.
pub type BnDims = (usize, usize, usize);

/// The gradients of a BN: dx (when asked for; a backend may compute it anyway), dgamma, dbeta.
pub struct BatchNormGrads<O> {
    pub dx: Option<O>,
    pub dgamma: O,
    pub dbeta: O,
}

pub trait BatchNorm<T: Elem>: Backend<T> {
    /// What a BN's backward needs of its forward: the statistics it normalized with (and,
    /// in train mode, that they were batch statistics).
    type BnSaved: Send + Sync + 'static;

    /// Train mode: y = (x - mean) / sqrt(var + eps) * gamma + beta with the per-channel batch
    /// mean and biased variance; returns y, the saved state and the batch statistics.
    fn batch_norm_train(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        dims: BnDims,
        eps: f64,
    ) -> Result<(Self::Owned, Self::BnSaved, Self::Stats)>;

    /// Eval mode: the same map with the running mean and variance (`c` values each).
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_eval(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        running_mean: &Self::Buf,
        running_var: &Self::Buf,
        dims: BnDims,
        eps: f64,
    ) -> Result<(Self::Owned, Self::BnSaved)>;

    /// The gradients from gy: through the batch statistics after `batch_norm_train`, through
    /// the affine map after `batch_norm_eval`. `need_dx` false lets a backend skip dx.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_backward(
        &self,
        gy: &Self::Buf,
        x: &Self::Buf,
        gamma: &Self::Buf,
        saved: &Self::BnSaved,
        dims: BnDims,
        need_dx: bool,
    ) -> Result<BatchNormGrads<Self::Owned>>;

    /// PyTorch's running-statistics update of one BN whose running mean and variance are `c`
    /// values at `mean_at` and `var_at` of the flat `buffers`: r = (1 - momentum) * r +
    /// momentum * v, with the batch mean and the unbiased variance of `count` values.
    fn batch_norm_update_running(
        &self,
        buffers: &mut Self::Buf,
        at: (usize, usize, usize),
        stats: &Self::Stats,
        count: usize,
        momentum: f64,
    ) -> Result<()>;

    /// The same update of `stats.len()` BNs of `c` channels, BN i's running mean and variance
    /// at `mean_at + i * stride` and `var_at + i * stride` (a re-parameterized layer's branch
    /// BNs, laid out one after another). Backends whose statistics are stacked do it at once.
    fn batch_norm_update_running_strided(
        &self,
        buffers: &mut Self::Buf,
        (mean_at, var_at, c): (usize, usize, usize),
        stride: usize,
        stats: &[&Self::Stats],
        count: usize,
        momentum: f64,
    ) -> Result<()> {
        for (i, s) in stats.iter().enumerate() {
            let at = (mean_at + i * stride, var_at + i * stride, c);
            self.batch_norm_update_running(buffers, at, s, count, momentum)?;
        }
        Ok(())
    }
}
