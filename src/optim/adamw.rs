//! AdamW with the semantics of `torch.optim.AdamW` (decoupled weight decay):
//!
//! ```text
//! g          = g * min(max_grad_norm / (||g||_global + 1e-6), 1)   (torch clip_grad_norm_, optional)
//! p          = p * (1 - lr * wd)                                  (wd = 0 for no-decay tensors)
//! exp_avg    = lerp(exp_avg, g, 1 - b1)
//! exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * g^2
//! p          = p - (lr / bc1) * exp_avg / (sqrt(exp_avg_sq) / sqrt(bc2) + eps)
//! ```

use super::{
    adam_state, check_lr, load_adam_state, split_chunks_mut, torch_clip_coef, validate_adam,
    Layout, Optimizer,
};
use anyhow::Result;
use rayon::prelude::*;

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
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    step: u64,
}

/// Per-step f32 scalars (PyTorch's Python floats, rounded to f32).
struct Coef {
    clip: f32,
    w1: f32,
    b2: f32,
    w2: f32,
    neg_step: f32,
    sqrt_bc2: f32,
    eps: f32,
}

/// One chunk. Slices as arguments and no inlining, so that LLVM knows they do not alias and
/// vectorizes the loop.
#[inline(never)]
fn kernel(k: &Coef, decay: f32, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * k.clip;
        *p *= decay;
        // torch.lerp with a small weight: m + w * (g - m).
        *m += k.w1 * (g - *m);
        *v = k.b2 * *v + k.w2 * g * g;
        let denom = v.sqrt() / k.sqrt_bc2 + k.eps;
        *p += k.neg_step * (*m / denom);
    }
}

impl AdamW {
    pub fn new(layout: Layout, opts: AdamWOptions) -> AdamW {
        opts.validate().expect("invalid AdamW options");
        let n = layout.numel();
        AdamW {
            layout,
            opts,
            exp_avg: vec![0.0; n],
            exp_avg_sq: vec![0.0; n],
            step: 0,
        }
    }

    pub fn options(&self) -> &AdamWOptions {
        &self.opts
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64) {
        self.layout.check("adamw", params, grads);
        check_lr("adamw", lr);
        self.step += 1;
        let t = self.step as f64;
        let (b1, b2) = self.opts.betas;
        let (bc1, bc2) = (1.0 - b1.powf(t), 1.0 - b2.powf(t));
        // PyTorch's scalars, computed in f64 (Python floats) and applied as f32.
        let k = Coef {
            clip: torch_clip_coef(&self.layout, grads, self.opts.max_grad_norm),
            w1: (1.0 - b1) as f32,
            b2: b2 as f32,
            w2: (1.0 - b2) as f32,
            neg_step: (-(lr / bc1)) as f32,
            sqrt_bc2: bc2.sqrt() as f32,
            eps: self.opts.eps as f32,
        };
        let decay = (1.0 - lr * self.opts.weight_decay) as f32;
        let layout = &self.layout;
        let chunks = layout.chunks();
        chunks
            .iter()
            .zip(split_chunks_mut(chunks, params))
            .zip(split_chunks_mut(chunks, &mut self.exp_avg))
            .zip(split_chunks_mut(chunks, &mut self.exp_avg_sq))
            .collect::<Vec<_>>()
            .into_par_iter()
            .for_each(|(((c, p), m), v)| {
                let g = &grads[c.offset..c.offset + c.len];
                // p * 1.0 is exact, so the no-decay group needs no branch in the loop.
                let decay = if layout.entries()[c.tensor].decay {
                    decay
                } else {
                    1.0
                };
                kernel(&k, decay, p, g, m, v);
            });
    }

    fn state(&self) -> Vec<(String, Vec<f32>)> {
        adam_state(&self.exp_avg, &self.exp_avg_sq, self.step)
    }

    fn load_state(&mut self, state: &[(String, Vec<f32>)]) -> Result<()> {
        self.step = load_adam_state("adamw", state, &mut self.exp_avg, &mut self.exp_avg_sq)?;
        Ok(())
    }

    fn name(&self) -> &str {
        "adamw"
    }

    fn steps(&self) -> u64 {
        self.step
    }
}
