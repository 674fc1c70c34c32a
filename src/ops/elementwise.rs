//! add, elementwise mul, per-channel mul (the SE gate), scale and reshape.

use crate::autograd::{Tape, Var};
use crate::backend::api::Elementwise;
use crate::on_backend;
use crate::tensor::storage::Place;
use crate::tensor::{Device, Elem, Tensor};

pub fn add<T: Elem>(tape: &mut Tape<T>, a: Var, b: Var) -> Var {
    assert_eq!(tape.shape(a), tape.shape(b), "add: shapes differ");
    let y = tape.value(a).add(tape.value(b));
    tape.push(
        "add",
        y,
        &[a, b],
        Box::new(|gy, needs| vec![needs[0].then(|| gy.clone()), needs[1].then(|| gy.clone())]),
    )
}

/// A zero-filled 1-D tensor of `len` values on `device` with each tensor copied in at its offset
/// (no tape record: the flat gradient buffer).
pub fn gather<T: Elem>(device: Device, segments: &[(&Tensor<T>, usize)], len: usize) -> Tensor<T> {
    on_backend!(device, T, |b| {
        let refs: Vec<_> = segments.iter().map(|(t, o)| (b.get(t), *o)).collect();
        let segs: Vec<_> = refs.iter().map(|(r, o)| (&**r, *o)).collect();
        b.out(&[len], b.gather(&segs, len))
    })
}

/// u * v on the device of the inputs.
pub(crate) fn prod<T: Elem>(u: &Tensor<T>, v: &Tensor<T>) -> Tensor<T> {
    on_backend!([u, v], |b| b.out(u.shape(), b.mul(&b.get(u), &b.get(v))))
}

/// Elementwise product of two tensors of one shape.
pub fn mul<T: Elem>(tape: &mut Tape<T>, a: Var, b: Var) -> Var {
    assert_eq!(tape.shape(a), tape.shape(b), "mul: shapes differ");
    let (at, bt) = (tape.value(a).clone(), tape.value(b).clone());
    let y = prod(&at, &bt);
    tape.push(
        "mul",
        y,
        &[a, b],
        Box::new(move |gy, needs| {
            vec![
                needs[0].then(|| prod(gy, &bt)),
                needs[1].then(|| prod(gy, &at)),
            ]
        }),
    )
}

/// `y[n,c,h,w] = x[n,c,h,w] * s[n,c]`, with s of shape [N, C, 1, 1].
pub fn mul_channel<T: Elem>(tape: &mut Tape<T>, x: Var, s: Var) -> Var {
    let (xt, st) = (tape.value(x).clone(), tape.value(s).clone());
    let (n, c, h, w) = xt.dims4();
    assert_eq!(st.shape(), [n, c, 1, 1], "mul_channel: scale shape");
    let hw = h * w;
    let y = on_backend!([&xt, &st], |b| b
        .out(xt.shape(), b.mul_channel(&b.get(&xt), &b.get(&st), hw)));
    tape.push(
        "mul_channel",
        y,
        &[x, s],
        Box::new(move |gy, needs| {
            on_backend!([&xt, &st, gy], |b| {
                let g = b.get(gy);
                let dx = needs[0].then(|| b.out(xt.shape(), b.mul_channel(&g, &b.get(&st), hw)));
                let ds = needs[1].then(|| {
                    b.out(
                        st.shape(),
                        b.mul_channel_backward_scale(&g, &b.get(&xt), hw),
                    )
                });
                vec![dx, ds]
            })
        }),
    )
}

/// The same values under another shape (e.g. flatten [N, C, 1, 1] -> [N, C]).
pub fn reshape<T: Elem>(tape: &mut Tape<T>, x: Var, shape: &[usize]) -> Var {
    let old = tape.shape(x).to_vec();
    let y = tape.value(x).reshape(shape);
    tape.push(
        "reshape",
        y,
        &[x],
        Box::new(move |gy, _| vec![Some(gy.reshape(&old))]),
    )
}

fn scaled<T: Elem>(x: &Tensor<T>, a: T) -> Tensor<T> {
    on_backend!([x], |b| b.out(x.shape(), b.scale(&b.get(x), a.as_f64())))
}

/// `y = a * x` for a constant a (loss weights).
pub fn scale<T: Elem>(tape: &mut Tape<T>, x: Var, a: T) -> Var {
    let y = scaled(tape.value(x), a);
    tape.push(
        "scale",
        y,
        &[x],
        Box::new(move |gy, _| vec![Some(scaled(gy, a))]),
    )
}
