//! GhostNet's DFC attention gate `out * upsample(sigmoid(BN(g)))` (src/nn/ghost.rs) as one op:
//! one fused tape entry where the backend has the fused kernels (`backend::api::DfcGate`), else
//! the composed ops: BN (train or eval), sigmoid, nearest upsample to `out`'s size, mul.

use super::{batch_norm_eval, batch_norm_train, mul, sigmoid, upsample_nearest};
use crate::autograd::{Tape, Var};
use crate::backend::api::{DfcGate, GateBn};
use crate::on_backend;
use crate::tensor::storage::{ok, BatchStats, Place};
use crate::tensor::{Elem, Tensor};

/// Where the DFC gate's BN takes its statistics from.
pub enum DfcBn<'a, T: Elem> {
    /// Train mode: batch statistics of `g` (returned, for the running-stat update).
    Batch,
    /// Eval mode: the running mean and variance (e.g. views of the model's buffers).
    Running(&'a Tensor<T>, &'a Tensor<T>),
}

/// The running statistics of an eval-mode gate, if any.
type Running<'a, T> = Option<(&'a Tensor<T>, &'a Tensor<T>)>;

/// GhostNet's DFC gate `out * upsample(sigmoid(BN(g)))`: `o` the module output [N, C, H, W],
/// `g` the half-resolution output of the DFC's last conv [N, C, gh, gw], (`gamma`, `beta`) its
/// BN. Fused: the BN's statistics (or its running ones), then the BN apply, sigmoid, nearest
/// upsample and product in one pass, and backward the fused gate backward, then the BN
/// backward. Returns the batch statistics in train mode.
pub fn dfc_gate<T: Elem>(
    tape: &mut Tape<T>,
    (o, g): (Var, Var),
    (gamma, beta): (Var, Var),
    bn: DfcBn<'_, T>,
    eps: f64,
) -> (Var, Option<BatchStats>) {
    let (ot, gt) = (tape.value(o).clone(), tape.value(g).clone());
    let (gam, bet) = (tape.value(gamma).clone(), tape.value(beta).clone());
    let (n, c, _, _) = ot.dims4();
    let (gn, gc, _, _) = gt.dims4();
    assert!(
        gn == n && gc == c && gam.shape() == [c] && bet.shape() == [c],
        "dfc_gate: output {:?}, gate {:?}, BN weight {:?}, bias {:?}",
        ot.shape(),
        gt.shape(),
        gam.shape(),
        bet.shape()
    );
    let vars = ((o, g), (gamma, beta));
    match bn {
        DfcBn::Batch => on_backend!([&ot, &gt, &gam, &bet], |b| gate(
            b,
            tape,
            vars,
            [ot, gt, gam, bet],
            None,
            eps
        )),
        DfcBn::Running(rm, rv) => {
            assert!(
                rm.numel() == c && rv.numel() == c,
                "batch_norm running stats shape"
            );
            on_backend!([&ot, &gt, &gam, &bet, rm, rv], |b| gate(
                b,
                tape,
                vars,
                [ot, gt, gam, bet],
                Some((rm, rv)),
                eps
            ))
        }
    }
}

/// The gate on backend `b`: its fused op, or the composed ops.
fn gate<T: Elem, B: Place<T> + DfcGate<T>>(
    b: &'static B,
    tape: &mut Tape<T>,
    ((o, g), (gamma, beta)): ((Var, Var), (Var, Var)),
    [ot, gt, gam, bet]: [Tensor<T>; 4],
    running: Running<'_, T>,
    eps: f64,
) -> (Var, Option<BatchStats>) {
    if !b.fused_dfc() {
        return composed(tape, (o, g), (gamma, beta), running, eps);
    }
    let dims = ot.dims4();
    let (n, c, _, _) = dims;
    let gate_hw = (gt.shape()[2], gt.shape()[3]);
    let refs = running.map(|(rm, rv)| (b.get(rm), b.get(rv)));
    let bn = match &refs {
        Some((rm, rv)) => GateBn::Running(&**rm, &**rv),
        None => GateBn::Batch,
    };
    let (y, saved, stats) = ok(b.dfc_gate(
        &b.get(&ot),
        &b.get(&gt),
        &b.get(&gam),
        &b.get(&bet),
        bn,
        dims,
        gate_hw,
        eps,
    ));
    drop(refs);
    let stats = stats.map(|s| b.wrap_stats(s, n * gate_hw.0 * gate_hw.1));
    let y = b.wrap(ot.shape(), y);
    let v = tape.push(
        "dfc_gate",
        y,
        &[o, g, gamma, beta],
        Box::new(move |gy, needs| {
            let need_bn = needs[1] || needs[2] || needs[3];
            let (d_out, bn) = ok(b.dfc_gate_backward(
                &b.get(gy),
                &b.get(&ot),
                &b.get(&gt),
                &b.get(&gam),
                &saved,
                dims,
                gate_hw,
                need_bn,
            ));
            let d_out = needs[0].then(|| b.wrap(ot.shape(), d_out));
            let Some(bn) = bn else {
                return vec![d_out, None, None, None];
            };
            vec![
                d_out,
                bn.dx.filter(|_| needs[1]).map(|d| b.wrap(gt.shape(), d)),
                needs[2].then(|| b.wrap(&[c], bn.dgamma)),
                needs[3].then(|| b.wrap(&[c], bn.dbeta)),
            ]
        }),
    );
    (v, stats)
}

/// The gate as separate ops: BN, sigmoid, nearest upsample to `o`'s size, mul.
fn composed<T: Elem>(
    tape: &mut Tape<T>,
    (o, g): (Var, Var),
    (gamma, beta): (Var, Var),
    running: Running<'_, T>,
    eps: f64,
) -> (Var, Option<BatchStats>) {
    let (a, stats) = match running {
        None => {
            let (a, s) = batch_norm_train(tape, g, gamma, beta, eps);
            (a, Some(s))
        }
        Some((rm, rv)) => (batch_norm_eval(tape, g, gamma, beta, rm, rv, eps), None),
    };
    let (h, w) = (tape.shape(o)[2], tape.shape(o)[3]);
    let a = sigmoid(tape, a);
    let a = upsample_nearest(tape, a, h, w);
    (mul(tape, o, a), stats)
}
