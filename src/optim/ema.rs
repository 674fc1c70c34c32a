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
//!
//! The average lives on a device like the weights: 1-D tensors, blended by the backend they
//! are on (`backend::api::Optim::ema_blend`), or in the optimizer's own pass when it is given
//! to [`super::Optimizer::step`].

use super::{decode_step, encode_step, match_state, place};
use crate::backend::api::optim::{EmaCoef, Optim, Step};
use crate::on_backend;
use crate::tensor::storage::{ok, Place};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
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

/// The EMA of the flat weights and flat BN buffers, as 1-D tensors on their device.
pub struct Ema {
    cfg: EmaConfig,
    params: Tensor<f32>,
    buffers: Tensor<f32>,
    updates: u64,
}

/// A copy of `t` as a 1-D tensor of its own, on the same device.
fn flat_copy(t: &Tensor<f32>) -> Tensor<f32> {
    t.deep_copy().reshape(&[t.numel()])
}

/// `e` blended with `x` (either device: copied to `e`'s backend when elsewhere).
fn blend<B: Place<f32> + Optim>(
    b: &B,
    e: &mut Tensor<f32>,
    x: &Tensor<f32>,
    k: EmaCoef,
) -> Result<()> {
    let x = b.get(x);
    b.ema_blend(&mut b.get_mut(e), &x, k)
}

impl Ema {
    /// Starts the average at the current weights (timm deep-copies the model): copies of
    /// `params` and `buffers` on their device.
    pub fn new(cfg: EmaConfig, params: &Tensor<f32>, buffers: &Tensor<f32>) -> Result<Ema> {
        cfg.validate()?;
        Ok(Ema {
            cfg,
            params: flat_copy(params),
            buffers: flat_copy(buffers),
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

    /// The blend weights of the next update: `d` and `1 - d` as f32 (PyTorch's scalars).
    fn coef(&self) -> EmaCoef {
        let d = self.decay();
        EmaCoef {
            d: d as f32,
            w: (1.0 - d) as f32,
        }
    }

    fn check(&self, params: &Tensor<f32>, buffers: &Tensor<f32>) {
        assert_eq!(
            params.numel(),
            self.params.numel(),
            "ema: params length changed"
        );
        assert_eq!(
            buffers.numel(),
            self.buffers.numel(),
            "ema: buffers length changed"
        );
    }

    /// One EMA step over all weights and buffers, on the device of the average (inputs from
    /// elsewhere are copied there). Panics on a device fault.
    pub fn update(&mut self, params: &Tensor<f32>, buffers: &Tensor<f32>) {
        self.check(params, buffers);
        let k = self.coef();
        let (e, eb) = (&mut self.params, &mut self.buffers);
        ok(on_backend!([&*e], |b| blend(b, e, params, k)
            .and_then(|_| blend(b, eb, buffers, k))));
        self.updates += 1;
    }

    /// Overwrites the average with copies of the given weights (timm `set`), on their device
    /// (this is how the average moves to another device); the update count is kept.
    pub fn set(&mut self, params: &Tensor<f32>, buffers: &Tensor<f32>) {
        self.check(params, buffers);
        self.params = flat_copy(params);
        self.buffers = flat_copy(buffers);
    }

    /// The averaged weights (a 1-D tensor on the average's device). A clone held across the
    /// next device update makes that update panic: take a `deep_copy`.
    pub fn params(&self) -> &Tensor<f32> {
        &self.params
    }

    /// The averaged BN buffers (a 1-D tensor on the average's device).
    pub fn buffers(&self) -> &Tensor<f32> {
        &self.buffers
    }

    /// Number of updates made.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// `params`, `buffers` and the update counter, for a checkpoint (host values).
    pub fn state(&self) -> Vec<(String, Vec<f32>)> {
        vec![
            ("params".into(), self.params.to_host().into_vec()),
            ("buffers".into(), self.buffers.to_host().into_vec()),
            ("updates".into(), encode_step(self.updates)),
        ]
    }

    /// Restores [`Ema::state`] (checked in full first) onto the average's device.
    pub fn load_state(&mut self, state: &[(String, Vec<f32>)]) -> Result<()> {
        let b = match_state(
            "ema",
            state,
            &[
                ("params", self.params.numel()),
                ("buffers", self.buffers.numel()),
                ("updates", 2),
            ],
        )?;
        let updates = decode_step("updates", b[2])?;
        // An average of weights is a weight: refused where a weight would be.
        for (name, vals) in [("params", b[0]), ("buffers", b[1])] {
            if let Some(why) = crate::io::weights::implausible(name, vals) {
                anyhow::bail!("ema.{name} {why}");
            }
        }
        let device = self.params.device();
        let params = super::host(b[0]).to_device(device)?;
        let buffers = super::host(b[1]).to_device(device)?;
        (self.params, self.buffers, self.updates) = (params, buffers, updates);
        Ok(())
    }
}

/// One optimizer update on backend `b` (the parameters' backend): `f` runs the optimizer's
/// kernel on the step's buffers; with `ema`, the average moves to `b` when it is elsewhere, its
/// weights are blended in `f`'s pass (with the new parameters) and its buffers after it, as
/// [`Ema::update`] after the step would.
pub(super) fn run_step<B: Place<f32> + Optim>(
    b: &B,
    params: &mut Tensor<f32>,
    grads: &Tensor<f32>,
    ema: Option<(&mut Ema, &Tensor<f32>)>,
    f: impl FnOnce(Step<'_, B::Buf>) -> Result<()>,
) -> Result<()> {
    let g = b.get(grads);
    let Some((e, buffers)) = ema else {
        let mut p = b.get_mut(params);
        return f(Step {
            params: &mut p,
            grads: &g,
            ema: None,
        });
    };
    e.check(params, buffers);
    let k = e.coef();
    place(&mut e.params, b.device())?;
    place(&mut e.buffers, b.device())?;
    {
        let mut p = b.get_mut(params);
        let mut ep = b.get_mut(&mut e.params);
        f(Step {
            params: &mut p,
            grads: &g,
            ema: Some((&mut ep, k)),
        })?;
    }
    blend(b, &mut e.buffers, buffers, k)?;
    e.updates += 1;
    Ok(())
}
