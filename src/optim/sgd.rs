//! SGD with the semantics of `torch.optim.SGD` (dampening 0):
//!
//! ```text
//! g   = g * min(max_grad_norm / (||g||_global + 1e-6), 1)   (torch clip_grad_norm_, optional)
//! g   = g + wd * p                                          (L2; wd = 0 for no-decay tensors)
//! buf = momentum * buf + g                                  (first step: buf = g)
//! g   = nesterov ? g + momentum * buf : buf
//! p   = p - lr * g
//! ```
//!
//! Defaults are timm's `--opt sgd`, which is Nesterov SGD with momentum 0.9.

use super::flat::{Flat, Rule};
use crate::backend::api::optim::{Optim, SgdScalars, Step};
use anyhow::{ensure, Result};

/// Hyperparameters of [`Sgd`]; `Default` is timm's `--opt sgd` (momentum 0.9, Nesterov, no decay).
#[derive(Clone, Debug, PartialEq)]
pub struct SgdOptions {
    pub momentum: f64,
    pub nesterov: bool,
    /// L2 decay added to the gradient, for the layout's decay tensors only.
    pub weight_decay: f64,
    /// Global gradient-norm clip (PyTorch `clip_grad_norm_` semantics); `None` turns it off.
    pub max_grad_norm: Option<f64>,
}

impl Default for SgdOptions {
    fn default() -> Self {
        SgdOptions {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.0,
            max_grad_norm: None,
        }
    }
}

/// SGD over flat buffers; the momentum buffer holds the chunks back to back, and there is none
/// when momentum is 0 (PyTorch keeps no buffer then).
pub type Sgd = Flat<SgdOptions>;

impl Rule for SgdOptions {
    type Scalars = SgdScalars;
    const NAME: &'static str = "sgd";

    fn validate(&self) -> Result<()> {
        ensure!(
            self.momentum.is_finite() && self.momentum >= 0.0,
            "momentum must be >= 0, got {}",
            self.momentum
        );
        // PyTorch raises the same: "Nesterov momentum requires a momentum and zero dampening".
        ensure!(
            !self.nesterov || self.momentum > 0.0,
            "nesterov requires momentum > 0"
        );
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "weight_decay must be >= 0, got {}",
            self.weight_decay
        );
        super::clip_option(self.max_grad_norm)?;
        Ok(())
    }

    fn moments(&self) -> &'static [&'static str] {
        if self.momentum != 0.0 {
            &["momentum_buffer"]
        } else {
            &[]
        }
    }

    fn scalars(&self, _step: u64, lr: f64) -> SgdScalars {
        SgdScalars {
            wd: self.weight_decay as f32,
            momentum: self.momentum as f32,
            neg_lr: -lr as f32,
            nesterov: self.nesterov,
            // torch clip_grad_norm_: min(max_norm / (||g|| + 1e-6), 1) in f32.
            max_grad_norm: self.max_grad_norm.map(|m| m as f32),
        }
    }

    fn run<B: Optim>(
        b: &B,
        plan: &mut B::Plan,
        s: Step<'_, B::Buf>,
        moments: &mut [&mut B::Buf],
        k: &SgdScalars,
    ) -> Result<()> {
        b.sgd_step(plan, s, moments.first_mut().map(|m| &mut **m), k)
    }
}
