//! Pooling and resampling on the CPU (2x2 average, global average, nearest upsample,
//! max_pool2d), and their index math, shared with the CUDA launchers and the inference engine.

use super::{min_len, Cpu};
use crate::backend::api::{Dims4, MaxPoolGeom, Pool};
use crate::backend::Elem;
use anyhow::Result;
use rayon::prelude::*;

/// PyTorch's legacy nearest source index for each destination index.
pub fn nearest_indices(input: usize, output: usize) -> Vec<usize> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|d| ((d as f32 * scale).floor() as usize).min(input - 1))
        .collect()
}

impl<T: Elem> Pool<T> for Cpu {
    /// The flat in-plane index of each output's first maximum.
    type Argmax = Vec<u32>;

    fn avg_pool2x2(&self, xd: &[T], (n, c, h, w): Dims4) -> Result<Vec<T>> {
        let (ho, wo) = (h / 2, w / 2);
        let q = T::from_f64(0.25);
        let mut y = vec![T::zero(); n * c * ho * wo];
        y.par_chunks_mut(ho * wo)
            .enumerate()
            .with_min_len(min_len(ho * wo))
            .for_each(|(nc, out)| {
                let p = &xd[nc * h * w..(nc + 1) * h * w];
                for oy in 0..ho {
                    for ox in 0..wo {
                        let (r0, r1) = (&p[2 * oy * w..], &p[(2 * oy + 1) * w..]);
                        out[oy * wo + ox] =
                            (r0[2 * ox] + r0[2 * ox + 1] + r1[2 * ox] + r1[2 * ox + 1]) * q;
                    }
                }
            });
        Ok(y)
    }

    fn avg_pool2x2_backward(&self, g: &[T], (n, c, h, w): Dims4) -> Result<Vec<T>> {
        let (ho, wo) = (h / 2, w / 2);
        let q = T::from_f64(0.25);
        let mut dx = vec![T::zero(); n * c * h * w];
        dx.par_chunks_mut(h * w)
            .enumerate()
            .with_min_len(min_len(h * w))
            .for_each(|(nc, p)| {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let v = g[nc * ho * wo + oy * wo + ox] * q;
                        for (dy, dx_) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                            p[(2 * oy + dy) * w + 2 * ox + dx_] = v;
                        }
                    }
                }
            });
        Ok(dx)
    }

    fn global_avg_pool(&self, x: &[T], _nc: usize, hw: usize) -> Result<Vec<T>> {
        let inv = T::from_f64(1.0 / hw as f64);
        Ok(x.par_chunks(hw)
            .map(|p| p.iter().copied().sum::<T>() * inv)
            .collect())
    }

    fn global_avg_pool_backward(&self, gy: &[T], _nc: usize, hw: usize) -> Result<Vec<T>> {
        let inv = T::from_f64(1.0 / hw as f64);
        Ok(gy
            .iter()
            .flat_map(|&g| std::iter::repeat_n(g * inv, hw))
            .collect())
    }

    fn upsample_nearest(
        &self,
        xd: &[T],
        (n, c, h, w): Dims4,
        (out_h, out_w): (usize, usize),
    ) -> Result<Vec<T>> {
        let (iy, ix) = (nearest_indices(h, out_h), nearest_indices(w, out_w));
        let mut y = vec![T::zero(); n * c * out_h * out_w];
        y.par_chunks_mut(out_h * out_w)
            .enumerate()
            .with_min_len(min_len(out_h * out_w))
            .for_each(|(nc, out)| {
                let p = &xd[nc * h * w..(nc + 1) * h * w];
                for (oy, &sy) in iy.iter().enumerate() {
                    for (ox, &sx) in ix.iter().enumerate() {
                        out[oy * out_w + ox] = p[sy * w + sx];
                    }
                }
            });
        Ok(y)
    }

    fn upsample_nearest_backward(
        &self,
        g: &[T],
        (n, c, h, w): Dims4,
        (out_h, out_w): (usize, usize),
    ) -> Result<Vec<T>> {
        let (iy, ix) = (nearest_indices(h, out_h), nearest_indices(w, out_w));
        let mut dx = vec![T::zero(); n * c * h * w];
        dx.par_chunks_mut(h * w)
            .enumerate()
            .with_min_len(min_len(h * w))
            .for_each(|(nc, p)| {
                let gp = &g[nc * out_h * out_w..(nc + 1) * out_h * out_w];
                for (oy, &sy) in iy.iter().enumerate() {
                    for (ox, &sx) in ix.iter().enumerate() {
                        p[sy * w + sx] += gp[oy * out_w + ox];
                    }
                }
            });
        Ok(dx)
    }

    fn max_pool2d(&self, xd: &[T], g: &MaxPoolGeom) -> Result<(Vec<T>, Vec<u32>)> {
        g.check()?;
        let &MaxPoolGeom {
            n,
            c,
            h,
            w,
            k: kernel,
            s: stride,
            p: padding,
        } = g;
        let (ho, wo) = g.out_hw();
        let (hw, ohw) = (h * w, ho * wo);
        // Per output: the flat index (within its plane) of the window's first maximum.
        let mut arg = vec![0u32; n * c * ohw];
        let mut y = vec![T::zero(); n * c * ohw];
        y.par_chunks_mut(ohw)
            .zip(arg.par_chunks_mut(ohw))
            .enumerate()
            .with_min_len(min_len(ohw))
            .for_each(|(nc, (out, idx))| {
                let p = &xd[nc * hw..(nc + 1) * hw];
                for oy in 0..ho {
                    let y0 = (oy * stride) as isize - padding as isize;
                    for ox in 0..wo {
                        let x0 = (ox * stride) as isize - padding as isize;
                        let (mut best, mut at) = (T::neg_infinity(), usize::MAX);
                        for ky in 0..kernel as isize {
                            let iy = y0 + ky;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..kernel as isize {
                                let ix = x0 + kx;
                                if ix < 0 || ix >= w as isize {
                                    continue;
                                }
                                let i = iy as usize * w + ix as usize;
                                let v = p[i];
                                if v > best || v.is_nan() || at == usize::MAX {
                                    best = v;
                                    at = i;
                                }
                            }
                        }
                        out[oy * wo + ox] = best;
                        idx[oy * wo + ox] = at as u32;
                    }
                }
            });
        Ok((y, arg))
    }

    fn max_pool2d_backward(&self, gy: &[T], arg: &Vec<u32>, g: &MaxPoolGeom) -> Result<Vec<T>> {
        let (ho, wo) = g.out_hw();
        let (n, c, hw, ohw) = (g.n, g.c, g.h * g.w, ho * wo);
        let mut dx = vec![T::zero(); n * c * hw];
        dx.par_chunks_mut(hw)
            .enumerate()
            .with_min_len(min_len(hw))
            .for_each(|(nc, p)| {
                for o in 0..ohw {
                    p[arg[nc * ohw + o] as usize] += gy[nc * ohw + o];
                }
            });
        Ok(dx)
    }
}
