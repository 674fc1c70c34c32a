//! AdamW with the semantics of `torch.optim.AdamW` (decoupled weight decay):
//!
//! ```text
//! g          = g * min(max_grad_norm / (||g||_global + 1e-6), 1)   (torch clip_grad_norm_, optional)
//! p          = p * (1 - lr * wd)                                  (wd = 0 for no-decay tensors)
//! exp_avg    = lerp(exp_avg, g, 1 - b1)
//! exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * g^2
//! p          = p - (lr / bc1) * exp_avg / (sqrt(exp_avg_sq) / sqrt(bc2) + eps)
//! ```

use super::ema::run_step;
use super::{adam_state, check_lr, load_adam_state, place, validate_adam, Ema, Layout, Optimizer};
use crate::backend::api::optim::{AdamWScalars, Optim, PlanSlot};
use crate::on_backend;
use crate::tensor::storage::Place;
use crate::tensor::Tensor;
use anyhow::Result;

/// Hyperparameters of [`AdamW`]; `Default` is PyTorch's `AdamW(...)` defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWOptions {
    pub betas: (f64, f64),
    pub eps: f64,
    /// Decoupled decay, applied to the layout's decay tensors only.
    pub weight_decay: f64,
    /// Global gradient-norm clip (PyTorch `clip_grad_norm_` semantics); `None` turns it off.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWOptions {
    fn default() -> Self {
        AdamWOptions {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: None,
        }
    }
}

impl AdamWOptions {
    pub fn validate(&self) -> Result<()> {
        validate_adam(self.betas, self.eps, self.weight_decay)?;
        super::clip_option(self.max_grad_norm)?;
        Ok(())
    }
}

pub struct AdamW {
    layout: Layout,
    opts: AdamWOptions,
    exp_avg: Tensor<f32>,
    exp_avg_sq: Tensor<f32>,
    plan: PlanSlot,
    step: u64,
}

impl AdamW {
    pub fn new(layout: Layout, opts: AdamWOptions) -> AdamW {
        opts.validate().expect("invalid AdamW options");
        let n = layout.numel();
        AdamW {
            layout,
            opts,
            exp_avg: Tensor::zeros(&[n]),
            exp_avg_sq: Tensor::zeros(&[n]),
            plan: PlanSlot::default(),
            step: 0,
        }
    }

    pub fn options(&self) -> &AdamWOptions {
        &self.opts
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// PyTorch's scalars of step number `self.step`, computed in f64 (Python floats) and
    /// applied as f32.
    fn scalars(&self, lr: f64) -> AdamWScalars {
        let t = self.step as f64;
        let (b1, b2) = self.opts.betas;
        let (bc1, bc2) = (1.0 - b1.powf(t), 1.0 - b2.powf(t));
        AdamWScalars {
            w1: (1.0 - b1) as f32,
            b2: b2 as f32,
            w2: (1.0 - b2) as f32,
            neg_step: (-(lr / bc1)) as f32,
            sqrt_bc2: bc2.sqrt() as f32,
            eps: self.opts.eps as f32,
            decay: (1.0 - lr * self.opts.weight_decay) as f32,
            // torch clip_grad_norm_: min(max_norm / (||g|| + 1e-6), 1) in f32.
            max_grad_norm: self.opts.max_grad_norm.map(|m| m as f32),
        }
    }

    fn step_on<B: Place<f32> + Optim>(
        &mut self,
        b: &B,
        params: &mut Tensor<f32>,
        grads: &Tensor<f32>,
        k: &AdamWScalars,
        ema: Option<(&mut Ema, &Tensor<f32>)>,
    ) -> Result<()> {
        place(&mut self.exp_avg, b.device())?;
        place(&mut self.exp_avg_sq, b.device())?;
        let plan = self.plan.get(b, self.layout.table())?;
        let (m, v) = (&mut self.exp_avg, &mut self.exp_avg_sq);
        run_step(b, params, grads, ema, |s| {
            b.adamw_step(plan, s, &mut b.get_mut(m), &mut b.get_mut(v), k)
        })
    }
}

impl Optimizer for AdamW {
    fn step(
        &mut self,
        params: &mut Tensor<f32>,
        grads: &Tensor<f32>,
        lr: f64,
        ema: Option<(&mut Ema, &Tensor<f32>)>,
    ) -> Result<()> {
        self.layout.check("adamw", params.numel(), grads.numel());
        check_lr("adamw", lr);
        self.step += 1;
        let k = self.scalars(lr);
        on_backend!([&*params], |b| self.step_on(b, params, grads, &k, ema))
    }

    fn state(&self) -> Vec<(String, Vec<f32>)> {
        adam_state(&self.exp_avg, &self.exp_avg_sq, self.step)
    }

    fn load_state(&mut self, state: &[(String, Vec<f32>)]) -> Result<()> {
        let (m, v, step) = load_adam_state("adamw", state, self.layout.numel())?;
        (self.exp_avg, self.exp_avg_sq, self.step) = (m, v, step);
        Ok(())
    }

    fn name(&self) -> &str {
        "adamw"
    }

    fn steps(&self) -> u64 {
        self.step
    }
}
