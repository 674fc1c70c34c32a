//! One test body per op, every backend: each case below is written once (a graph on a tape from
//! random inputs) and runs
//! - in f64 on the CPU, its input gradients against central finite differences of
//!   `L = sum(out * R)` (R fixed and random), and
//! - in f32 on the CPU and on the CUDA device (a GPU when present, else the emulator in CI via
//!   the last test) from the same inputs: outputs and every input gradient compared.
//!
//! The body is a macro argument expanded for both element types, so a case cannot exist for one
//! backend only; and since `on_backend!` compiles every op once per backend, an op missing from
//! a backend's family trait does not build.

mod common;

use common::cuda::{gpu, run_on_emulator};
use ghostv3::ops::{self, Conv2dArgs};
use ghostv3::tensor::Device;
use ghostv3::{Elem, Tape, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Random inputs of the given shapes (values in [-2, 2), away from 0 by 0.05 so that ReLU kinks
/// and max-pool ties are not within the FD step).
fn inputs(shapes: &[&[usize]], seed: u64) -> Vec<Vec<f64>> {
    let mut rng = StdRng::seed_from_u64(seed);
    shapes
        .iter()
        .map(|s| {
            (0..s.iter().product::<usize>())
                .map(|_| loop {
                    let v: f64 = rng.random_range(-2.0..2.0);
                    if v.abs() > 0.05 && (v.abs() - 3.0).abs() > 0.05 {
                        break v;
                    }
                })
                .collect()
        })
        .collect()
}

/// `L = sum(out * r)` with r drawn from `seed` (the same r for every run of a case).
fn weights(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xabc);
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Runs `f` on a fresh tape with leaves from `vals` on `device`; returns the output and the
/// gradients of `sum(out * r)` for every input (host copies; None for an input the graph uses
/// as a constant, e.g. a loss's targets).
fn run<T: Elem>(
    f: &dyn Fn(&mut Tape<T>, &[Var]) -> Var,
    shapes: &[&[usize]],
    vals: &[Vec<f64>],
    device: Device,
    seed: u64,
) -> (Vec<f64>, Vec<Option<Vec<f64>>>) {
    let mut tape = Tape::<T>::new();
    let vars: Vec<Var> = shapes
        .iter()
        .zip(vals)
        .map(|(s, v)| {
            let t = Tensor::new(s, v.iter().map(|&x| T::from_f64(x)).collect());
            tape.leaf(t.to_device(device).unwrap(), true)
        })
        .collect();
    let y = f(&mut tape, &vars);
    let out = tape.value(y).to_host();
    let r = weights(out.numel(), seed);
    let seed_t = Tensor::new(out.shape(), r.iter().map(|&x| T::from_f64(x)).collect());
    let grads = tape.backward_with(y, seed_t);
    let gs = vars
        .iter()
        .map(|&v| {
            grads
                .get(v)
                .map(|g| g.to_host().data().iter().map(|x| x.as_f64()).collect())
        })
        .collect();
    (out.data().iter().map(|x| x.as_f64()).collect(), gs)
}

fn max_err(a: &[f64], b: &[f64]) -> (f64, f64) {
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let err = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    (err, scale)
}

/// The f64 finite-difference check on the CPU, then f32 CPU against f32 on the device.
fn check(
    name: &str,
    shapes: &[&[usize]],
    f64_case: &dyn Fn(&mut Tape<f64>, &[Var]) -> Var,
    f32_case: &dyn Fn(&mut Tape<f32>, &[Var]) -> Var,
) {
    let seed = name
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let vals = inputs(shapes, seed);
    // f64, CPU: backward against central differences (every element of small inputs).
    let (_, grads) = run(f64_case, shapes, &vals, Device::Cpu, seed);
    let h = 1e-6;
    for (i, g) in grads.iter().enumerate() {
        let Some(g) = g else { continue };
        let n = vals[i].len();
        let step = (n / 40).max(1);
        for j in (0..n).step_by(step) {
            let mut plus = vals.clone();
            plus[i][j] += h;
            let mut minus = vals.clone();
            minus[i][j] -= h;
            let l = |v: &[Vec<f64>]| -> f64 {
                let (o, _) = run(f64_case, shapes, v, Device::Cpu, seed);
                o.iter()
                    .zip(weights(o.len(), seed))
                    .map(|(a, b)| a * b)
                    .sum()
            };
            let fd = (l(&plus) - l(&minus)) / (2.0 * h);
            let scale = 1.0 + g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(
                (g[j] - fd).abs() <= 1e-6 * scale,
                "{name}: input {i} element {j}: backward {} vs finite differences {fd}",
                g[j]
            );
        }
    }
    // f32: the CPU against the device, from the same body and inputs.
    let Some(_g) = gpu() else { return };
    let (y_cpu, g_cpu) = run(f32_case, shapes, &vals, Device::Cpu, seed);
    let (y_dev, g_dev) = run(f32_case, shapes, &vals, Device::Cuda, seed);
    let (e, s) = max_err(&y_dev, &y_cpu);
    println!("{name}: output max err {e:.2e} (scale {s:.2e})");
    assert!(
        e <= 2e-5 * s,
        "{name}: device output differs from the CPU by {e:.2e}"
    );
    for (i, (a, b)) in g_dev.iter().zip(&g_cpu).enumerate() {
        assert_eq!(
            a.is_some(),
            b.is_some(),
            "{name}: gradient {i} on one backend only"
        );
        let (Some(a), Some(b)) = (a, b) else { continue };
        let (e, s) = max_err(a, b);
        println!("{name}: input {i} gradient max err {e:.2e} (scale {s:.2e})");
        assert!(
            e <= 2e-5 * s,
            "{name}: device gradient {i} differs by {e:.2e}"
        );
    }
}

/// A case: its input shapes and a body over `tape` and the input vars `v`, written once.
macro_rules! case {
    ($name:ident, [$($shape:expr),+ $(,)?], |$tape:ident, $v:ident| $body:expr) => {
        #[test]
        fn $name() {
            let shapes: &[&[usize]] = &[$(&$shape),+];
            check(
                stringify!($name),
                shapes,
                &|$tape: &mut Tape<f64>, $v: &[Var]| $body,
                &|$tape: &mut Tape<f32>, $v: &[Var]| $body,
            );
        }
    };
}

case!(relu, [[2, 3, 4, 5]], |t, v| ops::relu(t, v[0]));
case!(relu6, [[2, 3, 4, 5]], |t, v| {
    let s = ops::scale(t, v[0], 2.0);
    ops::relu6(t, s)
});
case!(sigmoid, [[2, 3, 4, 5]], |t, v| ops::sigmoid(t, v[0]));
case!(hard_sigmoid, [[2, 3, 4, 5]], |t, v| {
    let s = ops::scale(t, v[0], 2.0);
    ops::hard_sigmoid(t, s)
});
case!(add_mul, [[2, 3, 4, 5], [2, 3, 4, 5]], |t, v| {
    let a = ops::add(t, v[0], v[1]);
    ops::mul(t, a, v[1])
});
case!(mul_channel, [[2, 3, 4, 5], [2, 3, 1, 1]], |t, v| {
    ops::mul_channel(t, v[0], v[1])
});
case!(conv_dense, [[2, 3, 7, 6], [4, 3, 3, 3], [4]], |t, v| {
    ops::conv2d(t, v[0], v[1], Some(v[2]), Conv2dArgs::same(3, 3, 2, 1))
});
case!(conv_depthwise, [[2, 4, 7, 6], [4, 1, 3, 3]], |t, v| {
    ops::conv2d(t, v[0], v[1], None, Conv2dArgs::same(3, 3, 1, 4))
});
case!(conv_pointwise, [[2, 5, 4, 3], [6, 5, 1, 1]], |t, v| {
    ops::conv2d(t, v[0], v[1], None, Conv2dArgs::same(1, 1, 1, 1))
});
case!(linear, [[3, 5], [4, 5], [4]], |t, v| ops::linear(
    t,
    v[0],
    v[1],
    Some(v[2])
));
case!(batch_norm_train, [[3, 4, 3, 5], [4], [4]], |t, v| {
    ops::batch_norm_train(t, v[0], v[1], v[2], 1e-5).0
});
case!(pools, [[2, 3, 6, 8]], |t, v| {
    let a = ops::avg_pool2x2(t, v[0]);
    let u = ops::upsample_nearest(t, a, 6, 8);
    let m = ops::mul(t, u, v[0]);
    ops::global_avg_pool(t, m)
});
case!(max_pool, [[2, 3, 7, 7]], |t, v| ops::max_pool2d(
    t, v[0], 3, 2, 1
));
case!(channels, [[2, 4, 3, 3], [2, 2, 3, 3]], |t, v| {
    let c = ops::concat_channels(t, v[0], v[1]);
    let s = ops::channel_shuffle(t, c, 2);
    let (a, b) = ops::split_channels(t, s);
    let p = ops::mul(t, a, b);
    ops::slice_channels(t, p, 1, 2)
});
case!(cross_entropy_soft, [[3, 5], [3, 5]], |t, v| {
    let q = ops::sigmoid(t, v[1]);
    let target = t.value(q).clone();
    ops::cross_entropy_soft(t, v[0], &target)
});
case!(kd_loss, [[3, 5], [3, 5]], |t, v| {
    let teacher = t.value(v[1]).clone();
    ops::kd_loss(t, v[0], &teacher, 2.0)
});

/// Without a GPU, every case above on the CPU emulator (device against CPU).
#[test]
fn cpu_emulator_runs_every_backend_case() {
    run_on_emulator(&[]);
}
