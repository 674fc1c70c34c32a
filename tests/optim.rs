//! Optimizers, EMA and schedules over flat buffers (src/optim).
//!
//! Expected values are closed forms derived by hand for a tiny layout: `w` is a 2x2 weight
//! (weight decay) at offset 0 and `b` a length-2 bias (no decay) at offset 4. Two facts make the
//! first two Adam-type steps hand-computable (bias correction on, moments start at 0):
//!   * step 1:                        m/bc1 = g,  sqrt(v/bc2) = |g|
//!   * step 2 with the same gradient: m/bc1 = g,  sqrt(v/bc2) = |g|
//!   * step 2 with a zero gradient:   m/bc1 = b1/(1+b1) g,  sqrt(v/bc2) = sqrt(b2/(1+b2)) |g|
//!
//! so the Adam direction is `g / (|g| + eps)` or `(b1/(1+b1)) g / (sqrt(b2/(1+b2)) |g| + eps)`.
//!
//! LAMB, AdamW and SGD are also compared over 5 steps against independent f64 implementations
//! (torch is not available here) on a random 3-tensor layout whose large tensor spans several
//! parallel chunks, and their bits over many configurations against a digest of the results
//! of the host optimizers before the one-interface refactor (`cpu_bits_unchanged`).
//!
//! Everything here runs on host tensors (the CPU backend); tests/cuda_optim.rs runs the same
//! interface on the device.

use ghostv3::nn::Builder;
use ghostv3::optim::{
    AdamW, AdamWOptions, Ema, EmaConfig, EmaWarmup, Lamb, LambOptions, Layout, LayoutEntry,
    Optimizer, OptimizerConfig, OptimizerKind, ScheduleConfig, ScheduleKind, Sgd, SgdOptions,
    Update,
};
use ghostv3::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// A 1-D host tensor of `v`.
fn t(v: &[f32]) -> Tensor {
    Tensor::new(&[v.len()], v.to_vec())
}

/// One optimizer step of host slices (no EMA): `p` updated in place.
fn step(opt: &mut dyn Optimizer, p: &mut [f32], g: &[f32], lr: f64) {
    let mut pt = t(p);
    opt.step(&mut pt, &t(g), lr, None).unwrap();
    p.copy_from_slice(pt.data());
}

const B1: f64 = 0.9;
const B2: f64 = 0.999;
const LAMB_EPS: f64 = 1e-6;
const ADAM_EPS: f64 = 1e-8;

/// `w` [2, 2] (decay) then `b` [2] (no decay), built through the real `FlatStore`.
fn tiny_layout() -> Layout {
    let mut b = Builder::new(0);
    b.param_const("w".into(), &[2, 2], 0.0);
    b.param_const("b".into(), &[2], 0.0);
    Layout::from_store(&b.finish().params)
}

fn assert_close(what: &str, got: &[f32], want: &[f64], rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= rtol * w.abs().max(1e-3),
            "{what}[{i}]: got {g}, want {w} (abs err {err:e})"
        );
    }
}

fn norm(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// Step-1 Adam direction for one element (see the module docs).
fn dir1(g: f64, eps: f64) -> f64 {
    g / (g.abs() + eps)
}

/// Step-2 Adam direction after a zero gradient, for a step-1 gradient `g`.
fn dir2_zero(g: f64, eps: f64) -> f64 {
    (B1 / (1.0 + B1)) * g / ((B2 / (1.0 + B2)).sqrt() * g.abs() + eps)
}

// ---------------------------------------------------------------------------------------------
// Layout and config

#[test]
fn layout_from_store_groups_decay_like_timm() {
    let l = tiny_layout();
    assert_eq!(l.numel(), 6);
    let e = l.entries();
    assert_eq!(
        (e[0].name.as_str(), e[0].offset, e[0].len, e[0].decay),
        ("w", 0, 4, true)
    );
    assert_eq!(
        (e[1].name.as_str(), e[1].offset, e[1].len, e[1].decay),
        ("b", 4, 2, false)
    );
    // timm also excludes `*.bias` whatever its rank, and keeps 4-D conv weights.
    let l = Layout::from_shapes(&[
        ("conv.weight", vec![8, 1, 3, 3]),
        ("odd.bias", vec![2, 2]),
        ("bn.weight", vec![8]),
    ]);
    let decay: Vec<bool> = l.entries().iter().map(|e| e.decay).collect();
    assert_eq!(decay, [true, false, false]);
    assert_eq!(l.numel(), 72 + 4 + 8);
}

#[test]
fn layout_rejects_overlap_and_overflow() {
    let e = |name: &str, offset, len| LayoutEntry {
        name: name.into(),
        offset,
        len,
        shape: vec![len],
        decay: false,
    };
    let err = Layout::from_entries(vec![e("a", 0, 4), e("b", 3, 2)], 8).unwrap_err();
    assert!(err.to_string().contains("b at offset 3 overlaps"), "{err}");
    let err = Layout::from_entries(vec![e("a", 0, 4)], 3).unwrap_err();
    assert!(
        err.to_string().contains("past the buffer length 3"),
        "{err}"
    );
    // Gaps are fine and stay untouched.
    let l = Layout::from_entries(vec![e("a", 1, 2), e("b", 4, 2)], 7).unwrap();
    let mut opt = Sgd::new(l, SgdOptions::default());
    let mut p = vec![1.0f32; 7];
    step(&mut opt, &mut p, &[5.0; 7], 0.1);
    assert_eq!((p[0], p[3], p[6]), (1.0, 1.0, 1.0));
    assert!(p[1] < 1.0 && p[5] < 1.0);
}

#[test]
#[should_panic(expected = "lamb: grads have 5 values, layout has 6")]
fn step_panics_on_buffer_size_mismatch() {
    let mut opt = Lamb::new(tiny_layout(), LambOptions::default());
    step(&mut opt, &mut [0.0; 6], &[0.0; 5], 0.1);
}

#[test]
fn optimizer_config_from_toml() {
    let cfg: OptimizerConfig = toml::from_str(
        r#"
        kind = "lamb"
        weight_decay = 0.05
        betas = [0.9, 0.99]
        "#,
    )
    .unwrap();
    let o = cfg.lamb_options().unwrap();
    assert_eq!(
        o,
        LambOptions {
            betas: (0.9, 0.99),
            eps: 1e-6,
            weight_decay: 0.05,
            max_grad_norm: Some(1.0),
        }
    );
    let opt = cfg.build(&tiny_layout()).unwrap();
    assert_eq!(opt.name(), "lamb");

    // Class defaults per kind.
    assert_eq!(
        OptimizerConfig::new(OptimizerKind::Adamw)
            .adamw_options()
            .unwrap(),
        AdamWOptions {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: None
        }
    );
    assert_eq!(
        OptimizerConfig::new(OptimizerKind::Sgd)
            .sgd_options()
            .unwrap(),
        SgdOptions {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.0,
            max_grad_norm: None
        }
    );
    // 0 turns LAMB's built-in clipping off.
    let cfg: OptimizerConfig = toml::from_str("kind = \"lamb\"\nmax_grad_norm = 0.0").unwrap();
    assert_eq!(cfg.lamb_options().unwrap().max_grad_norm, None);

    let err = toml::from_str::<OptimizerConfig>("kind = \"lamb\"\nweight_dcay = 0.05")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `weight_dcay`"), "{err}");
    let err = toml::from_str::<OptimizerConfig>("kind = \"rmsprop\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("rmsprop"), "{err}");
    // A field of another optimizer is an error, not silently ignored.
    let cfg: OptimizerConfig = toml::from_str("kind = \"lamb\"\nmomentum = 0.9").unwrap();
    let err = cfg.build(&tiny_layout()).err().unwrap().to_string();
    assert!(err.contains("does not take `momentum`"), "{err}");
    let cfg: OptimizerConfig = toml::from_str("kind = \"sgd\"\nmomentum = 0.0").unwrap();
    let err = cfg.build(&tiny_layout()).err().unwrap().to_string();
    assert!(err.contains("nesterov requires momentum"), "{err}");
    let cfg: OptimizerConfig = toml::from_str("kind = \"adamw\"\nbetas = [0.9, 1.0]").unwrap();
    assert!(cfg.build(&tiny_layout()).is_err());
    let cfg: OptimizerConfig = toml::from_str("kind = \"adamw\"\nmax_grad_norm = -1.0").unwrap();
    assert!(cfg.build(&tiny_layout()).is_err());
}

// ---------------------------------------------------------------------------------------------
// LAMB

/// LAMB on the tiny layout with `weight_decay` and the other options at their defaults.
fn lamb(weight_decay: f64) -> Lamb {
    let o = LambOptions {
        weight_decay,
        ..Default::default()
    };
    Lamb::new(tiny_layout(), o)
}

/// Step 1 with clipping (global norm 5 > 1), step 2 with the same gradient.
#[test]
fn lamb_two_steps_clip_trust_and_no_decay_bias() {
    let (lr, wd) = (0.1, 0.1);
    let mut opt = lamb(wd);
    let p0 = [1.0, 2.0, 2.0, 4.0, 3.0, 4.0];
    let mut p = to_f32(&p0);
    // The bias gradient is tiny so that the global norm stays ~5: clip = 5, g' = g / 5.
    let g0 = [3.0f32, 0.0, 0.0, -4.0, 1e-4, -1e-4];
    let gnorm = (25.0f64 + 2.0 * 1e-4f64 * 1e-4).sqrt();
    let gc: Vec<f64> = g0.iter().map(|&g| g as f64 / gnorm).collect();

    step(&mut opt, &mut p, &g0, lr);
    // Clipping shows in the first moment: exp_avg = (1 - b1) * g / clip.
    let m1: Vec<f64> = gc.iter().map(|g| (1.0 - B1) * g).collect();
    assert_close(
        "exp_avg step 1",
        opt.moment("exp_avg").unwrap().data(),
        &m1,
        1e-6,
    );

    // w: update = g'/(|g'|+eps) + wd * p, trust = ||p|| / ||update|| (||p|| = 5).
    let u: Vec<f64> = (0..4).map(|i| dir1(gc[i], LAMB_EPS) + wd * p0[i]).collect();
    let trust = 5.0 / norm(&u);
    // update ~ [1.1, 0.2, 0.2, -0.6], ||update||^2 ~ 1.65.
    assert!((trust - 5.0 / 1.65f64.sqrt()).abs() < 1e-5, "trust {trust}");
    let mut want: Vec<f64> = (0..4).map(|i| p0[i] - lr * trust * u[i]).collect();
    // b: no decay group -> no L2 term and trust 1 (a trust ratio would scale it by ~3.7).
    want.extend((4..6).map(|i| p0[i] - lr * dir1(gc[i], LAMB_EPS)));
    assert_close("lamb step 1", &p, &want, 1e-6);

    // Step 2, same gradient: same direction, decay and trust on the new weights.
    let p1 = want.clone();
    step(&mut opt, &mut p, &g0, lr);
    let u: Vec<f64> = (0..4).map(|i| dir1(gc[i], LAMB_EPS) + wd * p1[i]).collect();
    let trust = norm(&p1[..4]) / norm(&u);
    let mut want: Vec<f64> = (0..4).map(|i| p1[i] - lr * trust * u[i]).collect();
    want.extend((4..6).map(|i| p1[i] - lr * dir1(gc[i], LAMB_EPS)));
    assert_close("lamb step 2", &p, &want, 1e-6);
    assert_eq!(opt.steps(), 2);
}

/// Small gradient: no clipping (clip = max(0.5 / 1, 1) = 1). Step 2 with a zero gradient.
#[test]
fn lamb_no_clip_then_zero_gradient() {
    let (lr, wd) = (0.05, 0.2);
    let mut opt = lamb(wd);
    let p0 = [0.5, -1.0, 0.0, 1.5, 2.0, -2.0];
    let g = [0.3, 0.0, 0.0, 0.0, 0.0, -0.4]; // ||g|| = 0.5
    let mut p: Vec<f32> = p0.iter().map(|&v| v as f32).collect();
    let gf: Vec<f32> = g.iter().map(|&v| v as f32).collect();
    step(&mut opt, &mut p, &gf, lr);
    assert_close(
        "exp_avg unclipped",
        opt.moment("exp_avg").unwrap().data(),
        &g.map(|g| (1.0 - B1) * g),
        1e-6,
    );
    let u: Vec<f64> = (0..4).map(|i| dir1(g[i], LAMB_EPS) + wd * p0[i]).collect();
    let trust = norm(&p0[..4]) / norm(&u);
    let mut p1: Vec<f64> = (0..4).map(|i| p0[i] - lr * trust * u[i]).collect();
    p1.extend((4..6).map(|i| p0[i] - lr * dir1(g[i], LAMB_EPS)));
    assert_close("lamb step 1", &p, &p1, 1e-6);

    step(&mut opt, &mut p, &[0.0; 6], lr);
    let u: Vec<f64> = (0..4)
        .map(|i| dir2_zero(g[i], LAMB_EPS) + wd * p1[i])
        .collect();
    let trust = norm(&p1[..4]) / norm(&u);
    let mut p2: Vec<f64> = (0..4).map(|i| p1[i] - lr * trust * u[i]).collect();
    p2.extend((4..6).map(|i| p1[i] - lr * dir2_zero(g[i], LAMB_EPS)));
    assert_close("lamb step 2 (zero grad)", &p, &p2, 1e-6);
}

/// ||p|| = 0 and ||update|| = 0 both give trust 1 and never NaN.
#[test]
fn lamb_zero_norms_give_trust_one() {
    let lr = 0.1;
    let mut opt = Lamb::new(
        tiny_layout(),
        LambOptions {
            weight_decay: 0.1,
            max_grad_norm: None,
            ..Default::default()
        },
    );
    // w = 0 with a gradient: ||p|| = 0 -> trust 1, update = g/(|g|+eps) (L2 term is 0).
    let mut p = [0.0f32; 6];
    let g = [0.5f32, -2.0, 0.0, 1.0, 0.0, 0.0];
    step(&mut opt, &mut p, &g, lr);
    let want: Vec<f64> = g.iter().map(|&g| -lr * dir1(g as f64, LAMB_EPS)).collect();
    assert_close("||p|| = 0", &p, &want, 1e-6);

    // w = 0 and g = 0 from the start: update = 0, ||update|| = 0 -> trust 1, p stays 0.
    let mut opt = Lamb::new(tiny_layout(), LambOptions::default());
    let mut p = [0.0f32; 6];
    step(&mut opt, &mut p, &[0.0; 6], lr);
    step(&mut opt, &mut p, &[0.0; 6], lr);
    assert_eq!(p, [0.0; 6]);

    // Zero gradient, non-zero weights: update = wd * p, trust = ||p|| / (wd ||p||) = 1 / wd,
    // so p -= lr * p; the bias (update 0, no decay) stays.
    let mut opt = Lamb::new(tiny_layout(), LambOptions::default());
    let mut p = [3.0f32, 0.0, 0.0, 4.0, 1.0, 1.0];
    step(&mut opt, &mut p, &[0.0; 6], lr);
    assert_close(
        "zero grad",
        &p,
        &[3.0 * 0.9, 0.0, 0.0, 4.0 * 0.9, 1.0, 1.0],
        1e-6,
    );
}

/// weight_decay = 0: timm applies no trust ratio anywhere (always_adapt=False).
#[test]
fn lamb_without_weight_decay_is_bias_corrected_adam() {
    let lr = 0.01;
    let mut opt = lamb(0.0);
    let mut p = [10.0f32, 10.0, 10.0, 10.0, 10.0, 10.0];
    let g = [0.1f32, -0.2, 0.3, -0.4, 0.5, 0.0]; // ||g|| < 1: no clip
    step(&mut opt, &mut p, &g, lr);
    let want: Vec<f64> = g
        .iter()
        .map(|&g| 10.0 - lr * dir1(g as f64, LAMB_EPS))
        .collect();
    assert_close("lamb wd=0", &p, &want, 1e-6);
}

// ---------------------------------------------------------------------------------------------
// AdamW

#[test]
fn adamw_two_steps_decoupled_decay_and_clip() {
    let (lr, wd, max) = (0.1, 0.5, 1.0);
    let mut opt = AdamW::new(
        tiny_layout(),
        AdamWOptions {
            weight_decay: wd,
            max_grad_norm: Some(max),
            ..Default::default()
        },
    );
    let p0 = [1.0, -2.0, 3.0, 0.5, 1.0, -1.0];
    // ||g|| = sqrt(4 + 0 + 1 + 4 + 16 + 0) = 5 -> coef = 1 / (5 + 1e-6) (torch clip_grad_norm_).
    let g = [2.0, 0.0, -1.0, 2.0, 4.0, 0.0];
    let coef = max / (5.0 + 1e-6);
    let gc: Vec<f64> = g.iter().map(|g| g * coef).collect();
    let mut p: Vec<f32> = p0.iter().map(|&v| v as f32).collect();
    let gf: Vec<f32> = g.iter().map(|&v| v as f32).collect();

    // w: p * (1 - lr wd) - lr * dir(g'); b: no decay.
    let update = |p: &[f64], dir: fn(f64, f64) -> f64| -> Vec<f64> {
        (0..6)
            .map(|i| {
                let d = if i < 4 { 1.0 - lr * wd } else { 1.0 };
                p[i] * d - lr * dir(gc[i], ADAM_EPS)
            })
            .collect()
    };

    // Step 1: direction g'/(|g'| + eps).
    step(&mut opt, &mut p, &gf, lr);
    let p1 = update(&p0, dir1);
    assert_close("adamw step 1", &p, &p1, 1e-6);

    // Step 2 with a zero gradient: no clipping (norm 0), decay again, momentum-only direction.
    step(&mut opt, &mut p, &[0.0; 6], lr);
    let p2 = update(&p1, dir2_zero);
    assert_close("adamw step 2", &p, &p2, 1e-6);
}

// ---------------------------------------------------------------------------------------------
// SGD

fn sgd(momentum: f64, nesterov: bool, wd: f64, max_grad_norm: Option<f64>) -> Sgd {
    Sgd::new(
        tiny_layout(),
        SgdOptions {
            momentum,
            nesterov,
            weight_decay: wd,
            max_grad_norm,
        },
    )
}

#[test]
fn sgd_nesterov_two_steps() {
    let (lr, mu, wd) = (0.1, 0.9, 0.1);
    let mut opt = sgd(mu, true, wd, None);
    let mut p = [1.0f32, 2.0, -1.0, 0.0, 1.0, -1.0];
    let g1 = [0.5f32, -0.5, 1.0, 2.0, 1.0, 0.0];
    step(&mut opt, &mut p, &g1, lr);
    // w[0]: g' = 0.5 + 0.1*1 = 0.6, buf = 0.6, d = 0.6 + 0.9*0.6 = 1.14, p = 1 - 0.114 = 0.886
    // w[1]: g' = -0.5 + 0.2 = -0.3, d = -0.57, p = 2.057
    // w[2]: g' = 1 - 0.1 = 0.9, d = 1.71, p = -1.171
    // w[3]: g' = 2, d = 3.8, p = -0.38
    // b[0]: g' = 1 (no decay), d = 1.9, p = 0.81;  b[1]: unchanged
    let p1 = [0.886, 2.057, -1.171, -0.38, 0.81, -1.0];
    assert_close("sgd nesterov step 1", &p, &p1, 1e-6);

    let g2 = [0.0f32, 1.0, 0.0, -1.0, 1.0, 2.0];
    step(&mut opt, &mut p, &g2, lr);
    // w[0]: g' = 0.0886, buf = 0.54 + 0.0886 = 0.6286, d = 0.0886 + 0.56574 = 0.65434
    // w[1]: g' = 1.2057, buf = -0.27 + 1.2057 = 0.9357, d = 1.2057 + 0.84213 = 2.04783
    // w[2]: g' = -0.1171, buf = 0.81 - 0.1171 = 0.6929, d = -0.1171 + 0.62361 = 0.50651
    // w[3]: g' = -1.038, buf = 1.8 - 1.038 = 0.762, d = -1.038 + 0.6858 = -0.3522
    // b[0]: g' = 1, buf = 0.9 + 1 = 1.9, d = 1 + 1.71 = 2.71
    // b[1]: g' = 2, buf = 2, d = 3.8
    let p2 = [
        0.886 - 0.065434,
        2.057 - 0.204783,
        -1.171 - 0.050651,
        -0.38 + 0.03522,
        0.81 - 0.271,
        -1.0 - 0.38,
    ];
    assert_close("sgd nesterov step 2", &p, &p2, 1e-6);
}

#[test]
fn sgd_momentum_plain_and_clip() {
    let (lr, mu) = (0.1, 0.9);
    // Classical momentum (no Nesterov), clipping at 1 with ||g|| = 5: coef = 1/(5 + 1e-6).
    let mut opt = sgd(mu, false, 0.0, Some(1.0));
    let mut p = [0.0f32; 6];
    let g = [3.0f32, 0.0, 0.0, 4.0, 0.0, 0.0];
    let c = 1.0 / (5.0 + 1e-6);
    step(&mut opt, &mut p, &g, lr);
    let p1: Vec<f64> = g.iter().map(|&g| -lr * g as f64 * c).collect();
    assert_close("sgd momentum step 1", &p, &p1, 1e-6);
    step(&mut opt, &mut p, &g, lr);
    // buf = 0.9 g' + g' = 1.9 g'
    let p2: Vec<f64> = g.iter().map(|&g| -lr * g as f64 * c * 2.9).collect();
    assert_close("sgd momentum step 2", &p, &p2, 1e-6);

    // momentum 0: plain SGD with L2 on the weight only, and no momentum buffer in the state.
    let mut opt = sgd(0.0, false, 0.5, None);
    let mut p = [1.0f32, 1.0, 1.0, 1.0, 1.0, 1.0];
    step(&mut opt, &mut p, &[1.0; 6], 0.1);
    assert_close(
        "sgd no momentum",
        &p,
        &[0.85, 0.85, 0.85, 0.85, 0.9, 0.9],
        1e-6,
    );
    let names: Vec<String> = opt.state().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["step"]);
}

// ---------------------------------------------------------------------------------------------
// f64 references on a random layout (several chunks per large tensor)

fn random_layout() -> Layout {
    Layout::from_shapes(&[
        ("conv.weight", vec![8, 3, 3, 3]),
        ("bn.bias", vec![8]),
        // 40,000 elements: more than two parallel chunks, so the chunked norm reduction runs.
        ("fc.weight", vec![200, 200]),
    ])
}

/// Normal samples rounded to f32, so the f64 reference starts from the very same numbers.
fn randn(rng: &mut StdRng, n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| (rng.sample::<f64, _>(StandardNormal) * scale) as f32 as f64)
        .collect()
}

struct Run {
    p0: Vec<f64>,
    grads: Vec<Vec<f64>>,
    lrs: Vec<f64>,
}

fn random_run(n: usize, seed: u64) -> Run {
    let mut rng = StdRng::seed_from_u64(seed);
    let p0 = randn(&mut rng, n, 0.1);
    // Gradient norms ~ 3.0, 0.02, 2.0, 0.5, 8.0: clipping on and off across the steps.
    let scales = [0.015, 0.0001, 0.01, 0.0025, 0.04];
    let grads = scales.iter().map(|&s| randn(&mut rng, n, s)).collect();
    Run {
        p0,
        grads,
        lrs: vec![5e-3, 4e-3, 3e-3, 2e-3, 1e-3],
    }
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn global_norm(g: &[f64]) -> f64 {
    norm(g)
}

/// torch's clip_grad_norm_ coefficient: min(max / (||g|| + 1e-6), 1), 1 without clipping.
fn torch_clip_coef(max_grad_norm: Option<f64>, g: &[f64]) -> f64 {
    max_grad_norm.map_or(1.0, |max| (max / (global_norm(g) + 1e-6)).min(1.0))
}

/// Adam's moments of the f64 references, per element.
struct Moments {
    m: Vec<f64>,
    v: Vec<f64>,
    betas: (f64, f64),
}

impl Moments {
    fn new(n: usize, betas: (f64, f64)) -> Self {
        Moments {
            m: vec![0.0; n],
            v: vec![0.0; n],
            betas,
        }
    }

    /// Updates element `i` with gradient `g` at step `t` (from 1); returns the bias-corrected
    /// (m^, sqrt(v^)).
    fn update(&mut self, i: usize, g: f64, t: f64) -> (f64, f64) {
        let (b1, b2) = self.betas;
        let (m, v) = (&mut self.m[i], &mut self.v[i]);
        *m = b1 * *m + (1.0 - b1) * g;
        *v = b2 * *v + (1.0 - b2) * g * g;
        (*m / (1.0 - b1.powf(t)), (*v / (1.0 - b2.powf(t))).sqrt())
    }
}

/// Independent LAMB in f64, tensor by tensor, from timm/optim/lamb.py.
fn lamb_reference(layout: &Layout, o: &LambOptions, run: &Run) -> Vec<f64> {
    let mut p = run.p0.clone();
    let mut adam = Moments::new(p.len(), o.betas);
    for (step, (g, &lr)) in run.grads.iter().zip(&run.lrs).enumerate() {
        let t = (step + 1) as f64;
        let clip = match o.max_grad_norm {
            Some(max) => (global_norm(g) / max).max(1.0),
            None => 1.0,
        };
        for e in layout.entries() {
            let r = e.offset..e.offset + e.len;
            let wd = if e.decay { o.weight_decay } else { 0.0 };
            let mut upd = vec![0.0; e.len];
            for (k, i) in r.clone().enumerate() {
                let (mh, vh) = adam.update(i, g[i] / clip, t);
                upd[k] = mh / (vh + o.eps) + wd * p[i];
            }
            let trust = if wd != 0.0 {
                let (pn, un) = (norm(&p[r.clone()]), norm(&upd));
                if pn > 0.0 && un > 0.0 {
                    pn / un
                } else {
                    1.0
                }
            } else {
                1.0
            };
            for (k, i) in r.enumerate() {
                p[i] -= lr * trust * upd[k];
            }
        }
    }
    p
}

fn adamw_reference(layout: &Layout, o: &AdamWOptions, run: &Run) -> Vec<f64> {
    let mut p = run.p0.clone();
    let mut adam = Moments::new(p.len(), o.betas);
    for (step, (g, &lr)) in run.grads.iter().zip(&run.lrs).enumerate() {
        let t = (step + 1) as f64;
        let c = torch_clip_coef(o.max_grad_norm, g);
        for e in layout.entries() {
            let wd = if e.decay { o.weight_decay } else { 0.0 };
            for i in e.offset..e.offset + e.len {
                p[i] *= 1.0 - lr * wd;
                let (mh, vh) = adam.update(i, g[i] * c, t);
                p[i] -= lr * mh / (vh + o.eps);
            }
        }
    }
    p
}

fn sgd_reference(layout: &Layout, o: &SgdOptions, run: &Run) -> Vec<f64> {
    let mut p = run.p0.clone();
    let mut buf: Vec<Option<f64>> = vec![None; p.len()];
    for (g, &lr) in run.grads.iter().zip(&run.lrs) {
        let c = torch_clip_coef(o.max_grad_norm, g);
        for e in layout.entries() {
            let wd = if e.decay { o.weight_decay } else { 0.0 };
            for i in e.offset..e.offset + e.len {
                let gi = g[i] * c + wd * p[i];
                let b = match buf[i] {
                    None => gi,
                    Some(b) => o.momentum * b + gi,
                };
                buf[i] = Some(b);
                let d = if o.nesterov { gi + o.momentum * b } else { b };
                p[i] -= lr * d;
            }
        }
    }
    p
}

fn run_f32(opt: &mut dyn Optimizer, run: &Run) -> Vec<f32> {
    let mut p = to_f32(&run.p0);
    for (g, &lr) in run.grads.iter().zip(&run.lrs) {
        step(opt, &mut p, &to_f32(g), lr);
    }
    p
}

/// Error bound per element: `tol` of the largest total change (the update math) plus a few f32
/// roundings of the parameter itself (one `p += ..` per step).
fn check_against(what: &str, got: &[f32], want: &[f64], p0: &[f64], tol: f64) {
    let scale = want
        .iter()
        .zip(p0)
        .map(|(w, p)| (w - p).abs())
        .fold(0.0f64, f64::max);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        let bound = tol * scale + 5.0 * f32::EPSILON as f64 * w.abs();
        assert!(
            err <= bound,
            "{what}[{i}]: got {g}, want {w}: err {err:e} > {bound:e} (largest change {scale:e})"
        );
    }
}

#[test]
fn lamb_matches_f64_reference_over_5_steps() {
    let layout = random_layout();
    let run = random_run(layout.numel(), 7);
    for (i, o) in [
        LambOptions {
            weight_decay: 0.05,
            ..Default::default()
        },
        LambOptions {
            weight_decay: 0.05,
            max_grad_norm: None,
            ..Default::default()
        },
        LambOptions {
            weight_decay: 0.0,
            betas: (0.8, 0.99),
            ..Default::default()
        },
    ]
    .into_iter()
    .enumerate()
    {
        let want = lamb_reference(&layout, &o, &run);
        let got = run_f32(&mut Lamb::new(layout.clone(), o), &run);
        check_against(&format!("lamb case {i}"), &got, &want, &run.p0, 1e-5);
    }
}

#[test]
fn adamw_and_sgd_match_f64_reference_over_5_steps() {
    let layout = random_layout();
    let run = random_run(layout.numel(), 11);
    let o = AdamWOptions {
        weight_decay: 0.05,
        max_grad_norm: Some(1.0),
        ..Default::default()
    };
    let want = adamw_reference(&layout, &o, &run);
    let got = run_f32(&mut AdamW::new(layout.clone(), o), &run);
    check_against("adamw", &got, &want, &run.p0, 1e-5);

    for nesterov in [false, true] {
        let o = SgdOptions {
            momentum: 0.9,
            nesterov,
            weight_decay: 1e-2,
            max_grad_norm: Some(1.0),
        };
        let want = sgd_reference(&layout, &o, &run);
        let got = run_f32(&mut Sgd::new(layout.clone(), o), &run);
        check_against(
            &format!("sgd nesterov={nesterov}"),
            &got,
            &want,
            &run.p0,
            1e-5,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// State save/load

fn resume_matches(cfg: OptimizerConfig) {
    let layout = random_layout();
    let run = random_run(layout.numel(), 3);
    let straight = run_f32(cfg.build(&layout).unwrap().as_mut(), &run);

    let mut a = cfg.build(&layout).unwrap();
    let mut p = to_f32(&run.p0);
    for (g, &lr) in run.grads.iter().zip(&run.lrs).take(2) {
        step(a.as_mut(), &mut p, &to_f32(g), lr);
    }
    let saved = a.state();
    drop(a);
    let mut b = cfg.build(&layout).unwrap();
    b.load_state(&saved).unwrap();
    assert_eq!(b.steps(), 2);
    for (g, &lr) in run.grads.iter().zip(&run.lrs).skip(2) {
        step(b.as_mut(), &mut p, &to_f32(g), lr);
    }
    assert_eq!(p, straight, "{:?}: resumed run differs", cfg.kind);
}

#[test]
fn state_round_trip_continues_identically() {
    let mut lamb = OptimizerConfig::new(OptimizerKind::Lamb);
    lamb.weight_decay = Some(0.05);
    resume_matches(lamb);
    resume_matches(OptimizerConfig::new(OptimizerKind::Adamw));
    let mut sgd = OptimizerConfig::new(OptimizerKind::Sgd);
    sgd.weight_decay = Some(1e-4);
    resume_matches(sgd);
}

#[test]
fn load_state_errors_name_the_buffer() {
    let layout = tiny_layout();
    let mut opt = Lamb::new(layout.clone(), LambOptions::default());
    let mut p = [1.0f32; 6];
    step(&mut opt, &mut p, &[0.5; 6], 0.1);
    let good = opt.state();
    let names: Vec<&str> = good.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["exp_avg", "exp_avg_sq", "step"]);

    let mut fresh = Lamb::new(layout.clone(), LambOptions::default());
    let missing: Vec<_> = good
        .iter()
        .filter(|(n, _)| n != "exp_avg_sq")
        .cloned()
        .collect();
    let err = fresh.load_state(&missing).unwrap_err().to_string();
    assert!(err.contains("missing buffer `exp_avg_sq`"), "{err}");

    let mut short = good.clone();
    short[0].1.pop();
    let err = fresh.load_state(&short).unwrap_err().to_string();
    assert!(err.contains("`exp_avg` has 5 values, expected 6"), "{err}");

    let mut extra = good.clone();
    extra.push(("momentum_buffer".into(), vec![0.0; 6]));
    let err = fresh.load_state(&extra).unwrap_err().to_string();
    assert!(err.contains("unexpected buffer `momentum_buffer`"), "{err}");

    let mut bad_step = good.clone();
    bad_step[2].1 = vec![1.5, 0.0];
    assert!(fresh.load_state(&bad_step).is_err());
    // Nothing was loaded by the failed attempts.
    assert_eq!(fresh.steps(), 0);
    assert!(fresh
        .moment("exp_avg")
        .unwrap()
        .data()
        .iter()
        .all(|&v| v == 0.0));

    // Step counters beyond f32's 2^24 survive the round trip exactly.
    let big = vec![
        ("exp_avg".to_string(), vec![0.0; 6]),
        ("exp_avg_sq".to_string(), vec![0.0; 6]),
        ("step".to_string(), vec![5.0, 2.0]),
    ];
    fresh.load_state(&big).unwrap();
    assert_eq!(fresh.steps(), 2 * (1 << 24) + 5);
    assert_eq!(fresh.state()[2].1, vec![5.0, 2.0]);

    let mut sgd = Sgd::new(layout, SgdOptions::default());
    let err = sgd.load_state(&good).unwrap_err().to_string();
    assert!(
        err.contains("sgd state: unexpected buffer `exp_avg`"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// The bits of the CPU path

/// (name, offset, shape, decay) of a layout without gaps: tensors over two and three chunks,
/// odd sizes, both decay groups.
fn dense_entries() -> (Vec<LayoutEntry>, usize) {
    let shapes: [(&str, Vec<usize>); 7] = [
        ("conv.weight", vec![64, 32, 3, 3]),
        ("bn.weight", vec![63]),
        ("bn.bias", vec![63]),
        ("fc.weight", vec![37, 451]),
        ("fc.bias", vec![37]),
        ("big.weight", vec![200, 230]),
        ("dw.weight", vec![7, 1, 5, 5]),
    ];
    let mut offset = 0;
    let entries = shapes
        .into_iter()
        .map(|(name, shape)| {
            let len = shape.iter().product();
            let e = LayoutEntry {
                name: name.into(),
                offset,
                len,
                decay: shape.len() > 1 && !name.ends_with(".bias"),
                shape,
            };
            offset += len;
            e
        })
        .collect();
    (entries, offset)
}

/// A layout with gaps before, between and after the tensors.
fn gap_entries() -> (Vec<LayoutEntry>, usize) {
    let e = |name: &str, offset, shape: Vec<usize>, decay| LayoutEntry {
        name: name.into(),
        offset,
        len: shape.iter().product(),
        shape,
        decay,
    };
    (
        vec![
            e("a.weight", 3, vec![17, 1000], true),
            e("a.bias", 17_010, vec![17], false),
            e("b.weight", 17_100, vec![5, 9], true),
            e("c.weight", 17_200, vec![40_000], true),
        ],
        57_300,
    )
}

/// Every optimizer configuration the digest covers: clipping on (active and not) and off,
/// decay on and off, other betas and eps, SGD with and without momentum and Nesterov.
fn bit_cases() -> Vec<OptimizerConfig> {
    let c = |kind, wd: f64, clip: Option<f64>| OptimizerConfig {
        weight_decay: Some(wd),
        // 0 turns clipping off (LAMB's default would be 1).
        max_grad_norm: Some(clip.unwrap_or(0.0)),
        ..OptimizerConfig::new(kind)
    };
    let (lamb, adamw, sgd) = (
        OptimizerKind::Lamb,
        OptimizerKind::Adamw,
        OptimizerKind::Sgd,
    );
    let sgd_with = |m: f64, n: bool, wd, clip| OptimizerConfig {
        momentum: Some(m),
        nesterov: Some(n),
        ..c(sgd, wd, clip)
    };
    // Betas (0.8, 0.99) and another eps.
    let other_betas = |kind, eps: f64, wd, clip| OptimizerConfig {
        betas: Some((0.8, 0.99)),
        eps: Some(eps),
        ..c(kind, wd, clip)
    };
    vec![
        c(lamb, 0.05, Some(1.0)),
        c(lamb, 0.05, None),
        other_betas(lamb, 1e-5, 0.0, Some(1.0)),
        c(lamb, 0.01, Some(50.0)),
        c(adamw, 0.05, Some(1.0)),
        c(adamw, 0.05, None),
        other_betas(adamw, 1e-6, 0.0, Some(50.0)),
        c(sgd, 0.0, None),
        sgd_with(0.9, false, 0.05, Some(1.0)),
        sgd_with(0.8, true, 1e-4, Some(50.0)),
        sgd_with(0.0, false, 0.01, Some(0.5)),
    ]
}

fn uniform(rng: &mut StdRng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-s..s)).collect()
}

/// FNV-1a over the bits of the values, in order.
fn digest(h: &mut u64, v: &[f32]) {
    for x in v {
        *h ^= u64::from(x.to_bits());
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

/// The CPU path has the bits it had before the optimizers moved behind `backend::api::Optim`
/// (the loops are the same code in `backend::cpu::optim`): 4 steps of every configuration of
/// [`bit_cases`] on both layouts, with the EMA (decay warm-up) fused into the step on 3 of
/// them; the parameters after every step, then the optimizer and EMA state, hashed. The digest
/// was taken from the host optimizers of the previous interface (`step(&mut [f32], &[f32],
/// lr)` then `Ema::update`) on the same runs.
#[test]
fn cpu_bits_unchanged() {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (li, (entries, numel)) in [dense_entries(), gap_entries()].into_iter().enumerate() {
        let layout = Layout::from_entries(entries, numel).unwrap();
        for (ci, cfg) in bit_cases().into_iter().enumerate() {
            let mut opt = cfg.build(&layout).unwrap();
            let mut rng = StdRng::seed_from_u64(1000 + 100 * li as u64 + ci as u64);
            let mut p = t(&uniform(&mut rng, numel, 0.5));
            let bufs0 = uniform(&mut rng, 333, 1.0);
            let ema_cfg = EmaConfig {
                decay: 0.9,
                warmup: EmaWarmup::NumUpdates,
                ..Default::default()
            };
            let mut ema = Ema::new(ema_cfg, &p, &t(&bufs0)).unwrap();
            for s in 0..4 {
                let scale = [0.1f32, 0.001, 0.3, 0.02][s];
                let g = t(&uniform(&mut rng, numel, scale));
                let b = t(&uniform(&mut rng, 333, 1.0));
                let lr = 1e-2 * (1 + s) as f64;
                let with_ema = (s != 2).then_some((&mut ema, &b));
                opt.step(&mut p, &g, lr, with_ema).unwrap();
                digest(&mut h, p.data());
            }
            for (_, v) in opt.state().iter().chain(&ema.state()) {
                digest(&mut h, v);
            }
        }
    }
    assert_eq!(h, 0x19d9_fce9_7f26_f3ae, "the CPU optimizers' bits changed");
}

/// The EMA given to a step is the EMA updated after it, to the bit, for every optimizer and
/// layout (with gaps, which the EMA blends too); the step without it leaves the EMA alone.
#[test]
fn fused_ema_is_update_after_step() {
    for (entries, numel) in [dense_entries(), gap_entries()] {
        let layout = Layout::from_entries(entries, numel).unwrap();
        for cfg in bit_cases() {
            let mut rng = StdRng::seed_from_u64(5);
            let p0 = t(&uniform(&mut rng, numel, 0.5));
            let b0 = t(&uniform(&mut rng, 50, 1.0));
            let ema_cfg = EmaConfig {
                decay: 0.95,
                ..Default::default()
            };
            let (mut pa, mut pb) = (p0.deep_copy(), p0.deep_copy());
            let mut ea = Ema::new(ema_cfg.clone(), &p0, &b0).unwrap();
            let mut eb = Ema::new(ema_cfg, &p0, &b0).unwrap();
            let (mut oa, mut ob) = (cfg.build(&layout).unwrap(), cfg.build(&layout).unwrap());
            for s in 0..3 {
                let g = t(&uniform(&mut rng, numel, 0.1));
                let b = t(&uniform(&mut rng, 50, 1.0));
                let with_ema = s != 1;
                oa.step(&mut pa, &g, 1e-2, with_ema.then_some((&mut ea, &b)))
                    .unwrap();
                ob.step(&mut pb, &g, 1e-2, None).unwrap();
                if with_ema {
                    eb.update(&pb, &b);
                }
                assert_eq!(pa.data(), pb.data(), "{:?} params", cfg.kind);
                assert_eq!(ea.params().data(), eb.params().data(), "{:?}", cfg.kind);
                assert_eq!(ea.buffers().data(), eb.buffers().data(), "{:?}", cfg.kind);
                assert_eq!(ea.updates(), eb.updates());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// EMA

#[test]
fn ema_constant_decay_closed_form() {
    let d = 0.9;
    let cfg = EmaConfig {
        decay: d,
        ..Default::default()
    };
    let (e0, eb0) = ([1.0f32, -2.0, 0.5], [4.0f32]);
    let mut ema = Ema::new(cfg, &t(&e0), &t(&eb0)).unwrap();
    let (x, xb) = ([3.0f32, 0.0, 0.5], [0.0f32]);
    for _ in 0..5 {
        ema.update(&t(&x), &t(&xb));
    }
    // ema_n = x + d^n (e0 - x), weights and BN buffers alike.
    let dn = d.powi(5);
    let want: Vec<f64> = e0
        .iter()
        .zip(&x)
        .map(|(&e, &x)| x as f64 + dn * (e - x) as f64)
        .collect();
    assert_close("ema params", ema.params().data(), &want, 1e-6);
    assert_close("ema buffers", ema.buffers().data(), &[4.0 * dn], 1e-6);
    assert_eq!(ema.updates(), 5);
}

#[test]
fn ema_num_updates_warmup_closed_form() {
    let cfg = EmaConfig {
        decay: 0.9999,
        warmup: EmaWarmup::NumUpdates,
        ..Default::default()
    };
    assert!((cfg.decay_at(0) - 0.1).abs() < 1e-15);
    assert!((cfg.decay_at(10) - 11.0 / 20.0).abs() < 1e-15);
    assert_eq!(cfg.decay_at(1_000_000), 0.9999);
    let mut ema = Ema::new(cfg, &t(&[1.0]), &t(&[])).unwrap();
    for _ in 0..3 {
        ema.update(&t(&[0.0]), &t(&[]));
    }
    // prod_{t<n} (1+t)/(10+t) = 1 / C(n+9, 9); n = 3: 1/220.
    assert_close("ema warm-up", ema.params().data(), &[1.0 / 220.0], 1e-6);
}

#[test]
fn ema_power_warmup_is_running_mean_for_gamma1_power1() {
    // timm ModelEmaV3: d = 0 first, then 1 - 1/(1+t) = t/(1+t): the plain running mean.
    let cfg = EmaConfig {
        decay: 0.9999,
        warmup: EmaWarmup::Power,
        warmup_gamma: 1.0,
        warmup_power: 1.0,
    };
    assert_eq!(cfg.decay_at(0), 0.0);
    let mut ema = Ema::new(cfg, &t(&[100.0, 7.0]), &t(&[5.0])).unwrap();
    let xs = [1.0f32, 2.0, 6.0, 3.0];
    for &x in &xs {
        ema.update(&t(&[x, -x]), &t(&[2.0 * x]));
    }
    let mean = xs.iter().sum::<f32>() as f64 / 4.0;
    assert_close("ema mean", ema.params().data(), &[mean, -mean], 1e-6);
    assert_close(
        "ema mean buffers",
        ema.buffers().data(),
        &[2.0 * mean],
        1e-6,
    );
    // timm's default power 2/3: 1 - 2^(-2/3) at the second update.
    let d = EmaConfig {
        warmup: EmaWarmup::Power,
        ..Default::default()
    }
    .decay_at(1);
    assert!((d - (1.0 - 2f64.powf(-2.0 / 3.0))).abs() < 1e-15);
}

#[test]
fn ema_state_round_trip_and_config() {
    let cfg: EmaConfig = toml::from_str("decay = 0.99\nwarmup = \"num_updates\"").unwrap();
    assert_eq!(cfg.warmup, EmaWarmup::NumUpdates);
    assert!(toml::from_str::<EmaConfig>("decay = 0.99\nwarmp = true").is_err());
    assert!(Ema::new(
        EmaConfig {
            decay: 1.5,
            ..Default::default()
        },
        &t(&[]),
        &t(&[])
    )
    .is_err());

    let xs: Vec<[f32; 2]> = (0..6).map(|i| [i as f32, 1.0 / (1.0 + i as f32)]).collect();
    let mut a = Ema::new(cfg.clone(), &t(&[0.0, 0.0]), &t(&[1.0])).unwrap();
    let mut b = Ema::new(cfg.clone(), &t(&[0.0, 0.0]), &t(&[1.0])).unwrap();
    for x in &xs[..3] {
        a.update(&t(x), &t(&[x[0]]));
        b.update(&t(x), &t(&[x[0]]));
    }
    let mut c = Ema::new(cfg, &t(&[9.0, 9.0]), &t(&[9.0])).unwrap();
    c.load_state(&b.state()).unwrap();
    for x in &xs[3..] {
        a.update(&t(x), &t(&[x[0]]));
        c.update(&t(x), &t(&[x[0]]));
    }
    assert_eq!(a.params().data(), c.params().data());
    assert_eq!(a.buffers().data(), c.buffers().data());
    assert_eq!(c.updates(), 6);
    let err = c
        .load_state(&[("params".into(), vec![0.0; 2])])
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing buffer `buffers`"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Schedules

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1e-12)
}

#[test]
fn cosine_schedule_known_points() {
    let (base, min, warm_lr) = (5e-3, 1e-5, 1e-6);
    let s = ScheduleConfig {
        kind: ScheduleKind::Cosine,
        epochs: 600.0,
        warmup_epochs: 5.0,
        warmup_lr: warm_lr,
        min_lr: min,
        decay_epochs: 0.0,
        decay_rate: 0.1,
    };
    s.validate().unwrap();
    assert!(close(s.lr_at(base, 0.0), warm_lr));
    assert!(close(s.lr_at(base, 2.5), (warm_lr + base) / 2.0));
    assert!((s.lr_at(base, 5.0 - 1e-9) - base).abs() < 1e-11);
    // warmup_prefix=False: right after warm-up the cosine is at t = 5, not t = 0.
    let at5 = min + 0.5 * (base - min) * (1.0 + (std::f64::consts::PI * 5.0 / 600.0).cos());
    assert!(close(s.lr_at(base, 5.0), at5));
    assert!(close(s.lr_at(base, 300.0), (base + min) / 2.0));
    assert!(close(s.lr_at(base, 600.0), min));
    assert!(close(s.lr_at(base, 650.0), min));
    // Per-step fractional epochs: smooth and non-increasing after warm-up.
    let steps_per_epoch = 625.0;
    let mut prev = s.lr_at(base, 5.0);
    for k in (5 * 625 + 1)..(600 * 625) {
        let lr = s.lr_at(base, k as f64 / steps_per_epoch);
        assert!(lr <= prev && prev - lr < 1e-7, "step {k}: {prev} -> {lr}");
        prev = lr;
    }
}

#[test]
fn step_and_constant_schedules() {
    // The GhostNetV2 baseline: decay 0.973 every 2.4 epochs.
    let s = ScheduleConfig {
        kind: ScheduleKind::Step,
        epochs: 450.0,
        warmup_epochs: 0.0,
        warmup_lr: 0.0,
        min_lr: 0.0,
        decay_epochs: 2.4,
        decay_rate: 0.973,
    };
    s.validate().unwrap();
    let base = 0.064;
    assert!(close(s.lr_at(base, 0.0), base));
    assert!(close(s.lr_at(base, 2.39), base));
    assert!(close(s.lr_at(base, 2.4), base * 0.973));
    assert!(close(s.lr_at(base, 4.79), base * 0.973));
    assert!(close(s.lr_at(base, 4.8), base * 0.973 * 0.973));
    assert!(close(s.lr_at(base, 24.0), base * 0.973f64.powi(10)));

    let toml_cfg: ScheduleConfig =
        toml::from_str("kind = \"constant\"\nepochs = 10\nwarmup_epochs = 2\nwarmup_lr = 0.0")
            .unwrap();
    assert!(close(toml_cfg.lr_at(0.1, 1.0), 0.05));
    assert!(close(toml_cfg.lr_at(0.1, 2.0), 0.1));
    assert!(close(toml_cfg.lr_at(0.1, 9.5), 0.1));

    let err = toml::from_str::<ScheduleConfig>("kind = \"cosine\"\nepochs = 10\nwarmup = 2")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `warmup`"), "{err}");
    let bad: ScheduleConfig = toml::from_str("kind = \"step\"\nepochs = 10").unwrap();
    assert!(bad.validate().is_err(), "step without decay_epochs");
}

// ---------------------------------------------------------------------------------------------
// The finite-state flag of the update pass (`Update::take_nonfinite`, `Flat::take_nonfinite`)

/// What a step is given that is not finite (or, `HugeGrad`, finite but with a square that is
/// not: the second moment overflows while the parameter stays finite).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Poison {
    NanGrad,
    InfParam,
    HugeGrad,
}

/// Each optimizer with decay (LAMB: trust ratios over one chunk and over several), without
/// clipping, so that a huge gradient reaches the moments; LAMB clipped (the huge gradient is
/// divided down); SGD with Nesterov momentum and without momentum.
fn guard_cases() -> Vec<OptimizerConfig> {
    let c = |kind, wd: f64, clip: f64| OptimizerConfig {
        weight_decay: Some(wd),
        max_grad_norm: Some(clip),
        ..OptimizerConfig::new(kind)
    };
    vec![
        c(OptimizerKind::Lamb, 0.05, 0.0),
        c(OptimizerKind::Lamb, 0.05, 1.0),
        c(OptimizerKind::Adamw, 0.01, 0.0),
        OptimizerConfig {
            momentum: Some(0.9),
            nesterov: Some(true),
            ..c(OptimizerKind::Sgd, 1e-4, 0.0)
        },
        OptimizerConfig {
            momentum: Some(0.0),
            nesterov: Some(false),
            ..c(OptimizerKind::Sgd, 0.0, 0.0)
        },
    ]
}

/// Whether the step flags `poison`: NaN and infinity always; a finite gradient whose square
/// overflows only where it reaches an Adam second moment unclipped (it then holds +inf while
/// the parameter stays finite; SGD has no square, LAMB's clip divides the gradient down).
fn flags(cfg: &OptimizerConfig, poison: Poison) -> bool {
    match poison {
        Poison::NanGrad | Poison::InfParam => true,
        Poison::HugeGrad => cfg.kind != OptimizerKind::Sgd && cfg.max_grad_norm == Some(0.0),
    }
}

/// An element of each kind of [`random_layout`]: a decayed tensor of one chunk, a no-decay
/// tensor, the third chunk of a decayed tensor over several.
const GUARD_AT: [usize; 3] = [5, 219, 224 + 36_000];

/// `p` and `g` with `poison` at element `at`.
fn poisoned(p: &[f32], g: &[f32], poison: Poison, at: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut p, mut g) = (p.to_vec(), g.to_vec());
    match poison {
        Poison::NanGrad => g[at] = f32::NAN,
        Poison::InfParam => p[at] = f32::INFINITY,
        Poison::HugeGrad => g[at] = 1e30,
    }
    (p, g)
}

/// Every optimizer: false before any step and after a finite one; a step with one NaN gradient
/// element, one +inf parameter or an overflowing second moment reports it (in every kind of
/// tensor); the read clears it (false again); and the same optimizer, its state and parameters
/// reloaded from before the bad step, reports false after a finite step.
#[test]
fn take_nonfinite_reports_each_bad_step_once() {
    let layout = random_layout();
    let n = layout.numel();
    let mut rng = StdRng::seed_from_u64(41);
    for cfg in guard_cases() {
        for poison in [Poison::NanGrad, Poison::InfParam, Poison::HugeGrad] {
            for at in GUARD_AT {
                let case = format!(
                    "{:?} clip {:?} {poison:?} at {at}",
                    cfg.kind, cfg.max_grad_norm
                );
                let mut u = Update::new(&cfg, &layout, None).unwrap();
                assert!(!u.take_nonfinite().unwrap(), "{case}: before any step");
                let none = t(&[]);
                let mut p = t(&uniform(&mut rng, n, 0.5));
                u.step(&mut p, &none, &t(&uniform(&mut rng, n, 0.1)), 1e-2)
                    .unwrap();
                assert!(!u.take_nonfinite().unwrap(), "{case}: finite step");
                let (state, p1) = (u.optimizer.state(), p.data().to_vec());

                let (pb, gb) = poisoned(&p1, &uniform(&mut rng, n, 0.1), poison, at);
                let mut p = t(&pb);
                u.step(&mut p, &none, &t(&gb), 1e-2).unwrap();
                let want = flags(&cfg, poison);
                assert_eq!(u.take_nonfinite().unwrap(), want, "{case}: bad step");
                if poison == Poison::HugeGrad && want {
                    // The parameter is finite: only the moment can have raised the flag.
                    assert!(p.data().iter().all(|x| x.is_finite()), "{case}: params");
                }
                assert!(!u.take_nonfinite().unwrap(), "{case}: read twice");

                u.optimizer.load_state(&state).unwrap();
                let mut p = t(&p1);
                u.step(&mut p, &none, &t(&uniform(&mut rng, n, 0.1)), 1e-2)
                    .unwrap();
                assert!(
                    !u.take_nonfinite().unwrap(),
                    "{case}: finite step after reload"
                );
            }
        }
    }
}

/// The flag of `optim::Flat` itself, flags accumulating over steps until read, and an
/// `Update` whose optimizer was replaced refusing to answer (it would read the old one).
#[test]
fn take_nonfinite_on_flat_and_through_update() {
    let layout = random_layout();
    let n = layout.numel();
    let mut rng = StdRng::seed_from_u64(43);
    let mut lamb = Lamb::new(layout.clone(), LambOptions::default());
    assert!(!lamb.take_nonfinite().unwrap());
    let (p0, g0) = (uniform(&mut rng, n, 0.5), uniform(&mut rng, n, 0.1));
    let (pb, gb) = poisoned(&p0, &g0, Poison::NanGrad, 7);
    let mut p = t(&pb);
    lamb.step(&mut p, &t(&gb), 1e-2, None).unwrap();
    // A second (NaN again) step before the read: still one flag, read once.
    lamb.step(&mut p, &t(&g0), 1e-2, None).unwrap();
    assert!(lamb.take_nonfinite().unwrap());
    assert!(!lamb.take_nonfinite().unwrap());

    // Any optimizer put into an Update answers through the trait.
    let cfg = OptimizerConfig::new(OptimizerKind::Adamw);
    let mut u = Update::new(&cfg, &layout, None).unwrap();
    u.optimizer = cfg.build(&layout).unwrap();
    assert!(!u.take_nonfinite().unwrap());
    let mut p = t(&pb);
    u.step(&mut p, &t(&[]), &t(&gb), 1e-2).unwrap();
    assert!(u.take_nonfinite().unwrap());
}
