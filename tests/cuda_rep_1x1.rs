//! The fused re-parameterized 1x1 conv in training (cuda/rep_conv_1x1.cu: one folded conv from
//! the input's per-channel mean and covariance) against the explicit branches: each branch a
//! 1x1 conv + train-mode BN, plus the BN identity, summed in timm's order (identity first). On
//! fresh random inputs at several shapes (odd sizes, Cin != Cout, with and without identity,
//! 1 to 3 branches, a batch over the GEMM chunk, a large input mean): the output, every
//! branch's batch statistics, and the gradients of x, every weight, gamma and beta; against the
//! CPU and against the unfused path on the GPU; and RepConv's dispatch to it. The test GPU's
//! buffers are poisoned with NaN, so an unwritten element fails. Without a GPU each test prints
//! `skipped: no CUDA device (...)`, and the last test runs them all on the CPU emulator.

mod common;

use common::cuda::*;
use ghostv3::backend::api::HostStats;
use ghostv3::backend::cuda::Rep1x1Geom;
use ghostv3::nn::rep_conv::{RepConv, RepOptions, RepSpec};
use ghostv3::nn::{Builder, Ctx, Mode, State};
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
    // Batches in chunks of the GEMMs that reduce over the batch (10 = 4 + 4 + 2, 9 = 4 + 4 + 1).
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
    let h: Vec<HostStats> = stats.iter().map(|s| s.to_host().unwrap()).collect();
    let f = |pick: fn(&HostStats) -> &Vec<f64>| -> Vec<f32> {
        h.iter()
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
            // Larger batches in chunks of 4 (the last one shorter): the accumulating GEMMs.
            chunk: if n > 4 { 4 } else { 0 },
        };
        let inp = inputs(&mut rng, &c);
        let mut tape = Tape::new();
        let e = explicit(&mut tape, &inp, &c, |t| t);
        let yt = tape.value(e.y).clone();
        let gr = tape.backward_with(e.y, inp.gy.clone());

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
        let (mean, var) = host_stats(&e.stats);
        let f32s = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        let gm = f32s(g.download_f64(&saved.mean).unwrap());
        let gv = f32s(g.download_f64(&saved.var).unwrap());
        close(&format!("{case} means"), &gm, &mean, 1e-5);
        close(&format!("{case} vars"), &gv, &var, 1e-5);
        let r = g.rep_1x1_backward(&geom, &wb, &saved, &gyb).unwrap();
        let gammas: Vec<Var> = e.bns.iter().map(|p| p.0).collect();
        let betas: Vec<Var> = e.bns.iter().map(|p| p.1).collect();
        for (what, got, leaves) in [
            ("dx", &r.dx, &[e.x][..]),
            ("dW", &r.dw, &e.ws),
            ("dgamma", &r.dgamma, &gammas),
            ("dbeta", &r.dbeta, &betas),
        ] {
            let want = grads_of(&gr, leaves);
            close(&format!("{case} {what}"), &down(&g, got), &want, 1e-3);
        }
    }
}

/// The tape op on device tensors against the unfused GPU path (1x1 convs and BNs on the
/// device), on the same device leaves: output, statistics, every gradient.
#[test]
fn rep_conv_1x1_op_matches_unfused_gpu_path() {
    let Some(_g) = dispatch_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(310);
    for c in [CASES[0], CASES[1], CASES[3], CASES[7]] {
        let (n, cin, cout, h, w, nb, id, off) = c;
        let inp = inputs(&mut rng, &c);
        let on = |t: Tensor| t.to_cuda().unwrap();
        let case = format!("rep_conv_1x1 op {n}x{cin}->{cout} {h}x{w} N{nb} id={id} off={off}");

        let mut tape = Tape::new();
        let Explicit {
            y,
            stats,
            x: xv,
            ws,
            bns,
        } = explicit(&mut tape, &inp, &c, on);
        assert!(tape.value(y).is_cuda(), "the unfused path left the device");
        let yt = tape.value(y).to_host();
        let gr = tape.backward_with(y, inp.gy.clone());

        let mut tape2 = Tape::new();
        tape2.enable_profile();
        // Leaves on a second tape with the same device values.
        let leaf = |tape2: &mut Tape, v: Var, src: &Tape| tape2.leaf(src.value(v).clone(), true);
        let xf = leaf(&mut tape2, xv, &tape);
        let wf: Vec<Var> = ws.iter().map(|&v| leaf(&mut tape2, v, &tape)).collect();
        let bf: Vec<(Var, Var)> = bns
            .iter()
            .map(|&(a, b)| (leaf(&mut tape2, a, &tape), leaf(&mut tape2, b, &tape)))
            .collect();
        let (yf, stf) = ops::rep_conv_1x1(&mut tape2, xf, &wf, id, &bf, EPS);
        assert!(tape2.value(yf).is_cuda(), "the fused op left the device");
        let ops_run: Vec<&str> = tape2.profile().unwrap().ops.keys().copied().collect();
        assert_eq!(ops_run, ["rep_conv_1x1"], "{case}: ops on the tape");
        close(&case, tape2.value(yf).to_host().data(), yt.data(), 5e-4);
        let (m0, v0) = host_stats(&stats);
        let (m1, v1) = host_stats(&stf);
        close(&format!("{case} means"), &m1, &m0, 1e-5);
        close(&format!("{case} vars"), &v1, &v0, 1e-5);
        assert!(stf.iter().all(|s| s.count == n * h * w), "{case}: counts");
        let gf = tape2.backward_with(yf, inp.gy.clone());
        for (what, a, b) in [
            ("dx", vec![xf], vec![xv]),
            ("dW", wf.clone(), ws.clone()),
            (
                "dgamma",
                bf.iter().map(|p| p.0).collect(),
                bns.iter().map(|p| p.0).collect(),
            ),
            (
                "dbeta",
                bf.iter().map(|p| p.1).collect(),
                bns.iter().map(|p| p.1).collect(),
            ),
        ] {
            assert!(
                gf.get(a[0]).unwrap().is_cuda(),
                "{case} {what}: on the host"
            );
            close(
                &format!("{case} {what}"),
                &grads_of(&gf, &a),
                &grads_of(&gr, &b),
                1e-3,
            );
        }
    }
}

/// One train-mode forward + backward of a RepConv: output, dx, flat parameter gradients and the
/// state after (running statistics, counters); on the device when `cuda` (the running
/// statistics too when `device_stats`), with the ops run.
fn rep_step(
    rc: &RepConv,
    state: &State,
    x: &Tensor,
    gy: &Tensor,
    cuda: bool,
    device_stats: bool,
) -> RepStep {
    let mut st = state.clone();
    match (cuda, device_stats) {
        (true, true) => st.place_on(ghostv3::tensor::Device::Cuda).unwrap(),
        (true, false) => st.params.to_device(ghostv3::tensor::Device::Cuda).unwrap(),
        _ => {}
    }
    let mut tape = Tape::new();
    tape.enable_profile();
    let xv = leaf_on(&mut tape, x, cuda);
    let mut ctx = Ctx::new(&mut tape, &mut st, Mode::Train { dropout: false }, None);
    let y = rc.forward(&mut ctx, xv);
    let leaves = ctx.into_leaves();
    // The forward's ops, before the backward adds its own.
    let ops_run = tape
        .profile()
        .unwrap()
        .ops
        .keys()
        .map(|s| s.to_string())
        .collect();
    let (yt, dx, flat) = backward_to_host("rep step", &mut tape, (y, xv), gy, (&leaves, &st), cuda);
    if cuda {
        st = st.to_host().unwrap();
    }
    RepStep {
        y: yt,
        dx,
        grads: flat,
        state: st,
        ops: ops_run,
    }
}

struct RepStep {
    y: Tensor,
    dx: Tensor,
    grads: Vec<f32>,
    state: State,
    ops: Vec<String>,
}

/// RepConv in training on device tensors dispatches a 1x1 (groups 1, stride 1) re-parameterized
/// conv to the fused op (where it pays) and matches the CPU's explicit branches: output, dx, every parameter
/// gradient, running statistics, batch counters.
#[test]
fn rep_conv_dispatches_1x1_to_the_fused_op() {
    let Some(_g) = dispatch_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(320);
    for (cin, cout, branches, identity, s) in [
        (8, 8, 3, true, [2, 8, 7, 9]),
        (6, 10, 2, true, [3, 6, 5, 5]),
        (10, 6, 3, false, [2, 10, 5, 6]),
        (12, 12, 1, false, [2, 12, 6, 5]),
    ] {
        let mut b = Builder::new(321);
        let spec = RepSpec {
            train_prefix: "r",
            deploy_name: "d",
            bn_name: "b",
            cin,
            cout,
            k: 1,
            stride: 1,
            groups: 1,
        };
        let opts = RepOptions {
            branches,
            scale: true,
            identity,
        };
        let rc = RepConv::new(&mut b, &spec, opts, false);
        let mut state = b.finish();
        randomize_bns(&mut state, &mut rng);
        let geom = Rep1x1Geom {
            n: s[0],
            cin,
            cout,
            hw: s[2] * s[3],
            branches,
            identity: identity && cin == cout,
            chunk: 0,
        };
        let x = rand_t(&mut rng, &s, -2.0, 2.0);
        let gy = rand_t(&mut rng, &[s[0], cout, s[2], s[3]], -1.0, 1.0);
        let case = format!("RepConv 1x1 {cin}->{cout} N{branches} id={identity} {s:?}");
        let cpu = rep_step(&rc, &state, &x, &gy, false, false);
        for device_stats in [false, true] {
            let dev = rep_step(&rc, &state, &x, &gy, true, device_stats);
            let case = format!("{case} device stats={device_stats}");
            // The fused op where it is estimated to pay (one branch and no identity: not).
            let fused = dev.ops.iter().any(|o| o == "rep_conv_1x1");
            let bn = dev.ops.iter().any(|o| o.starts_with("batch_norm"));
            assert!(
                fused == geom.fused_pays() && fused != bn && fused == (branches > 1 || identity),
                "{case}: fused path {} expected, ran {:?}",
                geom.fused_pays(),
                dev.ops
            );
            close(&case, dev.y.data(), cpu.y.data(), 5e-4);
            close(&format!("{case} dx"), dev.dx.data(), cpu.dx.data(), 1e-3);
            close(&format!("{case} dparams"), &dev.grads, &cpu.grads, 1e-3);
            close(
                &format!("{case} running stats"),
                dev.state.buffers.flat(),
                cpu.state.buffers.flat(),
                1e-5,
            );
            assert_eq!(dev.state.counters, cpu.state.counters, "{case}: counters");
        }
    }
}

#[test]
fn cpu_emulator_runs_every_gpu_test() {
    run_on_emulator(&[]);
}
