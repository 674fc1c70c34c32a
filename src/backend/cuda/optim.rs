//! Optimizers on the device for `train --device cuda`: the update of the flat device parameters
//! from the flat device gradient, with the EMA of the weights in the same pass where the kernel
//! has it. The host optimizer of the same recipe (`optim::OptimizerConfig::build`) stays the
//! checkpoint format: [`DeviceOptimizer::save_into`] and [`DeviceOptimizer::load_from`] move the
//! state between the two, so a checkpoint written on the GPU resumes on the CPU and back.

use super::alloc::DevBuf;
use super::device::{DBuf, Gpu};
use super::launch::{blocks, i32a, opt_ptr, ptr, Arg, LambCoef};
use crate::optim::{AdamWOptions, Lamb, Optimizer, SgdOptions};
use crate::optim::{LambOptions, Layout, OptimizerConfig, OptimizerKind};
use anyhow::{anyhow, ensure, Result};
use cudarc::driver::LaunchConfig;

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

/// The device optimizer of a recipe: the fused LAMB, AdamW or SGD kernel with the EMA in the
/// same pass.
pub fn build(
    gpu: &Gpu,
    cfg: &OptimizerConfig,
    layout: &Layout,
) -> Result<Box<dyn DeviceOptimizer>> {
    Ok(match cfg.kind {
        OptimizerKind::Lamb => {
            Box::new(LambDevice(LambGpu::new(gpu, layout, cfg.lamb_options()?)?))
        }
        OptimizerKind::Adamw => Box::new(AdamWGpu::new(gpu, layout, cfg.adamw_options()?)?),
        OptimizerKind::Sgd => Box::new(SgdGpu::new(gpu, layout, cfg.sgd_options()?)?),
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

/// A grid of one block of `threads` per chunk.
fn per_chunk(nchunks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (nchunks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The chunk tables of a layout on the device (the CPU optimizers' chunks: <= 16 Ki elements,
/// never across tensors; one block each), the decay group of each tensor, and PyTorch's
/// `clip_grad_norm_` factor computed on the device when clipping is on.
struct Chunks {
    nchunks: usize,
    numel: usize,
    /// The chunks cover the whole buffer (no gaps), so the EMA can blend in the update pass.
    dense: bool,
    chunk_off: DevBuf<i64>,
    /// Where each chunk starts in a buffer holding the chunks back to back (optim::Sgd's
    /// momentum buffer); the same as `chunk_off` without gaps.
    packed_off: DevBuf<i64>,
    chunk_len: DevBuf<i32>,
    chunk_tensor: DevBuf<i32>,
    tensor_decay: DevBuf<i32>,
    max_grad_norm: Option<f64>,
    /// Per-chunk sums of g^2 and the clip factor (allocated when clipping is on).
    gpart: Option<DevBuf<f64>>,
    clip: Option<DBuf>,
}

impl Chunks {
    fn new(gpu: &Gpu, layout: &Layout, max_grad_norm: Option<f64>) -> Result<Chunks> {
        let chunks = layout.chunks();
        let covered: usize = chunks.iter().map(|c| c.len).sum();
        let col = |f: fn(&crate::optim::Chunk) -> i32| chunks.iter().map(f).collect::<Vec<_>>();
        let decay: Vec<i32> = layout.entries().iter().map(|e| e.decay as i32).collect();
        let clipping = max_grad_norm.is_some();
        Ok(Chunks {
            nchunks: chunks.len(),
            numel: layout.numel(),
            dense: covered == layout.numel(),
            chunk_off: gpu
                .upload_i64(&chunks.iter().map(|c| c.offset as i64).collect::<Vec<_>>())?,
            packed_off: gpu.upload_i64(
                &chunks
                    .iter()
                    .scan(0i64, |at, c| {
                        *at += c.len as i64;
                        Some(*at - c.len as i64)
                    })
                    .collect::<Vec<_>>(),
            )?,
            chunk_len: gpu.upload_i32(&col(|c| c.len as i32))?,
            chunk_tensor: gpu.upload_i32(&col(|c| c.tensor as i32))?,
            tensor_decay: gpu.upload_i32(if decay.is_empty() { &[0] } else { &decay })?,
            max_grad_norm,
            gpart: if clipping {
                Some(gpu.alloc_f64(chunks.len().max(1))?)
            } else {
                None
            },
            clip: if clipping { Some(gpu.alloc(1)?) } else { None },
        })
    }

    /// Checks the buffers of a step; splits the EMA into the one the update kernel blends
    /// (`Some` when the chunks cover the buffer) and the one blended after it (a layout with gaps,
    /// where the CPU EMA also blends the gaps).
    fn check<'a>(
        &self,
        who: &str,
        params: &DBuf,
        grads: &DBuf,
        lr: f64,
        ema: Option<(&'a mut DBuf, f64)>,
    ) -> Result<EmaSplit<'a>> {
        ensure!(
            params.len() == self.numel && grads.len() == self.numel,
            "{who}: params ({}) and grads ({}) do not match the layout ({})",
            params.len(),
            grads.len(),
            self.numel
        );
        ensure!(lr.is_finite() && lr >= 0.0, "{who}: learning rate {lr}");
        Ok(match ema {
            None => EmaSplit {
                fused: None,
                after: None,
                d: 0.0,
            },
            Some((e, d)) => {
                ensure!(e.len() == self.numel, "{who}: EMA buffer length");
                if self.dense {
                    EmaSplit {
                        fused: Some(e),
                        after: None,
                        d,
                    }
                } else {
                    EmaSplit {
                        fused: None,
                        after: Some(e),
                        d,
                    }
                }
            }
        })
    }

    /// Launches 1 and 2 (cuda/optim.cu) when clipping is on; the clip factor's argument.
    fn clip_factor(&self, gpu: &Gpu, grads: &DBuf) -> Result<Arg> {
        let (Some(m), Some(gpart), Some(clip)) = (self.max_grad_norm, &self.gpart, &self.clip)
        else {
            return Ok(Arg::Ptr(0));
        };
        gpu.launch(
            "optim",
            "torch_gnorm_partial",
            per_chunk(self.nchunks, 128),
            &[
                ptr(grads),
                ptr(&self.chunk_off),
                ptr(&self.chunk_len),
                ptr(gpart),
            ],
        )?;
        gpu.launch(
            "optim",
            "torch_clip_coef",
            per_chunk(1, 1),
            &[
                ptr(gpart),
                i32a(self.nchunks),
                Arg::F32(m as f32),
                ptr(clip),
            ],
        )?;
        Ok(ptr(clip))
    }
}

/// Where the EMA of a step is blended: in the update kernel, or after it.
struct EmaSplit<'a> {
    fused: Option<&'a mut DBuf>,
    after: Option<&'a mut DBuf>,
    d: f64,
}

impl EmaSplit<'_> {
    fn finish(self, gpu: &Gpu, params: &DBuf) -> Result<()> {
        if let Some(e) = self.after {
            gpu.ema_blend(e, params, self.d)?;
        }
        Ok(())
    }
}

/// AdamW on the device (`optim::AdamW` semantics and arithmetic, so the results have the CPU
/// optimizer's bits): the moments live here; one fused pass over parameters, gradient, moments
/// and EMA, after the global gradient norm when clipping is on.
pub struct AdamWGpu {
    opts: AdamWOptions,
    chunks: Chunks,
    pub exp_avg: DBuf,
    pub exp_avg_sq: DBuf,
    step: u64,
}

impl AdamWGpu {
    pub fn new(gpu: &Gpu, layout: &Layout, opts: AdamWOptions) -> Result<AdamWGpu> {
        opts.validate()?;
        Ok(AdamWGpu {
            chunks: Chunks::new(gpu, layout, opts.max_grad_norm)?,
            exp_avg: gpu.zeros(layout.numel())?,
            exp_avg_sq: gpu.zeros(layout.numel())?,
            opts,
            step: 0,
        })
    }

    pub fn steps(&self) -> u64 {
        self.step
    }
}

impl DeviceOptimizer for AdamWGpu {
    fn step(
        &mut self,
        gpu: &Gpu,
        params: &mut DBuf,
        grads: &DBuf,
        lr: f64,
        ema: Option<(&mut DBuf, f64)>,
    ) -> Result<()> {
        let ema = self.chunks.check("adamw", params, grads, lr, ema)?;
        self.step += 1;
        let t = self.step as f64;
        let (b1, b2) = self.opts.betas;
        let (bc1, bc2) = (1.0 - b1.powf(t), 1.0 - b2.powf(t));
        if self.chunks.nchunks > 0 {
            let clip = self.chunks.clip_factor(gpu, grads)?;
            let c = &self.chunks;
            // The scalars of optim::AdamW::step, rounded to f32 the same way.
            gpu.launch(
                "optim",
                "adamw_step",
                per_chunk(c.nchunks, 256),
                &[
                    ptr(params),
                    ptr(grads),
                    ptr(&self.exp_avg),
                    ptr(&self.exp_avg_sq),
                    opt_ptr(ema.fused.as_deref()),
                    ptr(&c.chunk_off),
                    ptr(&c.chunk_len),
                    ptr(&c.chunk_tensor),
                    ptr(&c.tensor_decay),
                    clip,
                    Arg::F32((1.0 - b1) as f32),
                    Arg::F32(b2 as f32),
                    Arg::F32((1.0 - b2) as f32),
                    Arg::F32((-(lr / bc1)) as f32),
                    Arg::F32(bc2.sqrt() as f32),
                    Arg::F32(self.opts.eps as f32),
                    Arg::F32((1.0 - lr * self.opts.weight_decay) as f32),
                    Arg::F32(ema.d as f32),
                    Arg::F32((1.0 - ema.d) as f32),
                ],
            )?;
        }
        ema.finish(gpu, params)
    }

    fn save_into(&self, gpu: &Gpu, host: &mut dyn Optimizer) -> Result<()> {
        ensure!(
            host.name() == "adamw",
            "an AdamW state cannot go into {}",
            host.name()
        );
        let state = crate::optim::adam_state(
            &gpu.download(&self.exp_avg)?,
            &gpu.download(&self.exp_avg_sq)?,
            self.step,
        );
        host.load_state(&state)
    }

    fn load_from(&mut self, gpu: &Gpu, host: &dyn Optimizer) -> Result<()> {
        ensure!(
            host.name() == "adamw",
            "a {} state cannot go into AdamW",
            host.name()
        );
        // Checked in full before anything is uploaded, so a bad state loads nothing.
        let n = self.exp_avg.len();
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let step = crate::optim::load_adam_state("adamw", &host.state(), &mut m, &mut v)?;
        gpu.upload_into(&m, &mut self.exp_avg)?;
        gpu.upload_into(&v, &mut self.exp_avg_sq)?;
        self.step = step;
        Ok(())
    }

    fn describe(&self) -> &'static str {
        "fused AdamW + EMA kernel"
    }
}

/// SGD on the device (`optim::Sgd` semantics and arithmetic: momentum, Nesterov, L2 decay of
/// the decay group, optional global clipping): the momentum buffer lives here (none without
/// momentum, as in PyTorch), laid out as optim::Sgd's (the chunks back to back); one fused pass
/// with the EMA.
pub struct SgdGpu {
    opts: SgdOptions,
    chunks: Chunks,
    pub momentum_buffer: Option<DBuf>,
    step: u64,
}

impl SgdGpu {
    pub fn new(gpu: &Gpu, layout: &Layout, opts: SgdOptions) -> Result<SgdGpu> {
        opts.validate()?;
        Ok(SgdGpu {
            chunks: Chunks::new(gpu, layout, opts.max_grad_norm)?,
            momentum_buffer: if opts.momentum != 0.0 {
                Some(gpu.zeros(layout.numel())?)
            } else {
                None
            },
            opts,
            step: 0,
        })
    }

    pub fn steps(&self) -> u64 {
        self.step
    }
}

impl DeviceOptimizer for SgdGpu {
    fn step(
        &mut self,
        gpu: &Gpu,
        params: &mut DBuf,
        grads: &DBuf,
        lr: f64,
        ema: Option<(&mut DBuf, f64)>,
    ) -> Result<()> {
        let ema = self.chunks.check("sgd", params, grads, lr, ema)?;
        self.step += 1;
        if self.chunks.nchunks > 0 {
            let clip = self.chunks.clip_factor(gpu, grads)?;
            let c = &self.chunks;
            gpu.launch(
                "optim",
                "sgd_step",
                per_chunk(c.nchunks, 256),
                &[
                    ptr(params),
                    ptr(grads),
                    opt_ptr(self.momentum_buffer.as_ref()),
                    opt_ptr(ema.fused.as_deref()),
                    ptr(&c.chunk_off),
                    ptr(&c.packed_off),
                    ptr(&c.chunk_len),
                    ptr(&c.chunk_tensor),
                    ptr(&c.tensor_decay),
                    clip,
                    Arg::F32(self.opts.weight_decay as f32),
                    Arg::F32(self.opts.momentum as f32),
                    Arg::F32(-lr as f32),
                    Arg::I32(self.opts.nesterov as i32),
                    Arg::F32(ema.d as f32),
                    Arg::F32((1.0 - ema.d) as f32),
                ],
            )?;
        }
        ema.finish(gpu, params)
    }

    fn save_into(&self, gpu: &Gpu, host: &mut dyn Optimizer) -> Result<()> {
        ensure!(
            host.name() == "sgd",
            "an SGD state cannot go into {}",
            host.name()
        );
        // optim::Sgd's format: `momentum_buffer` (only with momentum), then `step`.
        let mut state = Vec::new();
        if let Some(b) = &self.momentum_buffer {
            state.push(("momentum_buffer".to_string(), gpu.download(b)?));
        }
        state.push(("step".to_string(), crate::optim::encode_step(self.step)));
        host.load_state(&state)
    }

    fn load_from(&mut self, gpu: &Gpu, host: &dyn Optimizer) -> Result<()> {
        ensure!(
            host.name() == "sgd",
            "a {} state cannot go into SGD",
            host.name()
        );
        let state = host.state();
        let n = self.momentum_buffer.as_ref().map_or(0, |b| b.len());
        let expected: &[(&str, usize)] = if self.momentum_buffer.is_some() {
            &[("momentum_buffer", n), ("step", 2)]
        } else {
            &[("step", 2)]
        };
        let b = crate::optim::match_state("sgd", &state, expected)?;
        let step = crate::optim::decode_step("step", b[b.len() - 1])?;
        if let Some(buf) = self.momentum_buffer.as_mut() {
            gpu.upload_into(b[0], buf)?;
        }
        self.step = step;
        Ok(())
    }

    fn describe(&self) -> &'static str {
        "fused SGD + EMA kernel"
    }
}

/// LAMB + EMA on the device over flat buffers (`optim::Lamb` semantics): moments live here.
pub struct LambGpu {
    opts: LambOptions,
    nchunks: usize,
    chunk_off: DevBuf<i64>,
    chunk_len: DevBuf<i32>,
    chunk_tensor: DevBuf<i32>,
    chunk_whole: DevBuf<i32>,
    tensor_wd: DBuf,
    tensor_chunk0: DevBuf<i32>,
    tensor_nchunks: DevBuf<i32>,
    pub exp_avg: DBuf,
    pub exp_avg_sq: DBuf,
    gpart: DevBuf<f64>,
    pu: DevBuf<f64>,
    numel: usize,
    step: u64,
}

impl LambGpu {
    pub fn new(gpu: &Gpu, layout: &Layout, opts: LambOptions) -> Result<LambGpu> {
        opts.validate()?;
        let chunks = layout.chunks();
        let ents = layout.entries();
        let wd = opts.weight_decay as f32;
        let mut t0 = vec![0i32; ents.len()];
        let mut tn = vec![0i32; ents.len()];
        for (i, c) in chunks.iter().enumerate() {
            if tn[c.tensor] == 0 {
                t0[c.tensor] = i as i32;
            }
            tn[c.tensor] += 1;
        }
        let twd: Vec<f32> = ents
            .iter()
            .map(|e| if e.decay { wd } else { 0.0 })
            .collect();
        Ok(LambGpu {
            nchunks: chunks.len(),
            chunk_off: gpu
                .upload_i64(&chunks.iter().map(|c| c.offset as i64).collect::<Vec<_>>())?,
            chunk_len: gpu.upload_i32(&chunks.iter().map(|c| c.len as i32).collect::<Vec<_>>())?,
            chunk_tensor: gpu
                .upload_i32(&chunks.iter().map(|c| c.tensor as i32).collect::<Vec<_>>())?,
            chunk_whole: gpu
                .upload_i32(&chunks.iter().map(|c| c.whole as i32).collect::<Vec<_>>())?,
            tensor_wd: gpu.upload(&twd)?,
            tensor_chunk0: gpu.upload_i32(&t0)?,
            tensor_nchunks: gpu.upload_i32(&tn)?,
            exp_avg: gpu.zeros(layout.numel())?,
            exp_avg_sq: gpu.zeros(layout.numel())?,
            gpart: gpu.alloc_f64(chunks.len().max(1))?,
            pu: gpu.alloc_f64(2 * chunks.len().max(1))?,
            numel: layout.numel(),
            opts,
            step: 0,
        })
    }

    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Sets the step counter (bias corrections), when moments are loaded from a checkpoint.
    pub fn set_steps(&mut self, step: u64) {
        self.step = step;
    }

    /// One step: `params -= lr * trust * update`, and when `ema` is given, `ema = d ema +
    /// (1 - d) params` with the new params, in the same pass.
    pub fn step(
        &mut self,
        gpu: &Gpu,
        params: &mut DBuf,
        grads: &DBuf,
        lr: f64,
        ema: Option<(&mut DBuf, f64)>,
    ) -> Result<()> {
        ensure!(
            params.len() == self.numel && grads.len() == self.numel,
            "lamb: buffers do not match the layout"
        );
        ensure!(lr.is_finite() && lr >= 0.0, "lamb: learning rate {lr}");
        if self.nchunks == 0 {
            return Ok(());
        }
        self.step += 1;
        let t = self.step as f64;
        let (b1, b2) = self.opts.betas;
        let (bc1, bc2) = (1.0 - b1.powf(t), 1.0 - b2.powf(t));
        let (ema_buf, d) = match ema {
            Some((e, d)) => {
                ensure!(e.len() == self.numel, "lamb: EMA buffer length");
                (Some(e), d)
            }
            None => (None, 0.0),
        };
        let k = LambCoef {
            one_minus_b1: (1.0 - b1) as f32,
            b2: b2 as f32,
            one_minus_b2: (1.0 - b2) as f32,
            bc1: bc1 as f32,
            sqrt_bc2: bc2.sqrt() as f32,
            eps: self.opts.eps as f32,
            neg_lr: -lr as f32,
            ema_d: d as f32,
            ema_w: (1.0 - d) as f32,
            max_grad_norm: self.opts.max_grad_norm.map_or(0.0, |m| m as f32),
            do_ema: ema_buf.is_some() as i32,
        };
        let ema_arg = opt_ptr(ema_buf.as_deref());
        gpu.launch(
            "optim",
            "lamb_gnorm_partial",
            blocks(self.nchunks, 1, 1),
            &[
                ptr(grads),
                ptr(&self.chunk_off),
                ptr(&self.chunk_len),
                ptr(&self.gpart),
            ],
        )?;
        gpu.launch(
            "optim",
            "lamb_moments",
            blocks(self.nchunks, 1, 1),
            &[
                ptr(params),
                ptr(grads),
                ptr(&self.exp_avg),
                ptr(&self.exp_avg_sq),
                opt_ptr(ema_buf.as_deref()),
                ptr(&self.chunk_off),
                ptr(&self.chunk_len),
                ptr(&self.chunk_tensor),
                ptr(&self.chunk_whole),
                ptr(&self.tensor_wd),
                ptr(&self.gpart),
                i32a(self.nchunks),
                Arg::Lamb(k),
                ptr(&self.pu),
            ],
        )?;
        gpu.launch(
            "optim",
            "lamb_apply",
            blocks(self.nchunks, 1, 1),
            &[
                ptr(params),
                ptr(&self.exp_avg),
                ptr(&self.exp_avg_sq),
                ema_arg,
                ptr(&self.chunk_off),
                ptr(&self.chunk_len),
                ptr(&self.chunk_tensor),
                ptr(&self.chunk_whole),
                ptr(&self.tensor_wd),
                ptr(&self.tensor_chunk0),
                ptr(&self.tensor_nchunks),
                Arg::Lamb(k),
                ptr(&self.pu),
            ],
        )?;
        Ok(())
    }
}
