//! GhostNetV3 against timm: a fixture written by `../shared/tools/make_fixture.py` holds timm's
//! weights, an input, eval logits of the train and deploy forms, one train-mode step's loss,
//! logits, float64 gradients and BN running stats. We must reproduce all of them.

mod common;

use common::{fixture, rel_err};
use ghostv3::backend::cpu::{rep_conv::set_fused, rep_conv_1x1::set_fused_1x1};
use ghostv3::io::{load_state, read_tensors, TensorData};
use ghostv3::models::{self, Model, ModelOptions};
use ghostv3::nn::Mode;
use ghostv3::{ops, reparam, Tape, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

const FIXTURE: &str = "ghostnetv3_050-112";

struct Fixture {
    model: String,
    classes: usize,
    refs: BTreeMap<String, TensorData>,
}

fn load_fixture(dir: &Path) -> Fixture {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).expect("meta.json"))
            .expect("json");
    Fixture {
        model: meta["model"].as_str().expect("model").to_string(),
        classes: meta["classes"].as_u64().expect("classes") as usize,
        refs: read_tensors(&dir.join("reference.safetensors")).expect("reference"),
    }
}

fn f32s<'a>(refs: &'a BTreeMap<String, TensorData>, name: &str) -> (&'a [usize], &'a [f32]) {
    match refs.get(name) {
        Some(TensorData::F32(s, v)) => (s, v),
        other => panic!("reference tensor {name}: {other:?}"),
    }
}

fn input(f: &Fixture) -> Tensor<f32> {
    let (s, v) = f32s(&f.refs, "input");
    Tensor::new(s, v.to_vec())
}

/// The fixture's model in train form with timm's train weights, and the options it was built with.
fn train_model(dir: &Path, f: &Fixture) -> (Model, ModelOptions) {
    let opts = ModelOptions {
        num_classes: f.classes,
        ..Default::default()
    };
    let mut m = models::create(&f.model, &opts).unwrap();
    load_state(m.state_mut(), &dir.join("train.safetensors")).unwrap();
    (m, opts)
}

#[test]
fn train_form_eval_logits_match_timm() {
    let Some(dir) = fixture(FIXTURE) else { return };
    let f = load_fixture(&dir);
    let (mut m, _) = train_model(&dir, &f);
    let y = m.predict(&input(&f));
    let err = rel_err(y.data(), f32s(&f.refs, "logits").1);
    let err64 = rel_err(y.data(), f32s(&f.refs, "logits_f64").1);
    println!("train-form eval logits: rel err {err:.3e} vs timm f32, {err64:.3e} vs timm f64");
    assert!(err <= 1e-4, "train-form logits rel err {err}");
}

#[test]
fn folded_model_matches_timm_deploy_form() {
    let Some(dir) = fixture(FIXTURE) else { return };
    let f = load_fixture(&dir);
    let (train, opts) = train_model(&dir, &f);
    let mut folded = reparam::fold(&train).unwrap();

    // Our folded tensors have exactly timm's deploy names and shapes, and the same values.
    let ours = ghostv3::io::weights::state_tensors(folded.state());
    let theirs = read_tensors(&dir.join("deploy.safetensors")).unwrap();
    let our_names: Vec<&String> = ours
        .keys()
        .filter(|k| !k.ends_with("num_batches_tracked"))
        .collect();
    let their_names: Vec<&String> = theirs.keys().collect();
    assert_eq!(
        our_names, their_names,
        "deploy-form tensor names differ from timm's"
    );
    let mut worst = (0.0f64, String::new());
    for (k, t) in &theirs {
        let (TensorData::F32(s, v), TensorData::F32(s2, v2)) = (t, &ours[k]) else {
            panic!("{k} dtype")
        };
        assert_eq!(s, s2, "{k} shape");
        let e = rel_err(v2, v);
        if e > worst.0 {
            worst = (e, k.clone());
        }
    }
    println!(
        "folded weights vs timm reparameterize_model: worst rel err {:.3e} ({})",
        worst.0, worst.1
    );
    assert!(
        worst.0 <= 1e-5,
        "folded weights differ from timm: {worst:?}"
    );

    let x = input(&f);
    let y = folded.predict(&x);
    let err = rel_err(y.data(), f32s(&f.refs, "logits_deploy").1);
    println!("deploy-form logits: rel err {err:.3e}");
    assert!(err <= 1e-4, "deploy logits rel err {err}");

    // timm's deploy file loads into our deploy model and gives the same logits.
    let dopts = ModelOptions {
        deploy: true,
        ..opts
    };
    let mut d2 = models::create(&f.model, &dopts).unwrap();
    load_state(d2.state_mut(), &dir.join("deploy.safetensors")).unwrap();
    let err2 = rel_err(d2.predict(&x).data(), f32s(&f.refs, "logits_deploy").1);
    println!("timm deploy weights in our deploy model: rel err {err2:.3e}");
    assert!(err2 <= 1e-4);
}

#[test]
fn train_step_loss_gradients_and_running_stats_match_timm() {
    let Some(dir) = fixture(FIXTURE) else { return };
    // The composed re-parameterized convs here. This draw (batch 2) has one ReLU input,
    // element 1770 of the [2, 240, 4, 4] pre-activation of the 49th activation call, at 1.2e-5
    // (the tensor's max is 7.7) whose sign any change of rounding order flips: the fused convs
    // flip it, and so does scaling the input by 1 + 1e-6 noise with the composed convs, and the
    // shallow gradients then move by 1.5e-2 of the measure. PyTorch's float32 and our composed
    // convs happen to round like the float64 reference. The fused forms are held to timm on a
    // well-conditioned draw instead (tests/fixture_models.rs, ghostnetv3_050-64: both ways).
    set_fused(false);
    set_fused_1x1(false);
    let f = load_fixture(&dir);
    let (mut m, _) = train_model(&dir, &f);
    let labels: Vec<usize> = match &f.refs["labels"] {
        TensorData::I64(_, v) => v.iter().map(|&l| l as usize).collect(),
        other => panic!("labels: {other:?}"),
    };
    let mut tape = Tape::new();
    let x = tape.constant(input(&f));
    let (logits, leaves) = m.forward(&mut tape, x, Mode::Train { dropout: false }, None);
    let loss = ops::cross_entropy(&mut tape, logits, &labels, 0.0);
    let loss_v = tape.value(loss).data()[0];
    let tl_err = rel_err(tape.value(logits).data(), f32s(&f.refs, "train_logits").1);
    let want = f32s(&f.refs, "train_loss").1[0];
    let loss_err = ((loss_v - want) as f64 / want as f64).abs();
    println!("train loss {loss_v} vs timm {want} (rel {loss_err:.2e}); train logits rel err {tl_err:.2e}");
    assert!(loss_err <= 1e-5, "train loss rel err {loss_err}");
    assert!(tl_err <= 1e-4, "train logits rel err {tl_err}");

    let grads = tape.backward(loss);
    let flat = leaves.flat_grads(m.state(), &grads).into_vec();
    let entries = m.state().params.entries().to_vec();
    let big = entries
        .iter()
        .map(|e| {
            f32s(&f.refs, &format!("grad.{}", e.name))
                .1
                .iter()
                .fold(0.0f64, |a, v| a.max(v.abs() as f64))
        })
        .fold(0.0, f64::max);
    let mut worst = (0.0f64, String::new());
    let mut bad = Vec::new();
    for e in &entries {
        let (_, r) = f32s(&f.refs, &format!("grad.{}", e.name));
        let g = &flat[e.offset..e.offset + e.numel()];
        let d = g
            .iter()
            .zip(r)
            .fold(0.0f64, |a, (x, y)| a.max((*x as f64 - *y as f64).abs()));
        let scale = r.iter().fold(0.0f64, |a, v| a.max(v.abs() as f64)) + 1e-3 * big;
        let e_rel = d / scale;
        if e_rel > worst.0 {
            worst = (e_rel, e.name.clone());
        }
        if e_rel > 2e-3 {
            bad.push(format!("{}: {e_rel:.3e}", e.name));
        }
    }
    assert!(
        bad.is_empty(),
        "gradients off (max|g - g_ref| / (max|g_ref| + 1e-3 G) > 2e-3):\n{}",
        bad.join("\n")
    );
    println!(
        "{} parameter gradients within tolerance; worst {:.3e} ({}), G = {big:.4}",
        entries.len(),
        worst.0,
        worst.1
    );

    let mut worst_bn = 0.0f64;
    for (i, e) in m.state().buffers.entries().iter().enumerate() {
        let (_, r) = f32s(&f.refs, &format!("after_step.{}", e.name));
        let v = m.state().buffers.slice(ghostv3::nn::Id(i));
        let d = v
            .iter()
            .zip(r)
            .fold(0.0f64, |a, (x, y)| a.max((*x as f64 - *y as f64).abs()));
        worst_bn = worst_bn.max(d);
        assert!(
            d <= 1e-5,
            "running stat {} after the step: max abs err {d:.3e}",
            e.name
        );
    }
    println!(
        "{} BN running stats after the step: max abs err {worst_bn:.3e}",
        m.state().buffers.len()
    );
}
