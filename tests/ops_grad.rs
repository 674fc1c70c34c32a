//! Every op in `src/ops`, in f64: forward against a naive reference written here, backward against
//! central finite differences of `L = sum(out * R)` (R fixed and random; R = 1 for scalar losses).
//! Each FD evaluation rebuilds a fresh tape. One extra test runs conv2d in f32 against f64.

use ghostv3::backend::cpu::conv::ConvGeom;
use ghostv3::ops::{self, Conv2dArgs};
use ghostv3::{Tape, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// FD step.
const H: f64 = 1e-6;
/// Gradient check: max |analytic - FD| <= GRAD_TOL * (1 + max |analytic|).
const GRAD_TOL: f64 = 1e-6;
/// Forward check: max |op - naive| <= FWD_TOL * (1 + max |naive|).
const FWD_TOL: f64 = 1e-12;

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Uniform values in [lo, hi).
fn rand_vec(rng: &mut StdRng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn rand_t(rng: &mut StdRng, shape: &[usize], lo: f64, hi: f64) -> Tensor<f64> {
    Tensor::new(shape, rand_vec(rng, shape.iter().product(), lo, hi))
}

/// Uniform values in [-m, m) whose distance to every point of `kinks` exceeds `gap`.
fn rand_away(rng: &mut StdRng, shape: &[usize], m: f64, kinks: &[f64], gap: f64) -> Tensor<f64> {
    let n = shape.iter().product();
    let d = (0..n)
        .map(|_| loop {
            let v = rng.random_range(-m..m);
            if kinks.iter().all(|k| (v - k).abs() > gap) {
                break v;
            }
        })
        .collect();
    Tensor::new(shape, d)
}

/// Asserts `got` matches `want` (same shape) to FWD_TOL relative to the scale of `want`.
fn assert_fwd(case: &str, got: &Tensor<f64>, want: &Tensor<f64>) {
    assert_eq!(got.shape(), want.shape(), "{case}: forward shape");
    let err = got.max_abs_diff(want);
    println!(
        "{case}: forward max err {err:.3e} (max |y| {:.3e})",
        want.max_abs()
    );
    assert!(
        err <= FWD_TOL * (1.0 + want.max_abs()),
        "{case}: forward error {err:e}"
    );
}

fn assert_vec_close(case: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{case}: length");
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    println!("{case}: max err {err:.3e}");
    assert!(err <= tol, "{case}: error {err:e} > {tol:e}");
}

/// One leaf of a checked graph: `grad` says whether it requires (and is checked for) a gradient.
struct Input {
    name: &'static str,
    value: Tensor<f64>,
    grad: bool,
}

fn wrt(name: &'static str, value: Tensor<f64>) -> Input {
    Input {
        name,
        value,
        grad: true,
    }
}

fn constant(name: &'static str, value: Tensor<f64>) -> Input {
    Input {
        name,
        value,
        grad: false,
    }
}

/// Runs `f` on a fresh tape whose leaves hold `vals`; returns the output value.
fn eval<F>(f: &F, inputs: &[Input], vals: &[Tensor<f64>]) -> Tensor<f64>
where
    F: Fn(&mut Tape<f64>, &[Var]) -> Var,
{
    let mut tape = Tape::new();
    let vars: Vec<Var> = inputs
        .iter()
        .zip(vals)
        .map(|(i, v)| tape.leaf(v.clone(), i.grad))
        .collect();
    let out = f(&mut tape, &vars);
    tape.value(out).clone()
}

/// Checks the gradient of every `grad` input of `f` against central differences of
/// `L = sum(out * R)` and that the other inputs get no gradient. Returns the output value and the
/// worst error relative to the tolerance scale (1 + max |grad|).
fn fd_check<F>(case: &str, inputs: &[Input], f: F) -> (Tensor<f64>, f64)
where
    F: Fn(&mut Tape<f64>, &[Var]) -> Var,
{
    let mut tape = Tape::new();
    let vars: Vec<Var> = inputs
        .iter()
        .map(|i| tape.leaf(i.value.clone(), i.grad))
        .collect();
    let out = f(&mut tape, &vars);
    let y = tape.value(out).clone();
    assert!(y.is_finite(), "{case}: non-finite output");
    let r = if y.numel() == 1 {
        Tensor::full(y.shape(), 1.0)
    } else {
        // Away from zero so every output element matters.
        rand_away(
            &mut rng(0x5eed ^ y.numel() as u64),
            y.shape(),
            1.0,
            &[0.0],
            0.1,
        )
    };
    let grads = tape.backward_with(out, r.clone());
    let mut worst = 0.0f64;
    let mut vals: Vec<Tensor<f64>> = inputs.iter().map(|i| i.value.clone()).collect();
    for (k, input) in inputs.iter().enumerate() {
        let g = grads.get(vars[k]);
        if !input.grad {
            assert!(
                g.is_none(),
                "{case}/{}: constant input got a gradient",
                input.name
            );
            continue;
        }
        let g = g.unwrap_or_else(|| panic!("{case}/{}: no gradient", input.name));
        assert_eq!(
            g.shape(),
            input.value.shape(),
            "{case}/{}: gradient shape",
            input.name
        );
        let mut err = 0.0f64;
        for j in 0..input.value.numel() {
            let x0 = input.value.data()[j];
            vals[k].data_mut()[j] = x0 + H;
            let yp = eval(&f, inputs, &vals);
            vals[k].data_mut()[j] = x0 - H;
            let ym = eval(&f, inputs, &vals);
            vals[k].data_mut()[j] = x0;
            // sum((y+ - y-) * R): differencing before summing keeps the roundoff small.
            let fd = yp
                .data()
                .iter()
                .zip(ym.data())
                .zip(r.data())
                .map(|((a, b), r)| (a - b) * r)
                .sum::<f64>()
                / (2.0 * H);
            err = err.max((g.data()[j] - fd).abs());
        }
        let scale = 1.0 + g.max_abs();
        println!(
            "{case}/{}: grad max err {err:.3e} (max |grad| {:.3e})",
            input.name,
            g.max_abs()
        );
        assert!(
            err <= GRAD_TOL * scale,
            "{case}/{}: gradient error {err:e} (max |grad| {:e})",
            input.name,
            g.max_abs()
        );
        worst = worst.max(err / scale);
    }
    (y, worst)
}

// ---------------------------------------------------------------------------------------------
// conv2d

/// Direct 7-loop convolution.
fn naive_conv(
    x: &Tensor<f64>,
    w: &Tensor<f64>,
    b: Option<&Tensor<f64>>,
    a: Conv2dArgs,
) -> Tensor<f64> {
    let (n, cin, h, wd) = x.dims4();
    let (cout, cig, kh, kw) = w.dims4();
    let ((sh, sw), (ph, pw)) = (a.stride, a.padding);
    let ho = (h + 2 * ph - kh) / sh + 1;
    let wo = (wd + 2 * pw - kw) / sw + 1;
    let cog = cout / a.groups;
    let (xd, wt) = (x.data(), w.data());
    let mut y = vec![0.0; n * cout * ho * wo];
    for i in 0..n {
        for co in 0..cout {
            let grp = co / cog;
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut s = b.map_or(0.0, |b| b.data()[co]);
                    for ci in 0..cig {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * sh + ky) as isize - ph as isize;
                                let ix = (ox * sw + kx) as isize - pw as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xi = ((i * cin + grp * cig + ci) * h + iy as usize) * wd
                                    + ix as usize;
                                s += xd[xi] * wt[((co * cig + ci) * kh + ky) * kw + kx];
                            }
                        }
                    }
                    y[((i * cout + co) * ho + oy) * wo + ox] = s;
                }
            }
        }
    }
    Tensor::new(&[n, cout, ho, wo], y)
}

#[derive(Clone, Copy, Debug)]
struct ConvCase {
    /// [N, C_in, H, W]
    x: [usize; 4],
    cout: usize,
    k: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    groups: usize,
    bias: bool,
    /// Which of (x, w, b) require a gradient.
    need: (bool, bool, bool),
}

/// A case with "same" padding k//2 per axis, `co` output channels, square stride `s`, `g` groups,
/// all gradients.
fn same(x: [usize; 4], co: usize, k: (usize, usize), s: usize, g: usize, bias: bool) -> ConvCase {
    ConvCase {
        x,
        cout: co,
        k,
        stride: (s, s),
        padding: (k.0 / 2, k.1 / 2),
        groups: g,
        bias,
        need: (true, true, true),
    }
}

/// `same(..)` with zero padding.
fn valid(x: [usize; 4], co: usize, k: (usize, usize), s: usize, g: usize, bias: bool) -> ConvCase {
    ConvCase {
        padding: (0, 0),
        ..same(x, co, k, s, g, bias)
    }
}

impl ConvCase {
    fn args(&self) -> Conv2dArgs {
        Conv2dArgs {
            stride: self.stride,
            padding: self.padding,
            groups: self.groups,
        }
    }

    fn w_shape(&self) -> [usize; 4] {
        [self.cout, self.x[1] / self.groups, self.k.0, self.k.1]
    }

    fn geom(&self) -> ConvGeom {
        ConvGeom::new(
            &self.x,
            &self.w_shape(),
            self.stride,
            self.padding,
            self.groups,
        )
        .unwrap()
    }

    /// Forward against `naive_conv`, MACs count, and FD gradients. Returns the worst relative error.
    fn check(&self, seed: u64) -> f64 {
        let name = format!(
            "conv x{:?} cout{} k{}x{} s{:?} p{:?} g{} bias={} need={:?}",
            self.x,
            self.cout,
            self.k.0,
            self.k.1,
            self.stride,
            self.padding,
            self.groups,
            self.bias,
            self.need
        );
        let mut r = rng(seed);
        let x = rand_t(&mut r, &self.x, -1.0, 1.0);
        let w = rand_t(&mut r, &self.w_shape(), -1.0, 1.0);
        let b = rand_t(&mut r, &[self.cout], -1.0, 1.0);
        let want = naive_conv(&x, &w, self.bias.then_some(&b), self.args());

        let mut tape = Tape::<f64>::new();
        let (xv, wv) = (tape.leaf(x.clone(), true), tape.leaf(w.clone(), true));
        let bv = self.bias.then(|| tape.leaf(b.clone(), true));
        let y = ops::conv2d(&mut tape, xv, wv, bv, self.args());
        assert_fwd(&name, tape.value(y), &want);
        assert_eq!(tape.macs(), self.geom().macs(), "{name}: macs");
        let (ho, wo) = (want.shape()[2], want.shape()[3]);
        let cig = self.x[1] / self.groups;
        let macs = self.x[0] * self.cout * ho * wo * cig * self.k.0 * self.k.1;
        assert_eq!(tape.macs(), macs as u64, "{name}: macs formula");

        let mut inputs = vec![
            Input {
                name: "x",
                value: x,
                grad: self.need.0,
            },
            Input {
                name: "w",
                value: w,
                grad: self.need.1,
            },
        ];
        if self.bias {
            inputs.push(Input {
                name: "b",
                value: b,
                grad: self.need.2,
            });
        }
        let args = self.args();
        let has_bias = self.bias;
        fd_check(&name, &inputs, move |t, v| {
            ops::conv2d(t, v[0], v[1], has_bias.then(|| v[2]), args)
        })
        .1
    }
}

fn run_conv_cases(cases: &[ConvCase], seed: u64) {
    let mut worst = 0.0f64;
    for (i, c) in cases.iter().enumerate() {
        worst = worst.max(c.check(seed + i as u64));
    }
    println!(
        "worst relative gradient error over {} conv cases: {worst:.3e}",
        cases.len()
    );
}

/// The hand-written conv cases, by the test that runs them: one code path each (`run_path`),
/// the bases of `conv2d_partial_gradients`, the cases of `conv2d_f32_matches_f64`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Set {
    Dense,
    Pointwise,
    Grouped,
    Depthwise,
    Partial,
    F32,
}
use Set::*;

impl Set {
    /// Whether `g` takes this set's code path: the im2col GEMM (dense and grouped), the
    /// pointwise GEMM or the depth-wise loop.
    fn takes_path(self, g: &ConvGeom) -> bool {
        match self {
            Dense | Grouped => !g.is_depthwise() && !g.is_pointwise(),
            Pointwise => g.is_pointwise() && !g.is_depthwise(),
            Depthwise => g.is_depthwise(),
            Partial | F32 => unreachable!("{self:?} is not a code path"),
        }
    }
}

impl ConvCase {
    fn with_padding(self, padding: (usize, usize)) -> Self {
        ConvCase { padding, ..self }
    }

    fn with_stride_padding(self, stride: (usize, usize), padding: (usize, usize)) -> Self {
        ConvCase {
            stride,
            padding,
            ..self
        }
    }
}

/// The cases of one set, in order.
fn conv_cases(set: Set) -> Vec<ConvCase> {
    #[rustfmt::skip]
    let all = [
        (Partial, same([3, 4, 7, 9], 6, (3, 3), 1, 2, true)), // grouped im2col
        (Partial, valid([3, 4, 5, 5], 5, (1, 1), 1, 1, true)), // pointwise
        (Partial, same([3, 4, 11, 6], 4, (3, 3), 2, 4, true)), // depth-wise
        (F32, same([3, 4, 7, 9], 6, (3, 3), 1, 1, true)),
        (F32, valid([3, 8, 11, 6], 16, (1, 1), 1, 1, true)),
        (F32, same([3, 8, 11, 6], 8, (5, 5), 2, 8, true)),
        (Dense, same([1, 3, 7, 9], 4, (3, 3), 1, 1, true)),
        (Dense, same([3, 2, 11, 6], 3, (3, 3), 2, 1, false)),
        (Dense, valid([2, 3, 5, 5], 2, (3, 3), 1, 1, true)),
        (Dense, valid([1, 2, 8, 6], 3, (3, 3), 2, 1, true)),
        (Dense, same([1, 2, 7, 9], 3, (5, 5), 1, 1, true)),
        (Dense, same([3, 2, 5, 5], 2, (5, 5), 2, 1, false)),
        (Dense, valid([1, 2, 11, 6], 2, (5, 5), 2, 1, true)),
        (Dense, same([1, 3, 7, 9], 2, (1, 5), 1, 1, true)),
        (Dense, same([3, 2, 11, 6], 3, (1, 5), 2, 1, false)),
        (Dense, same([1, 3, 7, 9], 2, (5, 1), 1, 1, false)),
        (Dense, same([3, 2, 11, 6], 3, (5, 1), 2, 1, true)),
        (Dense, valid([1, 2, 7, 9], 3, (1, 5), 1, 1, true)),
        (Dense, valid([1, 2, 7, 9], 3, (5, 1), 2, 1, true)),
        // 1x1 through im2col (stride 2 or padding make it not pointwise).
        (Dense, same([3, 3, 7, 9], 5, (1, 1), 2, 1, true)),
        (Dense, valid([1, 3, 5, 5], 2, (1, 1), 1, 1, true).with_padding((1, 1))),
        // A single channel: groups == C_in == C_out == 1 is dense, not depth-wise.
        (Dense, same([2, 1, 7, 9], 1, (3, 3), 1, 1, true)),
        // Asymmetric stride and padding.
        (Dense, valid([2, 3, 7, 9], 2, (3, 3), 1, 1, true).with_stride_padding((2, 1), (1, 0))),
        (Dense, valid([1, 2, 5, 11], 3, (3, 5), 1, 1, true).with_stride_padding((1, 2), (0, 2))),
        (Pointwise, valid([3, 4, 7, 9], 5, (1, 1), 1, 1, true)),
        (Pointwise, valid([1, 3, 11, 6], 2, (1, 1), 1, 1, false)),
        (Pointwise, valid([3, 4, 5, 5], 6, (1, 1), 1, 2, true)),
        (Pointwise, valid([1, 6, 7, 9], 3, (1, 1), 1, 3, false)),
        (Grouped, same([1, 4, 7, 9], 6, (3, 3), 1, 2, true)),
        (Grouped, same([3, 4, 11, 6], 6, (3, 3), 2, 2, false)),
        (Grouped, valid([1, 4, 5, 5], 6, (3, 3), 1, 2, true)),
        (Grouped, same([1, 6, 7, 9], 3, (5, 5), 2, 3, true)),
        (Grouped, same([1, 4, 7, 9], 6, (1, 5), 1, 2, true)),
        (Grouped, same([3, 4, 11, 6], 2, (5, 1), 2, 2, true)),
        // groups == C_in but C_out = 2 C_in (channel multiplier): grouped path, not depth-wise.
        (Grouped, same([2, 3, 7, 9], 6, (3, 3), 1, 3, true)),
        (Depthwise, same([1, 3, 7, 9], 3, (3, 3), 1, 3, true)),
        (Depthwise, same([3, 4, 11, 6], 4, (3, 3), 2, 4, false)),
        (Depthwise, same([1, 5, 7, 9], 5, (5, 5), 1, 5, false)),
        (Depthwise, same([3, 2, 5, 5], 2, (5, 5), 2, 2, true)),
        (Depthwise, same([1, 3, 7, 9], 3, (1, 5), 1, 3, true)),
        (Depthwise, same([3, 3, 11, 6], 3, (5, 1), 2, 3, true)),
        (Depthwise, same([1, 3, 7, 9], 3, (5, 1), 1, 3, true)),
        (Depthwise, same([1, 3, 11, 6], 3, (1, 5), 2, 3, false)),
        (Depthwise, valid([3, 2, 7, 9], 2, (3, 3), 1, 2, true)),
        (Depthwise, valid([1, 3, 11, 6], 3, (5, 5), 2, 3, true)),
        // 1x1 depth-wise (stride 1 and 2) takes the depth-wise loop, not the pointwise GEMM.
        (Depthwise, valid([3, 4, 5, 5], 4, (1, 1), 1, 4, true)),
        (Depthwise, same([1, 4, 7, 9], 4, (1, 1), 2, 4, true)),
        // Feature maps smaller than the padding (GhostNet's last stage at 64x64 inputs): some
        // kernel taps see no input column at all.
        (Depthwise, same([2, 3, 1, 1], 3, (5, 5), 1, 3, true)),
        (Depthwise, same([2, 3, 2, 2], 3, (5, 5), 2, 3, true)),
        (Depthwise, same([1, 3, 1, 3], 3, (1, 5), 1, 3, true)),
        (Depthwise, same([1, 3, 2, 1], 3, (5, 1), 1, 3, true)),
        (Depthwise, valid([2, 3, 7, 9], 3, (3, 3), 1, 3, true).with_stride_padding((2, 1), (0, 1))),
    ];
    all.into_iter()
        .filter(|&(s, _)| s == set)
        .map(|(_, c)| c)
        .collect()
}

/// The cases of one code path: each takes it, and passes `check` (seeds from `seed` on).
fn run_path(set: Set, seed: u64) {
    let cases = conv_cases(set);
    for c in &cases {
        assert!(set.takes_path(&c.geom()), "{c:?}");
    }
    run_conv_cases(&cases, seed);
}

#[test]
fn conv2d_dense() {
    run_path(Dense, 100);
}

#[test]
fn conv2d_pointwise_fast_path() {
    run_path(Pointwise, 200);
}

#[test]
fn conv2d_grouped() {
    run_path(Grouped, 300);
}

#[test]
fn conv2d_depthwise_fast_path() {
    run_path(Depthwise, 400);
}

/// Only some inputs require a gradient: each backward branch (dx only, dW only, db only) runs.
#[test]
fn conv2d_partial_gradients() {
    let mut cases = Vec::new();
    for b in conv_cases(Partial) {
        for need in [
            (true, false, false),
            (false, true, false),
            (false, false, true),
            (false, true, true),
        ] {
            cases.push(ConvCase { need, ..b });
        }
    }
    run_conv_cases(&cases, 500);
}

/// Random geometries from a seeded rng.
#[test]
fn conv2d_random_geometries() {
    let mut r = rng(600);
    let mut cases = Vec::new();
    while cases.len() < 10 {
        let (kh, kw) = (r.random_range(1..6usize), r.random_range(1..6usize));
        let stride = (r.random_range(1..3usize), r.random_range(1..3usize));
        let padding = (r.random_range(0..=kh / 2), r.random_range(0..=kw / 2));
        let (h, w) = (r.random_range(4..12usize), r.random_range(4..12usize));
        let groups = [1usize, 2, 3][r.random_range(0..3usize)];
        let cin = groups * r.random_range(1..3usize);
        let cout = if r.random::<f64>() < 0.3 {
            cin
        } else {
            groups * r.random_range(1..3usize)
        };
        if h + 2 * padding.0 < kh || w + 2 * padding.1 < kw {
            continue;
        }
        let n = r.random_range(1..4usize);
        let c = ConvCase {
            x: [n, cin, h, w],
            cout,
            k: (kh, kw),
            stride,
            padding,
            groups,
            bias: r.random::<f64>() < 0.5,
            need: (true, true, true),
        };
        cases.push(c);
    }
    run_conv_cases(&cases, 700);
}

/// The f32 path agrees with f64 on dense, pointwise and depth-wise convs (forward and gradients).
#[test]
fn conv2d_f32_matches_f64() {
    for (i, c) in conv_cases(F32).iter().enumerate() {
        let mut r = rng(800 + i as u64);
        let x = rand_t(&mut r, &c.x, -1.0, 1.0);
        let w = rand_t(&mut r, &c.w_shape(), -1.0, 1.0);
        let b = rand_t(&mut r, &[c.cout], -1.0, 1.0);
        let g64 = conv_with_grads::<f64>(&x, &w, &b, c.args(), 7);
        let g32 = conv_with_grads::<f32>(&x.cast(), &w.cast(), &b.cast(), c.args(), 7);
        for (name, a, e) in ["y", "dx", "dw", "db"]
            .iter()
            .zip(&g32)
            .zip(&g64)
            .map(|((n, a), e)| (n, a, e))
        {
            let rel = a.cast::<f64>().max_abs_diff(e) / e.max_abs();
            println!("f32 vs f64 {c:?} {name}: relative error {rel:.3e}");
            assert!(rel < 2e-5, "f32 {name} differs from f64 by {rel:e}");
        }
    }
}

/// Output, dx, dw, db of a conv seeded with a random output gradient (generated in f64).
fn conv_with_grads<T: ghostv3::Elem>(
    x: &Tensor<T>,
    w: &Tensor<T>,
    b: &Tensor<T>,
    args: Conv2dArgs,
    seed: u64,
) -> Vec<Tensor<T>> {
    let mut tape = Tape::<T>::new();
    let (xv, wv, bv) = (
        tape.leaf(x.clone(), true),
        tape.leaf(w.clone(), true),
        tape.leaf(b.clone(), true),
    );
    let y = ops::conv2d(&mut tape, xv, wv, Some(bv), args);
    let yt = tape.value(y).clone();
    let gy = rand_t(&mut rng(seed), yt.shape(), -1.0, 1.0).cast::<T>();
    let mut g = tape.backward_with(y, gy);
    vec![
        yt,
        g.take(xv).unwrap(),
        g.take(wv).unwrap(),
        g.take(bv).unwrap(),
    ]
}

// ---------------------------------------------------------------------------------------------
// batch norm

const EPS: f64 = 1e-5;

/// Per-channel mean and biased variance over every axis but 1, and the count.
fn naive_stats(x: &Tensor<f64>) -> (Vec<f64>, Vec<f64>, usize) {
    let s = x.shape();
    let (n, c, hw) = (s[0], s[1], s[2..].iter().product::<usize>());
    let m = n * hw;
    let at = |i: usize, ch: usize, p: usize| x.data()[(i * c + ch) * hw + p];
    let mut mean = vec![0.0; c];
    let mut var = vec![0.0; c];
    for ch in 0..c {
        let mut s = 0.0;
        for i in 0..n {
            for p in 0..hw {
                s += at(i, ch, p);
            }
        }
        mean[ch] = s / m as f64;
        let mut q = 0.0;
        for i in 0..n {
            for p in 0..hw {
                q += (at(i, ch, p) - mean[ch]).powi(2);
            }
        }
        var[ch] = q / m as f64;
    }
    (mean, var, m)
}

fn naive_bn(x: &Tensor<f64>, g: &[f64], b: &[f64], mean: &[f64], var: &[f64]) -> Tensor<f64> {
    let s = x.shape();
    let (c, hw) = (s[1], s[2..].iter().product::<usize>());
    let y = x
        .data()
        .iter()
        .enumerate()
        .map(|(idx, &v)| {
            let ch = idx / hw % c;
            (v - mean[ch]) / (var[ch] + EPS).sqrt() * g[ch] + b[ch]
        })
        .collect();
    Tensor::new(s, y)
}

#[test]
fn batch_norm_train_forward_stats_and_grads() {
    for (i, shape) in [
        vec![3usize, 4, 5, 7],
        vec![1, 3, 7, 9],
        vec![2, 5, 3, 1],
        vec![7, 3],
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("batch_norm_train {shape:?}");
        let mut r = rng(1000 + i as u64);
        let c = shape[1];
        // Per-channel offsets so the means are not all near zero.
        let mut x = rand_t(&mut r, &shape, -1.0, 1.0);
        let offs = rand_vec(&mut r, c, -2.0, 2.0);
        let hw: usize = shape[2..].iter().product();
        x.data_mut()
            .iter_mut()
            .enumerate()
            .for_each(|(j, v)| *v = *v * (1.0 + (j / hw % c) as f64) + offs[j / hw % c]);
        let gamma = rand_t(&mut r, &[c], 0.5, 1.5);
        let beta = rand_t(&mut r, &[c], -1.0, 1.0);

        let (mean, var, m) = naive_stats(&x);
        let want = naive_bn(&x, gamma.data(), beta.data(), &mean, &var);
        let mut tape = Tape::<f64>::new();
        let (xv, gv, bv) = (
            tape.leaf(x.clone(), true),
            tape.leaf(gamma.clone(), true),
            tape.leaf(beta.clone(), true),
        );
        let (y, stats) = ops::batch_norm_train(&mut tape, xv, gv, bv, EPS);
        assert_fwd(&name, tape.value(y), &want);
        assert_eq!(stats.count, m, "{name}: count");
        assert_vec_close(&format!("{name} mean"), &stats.mean(), &mean, 1e-13);
        assert_vec_close(&format!("{name} var"), &stats.var(), &var, 1e-13);
        // Unbiased variance straight from the definition: sum (x - mean)^2 / (m - 1).
        let unbiased: Vec<f64> = var
            .iter()
            .map(|v| v * m as f64 / (m as f64 - 1.0))
            .collect();
        assert_vec_close(
            &format!("{name} unbiased_var"),
            &stats.unbiased_var(),
            &unbiased,
            1e-13,
        );

        let bn = |t: &mut Tape<f64>, v: &[Var]| ops::batch_norm_train(t, v[0], v[1], v[2], EPS).0;
        let inputs = [wrt("x", x), wrt("gamma", gamma), wrt("beta", beta)];
        fd_check(&name, &inputs, bn);
        // Only the affine parameters, then only x: (x, gamma, beta) require a gradient or not.
        for (what, need) in [
            ("params only", [false, true, true]),
            ("x only", [true, false, false]),
        ] {
            let some: Vec<Input> = inputs
                .iter()
                .zip(need)
                .map(|(i, grad)| Input {
                    name: i.name,
                    value: i.value.clone(),
                    grad,
                })
                .collect();
            fd_check(&format!("{name} {what}"), &some, bn);
        }
    }
}

#[test]
fn batch_norm_unbiased_var_of_one_sample() {
    let stats = ops::BatchStats::host(vec![0.5], vec![0.25], 1);
    assert_eq!(stats.unbiased_var(), vec![0.25]);
}

#[test]
fn batch_norm_eval_forward_and_grads() {
    for (i, shape) in [vec![3usize, 4, 5, 7], vec![2, 3, 11, 6], vec![5, 3]]
        .into_iter()
        .enumerate()
    {
        let name = format!("batch_norm_eval {shape:?}");
        let mut r = rng(1100 + i as u64);
        let c = shape[1];
        let x = rand_t(&mut r, &shape, -2.0, 2.0);
        let gamma = rand_t(&mut r, &[c], 0.5, 1.5);
        let beta = rand_t(&mut r, &[c], -1.0, 1.0);
        let rm = rand_vec(&mut r, c, -0.5, 0.5);
        let rv = rand_vec(&mut r, c, 0.3, 2.0);
        let want = naive_bn(&x, gamma.data(), beta.data(), &rm, &rv);
        let (rm, rv) = (Tensor::new(&[c], rm), Tensor::new(&[c], rv));
        let inputs = [wrt("x", x), wrt("gamma", gamma), wrt("beta", beta)];
        let f =
            |t: &mut Tape<f64>, v: &[Var]| ops::batch_norm_eval(t, v[0], v[1], v[2], &rm, &rv, EPS);
        let (y, _) = fd_check(&name, &inputs, f);
        assert_fwd(&name, &y, &want);
    }
}

// ---------------------------------------------------------------------------------------------
// activations

fn check_unary(
    name: &str,
    x: Tensor<f64>,
    op: fn(&mut Tape<f64>, Var) -> Var,
    reference: fn(f64) -> f64,
) {
    let want = x.map(reference);
    let (y, _) = fd_check(name, &[wrt("x", x)], |t, v| op(t, v[0]));
    assert_fwd(name, &y, &want);
}

#[test]
fn activations() {
    let shape = [2, 3, 7, 9];
    let mut r = rng(1200);
    let x = rand_away(&mut r, &shape, 4.0, &[0.0], 1e-3);
    assert!(x.data().iter().any(|&v| v < 0.0) && x.data().iter().any(|&v| v > 0.0));
    check_unary("relu", x, ops::relu, |v| if v > 0.0 { v } else { 0.0 });

    let x = rand_t(&mut r, &shape, -8.0, 8.0);
    check_unary("sigmoid", x, ops::sigmoid, |v| 1.0 / (1.0 + (-v).exp()));

    let x = rand_away(&mut r, &shape, 6.0, &[-3.0, 3.0], 1e-3);
    assert!(x.data().iter().any(|&v| v < -3.0) && x.data().iter().any(|&v| v > 3.0));
    assert!(x.data().iter().any(|&v| v.abs() < 3.0));
    let hs = |v: f64| {
        if v <= -3.0 {
            0.0
        } else if v >= 3.0 {
            1.0
        } else {
            v / 6.0 + 0.5
        }
    };
    check_unary("hard_sigmoid", x, ops::hard_sigmoid, hs);
}

// ---------------------------------------------------------------------------------------------
// elementwise, reshape, concat

#[test]
fn add_and_mul() {
    let mut r = rng(1300);
    let shape = [3, 2, 5, 7];
    let (a, b) = (
        rand_t(&mut r, &shape, -2.0, 2.0),
        rand_t(&mut r, &shape, -2.0, 2.0),
    );
    let want = a.add(&b);
    let (y, _) = fd_check(
        "add",
        &[wrt("a", a.clone()), wrt("b", b.clone())],
        |t, v| ops::add(t, v[0], v[1]),
    );
    assert_fwd("add", &y, &want);

    let want = Tensor::new(
        &shape,
        a.data().iter().zip(b.data()).map(|(p, q)| p * q).collect(),
    );
    let (y, _) = fd_check(
        "mul",
        &[wrt("a", a.clone()), wrt("b", b.clone())],
        |t, v| ops::mul(t, v[0], v[1]),
    );
    assert_fwd("mul", &y, &want);
    fd_check(
        "mul (b constant)",
        &[wrt("a", a.clone()), constant("b", b)],
        |t, v| ops::mul(t, v[0], v[1]),
    );

    // One value used twice: the tape accumulates both contributions.
    let want = a.map(|v| v * v);
    let (y, _) = fd_check("mul(a, a)", &[wrt("a", a.clone())], |t, v| {
        ops::mul(t, v[0], v[0])
    });
    assert_fwd("mul(a, a)", &y, &want);
    let want = a.map(|v| 2.0 * v * v + v);
    let (y, _) = fd_check("add(mul(a, add(a, a)), a)", &[wrt("a", a)], |t, v| {
        let s = ops::add(t, v[0], v[0]);
        let p = ops::mul(t, v[0], s);
        ops::add(t, p, v[0])
    });
    assert_fwd("add(mul(a, add(a, a)), a)", &y, &want);
}

#[test]
fn mul_channel_se_scale() {
    let mut r = rng(1400);
    for (i, (n, c, h, w)) in [(3usize, 4usize, 5usize, 7usize), (1, 5, 7, 9), (2, 3, 1, 1)]
        .into_iter()
        .enumerate()
    {
        let name = format!("mul_channel [{n},{c},{h},{w}]");
        let x = rand_t(&mut r, &[n, c, h, w], -2.0, 2.0);
        let s = rand_t(&mut r, &[n, c, 1, 1], 0.05, 1.0);
        let mut want = x.clone();
        for (j, v) in want.data_mut().iter_mut().enumerate() {
            *v *= s.data()[j / (h * w)];
        }
        let (y, _) = fd_check(
            &name,
            &[wrt("x", x.clone()), wrt("scale", s.clone())],
            |t, v| ops::mul_channel(t, v[0], v[1]),
        );
        assert_fwd(&name, &y, &want);
        if i == 0 {
            fd_check(
                &format!("{name} scale only"),
                &[constant("x", x.clone()), wrt("scale", s.clone())],
                |t, v| ops::mul_channel(t, v[0], v[1]),
            );
            fd_check(
                &format!("{name} x only"),
                &[wrt("x", x), constant("scale", s)],
                |t, v| ops::mul_channel(t, v[0], v[1]),
            );
        }
    }
    // The SE gate as used: x * hard_sigmoid(scale) with the gradient reaching both.
    let x = rand_t(&mut r, &[2, 3, 5, 7], -2.0, 2.0);
    let s = rand_away(&mut r, &[2, 3, 1, 1], 5.0, &[-3.0, 3.0], 1e-2);
    fd_check(
        "x * hard_sigmoid(s)",
        &[wrt("x", x), wrt("s", s)],
        |t, v| {
            let g = ops::hard_sigmoid(t, v[1]);
            ops::mul_channel(t, v[0], g)
        },
    );
}

#[test]
fn reshape() {
    let mut r = rng(1500);
    let x = rand_t(&mut r, &[3, 5, 1, 1], -1.0, 1.0);
    let (y, _) = fd_check("reshape flatten", &[wrt("x", x.clone())], |t, v| {
        ops::reshape(t, v[0], &[3, 5])
    });
    assert_eq!(y.shape(), [3, 5]);
    assert_eq!(y.data(), x.data());
    let x = rand_t(&mut r, &[2, 6, 5], -1.0, 1.0);
    // Followed by a mul so the gradient passing through the reshape is not the seed itself.
    let k = rand_t(&mut r, &[3, 4, 5], -1.0, 1.0);
    let (y, _) = fd_check(
        "reshape then mul",
        &[wrt("x", x.clone()), wrt("k", k.clone())],
        |t, v| {
            let y = ops::reshape(t, v[0], &[3, 4, 5]);
            ops::mul(t, y, v[1])
        },
    );
    assert_eq!(y.shape(), [3, 4, 5]);
    let want = Tensor::new(
        &[3, 4, 5],
        x.data().iter().zip(k.data()).map(|(a, b)| a * b).collect(),
    );
    assert_fwd("reshape then mul", &y, &want);
}

#[test]
fn concat_channels() {
    let mut r = rng(1600);
    for (n, ca, cb, h, w) in [
        (3usize, 2usize, 3usize, 5usize, 7usize),
        (1, 1, 4, 7, 9),
        (2, 3, 3, 1, 1),
    ] {
        let name = format!("concat_channels {n} x ({ca} + {cb}) x {h} x {w}");
        let a = rand_t(&mut r, &[n, ca, h, w], -1.0, 1.0);
        let b = rand_t(&mut r, &[n, cb, h, w], -1.0, 1.0);
        let mut want = Vec::new();
        for i in 0..n {
            for c in 0..ca + cb {
                for p in 0..h * w {
                    want.push(if c < ca {
                        a.data()[(i * ca + c) * h * w + p]
                    } else {
                        b.data()[(i * cb + c - ca) * h * w + p]
                    });
                }
            }
        }
        let want = Tensor::new(&[n, ca + cb, h, w], want);
        let (y, _) = fd_check(
            &name,
            &[wrt("a", a.clone()), wrt("b", b.clone())],
            |t, v| ops::concat_channels(t, v[0], v[1]),
        );
        assert_fwd(&name, &y, &want);
        fd_check(
            &format!("{name} (b constant)"),
            &[wrt("a", a), constant("b", b)],
            |t, v| ops::concat_channels(t, v[0], v[1]),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// pooling and upsampling

/// A one-input pooling op on random [n, c, h, w] inputs drawn in turn from `rng(seed)`: forward
/// against `naive`, FD gradient.
fn check_pool(
    op: &str,
    seed: u64,
    shapes: &[[usize; 4]],
    f: fn(&mut Tape<f64>, Var) -> Var,
    naive: impl Fn(&Tensor<f64>) -> Tensor<f64>,
) {
    let mut r = rng(seed);
    for s in shapes {
        let name = format!("{op} [{},{},{},{}]", s[0], s[1], s[2], s[3]);
        let x = rand_t(&mut r, s, -1.0, 1.0);
        let want = naive(&x);
        let (y, _) = fd_check(&name, &[wrt("x", x)], |t, v| f(t, v[0]));
        assert_fwd(&name, &y, &want);
    }
}

#[test]
fn avg_pool2x2() {
    let shapes = [[2, 3, 7, 9], [1, 2, 6, 8], [3, 2, 2, 3], [1, 1, 11, 6]];
    check_pool("avg_pool2x2", 1700, &shapes, ops::avg_pool2x2, |x| {
        let (n, c, h, w) = x.dims4();
        let (ho, wo) = (h / 2, w / 2);
        let mut want = vec![0.0; n * c * ho * wo];
        for nc in 0..n * c {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut s = 0.0;
                    for dy in 0..2 {
                        for dx in 0..2 {
                            s += x.data()[(nc * h + 2 * oy + dy) * w + 2 * ox + dx];
                        }
                    }
                    want[(nc * ho + oy) * wo + ox] = s / 4.0;
                }
            }
        }
        Tensor::new(&[n, c, ho, wo], want)
    });
}

#[test]
fn avg_pool2x2_odd_shape() {
    let mut t = Tape::<f64>::new();
    let x = t.leaf(Tensor::full(&[1, 1, 7, 9], 1.0), true);
    let y = ops::avg_pool2x2(&mut t, x);
    assert_eq!(t.shape(y), [1, 1, 3, 4]);
}

#[test]
fn global_avg_pool() {
    let shapes = [[3, 4, 5, 7], [1, 3, 1, 1], [2, 2, 11, 6]];
    check_pool(
        "global_avg_pool",
        1800,
        &shapes,
        ops::global_avg_pool,
        |x| {
            let (n, c, h, w) = x.dims4();
            Tensor::new(
                &[n, c, 1, 1],
                (0..n * c)
                    .map(|nc| {
                        x.data()[nc * h * w..(nc + 1) * h * w].iter().sum::<f64>() / (h * w) as f64
                    })
                    .collect(),
            )
        },
    );
}

/// PyTorch's `nearest_idx` (aten/src/ATen/native/UpSample.h) transcribed: identity for equal sizes,
/// `d >> 1` for 2x, else `min(floorf(d * (float)in / out), in - 1)` in f32.
fn torch_nearest_idx(d: usize, input: usize, output: usize) -> usize {
    if output == input {
        d
    } else if output == 2 * input {
        d >> 1
    } else {
        let scale = input as f32 / output as f32;
        ((d as f32 * scale).floor() as usize).min(input - 1)
    }
}

#[test]
fn nearest_indices_follow_pytorch_legacy_rule() {
    use ghostv3::ops::pool::nearest_indices;
    assert_eq!(nearest_indices(3, 7), [0, 0, 0, 1, 1, 2, 2]);
    assert_eq!(
        nearest_indices(28, 56),
        (0..56).map(|d| d / 2).collect::<Vec<_>>()
    );
    assert_eq!(nearest_indices(5, 12), [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]);
    assert_eq!(nearest_indices(1, 4), [0, 0, 0, 0]);
    assert_eq!(nearest_indices(7, 7), (0..7).collect::<Vec<_>>());
    assert_eq!(nearest_indices(7, 3), [0, 2, 4]);
    assert_eq!(nearest_indices(14, 7), [0, 2, 4, 6, 8, 10, 12]);
    // The f32 scale makes the legacy rule differ from exact floor(d * in / out): 14 -> 46 has
    // 23 * 14 / 46 = 7 exactly, but 23 * 0.30434781f = 6.9999995f, so PyTorch reads row 6.
    assert_eq!(nearest_indices(14, 46)[23], 6);
    for i in 1..40 {
        for o in 1..120 {
            let want: Vec<usize> = (0..o).map(|d| torch_nearest_idx(d, i, o)).collect();
            assert_eq!(nearest_indices(i, o), want, "{i} -> {o}");
            // Never more than one row below the exact floor, never above it.
            for (d, &s) in want.iter().enumerate() {
                let exact = (d * i / o).min(i - 1);
                assert!(
                    s == exact || (s + 1 == exact && d * i % o == 0),
                    "{i} -> {o} at {d}"
                );
            }
        }
    }
}

#[test]
fn upsample_nearest() {
    let mut r = rng(1900);
    for (n, c, h, w, oh, ow) in [
        (2usize, 3usize, 3usize, 3usize, 7usize, 7usize),
        (1, 2, 28, 28, 56, 56),
        (2, 2, 5, 5, 12, 12),
        (1, 2, 5, 3, 12, 7),
        (1, 2, 7, 9, 3, 4),
        (1, 1, 14, 3, 46, 5),
    ] {
        let name = format!("upsample_nearest [{n},{c},{h},{w}] -> {oh}x{ow}");
        let x = rand_t(&mut r, &[n, c, h, w], -1.0, 1.0);
        let mut want = vec![0.0; n * c * oh * ow];
        for nc in 0..n * c {
            for oy in 0..oh {
                for ox in 0..ow {
                    let (sy, sx) = (torch_nearest_idx(oy, h, oh), torch_nearest_idx(ox, w, ow));
                    want[(nc * oh + oy) * ow + ox] = x.data()[(nc * h + sy) * w + sx];
                }
            }
        }
        let want = Tensor::new(&[n, c, oh, ow], want);
        let (y, _) = fd_check(&name, &[wrt("x", x)], |t, v| {
            ops::upsample_nearest(t, v[0], oh, ow)
        });
        assert_fwd(&name, &y, &want);
    }
    // 3 -> 7 maps rows to 0,0,0,1,1,2,2.
    let x = Tensor::new(&[1, 1, 3, 1], vec![10.0, 20.0, 30.0]);
    let mut t = Tape::<f64>::inference();
    let xv = t.leaf(x, false);
    let y = ops::upsample_nearest(&mut t, xv, 7, 1);
    assert_eq!(
        t.value(y).data(),
        [10.0, 10.0, 10.0, 20.0, 20.0, 30.0, 30.0]
    );
}

// ---------------------------------------------------------------------------------------------
// linear

#[test]
fn linear() {
    let mut r = rng(2000);
    for (n, f, o) in [(5usize, 7usize, 3usize), (1, 9, 4), (4, 33, 17)] {
        let x = rand_t(&mut r, &[n, f], -1.0, 1.0);
        let w = rand_t(&mut r, &[o, f], -1.0, 1.0);
        let b = rand_t(&mut r, &[o], -1.0, 1.0);
        let mut want = vec![0.0; n * o];
        for i in 0..n {
            for j in 0..o {
                want[i * o + j] = (0..f)
                    .map(|k| x.data()[i * f + k] * w.data()[j * f + k])
                    .sum::<f64>();
            }
        }
        let nobias = Tensor::new(&[n, o], want.clone());
        let with_bias = Tensor::new(
            &[n, o],
            want.iter()
                .enumerate()
                .map(|(k, v)| v + b.data()[k % o])
                .collect(),
        );

        let name = format!("linear [{n},{f}] -> {o} bias");
        let inputs = [
            wrt("x", x.clone()),
            wrt("w", w.clone()),
            wrt("b", b.clone()),
        ];
        let (y, _) = fd_check(&name, &inputs, |t, v| {
            ops::linear(t, v[0], v[1], Some(v[2]))
        });
        assert_fwd(&name, &y, &with_bias);

        let name = format!("linear [{n},{f}] -> {o} no bias");
        let inputs = [wrt("x", x.clone()), wrt("w", w.clone())];
        let (y, _) = fd_check(&name, &inputs, |t, v| ops::linear(t, v[0], v[1], None));
        assert_fwd(&name, &y, &nobias);

        let name = format!("linear [{n},{f}] -> {o} params only");
        let inputs = [constant("x", x), wrt("w", w), wrt("b", b)];
        fd_check(&name, &inputs, |t, v| {
            ops::linear(t, v[0], v[1], Some(v[2]))
        });
    }
}

// ---------------------------------------------------------------------------------------------
// dropout

#[test]
fn dropout_statistics() {
    let mut r = rng(2100);
    let x = rand_away(&mut r, &[4, 5, 16, 16], 1.0, &[0.0], 1e-3);
    for p in [0.1, 0.3, 0.5] {
        let mut t = Tape::<f64>::new();
        let xv = t.leaf(x.clone(), true);
        let y = ops::dropout(&mut t, xv, p, &mut rng(7));
        let yd = t.value(y).data();
        let mut zeros = 0usize;
        for (&a, &b) in x.data().iter().zip(yd) {
            if b == 0.0 {
                zeros += 1;
            } else {
                assert!(
                    (b - a / (1.0 - p)).abs() <= 1e-14 * (1.0 + b.abs()),
                    "p={p}: kept {a} became {b}"
                );
            }
        }
        let frac = zeros as f64 / x.numel() as f64;
        println!("dropout p={p}: dropped fraction {frac:.4}");
        assert!((frac - p).abs() < 0.03, "p={p}: dropped fraction {frac}");
        // Same seed, same mask.
        let mut t2 = Tape::<f64>::new();
        let xv2 = t2.leaf(x.clone(), true);
        let y2 = ops::dropout(&mut t2, xv2, p, &mut rng(7));
        assert_eq!(t2.value(y2).data(), yd);
    }
    // p = 0 is the identity (the same var).
    let mut t = Tape::<f64>::new();
    let xv = t.leaf(x.clone(), true);
    assert_eq!(ops::dropout(&mut t, xv, 0.0, &mut rng(7)), xv);
}

#[test]
fn dropout_gradient() {
    let mut r = rng(2200);
    let x = rand_t(&mut r, &[2, 3, 5, 7], -1.0, 1.0);
    for p in [0.2, 0.5] {
        let name = format!("dropout p={p}");
        // The same seed in every evaluation rebuilds the same mask.
        let (y, _) = fd_check(&name, &[wrt("x", x.clone())], |t, v| {
            ops::dropout(t, v[0], p, &mut rng(42))
        });
        assert!(y.data().contains(&0.0) && y.data().iter().any(|&v| v != 0.0));
    }
}

// ---------------------------------------------------------------------------------------------
// losses

fn logsumexp(z: &[f64]) -> f64 {
    let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
}

/// Closed-form mean soft cross-entropy: mean_i sum_j q_ij (lse(z_i) - z_ij).
fn naive_soft_ce(z: &Tensor<f64>, q: &Tensor<f64>) -> f64 {
    let (n, c) = (z.shape()[0], z.shape()[1]);
    (0..n)
        .map(|i| {
            let (zi, qi) = (&z.data()[i * c..(i + 1) * c], &q.data()[i * c..(i + 1) * c]);
            let lse = logsumexp(zi);
            zi.iter()
                .zip(qi)
                .map(|(zv, qv)| qv * (lse - zv))
                .sum::<f64>()
        })
        .sum::<f64>()
        / n as f64
}

/// Asserts the scalar loss `y` equals its closed form `want` to 1e-13 relative.
fn assert_loss(name: &str, y: &Tensor<f64>, want: f64) {
    let got = y.data()[0];
    println!("{name}: loss {got:.6} closed form {want:.6}");
    assert!(
        (got - want).abs() <= 1e-13 * (1.0 + want.abs()),
        "{name}: loss {got} vs {want}"
    );
}

#[test]
fn cross_entropy_hard_labels() {
    let mut r = rng(2300);
    let (n, c) = (5, 7);
    let z = rand_t(&mut r, &[n, c], -3.0, 3.0);
    let labels: Vec<usize> = (0..n).map(|_| r.random_range(0..c)).collect();
    for e in [0.0, 0.1] {
        let name = format!("cross_entropy smoothing {e}");
        // lse(z_i) - (1 - e) z_i[label] - e / C sum_j z_ij, averaged over rows.
        let want = (0..n)
            .map(|i| {
                let zi = &z.data()[i * c..(i + 1) * c];
                logsumexp(zi) - (1.0 - e) * zi[labels[i]] - e / c as f64 * zi.iter().sum::<f64>()
            })
            .sum::<f64>()
            / n as f64;
        let (y, _) = fd_check(&name, &[wrt("logits", z.clone())], |t, v| {
            ops::cross_entropy(t, v[0], &labels, e)
        });
        assert_eq!(y.numel(), 1);
        assert_loss(&name, &y, want);

        // The analytic gradient is also (softmax(z) - q) / N.
        let mut t = Tape::<f64>::new();
        let zv = t.leaf(z.clone(), true);
        let l = ops::cross_entropy(&mut t, zv, &labels, e);
        let g = t.backward(l).take(zv).unwrap();
        let mut want_g = vec![0.0; n * c];
        for i in 0..n {
            let zi = &z.data()[i * c..(i + 1) * c];
            let lse = logsumexp(zi);
            for j in 0..c {
                let q = e / c as f64 + if j == labels[i] { 1.0 - e } else { 0.0 };
                want_g[i * c + j] = ((zi[j] - lse).exp() - q) / n as f64;
            }
        }
        assert_vec_close(
            &format!("{name} closed-form grad"),
            g.data(),
            &want_g,
            1e-15,
        );
    }
    // Scaling the loss scales its gradient (the seed is honoured).
    let mut t = Tape::<f64>::new();
    let zv = t.leaf(z.clone(), true);
    let l = ops::cross_entropy(&mut t, zv, &labels, 0.1);
    let g1 = t.backward(l).take(zv).unwrap();
    let mut t = Tape::<f64>::new();
    let zv = t.leaf(z, true);
    let l = ops::cross_entropy(&mut t, zv, &labels, 0.1);
    let g3 = t
        .backward_with(l, Tensor::full(&[1], 3.0))
        .take(zv)
        .unwrap();
    assert!(g3.max_abs_diff(&g1.map(|v| 3.0 * v)) < 1e-15);
}

#[test]
fn cross_entropy_soft_targets() {
    let mut r = rng(2400);
    let (n, c) = (4, 6);
    let z = rand_t(&mut r, &[n, c], -3.0, 3.0);
    // Mixup-like targets (rows sum to 1) and unnormalized ones (exercise the sum(q) term).
    let raw = rand_t(&mut r, &[n, c], 0.01, 1.0);
    let mut q = raw.clone();
    for row in q.data_mut().chunks_mut(c) {
        let s: f64 = row.iter().sum();
        row.iter_mut().for_each(|v| *v /= s);
    }
    for (name, q) in [
        ("cross_entropy_soft normalized", q),
        ("cross_entropy_soft unnormalized", raw),
    ] {
        let want = naive_soft_ce(&z, &q);
        let (y, _) = fd_check(name, &[wrt("logits", z.clone())], |t, v| {
            ops::cross_entropy_soft(t, v[0], &q)
        });
        assert_loss(name, &y, want);
    }
}

/// t^2 * mean_n sum_c p_t (log p_t - log p_s), p = softmax(z / t) computed directly.
fn naive_kd(zs: &Tensor<f64>, zt: &Tensor<f64>, t: f64) -> f64 {
    let (n, c) = (zs.shape()[0], zs.shape()[1]);
    let softmax = |z: &[f64]| {
        let e: Vec<f64> = z.iter().map(|v| (v / t).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s).collect::<Vec<f64>>()
    };
    let mut total = 0.0;
    for i in 0..n {
        let ps = softmax(&zs.data()[i * c..(i + 1) * c]);
        let pt = softmax(&zt.data()[i * c..(i + 1) * c]);
        total += pt
            .iter()
            .zip(&ps)
            .map(|(a, b)| a * (a.ln() - b.ln()))
            .sum::<f64>();
    }
    t * t * total / n as f64
}

#[test]
fn kd_loss() {
    let mut r = rng(2500);
    let (n, c) = (5, 7);
    let zs = rand_t(&mut r, &[n, c], -4.0, 4.0);
    let zt = rand_t(&mut r, &[n, c], -4.0, 4.0);
    for temp in [1.0, 4.0] {
        let name = format!("kd_loss t={temp}");
        let want = naive_kd(&zs, &zt, temp);
        let (y, _) = fd_check(&name, &[wrt("student", zs.clone())], |t, v| {
            ops::kd_loss(t, v[0], &zt, temp)
        });
        assert!(want > 0.0);
        assert_loss(&name, &y, want);

        // Zero loss and zero gradient when the teacher equals the student.
        let mut t = Tape::<f64>::new();
        let sv = t.leaf(zs.clone(), true);
        let l = ops::kd_loss(&mut t, sv, &zs, temp);
        let lv = t.value(l).data()[0];
        let g = t.backward(l).take(sv).unwrap();
        println!(
            "{name}: teacher == student: loss {lv:.3e}, max |grad| {:.3e}",
            g.max_abs()
        );
        assert!(
            lv.abs() < 1e-14 && g.max_abs() < 1e-15,
            "{name}: loss {lv} grad {}",
            g.max_abs()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// relu6, max pool, channel split and shuffle (MobileNetV2, ResNet, ShuffleNetV2)

#[test]
fn relu6() {
    let mut r = rng(2100);
    let x = rand_away(&mut r, &[2, 3, 7, 9], 9.0, &[0.0, 6.0], 1e-3);
    assert!(x.data().iter().any(|&v| v < 0.0) && x.data().iter().any(|&v| v > 6.0));
    assert!(x.data().iter().any(|&v| v > 0.0 && v < 6.0));
    check_unary("relu6", x, ops::relu6, |v| v.clamp(0.0, 6.0));
}

/// Direct max pool with -inf padding (PyTorch's rule).
fn naive_max_pool(x: &Tensor<f64>, k: usize, s: usize, p: usize) -> Tensor<f64> {
    let (n, c, h, w) = x.dims4();
    let ho = (h + 2 * p - k) / s + 1;
    let wo = (w + 2 * p - k) / s + 1;
    let mut y = vec![f64::NEG_INFINITY; n * c * ho * wo];
    for nc in 0..n * c {
        for oy in 0..ho {
            for ox in 0..wo {
                for ky in 0..k {
                    for kx in 0..k {
                        let (iy, ix) = (
                            (oy * s + ky) as isize - p as isize,
                            (ox * s + kx) as isize - p as isize,
                        );
                        if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                            let v = x.data()[(nc * h + iy as usize) * w + ix as usize];
                            let o = &mut y[(nc * ho + oy) * wo + ox];
                            *o = o.max(v);
                        }
                    }
                }
            }
        }
    }
    Tensor::new(&[n, c, ho, wo], y)
}

#[test]
fn max_pool2d() {
    let mut r = rng(2200);
    // (n, c, h, w, kernel, stride, padding): ResNet's stem pool on even and odd maps, a map
    // smaller than the window plus padding, and a plain 2x2.
    for (n, c, h, w, k, s, p) in [
        (2usize, 3usize, 8usize, 8usize, 3usize, 2usize, 1usize),
        (1, 2, 7, 9, 3, 2, 1),
        (2, 2, 2, 3, 3, 2, 1),
        (1, 3, 6, 5, 2, 2, 0),
        (1, 2, 5, 5, 3, 1, 1),
    ] {
        let name = format!("max_pool2d k{k} s{s} p{p} [{n},{c},{h},{w}]");
        // Distinct values (a random permutation of a grid), so no window has a tie and FD is exact.
        let m = n * c * h * w;
        let mut vals: Vec<f64> = (0..m).map(|i| (i as f64 - m as f64 / 2.0) * 0.01).collect();
        for i in (1..m).rev() {
            vals.swap(i, r.random_range(0..=i));
        }
        let x = Tensor::new(&[n, c, h, w], vals);
        let want = naive_max_pool(&x, k, s, p);
        let (y, _) = fd_check(&name, &[wrt("x", x)], |t, v| {
            ops::max_pool2d(t, v[0], k, s, p)
        });
        assert_fwd(&name, &y, &want);
    }
}

#[test]
fn channel_split_and_shuffle() {
    let mut r = rng(2300);
    for (n, c, h, w) in [(2usize, 6usize, 3usize, 4usize), (1, 4, 1, 1), (3, 8, 2, 5)] {
        let x = rand_t(&mut r, &[n, c, h, w], -1.0, 1.0);
        let hw = h * w;
        let plane = |t: &Tensor<f64>, i: usize, ch: usize, cs: usize| {
            t.data()[(i * cs + ch) * hw..(i * cs + ch + 1) * hw].to_vec()
        };
        // split: the two halves of x.chunk(2, dim=1)
        for half in 0..2 {
            let name = format!("split_channels half {half} [{n},{c},{h},{w}]");
            let mut want = Vec::new();
            for i in 0..n {
                for ch in half * c / 2..(half + 1) * c / 2 {
                    want.extend(plane(&x, i, ch, c));
                }
            }
            let want = Tensor::new(&[n, c / 2, h, w], want);
            let (y, _) = fd_check(&name, &[wrt("x", x.clone())], |t, v| {
                let (a, b) = ops::split_channels(t, v[0]);
                if half == 0 {
                    a
                } else {
                    b
                }
            });
            assert_fwd(&name, &y, &want);
        }
        // shuffle: view [N, g, C/g, H, W] -> transpose(1, 2) -> flatten, for g = 2 and g = c / 2
        for g in [2, c / 2] {
            let name = format!("channel_shuffle g{g} [{n},{c},{h},{w}]");
            let mut want = Vec::new();
            for i in 0..n {
                for j in 0..c / g {
                    for gi in 0..g {
                        want.extend(plane(&x, i, gi * (c / g) + j, c));
                    }
                }
            }
            let want = Tensor::new(&[n, c, h, w], want);
            let (y, _) = fd_check(&name, &[wrt("x", x.clone())], |t, v| {
                ops::channel_shuffle(t, v[0], g)
            });
            assert_fwd(&name, &y, &want);
        }
    }
}
