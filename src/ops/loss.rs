//! Losses on [N, C] logits, averaged over the batch:
//! - cross-entropy against hard labels with label smoothing (PyTorch's `label_smoothing`: the
//!   target is (1 - e) one-hot + e / C), and against soft targets (Mixup/CutMix);
//! - knowledge distillation `t^2 * KL(softmax(z_t / t) || softmax(z_s / t))` (PyTorch's
//!   `kl_div(..., reduction="batchmean") * t * t`); the teacher gets no gradient.

use crate::autograd::{Tape, Var};
use crate::tensor::{Elem, Tensor};

/// Row-wise log-softmax of `z / t`, in f64.
fn log_softmax(z: &[f64], t: f64) -> Vec<f64> {
    let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b / t));
    let lse = z.iter().map(|&v| (v / t - m).exp()).sum::<f64>().ln() + m;
    z.iter().map(|&v| v / t - lse).collect()
}

fn rows<T: Elem>(t: &Tensor<T>) -> (usize, usize, Vec<f64>) {
    assert_eq!(
        t.shape().len(),
        2,
        "loss expects [N, C] logits, got {:?}",
        t.shape()
    );
    (
        t.shape()[0],
        t.shape()[1],
        t.data().iter().map(|v| v.as_f64()).collect(),
    )
}

/// Mean cross-entropy against per-row target distributions `targets` [N, C].
pub fn cross_entropy_soft<T: Elem>(tape: &mut Tape<T>, logits: Var, targets: &Tensor<T>) -> Var {
    if tape.value(logits).is_cuda() {
        return super::cuda::cross_entropy_soft(tape, logits, targets);
    }
    let (n, c, z) = rows(tape.value(logits));
    assert_eq!(targets.shape(), [n, c], "cross_entropy targets shape");
    let q: Vec<f64> = targets.data().iter().map(|v| v.as_f64()).collect();
    let mut loss = 0.0;
    let mut grad = vec![0.0; n * c];
    for i in 0..n {
        let ls = log_softmax(&z[i * c..(i + 1) * c], 1.0);
        for j in 0..c {
            let qv = q[i * c + j];
            loss -= qv * ls[j];
            // d/dz of -sum q log softmax(z) = softmax(z) * sum(q) - q
            let qsum: f64 = q[i * c..(i + 1) * c].iter().sum();
            grad[i * c + j] = (ls[j].exp() * qsum - qv) / n as f64;
        }
    }
    let shape = [n, c];
    tape.push(
        "cross_entropy_soft",
        Tensor::scalar(T::from_f64(loss / n as f64)),
        &[logits],
        Box::new(move |gy, _| {
            let s = gy.data()[0];
            vec![Some(Tensor::new(
                &shape,
                grad.iter().map(|&g| T::from_f64(g) * s).collect(),
            ))]
        }),
    )
}

/// Smoothed one-hot targets: (1 - smoothing) at the label plus smoothing / C everywhere.
pub fn smoothed_targets<T: Elem>(labels: &[usize], classes: usize, smoothing: f64) -> Tensor<T> {
    let mut q = vec![T::from_f64(smoothing / classes as f64); labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        assert!(l < classes, "label {l} out of range for {classes} classes");
        q[i * classes + l] += T::from_f64(1.0 - smoothing);
    }
    Tensor::new(&[labels.len(), classes], q)
}

/// Mean cross-entropy with hard labels and label smoothing in [0, 1).
pub fn cross_entropy<T: Elem>(
    tape: &mut Tape<T>,
    logits: Var,
    labels: &[usize],
    smoothing: f64,
) -> Var {
    if tape.value(logits).is_cuda() {
        return super::cuda::cross_entropy(tape, logits, labels, smoothing);
    }
    let (n, c) = (tape.shape(logits)[0], tape.shape(logits)[1]);
    assert_eq!(
        labels.len(),
        n,
        "cross_entropy: {} labels for {n} rows",
        labels.len()
    );
    let q = smoothed_targets(labels, c, smoothing);
    cross_entropy_soft(tape, logits, &q)
}

/// `t^2 * KL(p_t || p_s)` averaged over the batch, p = softmax(z / t). Gradient flows to the
/// student only: d/dz_s = t * (p_s - p_t) / N.
pub fn kd_loss<T: Elem>(tape: &mut Tape<T>, student: Var, teacher: &Tensor<T>, t: f64) -> Var {
    assert!(t > 0.0, "KD temperature must be positive");
    if tape.value(student).is_cuda() {
        return super::cuda::kd_loss(tape, student, teacher, t);
    }
    let (n, c, zs) = rows(tape.value(student));
    let (nt, ct, zt) = rows(teacher);
    assert!(
        nt == n && ct == c,
        "kd_loss: student [{n}, {c}] vs teacher [{nt}, {ct}]"
    );
    let mut loss = 0.0;
    let mut grad = vec![0.0; n * c];
    for i in 0..n {
        let ls = log_softmax(&zs[i * c..(i + 1) * c], t);
        let lt = log_softmax(&zt[i * c..(i + 1) * c], t);
        for j in 0..c {
            let pt = lt[j].exp();
            loss += pt * (lt[j] - ls[j]);
            grad[i * c + j] = t * (ls[j].exp() - pt) / n as f64;
        }
    }
    let shape = [n, c];
    tape.push(
        "kd_loss",
        Tensor::scalar(T::from_f64(t * t * loss / n as f64)),
        &[student],
        Box::new(move |gy, _| {
            let s = gy.data()[0];
            vec![Some(Tensor::new(
                &shape,
                grad.iter().map(|&g| T::from_f64(g) * s).collect(),
            ))]
        }),
    )
}
