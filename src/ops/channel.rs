//! Channel slicing and channel shuffle (ShuffleNetV2's split and shuffle). The kernels are
//! `backend::api::Channel`'s.

use crate::autograd::{Tape, Var};
use crate::backend::api::Channel;
use crate::on_backend;
use crate::tensor::storage::Place;
use crate::tensor::Elem;

/// Channels `start..start + len` of x [N, C, H, W] (one half of `torch.chunk(x, 2, dim=1)`).
pub fn slice_channels<T: Elem>(tape: &mut Tape<T>, x: Var, start: usize, len: usize) -> Var {
    let xt = tape.value(x).clone();
    let (n, c, h, w) = xt.dims4();
    assert!(
        len > 0 && start + len <= c,
        "slice_channels {start}..{} of {c} channels",
        start + len
    );
    let dims = (n, c, h * w);
    let y = on_backend!([&xt], |b| b.out(
        &[n, len, h, w],
        b.slice_channels(&b.get(&xt), dims, start, len)
    ));
    tape.push(
        "slice_channels",
        y,
        &[x],
        Box::new(move |gy, _| {
            let dx = on_backend!([&xt, gy], |b| b.out(
                xt.shape(),
                b.slice_channels_backward(&b.get(gy), dims, start, len)
            ));
            vec![Some(dx)]
        }),
    )
}

/// Splits x into two equal channel halves (`x.chunk(2, dim=1)`).
pub fn split_channels<T: Elem>(tape: &mut Tape<T>, x: Var) -> (Var, Var) {
    let c = tape.shape(x)[1];
    assert!(c.is_multiple_of(2), "split_channels: odd channel count {c}");
    let a = slice_channels(tape, x, 0, c / 2);
    let b = slice_channels(tape, x, c / 2, c / 2);
    (a, b)
}

/// torchvision's `channel_shuffle(x, groups)`.
pub fn channel_shuffle<T: Elem>(tape: &mut Tape<T>, x: Var, groups: usize) -> Var {
    let xt = tape.value(x).clone();
    let (n, c, h, w) = xt.dims4();
    assert!(
        groups > 0 && c % groups == 0,
        "channel_shuffle: {c} channels in {groups} groups"
    );
    let dims = (n, c, h * w);
    let y = on_backend!([&xt], |b| b
        .out(xt.shape(), b.channel_shuffle(&b.get(&xt), dims, groups)));
    tape.push(
        "channel_shuffle",
        y,
        &[x],
        Box::new(move |gy, _| {
            let dx = on_backend!([&xt, gy], |b| b.out(
                xt.shape(),
                b.channel_shuffle_backward(&b.get(gy), dims, groups)
            ));
            vec![Some(dx)]
        }),
    )
}
