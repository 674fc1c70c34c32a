//! Channel concatenation (the Ghost module's [primary, cheap] output). The kernels are
//! `backend::api::Channel`'s.

use crate::autograd::{Tape, Var};
use crate::backend::api::Channel;
use crate::on_backend;
use crate::tensor::storage::{ok, Place};
use crate::tensor::Elem;

pub fn concat_channels<T: Elem>(tape: &mut Tape<T>, a: Var, b: Var) -> Var {
    let (at, bt) = (tape.value(a).clone(), tape.value(b).clone());
    let (n, ca, h, w) = at.dims4();
    let (nb, cb, hb, wb) = bt.dims4();
    assert!(
        n == nb && h == hb && w == wb,
        "concat_channels: {:?} vs {:?}",
        tape.shape(a),
        tape.shape(b)
    );
    let dims = (n, ca, cb, h * w);
    let y = on_backend!([&at, &bt], |be| be.out(
        &[n, ca + cb, h, w],
        be.concat_channels(&be.get(&at), &be.get(&bt), dims)
    ));
    tape.push(
        "concat_channels",
        y,
        &[a, b],
        Box::new(move |gy, needs| {
            on_backend!([&at, &bt, gy], |be| {
                let (ga, gb) = ok(be.concat_channels_backward(&be.get(gy), dims));
                vec![
                    needs[0].then(|| be.wrap(&[n, ca, h, w], ga)),
                    needs[1].then(|| be.wrap(&[n, cb, h, w], gb)),
                ]
            })
        }),
    )
}
