//! max_pool2d (ResNet's and ShuffleNetV2's stem: 3x3, stride 2, padding 1), PyTorch semantics:
//! padding counts as -inf, output size floor((H + 2p - k) / s) + 1, and the gradient goes to the
//! first maximum of each window in row-major order.

use crate::autograd::{Tape, Var};
use crate::backend::cpu::min_len;
use crate::tensor::{Elem, Tensor};
use rayon::prelude::*;

pub fn max_pool2d<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Var {
    if tape.value(x).is_cuda() {
        return super::cuda::max_pool2d(tape, x, kernel, stride, padding);
    }
    let (n, c, h, w) = tape.value(x).dims4();
    assert!(
        kernel > 0 && stride > 0 && 2 * padding <= kernel,
        "max_pool2d: kernel {kernel}, stride {stride}, padding {padding}"
    );
    assert!(
        h + 2 * padding >= kernel && w + 2 * padding >= kernel,
        "max_pool2d: {h}x{w} input smaller than the {kernel}x{kernel} window"
    );
    let ho = (h + 2 * padding - kernel) / stride + 1;
    let wo = (w + 2 * padding - kernel) / stride + 1;
    let (hw, ohw) = (h * w, ho * wo);
    // Per output: the flat index (within its plane) of the window's first maximum.
    let mut arg = vec![0u32; n * c * ohw];
    let mut y = vec![T::zero(); n * c * ohw];
    let xd = tape.value(x).data();
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
    tape.push(
        "max_pool2d",
        Tensor::new(&[n, c, ho, wo], y),
        &[x],
        Box::new(move |gy, _| {
            let g = gy.data();
            let mut dx = vec![T::zero(); n * c * hw];
            dx.par_chunks_mut(hw)
                .enumerate()
                .with_min_len(min_len(hw))
                .for_each(|(nc, p)| {
                    for o in 0..ohw {
                        p[arg[nc * ohw + o] as usize] += g[nc * ohw + o];
                    }
                });
            vec![Some(Tensor::new(&[n, c, h, w], dx))]
        }),
    )
}
