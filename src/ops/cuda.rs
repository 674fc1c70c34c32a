//! The CUDA side of every op the GhostNet family uses: when an op's input is a device tensor,
//! the op in its own file hands over to the function of the same name here, which runs the
//! kernels of `backend::cuda` and records a backward closure that runs their backward kernels.
//! Values and gradients stay on the device; only BatchNorm's per-channel batch statistics come
//! back to the host (the module updates its running statistics there).

use super::batch_norm::BatchStats;
use super::conv::Conv2dArgs;
use crate::autograd::{Tape, Var};
use crate::backend::cpu::conv::ConvGeom;
use crate::backend::cuda::{global, BnSaved, DBuf, Gpu, RepDwGeom};
use crate::tensor::{Elem, Tensor};
use std::sync::Arc;

pub(super) fn gpu() -> &'static Gpu {
    global().unwrap_or_else(|e| panic!("a CUDA tensor without a usable GPU: {e}"))
}

pub(super) fn ok<R>(r: anyhow::Result<R>) -> R {
    r.unwrap_or_else(|e| panic!("CUDA: {e:#}"))
}

/// The device view of a tensor's values (the tensor keeps the buffer alive).
pub(super) fn dev<T: Elem>(t: &Tensor<T>) -> crate::backend::cuda::View<'_, f32> {
    let d = t
        .cuda()
        .unwrap_or_else(|| panic!("expected a CUDA tensor, got a host tensor {:?}", t.shape()));
    d.buf.view(d.offset, t.numel())
}

/// A host tensor's values on the device (for inputs mixed into device ops, e.g. targets).
fn to_dev<T: Elem>(t: &Tensor<T>) -> DBuf {
    let v: Vec<f32> = t.data().iter().map(|x| x.as_f64() as f32).collect();
    ok(gpu().upload(&v))
}

fn out<T: Elem>(shape: &[usize], b: DBuf) -> Tensor<T> {
    Tensor::from_cuda(shape, b)
}

/// Whether any of the tensors is on the device (the dispatch test of every op).
pub fn any_cuda<T: Elem>(ts: &[&Tensor<T>]) -> bool {
    ts.iter().any(|t| t.is_cuda())
}

/// `Tensor::add` of device tensors (gradient accumulation).
pub fn add_tensors<T: Elem>(a: &Tensor<T>, b: &Tensor<T>) -> Tensor<T> {
    let (ad, bd) = (as_dev(a), as_dev(b));
    out(a.shape(), ok(gpu().add(&dev(&ad), &dev(&bd))))
}

/// A device tensor of the same values (uploads a host tensor).
pub(super) fn as_dev<T: Elem>(t: &Tensor<T>) -> Tensor<T> {
    if t.is_cuda() {
        t.clone()
    } else {
        out(t.shape(), to_dev(t))
    }
}

/// The tensors' values one after another in one device buffer (one launch).
pub(super) fn stack<T: Elem>(ts: &[Tensor<T>]) -> DBuf {
    let views: Vec<_> = ts.iter().map(|t| dev(t)).collect();
    let mut segments = Vec::with_capacity(views.len());
    let mut off = 0;
    for v in &views {
        segments.push((&**v, off));
        off += v.len();
    }
    let mut buf = ok(gpu().alloc(off));
    ok(gpu().copy_segments(&segments, &mut buf));
    buf
}

/// `n` tensors of `shape` viewing `b` one after another (a stacked gradient, split without
/// copies).
pub(super) fn split_views<T: Elem>(b: DBuf, n: usize, shape: &[usize]) -> Vec<Tensor<T>> {
    let b = Arc::new(b);
    let len: usize = shape.iter().product();
    (0..n)
        .map(|i| Tensor::cuda_view(&b, i * len, shape))
        .collect()
}

fn unary<T: Elem>(
    tape: &mut Tape<T>,
    op: &'static str,
    x: Var,
    f: fn(&Gpu, &DBuf) -> anyhow::Result<DBuf>,
    df: fn(&Gpu, &DBuf, &DBuf, &DBuf) -> anyhow::Result<DBuf>,
) -> Var {
    let xt = tape.value(x).clone();
    let y: Tensor<T> = out(xt.shape(), ok(f(gpu(), &dev(&xt))));
    let yt = y.clone();
    tape.push(
        op,
        y,
        &[x],
        Box::new(move |gy, _| {
            let gy = as_dev(gy);
            let d = ok(df(gpu(), &dev(&xt), &dev(&yt), &dev(&gy)));
            vec![Some(out(xt.shape(), d))]
        }),
    )
}

pub fn relu<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    unary(tape, "relu", x, Gpu::relu, |g, x, _, gy| {
        g.relu_backward(x, gy)
    })
}

pub fn sigmoid<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    unary(tape, "sigmoid", x, Gpu::sigmoid, |g, _, y, gy| {
        g.sigmoid_backward(y, gy)
    })
}

pub fn hard_sigmoid<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    unary(tape, "hard_sigmoid", x, Gpu::hard_sigmoid, |g, x, _, gy| {
        g.hard_sigmoid_backward(x, gy)
    })
}

pub fn add<T: Elem>(tape: &mut Tape<T>, a: Var, b: Var) -> Var {
    let (at, bt) = (as_dev(tape.value(a)), as_dev(tape.value(b)));
    let y: Tensor<T> = out(at.shape(), ok(gpu().add(&dev(&at), &dev(&bt))));
    tape.push(
        "add",
        y,
        &[a, b],
        Box::new(|gy, needs| {
            let gy = as_dev(gy);
            vec![needs[0].then(|| gy.clone()), needs[1].then(|| gy.clone())]
        }),
    )
}

pub fn mul<T: Elem>(tape: &mut Tape<T>, a: Var, b: Var) -> Var {
    let (at, bt) = (as_dev(tape.value(a)), as_dev(tape.value(b)));
    let y: Tensor<T> = out(at.shape(), ok(gpu().mul(&dev(&at), &dev(&bt))));
    tape.push(
        "mul",
        y,
        &[a, b],
        Box::new(move |gy, needs| {
            let gy = as_dev(gy);
            let prod = |o: &Tensor<T>| out(gy.shape(), ok(gpu().mul(&dev(&gy), &dev(o))));
            vec![needs[0].then(|| prod(&bt)), needs[1].then(|| prod(&at))]
        }),
    )
}

pub fn mul_channel<T: Elem>(tape: &mut Tape<T>, x: Var, s: Var) -> Var {
    let (xt, st) = (as_dev(tape.value(x)), as_dev(tape.value(s)));
    let (n, c, h, w) = xt.dims4();
    assert_eq!(st.shape(), [n, c, 1, 1], "mul_channel: scale shape");
    let hw = h * w;
    let y: Tensor<T> = out(xt.shape(), ok(gpu().mul_channel(&dev(&xt), &dev(&st), hw)));
    tape.push(
        "mul_channel",
        y,
        &[x, s],
        Box::new(move |gy, needs| {
            let gy = as_dev(gy);
            let dx =
                needs[0].then(|| out(xt.shape(), ok(gpu().mul_channel(&dev(&gy), &dev(&st), hw))));
            let ds = needs[1].then(|| {
                let d = ok(gpu().mul_channel_backward_scale(&dev(&gy), &dev(&xt), hw));
                out(st.shape(), d)
            });
            vec![dx, ds]
        }),
    )
}

pub fn scale<T: Elem>(tape: &mut Tape<T>, x: Var, a: T) -> Var {
    let xt = tape.value(x).clone();
    let af = a.as_f64() as f32;
    let y: Tensor<T> = out(xt.shape(), ok(gpu().scale(&dev(&xt), af)));
    tape.push(
        "scale",
        y,
        &[x],
        Box::new(move |gy, _| {
            let gy = as_dev(gy);
            vec![Some(out(gy.shape(), ok(gpu().scale(&dev(&gy), af))))]
        }),
    )
}

pub fn conv2d<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    w: Var,
    b: Option<Var>,
    args: Conv2dArgs,
) -> Var {
    let geom = ConvGeom::new(
        tape.shape(x),
        tape.shape(w),
        args.stride,
        args.padding,
        args.groups,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let xt = as_dev(tape.value(x));
    let wt = as_dev(tape.value(w));
    let bt = b.map(|b| as_dev(tape.value(b)));
    let bview = bt.as_ref().map(|t| dev(t));
    let y = ok(gpu().conv2d_forward(&geom, &dev(&xt), &dev(&wt), bview.as_deref()));
    drop(bview);
    tape.add_macs(geom.macs());
    let mut inputs = vec![x, w];
    inputs.extend(b);
    let has_bias = b.is_some();
    let op = geom.op_name();
    tape.push(
        op,
        out(&geom.out_shape(), y),
        &inputs,
        Box::new(move |gy, needs| {
            let gy = as_dev(gy);
            let need = (needs[0], needs[1], has_bias && needs[2]);
            let g = ok(gpu().conv2d_backward(&geom, &dev(&xt), &dev(&wt), &dev(&gy), need));
            let mut r = vec![
                g.dx.map(|d| out(xt.shape(), d)),
                g.dw.map(|d| out(wt.shape(), d)),
            ];
            if has_bias {
                r.push(g.db.map(|d| out(&[geom.cout], d)));
            }
            r
        }),
    )
}

fn bn_dims<T: Elem>(t: &Tensor<T>) -> (usize, usize, usize) {
    let s = t.shape();
    assert!(s.len() >= 2, "batch_norm needs [N, C, ...], got {s:?}");
    (s[0], s[1], s[2..].iter().product())
}

fn bn_record<T: Elem>(
    tape: &mut Tape<T>,
    op: &'static str,
    (x, gamma, beta): (Var, Var, Var),
    (xt, gt): (Tensor<T>, Tensor<T>),
    y: DBuf,
    saved: BnSaved,
    train: bool,
) -> Var {
    let dims = bn_dims(&xt);
    let c = dims.1;
    tape.push(
        op,
        out(xt.shape(), y),
        &[x, gamma, beta],
        Box::new(move |gy, needs| {
            let gy = as_dev(gy);
            let g =
                ok(gpu().batch_norm_backward(&dev(&gy), &dev(&xt), &dev(&gt), &saved, dims, train));
            vec![
                needs[0].then(|| out(xt.shape(), g.dx)),
                needs[1].then(|| out(&[c], g.dgamma)),
                needs[2].then(|| out(&[c], g.dbeta)),
            ]
        }),
    )
}

pub fn batch_norm_train<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    gamma: Var,
    beta: Var,
    eps: f64,
) -> (Var, BatchStats) {
    let xt = as_dev(tape.value(x));
    let (gt, bt) = (as_dev(tape.value(gamma)), as_dev(tape.value(beta)));
    let dims = bn_dims(&xt);
    assert_eq!(gt.shape(), [dims.1], "batch_norm weight shape");
    let (y, saved) = ok(gpu().batch_norm_train(&dev(&xt), &dev(&gt), &dev(&bt), dims, eps));
    let var = saved.var.as_ref().expect("train-mode statistics");
    let stats = ok(gpu().batch_stats_device(&saved.mean, var, 0, dims.1, saved.count));
    let v = bn_record(
        tape,
        "batch_norm_train",
        (x, gamma, beta),
        (xt, gt),
        y,
        saved,
        true,
    );
    (v, stats)
}

#[allow(clippy::too_many_arguments)]
pub fn batch_norm_eval<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    gamma: Var,
    beta: Var,
    running_mean: &[T],
    running_var: &[T],
    eps: f64,
) -> Var {
    // Host running statistics go up as device tensors (models on the GPU keep them there).
    let up = |v: &[T]| -> Tensor<T> {
        let f: Vec<f32> = v.iter().map(|x| x.as_f64() as f32).collect();
        out(&[v.len()], ok(gpu().upload(&f)))
    };
    let (rm, rv) = (up(running_mean), up(running_var));
    batch_norm_eval_dev(tape, x, gamma, beta, &rm, &rv, eps)
}

pub fn avg_pool2x2<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    let xt = tape.value(x).clone();
    let d = xt.dims4();
    let (n, c, h, w) = d;
    let y = ok(gpu().avg_pool2x2(&dev(&xt), d));
    tape.push(
        "avg_pool2x2",
        out(&[n, c, h / 2, w / 2], y),
        &[x],
        Box::new(move |gy, _| {
            let gy = as_dev(gy);
            vec![Some(out(
                &[n, c, h, w],
                ok(gpu().avg_pool2x2_backward(&dev(&gy), d)),
            ))]
        }),
    )
}

pub fn global_avg_pool<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    let xt = tape.value(x).clone();
    let (n, c, h, w) = xt.dims4();
    let y = ok(gpu().global_avg_pool(&dev(&xt), n * c, h * w));
    tape.push(
        "global_avg_pool",
        out(&[n, c, 1, 1], y),
        &[x],
        Box::new(move |gy, _| {
            let gy = as_dev(gy);
            let d = ok(gpu().global_avg_pool_backward(&dev(&gy), n * c, h * w));
            vec![Some(out(&[n, c, h, w], d))]
        }),
    )
}

pub fn upsample_nearest<T: Elem>(tape: &mut Tape<T>, x: Var, oh: usize, ow: usize) -> Var {
    let xt = tape.value(x).clone();
    let d = xt.dims4();
    let (n, c, _, _) = d;
    let y = ok(gpu().upsample_nearest(&dev(&xt), d, (oh, ow)));
    tape.push(
        "upsample_nearest",
        out(&[n, c, oh, ow], y),
        &[x],
        Box::new(move |gy, _| {
            let gy = as_dev(gy);
            let dx = ok(gpu().upsample_nearest_backward(&dev(&gy), d, (oh, ow)));
            vec![Some(out(&[d.0, d.1, d.2, d.3], dx))]
        }),
    )
}

pub fn concat_channels<T: Elem>(tape: &mut Tape<T>, a: Var, b: Var) -> Var {
    let (at, bt) = (as_dev(tape.value(a)), as_dev(tape.value(b)));
    let (n, ca, h, w) = at.dims4();
    let (nb, cb, hb, wb) = bt.dims4();
    assert!(
        n == nb && h == hb && w == wb,
        "concat_channels: {:?} vs {:?}",
        at.shape(),
        bt.shape()
    );
    let dims = (n, ca, cb, h * w);
    let y = ok(gpu().concat_channels(&dev(&at), &dev(&bt), dims));
    tape.push(
        "concat_channels",
        out(&[n, ca + cb, h, w], y),
        &[a, b],
        Box::new(move |gy, needs| {
            let gy = as_dev(gy);
            let (ga, gb) = ok(gpu().concat_channels_backward(&dev(&gy), dims));
            vec![
                needs[0].then(|| out(&[n, ca, h, w], ga)),
                needs[1].then(|| out(&[n, cb, h, w], gb)),
            ]
        }),
    )
}

pub fn linear<T: Elem>(tape: &mut Tape<T>, x: Var, w: Var, b: Option<Var>) -> Var {
    let (xt, wt) = (as_dev(tape.value(x)), as_dev(tape.value(w)));
    let (n, f) = (xt.shape()[0], xt.shape()[1]);
    let o = wt.shape()[0];
    assert_eq!(
        wt.shape()[1],
        f,
        "linear: input {:?} vs weight {:?}",
        xt.shape(),
        wt.shape()
    );
    let bt = b.map(|b| as_dev(tape.value(b)));
    let bview = bt.as_ref().map(|t| dev(t));
    let y = ok(gpu().linear_forward(&dev(&xt), &dev(&wt), bview.as_deref(), (n, f, o)));
    drop(bview);
    tape.add_macs((n * o * f) as u64);
    let mut inputs = vec![x, w];
    inputs.extend(b);
    let has_bias = b.is_some();
    tape.push(
        "linear",
        out(&[n, o], y),
        &inputs,
        Box::new(move |gy, needs| {
            let gy = as_dev(gy);
            let (dx, dw, db) =
                ok(gpu().linear_backward(&dev(&xt), &dev(&wt), &dev(&gy), (n, f, o)));
            let mut r = vec![
                needs[0].then(|| out(&[n, f], dx)),
                needs[1].then(|| out(&[o, f], dw)),
            ];
            if has_bias {
                r.push(needs[2].then(|| out(&[o], db)));
            }
            r
        }),
    )
}

/// A loss node: device scalar value; the gradient (computed with the forward, for an upstream
/// gradient of 1) scaled by the upstream scalar.
fn loss_record<T: Elem>(
    tape: &mut Tape<T>,
    op: &'static str,
    logits: Var,
    (loss, grad): (DBuf, DBuf),
) -> Var {
    let shape = tape.shape(logits).to_vec();
    let grad: Tensor<T> = out(&shape, grad);
    tape.push(
        op,
        out(&[1], loss),
        &[logits],
        Box::new(move |gy, _| {
            let s = gy.to_host().data()[0].as_f64() as f32;
            if s == 1.0 {
                return vec![Some(grad)];
            }
            vec![Some(out(&shape, ok(gpu().scale(&dev(&grad), s))))]
        }),
    )
}

pub fn cross_entropy<T: Elem>(
    tape: &mut Tape<T>,
    logits: Var,
    labels: &[usize],
    smoothing: f64,
) -> Var {
    let zt = tape.value(logits).clone();
    let (n, c) = (zt.shape()[0], zt.shape()[1]);
    let r = ok(gpu().cross_entropy(&dev(&zt), labels, smoothing, (n, c), 1.0));
    loss_record(tape, "cross_entropy_soft", logits, r)
}

pub fn cross_entropy_soft<T: Elem>(tape: &mut Tape<T>, logits: Var, targets: &Tensor<T>) -> Var {
    let zt = tape.value(logits).clone();
    let (n, c) = (zt.shape()[0], zt.shape()[1]);
    assert_eq!(targets.shape(), [n, c], "cross_entropy targets shape");
    let q = as_dev(targets);
    let r = ok(gpu().cross_entropy_soft(&dev(&zt), &dev(&q), (n, c), 1.0));
    loss_record(tape, "cross_entropy_soft", logits, r)
}

pub fn kd_loss<T: Elem>(tape: &mut Tape<T>, student: Var, teacher: &Tensor<T>, t: f64) -> Var {
    let zs = tape.value(student).clone();
    let (n, c) = (zs.shape()[0], zs.shape()[1]);
    assert_eq!(teacher.shape(), [n, c], "kd_loss: teacher shape");
    let zt = as_dev(teacher);
    let r = ok(gpu().kd_loss(&dev(&zs), &dev(&zt), (n, c), t, 1.0));
    loss_record(tape, "kd_loss", student, r)
}

/// Dropout with the host-drawn mask (the same draws as the CPU op for the same rng).
pub fn dropout_masked<T: Elem>(tape: &mut Tape<T>, x: Var, mask: Vec<f32>) -> Var {
    let xt = tape.value(x).clone();
    let m: Tensor<T> = out(xt.shape(), ok(gpu().upload(&mask)));
    let y = out(xt.shape(), ok(gpu().mul(&dev(&xt), &dev(&m))));
    tape.push(
        "dropout",
        y,
        &[x],
        Box::new(move |gy, _| {
            let gy = as_dev(gy);
            vec![Some(out(gy.shape(), ok(gpu().mul(&dev(&gy), &dev(&m)))))]
        }),
    )
}

/// Eval-mode BN whose running statistics are device tensors (views into the device copy of
/// the model's buffers): nothing is uploaded per call.
pub fn batch_norm_eval_dev<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    gamma: Var,
    beta: Var,
    running_mean: &Tensor<T>,
    running_var: &Tensor<T>,
    eps: f64,
) -> Var {
    let xt = as_dev(tape.value(x));
    let (gt, bt) = (as_dev(tape.value(gamma)), as_dev(tape.value(beta)));
    let dims = bn_dims(&xt);
    let (rm, rv) = (dev(running_mean), dev(running_var));
    let (y, saved) =
        ok(gpu().batch_norm_eval(&dev(&xt), &dev(&gt), &dev(&bt), &rm, &rv, dims, eps));
    drop((rm, rv));
    bn_record(
        tape,
        "batch_norm_eval",
        (x, gamma, beta),
        (xt, gt),
        y,
        saved,
        false,
    )
}

/// The fused re-parameterized depth-wise conv in training (cuda/rep_conv.rs): `x` the input,
/// `kxk` the branch weights [C, 1, kh, kw] each, `scale` the 1x1 branch weight [C, 1, 1, 1],
/// `bn` the (gamma, beta) of every branch (kxk branches, scale, identity); returns the output
/// and each branch's batch statistics, in that order.
#[allow(clippy::too_many_arguments)]
pub fn rep_conv_dw<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    kxk: &[Var],
    scale: Option<Var>,
    identity: bool,
    bn: &[(Var, Var)],
    stride: usize,
    eps: f64,
) -> (Var, Vec<BatchStats>) {
    let xt = as_dev(tape.value(x));
    let (n, c, h, w) = xt.dims4();
    let ws = tape.shape(kxk[0]).to_vec();
    assert!(
        ws[0] == c && ws[1] == 1,
        "rep_conv_dw: weight {ws:?} is not depth-wise for {c} channels"
    );
    let geom = RepDwGeom {
        n,
        c,
        h,
        w,
        kh: ws[2],
        kw: ws[3],
        stride,
        branches: kxk.len(),
        scale: scale.is_some(),
        identity,
    };
    let nbt = geom.nbt();
    assert_eq!(bn.len(), nbt, "rep_conv_dw: one BN per branch");
    let g = gpu();
    // Stack the branch weights and BN parameters ([NB][C][kk], [NBT][C]) with device copies.
    let stack_vars = |vars: &[Var], tape: &Tape<T>| -> DBuf {
        let ts: Vec<Tensor<T>> = vars.iter().map(|&v| as_dev(tape.value(v))).collect();
        stack(&ts)
    };
    let wk = stack_vars(kxk, tape);
    let wsv = scale.map(|s| as_dev(tape.value(s)));
    let gammas: Vec<Var> = bn.iter().map(|p| p.0).collect();
    let betas: Vec<Var> = bn.iter().map(|p| p.1).collect();
    let gamma = stack_vars(&gammas, tape);
    let beta = stack_vars(&betas, tape);
    let wsview = wsv.as_ref().map(|t| dev(t));
    let (y, saved) =
        ok(g.rep_dw_forward(&geom, &dev(&xt), &wk, wsview.as_deref(), &gamma, &beta, eps));
    drop(wsview);
    let count = {
        let (ho, wo) = geom.out_hw();
        n * ho * wo
    };
    let stats = (0..nbt)
        .map(|b| ok(g.batch_stats_device(&saved.mean, &saved.var, b * c, c, count)))
        .collect();
    let (ho, wo) = geom.out_hw();
    let mut inputs = vec![x];
    inputs.extend(kxk);
    inputs.extend(scale);
    inputs.extend(&gammas);
    inputs.extend(&betas);
    let nb = kxk.len();
    let has_scale = scale.is_some();
    let v = tape.push(
        "rep_conv_dw",
        out(&[n, c, ho, wo], y),
        &inputs,
        Box::new(move |gy, _| {
            let gy = as_dev(gy);
            let wsview = wsv.as_ref().map(|t| dev(t));
            let r = ok(gpu().rep_dw_backward(
                &geom,
                &dev(&xt),
                &wk,
                wsview.as_deref(),
                &gamma,
                &saved,
                &dev(&gy),
                eps,
            ));
            // Each branch's gradient is a view into the stacked result, not a copy.
            let mut res: Vec<Option<Tensor<T>>> = vec![Some(out(&[n, c, h, w], r.dx))];
            res.extend(
                split_views(r.dwk, nb, &[c, 1, geom.kh, geom.kw])
                    .into_iter()
                    .map(Some),
            );
            if has_scale {
                res.push(r.dws.map(|d| out(&[c, 1, 1, 1], d)));
            }
            res.extend(split_views(r.dgamma, nbt, &[c]).into_iter().map(Some));
            res.extend(split_views(r.dbeta, nbt, &[c]).into_iter().map(Some));
            res
        }),
    );
    (v, stats)
}

// ---- relu6, max_pool2d, channel slicing and shuffle (MobileNetV2, ShuffleNetV2, ResNet) ----

pub fn relu6<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    unary(tape, "relu6", x, Gpu::relu6, |g, x, _, gy| {
        g.relu6_backward(x, gy)
    })
}

pub fn max_pool2d<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Var {
    let xt = tape.value(x).clone();
    let (n, c, h, w) = xt.dims4();
    let geom = crate::backend::cuda::shape_ops::MaxPoolGeom {
        n,
        c,
        h,
        w,
        k: kernel,
        s: stride,
        p: padding,
    };
    let (y, arg) = ok(gpu().max_pool2d(&dev(&xt), &geom));
    let (ho, wo) = geom.out_hw();
    tape.push(
        "max_pool2d",
        out(&[n, c, ho, wo], y),
        &[x],
        Box::new(move |gy, _| {
            let gy = as_dev(gy);
            let dx = ok(gpu().max_pool2d_backward(&dev(&gy), &arg, &geom));
            vec![Some(out(&[n, c, h, w], dx))]
        }),
    )
}

pub fn slice_channels<T: Elem>(tape: &mut Tape<T>, x: Var, start: usize, len: usize) -> Var {
    let xt = tape.value(x).clone();
    let (n, c, h, w) = xt.dims4();
    let dims = (n, c, h * w);
    let y = ok(gpu().slice_channels(&dev(&xt), dims, start, len));
    tape.push(
        "slice_channels",
        out(&[n, len, h, w], y),
        &[x],
        Box::new(move |gy, _| {
            let gy = as_dev(gy);
            let dx = ok(gpu().slice_channels_backward(&dev(&gy), dims, start, len));
            vec![Some(out(&[n, c, h, w], dx))]
        }),
    )
}

/// `x.chunk(2, dim=1)`: two slices, as the CPU op records it.
pub fn split_channels<T: Elem>(tape: &mut Tape<T>, x: Var) -> (Var, Var) {
    let c = tape.shape(x)[1];
    assert!(c.is_multiple_of(2), "split_channels: odd channel count {c}");
    let a = slice_channels(tape, x, 0, c / 2);
    let b = slice_channels(tape, x, c / 2, c / 2);
    (a, b)
}

pub fn channel_shuffle<T: Elem>(tape: &mut Tape<T>, x: Var, groups: usize) -> Var {
    let xt = tape.value(x).clone();
    let (n, c, h, w) = xt.dims4();
    let dims = (n, c, h * w);
    let y = ok(gpu().channel_shuffle(&dev(&xt), dims, groups));
    tape.push(
        "channel_shuffle",
        out(&[n, c, h, w], y),
        &[x],
        Box::new(move |gy, _| {
            let gy = as_dev(gy);
            let dx = ok(gpu().channel_shuffle_backward(&dev(&gy), dims, groups));
            vec![Some(out(&[n, c, h, w], dx))]
        }),
    )
}

// ---- the fused DFC gate (src/nn/ghost.rs) ----

/// Where the DFC gate's last BN takes its statistics from.
pub enum DfcBn<'a, T: Elem> {
    /// Train mode: batch statistics of `g` (returned, for the running-stat update).
    Batch,
    /// Eval mode: the running mean and variance (host or device tensors).
    Running(&'a Tensor<T>, &'a Tensor<T>),
}

/// GhostNet's DFC gate `out * upsample(sigmoid(BN(g)))` as one tape op (cuda/dfc.cu): `o` the
/// module output [N, C, H, W], `g` the half-resolution output of the DFC's last conv, (`gamma`,
/// `beta`) its BN. Forward: the BN's statistics (or its running ones), then the BN apply,
/// sigmoid, nearest upsample and product in one pass; backward: the fused gate backward, then
/// the BN backward. Returns the batch statistics in train mode.
pub fn dfc_gate<T: Elem>(
    tape: &mut Tape<T>,
    (o, g): (Var, Var),
    (gamma, beta): (Var, Var),
    bn: DfcBn<'_, T>,
    eps: f64,
) -> (Var, Option<BatchStats>) {
    let (ot, gt) = (as_dev(tape.value(o)), as_dev(tape.value(g)));
    let (gam, bet) = (as_dev(tape.value(gamma)), as_dev(tape.value(beta)));
    let (n, c, h, w) = ot.dims4();
    let (gn, gc, gh, gw) = gt.dims4();
    assert!(
        gn == n && gc == c && gam.shape() == [c],
        "dfc_gate: output {:?}, gate {:?}, BN weight {:?}",
        ot.shape(),
        gt.shape(),
        gam.shape()
    );
    let bdims = (n, c, gh * gw);
    let gp = gpu();
    let (saved, stats, train) = match bn {
        DfcBn::Batch => {
            let s = ok(gp.batch_norm_stats(&dev(&gt), &dev(&gam), &dev(&bet), bdims, eps));
            let var = s.var.as_ref().expect("train-mode statistics");
            let st = ok(gp.batch_stats_device(&s.mean, var, 0, c, s.count));
            (s, Some(st), true)
        }
        DfcBn::Running(rm, rv) => {
            let (rm, rv) = (as_dev(rm), as_dev(rv));
            // The eval coefficients; the applied BN (a quarter-size tensor) is not needed.
            let (_, s) = ok(gp.batch_norm_eval(
                &dev(&gt),
                &dev(&gam),
                &dev(&bet),
                &dev(&rm),
                &dev(&rv),
                bdims,
                eps,
            ));
            (s, None, false)
        }
    };
    let y = ok(gp.dfc_gate(&dev(&ot), &dev(&gt), &saved, (n, c, h, w), (gh, gw)));
    let v = tape.push(
        "dfc_gate",
        out(&[n, c, h, w], y),
        &[o, g, gamma, beta],
        Box::new(move |gy, needs| {
            let gy = as_dev(gy);
            let gp = gpu();
            let (d_out, d_a) = ok(gp.dfc_gate_backward(
                &dev(&gy),
                &dev(&ot),
                &dev(&gt),
                &saved,
                (n, c, h, w),
                (gh, gw),
            ));
            let d_out = needs[0].then(|| out(ot.shape(), d_out));
            if !(needs[1] || needs[2] || needs[3]) {
                return vec![d_out, None, None, None];
            }
            let b = ok(gp.batch_norm_backward(&d_a, &dev(&gt), &dev(&gam), &saved, bdims, train));
            vec![
                d_out,
                needs[1].then(|| out(gt.shape(), b.dx)),
                needs[2].then(|| out(&[c], b.dgamma)),
                needs[3].then(|| out(&[c], b.dbeta)),
            ]
        }),
    );
    (v, stats)
}
