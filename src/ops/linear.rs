//! Linear layer: `y = x · W^T + b`, x [N, F], W [O, F], b [O] (PyTorch's nn.Linear layout).

use crate::autograd::{Tape, Var};
use crate::backend::api::Conv;
use crate::on_backend;
use crate::tensor::storage::{ok, Place};
use crate::tensor::Elem;

pub fn linear<T: Elem>(tape: &mut Tape<T>, x: Var, w: Var, b: Option<Var>) -> Var {
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
    let bt = b.map(|b| tape.value(b).clone());
    if let Some(bt) = &bt {
        assert_eq!(bt.numel(), o, "linear bias shape");
    }
    let dims = (n, f, o);
    let y = on_backend!([&xt, &wt], |be| {
        let bias = bt.as_ref().map(|t| be.get(t));
        be.out(
            &[n, o],
            be.linear(&be.get(&xt), &be.get(&wt), bias.as_deref(), dims),
        )
    });
    tape.add_macs((n * o * f) as u64);
    let mut inputs = vec![x, w];
    inputs.extend(b);
    let has_bias = b.is_some();
    tape.push(
        "linear",
        y,
        &inputs,
        Box::new(move |gy, needs| {
            let need = (needs[0], needs[1], has_bias && needs[2]);
            on_backend!([&xt, &wt, gy], |be| {
                let g = ok(be.linear_backward(&be.get(&xt), &be.get(&wt), &be.get(gy), dims, need));
                let mut r = vec![
                    g.dx.map(|d| be.wrap(&[n, f], d)),
                    g.dw.map(|d| be.wrap(&[o, f], d)),
                ];
                if has_bias {
                    r.push(g.db.map(|d| be.wrap(&[o], d)));
                }
                r
            })
        }),
    )
}
