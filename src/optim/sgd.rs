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

use super::ema::run_step;
use super::{check_lr, decode_step, encode_step, host, match_state, place, Ema, Layout, Optimizer};
use crate::backend::api::optim::{Optim, PlanSlot, SgdScalars};
use crate::on_backend;
use crate::tensor::storage::Place;
use crate::tensor::Tensor;
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

impl SgdOptions {
    pub fn validate(&self) -> Result<()> {
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
}

pub struct Sgd {
    layout: Layout,
    opts: SgdOptions,
    /// None when momentum is 0 (PyTorch keeps no buffer then); it holds the chunks back to back.
    momentum_buffer: Option<Tensor<f32>>,
    plan: PlanSlot,
    step: u64,
}

impl Sgd {
    pub fn new(layout: Layout, opts: SgdOptions) -> Sgd {
        opts.validate().expect("invalid SGD options");
        let momentum_buffer = (opts.momentum != 0.0).then(|| Tensor::zeros(&[layout.numel()]));
        Sgd {
            layout,
            opts,
            momentum_buffer,
            plan: PlanSlot::default(),
            step: 0,
        }
    }

    pub fn options(&self) -> &SgdOptions {
        &self.opts
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The f32 scalars of a step with learning rate `lr`.
    fn scalars(&self, lr: f64) -> SgdScalars {
        SgdScalars {
            wd: self.opts.weight_decay as f32,
            momentum: self.opts.momentum as f32,
            neg_lr: -lr as f32,
            nesterov: self.opts.nesterov,
            // torch clip_grad_norm_: min(max_norm / (||g|| + 1e-6), 1) in f32.
            max_grad_norm: self.opts.max_grad_norm.map(|m| m as f32),
        }
    }

    fn step_on<B: Place<f32> + Optim>(
        &mut self,
        b: &B,
        params: &mut Tensor<f32>,
        grads: &Tensor<f32>,
        k: &SgdScalars,
        ema: Option<(&mut Ema, &Tensor<f32>)>,
    ) -> Result<()> {
        if let Some(m) = self.momentum_buffer.as_mut() {
            place(m, b.device())?;
        }
        let plan = self.plan.get(b, self.layout.table())?;
        let m = self.momentum_buffer.as_mut();
        run_step(b, params, grads, ema, |s| match m {
            Some(m) => b.sgd_step(plan, s, Some(&mut b.get_mut(m)), k),
            None => b.sgd_step(plan, s, None, k),
        })
    }
}

impl Optimizer for Sgd {
    fn step(
        &mut self,
        params: &mut Tensor<f32>,
        grads: &Tensor<f32>,
        lr: f64,
        ema: Option<(&mut Ema, &Tensor<f32>)>,
    ) -> Result<()> {
        self.layout.check("sgd", params.numel(), grads.numel());
        check_lr("sgd", lr);
        self.step += 1;
        let k = self.scalars(lr);
        on_backend!([&*params], |b| self.step_on(b, params, grads, &k, ema))
    }

    fn state(&self) -> Vec<(String, Vec<f32>)> {
        let mut s = Vec::new();
        if let Some(b) = &self.momentum_buffer {
            s.push(("momentum_buffer".into(), b.to_host().into_vec()));
        }
        s.push(("step".into(), encode_step(self.step)));
        s
    }

    fn load_state(&mut self, state: &[(String, Vec<f32>)]) -> Result<()> {
        let n = self.momentum_buffer.as_ref().map_or(0, |b| b.numel());
        let expected: &[(&str, usize)] = if self.momentum_buffer.is_some() {
            &[("momentum_buffer", n), ("step", 2)]
        } else {
            &[("step", 2)]
        };
        let b = match_state("sgd", state, expected)?;
        let step = decode_step("step", b[b.len() - 1])?;
        if let Some(m) = self.momentum_buffer.as_mut() {
            *m = host(b[0]);
        }
        self.step = step;
        Ok(())
    }

    fn name(&self) -> &str {
        "sgd"
    }

    fn steps(&self) -> u64 {
        self.step
    }
}
