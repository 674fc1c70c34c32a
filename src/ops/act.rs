//! Activations: relu, relu6, sigmoid, hard_sigmoid (relu6(x + 3) / 6, the SE gate).

use crate::autograd::{Tape, Var};
use crate::tensor::{Elem, Tensor};

/// An elementwise op `y = f(x)` whose derivative is computed from x and y.
fn unary<T: Elem>(
    op: &'static str,
    tape: &mut Tape<T>,
    x: Var,
    f: impl Fn(T) -> T + Send + Sync,
    df: impl Fn(T, T) -> T + Send + Sync + 'static,
) -> Var {
    let xt = tape.value(x).clone();
    let y = xt.map(f);
    let yt = y.clone();
    tape.push(
        op,
        y,
        &[x],
        Box::new(move |gy, _| {
            let d = gy
                .data()
                .iter()
                .zip(xt.data())
                .zip(yt.data())
                .map(|((&g, &xv), &yv)| g * df(xv, yv))
                .collect();
            vec![Some(Tensor::new(xt.shape(), d))]
        }),
    )
}

pub fn relu<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    if tape.value(x).is_cuda() {
        return super::cuda::relu(tape, x);
    }
    unary(
        "relu",
        tape,
        x,
        |v| v.max(T::zero()),
        |xv, _| if xv > T::zero() { T::one() } else { T::zero() },
    )
}

pub fn sigmoid<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    if tape.value(x).is_cuda() {
        return super::cuda::sigmoid(tape, x);
    }
    unary(
        "sigmoid",
        tape,
        x,
        |v| T::one() / (T::one() + (-v).exp()),
        |_, y| y * (T::one() - y),
    )
}

/// PyTorch's hardsigmoid: gradient 1/6 strictly inside (-3, 3), 0 outside.
pub fn hard_sigmoid<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    if tape.value(x).is_cuda() {
        return super::cuda::hard_sigmoid(tape, x);
    }
    let three = T::from_f64(3.0);
    let six = T::from_f64(6.0);
    unary(
        "hard_sigmoid",
        tape,
        x,
        move |v| (v + three).max(T::zero()).min(six) / six,
        move |xv, _| {
            if xv > -three && xv < three {
                T::one() / six
            } else {
                T::zero()
            }
        },
    )
}

/// relu6 = min(max(x, 0), 6) (MobileNetV2). PyTorch's hardtanh backward: gradient 1 strictly
/// inside (0, 6), 0 elsewhere (also at the kinks).
pub fn relu6<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    if tape.value(x).is_cuda() {
        return super::cuda::relu6(tape, x);
    }
    let six = T::from_f64(6.0);
    unary(
        "relu6",
        tape,
        x,
        move |v| v.max(T::zero()).min(six),
        move |xv, _| {
            if xv > T::zero() && xv < six {
                T::one()
            } else {
                T::zero()
            }
        },
    )
}
