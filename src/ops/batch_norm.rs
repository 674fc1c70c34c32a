//! BatchNorm2d. Train mode normalizes with the batch statistics (biased variance) and hands them
//! back so the module can update its running stats as PyTorch does (momentum, unbiased variance);
//! eval mode is the per-channel affine map given by the running stats. The kernels are
//! `backend::api::BatchNorm`'s.

use crate::autograd::{Tape, Var};
use crate::backend::api::BatchNorm;
use crate::on_backend;
use crate::tensor::storage::{ok, Place};
use crate::tensor::{Elem, Tensor};

pub use crate::tensor::storage::BatchStats;

/// (n, c, hw) of a [N, C, ...] tensor.
pub(crate) fn dims<T: Elem>(t: &Tensor<T>) -> (usize, usize, usize) {
    let s = t.shape();
    assert!(s.len() >= 2, "batch_norm needs [N, C, ...], got {s:?}");
    (s[0], s[1], s[2..].iter().product())
}

/// Records a BN whose forward ran on `b`: its backward runs there too.
fn record<T: Elem, B: Place<T> + BatchNorm<T>>(
    b: &'static B,
    tape: &mut Tape<T>,
    op: &'static str,
    (x, gamma, beta): (Var, Var, Var),
    (xt, gt): (Tensor<T>, Tensor<T>),
    y: Tensor<T>,
    saved: B::BnSaved,
) -> Var {
    let dims = dims(&xt);
    let c = dims.1;
    tape.push(
        op,
        y,
        &[x, gamma, beta],
        Box::new(move |gy, needs| {
            let g = ok(b.batch_norm_backward(
                &b.get(gy),
                &b.get(&xt),
                &b.get(&gt),
                &saved,
                dims,
                needs[0],
            ));
            vec![
                g.dx.filter(|_| needs[0]).map(|d| b.wrap(xt.shape(), d)),
                needs[1].then(|| b.wrap(&[c], g.dgamma)),
                needs[2].then(|| b.wrap(&[c], g.dbeta)),
            ]
        }),
    )
}

/// Train-mode BN over a [N, C, H, W] (or [N, C]) tensor.
pub fn batch_norm_train<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    gamma: Var,
    beta: Var,
    eps: f64,
) -> (Var, BatchStats) {
    let xt = tape.value(x).clone();
    let (n, c, hw) = dims(&xt);
    assert_eq!(tape.shape(gamma), [c], "batch_norm weight shape");
    assert_eq!(tape.shape(beta), [c], "batch_norm bias shape");
    let (gt, bt) = (tape.value(gamma).clone(), tape.value(beta).clone());
    on_backend!([&xt, &gt, &bt], |b| {
        let (y, saved, stats) =
            ok(b.batch_norm_train(&b.get(&xt), &b.get(&gt), &b.get(&bt), (n, c, hw), eps));
        let y = b.wrap(xt.shape(), y);
        let stats = Place::<T>::wrap_stats(b, stats, n * hw);
        let v = record(
            b,
            tape,
            "batch_norm_train",
            (x, gamma, beta),
            (xt, gt),
            y,
            saved,
        );
        (v, stats)
    })
}

/// Eval-mode BN with the given running statistics (not trained: tensors of `c` values, e.g.
/// views of the model's buffers, on their device; nothing is copied when they are where `x` is).
pub fn batch_norm_eval<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    gamma: Var,
    beta: Var,
    running_mean: &Tensor<T>,
    running_var: &Tensor<T>,
    eps: f64,
) -> Var {
    let xt = tape.value(x).clone();
    let (n, c, hw) = dims(&xt);
    assert_eq!(tape.shape(gamma), [c], "batch_norm weight shape");
    assert_eq!(tape.shape(beta), [c], "batch_norm bias shape");
    assert!(
        running_mean.numel() == c && running_var.numel() == c,
        "batch_norm running stats shape"
    );
    let (gt, bt) = (tape.value(gamma).clone(), tape.value(beta).clone());
    on_backend!([&xt, &gt, &bt, running_mean, running_var], |b| {
        let (y, saved) = ok(b.batch_norm_eval(
            &b.get(&xt),
            &b.get(&gt),
            &b.get(&bt),
            &b.get(running_mean),
            &b.get(running_var),
            (n, c, hw),
            eps,
        ));
        let y = b.wrap(xt.shape(), y);
        record(
            b,
            tape,
            "batch_norm_eval",
            (x, gamma, beta),
            (xt, gt),
            y,
            saved,
        )
    })
}

/// PyTorch's running-statistics update of one BN from its batch statistics:
/// r = (1 - momentum) * r + momentum * v for the running mean (`c` values at
/// `mean_offset` of the flat `buffers`) with the batch mean, and the running variance (at
/// `var_offset`) with the unbiased batch variance, on the device of `buffers` (device statistics
/// come down to host buffers).
pub fn update_running(
    buffers: &mut Tensor<f32>,
    (mean_offset, var_offset, c): (usize, usize, usize),
    stats: &BatchStats,
    momentum: f64,
) {
    let at = (mean_offset, var_offset, c);
    on_backend!(buffers.device(), f32, |b| running_update(
        b, buffers, at, stats, momentum
    ))
}

/// [`update_running`] of `stats.len()` BNs whose running statistics lie `stride` values apart
/// (BN i's mean at `mean_offset + i * stride`): a re-parameterized layer's branch BNs, one
/// launch on a device.
pub fn update_running_strided(
    buffers: &mut Tensor<f32>,
    at: (usize, usize, usize),
    stride: usize,
    stats: &[&BatchStats],
    momentum: f64,
) {
    let Some(first) = stats.first() else {
        return;
    };
    assert!(
        stats.iter().all(|s| s.count == first.count),
        "branch statistics over different counts"
    );
    on_backend!(buffers.device(), f32, |b| running_update_strided(
        b, buffers, at, stride, stats, momentum
    ))
}

fn running_update_strided<B: Place<f32> + BatchNorm<f32>>(
    b: &B,
    buffers: &mut Tensor<f32>,
    at: (usize, usize, usize),
    stride: usize,
    stats: &[&BatchStats],
    momentum: f64,
) {
    let refs: Vec<_> = stats.iter().map(|s| b.stats(s)).collect();
    let views: Vec<&B::Stats> = refs.iter().map(|r| &**r).collect();
    let count = stats[0].count;
    ok(b.batch_norm_update_running_strided(
        &mut *b.get_mut(buffers),
        at,
        stride,
        &views,
        count,
        momentum,
    ))
}

fn running_update<B: Place<f32> + BatchNorm<f32>>(
    b: &B,
    buffers: &mut Tensor<f32>,
    at: (usize, usize, usize),
    stats: &BatchStats,
    momentum: f64,
) {
    let s = b.stats(stats);
    ok(b.batch_norm_update_running(&mut *b.get_mut(buffers), at, &s, stats.count, momentum))
}
