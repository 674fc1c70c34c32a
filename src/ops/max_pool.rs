//! max_pool2d (ResNet's and ShuffleNetV2's stem: 3x3, stride 2, padding 1), PyTorch semantics:
//! padding counts as -inf, output size floor((H + 2p - k) / s) + 1, and the gradient goes to the
//! first maximum of each window in row-major order. The kernels are `backend::api::Pool`'s.

use crate::autograd::{Tape, Var};
use crate::backend::api::{MaxPoolGeom, Pool};
use crate::on_backend;
use crate::tensor::storage::{ok, Place};
use crate::tensor::Elem;

pub fn max_pool2d<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Var {
    let xt = tape.value(x).clone();
    let (n, c, h, w) = xt.dims4();
    let geom = MaxPoolGeom {
        n,
        c,
        h,
        w,
        k: kernel,
        s: stride,
        p: padding,
    };
    ok(geom.check());
    let (ho, wo) = geom.out_hw();
    on_backend!([&xt], |b| {
        let (y, arg) = ok(b.max_pool2d(&b.get(&xt), &geom));
        tape.push(
            "max_pool2d",
            b.wrap(&[n, c, ho, wo], y),
            &[x],
            Box::new(move |gy, _| {
                let dx = b.max_pool2d_backward(&b.get(gy), &arg, &geom);
                vec![Some(b.out(&[n, c, h, w], dx))]
            }),
        )
    })
}
