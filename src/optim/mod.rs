//! Optimizers (LAMB, AdamW, SGD), the EMA of weights and the learning-rate schedules.
//!
//! Everything works on FLAT buffers (DESIGN.md, "Flat buffers"): parameters, gradients and each
//! moment buffer are one contiguous 1-D tensor described by one [`Layout`], on the CPU or the
//! GPU. A step is a few passes over memory in parallel chunks instead of one small loop per
//! tensor: the loops of `backend::cpu::optim` or the fused kernels of `backend::cuda::optim`,
//! both behind `backend::api::Optim`, chosen by `on_backend!` from where the parameters are.
//! Each optimizer's per-step math (bias corrections, learning rate, decay, clip threshold) is
//! computed once here, in `<name>.rs`, and handed to the backend as plain scalars. Optimizer
//! state lives on the device of the parameters it steps (moved there at a step), and its
//! checkpoint form ([`Optimizer::state`]) is the same host format from either device.
//!
//! Semantics follow timm and PyTorch so that users can compare numbers one to one:
//! [`Lamb`] is `timm.optim.Lamb`, [`AdamW`] is `torch.optim.AdamW`, [`Sgd`] is `torch.optim.SGD`
//! (with timm's `--opt sgd` defaults), [`Ema`] is timm's `ModelEmaV2` (plus optional warm-up) and
//! [`ScheduleConfig`] is timm's cosine/step scheduler.

mod adamw;
mod ema;
mod flat;
mod lamb;
mod schedule;
mod sgd;
mod update;

pub use adamw::{AdamW, AdamWOptions};
pub use ema::{Ema, EmaConfig, EmaWarmup};
pub use flat::{Flat, Rule};
pub use lamb::{Lamb, LambOptions};
pub use schedule::{ScheduleConfig, ScheduleKind};
pub use sgd::{Sgd, SgdOptions};
pub use update::Update;

use crate::backend::api::optim::{Chunk, FlatTable, CHUNK};
use crate::nn::FlatStore;
use crate::tensor::{Device, Tensor};
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

/// One tensor of a flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutEntry {
    pub name: String,
    pub offset: usize,
    pub len: usize,
    pub shape: Vec<usize>,
    /// Whether weight decay applies (timm's decay group); biases and BN affine are excluded.
    pub decay: bool,
}

/// The table of tensors of a flat buffer: (name, offset, len, shape, decay).
///
/// Offsets are increasing and ranges do not overlap (gaps are allowed and left untouched).
#[derive(Clone, Debug)]
pub struct Layout {
    entries: Vec<LayoutEntry>,
    /// The chunks (at most `backend::api::optim::CHUNK` elements, never across tensors) and
    /// decay groups, as the optimizer kernels take them.
    table: FlatTable,
}

/// timm's `param_groups_weight_decay`: 0-D/1-D tensors and `*.bias` go to the no-decay group.
fn timm_decay(name: &str, shape: &[usize]) -> bool {
    shape.len() > 1 && !name.ends_with(".bias")
}

impl Layout {
    /// The layout of a parameter store. `decay` is timm's rule: tensors with more than one
    /// dimension decay; biases and BN weights (1-D) do not.
    pub fn from_store(store: &FlatStore) -> Layout {
        let entries = store
            .entries()
            .iter()
            .map(|e| LayoutEntry {
                name: e.name.clone(),
                offset: e.offset,
                len: e.numel(),
                shape: e.shape.clone(),
                decay: timm_decay(&e.name, &e.shape),
            })
            .collect();
        Layout::from_entries(entries, store.numel()).expect("a FlatStore is a valid layout")
    }

    /// Packs tensors back to back in the given order, with timm's decay rule.
    pub fn from_shapes<S: AsRef<str>>(tensors: &[(S, Vec<usize>)]) -> Layout {
        let mut offset = 0;
        let entries = tensors
            .iter()
            .map(|(name, shape)| {
                let len = shape.iter().product();
                let e = LayoutEntry {
                    name: name.as_ref().to_string(),
                    offset,
                    len,
                    shape: shape.clone(),
                    decay: timm_decay(name.as_ref(), shape),
                };
                offset += len;
                e
            })
            .collect();
        Layout::from_entries(entries, offset).expect("packed shapes are a valid layout")
    }

    /// A layout from explicit entries over a buffer of `numel` scalars. Checks that each `len`
    /// matches its shape, that offsets increase without overlap and that all fits in `numel`.
    pub fn from_entries(entries: Vec<LayoutEntry>, numel: usize) -> Result<Layout> {
        let mut end = 0;
        for e in &entries {
            ensure!(
                e.len == e.shape.iter().product::<usize>(),
                "layout: {} has len {} but shape {:?}",
                e.name,
                e.len,
                e.shape
            );
            ensure!(
                e.offset >= end,
                "layout: {} at offset {} overlaps or precedes the previous tensor (ends at {end})",
                e.name,
                e.offset
            );
            end = e.offset + e.len;
        }
        ensure!(
            end <= numel,
            "layout: tensors end at {end}, past the buffer length {numel}"
        );
        let mut chunks = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let mut start = 0;
            while start < e.len {
                let len = CHUNK.min(e.len - start);
                chunks.push(Chunk {
                    tensor: i,
                    offset: e.offset + start,
                    len,
                    whole: len == e.len,
                });
                start += len;
            }
        }
        let decay = entries.iter().map(|e| e.decay).collect();
        Ok(Layout {
            entries,
            table: FlatTable {
                numel,
                chunks,
                decay,
            },
        })
    }

    pub fn entries(&self) -> &[LayoutEntry] {
        &self.entries
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Length of the flat buffers this layout describes.
    pub fn numel(&self) -> usize {
        self.table.numel
    }

    pub fn find(&self, name: &str) -> Option<&LayoutEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// The chunk table and decay groups, as plain data for the optimizer kernels.
    pub fn table(&self) -> &FlatTable {
        &self.table
    }

    /// Panics with a clear message when a caller hands buffers of the wrong size.
    pub(crate) fn check(&self, what: &str, params: usize, grads: usize) {
        let numel = self.table.numel;
        assert_eq!(
            params, numel,
            "{what}: params have {params} values, layout has {numel}"
        );
        assert_eq!(
            grads, numel,
            "{what}: grads have {grads} values, layout has {numel}"
        );
    }
}

/// Validates an optional `max_grad_norm`: `None` or `0` means no clipping.
pub(crate) fn clip_option(max_grad_norm: Option<f64>) -> Result<Option<f64>> {
    match max_grad_norm {
        None => Ok(None),
        Some(0.0) => Ok(None),
        Some(m) if m.is_finite() && m > 0.0 => Ok(Some(m)),
        Some(m) => bail!("max_grad_norm must be positive (0 turns clipping off), got {m}"),
    }
}

/// `t` on `device`: moved there when it is elsewhere (an optimizer's state follows the
/// parameters it steps). The old handle is dropped, so the tensor stays a whole buffer that
/// nothing else views, as an in-place update needs.
pub(crate) fn place(t: &mut Tensor<f32>, device: Device) -> Result<()> {
    *t = t.to_device(device)?;
    Ok(())
}

/// A flat state buffer of a checkpoint as a 1-D host tensor (moved to the parameters' device
/// at the next step).
pub(crate) fn host(v: &[f32]) -> Tensor<f32> {
    Tensor::new(&[v.len()], v.to_vec())
}

/// A step counter in a checkpoint: f32 is exact only up to 2^24, so the counter is stored as
/// two f32 values `[low 24 bits, high bits]` (exact up to 2^48 steps).
pub(crate) fn encode_step(step: u64) -> Vec<f32> {
    vec![(step & 0xff_ffff) as f32, (step >> 24) as f32]
}

pub(crate) fn decode_step(name: &str, v: &[f32]) -> Result<u64> {
    let ok = |x: f32| x >= 0.0 && x.fract() == 0.0 && x < 16_777_216.0;
    ensure!(
        v.len() == 2 && ok(v[0]) && ok(v[1]),
        "state buffer `{name}` is not a step counter [low 24 bits, high bits]: {v:?}"
    );
    Ok(((v[1] as u64) << 24) | v[0] as u64)
}

/// Checks a saved state against the expected buffer names and sizes before anything is loaded,
/// so a failed load leaves the optimizer untouched. Returns the buffers in `expected` order.
pub(crate) fn match_state<'a>(
    who: &str,
    state: &'a [(String, Vec<f32>)],
    expected: &[(&str, usize)],
) -> Result<Vec<&'a [f32]>> {
    for (name, _) in state {
        ensure!(
            expected.iter().any(|(n, _)| n == name),
            "{who} state: unexpected buffer `{name}` (expected {:?})",
            expected.iter().map(|(n, _)| *n).collect::<Vec<_>>()
        );
    }
    expected
        .iter()
        .map(|&(name, len)| {
            let mut found = state.iter().filter(|(n, _)| n == name);
            let Some((_, v)) = found.next() else {
                bail!("{who} state: missing buffer `{name}`")
            };
            ensure!(
                found.next().is_none(),
                "{who} state: buffer `{name}` appears twice"
            );
            ensure!(
                v.len() == len,
                "{who} state: buffer `{name}` has {} values, expected {len}",
                v.len()
            );
            Ok(v.as_slice())
        })
        .collect()
}

/// An optimizer over flat buffers laid out by a [`Layout`], on the CPU or the GPU.
pub trait Optimizer: Send {
    /// One update of the flat parameters `params` (a 1-D host or device tensor of the layout's
    /// length, updated in place; on the device it must be a whole buffer nothing else views)
    /// from the flat gradient `grads` (same length; host or device: it is copied to the
    /// parameters' device when elsewhere); `lr` comes from the schedule. `grads` is left
    /// unmodified (timm's LAMB also clips a copy, not `p.grad`). The step runs where `params`
    /// live; the optimizer's state moves there first when it is elsewhere.
    ///
    /// With `ema`, also the EMA's update with the new parameters (blended in the optimizer's
    /// pass where the device kernel has it) and with the running statistics `buffers`: the
    /// same as [`Ema::update`] after the step.
    ///
    /// Panics if a buffer's length differs from the layout's (or the EMA's) or `lr` is
    /// negative or not finite; errors are the backend's (a device fault).
    fn step(
        &mut self,
        params: &mut Tensor<f32>,
        grads: &Tensor<f32>,
        lr: f64,
        ema: Option<(&mut Ema, &Tensor<f32>)>,
    ) -> Result<()>;
    /// Moment buffers and the step counter, by name, for a checkpoint (host values, downloaded
    /// from the device when the state is there).
    fn state(&self) -> Vec<(String, Vec<f32>)>;
    /// Restores [`Optimizer::state`]; errors name a missing, unexpected or wrongly sized buffer.
    /// The state moves to the parameters' device at the next step.
    fn load_state(&mut self, state: &[(String, Vec<f32>)]) -> Result<()>;
    fn name(&self) -> &str;
    /// Number of steps taken so far.
    fn steps(&self) -> u64;
    /// Whether a step since the last call wrote a NaN or infinite parameter or moment, and
    /// clears it: flagged by the update pass itself (no pass of its own; on the GPU a 4-byte
    /// read). False before the first step.
    fn take_nonfinite(&mut self) -> Result<bool>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Lamb,
    Adamw,
    Sgd,
}

/// Optimizer choice and its lr-independent hyperparameters (a recipe's `[optimizer]` table).
/// Absent fields take the defaults of the timm/PyTorch class (see [`LambOptions`],
/// [`AdamWOptions`], [`SgdOptions`]); fields that do not apply to `kind` are an error.
/// `max_grad_norm = 0` turns clipping off (timm's `max_grad_norm=None`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    #[serde(default)]
    pub weight_decay: Option<f64>,
    #[serde(default)]
    pub betas: Option<(f64, f64)>,
    #[serde(default)]
    pub eps: Option<f64>,
    #[serde(default)]
    pub momentum: Option<f64>,
    #[serde(default)]
    pub nesterov: Option<bool>,
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
}

impl OptimizerConfig {
    pub fn new(kind: OptimizerKind) -> Self {
        OptimizerConfig {
            kind,
            weight_decay: None,
            betas: None,
            eps: None,
            momentum: None,
            nesterov: None,
            max_grad_norm: None,
        }
    }

    fn reject(&self, fields: &[(&str, bool)]) -> Result<()> {
        for (field, set) in fields {
            ensure!(!set, "optimizer `{:?}` does not take `{field}`", self.kind);
        }
        Ok(())
    }

    pub fn lamb_options(&self) -> Result<LambOptions> {
        self.reject(&[
            ("momentum", self.momentum.is_some()),
            ("nesterov", self.nesterov.is_some()),
        ])?;
        let d = LambOptions::default();
        let o = LambOptions {
            betas: self.betas.unwrap_or(d.betas),
            eps: self.eps.unwrap_or(d.eps),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            max_grad_norm: match self.max_grad_norm {
                None => d.max_grad_norm,
                m => clip_option(m)?,
            },
        };
        o.validate()?;
        Ok(o)
    }

    pub fn adamw_options(&self) -> Result<AdamWOptions> {
        self.reject(&[
            ("momentum", self.momentum.is_some()),
            ("nesterov", self.nesterov.is_some()),
        ])?;
        let d = AdamWOptions::default();
        let o = AdamWOptions {
            betas: self.betas.unwrap_or(d.betas),
            eps: self.eps.unwrap_or(d.eps),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            max_grad_norm: clip_option(self.max_grad_norm)?,
        };
        o.validate()?;
        Ok(o)
    }

    pub fn sgd_options(&self) -> Result<SgdOptions> {
        self.reject(&[("betas", self.betas.is_some()), ("eps", self.eps.is_some())])?;
        let d = SgdOptions::default();
        let o = SgdOptions {
            momentum: self.momentum.unwrap_or(d.momentum),
            nesterov: self.nesterov.unwrap_or(d.nesterov),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            max_grad_norm: clip_option(self.max_grad_norm)?,
        };
        o.validate()?;
        Ok(o)
    }

    /// Checks the hyperparameters for `kind` (what [`OptimizerConfig::build`] would refuse),
    /// without a layout: recipes are validated before a model exists.
    pub fn validate(&self) -> Result<()> {
        match self.kind {
            OptimizerKind::Lamb => self.lamb_options().map(drop),
            OptimizerKind::Adamw => self.adamw_options().map(drop),
            OptimizerKind::Sgd => self.sgd_options().map(drop),
        }
    }

    /// The optimizer for `layout`, with zeroed state. Errors on invalid hyperparameters.
    pub fn build(&self, layout: &Layout) -> Result<Box<dyn Optimizer>> {
        Ok(match self.kind {
            OptimizerKind::Lamb => Box::new(Lamb::new(layout.clone(), self.lamb_options()?)),
            OptimizerKind::Adamw => Box::new(AdamW::new(layout.clone(), self.adamw_options()?)),
            OptimizerKind::Sgd => Box::new(Sgd::new(layout.clone(), self.sgd_options()?)),
        })
    }
}

/// The moments of LAMB and AdamW, by their checkpoint names.
pub(crate) const ADAM_MOMENTS: &[&str] = &["exp_avg", "exp_avg_sq"];

/// The checks LAMB and AdamW share.
pub(crate) fn validate_adam(
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    max_grad_norm: Option<f64>,
) -> Result<()> {
    ensure!(
        (0.0..1.0).contains(&betas.0) && (0.0..1.0).contains(&betas.1),
        "betas must be in [0, 1), got {betas:?}"
    );
    // eps guards the division by sqrt(v): 0 divides 0 by 0 (NaN) at the first step.
    ensure!(
        eps.is_finite() && eps > 0.0,
        "eps must be finite and > 0 (timm's default 1e-6 for LAMB, 1e-8 for AdamW), got {eps}"
    );
    ensure!(
        weight_decay.is_finite() && weight_decay >= 0.0,
        "weight_decay must be >= 0, got {weight_decay}"
    );
    clip_option(max_grad_norm)?;
    Ok(())
}

pub(crate) fn check_lr(what: &str, lr: f64) {
    assert!(
        lr.is_finite() && lr >= 0.0,
        "{what}: learning rate must be finite and >= 0, got {lr}"
    );
}
