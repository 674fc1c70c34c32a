//! One training step, the only one: the trainer, `ghostv3 forward --grads`, the tests and the
//! benches all run it. Forward of the model in train mode on the device its state lives on
//! (the batch goes there first), the loss (cross-entropy against soft targets or hard labels,
//! plus KD against a teacher's eval-mode logits), backward, the gradients gathered into one flat
//! buffer, then one optimizer pass with the EMA.

use crate::autograd::{Profile, Tape};
use crate::models::Model;
use crate::nn::Mode;
use crate::ops;
use crate::optim::Update;
use crate::tensor::Tensor;
use anyhow::Result;
use rand::rngs::StdRng;

/// What the loss compares the logits with.
pub enum Targets<'a> {
    /// Per-row target distributions [N, C] (label smoothing and Mixup/CutMix already applied).
    Soft(&'a Tensor<f32>),
    /// Class indices, with PyTorch's `label_smoothing`.
    Labels { labels: &'a [usize], smoothing: f64 },
}

/// Knowledge distillation: loss = (1 - alpha) CE + alpha t^2 KL(p_teacher || p_student).
pub struct Kd<'a> {
    pub teacher: &'a mut Model,
    pub alpha: f64,
    pub temperature: f64,
}

/// The loss of one step.
pub struct Loss<'a> {
    pub targets: Targets<'a>,
    pub kd: Option<Kd<'a>>,
}

impl<'a> Loss<'a> {
    /// Cross-entropy against `targets` alone.
    pub fn ce(targets: Targets<'a>) -> Self {
        Loss { targets, kd: None }
    }
}

/// Forward and backward of one batch.
pub struct Backward {
    /// The loss value (non-finite: backward was not run and `grads` is None).
    pub loss: f64,
    /// The train-mode logits, on the model's device.
    pub logits: Tensor<f32>,
    /// The gradient of every parameter laid out like the flat parameter buffer (zeros for
    /// parameters the forward did not use), on the model's device.
    pub grads: Option<Tensor<f32>>,
}

/// Forward in train mode (`dropout` on or off; its draws and the model's other random choices
/// come from `rng`), the loss and backward. BN running statistics are updated as in PyTorch.
pub fn forward_backward(
    model: &mut Model,
    images: &Tensor<f32>,
    loss: Loss<'_>,
    dropout: bool,
    rng: Option<&mut StdRng>,
) -> Result<Backward> {
    on_tape(&mut Tape::new(), model, images, loss, dropout, rng)
    // The tape (and its views of the parameters) is dropped here: the update can be in place.
}

/// [`forward_backward`] with every op of the tape timed (`ghostv3 bench --train --profile`).
pub fn forward_backward_profiled(
    model: &mut Model,
    images: &Tensor<f32>,
    loss: Loss<'_>,
) -> Result<(Backward, Profile)> {
    let mut tape = Tape::new();
    tape.enable_profile();
    let b = on_tape(&mut tape, model, images, loss, false, None)?;
    let profile = tape.profile().cloned().unwrap_or_default();
    Ok((b, profile))
}

fn on_tape(
    tape: &mut Tape<f32>,
    model: &mut Model,
    images: &Tensor<f32>,
    loss: Loss<'_>,
    dropout: bool,
    rng: Option<&mut StdRng>,
) -> Result<Backward> {
    let x = images.to_device(model.state().device())?;
    let Loss { targets, kd } = loss;
    let teacher = match kd {
        Some(kd) => Some((kd.teacher.predict(&x), kd.alpha, kd.temperature)),
        None => None,
    };
    let xv = tape.constant(x);
    let (logits, leaves) = model.forward(tape, xv, Mode::Train { dropout }, rng);
    let ce = match targets {
        Targets::Soft(q) => ops::cross_entropy_soft(tape, logits, q),
        Targets::Labels { labels, smoothing } => {
            ops::cross_entropy(tape, logits, labels, smoothing)
        }
    };
    let lv = match teacher {
        Some((tl, alpha, t)) => {
            let kl = ops::kd_loss(tape, logits, &tl, t);
            let a = alpha as f32;
            let ce_w = ops::scale(tape, ce, 1.0 - a);
            let kl_w = ops::scale(tape, kl, a);
            ops::add(tape, ce_w, kl_w)
        }
        None => ce,
    };
    let value = tape.value(lv).to_host().data()[0] as f64;
    let logits = tape.value(logits).clone();
    if !value.is_finite() {
        return Ok(Backward {
            loss: value,
            logits,
            grads: None,
        });
    }
    let grads = tape.backward(lv);
    let flat = leaves.flat_grads(model.state(), &grads);
    Ok(Backward {
        loss: value,
        logits,
        grads: Some(flat),
    })
}

/// One optimizer pass over the model's flat parameters (in place, on their device), with the
/// EMA of the weights and running statistics when the update has one.
pub fn apply(model: &mut Model, update: &mut Update, grads: &Tensor<f32>, lr: f64) -> Result<()> {
    let st = model.state_mut();
    update.step(st.params.tensor_mut(), st.buffers.tensor(), grads, lr)
}

/// The whole step: [`forward_backward`], then [`apply`] unless the loss is not finite.
pub fn step(
    model: &mut Model,
    update: &mut Update,
    images: &Tensor<f32>,
    loss: Loss<'_>,
    dropout: bool,
    rng: Option<&mut StdRng>,
    lr: f64,
) -> Result<Backward> {
    let b = forward_backward(model, images, loss, dropout, rng)?;
    if let Some(g) = &b.grads {
        apply(model, update, g, lr)?;
    }
    Ok(b)
}

/// Gradient accumulation (`train.accum_steps`): the flat gradients of several micro-batches,
/// each from its own forward (with its own BN batch statistics), averaged into one optimizer
/// step. That is what data-parallel ranks compute together, each on one micro-batch.
#[derive(Default)]
pub struct GradAccum {
    sum: Option<Tensor<f32>>,
    count: usize,
}

impl GradAccum {
    /// Adds one micro-batch's gradients (on their device).
    pub fn add(&mut self, grads: Tensor<f32>) {
        self.sum = Some(match self.sum.take() {
            None => grads,
            Some(s) => s.add(&grads),
        });
        self.count += 1;
    }

    /// Micro-batches added since the last [`GradAccum::take_mean`].
    pub fn count(&self) -> usize {
        self.count
    }

    /// The mean of the gradients added (each micro-batch's loss is already a mean over its
    /// samples, so this is the gradient of the mean loss over equal micro-batches), and
    /// empties the accumulator. None when nothing was added.
    pub fn take_mean(&mut self) -> Option<Tensor<f32>> {
        let n = std::mem::take(&mut self.count);
        let s = self.sum.take()?;
        Some(if n == 1 { s } else { s.scale(1.0 / n as f64) })
    }
}
