//! Weights I/O: timm names both ways, the official checkpoint spelling, and bad files that must
//! fail with an error naming the tensor while leaving the model untouched.

mod common;

use ghostv3::io::weights::state_tensors;
use ghostv3::io::{load_state, read_tensors, save_state, write_tensors, TensorData};
use ghostv3::models::{self, Model, ModelOptions};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ghostv3-io-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn model(seed: u64) -> Model {
    models::create(
        "ghostnetv3_050",
        &ModelOptions {
            num_classes: 10,
            seed,
            ..Default::default()
        },
    )
    .unwrap()
}

fn snapshot(m: &Model) -> (Vec<f32>, Vec<f32>, Vec<(String, i64)>) {
    (
        m.state().params.flat().to_vec(),
        m.state().buffers.flat().to_vec(),
        m.state().counters.clone(),
    )
}

/// Writes `tensors` after `edit`, tries to load into a fresh model; returns the error text and
/// checks that nothing was loaded.
fn load_error(tag: &str, edit: impl FnOnce(&mut BTreeMap<String, TensorData>)) -> String {
    let src = model(1);
    let mut t = state_tensors(src.state());
    edit(&mut t);
    let path = tmpdir(tag).join("w.safetensors");
    write_tensors(&path, &t, None).unwrap();
    let mut dst = model(2);
    let before = snapshot(&dst);
    let err = load_state(dst.state_mut(), &path).expect_err("load must fail");
    assert!(before == snapshot(&dst), "a failed load changed the model");
    format!("{err:#}")
}

#[test]
fn save_then_load_round_trips_exactly() {
    let mut a = model(1);
    a.state_mut().counters[0].1 = 42;
    let path = tmpdir("rt").join("w.safetensors");
    save_state(a.state(), &path, HashMap::new()).unwrap();
    let mut b = model(2);
    assert!(snapshot(&a) != snapshot(&b));
    load_state(b.state_mut(), &path).unwrap();
    assert!(snapshot(&a) == snapshot(&b));
    // No temp file is left beside the target.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn missing_tensor_is_named_and_nothing_is_loaded() {
    let e = load_error("missing", |t| {
        t.remove("blocks.3.0.ghost1.cheap_rpr_conv.1.conv.weight");
    });
    assert!(
        e.contains("missing tensor blocks.3.0.ghost1.cheap_rpr_conv.1.conv.weight"),
        "{e}"
    );
    assert!(
        e.contains("[20, 1, 3, 3]") || e.contains("[18, 1, 3, 3]"),
        "{e}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let e = load_error("unexpected", |t| {
        t.insert(
            "blocks.3.0.extra.weight".into(),
            TensorData::F32(vec![2], vec![1.0, 2.0]),
        );
    });
    assert!(
        e.contains("unexpected tensor blocks.3.0.extra.weight"),
        "{e}"
    );
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let e = load_error("shape", |t| {
        t.insert(
            "classifier.weight".into(),
            TensorData::F32(vec![1000, 1280], vec![0.0; 1_280_000]),
        );
    });
    assert!(e.contains("classifier.weight"), "{e}");
    assert!(
        e.contains("[1000, 1280]") && e.contains("[10, 1280]"),
        "{e}"
    );
}

#[test]
fn nan_weights_are_rejected() {
    let e = load_error("nan", |t| {
        if let Some(TensorData::F32(_, v)) = t.get_mut("bn1.weight") {
            v[0] = f32::NAN;
        }
    });
    assert!(e.contains("bn1.weight") && e.contains("NaN"), "{e}");
}

#[test]
fn not_a_safetensors_file_or_missing_file_is_a_clear_error() {
    let dir = tmpdir("bad");
    let p = dir.join("junk.safetensors");
    std::fs::write(&p, b"this is not a safetensors file").unwrap();
    let mut m = model(0);
    let e = format!("{:#}", load_state(m.state_mut(), &p).unwrap_err());
    assert!(e.contains("not a valid safetensors"), "{e}");
    let e = format!(
        "{:#}",
        load_state(m.state_mut(), &dir.join("nope.safetensors")).unwrap_err()
    );
    assert!(e.contains("nope.safetensors"), "{e}");
}

/// The official GhostNetV3 release spells branch BNs `.bn.`, carries thop's `total_ops` and
/// `total_params`, and may come from DDP (`module.`) in float64: all of it loads.
#[test]
fn official_checkpoint_spelling_loads() {
    let src = model(3);
    let mut raw: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = Vec::new();
    for (k, t) in state_tensors(src.state()) {
        let official = k.replace(".bn1.", ".bn.");
        let official = if official.contains(".ghost") || official.contains(".dw_rpr_") {
            official
        } else {
            k.clone()
        };
        match t {
            TensorData::F32(s, v) => {
                let v64: Vec<f64> = v.iter().map(|&x| x as f64).collect();
                raw.push((
                    format!("module.{official}"),
                    s,
                    bytemuck::cast_slice(&v64).to_vec(),
                    Dtype::F64,
                ));
            }
            TensorData::I64(s, v) => raw.push((
                format!("module.{official}"),
                s,
                bytemuck::cast_slice(&v).to_vec(),
                Dtype::I64,
            )),
        }
    }
    raw.push((
        "module.total_ops".into(),
        vec![1],
        bytemuck::cast_slice(&[1.0f64]).to_vec(),
        Dtype::F64,
    ));
    raw.push((
        "module.blocks.0.0.total_params".into(),
        vec![1],
        bytemuck::cast_slice(&[1.0f64]).to_vec(),
        Dtype::F64,
    ));
    assert!(raw
        .iter()
        .any(|(k, ..)| k.contains("primary_rpr_conv.0.bn.weight")));
    let views: Vec<(String, TensorView)> = raw
        .iter()
        .map(|(k, s, b, d)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    let path = tmpdir("official").join("official.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let mut dst = model(4);
    load_state(dst.state_mut(), &path).unwrap();
    assert!(snapshot(&src) == snapshot(&dst));
}

/// Our train-form names and shapes are exactly timm's (the fixture's train.safetensors).
#[test]
fn train_form_names_are_timms() {
    let Some(dir) = common::fixture("ghostnetv3_050-112") else {
        return;
    };
    let theirs = read_tensors(&dir.join("train.safetensors")).unwrap();
    let ours = state_tensors(model(0).state());
    let ours: BTreeMap<_, _> = ours
        .iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .collect();
    let a: Vec<(&String, &[usize])> = theirs.iter().map(|(k, t)| (k, t.shape())).collect();
    let b: Vec<(&String, &[usize])> = ours.iter().map(|(k, t)| (*k, t.shape())).collect();
    assert_eq!(a, b);
    println!(
        "{} train-form tensors, names and shapes equal to timm's",
        a.len()
    );
}
