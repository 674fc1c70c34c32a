//! The `ghostv3` binary end to end: info figures, forward against a timm fixture, fold, errors.

mod common;

use common::rel_err;
use ghostv3::io::{read_tensors, TensorData};
use std::path::PathBuf;
use std::process::{Command, Output};

fn ghostv3(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ghostv3"))
        .args(args)
        .output()
        .expect("run ghostv3")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "ghostv3 failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ghostv3-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn info_reports_timm_parameter_and_mac_counts() {
    // Spec section 8 (timm's counts): deploy params, deploy MACs, train params, train MACs.
    let expected = [
        (
            "ghostnetv3_050",
            "2,853,176",
            "49.6M",
            "3,395,384",
            "117.5M",
        ),
        (
            "ghostnetv3_100",
            "6,147,588",
            "167.0M",
            "8,129,028",
            "404.1M",
        ),
        (
            "ghostnetv3_130",
            "8,948,296",
            "269.3M",
            "12,217,720",
            "654.8M",
        ),
        (
            "ghostnetv3_160",
            "12,377,778",
            "398.6M",
            "17,275,700",
            "971.6M",
        ),
    ];
    for (name, dp, dm, tp, tm) in expected {
        let out = stdout(&ghostv3(&["info", "--model", name]));
        let train = out
            .lines()
            .find(|l| l.contains("train form"))
            .expect("train line");
        let deploy = out
            .lines()
            .find(|l| l.contains("deploy form"))
            .expect("deploy line");
        assert!(train.contains(tp) && train.contains(tm), "{name}: {train}");
        assert!(
            deploy.contains(dp) && deploy.contains(dm),
            "{name}: {deploy}"
        );
    }
    let out = stdout(&ghostv3(&["info", "--model", "ghostnetv3_100", "--deploy"]));
    assert!(
        !out.contains("train form") && out.contains("6,147,588"),
        "{out}"
    );
}

#[test]
fn every_command_has_help() {
    for cmd in [
        &["--help"][..],
        &["info", "--help"],
        &["forward", "--help"],
        &["fold", "--help"],
        &["models", "--help"],
    ] {
        let out = stdout(&ghostv3(cmd));
        assert!(out.contains("Usage"), "{cmd:?}: {out}");
    }
}

#[test]
fn unknown_model_and_bad_flags_are_clear_errors() {
    let o = ghostv3(&["info", "--model", "ghostnetv3_999"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("unknown model 'ghostnetv3_999'") && e.contains("ghostnetv3_100"),
        "{e}"
    );
    let o = ghostv3(&["info", "--model", "ghostnetv3_050", "--branches", "9"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("out of range 1..=5"));
    let o = ghostv3(&[
        "forward",
        "--model",
        "ghostnetv3_050",
        "--weights",
        "/nonexistent.safetensors",
        "--inputs",
        "x",
        "--out",
        "y",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent.safetensors"));
}

#[test]
fn forward_with_grads_matches_the_timm_fixture() {
    let Some(dir) = common::fixture("ghostnetv3_050-112") else {
        return;
    };
    let out = tmp("forward.safetensors");
    let (w, r) = (
        dir.join("train.safetensors"),
        dir.join("reference.safetensors"),
    );
    let args = [
        "forward",
        "--model",
        "ghostnetv3_050",
        "--weights",
        w.to_str().unwrap(),
        "--inputs",
        r.to_str().unwrap(),
    ];
    stdout(&ghostv3(
        &[&args[..], &["--out", out.to_str().unwrap(), "--grads"]].concat(),
    ));
    let ours = read_tensors(&out).unwrap();
    let refs = read_tensors(&r).unwrap();
    let f = |m: &std::collections::BTreeMap<String, TensorData>, k: &str| match &m[k] {
        TensorData::F32(_, v) => v.clone(),
        _ => panic!("{k}"),
    };
    assert!(rel_err(&f(&ours, "logits"), &f(&refs, "logits")) <= 1e-4);
    assert!(rel_err(&f(&ours, "train_logits"), &f(&refs, "train_logits")) <= 1e-4);
    assert!(rel_err(&f(&ours, "train_loss"), &f(&refs, "train_loss")) <= 1e-5);
    let grads: Vec<&String> = refs.keys().filter(|k| k.starts_with("grad.")).collect();
    assert_eq!(
        grads.len(),
        ours.keys().filter(|k| k.starts_with("grad.")).count()
    );
    let k = "grad.classifier.weight";
    assert!(rel_err(&f(&ours, k), &f(&refs, k)) <= 2e-3);
    let k = "after_step.bn1.running_var";
    assert!(rel_err(&f(&ours, k), &f(&refs, k)) <= 1e-5);
}

#[test]
fn fold_writes_timms_deploy_file() {
    let Some(dir) = common::fixture("ghostnetv3_050-112") else {
        return;
    };
    let out = tmp("deploy.safetensors");
    let w = dir.join("train.safetensors");
    let msg = stdout(&ghostv3(&[
        "fold",
        "--model",
        "ghostnetv3_050",
        "--weights",
        w.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(msg.contains("eval outputs agree"), "{msg}");
    let ours = read_tensors(&out).unwrap();
    let theirs = read_tensors(&dir.join("deploy.safetensors")).unwrap();
    for (k, t) in &theirs {
        let (TensorData::F32(s, v), Some(TensorData::F32(s2, v2))) = (t, ours.get(k)) else {
            panic!("{k} missing")
        };
        assert_eq!(s, s2, "{k}");
        assert!(rel_err(v2, v) <= 1e-5, "{k}");
    }
    // Deploy-form weights run with `forward` (form detected from the names).
    let r = dir.join("reference.safetensors");
    let o2 = tmp("deploy-out.safetensors");
    stdout(&ghostv3(&[
        "forward",
        "--model",
        "ghostnetv3_050",
        "--weights",
        out.to_str().unwrap(),
        "--inputs",
        r.to_str().unwrap(),
        "--out",
        o2.to_str().unwrap(),
    ]));
    let (a, b) = (read_tensors(&o2).unwrap(), read_tensors(&r).unwrap());
    let (TensorData::F32(_, x), TensorData::F32(_, y)) = (&a["logits"], &b["logits_deploy"]) else {
        panic!()
    };
    assert!(rel_err(x, y) <= 1e-4);
    // Folding deploy weights again is refused.
    let o = ghostv3(&[
        "fold",
        "--model",
        "ghostnetv3_050",
        "--weights",
        out.to_str().unwrap(),
        "--out",
        tmp("x.safetensors").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
}

#[test]
fn eval_and_predict_on_an_image_folder() {
    use ghostv3::models::{create, ModelOptions};
    let root = tmp("imgs");
    for (c, colour) in [("cats", [200u8, 30, 30]), ("dogs", [30, 30, 200])] {
        std::fs::create_dir_all(root.join(c)).unwrap();
        for i in 0..3u8 {
            let img = image::RgbImage::from_fn(80, 72, |x, y| {
                image::Rgb([
                    colour[0].wrapping_add(i * 7 + x as u8),
                    colour[1].wrapping_add(y as u8),
                    colour[2],
                ])
            });
            img.save(root.join(c).join(format!("{i}.png"))).unwrap();
        }
    }
    // One unreadable image: skipped, and said so (the figures are over the 6 others).
    std::fs::write(root.join("dogs/broken.png"), b"\x89PNG not really").unwrap();
    let m = create(
        "ghostnetv3_050",
        &ModelOptions {
            num_classes: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let w = tmp("two-class.safetensors");
    ghostv3::io::save_state(m.state(), &w, Default::default()).unwrap();
    let (w, r) = (w.to_str().unwrap(), root.to_str().unwrap());
    let out = stdout(&ghostv3(&[
        "eval",
        "--model",
        "ghostnetv3_050",
        "--weights",
        w,
        "--data",
        r,
        "--size",
        "64",
    ]));
    assert!(
        out.contains("(6 images scored, 1 unreadable image(s) not scored): top-1")
            && out.contains("images/s"),
        "{out}"
    );
    let img = root.join("cats/0.png");
    let out = stdout(&ghostv3(&[
        "predict",
        "--model",
        "ghostnetv3_050",
        "--weights",
        w,
        "--size",
        "64",
        img.to_str().unwrap(),
    ]));
    assert_eq!(out.lines().filter(|l| l.contains('%')).count(), 2, "{out}");
    let total: f64 = out
        .lines()
        .filter_map(|l| l.trim().split('%').next()?.trim().parse::<f64>().ok())
        .sum();
    assert!(
        (total - 100.0).abs() < 0.1,
        "probabilities sum to {total}: {out}"
    );
    // A model with 10 classes does not evaluate a 2-class folder.
    let o = ghostv3(&[
        "eval",
        "--model",
        "ghostnetv3_050",
        "--weights",
        "/nonexistent",
        "--data",
        r,
    ]);
    assert!(!o.status.success());
}

/// A recipe the model cannot run is refused before anything is written.
#[test]
fn train_refuses_an_input_too_small_for_the_model() {
    let dir = tmp("too-small");
    let o = ghostv3(&[
        "train",
        "--set",
        "augment.size=32",
        "--set",
        "eval.size=32",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("augment.size = 32 is too small for ghostnetv3_050") && e.contains("33 px"),
        "{e}"
    );
    assert!(!dir.exists(), "a refused run left {}", dir.display());
}

/// `train --device cuda`: without CUDA a one-line reason and no run directory; with a GPU a
/// two-step run on it (checkpoint, best and deploy weights written, loss finite).
#[test]
fn train_on_cuda_or_a_clear_error() {
    let dir = tmp("train-cuda");
    let o = ghostv3(&[
        "train",
        "--device",
        "cuda",
        "--set",
        "data.synthetic_train=8",
        "--set",
        "data.synthetic_val=4",
        "--set",
        "train.epochs=1",
        "--set",
        "schedule.epochs=1",
        "--set",
        "train.batch_size=4",
        "--out",
        dir.to_str().unwrap(),
    ]);
    match ghostv3::backend::cuda::unavailable_reason() {
        Some(reason) => {
            println!("skipped: no CUDA device ({reason}); checked the error instead");
            assert!(!o.status.success());
            let e = String::from_utf8_lossy(&o.stderr);
            assert!(
                e.contains("train.device = \"cuda\"") && !e.contains("panicked"),
                "{e}"
            );
            assert!(!dir.exists(), "a refused run left {}", dir.display());
        }
        None => {
            let out = stdout(&o);
            assert!(out.contains("device: CUDA"), "{out}");
            for f in [
                "checkpoint.safetensors",
                "best.safetensors",
                "deploy.safetensors",
            ] {
                assert!(dir.join(f).is_file(), "{f} missing");
            }
            let m = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
            let v: serde_json::Value = serde_json::from_str(m.lines().next().unwrap()).unwrap();
            assert!(v["train_loss"].as_f64().unwrap().is_finite(), "{m}");
        }
    }
}
