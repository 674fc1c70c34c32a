//! Inverted dropout: in training, zero each element with probability p and scale the rest by 1/(1-p).
//! The mask is drawn on the host (the same draws on every device for the same rng).

use super::elementwise::prod;
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
    let xt = tape.value(x);
    let mask = Tensor::new(xt.shape(), mask).to_device(xt.device());
    let mask = mask.unwrap_or_else(|e| panic!("{e:#}"));
    let y = prod(xt, &mask);
    tape.push(
        "dropout",
        y,
        &[x],
        Box::new(move |gy, _| vec![Some(prod(gy, &mask))]),
    )
}
