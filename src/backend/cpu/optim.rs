//! The optimizer loops on the CPU: LAMB, AdamW, SGD and the EMA blend over flat f32 slices, in
//! parallel chunks (rayon) with deterministic reductions, so a resumed run has the same bits.
//!
//! The kernels take their slices as arguments and are not inlined: LLVM then knows that the
//! buffers do not alias and vectorizes the loops (with slices read from a struct they stayed
//! scalar and the LAMB step took 1.7x as long).
//!
//! Each loop that writes a parameter or moment also ORs whether what it wrote is finite into a
//! per-chunk flag (branch-free, so the loops still vectorize); the chunks' flags end in the
//! plan's `nonfinite` ([`Optim::take_nonfinite`]).

use super::Cpu;
use crate::backend::api::optim::{
    lamb_clip, torch_clip, AdamWScalars, Chunk, EmaCoef, FlatTable, LambScalars, Optim, SgdScalars,
    Step, CHUNK,
};
use anyhow::Result;
use rayon::prelude::*;

/// The CPU's plan: the table, and LAMB's update scratch (made on its first step).
pub struct CpuPlan {
    table: FlatTable,
    /// The update of every decayed tensor, kept between LAMB's norm pass and its apply pass so
    /// that the divisions and square roots run once per element (they bound the CPU step).
    update: Vec<f32>,
    /// A step since the last `take_nonfinite` wrote a NaN or infinite parameter or moment.
    nonfinite: bool,
}

/// Whether `a` or `b` is NaN or +-Inf: `x - x` is 0 for a finite `x` and NaN otherwise (fewer
/// vector operations than an `is_finite` each).
#[inline(always)]
#[allow(clippy::eq_op)] // `x - x` on purpose
fn bad2(a: f32, b: f32) -> bool {
    ((a - a) + (b - b)).is_nan()
}

/// Whether an Adam-type element update (AdamW, LAMB without decay) wrote a non-finite `p`, `m`
/// or `v`, from the new `p` and `v` alone: a non-finite `m` makes the step `m / denom`, and so
/// `p`, non-finite (lr = 0 too: -0 * inf is NaN), while an infinite `v` does not (the step
/// becomes 0). `(p - p) * v` is 0 when both are finite and NaN otherwise (`v >= 0`).
#[inline(always)]
#[allow(clippy::eq_op)]
fn adam_bad(p: f32, v: f32) -> bool {
    ((p - p) * v).is_nan()
}

/// Successive disjoint mutable slices of `buf`, one per chunk (chunks are sorted and disjoint),
/// without allocating a table of them.
fn split_chunks_mut<'a>(
    chunks: &'a [Chunk],
    buf: &'a mut [f32],
) -> impl Iterator<Item = &'a mut [f32]> + 'a {
    let mut rest = buf;
    let mut pos = 0;
    chunks.iter().map(move |c| {
        let taken = std::mem::take(&mut rest);
        let (_, tail) = taken.split_at_mut(c.offset - pos);
        let (s, tail) = tail.split_at_mut(c.len);
        rest = tail;
        pos = c.offset + c.len;
        s
    })
}

/// Sum of squares, accumulated in f32 lanes over short blocks (vectorizes) and in f64 across
/// blocks (accurate for millions of elements). Deterministic: fixed order.
pub fn sum_sq(x: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut total = 0f64;
    for block in x.chunks(1024) {
        let mut acc = [0f32; LANES];
        let mut it = block.chunks_exact(LANES);
        for c in &mut it {
            for i in 0..LANES {
                acc[i] += c[i] * c[i];
            }
        }
        let mut s: f32 = it.remainder().iter().map(|v| v * v).sum();
        s += acc.iter().sum::<f32>();
        total += s as f64;
    }
    total
}

/// Global L2 norm of the gradient over the table's chunks, computed chunk-parallel with a
/// deterministic reduction (the same bits every run, so a resumed run matches).
pub fn global_grad_norm(chunks: &[Chunk], grads: &[f32]) -> f64 {
    let mut partial = vec![0f64; chunks.len()];
    partial
        .par_iter_mut()
        .zip(chunks.par_iter())
        .for_each(|(s, c)| *s = sum_sq(&grads[c.offset..c.offset + c.len]));
    partial.iter().sum::<f64>().sqrt()
}

/// PyTorch's `clip_grad_norm_` factor, multiplied into the gradient (AdamW and SGD); 1 without
/// clipping.
fn torch_clip_coef(chunks: &[Chunk], grads: &[f32], max_norm: Option<f32>) -> f32 {
    match max_norm {
        None => 1.0,
        // f32 tensor math, as torch: the norm is an f32 tensor.
        Some(m) => torch_clip(global_grad_norm(chunks, grads) as f32, m),
    }
}

/// `e = d * e + (1 - d) * x`, chunk-parallel; `d` and `1 - d` are f32 scalars as in PyTorch.
fn blend(ema: &mut [f32], x: &[f32], k: EmaCoef) {
    let (d, w) = (k.d, k.w);
    ema.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(e, x)| blend_chunk(e, x, d, w));
}

/// Not inlined, so that LLVM knows `e` and `x` do not alias and vectorizes the loop.
#[inline(never)]
fn blend_chunk(e: &mut [f32], x: &[f32], d: f32, w: f32) {
    for (e, &x) in e.iter_mut().zip(x) {
        *e = d * *e + w * x;
    }
}

// ---------------------------------------------------------------------------------------------
// LAMB

/// Per-step f32 scalars of the LAMB element update.
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
/// summed in f32 lanes within 1 Ki blocks and in f64 across blocks, in a fixed order, and
/// whether a moment is not finite.
#[inline(never)]
fn moments_and_norms<const CLIP: bool>(
    k: Coef,
    wd: f32,
    p: &[f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    u: &mut [f32],
) -> (f64, f64, bool) {
    let (mut sp, mut su, mut bad) = (0f64, 0f64, false);
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
            bad |= bad2(*m, *v);
        }
        // The norms in a second loop over the block, still in L1: mixed into the loop above the
        // lane reductions defeat the vectorizer.
        sp += sum_sq(p);
        su += sum_sq(u);
    }
    (sp, su, bad)
}

/// `p += -lr * (update * trust)`, timm's `update.mul_(trust)` then `p.add_(update, alpha=-lr)`;
/// whether a new `p` is not finite.
#[inline(never)]
fn apply(p: &mut [f32], u: &[f32], neg_lr: f32, trust: f32) -> bool {
    let mut bad = false;
    for (p, &u) in p.iter_mut().zip(u) {
        *p += neg_lr * (u * trust);
        bad |= !p.is_finite();
    }
    bad
}

/// Moments and parameter update in one pass, for tensors without weight decay (no trust ratio);
/// whether a new value is not finite.
#[inline(never)]
fn fused_no_decay<const CLIP: bool>(
    k: Coef,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    neg_lr: f32,
) -> bool {
    let mut bad = false;
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *p += neg_lr * k.update::<CLIP, false>(0.0, *p, g, m, v);
        bad |= adam_bad(*p, *v);
    }
    bad
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

/// Pass 1 over one chunk; finishes it unless it is part of a larger decayed tensor. Whether
/// it wrote a non-finite value.
fn first_pass<const CLIP: bool>(k: &Coef, w: &mut Work, neg_lr: f32) -> bool {
    if w.wd == 0.0 {
        fused_no_decay::<CLIP>(*k, w.p, w.g, w.m, w.v, neg_lr)
    } else {
        let (sp, su, mut bad) = moments_and_norms::<CLIP>(*k, w.wd, w.p, w.g, w.m, w.v, w.u);
        w.sums = (sp, su);
        if w.chunk.whole {
            // Still in cache: apply right away.
            bad |= apply(w.p, w.u, neg_lr, trust_ratio(sp, su));
        }
        bad
    }
}

fn lamb(
    plan: &mut CpuPlan,
    params: &mut [f32],
    grads: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    s: &LambScalars,
) {
    let table = &plan.table;
    let chunks = &table.chunks[..];
    let clip = match s.max_grad_norm {
        // f32 tensor math in timm: (global_norm / max_grad_norm).clamp_(min=1.0).
        Some(max) => lamb_clip(global_grad_norm(chunks, grads) as f32, max),
        None => 1.0,
    };
    let k = Coef {
        one_minus_b1: s.one_minus_b1,
        b2: s.b2,
        one_minus_b2: s.one_minus_b2,
        bc1: s.bc1,
        sqrt_bc2: s.sqrt_bc2,
        eps: s.eps,
        clip,
    };
    let neg_lr = s.neg_lr;
    let wd = s.wd;
    let wd_of = |c: &Chunk| if table.decay[c.tensor] { wd } else { 0.0 };
    let decayed: usize = chunks
        .iter()
        .filter(|c| wd_of(c) != 0.0)
        .map(|c| c.len)
        .sum();
    if plan.update.len() != decayed {
        plan.update = vec![0.0; decayed];
    }

    let mut scratch: &mut [f32] = &mut plan.update;
    let mut work: Vec<Work> = chunks
        .iter()
        .zip(split_chunks_mut(chunks, params))
        .zip(split_chunks_mut(chunks, exp_avg))
        .zip(split_chunks_mut(chunks, exp_avg_sq))
        .map(|(((c, p), m), v)| {
            let wd = wd_of(c);
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
    // map + reduce, not `any`: every chunk must run.
    let mut bad = work
        .par_iter_mut()
        .map(|w| {
            if clipping {
                first_pass::<true>(&k, w, neg_lr)
            } else {
                first_pass::<false>(&k, w, neg_lr)
            }
        })
        .reduce(|| false, |a, b| a | b);

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
        bad |= work
            .par_iter_mut()
            .filter(|w| !w.chunk.whole && w.wd != 0.0)
            .map(|w| {
                let i = trust.partition_point(|&(t, _)| t < w.chunk.tensor);
                apply(w.p, w.u, neg_lr, trust[i].1)
            })
            .reduce(|| false, |a, b| a | b);
    }
    plan.nonfinite |= bad;
}

// ---------------------------------------------------------------------------------------------
// AdamW

/// AdamW's per-step f32 scalars with the clip factor of this step.
struct AdamCoef {
    clip: f32,
    w1: f32,
    b2: f32,
    w2: f32,
    neg_step: f32,
    sqrt_bc2: f32,
    eps: f32,
}

/// One AdamW chunk; whether a new value is not finite.
#[inline(never)]
fn adamw_kernel(
    k: &AdamCoef,
    decay: f32,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) -> bool {
    let mut bad = false;
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * k.clip;
        *p *= decay;
        // torch.lerp with a small weight: m + w * (g - m).
        *m += k.w1 * (g - *m);
        *v = k.b2 * *v + k.w2 * g * g;
        let denom = v.sqrt() / k.sqrt_bc2 + k.eps;
        *p += k.neg_step * (*m / denom);
        bad |= adam_bad(*p, *v);
    }
    bad
}

/// Whether it wrote a non-finite value.
fn adamw(
    table: &FlatTable,
    params: &mut [f32],
    grads: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    s: &AdamWScalars,
) -> bool {
    let chunks = &table.chunks[..];
    let k = AdamCoef {
        clip: torch_clip_coef(chunks, grads, s.max_grad_norm),
        w1: s.w1,
        b2: s.b2,
        w2: s.w2,
        neg_step: s.neg_step,
        sqrt_bc2: s.sqrt_bc2,
        eps: s.eps,
    };
    let decay = s.decay;
    chunks
        .iter()
        .zip(split_chunks_mut(chunks, params))
        .zip(split_chunks_mut(chunks, exp_avg))
        .zip(split_chunks_mut(chunks, exp_avg_sq))
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|(((c, p), m), v)| {
            let g = &grads[c.offset..c.offset + c.len];
            // p * 1.0 is exact, so the no-decay group needs no branch in the loop.
            let decay = if table.decay[c.tensor] { decay } else { 1.0 };
            adamw_kernel(&k, decay, p, g, m, v)
        })
        .reduce(|| false, |a, b| a | b)
}

// ---------------------------------------------------------------------------------------------
// SGD

/// (clip coefficient, weight decay, momentum, -lr) as f32.
type Scalars = (f32, f32, f32, f32);

/// Whether a new value is not finite (also [`momentum`]).
#[inline(never)]
fn plain((coef, wd, _, neg_lr): Scalars, p: &mut [f32], g: &[f32]) -> bool {
    let mut bad = false;
    for (p, &g) in p.iter_mut().zip(g) {
        let g = g * coef + wd * *p;
        *p += neg_lr * g;
        bad |= !p.is_finite();
    }
    bad
}

#[inline(never)]
fn momentum<const NESTEROV: bool>(
    (coef, wd, mom, neg_lr): Scalars,
    p: &mut [f32],
    g: &[f32],
    buf: &mut [f32],
) -> bool {
    let mut bad = false;
    for ((p, &g), b) in p.iter_mut().zip(g).zip(buf.iter_mut()) {
        let g = g * coef + wd * *p;
        *b = mom * *b + g;
        let d = if NESTEROV { g + mom * *b } else { *b };
        *p += neg_lr * d;
        // p alone: a non-finite `b` makes `d` and then `p` non-finite (momentum > 0, finite lr;
        // -0 * inf is NaN).
        bad |= !p.is_finite();
    }
    bad
}

/// Whether it wrote a non-finite value.
fn sgd(
    table: &FlatTable,
    params: &mut [f32],
    grads: &[f32],
    momentum_buffer: Option<&mut [f32]>,
    s: &SgdScalars,
) -> bool {
    let chunks = &table.chunks[..];
    let coef = torch_clip_coef(chunks, grads, s.max_grad_norm);
    let (wd, mom, nesterov, neg_lr) = (s.wd, s.momentum, s.nesterov, s.neg_lr);
    let wd_of = |t: usize| if table.decay[t] { wd } else { 0.0 };
    // A zero buffer makes the first step `buf = g` exactly, as PyTorch's clone; without
    // momentum there is no buffer and `buf` below is an empty slice per chunk.
    let mut buf: &mut [f32] = momentum_buffer.unwrap_or_default();
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
        .map(|(c, p, b)| {
            let g = &grads[c.offset..c.offset + c.len];
            let k = (coef, wd_of(c.tensor), mom, neg_lr);
            match (with_buf, nesterov) {
                (false, _) => plain(k, p, g),
                (true, false) => momentum::<false>(k, p, g, b),
                (true, true) => momentum::<true>(k, p, g, b),
            }
        })
        .reduce(|| false, |a, b| a | b)
}

impl Optim for Cpu {
    type Plan = CpuPlan;

    fn optim_plan(&self, table: &FlatTable) -> Result<CpuPlan> {
        Ok(CpuPlan {
            table: table.clone(),
            update: Vec::new(),
            nonfinite: false,
        })
    }

    fn lamb_step(
        &self,
        plan: &mut CpuPlan,
        s: Step<'_, [f32]>,
        exp_avg: &mut [f32],
        exp_avg_sq: &mut [f32],
        k: &LambScalars,
    ) -> Result<()> {
        lamb(plan, s.params, s.grads, exp_avg, exp_avg_sq, k);
        if let Some((e, c)) = s.ema {
            blend(e, s.params, c);
        }
        Ok(())
    }

    fn adamw_step(
        &self,
        plan: &mut CpuPlan,
        s: Step<'_, [f32]>,
        exp_avg: &mut [f32],
        exp_avg_sq: &mut [f32],
        k: &AdamWScalars,
    ) -> Result<()> {
        plan.nonfinite |= adamw(&plan.table, s.params, s.grads, exp_avg, exp_avg_sq, k);
        if let Some((e, c)) = s.ema {
            blend(e, s.params, c);
        }
        Ok(())
    }

    fn sgd_step(
        &self,
        plan: &mut CpuPlan,
        s: Step<'_, [f32]>,
        momentum: Option<&mut [f32]>,
        k: &SgdScalars,
    ) -> Result<()> {
        plan.nonfinite |= sgd(&plan.table, s.params, s.grads, momentum, k);
        if let Some((e, c)) = s.ema {
            blend(e, s.params, c);
        }
        Ok(())
    }

    fn ema_blend(&self, e: &mut [f32], x: &[f32], k: EmaCoef) -> Result<()> {
        blend(e, x, k);
        Ok(())
    }

    fn take_nonfinite(&self, plan: &mut CpuPlan) -> Result<bool> {
        Ok(std::mem::take(&mut plan.nonfinite))
    }
}
