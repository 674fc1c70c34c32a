//! The fast inference path (`ghostv3::infer`) against the tape engine.
//!
//! * Whole networks: the engine's output for a GhostNetV3 in train form (folded, lowered, packed)
//!   equals `GhostNet::predict` (eval mode, train form, every branch explicit) within 1e-4 of the
//!   largest logit, at every width, batch 1 and 8, 224 and an odd size. Weights and BN statistics
//!   are random and non-trivial, so every folded BN matters.
//! * Single layers on every ISA this CPU has (the portable fallback always included): depth-wise
//!   3x3/5x5/1x5/5x1 at stride 1 and 2, dense and pointwise convs, odd sizes, channel counts that
//!   are not multiples of the vector width, every activation; against `ops::conv2d`.

mod common;

use common::{randomize_bn, rel_err, run_ok, DW_KERNELS};
use ghostv3::infer::graph::{ConvSpec, Graph, Op};
use ghostv3::infer::{self, Act, Engine, Isa};
use ghostv3::models::ghostnet::{GhostNet, GhostNetConfig};
use ghostv3::nn::Id;
use ghostv3::ops::{self, Conv2dArgs};
use ghostv3::{Tape, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}

fn train_form(width: f64, seed: u64) -> GhostNet {
    let mut net = GhostNet::new(GhostNetConfig::new(width, 100), seed).unwrap();
    // Branch BNs divided by 3, as the branches share the load.
    randomize_bn(&mut net.state, &mut StdRng::seed_from_u64(seed + 100), 3.0);
    net
}

/// Engine output vs the tape's train-form eval logits for each (batch, size).
fn check_width(width: f64, cases: &[(usize, usize)]) {
    let mut net = train_form(width, (width * 10.0) as u64);
    let engine = infer::ghostnet_engine(&net, "ghostnet").unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    for &(n, size) in cases {
        let x = random(&mut rng, n * 3 * size * size);
        let want = net.predict(&Tensor::new(&[n, 3, size, size], x.clone()));
        let got = engine.run(&x, n, size, size).unwrap();
        let rel = rel_err(&got, want.data());
        println!(
            "width {width} batch {n} {size}x{size} ({}): fast path vs train-form predict, max abs err / max abs = {rel:.2e}",
            engine.isa.name()
        );
        assert!(want.max_abs() > 1e-2, "degenerate logits");
        assert!(
            rel <= 1e-4,
            "width {width} batch {n} size {size}: {rel:.2e}"
        );
    }
}

// Train-form predict costs ~2.4x the deploy form; the cases spread the big ones over the widths.
#[test]
fn fast_path_matches_tape_050() {
    check_width(0.5, &[(8, 224), (1, 97)]);
}

#[test]
fn fast_path_matches_tape_100() {
    check_width(1.0, &[(1, 224), (8, 97), (8, 224)]);
}

#[test]
fn fast_path_matches_tape_130() {
    check_width(1.3, &[(1, 97), (8, 97), (1, 224)]);
}

#[test]
fn fast_path_matches_tape_160() {
    check_width(1.6, &[(1, 224), (8, 224), (2, 97)]);
}

/// Other registered models the engine lowers: GhostNet V1/V2 (plain conv + BN form),
/// MobileNetV2 (relu6) and ShuffleNetV2 (max pool, channel split and shuffle), each trained with
/// re-parameterization branches (folded at lowering) and in the plain form.
#[test]
fn fast_path_matches_tape_other_models() {
    use ghostv3::models::{self, ModelOptions};
    use ghostv3::nn::RepOptions;
    for name in [
        "ghostnet_100",
        "ghostnetv2_100",
        "mobilenetv2_100",
        "shufflenet_v2_x0_5",
    ] {
        for (branches, deploy) in [(3, false), (0, false)] {
            let opts = ModelOptions {
                num_classes: 50,
                rep: RepOptions {
                    branches,
                    ..RepOptions::default()
                },
                deploy,
                seed: 4,
                ..Default::default()
            };
            let mut m = models::create(name, &opts).unwrap();
            randomize_bn(m.state_mut(), &mut StdRng::seed_from_u64(5), 3.0);
            let e = infer::model_engine(&m).unwrap();
            let (n, size) = (2, 97);
            let x = random(&mut StdRng::seed_from_u64(6), n * 3 * size * size);
            let want = m.predict(&Tensor::new(&[n, 3, size, size], x.clone()));
            let rel = rel_err(&e.run(&x, n, size, size).unwrap(), want.data());
            println!("{name} (branches {branches}) batch {n} {size}x{size}: {rel:.2e}");
            assert!(want.max_abs() > 1e-2, "degenerate logits");
            assert!(rel <= 1e-4, "{name} branches {branches}: {rel:.2e}");
        }
    }
}

/// The portable and AVX2 paths give the same network outputs (forced ISA; batch 1 splits layers
/// across threads, batch 3 splits the batch).
#[test]
fn every_isa_runs_the_network() {
    let mut net = train_form(0.5, 3);
    let graph = infer::ghostnet_graph(&net, "ghostnet").unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    for n in [1, 3] {
        let size = 71;
        let x = random(&mut rng, n * 3 * size * size);
        let want = net.predict(&Tensor::new(&[n, 3, size, size], x.clone()));
        for isa in Isa::available() {
            let e = Engine::with_isa(graph.clone(), isa);
            let rel = rel_err(&e.run(&x, n, size, size).unwrap(), want.data());
            println!("{} batch {n}: {rel:.2e}", isa.name());
            assert!(rel <= 1e-4, "{}: {rel:.2e}", isa.name());
        }
    }
}

/// One conv through the engine (graph of a single node) vs `ops::conv2d` on the tape.
#[allow(clippy::too_many_arguments)]
fn conv_case(
    rng: &mut StdRng,
    isa: Isa,
    n: usize,
    cin: usize,
    cout: usize,
    (kh, kw): (usize, usize),
    stride: usize,
    groups: usize,
    (h, w): (usize, usize),
    act: Act,
) {
    let pad = (kh / 2, kw / 2);
    let weight = random(rng, cout * (cin / groups) * kh * kw);
    let bias = random(rng, cout);
    let mut g = Graph::new("one", cin);
    g.push(
        "conv",
        Op::Conv(ConvSpec {
            cin,
            cout,
            kh,
            kw,
            stride,
            pad,
            groups,
            weight: weight.clone(),
            bias: bias.clone(),
            act,
        }),
        &[0],
    );
    let x = random(rng, n * cin * h * w);
    let got = Engine::with_isa(g, isa).run(&x, n, h, w).unwrap();
    let mut tape = Tape::inference();
    let xv = tape.constant(Tensor::new(&[n, cin, h, w], x));
    let wv = tape.constant(Tensor::new(&[cout, cin / groups, kh, kw], weight));
    let bv = tape.constant(Tensor::new(&[cout], bias));
    let args = Conv2dArgs {
        stride: (stride, stride),
        padding: pad,
        groups,
    };
    let y = ops::conv2d(&mut tape, xv, wv, Some(bv), args);
    let want: Vec<f32> = tape.value(y).data().iter().map(|&v| act.apply(v)).collect();
    let rel = rel_err(&got, &want);
    assert!(
        rel < 1e-5,
        "{} n={n} {cin}->{cout} k={kh}x{kw} s={stride} g={groups} {h}x{w} {act:?}: {rel:.2e}",
        isa.name()
    );
}

#[test]
fn single_convs_on_every_isa() {
    let mut rng = StdRng::seed_from_u64(5);
    let isas = Isa::available();
    println!("ISAs here: {:?}", isas);
    assert!(isas.contains(&Isa::Portable));
    for &isa in &isas {
        for (k, s) in DW_KERNELS {
            for c in [4, 12, 20, 36] {
                for (h, w) in [(9, 13), (3, 3), (2, 7), (16, 16)] {
                    conv_case(&mut rng, isa, 2, c, c, k, s, c, (h, w), Act::Relu);
                }
            }
        }
        // Dense (the stem) and pointwise, tails on both sides of a vector, every activation.
        conv_case(&mut rng, isa, 2, 3, 20, (3, 3), 2, 1, (15, 12), Act::Relu);
        conv_case(&mut rng, isa, 1, 3, 8, (3, 3), 1, 1, (5, 5), Act::None);
        for (cin, cout) in [(16, 8), (24, 36), (7, 33), (40, 100)] {
            for act in [
                Act::None,
                Act::Relu,
                Act::Relu6,
                Act::Sigmoid,
                Act::HardSigmoid,
            ] {
                conv_case(&mut rng, isa, 2, cin, cout, (1, 1), 1, 1, (7, 5), act);
            }
        }
        conv_case(&mut rng, isa, 3, 24, 40, (1, 1), 1, 1, (31, 29), Act::Relu);
    }
}

/// The ONNX export, run in ONNX Runtime (python), gives the engine's outputs. Runs when
/// `python3 -c 'import onnxruntime'` works (CI installs it).
#[test]
fn onnx_export_matches_onnxruntime() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import onnxruntime, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("skipped: onnxruntime not installed (pip install onnxruntime numpy)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ghostv3-onnx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tool = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ort_tool.py");
    let other = |name: &str| {
        let opts = ghostv3::models::ModelOptions {
            num_classes: 20,
            ..Default::default()
        };
        let mut m = ghostv3::models::create(name, &opts).unwrap();
        randomize_bn(m.state_mut(), &mut StdRng::seed_from_u64(8), 3.0);
        infer::model_engine(&m).unwrap()
    };
    // Width 0: MobileNetV2 (relu6 as Clip); width -1: ShuffleNetV2 (MaxPool, Slice, shuffle as
    // Reshape + Transpose + Reshape).
    for (width, n, size) in [(0.5, 2, 97), (1.0, 1, 224), (0.0, 2, 64), (-1.0, 2, 75)] {
        let engine = if width == 0.0 {
            other("mobilenetv2_100")
        } else if width < 0.0 {
            other("shufflenet_v2_x0_5")
        } else {
            infer::ghostnet_engine(&train_form(width, 7), "ghostnet").unwrap()
        };
        let model = dir.join("m.onnx");
        std::fs::write(
            &model,
            infer::onnx::export(&engine.graph, size, size).unwrap(),
        )
        .unwrap();
        let x = random(&mut StdRng::seed_from_u64(9), n * 3 * size * size);
        let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (inp, outp) = (dir.join("x.f32"), dir.join("y.f32"));
        std::fs::write(&inp, xb).unwrap();
        let mut ort_run = std::process::Command::new("python3");
        ort_run
            .arg(tool)
            .arg("run")
            .args([&model, &inp, &outp])
            .args([n, 3, size, size].map(|v| v.to_string()));
        run_ok(&mut ort_run, "onnxruntime");
        let yb = std::fs::read(&outp).unwrap();
        let ort: Vec<f32> = yb
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let ours = engine.run(&x, n, size, size).unwrap();
        let rel = rel_err(&ours, &ort);
        println!("width {width} batch {n} {size}x{size}: engine vs ONNX Runtime on the export, {rel:.2e}");
        assert!(rel <= 1e-4, "ONNX export disagrees: {rel:.2e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn ghostv3_cli(args: &[&str]) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ghostv3"))
        .args(args)
        .output()
        .expect("run ghostv3");
    assert!(
        o.status.success(),
        "ghostv3 {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `bench` (fast path with profile, tape baseline), `export`, and `predict`/`eval` on folded
/// weights (fast path) agreeing with the train-form weights (tape path).
#[test]
fn cli_bench_export_predict() {
    let dir = std::env::temp_dir().join(format!("ghostv3-infer-cli-{}", std::process::id()));
    for c in ["a", "b", "c"] {
        std::fs::create_dir_all(dir.join("imgs").join(c)).unwrap();
    }
    let quick = [
        "--size",
        "64",
        "--runs",
        "3",
        "--warmup",
        "1",
        "--min-secs",
        "0",
    ];
    let m = ["--model", "ghostnetv3_050"];
    let out = ghostv3_cli(&[&["bench", "--profile", "--batch", "2"][..], &m, &quick].concat());
    for key in [
        "median",
        "p90",
        "images/s",
        "peak RSS",
        "per-layer profile",
        "dwconv",
    ] {
        assert!(out.contains(key), "bench output lacks {key}: {out}");
    }
    let out = ghostv3_cli(&[&["bench", "--tape"][..], &m, &quick].concat());
    assert!(
        out.contains("tape predict") && out.contains("median"),
        "{out}"
    );

    let onnx = dir.join("m.onnx");
    ghostv3_cli(
        &[
            &["export", "--out", onnx.to_str().unwrap(), "--size", "64"][..],
            &m,
        ]
        .concat(),
    );
    let bytes = std::fs::read(&onnx).unwrap();
    assert_eq!(
        &bytes[..2],
        &[0x08, 0x07],
        "ModelProto starting with ir_version 7"
    );

    // Train-form weights (random BN), folded by the CLI.
    let net = train_form(0.5, 11);
    let mut net3 = GhostNet::new(GhostNetConfig::new(0.5, 3), 11).unwrap();
    for i in 0..net3.state.params.len() {
        let e = net3.state.params.entry(Id(i)).clone();
        if let Some(src) = net.state.params.find(&e.name) {
            if net.state.params.entry(src).shape == e.shape {
                let v = net.state.params.slice(src).to_vec();
                net3.state.params.slice_mut(Id(i)).copy_from_slice(&v);
            }
        }
    }
    net3.state.buffers = net.state.buffers.clone();
    let (tw, dw) = (
        dir.join("train.safetensors"),
        dir.join("deploy.safetensors"),
    );
    ghostv3::io::save_state(&net3.state, &tw, Default::default()).unwrap();
    let (tws, dws) = (tw.to_str().unwrap(), dw.to_str().unwrap());
    ghostv3_cli(&[&["fold", "--weights", tws, "--out", dws][..], &m].concat());
    for (c, i) in [("a", 0u8), ("b", 1), ("c", 2)] {
        let img = image::RgbImage::from_fn(70, 66, |x, y| {
            image::Rgb([(x as u8).wrapping_mul(3 + i), y as u8, 90 + 40 * i])
        });
        img.save(dir.join(format!("imgs/{c}/{i}.png"))).unwrap();
    }
    let img = dir.join("imgs/a/0.png");
    let top = |w: &str| -> Vec<(f64, String)> {
        let out = ghostv3_cli(
            &[
                &["predict", "--weights", w, "--size", "64"][..],
                &m,
                &[img.to_str().unwrap()],
            ]
            .concat(),
        );
        out.lines()
            .filter_map(|l| {
                let (p, name) = l.trim().split_once('%')?;
                Some((p.trim().parse().ok()?, name.trim().to_string()))
            })
            .collect()
    };
    let (slow, fast) = (top(tws), top(dws));
    assert_eq!(slow.len(), 3, "{slow:?}");
    for ((ps, ns), (pf, nf)) in slow.iter().zip(&fast) {
        assert!((ps - pf).abs() <= 0.011, "tape {slow:?} vs fast {fast:?}");
        if (ps - pf).abs() < 1e-9 {
            assert_eq!(ns, nf);
        }
    }
    let data = dir.join("imgs");
    let out = ghostv3_cli(
        &[
            &[
                "eval",
                "--weights",
                dws,
                "--size",
                "64",
                "--data",
                data.to_str().unwrap(),
            ][..],
            &m,
        ]
        .concat(),
    );
    assert!(
        out.contains("(deploy form)") && out.contains("(3 images scored): top-1"),
        "{out}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
