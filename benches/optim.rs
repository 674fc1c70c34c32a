//! Optimizer step over flat buffers the size of ghostnetv3_100's train form: 8,129,028 parameters
//! in 978 tensors (the size histogram below is the real model's) plus 118,304 BN buffer scalars.
//!
//! * `baseline_sgd_pass`: a plain `p -= lr * g` over the same buffers, chunk-parallel with rayon
//!   like the optimizers: the floor that any one-pass update is measured against.
//! * `lamb`: one LAMB step (global grad-norm clip, moments, per-tensor trust ratios).
//! * `ema`: one EMA update of all weights and buffers.
//! * `lamb_ema`: LAMB step with the EMA update in it, what the trainer does per step.
//!
//! All on host tensors through `optim::Optimizer::step` (the CPU loops of
//! `backend::cpu::optim`).
//!
//! After the group a line `ratio lamb/baseline: ..` gives each time over the baseline's, both
//! taken from the iterations criterion timed in this same run. Run with
//! `cargo bench --bench optim`.

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use ghostv3::optim::{Ema, EmaConfig, Lamb, LambOptions, Layout, Optimizer};
use ghostv3::Tensor;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use std::cell::RefCell;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// (ndim, numel, count) of ghostnetv3_100's train-form parameters (timm names, 1000 classes).
const SIZES: &[(usize, usize, usize)] = &[
    (1, 8, 32),
    (1, 12, 32),
    (1, 16, 4),
    (1, 20, 33),
    (1, 24, 20),
    (1, 32, 1),
    (1, 36, 32),
    (1, 40, 68),
    (1, 48, 8),
    (1, 56, 32),
    (1, 60, 16),
    (1, 72, 21),
    (1, 80, 84),
    (1, 92, 32),
    (1, 100, 16),
    (1, 112, 4),
    (1, 120, 24),
    (1, 160, 2),
    (1, 168, 2),
    (1, 184, 12),
    (1, 200, 6),
    (1, 240, 32),
    (1, 336, 32),
    (1, 480, 71),
    (1, 672, 22),
    (1, 960, 28),
    (1, 1000, 1),
    (1, 1280, 1),
    (2, 1280000, 1),
    (4, 8, 2),
    (4, 12, 2),
    (4, 20, 2),
    (4, 24, 1),
    (4, 36, 2),
    (4, 40, 4),
    (4, 48, 1),
    (4, 56, 2),
    (4, 60, 1),
    (4, 72, 7),
    (4, 80, 5),
    (4, 92, 2),
    (4, 100, 1),
    (4, 108, 6),
    (4, 120, 1),
    (4, 128, 6),
    (4, 144, 1),
    (4, 180, 6),
    (4, 216, 3),
    (4, 240, 2),
    (4, 324, 6),
    (4, 336, 2),
    (4, 360, 17),
    (4, 384, 4),
    (4, 432, 4),
    (4, 480, 4),
    (4, 504, 6),
    (4, 540, 3),
    (4, 576, 3),
    (4, 600, 3),
    (4, 672, 1),
    (4, 720, 16),
    (4, 828, 6),
    (4, 864, 9),
    (4, 900, 3),
    (4, 920, 4),
    (4, 960, 1),
    (4, 1000, 2),
    (4, 1080, 3),
    (4, 1200, 2),
    (4, 1440, 5),
    (4, 1728, 2),
    (4, 1800, 3),
    (4, 2160, 6),
    (4, 2400, 8),
    (4, 2800, 1),
    (4, 3024, 6),
    (4, 3200, 1),
    (4, 3360, 4),
    (4, 3840, 2),
    (4, 4320, 12),
    (4, 4800, 12),
    (4, 7360, 12),
    (4, 8000, 6),
    (4, 8960, 1),
    (4, 9600, 4),
    (4, 14720, 2),
    (4, 16000, 1),
    (4, 16800, 3),
    (4, 17920, 1),
    (4, 19200, 3),
    (4, 26880, 3),
    (4, 37632, 9),
    (4, 38400, 1),
    (4, 53760, 3),
    (4, 57600, 2),
    (4, 75264, 2),
    (4, 76800, 24),
    (4, 112896, 4),
    (4, 153600, 5),
    (4, 230400, 4),
    (4, 1228800, 1),
];
const PARAMS: usize = 8_129_028;
const TENSORS: usize = 978;
const BUFFERS: usize = 118_304;

/// The histogram's tensors in a fixed shuffled order (the model interleaves sizes).
fn fake_layout() -> Layout {
    let mut shapes: Vec<(String, Vec<usize>)> = Vec::new();
    for &(ndim, n, count) in SIZES {
        for _ in 0..count {
            let (name, shape) = match ndim {
                1 => ("bn.weight", vec![n]),
                2 => ("classifier.weight", vec![1000, n / 1000]),
                _ => ("conv.weight", vec![n, 1, 1, 1]),
            };
            shapes.push((format!("t{}.{name}", shapes.len()), shape));
        }
    }
    shapes.shuffle(&mut StdRng::seed_from_u64(0));
    let layout = Layout::from_shapes(&shapes);
    assert_eq!((layout.numel(), layout.len()), (PARAMS, TENSORS));
    layout
}

/// A 1-D host tensor of uniform values in (-scale, scale).
fn random(n: usize, scale: f32, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    Tensor::new(
        &[n],
        (0..n).map(|_| rng.random_range(-scale..scale)).collect(),
    )
}

/// True for a real `cargo bench` run; false for `cargo test --benches` and `--list`.
fn bench_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    let has = |a: &str| args.iter().any(|x| x == a);
    has("--bench") && !has("--test") && !has("--list")
}

/// Times `f` for criterion's `iters` and keeps the time per iteration of every call.
fn timed(iters: u64, per_iter: &RefCell<Vec<f64>>, mut f: impl FnMut()) -> Duration {
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    let d = t.elapsed();
    per_iter.borrow_mut().push(d.as_secs_f64() / iters as f64);
    d
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn optim_step(c: &mut Criterion) {
    let layout = fake_layout();
    let mut params = random(PARAMS, 0.1, 1);
    let grads = random(PARAMS, 1e-3, 2);
    let buffers = random(BUFFERS, 1.0, 3);
    let lr = 1e-4;
    let ema_cfg = EmaConfig::default();
    let opts = LambOptions {
        weight_decay: 0.05,
        ..Default::default()
    };

    let mut g = c.benchmark_group("optim_ghostnetv3_100");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(PARAMS as u64));
    let mut times: Vec<(&str, Option<f64>)> = Vec::new();

    let per_iter = RefCell::new(Vec::new());
    g.bench_function("baseline_sgd_pass", |b| {
        b.iter_custom(|iters| {
            timed(iters, &per_iter, || {
                let neg_lr = -lr as f32;
                params
                    .data_mut()
                    .par_chunks_mut(16 * 1024)
                    .zip(grads.data().par_chunks(16 * 1024))
                    .for_each(|(p, g)| {
                        for (p, &g) in p.iter_mut().zip(g) {
                            *p += neg_lr * g;
                        }
                    });
                black_box(&params);
            })
        })
    });
    times.push(("baseline", median(&per_iter.into_inner())));

    let mut lamb = Lamb::new(layout.clone(), opts.clone());
    let per_iter = RefCell::new(Vec::new());
    g.bench_function("lamb", |b| {
        b.iter_custom(|iters| {
            timed(iters, &per_iter, || {
                lamb.step(black_box(&mut params), black_box(&grads), lr, None)
                    .unwrap()
            })
        })
    });
    times.push(("lamb", median(&per_iter.into_inner())));

    let mut ema = Ema::new(ema_cfg.clone(), &params, &buffers).unwrap();
    let per_iter = RefCell::new(Vec::new());
    g.bench_function("ema", |b| {
        b.iter_custom(|iters| {
            timed(iters, &per_iter, || {
                ema.update(black_box(&params), black_box(&buffers))
            })
        })
    });
    times.push(("ema", median(&per_iter.into_inner())));

    let mut lamb = Lamb::new(layout, opts);
    let mut ema = Ema::new(ema_cfg, &params, &buffers).unwrap();
    let per_iter = RefCell::new(Vec::new());
    g.bench_function("lamb_ema", |b| {
        b.iter_custom(|iters| {
            timed(iters, &per_iter, || {
                let ema = Some((&mut ema, &buffers));
                lamb.step(black_box(&mut params), black_box(&grads), lr, ema)
                    .unwrap();
            })
        })
    });
    times.push(("lamb_ema", median(&per_iter.into_inner())));
    g.finish();

    if let (true, Some(base)) = (bench_mode(), times[0].1) {
        for (name, t) in &times[1..] {
            if let Some(t) = t {
                println!(
                    "ratio {name}/baseline: {:.2} ({name} {:.2} ms, baseline {:.2} ms per step; median per-iteration time over criterion's timed calls, {} threads)",
                    t / base,
                    t * 1e3,
                    base * 1e3,
                    rayon::current_num_threads()
                );
            }
        }
    }
}

fn config() -> Criterion {
    Criterion::default().without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = optim_step
}
criterion_main!(benches);
