//! The optimizers and the EMA on the device (`optim::Optimizer::step` on device tensors: the
//! fused LAMB, AdamW and SGD kernels of src/backend/cuda/optim.rs, the EMA in the same pass)
//! against the same interface on host tensors (the CPU loops): several steps on fresh random
//! gradients over a multi-tensor layout with odd sizes, tensors larger than one 16 Ki chunk and
//! both decay groups; parameters, EMA (weights and running statistics) and the optimizer state
//! after every step. AdamW and SGD in ulps (their kernels do the CPU arithmetic in the CPU
//! order, the clip norm included, so the expected difference is 0); LAMB within 1e-6 (its
//! kernels reduce the norms in f64 in another order). Then the state across devices: a GPU
//! run's checkpoint form resumes on the GPU and on the CPU, a CPU run's on the GPU, the state
//! following the parameters' device. And the finite-state flag the update kernels set (a NaN
//! or infinite parameter or moment written) against the CPU loops'. Without a GPU the last
//! test runs them all on the CPU emulator.

mod common;

use common::cuda::*;
use ghostv3::optim::{
    Ema, EmaConfig, Layout, LayoutEntry, Optimizer, OptimizerConfig, OptimizerKind, Update,
};
use ghostv3::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Largest allowed distance in units in the last place (AdamW, SGD).
const MAX_ULPS: u32 = 1;
/// LAMB's tolerance (of `common::cuda::close`).
const LAMB_TOL: f64 = 1e-6;
/// Length of the running-statistics buffer the EMA also averages.
const BUFFERS: usize = 333;

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

fn host_t(v: &[f32]) -> Tensor {
    Tensor::new(&[v.len()], v.to_vec())
}

fn dev_t(v: &[f32]) -> Tensor {
    host_t(v).to_cuda().unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_host().into_vec()
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

/// A CPU run and a GPU run of one recipe from the same parameters and EMA, stepped in
/// lockstep through the one interface.
struct Pair {
    cfg: OptimizerConfig,
    layout: Layout,
    cpu: Box<dyn Optimizer>,
    dev: Box<dyn Optimizer>,
    p_cpu: Tensor,
    p_gpu: Tensor,
    e_cpu: Ema,
    e_gpu: Ema,
}

impl Pair {
    fn new(cfg: OptimizerConfig, layout: Layout, rng: &mut StdRng) -> Pair {
        let p0 = rand_vec(rng, layout.numel(), -0.5, 0.5);
        let b0 = rand_vec(rng, BUFFERS, -1.0, 1.0);
        let ema_cfg = EmaConfig {
            decay: 0.9,
            ..Default::default()
        };
        let (p_cpu, p_gpu) = (host_t(&p0), dev_t(&p0));
        Pair {
            cpu: cfg.build(&layout).unwrap(),
            dev: cfg.build(&layout).unwrap(),
            e_cpu: Ema::new(ema_cfg.clone(), &p_cpu, &host_t(&b0)).unwrap(),
            e_gpu: Ema::new(ema_cfg, &p_gpu, &dev_t(&b0)).unwrap(),
            p_cpu,
            p_gpu,
            cfg,
            layout,
        }
    }

    /// The GPU's values against the CPU's: in ulps, LAMB within [`LAMB_TOL`].
    fn check(&self, case: &str, gpu: &[f32], cpu: &[f32]) {
        if self.cfg.kind == OptimizerKind::Lamb {
            close(case, gpu, cpu, LAMB_TOL);
        } else {
            same(case, gpu, cpu);
        }
    }

    /// Everything of the two runs compared: parameters, EMA, optimizer and EMA state.
    fn compare(&self, case: &str) {
        self.check(
            &format!("{case} params"),
            &values(&self.p_gpu),
            self.p_cpu.data(),
        );
        let (eg, ec) = (&self.e_gpu, &self.e_cpu);
        self.check(
            &format!("{case} ema"),
            &values(eg.params()),
            ec.params().data(),
        );
        self.check(
            &format!("{case} ema buffers"),
            &values(eg.buffers()),
            ec.buffers().data(),
        );
        assert_eq!(eg.updates(), ec.updates(), "{case}: EMA updates");
        let (got, want) = (self.dev.state(), self.cpu.state());
        let names = |s: &[(String, Vec<f32>)]| s.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&got), names(&want), "{case}: state buffers");
        assert_eq!(self.dev.steps(), self.cpu.steps(), "{case}: step counter");
        for ((name, a), (_, b)) in got.iter().zip(&want) {
            self.check(&format!("{case} {name}"), a, b);
        }
    }

    /// `steps` steps on fresh gradients and running statistics (the EMA on two steps out of
    /// three; the gradient of every second GPU step from the host), everything compared after
    /// each.
    fn run(&mut self, case: &str, steps: usize, rng: &mut StdRng) {
        for s in 0..steps {
            let n = self.layout.numel();
            let grads = rand_vec(rng, n, -0.1, 0.1);
            let bufs = rand_vec(rng, BUFFERS, -1.0, 1.0);
            let lr = 1e-2 * (1 + self.cpu.steps()) as f64;
            let with_ema = s % 3 != 2;
            let (b_cpu, b_gpu) = (host_t(&bufs), dev_t(&bufs));
            let e = with_ema.then_some((&mut self.e_cpu, &b_cpu));
            self.cpu
                .step(&mut self.p_cpu, &host_t(&grads), lr, e)
                .unwrap();
            let g_gpu = if s % 2 == 1 {
                host_t(&grads)
            } else {
                dev_t(&grads)
            };
            let e = with_ema.then_some((&mut self.e_gpu, &b_gpu));
            self.dev.step(&mut self.p_gpu, &g_gpu, lr, e).unwrap();
            assert!(
                self.p_gpu.is_cuda(),
                "{case}: the parameters left the device"
            );
            self.compare(&format!("{case} step {}", self.cpu.steps()));
        }
    }
}

fn lamb(weight_decay: f64, max_grad_norm: Option<f64>) -> OptimizerConfig {
    OptimizerConfig {
        weight_decay: Some(weight_decay),
        max_grad_norm: Some(max_grad_norm.unwrap_or(0.0)),
        ..OptimizerConfig::new(OptimizerKind::Lamb)
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

/// LAMB: clipping active and off, decay on the decay group only, and off (no trust ratio).
#[test]
fn lamb_matches_cpu() {
    let Some(_g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(299);
    let cases = [
        ("lamb wd=0.05 clip=1", lamb(0.05, Some(1.0))),
        ("lamb wd=0.05 no clip", lamb(0.05, None)),
        ("lamb wd=0 clip=1", lamb(0.0, Some(1.0))),
    ];
    for (case, cfg) in cases {
        let mut pair = Pair::new(cfg, layout(), &mut rng);
        pair.run(case, 3, &mut rng);
    }
}

/// AdamW: clipping active (||g|| ~ 11 > 1), off, and on but inactive (factor 1); decay on the
/// decay group only, and off; non-default betas and eps.
#[test]
fn adamw_matches_cpu() {
    let Some(_g) = gpu() else { return };
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
        let mut pair = Pair::new(cfg, layout(), &mut rng);
        pair.run(case, 3, &mut rng);
    }
}

/// SGD: Nesterov (timm's default), plain momentum with decay and active clipping, no momentum
/// (no buffer) with decay and clipping. PyTorch's dampening is not an option of optim::Sgd.
#[test]
fn sgd_matches_cpu() {
    let Some(_g) = gpu() else { return };
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
        let mut pair = Pair::new(cfg, layout(), &mut rng);
        pair.run(case, 3, &mut rng);
    }
}

/// A layout with gaps between tensors: the gaps of the parameters stay as they are, and the EMA
/// (which blends the whole buffer, gaps included) still matches.
#[test]
fn layout_with_gaps() {
    let Some(_g) = gpu() else { return };
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
        ("gaps lamb", lamb(0.05, Some(1.0))),
        ("gaps adamw", adamw(0.05, Some(1.0))),
        ("gaps sgd", sgd(0.9, true, 0.05, None)),
    ] {
        let mut pair = Pair::new(cfg, layout.clone(), &mut rng);
        let p0 = pair.p_cpu.to_vec();
        pair.run(case, 2, &mut rng);
        let p = values(&pair.p_gpu);
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

/// The checkpoint form across devices: two steps on the GPU, the state (host format) loaded
/// into a new optimizer that continues on the GPU exactly as the CPU optimizer does; then the
/// GPU optimizer steps host parameters (its state follows them to the host) and goes back; a
/// CPU run's state resumes on the GPU; the EMA's state likewise. A state of another optimizer
/// or size is refused and changes nothing.
#[test]
fn state_moves_between_devices() {
    let Some(_g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(303);
    let cases = [
        ("round trip lamb", lamb(0.05, Some(1.0))),
        ("round trip adamw", adamw(0.05, Some(1.0))),
        ("round trip sgd", sgd(0.9, true, 0.05, None)),
        ("round trip sgd no momentum", sgd(0.0, false, 0.05, None)),
    ];
    for (case, cfg) in cases {
        let mut pair = Pair::new(cfg.clone(), layout(), &mut rng);
        pair.run(&format!("{case} before"), 2, &mut rng);

        // GPU checkpoint -> a new optimizer and EMA on the GPU.
        let mut fresh = cfg.build(&pair.layout).unwrap();
        fresh.load_state(&pair.dev.state()).unwrap();
        pair.dev = fresh;
        let mut ema = Ema::new(
            pair.e_cpu.config().clone(),
            &pair.p_gpu,
            pair.e_gpu.buffers(),
        )
        .unwrap();
        ema.load_state(&pair.e_gpu.state()).unwrap();
        assert!(
            ema.params().is_cuda(),
            "{case}: a loaded EMA stays on its device"
        );
        pair.e_gpu = ema;
        pair.run(&format!("{case} resumed"), 2, &mut rng);

        // The GPU optimizer on host parameters (state down), then on the device again (up).
        pair.p_gpu = pair.p_gpu.to_host();
        pair.e_gpu.set(
            &pair.e_gpu.params().to_host(),
            &pair.e_gpu.buffers().to_host(),
        );
        let grads = rand_vec(&mut rng, pair.layout.numel(), -0.1, 0.1);
        let lr = 3e-3;
        pair.cpu
            .step(&mut pair.p_cpu, &host_t(&grads), lr, None)
            .unwrap();
        pair.dev
            .step(&mut pair.p_gpu, &dev_t(&grads), lr, None)
            .unwrap();
        assert!(!pair.p_gpu.is_cuda());
        pair.check(
            &format!("{case} on the host"),
            pair.p_gpu.data(),
            pair.p_cpu.data(),
        );
        pair.p_gpu = pair.p_gpu.to_cuda().unwrap();
        pair.e_gpu.set(
            &pair.e_gpu.params().to_cuda().unwrap(),
            &pair.e_gpu.buffers().to_cuda().unwrap(),
        );
        pair.run(&format!("{case} back on the device"), 1, &mut rng);

        // A CPU run's checkpoint -> the GPU.
        let mut from_cpu = cfg.build(&pair.layout).unwrap();
        from_cpu.load_state(&pair.cpu.state()).unwrap();
        pair.dev = from_cpu;
        pair.p_gpu = pair.p_cpu.to_cuda().unwrap();
        pair.e_gpu.set(
            &pair.e_cpu.params().to_cuda().unwrap(),
            &pair.e_cpu.buffers().to_cuda().unwrap(),
        );
        pair.run(&format!("{case} from a CPU checkpoint"), 1, &mut rng);

        // Refused: another optimizer's state, and a state of another size.
        let other = match cfg.kind {
            OptimizerKind::Sgd => adamw(0.0, None),
            _ => sgd(0.9, true, 0.0, None),
        };
        let other = other.build(&pair.layout).unwrap();
        assert!(pair.dev.load_state(&other.state()).is_err(), "{case}");
        let small = cfg
            .build(&Layout::from_shapes(&[("w", vec![3, 3])]))
            .unwrap();
        let e = pair.dev.load_state(&small.state());
        if cfg.momentum == Some(0.0) {
            // SGD without momentum has only a step counter: any layout's state fits.
            assert!(e.is_ok(), "{case}: {e:?}");
        } else {
            assert!(e.is_err(), "{case}: a state of 9 values loaded");
            // Nothing was loaded: the run goes on as the CPU's.
            pair.run(&format!("{case} after a refused load"), 1, &mut rng);
        }
    }
}

/// What a step is given that is not finite (or, `HugeGrad`, finite with a square that is not).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Poison {
    NanGrad,
    InfParam,
    HugeGrad,
}

/// A CPU and a GPU `Update` (with the EMA, fused into the GPU's pass) from the same values.
fn update_pair(cfg: &OptimizerConfig, layout: &Layout, p0: &[f32], b0: &[f32]) -> [Update; 2] {
    let ema = |p: &Tensor, b: &Tensor| {
        let c = EmaConfig {
            decay: 0.9,
            ..Default::default()
        };
        Some(Ema::new(c, p, b).unwrap())
    };
    [
        Update::new(cfg, layout, ema(&host_t(p0), &host_t(b0))).unwrap(),
        Update::new(cfg, layout, ema(&dev_t(p0), &dev_t(b0))).unwrap(),
    ]
}

/// The flag of the fused kernels is the CPU loops': per optimizer (LAMB with and without
/// clipping, AdamW, SGD with and without momentum), for a NaN gradient element, a +inf
/// parameter and a gradient whose square overflows (the second moment alone goes infinite:
/// flagged without clipping, not after LAMB's clip or in SGD), at an element of a decayed
/// tensor over two chunks (`lamb_apply`), of a no-decay tensor and of a one-chunk decayed
/// tensor (`lamb_moments`). False before a step and after a finite one, cleared by the read,
/// false again after a finite step of the same optimizer reloaded from before the bad step;
/// the non-finite parameters are the same elements on both devices.
#[test]
fn nonfinite_flag_matches_cpu() {
    let Some(_g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(304);
    let layout = layout();
    let n = layout.numel();
    let cases = [
        lamb(0.05, None),
        lamb(0.05, Some(1.0)),
        adamw(0.01, None),
        sgd(0.9, true, 1e-4, None),
        sgd(0.0, false, 0.0, None),
    ];
    for cfg in cases {
        for poison in [Poison::NanGrad, Poison::InfParam, Poison::HugeGrad] {
            for at in [17_000, 18_440, n - 3] {
                let case = format!(
                    "{:?} clip {:?} {poison:?} at {at}",
                    cfg.kind, cfg.max_grad_norm
                );
                let (p0, b0) = (
                    rand_vec(&mut rng, n, -0.5, 0.5),
                    rand_vec(&mut rng, BUFFERS, -1.0, 1.0),
                );
                let mut ups = update_pair(&cfg, &layout, &p0, &b0);
                let bufs = [host_t(&b0), dev_t(&b0)];
                let on = |d: usize, v: &[f32]| if d == 0 { host_t(v) } else { dev_t(v) };
                let take = |ups: &mut [Update; 2], what: &str| {
                    let f = [0, 1].map(|d| ups[d].take_nonfinite().unwrap());
                    assert_eq!(
                        f[1], f[0],
                        "{case} {what}: GPU flag {} CPU flag {}",
                        f[1], f[0]
                    );
                    f[0]
                };
                assert!(!take(&mut ups, "before a step"));

                let g1 = rand_vec(&mut rng, n, -0.1, 0.1);
                let mut ps = [host_t(&p0), dev_t(&p0)];
                for d in 0..2 {
                    ups[d]
                        .step(&mut ps[d], &bufs[d], &on(d, &g1), 1e-2)
                        .unwrap();
                }
                assert!(!take(&mut ups, "finite step"));
                let state = ups[1].optimizer.state();
                let p1 = values(&ps[1]);

                let mut g2 = rand_vec(&mut rng, n, -0.1, 0.1);
                let mut pb = p1.clone();
                match poison {
                    Poison::NanGrad => g2[at] = f32::NAN,
                    Poison::InfParam => pb[at] = f32::INFINITY,
                    Poison::HugeGrad => g2[at] = 1e30,
                }
                let mut ps = [host_t(&pb), dev_t(&pb)];
                for d in 0..2 {
                    ups[d]
                        .step(&mut ps[d], &bufs[d], &on(d, &g2), 1e-2)
                        .unwrap();
                }
                let want = match poison {
                    Poison::HugeGrad => {
                        cfg.kind != OptimizerKind::Sgd && cfg.max_grad_norm.unwrap_or(0.0) == 0.0
                    }
                    _ => true,
                };
                assert_eq!(take(&mut ups, "bad step"), want, "{case}: bad step");
                let bad = |v: &[f32]| (0..n).filter(|&i| !v[i].is_finite()).collect::<Vec<_>>();
                assert_eq!(
                    bad(&values(&ps[1])),
                    bad(ps[0].data()),
                    "{case}: non-finite elements"
                );
                assert!(!take(&mut ups, "read twice"));

                // Both reload the GPU's state and parameters from before the bad step.
                for d in 0..2 {
                    ups[d].optimizer.load_state(&state).unwrap();
                    let mut p = on(d, &p1);
                    ups[d].step(&mut p, &bufs[d], &on(d, &g1), 1e-2).unwrap();
                }
                assert!(!take(&mut ups, "finite step after reload"));
            }
        }
    }
}

#[test]
fn cpu_emulator_runs_every_gpu_test() {
    run_on_emulator(&[]);
}
