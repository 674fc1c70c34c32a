//! Optimizer updates over flat f32 buffers: LAMB, AdamW and SGD, each one pass (or a fixed few)
//! over the parameter, gradient and moment buffers with the EMA of the weights where the pass
//! has it, and the EMA blend alone.
//!
//! The backends only run the element loops: which tensor is where comes as a [`FlatTable`]
//! (the chunk table of `optim::Layout`), and every per-step scalar (bias corrections, learning
//! rate, decay, the clip threshold, the EMA weights) is computed once in `optim/<name>.rs` and
//! handed down as [`LambScalars`], [`AdamWScalars`], [`SgdScalars`] and [`EmaCoef`]. The clip
//! factor itself needs the gradient's global norm, a reduction each backend computes where the
//! gradient lives; its formula is [`lamb_clip`] / [`torch_clip`] (the CUDA kernels do the same
//! f32 arithmetic).
//!
//! The update passes also watch what they write: a NaN or infinite parameter or moment sets a
//! flag in the plan (in the pass that writes it, no pass of its own), read and cleared by
//! [`Optim::take_nonfinite`], so a run can stop at the step that went bad.

use super::Backend;
use anyhow::Result;
use std::any::Any;

/// Largest number of elements one parallel work item touches: 16Ki f32 is 64 KiB per buffer,
/// so the 4-5 buffers of a LAMB chunk stay in L2 between its two passes (on the GPU: one block
/// per chunk).
pub const CHUNK: usize = 16 * 1024;

/// A run of at most [`CHUNK`] elements inside one tensor: the unit of parallel work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Index of the tensor (in [`FlatTable::decay`]).
    pub tensor: usize,
    /// First element in the flat buffer.
    pub offset: usize,
    pub len: usize,
    /// The chunk is the whole tensor, so per-tensor norms are complete after one pass over it.
    pub whole: bool,
}

/// The tensors of a flat buffer as the optimizer kernels see them: the chunks (sorted by
/// offset, disjoint, never across tensors; gaps between tensors are left untouched) and per
/// tensor whether it is in the weight-decay group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlatTable {
    /// Length of the flat buffers.
    pub numel: usize,
    pub chunks: Vec<Chunk>,
    /// Per tensor: in the weight-decay group.
    pub decay: Vec<bool>,
}

impl FlatTable {
    /// Whether the chunks cover the whole buffer (no gaps).
    pub fn dense(&self) -> bool {
        self.chunks.iter().map(|c| c.len).sum::<usize>() == self.numel
    }
}

/// The EMA blend `e = d e + w x` with `d` and `w = 1 - d` rounded to f32 (PyTorch's scalars).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EmaCoef {
    pub d: f32,
    pub w: f32,
}

/// LAMB's per-step f32 scalars (timm.optim.Lamb; see `optim/lamb.rs`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LambScalars {
    pub one_minus_b1: f32,
    pub b2: f32,
    pub one_minus_b2: f32,
    /// Bias corrections 1 - b1^t and sqrt(1 - b2^t).
    pub bc1: f32,
    pub sqrt_bc2: f32,
    pub eps: f32,
    pub neg_lr: f32,
    /// Weight decay of the decay group (the other tensors take none and no trust ratio).
    pub wd: f32,
    /// Global clip threshold: the gradient is divided by [`lamb_clip`]; `None`: no clipping.
    pub max_grad_norm: Option<f32>,
}

/// AdamW's per-step f32 scalars (torch.optim.AdamW; see `optim/adamw.rs`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    /// 1 - b1, b2, 1 - b2.
    pub w1: f32,
    pub b2: f32,
    pub w2: f32,
    /// -lr / (1 - b1^t).
    pub neg_step: f32,
    pub sqrt_bc2: f32,
    pub eps: f32,
    /// 1 - lr wd, the factor of the decay group's parameters.
    pub decay: f32,
    /// Global clip threshold: the gradient is multiplied by [`torch_clip`]; `None`: no clipping.
    pub max_grad_norm: Option<f32>,
}

/// SGD's per-step f32 scalars (torch.optim.SGD, dampening 0; see `optim/sgd.rs`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdScalars {
    /// L2 decay of the decay group.
    pub wd: f32,
    pub momentum: f32,
    pub neg_lr: f32,
    pub nesterov: bool,
    /// Global clip threshold: the gradient is multiplied by [`torch_clip`]; `None`: no clipping.
    pub max_grad_norm: Option<f32>,
}

/// timm LAMB's clip divisor from the f32 global norm: `max(norm / max_grad_norm, 1)`.
pub fn lamb_clip(norm: f32, max_grad_norm: f32) -> f32 {
    (norm / max_grad_norm).max(1.0)
}

/// PyTorch `clip_grad_norm_`'s factor from the f32 global norm: `min(max / (norm + 1e-6), 1)`.
pub fn torch_clip(norm: f32, max_grad_norm: f32) -> f32 {
    (max_grad_norm / (norm + 1e-6)).min(1.0)
}

/// The buffers of one update: the flat parameters (updated in place), the flat gradient, and
/// the EMA of the parameters with its weights when the EMA is blended in the same pass (with
/// the new parameters, after the update).
pub struct Step<'a, B: ?Sized> {
    pub params: &'a mut B,
    pub grads: &'a B,
    pub ema: Option<(&'a mut B, EmaCoef)>,
}

/// The optimizer kernels of a backend. Buffers have the table's length (`momentum`: SGD's
/// buffer holds the chunks back to back); sizes are checked by the caller.
pub trait Optim: Backend<f32> {
    /// A [`FlatTable`] prepared for this backend's kernels (on the GPU: the tables uploaded and
    /// the reduction scratch), kept across steps in a [`PlanSlot`].
    type Plan: Send + 'static;

    fn optim_plan(&self, table: &FlatTable) -> Result<Self::Plan>;

    /// One LAMB step: moments, update, per-tensor trust ratios of the decay group.
    fn lamb_step(
        &self,
        plan: &mut Self::Plan,
        s: Step<'_, Self::Buf>,
        exp_avg: &mut Self::Buf,
        exp_avg_sq: &mut Self::Buf,
        k: &LambScalars,
    ) -> Result<()>;

    /// One AdamW step (decoupled decay).
    fn adamw_step(
        &self,
        plan: &mut Self::Plan,
        s: Step<'_, Self::Buf>,
        exp_avg: &mut Self::Buf,
        exp_avg_sq: &mut Self::Buf,
        k: &AdamWScalars,
    ) -> Result<()>;

    /// One SGD step; `momentum` is the momentum buffer (none without momentum).
    fn sgd_step(
        &self,
        plan: &mut Self::Plan,
        s: Step<'_, Self::Buf>,
        momentum: Option<&mut Self::Buf>,
        k: &SgdScalars,
    ) -> Result<()>;

    /// The EMA blend of a whole buffer: `e = d e + w x` (same lengths).
    fn ema_blend(&self, e: &mut Self::Buf, x: &Self::Buf, k: EmaCoef) -> Result<()>;

    /// Whether a step with `plan` since the last call wrote a non-finite (NaN or +-Inf)
    /// parameter or moment; clears the flag. (The EMA is not watched: it only blends
    /// parameters that were.) On the GPU a 4-byte read, which waits for the queued steps.
    fn take_nonfinite(&self, plan: &mut Self::Plan) -> Result<bool>;
}

/// One optimizer's [`Optim::Plan`], made on the first step on a backend and made again when
/// the steps move to another backend.
#[derive(Default)]
pub struct PlanSlot(Option<Box<dyn Any + Send>>);

impl PlanSlot {
    /// The plan of backend `b` for `table`.
    pub fn get<B: Optim>(&mut self, b: &B, table: &FlatTable) -> Result<&mut B::Plan> {
        if !self.0.as_ref().is_some_and(|p| p.is::<B::Plan>()) {
            self.0 = Some(Box::new(b.optim_plan(table)?));
        }
        Ok(self
            .0
            .as_mut()
            .and_then(|p| p.downcast_mut())
            .expect("the plan was just made"))
    }

    /// [`Optim::take_nonfinite`] of the plan of backend `b`; false when there is none (no step
    /// on `b` yet, or the plan was made again for another backend since).
    pub fn take_nonfinite<B: Optim>(&mut self, b: &B) -> Result<bool> {
        match self.0.as_mut().and_then(|p| p.downcast_mut()) {
            Some(plan) => b.take_nonfinite(plan),
            None => Ok(false),
        }
    }
}
