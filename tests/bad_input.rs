//! Bad input is a clear error (exit code 1 and an `error: ...` line that says what is wrong),
//! never a panic (exit code 101), an abort or a hang: weight files, recipes, command-line values,
//! input tensors, and a stdout closed under a command. CLI cases run the built binary; recipe,
//! parser and op cases run in-process.

use ghostv3::data::augment::AugmentHparams;
use ghostv3::data::{RandAugment, TransformConfig};
use ghostv3::io::{save_state, write_tensors, TensorData};
use ghostv3::models::{self, create, ModelOptions, MAX_INPUT_SIZE};
use ghostv3::optim::{LambOptions, OptimizerConfig, OptimizerKind, Rule};
use ghostv3::train::config::TrainConfig;
use ghostv3::{ops, Tape, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn ghostv3(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ghostv3"))
        .args(args)
        .output()
        .expect("run ghostv3")
}

/// Asserts that the command failed cleanly (exit code 1, no panic) with every one of
/// `expected` in its error message; returns the message.
fn fails_with(args: &[&str], expected: &[&str]) -> String {
    let o = ghostv3(args);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{args:?}: exit {:?}: {e}",
        o.status
    );
    assert!(!e.contains("panicked"), "{args:?}: {e}");
    assert!(e.starts_with("error: "), "{args:?}: {e}");
    for x in expected {
        assert!(e.contains(x), "{args:?}: expected {x:?} in: {e}");
    }
    e
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ghostv3-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// GhostNetV3-0.5x weights with 2 classes, train form or deploy form.
fn weights(name: &str, deploy: bool) -> PathBuf {
    let m = create(
        "ghostnetv3_050",
        &ModelOptions {
            num_classes: 2,
            deploy,
            ..Default::default()
        },
    )
    .unwrap();
    let w = tmp(name);
    save_state(m.state(), &w, Default::default()).unwrap();
    w
}

/// A PNG image file.
fn image(name: &str) -> PathBuf {
    let p = tmp(name);
    image::RgbImage::from_fn(40, 36, |x, y| image::Rgb([x as u8 * 5, y as u8 * 7, 90]))
        .save(&p)
        .unwrap();
    p
}

/// An `input` tensor [n, 3, h, w] in a safetensors file.
fn inputs(name: &str, n: usize, h: usize, w: usize) -> PathBuf {
    let p = tmp(name);
    let mut t = BTreeMap::new();
    t.insert(
        "input".to_string(),
        TensorData::F32(vec![n, 3, h, w], vec![0.5; n * 3 * h * w]),
    );
    write_tensors(&p, &t, None).unwrap();
    p
}

/// The built-in recipe with `sets`: the error message when it is refused.
fn recipe_error(sets: &[&str]) -> String {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    match TrainConfig::from_toml(TrainConfig::default_recipe(), &sets, "built-in recipe") {
        Ok(_) => panic!("{sets:?} was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

const M: &str = "ghostnetv3_050";

// ---- weight files -----------------------------------------------------------------------------

#[test]
fn classifier_weight_of_shape_scalar_is_an_error() {
    let p = tmp("scalar-classifier.safetensors");
    let mut t = BTreeMap::new();
    t.insert(
        "classifier.weight".to_string(),
        TensorData::F32(vec![], vec![1.0]),
    );
    write_tensors(&p, &t, None).unwrap();
    let e = format!("{:#}", models::detect_options(&p).unwrap_err());
    assert!(e.contains("classifier.weight has shape []"), "{e}");
    let x = inputs("in-64.safetensors", 1, 64, 64);
    let out = tmp("out.safetensors");
    fails_with(
        &[
            "forward",
            "--model",
            M,
            "--weights",
            s(&p),
            "--inputs",
            s(&x),
            "--out",
            s(&out),
        ],
        &["classifier.weight has shape []", "[classes, features]"],
    );
    // Zero classes too.
    t.insert(
        "classifier.weight".to_string(),
        TensorData::F32(vec![0, 16], vec![]),
    );
    write_tensors(&p, &t, None).unwrap();
    let e = format!("{:#}", models::detect_options(&p).unwrap_err());
    assert!(
        e.contains("[0, 16]") && e.contains("at least one class"),
        "{e}"
    );
}

#[test]
fn branch_index_past_five_names_the_tensor() {
    let p = tmp("branch-index.safetensors");
    let name = format!(
        "blocks.0.0.ghost1.primary_conv_rpr_conv.{}.weight",
        u64::MAX
    );
    let mut t = BTreeMap::new();
    t.insert(
        "classifier.weight".to_string(),
        TensorData::F32(vec![2, 2], vec![1.0; 4]),
    );
    t.insert(name.clone(), TensorData::F32(vec![1], vec![1.0]));
    write_tensors(&p, &t, None).unwrap();
    let e = fails_with(
        &[
            "eval",
            "--model",
            M,
            "--weights",
            s(&p),
            "--data",
            "/nonexistent",
        ],
        &[
            &name,
            "branch index 18446744073709551615",
            "at most 5 branches",
        ],
    );
    assert!(!e.contains("N = 0"), "{e}");
    // Any index past 4 (N = 6 or more), and one too long for 64 bits.
    for idx in ["5", "99999999999999999999999999"] {
        t.remove(&name);
        t.retain(|k, _| k == "classifier.weight");
        t.insert(
            format!("blocks.0.0.ghost1.primary_conv_rpr_conv.{idx}.weight"),
            TensorData::F32(vec![1], vec![1.0]),
        );
        write_tensors(&p, &t, None).unwrap();
        let e = format!("{:#}", models::detect_options(&p).unwrap_err());
        assert!(e.contains(&format!("branch index {idx}")), "{e}");
    }
}

// ---- knowledge distillation temperature ---------------------------------------------------------

#[test]
fn kd_temperature_nan_is_refused_by_the_recipe() {
    for t in ["nan", "0", "-1", "inf"] {
        let e = recipe_error(&[
            "kd.teacher=\"ghostnetv3_050\"",
            "kd.teacher_weights=\"/nonexistent.safetensors\"",
            &format!("kd.temperature={t}"),
        ]);
        assert!(
            e.contains("kd.temperature must be finite and > 0"),
            "{t}: {e}"
        );
    }
    let e = recipe_error(&[
        "kd.teacher=\"ghostnetv3_050\"",
        "kd.teacher_weights=\"/x\"",
        "kd.alpha=nan",
    ]);
    assert!(e.contains("kd.alpha must be in [0, 1]"), "{e}");
    // The command refuses it before anything is written.
    let dir = tmp("kd-run");
    fails_with(
        &[
            "train",
            "--set",
            "kd.teacher=\"ghostnetv3_050\"",
            "--set",
            "kd.teacher_weights=\"/nonexistent.safetensors\"",
            "--set",
            "kd.temperature=nan",
            "--out",
            s(&dir),
        ],
        &["kd.temperature must be finite and > 0", "NaN"],
    );
    assert!(!dir.exists());
}

#[test]
fn kd_loss_with_a_bad_temperature_is_nan_not_a_panic() {
    for t in [f64::NAN, 0.0, -1.0, f64::INFINITY] {
        let mut tape: Tape<f32> = Tape::new();
        let z = tape.leaf(
            Tensor::new(&[2, 3], vec![0.1, 0.2, 0.3, 1.0, -1.0, 0.5]),
            true,
        );
        let teacher = Tensor::new(&[2, 3], vec![0.3, 0.2, 0.1, 0.0, 1.0, 0.5]);
        let l = ops::kd_loss(&mut tape, z, &teacher, t);
        assert!(tape.value(l).data()[0].is_nan(), "t = {t}");
    }
    // A good temperature still gives a finite loss.
    let mut tape: Tape<f32> = Tape::new();
    let z = tape.leaf(Tensor::new(&[1, 2], vec![0.1, 0.2]), true);
    let l = ops::kd_loss(&mut tape, z, &Tensor::new(&[1, 2], vec![0.2, 0.1]), 2.0);
    assert!(tape.value(l).data()[0].is_finite());
}

// ---- bench arguments ----------------------------------------------------------------------------

#[test]
fn bench_runs_min_secs_threads_and_batch_are_checked() {
    let b = |extra: &[&str], expected: &[&str]| {
        let args: Vec<&str> = ["bench", "--model", M]
            .iter()
            .chain(extra)
            .copied()
            .collect();
        fails_with(&args, expected);
    };
    b(&["--runs", "0"], &["--runs must be in 1..=100000, got 0"]);
    b(&["--min-secs", "nan"], &["--min-secs must be", "got NaN"]);
    b(&["--min-secs", "inf"], &["--min-secs must be", "got inf"]);
    b(&["--min-secs=-1"], &["--min-secs must be", "got -1"]);
    b(&["--min-secs", "1e30"], &["--min-secs must be"]);
    b(
        &["--warmup", "100000000"],
        &["--warmup must be in 0..=100000"],
    );
    b(&["--threads", "0"], &["--threads must be at least 1"]);
    b(
        &["--threads", "10000"],
        &["--threads 10000 is too many", "per core"],
    );
    b(&["--batch", "0"], &["--batch must be at least 1"]);
}

// ---- input sizes --------------------------------------------------------------------------------

#[test]
fn inputs_below_the_minimal_size_name_it() {
    let msg = "is too small for ghostnetv3_050: it needs inputs of at least 33x33 px";
    fails_with(
        &["bench", "--model", M, "--tape", "--size", "0"],
        &["--size 0", msg],
    );
    fails_with(&["bench", "--model", M, "--size", "8"], &["--size 8", msg]);
    fails_with(&["info", "--model", M, "--size", "32"], &["--size 32", msg]);
    fails_with(
        &[
            "export",
            "--model",
            M,
            "--size",
            "8",
            "--out",
            s(&tmp("m.onnx")),
        ],
        &["--size 8", msg],
    );
    let train = weights("train.safetensors", false);
    let deploy = weights("deploy.safetensors", true);
    let img = image("a.png");
    for w in [&train, &deploy] {
        fails_with(
            &[
                "predict",
                "--model",
                M,
                "--weights",
                s(w),
                "--size",
                "8",
                s(&img),
            ],
            &["--size 8", msg],
        );
    }
    let root = tmp("folder");
    for c in ["cats", "dogs"] {
        std::fs::create_dir_all(root.join(c)).unwrap();
        std::fs::copy(&img, root.join(c).join("0.png")).unwrap();
    }
    fails_with(
        &[
            "eval",
            "--model",
            M,
            "--weights",
            s(&train),
            "--data",
            s(&root),
            "--size",
            "8",
        ],
        &["--size 8", msg],
    );
    for (name, h, w) in [("in-1x1", 1, 1), ("in-0x0", 0, 0), ("in-64x8", 64, 8)] {
        let x = inputs(&format!("{name}.safetensors"), 1, h, w);
        fails_with(
            &[
                "forward",
                "--model",
                M,
                "--weights",
                s(&train),
                "--inputs",
                s(&x),
                "--out",
                s(&tmp("o.safetensors")),
            ],
            &[&format!("input 1x3x{h}x{w}"), msg],
        );
    }
    // An empty batch.
    let x = inputs("in-empty.safetensors", 0, 64, 64);
    fails_with(
        &[
            "forward",
            "--model",
            M,
            "--weights",
            s(&train),
            "--inputs",
            s(&x),
            "--out",
            s(&tmp("o.safetensors")),
        ],
        &["the batch is empty"],
    );
}

/// `min_input_size` is true: every model runs at it, and refuses one pixel less.
#[test]
fn every_model_runs_at_its_minimal_input_size() {
    for info in models::REGISTRY {
        let opts = ModelOptions {
            num_classes: 3,
            deploy: true,
            ..Default::default()
        };
        let mut m = create(info.name, &opts).unwrap();
        let min = m.min_input_size();
        let y = m.predict(&Tensor::zeros(&[1, 3, min, min]));
        assert_eq!(y.shape(), [1, 3], "{}", info.name);
        assert!(m.check_input_size("x", min, min).is_ok());
        let e = format!("{:#}", m.check_input_size("x", min - 1, min).unwrap_err());
        assert!(e.contains(&format!("at least {min}x{min} px")), "{e}");
    }
}

#[test]
fn huge_sizes_and_batches_are_refused_before_allocating() {
    let max = format!("inputs are at most {MAX_INPUT_SIZE}x{MAX_INPUT_SIZE} px");
    fails_with(
        &["bench", "--model", M, "--size", "100000"],
        &["--size 100000 is too large", &max],
    );
    fails_with(
        &["info", "--model", M, "--size", "100000"],
        &["--size 100000 is too large", &max],
    );
    // Within the side limit, the memory estimate: terabytes for either path.
    fails_with(
        &["bench", "--model", M, "--batch", "1000000", "--size", "224"],
        &[
            "a batch of 1000000 at 224x224",
            "the fast path",
            "GB of memory",
        ],
    );
    fails_with(
        &[
            "bench", "--model", M, "--tape", "--batch", "100000", "--size", "224",
        ],
        &["a batch of 100000 at 224x224", "the tape", "GB of memory"],
    );
    let e = recipe_error(&["augment.size=10000"]);
    assert!(
        e.contains("augment: size must be in 1..=4096 px, got 10000"),
        "{e}"
    );
    let e = recipe_error(&["eval.size=0"]);
    assert!(
        e.contains("eval: size must be in 1..=4096 px, got 0"),
        "{e}"
    );
    let e = recipe_error(&["data.synthetic_size=100000"]);
    assert!(e.contains("data.synthetic_size must be in 1..=4096"), "{e}");
    let dir = tmp("huge-run");
    fails_with(
        &["train", "--set", "augment.size=10000", "--out", s(&dir)],
        &["augment: size must be in 1..=4096 px"],
    );
    assert!(!dir.exists());
}

#[test]
fn absurd_class_counts_are_refused_before_allocating() {
    fails_with(
        &[
            "info",
            "--model",
            M,
            "--classes",
            "100000000000",
            "--size",
            "64",
        ],
        &["100000000000 classes is too many: at most 100000"],
    );
    fails_with(
        &["bench", "--model", "resnet18", "--classes", "100000000000"],
        &["classes is too many"],
    );
    fails_with(
        &["info", "--model", M, "--classes", "0"],
        &["num_classes must be at least 1"],
    );
}

/// The footprint estimate is of the right size: GhostNetV3-0.5x's train form keeps about 450
/// values per input pixel on the tape, its widest activation 6.
#[test]
fn the_memory_estimate_matches_the_network() {
    let mut m = create(M, &ModelOptions::default()).unwrap();
    let f = m.footprint();
    assert!((440.0..520.0).contains(&f.tape_values_per_pixel), "{f:?}");
    assert!((6.0..7.5).contains(&f.widest_values_per_pixel), "{f:?}");
    let gb = f.tape_bytes(32, 224, 224, false) / 1e9;
    assert!((2.8..3.4).contains(&gb), "{gb} GB");
}

// ---- a closed stdout ----------------------------------------------------------------------------

#[test]
fn predict_into_a_closed_pipe_ends_quietly() {
    let w = weights("pipe.safetensors", false);
    let img = image("pipe.png");
    let mut args = vec!["predict", "--model", M, "--weights", s(&w), "--size", "64"];
    args.extend(std::iter::repeat_n(s(&img), 50));
    let mut child = Command::new(env!("CARGO_BIN_EXE_ghostv3"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // `| head -0`: the reader is gone before the first line
    let o = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{e}");
    assert!(e.is_empty(), "{e}");
}

// ---- recipes ------------------------------------------------------------------------------------

#[test]
fn optimizer_eps_zero_is_refused() {
    let e = recipe_error(&["optimizer.eps=0"]);
    assert!(e.contains("optimizer: eps must be finite and > 0"), "{e}");
    let e = recipe_error(&["optimizer.eps=nan"]);
    assert!(e.contains("eps must be finite and > 0"), "{e}");
    let o = LambOptions {
        eps: 0.0,
        ..Default::default()
    };
    assert!(format!("{:#}", o.validate().unwrap_err()).contains("eps must be finite and > 0"));
    let mut c = OptimizerConfig::new(OptimizerKind::Adamw);
    c.eps = Some(0.0);
    assert!(c.validate().is_err());
    c.eps = Some(1e-8);
    c.validate().unwrap();
}

#[test]
fn mixup_alphas_and_probabilities_are_checked() {
    for (set, expected) in [
        (
            "mixup.mixup_alpha=-1",
            "mixup.mixup_alpha must be finite and >= 0",
        ),
        (
            "mixup.cutmix_alpha=nan",
            "mixup.cutmix_alpha must be finite and >= 0",
        ),
        (
            "mixup.mixup_alpha=inf",
            "mixup.mixup_alpha must be finite and >= 0",
        ),
        (
            "mixup.prob=2",
            "mixup.prob must be a probability in [0, 1], got 2",
        ),
        (
            "mixup.prob=nan",
            "mixup.prob must be a probability in [0, 1]",
        ),
        (
            "mixup.switch_prob=-0.5",
            "mixup.switch_prob must be a probability",
        ),
    ] {
        let e = recipe_error(&[set]);
        assert!(e.contains(expected), "{set}: {e}");
    }
}

#[test]
fn normalization_must_be_finite_with_positive_std() {
    for (set, expected) in [
        (
            "eval.std=[nan, 0.2, 0.2]",
            "eval: std must be finite and > 0",
        ),
        (
            "eval.std=[0.2, 0.0, 0.2]",
            "eval: std must be finite and > 0",
        ),
        (
            "augment.std=[-1.0, 0.2, 0.2]",
            "augment: std must be finite and > 0",
        ),
        (
            "augment.std=[inf, 0.2, 0.2]",
            "augment: std must be finite and > 0",
        ),
        ("eval.mean=[nan, 0.4, 0.4]", "eval: mean must be finite"),
        (
            "augment.mean=[0.4, inf, 0.4]",
            "augment: mean must be finite",
        ),
    ] {
        let e = recipe_error(&[set]);
        assert!(e.contains(expected), "{set}: {e}");
    }
}

#[test]
fn rand_augment_magnitude_and_ops_are_bounded() {
    let parse = |c: &str| RandAugment::from_config_str(c, AugmentHparams::default());
    for (c, expected) in [
        ("rand-m99-n999", "m99 out of range: magnitudes are 0..=30"),
        (
            "rand-m9-n999",
            "n999 (ops per image) must be a whole number in 0..=16",
        ),
        (
            "rand-m9-n2.5",
            "n2.5 (ops per image) must be a whole number",
        ),
        ("rand-m1e400", "out of range: magnitudes are 0..=30"),
        ("rand-m9-mmax99", "mmax99 out of range"),
        ("rand-m9-p2", "p2 (op probability) must be in [0, 1]"),
        ("rand-m9-mstd1e400", "mstd"),
    ] {
        let e = format!(
            "{:#}",
            parse(c).err().unwrap_or_else(|| panic!("{c} accepted"))
        );
        assert!(e.contains(expected) && e.contains(c), "{c}: {e}");
    }
    // timm's own strings still parse.
    for c in [
        "rand-m9-mstd0.5-inc1",
        "rand-m7-n3-mstd101",
        "rand-m30-mmax30-mstd1",
    ] {
        parse(c).unwrap();
    }
    let e = recipe_error(&["augment.auto_augment=\"rand-m99-n999\""]);
    assert!(e.contains("augment: auto_augment 'rand-m99-n999'"), "{e}");
}

#[test]
fn crop_pct_out_of_range_says_the_range() {
    let e = recipe_error(&["eval.crop_pct=1e9"]);
    assert!(
        e.contains("eval: crop_pct must be in [") && e.contains("got 1000000000"),
        "{e}"
    );
    assert!(!e.contains("must be positive"), "{e}");
    for v in ["0", "-1", "nan", "1e-300"] {
        let e = recipe_error(&[&format!("eval.crop_pct={v}")]);
        assert!(e.contains("crop_pct must be in ["), "{v}: {e}");
    }
    let w = weights("crop.safetensors", false);
    let img = image("crop.png");
    let e = fails_with(
        &[
            "predict",
            "--model",
            M,
            "--weights",
            s(&w),
            "--crop-pct",
            "1e9",
            s(&img),
        ],
        &["crop_pct must be in [", ", 1] for size 224"],
    );
    assert!(!e.contains("must be positive"), "{e}");
    // In range: fine.
    let cfg = TransformConfig {
        crop_pct: 0.95,
        ..TransformConfig::eval(224)
    };
    cfg.validate().unwrap();
}

/// Every other numeric entry of a recipe is range-checked, NaN included.
#[test]
fn other_numeric_recipe_entries_are_range_checked() {
    for (set, expected) in [
        ("train.lr=nan", "train.lr must be finite and > 0"),
        ("train.lr=inf", "train.lr must be finite and > 0"),
        ("train.lr=0", "train.lr must be finite and > 0"),
        (
            "train.label_smoothing=nan",
            "train.label_smoothing must be in [0, 1)",
        ),
        ("train.batch_size=0", "train.batch_size"),
        ("model.drop_rate=nan", "model.drop_rate must be in [0, 1)"),
        ("model.drop_rate=1.0", "model.drop_rate must be in [0, 1)"),
        (
            "model.rep_branches=99",
            "model.rep_branches = 99 out of range 0..=5",
        ),
        ("model.name=\"nonet\"", "unknown model 'nonet'"),
        (
            "data.synthetic_size=0",
            "data.synthetic_size must be in 1..=4096",
        ),
        (
            "data.synthetic_train=0",
            "data.synthetic_train and data.synthetic_val",
        ),
        ("data.max_train=0", "data.max_train must be at least 1"),
        ("data.max_val=0", "data.max_val must be at least 1"),
        ("data.workers=100000", "data.workers must be in 0..=256"),
        (
            "augment.hflip=nan",
            "augment: hflip must be a probability in [0, 1]",
        ),
        ("augment.vflip=2", "augment: vflip must be a probability"),
        (
            "augment.re_prob=-1",
            "augment: re_prob must be a probability",
        ),
        (
            "augment.color_jitter=nan",
            "augment: color_jitter must be a finite",
        ),
        (
            "augment.color_jitter=inf",
            "augment: color_jitter must be a finite",
        ),
        (
            "augment.scale=[nan, 1.0]",
            "augment: scale must satisfy 0 < min <= max",
        ),
        ("augment.scale=[0.5, inf]", "augment: scale must satisfy"),
        ("augment.ratio=[0.75, inf]", "augment: ratio must satisfy"),
        ("augment.re_count=0", "augment: re_count must be in 1..=100"),
        (
            "augment.re_count=1000000000",
            "augment: re_count must be in 1..=100",
        ),
        (
            "optimizer.weight_decay=nan",
            "optimizer: weight_decay must be >= 0",
        ),
        (
            "optimizer.weight_decay=-1",
            "optimizer: weight_decay must be >= 0",
        ),
        (
            "optimizer.betas=[nan, 0.9]",
            "optimizer: betas must be in [0, 1)",
        ),
        (
            "optimizer.betas=[0.9, 1.0]",
            "optimizer: betas must be in [0, 1)",
        ),
        (
            "optimizer.max_grad_norm=nan",
            "max_grad_norm must be positive",
        ),
        ("schedule.epochs=nan", "schedule: epochs must be >= 0"),
        ("schedule.warmup_epochs=-1", "schedule: warmup_epochs"),
        (
            "schedule.min_lr=inf",
            "schedule: warmup_epochs, warmup_lr and min_lr",
        ),
        (
            "schedule.warmup_lr=nan",
            "schedule: warmup_epochs, warmup_lr and min_lr",
        ),
        ("ema.decay=nan", "ema decay must be in [0, 1]"),
        (
            "ema.warmup_gamma=inf",
            "ema warmup_gamma and warmup_power must be finite",
        ),
        ("ema.warmup_power=nan", "ema warmup_gamma and warmup_power"),
    ] {
        let e = recipe_error(&[set]);
        assert!(e.contains(expected), "{set}: {e}");
    }
    // The shipped recipes still load.
    for f in [
        "configs/synthetic_quick.toml",
        "configs/imagenette_cpu.toml",
        "configs/ghostnetv3_100_imagenet.toml",
    ] {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(f);
        TrainConfig::load(&p, &[]).unwrap_or_else(|e| panic!("{f}: {e:#}"));
    }
}
