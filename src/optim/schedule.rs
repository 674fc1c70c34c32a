//! Learning-rate schedules with timm's formulas, evaluated per step at fractional epochs.
//!
//! * warm-up (`t < warmup_epochs`): `warmup_lr + t * (base - warmup_lr) / warmup_epochs`.
//! * cosine: `min_lr + 0.5 * (base - min_lr) * (1 + cos(pi * t / epochs))`, `min_lr` after.
//! * step: `base * decay_rate^floor(t / decay_epochs)` (timm's step schedule has no floor).
//! * constant: `base`.
//!
//! Choice (timm's default `warmup_prefix=False`): after warm-up the decay is evaluated at the
//! epoch itself, not at `t - warmup_epochs`, so the warm-up replaces the first part of the
//! curve and the lr drops slightly at its end (e.g. to cos(t=5) < base). `T` is the total
//! number of epochs, as timm's `t_initial`.
//!
//! timm updates the lr after each optimizer step (`step_update(num_updates)`), so the lr of
//! update `k` (0-based) is `lr_at(base, k / steps_per_epoch)`.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Cosine,
    Step,
    Constant,
}

/// The `[schedule]` table of a recipe; lr-independent (the base lr is passed to `lr_at`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub kind: ScheduleKind,
    /// Total epochs `T` of the cosine.
    pub epochs: f64,
    #[serde(default)]
    pub warmup_epochs: f64,
    /// lr at the start of the linear warm-up.
    #[serde(default)]
    pub warmup_lr: f64,
    /// Floor of the cosine.
    #[serde(default)]
    pub min_lr: f64,
    /// Step schedule: epochs between decays.
    #[serde(default)]
    pub decay_epochs: f64,
    /// Step schedule: factor per decay (timm default 0.1).
    #[serde(default = "default_decay_rate")]
    pub decay_rate: f64,
}

fn default_decay_rate() -> f64 {
    0.1
}

impl ScheduleConfig {
    pub fn validate(&self) -> Result<()> {
        let finite_nonneg = |v: f64| v.is_finite() && v >= 0.0;
        ensure!(
            finite_nonneg(self.epochs),
            "schedule: epochs must be >= 0, got {}",
            self.epochs
        );
        ensure!(
            self.kind != ScheduleKind::Cosine || self.epochs > 0.0,
            "schedule: cosine needs epochs > 0"
        );
        ensure!(
            finite_nonneg(self.warmup_epochs)
                && finite_nonneg(self.warmup_lr)
                && finite_nonneg(self.min_lr),
            "schedule: warmup_epochs, warmup_lr and min_lr must be >= 0"
        );
        ensure!(
            self.kind != ScheduleKind::Step
                || (self.decay_epochs > 0.0 && self.decay_epochs.is_finite()),
            "schedule: step needs decay_epochs > 0, got {}",
            self.decay_epochs
        );
        ensure!(
            finite_nonneg(self.decay_rate),
            "schedule: decay_rate must be >= 0, got {}",
            self.decay_rate
        );
        Ok(())
    }

    /// The learning rate at fractional epoch `epoch` for base learning rate `base_lr`.
    pub fn lr_at(&self, base_lr: f64, epoch: f64) -> f64 {
        let t = epoch.max(0.0);
        if t < self.warmup_epochs {
            // timm's order: warmup_lr_init + t * ((base - warmup_lr_init) / warmup_t).
            return self.warmup_lr + t * ((base_lr - self.warmup_lr) / self.warmup_epochs);
        }
        match self.kind {
            ScheduleKind::Constant => base_lr,
            ScheduleKind::Step => base_lr * self.decay_rate.powf((t / self.decay_epochs).floor()),
            ScheduleKind::Cosine if t >= self.epochs => self.min_lr,
            ScheduleKind::Cosine => {
                self.min_lr + 0.5 * (base_lr - self.min_lr) * (1.0 + (PI * t / self.epochs).cos())
            }
        }
    }
}
