//! Losses on [N, C] logits, averaged over the batch:
//! - cross-entropy against hard labels with label smoothing (PyTorch's `label_smoothing`: the
//!   target is (1 - e) one-hot + e / C), and against soft targets (Mixup/CutMix);
//! - knowledge distillation `t^2 * KL(softmax(z_t / t) || softmax(z_s / t))` (PyTorch's
//!   `kl_div(..., reduction="batchmean") * t * t`); the teacher gets no gradient.
//!
//! Each loss runs on the logits' device (targets and teacher logits are brought there) and
//! computes its gradient with the loss; the backward scales it by the upstream gradient.

use crate::autograd::{Tape, Var};
use crate::backend::api::{Elementwise, Loss};
use crate::on_backend;
use crate::tensor::storage::{ok, Place};
use crate::tensor::{Elem, Tensor};

/// (N, C) of [N, C] logits.
fn dims(shape: &[usize]) -> (usize, usize) {
    assert_eq!(
        shape.len(),
        2,
        "loss expects [N, C] logits, got {:?}",
        shape
    );
    (shape[0], shape[1])
}

/// A loss node on `logits`: the loss value [1] and the gradient for an upstream gradient of 1
/// (both on the logits' device), scaled in the backward by the upstream scalar.
fn record<T: Elem>(
    tape: &mut Tape<T>,
    op: &'static str,
    logits: Var,
    (value, grad): (Tensor<T>, Tensor<T>),
) -> Var {
    tape.push(
        op,
        value,
        &[logits],
        Box::new(move |gy, _| {
            let s = gy.to_host().data()[0];
            if s == T::one() {
                return vec![Some(grad)];
            }
            let g = on_backend!([&grad], |b| b
                .out(grad.shape(), b.scale(&b.get(&grad), s.as_f64())));
            vec![Some(g)]
        }),
    )
}

/// Mean cross-entropy against per-row target distributions `targets` [N, C].
pub fn cross_entropy_soft<T: Elem>(tape: &mut Tape<T>, logits: Var, targets: &Tensor<T>) -> Var {
    let zt = tape.value(logits).clone();
    let (n, c) = dims(zt.shape());
    assert_eq!(targets.shape(), [n, c], "cross_entropy targets shape");
    let r = on_backend!([&zt], |b| {
        let (v, g) = ok(b.cross_entropy_soft(&b.get(&zt), &b.get(targets), (n, c)));
        (b.wrap(&[1], v), b.wrap(&[n, c], g))
    });
    record(tape, "cross_entropy_soft", logits, r)
}

/// Smoothed one-hot targets: (1 - smoothing) at the label plus smoothing / C everywhere.
pub fn smoothed_targets<T: Elem>(labels: &[usize], classes: usize, smoothing: f64) -> Tensor<T> {
    let q = ok(crate::backend::cpu::loss::smoothed_targets(
        labels, classes, smoothing,
    ));
    Tensor::new(&[labels.len(), classes], q)
}

/// Mean cross-entropy with hard labels and label smoothing in [0, 1).
pub fn cross_entropy<T: Elem>(
    tape: &mut Tape<T>,
    logits: Var,
    labels: &[usize],
    smoothing: f64,
) -> Var {
    let zt = tape.value(logits).clone();
    let (n, c) = dims(zt.shape());
    assert_eq!(
        labels.len(),
        n,
        "cross_entropy: {} labels for {n} rows",
        labels.len()
    );
    for &l in labels {
        assert!(l < c, "label {l} out of range for {c} classes");
    }
    let r = on_backend!([&zt], |b| {
        let (v, g) = ok(b.cross_entropy(&b.get(&zt), labels, smoothing, (n, c)));
        (b.wrap(&[1], v), b.wrap(&[n, c], g))
    });
    // Recorded as the soft-target loss of the smoothed targets it is.
    record(tape, "cross_entropy_soft", logits, r)
}

/// `t^2 * KL(p_t || p_s)` averaged over the batch, p = softmax(z / t). Gradient flows to the
/// student only: d/dz_s = t * (p_s - p_t) / N.
///
/// A temperature that is not finite and positive (recipes refuse it; see `TrainConfig`) gives
/// a NaN loss and NaN gradients instead of a panic: the step's non-finite-loss path reports it.
pub fn kd_loss<T: Elem>(tape: &mut Tape<T>, student: Var, teacher: &Tensor<T>, t: f64) -> Var {
    if !(t > 0.0 && t.is_finite()) {
        let kl = kd_loss(tape, student, teacher, 1.0);
        return crate::ops::scale(tape, kl, T::nan());
    }
    let zs = tape.value(student).clone();
    let (n, c) = dims(zs.shape());
    let (nt, ct) = dims(teacher.shape());
    assert!(
        nt == n && ct == c,
        "kd_loss: student [{n}, {c}] vs teacher [{nt}, {ct}]"
    );
    let r = on_backend!([&zs], |b| {
        let (v, g) = ok(b.kd_loss(&b.get(&zs), &b.get(teacher), (n, c), t));
        (b.wrap(&[1], v), b.wrap(&[n, c], g))
    });
    record(tape, "kd_loss", student, r)
}
