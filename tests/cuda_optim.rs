//! The device optimizers of `train --device cuda` (src/backend/cuda/optim.rs: fused AdamW and
//! SGD kernels with the EMA in the same pass) against the CPU optimizers they stand for
//! (`optim::AdamW`, `optim::Sgd`, `optim::Ema`): several steps on fresh random gradients over a
//! multi-tensor layout with odd sizes, tensors larger than one 16 Ki chunk and both decay
//! groups; parameters, optimizer state and EMA after every step, in ulps (the kernels do the CPU
//! arithmetic in the CPU order, the clip norm included, so the expected difference is 0). Then
//! the checkpoint round trip: GPU state -> host optimizer -> a new GPU optimizer continues as
//! the CPU does. Without a GPU the last test runs them all on the CPU emulator.

mod common;

use common::cuda::*;
use ghostv3::backend::cuda::optim::{self as dopt, DeviceOptimizer};
use ghostv3::backend::cuda::{DBuf, Gpu};
use ghostv3::optim::{
    Ema, EmaConfig, Layout, LayoutEntry, Optimizer, OptimizerConfig, OptimizerKind,
};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Largest allowed distance in units in the last place.
const MAX_ULPS: u32 = 1;

/// conv.weight and fc.weight span two chunks each (18432 and 16687 elements); BN and biases are
/// in the no-decay group; sizes are odd.
fn layout() -> Layout {
    Layout::from_shapes(&[
        ("conv.weight", vec![64, 32, 3, 3]),
        ("bn.weight", vec![63]),
        ("bn.bias", vec![63]),
        ("fc.weight", vec![37, 451]),
        ("fc.bias", vec![37]),
        ("dw.weight", vec![7, 1, 5, 5]),
    ])
}

/// Distance in representable f32 values (0: the same bits, up to the sign of zero).
fn ulps(a: f32, b: f32) -> u32 {
    let key = |x: f32| {
        let i = x.to_bits() as i32;
        if i < 0 {
            i64::from(i32::MIN) - i64::from(i)
        } else {
            i64::from(i)
        }
    };
    (key(a) - key(b)).unsigned_abs().min(u32::MAX as u64) as u32
}

/// Asserts `gpu` is within [`MAX_ULPS`] of `cpu` element by element; prints the max error.
fn same(case: &str, gpu: &[f32], cpu: &[f32]) {
    assert_eq!(gpu.len(), cpu.len(), "{case}: length");
    let (mut worst, mut err, mut at) = (0u32, 0f64, 0usize);
    for (i, (&a, &b)) in gpu.iter().zip(cpu).enumerate() {
        assert!(a.is_finite(), "{case}: element {i} is {a} (cpu {b})");
        let u = ulps(a, b);
        if u > worst {
            (worst, at) = (u, i);
        }
        err = err.max((a as f64 - b as f64).abs());
    }
    println!("{case}: max err {err:.2e}, {worst} ulp");
    assert!(
        worst <= MAX_ULPS,
        "{case}: element {at} is {} on the GPU, {} on the CPU ({worst} ulp)",
        gpu[at],
        cpu[at]
    );
}

/// The device optimizer's state, through `save_into` into a fresh host optimizer of `cfg`,
/// against the CPU optimizer's.
fn same_state(
    g: &Gpu,
    case: &str,
    cfg: &OptimizerConfig,
    layout: &Layout,
    dev: &dyn DeviceOptimizer,
    cpu: &dyn Optimizer,
) {
    let mut host = cfg.build(layout).unwrap();
    dev.save_into(g, host.as_mut()).unwrap();
    let (got, want) = (host.state(), cpu.state());
    let names = |s: &[(String, Vec<f32>)]| s.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&got), names(&want), "{case}: state buffers");
    assert_eq!(host.steps(), cpu.steps(), "{case}: step counter");
    for ((name, a), (_, b)) in got.iter().zip(&want) {
        same(&format!("{case} {name}"), a, b);
    }
}

/// A CPU run and a GPU run of one recipe from the same parameters, stepped in lockstep.
struct Pair {
    cfg: OptimizerConfig,
    layout: Layout,
    cpu: Box<dyn Optimizer>,
    dev: Box<dyn DeviceOptimizer>,
    p_cpu: Vec<f32>,
    p_gpu: DBuf,
    ema: Ema,
    e_gpu: DBuf,
}

impl Pair {
    fn new(g: &Gpu, cfg: OptimizerConfig, layout: Layout, rng: &mut StdRng) -> Pair {
        let p0 = rand_vec(rng, layout.numel(), -0.5, 0.5);
        let ema_cfg = EmaConfig {
            decay: 0.9,
            ..Default::default()
        };
        Pair {
            cpu: cfg.build(&layout).unwrap(),
            dev: dopt::build(g, &cfg, &layout).unwrap(),
            ema: Ema::new(ema_cfg, &p0, &[]).unwrap(),
            p_gpu: g.upload(&p0).unwrap(),
            e_gpu: g.upload(&p0).unwrap(),
            p_cpu: p0,
            cfg,
            layout,
        }
    }

    /// `steps` steps on fresh gradients (the EMA on two steps out of three), everything
    /// compared after each.
    fn run(&mut self, g: &Gpu, case: &str, steps: usize, rng: &mut StdRng) {
        for s in 0..steps {
            let n = self.layout.numel();
            let grads = rand_vec(rng, n, -0.1, 0.1);
            let lr = 1e-2 * (1 + self.cpu.steps()) as f64;
            let with_ema = s % 3 != 2;
            let d = self.ema.decay();
            self.cpu.step(&mut self.p_cpu, &grads, lr);
            if with_ema {
                self.ema.update(&self.p_cpu, &[]);
            }
            let gb = g.upload(&grads).unwrap();
            let ema = with_ema.then_some((&mut self.e_gpu, d));
            self.dev.step(g, &mut self.p_gpu, &gb, lr, ema).unwrap();
            let case = format!("{case} step {}", self.cpu.steps());
            same(
                &format!("{case} params"),
                &down(g, &self.p_gpu),
                &self.p_cpu,
            );
            same(
                &format!("{case} ema"),
                &down(g, &self.e_gpu),
                self.ema.params(),
            );
            same_state(
                g,
                &case,
                &self.cfg,
                &self.layout,
                self.dev.as_ref(),
                self.cpu.as_ref(),
            );
        }
    }
}

fn adamw(weight_decay: f64, max_grad_norm: Option<f64>) -> OptimizerConfig {
    OptimizerConfig {
        weight_decay: Some(weight_decay),
        max_grad_norm,
        ..OptimizerConfig::new(OptimizerKind::Adamw)
    }
}

fn sgd(momentum: f64, nesterov: bool, weight_decay: f64, clip: Option<f64>) -> OptimizerConfig {
    OptimizerConfig {
        momentum: Some(momentum),
        nesterov: Some(nesterov),
        weight_decay: Some(weight_decay),
        max_grad_norm: clip,
        ..OptimizerConfig::new(OptimizerKind::Sgd)
    }
}

/// AdamW: clipping active (||g|| ~ 11 > 1), off, and on but inactive (factor 1); decay on the
/// decay group only, and off; non-default betas and eps.
#[test]
fn adamw_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(300);
    let cases = [
        ("adamw wd=0.05 clip=1", adamw(0.05, Some(1.0))),
        ("adamw wd=0.05 no clip", adamw(0.05, None)),
        (
            "adamw wd=0 clip=50 betas=(0.8,0.99) eps=1e-6",
            OptimizerConfig {
                betas: Some((0.8, 0.99)),
                eps: Some(1e-6),
                ..adamw(0.0, Some(50.0))
            },
        ),
    ];
    for (case, cfg) in cases {
        let mut pair = Pair::new(&g, cfg, layout(), &mut rng);
        assert_eq!(pair.dev.describe(), "fused AdamW + EMA kernel");
        pair.run(&g, case, 3, &mut rng);
    }
}

/// SGD: Nesterov (timm's default), plain momentum with decay and active clipping, no momentum
/// (no buffer) with decay and clipping. PyTorch's dampening is not an option of optim::Sgd.
#[test]
fn sgd_matches_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(301);
    let cases = [
        ("sgd nesterov", sgd(0.9, true, 0.0, None)),
        (
            "sgd momentum wd=0.05 clip=1",
            sgd(0.9, false, 0.05, Some(1.0)),
        ),
        (
            "sgd nesterov wd=1e-4 clip=50",
            sgd(0.8, true, 1e-4, Some(50.0)),
        ),
        (
            "sgd no momentum wd=0.01 clip=0.5",
            sgd(0.0, false, 0.01, Some(0.5)),
        ),
    ];
    for (case, cfg) in cases {
        let mut pair = Pair::new(&g, cfg, layout(), &mut rng);
        assert_eq!(pair.dev.describe(), "fused SGD + EMA kernel");
        pair.run(&g, case, 3, &mut rng);
    }
}

/// A layout with gaps between tensors: the gaps of the parameters stay as they are, and the EMA
/// (which blends the whole buffer on the CPU, gaps included) still matches.
#[test]
fn layout_with_gaps() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(302);
    let entry = |name: &str, offset: usize, shape: Vec<usize>, decay: bool| LayoutEntry {
        name: name.into(),
        offset,
        len: shape.iter().product(),
        shape,
        decay,
    };
    let layout = Layout::from_entries(
        vec![
            entry("a.weight", 3, vec![17, 1000], true),
            entry("a.bias", 17_010, vec![17], false),
            entry("b.weight", 17_100, vec![5, 9], true),
        ],
        17_150,
    )
    .unwrap();
    for (case, cfg) in [
        ("gaps adamw", adamw(0.05, Some(1.0))),
        ("gaps sgd", sgd(0.9, true, 0.05, None)),
    ] {
        let mut pair = Pair::new(&g, cfg, layout.clone(), &mut rng);
        let p0 = pair.p_cpu.clone();
        pair.run(&g, case, 2, &mut rng);
        let p = down(&g, &pair.p_gpu);
        for i in (0..3)
            .chain(17_003..17_010)
            .chain(17_027..17_100)
            .chain(17_145..17_150)
        {
            assert_eq!(
                p[i].to_bits(),
                p0[i].to_bits(),
                "{case}: gap element {i} changed"
            );
        }
    }
}

/// Checkpoint round trip: two steps on the GPU, the state saved into a host optimizer (the
/// checkpoint format), loaded into a new GPU optimizer that then continues exactly as the CPU
/// optimizer does; a state of another optimizer or size is refused.
#[test]
fn state_round_trip_through_the_host_optimizer() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(303);
    let cases = [
        ("round trip adamw", adamw(0.05, Some(1.0))),
        ("round trip sgd", sgd(0.9, true, 0.05, None)),
        ("round trip sgd no momentum", sgd(0.0, false, 0.05, None)),
    ];
    for (case, cfg) in cases {
        let mut pair = Pair::new(&g, cfg.clone(), layout(), &mut rng);
        pair.run(&g, &format!("{case} before"), 2, &mut rng);
        let mut host = cfg.build(&pair.layout).unwrap();
        pair.dev.save_into(&g, host.as_mut()).unwrap();
        let mut fresh = dopt::build(&g, &cfg, &pair.layout).unwrap();
        fresh.load_from(&g, host.as_ref()).unwrap();
        pair.dev = fresh;
        pair.run(&g, &format!("{case} resumed"), 2, &mut rng);

        // Refused: another optimizer's state, and a state of another size.
        let other = match cfg.kind {
            OptimizerKind::Sgd => adamw(0.0, None),
            _ => sgd(0.9, true, 0.0, None),
        };
        let other = other.build(&pair.layout).unwrap();
        assert!(pair.dev.load_from(&g, other.as_ref()).is_err(), "{case}");
        let small = cfg
            .build(&Layout::from_shapes(&[("w", vec![3, 3])]))
            .unwrap();
        let e = pair.dev.load_from(&g, small.as_ref());
        if cfg.momentum == Some(0.0) {
            // SGD without momentum has only a step counter: any layout's state fits.
            assert!(e.is_ok(), "{case}: {e:?}");
        } else {
            assert!(e.is_err(), "{case}: a state of 9 values loaded");
            // Nothing was loaded: the run goes on as the CPU's.
            pair.run(&g, &format!("{case} after a refused load"), 1, &mut rng);
        }
    }
}

#[test]
fn cpu_emulator_runs_every_gpu_test() {
    run_on_emulator(&[]);
}
