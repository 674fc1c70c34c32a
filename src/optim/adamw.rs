//! AdamW with the semantics of `torch.optim.AdamW` (decoupled weight decay):
//!
//! ```text
//! g          = g * min(max_grad_norm / (||g||_global + 1e-6), 1)   (torch clip_grad_norm_, optional)
//! p          = p * (1 - lr * wd)                                  (wd = 0 for no-decay tensors)
//! exp_avg    = lerp(exp_avg, g, 1 - b1)
//! exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * g^2
//! p          = p - (lr / bc1) * exp_avg / (sqrt(exp_avg_sq) / sqrt(bc2) + eps)
//! ```

use super::flat::{Flat, Rule};
use super::{validate_adam, ADAM_MOMENTS};
use crate::backend::api::optim::{AdamWScalars, Optim, Step};
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

/// AdamW over flat buffers.
pub type AdamW = Flat<AdamWOptions>;

impl Rule for AdamWOptions {
    type Scalars = AdamWScalars;
    const NAME: &'static str = "adamw";

    fn validate(&self) -> Result<()> {
        validate_adam(self.betas, self.eps, self.weight_decay, self.max_grad_norm)
    }

    fn moments(&self) -> &'static [&'static str] {
        ADAM_MOMENTS
    }

    /// PyTorch's scalars, computed in f64 (Python floats) and applied as f32.
    fn scalars(&self, step: u64, lr: f64) -> AdamWScalars {
        let (b1, b2) = self.betas;
        let t = step as f64;
        let (bc1, bc2) = (1.0 - b1.powf(t), 1.0 - b2.powf(t));
        AdamWScalars {
            w1: (1.0 - b1) as f32,
            b2: b2 as f32,
            w2: (1.0 - b2) as f32,
            neg_step: (-(lr / bc1)) as f32,
            sqrt_bc2: bc2.sqrt() as f32,
            eps: self.eps as f32,
            decay: (1.0 - lr * self.weight_decay) as f32,
            // torch clip_grad_norm_: min(max_norm / (||g|| + 1e-6), 1) in f32.
            max_grad_norm: self.max_grad_norm.map(|m| m as f32),
        }
    }

    fn run<B: Optim>(
        b: &B,
        plan: &mut B::Plan,
        s: Step<'_, B::Buf>,
        moments: &mut [&mut B::Buf],
        k: &AdamWScalars,
    ) -> Result<()> {
        let [exp_avg, exp_avg_sq] = moments else {
            unreachable!("AdamW keeps two moments")
        };
        b.adamw_step(plan, s, exp_avg, exp_avg_sq, k)
    }
}
