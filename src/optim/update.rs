//! An optimizer and, optionally, the EMA of the model it updates, stepped together: a thin
//! bundle over [`Optimizer::step`] (which runs on the parameters' device and blends the EMA in
//! its pass). There is no second form of the state to keep in sync: `optimizer.state()` and
//! `ema.state()` read the checkpoint form from either device.

use super::{Ema, Layout, Optimizer, OptimizerConfig};
use crate::tensor::Tensor;
use anyhow::Result;

/// An optimizer and, optionally, the EMA of the model it updates.
pub struct Update {
    pub optimizer: Box<dyn Optimizer>,
    pub ema: Option<Ema>,
}

impl Update {
    /// A fresh optimizer for `layout` (errors on invalid hyperparameters) and the EMA given.
    pub fn new(cfg: &OptimizerConfig, layout: &Layout, ema: Option<Ema>) -> Result<Update> {
        Ok(Update {
            optimizer: cfg.build(layout)?,
            ema,
        })
    }

    /// One optimizer step of `params` (the model's flat parameters, updated in place) from the
    /// flat gradient, with the EMA of the new parameters and of `buffers` (the running
    /// statistics).
    pub fn step(
        &mut self,
        params: &mut Tensor<f32>,
        buffers: &Tensor<f32>,
        grads: &Tensor<f32>,
        lr: f64,
    ) -> Result<()> {
        let ema = self.ema.as_mut().map(|e| (e, buffers));
        self.optimizer.step(params, grads, lr, ema)
    }

    /// Whether a step since the last call wrote a NaN or infinite parameter or optimizer
    /// moment, and clears it ([`Optimizer::take_nonfinite`]: no pass of its own; on the GPU a
    /// 4-byte read, which waits for the step).
    pub fn take_nonfinite(&mut self) -> Result<bool> {
        self.optimizer.take_nonfinite()
    }

    /// Copies of the EMA's parameters and running statistics, on the EMA's device.
    pub fn ema_tensors(&self) -> Option<(Tensor<f32>, Tensor<f32>)> {
        let ema = self.ema.as_ref()?;
        Some((ema.params().deep_copy(), ema.buffers().deep_copy()))
    }

    pub fn describe(&self) -> String {
        self.optimizer.name().to_string()
    }
}
