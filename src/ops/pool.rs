//! avg_pool2d (2x2, stride 2, floor), global average pool, nearest upsample (PyTorch's legacy
//! 'nearest' index rule: src = floor(dst * (in / out)) computed in f32, clamped to in - 1).

use crate::autograd::{Tape, Var};
use crate::backend::cpu::min_len;
use crate::tensor::{Elem, Tensor};
use rayon::prelude::*;

pub fn avg_pool2x2<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    if tape.value(x).is_cuda() {
        return super::cuda::avg_pool2x2(tape, x);
    }
    let (n, c, h, w) = tape.value(x).dims4();
    let (ho, wo) = (h / 2, w / 2);
    assert!(ho > 0 && wo > 0, "avg_pool2x2 on a {h}x{w} input");
    let q = T::from_f64(0.25);
    let mut y = vec![T::zero(); n * c * ho * wo];
    let xd = tape.value(x).data();
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
    tape.push(
        "avg_pool2x2",
        Tensor::new(&[n, c, ho, wo], y),
        &[x],
        Box::new(move |gy, _| {
            let g = gy.data();
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
            vec![Some(Tensor::new(&[n, c, h, w], dx))]
        }),
    )
}

/// Mean over H and W: [N, C, H, W] -> [N, C, 1, 1].
pub fn global_avg_pool<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    if tape.value(x).is_cuda() {
        return super::cuda::global_avg_pool(tape, x);
    }
    let (n, c, h, w) = tape.value(x).dims4();
    let hw = h * w;
    let inv = T::from_f64(1.0 / hw as f64);
    let y: Vec<T> = tape
        .value(x)
        .data()
        .par_chunks(hw)
        .map(|p| p.iter().copied().sum::<T>() * inv)
        .collect();
    tape.push(
        "global_avg_pool",
        Tensor::new(&[n, c, 1, 1], y),
        &[x],
        Box::new(move |gy, _| {
            let dx = gy
                .data()
                .iter()
                .flat_map(|&g| std::iter::repeat_n(g * inv, hw))
                .collect();
            vec![Some(Tensor::new(&[n, c, h, w], dx))]
        }),
    )
}

/// PyTorch's legacy nearest source index for each destination index.
pub fn nearest_indices(input: usize, output: usize) -> Vec<usize> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|d| ((d as f32 * scale).floor() as usize).min(input - 1))
        .collect()
}

/// Nearest-neighbour resize to (out_h, out_w).
pub fn upsample_nearest<T: Elem>(tape: &mut Tape<T>, x: Var, out_h: usize, out_w: usize) -> Var {
    if tape.value(x).is_cuda() {
        return super::cuda::upsample_nearest(tape, x, out_h, out_w);
    }
    let (n, c, h, w) = tape.value(x).dims4();
    let (iy, ix) = (nearest_indices(h, out_h), nearest_indices(w, out_w));
    let mut y = vec![T::zero(); n * c * out_h * out_w];
    let xd = tape.value(x).data();
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
    tape.push(
        "upsample_nearest",
        Tensor::new(&[n, c, out_h, out_w], y),
        &[x],
        Box::new(move |gy, _| {
            let g = gy.data();
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
            vec![Some(Tensor::new(&[n, c, h, w], dx))]
        }),
    )
}
