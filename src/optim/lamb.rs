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

use super::flat::{Flat, Rule};
use super::{validate_adam, ADAM_MOMENTS};
use crate::backend::api::optim::{LambScalars, Optim, Step};
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

/// LAMB over flat buffers.
pub type Lamb = Flat<LambOptions>;

impl Rule for LambOptions {
    type Scalars = LambScalars;
    const NAME: &'static str = "lamb";

    fn validate(&self) -> Result<()> {
        validate_adam(self.betas, self.eps, self.weight_decay, self.max_grad_norm)
    }

    fn moments(&self) -> &'static [&'static str] {
        ADAM_MOMENTS
    }

    fn scalars(&self, step: u64, lr: f64) -> LambScalars {
        let t = step as f64;
        let (b1, b2) = self.betas;
        // Python float math, as timm (`beta1 ** step` is C pow): f64, then used as f32 scalars.
        let (bc1, bc2) = (1.0 - b1.powf(t), 1.0 - b2.powf(t));
        LambScalars {
            one_minus_b1: (1.0 - b1) as f32,
            b2: b2 as f32,
            one_minus_b2: (1.0 - b2) as f32,
            bc1: bc1 as f32,
            sqrt_bc2: bc2.sqrt() as f32,
            eps: self.eps as f32,
            neg_lr: -lr as f32,
            wd: self.weight_decay as f32,
            // f32 tensor math in timm: (global_norm / max_grad_norm).clamp_(min=1.0).
            max_grad_norm: self.max_grad_norm.map(|m| m as f32),
        }
    }

    fn run<B: Optim>(
        b: &B,
        plan: &mut B::Plan,
        s: Step<'_, B::Buf>,
        moments: &mut [&mut B::Buf],
        k: &LambScalars,
    ) -> Result<()> {
        let [m, v] = moments else {
            unreachable!("two moments")
        };
        b.lamb_step(plan, s, m, v, k)
    }
}
