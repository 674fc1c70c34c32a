//! Launchers of cuda/batch_norm.cu: train- and eval-mode BatchNorm (statistics in f64, the
//! f32 affine map), its backward, and the running-statistics updates. BN dims are (n, c, hw).

use super::alloc::{DevBuf, View};
use super::device::{DBuf, Gpu};
use super::launch::{blocks, i32a, i64a, need, opt_ptr, ptr, Arg};
use anyhow::{bail, ensure, Result};
use std::sync::Arc;

/// Statistics of a BatchNorm on the device: f64 mean, biased variance (train mode only) and
/// 1/sqrt(var + eps); the f32 affine map y = (x - center) * scale + shift.
pub struct BnSaved {
    pub mean: Arc<DevBuf<f64>>,
    pub var: Option<Arc<DevBuf<f64>>>,
    pub invstd: DevBuf<f64>,
    pub center: DBuf,
    pub scale: DBuf,
    pub shift: DBuf,
    /// The values each channel's statistics are over: n * hw, times the ranks under sync_bn.
    pub count: usize,
    /// The ranks the statistics are summed over (1 unless [`super::sync_bn`] is active).
    pub ranks: usize,
}

/// Batch statistics of a train-mode BN left on the device: `c` channels from channel `at` of
/// f64 mean and biased-variance buffers shared with the forward's saved state (one BN's own,
/// or one branch's of a fused rep_conv's stacked statistics). Shared, not copied: nothing
/// writes them after the forward, and a copy would be two launches per BN per step.
pub struct DeviceStats {
    pub mean: Arc<DevBuf<f64>>,
    pub var: Arc<DevBuf<f64>>,
    pub at: usize,
    pub c: usize,
    /// The ranks the statistics are over (sync_bn): the running variance's unbiasing count is
    /// this many times the per-rank count the caller passes.
    pub ranks: usize,
}

impl DeviceStats {
    pub fn mean(&self) -> View<'_, f64> {
        self.mean.view(self.at, self.c)
    }
    pub fn var(&self) -> View<'_, f64> {
        self.var.view(self.at, self.c)
    }
}

impl std::fmt::Debug for DeviceStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceStats[{}]", self.c)
    }
}

pub struct BnGrads {
    pub dx: DBuf,
    pub dgamma: DBuf,
    pub dbeta: DBuf,
}

impl Gpu {
    /// Train-mode statistics and the affine map, without applying it.
    pub fn batch_norm_stats(
        &self,
        x: &DBuf,
        gamma: &DBuf,
        beta: &DBuf,
        (n, c, hw): (usize, usize, usize),
        eps: f64,
    ) -> Result<BnSaved> {
        need("batch_norm x", x, n * c * hw)?;
        need("batch_norm gamma", gamma, c)?;
        need("batch_norm beta", beta, c)?;
        let s = self.splits(c, n * hw);
        let part = self.alloc_f64(2 * c * s)?;
        self.launch(
            "batch_norm",
            "bn_stats_partial",
            blocks(c, s, 1),
            &[ptr(x), i32a(n), i32a(c), i32a(hw), ptr(&part)],
        )?;
        // sync_bn: the global batch's sums (the finalize adds the splits up, so the splits of
        // every rank may be summed element by element).
        let ranks = match super::sync_bn::group() {
            Some(g) => {
                g.all_reduce_sum_f64(self, &part, 0, 2 * c * s)?;
                g.world_size()
            }
            None => 1,
        };
        let count = n * hw * ranks;
        let saved = BnSaved {
            mean: Arc::new(self.alloc_f64(c)?),
            var: Some(Arc::new(self.alloc_f64(c)?)),
            invstd: self.alloc_f64(c)?,
            center: self.alloc(c)?,
            scale: self.alloc(c)?,
            shift: self.alloc(c)?,
            count,
            ranks,
        };
        self.launch(
            "batch_norm",
            "bn_stats_finalize",
            self.grid(c),
            &[
                ptr(&part),
                i32a(s),
                i32a(c),
                Arg::F64(count as f64),
                Arg::F64(eps),
                ptr(gamma),
                ptr(beta),
                ptr(&*saved.mean),
                opt_ptr(saved.var.as_deref()),
                ptr(&saved.invstd),
                ptr(&saved.center),
                ptr(&saved.scale),
                ptr(&saved.shift),
            ],
        )?;
        Ok(saved)
    }

    /// y = (x - center) * scale + shift per channel.
    pub fn batch_norm_apply(
        &self,
        x: &DBuf,
        saved: &BnSaved,
        (n, c, hw): (usize, usize, usize),
    ) -> Result<DBuf> {
        need("batch_norm x", x, n * c * hw)?;
        let total = n * c * hw;
        let y = self.alloc(total)?;
        self.launch(
            "batch_norm",
            "bn_apply",
            self.grid(total),
            &[
                ptr(x),
                ptr(&y),
                ptr(&saved.center),
                ptr(&saved.scale),
                ptr(&saved.shift),
                i32a(c),
                i32a(hw),
                i64a(total),
            ],
        )?;
        Ok(y)
    }

    /// Train-mode BN (`ops::batch_norm_train`).
    pub fn batch_norm_train(
        &self,
        x: &DBuf,
        gamma: &DBuf,
        beta: &DBuf,
        dims: (usize, usize, usize),
        eps: f64,
    ) -> Result<(DBuf, BnSaved)> {
        let saved = self.batch_norm_stats(x, gamma, beta, dims, eps)?;
        let y = self.batch_norm_apply(x, &saved, dims)?;
        Ok((y, saved))
    }

    /// Eval-mode BN with running statistics (`ops::batch_norm_eval`).
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_eval(
        &self,
        x: &DBuf,
        gamma: &DBuf,
        beta: &DBuf,
        running_mean: &DBuf,
        running_var: &DBuf,
        dims: (usize, usize, usize),
        eps: f64,
    ) -> Result<(DBuf, BnSaved)> {
        let (n, c, hw) = dims;
        need("batch_norm running_mean", running_mean, c)?;
        need("batch_norm running_var", running_var, c)?;
        let saved = BnSaved {
            mean: Arc::new(self.alloc_f64(c)?),
            var: None,
            invstd: self.alloc_f64(c)?,
            center: self.alloc(c)?,
            scale: self.alloc(c)?,
            shift: self.alloc(c)?,
            count: n * hw,
            ranks: 1,
        };
        self.launch(
            "batch_norm",
            "bn_eval_coef",
            self.grid(c),
            &[
                ptr(running_mean),
                ptr(running_var),
                i32a(c),
                Arg::F64(eps),
                ptr(gamma),
                ptr(beta),
                ptr(&*saved.mean),
                ptr(&saved.invstd),
                ptr(&saved.center),
                ptr(&saved.scale),
                ptr(&saved.shift),
            ],
        )?;
        let y = self.batch_norm_apply(x, &saved, dims)?;
        Ok((y, saved))
    }

    /// Gradients of BN (train mode: through the batch statistics; eval: the affine map).
    pub fn batch_norm_backward(
        &self,
        gy: &DBuf,
        x: &DBuf,
        gamma: &DBuf,
        saved: &BnSaved,
        (n, c, hw): (usize, usize, usize),
        train: bool,
    ) -> Result<BnGrads> {
        need("batch_norm gy", gy, n * c * hw)?;
        need("batch_norm x", x, n * c * hw)?;
        let s = self.splits(c, n * hw);
        let part = self.alloc_f64(2 * c * s)?;
        self.launch(
            "batch_norm",
            "bn_bwd_partial",
            blocks(c, s, 1),
            &[
                ptr(gy),
                ptr(x),
                ptr(&*saved.mean),
                i32a(n),
                i32a(c),
                i32a(hw),
                ptr(&part),
            ],
        )?;
        let (dgamma, dbeta) = (self.alloc(c)?, self.alloc(c)?);
        let (ka, kb, kc) = (self.alloc(c)?, self.alloc(c)?, self.alloc(c)?);
        let finalize = |part: &DevBuf<f64>, count: usize, dgamma: &DBuf, dbeta: &DBuf| {
            self.launch(
                "batch_norm",
                "bn_bwd_finalize",
                self.grid(c),
                &[
                    ptr(part),
                    i32a(s),
                    i32a(c),
                    Arg::F64(count as f64),
                    Arg::I32(train as i32),
                    ptr(gamma),
                    ptr(&saved.invstd),
                    ptr(dgamma),
                    ptr(dbeta),
                    ptr(&ka),
                    ptr(&kb),
                    ptr(&kc),
                ],
            )
        };
        finalize(&part, n * hw, &dgamma, &dbeta)?;
        // sync_bn: dgamma and dbeta stay this rank's (the gradient all-reduce averages them);
        // the dx coefficients come from the global batch's sums, as the forward's statistics.
        if train && saved.ranks > 1 {
            let Some(g) = super::sync_bn::group().filter(|g| g.world_size() == saved.ranks) else {
                bail!("a synchronized BN's backward outside its group");
            };
            g.all_reduce_sum_f64(self, &part, 0, 2 * c * s)?;
            let (dg, db) = (self.alloc(c)?, self.alloc(c)?);
            finalize(&part, saved.count, &dg, &db)?;
        }
        let total = n * c * hw;
        let dx = self.alloc(total)?;
        self.launch(
            "batch_norm",
            "bn_bwd_dx",
            self.grid(total),
            &[
                ptr(gy),
                ptr(x),
                ptr(&saved.center),
                ptr(&ka),
                ptr(&kb),
                ptr(&kc),
                ptr(&dx),
                i32a(c),
                i32a(hw),
                i64a(total),
            ],
        )?;
        Ok(BnGrads { dx, dgamma, dbeta })
    }

    /// PyTorch's running-stat update from train-mode statistics.
    pub fn batch_norm_update_running(
        &self,
        running_mean: &mut DBuf,
        running_var: &mut DBuf,
        saved: &BnSaved,
        momentum: f64,
    ) -> Result<()> {
        let c = saved.center.len();
        let Some(var) = saved.var.as_ref() else {
            bail!("running-stat update needs train-mode statistics");
        };
        self.launch(
            "batch_norm",
            "bn_running_update",
            self.grid(c),
            &[
                ptr(running_mean),
                ptr(running_var),
                ptr(&*saved.mean),
                ptr(var),
                i32a(c),
                Arg::F64(momentum),
                Arg::F64(saved.count as f64),
            ],
        )
    }

    /// The batch statistics on the host: (mean, biased variance) of a train-mode BN.
    pub fn batch_stats(&self, saved: &BnSaved) -> Result<(Vec<f64>, Vec<f64>)> {
        let Some(var) = saved.var.as_ref() else {
            bail!("eval-mode BN has no batch statistics");
        };
        Ok((self.download_f64(&saved.mean)?, self.download_f64(var)?))
    }

    /// The batch statistics, kept on the device: `c` channels from channel `at` of the saved
    /// f64 mean and variance (a BN's own, or one branch of a fused rep_conv's stacked
    /// statistics), shared with the saved state.
    pub fn batch_stats_device(
        &self,
        mean: &Arc<DevBuf<f64>>,
        var: &Arc<DevBuf<f64>>,
        at: usize,
        c: usize,
    ) -> Result<DeviceStats> {
        ensure!(
            mean.len() >= at + c && var.len() >= at + c,
            "batch statistics: channels {at}..{} of {}",
            at + c,
            mean.len()
        );
        Ok(DeviceStats {
            mean: mean.clone(),
            var: var.clone(),
            at,
            c,
            ranks: 1,
        })
    }

    /// PyTorch's running-stat update (momentum, unbiased variance) of one BN whose running mean
    /// and variance are `c` values at `mean_at` and `var_at` of the flat device buffers.
    pub fn bn_running_update_at(
        &self,
        buffers: &mut DBuf,
        (mean_at, var_at, c): (usize, usize, usize),
        stats: &DeviceStats,
        count: usize,
        momentum: f64,
    ) -> Result<()> {
        need("running statistics", buffers, mean_at.max(var_at) + c)?;
        ensure!(stats.c == c, "running-stat update: {c} channels");
        self.launch(
            "batch_norm",
            "bn_running_update",
            self.grid(c),
            &[
                ptr(&buffers.view(mean_at, c)),
                ptr(&buffers.view(var_at, c)),
                ptr(&stats.mean()),
                ptr(&stats.var()),
                i32a(c),
                Arg::F64(momentum),
                Arg::F64((count * stats.ranks) as f64),
            ],
        )
    }
}

impl<T: crate::backend::Elem> crate::backend::api::BatchNorm<T> for super::Cuda<T> {
    type BnSaved = BnSaved;

    fn batch_norm_train(
        &self,
        x: &DBuf,
        gamma: &DBuf,
        beta: &DBuf,
        dims: crate::backend::api::BnDims,
        eps: f64,
    ) -> Result<(DBuf, BnSaved, DeviceStats)> {
        let (y, saved) = (**self).batch_norm_train(x, gamma, beta, dims, eps)?;
        let Some(var) = saved.var.as_ref() else {
            bail!("train-mode BN without batch statistics");
        };
        let mut stats = self.batch_stats_device(&saved.mean, var, 0, dims.1)?;
        stats.ranks = saved.ranks;
        Ok((y, saved, stats))
    }

    fn batch_norm_eval(
        &self,
        x: &DBuf,
        gamma: &DBuf,
        beta: &DBuf,
        running_mean: &DBuf,
        running_var: &DBuf,
        dims: crate::backend::api::BnDims,
        eps: f64,
    ) -> Result<(DBuf, BnSaved)> {
        (**self).batch_norm_eval(x, gamma, beta, running_mean, running_var, dims, eps)
    }

    fn batch_norm_backward(
        &self,
        gy: &DBuf,
        x: &DBuf,
        gamma: &DBuf,
        saved: &BnSaved,
        dims: crate::backend::api::BnDims,
        _need_dx: bool,
    ) -> Result<crate::backend::api::BatchNormGrads<DBuf>> {
        // Train mode (batch statistics) is what left a variance in the saved state.
        let train = saved.var.is_some();
        let g = (**self).batch_norm_backward(gy, x, gamma, saved, dims, train)?;
        Ok(crate::backend::api::BatchNormGrads {
            dx: Some(g.dx),
            dgamma: g.dgamma,
            dbeta: g.dbeta,
        })
    }

    fn batch_norm_update_running(
        &self,
        buffers: &mut DBuf,
        at: (usize, usize, usize),
        stats: &DeviceStats,
        count: usize,
        momentum: f64,
    ) -> Result<()> {
        self.bn_running_update_at(buffers, at, stats, count, momentum)
    }

    fn batch_norm_update_running_strided(
        &self,
        buffers: &mut DBuf,
        (mean_at, var_at, c): (usize, usize, usize),
        stride: usize,
        stats: &[&DeviceStats],
        count: usize,
        momentum: f64,
    ) -> Result<()> {
        // One launch when the statistics are one stacked buffer's consecutive slices (a fused
        // rep_conv's); else one per BN.
        let stacked = stats.iter().enumerate().all(|(i, s)| {
            Arc::ptr_eq(&s.mean, &stats[0].mean)
                && Arc::ptr_eq(&s.var, &stats[0].var)
                && s.at == stats[0].at + i * c
                && s.c == c
        });
        if !stacked || stats.len() < 2 {
            for (i, s) in stats.iter().enumerate() {
                let at = (mean_at + i * stride, var_at + i * stride, c);
                self.bn_running_update_at(buffers, at, s, count, momentum)?;
            }
            return Ok(());
        }
        let nb = stats.len();
        let lo = mean_at.min(var_at);
        let hi = mean_at.max(var_at) + (nb - 1) * stride + c;
        need("running statistics", buffers, hi)?;
        let (mean, var) = (
            stats[0].mean.view(stats[0].at, nb * c),
            stats[0].var.view(stats[0].at, nb * c),
        );
        self.launch(
            "batch_norm",
            "bn_running_update_strided",
            self.grid(nb * c),
            &[
                ptr(&buffers.view(lo, hi - lo)),
                i64a(mean_at - lo),
                i64a(var_at - lo),
                i64a(stride),
                ptr(&mean),
                ptr(&var),
                i32a(c),
                i32a(nb),
                Arg::F64(momentum),
                Arg::F64((count * stats[0].ranks) as f64),
            ],
        )
    }
}
