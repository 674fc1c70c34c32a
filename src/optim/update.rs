//! The parameter update of a training step, on whichever device the parameters live: the
//! optimizer and the EMA of the weights and running statistics behind one `step`.
//!
//! The host optimizer ([`Optimizer`]) and [`Ema`] are the math on the CPU and the checkpoint
//! format. When the parameters are on the GPU, the fused device kernels
//! (`backend::cuda::optim`, bit-exact against the host ones) step them there, with the EMA in
//! the same pass; their state is built from the host form at the first device step and written
//! back by [`Update::sync_to_host`] before a checkpoint. Which path runs is decided by the
//! dispatcher (`on_backend!`) from where the parameters are.

use super::{Ema, Layout, Optimizer, OptimizerConfig};
use crate::backend::cpu::Cpu;
use crate::backend::cuda::{optim as dev_optim, Cuda, DBuf};
use crate::on_backend;
use crate::tensor::storage::Place;
use crate::tensor::Tensor;
use anyhow::{Context, Result};

/// An optimizer and, optionally, the EMA of the model it updates.
pub struct Update {
    cfg: OptimizerConfig,
    layout: Layout,
    /// The host form: the CPU path's state and the checkpoint format.
    pub optimizer: Box<dyn Optimizer>,
    pub ema: Option<Ema>,
    /// The device form, while the parameters are on the GPU.
    device: Option<DeviceUpdate>,
}

struct DeviceUpdate {
    optimizer: Box<dyn dev_optim::DeviceOptimizer>,
    /// The EMA of the parameters and of the running statistics on the device.
    ema: Option<(DBuf, DBuf)>,
    /// The host form is stale (the device stepped since the last sync).
    dirty: bool,
}

impl Update {
    /// A fresh optimizer for `layout` (errors on invalid hyperparameters) and the EMA given.
    pub fn new(cfg: &OptimizerConfig, layout: &Layout, ema: Option<Ema>) -> Result<Update> {
        Ok(Update {
            cfg: cfg.clone(),
            layout: layout.clone(),
            optimizer: cfg.build(layout)?,
            ema,
            device: None,
        })
    }

    /// One optimizer step of `params` (the model's flat parameters, updated in place) from the
    /// flat gradient, then the EMA with the new parameters and `buffers` (the running
    /// statistics).
    pub fn step(
        &mut self,
        params: &mut Tensor<f32>,
        buffers: &Tensor<f32>,
        grads: &Tensor<f32>,
        lr: f64,
    ) -> Result<()> {
        on_backend!([&*params, buffers, grads], |b| b
            .update(self, params, buffers, grads, lr))
    }

    /// Brings the device state (moments, step count, EMA) back into the host form.
    pub fn sync_to_host(&mut self) -> Result<()> {
        let Some(d) = self.device.as_mut() else {
            return Ok(());
        };
        if !d.dirty {
            return Ok(());
        }
        let gpu = crate::tensor::storage::gpu();
        d.optimizer.save_into(gpu, self.optimizer.as_mut())?;
        if let (Some(ema), Some((p, b))) = (self.ema.as_mut(), d.ema.as_ref()) {
            ema.set(&gpu.download(p)?, &gpu.download(b)?);
        }
        d.dirty = false;
        Ok(())
    }

    /// Drops the device form (after the host form was loaded from a checkpoint): the next
    /// device step rebuilds it from the host form.
    pub fn reset_device(&mut self) {
        self.device = None;
    }

    /// The EMA's parameters and running statistics, as tensors on the device the updates ran
    /// on (copies).
    pub fn ema_tensors(&self) -> Option<(Tensor<f32>, Tensor<f32>)> {
        let ema = self.ema.as_ref()?;
        if let Some((p, b)) = self.device.as_ref().and_then(|d| d.ema.as_ref()) {
            let cuda = crate::tensor::storage::cuda::<f32>();
            let copy = |x: &DBuf| -> Tensor<f32> {
                let mut y = crate::tensor::storage::ok(cuda.alloc(x.len()));
                crate::tensor::storage::ok(cuda.copy_into(x, &mut y));
                cuda.wrap(&[x.len()], y)
            };
            return Some((copy(p), copy(b)));
        }
        let (p, b) = (ema.params().to_vec(), ema.buffers().to_vec());
        Some((Tensor::new(&[p.len()], p), Tensor::new(&[b.len()], b)))
    }

    pub fn describe(&self) -> String {
        match &self.device {
            Some(d) => d.optimizer.describe().to_string(),
            None => self.optimizer.name().to_string(),
        }
    }
}

/// The update on one backend (the dispatcher picks the impl from where the parameters are).
trait UpdateOn {
    fn update(
        &self,
        u: &mut Update,
        params: &mut Tensor<f32>,
        buffers: &Tensor<f32>,
        grads: &Tensor<f32>,
        lr: f64,
    ) -> Result<()>;
}

impl UpdateOn for Cpu {
    fn update(
        &self,
        u: &mut Update,
        params: &mut Tensor<f32>,
        buffers: &Tensor<f32>,
        grads: &Tensor<f32>,
        lr: f64,
    ) -> Result<()> {
        // Parameters back on the host after device steps: continue from the device's state.
        u.sync_to_host()?;
        u.device = None;
        let g = self.get(grads);
        u.optimizer.step(self.get_mut(params), &g, lr);
        if let Some(ema) = u.ema.as_mut() {
            ema.update(params.data(), &self.get(buffers));
        }
        Ok(())
    }
}

impl UpdateOn for Cuda<f32> {
    fn update(
        &self,
        u: &mut Update,
        params: &mut Tensor<f32>,
        buffers: &Tensor<f32>,
        grads: &Tensor<f32>,
        lr: f64,
    ) -> Result<()> {
        if u.device.is_none() {
            let mut optimizer = dev_optim::build(self, &u.cfg, &u.layout)?;
            optimizer.load_from(self, u.optimizer.as_ref())?;
            let ema = match &u.ema {
                Some(e) => Some((self.upload(e.params())?, self.upload(e.buffers())?)),
                None => None,
            };
            u.device = Some(DeviceUpdate {
                optimizer,
                ema,
                dirty: false,
            });
        }
        let d = u.device.as_mut().expect("set above");
        let g = self.get(grads);
        let p = self.get_mut(params);
        match (u.ema.as_mut(), d.ema.as_mut()) {
            (Some(ema), Some((ep, eb))) => {
                let decay = ema.advance();
                d.optimizer.step(self, p, &g, lr, Some((ep, decay)))?;
                self.ema_blend(eb, &self.get(buffers), decay)
                    .context("EMA of the running statistics")?;
            }
            _ => d.optimizer.step(self, p, &g, lr, None)?,
        }
        d.dirty = true;
        Ok(())
    }
}
