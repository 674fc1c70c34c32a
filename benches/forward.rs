//! ghostnetv3_100 on the CPU backend at 224x224, 1000 classes.
//!
//! * `forward_b1`, `forward_b8`: eval-mode `predict` at batch 1 and 8, in the train form
//!   (re-parameterization branches) and the deploy form (folded convs). After each group a line
//!   `ratio deploy/train batch N: 0.xx` gives the deploy-form time over the train-form time,
//!   both taken from the iterations criterion timed in this same run.
//! * `train_step_b8`: one train step of the train form at batch 8: forward in
//!   `Mode::Train { dropout: false }`, cross entropy, backward.
//!
//! Run with `cargo bench --bench forward`. Samples are few (10, flat sampling) so the whole run
//! takes minutes on a 2-core machine; criterion's throughput line is in images/s (elem/s).

use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput,
};
use ghostv3::models::{self, ModelOptions};
use ghostv3::nn::Mode;
use ghostv3::{ops, Tape, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::cell::RefCell;
use std::hint::black_box;
use std::time::{Duration, Instant};

const MODEL: &str = "ghostnetv3_100";
const CLASSES: usize = 1000;
const SIZE: usize = 224;

fn input(n: usize, seed: u64) -> Tensor<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let data = (0..n * 3 * SIZE * SIZE)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    Tensor::new(&[n, 3, SIZE, SIZE], data)
}

fn labels(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..CLASSES)).collect()
}

fn model(deploy: bool) -> ghostv3::models::Model {
    let opts = ModelOptions {
        num_classes: CLASSES,
        deploy,
        ..Default::default()
    };
    models::create(MODEL, &opts).expect("create ghostnetv3_100")
}

/// True for a real `cargo bench` run; false for `cargo test --benches` (criterion's test mode,
/// one iteration each) and `--list`, where a ratio would mean nothing.
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

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn configure(g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>, n: usize) {
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(n as u64));
}

fn forward(c: &mut Criterion, n: usize) {
    let x = input(n, 42);
    let mut g = c.benchmark_group(format!("forward_b{n}"));
    configure(&mut g, n);
    let mut times = Vec::new();
    for (form, deploy) in [("train_form", false), ("deploy_form", true)] {
        let mut m = model(deploy);
        let per_iter = RefCell::new(Vec::new());
        g.bench_function(form, |b| {
            b.iter_custom(|iters| {
                timed(iters, &per_iter, || {
                    black_box(m.predict(black_box(&x)));
                })
            })
        });
        let v = per_iter.into_inner();
        times.push((!v.is_empty()).then(|| median(&v)));
    }
    g.finish();
    if let (true, [Some(train), Some(deploy)]) = (bench_mode(), times.as_slice()) {
        println!(
            "ratio deploy/train batch {n}: {:.2} (train form {:.1} ms, deploy form {:.1} ms per batch; median per-iteration time over criterion's timed calls)",
            deploy / train,
            train * 1e3,
            deploy * 1e3
        );
    }
}

fn forward_b1(c: &mut Criterion) {
    forward(c, 1);
}

fn forward_b8(c: &mut Criterion) {
    forward(c, 8);
}

fn train_step_b8(c: &mut Criterion) {
    let n = 8;
    let x = input(n, 43);
    let y = labels(n, 44);
    let mut m = model(false);
    let mut g = c.benchmark_group(format!("train_step_b{n}"));
    configure(&mut g, n);
    g.bench_function("train_form", |b| {
        b.iter(|| {
            let mut tape = Tape::new();
            let xv = tape.constant(x.clone());
            let (logits, _leaves) = m.forward(&mut tape, xv, Mode::Train { dropout: false }, None);
            let loss = ops::cross_entropy(&mut tape, logits, &y, 0.0);
            black_box(tape.backward(loss))
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default().without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = forward_b1, forward_b8, train_step_b8
}
criterion_main!(benches);
