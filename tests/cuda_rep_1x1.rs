//! The fused re-parameterized 1x1 conv in training (cuda/rep_conv_1x1.cu: one folded conv from
//! the input's per-channel mean and covariance) against the explicit branches: each branch a
//! 1x1 conv + train-mode BN, plus the BN identity, summed in timm's order (identity first). On
//! fresh random inputs at several shapes (odd sizes, Cin != Cout, with and without identity,
//! 1 to 3 branches, a batch over the GEMM chunk, a large input mean): the output, every
//! branch's batch statistics, and the gradients of x, every weight, gamma and beta; against the
//! CPU. The test GPU's
//! buffers are poisoned with NaN, so an unwritten element fails. Without a GPU each test prints
//! `skipped: no CUDA device (...)`, and the last test runs them all on the CPU emulator.

mod common;

use common::cuda::*;
use ghostv3::backend::cuda::rep_1x1::Rep1x1Geom;
use ghostv3::ops::{self, BatchStats, Conv2dArgs};
use ghostv3::{Tape, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;

const EPS: f64 = 1e-5;

/// (n, cin, cout, h, w, branches, identity, input offset)
type Case = (usize, usize, usize, usize, usize, usize, bool, f32);

const CASES: [Case; 8] = [
    (2, 6, 6, 5, 7, 3, true, 0.0),
    (3, 5, 9, 7, 3, 1, false, 0.0),
    (1, 12, 12, 9, 11, 2, true, 0.0),
    (2, 10, 7, 6, 6, 3, false, 0.0),
    // More than one chunk of the batched GEMMs that reduce over the batch.
    (10, 6, 6, 3, 3, 2, true, 0.0),
    (9, 4, 6, 3, 3, 2, false, 0.0),
    // More than 1024 positions per channel: the mean splits each channel over blocks.
    (2, 4, 4, 30, 30, 3, true, 0.0),
    // A mean 10x the spread: the covariance must come from the centred input.
    (3, 7, 5, 5, 5, 2, false, 6.0),
];

struct Inputs {
    x: Tensor,
    /// [NB, Cout, Cin]
    w: Tensor,
    /// [NBT, Cout]
    gamma: Tensor,
    beta: Tensor,
    gy: Tensor,
}

fn inputs(rng: &mut StdRng, c: &Case) -> Inputs {
    let &(n, cin, cout, h, w, nb, id, off) = c;
    let nbt = nb + id as usize;
    let mut x = rand_t(rng, &[n, cin, h, w], -1.0, 1.0);
    x.data_mut().iter_mut().for_each(|v| *v += off);
    Inputs {
        x,
        w: rand_t(rng, &[nb, cout, cin], -0.5, 0.5),
        gamma: rand_t(rng, &[nbt, cout], 0.5, 1.5),
        beta: rand_t(rng, &[nbt, cout], -0.5, 0.5),
        gy: rand_t(rng, &[n, cout, h, w], -1.0, 1.0),
    }
}

fn slice(t: &Tensor, i: usize, shape: &[usize]) -> Tensor {
    let len: usize = shape.iter().product();
    Tensor::new(shape, t.data()[i * len..(i + 1) * len].to_vec())
}

/// The explicit branches on a tape: the output, the batch statistics (branches, then the
/// identity) and the leaves.
struct Explicit {
    y: Var,
    stats: Vec<BatchStats>,
    x: Var,
    ws: Vec<Var>,
    bns: Vec<(Var, Var)>,
}

/// The explicit branches on the tape (CPU or device tensors): identity first, then the 1x1
/// conv + BN branches, summed.
fn explicit(tape: &mut Tape, inp: &Inputs, c: &Case, on: fn(Tensor) -> Tensor) -> Explicit {
    let &(_, cin, cout, _, _, nb, id, _) = c;
    let xv = tape.leaf(on(inp.x.clone()), true);
    let ws: Vec<Var> = (0..nb)
        .map(|b| tape.leaf(on(slice(&inp.w, b, &[cout, cin, 1, 1])), true))
        .collect();
    let bns: Vec<(Var, Var)> = (0..nb + id as usize)
        .map(|b| {
            let g = tape.leaf(on(slice(&inp.gamma, b, &[cout])), true);
            let be = tape.leaf(on(slice(&inp.beta, b, &[cout])), true);
            (g, be)
        })
        .collect();
    let mut stats = vec![None; nb + id as usize];
    let mut acc: Option<Var> = None;
    let mut add = |tape: &mut Tape, y: Var| {
        acc = Some(match acc {
            None => y,
            Some(a) => ops::add(tape, a, y),
        })
    };
    if id {
        let (y, st) = ops::batch_norm_train(tape, xv, bns[nb].0, bns[nb].1, EPS);
        stats[nb] = Some(st);
        add(tape, y);
    }
    let a = Conv2dArgs {
        stride: (1, 1),
        padding: (0, 0),
        groups: 1,
    };
    for b in 0..nb {
        let z = ops::conv2d(tape, xv, ws[b], None, a);
        let (y, st) = ops::batch_norm_train(tape, z, bns[b].0, bns[b].1, EPS);
        stats[b] = Some(st);
        add(tape, y);
    }
    let stats = stats.into_iter().map(|s| s.unwrap()).collect();
    Explicit {
        y: acc.unwrap(),
        stats,
        x: xv,
        ws,
        bns,
    }
}

fn host_stats(stats: &[BatchStats]) -> (Vec<f32>, Vec<f32>) {
    let f = |pick: fn(&BatchStats) -> &Vec<f64>| -> Vec<f32> {
        stats
            .iter()
            .flat_map(|s| pick(s).iter().map(|&v| v as f32))
            .collect()
    };
    (f(|s| &s.mean), f(|s| &s.var))
}

/// Gradients of the leaves on the host, concatenated.
fn grads_of(gr: &ghostv3::autograd::Grads<f32>, vs: &[Var]) -> Vec<f32> {
    vs.iter()
        .flat_map(|&v| gr.get(v).unwrap().to_host().to_vec())
        .collect()
}

/// The launchers against the explicit branches on the CPU.
#[test]
fn fused_rep_1x1_matches_explicit_branches() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(300);
    for c in CASES {
        let (n, cin, cout, h, w, nb, id, off) = c;
        let geom = Rep1x1Geom {
            n,
            cin,
            cout,
            hw: h * w,
            branches: nb,
            identity: id,
        };
        let inp = inputs(&mut rng, &c);
        let mut tape = Tape::new();
        let Explicit {
            y,
            stats,
            x: xv,
            ws,
            bns,
        } = explicit(&mut tape, &inp, &c, |t| t);
        let yt = tape.value(y).clone();
        let gr = tape.backward_with(y, inp.gy.clone());

        let case = format!("rep_1x1 {n}x{cin}->{cout} {h}x{w} N{nb} id={id} off={off}");
        let (xb, wb, gb, bb, gyb) = (
            up(&g, &inp.x),
            up(&g, &inp.w),
            up(&g, &inp.gamma),
            up(&g, &inp.beta),
            up(&g, &inp.gy),
        );
        let (yb, saved) = g.rep_1x1_forward(&geom, &xb, &wb, &gb, &bb, EPS).unwrap();
        close(&case, &down(&g, &yb), yt.data(), 5e-4);
        let (mean, var) = host_stats(&stats);
        let f32s = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        let gm = f32s(g.download_f64(&saved.mean).unwrap());
        let gv = f32s(g.download_f64(&saved.var).unwrap());
        close(&format!("{case} means"), &gm, &mean, 1e-5);
        close(&format!("{case} vars"), &gv, &var, 1e-5);
        let r = g.rep_1x1_backward(&geom, &wb, &saved, &gyb).unwrap();
        close(
            &format!("{case} dx"),
            &down(&g, &r.dx),
            &grads_of(&gr, &[xv]),
            1e-3,
        );
        close(
            &format!("{case} dW"),
            &down(&g, &r.dw),
            &grads_of(&gr, &ws),
            1e-3,
        );
        let gammas: Vec<Var> = bns.iter().map(|p| p.0).collect();
        let betas: Vec<Var> = bns.iter().map(|p| p.1).collect();
        close(
            &format!("{case} dgamma"),
            &down(&g, &r.dgamma),
            &grads_of(&gr, &gammas),
            1e-3,
        );
        close(
            &format!("{case} dbeta"),
            &down(&g, &r.dbeta),
            &grads_of(&gr, &betas),
            1e-3,
        );
    }
}

#[test]
fn cpu_emulator_runs_every_gpu_test() {
    run_on_emulator(&[]);
}
