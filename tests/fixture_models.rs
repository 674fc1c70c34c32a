//! MobileNetV2, ShuffleNetV2, GhostNetV1/V2 and ResNet against timm/torchvision. The fixtures in
//! tests/fixtures/<model>-64 come from scripts/make_fixture.py: every weight, BN buffer and the
//! input are drawn from a counter-based generator re-implemented here, so the files hold only the
//! reference outputs: eval logits, one train-mode step's loss and samples of its float64 gradients
//! (with each gradient's norm and max), the state-dict names and shapes, and the 1000-class
//! model's parameter count and MACs at 224.

mod common;

use common::rel_err;
use ghostv3::io::{read_tensors, TensorData};
use ghostv3::models::{self, Model, ModelOptions};
use ghostv3::nn::{Id, Mode};
use ghostv3::{ops, Tape, Tensor};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
    })
}

/// u_i in [0, 1) for tensor `name`: the fixture script's generator.
fn uniform(name: &str, n: usize, seed: u64) -> impl Iterator<Item = f64> {
    let key = splitmix64(fnv1a64(name) ^ seed);
    (0..n as u64).map(move |i| (splitmix64(key ^ i) >> 11) as f64 * (-53f64).exp2())
}

/// The script's value rules (BN affine and buffers; weights and biases U(-b, b) with PyTorch's
/// default b = 1/sqrt(fan_in)), computed in f64 and rounded to f32.
fn fill(m: &mut Model, seed: u64) {
    let st = m.state_mut();
    let shapes: BTreeMap<String, Vec<usize>> = st
        .params
        .entries()
        .iter()
        .map(|e| (e.name.clone(), e.shape.clone()))
        .collect();
    let is_bn = |prefix: &str, st: &ghostv3::nn::State| {
        st.buffers.find(&format!("{prefix}.running_mean")).is_some()
    };
    for i in 0..st.params.len() {
        let e = st.params.entry(Id(i)).clone();
        let (prefix, leaf) = e.name.rsplit_once('.').expect("dotted name");
        let bn = is_bn(prefix, st);
        let u = uniform(&e.name, e.numel(), seed);
        let v: Vec<f32> = match (bn, leaf) {
            (true, "weight") => u.map(|u| (0.5 + u) as f32).collect(),
            (true, "bias") => u.map(|u| (0.2 * (2.0 * u - 1.0)) as f32).collect(),
            (false, "weight") => {
                let fan_in: usize = e.shape[1..].iter().product();
                let b = 1.0 / (fan_in as f64).sqrt();
                u.map(|u| (b * (2.0 * u - 1.0)) as f32).collect()
            }
            (false, "bias") => {
                let w = &shapes[&format!("{prefix}.weight")];
                let fan_in: usize = w[1..].iter().product();
                let b = 1.0 / (fan_in as f64).sqrt();
                u.map(|u| (b * (2.0 * u - 1.0)) as f32).collect()
            }
            _ => panic!("no rule for {}", e.name),
        };
        st.params.slice_mut(Id(i)).copy_from_slice(&v);
    }
    for i in 0..st.buffers.len() {
        let e = st.buffers.entry(Id(i)).clone();
        let u = uniform(&e.name, e.numel(), seed);
        let v: Vec<f32> = if e.name.ends_with("running_mean") {
            u.map(|u| (0.1 * (2.0 * u - 1.0)) as f32).collect()
        } else {
            u.map(|u| (0.5 + u) as f32).collect()
        };
        st.buffers.slice_mut(Id(i)).copy_from_slice(&v);
    }
}

/// tests/fixtures/<model>-<size>, whatever the size.
fn fixture_dir(model: &str) -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let found = std::fs::read_dir(&root).ok().and_then(|rd| {
        rd.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.rsplit_once('-'))
                .is_some_and(|(m, size)| m == model && size.parse::<usize>().is_ok())
                && p.join("reference.safetensors").is_file()
        })
    });
    if found.is_none() {
        println!(
            "skipped: no fixture {}/{model}-<size> (make it with scripts/make_fixture.py)",
            root.display()
        );
    }
    found
}

fn f32s<'a>(r: &'a BTreeMap<String, TensorData>, k: &str) -> &'a [f32] {
    match r.get(k) {
        Some(TensorData::F32(_, v)) => v,
        other => panic!("reference {k}: {other:?}"),
    }
}

fn i64s<'a>(r: &'a BTreeMap<String, TensorData>, k: &str) -> &'a [i64] {
    match r.get(k) {
        Some(TensorData::I64(_, v)) => v,
        other => panic!("reference {k}: {other:?}"),
    }
}

/// Gradient tolerance of tests/fixture_timm.rs: max|g - g_ref| / (max|g_ref| + 1e-3 G) <= 2e-3.
const GRAD_TOL: f64 = 2e-3;
/// Gradients are checked when PyTorch's own float32 step is this close to its float64 one (the
/// GhostNetV3 fixture: 6.1e-4); past it the draw is ill-conditioned in float32.
const MAX_REF_SPREAD: f64 = 1e-3;

fn check(model: &str) {
    let Some(dir) = fixture_dir(model) else {
        return;
    };
    let t0 = std::time::Instant::now();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let refs = read_tensors(&dir.join("reference.safetensors")).unwrap();
    let classes = meta["classes"].as_u64().unwrap() as usize;
    let (size, batch) = (
        meta["size"].as_u64().unwrap() as usize,
        meta["batch"].as_u64().unwrap() as usize,
    );
    let seed = meta["seed"].as_u64().unwrap();

    // Counts of the 1000-class network: parameters, and conv + linear MACs at 224.
    // GhostNetV3 as timm creates it: the train form with its re-parameterized branches.
    let deploy = !model.starts_with("ghostnetv3");
    let mut full = models::create(
        model,
        &ModelOptions {
            deploy,
            ..Default::default()
        },
    )
    .unwrap();
    let params = full.state().params.numel() as u64;
    let mut tape = Tape::inference();
    let x0 = tape.constant(Tensor::zeros(&[1, 3, 224, 224]));
    full.forward(&mut tape, x0, Mode::Eval, None);
    let macs = tape.macs();
    drop((tape, full));
    println!("{model}: {params} params, {macs} MACs at 224");
    assert_eq!(
        params,
        meta["params_1000"].as_u64().unwrap(),
        "{model} params"
    );
    assert_eq!(macs, meta["macs_224"].as_u64().unwrap(), "{model} MACs");

    let opts = ModelOptions {
        num_classes: classes,
        deploy,
        ..Default::default()
    };
    let mut m = models::create(model, &opts).unwrap();
    // Exactly the reference state-dict names and shapes, in any order.
    let ours: BTreeMap<String, Vec<usize>> = ghostv3::io::weights::state_tensors(m.state())
        .into_iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .map(|(k, v)| (k, v.shape().to_vec()))
        .collect();
    let theirs: BTreeMap<String, Vec<usize>> = meta["state"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| !e[0].as_str().unwrap().ends_with("num_batches_tracked"))
        .map(|e| {
            let s = e[1].as_array().unwrap();
            (
                e[0].as_str().unwrap().to_string(),
                s.iter().map(|d| d.as_u64().unwrap() as usize).collect(),
            )
        })
        .collect();
    assert_eq!(ours, theirs, "{model}: state-dict names or shapes differ");

    fill(&mut m, seed);
    let n_in = batch * 3 * size * size;
    let x = Tensor::new(
        &[batch, 3, size, size],
        uniform("input", n_in, seed)
            .map(|u| (4.0 * u - 2.0) as f32)
            .collect(),
    );
    let y = m.predict(&x);
    let err = rel_err(y.data(), f32s(&refs, "logits"));
    let err64 = rel_err(y.data(), f32s(&refs, "logits_f64"));
    println!(
        "{model}: eval logits rel err {err:.2e} vs f32, {err64:.2e} vs f64 (max |logit| {:.2})",
        y.max_abs()
    );
    assert!(
        err <= 1e-4 && err64 <= 1e-4,
        "{model}: eval logits rel err {err:e}"
    );

    let labels: Vec<usize> = i64s(&refs, "labels").iter().map(|&l| l as usize).collect();
    let mut tape = Tape::new();
    let xv = tape.constant(x);
    let (logits, leaves) = m.forward(&mut tape, xv, Mode::Train { dropout: false }, None);
    let loss = ops::cross_entropy(&mut tape, logits, &labels, 0.0);
    let lv = tape.value(loss).data()[0] as f64;
    let want = f32s(&refs, "train_loss")[0] as f64;
    let tl_err = rel_err(tape.value(logits).data(), f32s(&refs, "train_logits"));
    let loss_err = ((lv - want) / want).abs();
    println!("{model}: train loss {lv:.6} vs {want:.6} (rel {loss_err:.1e}), train logits rel err {tl_err:.2e}");
    // Train mode of deep nets is less well conditioned in float32 than eval mode: hold the step
    // to 1e-5 / 1e-4 or to twice PyTorch's own float32 error, whichever is larger.
    let f = |k: &str| meta[k].as_f64().unwrap_or(0.0);
    let torch_loss_err = ((f("train_loss_f32") - f("train_loss_f64")) / f("train_loss_f64")).abs();
    let torch_tl_err = f("rel_err_train_logits_f32_vs_f64");
    assert!(
        loss_err <= 1e-5f64.max(2.0 * torch_loss_err) && tl_err <= 1e-4f64.max(2.0 * torch_tl_err),
        "{model}: train step: loss rel err {loss_err:e} (PyTorch f32 {torch_loss_err:e}), logits {tl_err:e} (PyTorch f32 {torch_tl_err:e})"
    );

    // Deep bottleneck ResNets and MobileNetV2-1.4 accumulate enough float32 error in train mode
    // to flip pre-activations next to a ReLU kink: PyTorch's own float32 step then misses its
    // float64 gradients by 3e-2..3e-1 of the tolerance measure on most draws (the ops themselves
    // are checked by ops_grad.rs, and these layers on ResNet-18 and MobileNetV2-1.0 here). Such a
    // model is held to PyTorch's float32 accuracy: twice the median spread of the draws tried.
    let mut spreads: Vec<f64> = match meta["spreads_tried"].as_array() {
        Some(a) if !a.is_empty() => a.iter().filter_map(|v| v.as_f64()).collect(),
        _ => vec![meta["worst_grad_err_f32_vs_f64"].as_f64().unwrap()],
    };
    spreads.sort_by(f64::total_cmp);
    let typical = spreads[spreads.len() / 2];
    let tol = if typical > MAX_REF_SPREAD {
        println!("{model}: ill-conditioned in float32 (PyTorch f32 vs f64 gradient spreads {spreads:?}): gradient tolerance 2x the median");
        2.0 * typical
    } else {
        GRAD_TOL
    };
    let grads = tape.backward(loss);
    let flat = leaves.flat_grads(m.state(), &grads).into_vec();
    let entries = m.state().params.entries().to_vec();
    let big = entries
        .iter()
        .map(|e| f32s(&refs, &format!("gmax.{}", e.name))[0] as f64)
        .fold(0.0, f64::max);
    let (mut worst, mut worst_norm) = ((0.0f64, String::new()), 0.0f64);
    let mut bad = Vec::new();
    for e in &entries {
        let g = &flat[e.offset..e.offset + e.numel()];
        let gmax = f32s(&refs, &format!("gmax.{}", e.name))[0] as f64;
        let scale = gmax + 1e-3 * big;
        let idx = i64s(&refs, &format!("gidx.{}", e.name));
        let val = f32s(&refs, &format!("gval.{}", e.name));
        let d = idx
            .iter()
            .zip(val)
            .map(|(&i, &v)| (g[i as usize] as f64 - v as f64).abs())
            .fold(0.0, f64::max);
        let norm = g.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        let gnorm = f32s(&refs, &format!("gnorm.{}", e.name))[0] as f64;
        let dn = (norm - gnorm).abs() / (gnorm + 1e-3 * big);
        let our_max = g.iter().fold(0.0f64, |a, &v| a.max(v.abs() as f64));
        let dm = (our_max - gmax).abs() / scale;
        if d / scale > worst.0 {
            worst = (d / scale, e.name.clone());
        }
        worst_norm = worst_norm.max(dn).max(dm);
        if d / scale > tol || dn > tol || dm > tol {
            bad.push(format!(
                "{}: samples {:.2e}, norm {dn:.2e}, max {dm:.2e}",
                e.name,
                d / scale
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{model}: gradients off (max|g - g_ref| / (max|g_ref| + 1e-3 G) > {tol:e}):\n{}",
        bad.join("\n")
    );
    println!(
        "{model}: {} parameter gradients within {tol:.1e}: worst sample {:.2e} ({}), worst norm/max {worst_norm:.2e}; {:.1} s",
        entries.len(),
        worst.0,
        worst.1,
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn mobilenetv2_matches_timm() {
    check("mobilenetv2_100");
    check("mobilenetv2_140");
}

#[test]
fn shufflenetv2_matches_torchvision() {
    for m in [
        "shufflenet_v2_x0_5",
        "shufflenet_v2_x1_0",
        "shufflenet_v2_x1_5",
        "shufflenet_v2_x2_0",
    ] {
        check(m);
    }
}

#[test]
fn ghostnet_v1_v2_match_timm() {
    for m in [
        "ghostnet_100",
        "ghostnetv2_100",
        "ghostnetv2_130",
        "ghostnetv2_160",
    ] {
        check(m);
    }
}

/// GhostNetV3's train form, its re-parameterized convs run both ways on the CPU: fused (the
/// default) and composed.
#[test]
fn ghostnetv3_train_form_matches_timm_fused_and_composed() {
    use ghostv3::backend::cpu::{rep_conv::set_fused, rep_conv_1x1::set_fused_1x1};
    for fused in [true, false] {
        println!(
            "ghostnetv3_050 with the fused rep convs {}",
            if fused { "on" } else { "off" }
        );
        set_fused(fused);
        set_fused_1x1(fused);
        check("ghostnetv3_050");
    }
    set_fused(true);
    set_fused_1x1(true);
}

#[test]
fn resnet18_matches_timm() {
    check("resnet18");
}

#[test]
fn resnet50_matches_timm() {
    check("resnet50");
}

#[test]
fn resnet101_matches_timm() {
    check("resnet101");
}
