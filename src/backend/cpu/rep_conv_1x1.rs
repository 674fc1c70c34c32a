//! The fused re-parameterized 1x1 conv on the CPU: the math of cuda/rep_conv_1x1.cu (DESIGN.md's
//! way 2, whose header derives it) with the `gemm` crate. NB 1x1 branches (groups 1, stride 1)
//! each with its batch-statistics BN, plus an optional BN identity, run as one 1x1 conv whose
//! kernel `K = sum_b diag(gamma_b / sigma_b) W_b` comes from the input's per-channel mean and
//! covariance `Sigma = xc xc^T / M` (xc the centred input): the branch outputs never exist.
//!
//! Forward: mean, xc, Sigma (per-sample GEMMs summed in f64), W_b Sigma (one GEMM), the branch
//! statistics and K, then y_n = K xc_n + sum beta. Backward: R = sum_n gyc_n xc_n^T (f64), the
//! coefficients, dW_b = diag(a_b) R - diag(e_b) W_b Sigma, and dx_n = K^T gyc_n + A xc_n
//! (gyc the centred gy; A from Q = sum_b W_b^T diag(e_b) W_b). Three activation-sized GEMMs against the branches'
//! 3 x NB; whether that pays is `Rep1x1Geom::fused_pays`, as on the GPU. The sums over the batch
//! are in a fixed order, so the result does not depend on the thread count.
//!
//! On by default; `GHOSTV3_CPU_FUSED_REP_1X1=0` (or [`set_fused_1x1`]) runs the composed
//! branches instead.

use super::gemm::matmul;
use super::Cpu;
use crate::backend::api::rep_conv::{RepGrads, RepOut};
use crate::backend::api::{FusedRep1x1, HostStats, Rep1x1Geom};
use crate::backend::Elem;
use anyhow::{ensure, Result};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

static FUSED: AtomicBool = AtomicBool::new(true);
static FROM_ENV: std::sync::Once = std::sync::Once::new();

/// Whether the CPU runs re-parameterized 1x1 convs fused where it pays (the default) or always
/// as composed branches. `GHOSTV3_CPU_FUSED_REP_1X1=0` turns it off for a whole process.
pub fn set_fused_1x1(on: bool) {
    FROM_ENV.call_once(|| {});
    FUSED.store(on, Ordering::Relaxed);
}

pub fn fused_1x1() -> bool {
    FROM_ENV.call_once(|| {
        if std::env::var("GHOSTV3_CPU_FUSED_REP_1X1").is_ok_and(|v| v == "0") {
            FUSED.store(false, Ordering::Relaxed);
        }
    });
    FUSED.load(Ordering::Relaxed)
}

/// Most floats of the per-sample partials of a sum over the batch held at once (16 MB of f32),
/// and most partials (a fixed number, so the sums' order does not depend on the threads).
const SCRATCH: usize = 1 << 22;
const PARTIALS: usize = 8;

/// What the backward needs of the forward.
pub struct Rep1x1State<T> {
    /// The centred input [N, Cin, HW].
    xc: Vec<T>,
    /// The stacked branch weights [NB, Cout, Cin] and W_b Sigma, the same shape.
    w: Vec<T>,
    ws: Vec<T>,
    /// The folded kernel K [Cout, Cin].
    k: Vec<T>,
    /// Per branch and output channel [NBT, Cout]: 1/sigma and a = gamma / sigma.
    invstd: Vec<f64>,
    a: Vec<f64>,
}

/// `scale * sum_n A_n B_n^T` in f64 ([m, k2]), for `A_n` [m, p] and `B_n` [k2, p], the n-th
/// blocks of `a` and `b`: each of `g` partials accumulates the samples `j, j + g, ...` in `T`
/// (a GEMM each), and the partials are summed in f64 in order.
fn outer_sum<T: Elem>(
    a: &[T],
    b: &[T],
    (m, k2, p, n): (usize, usize, usize, usize),
    chunk: usize,
    scale: f64,
) -> Vec<f64> {
    let fit = (SCRATCH / (m * k2)).clamp(1, PARTIALS);
    let g = n.min(if chunk == 0 { fit } else { chunk });
    // Few partials: let each GEMM use the threads instead.
    let inner_par = g < rayon::current_num_threads();
    let mut parts = vec![T::zero(); g * m * k2];
    parts
        .par_chunks_mut(m * k2)
        .enumerate()
        .for_each(|(j, part)| {
            for (i, s) in (j..n).step_by(g).enumerate() {
                let (an, bn) = (&a[s * m * p..][..m * p], &b[s * k2 * p..][..k2 * p]);
                matmul(m, k2, p, an, false, bn, true, part, i > 0, inner_par);
            }
        });
    let mut out = vec![0.0f64; m * k2];
    for part in parts.chunks(m * k2) {
        out.iter_mut()
            .zip(part)
            .for_each(|(o, &v)| *o += v.as_f64());
    }
    out.iter_mut().for_each(|v| *v *= scale);
    out
}

/// Per-channel sums (f64) of `x` [N, C, HW].
fn channel_sums<T: Elem>(x: &[T], n: usize, c: usize, hw: usize) -> Vec<f64> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            (0..n)
                .map(|s| {
                    x[(s * c + ch) * hw..][..hw]
                        .iter()
                        .map(|v| v.as_f64())
                        .sum::<f64>()
                })
                .sum()
        })
        .collect()
}

/// `y_n (+)= op(A) B_n` for every sample, samples in parallel: B_n the n-th [k, hw] block of
/// `b`, y_n the n-th [m, hw] block of `y`; `ta`: A stored as [k, m].
#[allow(clippy::too_many_arguments)]
fn per_sample<T: Elem>(
    (m, k, hw): (usize, usize, usize),
    a: &[T],
    ta: bool,
    b: &[T],
    y: &mut [T],
    accumulate: bool,
) {
    let n = y.len() / (m * hw);
    let inner_par = n < rayon::current_num_threads();
    y.par_chunks_mut(m * hw).enumerate().for_each(|(s, yn)| {
        let bn = &b[s * k * hw..][..k * hw];
        matmul(m, hw, k, a, ta, bn, false, yn, accumulate, inner_par);
    });
}

/// `out = x - mean[c]` per channel of [N, C, HW] (in f64, rounded once).
fn centre<T: Elem>(out: &mut [T], x: &[T], mean: &[f64], hw: usize) {
    let c = mean.len();
    out.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(i, (d, s))| {
            let mu = mean[i % c];
            d.iter_mut()
                .zip(s)
                .for_each(|(d, v)| *d = T::from_f64(v.as_f64() - mu));
        });
}

/// Adds `bias[c]` to every position of channel c of `y` [N, C, HW].
fn add_bias<T: Elem>(y: &mut [T], bias: &[T], hw: usize) {
    let c = bias.len();
    y.par_chunks_mut(hw).enumerate().for_each(|(i, plane)| {
        let v = bias[i % c];
        plane.iter_mut().for_each(|o| *o += v);
    });
}

fn dot<T: Elem>(a: &[T], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x.as_f64() * y).sum()
}

impl<T: Elem> FusedRep1x1<T> for Cpu {
    type Rep1x1Saved = Rep1x1State<T>;

    fn fused_rep_1x1(&self, g: &Rep1x1Geom) -> bool {
        fused_1x1() && g.check().is_ok()
    }

    fn rep_1x1_pays(&self, g: &Rep1x1Geom) -> bool {
        g.fused_pays()
    }

    fn rep_1x1_forward(
        &self,
        g: &Rep1x1Geom,
        x: &[T],
        w: &[&[T]],
        gamma: &[&[T]],
        beta: &[&[T]],
        eps: f64,
    ) -> Result<RepOut<Vec<T>, Rep1x1State<T>, HostStats>> {
        g.check()?;
        let (n, ci, co, hw, nb, nbt) = (g.n, g.cin, g.cout, g.hw, g.branches, g.nbt());
        ensure!(
            x.len() == n * ci * hw
                && w.len() == nb
                && w.iter().all(|w| w.len() == co * ci)
                && gamma.len() == nbt
                && beta.len() == nbt
                && gamma.iter().chain(beta).all(|v| v.len() == co),
            "rep_1x1: buffers do not fit {g:?}"
        );
        let m = g.m() as f64;
        // The mean per channel (f64), the centred input rounded once.
        let mu: Vec<f64> = channel_sums(x, n, ci, hw).iter().map(|s| s / m).collect();
        let mut xc = vec![T::zero(); x.len()];
        centre(&mut xc, x, &mu, hw);
        let cov = outer_sum(&xc, &xc, (ci, ci, hw, n), g.chunk, 1.0 / m);
        let cov32: Vec<T> = cov.iter().map(|&v| T::from_f64(v)).collect();
        // W_b Sigma for every branch in one GEMM ([NB Cout, Cin] x [Cin, Cin]).
        let wst: Vec<T> = w.iter().flat_map(|w| w.iter().copied()).collect();
        let mut ws = vec![T::zero(); nb * co * ci];
        matmul(
            nb * co,
            ci,
            ci,
            &wst,
            false,
            &cov32,
            false,
            &mut ws,
            false,
            true,
        );
        // Branch statistics: mean w.mu, variance w.(W Sigma)_o (the identity: mu, Sigma_oo).
        let mut stats = Vec::with_capacity(nbt);
        let (mut invstd, mut a) = (vec![0.0; nbt * co], vec![0.0; nbt * co]);
        for (b, gamma_b) in gamma.iter().enumerate() {
            let (mut mean, mut var) = (vec![0.0; co], vec![0.0; co]);
            for o in 0..co {
                let t = b * co + o;
                (mean[o], var[o]) = if b < nb {
                    let wr = &wst[t * ci..][..ci];
                    let sr = &ws[t * ci..][..ci];
                    let v: f64 = wr
                        .iter()
                        .zip(sr)
                        .map(|(x, y)| x.as_f64() * y.as_f64())
                        .sum();
                    (dot(wr, &mu), v.max(0.0))
                } else {
                    (mu[o], cov[o * ci + o])
                };
                invstd[t] = 1.0 / (var[o] + eps).sqrt();
                a[t] = gamma_b[o].as_f64() * invstd[t];
            }
            stats.push(HostStats { mean, var });
        }
        // K = sum_b diag(a_b) W_b (+ diag(a_id)); the bias sum beta.
        let mut k = vec![T::zero(); co * ci];
        let mut bias = vec![T::zero(); co];
        for o in 0..co {
            for c in 0..ci {
                let mut s: f64 = (0..nb)
                    .map(|b| a[b * co + o] * wst[(b * co + o) * ci + c].as_f64())
                    .sum();
                if g.identity && c == o {
                    s += a[nb * co + o];
                }
                k[o * ci + c] = T::from_f64(s);
            }
            bias[o] = T::from_f64((0..nbt).map(|b| beta[b][o].as_f64()).sum());
        }
        // y_n = K xc_n + sum beta: the one activation-sized GEMM.
        let mut y = vec![T::zero(); n * co * hw];
        per_sample((co, ci, hw), &k, false, &xc, &mut y, false);
        add_bias(&mut y, &bias, hw);
        let saved = Rep1x1State {
            xc,
            w: wst,
            ws,
            k,
            invstd,
            a,
        };
        Ok((y, saved, stats))
    }

    fn rep_1x1_backward(
        &self,
        g: &Rep1x1Geom,
        s: &Rep1x1State<T>,
        gy: &[T],
    ) -> Result<RepGrads<Vec<T>>> {
        g.check()?;
        let (n, ci, co, hw, nb, nbt) = (g.n, g.cin, g.cout, g.hw, g.branches, g.nbt());
        ensure!(
            gy.len() == n * co * hw && s.xc.len() == n * ci * hw,
            "rep_1x1 backward: buffers do not fit {g:?}"
        );
        let m = g.m() as f64;
        // gy centred per channel (f64 mean) first: K^T gy and the mean's term (K^T sum gy) / M
        // would cancel in f32 where gy's mean is large against its spread. Then R = sum_n
        // gyc_n xc_n^T [Cout, Cin] (= sum gy xc^T, as xc sums to 0), in f64.
        let sg = channel_sums(gy, n, co, hw);
        let mut gyc = vec![T::zero(); gy.len()];
        centre(
            &mut gyc,
            gy,
            &sg.iter().map(|s| s / m).collect::<Vec<_>>(),
            hw,
        );
        let r = outer_sum(&gyc, &s.xc, (co, ci, hw, n), g.chunk, 1.0);
        // Per (b, o): q = w_bo . R_o (identity: R_oo), dgamma = q / sigma, e = a q / sigma^2.
        let mut dgamma = vec![T::zero(); nbt * co];
        let mut dbeta = vec![T::zero(); nbt * co];
        let mut e = vec![0.0; nbt * co];
        for b in 0..nbt {
            for o in 0..co {
                let t = b * co + o;
                let q = if b < nb {
                    dot(&s.w[t * ci..][..ci], &r[o * ci..][..ci])
                } else {
                    r[o * ci + o]
                };
                let inv = s.invstd[t];
                dgamma[t] = T::from_f64(inv * q);
                dbeta[t] = T::from_f64(sg[o]);
                e[t] = s.a[t] * inv * inv * q;
            }
        }
        // dW_b = a_b R - e_b (W_b Sigma) row-wise; ew = diag(e_b) W_b for Q = W^T ew.
        let mut dw = vec![T::zero(); nb * co * ci];
        let mut ew = vec![T::zero(); nb * co * ci];
        for (bo, (&a, &e)) in s.a.iter().zip(&e).take(nb * co).enumerate() {
            let o = bo % co;
            for c in 0..ci {
                let t = bo * ci + c;
                dw[t] = T::from_f64(a * r[o * ci + c] - e * s.ws[t].as_f64());
                ew[t] = T::from_f64(e * s.w[t].as_f64());
            }
        }
        let mut q = vec![T::zero(); ci * ci];
        matmul(ci, ci, nb * co, &s.w, true, &ew, false, &mut q, false, true);
        // dx_n = K^T gyc_n + A xc_n, A = -(Q + diag(e_id)) / M.
        let mut am = vec![T::zero(); ci * ci];
        for i in 0..ci {
            for j in 0..ci {
                let mut v = q[i * ci + j].as_f64();
                if g.identity && i == j {
                    v += e[nb * co + i];
                }
                am[i * ci + j] = T::from_f64(-v / m);
            }
        }
        let mut dx = vec![T::zero(); n * ci * hw];
        per_sample((ci, co, hw), &s.k, true, &gyc, &mut dx, false);
        per_sample((ci, ci, hw), &am, false, &s.xc, &mut dx, true);
        Ok(RepGrads {
            dx,
            dw,
            dscale: None,
            dgamma,
            dbeta,
        })
    }
}
