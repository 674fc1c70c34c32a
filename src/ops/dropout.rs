//! Inverted dropout: in training, zero each element with probability p and scale the rest by 1/(1-p).

use crate::autograd::{Tape, Var};
use crate::tensor::{Elem, Tensor};
use rand::Rng;

pub fn dropout<T: Elem>(tape: &mut Tape<T>, x: Var, p: f64, rng: &mut impl Rng) -> Var {
    assert!(
        (0.0..1.0).contains(&p),
        "dropout probability {p} not in [0, 1)"
    );
    if p == 0.0 {
        return x;
    }
    let keep = T::from_f64(1.0 / (1.0 - p));
    let mask: Vec<T> = (0..tape.value(x).numel())
        .map(|_| {
            if rng.random::<f64>() < p {
                T::zero()
            } else {
                keep
            }
        })
        .collect();
    if tape.value(x).is_cuda() {
        let m = mask.iter().map(|v| v.as_f64() as f32).collect();
        return super::cuda::dropout_masked(tape, x, m);
    }
    let xt = tape.value(x);
    let y = Tensor::new(
        xt.shape(),
        xt.data().iter().zip(&mask).map(|(&v, &m)| v * m).collect(),
    );
    tape.push(
        "dropout",
        y,
        &[x],
        Box::new(move |gy, _| {
            vec![Some(Tensor::new(
                gy.shape(),
                gy.data().iter().zip(&mask).map(|(&g, &m)| g * m).collect(),
            ))]
        }),
    )
}
