//! The training recipe as a TOML file. Every table rejects unknown keys (a typo is an error that
//! names the key), and `--set table.key=value` overrides any entry before validation.

use crate::data::TransformConfig;
use crate::optim::{EmaConfig, OptimizerConfig, ScheduleConfig};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub data: DataSection,
    /// Train-time transform (timm flags: scale, ratio, hflip, auto_augment, re_prob, ...).
    #[serde(default = "default_train_transform")]
    pub augment: TransformConfig,
    /// Eval transform (resize to size / crop_pct, centre crop).
    #[serde(default = "default_eval_transform")]
    pub eval: TransformConfig,
    #[serde(default)]
    pub mixup: MixupSection,
    pub train: TrainSection,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleConfig,
    /// EMA of weights and BN buffers; absent = no EMA.
    #[serde(default)]
    pub ema: Option<EmaConfig>,
    /// Knowledge distillation; absent = plain cross-entropy.
    #[serde(default)]
    pub kd: Option<KdSection>,
}

fn default_train_transform() -> TransformConfig {
    TransformConfig::train(224)
}

fn default_eval_transform() -> TransformConfig {
    TransformConfig::eval(224)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// timm name, e.g. ghostnetv3_100.
    pub name: String,
    /// N repeated kxk branches of each re-parameterized conv (paper Table 2; 1..=5).
    #[serde(default = "three")]
    pub rep_branches: usize,
    /// The 1x1 depth-wise scale branch.
    #[serde(default = "yes")]
    pub rep_scale: bool,
    /// The BN identity branch.
    #[serde(default = "yes")]
    pub rep_identity: bool,
    /// Dropout before the classifier (timm 0.2; official V3 0).
    #[serde(default)]
    pub drop_rate: f64,
    /// Optional initial weights (safetensors, timm names, train form).
    #[serde(default)]
    pub init: Option<PathBuf>,
}

fn three() -> usize {
    3
}

fn yes() -> bool {
    true
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    Synthetic,
    Imagefolder,
    Cifar10,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    pub kind: DatasetKind,
    /// ImageFolder: the folder holding `train_split` and `val_split`; CIFAR-10: the folder with
    /// the binary batches.
    pub root: Option<PathBuf>,
    pub train_split: String,
    pub val_split: String,
    /// Synthetic set sizes and image side.
    pub synthetic_train: usize,
    pub synthetic_val: usize,
    pub synthetic_size: usize,
    /// Use at most this many images (evenly spaced) of each split; for quick runs.
    pub max_train: Option<usize>,
    pub max_val: Option<usize>,
    pub workers: usize,
    /// Fail on an unreadable image instead of skipping it with a warning.
    pub strict: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            kind: DatasetKind::Synthetic,
            root: None,
            train_split: "train".into(),
            val_split: "val".into(),
            synthetic_train: 2000,
            synthetic_val: 500,
            synthetic_size: 64,
            max_train: None,
            max_val: None,
            workers: 2,
            strict: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MixupSection {
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
    pub prob: f64,
    pub switch_prob: f64,
}

impl Default for MixupSection {
    fn default() -> Self {
        MixupSection {
            mixup_alpha: 0.0,
            cutmix_alpha: 0.0,
            prob: 1.0,
            switch_prob: 0.5,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub epochs: usize,
    pub batch_size: usize,
    /// Base learning rate (the schedule scales it).
    pub lr: f64,
    #[serde(default)]
    pub label_smoothing: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "eval_batch")]
    pub eval_batch_size: usize,
    /// Gradient accumulation: one optimizer step per `accum_steps` micro-batches of
    /// `batch_size` (each with its own BN statistics), their gradients averaged; the effective
    /// batch is `batch_size x accum_steps` (timm's `--grad-accum-steps`).
    #[serde(default = "one_step")]
    pub accum_steps: usize,
    /// Data-parallel runs: BatchNorm over the global batch (the ranks' statistics summed,
    /// forward and backward; torch.nn.SyncBatchNorm) instead of per rank (DDP's default).
    /// No effect on one process.
    #[serde(default)]
    pub sync_bn: bool,
    /// Data-parallel runs: compare every rank's parameters with rank 0's after every optimizer
    /// step (a digest each; a run stops when they differ), not only at the end of each epoch.
    #[serde(default)]
    pub check_ranks_each_step: bool,
    /// Where the step runs: `cpu`, or `cuda` (the whole step on GPU 0: forward, backward,
    /// optimizer, EMA and evaluation; batches reach it through pinned buffers).
    #[serde(default)]
    pub device: Device,
    /// Checkpoints inside an epoch: `"epoch"` (at epoch ends only), `"<n> steps"` or `"<m> min"`
    /// (default 10 min): what a kill -9 can lose at most.
    #[serde(default)]
    pub checkpoint_every: super::preempt::CheckpointEvery,
}

/// The device a run trains on (the engine's one `Device`).
pub use crate::tensor::Device;

/// The most loader threads a recipe may ask for (`data.workers`).
pub const MAX_WORKERS: usize = 256;

fn one_step() -> usize {
    1
}

fn eval_batch() -> usize {
    64
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdSection {
    /// Teacher model name (any model the engine builds) and its weights.
    pub teacher: String,
    pub teacher_weights: PathBuf,
    /// Loss = (1 - alpha) CE + alpha t^2 KL (paper: alpha 0.5, t 1; Tables 3-4).
    #[serde(default = "half")]
    pub alpha: f64,
    #[serde(default = "one")]
    pub temperature: f64,
}

fn half() -> f64 {
    0.5
}

fn one() -> f64 {
    1.0
}

/// Applies `key=value` overrides (`table.key=value`, value parsed as TOML, else a string).
pub fn apply_overrides(doc: &mut toml::Table, sets: &[String]) -> Result<()> {
    for s in sets {
        let Some((key, raw)) = s.split_once('=') else {
            bail!("--set {s}: expected table.key=value")
        };
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string()));
        let parts: Vec<&str> = key.trim().split('.').collect();
        let mut t = &mut *doc;
        for p in &parts[..parts.len() - 1] {
            t = t
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .with_context(|| format!("--set {s}: {p} is not a table"))?;
        }
        t.insert(parts[parts.len() - 1].to_string(), value);
    }
    Ok(())
}

impl TrainConfig {
    /// Parses a recipe (with overrides); errors name the offending key.
    pub fn from_toml(text: &str, sets: &[String], origin: &str) -> Result<Self> {
        let mut doc: toml::Table =
            toml::from_str(text).with_context(|| format!("{origin}: not valid TOML"))?;
        apply_overrides(&mut doc, sets)?;
        let cfg: TrainConfig = doc
            .try_into()
            .with_context(|| format!("{origin}: invalid recipe"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::from_toml(&text, sets, &path.display().to_string())
    }

    /// The recipe `ghostv3 train` runs with no arguments: GhostNetV3-0.5x on the built-in synthetic
    /// set, a couple of minutes on a CPU.
    pub fn default_recipe() -> &'static str {
        include_str!("../../configs/synthetic_quick.toml")
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).context("cannot serialize the recipe")
    }

    /// Checks every numeric entry of the recipe (NaN fails every check), so that a run that
    /// starts does not stop at its first step on a value that could never work.
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        crate::models::lookup(&m.name).context("model.name")?;
        if m.rep_branches > 5 {
            bail!(
                "model.rep_branches = {} out of range 0..=5 (the paper's Table 2)",
                m.rep_branches
            );
        }
        if !(0.0..1.0).contains(&m.drop_rate) {
            bail!("model.drop_rate must be in [0, 1), got {}", m.drop_rate);
        }

        let d = &self.data;
        if d.synthetic_train == 0 || d.synthetic_val == 0 {
            bail!("data.synthetic_train and data.synthetic_val must be at least 1");
        }
        let max_size = crate::models::MAX_INPUT_SIZE;
        if !(1..=max_size).contains(&d.synthetic_size) {
            bail!(
                "data.synthetic_size must be in 1..={max_size} px, got {}",
                d.synthetic_size
            );
        }
        for (key, v) in [("data.max_train", d.max_train), ("data.max_val", d.max_val)] {
            if v == Some(0) {
                bail!("{key} must be at least 1 (leave it out to use every image)");
            }
        }
        if d.workers > MAX_WORKERS {
            bail!(
                "data.workers must be in 0..={MAX_WORKERS} (0 decodes on the training thread), \
                 got {}",
                d.workers
            );
        }
        if self.data.kind != DatasetKind::Synthetic && self.data.root.is_none() {
            bail!("data.root is required for data.kind = {:?}", self.data.kind);
        }

        if !self.augment.is_training {
            bail!("augment.is_training must be true (it is the train-time transform)");
        }
        self.augment.validate().context("augment")?;
        self.eval.validate().context("eval")?;

        let x = &self.mixup;
        for (key, a) in [
            ("mixup.mixup_alpha", x.mixup_alpha),
            ("mixup.cutmix_alpha", x.cutmix_alpha),
        ] {
            if !(a >= 0.0 && a.is_finite()) {
                bail!("{key} must be finite and >= 0 (0 turns it off), got {a}");
            }
        }
        for (key, p) in [("mixup.prob", x.prob), ("mixup.switch_prob", x.switch_prob)] {
            if !(0.0..=1.0).contains(&p) {
                bail!("{key} must be a probability in [0, 1], got {p}");
            }
        }

        let t = &self.train;
        if t.epochs == 0 || t.batch_size == 0 || t.eval_batch_size == 0 {
            bail!("train.epochs, train.batch_size and train.eval_batch_size must be positive");
        }
        if t.accum_steps == 0 || t.accum_steps > 4096 {
            bail!(
                "train.accum_steps must be in 1..=4096 (1: no accumulation), got {}",
                t.accum_steps
            );
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            bail!("train.lr must be finite and > 0, got {}", t.lr);
        }
        if !(0.0..1.0).contains(&t.label_smoothing) {
            bail!(
                "train.label_smoothing must be in [0, 1), got {}",
                t.label_smoothing
            );
        }

        self.optimizer.validate().context("optimizer")?;
        self.schedule.validate()?;
        // Each value may be in range and the schedule still overflow (lr 1e308 over a warm-up
        // of 5e-324 epochs): the rate is checked where it bends.
        let sc = &self.schedule;
        for e in [
            0.0,
            0.5 * sc.warmup_epochs,
            sc.warmup_epochs,
            0.5 * sc.epochs,
            sc.epochs,
        ] {
            let lr = sc.lr_at(t.lr, e);
            if !(0.0..=f64::MAX).contains(&lr) {
                bail!(
                    "schedule: the learning rate at epoch {e} would be {lr} (train.lr {}, \
                     warmup_lr {}, warmup_epochs {})",
                    t.lr,
                    sc.warmup_lr,
                    sc.warmup_epochs
                );
            }
        }
        if let Some(e) = &self.ema {
            e.validate()?;
            if !(e.warmup_gamma.is_finite() && e.warmup_power.is_finite()) {
                bail!("ema warmup_gamma and warmup_power must be finite and > 0");
            }
        }
        if let Some(kd) = &self.kd {
            crate::models::lookup(&kd.teacher).context("kd.teacher")?;
            if !(0.0..=1.0).contains(&kd.alpha) {
                bail!("kd.alpha must be in [0, 1], got {}", kd.alpha);
            }
            if !(kd.temperature > 0.0 && kd.temperature.is_finite()) {
                bail!(
                    "kd.temperature must be finite and > 0 (the paper's 1), got {}",
                    kd.temperature
                );
            }
        }
        Ok(())
    }
}
