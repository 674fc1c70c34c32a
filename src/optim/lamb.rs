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

use super::{
    adam_state, check_lr, global_grad_norm, load_adam_state, split_chunks_mut, sum_sq,
    validate_adam, Chunk, Layout, Optimizer,
};
use anyhow::Result;
use rayon::prelude::*;

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
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    /// The update of every decayed tensor, kept between the norm pass and the apply pass so
    /// that the divisions and square roots run once per element (they bound the CPU step).
    update: Vec<f32>,
    step: u64,
}

/// Per-step f32 scalars of the element update.
#[derive(Clone, Copy)]
struct Coef {
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    bc1: f32,
    sqrt_bc2: f32,
    eps: f32,
    /// Global clip divisor, used only when clipping triggers.
    clip: f32,
}

impl Coef {
    /// Moments of one element and its update `(m / bc1) / (sqrt(v) / sqrt(bc2) + eps)
    /// [+ wd * p]`, in timm's order of operations. `CLIP` and `WD` are compile-time so the loops
    /// have no branches and vectorize.
    #[inline(always)]
    fn update<const CLIP: bool, const WD: bool>(
        &self,
        wd: f32,
        p: f32,
        g: f32,
        m: &mut f32,
        v: &mut f32,
    ) -> f32 {
        let g = if CLIP { g / self.clip } else { g };
        // timm: exp_avg.lerp_(grad, 1 - b1); torch's lerp for a weight < 0.5 is m + w (g - m).
        *m += self.one_minus_b1 * (g - *m);
        *v = self.b2 * *v + self.one_minus_b2 * g * g;
        let u = (*m / self.bc1) / (v.sqrt() / self.sqrt_bc2 + self.eps);
        if WD {
            u + wd * p
        } else {
            u
        }
    }
}

/// One chunk's slices plus its partial norms.
struct Work<'a> {
    chunk: &'a Chunk,
    p: &'a mut [f32],
    g: &'a [f32],
    m: &'a mut [f32],
    v: &'a mut [f32],
    /// Update scratch; empty for tensors without weight decay.
    u: &'a mut [f32],
    wd: f32,
    /// (||p||^2, ||update||^2) of this chunk.
    sums: (f64, f64),
}

const BLOCK: usize = 1024;

/// Moments and update of a decayed chunk, stored in `u`; returns (||p||^2, ||update||^2)
/// summed in f32 lanes within 1 Ki blocks and in f64 across blocks, in a fixed order.
///
/// The kernels take their slices as arguments and are not inlined: LLVM then knows that the
/// buffers do not alias and vectorizes the loops (with slices read from a struct they stayed
/// scalar and the step took 1.7x as long).
#[inline(never)]
fn moments_and_norms<const CLIP: bool>(
    k: Coef,
    wd: f32,
    p: &[f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    u: &mut [f32],
) -> (f64, f64) {
    let (mut sp, mut su) = (0f64, 0f64);
    let blocks = p
        .chunks(BLOCK)
        .zip(g.chunks(BLOCK))
        .zip(m.chunks_mut(BLOCK))
        .zip(v.chunks_mut(BLOCK))
        .zip(u.chunks_mut(BLOCK));
    for ((((p, g), m), v), u) in blocks {
        let elems = p
            .iter()
            .zip(g)
            .zip(m.iter_mut())
            .zip(v.iter_mut())
            .zip(u.iter_mut());
        for ((((&p, &g), m), v), u) in elems {
            *u = k.update::<CLIP, true>(wd, p, g, m, v);
        }
        // The norms in a second loop over the block, still in L1: mixed into the loop above the
        // lane reductions defeat the vectorizer.
        sp += sum_sq(p);
        su += sum_sq(u);
    }
    (sp, su)
}

/// `p += -lr * (update * trust)`, timm's `update.mul_(trust)` then `p.add_(update, alpha=-lr)`.
#[inline(never)]
fn apply(p: &mut [f32], u: &[f32], neg_lr: f32, trust: f32) {
    for (p, &u) in p.iter_mut().zip(u) {
        *p += neg_lr * (u * trust);
    }
}

/// Moments and parameter update in one pass, for tensors without weight decay (no trust ratio).
#[inline(never)]
fn fused_no_decay<const CLIP: bool>(
    k: Coef,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    neg_lr: f32,
) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *p += neg_lr * k.update::<CLIP, false>(0.0, *p, g, m, v);
    }
}

/// timm's trust ratio from squared norms: norms are f32 tensors there, so round them first.
fn trust_ratio(sum_p: f64, sum_u: f64) -> f32 {
    let (w, u) = (sum_p.sqrt() as f32, sum_u.sqrt() as f32);
    if w > 0.0 && u > 0.0 {
        w / u
    } else {
        1.0
    }
}

/// Pass 1 over one chunk; finishes it unless it is part of a larger decayed tensor.
fn first_pass<const CLIP: bool>(k: &Coef, w: &mut Work, neg_lr: f32) {
    if w.wd == 0.0 {
        fused_no_decay::<CLIP>(*k, w.p, w.g, w.m, w.v, neg_lr);
    } else {
        w.sums = moments_and_norms::<CLIP>(*k, w.wd, w.p, w.g, w.m, w.v, w.u);
        if w.chunk.whole {
            // Still in cache: apply right away.
            apply(w.p, w.u, neg_lr, trust_ratio(w.sums.0, w.sums.1));
        }
    }
}

impl Lamb {
    pub fn new(layout: Layout, opts: LambOptions) -> Lamb {
        opts.validate().expect("invalid LAMB options");
        let n = layout.numel();
        let decayed = if opts.weight_decay != 0.0 {
            layout
                .entries()
                .iter()
                .filter(|e| e.decay)
                .map(|e| e.len)
                .sum()
        } else {
            0
        };
        Lamb {
            layout,
            opts,
            exp_avg: vec![0.0; n],
            exp_avg_sq: vec![0.0; n],
            update: vec![0.0; decayed],
            step: 0,
        }
    }

    pub fn options(&self) -> &LambOptions {
        &self.opts
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn exp_avg(&self) -> &[f32] {
        &self.exp_avg
    }

    pub fn exp_avg_sq(&self) -> &[f32] {
        &self.exp_avg_sq
    }
}

impl Optimizer for Lamb {
    fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64) {
        self.layout.check("lamb", params, grads);
        check_lr("lamb", lr);
        self.step += 1;
        let t = self.step as f64;
        let (b1, b2) = self.opts.betas;
        // Python float math, as timm (`beta1 ** step` is C pow): f64, then used as f32 scalars.
        let (bc1, bc2) = (1.0 - b1.powf(t), 1.0 - b2.powf(t));
        let clip = match self.opts.max_grad_norm {
            // f32 tensor math in timm: (global_norm / max_grad_norm).clamp_(min=1.0).
            Some(max) => (global_grad_norm(&self.layout, grads) as f32 / max as f32).max(1.0),
            None => 1.0,
        };
        let k = Coef {
            one_minus_b1: (1.0 - b1) as f32,
            b2: b2 as f32,
            one_minus_b2: (1.0 - b2) as f32,
            bc1: bc1 as f32,
            sqrt_bc2: bc2.sqrt() as f32,
            eps: self.opts.eps as f32,
            clip,
        };
        let neg_lr = -lr as f32;
        let wd = self.opts.weight_decay as f32;

        let layout = &self.layout;
        let chunks = layout.chunks();
        let mut scratch: &mut [f32] = &mut self.update;
        let mut work: Vec<Work> = chunks
            .iter()
            .zip(split_chunks_mut(chunks, params))
            .zip(split_chunks_mut(chunks, &mut self.exp_avg))
            .zip(split_chunks_mut(chunks, &mut self.exp_avg_sq))
            .map(|(((c, p), m), v)| {
                let wd = if layout.entries()[c.tensor].decay {
                    wd
                } else {
                    0.0
                };
                // Decayed chunks take the next `len` values of the scratch, in chunk order.
                let take = if wd != 0.0 { c.len } else { 0 };
                let (u, rest) = std::mem::take(&mut scratch).split_at_mut(take);
                scratch = rest;
                Work {
                    chunk: c,
                    p,
                    g: &grads[c.offset..c.offset + c.len],
                    m,
                    v,
                    u,
                    wd,
                    sums: (0.0, 0.0),
                }
            })
            .collect();

        // Pass 1: moments and updates everywhere; tensors without decay and decayed tensors
        // that fit in one chunk finish here, while their data is still in cache.
        let clipping = clip != 1.0;
        work.par_iter_mut().for_each(|w| {
            if clipping {
                first_pass::<true>(&k, w, neg_lr)
            } else {
                first_pass::<false>(&k, w, neg_lr)
            }
        });

        // Decayed tensors over several chunks: reduce the chunks' norms in order (the same bits
        // every run), then pass 2 applies the stored update with the tensor's trust ratio.
        let mut trust = Vec::new();
        for group in work.chunk_by(|a, b| a.chunk.tensor == b.chunk.tensor) {
            if group.len() > 1 && group[0].wd != 0.0 {
                let (sp, su) = group
                    .iter()
                    .fold((0.0, 0.0), |(p, u), w| (p + w.sums.0, u + w.sums.1));
                trust.push((group[0].chunk.tensor, trust_ratio(sp, su)));
            }
        }
        if !trust.is_empty() {
            work.par_iter_mut()
                .filter(|w| !w.chunk.whole && w.wd != 0.0)
                .for_each(|w| {
                    let i = trust.partition_point(|&(t, _)| t < w.chunk.tensor);
                    apply(w.p, w.u, neg_lr, trust[i].1);
                });
        }
    }

    fn state(&self) -> Vec<(String, Vec<f32>)> {
        adam_state(&self.exp_avg, &self.exp_avg_sq, self.step)
    }

    fn load_state(&mut self, state: &[(String, Vec<f32>)]) -> Result<()> {
        self.step = load_adam_state("lamb", state, &mut self.exp_avg, &mut self.exp_avg_sq)?;
        Ok(())
    }

    fn name(&self) -> &str {
        "lamb"
    }

    fn steps(&self) -> u64 {
        self.step
    }
}
