//! Loader throughput (images/s) on Imagenette-224 train (512 images spread over all classes),
//! 2 workers: decode only (baseline) vs decode + full timm train augmentation
//! (RandomResizedCrop 224, flip, rand-m9-mstd0.5, RandomErasing 0.25), and the ratio.
//! Falls back to the synthetic dataset (drawn, not decoded) when Imagenette is missing.
//!
//! Run: cargo bench --bench loader

use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use ghostv3::data::{Dataset, ImageFolder, Loader, Subset, Synthetic, TransformConfig};

const IMAGES: usize = 512;
const WORKERS: usize = 2;
const BATCH: usize = 64;

fn dataset() -> (Arc<dyn Dataset>, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/imagenette2-224/train");
    match ImageFolder::open(&root) {
        Ok(folder) => {
            let subset = Subset::evenly_spaced(Arc::new(folder), IMAGES);
            (
                Arc::new(subset),
                format!("Imagenette-224 train ({IMAGES} images)"),
            )
        }
        Err(e) => {
            eprintln!("Imagenette not available ({e:#}); falling back to the synthetic dataset");
            (
                Arc::new(Synthetic::new(IMAGES, 224, 0)),
                format!("synthetic 224x224 ({IMAGES} images, drawn not decoded)"),
            )
        }
    }
}

fn configs() -> Vec<(&'static str, TransformConfig)> {
    // Baseline: decode, ToTensor and Normalize only (the images are already 224x224, so the
    // eval resize and centre crop at crop_pct 1 do nothing).
    let baseline = TransformConfig {
        crop_pct: 1.0,
        ..TransformConfig::eval(224)
    };
    let crop_flip = TransformConfig {
        color_jitter: 0.0,
        ..TransformConfig::train(224)
    };
    let full = TransformConfig {
        auto_augment: Some("rand-m9-mstd0.5".into()),
        re_prob: 0.25,
        ..TransformConfig::train(224)
    };
    vec![
        ("decode_only", baseline),
        ("rrc_flip", crop_flip),
        ("full_train_aug", full),
    ]
}

fn run_epoch(loader: &Loader, epoch: usize) -> usize {
    loader.epoch(epoch).map(|b| b.expect("batch").len()).sum()
}

fn main() {
    let (data, name) = dataset();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8))
        .configure_from_args();
    // (name, images, seconds) over every timed epoch, for the ratio at the end.
    let totals: RefCell<Vec<(&str, usize, f64)>> = RefCell::new(Vec::new());
    {
        let mut group = c.benchmark_group("loader");
        group.throughput(Throughput::Elements(data.len() as u64));
        for (label, cfg) in configs() {
            let loader =
                Loader::new(data.clone(), cfg, BATCH, true, false, WORKERS, 0).expect("loader");
            totals.borrow_mut().push((label, 0, 0.0));
            group.bench_function(label, |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    let mut images = 0;
                    for i in 0..iters {
                        images += run_epoch(&loader, i as usize);
                    }
                    let elapsed = start.elapsed();
                    let mut t = totals.borrow_mut();
                    let last = t.last_mut().expect("entry");
                    last.1 += images;
                    last.2 += elapsed.as_secs_f64();
                    elapsed
                })
            });
        }
        group.finish();
    }
    println!("\nloader throughput on {name}, {WORKERS} workers, batch {BATCH}:");
    let totals = totals.into_inner();
    let rate = |(_, n, s): &(&str, usize, f64)| *n as f64 / s.max(1e-9);
    let base = rate(&totals[0]);
    for t in &totals {
        println!(
            "  {:<16} {:>8.1} images/s  ({:.2}x the decode-only rate)",
            t.0,
            rate(t),
            rate(t) / base
        );
    }
    c.final_summary();
}
