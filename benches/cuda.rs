//! CUDA kernel benchmarks at GhostNetV3-1.0x training shapes (batch 256, 224x224 input): time per
//! call and achieved bandwidth against the device's measured copy bandwidth (bytes read +
//! written), and the fused rep_conv against its unfused composition (N branch convs + BNs).
//! Prints `skipped: no CUDA device` without a GPU. Run: `cargo bench --bench cuda`.
//!
//! Times are medians of `REPS` calls after a warm-up, the stream synchronized around each call
//! (launch gaps included: this is what a training step pays).

use ghostv3::backend::cpu::conv::ConvGeom;
use ghostv3::backend::cuda::{unavailable_reason, DBuf, Gpu, RepDwGeom};
use ghostv3::optim::{LambOptions, Layout};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

const REPS: usize = 15;

fn rand_buf(g: &Gpu, rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> DBuf {
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    g.upload(&v).unwrap()
}

/// Median seconds of `f` over REPS calls after 3 warm-ups.
fn time(g: &Gpu, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    g.synchronize().unwrap();
    let mut t: Vec<f64> = (0..REPS)
        .map(|_| {
            let s = Instant::now();
            f();
            g.synchronize().unwrap();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[REPS / 2]
}

struct Row {
    name: String,
    ms: f64,
    bytes: f64,
}

fn main() {
    if let Some(why) = unavailable_reason() {
        println!("skipped: no CUDA device ({why})");
        return;
    }
    let g = Gpu::new(0).unwrap_or_else(|e| panic!("CUDA device present but unusable: {e:#}"));
    g.load_all().unwrap();
    println!(
        "{} (sm_{}{}), target {}",
        g.name(),
        g.compute_capability().0,
        g.compute_capability().1,
        g.target().arch_flag()
    );
    let mut rng = StdRng::seed_from_u64(1);
    let mut rows: Vec<Row> = Vec::new();

    // Copy bandwidth: the ceiling for the memory-bound kernels below.
    let n = 256 << 20; // 1 GiB of f32
    let src = rand_buf(&g, &mut rng, n, -1.0, 1.0);
    let t = time(&g, || {
        let _ = g.scale(&src, 1.0).unwrap();
    });
    let copy_bw = 8.0 * n as f64 / t;
    rows.push(Row {
        name: "copy (scale by 1), 1 GiB".into(),
        ms: t * 1e3,
        bytes: 8.0 * n as f64,
    });
    drop(src);

    // A mid-network activation: 256 x 72 x 56 x 56 (ghostnetv3_100 stage 2 width).
    let (bn, c, h, w) = (256usize, 72usize, 56usize, 56usize);
    let act = bn * c * h * w;
    let fb = 4.0 * act as f64;
    let x = rand_buf(&g, &mut rng, act, -1.0, 2.0);
    let gy = rand_buf(&g, &mut rng, act, -1.0, 1.0);
    let gamma = rand_buf(&g, &mut rng, c * 8, 0.5, 1.5);
    let beta = rand_buf(&g, &mut rng, c * 8, -0.5, 0.5);
    let dims = (bn, c, h * w);
    rows.push(Row {
        name: format!("relu fwd {bn}x{c}x{h}x{w}"),
        ms: 1e3 * time(&g, || drop(g.relu(&x).unwrap())),
        bytes: 2.0 * fb,
    });
    rows.push(Row {
        name: "bn train fwd (stats + apply)".into(),
        ms: 1e3
            * time(&g, || {
                drop(g.batch_norm_train(&x, &gamma, &beta, dims, 1e-5).unwrap())
            }),
        bytes: 3.0 * fb,
    });
    let (_, saved) = g.batch_norm_train(&x, &gamma, &beta, dims, 1e-5).unwrap();
    rows.push(Row {
        name: "bn train bwd".into(),
        ms: 1e3
            * time(&g, || {
                drop(
                    g.batch_norm_backward(&gy, &x, &gamma, &saved, dims, true)
                        .unwrap(),
                )
            }),
        bytes: 5.0 * fb,
    });

    // Depth-wise 3x3 stride 1 and the fused rep_conv (N=3 + scale + identity) vs unfused.
    let dg = ConvGeom::new(&[bn, c, h, w], &[c, 1, 3, 3], (1, 1), (1, 1), c).unwrap();
    let wk = rand_buf(&g, &mut rng, 3 * c * 9, -0.3, 0.3);
    let ws = rand_buf(&g, &mut rng, c, -1.0, 1.0);
    rows.push(Row {
        name: "dw 3x3 s1 fwd".into(),
        ms: 1e3 * time(&g, || drop(g.conv2d_forward(&dg, &x, &wk, None).unwrap())),
        bytes: 2.0 * fb,
    });
    rows.push(Row {
        name: "dw 3x3 s1 bwd (dx + dw)".into(),
        ms: 1e3
            * time(&g, || {
                drop(
                    g.conv2d_backward(&dg, &x, &wk, &gy, (true, true, false))
                        .unwrap(),
                )
            }),
        bytes: 4.0 * fb,
    });
    let rg = RepDwGeom {
        n: bn,
        c,
        h,
        w,
        kh: 3,
        kw: 3,
        stride: 1,
        branches: 3,
        scale: true,
        identity: true,
    };
    let t_fused_f = time(&g, || {
        drop(
            g.rep_dw_forward(&rg, &x, &wk, Some(&ws), &gamma, &beta, 1e-5)
                .unwrap(),
        )
    });
    let (_, rs) = g
        .rep_dw_forward(&rg, &x, &wk, Some(&ws), &gamma, &beta, 1e-5)
        .unwrap();
    let t_fused_b = time(&g, || {
        drop(
            g.rep_dw_backward(&rg, &x, &wk, Some(&ws), &gamma, &rs, &gy, 1e-5)
                .unwrap(),
        )
    });
    rows.push(Row {
        name: "rep_dw 3x3 N=3+1x1+id fused fwd".into(),
        ms: 1e3 * t_fused_f,
        bytes: 3.0 * fb,
    });
    rows.push(Row {
        name: "rep_dw fused bwd".into(),
        ms: 1e3 * t_fused_b,
        bytes: 6.0 * fb,
    });
    // Unfused: each branch conv + BN train, summed (what the tape does today).
    let wbs: Vec<DBuf> = (0..3).map(|b| branch(&g, &wk, b, c * 9)).collect();
    let unfused_f = || {
        let mut acc: Option<DBuf> = None;
        for wb in &wbs {
            let z = g.conv2d_forward(&dg, &x, wb, None).unwrap();
            let (y, _) = g.batch_norm_train(&z, &gamma, &beta, dims, 1e-5).unwrap();
            acc = Some(match acc {
                None => y,
                Some(a) => g.add(&a, &y).unwrap(),
            });
        }
        let (y, _) = g.batch_norm_train(&x, &gamma, &beta, dims, 1e-5).unwrap();
        drop(g.add(acc.as_ref().unwrap(), &y).unwrap());
    };
    rows.push(Row {
        name: "rep_dw unfused fwd (4 BN + 3 conv + adds)".into(),
        ms: 1e3 * time(&g, unfused_f),
        bytes: 0.0,
    });

    // DFC gate at full resolution with a half-resolution gate.
    let gate = rand_buf(&g, &mut rng, act / 4, -2.0, 2.0);
    let gdims = (bn, c, h / 2 * (w / 2));
    let gs = g
        .batch_norm_stats(&gate, &gamma, &beta, gdims, 1e-5)
        .unwrap();
    rows.push(Row {
        name: "dfc gate fwd (bn+sigmoid+up+mul)".into(),
        ms: 1e3
            * time(&g, || {
                drop(
                    g.dfc_gate(&x, &gate, &gs, (bn, c, h, w), (h / 2, w / 2))
                        .unwrap(),
                )
            }),
        bytes: 2.25 * fb,
    });
    rows.push(Row {
        name: "dfc gate bwd".into(),
        ms: 1e3
            * time(&g, || {
                drop(
                    g.dfc_gate_backward(&gy, &x, &gate, &gs, (bn, c, h, w), (h / 2, w / 2))
                        .unwrap(),
                )
            }),
        bytes: 3.5 * fb,
    });

    // 1x1 conv 72 -> 24 (GEMM) and the stem conv 3x3 s2 from RGB.
    let pg = ConvGeom::new(&[bn, c, h, w], &[24, c, 1, 1], (1, 1), (0, 0), 1).unwrap();
    let pw = rand_buf(&g, &mut rng, 24 * c, -0.3, 0.3);
    rows.push(Row {
        name: "1x1 conv 72->24 fwd (cuBLAS)".into(),
        ms: 1e3 * time(&g, || drop(g.conv2d_forward(&pg, &x, &pw, None).unwrap())),
        bytes: fb * (1.0 + 24.0 / 72.0),
    });
    let img = rand_buf(&g, &mut rng, bn * 3 * 224 * 224, -2.0, 2.0);
    let sg = ConvGeom::new(&[bn, 3, 224, 224], &[16, 3, 3, 3], (2, 2), (1, 1), 1).unwrap();
    let sw = rand_buf(&g, &mut rng, 16 * 27, -0.3, 0.3);
    rows.push(Row {
        name: "stem 3x3 s2 fwd (im2col + cuBLAS)".into(),
        ms: 1e3 * time(&g, || drop(g.conv2d_forward(&sg, &img, &sw, None).unwrap())),
        bytes: 4.0 * (bn * 3 * 224 * 224 + bn * 16 * 112 * 112) as f64,
    });
    drop((x, gy, img));

    // LAMB + EMA over ghostnetv3_100's train-form parameter count in ~1,900 tensors.
    let mut shapes = Vec::new();
    let mut total = 0;
    let mut i = 0;
    while total < 8_129_028 {
        let len = [64usize, 9 * 72, 72 * 24, 960 * 160, 1280 * 960][i % 5];
        shapes.push((format!("t{i}.weight"), vec![len.min(8_129_028 - total)]));
        total += len.min(8_129_028 - total);
        i += 1;
    }
    let shapes: Vec<(String, Vec<usize>)> = shapes
        .into_iter()
        .map(|(n, s)| {
            if s[0] % 9 == 0 {
                (n, vec![s[0] / 9, 1, 3, 3])
            } else {
                (n.replace("weight", "bias"), s)
            }
        })
        .collect();
    let layout = Layout::from_shapes(&shapes);
    let np = layout.numel();
    // The optimizer interface users run (optim::Lamb on device tensors of the process GPU).
    let gg = ghostv3::backend::cuda::global().unwrap();
    let dev = |rng: &mut StdRng, lo: f32, hi: f32| {
        let v: Vec<f32> = (0..np).map(|_| rng.random_range(lo..hi)).collect();
        ghostv3::Tensor::new(&[np], v)
            .to_device(ghostv3::tensor::Device::Cuda)
            .unwrap()
    };
    let mut p = dev(&mut rng, -0.5, 0.5);
    let gr = dev(&mut rng, -0.01, 0.01);
    let e0 = dev(&mut rng, -0.5, 0.5);
    let none = ghostv3::Tensor::new(&[0], vec![]);
    let ema_cfg = ghostv3::optim::EmaConfig {
        decay: 0.9999,
        ..Default::default()
    };
    let mut e = ghostv3::optim::Ema::new(ema_cfg, &e0, &none).unwrap();
    let mut lamb = ghostv3::optim::Lamb::new(layout.clone(), LambOptions::default());
    let t = time(gg, || {
        use ghostv3::optim::Optimizer;
        lamb.step(&mut p, &gr, 1e-3, Some((&mut e, &none))).unwrap()
    });
    rows.push(Row {
        name: format!("LAMB+EMA step, {np} params, {} tensors", layout.len()),
        ms: 1e3 * t,
        bytes: 4.0 * np as f64 * 9.0,
    });

    drop((p, gr, e, lamb));

    // The whole training step (tape on device tensors, fused rep_conv, LAMB + EMA) of
    // ghostnetv3_100's train form at 224x224, batch GHOSTV3_BENCH_BATCH (default 256).
    let batch: usize = std::env::var("GHOSTV3_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    // The same step on the deploy (folded) form: what the fused rep_conv should come close to.
    let (train_line, train_s) = train_step_bench(batch, false, &mut rng);
    let (deploy_line, deploy_s) = train_step_bench(batch, true, &mut rng);

    println!(
        "\n{:<46} {:>10} {:>10} {:>8}",
        "kernel", "ms", "GB/s", "% copy"
    );
    for r in &rows {
        let (bw, pct) = if r.bytes > 0.0 {
            let bw = r.bytes / (r.ms * 1e-3) / 1e9;
            (
                format!("{bw:.0}"),
                format!("{:.0}%", 100.0 * bw * 1e9 / copy_bw),
            )
        } else {
            ("-".into(), "-".into())
        };
        println!("{:<46} {:>10.3} {:>10} {:>8}", r.name, r.ms, bw, pct);
    }
    println!(
        "fused rep_dw fwd vs unfused: {:.2}x faster",
        rows.iter()
            .find(|r| r.name.starts_with("rep_dw unfused"))
            .unwrap()
            .ms
            / (t_fused_f * 1e3)
    );
    println!("pool: {:?}", g.pool_stats());
    println!("{train_line}");
    println!("{deploy_line}");
    println!(
        "train form step / deploy form step: {:.2}x the time (MACs: 404.1M / 167.0M = 2.42x)",
        train_s / deploy_s
    );
}

/// Images/s of the training step users run (`train::step::step`: forward, CE with label
/// smoothing, backward, LAMB + EMA on the device) on ghostnetv3_100 (train or deploy form,
/// 1000 classes, 224x224), and the seconds per step.
fn train_step_bench(batch: usize, deploy: bool, rng: &mut StdRng) -> (String, f64) {
    use ghostv3::backend::cuda::global;
    use ghostv3::models::{self, ModelOptions};
    use ghostv3::optim::{Ema, EmaConfig, OptimizerConfig, OptimizerKind, Update};
    use ghostv3::tensor::Device;
    use ghostv3::train::step;
    use ghostv3::Tensor;
    let gg = global().unwrap();
    let opts = ModelOptions {
        drop_rate: 0.0,
        deploy,
        ..Default::default()
    };
    let mut model = models::create("ghostnetv3_100", &opts).unwrap();
    let st = model.state();
    let ema_cfg = EmaConfig {
        decay: 0.9999,
        ..Default::default()
    };
    let layout = Layout::from_store(&st.params);
    model.state_mut().place_on(Device::Cuda).unwrap();
    let st = model.state();
    let ema = Ema::new(ema_cfg, st.params.tensor(), st.buffers.tensor()).unwrap();
    let cfg = OptimizerConfig::new(OptimizerKind::Lamb);
    let mut update = Update::new(&cfg, &layout, Some(ema)).unwrap();
    let n = batch * 3 * 224 * 224;
    let x = Tensor::new(
        &[batch, 3, 224, 224],
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect(),
    );
    let labels: Vec<usize> = (0..batch).map(|_| rng.random_range(0..1000)).collect();
    let mut step = || {
        let targets = step::Targets::Labels {
            labels: &labels,
            smoothing: 0.1,
        };
        let loss = step::Loss::ce(targets);
        step::step(&mut model, &mut update, &x, loss, false, None, 1e-3)
            .unwrap()
            .loss
    };
    for _ in 0..2 {
        step();
    }
    gg.synchronize().unwrap();
    let reps = 5;
    let t = Instant::now();
    let mut loss = 0.0;
    for _ in 0..reps {
        loss = step();
    }
    gg.synchronize().unwrap();
    let dt = t.elapsed().as_secs_f64() / reps as f64;
    let form = if deploy { "deploy" } else { "train" };
    let line = format!(
        "ghostv3 CUDA train step ghostnetv3_100 {form} form, batch {batch}, 224x224: {:.1} images/s, {:.1} ms/step (loss {loss:.3})",
        batch as f64 / dt,
        dt * 1e3
    );
    (line, dt)
}

/// Branch `b` of the stacked kxk weights as its own buffer (setup of the unfused baseline).
fn branch(g: &Gpu, wk: &DBuf, b: usize, len: usize) -> DBuf {
    let all = g.download(wk).unwrap();
    g.upload(&all[b * len..(b + 1) * len]).unwrap()
}
