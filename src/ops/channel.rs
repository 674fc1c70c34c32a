//! Channel slicing and channel shuffle (ShuffleNetV2's split and shuffle).

use crate::autograd::{Tape, Var};
use crate::tensor::{Elem, Tensor};

/// Channels `start..start + len` of x [N, C, H, W] (one half of `torch.chunk(x, 2, dim=1)`).
pub fn slice_channels<T: Elem>(tape: &mut Tape<T>, x: Var, start: usize, len: usize) -> Var {
    if tape.value(x).is_cuda() {
        return super::cuda::slice_channels(tape, x, start, len);
    }
    let (n, c, h, w) = tape.value(x).dims4();
    assert!(
        len > 0 && start + len <= c,
        "slice_channels {start}..{} of {c} channels",
        start + len
    );
    let hw = h * w;
    let xd = tape.value(x).data();
    let mut y = Vec::with_capacity(n * len * hw);
    for i in 0..n {
        y.extend_from_slice(&xd[(i * c + start) * hw..(i * c + start + len) * hw]);
    }
    tape.push(
        "slice_channels",
        Tensor::new(&[n, len, h, w], y),
        &[x],
        Box::new(move |gy, _| {
            let g = gy.data();
            let mut dx = vec![T::zero(); n * c * hw];
            for i in 0..n {
                dx[(i * c + start) * hw..(i * c + start + len) * hw]
                    .copy_from_slice(&g[i * len * hw..(i + 1) * len * hw]);
            }
            vec![Some(Tensor::new(&[n, c, h, w], dx))]
        }),
    )
}

/// Splits x into two equal channel halves (`x.chunk(2, dim=1)`).
pub fn split_channels<T: Elem>(tape: &mut Tape<T>, x: Var) -> (Var, Var) {
    if tape.value(x).is_cuda() {
        return super::cuda::split_channels(tape, x);
    }
    let c = tape.shape(x)[1];
    assert!(c.is_multiple_of(2), "split_channels: odd channel count {c}");
    let a = slice_channels(tape, x, 0, c / 2);
    let b = slice_channels(tape, x, c / 2, c / 2);
    (a, b)
}

/// The source channel of each output channel of a shuffle with `groups` groups:
/// view [N, g, C/g, H, W] -> transpose(1, 2) -> flatten, so out j = in (j % g) * (C/g) + j / g.
fn shuffle_src(c: usize, groups: usize) -> Vec<usize> {
    let per = c / groups;
    (0..c).map(|j| (j % groups) * per + j / groups).collect()
}

/// torchvision's `channel_shuffle(x, groups)`.
pub fn channel_shuffle<T: Elem>(tape: &mut Tape<T>, x: Var, groups: usize) -> Var {
    if tape.value(x).is_cuda() {
        return super::cuda::channel_shuffle(tape, x, groups);
    }
    let (n, c, h, w) = tape.value(x).dims4();
    assert!(
        groups > 0 && c % groups == 0,
        "channel_shuffle: {c} channels in {groups} groups"
    );
    let hw = h * w;
    let src = shuffle_src(c, groups);
    let xd = tape.value(x).data();
    let mut y = vec![T::zero(); n * c * hw];
    for i in 0..n {
        for (j, &s) in src.iter().enumerate() {
            y[(i * c + j) * hw..(i * c + j + 1) * hw]
                .copy_from_slice(&xd[(i * c + s) * hw..(i * c + s + 1) * hw]);
        }
    }
    tape.push(
        "channel_shuffle",
        Tensor::new(&[n, c, h, w], y),
        &[x],
        Box::new(move |gy, _| {
            let g = gy.data();
            let mut dx = vec![T::zero(); n * c * hw];
            for i in 0..n {
                for (j, &s) in src.iter().enumerate() {
                    dx[(i * c + s) * hw..(i * c + s + 1) * hw]
                        .copy_from_slice(&g[(i * c + j) * hw..(i * c + j + 1) * hw]);
                }
            }
            vec![Some(Tensor::new(&[n, c, h, w], dx))]
        }),
    )
}
