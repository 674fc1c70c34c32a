//! One training step of a model entirely on the GPU: the model's own forward pass (the tape
//! with device tensors: every op dispatches to its CUDA kernels, depth-wise re-parameterized
//! convs run fused), cross-entropy with label smoothing, backward, the flat device gradient
//! and the fused LAMB + EMA step on the flat device parameters. BN running statistics are
//! updated on the device. (`train::Trainer` runs the full recipe on the GPU; this is the bare
//! step that the whole-step test and the throughput bench time and check.)

use super::device::{DBuf, Gpu};
use super::ops::LambGpu;
use crate::autograd::Tape;
use crate::models::Model;
use crate::nn::Mode;
use crate::optim::{LambOptions, Layout};
use crate::tensor::Tensor;
use anyhow::{anyhow, ensure, Result};
use std::sync::Arc;

/// The device state of a training run: LAMB moments and (optionally) the EMA of the weights.
pub struct CudaTrainer {
    lamb: LambGpu,
    /// EMA of the parameters on the device, updated in the optimizer's pass.
    pub ema: Option<DBuf>,
    /// The flat gradient of the last step (kept for checks and gradient-norm logging).
    pub grads: Option<DBuf>,
}

/// What one step returns.
pub struct StepOut {
    pub loss: f32,
    /// Logits on the host.
    pub logits: Tensor<f32>,
}

impl CudaTrainer {
    /// Moves the model's parameters and running statistics to the device (`State::place_on_cuda`)
    /// and sets up LAMB
    /// (and the EMA, starting at the current weights, when `ema` is true).
    pub fn new(gpu: &Gpu, model: &mut Model, opts: LambOptions, ema: bool) -> Result<Self> {
        let state = model.state_mut();
        state.place_on_cuda()?;
        let layout = Layout::from_store(&state.params);
        let lamb = LambGpu::new(gpu, &layout, opts)?;
        let ema = if ema {
            Some(gpu.upload(state.params.flat())?)
        } else {
            None
        };
        Ok(CudaTrainer {
            lamb,
            ema,
            grads: None,
        })
    }

    /// Forward (train mode, no dropout), loss, backward and the optimizer step.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        gpu: &Gpu,
        model: &mut Model,
        images: &Tensor<f32>,
        labels: &[usize],
        smoothing: f64,
        lr: f64,
        ema_decay: f64,
    ) -> Result<StepOut> {
        let x = images.to_cuda()?;
        let (loss, logits, flat) = {
            let mut tape = Tape::new();
            let xv = tape.constant(x);
            let (logits, leaves) =
                model.forward(&mut tape, xv, Mode::Train { dropout: false }, None);
            let lv = crate::ops::cross_entropy(&mut tape, logits, labels, smoothing);
            let loss = tape.value(lv).to_host().data()[0];
            let logits = tape.value(logits).to_host();
            let grads = tape.backward(lv);
            let flat = leaves.flat_grads_cuda(model.state(), &grads)?;
            (loss, logits, flat)
        };
        ensure!(loss.is_finite(), "loss is {loss}");
        // The tape is gone: the device parameters are ours alone again.
        let params = model
            .state_mut()
            .cuda_params
            .as_mut()
            .ok_or_else(|| anyhow!("parameters are not on the device"))?;
        let params =
            Arc::get_mut(params).ok_or_else(|| anyhow!("device parameters still shared"))?;
        let ema = self.ema.as_mut().map(|e| (e, ema_decay));
        self.lamb.step(gpu, params, &flat, lr, ema)?;
        self.grads = Some(flat);
        Ok(StepOut { loss, logits })
    }
}
