//! avg_pool2d (2x2, stride 2, floor), global average pool, nearest upsample (PyTorch's legacy
//! 'nearest' index rule: src = floor(dst * (in / out)) computed in f32, clamped to in - 1).
//! The kernels are `backend::api::Pool`'s.

use crate::autograd::{Tape, Var};
use crate::backend::api::Pool;
use crate::on_backend;
use crate::tensor::storage::Place;
use crate::tensor::Elem;

pub fn avg_pool2x2<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    let xt = tape.value(x).clone();
    let d = xt.dims4();
    let (n, c, h, w) = d;
    let (ho, wo) = (h / 2, w / 2);
    // Callers check inputs first (`Model::check_input_size`); reaching this is a bug.
    assert!(
        ho > 0 && wo > 0,
        "avg_pool2x2 needs at least a 2x2 input, got {h}x{w} (a model input below \
         Model::min_input_size)"
    );
    let y = on_backend!([&xt], |b| b
        .out(&[n, c, ho, wo], b.avg_pool2x2(&b.get(&xt), d)));
    tape.push(
        "avg_pool2x2",
        y,
        &[x],
        Box::new(move |gy, _| {
            let dx = on_backend!([&xt, gy], |b| b
                .out(xt.shape(), b.avg_pool2x2_backward(&b.get(gy), d)));
            vec![Some(dx)]
        }),
    )
}

/// Mean over H and W: [N, C, H, W] -> [N, C, 1, 1].
pub fn global_avg_pool<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    let xt = tape.value(x).clone();
    let (n, c, h, w) = xt.dims4();
    let (nc, hw) = (n * c, h * w);
    let y = on_backend!([&xt], |b| b
        .out(&[n, c, 1, 1], b.global_avg_pool(&b.get(&xt), nc, hw)));
    tape.push(
        "global_avg_pool",
        y,
        &[x],
        Box::new(move |gy, _| {
            let dx = on_backend!([&xt, gy], |b| b
                .out(xt.shape(), b.global_avg_pool_backward(&b.get(gy), nc, hw)));
            vec![Some(dx)]
        }),
    )
}

pub use crate::backend::cpu::pool::nearest_indices;

/// Nearest-neighbour resize to (out_h, out_w).
pub fn upsample_nearest<T: Elem>(tape: &mut Tape<T>, x: Var, out_h: usize, out_w: usize) -> Var {
    let xt = tape.value(x).clone();
    let d = xt.dims4();
    let (n, c, _, _) = d;
    let o = (out_h, out_w);
    let y = on_backend!([&xt], |b| b
        .out(&[n, c, out_h, out_w], b.upsample_nearest(&b.get(&xt), d, o)));
    tape.push(
        "upsample_nearest",
        y,
        &[x],
        Box::new(move |gy, _| {
            let dx = on_backend!([&xt, gy], |b| b
                .out(xt.shape(), b.upsample_nearest_backward(&b.get(gy), d, o)));
            vec![Some(dx)]
        }),
    )
}
