//! The fused re-parameterized depth-wise conv on the CPU: the math of cuda/rep_conv.cu (DESIGN.md's
//! way 1) on planes that stay in cache. The branch outputs z_b are recomputed per (sample,
//! channel) plane and never written as tensors.
//!
//! Forward: (1) per channel, every branch's sum and sum of squares (f64) over the batch; (2) the
//! BN scales `s_b = gamma_b / sigma_b`; (3) per plane, `y = sum_b s_b (z_b - mean_b) + beta_b`
//! with every z_b recomputed, centred as BN computes it. (cuda/rep_conv.cu folds the branches
//! into one kernel and bias instead: fewer FLOPs, but `s_b mean_b` cancels against the conv in
//! f32 where a channel's variance is near 0 and s_b large.)
//! Backward: `dz_b = k1_b gy + k2_b (z_b - mean_b) + k0_b` per channel (BN backward, from sum gy
//! and sum gy z_b = W_b . corr(x, gy), both in f64); per plane each z_b is recomputed, dx gathers W_b^T dz_b and
//! the kernel gradients corr(x, dz_b) are summed over the batch in a fixed order (bit-exact
//! whatever the thread count).
//!
//! The 1x1 fused form is `rep_conv_1x1.rs`. Both are on by default ([`set_fused`],
//! `GHOSTV3_CPU_FUSED_REP=0` turns this one off).

use super::conv::{dw_plane_backward_input, dw_plane_forward, dw_plane_weight_grad, ConvGeom};
use super::{min_len, Cpu};
use crate::backend::api::rep_conv::RepOut;
use crate::backend::api::{FusedRepDw, HostStats, RepDwGeom, RepGrads};
use crate::backend::Elem;
use anyhow::{anyhow, ensure, Result};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

static FUSED: AtomicBool = AtomicBool::new(true);
static FROM_ENV: std::sync::Once = std::sync::Once::new();

/// Whether the CPU runs re-parameterized depth-wise convs fused (the default) or as composed
/// branches (conv + BN each, summed). `GHOSTV3_CPU_FUSED_REP=0` in the environment turns the
/// fused form off for a whole process. Both match timm's float64 gradients on a
/// well-conditioned draw (tests/fixture_models.rs); the shared batch-2 fixture has one ReLU
/// input whose sign any rounding order flips (tests/fixture_timm.rs says which), so its
/// gradient check runs composed.
pub fn set_fused(on: bool) {
    FROM_ENV.call_once(|| {});
    FUSED.store(on, Ordering::Relaxed);
}

pub fn fused() -> bool {
    FROM_ENV.call_once(|| {
        if std::env::var("GHOSTV3_CPU_FUSED_REP").is_ok_and(|v| v == "0") {
            FUSED.store(false, Ordering::Relaxed);
        }
    });
    FUSED.load(Ordering::Relaxed)
}

/// What the backward needs of the forward: the weights and per-branch BN figures.
pub struct RepDwState<T> {
    /// The kxk weights, [branches][c][kh*kw].
    kxk: Vec<T>,
    /// Per branch and channel ([nbt][c]): gamma, the batch mean and 1/sigma.
    gamma: Vec<f64>,
    mean: Vec<f64>,
    inv: Vec<f64>,
}

/// One channel's forward figures: every branch's batch mean, biased variance and BN scale
/// gamma / sigma, and the sum of the branches' betas.
struct ChannelFold {
    mean: Vec<f64>,
    var: Vec<f64>,
    scale: Vec<f64>,
    shift: f64,
}

/// One channel's backward figures: every branch's dgamma, the common dbeta (sum gy) and the
/// coefficients (k1, k2, k0, mean) of `dz_b = k1 gy + k2 (z_b - mean_b) + k0`.
struct ChannelGrad {
    dgamma: Vec<f64>,
    dbeta: f64,
    k: Vec<[f64; 4]>,
}

impl<T: Elem> FusedRepDw<T> for Cpu {
    type RepDwSaved = RepDwState<T>;

    fn fused_rep_dw(&self, g: &RepDwGeom) -> bool {
        fused() && g.branches >= 1 && g.kh % 2 == 1 && g.kw % 2 == 1
    }

    fn rep_dw_forward(
        &self,
        g: &RepDwGeom,
        x: &[T],
        kxk: &[&[T]],
        scale: Option<&[T]>,
        gamma: &[&[T]],
        beta: &[&[T]],
        eps: f64,
    ) -> Result<RepOut<Vec<T>, RepDwState<T>, HostStats>> {
        let cg = check(g, x.len(), kxk, scale, gamma, beta)?;
        let (nb, nbt, c) = (g.branches, g.nbt(), g.c);
        let (kk, hw, p) = (g.kh * g.kw, g.h * g.w, cg.ho * cg.wo);
        let m = (g.n * p) as f64;
        let wk: Vec<T> = kxk.iter().flat_map(|w| w.iter().copied()).collect();
        // (1)-(2) per channel: the branch statistics and BN scales.
        let per_channel: Vec<ChannelFold> = (0..c)
            .into_par_iter()
            .with_min_len(min_len(g.n * hw))
            .map(|ch| {
                let mut sum = vec![0.0f64; nbt];
                let mut sq = vec![0.0f64; nbt];
                let mut z = vec![T::zero(); p];
                for n in 0..g.n {
                    let xp = &x[(n * c + ch) * hw..][..hw];
                    for b in 0..nb {
                        z.fill(T::zero());
                        dw_plane_forward(&cg, xp, &wk[(b * c + ch) * kk..][..kk], &mut z);
                        accumulate(&z, &mut sum[b], &mut sq[b]);
                    }
                    let mut b = nb;
                    if let Some(ws) = scale {
                        centres(&cg, xp, &mut z);
                        let s = ws[ch];
                        z.iter_mut().for_each(|v| *v *= s);
                        accumulate(&z, &mut sum[b], &mut sq[b]);
                        b += 1;
                    }
                    if g.identity {
                        accumulate(xp, &mut sum[b], &mut sq[b]);
                    }
                }
                let mean: Vec<f64> = sum.iter().map(|s| s / m).collect();
                let var: Vec<f64> = (0..nbt)
                    .map(|b| (sq[b] / m - mean[b] * mean[b]).max(0.0))
                    .collect();
                let scale_b: Vec<f64> = (0..nbt)
                    .map(|b| gamma[b][ch].as_f64() / (var[b] + eps).sqrt())
                    .collect();
                let shift: f64 = (0..nbt).map(|b| beta[b][ch].as_f64()).sum();
                ChannelFold {
                    mean,
                    var,
                    scale: scale_b,
                    shift,
                }
            })
            .collect();
        // (3) y = sum_b s_b (z_b - mean_b) + sum_b beta_b, plane by plane, each z_b recomputed:
        // centred per branch as BN computes it (one conv with the folded kernel and bias would
        // cancel s_b mean_b against the conv where a branch's variance is near 0 and s_b large).
        let mut y = vec![T::zero(); g.n * c * p];
        y.par_chunks_mut(p)
            .enumerate()
            .with_min_len(min_len(p * kk * nbt))
            .for_each(|(nc, yp)| {
                let ch = nc % c;
                let f = &per_channel[ch];
                let xp = &x[nc * hw..][..hw];
                let mut z = vec![T::zero(); p];
                let mut add = |z: &[T], b: usize| {
                    let (m, a) = (T::from_f64(f.mean[b]), T::from_f64(f.scale[b]));
                    yp.iter_mut().zip(z).for_each(|(o, &v)| *o += (v - m) * a);
                };
                for b in 0..nb {
                    z.fill(T::zero());
                    dw_plane_forward(&cg, xp, &wk[(b * c + ch) * kk..][..kk], &mut z);
                    add(&z, b);
                }
                let mut b = nb;
                if let Some(ws) = scale {
                    centres(&cg, xp, &mut z);
                    let s = ws[ch];
                    z.iter_mut().for_each(|v| *v *= s);
                    add(&z, b);
                    b += 1;
                }
                if g.identity {
                    add(xp, b);
                }
                let shift = T::from_f64(f.shift);
                yp.iter_mut().for_each(|o| *o += shift);
            });
        let mut stats = vec![
            HostStats {
                mean: vec![0.0; c],
                var: vec![0.0; c],
            };
            nbt
        ];
        let (mut mean, mut inv) = (vec![0.0; nbt * c], vec![0.0; nbt * c]);
        for (ch, f) in per_channel.iter().enumerate() {
            for b in 0..nbt {
                stats[b].mean[ch] = f.mean[b];
                stats[b].var[ch] = f.var[b];
                mean[b * c + ch] = f.mean[b];
                inv[b * c + ch] = 1.0 / (f.var[b] + eps).sqrt();
            }
        }
        let gamma = gamma
            .iter()
            .flat_map(|g| g.iter().map(|v| v.as_f64()))
            .collect();
        let saved = RepDwState {
            kxk: wk,
            gamma,
            mean,
            inv,
        };
        Ok((y, saved, stats))
    }

    fn rep_dw_backward(
        &self,
        g: &RepDwGeom,
        x: &[T],
        scale: Option<&[T]>,
        saved: &RepDwState<T>,
        gy: &[T],
        _eps: f64,
    ) -> Result<RepGrads<Vec<T>>> {
        let cg = geom(g)?;
        let (nb, nbt, c) = (g.branches, g.nbt(), g.c);
        let (kk, hw, p) = (g.kh * g.kw, g.h * g.w, cg.ho * cg.wo);
        ensure!(
            x.len() == g.n * c * hw && gy.len() == g.n * c * p,
            "rep_dw backward: buffers do not fit {g:?}"
        );
        let m = (g.n * p) as f64;
        let centre = (g.kh / 2) * g.kw + g.kw / 2;
        let wk = &saved.kxk;
        // Per channel: sum gy and, through corr(x, gy), sum gy z_b; then dgamma, dbeta and the
        // coefficients of dz_b = k1 gy + k2 z_b + k0.
        let coeffs: Vec<ChannelGrad> = (0..c)
            .into_par_iter()
            .with_min_len(min_len(g.n * hw))
            .map(|ch| {
                // In f64: sum gy z_b - mean_b sum gy cancels when the mean is large.
                let mut corr = vec![0.0f64; kk];
                let mut sg = 0.0f64;
                let (mut xp64, mut gp64) = (vec![0.0f64; hw], vec![0.0f64; p]);
                for n in 0..g.n {
                    let nc = n * c + ch;
                    let (xp, gp) = (&x[nc * hw..][..hw], &gy[nc * p..][..p]);
                    xp64.iter_mut().zip(xp).for_each(|(d, v)| *d = v.as_f64());
                    gp64.iter_mut().zip(gp).for_each(|(d, v)| *d = v.as_f64());
                    dw_plane_weight_grad(&cg, &xp64, &gp64, &mut corr);
                    sg += gp64.iter().sum::<f64>();
                }
                let sgz: Vec<f64> = (0..nbt)
                    .map(|b| {
                        if b < nb {
                            let wb = &wk[(b * c + ch) * kk..][..kk];
                            wb.iter()
                                .zip(&corr)
                                .map(|(w, v)| w.as_f64() * v.as_f64())
                                .sum()
                        } else if b == nb && scale.is_some() {
                            scale.expect("scale")[ch].as_f64() * corr[centre]
                        } else {
                            corr[centre] // the identity: z = x
                        }
                    })
                    .collect();
                let mut dgamma = vec![0.0; nbt];
                let mut k = vec![[0.0; 4]; nbt];
                for b in 0..nbt {
                    let i = b * c + ch;
                    let (mean, inv, gam) = (saved.mean[i], saved.inv[i], saved.gamma[i]);
                    dgamma[b] = (sgz[b] - mean * sg) * inv;
                    let k1 = gam * inv;
                    let k2 = -gam * inv * inv * dgamma[b] / m;
                    k[b] = [k1, k2, -k1 * sg / m, mean];
                }
                ChannelGrad {
                    dgamma,
                    dbeta: sg,
                    k,
                }
            })
            .collect();
        // Per plane: dx, and the plane's kernel-gradient partials [nb*kk (+1 for the scale)].
        let wlen = nb * kk + scale.is_some() as usize;
        let mut dx = vec![T::zero(); g.n * c * hw];
        let mut partial = vec![T::zero(); g.n * c * wlen];
        dx.par_chunks_mut(hw)
            .zip(partial.par_chunks_mut(wlen))
            .enumerate()
            .with_min_len(min_len(3 * p * kk * nbt))
            .for_each(|(nc, (dxp, part))| {
                let ch = nc % c;
                let (xp, gp) = (&x[nc * hw..][..hw], &gy[nc * p..][..p]);
                let k = &coeffs[ch].k;
                let mut z = vec![T::zero(); p];
                // Centred first, as BN's own backward does: k2 (z - mean) does not cancel.
                let dz_of = |z: &mut [T], [k1, k2, k0, mean]: [f64; 4]| {
                    let (k1, k2, k0) = (T::from_f64(k1), T::from_f64(k2), T::from_f64(k0));
                    let mean = T::from_f64(mean);
                    z.iter_mut()
                        .zip(gp)
                        .for_each(|(v, &g)| *v = k1 * g + k2 * (*v - mean) + k0);
                };
                for b in 0..nb {
                    let wb = &wk[(b * c + ch) * kk..][..kk];
                    z.fill(T::zero());
                    dw_plane_forward(&cg, xp, wb, &mut z);
                    dz_of(&mut z, k[b]);
                    dw_plane_backward_input(&cg, &z, wb, dxp);
                    dw_plane_weight_grad(&cg, xp, &z, &mut part[b * kk..(b + 1) * kk]);
                }
                let mut b = nb;
                if let Some(ws) = scale {
                    centres(&cg, xp, &mut z);
                    let s = ws[ch];
                    let xc: Vec<T> = z.clone();
                    z.iter_mut().for_each(|v| *v *= s);
                    dz_of(&mut z, k[b]);
                    part[nb * kk] = z.iter().zip(&xc).map(|(&d, &v)| d * v).sum();
                    add_centres(&cg, &z, s, dxp);
                    b += 1;
                }
                if g.identity {
                    z.copy_from_slice(xp);
                    dz_of(&mut z, k[b]);
                    dxp.iter_mut().zip(&z).for_each(|(d, &v)| *d += v);
                }
            });
        // Kernel gradients: the planes' partials summed over the batch in sample order.
        let mut dw = vec![T::zero(); nb * c * kk];
        let mut dscale = scale.map(|_| vec![T::zero(); c]);
        for n in 0..g.n {
            for ch in 0..c {
                let part = &partial[(n * c + ch) * wlen..][..wlen];
                for b in 0..nb {
                    let dst = &mut dw[(b * c + ch) * kk..][..kk];
                    dst.iter_mut()
                        .zip(&part[b * kk..(b + 1) * kk])
                        .for_each(|(d, &v)| *d += v);
                }
                if let Some(ds) = dscale.as_mut() {
                    ds[ch] += part[nb * kk];
                }
            }
        }
        let mut dgamma = vec![T::zero(); nbt * c];
        let mut dbeta = vec![T::zero(); nbt * c];
        for (ch, cg) in coeffs.iter().enumerate() {
            for b in 0..nbt {
                dgamma[b * c + ch] = T::from_f64(cg.dgamma[b]);
                dbeta[b * c + ch] = T::from_f64(cg.dbeta);
            }
        }
        Ok(RepGrads {
            dx,
            dw,
            dscale,
            dgamma,
            dbeta,
        })
    }
}

fn geom(g: &RepDwGeom) -> Result<ConvGeom> {
    let (ph, pw) = g.pads();
    ConvGeom::new(
        &[g.n, g.c, g.h, g.w],
        &[g.c, 1, g.kh, g.kw],
        (g.stride, g.stride),
        (ph, pw),
        g.c,
    )
    .map_err(|e| anyhow!("rep_dw: {e}"))
}

fn check<T>(
    g: &RepDwGeom,
    xlen: usize,
    kxk: &[&[T]],
    scale: Option<&[T]>,
    gamma: &[&[T]],
    beta: &[&[T]],
) -> Result<ConvGeom> {
    let cg = geom(g)?;
    let kk = g.kh * g.kw;
    ensure!(
        xlen == g.n * g.c * g.h * g.w,
        "rep_dw: input does not fit {g:?}"
    );
    ensure!(
        kxk.len() == g.branches && kxk.iter().all(|w| w.len() == g.c * kk),
        "rep_dw: {} kxk weights of {} values expected",
        g.branches,
        g.c * kk
    );
    ensure!(
        scale.is_some() == g.scale && scale.is_none_or(|s| s.len() == g.c),
        "rep_dw: scale weight given iff the scale branch exists"
    );
    ensure!(
        !g.identity || g.stride == 1,
        "rep_dw: the identity branch needs stride 1"
    );
    ensure!(
        gamma.len() == g.nbt()
            && beta.len() == g.nbt()
            && gamma.iter().chain(beta).all(|v| v.len() == g.c),
        "rep_dw: one BN of {} values per branch expected",
        g.c
    );
    Ok(cg)
}

/// Adds a plane's values into f64 sum and sum of squares.
fn accumulate<T: Elem>(z: &[T], sum: &mut f64, sq: &mut f64) {
    for v in z {
        let v = v.as_f64();
        *sum += v;
        *sq += v * v;
    }
}

/// The input at every output's centre tap: `out[oy, ox] = x[oy*s, ox*s]` (the 1x1 branch).
fn centres<T: Elem>(g: &ConvGeom, xp: &[T], out: &mut [T]) {
    for oy in 0..g.ho {
        let row = &xp[oy * g.sh * g.w..];
        for ox in 0..g.wo {
            out[oy * g.wo + ox] = row[ox * g.sw];
        }
    }
}

/// The adjoint of [`centres`], scaled: `dx[oy*s, ox*s] += s * dz[oy, ox]`.
fn add_centres<T: Elem>(g: &ConvGeom, dz: &[T], s: T, dxp: &mut [T]) {
    for oy in 0..g.ho {
        let row = &mut dxp[oy * g.sh * g.w..];
        for ox in 0..g.wo {
            row[ox * g.sw] += s * dz[oy * g.wo + ox];
        }
    }
}
