//! Activations: relu, relu6, sigmoid, hard_sigmoid (relu6(x + 3) / 6, the SE gate). The math of
//! each (and its derivative's convention at the kinks) is `backend::api::Unary`'s.

use crate::autograd::{Tape, Var};
use crate::backend::api::{Activation, Unary};
use crate::on_backend;
use crate::tensor::storage::Place;
use crate::tensor::Elem;

/// An elementwise op `y = f(x)` whose derivative is computed from x and y.
fn unary<T: Elem>(tape: &mut Tape<T>, op: Unary, x: Var) -> Var {
    let xt = tape.value(x).clone();
    let y = on_backend!([&xt], |b| b.out(xt.shape(), b.unary(op, &b.get(&xt))));
    let yt = y.clone();
    tape.push(
        op.name(),
        y,
        &[x],
        Box::new(move |gy, _| {
            let dx = on_backend!([&xt, gy], |b| b.out(
                xt.shape(),
                b.unary_backward(op, &b.get(&xt), &b.get(&yt), &b.get(gy))
            ));
            vec![Some(dx)]
        }),
    )
}

pub fn relu<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    unary(tape, Unary::Relu, x)
}

pub fn sigmoid<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    unary(tape, Unary::Sigmoid, x)
}

/// PyTorch's hardsigmoid: gradient 1/6 strictly inside (-3, 3), 0 outside.
pub fn hard_sigmoid<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    unary(tape, Unary::HardSigmoid, x)
}

/// relu6 = min(max(x, 0), 6) (MobileNetV2). PyTorch's hardtanh backward: gradient 1 strictly
/// inside (0, 6), 0 elsewhere (also at the kinks).
pub fn relu6<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    unary(tape, Unary::Relu6, x)
}
