//! A run's learning curves: `metrics.jsonl` read back, and `curves.png` (validation top-1 of the
//! model and its EMA, training loss, per epoch) drawn from it after every epoch.

use super::EpochMetrics;
use crate::plot::{self, Panel, Series};
use anyhow::{Context, Result};
use std::path::Path;

pub const METRICS: &str = "metrics.jsonl";
pub const CURVES: &str = "curves.png";

/// The epochs a run has logged (empty when it has none yet). A torn last line (a process killed
/// while appending) is ignored; any other bad line is an error naming it.
pub fn read_metrics(run_dir: &Path) -> Result<Vec<EpochMetrics>> {
    let path = run_dir.join(METRICS);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<EpochMetrics>(line) {
            Ok(m) => out.push(m),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(e) => {
                return Err(e).with_context(|| format!("{} line {}", path.display(), i + 1));
            }
        }
    }
    Ok(out)
}

/// The best validation top-1 of a run: over its epochs, of the model or its EMA.
pub fn best_top1(ms: &[EpochMetrics]) -> Option<f64> {
    ms.iter()
        .map(|m| m.top1.max(m.ema_top1.unwrap_or(0.0)))
        .reduce(f64::max)
}

fn line(label: &str, pts: impl Iterator<Item = (f64, f64)>, secondary: bool) -> Series {
    let (x, y) = pts.unzip();
    Series {
        label: label.to_string(),
        x,
        y,
        band: None,
        secondary,
    }
}

/// The two panels (top-1 in %, training loss) for runs given as (label, epochs).
pub fn run_panels(runs: &[(String, Vec<EpochMetrics>)]) -> Vec<Panel> {
    let mut acc = Vec::new();
    let mut loss = Vec::new();
    for (label, ms) in runs {
        let ep = |m: &EpochMetrics| m.epoch as f64;
        acc.push(line(
            label,
            ms.iter().map(|m| (ep(m), 100.0 * m.top1)),
            false,
        ));
        if ms.iter().any(|m| m.ema_top1.is_some()) {
            let ema = ms
                .iter()
                .filter_map(|m| m.ema_top1.map(|e| (ep(m), 100.0 * e)));
            acc.push(line(&format!("{label} EMA"), ema, true));
        }
        loss.push(line(label, ms.iter().map(|m| (ep(m), m.train_loss)), false));
    }
    vec![
        Panel {
            title: "validation top-1".into(),
            x_label: "epoch".into(),
            y_label: "top-1 (%)".into(),
            series: acc,
        },
        Panel {
            title: "training loss".into(),
            x_label: "epoch".into(),
            y_label: "loss".into(),
            series: loss,
        },
    ]
}

/// Draws `curves.png` in a run directory from its `metrics.jsonl`.
pub fn write_run_curves(run_dir: &Path) -> Result<()> {
    let ms = read_metrics(run_dir)?;
    let label = run_dir
        .file_name()
        .map_or("run".to_string(), |s| s.to_string_lossy().into_owned());
    plot::panels(&run_dir.join(CURVES), &run_panels(&[(label, ms)]))
}
