//! The tape op of the fused re-parameterized 1x1 conv in training on the GPU
//! (`backend::cuda::rep_1x1`, cuda/rep_conv_1x1.cu): the counterpart of `ops::cuda::rep_conv_dw`
//! for 1x1 convs with groups 1 and stride 1.

use super::batch_norm::BatchStats;
use super::cuda::{as_dev, dev, gpu, ok, split_views, stack};
use crate::autograd::{Tape, Var};
use crate::backend::cuda::rep_1x1::Rep1x1Geom;
use crate::tensor::{Elem, Tensor};

/// The fused re-parameterized 1x1 conv in training: `x` [N, Cin, H, W] on the device, `ws` the
/// branch weights [Cout, Cin, 1, 1] each, `identity` the BN-only identity branch (Cin == Cout),
/// `bn` the (gamma, beta) of every branch (the convs, then the identity). Returns the sum of
/// the batch-statistics BN outputs of all branches and each branch's batch statistics, in that
/// order (as `ops::cuda::rep_conv_dw`).
pub fn rep_conv_1x1<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    ws: &[Var],
    identity: bool,
    bn: &[(Var, Var)],
    eps: f64,
) -> (Var, Vec<BatchStats>) {
    let xt = as_dev(tape.value(x));
    let (n, cin, h, w) = xt.dims4();
    let wshape = tape.shape(ws[0]).to_vec();
    assert!(
        wshape.len() == 4 && wshape[1] == cin && wshape[2] == 1 && wshape[3] == 1,
        "rep_conv_1x1: weight {wshape:?} is not a 1x1 kernel over {cin} channels"
    );
    let cout = wshape[0];
    let geom = Rep1x1Geom {
        n,
        cin,
        cout,
        hw: h * w,
        branches: ws.len(),
        identity,
        chunk: 0,
    };
    let nbt = geom.nbt();
    assert_eq!(bn.len(), nbt, "rep_conv_1x1: one BN per branch");
    let g = gpu();
    let devs = |vars: &[Var], tape: &Tape<T>| -> Vec<Tensor<T>> {
        vars.iter().map(|&v| as_dev(tape.value(v))).collect()
    };
    let wk = stack(&devs(ws, tape));
    let gammas: Vec<Var> = bn.iter().map(|p| p.0).collect();
    let betas: Vec<Var> = bn.iter().map(|p| p.1).collect();
    let gamma = stack(&devs(&gammas, tape));
    let beta = stack(&devs(&betas, tape));
    let (y, saved) = ok(g.rep_1x1_forward(&geom, &dev(&xt), &wk, &gamma, &beta, eps));
    drop((gamma, beta));
    let count = geom.m();
    let stats = (0..nbt)
        .map(|b| ok(g.batch_stats_device(&saved.mean, &saved.var, b * cout, cout, count)))
        .collect();
    tape.add_macs((count * (cin * cin + cout * (cin + 1))) as u64);
    let mut inputs = vec![x];
    inputs.extend(ws);
    inputs.extend(&gammas);
    inputs.extend(&betas);
    let nb = ws.len();
    let v = tape.push(
        "rep_conv_1x1",
        Tensor::from_cuda(&[n, cout, h, w], y),
        &inputs,
        Box::new(move |gy, _| {
            let gy = as_dev(gy);
            let r = ok(gpu().rep_1x1_backward(&geom, &wk, &saved, &dev(&gy)));
            let mut res: Vec<Option<Tensor<T>>> =
                vec![Some(Tensor::from_cuda(&[n, cin, h, w], r.dx))];
            res.extend(
                split_views(r.dw, nb, &[cout, cin, 1, 1])
                    .into_iter()
                    .map(Some),
            );
            res.extend(split_views(r.dgamma, nbt, &[cout]).into_iter().map(Some));
            res.extend(split_views(r.dbeta, nbt, &[cout]).into_iter().map(Some));
            res
        }),
    );
    (v, stats)
}
