//! Latency measurement of an engine (`ghostv3 bench`): warm-up, timed runs, median/p90, images/s,
//! memory, and an optional per-layer time breakdown.

use super::exec::{Engine, Profile};
use super::graph::Op;
use anyhow::{ensure, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

pub struct BenchConfig {
    pub batch: usize,
    pub size: usize,
    /// Untimed runs first.
    pub warmup: usize,
    /// Timed runs at least...
    pub min_runs: usize,
    /// ...and until at least this much time has passed.
    pub min_time: Duration,
}

pub struct BenchReport {
    pub times_ms: Vec<f64>,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub images_per_s: f64,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

impl BenchConfig {
    /// At least one image and one timed run (the report's median needs one).
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.batch >= 1 && self.size >= 1,
            "bench: batch and size must be at least 1"
        );
        ensure!(
            self.min_runs >= 1,
            "bench: at least one timed run is needed"
        );
        Ok(())
    }
}

/// Times `f` (one batch) after a warm-up.
pub fn time_runs(cfg: &BenchConfig, mut f: impl FnMut() -> Result<()>) -> Result<BenchReport> {
    cfg.validate()?;
    for _ in 0..cfg.warmup {
        f()?;
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < cfg.min_runs || start.elapsed() < cfg.min_time {
        let t0 = Instant::now();
        f()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        if times.len() >= 100_000 {
            break;
        }
    }
    let mut s = times.clone();
    s.sort_by(f64::total_cmp);
    let median = percentile(&s, 0.5);
    Ok(BenchReport {
        median_ms: median,
        p90_ms: percentile(&s, 0.9),
        images_per_s: cfg.batch as f64 / (median / 1e3),
        times_ms: times,
    })
}

/// A random input batch [batch, 3, size, size].
pub fn random_input(batch: usize, size: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..batch * 3 * size * size)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect()
}

pub fn bench_engine(e: &Engine, cfg: &BenchConfig) -> Result<BenchReport> {
    let x = random_input(cfg.batch, cfg.size, 0);
    time_runs(cfg, || e.run(&x, cfg.batch, cfg.size, cfg.size).map(|_| ()))
}

/// Per-node times over `runs` runs, summed per node and per op kind; a printable table.
pub fn profile_engine(e: &Engine, batch: usize, size: usize, runs: usize) -> Result<String> {
    ensure!(runs >= 1, "profile: at least one run is needed");
    let x = random_input(batch, size, 0);
    let mut p: Profile = Vec::new();
    e.run_profiled(&x, batch, size, size, &mut p)?; // warm-up
    p.iter_mut().for_each(|v| *v = 0.0);
    for _ in 0..runs {
        e.run_profiled(&x, batch, size, size, &mut p)?;
    }
    let shapes = e.graph.shapes(size, size).map_err(anyhow::Error::msg)?;
    let macs = e.graph.macs(size, size).map_err(anyhow::Error::msg)?;
    let total: f64 = p.iter().sum();
    let ms = |s: f64| s * 1e3 / runs as f64;
    let mut out = String::new();
    use std::fmt::Write;
    let profiled_batch = if batch >= 2 && rayon::current_num_threads() >= 2 {
        1
    } else {
        batch
    };
    writeln!(
        out,
        "per-layer profile: {} runs, batch {profiled_batch}{}, total {:.3} ms per run ({:.1}M MACs/image)",
        runs,
        if profiled_batch != batch {
            " (one chunk of the batch-split run, single-threaded)"
        } else {
            ""
        },
        ms(total),
        macs as f64 / 1e6
    )
    .unwrap();
    // Multiply-adds per node (per run of the profiled batch).
    let node_macs: Vec<f64> = e
        .graph
        .nodes
        .iter()
        .map(|n| {
            let (co, ho, wo) = shapes[n.output];
            profiled_batch as f64
                * match &n.op {
                    Op::Conv(c) => (co * ho * wo * (c.cin / c.groups) * c.kh * c.kw) as f64,
                    Op::Linear { cin, cout, .. } => (cin * cout) as f64,
                    _ => 0.0,
                }
        })
        .collect();
    // By op kind.
    let mut kinds: Vec<(&str, f64, usize, f64)> = Vec::new();
    for ((n, &t), &m) in e.graph.nodes.iter().zip(&p).zip(&node_macs) {
        let k = n.op.kind();
        match kinds.iter_mut().find(|x| x.0 == k) {
            Some(e) => {
                e.1 += t;
                e.2 += 1;
                e.3 += m;
            }
            None => kinds.push((k, t, 1, m)),
        }
    }
    kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    writeln!(out, "by op kind:").unwrap();
    for (k, t, c, m) in &kinds {
        let rate = if *m > 0.0 {
            format!(
                "{:>7.2}M MACs {:>6.1} GMAC/s",
                m / 1e6,
                m * runs as f64 / t / 1e9
            )
        } else {
            String::new()
        };
        writeln!(
            out,
            "  {k:<12} {:>4} nodes {:>8.3} ms {:>5.1}%  {rate}",
            c,
            ms(*t),
            100.0 * t / total
        )
        .unwrap();
    }
    // Top nodes.
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    writeln!(out, "slowest nodes:").unwrap();
    for &i in idx.iter().take(40) {
        let n = &e.graph.nodes[i];
        let (c, h, w) = shapes[n.output];
        let (ci, hi, wi) = shapes[n.inputs[0]];
        let rate = if node_macs[i] > 0.0 {
            format!("{:>6.1} GMAC/s", node_macs[i] * runs as f64 / p[i] / 1e9)
        } else {
            String::new()
        };
        writeln!(
            out,
            "  {:<30} {:<11} {:>16} -> {:<16} {:>8.3} ms {:>5.1}%  {rate}",
            n.name,
            n.op.kind(),
            format!("{ci}x{hi}x{wi}"),
            format!("{c}x{h}x{w}"),
            ms(p[i]),
            100.0 * p[i] / total
        )
        .unwrap();
    }
    Ok(out)
}

/// Peak resident memory of this process (Linux VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
