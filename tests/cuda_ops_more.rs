//! The CUDA ops MobileNetV2, ShuffleNetV2 and ResNet need beyond the GhostNet set (relu6,
//! max_pool2d, channel slicing/splitting/shuffle), each through the tape dispatch (device
//! tensors in, device tensors out) against the CPU op on fresh random inputs at several shapes
//! including odd ones: forward values and every gradient. The test GPU's buffers are poisoned
//! with NaN, so an unwritten element fails.
//! Without a GPU each test prints `skipped: no CUDA device (...)`, and the last test runs them
//! all on the CPU emulator (tests/common/cuda.rs).

mod common;

use common::cuda::*;
use ghostv3::backend::cuda::shape_ops::MaxPoolGeom;
use ghostv3::backend::cuda::Gpu;
use ghostv3::ops::{self, Conv2dArgs};
use ghostv3::{Tape, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;

const SHAPES: [[usize; 4]; 4] = [[2, 3, 7, 9], [3, 16, 15, 15], [2, 8, 28, 28], [1, 6, 1, 13]];

/// The process-wide GPU the dispatching ops run on, with poisoned pools like the test GPU.
fn global_gpu() -> &'static Gpu {
    let g = ghostv3::backend::cuda::global().unwrap();
    g.set_poison(true);
    g
}

/// The same op through the tape on the device: (y, dx) on the host, with the output gradient
/// `gy`. Checks that the op ran there (a device output).
fn dev_unary(x: &Tensor, gy: &Tensor, f: impl Fn(&mut Tape, Var) -> Var) -> (Tensor, Tensor) {
    let mut tape = Tape::new();
    let xv = tape.leaf(x.to_cuda().unwrap(), true);
    let y = f(&mut tape, xv);
    assert!(tape.value(y).is_cuda(), "the op did not run on the device");
    let yt = tape.value(y).to_host();
    let grads = tape.backward_with(y, gy.clone());
    let dx = grads.get(xv).unwrap();
    assert!(dx.is_cuda(), "the gradient did not stay on the device");
    (yt, dx.to_host())
}

/// CPU and device forward + backward of a one-input op, compared at `tol` (0: bit-exact).
fn check_unary(case: &str, x: &Tensor, seed: u64, tol: f64, f: impl Fn(&mut Tape, Var) -> Var) {
    let (y, gy, dx) = cpu_unary(x, seed, &f);
    let (yg, dxg) = dev_unary(x, &gy, &f);
    assert_eq!(yg.shape(), y.shape(), "{case}: output shape");
    close(case, yg.data(), y.data(), tol);
    close(&format!("{case} grad"), dxg.data(), dx.data(), tol);
}

#[test]
fn relu6_matches_cpu() {
    let Some(_g) = gpu() else { return };
    global_gpu();
    let mut rng = StdRng::seed_from_u64(200);
    for s in SHAPES {
        // Both kinks (0 and 6) inside the range, and values exactly on them.
        let mut x = rand_t(&mut rng, &s, -3.0, 9.0);
        let d = x.data_mut();
        d[0] = 0.0;
        d[d.len() - 1] = 6.0;
        check_unary(&format!("relu6 {s:?}"), &x, 201, 0.0, ops::relu6);
    }
}

#[test]
fn max_pool2d_matches_cpu() {
    let Some(g) = gpu() else { return };
    global_gpu();
    let mut rng = StdRng::seed_from_u64(210);
    for (k, st, p, s) in [
        (3, 2, 1, [2, 3, 7, 9]),
        (3, 2, 1, [3, 16, 15, 15]),
        (3, 2, 1, [2, 8, 28, 28]),
        (3, 2, 1, [1, 6, 1, 13]),
        (2, 2, 0, [2, 5, 8, 11]),
        (3, 1, 1, [2, 4, 6, 5]),
        (3, 2, 0, [2, 3, 9, 7]),
        (5, 3, 2, [1, 4, 13, 10]),
    ] {
        let case = format!("max_pool2d k{k} s{st} p{p} {s:?}");
        let f = |t: &mut Tape, v: Var| ops::max_pool2d(t, v, k, st, p);
        let x = rand_t(&mut rng, &s, -2.0, 2.0);
        check_unary(&case, &x, 211, 0.0, f);
        // Ties everywhere (a few distinct values): the gradient goes to the first maximum of
        // each window in row-major order on both.
        let tied = x.map(|v| (v * 1.5).round());
        check_unary(&format!("{case} ties"), &tied, 212, 0.0, f);
        // The launcher on its own: the argmax it saves is the CPU's first maximum.
        let geom = MaxPoolGeom {
            n: s[0],
            c: s[1],
            h: s[2],
            w: s[3],
            k,
            s: st,
            p,
        };
        let (yb, _) = g.max_pool2d(&up(&g, &tied), &geom).unwrap();
        let (y, _, _) = cpu_unary(&tied, 213, f);
        close(
            &format!("{case} ties launcher"),
            &down(&g, &yb),
            y.data(),
            0.0,
        );
    }
}

#[test]
fn channel_slice_split_shuffle_match_cpu() {
    let Some(_g) = gpu() else { return };
    global_gpu();
    let mut rng = StdRng::seed_from_u64(220);
    for (s, slices, groups) in [
        (
            [2, 16, 7, 9],
            &[(0, 8), (8, 8), (3, 5), (15, 1)][..],
            &[2, 4, 8, 1][..],
        ),
        ([3, 6, 5, 5], &[(0, 3), (1, 4)][..], &[2, 3][..]),
        ([1, 10, 1, 13], &[(0, 10), (9, 1)][..], &[2, 5][..]),
        ([2, 58, 4, 4], &[(0, 29), (29, 29)][..], &[2][..]),
    ] {
        let x = rand_t(&mut rng, &s, -2.0, 2.0);
        for &(start, len) in slices {
            check_unary(
                &format!("slice_channels {start}+{len} {s:?}"),
                &x,
                221,
                0.0,
                |t, v| ops::slice_channels(t, v, start, len),
            );
        }
        for &g in groups {
            check_unary(
                &format!("channel_shuffle g{g} {s:?}"),
                &x,
                222,
                0.0,
                |t, v| ops::channel_shuffle(t, v, g),
            );
        }
        // split: both halves used (the halves' gradients meet in x), weighted differently.
        check_unary(&format!("split_channels {s:?}"), &x, 223, 0.0, |t, v| {
            let (a, b) = ops::split_channels(t, v);
            let b = ops::scale(t, b, 0.5);
            ops::concat_channels(t, b, a)
        });
    }
}

/// A small MobileNetV2/ShuffleNetV2/ResNet-like chain of the new ops between convs and BN:
/// stem conv + BN + relu6, max pool, split, a 1x1 branch, concat, shuffle, a slice.
#[test]
fn small_shufflenet_like_chain_matches_cpu() {
    let Some(_g) = gpu() else { return };
    global_gpu();
    let mut rng = StdRng::seed_from_u64(250);
    let x = rand_t(&mut rng, &[2, 3, 17, 15], -2.0, 2.0);
    let w0 = rand_t(&mut rng, &[8, 3, 3, 3], -0.4, 0.4);
    let gamma = rand_t(&mut rng, &[8], 0.5, 1.5);
    let beta = rand_t(&mut rng, &[8], -0.5, 0.5);
    let w1 = rand_t(&mut rng, &[4, 4, 1, 1], -0.6, 0.6);
    let net = |t: &mut Tape, v: &[Var]| -> Var {
        let a = Conv2dArgs {
            stride: (2, 2),
            padding: (1, 1),
            groups: 1,
        };
        let h = ops::conv2d(t, v[0], v[1], None, a);
        let (h, _) = ops::batch_norm_train(t, h, v[2], v[3], 1e-5);
        let h = ops::relu6(t, h);
        let h = ops::max_pool2d(t, h, 3, 2, 1);
        let (l, r) = ops::split_channels(t, h);
        let r = ops::conv2d(t, r, v[4], None, Conv2dArgs::same(1, 1, 1, 1));
        let r = ops::relu(t, r);
        let h = ops::concat_channels(t, l, r);
        let h = ops::channel_shuffle(t, h, 2);
        ops::slice_channels(t, h, 1, 6)
    };
    let inputs = [&x, &w0, &gamma, &beta, &w1];
    let run = |cuda: bool, gy: Option<&Tensor>| -> (Tensor, Tensor, Vec<Tensor>) {
        let mut tape = Tape::new();
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| {
                let t = if cuda {
                    t.to_cuda().unwrap()
                } else {
                    (*t).clone()
                };
                tape.leaf(t, true)
            })
            .collect();
        let y = net(&mut tape, &vars);
        assert_eq!(tape.value(y).is_cuda(), cuda);
        let yt = tape.value(y).to_host();
        let gy = match gy {
            Some(g) => g.clone(),
            None => rand_t(&mut StdRng::seed_from_u64(251), yt.shape(), -1.0, 1.0),
        };
        let grads = tape.backward_with(y, gy.clone());
        let gs = vars
            .iter()
            .map(|&v| grads.get(v).unwrap().to_host())
            .collect();
        (yt, gy, gs)
    };
    let (y, gy, gs) = run(false, None);
    let (yg, _, gsg) = run(true, Some(&gy));
    close("shufflenet-like chain", yg.data(), y.data(), 1e-4);
    for (name, (a, b)) in ["dx", "dw0", "dgamma", "dbeta", "dw1"]
        .iter()
        .zip(gsg.iter().zip(&gs))
    {
        close(
            &format!("shufflenet-like chain {name}"),
            a.data(),
            b.data(),
            1e-3,
        );
    }
}

/// Without a GPU, every test above on the CPU emulator.
#[test]
fn cpu_emulator_runs_every_gpu_test() {
    run_on_emulator(&[]);
}
