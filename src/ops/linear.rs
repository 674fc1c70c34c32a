//! Linear layer: `y = x · W^T + b`, x [N, F], W [O, F], b [O] (PyTorch's nn.Linear layout).

use crate::autograd::{Tape, Var};
use crate::backend::cpu::gemm::matmul;
use crate::tensor::{Elem, Tensor};

pub fn linear<T: Elem>(tape: &mut Tape<T>, x: Var, w: Var, b: Option<Var>) -> Var {
    if super::cuda::any_cuda(&[tape.value(x), tape.value(w)]) {
        return super::cuda::linear(tape, x, w, b);
    }
    let (xt, wt) = (tape.value(x).clone(), tape.value(w).clone());
    let (n, f) = (xt.shape()[0], xt.shape()[1]);
    assert_eq!(xt.shape().len(), 2, "linear input must be [N, F]");
    assert_eq!(wt.shape().len(), 2, "linear weight must be [O, F]");
    let o = wt.shape()[0];
    assert_eq!(
        wt.shape()[1],
        f,
        "linear: input {:?} vs weight {:?}",
        xt.shape(),
        wt.shape()
    );
    let mut y = vec![T::zero(); n * o];
    if let Some(b) = b {
        let bd = tape.value(b).data();
        assert_eq!(bd.len(), o, "linear bias shape");
        y.chunks_mut(o).for_each(|row| row.copy_from_slice(bd));
    }
    matmul(
        n,
        o,
        f,
        xt.data(),
        false,
        wt.data(),
        true,
        &mut y,
        b.is_some(),
        true,
    );
    tape.add_macs((n * o * f) as u64);
    let mut inputs = vec![x, w];
    inputs.extend(b);
    let has_bias = b.is_some();
    tape.push(
        "linear",
        Tensor::new(&[n, o], y),
        &inputs,
        Box::new(move |gy, needs| {
            let g = gy.data();
            let dx = needs[0].then(|| {
                let mut d = vec![T::zero(); n * f];
                matmul(n, f, o, g, false, wt.data(), false, &mut d, false, true);
                Tensor::new(&[n, f], d)
            });
            let dw = needs[1].then(|| {
                let mut d = vec![T::zero(); o * f];
                matmul(o, f, n, g, true, xt.data(), false, &mut d, false, true);
                Tensor::new(&[o, f], d)
            });
            let mut r = vec![dx, dw];
            if has_bias {
                r.push(needs[2].then(|| {
                    let mut d = vec![T::zero(); o];
                    g.chunks(o)
                        .for_each(|row| d.iter_mut().zip(row).for_each(|(a, &v)| *a += v));
                    Tensor::new(&[o], d)
                }));
            }
            r
        }),
    )
}
