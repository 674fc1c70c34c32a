//! Shared helpers for the integration tests: where the timm fixtures are, random BN
//! statistics, the relative error measure and the depth-wise conv geometries.
#![allow(dead_code)]

use ghostv3::nn::{Id, State};
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use std::path::PathBuf;

pub mod cuda;

/// The fixtures folder: `$GHOSTV3_FIXTURES`, else `../shared/fixtures` beside the checkout.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("GHOSTV3_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
    }
}

/// A fixture folder, or None with a printed reason (the test then says it is skipped).
pub fn fixture(name: &str) -> Option<PathBuf> {
    let dir = fixtures_dir().join(name);
    if dir.join("reference.safetensors").is_file() {
        Some(dir)
    } else {
        println!(
            "skipped: fixture {} not found (set GHOSTV3_FIXTURES to the fixtures folder)",
            dir.display()
        );
        None
    }
}

/// Runs `cmd` and asserts it succeeded (its stderr in the message); returns its output.
pub fn run_ok(cmd: &mut std::process::Command, what: &str) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// max|a - b| / max|b|: the relative error measure of the issue.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let d = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    let s = b.iter().fold(0.0f64, |m, y| m.max((*y as f64).abs()));
    d / s.max(1e-30)
}

/// (kernel, stride) of the depth-wise convs the GhostNets use: 3x3 and 5x5 at stride 1 and 2,
/// DFC's 1x5 and 5x1 at stride 1.
pub const DW_KERNELS: [((usize, usize), usize); 6] = [
    ((3, 3), 1),
    ((3, 3), 2),
    ((5, 5), 1),
    ((5, 5), 2),
    ((1, 5), 1),
    ((5, 1), 1),
];

/// BN weight U[0.5,1.5), BN bias 0.2 N(0,1), running_mean 0.1 N(0,1), running_var U[0.5,1.5).
/// Branch (`_rpr_`) BN weights are divided by `branch_gain`: eval-mode BN does not normalize, so
/// with many branches at full gain the activations grow like (N+2)^depth and f32 rounding
/// dominates (a trained network's branches share the load instead).
pub fn randomize_bn(state: &mut State, rng: &mut StdRng, branch_gain: f32) {
    for i in 0..state.params.len() {
        let name = state.params.entry(Id(i)).name.clone();
        let is_bn = |suffix: &str| {
            name.ends_with(suffix)
                && state
                    .buffers
                    .find(&name.replace(suffix, ".running_mean"))
                    .is_some()
        };
        if is_bn(".weight") {
            let g = if name.contains("_rpr_") {
                branch_gain
            } else {
                1.0
            };
            state
                .params
                .slice_mut(Id(i))
                .iter_mut()
                .for_each(|v| *v = rng.random_range(0.5..1.5) / g);
        } else if is_bn(".bias") {
            state
                .params
                .slice_mut(Id(i))
                .iter_mut()
                .for_each(|v| *v = 0.2 * Distribution::<f32>::sample(&StandardNormal, rng));
        }
    }
    for i in 0..state.buffers.len() {
        let mean = state.buffers.entry(Id(i)).name.ends_with("running_mean");
        state.buffers.slice_mut(Id(i)).iter_mut().for_each(|v| {
            *v = if mean {
                0.1 * Distribution::<f32>::sample(&StandardNormal, rng)
            } else {
                rng.random_range(0.5..1.5)
            }
        });
    }
}

/// The error of a tiny run on `device` with SGD at lr 1e6 (it diverges in its first steps);
/// panics if the run succeeds or writes its best weights.
pub fn diverging_run_error(device: &str) -> String {
    use ghostv3::train::config::TrainConfig;
    let sets: Vec<String> = [
        "data.synthetic_train=16",
        "data.synthetic_val=4",
        "data.synthetic_size=40",
        "augment.size=40",
        "eval.size=40",
        "train.batch_size=4",
        "train.eval_batch_size=4",
        "train.epochs=2",
        "schedule.epochs=2",
        "schedule.warmup_epochs=0",
        "optimizer.kind=\"sgd\"",
        "train.lr=1e6",
        "ema.decay=0.9",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("train.device=\"{device}\"")])
    .collect();
    let cfg = TrainConfig::from_toml(TrainConfig::default_recipe(), &sets, "test").unwrap();
    let dir = std::env::temp_dir().join(format!("ghostv3-diverge-{device}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut t = ghostv3::train::Trainer::new(cfg, &dir).unwrap();
    t.quiet = true;
    let e = format!("{:#}", t.run().expect_err("a run at lr 1e6 diverges"));
    assert!(
        !dir.join("best.safetensors").exists(),
        "{device}: best written"
    );
    e
}

/// A tensor of `shape` drawn uniformly from [lo, hi).
pub fn rand_tensor<T: ghostv3::Elem>(
    rng: &mut StdRng,
    shape: &[usize],
    lo: f64,
    hi: f64,
) -> ghostv3::Tensor<T> {
    use rand::Rng;
    let n = shape.iter().product();
    ghostv3::Tensor::new(
        shape,
        (0..n)
            .map(|_| T::from_f64(rng.random_range(lo..hi)))
            .collect(),
    )
}

/// Max abs error over max(max |b|, 1): gradients that vanish in exact arithmetic (the 1x1 scale
/// weight's, as BN undoes any scale of its input) are compared at the scale of the others.
pub fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// The parameters whose flat gradients `a` and `b` differ by more than 1e-3 of the larger of
/// their own scale and a thousandth of the largest gradient (gradients that vanish in exact
/// arithmetic are compared at that scale), as "name: error" lines.
pub fn differing_grads(
    entries: &[ghostv3::nn::params::Entry],
    a: &[f32],
    b: &[f32],
) -> Vec<String> {
    let big = b.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    let mut bad = Vec::new();
    for e in entries {
        let (x, y) = (&a[e.offset..][..e.numel()], &b[e.offset..][..e.numel()]);
        let scale = y.iter().fold(1e-3 * big, |m, v| m.max(v.abs() as f64));
        let d = x
            .iter()
            .zip(y)
            .fold(0.0f64, |m, (p, q)| m.max((*p as f64 - *q as f64).abs()))
            / scale;
        if d > 1e-3 {
            bad.push(format!("{}: {d:.2e}", e.name));
        }
    }
    bad
}

/// `x` [N, C, H, W] as a ReLU leaves it: negatives zeroed, and channel 0 zero everywhere (its
/// batch variance 0, so BN's 1/sigma = 1/sqrt(eps): the largest gradients BN makes).
pub fn relu_like<T: ghostv3::Elem>(x: &ghostv3::Tensor<T>) -> ghostv3::Tensor<T> {
    let s = x.shape().to_vec();
    let hw = s[2] * s[3];
    let v: Vec<T> = x
        .data()
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if (i / hw).is_multiple_of(s[1]) {
                T::zero()
            } else {
                v.max(T::zero())
            }
        })
        .collect();
    ghostv3::Tensor::new(&s, v)
}

/// One run of a fused op and of its composed branches: output, branch statistics, gradients.
pub type OpRun<'a> = (
    &'a [f64],
    &'a [ghostv3::tensor::storage::BatchStats],
    &'a [Vec<f64>],
);

/// Asserts that two runs agree to `tol` ([`max_rel`]): output, every branch's count, mean and
/// variance, every gradient.
pub fn assert_runs_agree(case: &str, (yf, sf, gf): OpRun, (yc, sc, gc): OpRun, tol: f64) {
    assert!(max_rel(yf, yc) < tol, "{case} y: {}", max_rel(yf, yc));
    assert_eq!(sf.len(), sc.len());
    for (i, (a, b)) in sf.iter().zip(sc).enumerate() {
        assert_eq!(a.count, b.count, "{case} branch {i} count");
        let (a, b) = (a.to_host().unwrap(), b.to_host().unwrap());
        assert!(max_rel(&a.mean, &b.mean) < tol, "{case} branch {i} mean");
        assert!(max_rel(&a.var, &b.var) < tol, "{case} branch {i} var");
    }
    assert_eq!(gf.len(), gc.len());
    for (i, (a, b)) in gf.iter().zip(gc).enumerate() {
        assert!(
            max_rel(a, b) < tol,
            "{case} gradient {i}: {}",
            max_rel(a, b)
        );
    }
}
