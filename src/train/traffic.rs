//! What one training step moves through device memory, counted (`ghostv3 bench --train
//! --device cuda --profile`): every launch's bytes and FLOPs from `backend::trace`, grouped by
//! op family and by layer, per image and per step, and the roofline step time they imply on
//! named GPUs. Counted at two small batches and fitted (every count is affine in the batch:
//! activations scale with it, weights and optimizer state do not), then checked at a third
//! batch, so the figures for batch 256 need no batch-256 run on the emulator.

use crate::backend::trace::{self, Launch, Trace};
use anyhow::{ensure, Result};
use serde::Serialize;
use std::collections::BTreeMap;

/// The op family of a launch: the grouping `scripts/count_torch_step.py` uses for PyTorch's
/// aten ops, so that the two stand in one table.
pub fn family(module: &str, kernel: &str) -> &'static str {
    match module {
        "cublas" => "conv/linear GEMM",
        "conv" if kernel.starts_with("dw_") => "conv depth-wise",
        "conv" => "conv im2col/layout",
        "rep_conv" | "rep_conv_1x1" => "rep_conv fused",
        "batch_norm" => "batch_norm",
        "dfc" => "dfc gate",
        "loss" => "loss",
        "optim" => "optimizer",
        "channel" | "driver" => "copy/cat/fill",
        "pool" if kernel.starts_with("concat") => "copy/cat/fill",
        "pool" => "pooling/upsample",
        "elementwise" => match kernel {
            k if k.starts_with("relu") || k.contains("sigmoid") => "activation",
            "copy_f32" | "fill_f32" | "copy_segments" => "copy/cat/fill",
            "ema_blend" => "optimizer",
            _ => "elementwise",
        },
        _ => "other",
    }
}

/// Per-image and per-step parts of a count: `count(batch) = per_step + batch * per_image`.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Affine {
    pub per_image: f64,
    pub per_step: f64,
}

impl Affine {
    fn fit((b1, c1): (usize, f64), (b2, c2): (usize, f64)) -> Affine {
        let per_image = (c2 - c1) / (b2 - b1) as f64;
        Affine {
            per_image,
            per_step: c1 - b1 as f64 * per_image,
        }
    }

    pub fn at(&self, batch: usize) -> f64 {
        self.per_step + batch as f64 * self.per_image
    }
}

/// One row of the table (a family, a phase, or a layer).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Row {
    pub name: String,
    /// Launches per step (they do not depend on the batch).
    pub launches: usize,
    /// Bytes read + written.
    pub bytes: Affine,
    pub flops: Affine,
}

/// The counted step.
#[derive(Clone, Debug, Serialize)]
pub struct StepTraffic {
    pub model: String,
    pub form: String,
    pub size: usize,
    /// The batches counted (the fit's two, then the check's).
    pub batches: [usize; 3],
    pub launches: usize,
    pub syncs: usize,
    pub bytes: Affine,
    pub flops: Affine,
    /// Bytes counted at each of `batches` (what the fit was made from and checked against).
    pub counted_bytes: [u64; 3],
    /// By op family, by kernel, by phase, and by layer (tape node), most bytes first.
    pub families: Vec<Row>,
    pub kernels: Vec<Row>,
    pub phases: Vec<Row>,
    pub layers: Vec<Row>,
    pub h2d_bytes: Affine,
    /// Worst relative miss of the fit at the third batch (bytes and FLOPs, per family).
    pub fit_error: f64,
    /// Every launch's bytes and FLOPs, in order (the roofline sums over them).
    #[serde(skip)]
    pub per_launch: Vec<(Affine, Affine)>,
}

/// Named GPUs: DRAM bandwidth (GB/s), fp32 and dense 16-bit tensor-core peaks (TFLOP/s), from
/// NVIDIA's data sheets (SXM parts).
pub const GPUS: &[(&str, f64, f64, f64)] = &[
    ("V100", 900.0, 15.7, 125.0),
    ("A100", 2039.0, 19.5, 312.0),
    ("H100", 3350.0, 67.0, 989.0),
    ("H200", 4800.0, 67.0, 989.0),
];

/// The shortest a kernel takes back to back on one stream, launch to launch (µs): small
/// kernels cost this however few bytes they move.
pub const LAUNCH_US: f64 = 2.0;

/// The roofline floor of one step in ms: every launch at least [`LAUNCH_US`], else its bytes
/// at the bandwidth or its FLOPs at the fp32 peak, whichever is longer.
pub fn roofline_ms(launches: &[(f64, f64)], gbps: f64, tflops: f64) -> f64 {
    launches
        .iter()
        .map(|&(bytes, flops)| {
            (bytes / (gbps * 1e3))
                .max(flops / (tflops * 1e6))
                .max(LAUNCH_US)
        })
        .sum::<f64>()
        / 1e3
}

fn group(
    traces: &[&Trace; 3],
    batches: [usize; 3],
    key: impl Fn(&Launch) -> String,
) -> (Vec<Row>, f64) {
    let mut sums: BTreeMap<String, [(usize, f64, f64); 3]> = BTreeMap::new();
    for (i, t) in traces.iter().enumerate() {
        for l in &t.launches {
            let e = sums.entry(key(l)).or_default();
            e[i].0 += 1;
            e[i].1 += (l.read + l.written) as f64;
            e[i].2 += l.flops as f64;
        }
    }
    let mut worst = 0.0f64;
    let rows = sums
        .into_iter()
        .map(|(name, s)| {
            let bytes = Affine::fit((batches[0], s[0].1), (batches[1], s[1].1));
            let flops = Affine::fit((batches[0], s[0].2), (batches[1], s[1].2));
            for (a, got) in [(bytes, s[2].1), (flops, s[2].2)] {
                if got > 0.0 {
                    worst = worst.max((a.at(batches[2]) - got).abs() / got);
                }
            }
            Row {
                name,
                launches: s[2].0,
                bytes,
                flops,
            }
        })
        .collect();
    (rows, worst)
}

/// Runs `step(batch)` (one whole training step) under the trace at each of `batches` (after
/// one untraced step, which loads kernels and uploads the optimizer's tables) and fits the
/// counts.
pub fn count_step(
    model: &str,
    form: &str,
    size: usize,
    batches: [usize; 3],
    mut step: impl FnMut(usize) -> Result<()>,
) -> Result<StepTraffic> {
    ensure!(
        batches[0] < batches[1] && batches[1] < batches[2],
        "the counted batches must increase"
    );
    step(batches[0])?;
    let mut traces = Vec::new();
    for &b in &batches {
        trace::start();
        let r = step(b);
        let t = trace::finish();
        r?;
        traces.push(t);
    }
    let tr = [&traces[0], &traces[1], &traces[2]];
    ensure!(
        tr.iter().all(|t| t.launches.len() == tr[0].launches.len()),
        "launches per step differ between batches ({}, {}, {}): the fit needs one launch sequence",
        tr[0].launches.len(),
        tr[1].launches.len(),
        tr[2].launches.len()
    );
    for (i, l) in tr[0].launches.iter().enumerate() {
        for t in &tr[1..] {
            ensure!(
                t.launches[i].kernel == l.kernel,
                "launch {i} is {} at one batch and {} at another",
                l.kernel,
                t.launches[i].kernel
            );
        }
    }
    let per_launch = (0..tr[0].launches.len())
        .map(|i| {
            let at = |k: usize, f: &dyn Fn(&Launch) -> f64| (batches[k], f(&tr[k].launches[i]));
            let bytes = |l: &Launch| (l.read + l.written) as f64;
            let flops = |l: &Launch| l.flops as f64;
            (
                Affine::fit(at(0, &bytes), at(1, &bytes)),
                Affine::fit(at(0, &flops), at(1, &flops)),
            )
        })
        .collect();
    let (families, e1) = group(&tr, batches, |l| family(l.module, l.kernel).to_string());
    let (mut kernels, _) = group(&tr, batches, |l| format!("{}::{}", l.module, l.kernel));
    kernels.sort_by(|a, b| b.bytes.per_image.total_cmp(&a.bytes.per_image));
    let (phases, e2) = group(&tr, batches, |l| l.phase.name().to_string());
    let (mut layers, e3) = group(&tr, batches, |l| match l.node {
        Some(n) => format!("#{n:04} {}", l.op),
        None => format!("{} ({})", l.op, l.phase.name()),
    });
    layers.sort_by(|a, b| b.bytes.per_image.total_cmp(&a.bytes.per_image));
    let total =
        |f: &dyn Fn(&Trace) -> f64| Affine::fit((batches[0], f(tr[0])), (batches[1], f(tr[1])));
    let bytes = total(&|t| t.launches.iter().map(|l| (l.read + l.written) as f64).sum());
    let flops = total(&|t| t.launches.iter().map(|l| l.flops as f64).sum());
    let h2d_bytes = total(&|t| t.h2d_bytes as f64);
    let counted = |t: &Trace| t.launches.iter().map(|l| l.read + l.written).sum::<u64>();
    Ok(StepTraffic {
        model: model.to_string(),
        form: form.to_string(),
        size,
        batches,
        launches: tr[2].launches.len(),
        syncs: tr[2].syncs,
        bytes,
        flops,
        counted_bytes: [counted(tr[0]), counted(tr[1]), counted(tr[2])],
        families,
        kernels,
        phases,
        layers,
        h2d_bytes,
        fit_error: e1.max(e2).max(e3),
        per_launch,
    })
}

impl StepTraffic {
    /// The text report at `batch` (e.g. 256): the family table, the phases, the top layers,
    /// the totals and the roofline floor on each named GPU.
    pub fn report(&self, batch: usize, top_layers: usize) -> String {
        let mb = |a: &Affine| a.per_image / 1e6;
        let mut s = format!(
            "{} {}, {}x{}: bytes and launches of one training step (counted at batches {:?}, fit exact to {:.1e})\n",
            self.model, self.form, self.size, self.size, self.batches, self.fit_error
        );
        let table = |title: &str, rows: &[Row]| {
            let mut t = format!(
                "{title:<26} {:>9} {:>10} {:>10} {:>9} {:>10}\n",
                "launches", "MB/image", "MB/step+", "GB@batch", "GFLOP/img"
            );
            for r in rows {
                t += &format!(
                    "{:<26} {:>9} {:>10.2} {:>10.2} {:>9.2} {:>10.3}\n",
                    r.name,
                    r.launches,
                    mb(&r.bytes),
                    r.bytes.per_step / 1e6,
                    r.bytes.at(batch) / 1e9,
                    r.flops.per_image / 1e9
                );
            }
            t
        };
        let mut fams = self.families.clone();
        fams.sort_by(|a, b| b.bytes.per_image.total_cmp(&a.bytes.per_image));
        s += &table("family", &fams);
        s += &table(
            &format!("top {top_layers} kernels"),
            &self.kernels[..top_layers.min(self.kernels.len())],
        );
        s += &table("phase", &self.phases);
        s += &table(
            &format!("top {top_layers} layers (#node op)"),
            &self.layers[..top_layers.min(self.layers.len())],
        );
        s += &format!(
            "total: {:.1} MB/image + {:.1} MB/step = {:.1} GB per step at batch {batch}; {:.2} GFLOP/image; {} launches, {} host syncs per step; uploads {:.2} MB/image\n",
            mb(&self.bytes),
            self.bytes.per_step / 1e6,
            self.bytes.at(batch) / 1e9,
            self.flops.per_image / 1e9,
            self.launches,
            self.syncs,
            self.h2d_bytes.per_image / 1e6
        );
        s += &format!("roofline floor at batch {batch} (fp32; each launch >= {LAUNCH_US} µs):\n");
        for &(gpu, bw, f32peak, _) in GPUS {
            let ms = self.roofline_ms(batch, bw, f32peak);
            s += &format!(
                "  {gpu:<5} {bw:>5.0} GB/s: {ms:>8.1} ms/step, {:>7.0} images/s\n",
                batch as f64 / ms * 1e3
            );
        }
        s
    }

    /// The roofline floor of the step at `batch`, launch by launch.
    pub fn roofline_ms(&self, batch: usize, gbps: f64, tflops: f64) -> f64 {
        let at: Vec<(f64, f64)> = self
            .per_launch
            .iter()
            .map(|(b, f)| (b.at(batch), f.at(batch)))
            .collect();
        roofline_ms(&at, gbps, tflops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affine_fit_recovers_per_image_and_per_step() {
        let a = Affine::fit((2, 2.0 * 5.0 + 7.0), (4, 4.0 * 5.0 + 7.0));
        assert_eq!(
            a,
            Affine {
                per_image: 5.0,
                per_step: 7.0
            }
        );
        assert_eq!(a.at(256), 256.0 * 5.0 + 7.0);
    }

    #[test]
    fn roofline_takes_the_slowest_of_bytes_flops_and_launch() {
        // 1 GB at 1000 GB/s = 1 ms; 1 GFLOP at 1 TFLOP/s = 1 ms; a tiny launch 2 µs.
        let ms = roofline_ms(&[(1e9, 0.0), (0.0, 1e9), (8.0, 0.0)], 1000.0, 1.0);
        assert!((ms - (1.0 + 1.0 + LAUNCH_US / 1e3)).abs() < 1e-12, "{ms}");
    }

    #[test]
    fn families_name_kernels() {
        assert_eq!(family("elementwise", "relu_bwd"), "activation");
        assert_eq!(family("cublas", "sgemm"), "conv/linear GEMM");
        assert_eq!(family("conv", "dw_fwd"), "conv depth-wise");
    }
}
