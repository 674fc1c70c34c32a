//! A study's results, from its runs' `metrics.jsonl`: per variant the mean ± std over seeds of
//! the best top-1/top-5 of the model and of its EMA, the paired difference to the baseline
//! variant across seeds, deploy-form params and MACs, training time; `results.md` (the paper's
//! table layout, one row per variant), `results.csv`, and the plots.

use super::spec::{PlannedRun, StudyFile};
use crate::models;
use crate::plot::{self, Bar, Panel, Series};
use crate::train::{curves, model_options, EpochMetrics};
use anyhow::Result;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// One run's figures (over the epochs it has logged).
#[derive(Clone, Debug)]
pub struct RunFigures {
    pub seed: u64,
    pub epochs: Vec<EpochMetrics>,
    pub planned_epochs: usize,
    pub done: bool,
}

fn max_of(v: impl Iterator<Item = f64>) -> Option<f64> {
    v.fold(None, |m, x| Some(m.map_or(x, |m: f64| m.max(x))))
}

impl RunFigures {
    pub fn best_top1(&self) -> Option<f64> {
        max_of(self.epochs.iter().map(|m| m.top1))
    }
    pub fn best_top5(&self) -> Option<f64> {
        max_of(self.epochs.iter().map(|m| m.top5))
    }
    pub fn best_ema_top1(&self) -> Option<f64> {
        max_of(self.epochs.iter().filter_map(|m| m.ema_top1))
    }
    pub fn best_ema_top5(&self) -> Option<f64> {
        max_of(self.epochs.iter().filter_map(|m| m.ema_top5))
    }
    pub fn train_seconds(&self) -> f64 {
        self.epochs.iter().map(|m| m.epoch_seconds).sum()
    }
}

/// Mean and sample standard deviation (n - 1; 0 for one value).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MeanStd {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

pub fn mean_std(v: &[f64]) -> Option<MeanStd> {
    let n = v.len();
    if n == 0 {
        return None;
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    let var = if n > 1 {
        v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    Some(MeanStd {
        mean,
        std: var.sqrt(),
        n,
    })
}

/// The paired comparison of a variant with the baseline over the seeds both have: the mean and
/// std of the per-seed differences, and on how many seeds the variant is ahead.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Paired {
    pub diff: MeanStd,
    pub ahead: usize,
}

pub fn paired(variant: &BTreeMap<u64, f64>, base: &BTreeMap<u64, f64>) -> Option<Paired> {
    let d: Vec<f64> = variant
        .iter()
        .filter_map(|(s, v)| base.get(s).map(|b| v - b))
        .collect();
    let ahead = d.iter().filter(|x| **x > 0.0).count();
    mean_std(&d).map(|diff| Paired { diff, ahead })
}

/// One row of the table.
#[derive(Clone, Debug)]
pub struct VariantRow {
    pub name: String,
    pub label: String,
    pub paper: Option<f64>,
    pub runs: Vec<RunFigures>,
    pub top1: Option<MeanStd>,
    pub top5: Option<MeanStd>,
    pub ema_top1: Option<MeanStd>,
    pub ema_top5: Option<MeanStd>,
    pub d_top1: Option<Paired>,
    pub d_ema_top1: Option<Paired>,
    pub deploy_params: u64,
    pub deploy_macs: u64,
    pub eval_size: usize,
    pub train_seconds: Option<MeanStd>,
}

/// Per seed, a figure of the runs that have one (in %).
fn per_seed(runs: &[RunFigures], f: impl Fn(&RunFigures) -> Option<f64>) -> BTreeMap<u64, f64> {
    runs.iter()
        .filter_map(|r| f(r).map(|v| (r.seed, 100.0 * v)))
        .collect()
}

fn stats(m: &BTreeMap<u64, f64>) -> Option<MeanStd> {
    mean_std(&m.values().copied().collect::<Vec<_>>())
}

pub struct Results {
    pub name: String,
    pub description: String,
    pub baseline: usize,
    pub rows: Vec<VariantRow>,
}

/// Reads every planned run's figures and aggregates them.
pub fn collect(dir: &Path, file: &StudyFile, plan: &[PlannedRun]) -> Result<Results> {
    let mut rows = Vec::new();
    for (vi, v) in file.variants.iter().enumerate() {
        let mine: Vec<&PlannedRun> = plan.iter().filter(|r| r.variant == vi).collect();
        let mut runs = Vec::new();
        for r in &mine {
            let run_dir = dir.join(&r.rel_dir);
            let epochs = curves::read_metrics(&run_dir)?;
            runs.push(RunFigures {
                seed: r.seed,
                done: super::is_done(&run_dir, &r.cfg),
                planned_epochs: r.cfg.train.epochs,
                epochs,
            });
        }
        let cfg = &mine[0].cfg;
        // The deploy form's size is the same for every seed: count it once.
        let mut m = models::create(&cfg.model.name, &model_options(cfg, num_classes(cfg), true))?;
        let (deploy_params, deploy_macs) = m.params_and_macs(cfg.eval.size);
        let secs: Vec<f64> = runs
            .iter()
            .filter(|r| r.done)
            .map(|r| r.train_seconds())
            .collect();
        rows.push(VariantRow {
            name: v.name.clone(),
            label: v.label().to_string(),
            paper: v.paper,
            top1: stats(&per_seed(&runs, RunFigures::best_top1)),
            top5: stats(&per_seed(&runs, RunFigures::best_top5)),
            ema_top1: stats(&per_seed(&runs, RunFigures::best_ema_top1)),
            ema_top5: stats(&per_seed(&runs, RunFigures::best_ema_top5)),
            d_top1: None,
            d_ema_top1: None,
            deploy_params,
            deploy_macs,
            eval_size: cfg.eval.size,
            train_seconds: mean_std(&secs),
            runs,
        });
    }
    let baseline = file.baseline();
    let base1 = per_seed(&rows[baseline].runs, RunFigures::best_top1);
    let base_e = per_seed(&rows[baseline].runs, RunFigures::best_ema_top1);
    for (i, row) in rows.iter_mut().enumerate() {
        if i != baseline {
            row.d_top1 = paired(&per_seed(&row.runs, RunFigures::best_top1), &base1);
            row.d_ema_top1 = paired(&per_seed(&row.runs, RunFigures::best_ema_top1), &base_e);
        }
    }
    Ok(Results {
        name: file.study.name.clone(),
        description: file.study.description.clone(),
        baseline,
        rows,
    })
}

/// The class count a recipe's data has, without opening it (for counting the deploy form):
/// the synthetic set has 10; an image folder's head size barely moves the MACs, so 10 as well
/// unless the dataset can be listed cheaply.
fn num_classes(cfg: &crate::train::config::TrainConfig) -> usize {
    use crate::train::config::DatasetKind;
    match (&cfg.data.kind, &cfg.data.root) {
        (DatasetKind::Imagefolder, Some(root)) => {
            std::fs::read_dir(root.join(&cfg.data.train_split))
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .filter(|e| e.path().is_dir())
                        .count()
                })
                .ok()
                .filter(|&n| n > 0)
                .unwrap_or(10)
        }
        _ => 10,
    }
}

fn fmt_ms(m: Option<MeanStd>) -> String {
    match m {
        Some(m) if m.n > 1 => format!("{:.2} ± {:.2}", m.mean, m.std),
        Some(m) => format!("{:.2}", m.mean),
        None => "–".to_string(),
    }
}

fn fmt_paired(p: Option<Paired>) -> String {
    match p {
        Some(p) if p.diff.n > 1 => format!(
            "{:+.2} ± {:.2} ({}/{} ahead)",
            p.diff.mean, p.diff.std, p.ahead, p.diff.n
        ),
        Some(p) => format!("{:+.2} ({}/{} ahead)", p.diff.mean, p.ahead, p.diff.n),
        None => "–".to_string(),
    }
}

fn minutes(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.0} s")
    } else {
        format!("{:.1} min", secs / 60.0)
    }
}

fn millions(n: u64) -> String {
    format!("{:.2}M", n as f64 / 1e6)
}

impl Results {
    fn runs_done(&self) -> (usize, usize) {
        let all = self.rows.iter().flat_map(|r| &r.runs);
        let total = all.clone().count();
        (all.filter(|r| r.done).count(), total)
    }

    /// `results.md`: one row per variant, the baseline marked.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let (done, total) = self.runs_done();
        let _ = writeln!(s, "# Study `{}`\n", self.name);
        if !self.description.is_empty() {
            let _ = writeln!(s, "{}\n", self.description.trim());
        }
        if done < total {
            let _ = writeln!(
                s,
                "**Partial: {done} of {total} runs finished.** Rows average the epochs logged so far.\n"
            );
        }
        let _ = writeln!(
            s,
            "Best validation top-1/top-5 (%) over the epochs of each run, mean ± std over seeds \
             (sample std). Δ: the paired difference to the baseline (**{}**) over the seeds \
             both have, mean ± std of the per-seed differences, and on how many seeds the \
             variant is ahead. Params and MACs: the deploy (folded) form at the eval size. \
             Time: training + evaluation per run.\n",
            self.rows[self.baseline].label
        );
        let _ = writeln!(
            s,
            "| variant | top-1 | top-5 | EMA top-1 | EMA top-5 | Δ top-1 | Δ EMA top-1 | params | MACs | time/run | seeds | paper (ImageNet) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for (i, r) in self.rows.iter().enumerate() {
            let name = if i == self.baseline {
                format!("**{}** (base)", r.label)
            } else {
                r.label.clone()
            };
            let finished = r.runs.iter().filter(|x| x.done).count();
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} @{} | {} | {}/{} | {} |",
                fmt_ms(r.top1),
                fmt_ms(r.top5),
                fmt_ms(r.ema_top1),
                fmt_ms(r.ema_top5),
                if i == self.baseline {
                    "0".into()
                } else {
                    fmt_paired(r.d_top1)
                },
                if i == self.baseline {
                    "0".into()
                } else {
                    fmt_paired(r.d_ema_top1)
                },
                millions(r.deploy_params),
                millions(r.deploy_macs),
                r.eval_size,
                r.train_seconds.map_or("–".into(), |t| minutes(t.mean)),
                finished,
                r.runs.len(),
                r.paper.map_or("–".into(), |p| format!("{p:.2}")),
            );
        }
        let _ = writeln!(
            s,
            "\nPlots: `curves.png` (validation top-1 of the model and of its EMA, training loss; \
             mean over seeds, band min-max), `final_top1.png` (best top-1, error bar ± std)."
        );
        s
    }

    /// `results.csv`: the same figures, one row per variant, machine-readable.
    pub fn csv(&self) -> String {
        let mut s = String::from(
            "variant,label,baseline,runs_done,runs,top1_mean,top1_std,top5_mean,top5_std,\
             ema_top1_mean,ema_top1_std,ema_top5_mean,ema_top5_std,d_top1_mean,d_top1_std,\
             d_top1_ahead,d_ema_top1_mean,d_ema_top1_std,d_ema_top1_ahead,deploy_params,\
             deploy_macs,eval_size,train_seconds_mean,paper_top1\n",
        );
        let f =
            |m: Option<MeanStd>| m.map_or(",".into(), |m| format!("{:.4},{:.4}", m.mean, m.std));
        let p = |p: Option<Paired>| {
            p.map_or(",,".into(), |p| {
                format!("{:.4},{:.4},{}", p.diff.mean, p.diff.std, p.ahead)
            })
        };
        for (i, r) in self.rows.iter().enumerate() {
            let quoted = r.label.replace('"', "\"\"");
            let _ = writeln!(
                s,
                "{},\"{quoted}\",{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                r.name,
                i == self.baseline,
                r.runs.iter().filter(|x| x.done).count(),
                r.runs.len(),
                f(r.top1),
                f(r.top5),
                f(r.ema_top1),
                f(r.ema_top5),
                p(r.d_top1),
                p(r.d_ema_top1),
                r.deploy_params,
                r.deploy_macs,
                r.eval_size,
                r.train_seconds
                    .map_or(String::new(), |t| format!("{:.1}", t.mean)),
                r.paper.map_or(String::new(), |p| p.to_string()),
            );
        }
        s
    }

    /// Per variant, the mean and min-max band over seeds of a per-epoch figure, over the
    /// epochs every seed with data has reached.
    fn band(&self, f: impl Fn(&EpochMetrics) -> Option<f64>) -> Vec<Series> {
        let mut out = Vec::new();
        for r in &self.rows {
            let curves: Vec<Vec<f64>> = r
                .runs
                .iter()
                .map(|x| x.epochs.iter().map_while(&f).collect::<Vec<f64>>())
                .filter(|c| !c.is_empty())
                .collect();
            let Some(len) = curves.iter().map(Vec::len).min() else {
                continue;
            };
            let at = |e: usize| curves.iter().map(move |c| c[e]);
            let n = curves.len() as f64;
            out.push(Series {
                label: format!("{} (n={})", r.label, curves.len()),
                x: (1..=len).map(|e| e as f64).collect(),
                y: (0..len).map(|e| at(e).sum::<f64>() / n).collect(),
                band: Some((
                    (0..len)
                        .map(|e| at(e).fold(f64::INFINITY, f64::min))
                        .collect(),
                    (0..len)
                        .map(|e| at(e).fold(f64::NEG_INFINITY, f64::max))
                        .collect(),
                )),
                secondary: false,
            });
        }
        out
    }

    /// `curves.png` and `final_top1.png` in `dir`.
    pub fn plots(&self, dir: &Path) -> Result<()> {
        let panel = |title: &str, y: &str, series| Panel {
            title: title.to_string(),
            x_label: "epoch".into(),
            y_label: y.to_string(),
            series,
        };
        plot::panels(
            &dir.join("curves.png"),
            &[
                panel(
                    "validation top-1",
                    "top-1 (%)",
                    self.band(|m| Some(100.0 * m.top1)),
                ),
                panel(
                    "validation top-1 (EMA)",
                    "top-1 (%)",
                    self.band(|m| m.ema_top1.map(|e| 100.0 * e)),
                ),
                panel("training loss", "loss", self.band(|m| Some(m.train_loss))),
            ],
        )?;
        let bars: Vec<Bar> = self
            .rows
            .iter()
            .filter_map(|r| {
                r.top1.map(|t| Bar {
                    label: r.label.clone(),
                    value: t.mean,
                    error: t.std,
                })
            })
            .collect();
        if !bars.is_empty() {
            plot::bars(
                &dir.join("final_top1.png"),
                &format!("{}: best top-1, mean ± std over seeds", self.name),
                "top-1 (%)",
                &bars,
            )?;
        }
        Ok(())
    }

    /// Writes results.md, results.csv and the plots into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        use crate::io::atomic::write_atomic;
        write_atomic(&dir.join("results.md"), self.markdown().as_bytes())?;
        write_atomic(&dir.join("results.csv"), self.csv().as_bytes())?;
        self.plots(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_std_and_paired_differences() {
        let m = mean_std(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!((m.mean, m.std, m.n), (2.0, 1.0, 3));
        assert_eq!(mean_std(&[5.0]).unwrap().std, 0.0);
        assert!(mean_std(&[]).is_none());
        let v: BTreeMap<u64, f64> = [(0, 71.0), (1, 70.0), (2, 74.0)].into();
        let b: BTreeMap<u64, f64> = [(0, 70.0), (1, 71.0), (3, 60.0)].into();
        // Only seeds 0 and 1 pair up: differences +1 and -1.
        let p = paired(&v, &b).unwrap();
        assert_eq!((p.diff.mean, p.diff.n, p.ahead), (0.0, 2, 1));
        assert!((p.diff.std - 2f64.sqrt()).abs() < 1e-12);
        assert!(paired(&v, &BTreeMap::new()).is_none());
    }
}
