//! The CUDA side of every op the GhostNet family uses: when an op's input is a device tensor,
//! the op in its own file hands over to the function of the same name here, which runs the
//! kernels of `backend::cuda` and records a backward closure that runs their backward kernels.
//! Values and gradients stay on the device; only BatchNorm's per-channel batch statistics come
//! back to the host (the module updates its running statistics there).

use crate::autograd::{Tape, Var};
use crate::backend::cuda::{global, DBuf, Gpu};
use crate::tensor::{Elem, Tensor};

pub(super) fn gpu() -> &'static Gpu {
    global().unwrap_or_else(|e| panic!("a CUDA tensor without a usable GPU: {e}"))
}

pub(super) fn ok<R>(r: anyhow::Result<R>) -> R {
    r.unwrap_or_else(|e| panic!("CUDA: {e:#}"))
}

/// The device view of a tensor's values (the tensor keeps the buffer alive).
pub(super) fn dev<T: Elem>(t: &Tensor<T>) -> crate::backend::cuda::View<'_, f32> {
    let (buf, offset) = t
        .cuda_parts()
        .unwrap_or_else(|| panic!("expected a CUDA tensor, got a host tensor {:?}", t.shape()));
    buf.view(offset, t.numel())
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

// ---- relu6 (MobileNetV2) ----

pub fn relu6<T: Elem>(tape: &mut Tape<T>, x: Var) -> Var {
    unary(tape, "relu6", x, Gpu::relu6, |g, x, _, gy| {
        g.relu6_backward(x, gy)
    })
}
