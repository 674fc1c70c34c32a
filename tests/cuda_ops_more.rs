//! The CUDA ops MobileNetV2, ShuffleNetV2 and ResNet need beyond the GhostNet set (relu6,
//! max_pool2d, channel slicing/splitting/shuffle) and the fused DFC gate inside the Ghost
//! module, each through the tape dispatch (device tensors in, device tensors out) against the
//! CPU op on fresh random inputs at several shapes including odd ones: forward values and every
//! gradient. The test GPU's buffers are poisoned with NaN, so an unwritten element fails.
//! Without a GPU each test prints `skipped: no CUDA device (...)`, and the last test runs them
//! all on the CPU emulator (tests/common/cuda.rs).

mod common;

use common::cuda::*;
use ghostv3::backend::cuda::MaxPoolGeom;
use ghostv3::models::{self, ModelOptions};
use ghostv3::nn::ghost::{BottleneckCfg, GhostBottleneck, GhostModule};
use ghostv3::nn::{Builder, Ctx, Mode, RepForm, RepOptions, State};
use ghostv3::ops::{self, Conv2dArgs};
use ghostv3::{Tape, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;

const SHAPES: [[usize; 4]; 4] = [[2, 3, 7, 9], [3, 16, 15, 15], [2, 8, 28, 28], [1, 6, 1, 13]];

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
    let Some(_g) = dispatch_gpu() else { return };
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
    let Some(g) = dispatch_gpu() else { return };
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
    let Some(_g) = dispatch_gpu() else { return };
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

/// Where a module step runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Side {
    Cpu,
    /// Parameters on the device, BN running statistics on the host (`state.params.to_device`).
    DeviceParams,
    /// Parameters and running statistics on the device (`State::place_on`, as training does).
    DeviceState,
}

/// One forward + backward of a module: output, input gradient, flat parameter gradient, and
/// the state after (running statistics updated in train mode) on the host.
fn module_step(
    forward: &dyn Fn(&mut Ctx, Var) -> Var,
    state: &State,
    (x, gy): (&Tensor, &Tensor),
    mode: Mode,
    side: Side,
) -> (Tensor, Tensor, Vec<f32>, State) {
    let mut st = state.clone();
    match side {
        Side::Cpu => {}
        Side::DeviceParams => st.params.to_device(ghostv3::tensor::Device::Cuda).unwrap(),
        Side::DeviceState => st.place_on(ghostv3::tensor::Device::Cuda).unwrap(),
    }
    let cuda = side != Side::Cpu;
    let mut tape = Tape::new();
    let xv = leaf_on(&mut tape, x, cuda);
    let mut ctx = Ctx::new(&mut tape, &mut st, mode, None);
    let y = forward(&mut ctx, xv);
    let leaves = ctx.into_leaves();
    let (yt, dx, flat) =
        backward_to_host("module step", &mut tape, (y, xv), gy, (&leaves, &st), cuda);
    drop(tape);
    if cuda {
        st = st.to_host().unwrap();
    }
    (yt, dx, flat, st)
}

/// A module on the device against the CPU in train and eval mode: output, input and parameter
/// gradients, running statistics and batch counters.
fn check_module(
    case: &str,
    forward: &dyn Fn(&mut Ctx, Var) -> Var,
    state: &State,
    x: &Tensor,
    gy: &Tensor,
    tol: f64,
) {
    for (mode, side) in [
        (Mode::Train { dropout: false }, Side::DeviceParams),
        (Mode::Train { dropout: false }, Side::DeviceState),
        (Mode::Eval, Side::DeviceParams),
        (Mode::Eval, Side::DeviceState),
    ] {
        let case = format!("{case} {mode:?} {side:?}");
        let (y, dx, gp, st) = module_step(forward, state, (x, gy), mode, Side::Cpu);
        let (yg, dxg, gpg, stg) = module_step(forward, state, (x, gy), mode, side);
        close(&case, yg.data(), y.data(), tol);
        close(&format!("{case} dx"), dxg.data(), dx.data(), tol);
        close(&format!("{case} dparams"), &gpg, &gp, tol);
        close(
            &format!("{case} running stats"),
            stg.buffers.flat(),
            st.buffers.flat(),
            tol,
        );
        assert_eq!(stg.counters, st.counters, "{case}: batch counters");
    }
}

/// GhostNetV3's Ghost module with DFC attention (train form: 3 kxk branches + scale +
/// identity): on the device the DFC gate is the fused op; everything else as on the CPU.
#[test]
fn ghost_module_with_fused_dfc_gate_matches_cpu() {
    let Some(_g) = dispatch_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(230);
    for (inp, oup, s) in [(6, 8, [2, 6, 10, 10]), (4, 12, [2, 4, 9, 7])] {
        let mut b = Builder::new(231);
        let form = RepForm::Train(RepOptions::default());
        let m = GhostModule::new(&mut b, "m", inp, oup, true, true, form);
        let mut state = b.finish();
        randomize_bns(&mut state, &mut rng);
        let x = rand_t(&mut rng, &s, -2.0, 2.0);
        let gy = rand_t(&mut rng, &[s[0], oup, s[2], s[3]], -1.0, 1.0);
        let fwd = |ctx: &mut Ctx, v: Var| m.forward(ctx, v);
        check_module(&format!("ghost module {s:?}"), &fwd, &state, &x, &gy, 1e-3);
        // The fused op is what ran on the device, in both modes.
        for mode in [Mode::Train { dropout: false }, Mode::Eval] {
            let mut st = state.clone();
            st.place_on(ghostv3::tensor::Device::Cuda).unwrap();
            let mut tape = Tape::new();
            tape.enable_profile();
            let xv = tape.leaf(x.to_cuda().unwrap(), true);
            let mut ctx = Ctx::new(&mut tape, &mut st, mode, None);
            m.forward(&mut ctx, xv);
            drop(ctx);
            let p: Vec<&str> = tape.profile().unwrap().ops.keys().copied().collect();
            assert!(
                p.contains(&"dfc_gate") && !p.contains(&"sigmoid"),
                "expected the fused DFC gate on the device in {mode:?}, got {p:?}"
            );
        }
    }
}

/// A GhostNetV3 bottleneck with DFC, a stride-2 depth-wise conv, SE and the conv shortcut.
#[test]
fn ghost_bottleneck_with_dfc_matches_cpu() {
    let Some(_g) = dispatch_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(240);
    let mut b = Builder::new(241);
    let cfg = BottleneckCfg {
        inp: 6,
        mid: 12,
        out: 8,
        k: 3,
        stride: 2,
        se_rd: Some(4),
        dfc: true,
    };
    let m = GhostBottleneck::new(&mut b, "blk", cfg, RepForm::Train(RepOptions::default()));
    let mut state = b.finish();
    randomize_bns(&mut state, &mut rng);
    let s = [2, 6, 12, 11];
    let x = rand_t(&mut rng, &s, -2.0, 2.0);
    let gy = rand_t(&mut rng, &[2, 8, 6, 6], -1.0, 1.0);
    let fwd = |ctx: &mut Ctx, v: Var| m.forward(ctx, v);
    check_module("ghost bottleneck", &fwd, &state, &x, &gy, 1e-3);
}

/// A small MobileNetV2/ShuffleNetV2/ResNet-like chain of the new ops between convs and BN:
/// stem conv + BN + relu6, max pool, split, a 1x1 branch, concat, shuffle, a slice.
#[test]
fn small_shufflenet_like_chain_matches_cpu() {
    let Some(_g) = dispatch_gpu() else { return };
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
        let vars: Vec<Var> = inputs.iter().map(|t| leaf_on(&mut tape, t, cuda)).collect();
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

/// ShuffleNetV2 x0.5, MobileNetV2 and ResNet-18 whole, in eval mode (running statistics: no
/// batch-statistics chaos at this tiny size), forward and backward on the device against the
/// CPU: logits, input gradient and every parameter gradient. On the emulator without
/// MobileNetV2 (75 s there; ShuffleNetV2 and ResNet-18 take 15 and 12 s) unless
/// GHOSTV3_EMU_FULL=1.
#[test]
fn small_models_eval_forward_backward_match_cpu() {
    let Some(_g) = dispatch_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(260);
    let opts = ModelOptions {
        num_classes: 10,
        drop_rate: 0.0,
        seed: 5,
        ..Default::default()
    };
    let x = rand_t(&mut rng, &[2, 3, 32, 32], -2.0, 2.0);
    let gy = rand_t(&mut rng, &[2, 10], -1.0, 1.0);
    let emulated = std::env::var_os("GHOSTV3_EMU_CHILD").is_some()
        && std::env::var_os("GHOSTV3_EMU_FULL").is_none();
    let names: &[&str] = if emulated {
        &["shufflenet_v2_x0_5", "resnet18"]
    } else {
        &["shufflenet_v2_x0_5", "mobilenetv2_100", "resnet18"]
    };
    for &name in names {
        let run = |cuda: bool| {
            // The same model twice: same seed, same random BN parameters and statistics.
            let mut m = models::create(name, &opts).unwrap();
            randomize_bns(m.state_mut(), &mut StdRng::seed_from_u64(261));
            if cuda {
                m.state_mut()
                    .place_on(ghostv3::tensor::Device::Cuda)
                    .unwrap();
            }
            let mut tape = Tape::new();
            let xv = leaf_on(&mut tape, &x, cuda);
            let (y, leaves) = m.forward(&mut tape, xv, Mode::Eval, None);
            backward_to_host(name, &mut tape, (y, xv), &gy, (&leaves, m.state()), cuda)
        };
        let t = std::time::Instant::now();
        let (y, dx, gp) = run(false);
        let (yg, dxg, gpg) = run(true);
        println!("{name}: {:.1} s", t.elapsed().as_secs_f64());
        close(&format!("{name} eval logits"), yg.data(), y.data(), 1e-4);
        close(&format!("{name} eval dx"), dxg.data(), dx.data(), 1e-3);
        close(&format!("{name} eval dparams"), &gpg, &gp, 1e-3);
    }
}

/// Without a GPU, every test above on the CPU emulator.
#[test]
fn cpu_emulator_runs_every_gpu_test() {
    run_on_emulator(&[]);
}
