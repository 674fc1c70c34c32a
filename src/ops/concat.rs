//! Channel concatenation (the Ghost module's [primary, cheap] output).

use crate::autograd::{Tape, Var};
use crate::tensor::{Elem, Tensor};

pub fn concat_channels<T: Elem>(tape: &mut Tape<T>, a: Var, b: Var) -> Var {
    if super::cuda::any_cuda(&[tape.value(a), tape.value(b)]) {
        return super::cuda::concat_channels(tape, a, b);
    }
    let (n, ca, h, w) = tape.value(a).dims4();
    let (nb, cb, hb, wb) = tape.value(b).dims4();
    assert!(
        n == nb && h == hb && w == wb,
        "concat_channels: {:?} vs {:?}",
        tape.shape(a),
        tape.shape(b)
    );
    let (pa, pb) = (ca * h * w, cb * h * w);
    let mut y = Vec::with_capacity(n * (pa + pb));
    let (ad, bd) = (tape.value(a).data(), tape.value(b).data());
    for i in 0..n {
        y.extend_from_slice(&ad[i * pa..(i + 1) * pa]);
        y.extend_from_slice(&bd[i * pb..(i + 1) * pb]);
    }
    let y = Tensor::new(&[n, ca + cb, h, w], y);
    tape.push(
        "concat_channels",
        y,
        &[a, b],
        Box::new(move |gy, needs| {
            let g = gy.data();
            let split = |off: usize, len: usize, c: usize| {
                let mut d = Vec::with_capacity(n * len);
                for i in 0..n {
                    d.extend_from_slice(&g[i * (pa + pb) + off..][..len]);
                }
                Tensor::new(&[n, c, h, w], d)
            };
            vec![
                needs[0].then(|| split(0, pa, ca)),
                needs[1].then(|| split(pa, pb, cb)),
            ]
        }),
    )
}
