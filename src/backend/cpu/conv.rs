//! 2-D convolution kernels (NCHW, weight [C_out, C_in/groups, kh, kw]).
//!
//! Depth-wise convs (groups == C_in == C_out) run a direct loop per (sample, channel) plane; every
//! other conv runs im2col + GEMM per sample and group (1x1 stride-1 convs skip im2col: the input
//! plane already is the GEMM operand). The linear layer (`Conv::linear`) is one GEMM.

use super::gemm::matmul;
use super::min_len;
use super::reduce;
use super::Cpu;
use crate::backend::api::conv::{Conv, LinearDims};
use crate::backend::Elem;
use anyhow::Result;
use rayon::prelude::*;

pub use crate::backend::api::conv::{ConvGeom, ConvGrads};

/// What the CPU kernels derive from a geometry.
impl ConvGeom {
    fn k_group(&self) -> usize {
        self.cin / self.groups * self.kh * self.kw
    }

    /// Output columns `ox` whose input column `ox*sw + kx - pw` lies inside [0, w).
    fn ox_range(&self, kx: usize) -> (usize, usize) {
        let lo = if self.pw > kx {
            (self.pw - kx).div_ceil(self.sw)
        } else {
            0
        };
        let hi = if self.w + self.pw > kx {
            (self.w + self.pw - kx).div_ceil(self.sw)
        } else {
            0
        };
        (lo.min(self.wo), hi.min(self.wo))
    }

    fn oy_range(&self, ky: usize) -> (usize, usize) {
        let lo = if self.ph > ky {
            (self.ph - ky).div_ceil(self.sh)
        } else {
            0
        };
        let hi = if self.h + self.ph > ky {
            (self.h + self.ph - ky).div_ceil(self.sh)
        } else {
            0
        };
        (lo.min(self.ho), hi.min(self.ho))
    }
}

/// im2col of one group of one sample: `col[(c*kh+ky)*kw+kx, oy*wo+ox]`.
fn im2col<T: Elem>(g: &ConvGeom, x: &[T], col: &mut [T]) {
    let cig = g.cin / g.groups;
    let p = g.ho * g.wo;
    col.fill(T::zero());
    for c in 0..cig {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..g.kh {
            let (oy0, oy1) = g.oy_range(ky);
            for kx in 0..g.kw {
                let row = &mut col[((c * g.kh + ky) * g.kw + kx) * p..][..p];
                let (ox0, ox1) = g.ox_range(kx);
                for oy in oy0..oy1 {
                    let iy = oy * g.sh + ky - g.ph;
                    let src = &plane[iy * g.w..(iy + 1) * g.w];
                    let dst = &mut row[oy * g.wo..(oy + 1) * g.wo];
                    for ox in ox0..ox1 {
                        dst[ox] = src[ox * g.sw + kx - g.pw];
                    }
                }
            }
        }
    }
}

/// The adjoint of `im2col`: adds `col` back into the input gradient of one group of one sample.
fn col2im<T: Elem>(g: &ConvGeom, col: &[T], dx: &mut [T]) {
    let cig = g.cin / g.groups;
    let p = g.ho * g.wo;
    for c in 0..cig {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..g.kh {
            let (oy0, oy1) = g.oy_range(ky);
            for kx in 0..g.kw {
                let row = &col[((c * g.kh + ky) * g.kw + kx) * p..][..p];
                let (ox0, ox1) = g.ox_range(kx);
                for oy in oy0..oy1 {
                    let iy = oy * g.sh + ky - g.ph;
                    let dst = &mut plane[iy * g.w..(iy + 1) * g.w];
                    let src = &row[oy * g.wo..(oy + 1) * g.wo];
                    for ox in ox0..ox1 {
                        dst[ox * g.sw + kx - g.pw] += src[ox];
                    }
                }
            }
        }
    }
}

/// Forward: returns `y` of shape `g.out_shape()`.
pub fn conv2d_forward<T: Elem>(g: &ConvGeom, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
    let p = g.ho * g.wo;
    let mut y = vec![T::zero(); g.n * g.cout * p];
    if g.is_depthwise() {
        let kk = g.kh * g.kw;
        y.par_chunks_mut(p)
            .enumerate()
            .with_min_len(min_len(p * kk))
            .for_each(|(nc, out)| {
                let c = nc % g.cin;
                let plane = &x[nc * g.h * g.w..(nc + 1) * g.h * g.w];
                dw_plane_forward(g, plane, &w[c * kk..(c + 1) * kk], out);
            });
    } else {
        let (cig, cog, kg) = (g.cin / g.groups, g.cout / g.groups, g.k_group());
        let par_inner = g.n < rayon::current_num_threads();
        // A task's work is its GEMM's multiply-adds, not its output's size.
        y.par_chunks_mut(g.cout * p)
            .enumerate()
            .with_min_len(min_len(g.cout * p * kg))
            .for_each(|(n, yn)| {
                let xn = &x[n * g.cin * g.h * g.w..(n + 1) * g.cin * g.h * g.w];
                let mut col = if g.is_pointwise() {
                    Vec::new()
                } else {
                    vec![T::zero(); kg * p]
                };
                for grp in 0..g.groups {
                    let xg = &xn[grp * cig * g.h * g.w..(grp + 1) * cig * g.h * g.w];
                    let wg = &w[grp * cog * kg..(grp + 1) * cog * kg];
                    let yg = &mut yn[grp * cog * p..(grp + 1) * cog * p];
                    let rhs: &[T] = if g.is_pointwise() {
                        xg
                    } else {
                        im2col(g, xg, &mut col);
                        &col
                    };
                    matmul(cog, p, kg, wg, false, rhs, false, yg, false, par_inner);
                }
            });
    }
    if let Some(b) = bias {
        y.par_chunks_mut(p)
            .enumerate()
            .with_min_len(min_len(p))
            .for_each(|(nc, out)| {
                let bv = b[nc % g.cout];
                out.iter_mut().for_each(|v| *v += bv);
            });
    }
    y
}

/// One depth-wise output plane: `out[oy,ox] += sum_{ky,kx} w[ky,kx] * x[oy*sh+ky-ph, ox*sw+kx-pw]`.
pub(super) fn dw_plane_forward<T: Elem>(g: &ConvGeom, x: &[T], w: &[T], out: &mut [T]) {
    for ky in 0..g.kh {
        let (oy0, oy1) = g.oy_range(ky);
        for kx in 0..g.kw {
            let wv = w[ky * g.kw + kx];
            let (ox0, ox1) = g.ox_range(kx);
            if ox0 >= ox1 {
                continue;
            }
            for oy in oy0..oy1 {
                let iy = oy * g.sh + ky - g.ph;
                let src = &x[iy * g.w..(iy + 1) * g.w];
                let dst = &mut out[oy * g.wo + ox0..oy * g.wo + ox1];
                if g.sw == 1 {
                    let s = &src[ox0 + kx - g.pw..ox1 + kx - g.pw];
                    for (d, &v) in dst.iter_mut().zip(s) {
                        *d += wv * v;
                    }
                } else {
                    for (i, d) in dst.iter_mut().enumerate() {
                        *d += wv * src[(ox0 + i) * g.sw + kx - g.pw];
                    }
                }
            }
        }
    }
}

/// Gradients of a convolution. Each is computed only when asked for (`need` = (dx, dw, db)).
pub fn conv2d_backward<T: Elem>(
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    dy: &[T],
    need: (bool, bool, bool),
) -> ConvGrads<Vec<T>> {
    let p = g.ho * g.wo;
    let (need_dx, need_dw, need_db) = need;
    let db = need_db.then(|| {
        (0..g.cout)
            .into_par_iter()
            .map(|c| {
                (0..g.n)
                    .map(|n| dy[(n * g.cout + c) * p..][..p].iter().copied().sum::<T>())
                    .sum()
            })
            .collect()
    });
    if g.is_depthwise() {
        let (dx, dw) = dw_backward(g, x, w, dy, need_dx, need_dw);
        return ConvGrads { dx, dw, db };
    }
    let (cig, cog, kg) = (g.cin / g.groups, g.cout / g.groups, g.k_group());
    let par_inner = g.n < rayon::current_num_threads();
    let chw = g.cin * g.h * g.w;
    let wsize = w.len();
    // One sample's contribution: writes dx[n] (if asked) and adds dW into `acc`.
    let sample = |n: usize, dxn: Option<&mut [T]>, acc: &mut [T]| {
        let xn = &x[n * chw..(n + 1) * chw];
        let dyn_ = &dy[n * g.cout * p..(n + 1) * g.cout * p];
        let mut col = if g.is_pointwise() {
            Vec::new()
        } else {
            vec![T::zero(); kg * p]
        };
        let mut dxn = dxn;
        for grp in 0..g.groups {
            let xg = &xn[grp * cig * g.h * g.w..(grp + 1) * cig * g.h * g.w];
            let dyg = &dyn_[grp * cog * p..(grp + 1) * cog * p];
            let wg = &w[grp * cog * kg..(grp + 1) * cog * kg];
            if need_dw {
                let rhs: &[T] = if g.is_pointwise() {
                    xg
                } else {
                    im2col(g, xg, &mut col);
                    &col
                };
                // dW_g[cog, kg] += dy_g[cog, p] · col^T[p, kg]
                let accg = &mut acc[grp * cog * kg..(grp + 1) * cog * kg];
                matmul(cog, kg, p, dyg, false, rhs, true, accg, true, par_inner);
            }
            if let Some(dxn) = dxn.as_deref_mut() {
                let dxg = &mut dxn[grp * cig * g.h * g.w..(grp + 1) * cig * g.h * g.w];
                if g.is_pointwise() {
                    // dx_g[cig, p] = W_g^T[cig, cog] · dy_g[cog, p]
                    matmul(kg, p, cog, wg, true, dyg, false, dxg, false, par_inner);
                } else {
                    matmul(kg, p, cog, wg, true, dyg, false, &mut col, false, par_inner);
                    col2im(g, &col, dxg);
                }
            }
        }
    };
    // Samples are split into a fixed number of chunks whatever the thread count, and the chunks'
    // dW partials are added in order: the result is bitwise reproducible (exact resume).
    const CHUNKS: usize = 16;
    let per = g.n.div_ceil(CHUNKS).max(1);
    let mut dx = need_dx.then(|| vec![T::zero(); g.n * chw]);
    let partials: Vec<Vec<T>> = match dx.as_mut() {
        Some(dx) => dx
            .par_chunks_mut(per * chw)
            .enumerate()
            .map(|(ci, dxc)| {
                let mut acc = vec![T::zero(); if need_dw { wsize } else { 0 }];
                for (j, dxn) in dxc.chunks_mut(chw).enumerate() {
                    sample(ci * per + j, Some(dxn), &mut acc);
                }
                acc
            })
            .collect(),
        None if need_dw => (0..g.n.div_ceil(per))
            .into_par_iter()
            .map(|ci| {
                let mut acc = vec![T::zero(); wsize];
                for n in ci * per..((ci + 1) * per).min(g.n) {
                    sample(n, None, &mut acc);
                }
                acc
            })
            .collect(),
        None => Vec::new(),
    };
    let dw = need_dw.then(|| {
        let mut it = partials.into_iter();
        let mut dw = it.next().unwrap_or_else(|| vec![T::zero(); wsize]);
        for p in it {
            dw.iter_mut().zip(&p).for_each(|(a, &b)| *a += b);
        }
        dw
    });
    ConvGrads { dx, dw, db }
}

/// The input gradient of one depth-wise plane, added into `dxp`: the transpose of
/// [`dw_plane_forward`] with the plane's kernel `wc` [kh*kw].
pub(super) fn dw_plane_backward_input<T: Elem>(g: &ConvGeom, dyp: &[T], wc: &[T], dxp: &mut [T]) {
    for ky in 0..g.kh {
        let (oy0, oy1) = g.oy_range(ky);
        for kx in 0..g.kw {
            let wv = wc[ky * g.kw + kx];
            let (ox0, ox1) = g.ox_range(kx);
            if ox0 >= ox1 {
                continue;
            }
            for oy in oy0..oy1 {
                let iy = oy * g.sh + ky - g.ph;
                let drow = &mut dxp[iy * g.w..(iy + 1) * g.w];
                let srow = &dyp[oy * g.wo + ox0..oy * g.wo + ox1];
                // input columns ox*sw + kx - pw for ox in [ox0, ox1)
                let start = ox0 * g.sw + kx - g.pw;
                if g.sw == 1 {
                    for (d, &s) in drow[start..].iter_mut().zip(srow) {
                        *d += wv * s;
                    }
                } else {
                    for (d, &s) in drow[start..].iter_mut().step_by(g.sw).zip(srow) {
                        *d += wv * s;
                    }
                }
            }
        }
    }
}

/// The kernel gradient of one depth-wise plane (input `xp`, output gradient `dyp`), added into
/// `dwc` [kh*kw].
pub(super) fn dw_plane_weight_grad<T: Elem>(g: &ConvGeom, xp: &[T], dyp: &[T], dwc: &mut [T]) {
    for ky in 0..g.kh {
        let (oy0, oy1) = g.oy_range(ky);
        for kx in 0..g.kw {
            let (ox0, ox1) = g.ox_range(kx);
            let mut s = T::zero();
            if ox0 < ox1 {
                for oy in oy0..oy1 {
                    let iy = oy * g.sh + ky - g.ph;
                    let xrow = &xp[iy * g.w..(iy + 1) * g.w];
                    let drow = &dyp[oy * g.wo + ox0..oy * g.wo + ox1];
                    let start = ox0 * g.sw + kx - g.pw;
                    s += if g.sw == 1 {
                        reduce::dot(drow, &xrow[start..])
                    } else {
                        drow.iter()
                            .zip(xrow[start..].iter().step_by(g.sw))
                            .map(|(&a, &b)| a * b)
                            .sum()
                    };
                }
            }
            dwc[ky * g.kw + kx] += s;
        }
    }
}

fn dw_backward<T: Elem>(
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    dy: &[T],
    need_dx: bool,
    need_dw: bool,
) -> (Option<Vec<T>>, Option<Vec<T>>) {
    let (p, hw, kk) = (g.ho * g.wo, g.h * g.w, g.kh * g.kw);
    let dx = need_dx.then(|| {
        let mut dx = vec![T::zero(); g.n * g.cin * hw];
        dx.par_chunks_mut(hw)
            .enumerate()
            .with_min_len(min_len(p * kk))
            .for_each(|(nc, dxp)| {
                let c = nc % g.cin;
                dw_plane_backward_input(
                    g,
                    &dy[nc * p..(nc + 1) * p],
                    &w[c * kk..(c + 1) * kk],
                    dxp,
                );
            });
        dx
    });
    let dw = need_dw.then(|| {
        let mut dw = vec![T::zero(); g.cin * kk];
        dw.par_chunks_mut(kk)
            .enumerate()
            .with_min_len(min_len(g.n * p * kk))
            .for_each(|(c, dwc)| {
                for n in 0..g.n {
                    let nc = n * g.cin + c;
                    dw_plane_weight_grad(
                        g,
                        &x[nc * hw..(nc + 1) * hw],
                        &dy[nc * p..(nc + 1) * p],
                        dwc,
                    );
                }
            });
        dw
    });
    (dx, dw)
}

impl<T: Elem> Conv<T> for Cpu {
    fn conv2d(&self, g: &ConvGeom, x: &[T], w: &[T], bias: Option<&[T]>) -> Result<Vec<T>> {
        Ok(conv2d_forward(g, x, w, bias))
    }

    fn conv2d_backward(
        &self,
        g: &ConvGeom,
        x: &[T],
        w: &[T],
        gy: &[T],
        need: (bool, bool, bool),
    ) -> Result<ConvGrads<Vec<T>>> {
        Ok(conv2d_backward(g, x, w, gy, need))
    }

    fn linear(
        &self,
        x: &[T],
        w: &[T],
        bias: Option<&[T]>,
        (n, f, o): LinearDims,
    ) -> Result<Vec<T>> {
        let mut y = vec![T::zero(); n * o];
        if let Some(bd) = bias {
            y.chunks_mut(o).for_each(|row| row.copy_from_slice(bd));
        }
        matmul(n, o, f, x, false, w, true, &mut y, bias.is_some(), true);
        Ok(y)
    }

    fn linear_backward(
        &self,
        x: &[T],
        w: &[T],
        g: &[T],
        (n, f, o): LinearDims,
        (need_dx, need_dw, need_db): (bool, bool, bool),
    ) -> Result<ConvGrads<Vec<T>>> {
        let dx = need_dx.then(|| {
            let mut d = vec![T::zero(); n * f];
            matmul(n, f, o, g, false, w, false, &mut d, false, true);
            d
        });
        let dw = need_dw.then(|| {
            let mut d = vec![T::zero(); o * f];
            matmul(o, f, n, g, true, x, false, &mut d, false, true);
            d
        });
        let db = need_db.then(|| {
            let mut d = vec![T::zero(); o];
            g.chunks(o)
                .for_each(|row| d.iter_mut().zip(row).for_each(|(a, &v)| *a += v));
            d
        });
        Ok(ConvGrads { dx, dw, db })
    }
}
