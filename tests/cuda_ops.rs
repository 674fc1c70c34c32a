//! Every CUDA launcher against the CPU backend (the reference) on fresh random inputs (never
//! zeros) at several shapes including odd sizes: forward values and every gradient. Output
//! buffers are poisoned with NaN first, so an element a kernel does not write fails the check.
//! Without a GPU each test prints `skipped: no CUDA device (...)`, and the last test runs them all
//! on the CPU emulator (tests/common/cuda.rs).

mod common;

use common::cuda::*;
use common::DW_KERNELS;
use ghostv3::backend::cpu::conv::ConvGeom;
use ghostv3::backend::cuda::{unavailable_reason, DBuf, Gpu, RepDwGeom};
use ghostv3::models::{self, ModelOptions};
use ghostv3::nn::Mode;
use ghostv3::ops::{self, Conv2dArgs};
use ghostv3::optim::{
    Ema, EmaConfig, Lamb, LambOptions, Layout, Optimizer, OptimizerConfig, OptimizerKind, Update,
};
use ghostv3::tensor::Device;
use ghostv3::train::step;
use ghostv3::{Tape, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SHAPES: [[usize; 4]; 4] = [[2, 3, 7, 9], [3, 16, 15, 15], [4, 8, 28, 28], [1, 5, 1, 13]];

#[test]
fn activations_and_elementwise() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(1);
    for s in SHAPES {
        let x = rand_t(&mut rng, &s, -5.0, 5.0);
        let xb = up(&g, &x);
        let (y, gy, dx) = cpu_unary(&x, 2, ops::relu);
        let gyb = up(&g, &gy);
        close(
            &format!("relu {s:?}"),
            &down(&g, &g.relu(&xb).unwrap()),
            y.data(),
            TOL,
        );
        close(
            &format!("relu grad {s:?}"),
            &down(&g, &g.relu_backward(&xb, &gyb).unwrap()),
            dx.data(),
            TOL,
        );
        let (y, gy, dx) = cpu_unary(&x, 3, ops::sigmoid);
        let (yb, gyb) = (g.sigmoid(&xb).unwrap(), up(&g, &gy));
        close(&format!("sigmoid {s:?}"), &down(&g, &yb), y.data(), TOL);
        close(
            &format!("sigmoid grad {s:?}"),
            &down(&g, &g.sigmoid_backward(&yb, &gyb).unwrap()),
            dx.data(),
            TOL,
        );
        let (y, gy, dx) = cpu_unary(&x, 4, ops::hard_sigmoid);
        let gyb = up(&g, &gy);
        close(
            &format!("hard_sigmoid {s:?}"),
            &down(&g, &g.hard_sigmoid(&xb).unwrap()),
            y.data(),
            TOL,
        );
        close(
            &format!("hard_sigmoid grad {s:?}"),
            &down(&g, &g.hard_sigmoid_backward(&xb, &gyb).unwrap()),
            dx.data(),
            TOL,
        );
        let (y, _, _) = cpu_unary(&x, 5, |t, v| ops::scale(t, v, 0.37));
        close(
            &format!("scale {s:?}"),
            &down(&g, &g.scale(&xb, 0.37).unwrap()),
            y.data(),
            TOL,
        );
        let b = rand_t(&mut rng, &s, -2.0, 2.0);
        let bb = up(&g, &b);
        close(
            &format!("add {s:?}"),
            &down(&g, &g.add(&xb, &bb).unwrap()),
            x.add(&b).data(),
            TOL,
        );
        let prod: Vec<f32> = x.data().iter().zip(b.data()).map(|(p, q)| p * q).collect();
        close(
            &format!("mul {s:?}"),
            &down(&g, &g.mul(&xb, &bb).unwrap()),
            &prod,
            TOL,
        );
        let mut acc = up(&g, &x);
        g.add_assign(&mut acc, &bb).unwrap();
        close(
            &format!("add_assign {s:?}"),
            &down(&g, &acc),
            x.add(&b).data(),
            TOL,
        );

        // mul_channel: both gradients.
        let sc = rand_t(&mut rng, &[s[0], s[1], 1, 1], 0.1, 2.0);
        let mut tape = Tape::new();
        let (xv, sv) = (tape.leaf(x.clone(), true), tape.leaf(sc.clone(), true));
        let y = ops::mul_channel(&mut tape, xv, sv);
        let yt = tape.value(y).clone();
        let gy = rand_t(&mut rng, &s, -1.0, 1.0);
        let gr = tape.backward_with(y, gy.clone());
        let (scb, gyb) = (up(&g, &sc), up(&g, &gy));
        let hw = s[2] * s[3];
        close(
            &format!("mul_channel {s:?}"),
            &down(&g, &g.mul_channel(&xb, &scb, hw).unwrap()),
            yt.data(),
            TOL,
        );
        close(
            &format!("mul_channel dx {s:?}"),
            &down(&g, &g.mul_channel(&gyb, &scb, hw).unwrap()),
            gr.get(xv).unwrap().data(),
            TOL,
        );
        close(
            &format!("mul_channel ds {s:?}"),
            &down(&g, &g.mul_channel_backward_scale(&gyb, &xb, hw).unwrap()),
            gr.get(sv).unwrap().data(),
            TOL,
        );
    }
}

#[test]
fn batch_norm_train_and_eval() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(10);
    let eps = 1e-5;
    for s in SHAPES {
        let (n, c, hw) = (s[0], s[1], s[2] * s[3]);
        // A large mean next to the spread: one-pass statistics must still be exact enough.
        let x = rand_t(&mut rng, &s, 3.0, 5.0);
        let gamma = rand_t(&mut rng, &[c], 0.5, 1.5);
        let beta = rand_t(&mut rng, &[c], -0.5, 0.5);
        let gy = rand_t(&mut rng, &s, -1.0, 1.0);
        let mut tape = Tape::new();
        let (xv, gv, bv) = (
            tape.leaf(x.clone(), true),
            tape.leaf(gamma.clone(), true),
            tape.leaf(beta.clone(), true),
        );
        let (y, stats) = ops::batch_norm_train(&mut tape, xv, gv, bv, eps);
        let yt = tape.value(y).clone();
        let gr = tape.backward_with(y, gy.clone());
        let (xb, gb, bb, gyb) = (up(&g, &x), up(&g, &gamma), up(&g, &beta), up(&g, &gy));
        let (yb, saved) = g.batch_norm_train(&xb, &gb, &bb, (n, c, hw), eps).unwrap();
        close(&format!("bn train {s:?}"), &down(&g, &yb), yt.data(), TOL);
        let (st_mean, st_var) = g.batch_stats(&saved).unwrap();
        let to32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        close(
            &format!("bn mean {s:?}"),
            &to32(&st_mean),
            &to32(&stats.mean()),
            1e-6,
        );
        close(
            &format!("bn var {s:?}"),
            &to32(&st_var),
            &to32(&stats.var()),
            1e-5,
        );
        let bg = g
            .batch_norm_backward(&gyb, &xb, &gb, &saved, (n, c, hw), true)
            .unwrap();
        close(
            &format!("bn train dx {s:?}"),
            &down(&g, &bg.dx),
            gr.get(xv).unwrap().data(),
            1e-3,
        );
        close(
            &format!("bn train dgamma {s:?}"),
            &down(&g, &bg.dgamma),
            gr.get(gv).unwrap().data(),
            TOL,
        );
        close(
            &format!("bn train dbeta {s:?}"),
            &down(&g, &bg.dbeta),
            gr.get(bv).unwrap().data(),
            TOL,
        );

        // Running stats: PyTorch's momentum update with the unbiased variance.
        let rm0 = rand_vec(&mut rng, c, -0.5, 0.5);
        let rv0 = rand_vec(&mut rng, c, 0.5, 1.5);
        let (mut rmb, mut rvb) = (g.upload(&rm0).unwrap(), g.upload(&rv0).unwrap());
        g.batch_norm_update_running(&mut rmb, &mut rvb, &saved, 0.1)
            .unwrap();
        let (unb, sm) = (stats.unbiased_var(), stats.mean());
        let rm: Vec<f32> = (0..c)
            .map(|i| (0.9 * rm0[i] as f64 + 0.1 * sm[i]) as f32)
            .collect();
        let rv: Vec<f32> = (0..c)
            .map(|i| (0.9 * rv0[i] as f64 + 0.1 * unb[i]) as f32)
            .collect();
        close(
            &format!("bn running mean {s:?}"),
            &down(&g, &rmb),
            &rm,
            1e-6,
        );
        close(&format!("bn running var {s:?}"), &down(&g, &rvb), &rv, 1e-5);

        // Eval mode.
        let mut tape = Tape::new();
        let (xv, gv, bv) = (
            tape.leaf(x.clone(), true),
            tape.leaf(gamma.clone(), true),
            tape.leaf(beta.clone(), true),
        );
        let (rmt, rvt) = (
            Tensor::new(&[c], rm0.clone()),
            Tensor::new(&[c], rv0.clone()),
        );
        let y = ops::batch_norm_eval(&mut tape, xv, gv, bv, &rmt, &rvt, eps);
        let yt = tape.value(y).clone();
        let gr = tape.backward_with(y, gy.clone());
        let (yb, saved) = g
            .batch_norm_eval(
                &xb,
                &gb,
                &bb,
                &g.upload(&rm0).unwrap(),
                &g.upload(&rv0).unwrap(),
                (n, c, hw),
                eps,
            )
            .unwrap();
        close(&format!("bn eval {s:?}"), &down(&g, &yb), yt.data(), TOL);
        let bg = g
            .batch_norm_backward(&gyb, &xb, &gb, &saved, (n, c, hw), false)
            .unwrap();
        close(
            &format!("bn eval dx {s:?}"),
            &down(&g, &bg.dx),
            gr.get(xv).unwrap().data(),
            TOL,
        );
        close(
            &format!("bn eval dgamma {s:?}"),
            &down(&g, &bg.dgamma),
            gr.get(gv).unwrap().data(),
            TOL,
        );
        close(
            &format!("bn eval dbeta {s:?}"),
            &down(&g, &bg.dbeta),
            gr.get(bv).unwrap().data(),
            TOL,
        );
    }
}

/// One conv case on both backends: forward and all three gradients.
#[allow(clippy::too_many_arguments)]
fn conv_case(
    g: &Gpu,
    rng: &mut StdRng,
    x_shape: [usize; 4],
    cout: usize,
    k: (usize, usize),
    stride: usize,
    groups: usize,
    bias: bool,
) {
    let args = Conv2dArgs {
        stride: (stride, stride),
        padding: (k.0 / 2, k.1 / 2),
        groups,
    };
    let w_shape = [cout, x_shape[1] / groups, k.0, k.1];
    let geom = ConvGeom::new(&x_shape, &w_shape, args.stride, args.padding, groups).unwrap();
    let x = rand_t(rng, &x_shape, -1.0, 1.0);
    let w = rand_t(rng, &w_shape, -0.5, 0.5);
    let b = rand_t(rng, &[cout], -0.5, 0.5);
    let gy = rand_t(rng, &geom.out_shape(), -1.0, 1.0);
    let mut tape = Tape::new();
    let (xv, wv) = (tape.leaf(x.clone(), true), tape.leaf(w.clone(), true));
    let bv = bias.then(|| tape.leaf(b.clone(), true));
    let y = ops::conv2d(&mut tape, xv, wv, bv, args);
    let yt = tape.value(y).clone();
    let gr = tape.backward_with(y, gy.clone());
    let (xb, wb, bb, gyb) = (up(g, &x), up(g, &w), up(g, &b), up(g, &gy));
    let case = format!("conv x{x_shape:?} w{w_shape:?} s{stride} g{groups} bias={bias}");
    let yb = g
        .conv2d_forward(&geom, &xb, &wb, bias.then_some(&bb))
        .unwrap();
    close(&case, &down(g, &yb), yt.data(), TOL);
    let cg = g
        .conv2d_backward(&geom, &xb, &wb, &gyb, (true, true, bias))
        .unwrap();
    close(
        &format!("{case} dx"),
        &down(g, cg.dx.as_ref().unwrap()),
        gr.get(xv).unwrap().data(),
        TOL,
    );
    close(
        &format!("{case} dw"),
        &down(g, cg.dw.as_ref().unwrap()),
        gr.get(wv).unwrap().data(),
        1e-3,
    );
    if let Some(bv) = bv {
        close(
            &format!("{case} db"),
            &down(g, cg.db.as_ref().unwrap()),
            gr.get(bv).unwrap().data(),
            1e-3,
        );
    }
}

#[test]
fn depthwise_convs() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(20);
    // The GhostNets' depth-wise geometries, and DFC's 1x5 / 5x1 at stride 2.
    for (k, stride) in DW_KERNELS.into_iter().chain([((1, 5), 2), ((5, 1), 2)]) {
        for s in [[2, 6, 9, 11], [3, 16, 14, 14], [2, 5, 4, 3]] {
            conv_case(&g, &mut rng, s, s[1], k, stride, s[1], false);
        }
    }
    conv_case(&g, &mut rng, [2, 7, 10, 10], 7, (3, 3), 1, 7, true);
    // Weight gradients split over several blocks per channel (> 1024 outputs per channel).
    conv_case(&g, &mut rng, [2, 4, 40, 40], 4, (3, 3), 1, 4, true);
    conv_case(&g, &mut rng, [2, 4, 66, 64], 4, (5, 5), 2, 4, false);
}

#[test]
fn dense_and_pointwise_convs() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(30);
    // The stem (3x3 stride 2 from RGB), other dense kernels, and 1x1 convs.
    conv_case(&g, &mut rng, [2, 3, 33, 31], 16, (3, 3), 2, 1, false);
    conv_case(&g, &mut rng, [3, 4, 9, 7], 5, (5, 5), 1, 1, true);
    conv_case(&g, &mut rng, [3, 24, 13, 11], 40, (1, 1), 1, 1, false);
    conv_case(&g, &mut rng, [5, 17, 7, 7], 9, (1, 1), 1, 1, true);
    conv_case(&g, &mut rng, [2, 8, 9, 9], 12, (1, 1), 2, 1, false);
    // Small maps with many channels: the weight gradient goes through channel-major copies and
    // one GEMM over all positions (the other cases above: per-image partials).
    for (x, cout) in [([3, 40, 2, 2], 24), ([2, 64, 1, 1], 48)] {
        let geom = ConvGeom::new(&x, &[cout, x[1], 1, 1], (1, 1), (0, 0), 1).unwrap();
        assert!(ghostv3::backend::cuda::conv::pointwise_dw_by_transpose(
            &geom
        ));
        conv_case(&g, &mut rng, x, cout, (1, 1), 1, 1, true);
    }
    let big = ConvGeom::new(&[3, 24, 13, 11], &[40, 24, 1, 1], (1, 1), (0, 0), 1).unwrap();
    assert!(!ghostv3::backend::cuda::conv::pointwise_dw_by_transpose(
        &big
    ));
}

#[test]
fn linear_pool_upsample_concat() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(40);
    for (n, f, o) in [(3, 17, 10), (8, 64, 33)] {
        let x = rand_t(&mut rng, &[n, f], -1.0, 1.0);
        let w = rand_t(&mut rng, &[o, f], -0.5, 0.5);
        let b = rand_t(&mut rng, &[o], -0.5, 0.5);
        let gy = rand_t(&mut rng, &[n, o], -1.0, 1.0);
        let mut tape = Tape::new();
        let (xv, wv, bv) = (
            tape.leaf(x.clone(), true),
            tape.leaf(w.clone(), true),
            tape.leaf(b.clone(), true),
        );
        let y = ops::linear(&mut tape, xv, wv, Some(bv));
        let yt = tape.value(y).clone();
        let gr = tape.backward_with(y, gy.clone());
        let (xb, wb, bb, gyb) = (up(&g, &x), up(&g, &w), up(&g, &b), up(&g, &gy));
        close(
            "linear",
            &down(
                &g,
                &g.linear_forward(&xb, &wb, Some(&bb), (n, f, o)).unwrap(),
            ),
            yt.data(),
            TOL,
        );
        let (dx, dw, db) = g.linear_backward(&xb, &wb, &gyb, (n, f, o)).unwrap();
        close("linear dx", &down(&g, &dx), gr.get(xv).unwrap().data(), TOL);
        close("linear dw", &down(&g, &dw), gr.get(wv).unwrap().data(), TOL);
        close("linear db", &down(&g, &db), gr.get(bv).unwrap().data(), TOL);
    }
    for s in SHAPES {
        let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
        let x = rand_t(&mut rng, &s, -1.0, 1.0);
        let xb = up(&g, &x);
        if h >= 2 && w >= 2 {
            let (y, gy, dx) = cpu_unary(&x, 41, ops::avg_pool2x2);
            close(
                &format!("avg_pool {s:?}"),
                &down(&g, &g.avg_pool2x2(&xb, (n, c, h, w)).unwrap()),
                y.data(),
                TOL,
            );
            close(
                &format!("avg_pool grad {s:?}"),
                &down(
                    &g,
                    &g.avg_pool2x2_backward(&up(&g, &gy), (n, c, h, w)).unwrap(),
                ),
                dx.data(),
                TOL,
            );
        }
        let (y, gy, dx) = cpu_unary(&x, 42, ops::global_avg_pool);
        close(
            &format!("gap {s:?}"),
            &down(&g, &g.global_avg_pool(&xb, n * c, h * w).unwrap()),
            y.data(),
            TOL,
        );
        close(
            &format!("gap grad {s:?}"),
            &down(
                &g,
                &g.global_avg_pool_backward(&up(&g, &gy), n * c, h * w)
                    .unwrap(),
            ),
            dx.data(),
            TOL,
        );
        for (oh, ow) in [(2 * h, 2 * w), (h + 3, 2 * w + 1), ((h / 2).max(1), w)] {
            let (y, gy, dx) = cpu_unary(&x, 43, |t, v| ops::upsample_nearest(t, v, oh, ow));
            close(
                &format!("upsample {s:?}->{oh}x{ow}"),
                &down(
                    &g,
                    &g.upsample_nearest(&xb, (n, c, h, w), (oh, ow)).unwrap(),
                ),
                y.data(),
                TOL,
            );
            close(
                &format!("upsample grad {s:?}->{oh}x{ow}"),
                &down(
                    &g,
                    &g.upsample_nearest_backward(&up(&g, &gy), (n, c, h, w), (oh, ow))
                        .unwrap(),
                ),
                dx.data(),
                TOL,
            );
        }
        let cb = c + 2;
        let b = rand_t(&mut rng, &[n, cb, h, w], -1.0, 1.0);
        let mut tape = Tape::new();
        let (av, bv) = (tape.leaf(x.clone(), true), tape.leaf(b.clone(), true));
        let y = ops::concat_channels(&mut tape, av, bv);
        let yt = tape.value(y).clone();
        let gy = rand_t(&mut rng, yt.shape(), -1.0, 1.0);
        let gr = tape.backward_with(y, gy.clone());
        let dims = (n, c, cb, h * w);
        close(
            &format!("concat {s:?}"),
            &down(&g, &g.concat_channels(&xb, &up(&g, &b), dims).unwrap()),
            yt.data(),
            0.0,
        );
        let (ga, gb) = g.concat_channels_backward(&up(&g, &gy), dims).unwrap();
        close(
            &format!("concat ga {s:?}"),
            &down(&g, &ga),
            gr.get(av).unwrap().data(),
            0.0,
        );
        close(
            &format!("concat gb {s:?}"),
            &down(&g, &gb),
            gr.get(bv).unwrap().data(),
            0.0,
        );
    }
}

#[test]
fn losses() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(50);
    for (n, c) in [(5, 10), (33, 1000), (1, 3)] {
        let z = rand_t(&mut rng, &[n, c], -4.0, 4.0);
        let zb = up(&g, &z);
        let labels: Vec<usize> = (0..n).map(|_| rng.random_range(0..c)).collect();
        for smoothing in [0.0, 0.1] {
            let mut tape = Tape::new();
            let zv = tape.leaf(z.clone(), true);
            let l = ops::cross_entropy(&mut tape, zv, &labels, smoothing);
            let lt = tape.value(l).clone();
            let gr = tape.backward(l);
            let (lb, gb) = g
                .cross_entropy(&zb, &labels, smoothing, (n, c), 1.0)
                .unwrap();
            close(
                &format!("xent {n}x{c} e={smoothing}"),
                &down(&g, &lb),
                lt.data(),
                1e-5,
            );
            close(
                &format!("xent grad {n}x{c} e={smoothing}"),
                &down(&g, &gb),
                gr.get(zv).unwrap().data(),
                1e-5,
            );
        }
        // Soft targets (rows sum to 1, as Mixup makes them).
        let mut q = rand_vec(&mut rng, n * c, 0.01, 1.0);
        for r in q.chunks_mut(c) {
            let s: f32 = r.iter().sum();
            r.iter_mut().for_each(|v| *v /= s);
        }
        let q = Tensor::new(&[n, c], q);
        let mut tape = Tape::new();
        let zv = tape.leaf(z.clone(), true);
        let l = ops::cross_entropy_soft(&mut tape, zv, &q);
        let lt = tape.value(l).clone();
        let gr = tape.backward(l);
        let (lb, gb) = g.cross_entropy_soft(&zb, &up(&g, &q), (n, c), 1.0).unwrap();
        close(
            &format!("xent soft {n}x{c}"),
            &down(&g, &lb),
            lt.data(),
            1e-5,
        );
        close(
            &format!("xent soft grad {n}x{c}"),
            &down(&g, &gb),
            gr.get(zv).unwrap().data(),
            1e-5,
        );
        // KD at two temperatures.
        let zt = rand_t(&mut rng, &[n, c], -4.0, 4.0);
        for t in [1.0, 3.0] {
            let mut tape = Tape::new();
            let zv = tape.leaf(z.clone(), true);
            let l = ops::kd_loss(&mut tape, zv, &zt, t);
            let lt = tape.value(l).clone();
            let gr = tape.backward(l);
            let (lb, gb) = g.kd_loss(&zb, &up(&g, &zt), (n, c), t, 1.0).unwrap();
            close(
                &format!("kd {n}x{c} t={t}"),
                &down(&g, &lb),
                lt.data(),
                1e-5,
            );
            close(
                &format!("kd grad {n}x{c} t={t}"),
                &down(&g, &gb),
                gr.get(zv).unwrap().data(),
                1e-5,
            );
        }
    }
}

/// The fused re-parameterized depth-wise conv against the explicit branches on the CPU
/// (each branch a depth-wise conv + train-mode BN, summed): output, every branch's batch
/// statistics, dx, every branch weight and every BN parameter gradient.
#[test]
fn fused_rep_conv_matches_explicit_branches() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(60);
    let eps = 1e-5;
    for (k, stride, branches, scale, identity, s) in [
        (3, 1, 3, true, true, [4, 12, 14, 14]),
        (3, 2, 3, true, false, [3, 10, 15, 13]),
        (5, 2, 3, true, false, [2, 8, 14, 14]),
        (5, 1, 1, false, true, [2, 6, 9, 7]),
        (3, 1, 5, false, false, [2, 4, 7, 8]),
        (5, 1, 6, true, true, [2, 3, 6, 6]),
        // More than 1024 outputs per channel: the statistics split each channel over blocks.
        (3, 1, 3, true, true, [2, 4, 40, 40]),
        (5, 2, 3, true, false, [2, 4, 66, 64]),
    ] {
        let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
        let geom = RepDwGeom {
            n,
            c,
            h,
            w,
            kh: k,
            kw: k,
            stride,
            branches,
            scale,
            identity,
        };
        let nbt = geom.nbt();
        let x = rand_t(&mut rng, &s, -1.0, 2.0);
        let wk = rand_t(&mut rng, &[branches, c, 1, k * k], -0.5, 0.5);
        let ws = rand_t(&mut rng, &[c, 1, 1, 1], -1.0, 1.0);
        let gamma = rand_t(&mut rng, &[nbt, c], 0.5, 1.5);
        let beta = rand_t(&mut rng, &[nbt, c], -0.5, 0.5);
        let (ho, wo) = geom.out_hw();
        let gy = rand_t(&mut rng, &[n, c, ho, wo], -1.0, 1.0);

        // CPU: explicit branches.
        let mut tape = Tape::new();
        let xv = tape.leaf(x.clone(), true);
        let pad = (k - 1) / 2;
        let mut wvs = Vec::new();
        let mut gbs = Vec::new();
        let mut stats = Vec::new();
        let mut acc: Option<Var> = None;
        let slice = |t: &Tensor, i: usize, len: usize, shape: &[usize]| {
            Tensor::new(shape, t.data()[i * len..(i + 1) * len].to_vec())
        };
        for b in 0..nbt {
            let z = if b < branches {
                let wv = tape.leaf(slice(&wk, b, c * k * k, &[c, 1, k, k]), true);
                wvs.push(wv);
                let a = Conv2dArgs {
                    stride: (stride, stride),
                    padding: (pad, pad),
                    groups: c,
                };
                ops::conv2d(&mut tape, xv, wv, None, a)
            } else if scale && b == branches {
                let wv = tape.leaf(ws.clone(), true);
                wvs.push(wv);
                let a = Conv2dArgs {
                    stride: (stride, stride),
                    padding: (0, 0),
                    groups: c,
                };
                ops::conv2d(&mut tape, xv, wv, None, a)
            } else {
                xv
            };
            let gv = tape.leaf(slice(&gamma, b, c, &[c]), true);
            let bv = tape.leaf(slice(&beta, b, c, &[c]), true);
            gbs.push((gv, bv));
            let (y, st) = ops::batch_norm_train(&mut tape, z, gv, bv, eps);
            stats.push(st);
            acc = Some(match acc {
                None => y,
                Some(a) => ops::add(&mut tape, a, y),
            });
        }
        let y = acc.unwrap();
        let yt = tape.value(y).clone();
        let gr = tape.backward_with(y, gy.clone());

        let case = format!("rep_dw k{k} s{stride} N{branches} scale={scale} id={identity} {s:?}");
        let (xb, wkb, wsb, gb, bb, gyb) = (
            up(&g, &x),
            up(&g, &wk),
            up(&g, &ws),
            up(&g, &gamma),
            up(&g, &beta),
            up(&g, &gy),
        );
        let wsr = scale.then_some(&wsb);
        let (yb, saved) = g
            .rep_dw_forward(&geom, &xb, &wkb, wsr, &gb, &bb, eps)
            .unwrap();
        close(&case, &down(&g, &yb), yt.data(), 5e-4);
        let mean: Vec<f32> = stats
            .iter()
            .flat_map(|s| s.mean().into_iter().map(|v| v as f32))
            .collect();
        let var: Vec<f32> = stats
            .iter()
            .flat_map(|s| s.var().into_iter().map(|v| v as f32))
            .collect();
        let gm: Vec<f32> = g
            .download_f64(&saved.mean)
            .unwrap()
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let gv: Vec<f32> = g
            .download_f64(&saved.var)
            .unwrap()
            .into_iter()
            .map(|v| v as f32)
            .collect();
        close(&format!("{case} means"), &gm, &mean, 1e-5);
        close(&format!("{case} vars"), &gv, &var, 1e-5);
        let rg = g
            .rep_dw_backward(&geom, &xb, &wkb, wsr, &gb, &saved, &gyb, eps)
            .unwrap();
        close(
            &format!("{case} dx"),
            &down(&g, &rg.dx),
            gr.get(xv).unwrap().data(),
            1e-3,
        );
        let dwk: Vec<f32> = wvs[..branches]
            .iter()
            .flat_map(|&v| gr.get(v).unwrap().to_vec())
            .collect();
        close(&format!("{case} dW kxk"), &down(&g, &rg.dwk), &dwk, 1e-3);
        if scale {
            close(
                &format!("{case} dW scale"),
                &down(&g, rg.dws.as_ref().unwrap()),
                gr.get(wvs[branches]).unwrap().data(),
                1e-3,
            );
        }
        let dgamma: Vec<f32> = gbs
            .iter()
            .flat_map(|&(gv, _)| gr.get(gv).unwrap().to_vec())
            .collect();
        let dbeta: Vec<f32> = gbs
            .iter()
            .flat_map(|&(_, bv)| gr.get(bv).unwrap().to_vec())
            .collect();
        close(
            &format!("{case} dgamma"),
            &down(&g, &rg.dgamma),
            &dgamma,
            1e-3,
        );
        close(&format!("{case} dbeta"), &down(&g, &rg.dbeta), &dbeta, 1e-3);
    }
}

/// The DFC gate (last BN apply + sigmoid + upsample + product in one pass) against the
/// unfused ops, forward and backward through the BN.
#[test]
fn dfc_gate_matches_unfused_ops() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(70);
    let eps = 1e-5;
    for s in [[2, 8, 14, 14], [3, 6, 15, 9], [2, 4, 7, 7]] {
        let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
        let (gh, gw) = (h / 2, w / 2);
        let out = rand_t(&mut rng, &s, -1.0, 1.0);
        let gpre = rand_t(&mut rng, &[n, c, gh, gw], -2.0, 2.0);
        let gamma = rand_t(&mut rng, &[c], 0.5, 1.5);
        let beta = rand_t(&mut rng, &[c], -0.5, 0.5);
        let gy = rand_t(&mut rng, &s, -1.0, 1.0);
        let mut tape = Tape::new();
        let (ov, gv) = (tape.leaf(out.clone(), true), tape.leaf(gpre.clone(), true));
        let (gav, bev) = (
            tape.leaf(gamma.clone(), true),
            tape.leaf(beta.clone(), true),
        );
        let (a, _) = ops::batch_norm_train(&mut tape, gv, gav, bev, eps);
        let sg = ops::sigmoid(&mut tape, a);
        let upv = ops::upsample_nearest(&mut tape, sg, h, w);
        let y = ops::mul(&mut tape, ov, upv);
        let yt = tape.value(y).clone();
        let gr = tape.backward_with(y, gy.clone());
        let (ob, gpb, gab, beb, gyb) = (
            up(&g, &out),
            up(&g, &gpre),
            up(&g, &gamma),
            up(&g, &beta),
            up(&g, &gy),
        );
        let bn = g
            .batch_norm_stats(&gpb, &gab, &beb, (n, c, gh * gw), eps)
            .unwrap();
        let yb = g.dfc_gate(&ob, &gpb, &bn, (n, c, h, w), (gh, gw)).unwrap();
        close(&format!("dfc gate {s:?}"), &down(&g, &yb), yt.data(), TOL);
        let (d_out, d_a) = g
            .dfc_gate_backward(&gyb, &ob, &gpb, &bn, (n, c, h, w), (gh, gw))
            .unwrap();
        close(
            &format!("dfc gate d_out {s:?}"),
            &down(&g, &d_out),
            gr.get(ov).unwrap().data(),
            TOL,
        );
        let bg = g
            .batch_norm_backward(&d_a, &gpb, &gab, &bn, (n, c, gh * gw), true)
            .unwrap();
        close(
            &format!("dfc gate d_g {s:?}"),
            &down(&g, &bg.dx),
            gr.get(gv).unwrap().data(),
            1e-3,
        );
        close(
            &format!("dfc gate dgamma {s:?}"),
            &down(&g, &bg.dgamma),
            gr.get(gav).unwrap().data(),
            1e-3,
        );
        close(
            &format!("dfc gate dbeta {s:?}"),
            &down(&g, &bg.dbeta),
            gr.get(bev).unwrap().data(),
            1e-3,
        );
    }
}

/// Fused LAMB + EMA against `optim::Lamb` and `optim::Ema` for a few steps, with tensors over
/// several 16 Ki chunks, no-decay tensors and clipping both on and off.
#[test]
fn fused_lamb_and_ema_match_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(80);
    let layout = Layout::from_shapes(&[
        ("conv.weight", vec![64, 32, 3, 3]),
        ("bn.weight", vec![64]),
        ("bn.bias", vec![64]),
        ("fc.weight", vec![100, 331]),
        ("fc.bias", vec![100]),
        ("dw.weight", vec![7, 1, 5, 5]),
    ]);
    for max_grad_norm in [Some(1.0), None] {
        let opts = LambOptions {
            weight_decay: 0.05,
            max_grad_norm,
            ..Default::default()
        };
        let n = layout.numel();
        let p0 = rand_vec(&mut rng, n, -0.5, 0.5);
        let cfg = EmaConfig {
            decay: 0.9,
            ..Default::default()
        };
        // The one optimizer interface on host tensors and on device tensors.
        let none = Tensor::new(&[0], vec![]);
        let host_p = Tensor::new(&[n], p0.clone());
        let mut p = [host_p.clone(), host_p.to_device(Device::Cuda).unwrap()];
        let mut opt = [
            Lamb::new(layout.clone(), opts.clone()),
            Lamb::new(layout.clone(), opts.clone()),
        ];
        let mut ema = [
            Ema::new(cfg.clone(), &p[0], &none).unwrap(),
            Ema::new(cfg.clone(), &p[1], &none).unwrap(),
        ];
        for step in 0..3 {
            let grads = Tensor::new(&[n], rand_vec(&mut rng, n, -0.1, 0.1));
            let lr = 5e-3 * (step + 1) as f64;
            for k in 0..2 {
                let e = Some((&mut ema[k], &none));
                opt[k].step(&mut p[k], &grads, lr, e).unwrap();
            }
            let case = format!("lamb clip={max_grad_norm:?} step {step}");
            let host = |t: &Tensor| t.to_host().into_vec();
            close(&format!("{case} params"), &host(&p[1]), &host(&p[0]), 1e-6);
            let (s_cpu, s_dev) = (opt[0].state(), opt[1].state());
            for ((name, c), (_, d)) in s_cpu.iter().zip(&s_dev) {
                close(&format!("{case} {name}"), d, c, 1e-6);
            }
            let (e_cpu, e_dev) = (host(ema[0].params()), host(ema[1].params()));
            close(&format!("{case} ema"), &e_dev, &e_cpu, 1e-6);
        }
    }
    let _ = &g;
}

/// Views into one flat buffer (as parameters and gradients live): kernels read a weight view,
/// write through a gradient view, and nothing outside the view changes.
#[test]
fn views_into_flat_buffers() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(85);
    let (c, k) = (6, 3);
    let x = rand_t(&mut rng, &[2, c, 9, 8], -1.0, 1.0);
    let w = rand_t(&mut rng, &[c, 1, k, k], -0.5, 0.5);
    // flat = [17 other values | w | 5 other values]
    let mut flat = rand_vec(&mut rng, 17, -1.0, 1.0);
    flat.extend_from_slice(w.data());
    flat.extend(rand_vec(&mut rng, 5, -1.0, 1.0));
    let fb = g.upload(&flat).unwrap();
    let wv = fb.view(17, w.numel());
    close("download of a view", &down(&g, &wv), w.data(), 0.0);
    let geom = ConvGeom::new(x.shape(), w.shape(), (1, 1), (1, 1), c).unwrap();
    let xb = up(&g, &x);
    let y_view = g.conv2d_forward(&geom, &xb, &wv, None).unwrap();
    let y_own = g.conv2d_forward(&geom, &xb, &up(&g, &w), None).unwrap();
    close(
        "conv with a view weight",
        &down(&g, &y_view),
        &down(&g, &y_own),
        0.0,
    );
    // Accumulate into the middle of a flat gradient buffer.
    let mut grads = g.upload(&flat).unwrap();
    {
        let mut gv = grads.view_mut(17, w.numel());
        let add = up(&g, &w);
        g.add_assign(&mut gv, &add).unwrap();
    }
    let mut want = flat.clone();
    for (i, v) in w.data().iter().enumerate() {
        want[17 + i] += v;
    }
    close("add_assign through a view", &down(&g, &grads), &want, 0.0);
    grads = g.upload(&want).unwrap();
    g.upload_into(w.data(), &mut grads.view_mut(17, w.numel()))
        .unwrap();
    close("upload into a view", &down(&g, &grads), &flat, 0.0);
}

/// Many tensors (whole buffers and views, odd lengths) into places of one flat buffer in one
/// launch, as the flat gradient is gathered; untouched places keep their values.
#[test]
fn segments_copy_into_a_flat_buffer() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(91);
    let lens = [1usize, 7, 300, 1025, 33, 4096, 5];
    let srcs: Vec<Vec<f32>> = lens
        .iter()
        .map(|&n| rand_vec(&mut rng, n + 3, -1.0, 1.0))
        .collect();
    let bufs: Vec<DBuf> = srcs.iter().map(|v| g.upload(v).unwrap()).collect();
    // Views from element 2 of each source, placed with gaps between them.
    let mut offs = Vec::new();
    let mut at = 4;
    for &n in &lens {
        offs.push(at);
        at += n + 2;
    }
    let base = rand_vec(&mut rng, at + 4, -1.0, 1.0);
    let mut flat = g.upload(&base).unwrap();
    let views: Vec<_> = bufs.iter().zip(&lens).map(|(b, &n)| b.view(2, n)).collect();
    let segs: Vec<(&DBuf, usize)> = views.iter().zip(&offs).map(|(v, &o)| (&**v, o)).collect();
    g.copy_segments(&segs, &mut flat).unwrap();
    let mut want = base.clone();
    for ((src, &n), &o) in srcs.iter().zip(&lens).zip(&offs) {
        want[o..o + n].copy_from_slice(&src[2..2 + n]);
    }
    close("copy_segments", &down(&g, &flat), &want, 0.0);
    let too_far = [(&*views[0], at + 4)];
    assert!(g.copy_segments(&too_far, &mut flat).is_err());
}

/// One CPU training step's loss, logits and flat parameter gradient (train mode, no dropout).
fn cpu_step(
    m: &mut models::Model,
    x: &Tensor,
    labels: &[usize],
    smoothing: f64,
) -> (f32, Tensor, Vec<f32>) {
    let mut tape = Tape::new();
    let xv = tape.constant(x.clone());
    let (lg, leaves) = m.forward(&mut tape, xv, Mode::Train { dropout: false }, None);
    let lv = ops::cross_entropy(&mut tape, lg, labels, smoothing);
    let (loss, logits) = (tape.value(lv).data()[0], tape.value(lg).clone());
    let grads = tape.backward(lv);
    (
        loss,
        logits,
        leaves.flat_grads(m.state(), &grads).into_vec(),
    )
}

/// The whole training step of GhostNetV3 (train form: 3 kxk branches + 1x1 + identity, DFC,
/// SE) on the GPU against the CPU: logits, loss, the gradient of every parameter, BN running
/// statistics, and the parameters and EMA after the fused LAMB + EMA step.
#[test]
fn whole_training_step_matches_cpu() {
    let Some(_g) = gpu() else { return };
    let opts = ModelOptions {
        num_classes: 10,
        drop_rate: 0.0,
        seed: 3,
        ..Default::default()
    };
    let mut rng = StdRng::seed_from_u64(95);
    // 128x128: the smallest maps are 4x4 (DFC 2x2). At 64x64 the DFC BNs normalize 2 values
    // per channel and the CPU's own gradients move by 6% when the input moves by 1e-6.
    let x = rand_t(&mut rng, &[2, 3, 128, 128], -2.0, 2.0);
    let labels = [3usize, 7];
    let (smoothing, lr, decay) = (0.1, 5e-3, 0.99);
    let lopts = LambOptions {
        weight_decay: 0.05,
        ..Default::default()
    };

    // CPU reference step.
    let mut cpu = models::create("ghostnetv3_050", &opts).unwrap();
    let (loss_cpu, logits_cpu, flat_cpu) = cpu_step(&mut cpu, &x, &labels, smoothing);
    // The CPU's own sensitivity: the same step with every input value moved by one ulp up or
    // down at random, four times. A ReLU-family network with batch-statistics BN at random init
    // is chaotic in f32: a pre-activation within rounding of a kink flips, and a 1x1 depth-wise
    // conv followed by its own BN has a true gradient of zero (scale invariance), so what it
    // shows is the rounding of a cancellation. Summation order on the GPU perturbs every layer
    // the same way, so the GPU may differ from the CPU as much as the CPU differs from itself
    // (measured: one-ulp inputs move some CPU gradients by 1% of the largest).
    // LAMB + EMA on the CPU from a gradient: the parameters and EMA after the step.
    let p0 = cpu.state().params.flat().to_vec();
    let layout = Layout::from_store(&cpu.state().params);
    let ema_cfg = EmaConfig {
        decay,
        ..Default::default()
    };
    let update = |g: &[f32]| {
        let mut p = Tensor::new(&[p0.len()], p0.clone());
        let none = Tensor::new(&[0], vec![]);
        let mut ema = Ema::new(ema_cfg.clone(), &p, &none).unwrap();
        let g = Tensor::new(&[g.len()], g.to_vec());
        let mut lamb = Lamb::new(layout.clone(), lopts.clone());
        lamb.step(&mut p, &g, lr, Some((&mut ema, &none))).unwrap();
        (p.into_vec(), ema.params().to_host().into_vec())
    };
    let (p_cpu, ema_cpu) = update(&flat_cpu);
    let mut spread = [
        vec![0.0f64; flat_cpu.len()],
        vec![0.0f64; p_cpu.len()],
        vec![0.0f64; p_cpu.len()],
    ];
    for k in 0..4 {
        let mut prng = StdRng::seed_from_u64(500 + k);
        let moved: Vec<f32> = x
            .data()
            .iter()
            .map(|&v| {
                if prng.random::<bool>() {
                    v.next_up()
                } else {
                    v.next_down()
                }
            })
            .collect();
        let mut m = models::create("ghostnetv3_050", &opts).unwrap();
        let (_, _, g) = cpu_step(&mut m, &Tensor::new(x.shape(), moved), &labels, smoothing);
        let (p, e) = update(&g);
        for (s, (a, b)) in spread
            .iter_mut()
            .zip([(&g, &flat_cpu), (&p, &p_cpu), (&e, &ema_cpu)])
        {
            for ((s, &u), &v) in s.iter_mut().zip(a).zip(b) {
                *s = s.max((u as f64 - v as f64).abs());
            }
        }
    }

    // GPU: the one training step (train::step: forward and backward through the dispatching
    // ops, the fused rep_conv, LAMB + EMA on the device), then everything compared.
    let mut dev = models::create("ghostnetv3_050", &opts).unwrap();
    dev.state_mut().place_on(Device::Cuda).unwrap();
    let ema = Ema::new(
        ema_cfg.clone(),
        dev.state().params.tensor(),
        dev.state().buffers.tensor(),
    )
    .unwrap();
    let mut cfg = OptimizerConfig::new(OptimizerKind::Lamb);
    cfg.weight_decay = Some(lopts.weight_decay);
    let mut update = Update::new(&cfg, &layout, Some(ema)).unwrap();
    let targets = step::Targets::Labels {
        labels: &labels,
        smoothing,
    };
    let loss = step::Loss::ce(targets);
    let out = step::step(&mut dev, &mut update, &x, loss, false, None, lr).unwrap();
    let logits_dev = out.logits.to_host();
    close("step logits", logits_dev.data(), logits_cpu.data(), 1e-4);
    close("step loss", &[out.loss as f32], &[loss_cpu], 1e-5);
    // Running statistics were updated on the device.
    let host = dev.state().to_host().unwrap();
    close(
        "step running stats",
        host.buffers.flat(),
        cpu.state().buffers.flat(),
        1e-4,
    );
    let entries = cpu.state().params.entries();
    let fg = out.grads.as_ref().unwrap().to_host().into_vec();
    let global = flat_cpu
        .iter()
        .fold(0.0f64, |m, &v| m.max((v as f64).abs()));
    within_spread(
        "gradient",
        entries,
        &fg,
        &flat_cpu,
        &spread[0],
        1e-4 * global,
    );
    // LAMB's first step is lr * trust * sign(g): a gradient whose sign is rounding noise (the
    // scale-invariant convs above) moves its weight either way, hence the same envelope.
    within_spread(
        "parameter",
        entries,
        host.params.flat(),
        &p_cpu,
        &spread[1],
        1e-4,
    );
    let ema_gpu = update.ema_tensors().unwrap().0.to_host().into_vec();
    within_spread("EMA", entries, &ema_gpu, &ema_cpu, &spread[2], 1e-4);
}

/// Per tensor: the GPU's largest error against the CPU's own one-ulp spread (x3, since the GPU
/// perturbs every layer, not only the input), with an absolute floor for plain summation-order
/// rounding. Prints the closest tensors and fails naming every tensor outside.
fn within_spread(
    what: &str,
    entries: &[ghostv3::nn::params::Entry],
    gpu: &[f32],
    cpu: &[f32],
    spread: &[f64],
    floor: f64,
) {
    let mut rows = Vec::new();
    for e in entries {
        let r = e.offset..e.offset + e.numel();
        let err = gpu[r.clone()]
            .iter()
            .zip(&cpu[r.clone()])
            .fold(0.0f64, |m, (&p, &q)| m.max((p as f64 - q as f64).abs()));
        assert!(err.is_finite(), "{}: non-finite {what}", e.name);
        let own = spread[r].iter().fold(0.0f64, |m, &v| m.max(v));
        rows.push((err / (3.0 * own).max(floor), err, own, e.name.clone()));
    }
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    for r in rows.iter().take(5) {
        println!(
            "step {what} {}: err {:.2e}, CPU's own one-ulp spread {:.2e} ({:.2} of the limit)",
            r.3, r.1, r.2, r.0
        );
    }
    let bad: Vec<&String> = rows.iter().filter(|r| r.0 > 1.0).map(|r| &r.3).collect();
    assert!(
        bad.is_empty(),
        "{what}s outside the CPU's own one-ulp spread (x3) or {floor:.1e}: {bad:?}"
    );
}

/// `ghostv3 train --device cuda` end to end (pinned-buffer prefetcher, BN statistics and EMA on
/// the device, evaluation there, host copies synced for the checkpoint and the fold) against the
/// same run on the CPU; then the GPU run's checkpoint resumes on the CPU.
#[test]
fn train_command_on_the_device_matches_the_cpu() {
    let Some(_g) = gpu() else { return };
    let root = std::env::temp_dir().join(format!("ghostv3-train-cuda-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    // Two steps of batch 2 at 40 px (DFC's stride-32 maps 2x2), evaluation on 2 images.
    let sets = [
        "data.synthetic_train=4",
        "data.synthetic_val=2",
        "data.synthetic_size=40",
        "augment.size=40",
        "eval.size=40",
        "train.epochs=1",
        "schedule.epochs=1",
        "train.batch_size=2",
        "train.eval_batch_size=2",
    ];
    let run = |device: &str, extra: &[&str]| {
        let mut args = vec!["train".to_string(), "--device".into(), device.into()];
        for s in sets {
            args.extend(["--set".to_string(), s.to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_ghostv3"))
            .args(&args)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "train --device {device}: {out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    };
    let metrics = |dir: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (cpu_dir, gpu_dir) = (root.join("cpu"), root.join("cuda"));
    run("cpu", &["--out", cpu_dir.to_str().unwrap()]);
    let out = run("cuda", &["--out", gpu_dir.to_str().unwrap()]);
    assert!(out.contains("device: CUDA"), "{out}");
    let (c, d) = (&metrics(&cpu_dir)[0], &metrics(&gpu_dir)[0]);
    println!("cpu {c}\ncuda {d}");
    let rel = |k: &str| {
        let (a, b) = (c[k].as_f64().unwrap(), d[k].as_f64().unwrap());
        (a - b).abs() / a.abs()
    };
    // The mean loss of the two steps: the first is the initial weights' forward; the second
    // follows a LAMB step (lr * trust * sign(g) at first) on gradients equal up to rounding.
    assert!(rel("train_loss") < 1e-4, "train loss: {c} vs {d}");
    // After two sign-like steps, rounding-level gradient differences of the scale-invariant
    // convs move some weights either way (see whole_training_step_matches_cpu).
    assert!(rel("val_loss") < 2e-2, "val loss: {c} vs {d}");
    for f in [
        "checkpoint.safetensors",
        "best.safetensors",
        "deploy.safetensors",
    ] {
        assert!(gpu_dir.join(f).is_file(), "{f} missing");
    }
    // The checkpoint is the CPU run's format: the GPU run resumes on the CPU for an epoch.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ghostv3"))
        .args([
            "train",
            "--device",
            "cpu",
            "--resume",
            gpu_dir.to_str().unwrap(),
        ])
        .args(["--set", "train.epochs=2", "--set", "schedule.epochs=2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = metrics(&gpu_dir);
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(m[1]["train_loss"].as_f64().unwrap().is_finite());
    let _ = std::fs::remove_dir_all(&root);
}

/// A loop that allocates the same shapes every step stops asking the driver for memory.
#[test]
fn caching_allocator_reuses_buffers() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(90);
    let x = rand_t(&mut rng, &[4, 16, 28, 28], -1.0, 1.0);
    let gamma = rand_t(&mut rng, &[16], 0.5, 1.5);
    let beta = rand_t(&mut rng, &[16], -0.5, 0.5);
    let (xb, gb, bb) = (up(&g, &x), up(&g, &gamma), up(&g, &beta));
    let step = || {
        let (y, saved) = g
            .batch_norm_train(&xb, &gb, &bb, (4, 16, 784), 1e-5)
            .unwrap();
        let r = g.relu(&y).unwrap();
        let bg = g
            .batch_norm_backward(&r, &xb, &gb, &saved, (4, 16, 784), true)
            .unwrap();
        g.download(&bg.dx).unwrap()
    };
    let first = step();
    let before = g.pool_stats().device_allocs;
    for _ in 0..5 {
        assert_eq!(step(), first, "same inputs, same bits");
    }
    assert_eq!(
        g.pool_stats().device_allocs,
        before,
        "steps after the first allocated device memory"
    );
}

/// `ghostv3 info --device cuda`: without CUDA a clear one-line reason and a failing exit (no
/// panic); with a GPU its name and all kernel modules compiled and loaded.
#[test]
fn info_device_cuda() {
    // GHOSTV3_BIN: the binary when this test runs away from its build tree (scripts/gpu-check.sh).
    let bin = std::env::var("GHOSTV3_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ghostv3").into());
    let out = std::process::Command::new(bin)
        .args([
            "info",
            "--model",
            "ghostnetv3_050",
            "--size",
            "64",
            "--device",
            "cuda",
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    match unavailable_reason() {
        Some(why) => {
            assert!(!out.status.success(), "{text}");
            assert!(text.contains(&why), "expected {why:?} in:\n{text}");
            println!("skipped GPU part: no CUDA device ({why})");
        }
        None => {
            assert!(out.status.success(), "{text}");
            let n = ghostv3::backend::cuda::sources::MODULES.len();
            assert!(
                text.contains(&format!("kernels: {n} modules compile and load")),
                "{text}"
            );
        }
    }
}

/// Without a GPU, every test above on the CPU emulator (~2.5 min on 2 cores, most of it the
/// whole training step and the train command).
#[test]
fn cpu_emulator_runs_every_gpu_test() {
    run_on_emulator(&[]);
}
