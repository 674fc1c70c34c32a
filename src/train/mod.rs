//! The trainer: the paper's recipe end to end on the CPU backend.
//!
//! One epoch: loader batches (augmented on worker threads) -> optional Mixup/CutMix -> forward
//! of the re-parameterized train form (tape) -> loss (label-smoothed CE, plus KD against a teacher
//! run in eval mode on the same batch) -> backward -> one optimizer pass over the flat buffers ->
//! EMA update. Then eval of the model and its EMA, `metrics.jsonl`, an atomic checkpoint.
//!
//! Every random stream derives from (seed, epoch, step or sample index), so resuming from the
//! checkpoint of epoch k continues exactly as the uninterrupted run would.
//!
//! The step itself is [`step::step`]. With `train.device = "cuda"` the same step runs on the
//! GPU: parameters, BN running statistics, optimizer moments and the EMA live there (their
//! tensors' storage is on the device); batches go up through pinned buffers one step ahead;
//! evaluation runs there. Files are written from host copies in the CPU run's format, so a run
//! can resume on either device.

pub mod config;
pub mod guard;
pub mod run_dir;
pub mod step;

use crate::data::{self, Batch, Cifar10, Dataset, ImageFolder, Loader, Mixup, Subset, Synthetic};
use crate::io::weights::state_tensors;
use crate::io::{load_state, load_state_from, read_tensors, write_tensors, TensorData};
use crate::models::{self, Model, ModelOptions};
use crate::nn::RepOptions;
use crate::optim::{Ema, Layout, Update};
use crate::tensor::Device;
use crate::{reparam, Tensor};
use anyhow::{bail, ensure, Context, Result};
use config::{DatasetKind, TrainConfig};
use rand::rngs::StdRng;
use run_dir::RunLock;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub const CHECKPOINT: &str = "checkpoint.safetensors";

/// One epoch's figures, as appended to `metrics.jsonl`.
#[derive(Clone, Debug, serde::Serialize)]
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
}

/// What `run` reports at the end.
#[derive(Clone, Debug)]
pub struct Summary {
    pub epochs: Vec<EpochMetrics>,
    pub best_top1: f64,
    pub run_dir: PathBuf,
}

pub struct Trainer {
    pub cfg: TrainConfig,
    pub run_dir: PathBuf,
    pub model: Model,
    ema_model: Option<Model>,
    /// The optimizer and the EMA (`optim::Update`: on the device the parameters are on).
    update: Update,
    teacher: Option<Model>,
    train_loader: Loader,
    val_loader: Loader,
    class_names: Vec<String>,
    /// Epochs completed so far.
    pub epoch: usize,
    best_top1: f64,
    pub quiet: bool,
    /// This trainer is the run directory's one writer while it lives.
    _lock: Option<RunLock>,
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
        crate::io::write_atomic(&run_dir.join("config.toml"), t.cfg.to_toml()?.as_bytes())?;
        Ok(t)
    }

    /// Continues the run in `run_dir` from its last checkpoint: model, optimizer, EMA, schedule
    /// position, epoch and random streams. `sets` may override the stored recipe (e.g. epochs).
    pub fn resume(run_dir: &Path, sets: &[String]) -> Result<Self> {
        let cfg = TrainConfig::load(&run_dir.join("config.toml"), sets)?;
        let lock = RunLock::acquire(run_dir)?;
        let mut t = Self::build(cfg, run_dir)?;
        t._lock = Some(lock);
        let path = run_dir.join(CHECKPOINT);
        let bytes = std::fs::read(&path)
            .with_context(|| format!("no checkpoint to resume: {}", path.display()))?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).context("corrupt checkpoint")?;
        let info = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("ghostv3.trainer"))
            .context("checkpoint without trainer state")?;
        let info: serde_json::Value = serde_json::from_str(info)?;
        drop(bytes);
        let tensors = read_tensors(&path)?;
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
        load_state_from(t.model.state_mut(), &model_t, &path.display().to_string())?;
        t.update.optimizer.load_state(&optim_t)?;
        if let Some(ema) = t.update.ema.as_mut() {
            ema.load_state(&ema_t)?;
        }
        t.epoch = info["epoch"].as_u64().context("epoch")? as usize;
        t.best_top1 = info["best_top1"].as_f64().unwrap_or(0.0);
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
        t.move_to_device()?;
        Ok(t)
    }

    fn build(cfg: TrainConfig, run_dir: &Path) -> Result<Self> {
        let (train_ds, val_ds) = datasets(&cfg)?;
        let num_classes = train_ds.num_classes();
        ensure!(
            val_ds.num_classes() == num_classes,
            "train and val splits have different classes"
        );
        let class_names = train_ds.class_names();
        let m = &cfg.model;
        let opts = ModelOptions {
            num_classes,
            rep: RepOptions {
                branches: m.rep_branches,
                scale: m.rep_scale,
                identity: m.rep_identity,
            },
            deploy: false,
            drop_rate: m.drop_rate,
            seed: cfg.train.seed,
        };
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
            class_names,
            epoch: 0,
            best_top1: -1.0,
            quiet: false,
            _lock: None,
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
    pub fn teacher(&self) -> Option<&Model> {
        self.teacher.as_ref()
    }

    fn say(&self, s: &str) {
        if !self.quiet {
            println!("{s}");
        }
    }

    /// Trains until `train.epochs`, evaluating and checkpointing after every epoch.
    pub fn run(&mut self) -> Result<Summary> {
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
        while self.epoch < self.cfg.train.epochs {
            let m = self.run_epoch()?;
            epochs.push(m);
        }
        self.finish()?;
        Ok(Summary {
            epochs,
            best_top1: self.best_top1,
            run_dir: self.run_dir.clone(),
        })
    }

    /// One epoch: train, evaluate, log, checkpoint.
    pub fn run_epoch(&mut self) -> Result<EpochMetrics> {
        let epoch = self.epoch;
        let t0 = Instant::now();
        let (train_loss, images, skipped, lr) = self.train_epoch(epoch)?;
        let train_s = t0.elapsed().as_secs_f64();
        self.check_finite()
            .map_err(|e| self.stopped(&format!("after epoch {}: {e}", epoch + 1)))?;
        let (top1, top5, val_loss) = evaluate(&mut self.model, &self.val_loader)?;
        let (ema_top1, ema_top5) = match (self.update.ema_tensors(), self.ema_model.as_mut()) {
            (Some((p, b)), Some(em)) => {
                // The EMA model evaluates copies of the average, on the run's device.
                let device = self.cfg.train.device;
                em.state_mut().params.set_tensor(p.to_device(device)?);
                em.state_mut().buffers.set_tensor(b.to_device(device)?);
                let (a, b, _) = evaluate(em, &self.val_loader)?;
                (Some(a), Some(b))
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
            epoch_seconds: t0.elapsed().as_secs_f64(),
            skipped_images: skipped,
        };
        self.epoch = epoch + 1;
        let ema_txt = ema_top1.map_or(String::new(), |e| format!(", EMA top-1 {:.2}%", 100.0 * e));
        self.say(&format!(
            "epoch {}/{}: train loss {:.4}, val top-1 {:.2}% top-5 {:.2}%{ema_txt}, {:.1} img/s, {:.0} s{}",
            m.epoch,
            self.cfg.train.epochs,
            train_loss,
            100.0 * top1,
            100.0 * top5,
            m.images_per_s,
            m.epoch_seconds,
            if skipped > 0 { format!(", {skipped} unreadable images skipped") } else { String::new() }
        ));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.run_dir.join("metrics.jsonl"))
            .context("cannot open metrics.jsonl")?;
        writeln!(f, "{}", serde_json::to_string(&m)?)?;
        // Best weights: the model or its EMA, whichever scores higher.
        let (best_now, from_ema) = match ema_top1 {
            Some(e) if e > top1 => (e, true),
            _ => (top1, false),
        };
        if best_now > self.best_top1 {
            self.best_top1 = best_now;
            let state = if from_ema {
                self.ema_model.as_ref().expect("ema model").state()
            } else {
                self.model.state()
            };
            let meta = self.weights_meta(if from_ema { "ema" } else { "model" }, m.epoch);
            let state = state.to_host()?;
            crate::io::save_state(&state, &self.run_dir.join("best.safetensors"), meta)?;
        }
        self.save_checkpoint()?;
        Ok(m)
    }

    fn train_epoch(&mut self, epoch: usize) -> Result<(f64, usize, usize, f64)> {
        let steps = self.train_loader.batches_per_epoch();
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
            b
        };
        let num_classes = self.model.num_classes();
        let mixup = self.mixup(num_classes);
        let (seed, smoothing) = (self.cfg.train.seed, self.cfg.train.label_smoothing);
        // Batches with their targets (Mixup/CutMix drawn from the step's own stream), in step
        // order; on the GPU they go up through pinned buffers one step ahead of the compute.
        let host = self.train_loader.epoch(epoch).enumerate().map(
            move |(step, batch)| -> Result<(Tensor<f32>, StepBatch)> {
                let Batch {
                    mut images,
                    labels,
                    skipped,
                    ..
                } = batch?;
                let targets = match &mixup {
                    _ if labels.is_empty() => None,
                    Some(mx) => {
                        let mut rng = stream(seed, epoch, step, 1);
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
        let (mut loss_sum, mut images, mut skipped, mut lr) = (0.0, 0usize, 0usize, 0.0);
        let t0 = Instant::now();
        for item in batches {
            let (batch_images, batch) = item?;
            let step = batch.step;
            skipped += batch.skipped.len();
            for s in &batch.skipped {
                bar.suspend(|| eprintln!("warning: skipped unreadable image {s}"));
            }
            let Some(targets) = batch.targets else {
                continue;
            };
            let batch_len = targets.shape()[0];
            lr = self
                .cfg
                .schedule
                .lr_at(self.cfg.train.lr, epoch as f64 + step as f64 / steps as f64);
            let loss = self.train_step(&batch_images, &targets, epoch, step, lr)?;
            let at = format!("at epoch {} step {step} (lr {lr:.3e})", epoch + 1);
            if !loss.is_finite() {
                return Err(self.stopped(&format!("the loss became {loss} {at}")));
            }
            // On the host the parameters are checked after every step (a pass over them costs
            // little next to the step); a device run is checked once per epoch, before saving.
            if self.cfg.train.device == Device::Cpu {
                guard::check_state(self.model.state(), "model")
                    .map_err(|e| self.stopped(&format!("{e} {at}")))?;
            }
            loss_sum += loss * batch_len as f64;
            images += batch_len;
            bar.inc(1);
            bar.set_message(format!(
                "loss {loss:.4} lr {lr:.2e} {:.1} img/s",
                images as f64 / t0.elapsed().as_secs_f64()
            ));
        }
        bar.finish_and_clear();
        ensure!(images > 0, "epoch {} saw no images", epoch + 1);
        Ok((loss_sum / images as f64, images, skipped, lr))
    }

    /// The error that stops a run, pointing at what can be resumed.
    fn stopped(&self, why: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "{why}; stopping, nothing of this epoch was saved. The last good checkpoint is {} \
             (after epoch {})",
            self.run_dir.join(CHECKPOINT).display(),
            self.epoch
        )
    }

    /// The finite-state guard over everything a checkpoint holds.
    fn check_finite(&self) -> Result<()> {
        guard::check_state(&self.model.state().to_host()?, "model")?;
        guard::check_buffers(self.update.optimizer.name(), &self.update.optimizer.state())?;
        if let Some(ema) = &self.update.ema {
            guard::check_buffers("EMA", &ema.state())?;
        }
        Ok(())
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

    /// Forward, loss, backward and the parameter update for one batch; returns the loss.
    fn train_step(
        &mut self,
        images: &Tensor<f32>,
        targets: &Tensor<f32>,
        epoch: usize,
        step: usize,
        lr: f64,
    ) -> Result<f64> {
        let mut rng = stream(self.cfg.train.seed, epoch, step, 2);
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
        let out = step::step(
            &mut self.model,
            &mut self.update,
            images,
            loss,
            true,
            Some(&mut rng),
            lr,
        )?;
        Ok(out.loss)
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

    /// Model, optimizer and EMA state in one atomically written file.
    fn save_checkpoint(&mut self) -> Result<()> {
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
        let mut meta = self.weights_meta("checkpoint", self.epoch);
        let info = serde_json::json!({ "epoch": self.epoch, "best_top1": self.best_top1 });
        meta.insert("ghostv3.trainer".to_string(), info.to_string());
        write_tensors(&self.run_dir.join(CHECKPOINT), &t, Some(meta))?;
        crate::io::save_state(
            &host,
            &self.run_dir.join("last.safetensors"),
            self.weights_meta("model", self.epoch),
        )
    }

    /// Folds the best weights into the deploy form (`deploy.safetensors`).
    fn finish(&mut self) -> Result<()> {
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

/// Top-1, top-5 (top-k with k = min(5, classes)) and mean CE of a model on a loader, eval mode,
/// on the device the model's state is on.
pub fn evaluate(model: &mut Model, loader: &Loader) -> Result<(f64, f64, f64)> {
    let device = model.state().device();
    evaluate_with(loader, |x| {
        Ok(model.predict(&x.to_device(device)?).to_host())
    })
}

/// `evaluate` with any function from an image batch to logits (e.g. the fast inference path).
pub fn evaluate_with(
    loader: &Loader,
    mut predict: impl FnMut(&Tensor<f32>) -> Result<Tensor<f32>>,
) -> Result<(f64, f64, f64)> {
    let (mut n, mut c1, mut c5, mut loss) = (0usize, 0usize, 0usize, 0.0f64);
    for batch in loader.epoch(0) {
        let batch = batch?;
        if batch.is_empty() {
            continue;
        }
        let logits = predict(&batch.images)?;
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
    ensure!(n > 0, "the validation set is empty");
    Ok((c1 as f64 / n as f64, c5 as f64 / n as f64, loss / n as f64))
}
