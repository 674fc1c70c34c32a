//! BatchNorm on the CPU: per-channel statistics and gradient sums in f64 (each plane reduced
//! with vectorized lanes, planes added in f64), the affine map plane by plane; the running
//! statistics updated in f64. The DFC gate has no fused kernel here (the op composes it).

use super::{min_len, reduce, Cpu};
use crate::backend::api::{BatchNorm, BatchNormGrads, BnDims, DfcGate, HostStats};
use crate::backend::Elem;
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// What a CPU BN's backward needs: the per-channel center (batch or running mean), 1/sqrt(var +
/// eps), gamma * that (the scale of the affine map) and whether they were batch statistics.
pub struct BnSaved {
    mean: Vec<f64>,
    inv: Vec<f64>,
    scale: Vec<f64>,
    train: bool,
}

/// Applies a per-plane reduction to every (n, c) plane of channel `c` and adds the results in
/// f64 (each plane is reduced with vectorized f32 lanes; planes are summed in f64 for accuracy).
fn channel_reduce<T: Elem>(
    n: usize,
    c_total: usize,
    hw: usize,
    c: usize,
    f: impl Fn(usize) -> T,
) -> f64 {
    (0..n).map(|i| f((i * c_total + c) * hw).as_f64()).sum()
}

fn channel_sum<T: Elem>(x: &[T], n: usize, c_total: usize, hw: usize, c: usize) -> f64 {
    channel_reduce(n, c_total, hw, c, |o| reduce::sum_f64(&x[o..o + hw]))
}

/// sum over channel `c` of (x - center)^2
fn channel_sq_dev<T: Elem>(
    x: &[T],
    center: f64,
    n: usize,
    c_total: usize,
    hw: usize,
    c: usize,
) -> f64 {
    channel_reduce(n, c_total, hw, c, |o| {
        reduce::sq_dev_f64(&x[o..o + hw], center)
    })
}

/// sum over channel `c` of a * (b - center)
fn channel_dot<T: Elem>(
    a: &[T],
    b: &[T],
    center: f64,
    n: usize,
    c_total: usize,
    hw: usize,
    c: usize,
) -> f64 {
    channel_reduce(n, c_total, hw, c, |o| {
        reduce::dot_centered_f64(&a[o..o + hw], &b[o..o + hw], center)
    })
}

/// Applies `y = (x - center[c]) * scale[c] + shift[c]` plane by plane. Centering first keeps
/// f32 precision when a channel's mean is large next to its spread.
fn affine_planes<T: Elem>(
    x: &[T],
    c_total: usize,
    hw: usize,
    center: &[f64],
    scale: &[f64],
    shift: &[f64],
) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(hw)
        .enumerate()
        .with_min_len(min_len(hw))
        .for_each(|(nc, out)| {
            let c = nc % c_total;
            let m = T::from_f64(center[c]);
            let (a, b) = (T::from_f64(scale[c]), T::from_f64(shift[c]));
            for (o, &v) in out.iter_mut().zip(&x[nc * hw..(nc + 1) * hw]) {
                *o = (v - m) * a + b;
            }
        });
    y
}

/// Gradients of BN's affine parameters: dgamma = sum gy * xhat with xhat = (x - mean) * inv,
/// dbeta = sum gy (per channel, f64).
fn affine_grads<T: Elem>(
    gy: &[T],
    x: &[T],
    mean: &[f64],
    inv: &[f64],
    (n, c, hw): (usize, usize, usize),
) -> (Vec<f64>, Vec<f64>) {
    (0..c)
        .into_par_iter()
        .with_min_len(min_len(n * hw))
        .map(|ch| {
            (
                channel_dot(gy, x, mean[ch], n, c, hw, ch) * inv[ch],
                channel_sum(gy, n, c, hw, ch),
            )
        })
        .unzip()
}

fn to_f64<T: Elem>(v: &[T]) -> Vec<f64> {
    v.iter().map(|v| v.as_f64()).collect()
}

fn from_f64<T: Elem>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

impl<T: Elem> BatchNorm<T> for Cpu {
    type BnSaved = BnSaved;

    fn batch_norm_train(
        &self,
        xd: &[T],
        gamma: &[T],
        beta: &[T],
        (n, c, hw): BnDims,
        eps: f64,
    ) -> Result<(Vec<T>, BnSaved, HostStats)> {
        let g = to_f64(gamma);
        let b = to_f64(beta);
        let m = (n * hw) as f64;
        let mean: Vec<f64> = (0..c)
            .into_par_iter()
            .with_min_len(min_len(n * hw))
            .map(|ch| channel_sum(xd, n, c, hw, ch) / m)
            .collect();
        let var: Vec<f64> = (0..c)
            .into_par_iter()
            .with_min_len(min_len(n * hw))
            .map(|ch| channel_sq_dev(xd, mean[ch], n, c, hw, ch) / m)
            .collect();
        let inv: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        let scale: Vec<f64> = (0..c).map(|i| g[i] * inv[i]).collect();
        let y = affine_planes(xd, c, hw, &mean, &scale, &b);
        let stats = HostStats {
            mean: mean.clone(),
            var,
        };
        let saved = BnSaved {
            mean,
            inv,
            scale,
            train: true,
        };
        Ok((y, saved, stats))
    }

    fn batch_norm_eval(
        &self,
        x: &[T],
        gamma: &[T],
        beta: &[T],
        running_mean: &[T],
        running_var: &[T],
        (_, c, hw): BnDims,
        eps: f64,
    ) -> Result<(Vec<T>, BnSaved)> {
        let g = to_f64(gamma);
        let b = to_f64(beta);
        let mean = to_f64(running_mean);
        let inv: Vec<f64> = running_var
            .iter()
            .map(|v| 1.0 / (v.as_f64() + eps).sqrt())
            .collect();
        let scale: Vec<f64> = (0..c).map(|i| g[i] * inv[i]).collect();
        let y = affine_planes(x, c, hw, &mean, &scale, &b);
        let saved = BnSaved {
            mean,
            inv,
            scale,
            train: false,
        };
        Ok((y, saved))
    }

    fn batch_norm_backward(
        &self,
        gyd: &[T],
        xd: &[T],
        _gamma: &[T],
        s: &BnSaved,
        (n, c, hw): BnDims,
        need_dx: bool,
    ) -> Result<BatchNormGrads<Vec<T>>> {
        let (mean, inv, scale) = (&s.mean, &s.inv, &s.scale);
        if s.train {
            let m = (n * hw) as f64;
            let (dgamma, dbeta) = affine_grads(gyd, xd, mean, inv, (n, c, hw));
            // dx = gamma*inv/M * (M*gy - dbeta - xhat*dgamma)
            let dx = need_dx.then(|| {
                let mut dx = vec![T::zero(); xd.len()];
                dx.par_chunks_mut(hw)
                    .enumerate()
                    .with_min_len(min_len(hw))
                    .for_each(|(nc, out)| {
                        let ch = nc % c;
                        // gamma * inv (the same product as the forward's scale)
                        let k = scale[ch];
                        let a = T::from_f64(k);
                        let mu = T::from_f64(mean[ch]);
                        let bx = T::from_f64(-k * inv[ch] * dgamma[ch] / m);
                        let c0 = T::from_f64(-k * dbeta[ch] / m);
                        let (gp, xp) = (&gyd[nc * hw..(nc + 1) * hw], &xd[nc * hw..(nc + 1) * hw]);
                        for ((o, &gv), &xv) in out.iter_mut().zip(gp).zip(xp) {
                            *o = a * gv + bx * (xv - mu) + c0;
                        }
                    });
                dx
            });
            return Ok(BatchNormGrads {
                dx,
                dgamma: from_f64(&dgamma),
                dbeta: from_f64(&dbeta),
            });
        }
        let dx = need_dx.then(|| affine_planes(gyd, c, hw, &vec![0.0; c], scale, &vec![0.0; c]));
        let (dgamma, dbeta) = affine_grads(gyd, xd, mean, inv, (n, c, hw));
        Ok(BatchNormGrads {
            dx,
            dgamma: from_f64(&dgamma),
            dbeta: from_f64(&dbeta),
        })
    }

    fn batch_norm_update_running(
        &self,
        buffers: &mut [T],
        (mean_at, var_at, c): (usize, usize, usize),
        stats: &HostStats,
        count: usize,
        momentum: f64,
    ) -> Result<()> {
        ensure!(
            buffers.len() >= mean_at.max(var_at) + c,
            "running statistics: {} values, need {}",
            buffers.len(),
            mean_at.max(var_at) + c
        );
        ensure!(
            stats.mean.len() == c && stats.var.len() == c,
            "running-stat update: {c} channels"
        );
        let m = momentum;
        // The unbiased variance PyTorch puts into running_var.
        let mc = count as f64;
        let f = if count > 1 { mc / (mc - 1.0) } else { 1.0 };
        let unbiased: Vec<f64> = stats.var.iter().map(|v| v * f).collect();
        for (r, &v) in buffers[mean_at..mean_at + c].iter_mut().zip(&stats.mean) {
            *r = T::from_f64((1.0 - m) * r.as_f64() + m * v);
        }
        for (r, &v) in buffers[var_at..var_at + c].iter_mut().zip(&unbiased) {
            *r = T::from_f64((1.0 - m) * r.as_f64() + m * v);
        }
        Ok(())
    }
}

/// No fused DFC gate on the CPU: `ops::dfc_gate` composes it.
impl<T: Elem> DfcGate<T> for Cpu {}
