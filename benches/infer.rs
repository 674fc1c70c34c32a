//! The fast inference path (`ghostv3::infer`) against the tape-based `predict` (the baseline), on
//! the folded ghostnetv3_100 at 224x224, batch 1 and 8, in the same run; plus the 1x1 and
//! depth-wise kernels alone on shapes from the network.
//!
//! After each network group a line `speed-up fast/tape batch N: x.x` gives the tape time over the
//! fast-path time (medians of criterion's timed calls in this run). Run with
//! `cargo bench --bench infer`; threads are rayon's default (all cores).

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use ghostv3::infer::graph::{ConvSpec, Graph, Op};
use ghostv3::infer::{self, Act, Engine};
use ghostv3::models::ghostnet::{GhostNet, GhostNetConfig};
use ghostv3::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cell::RefCell;
use std::hint::black_box;
use std::time::{Duration, Instant};

fn input(n: usize, size: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(42);
    (0..n * 3 * size * size)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect()
}

fn bench_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    let has = |a: &str| args.iter().any(|x| x == a);
    has("--bench") && !has("--test") && !has("--list")
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn network(c: &mut Criterion, n: usize) {
    let size = 224;
    let mut cfg = GhostNetConfig::new(1.0, 1000);
    cfg.deploy = true;
    let mut net = GhostNet::new(cfg, 0).expect("ghostnetv3_100");
    let engine = infer::ghostnet_engine(&net, "ghostnetv3_100").expect("lower");
    let x = input(n, size);
    let xt = Tensor::new(&[n, 3, size, size], x.clone());
    let mut g = c.benchmark_group(format!("ghostnetv3_100_b{n}"));
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(n as u64));
    let (fast, tape) = (RefCell::new(Vec::new()), RefCell::new(Vec::new()));
    g.bench_function("fast_path", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                black_box(engine.run(black_box(&x), n, size, size).unwrap());
            }
            let d = t.elapsed();
            fast.borrow_mut().push(d.as_secs_f64() / iters as f64);
            d
        })
    });
    g.bench_function("tape_predict", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                black_box(net.predict(black_box(&xt)));
            }
            let d = t.elapsed();
            tape.borrow_mut().push(d.as_secs_f64() / iters as f64);
            d
        })
    });
    g.finish();
    if let (true, Some(f), Some(t)) = (
        bench_mode(),
        median(&fast.into_inner()),
        median(&tape.into_inner()),
    ) {
        println!(
            "speed-up fast/tape batch {n}: {:.1} (fast path {:.2} ms, tape {:.2} ms per batch)",
            t / f,
            f * 1e3,
            t * 1e3
        );
    }
}

fn network_b1(c: &mut Criterion) {
    network(c, 1);
}

fn network_b8(c: &mut Criterion) {
    network(c, 8);
}

/// One conv node as an engine (batch 1).
fn one_conv(cin: usize, cout: usize, k: (usize, usize), stride: usize, groups: usize) -> Engine {
    let mut rng = StdRng::seed_from_u64(1);
    let n = cout * (cin / groups) * k.0 * k.1;
    let mut g = Graph::new("conv", cin);
    g.push(
        "conv",
        Op::Conv(ConvSpec {
            cin,
            cout,
            kh: k.0,
            kw: k.1,
            stride,
            pad: (k.0 / 2, k.1 / 2),
            groups,
            weight: (0..n).map(|_| rng.random_range(-0.1..0.1)).collect(),
            bias: vec![0.1; cout],
            act: Act::Relu,
        }),
        &[0],
    );
    Engine::new(g)
}

fn kernels(c: &mut Criterion) {
    let mut g = c.benchmark_group("kernels_b1");
    g.sample_size(20).measurement_time(Duration::from_secs(2));
    // (name, cin, cout, kernel, stride, groups, size)
    let cases = [
        ("pw_24x56x56_to_36", 24, 36, (1, 1), 1, 1, 56),
        ("pw_672x14x14_to_56", 672, 56, (1, 1), 1, 1, 14),
        ("pw_160x7x7_to_960", 160, 960, (1, 1), 1, 1, 7),
        ("dw3x3_24x112x112", 24, 24, (3, 3), 1, 24, 112),
        ("dw3x3s2_48x112x112", 48, 48, (3, 3), 2, 48, 112),
        ("dw5x5s2_672x14x14", 672, 672, (5, 5), 2, 672, 14),
        ("dw5x1_672x7x7", 672, 672, (5, 1), 1, 672, 7),
        ("stem_3x224x224_to_16", 3, 16, (3, 3), 2, 1, 224),
    ];
    for (name, cin, cout, k, s, groups, size) in cases {
        let e = one_conv(cin, cout, k, s, groups);
        let mut rng = StdRng::seed_from_u64(2);
        let x: Vec<f32> = (0..cin * size * size)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        g.bench_function(name, |b| {
            b.iter(|| black_box(e.run(black_box(&x), 1, size, size).unwrap()))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().without_plots();
    targets = network_b1, network_b8, kernels
}
criterion_main!(benches);
