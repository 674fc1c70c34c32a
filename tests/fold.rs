//! Folding (re-parameterization) is exact: at every width and for every branch option, the deploy
//! form in eval mode gives the train form's eval outputs up to float rounding. Weights and BN
//! statistics are random and non-trivial (as in make_fixture.py), so every branch matters.
//! `fold_checked` (what `ghostv3 fold` runs before it writes) accepts trained-like weights and
//! refuses broken ones and folds that are off.

mod common;

use common::randomize_bn;
use ghostv3::models::{self, Model, ModelOptions};
use ghostv3::nn::RepOptions;
use ghostv3::{reparam, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

fn random_input(rng: &mut StdRng, n: usize, size: usize) -> Tensor<f32> {
    Tensor::new(
        &[n, 3, size, size],
        (0..n * 3 * size * size)
            .map(|_| StandardNormal.sample(rng))
            .collect(),
    )
}

fn check(name: &str, rep: RepOptions, size: usize, seed: u64) -> f64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let opts = ModelOptions {
        num_classes: 10,
        rep,
        seed,
        ..Default::default()
    };
    let mut train = models::create(name, &opts).unwrap();
    let gain = if rep.branches > 3 {
        (rep.branches + 2) as f32 / 3.0
    } else {
        1.0
    };
    randomize_bn(train.state_mut(), &mut rng, gain);
    let mut deploy = reparam::fold(&train).unwrap();
    assert!(deploy.is_deploy());
    let x = random_input(&mut rng, 2, size);
    let (yt, yd) = (train.predict(&x), deploy.predict(&x));
    let rel = yd.max_abs_diff(&yt) / yt.max_abs();
    println!("{name} {rep:?} at {size}: folded vs train form eval logits, max rel err {rel:.2e} (max abs logit {:.2e})", yt.max_abs());
    assert!(yt.max_abs() > 1e-3, "degenerate logits");
    assert!(
        rel <= 1e-5,
        "{name} {rep:?}: fold changes the outputs by {rel:.2e}"
    );
    rel
}

#[test]
fn fold_is_exact_at_every_width() {
    for (i, (name, _)) in models::GHOSTNETV3.into_iter().enumerate() {
        check(name, RepOptions::default(), 67, i as u64);
    }
}

#[test]
fn fold_is_exact_for_every_branch_option() {
    for branches in 1..=5 {
        for (scale, identity) in [(true, true), (false, true), (true, false), (false, false)] {
            check(
                "ghostnetv3_050",
                RepOptions {
                    branches,
                    scale,
                    identity,
                },
                64,
                branches as u64,
            );
        }
    }
}

/// GhostNetV3 0.5x built in its deploy form (default options otherwise).
fn deploy_ghostnetv3_050() -> Model {
    let opts = ModelOptions {
        deploy: true,
        ..Default::default()
    };
    models::create("ghostnetv3_050", &opts).unwrap()
}

/// The names and shapes of a model's parameters, in order.
fn param_shapes(m: &Model) -> Vec<(&String, &Vec<usize>)> {
    m.state()
        .params
        .entries()
        .iter()
        .map(|e| (&e.name, &e.shape))
        .collect()
}

#[test]
fn fold_keeps_shapes_of_the_plain_network() {
    // Whatever the training branches, the deploy form is the same network: same tensors, shapes.
    let plain = deploy_ghostnetv3_050();
    for rep in [
        RepOptions::default(),
        RepOptions::none(),
        RepOptions {
            branches: 5,
            scale: true,
            identity: false,
        },
    ] {
        let train = models::create(
            "ghostnetv3_050",
            &ModelOptions {
                rep,
                ..Default::default()
            },
        )
        .unwrap();
        let folded = reparam::fold(&train).unwrap();
        assert_eq!(param_shapes(&folded), param_shapes(&plain), "{rep:?}");
    }
}

#[test]
fn folding_a_deploy_model_is_an_error() {
    let d = deploy_ghostnetv3_050();
    let e = format!("{:#}", reparam::fold(&d).err().unwrap());
    assert!(e.contains("already in deploy"), "{e}");
}

/// The other models with `rep_branches = 3` (+ scale and identity branches where shapes allow):
/// folding gives their plain timm/torchvision network (same names and shapes) with the train
/// form's eval outputs, and the folded file loads into the plain model and gives them again.
#[test]
fn other_models_fold_into_their_plain_form() {
    let dir = std::env::temp_dir().join(format!("ghostv3-fold-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, name) in [
        "mobilenetv2_100",
        "shufflenet_v2_x1_0",
        "ghostnet_100",
        "ghostnetv2_100",
        "resnet18",
        "resnet50",
    ]
    .into_iter()
    .enumerate()
    {
        let t0 = std::time::Instant::now();
        let seed = 100 + i as u64;
        let rel = check(name, RepOptions::default(), 64, seed);
        // The same train model again (check() drew it from the same seeds), folded and saved.
        let mut rng = StdRng::seed_from_u64(seed);
        let opts = ModelOptions {
            num_classes: 10,
            seed,
            ..Default::default()
        };
        let mut train = models::create(name, &opts).unwrap();
        assert!(!train.is_deploy(), "{name}: built without branches");
        randomize_bn(train.state_mut(), &mut rng, 1.0);
        let mut folded = reparam::fold(&train).unwrap();
        let path = dir.join(format!("{name}.safetensors"));
        ghostv3::io::save_state(folded.state(), &path, Default::default()).unwrap();
        let mut plain = models::create(
            name,
            &ModelOptions {
                deploy: true,
                ..opts
            },
        )
        .unwrap();
        assert!(plain.is_deploy() && plain.form() == "plain form");
        let names = |m: &Model| -> Vec<(String, Vec<usize>)> {
            let s = m.state();
            s.params
                .entries()
                .iter()
                .chain(s.buffers.entries())
                .map(|e| (e.name.clone(), e.shape.clone()))
                .collect()
        };
        assert_eq!(names(&folded), names(&plain), "{name}: folded tensors");
        ghostv3::io::load_state(plain.state_mut(), &path).unwrap();
        // Nothing to fold in the plain model: the file is complete and the model usable as is.
        assert!(ghostv3::models::detect_options(&path).unwrap().deploy);
        let x = random_input(&mut rng, 2, 64);
        let (yf, yp) = (folded.predict(&x), plain.predict(&x));
        assert_eq!(yf.data(), yp.data(), "{name}: reloaded plain model differs");
        let params = |m: &Model| m.state().params.numel();
        println!(
            "{name}: train form {} params -> plain {} params, fold rel err {rel:.2e}, {:.1} s",
            params(&train),
            params(&plain),
            t0.elapsed().as_secs_f64()
        );
    }
}

/// Running statistics that match the activations, as training leaves them: one train-mode pass
/// on a random batch gives every BN's batch statistics b through r1 = (1 - m) r0 + m b.
fn calibrate_bn(m: &mut Model, rng: &mut StdRng, size: usize) {
    use ghostv3::nn::layers::BN_MOMENTUM;
    use ghostv3::nn::Mode;
    let r0 = m.state().buffers.flat().to_vec();
    let x = random_input(rng, 8, size);
    let mut tape = ghostv3::Tape::inference();
    let xv = tape.constant(x);
    m.forward(&mut tape, xv, Mode::Train { dropout: false }, None);
    let mom = BN_MOMENTUM as f32;
    for (r, r0) in m.state_mut().buffers.flat_mut().iter_mut().zip(r0) {
        *r = ((*r - (1.0 - mom) * r0) / mom).max(0.0);
    }
}

/// A model whose weights look trained: every weight scaled by a random (1 + 0.5 N(0,1)), BN
/// scales U[0.2, 1.8) (one in ten negative), shifts 0.3 N(0,1), running statistics calibrated
/// on the activations (so that eval-mode BN normalizes, as in a trained network), and the
/// classifier scaled so that the largest logit is about `logit`.
fn trained_like(name: &str, seed: u64, size: usize, logit: f64) -> Model {
    use ghostv3::nn::Id;
    use rand::Rng;
    let mut rng = StdRng::seed_from_u64(seed);
    let opts = ModelOptions {
        num_classes: 1000,
        seed,
        ..Default::default()
    };
    let mut m = models::create(name, &opts).unwrap();
    let st = m.state_mut();
    let normal = |rng: &mut StdRng| -> f32 { StandardNormal.sample(rng) };
    for i in 0..st.params.len() {
        let name = st.params.entry(Id(i)).name.clone();
        let bn = |suffix: &str| {
            name.ends_with(suffix)
                && st
                    .buffers
                    .find(&name.replace(suffix, ".running_mean"))
                    .is_some()
        };
        let (is_scale, is_shift) = (bn(".weight"), bn(".bias"));
        for x in st.params.slice_mut(Id(i)) {
            *x = if is_scale {
                rng.random_range(0.2..1.8) * if rng.random_bool(0.1) { -1.0 } else { 1.0 }
            } else if is_shift {
                0.3 * normal(&mut rng)
            } else {
                *x * (1.0 + 0.5 * normal(&mut rng))
            };
        }
    }
    calibrate_bn(&mut m, &mut rng, size);
    let x = random_input(&mut rng, 2, size);
    let gain = (logit / m.predict(&x).max_abs()) as f32;
    let st = m.state_mut();
    for cls in [
        "classifier.weight",
        "classifier.bias",
        "fc.weight",
        "fc.bias",
    ] {
        if let Some(id) = st.params.find(cls) {
            st.params.slice_mut(id).iter_mut().for_each(|v| *v *= gain);
        }
    }
    m
}

/// The first parameter whose name contains `part`.
fn param_named(m: &Model, part: &str) -> String {
    m.state()
        .params
        .entries()
        .iter()
        .find(|e| e.name.contains(part))
        .unwrap_or_else(|| panic!("no parameter named *{part}*"))
        .name
        .clone()
}

fn set(m: &mut Model, name: &str, at: usize, v: f32) {
    let st = m.state_mut();
    let slice = match st.params.find(name) {
        Some(id) => st.params.slice_mut(id),
        None => st.buffers.slice_mut(st.buffers.find(name).unwrap()),
    };
    slice[at] = v;
}

/// Trained-like weights (large logits, calibrated BN statistics) fold and pass the check with a
/// tolerance that is still tight: the measured error is within a few times what float32 rounding
/// of the weights alone gives.
#[test]
fn fold_checked_accepts_trained_like_models() {
    for (name, size, seed) in [
        ("ghostnetv3_050", 64, 0),
        ("ghostnetv3_100", 128, 1),
        ("resnet18", 64, 2),
    ] {
        let mut train = trained_like(name, seed, size, 20.0);
        let x = random_input(&mut StdRng::seed_from_u64(100 + seed), 2, size);
        let (deploy, c) = reparam::fold_checked(&mut train, &x).unwrap();
        println!(
            "{name}: {c}; err / rounding {:.2}",
            c.max_abs_err / c.rounding
        );
        assert!(deploy.is_deploy() && c.agrees());
        assert!(c.max_abs_logit > 10.0, "{name}: logits not large: {c}");
        assert!(
            c.max_abs_err > 0.0,
            "{name}: a trained-like fold is not bit-exact: {c}"
        );
        assert_eq!(c.input, [2, 3, size, size]);
        let s = c.to_string();
        assert!(s.contains("max abs err") && s.contains("tolerance"), "{s}");
        // Still a real check: under 1e-3 of the logits.
        assert!(c.tolerance < 1e-3 * c.max_abs_logit, "{name}: {c}");
    }
}

/// A deploy form that is slightly off (one conv's kernel by a relative 1e-3, far less than any
/// real fold bug) is refused, with the measured error and the tolerance.
#[test]
fn fold_check_refuses_a_fold_that_is_off() {
    let mut train = trained_like("ghostnetv3_050", 0, 64, 20.0);
    let x = random_input(&mut StdRng::seed_from_u64(9), 2, 64);
    let mut deploy = reparam::fold(&train).unwrap();
    reparam::check_fold(&mut train, &mut deploy, &x).unwrap();
    let id = deploy
        .state()
        .params
        .find("blocks.6.2.ghost1.short_conv.4.weight")
        .unwrap();
    let w = deploy.state_mut().params.slice_mut(id);
    w.iter_mut().for_each(|v| *v *= 1.001);
    let e = format!(
        "{:#}",
        reparam::check_fold(&mut train, &mut deploy, &x).unwrap_err()
    );
    assert!(
        e.contains("disagrees") && e.contains("max abs err") && e.contains("tolerance"),
        "{e}"
    );
}

/// Weights no trained model has (3e38, a negative running variance, NaN) never "agree": the
/// fold is refused naming the tensor, or, where every folded tensor is plausible but the
/// logits overflow, because they are not finite.
#[test]
fn fold_checked_refuses_broken_weights() {
    let x = random_input(&mut StdRng::seed_from_u64(5), 2, 64);
    let base = || trained_like("ghostnetv3_050", 3, 64, 20.0);
    let m = base();
    let rep_conv = param_named(&m, "_rpr_conv.0.conv.weight");
    let rep_bn = param_named(&m, "_rpr_conv.0.bn1.weight").replace(".weight", ".running_var");
    type Edit<'a> = Box<dyn Fn(&mut Model) + 'a>;
    let cases: Vec<(&str, Edit, String)> = vec![
        (
            "3e38 in a copied conv",
            Box::new(|m| set(m, "conv_stem.weight", 0, 3e38)),
            "the folded tensor conv_stem.weight: holds 3e38".into(),
        ),
        (
            "3e38 in a branch conv",
            Box::new(|m| set(m, &rep_conv, 0, 3e38)),
            format!("from the train form's {rep_conv}: holds 3e38"),
        ),
        (
            "running_var -1 in a branch BN",
            Box::new(|m| set(m, &rep_bn, 0, -1.0)),
            format!("from the train form's {rep_bn}: a variance of -1"),
        ),
        (
            "running_var -1 in a copied BN",
            Box::new(|m| set(m, "bn1.running_var", 0, -1.0)),
            "the folded tensor bn1.running_var: a variance of -1".into(),
        ),
        (
            "NaN in a BN scale",
            Box::new(|m| set(m, "bn1.weight", 1, f32::NAN)),
            "the folded tensor bn1.weight: holds NaN".into(),
        ),
        (
            "plausible weights, overflowing logits",
            Box::new(|m| {
                for name in ["conv_head.weight", "classifier.weight"] {
                    let id = m.state().params.find(name).unwrap();
                    m.state_mut().params.slice_mut(id).fill(1e19);
                }
            }),
            "logits are not finite".into(),
        ),
    ];
    for (what, edit, want) in cases {
        let mut train = base();
        edit(&mut train);
        let e = format!(
            "{:#}",
            reparam::fold_checked(&mut train, &x)
                .err()
                .unwrap_or_else(|| panic!("{what}: the fold was accepted"))
        );
        assert!(e.contains(&want) && !e.contains("agree "), "{what}: {e}");
        println!("{what}: {e}");
    }
    // A NaN error is never within a tolerance.
    let c = reparam::FoldCheck {
        input: [2, 3, 64, 64],
        max_abs_err: f64::NAN,
        max_abs_logit: 1.0,
        rounding: 1.0,
        tolerance: 1.0,
    };
    assert!(!c.agrees());
}

fn ghostv3(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ghostv3"))
        .args(args)
        .output()
        .unwrap()
}

/// `ghostv3 fold` checks before it writes: a trained-like file folds (at 128 px, the command's
/// check) and the written file is the library's fold; a file whose fold is refused, or that
/// does not load, leaves an existing --out byte-identical and no temp file behind.
#[test]
fn fold_command_checks_before_writing() {
    let dir = std::env::temp_dir().join(format!("ghostv3-fold-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (w, out) = (
        dir.join("train.safetensors"),
        dir.join("deploy.safetensors"),
    );
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let args = [
        "fold",
        "--model",
        "ghostnetv3_050",
        "--weights",
        &path(&w),
        "--out",
        &path(&out),
    ];
    let train = trained_like("ghostnetv3_050", 4, 128, 20.0);
    ghostv3::io::save_state(train.state(), &w, Default::default()).unwrap();
    let o = ghostv3(&args);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("agree") && stdout.contains("tolerance"),
        "{stdout}"
    );
    let mut written = models::create(
        "ghostnetv3_050",
        &ModelOptions {
            num_classes: 1000,
            deploy: true,
            ..Default::default()
        },
    )
    .unwrap();
    ghostv3::io::load_state(written.state_mut(), &out).unwrap();
    let folded = reparam::fold(&train).unwrap();
    assert!(written.state().params.flat() == folded.state().params.flat());

    let before = std::fs::read(&out).unwrap();
    let refused = |edit: &dyn Fn(&mut Model), want: &str| {
        let mut m = trained_like("ghostnetv3_050", 4, 128, 20.0);
        edit(&mut m);
        ghostv3::io::save_state(m.state(), &w, Default::default()).unwrap();
        let o = ghostv3(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && stderr.contains(want) && stderr.contains("train.safetensors"),
            "{stderr}"
        );
        assert!(
            std::fs::read(&out).unwrap() == before,
            "--out changed: {stderr}"
        );
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["deploy.safetensors", "train.safetensors"]);
    };
    // Loads (every weight under the loader's 1e20), but the logits overflow: refused by the check.
    refused(
        &|m| {
            for name in ["conv_head.weight", "classifier.weight"] {
                let id = m.state().params.find(name).unwrap();
                m.state_mut().params.slice_mut(id).fill(1e19);
            }
        },
        "logits are not finite",
    );
    // Refused at load already.
    refused(&|m| set(m, "conv_stem.weight", 0, 3e38), "conv_stem.weight");
    std::fs::remove_dir_all(&dir).unwrap();
}
