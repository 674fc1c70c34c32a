//! LAMB with the semantics of `timm.optim.Lamb` (the paper's optimizer, spec section 9c):
//!
//! ```text
//! clip       = max(||g||_global / max_grad_norm, 1)         (only if max_grad_norm is set)
//! g          = g / clip
//! exp_avg    = b1 * exp_avg + (1 - b1) * g                  (as timm: lerp(exp_avg, g, 1 - b1))
//! exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * g^2
//! update     = (exp_avg / bc1) / (sqrt(exp_avg_sq) / sqrt(bc2) + eps)
//! if wd != 0:  update += wd * p                               (L2 in the update, not decoupled)
//!              trust = ||p|| / ||update||  (1 if either is 0) (always_adapt=False)
//! p         -= lr * trust * update
//! ```
//!
//! `wd` is 0 for the layout's no-decay tensors (timm's factory groups). timm defaults that are
//! fixed here: bias_correction, grad_averaging, no trust_clip, no caution, coupled decay.
//! Scalars are rounded to f32 before use, as PyTorch does with Python floats on f32 tensors.

use super::ema::run_step;
use super::{adam_state, check_lr, load_adam_state, place, validate_adam, Ema, Layout, Optimizer};
use crate::backend::api::optim::{LambScalars, Optim, PlanSlot};
use crate::on_backend;
use crate::tensor::storage::Place;
use crate::tensor::Tensor;
use anyhow::Result;

/// Hyperparameters of [`Lamb`]; `Default` is timm's `Lamb(...)` defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct LambOptions {
    pub betas: (f64, f64),
    pub eps: f64,
    /// Applied to the layout's decay tensors only.
    pub weight_decay: f64,
    /// Global gradient-norm clip inside the optimizer; `None` turns it off.
    pub max_grad_norm: Option<f64>,
}

impl Default for LambOptions {
    fn default() -> Self {
        LambOptions {
            betas: (0.9, 0.999),
            eps: 1e-6,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
        }
    }
}

impl LambOptions {
    pub fn validate(&self) -> Result<()> {
        validate_adam(self.betas, self.eps, self.weight_decay)?;
        super::clip_option(self.max_grad_norm)?;
        Ok(())
    }
}

pub struct Lamb {
    layout: Layout,
    opts: LambOptions,
    exp_avg: Tensor<f32>,
    exp_avg_sq: Tensor<f32>,
    /// The backend's tables for this layout (on the CPU also the update scratch).
    plan: PlanSlot,
    step: u64,
}

impl Lamb {
    pub fn new(layout: Layout, opts: LambOptions) -> Lamb {
        opts.validate().expect("invalid LAMB options");
        let n = layout.numel();
        Lamb {
            layout,
            opts,
            exp_avg: Tensor::zeros(&[n]),
            exp_avg_sq: Tensor::zeros(&[n]),
            plan: PlanSlot::default(),
            step: 0,
        }
    }

    pub fn options(&self) -> &LambOptions {
        &self.opts
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The first moment (a 1-D tensor on the device of the last step's parameters).
    pub fn exp_avg(&self) -> &Tensor<f32> {
        &self.exp_avg
    }

    /// The second moment (a 1-D tensor on the device of the last step's parameters).
    pub fn exp_avg_sq(&self) -> &Tensor<f32> {
        &self.exp_avg_sq
    }

    /// The f32 scalars of step number `self.step` with learning rate `lr`.
    fn scalars(&self, lr: f64) -> LambScalars {
        let t = self.step as f64;
        let (b1, b2) = self.opts.betas;
        // Python float math, as timm (`beta1 ** step` is C pow): f64, then used as f32 scalars.
        let (bc1, bc2) = (1.0 - b1.powf(t), 1.0 - b2.powf(t));
        LambScalars {
            one_minus_b1: (1.0 - b1) as f32,
            b2: b2 as f32,
            one_minus_b2: (1.0 - b2) as f32,
            bc1: bc1 as f32,
            sqrt_bc2: bc2.sqrt() as f32,
            eps: self.opts.eps as f32,
            neg_lr: -lr as f32,
            wd: self.opts.weight_decay as f32,
            // f32 tensor math in timm: (global_norm / max_grad_norm).clamp_(min=1.0).
            max_grad_norm: self.opts.max_grad_norm.map(|m| m as f32),
        }
    }

    fn step_on<B: Place<f32> + Optim>(
        &mut self,
        b: &B,
        params: &mut Tensor<f32>,
        grads: &Tensor<f32>,
        k: &LambScalars,
        ema: Option<(&mut Ema, &Tensor<f32>)>,
    ) -> Result<()> {
        place(&mut self.exp_avg, b.device())?;
        place(&mut self.exp_avg_sq, b.device())?;
        let plan = self.plan.get(b, self.layout.table())?;
        let (m, v) = (&mut self.exp_avg, &mut self.exp_avg_sq);
        run_step(b, params, grads, ema, |s| {
            b.lamb_step(plan, s, &mut b.get_mut(m), &mut b.get_mut(v), k)
        })
    }
}

impl Optimizer for Lamb {
    fn step(
        &mut self,
        params: &mut Tensor<f32>,
        grads: &Tensor<f32>,
        lr: f64,
        ema: Option<(&mut Ema, &Tensor<f32>)>,
    ) -> Result<()> {
        self.layout.check("lamb", params.numel(), grads.numel());
        check_lr("lamb", lr);
        self.step += 1;
        let k = self.scalars(lr);
        on_backend!([&*params], |b| self.step_on(b, params, grads, &k, ema))
    }

    fn state(&self) -> Vec<(String, Vec<f32>)> {
        adam_state(&self.exp_avg, &self.exp_avg_sq, self.step)
    }

    fn load_state(&mut self, state: &[(String, Vec<f32>)]) -> Result<()> {
        let (m, v, step) = load_adam_state("lamb", state, self.layout.numel())?;
        (self.exp_avg, self.exp_avg_sq, self.step) = (m, v, step);
        Ok(())
    }

    fn name(&self) -> &str {
        "lamb"
    }

    fn steps(&self) -> u64 {
        self.step
    }
}
