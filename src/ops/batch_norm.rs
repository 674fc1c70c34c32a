//! BatchNorm2d. Train mode normalizes with the batch statistics (biased variance) and hands them
//! back so the module can update its running stats as PyTorch does (momentum, unbiased variance);
//! eval mode is the per-channel affine map given by the running stats.

use crate::autograd::{Tape, Var};
use crate::backend::cpu::min_len;
use crate::backend::cpu::reduce;
use crate::tensor::{Elem, Tensor};
use rayon::prelude::*;

/// Per-channel batch statistics of a train-mode BN: mean and biased variance, and the count.
/// On the GPU they stay there (`device`; `mean` and `var` are then empty) so that the running
/// statistics update on the device without a round trip to the host per BN.
#[derive(Clone, Debug)]
pub struct BatchStats {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    pub count: usize,
    pub device: Option<std::sync::Arc<crate::backend::cuda::DeviceStats>>,
}

impl BatchStats {
    /// The statistics on the host (downloads device statistics).
    pub fn to_host(&self) -> anyhow::Result<BatchStats> {
        let Some(d) = &self.device else {
            return Ok(self.clone());
        };
        let gpu = crate::backend::cuda::global().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(BatchStats {
            mean: gpu.download_f64(&d.mean)?,
            var: gpu.download_f64(&d.var)?,
            count: self.count,
            device: None,
        })
    }

    /// The unbiased variance PyTorch puts into `running_var`.
    pub fn unbiased_var(&self) -> Vec<f64> {
        let m = self.count as f64;
        let f = if self.count > 1 { m / (m - 1.0) } else { 1.0 };
        self.var.iter().map(|v| v * f).collect()
    }
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

fn dims<T: Elem>(t: &Tensor<T>) -> (usize, usize, usize) {
    let s = t.shape();
    assert!(s.len() >= 2, "batch_norm needs [N, C, ...], got {s:?}");
    (s[0], s[1], s[2..].iter().product())
}

/// Train-mode BN over a [N, C, H, W] (or [N, C]) tensor.
pub fn batch_norm_train<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    gamma: Var,
    beta: Var,
    eps: f64,
) -> (Var, BatchStats) {
    if tape.value(x).is_cuda() {
        return super::cuda::batch_norm_train(tape, x, gamma, beta, eps);
    }
    let xt = tape.value(x).clone();
    let (n, c, hw) = dims(&xt);
    assert_eq!(tape.shape(gamma), [c], "batch_norm weight shape");
    assert_eq!(tape.shape(beta), [c], "batch_norm bias shape");
    let g: Vec<f64> = tape
        .value(gamma)
        .data()
        .iter()
        .map(|v| v.as_f64())
        .collect();
    let b: Vec<f64> = tape.value(beta).data().iter().map(|v| v.as_f64()).collect();
    let m = (n * hw) as f64;
    let xd = xt.data();
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
    let y = Tensor::new(xt.shape(), affine_planes(xd, c, hw, &mean, &scale, &b));
    let stats = BatchStats {
        mean: mean.clone(),
        var,
        count: n * hw,
        device: None,
    };
    let out = tape.push(
        "batch_norm_train",
        y,
        &[x, gamma, beta],
        Box::new(move |gy, needs| {
            let (xd, gyd) = (xt.data(), gy.data());
            let (dgamma, dbeta) = affine_grads(gyd, xd, &mean, &inv, (n, c, hw));
            // dx = gamma*inv/M * (M*gy - dbeta - xhat*dgamma)
            let dx = needs[0].then(|| {
                let mut dx = vec![T::zero(); xd.len()];
                dx.par_chunks_mut(hw)
                    .enumerate()
                    .with_min_len(min_len(hw))
                    .for_each(|(nc, out)| {
                        let ch = nc % c;
                        let k = g[ch] * inv[ch];
                        let a = T::from_f64(k);
                        let mu = T::from_f64(mean[ch]);
                        let bx = T::from_f64(-k * inv[ch] * dgamma[ch] / m);
                        let c0 = T::from_f64(-k * dbeta[ch] / m);
                        let (gp, xp) = (&gyd[nc * hw..(nc + 1) * hw], &xd[nc * hw..(nc + 1) * hw]);
                        for ((o, &gv), &xv) in out.iter_mut().zip(gp).zip(xp) {
                            *o = a * gv + bx * (xv - mu) + c0;
                        }
                    });
                Tensor::new(xt.shape(), dx)
            });
            let to_t = |v: &[f64]| Tensor::new(&[c], v.iter().map(|&x| T::from_f64(x)).collect());
            vec![
                dx,
                needs[1].then(|| to_t(&dgamma)),
                needs[2].then(|| to_t(&dbeta)),
            ]
        }),
    );
    (out, stats)
}

/// Eval-mode BN with the given running statistics (not trained, so plain slices).
pub fn batch_norm_eval<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    gamma: Var,
    beta: Var,
    running_mean: &[T],
    running_var: &[T],
    eps: f64,
) -> Var {
    if tape.value(x).is_cuda() {
        return super::cuda::batch_norm_eval(tape, x, gamma, beta, running_mean, running_var, eps);
    }
    let xt = tape.value(x).clone();
    let (n, c, hw) = dims(&xt);
    assert_eq!(tape.shape(gamma), [c], "batch_norm weight shape");
    assert!(
        running_mean.len() == c && running_var.len() == c,
        "batch_norm running stats shape"
    );
    let g: Vec<f64> = tape
        .value(gamma)
        .data()
        .iter()
        .map(|v| v.as_f64())
        .collect();
    let b: Vec<f64> = tape.value(beta).data().iter().map(|v| v.as_f64()).collect();
    let mean: Vec<f64> = running_mean.iter().map(|v| v.as_f64()).collect();
    let inv: Vec<f64> = running_var
        .iter()
        .map(|v| 1.0 / (v.as_f64() + eps).sqrt())
        .collect();
    let scale: Vec<f64> = (0..c).map(|i| g[i] * inv[i]).collect();
    let y = Tensor::new(
        xt.shape(),
        affine_planes(xt.data(), c, hw, &mean, &scale, &b),
    );
    tape.push(
        "batch_norm_eval",
        y,
        &[x, gamma, beta],
        Box::new(move |gy, needs| {
            let gyd = gy.data();
            let dx = needs[0].then(|| {
                Tensor::new(
                    xt.shape(),
                    affine_planes(gyd, c, hw, &vec![0.0; c], &scale, &vec![0.0; c]),
                )
            });
            let (dgamma, dbeta) = affine_grads(gyd, xt.data(), &mean, &inv, (n, c, hw));
            let to_t = |v: &[f64]| Tensor::new(&[c], v.iter().map(|&x| T::from_f64(x)).collect());
            vec![
                dx,
                needs[1].then(|| to_t(&dgamma)),
                needs[2].then(|| to_t(&dbeta)),
            ]
        }),
    )
}
