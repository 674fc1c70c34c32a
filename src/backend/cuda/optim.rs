//! Optimizers on the device for `train --device cuda`: the update of the flat device parameters
//! from the flat device gradient, with the EMA of the weights in the same pass where the kernel
//! has it. The host optimizer of the same recipe (`optim::OptimizerConfig::build`) stays the
//! checkpoint format: [`DeviceOptimizer::save_into`] and [`DeviceOptimizer::load_from`] move the
//! state between the two, so a checkpoint written on the GPU resumes on the CPU and back.

use super::device::{DBuf, Gpu};
use super::ops::LambGpu;
use crate::optim::{Lamb, Optimizer};
use crate::optim::{Layout, OptimizerConfig, OptimizerKind};
use anyhow::{anyhow, ensure, Result};

/// One optimizer whose state lives on the device.
pub trait DeviceOptimizer: Send {
    /// `params -= update(grads)` with learning rate `lr`; when `ema` is given, also
    /// `ema = d ema + (1 - d) params` with the new parameters.
    fn step(
        &mut self,
        gpu: &Gpu,
        params: &mut DBuf,
        grads: &DBuf,
        lr: f64,
        ema: Option<(&mut DBuf, f64)>,
    ) -> Result<()>;
    /// Writes the device state into the host optimizer of the same recipe (for a checkpoint).
    fn save_into(&self, gpu: &Gpu, host: &mut dyn Optimizer) -> Result<()>;
    /// Loads the host optimizer's state (a resumed checkpoint) onto the device.
    fn load_from(&mut self, gpu: &Gpu, host: &dyn Optimizer) -> Result<()>;
    /// What runs where, for the log.
    fn describe(&self) -> &'static str;
}

/// The device optimizer of a recipe: LAMB as the fused LAMB + EMA kernels; AdamW and SGD step
/// with the CPU optimizer on downloaded gradients (correct, but a round trip per step: their
/// kernels are not written yet).
pub fn build(
    gpu: &Gpu,
    cfg: &OptimizerConfig,
    layout: &Layout,
) -> Result<Box<dyn DeviceOptimizer>> {
    Ok(match cfg.kind {
        OptimizerKind::Lamb => {
            Box::new(LambDevice(LambGpu::new(gpu, layout, cfg.lamb_options()?)?))
        }
        OptimizerKind::Adamw | OptimizerKind::Sgd => Box::new(HostStepped(cfg.build(layout)?)),
    })
}

struct LambDevice(LambGpu);

impl DeviceOptimizer for LambDevice {
    fn step(
        &mut self,
        gpu: &Gpu,
        params: &mut DBuf,
        grads: &DBuf,
        lr: f64,
        ema: Option<(&mut DBuf, f64)>,
    ) -> Result<()> {
        self.0.step(gpu, params, grads, lr, ema)
    }

    fn save_into(&self, gpu: &Gpu, host: &mut dyn Optimizer) -> Result<()> {
        ensure!(
            host.name() == "lamb",
            "a LAMB state cannot go into {}",
            host.name()
        );
        let state = crate::optim::adam_state(
            &gpu.download(&self.0.exp_avg)?,
            &gpu.download(&self.0.exp_avg_sq)?,
            self.0.steps(),
        );
        host.load_state(&state)
    }

    fn load_from(&mut self, gpu: &Gpu, host: &dyn Optimizer) -> Result<()> {
        ensure!(
            host.name() == "lamb",
            "a {} state cannot go into LAMB",
            host.name()
        );
        // Checked by a host LAMB of the same size first, so a bad state loads nothing.
        let n = self.0.exp_avg.len();
        let mut check = Lamb::new(Layout::from_shapes(&[("all", vec![n])]), Default::default());
        let state = host.state();
        check.load_state(&state)?;
        let get = |name: &str| {
            state
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_slice())
                .ok_or_else(|| anyhow!("LAMB state without {name}"))
        };
        gpu.upload_into(get("exp_avg")?, &mut self.0.exp_avg)?;
        gpu.upload_into(get("exp_avg_sq")?, &mut self.0.exp_avg_sq)?;
        self.0.set_steps(check.steps());
        Ok(())
    }

    fn describe(&self) -> &'static str {
        "fused LAMB + EMA kernels"
    }
}

/// A CPU optimizer stepping device parameters: gradients and parameters go to the host and
/// back every step; the EMA blends on the device.
struct HostStepped(Box<dyn Optimizer>);

impl DeviceOptimizer for HostStepped {
    fn step(
        &mut self,
        gpu: &Gpu,
        params: &mut DBuf,
        grads: &DBuf,
        lr: f64,
        ema: Option<(&mut DBuf, f64)>,
    ) -> Result<()> {
        let mut p = gpu.download(params)?;
        let g = gpu.download(grads)?;
        self.0.step(&mut p, &g, lr);
        gpu.upload_into(&p, params)?;
        if let Some((e, d)) = ema {
            gpu.ema_blend(e, params, d)?;
        }
        Ok(())
    }

    fn save_into(&self, _gpu: &Gpu, host: &mut dyn Optimizer) -> Result<()> {
        host.load_state(&self.0.state())
    }

    fn load_from(&mut self, _gpu: &Gpu, host: &dyn Optimizer) -> Result<()> {
        self.0.load_state(&host.state())
    }

    fn describe(&self) -> &'static str {
        "CPU optimizer on downloaded gradients (no device kernel for it yet), EMA on the device"
    }
}
