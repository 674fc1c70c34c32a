//! The trainer: the paper's recipe end to end on the CPU backend.
//!
//! One epoch: loader batches (augmented on worker threads) -> optional Mixup/CutMix -> forward
//! of the re-parameterized train form (tape) -> loss (label-smoothed CE, plus KD against a teacher
//! run in eval mode on the same batch) -> backward -> one optimizer pass over the flat buffers ->
//! EMA update. Then eval of the model and its EMA, `metrics.jsonl`, an atomic checkpoint.
//!
//! Every random stream derives from (seed, epoch, step or sample index), so resuming from a
//! checkpoint (written at every epoch end, every `train.checkpoint_every` inside one, and when a
//! signal asks the run to stop: `preempt`) continues exactly as the uninterrupted run would.
//!
//! The step itself is [`step::step`]. With `train.device = "cuda"` the same step runs on the
//! GPU: parameters, BN running statistics, optimizer moments and the EMA live there (their
//! tensors' storage is on the device); batches go up through pinned buffers one step ahead;
//! evaluation runs there. Files are written from host copies in the CPU run's format, so a run
//! can resume on either device.

pub mod bench;
pub mod config;
pub mod curves;
pub mod ddp;
pub mod guard;
pub mod preempt;
pub mod run_dir;
pub mod step;
pub mod traffic;

use crate::data::{self, Batch, Cifar10, Dataset, ImageFolder, Loader, Mixup, Subset, Synthetic};
use crate::io::weights::state_tensors;
use crate::io::{load_state, load_state_from, read_tensors, write_tensors, TensorData};
use crate::models::{self, Model, ModelOptions, Pass};
use crate::nn::RepOptions;
use crate::optim::{Ema, Layout, Update};
use crate::tensor::collective::Collective;
use crate::tensor::Device;
use crate::{reparam, Tensor};
use anyhow::{bail, ensure, Context, Result};
use config::{DatasetKind, TrainConfig};
use preempt::StopFlag;
use rand::rngs::StdRng;
use run_dir::RunLock;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub const CHECKPOINT: &str = "checkpoint.safetensors";

/// One epoch's figures, as appended to `metrics.jsonl`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    pub lr: f64,
    pub top1: f64,
    pub top5: f64,
    pub val_loss: f64,
    pub ema_top1: Option<f64>,
    pub ema_top5: Option<f64>,
    pub images_per_s: f64,
    pub epoch_seconds: f64,
    pub skipped_images: usize,
    /// Validation images that could not be read (top-1 and top-5 are over the others).
    #[serde(default)]
    pub val_skipped_images: usize,
}

/// What `run` reports at the end.
#[derive(Clone, Debug)]
pub struct Summary {
    pub epochs: Vec<EpochMetrics>,
    pub best_top1: f64,
    pub run_dir: PathBuf,
    /// The signal that stopped the run early (after writing its checkpoint), if one did.
    pub stopped_by: Option<&'static str>,
}

/// Where an epoch stands between steps: what a mid-epoch checkpoint saves so that resuming
/// finishes the epoch with the same figures (f64 values survive JSON exactly: float_roundtrip).
/// In a data-parallel run `step` counts one rank's batches and the figures are the ranks' sums.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Progress {
    /// Steps of the epoch done (the next step to run).
    step: usize,
    loss_sum: f64,
    images: usize,
    skipped: usize,
    lr: f64,
    train_seconds: f64,
    /// The ranks of the run that wrote it (a resume may have another number).
    #[serde(default = "one_rank")]
    world: usize,
}

fn one_rank() -> usize {
    1
}

/// The trainer's state in a checkpoint's metadata (`ghostv3.trainer`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CheckpointInfo {
    /// Epochs completed.
    epoch: usize,
    best_top1: f64,
    /// Set when written inside an epoch.
    #[serde(default)]
    progress: Option<Progress>,
    #[serde(default)]
    run_id: Option<String>,
}

const INFO_KEY: &str = "ghostv3.trainer";
const RECIPE_KEY: &str = "ghostv3.recipe";
/// A digest over the trainer info and the recipe: edited metadata is refused like a flipped bit.
const INFO_DIGEST_KEY: &str = "ghostv3.trainer_digest";

fn info_digest(info: &str, recipe: &str) -> String {
    run_dir::digest(format!("{info}\n{recipe}").as_bytes())
}

pub struct Trainer {
    pub cfg: TrainConfig,
    pub run_dir: PathBuf,
    pub model: Model,
    ema_model: Option<Model>,
    /// The optimizer and the EMA (`optim::Update`: on the device the parameters are on).
    pub update: Update,
    teacher: Option<Model>,
    train_loader: Loader,
    val_loader: Loader,
    /// Data-parallel: this rank's communicator (gradients averaged over the ranks).
    collective: Option<Collective>,
    /// Whether this trainer writes the run directory (a data-parallel run's ranks other than
    /// 0 write nothing).
    writes: bool,
    /// A stop the ranks agreed on (a signal that reached another rank).
    agreed_stop: Option<&'static str>,
    class_names: Vec<String>,
    /// Epochs completed so far.
    pub epoch: usize,
    best_top1: f64,
    pub quiet: bool,
    /// This trainer is the run directory's one writer while it lives.
    _lock: Option<RunLock>,
    /// Set by SIGTERM/SIGINT (`preempt`): finish the step, checkpoint, stop.
    stop: StopFlag,
    /// Where the current epoch stands, when resumed from a checkpoint written inside it.
    partial: Option<Progress>,
    /// The run's identity (`run.json`), carried by its checkpoints.
    run_id: Option<String>,
    /// Where the checkpoint on disk stands ("after epoch 3", "at epoch 4 step 120").
    checkpoint_at: Option<String>,
}

/// One training step's batch besides its images: the step index, the (soft) targets (None for a
/// batch whose every image was unreadable) and the skipped images.
struct StepBatch {
    step: usize,
    targets: Option<Tensor<f32>>,
    skipped: Vec<String>,
}

/// A deterministic random stream for (seed, epoch, step, purpose).
fn stream(seed: u64, epoch: usize, step: usize, purpose: u64) -> StdRng {
    data::sample_rng(
        seed ^ purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        epoch,
        step,
    )
}

/// Where a checkpoint stands, in words.
fn progress_at(epoch: usize, progress: Option<&Progress>) -> String {
    match progress {
        Some(p) => format!("at epoch {} step {}", epoch + 1, p.step),
        None => format!("after epoch {epoch}"),
    }
}

/// The keys (dotted) whose values differ between two recipes, as `key: a -> b`.
pub fn recipe_diff(a: &str, b: &str) -> Vec<String> {
    fn flatten(prefix: &str, t: &toml::Table, out: &mut BTreeMap<String, String>) {
        for (k, v) in t {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(t) => flatten(&key, t, out),
                v => {
                    out.insert(key, v.to_string());
                }
            }
        }
    }
    let parse = |s: &str| {
        let mut out = BTreeMap::new();
        if let Ok(t) = toml::from_str::<toml::Table>(s) {
            flatten("", &t, &mut out);
        }
        out
    };
    let (a, b) = (parse(a), parse(b));
    let none = "(absent)".to_string();
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k}: {} -> {}",
                a.get(k).unwrap_or(&none),
                b.get(k).unwrap_or(&none)
            )
        })
        .collect()
}

/// The model a recipe trains (`deploy`: its folded form, for counting what deploys).
pub fn model_options(cfg: &TrainConfig, num_classes: usize, deploy: bool) -> ModelOptions {
    let m = &cfg.model;
    ModelOptions {
        num_classes,
        rep: RepOptions {
            branches: m.rep_branches,
            scale: m.rep_scale,
            identity: m.rep_identity,
        },
        deploy,
        drop_rate: m.drop_rate,
        seed: cfg.train.seed,
    }
}

fn datasets(cfg: &TrainConfig) -> Result<(Arc<dyn Dataset>, Arc<dyn Dataset>)> {
    let d = &cfg.data;
    let (train, val): (Arc<dyn Dataset>, Arc<dyn Dataset>) = match d.kind {
        DatasetKind::Synthetic => (
            Arc::new(Synthetic::new(
                d.synthetic_train,
                d.synthetic_size,
                cfg.train.seed,
            )),
            Arc::new(Synthetic::new(
                d.synthetic_val,
                d.synthetic_size,
                cfg.train.seed.wrapping_add(0x5eed),
            )),
        ),
        DatasetKind::Imagefolder => {
            let root = d.root.as_ref().context("data.root")?;
            (
                Arc::new(ImageFolder::open(root.join(&d.train_split))?),
                Arc::new(ImageFolder::open(root.join(&d.val_split))?),
            )
        }
        DatasetKind::Cifar10 => {
            let root = d.root.as_ref().context("data.root")?;
            (
                Arc::new(Cifar10::open(root, true)?),
                Arc::new(Cifar10::open(root, false)?),
            )
        }
    };
    let cap = |ds: Arc<dyn Dataset>, n: Option<usize>| -> Arc<dyn Dataset> {
        match n {
            Some(n) if n < ds.len() => Arc::new(Subset::evenly_spaced(ds, n)),
            _ => ds,
        }
    };
    Ok((cap(train, d.max_train), cap(val, d.max_val)))
}

impl Trainer {
    /// A fresh run in `run_dir` (created; refused if it already holds a checkpoint).
    pub fn new(cfg: TrainConfig, run_dir: &Path) -> Result<Self> {
        if run_dir.join(CHECKPOINT).exists() {
            bail!(
                "{} already holds a run; use --resume {} to continue it",
                run_dir.display(),
                run_dir.display()
            );
        }
        if run_dir.exists() {
            run_dir::check_fresh(run_dir)?;
        }
        // Everything that can fail on the recipe fails before the run directory exists.
        let mut t = Self::build(cfg, run_dir)?;
        t.move_to_device()?;
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        t._lock = Some(RunLock::acquire(run_dir)?);
        // Checked again under the lock: another trainer may have started meanwhile.
        run_dir::check_fresh(run_dir)?;
        // The recipe first: a run killed before its identity is written resumes from config.toml.
        crate::io::write_atomic(&run_dir.join("config.toml"), t.cfg.to_toml()?.as_bytes())?;
        t.run_id = Some(run_dir::create_identity(run_dir)?);
        Ok(t)
    }

    /// Continues the run in `run_dir` from its last checkpoint: model, optimizer, EMA, schedule
    /// position, epoch (and step, for a checkpoint written inside an epoch) and random streams. A
    /// run stopped before its first checkpoint restarts from its recipe. `sets` may override the
    /// stored recipe (e.g. epochs); they are written to `config.toml`.
    pub fn resume(run_dir: &Path, sets: &[String]) -> Result<Self> {
        let config = run_dir.join("config.toml");
        ensure!(
            config.exists(),
            "{} is not a run directory: it has no config.toml",
            run_dir.display()
        );
        let lock = RunLock::acquire(run_dir)?;
        let cfg = TrainConfig::load(&config, sets)?;
        let path = run_dir.join(CHECKPOINT);
        let mut t = Self::build(cfg, run_dir)?;
        t._lock = Some(lock);
        t.run_id = run_dir::identity(run_dir)?;
        if path.exists() {
            t.load_checkpoint(&path, sets)?;
        } else {
            eprintln!(
                "note: {} has no checkpoint yet; the run restarts from its recipe",
                run_dir.display()
            );
            if t.run_id.is_none() {
                t.run_id = Some(run_dir::create_identity(run_dir)?);
            }
        }
        for f in run_dir::remove_leftovers(run_dir)? {
            eprintln!(
                "note: removed {}, left by an interrupted write",
                f.display()
            );
        }
        let dropped = run_dir::truncate_metrics(run_dir, t.epoch)?;
        if dropped > 0 {
            eprintln!(
                "note: dropped {dropped} metrics.jsonl line(s) past the checkpoint (epoch {})",
                t.epoch
            );
        }
        if !sets.is_empty() {
            crate::io::write_atomic(&config, t.cfg.to_toml()?.as_bytes())?;
        }
        t.move_to_device()?;
        Ok(t)
    }

    /// A rank other than 0 of a data-parallel run starting afresh: built from the same recipe,
    /// it writes nothing (rank 0 creates and writes `run_dir`, named in messages).
    pub fn follower(cfg: TrainConfig, run_dir: &Path) -> Result<Self> {
        let mut t = Self::build(cfg, run_dir)?;
        t.writes = false;
        t.quiet = true;
        t.move_to_device()?;
        Ok(t)
    }

    /// A rank other than 0 of a resumed data-parallel run: the recipe and the last checkpoint
    /// read from rank 0's run directory (every rank must see it: one node, or a shared file
    /// system), nothing written.
    pub fn resume_follower(run_dir: &Path, sets: &[String]) -> Result<Self> {
        let config = run_dir.join("config.toml");
        ensure!(
            config.exists(),
            "{} is not a run directory this rank can read (no config.toml): a resumed \
             data-parallel run needs the run directory on a file system every rank sees",
            run_dir.display()
        );
        let cfg = TrainConfig::load(&config, sets)?;
        let mut t = Self::build(cfg, run_dir)?;
        (t.writes, t.quiet) = (false, true);
        t.run_id = run_dir::identity(run_dir)?;
        let path = run_dir.join(CHECKPOINT);
        if path.exists() {
            t.load_checkpoint(&path, sets)?;
        }
        t.move_to_device()?;
        Ok(t)
    }

    /// Restores model, optimizer, EMA and trainer state from `path`, after checking that the
    /// checkpoint is this run's (identity, recipe) and that its metadata is intact and plausible.
    fn load_checkpoint(&mut self, path: &Path, sets: &[String]) -> Result<()> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {shown}"))?;
        let (_, meta) = crate::io::weights::read_header(&bytes, &shown)?;
        let meta = meta.metadata().clone().unwrap_or_default();
        drop(bytes);
        let info_text = meta
            .get(INFO_KEY)
            .with_context(|| format!("{shown} holds no trainer state"))?;
        // Checkpoints from before recipes were stored carry neither recipe nor digest.
        if let Some(recipe) = meta.get(RECIPE_KEY) {
            let digest = meta.get(INFO_DIGEST_KEY).map(String::as_str);
            if digest != Some(info_digest(info_text, recipe).as_str()) {
                bail!(
                    "{shown}: its trainer metadata fails its digest: the file was edited or is \
                     corrupt"
                );
            }
            let theirs = TrainConfig::from_toml(recipe, sets, &format!("{shown} (recipe)"))?;
            let diff = recipe_diff(&theirs.to_toml()?, &self.cfg.to_toml()?);
            if !diff.is_empty() {
                bail!(
                    "{shown} was trained under another recipe than {}: {}. A resumed run changes \
                     its recipe with --set (written to config.toml); pass these values with --set \
                     to continue under config.toml",
                    self.run_dir.join("config.toml").display(),
                    diff.join(", ")
                );
            }
        }
        let info: CheckpointInfo = serde_json::from_str(info_text)
            .with_context(|| format!("{shown}: corrupt trainer state"))?;
        if let (Some(ours), Some(theirs)) = (&self.run_id, &info.run_id) {
            ensure!(
                ours == theirs,
                "{shown} belongs to run {theirs}, not to this directory's run {ours} (run.json): \
                 a checkpoint copied from another run"
            );
        }
        self.check_info(&info)
            .with_context(|| format!("{shown}: implausible trainer state"))?;
        let tensors = read_tensors(path)?;
        let mut model_t = BTreeMap::new();
        let mut optim_t = Vec::new();
        let mut ema_t = Vec::new();
        for (k, v) in tensors {
            if let Some(name) = k.strip_prefix("optim.") {
                let TensorData::F32(_, d) = v else {
                    bail!("optimizer state {k} is not f32")
                };
                optim_t.push((name.to_string(), d));
            } else if let Some(name) = k.strip_prefix("ema.") {
                let TensorData::F32(_, d) = v else {
                    bail!("EMA state {k} is not f32")
                };
                ema_t.push((name.to_string(), d));
            } else {
                model_t.insert(k, v);
            }
        }
        load_state_from(self.model.state_mut(), &model_t, &shown)?;
        self.update.optimizer.load_state(&optim_t)?;
        if let Some(ema) = self.update.ema.as_mut() {
            ema.load_state(&ema_t)?;
        }
        self.epoch = info.epoch;
        self.best_top1 = info.best_top1;
        self.checkpoint_at = Some(progress_at(info.epoch, info.progress.as_ref()));
        self.partial = info.progress;
        Ok(())
    }

    /// The checkpoint's epoch, step and figures fit the recipe (an edited epoch of 1000 would
    /// otherwise "resume" to a finished run).
    fn check_info(&self, info: &CheckpointInfo) -> Result<()> {
        let epochs = self.cfg.train.epochs;
        ensure!(
            info.epoch <= epochs,
            "it is after epoch {}, the recipe has {epochs} epochs (raise train.epochs with --set \
             to train further)",
            info.epoch
        );
        ensure!(
            info.best_top1.is_finite() && (-1.0..=1.0).contains(&info.best_top1),
            "best_top1 = {}",
            info.best_top1
        );
        if let Some(p) = &info.progress {
            let steps = self.train_loader.batches_per_epoch();
            ensure!(
                info.epoch < epochs,
                "a step inside epoch {} of {epochs}",
                info.epoch + 1
            );
            // Global batches: a data-parallel checkpoint counts one rank's of `world`.
            let (done, world) = (p.step * p.world, p.world);
            ensure!(
                (1..=1 << 20).contains(&world) && done <= steps,
                "step {} of {world} rank(s) in an epoch of {steps} batches",
                p.step
            );
            ensure!(
                p.images <= done * self.cfg.train.batch_size
                    && p.skipped <= done * self.cfg.train.batch_size,
                "{} images and {} skipped in {done} batches of {}",
                p.images,
                p.skipped,
                self.cfg.train.batch_size
            );
            for (what, x) in [
                ("loss_sum", p.loss_sum),
                ("lr", p.lr),
                ("train_seconds", p.train_seconds),
            ] {
                ensure!(x.is_finite() && x >= 0.0, "{what} = {x}");
            }
        }
        Ok(())
    }

    /// Where the checkpoint this trainer resumed from stands ("after epoch 3"), if it did.
    pub fn resumed_at(&self) -> Option<&str> {
        self.checkpoint_at.as_deref()
    }

    /// Stops the run at the next step boundary as `SIGTERM` would (see `preempt`): the binary
    /// passes a flag its signal handlers set.
    pub fn stop_on(&mut self, flag: StopFlag) {
        self.stop = flag;
    }

    fn build(cfg: TrainConfig, run_dir: &Path) -> Result<Self> {
        let (train_ds, val_ds) = datasets(&cfg)?;
        let num_classes = train_ds.num_classes();
        let class_names = train_ds.class_names();
        if val_ds.class_names() != class_names {
            let (t, v) = (class_names.clone(), val_ds.class_names());
            let only = |a: &[String], b: &[String]| -> Vec<String> {
                a.iter()
                    .filter(|c| !b.contains(c))
                    .take(5)
                    .cloned()
                    .collect()
            };
            bail!(
                "the train and val splits have different classes ({} and {}): only in train {:?}, \
                 only in val {:?}{}",
                t.len(),
                v.len(),
                only(&t, &v),
                only(&v, &t),
                if t.len() == v.len() && only(&t, &v).is_empty() {
                    " (same names, another order)"
                } else {
                    ""
                }
            );
        }
        let m = &cfg.model;
        let opts = model_options(&cfg, num_classes, false);
        let mut model = models::create(&m.name, &opts)?;
        for (key, size) in [
            ("augment.size", cfg.augment.size),
            ("eval.size", cfg.eval.size),
        ] {
            ensure!(
                size >= model.min_input_size(),
                "{key} = {size} is too small for {}: it needs inputs of at least {} px",
                m.name,
                model.min_input_size()
            );
        }
        // Host memory (a GPU run is bounded by its device's memory, which it reports itself).
        if cfg.train.device == Device::Cpu {
            let (a, e) = (&cfg.augment, &cfg.eval);
            let train_what = format!("augment.size = {} with train.batch_size", a.size);
            model.check_run(
                &train_what,
                cfg.train.batch_size,
                a.size,
                a.size,
                Pass::TapeTrain,
            )?;
            let eval_what = format!("eval.size = {} with train.eval_batch_size", e.size);
            model.check_run(
                &eval_what,
                cfg.train.eval_batch_size,
                e.size,
                e.size,
                Pass::Tape,
            )?;
        }
        if let Some(init) = &m.init {
            load_state(model.state_mut(), init)?;
        }
        let layout = Layout::from_store(&model.state().params);

        let ema = match &cfg.ema {
            Some(e) => Some(Ema::new(
                e.clone(),
                model.state().params.tensor(),
                model.state().buffers.tensor(),
            )?),
            None => None,
        };
        let ema_model = if ema.is_some() {
            Some(models::create(&m.name, &opts)?)
        } else {
            None
        };
        let teacher = match &cfg.kd {
            None => None,
            Some(kd) => {
                let topts = models::detect_options(&kd.teacher_weights)?;
                ensure!(
                    topts.num_classes == num_classes,
                    "teacher {} has {} classes, the data has {num_classes}",
                    kd.teacher_weights.display(),
                    topts.num_classes
                );
                let mut t = models::create(&kd.teacher, &topts)?;
                load_state(t.state_mut(), &kd.teacher_weights)?;
                Some(t)
            }
        };
        let d = &cfg.data;
        let seed = cfg.train.seed;
        let train_loader = Loader::new(
            train_ds,
            cfg.augment.clone(),
            cfg.train.batch_size,
            true,
            true,
            d.workers,
            seed,
        )?
        .strict(d.strict);
        let val_loader = Loader::new(
            val_ds,
            cfg.eval.clone(),
            cfg.train.eval_batch_size,
            false,
            false,
            d.workers,
            seed,
        )?
        .strict(d.strict);
        ensure!(
            train_loader.batches_per_epoch() > 0,
            "the training set is smaller than one batch"
        );
        let update = Update::new(&cfg.optimizer, &layout, ema)?;
        Ok(Trainer {
            cfg,
            run_dir: run_dir.to_path_buf(),
            model,
            ema_model,
            update,
            teacher,
            train_loader,
            val_loader,
            collective: None,
            writes: true,
            agreed_stop: None,
            class_names,
            epoch: 0,
            best_top1: -1.0,
            quiet: false,
            _lock: None,
            stop: StopFlag::new(),
            partial: None,
            run_id: None,
            checkpoint_at: None,
        })
    }

    /// The model, its EMA and the teacher to `train.device` (the optimizer's moments follow
    /// the parameters at its first step).
    fn move_to_device(&mut self) -> Result<()> {
        let device = self.cfg.train.device;
        device
            .check()
            .map_err(|e| anyhow::anyhow!("train.device = \"{}\": {e}", device.name()))?;
        self.model.state_mut().place_on(device)?;
        if let Some(em) = self.ema_model.as_mut() {
            em.state_mut().place_on(device)?;
        }
        if let Some(t) = self.teacher.as_mut() {
            t.state_mut().place_on(device)?;
        }
        Ok(())
    }

    /// The KD teacher, if the recipe has one (run in eval mode, never updated).
    /// Makes this trainer one rank of a data-parallel run: its share of each epoch (the
    /// loader sharded by batches), rank 0's parameters and buffers to every rank, and from now
    /// on each optimizer step applies the mean of the ranks' gradients (NCCL, on the GPU).
    pub fn data_parallel(&mut self, c: Collective) -> Result<()> {
        ensure!(
            self.cfg.train.device != Device::Cpu,
            "data-parallel training runs on GPUs: set train.device = \"cuda\""
        );
        ensure!(
            self.train_loader.batches_per_epoch() / c.world_size() > 0,
            "{} training batches per epoch cannot feed {} ranks",
            self.train_loader.batches_per_epoch(),
            c.world_size()
        );
        let (rank, world) = (c.rank(), c.world_size());
        self.train_loader.set_shard(rank, world)?;
        self.val_loader.set_eval_shard(rank, world)?;
        if let Some(p) = &self.partial {
            // A checkpoint this world size cannot start from fails now, not at the first step.
            ddp::adopt_progress(&mut p.clone(), rank, world)?;
        }
        let st = self.model.state();
        c.broadcast(st.params.tensor())?;
        c.broadcast(st.buffers.tensor())?;
        c.sync()?;
        if self.cfg.train.sync_bn {
            c.sync_batch_norm(true);
        }
        self.collective = Some(c);
        Ok(())
    }

    /// The model's (or the EMA model's) evaluation: over the ranks' shards when
    /// data-parallel. Returns it with the count of unreadable images of all ranks.
    fn evaluate_model(&mut self, ema: bool) -> Result<(Eval, usize)> {
        let model = match ema {
            true => self.ema_model.as_mut().expect("an EMA model"),
            false => &mut self.model,
        };
        let device = model.state().device();
        let predict = |x: &Tensor<f32>| Ok(model.predict(&x.to_device(device)?).to_host());
        match &self.collective {
            Some(c) => ddp::evaluate(c, &self.val_loader, predict),
            None => {
                let e = evaluate_with(&self.val_loader, predict)?;
                let n = e.skipped.len();
                Ok((e, n))
            }
        }
    }

    /// Whether to stop now: this process's signal, or (data-parallel) any rank's.
    fn stop_requested(&mut self) -> Result<Option<&'static str>> {
        let mine = self.stop.requested();
        let Some(c) = &self.collective else {
            return Ok(mine);
        };
        if ddp::decide(c, mine.is_some(), false)?.stop {
            let sig = mine.unwrap_or("a signal to another rank");
            self.agreed_stop = Some(sig);
            return Ok(Some(sig));
        }
        Ok(None)
    }

    /// The training set's loader (its batches are the steps' micro-batches).
    pub fn train_loader(&self) -> &Loader {
        &self.train_loader
    }

    pub fn teacher(&self) -> Option<&Model> {
        self.teacher.as_ref()
    }

    /// A progress line on stdout. A closed stdout (`train | head`) does not stop the training:
    /// the run's record is metrics.jsonl, not its log.
    fn say(&self, s: &str) {
        if !self.quiet {
            let _ = writeln!(std::io::stdout().lock(), "{s}");
        }
    }

    /// Trains until `train.epochs`, evaluating and checkpointing after every epoch.
    pub fn run(&mut self) -> Result<Summary> {
        self.run_with(&mut |_| {})
    }

    /// `run`, calling `on_epoch` with every finished epoch's figures (a study's progress).
    pub fn run_with(&mut self, on_epoch: &mut dyn FnMut(&EpochMetrics)) -> Result<Summary> {
        let mut epochs = Vec::new();
        if self.cfg.train.device != Device::Cpu {
            self.say(&format!(
                "device: {}; optimizer: {}",
                crate::tensor::storage::describe(self.cfg.train.device),
                self.update.describe()
            ));
        }
        self.say(&format!(
            "training {} (train form, {} params) for {} epochs on {} images, {} classes; run dir {}",
            self.cfg.model.name,
            self.model.state().params.numel(),
            self.cfg.train.epochs,
            self.train_loader.dataset().len(),
            self.class_names.len(),
            self.run_dir.display()
        ));
        let mut stopped_by = None;
        while self.epoch < self.cfg.train.epochs {
            // A signal during an evaluation stops here: the epoch's checkpoint is written.
            if let Some(sig) = self.stop_requested()? {
                self.say_stopped(sig);
                stopped_by = Some(sig);
                break;
            }
            match self.run_epoch()? {
                Some(m) => {
                    on_epoch(&m);
                    epochs.push(m)
                }
                None => {
                    stopped_by = self.agreed_stop.or(self.stop.requested());
                    break;
                }
            }
        }
        if stopped_by.is_none() {
            self.finish()?;
        }
        Ok(Summary {
            epochs,
            best_top1: self.best_top1,
            run_dir: self.run_dir.clone(),
            stopped_by,
        })
    }

    /// The line a run stopped by a signal ends with (on stderr: it is what a job log needs).
    fn say_stopped(&self, sig: &str) {
        if !self.writes {
            return;
        }
        let at = match &self.partial {
            Some(p) => format!(
                "epoch {} step {}/{}",
                self.epoch + 1,
                p.step,
                self.train_loader.batches_per_epoch()
            ),
            None => format!("the end of epoch {}", self.epoch),
        };
        let saved = match self.checkpoint_at {
            Some(_) => format!("checkpoint {}", self.run_dir.join(CHECKPOINT).display()),
            None => "before the first checkpoint (the run restarts)".to_string(),
        };
        eprintln!(
            "{sig}: stopped at {at}; {saved}; continue with: ghostv3 train --resume {}",
            self.run_dir.display()
        );
    }

    /// One epoch (or what is left of it): train, evaluate, log, checkpoint. None when a signal
    /// stopped it inside (its checkpoint written).
    pub fn run_epoch(&mut self) -> Result<Option<EpochMetrics>> {
        let epoch = self.epoch;
        let Some(mut p) = self.train_epoch(epoch)? else {
            return Ok(None);
        };
        let t_eval = Instant::now();
        if let Some(c) = &self.collective {
            p = ddp::total_progress(c, &p)?;
            let d = ddp::check_identical(
                c,
                self.model.state().params.tensor(),
                &format!("after epoch {}", epoch + 1),
            )?;
            self.say(&format!(
                "ranks: parameters bit-identical on {} ranks after epoch {} (digest {d:016x})",
                c.world_size(),
                epoch + 1
            ));
        }
        let (images, skipped, lr) = (p.images, p.skipped, p.lr);
        let train_loss = p.loss_sum / images as f64;
        let train_s = p.train_seconds;
        // Host copies once: checked, then written (nothing non-finite reaches a file).
        let written = match self.writes {
            true => Some(
                self.checkpoint_tensors()
                    .and_then(|(h, t)| guard::check_tensors(&t).map(|()| (h, t)))
                    .map_err(|e| self.stopped(&format!("after epoch {}: {e}", epoch + 1)))?,
            ),
            false => None,
        };
        let (val, val_skipped) = self.evaluate_model(false)?;
        for s in &val.skipped {
            eprintln!("warning: validation skipped unreadable image {s}");
        }
        let (top1, top5, val_loss) = (val.top1, val.top5, val.loss);
        let (ema_top1, ema_top5) = match (self.update.ema_tensors(), self.ema_model.as_mut()) {
            (Some((p, b)), Some(em)) => {
                // The EMA model evaluates copies of the average, on the run's device.
                let device = self.cfg.train.device;
                em.state_mut().params.set_tensor(p.to_device(device)?);
                em.state_mut().buffers.set_tensor(b.to_device(device)?);
                let (e, _) = self.evaluate_model(true)?;
                (Some(e.top1), Some(e.top5))
            }
            _ => (None, None),
        };
        let m = EpochMetrics {
            epoch: epoch + 1,
            train_loss,
            lr,
            top1,
            top5,
            val_loss,
            ema_top1,
            ema_top5,
            images_per_s: images as f64 / train_s,
            epoch_seconds: train_s + t_eval.elapsed().as_secs_f64(),
            skipped_images: skipped,
            val_skipped_images: val_skipped,
        };
        self.epoch = epoch + 1;
        let ema_txt = ema_top1.map_or(String::new(), |e| format!(", EMA top-1 {:.2}%", 100.0 * e));
        self.say(&format!(
            "epoch {}/{}: train loss {:.4}, val top-1 {:.2}% top-5 {:.2}%{ema_txt}, {:.1} img/s, {:.0} s{}{}",
            m.epoch,
            self.cfg.train.epochs,
            train_loss,
            100.0 * top1,
            100.0 * top5,
            m.images_per_s,
            m.epoch_seconds,
            if skipped > 0 { format!(", {skipped} unreadable images skipped") } else { String::new() },
            val.skipped_note()
        ));
        let Some((host, tensors)) = written else {
            // A data-parallel rank other than 0: rank 0 writes the run.
            let best_now = ema_top1.map_or(top1, |e| e.max(top1));
            self.best_top1 = self.best_top1.max(best_now);
            return Ok(Some(m));
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.run_dir.join("metrics.jsonl"))
            .context("cannot open metrics.jsonl")?;
        writeln!(f, "{}", serde_json::to_string(&m)?)?;
        drop(f);
        // The run's curves so far; a chart that cannot be drawn never stops the training.
        if let Err(e) = curves::write_run_curves(&self.run_dir) {
            eprintln!("warning: curves.png not drawn: {e:#}");
        }
        // Best weights: the model or its EMA, whichever scores higher.
        let (best_now, from_ema) = match ema_top1 {
            Some(e) if e > top1 => (e, true),
            _ => (top1, false),
        };
        if best_now > self.best_top1 {
            self.best_top1 = best_now;
            let meta = self.weights_meta(if from_ema { "ema" } else { "model" }, m.epoch);
            let best = self.run_dir.join("best.safetensors");
            if from_ema {
                let ema = self
                    .ema_model
                    .as_ref()
                    .expect("ema model")
                    .state()
                    .to_host()?;
                crate::io::save_state(&ema, &best, meta)?;
            } else {
                crate::io::save_state(&host, &best, meta)?;
            }
        }
        self.write_checkpoint(tensors, None)?;
        crate::io::save_state(
            &host,
            &self.run_dir.join("last.safetensors"),
            self.weights_meta("model", self.epoch),
        )?;
        Ok(Some(m))
    }

    /// The training steps of `epoch` (from the step a mid-epoch checkpoint reached), with the
    /// checkpoints `train.checkpoint_every` asks for. None when a signal stopped it (after a
    /// checkpoint).
    fn train_epoch(&mut self, epoch: usize) -> Result<Option<Progress>> {
        let steps = self.train_loader.batches_per_epoch();
        let (rank, world) = self.train_loader.shard_of();
        let mut p = match self.partial.take() {
            // Resumed inside the epoch, maybe by another number of ranks.
            Some(mut p) => {
                ddp::adopt_progress(&mut p, rank, world)?;
                p
            }
            None => Progress {
                world,
                ..Progress::default()
            },
        };
        let first = p.step;
        let bar = if self.quiet {
            indicatif::ProgressBar::hidden()
        } else {
            let b = indicatif::ProgressBar::new(steps as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "epoch {prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            b.set_prefix(format!("{}/{}", epoch + 1, self.cfg.train.epochs));
            b.set_position(first as u64);
            b
        };
        let num_classes = self.model.num_classes();
        let mixup = self.mixup(num_classes);
        let (seed, smoothing) = (self.cfg.train.seed, self.cfg.train.label_smoothing);
        // Random streams follow the global batch index, not this rank's: a run's samples and
        // draws do not depend on its world size.
        // Batches with their targets (Mixup/CutMix drawn from the step's own stream), in step
        // order; on the GPU they go up through pinned buffers one step ahead of the compute.
        let host = self.train_loader.epoch_from(epoch, first).enumerate().map(
            move |(i, batch)| -> Result<(Tensor<f32>, StepBatch)> {
                let step = first + i;
                let Batch {
                    mut images,
                    labels,
                    skipped,
                    ..
                } = batch?;
                let targets = match &mixup {
                    _ if labels.is_empty() => None,
                    Some(mx) => {
                        let mut rng = stream(seed, epoch, step * world + rank, 1);
                        Some(mx.apply(&mut images, &labels, &mut rng)?.targets)
                    }
                    None => Some(data::one_hot_smoothed(&labels, num_classes, smoothing)),
                };
                Ok((
                    images,
                    StepBatch {
                        step,
                        targets,
                        skipped,
                    },
                ))
            },
        );
        let batches = crate::tensor::storage::batches_to(self.cfg.train.device, host)?;
        let every = self.cfg.train.checkpoint_every;
        let (t0, seconds_before, images_before) = (Instant::now(), p.train_seconds, p.images);
        let mut last_checkpoint = (first, Instant::now());
        // Micro-batches m*k .. (m+1)*k - 1 make optimizer step m (the epoch's last one may be
        // shorter); its learning rate is that of its first micro-batch.
        let k = self.cfg.train.accum_steps;
        let mut accum = step::GradAccum::default();
        for item in batches {
            let (batch_images, batch) = item?;
            let step = batch.step;
            p.step = step + 1;
            p.skipped += batch.skipped.len();
            for s in &batch.skipped {
                bar.suspend(|| eprintln!("warning: skipped unreadable image {s}"));
            }
            let group_first = (step - step % k).max(first);
            let lr = self.cfg.schedule.lr_at(
                self.cfg.train.lr,
                epoch as f64 + group_first as f64 / steps as f64,
            );
            let at = format!("at epoch {} step {step} (lr {lr:.3e})", epoch + 1);
            if let Some(c) = &self.collective {
                c.alive();
            }
            if self.cfg.train.sync_bn {
                if let Some(c) = &self.collective {
                    // Synchronized BNs sum partials laid out by the batch's shape.
                    let n = batch.targets.as_ref().map_or(0, |t| t.shape()[0]) as f64;
                    let v = c.all_reduce_sum(&[n, n * n])?;
                    let w = c.world_size() as f64;
                    ensure!(
                        v[1] * w == v[0] * v[0] && n > 0.0,
                        "train.sync_bn needs batches of one size on every rank; {at} this \
                         rank has {n} images (unreadable images were skipped): {} on average",
                        v[0] / w
                    );
                }
            }
            if let Some(targets) = batch.targets {
                let batch_len = targets.shape()[0];
                let (loss, grads) = self.train_step(&batch_images, &targets, epoch, step)?;
                let Some(grads) = grads.filter(|_| loss.is_finite()) else {
                    return Err(self.stopped(&format!("the loss became {loss} {at}")));
                };
                accum.add(grads);
                p.loss_sum += loss * batch_len as f64;
                p.images += batch_len;
                p.lr = lr;
                bar.set_message(format!(
                    "loss {loss:.4} lr {lr:.2e} {:.1} img/s",
                    (p.images - images_before) as f64 / t0.elapsed().as_secs_f64()
                ));
            }
            if (step + 1) % k == 0 || step + 1 == steps {
                let mut grads = accum.take_mean();
                if let (None, Some(_)) = (&grads, &self.collective) {
                    // Every image of this rank's micro-batches was unreadable: it still joins
                    // the all-reduce the other ranks make, with zeros.
                    let n = self.model.state().params.numel();
                    let device = self.cfg.train.device;
                    grads = Some(Tensor::new(&[n], vec![0.0; n]).to_device(device)?);
                }
                if let Some(grads) = grads {
                    if let Some(c) = &self.collective {
                        c.all_reduce_mean(&grads)?;
                    }
                    step::apply(&mut self.model, &mut self.update, &grads, lr)?;
                }
                if let Some(c) = self.collective.as_ref() {
                    if self.cfg.train.check_ranks_each_step {
                        let params = self.model.state().params.tensor();
                        ddp::check_identical(c, params, &at)?;
                    }
                }
                // The update pass flags a non-finite parameter or moment as it writes it (no
                // pass of its own); only then are the host copies searched for its name.
                if self.update.take_nonfinite()? {
                    let (_, tensors) = self.checkpoint_tensors()?;
                    let why = guard::check_tensors(&tensors).err().map_or_else(
                        || "the optimizer wrote a non-finite value".to_string(),
                        |e| format!("{e:#}"),
                    );
                    return Err(self.stopped(&format!("{why} {at}")));
                }
            }
            bar.inc(1);
            p.train_seconds = seconds_before + t0.elapsed().as_secs_f64();
            // Checkpoints and stops wait for the end of an optimizer step: gradients of a
            // partial accumulation are not saved.
            if accum.count() > 0 {
                continue;
            }
            let mut stop = self.stop.requested();
            let mut due = every.due(
                p.step - last_checkpoint.0,
                last_checkpoint.1.elapsed().as_secs_f64(),
            );
            if let Some(c) = &self.collective {
                // Every rank stops at the same step; rank 0's clock decides checkpoints.
                let d = ddp::decide(c, stop.is_some(), due)?;
                if d.stop && stop.is_none() {
                    stop = Some("a signal to another rank");
                    self.agreed_stop = stop;
                }
                due = d.checkpoint;
            }
            // The epoch's last step is checkpointed with the epoch, after its evaluation.
            if stop.is_some() || (due && p.step < steps) {
                let total = match &self.collective {
                    Some(c) => ddp::total_progress(c, &p)?,
                    None => p.clone(),
                };
                if self.writes {
                    bar.suspend(|| self.save_partial(&total))?;
                }
                if let Some(sig) = stop {
                    bar.finish_and_clear();
                    self.partial = Some(p);
                    self.say_stopped(sig);
                    return Ok(None);
                }
                last_checkpoint = (p.step, Instant::now());
            }
        }
        bar.finish_and_clear();
        ensure!(p.images > 0, "epoch {} saw no images", epoch + 1);
        Ok(Some(p))
    }

    /// The error that stops a run, pointing at what can be resumed.
    fn stopped(&self, why: &str) -> anyhow::Error {
        match &self.checkpoint_at {
            Some(at) => anyhow::anyhow!(
                "{why}; stopping, nothing after the last checkpoint was saved. The last good \
                 checkpoint is {} ({at})",
                self.run_dir.join(CHECKPOINT).display(),
            ),
            None => anyhow::anyhow!("{why}; stopping, before the run's first checkpoint"),
        }
    }

    fn mixup(&self, num_classes: usize) -> Option<Mixup> {
        let c = &self.cfg.mixup;
        if c.mixup_alpha <= 0.0 && c.cutmix_alpha <= 0.0 {
            return None;
        }
        let mut m = Mixup::new(num_classes);
        m.mixup_alpha = c.mixup_alpha;
        m.cutmix_alpha = c.cutmix_alpha;
        m.prob = c.prob;
        m.switch_prob = c.switch_prob;
        m.label_smoothing = self.cfg.train.label_smoothing;
        Some(m)
    }

    /// Forward, loss and backward of one (micro-)batch; returns the loss and the flat
    /// gradients (None when the loss is not finite).
    fn train_step(
        &mut self,
        images: &Tensor<f32>,
        targets: &Tensor<f32>,
        epoch: usize,
        step: usize,
    ) -> Result<(f64, Option<Tensor<f32>>)> {
        let (rank, world) = self.train_loader.shard_of();
        let mut rng = stream(self.cfg.train.seed, epoch, step * world + rank, 2);
        let kd = match (&self.cfg.kd, self.teacher.as_mut()) {
            (Some(kd), Some(teacher)) => Some(step::Kd {
                teacher,
                alpha: kd.alpha,
                temperature: kd.temperature,
            }),
            _ => None,
        };
        let loss = step::Loss {
            targets: step::Targets::Soft(targets),
            kd,
        };
        let out = step::forward_backward(&mut self.model, images, loss, true, Some(&mut rng))?;
        Ok((out.loss, out.grads))
    }

    fn weights_meta(&self, source: &str, epoch: usize) -> HashMap<String, String> {
        HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("ghostv3.model".to_string(), self.cfg.model.name.clone()),
            ("ghostv3.form".to_string(), "train".to_string()),
            ("ghostv3.source".to_string(), source.to_string()),
            ("ghostv3.epoch".to_string(), epoch.to_string()),
            (
                "ghostv3.classes".to_string(),
                serde_json::to_string(&self.class_names).unwrap_or_default(),
            ),
        ])
    }

    /// Host copies of what a checkpoint holds: the model state, and every tensor of the file
    /// (model, `optim.*` moments, `ema.*` averages).
    fn checkpoint_tensors(&self) -> Result<(crate::nn::State, BTreeMap<String, TensorData>)> {
        let host = self.model.state().to_host()?;
        let mut t = state_tensors(&host);
        for (k, v) in self.update.optimizer.state() {
            t.insert(format!("optim.{k}"), TensorData::F32(vec![v.len()], v));
        }
        if let Some(ema) = &self.update.ema {
            for (k, v) in ema.state() {
                t.insert(format!("ema.{k}"), TensorData::F32(vec![v.len()], v));
            }
        }
        Ok((host, t))
    }

    /// Writes the checkpoint atomically: the tensors, the trainer state (with the epoch's
    /// progress when written inside it), the run's identity and its recipe, under one digest.
    fn write_checkpoint(
        &mut self,
        tensors: BTreeMap<String, TensorData>,
        progress: Option<&Progress>,
    ) -> Result<()> {
        let info = CheckpointInfo {
            epoch: self.epoch,
            best_top1: self.best_top1,
            progress: progress.cloned(),
            run_id: self.run_id.clone(),
        };
        let info = serde_json::to_string(&info)?;
        let recipe = self.cfg.to_toml()?;
        let mut meta = self.weights_meta("checkpoint", self.epoch);
        meta.insert(INFO_DIGEST_KEY.to_string(), info_digest(&info, &recipe));
        meta.insert(INFO_KEY.to_string(), info);
        meta.insert(RECIPE_KEY.to_string(), recipe);
        write_tensors(&self.run_dir.join(CHECKPOINT), &tensors, Some(meta))?;
        self.checkpoint_at = Some(progress_at(self.epoch, progress));
        Ok(())
    }

    /// A checkpoint inside the epoch at `p`, after the finite-state guard.
    fn save_partial(&mut self, p: &Progress) -> Result<()> {
        let at = progress_at(self.epoch, Some(p));
        let (_, tensors) = self.checkpoint_tensors()?;
        guard::check_tensors(&tensors).map_err(|e| self.stopped(&format!("{e} {at}")))?;
        self.write_checkpoint(tensors, Some(p))
    }

    /// Folds the best weights into the deploy form (`deploy.safetensors`).
    fn finish(&mut self) -> Result<()> {
        if !self.writes {
            return Ok(());
        }
        let best = self.run_dir.join("best.safetensors");
        let mut m = models::create(&self.cfg.model.name, &models::detect_options(&best)?)?;
        load_state(m.state_mut(), &best)?;
        // A model trained without branches (rep_branches = 0) is already in its plain form.
        let d = if m.is_deploy() { m } else { reparam::fold(&m)? };
        let mut meta = self.weights_meta("best", self.epoch);
        meta.insert("ghostv3.form".to_string(), "deploy".to_string());
        crate::io::save_state(d.state(), &self.run_dir.join("deploy.safetensors"), meta)?;
        self.say(&format!(
            "best val top-1 {:.2}%; deploy weights (folded) in {}",
            100.0 * self.best_top1,
            self.run_dir.join("deploy.safetensors").display()
        ));
        Ok(())
    }
}

/// A model's figures on a validation set.
#[derive(Clone, Debug)]
pub struct Eval {
    /// Top-1 and top-k accuracy (k = min(5, classes)) and mean cross-entropy over `images`.
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    /// Images scored.
    pub images: usize,
    /// Images that could not be read (not scored), by path.
    pub skipped: Vec<String>,
}

impl Eval {
    /// ", N unreadable images not scored" (empty when none), for the line that reports it.
    pub fn skipped_note(&self) -> String {
        match self.skipped.len() {
            0 => String::new(),
            n => format!(", {n} unreadable image(s) not scored"),
        }
    }
}

/// A model's [`Eval`] on a loader, eval mode, on the device the model's state is on.
pub fn evaluate(model: &mut Model, loader: &Loader) -> Result<Eval> {
    let device = model.state().device();
    evaluate_with(loader, |x| {
        Ok(model.predict(&x.to_device(device)?).to_host())
    })
}

/// `evaluate` with any function from an image batch to logits (e.g. the fast inference path).
pub fn evaluate_with(
    loader: &Loader,
    predict: impl FnMut(&Tensor<f32>) -> Result<Tensor<f32>>,
) -> Result<Eval> {
    let c = eval_counts(loader, predict)?;
    Eval::from_counts(c)
}

/// What an evaluation counts, before the ratios: (images, top-1 right, top-k right, summed
/// loss, unreadable images). A data-parallel rank's shard may be empty.
pub(crate) type EvalCounts = (usize, usize, usize, f64, Vec<String>);

impl Eval {
    pub(crate) fn from_counts((n, c1, c5, loss, skipped): EvalCounts) -> Result<Eval> {
        ensure!(
            n > 0,
            "the validation set is empty ({} unreadable images skipped)",
            skipped.len()
        );
        Ok(Eval {
            top1: c1 as f64 / n as f64,
            top5: c5 as f64 / n as f64,
            loss: loss / n as f64,
            images: n,
            skipped,
        })
    }
}

pub(crate) fn eval_counts(
    loader: &Loader,
    mut predict: impl FnMut(&Tensor<f32>) -> Result<Tensor<f32>>,
) -> Result<EvalCounts> {
    let (mut n, mut c1, mut c5, mut loss) = (0usize, 0usize, 0usize, 0.0f64);
    let mut skipped = Vec::new();
    for batch in loader.epoch(0) {
        let batch = batch?;
        skipped.extend(batch.skipped.iter().cloned());
        if batch.is_empty() {
            continue;
        }
        let logits = predict(&batch.images)?;
        // NaN logits would score as chance with a finite-looking loss: broken weights, not data.
        if let Some(i) = logits.data().iter().position(|v| !v.is_finite()) {
            bail!(
                "the model's output {} is {} (image {} of the set): its weights or running \
                 statistics are broken",
                i,
                logits.data()[i],
                n + i / logits.shape()[1].max(1)
            );
        }
        let (b, k) = (logits.shape()[0], logits.shape()[1]);
        for i in 0..b {
            let row = &logits.data()[i * k..(i + 1) * k];
            let label = batch.labels[i];
            let mut order: Vec<usize> = (0..k).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            c1 += (order[0] == label) as usize;
            c5 += order[..k.min(5)].contains(&label) as usize;
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
            let lse = row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
            loss += lse - row[label] as f64;
        }
        n += b;
    }
    Ok((n, c1, c5, loss, skipped))
}
