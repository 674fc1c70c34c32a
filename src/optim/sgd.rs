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

use super::{
    check_lr, decode_step, encode_step, match_state, split_chunks_mut, torch_clip_coef, Layout,
    Optimizer,
};
use anyhow::{ensure, Result};
use rayon::prelude::*;

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
    /// Empty when momentum is 0 (PyTorch keeps no buffer then).
    momentum_buffer: Vec<f32>,
    step: u64,
}

/// (clip coefficient, weight decay, momentum, -lr) as f32.
type Scalars = (f32, f32, f32, f32);

// The kernels take slices as arguments and are not inlined, so that LLVM knows the buffers do
// not alias and vectorizes the loops.

#[inline(never)]
fn plain((coef, wd, _, neg_lr): Scalars, p: &mut [f32], g: &[f32]) {
    for (p, &g) in p.iter_mut().zip(g) {
        let g = g * coef + wd * *p;
        *p += neg_lr * g;
    }
}

#[inline(never)]
fn momentum<const NESTEROV: bool>(
    (coef, wd, mom, neg_lr): Scalars,
    p: &mut [f32],
    g: &[f32],
    buf: &mut [f32],
) {
    for ((p, &g), b) in p.iter_mut().zip(g).zip(buf.iter_mut()) {
        let g = g * coef + wd * *p;
        *b = mom * *b + g;
        let d = if NESTEROV { g + mom * *b } else { *b };
        *p += neg_lr * d;
    }
}

impl Sgd {
    pub fn new(layout: Layout, opts: SgdOptions) -> Sgd {
        opts.validate().expect("invalid SGD options");
        let n = if opts.momentum != 0.0 {
            layout.numel()
        } else {
            0
        };
        Sgd {
            layout,
            opts,
            momentum_buffer: vec![0.0; n],
            step: 0,
        }
    }

    pub fn options(&self) -> &SgdOptions {
        &self.opts
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64) {
        self.layout.check("sgd", params, grads);
        check_lr("sgd", lr);
        self.step += 1;
        let coef = torch_clip_coef(&self.layout, grads, self.opts.max_grad_norm);
        let wd = self.opts.weight_decay as f32;
        let mom = self.opts.momentum as f32;
        let nesterov = self.opts.nesterov;
        let neg_lr = -lr as f32;

        let layout = &self.layout;
        let chunks = layout.chunks();
        let wd_of = |t: usize| if layout.entries()[t].decay { wd } else { 0.0 };
        // A zero buffer makes the first step `buf = g` exactly, as PyTorch's clone; without
        // momentum the buffer is empty and `buf` below is an empty slice per chunk.
        let mut buf: &mut [f32] = &mut self.momentum_buffer;
        let with_buf = !buf.is_empty();
        chunks
            .iter()
            .zip(split_chunks_mut(chunks, params))
            .map(|(c, p)| {
                let take = if with_buf { c.len } else { 0 };
                let (b, rest) = std::mem::take(&mut buf).split_at_mut(take);
                buf = rest;
                (c, p, b)
            })
            .collect::<Vec<_>>()
            .into_par_iter()
            .for_each(|(c, p, b)| {
                let g = &grads[c.offset..c.offset + c.len];
                let k = (coef, wd_of(c.tensor), mom, neg_lr);
                match (with_buf, nesterov) {
                    (false, _) => plain(k, p, g),
                    (true, false) => momentum::<false>(k, p, g, b),
                    (true, true) => momentum::<true>(k, p, g, b),
                }
            });
    }

    fn state(&self) -> Vec<(String, Vec<f32>)> {
        let mut s = Vec::new();
        if !self.momentum_buffer.is_empty() {
            s.push(("momentum_buffer".into(), self.momentum_buffer.clone()));
        }
        s.push(("step".into(), encode_step(self.step)));
        s
    }

    fn load_state(&mut self, state: &[(String, Vec<f32>)]) -> Result<()> {
        let n = self.momentum_buffer.len();
        let expected: &[(&str, usize)] = if n > 0 {
            &[("momentum_buffer", n), ("step", 2)]
        } else {
            &[("step", 2)]
        };
        let b = match_state("sgd", state, expected)?;
        let step = decode_step("step", b[b.len() - 1])?;
        if n > 0 {
            self.momentum_buffer.copy_from_slice(b[0]);
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
