//! The training step timed (`ghostv3 bench --train`): the whole step of the default recipe
//! (forward in train mode, cross-entropy with label smoothing 0.1, backward, LAMB and the EMA),
//! on random images, on the device the model's state lives on; the median step, images/s, and
//! one profiled step's time per op (forward and backward) and in the optimizer pass; and on a
//! device, the step's bytes and launches counted (`train::traffic`).

use super::config::TrainConfig;
use super::step::{self, Loss, Targets};
use super::traffic::{self, StepTraffic};
use crate::autograd::Profile;
use crate::backend::trace::{self, Phase};
use crate::infer::bench::{random_input, time_runs, BenchConfig, BenchReport};
use crate::models::Model;
use crate::optim::{Ema, Layout, Update};
use crate::tensor::Tensor;
use anyhow::{anyhow, ensure, Result};
use std::time::Instant;

/// A timed training step.
pub struct StepReport {
    pub report: BenchReport,
    /// One more step, every op timed (forward + loss + backward).
    pub profile: Profile,
    /// That step's optimizer + EMA pass, in ms.
    pub update_ms: f64,
}

/// Times `cfg.batch` images of `cfg.size` px through the default recipe's step on `model`
/// (whose weights it trains: random input, labels 0, 1, 2, ...).
pub fn bench_step(model: &mut Model, cfg: &BenchConfig) -> Result<StepReport> {
    cfg.validate()?;
    let recipe = TrainConfig::from_toml(TrainConfig::default_recipe(), &[], "the default recipe")?;
    let mut update = new_update(model, &recipe)?;
    let (b, s) = (cfg.batch, cfg.size);
    let x = Tensor::new(&[b, 3, s, s], random_input(b, s, 0));
    let classes = model.num_classes();
    let labels: Vec<usize> = (0..b).map(|i| i % classes).collect();
    let lr = recipe.train.lr;
    let targets = || Targets::Labels {
        labels: &labels,
        smoothing: 0.1,
    };
    let report = time_runs(cfg, || {
        let out = step::step(model, &mut update, &x, Loss::ce(targets()), false, None, lr)?;
        ensure!(
            out.loss.is_finite(),
            "bench --train: the loss is {}",
            out.loss
        );
        Ok(())
    })?;
    let (out, profile) = step::forward_backward_profiled(model, &x, Loss::ce(targets()))?;
    let t0 = Instant::now();
    if let Some(g) = &out.grads {
        step::apply(model, &mut update, g, lr)?;
    }
    model.state().params.tensor().to_host(); // waits for a device's queue
    let update_ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(StepReport {
        report,
        profile,
        update_ms,
    })
}

/// The default recipe's whole step on random images of any batch, for counting.
pub struct StepRunner {
    update: Update,
    lr: f64,
}

impl StepRunner {
    pub fn new(model: &Model) -> Result<Self> {
        let recipe =
            TrainConfig::from_toml(TrainConfig::default_recipe(), &[], "the default recipe")?;
        Ok(StepRunner {
            update: new_update(model, &recipe)?,
            lr: recipe.train.lr,
        })
    }

    /// One step on `batch` random images of `size` px; the device work is labelled by phase
    /// for `backend::trace` (the tape labels the forward and backward ops).
    pub fn run(&mut self, model: &mut Model, size: usize, batch: usize) -> Result<()> {
        let classes = model.num_classes();
        let x = Tensor::new(&[batch, 3, size, size], random_input(batch, size, 0));
        let labels: Vec<usize> = (0..batch).map(|i| i % classes).collect();
        let targets = Targets::Labels {
            labels: &labels,
            smoothing: 0.1,
        };
        let out = step::forward_backward(model, &x, Loss::ce(targets), false, None)?;
        trace::label("grad_gather", Phase::Update, None);
        let g = out
            .grads
            .ok_or_else(|| anyhow!("the loss is {}", out.loss))?;
        step::apply(model, &mut self.update, &g, self.lr)?;
        model.state().params.tensor().to_host(); // waits for the device's queue
        trace::label("lamb+ema", Phase::Update, None);
        Ok(())
    }
}

/// The bytes, FLOPs and launches of the default recipe's step on `model`'s device (CUDA: the
/// device backend records them; `train::traffic`), counted at `batches` of `size` px.
pub fn count_step(
    model: &mut Model,
    name: &str,
    size: usize,
    batches: [usize; 3],
) -> Result<StepTraffic> {
    let mut runner = StepRunner::new(model)?;
    let form = if model.is_deploy() {
        "deploy form"
    } else {
        "train form"
    };
    traffic::count_step(name, form, size, batches, |b| runner.run(model, size, b))
}

/// The default recipe's optimizer (and EMA) for `model`'s parameters.
fn new_update(model: &Model, recipe: &TrainConfig) -> Result<Update> {
    let st = model.state();
    let layout = Layout::from_store(&st.params);
    let ema = match &recipe.ema {
        Some(e) => Some(Ema::new(
            e.clone(),
            st.params.tensor(),
            st.buffers.tensor(),
        )?),
        None => None,
    };
    Update::new(&recipe.optimizer, &layout, ema)
}
