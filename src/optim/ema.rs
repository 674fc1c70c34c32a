//! Exponential moving average of ALL weights and BN buffers (timm `ModelEmaV2`, spec 9b):
//! every step `ema = d * ema + (1 - d) * x` over the parameter and the buffer flat buffers.
//!
//! The paper's decay 0.9999 needs ~10^4 steps to forget the initial weights, far more than a
//! short CPU run has, so an optional warm-up lowers `d` early on. `t` below is the number of
//! updates already made (0 for the first):
//!
//! * `num_updates`: `d_t = min(decay, (1 + t) / (10 + t))`, TensorFlow's
//!   `ExponentialMovingAverage(num_updates=t)` rule (0.1 at the first update).
//! * `power`: timm `ModelEmaV3(use_warmup=True)`: `d_t = 0` for the first update (the EMA
//!   becomes a copy), then `min(decay, 1 - (1 + t / warmup_gamma)^-warmup_power)`.
//!
//! Integer counters (`num_batches_tracked`) are not in the flat buffers; the caller copies them.

use super::{decode_step, encode_step, match_state, CHUNK};
use anyhow::{ensure, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Decay warm-up rule, see the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmaWarmup {
    /// Constant decay (timm ModelEmaV2).
    #[default]
    None,
    /// `min(decay, (1 + t) / (10 + t))`.
    NumUpdates,
    /// timm ModelEmaV3 `use_warmup`: `1 - (1 + t / gamma)^-power`.
    Power,
}

/// The `[ema]` table of a recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmaConfig {
    /// Paper and timm default: 0.9999.
    pub decay: f64,
    pub warmup: EmaWarmup,
    /// timm ModelEmaV3 `warmup_gamma` (only for `warmup = "power"`).
    pub warmup_gamma: f64,
    /// timm ModelEmaV3 `warmup_power` (only for `warmup = "power"`).
    pub warmup_power: f64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        EmaConfig {
            decay: 0.9999,
            warmup: EmaWarmup::None,
            warmup_gamma: 1.0,
            warmup_power: 2.0 / 3.0,
        }
    }
}

impl EmaConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (0.0..=1.0).contains(&self.decay),
            "ema decay must be in [0, 1], got {}",
            self.decay
        );
        ensure!(
            self.warmup_gamma > 0.0 && self.warmup_power > 0.0,
            "ema warmup_gamma and warmup_power must be > 0"
        );
        Ok(())
    }

    /// The decay used by the update that follows `t` earlier updates.
    pub fn decay_at(&self, t: u64) -> f64 {
        let t = t as f64;
        match self.warmup {
            EmaWarmup::None => self.decay,
            EmaWarmup::NumUpdates => self.decay.min((1.0 + t) / (10.0 + t)),
            EmaWarmup::Power if t == 0.0 => 0.0,
            EmaWarmup::Power => self
                .decay
                .min(1.0 - (1.0 + t / self.warmup_gamma).powf(-self.warmup_power)),
        }
    }
}

pub struct Ema {
    cfg: EmaConfig,
    params: Vec<f32>,
    buffers: Vec<f32>,
    updates: u64,
}

/// `e = d * e + (1 - d) * x`, chunk-parallel; `d` and `1 - d` are f32 scalars as in PyTorch.
fn blend(ema: &mut [f32], x: &[f32], d: f64) {
    let (d, w) = (d as f32, (1.0 - d) as f32);
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

impl Ema {
    /// Starts the average at the current weights (timm deep-copies the model).
    pub fn new(cfg: EmaConfig, params: &[f32], buffers: &[f32]) -> Result<Ema> {
        cfg.validate()?;
        Ok(Ema {
            cfg,
            params: params.to_vec(),
            buffers: buffers.to_vec(),
            updates: 0,
        })
    }

    pub fn config(&self) -> &EmaConfig {
        &self.cfg
    }

    /// The decay the next [`Ema::update`] will use.
    pub fn decay(&self) -> f64 {
        self.cfg.decay_at(self.updates)
    }

    /// One EMA step over all weights and buffers.
    pub fn update(&mut self, params: &[f32], buffers: &[f32]) {
        assert_eq!(
            params.len(),
            self.params.len(),
            "ema: params length changed"
        );
        assert_eq!(
            buffers.len(),
            self.buffers.len(),
            "ema: buffers length changed"
        );
        let d = self.decay();
        blend(&mut self.params, params, d);
        blend(&mut self.buffers, buffers, d);
        self.updates += 1;
    }

    /// Counts one update made elsewhere (on the GPU) and returns the decay it used; the host
    /// copies go stale until [`Ema::set`] brings the device average back.
    pub fn advance(&mut self) -> f64 {
        let d = self.decay();
        self.updates += 1;
        d
    }

    /// Overwrites the average with the given weights (timm `set`); the update count is kept.
    pub fn set(&mut self, params: &[f32], buffers: &[f32]) {
        self.params.copy_from_slice(params);
        self.buffers.copy_from_slice(buffers);
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    pub fn buffers(&self) -> &[f32] {
        &self.buffers
    }

    /// Number of updates made.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// `params`, `buffers` and the update counter, for a checkpoint.
    pub fn state(&self) -> Vec<(String, Vec<f32>)> {
        vec![
            ("params".into(), self.params.clone()),
            ("buffers".into(), self.buffers.clone()),
            ("updates".into(), encode_step(self.updates)),
        ]
    }

    pub fn load_state(&mut self, state: &[(String, Vec<f32>)]) -> Result<()> {
        let b = match_state(
            "ema",
            state,
            &[
                ("params", self.params.len()),
                ("buffers", self.buffers.len()),
                ("updates", 2),
            ],
        )?;
        let updates = decode_step("updates", b[2])?;
        self.params.copy_from_slice(b[0]);
        self.buffers.copy_from_slice(b[1]);
        self.updates = updates;
        Ok(())
    }
}
