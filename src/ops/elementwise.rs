//! add, elementwise mul, per-channel mul (the SE gate) and reshape.

use crate::autograd::{Tape, Var};
use crate::backend::cpu::min_len;
use crate::tensor::{Elem, Tensor};
use rayon::prelude::*;

pub fn add<T: Elem>(tape: &mut Tape<T>, a: Var, b: Var) -> Var {
    assert_eq!(tape.shape(a), tape.shape(b), "add: shapes differ");
    if super::cuda::any_cuda(&[tape.value(a), tape.value(b)]) {
        return super::cuda::add(tape, a, b);
    }
    let y = tape.value(a).add(tape.value(b));
    tape.push(
        "add",
        y,
        &[a, b],
        Box::new(|gy, needs| vec![needs[0].then(|| gy.clone()), needs[1].then(|| gy.clone())]),
    )
}

/// Elementwise product of two tensors of one shape.
pub fn mul<T: Elem>(tape: &mut Tape<T>, a: Var, b: Var) -> Var {
    assert_eq!(tape.shape(a), tape.shape(b), "mul: shapes differ");
    if super::cuda::any_cuda(&[tape.value(a), tape.value(b)]) {
        return super::cuda::mul(tape, a, b);
    }
    let (at, bt) = (tape.value(a).clone(), tape.value(b).clone());
    let prod = |u: &Tensor<T>, v: &Tensor<T>| {
        Tensor::new(
            u.shape(),
            u.data()
                .iter()
                .zip(v.data())
                .map(|(&p, &q)| p * q)
                .collect(),
        )
    };
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
    if super::cuda::any_cuda(&[tape.value(x), tape.value(s)]) {
        return super::cuda::mul_channel(tape, x, s);
    }
    let (xt, st) = (tape.value(x).clone(), tape.value(s).clone());
    let (n, c, h, w) = xt.dims4();
    assert_eq!(st.shape(), [n, c, 1, 1], "mul_channel: scale shape");
    let hw = h * w;
    let mut y = vec![T::zero(); xt.numel()];
    y.par_chunks_mut(hw)
        .enumerate()
        .with_min_len(min_len(hw))
        .for_each(|(nc, out)| {
            let sv = st.data()[nc];
            out.iter_mut()
                .zip(&xt.data()[nc * hw..(nc + 1) * hw])
                .for_each(|(o, &v)| *o = v * sv);
        });
    let y = Tensor::new(xt.shape(), y);
    tape.push(
        "mul_channel",
        y,
        &[x, s],
        Box::new(move |gy, needs| {
            let g = gy.data();
            let dx = needs[0].then(|| {
                let mut dx = vec![T::zero(); g.len()];
                dx.par_chunks_mut(hw)
                    .enumerate()
                    .with_min_len(min_len(hw))
                    .for_each(|(nc, out)| {
                        let sv = st.data()[nc];
                        out.iter_mut()
                            .zip(&g[nc * hw..(nc + 1) * hw])
                            .for_each(|(o, &v)| *o = v * sv);
                    });
                Tensor::new(xt.shape(), dx)
            });
            let ds = needs[1].then(|| {
                let d = (0..n * c)
                    .into_par_iter()
                    .map(|nc| {
                        g[nc * hw..(nc + 1) * hw]
                            .iter()
                            .zip(&xt.data()[nc * hw..(nc + 1) * hw])
                            .map(|(&a, &b)| a * b)
                            .sum()
                    })
                    .collect();
                Tensor::new(st.shape(), d)
            });
            vec![dx, ds]
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

/// `y = a * x` for a constant a (loss weights).
pub fn scale<T: Elem>(tape: &mut Tape<T>, x: Var, a: T) -> Var {
    if tape.value(x).is_cuda() {
        return super::cuda::scale(tape, x, a);
    }
    let y = tape.value(x).map(|v| v * a);
    tape.push(
        "scale",
        y,
        &[x],
        Box::new(move |gy, _| vec![Some(gy.map(|g| g * a))]),
    )
}
