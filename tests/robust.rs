//! Long-run robustness: one writer per run directory, clean-up on resume, the finite-state
//! guard and refused implausible weights.

mod common;

use ghostv3::nn::State;
use ghostv3::train::{guard, run_dir};
use std::path::PathBuf;

/// An empty scratch directory of this test process.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ghostv3-robust-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_run_directory_takes_one_writer() {
    let dir = scratch("t1");
    let first = run_dir::RunLock::acquire(dir.as_path()).unwrap();
    let err = run_dir::RunLock::acquire(dir.as_path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("in use by another trainer"), "{err}");
    assert!(
        err.contains(&std::process::id().to_string()),
        "names the PID: {err}"
    );
    drop(first);
    run_dir::RunLock::acquire(dir.as_path()).expect("free again once the holder is gone");
}

#[test]
fn resume_cleanup_drops_leftovers_and_metrics_past_the_checkpoint() {
    let dir = scratch("t2");
    let p = dir.as_path();
    std::fs::write(p.join(".checkpoint.safetensors.tmp-123"), b"partial").unwrap();
    std::fs::write(p.join("keep.txt"), b"x").unwrap();
    let lines = [
        "{\"epoch\":1}",
        "{\"epoch\":2}",
        "{\"epoch\":2}",
        "{\"epoch\":3}",
        "{\"epo",
    ];
    std::fs::write(p.join("metrics.jsonl"), lines.join("\n")).unwrap();
    let removed = run_dir::remove_leftovers(p).unwrap();
    assert_eq!(removed.len(), 1);
    assert!(p.join("keep.txt").exists());
    assert_eq!(run_dir::truncate_metrics(p, 2).unwrap(), 3);
    let text = std::fs::read_to_string(p.join("metrics.jsonl")).unwrap();
    assert_eq!(text, "{\"epoch\":1}\n{\"epoch\":2}\n");
    // A directory with the files of a run but no checkpoint is not a fresh start.
    let err = run_dir::check_fresh(p).unwrap_err().to_string();
    assert!(err.contains("metrics.jsonl"), "{err}");
}

fn tiny_state() -> State {
    let m = ghostv3::models::create("ghostnetv3_050", &ghostv3::models::ModelOptions::default())
        .unwrap();
    m.state().clone()
}

#[test]
fn the_guard_names_the_first_non_finite_tensor() {
    let mut s = tiny_state();
    guard::check_state(&s, "model").expect("a fresh model is finite");
    let e = s.params.entries()[3].clone();
    let mut data = s.params.tensor().data().to_vec();
    data[e.offset + 1] = f32::NAN;
    let n = data.len();
    s.params.set_tensor(ghostv3::Tensor::new(&[n], data));
    let err = guard::check_state(&s, "model").unwrap_err().to_string();
    assert!(err.contains(&e.name) && err.contains("element 1"), "{err}");
    let err = guard::check_buffers("lamb", &[("exp_avg".into(), vec![0.0, f32::INFINITY])])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("exp_avg") && err.contains("element 1"),
        "{err}"
    );
}

#[test]
fn implausible_weights_are_refused_at_load() {
    let s = tiny_state();
    let dir = scratch("t3");
    let name = s.params.entries()[0].name.clone();
    for (what, value) in [("3e38", 3e38f32), ("NaN", f32::NAN)] {
        let mut t = ghostv3::io::weights::state_tensors(&s);
        if let Some(ghostv3::io::TensorData::F32(_, v)) = t.get_mut(&name) {
            v[0] = value;
        }
        let path = dir.as_path().join(format!("bad-{what}.safetensors"));
        ghostv3::io::write_tensors(&path, &t, None).unwrap();
        let mut fresh = tiny_state();
        let err = ghostv3::io::load_state(&mut fresh, &path).unwrap_err();
        assert!(format!("{err:#}").contains(&name), "{what}: {err:#}");
    }
}

#[test]
fn train_and_val_splits_with_other_class_names_are_refused() {
    let root = scratch("splits");
    for (split, classes) in [("train", ["cats", "dogs"]), ("val", ["cats", "owls"])] {
        for c in classes {
            let d = root.join(split).join(c);
            std::fs::create_dir_all(&d).unwrap();
            image::RgbImage::from_pixel(40, 40, image::Rgb([9, 99, 199]))
                .save(d.join("0.png"))
                .unwrap();
        }
    }
    let sets: Vec<String> = [
        "data.kind=\"imagefolder\"".to_string(),
        format!("data.root=\"{}\"", root.display()),
    ]
    .to_vec();
    let cfg = ghostv3::train::config::TrainConfig::from_toml(
        ghostv3::train::config::TrainConfig::default_recipe(),
        &sets,
        "test",
    )
    .unwrap();
    let err = ghostv3::train::Trainer::new(cfg, &root.join("run"))
        .err()
        .expect("refused");
    let e = format!("{err:#}");
    assert!(
        e.contains("different classes") && e.contains("dogs") && e.contains("owls"),
        "{e}"
    );
    assert!(
        !root.join("run").exists(),
        "nothing written for a refused recipe"
    );
}

#[test]
fn evaluation_refuses_non_finite_outputs() {
    use ghostv3::data::{Loader, Synthetic, TransformConfig};
    let ds = std::sync::Arc::new(Synthetic::new(8, 32, 0));
    let loader = Loader::new(ds, TransformConfig::eval(32), 4, false, false, 1, 0).unwrap();
    let ok = ghostv3::train::evaluate_with(&loader, |x| {
        Ok(ghostv3::Tensor::new(
            &[x.shape()[0], 10],
            vec![0.5; x.shape()[0] * 10],
        ))
    })
    .unwrap();
    assert_eq!((ok.images, ok.skipped.len()), (8, 0));
    let err = ghostv3::train::evaluate_with(&loader, |x| {
        let mut v = vec![0.5; x.shape()[0] * 10];
        v[13] = f32::NAN;
        Ok(ghostv3::Tensor::new(&[x.shape()[0], 10], v))
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("NaN") && err.contains("image 1"), "{err}");
}

/// A diverging run stops at the step whose update wrote the first non-finite value, naming the
/// tensor: the flag of the optimizer pass, read through `Update` on every device (the GPU's
/// flag against the CPU's: `nonfinite_flag_matches_cpu` in tests/cuda_optim.rs).
#[test]
fn divergence_stops_at_its_step() {
    let e = common::diverging_run_error("cpu");
    assert!(e.contains("became") && e.contains("at epoch 1 step"), "{e}");
}
