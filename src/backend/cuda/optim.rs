//! Launchers of cuda/optim.cu: the fused LAMB, AdamW and SGD updates of the flat device
//! parameters from the flat device gradient, with the EMA of the weights in the same pass where
//! the chunks cover the whole buffer (a layout with gaps blends after the update, as the CPU
//! blends the gaps too), and the EMA blend alone. The per-step scalars come from `optim` as
//! plain data (`backend::api::optim`); the state of an optimizer (moments) lives in tensors
//! above; here only the chunk tables, the reduction scratch and the finite-state flag the
//! update kernels set ([`OptimPlan`]).

use super::alloc::DevBuf;
use super::backend::Cuda;
use super::device::{DBuf, Gpu};
use super::launch::{blocks, i32a, i64a, need, opt_ptr, ptr, Arg, LambCoef, NULL};
use crate::backend::api::optim::{
    AdamWScalars, EmaCoef, FlatTable, LambScalars, Optim, SgdScalars, Step,
};
use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;

/// A grid of one block of `threads` per chunk.
fn per_chunk(nchunks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (nchunks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The chunk tables of a layout on the device (the CPU optimizers' chunks: <= 16 Ki elements,
/// never across tensors; one block each), the decay group of each tensor, and the scratch of
/// the reductions (per-chunk sums of g^2, LAMB's per-chunk sums of p^2 and update^2, PyTorch's
/// clip factor).
pub struct OptimPlan {
    nchunks: usize,
    numel: usize,
    /// The chunks cover the whole buffer (no gaps), so the EMA can blend in the update pass.
    dense: bool,
    chunk_off: DevBuf<i64>,
    /// Where each chunk starts in a buffer holding the chunks back to back (SGD's momentum
    /// buffer); the same as `chunk_off` without gaps.
    packed_off: DevBuf<i64>,
    chunk_len: DevBuf<i32>,
    chunk_tensor: DevBuf<i32>,
    chunk_whole: DevBuf<i32>,
    tensor_decay: DevBuf<i32>,
    /// The chunks of each tensor: the first one and how many.
    tensor_chunk0: DevBuf<i32>,
    tensor_nchunks: DevBuf<i32>,
    /// Per tensor the decay group as a flag, for LAMB's per-tensor weight decay.
    decay: Vec<bool>,
    /// LAMB's per-tensor weight decay (0 outside the decay group), for the decay of its bits.
    tensor_wd: Option<(u32, DBuf)>,
    gpart: DevBuf<f64>,
    pu: DevBuf<f64>,
    clip: DBuf,
    /// One int the update kernels set to 1 when they write a non-finite parameter or moment
    /// (zeroed here, read and cleared by `take_nonfinite`).
    bad: DevBuf<i32>,
}

impl OptimPlan {
    fn new(gpu: &Gpu, table: &FlatTable) -> Result<OptimPlan> {
        let chunks = &table.chunks;
        let ntensors = table.decay.len();
        let mut t0 = vec![0i32; ntensors];
        let mut tn = vec![0i32; ntensors];
        for (i, c) in chunks.iter().enumerate() {
            if tn[c.tensor] == 0 {
                t0[c.tensor] = i as i32;
            }
            tn[c.tensor] += 1;
        }
        let col = |f: fn(&crate::backend::api::optim::Chunk) -> i32| {
            chunks.iter().map(f).collect::<Vec<_>>()
        };
        let decay: Vec<i32> = table.decay.iter().map(|&d| d as i32).collect();
        Ok(OptimPlan {
            nchunks: chunks.len(),
            numel: table.numel,
            dense: table.dense(),
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
            chunk_whole: gpu.upload_i32(&col(|c| c.whole as i32))?,
            tensor_decay: gpu.upload_i32(if decay.is_empty() { &[0] } else { &decay })?,
            tensor_chunk0: gpu.upload_i32(&t0)?,
            tensor_nchunks: gpu.upload_i32(&tn)?,
            decay: table.decay.clone(),
            tensor_wd: None,
            gpart: gpu.alloc_f64(chunks.len().max(1))?,
            pu: gpu.alloc_f64(2 * chunks.len().max(1))?,
            clip: gpu.alloc(1)?,
            // Uploaded, not allocated: the pool may hand out NaN-poisoned bytes.
            bad: gpu.upload_i32(&[0])?,
        })
    }

    /// Checks the buffers of a step against the table; splits the EMA into the one the update
    /// kernel blends (`fused`: the chunks cover the buffer) and the one blended after it.
    fn check<'a>(
        &self,
        who: &str,
        s: Step<'a, DBuf>,
    ) -> Result<(&'a mut DBuf, &'a DBuf, EmaSplit<'a>)> {
        ensure!(
            s.params.len() == self.numel && s.grads.len() == self.numel,
            "{who}: params ({}) and grads ({}) do not match the layout ({})",
            s.params.len(),
            s.grads.len(),
            self.numel
        );
        let split = match s.ema {
            None => EmaSplit::none(),
            Some((e, k)) => {
                ensure!(e.len() == self.numel, "{who}: EMA buffer length");
                if self.dense {
                    EmaSplit {
                        fused: Some(e),
                        after: None,
                        k,
                    }
                } else {
                    EmaSplit {
                        fused: None,
                        after: Some(e),
                        k,
                    }
                }
            }
        };
        Ok((s.params, s.grads, split))
    }

    /// Launches 1 and 2 of AdamW / SGD (cuda/optim.cu) when clipping is on; the clip factor's
    /// argument (null: factor 1).
    fn clip_factor(&self, gpu: &Gpu, grads: &DBuf, max_grad_norm: Option<f32>) -> Result<Arg> {
        let Some(m) = max_grad_norm else {
            return Ok(NULL);
        };
        gpu.launch(
            "optim",
            "torch_gnorm_partial",
            per_chunk(self.nchunks, 128),
            &[
                ptr(grads),
                ptr(&self.chunk_off),
                ptr(&self.chunk_len),
                ptr(&self.gpart),
            ],
        )?;
        gpu.launch(
            "optim",
            "torch_clip_coef",
            per_chunk(1, 1),
            &[
                ptr(&self.gpart),
                i32a(self.nchunks),
                Arg::F32(m),
                ptr(&self.clip),
            ],
        )?;
        Ok(ptr(&self.clip))
    }

    /// LAMB's per-tensor weight decay for `wd` (uploaded once).
    fn tensor_wd(&mut self, gpu: &Gpu, wd: f32) -> Result<&DBuf> {
        if self
            .tensor_wd
            .as_ref()
            .is_none_or(|(bits, _)| *bits != wd.to_bits())
        {
            let twd: Vec<f32> = self
                .decay
                .iter()
                .map(|&d| if d { wd } else { 0.0 })
                .collect();
            self.tensor_wd = Some((wd.to_bits(), gpu.upload(&twd)?));
        }
        Ok(&self.tensor_wd.as_ref().expect("just uploaded").1)
    }
}

/// Where the EMA of a step is blended: in the update kernel, or after it.
struct EmaSplit<'a> {
    fused: Option<&'a mut DBuf>,
    after: Option<&'a mut DBuf>,
    k: EmaCoef,
}

impl EmaSplit<'_> {
    /// No EMA (the kernels' weights are then unused: d = 0, w = 1).
    fn none() -> Self {
        EmaSplit {
            fused: None,
            after: None,
            k: EmaCoef { d: 0.0, w: 1.0 },
        }
    }

    fn finish(self, gpu: &Gpu, params: &DBuf) -> Result<()> {
        if let Some(e) = self.after {
            gpu.ema_blend_f32(e, params, self.k)?;
        }
        Ok(())
    }
}

impl Gpu {
    /// EMA of a flat buffer: e = d e + w x with the f32 weights of `k`.
    pub fn ema_blend_f32(&self, e: &mut DBuf, x: &DBuf, k: EmaCoef) -> Result<()> {
        ensure!(e.len() == x.len(), "ema_blend: lengths differ");
        let n = e.len();
        if n == 0 {
            return Ok(());
        }
        self.launch(
            "elementwise",
            "ema_blend",
            self.grid(n),
            &[ptr(e), ptr(x), Arg::F32(k.d), Arg::F32(k.w), i64a(n)],
        )
    }
}

impl Optim for Cuda<f32> {
    type Plan = OptimPlan;

    fn optim_plan(&self, table: &FlatTable) -> Result<OptimPlan> {
        OptimPlan::new(self, table)
    }

    /// Three launches (cuda/optim.cu): the per-chunk sums of g^2 (global clip), moments and
    /// updates (tensors without decay and decayed tensors of one chunk finish here), then the
    /// decayed tensors over several chunks with their trust ratio.
    fn lamb_step(
        &self,
        plan: &mut OptimPlan,
        s: Step<'_, DBuf>,
        exp_avg: &mut DBuf,
        exp_avg_sq: &mut DBuf,
        k: &LambScalars,
    ) -> Result<()> {
        let (params, grads, ema) = plan.check("lamb", s)?;
        need("lamb exp_avg", exp_avg, plan.numel)?;
        need("lamb exp_avg_sq", exp_avg_sq, plan.numel)?;
        if plan.nchunks > 0 {
            let c = LambCoef {
                one_minus_b1: k.one_minus_b1,
                b2: k.b2,
                one_minus_b2: k.one_minus_b2,
                bc1: k.bc1,
                sqrt_bc2: k.sqrt_bc2,
                eps: k.eps,
                neg_lr: k.neg_lr,
                ema_d: ema.k.d,
                ema_w: ema.k.w,
                max_grad_norm: k.max_grad_norm.unwrap_or(0.0),
                do_ema: ema.fused.is_some() as i32,
            };
            plan.tensor_wd(self, k.wd)?;
            let p = &*plan;
            let twd = &p.tensor_wd.as_ref().expect("uploaded above").1;
            let ema_arg = || opt_ptr(ema.fused.as_deref());
            self.launch(
                "optim",
                "lamb_gnorm_partial",
                blocks(p.nchunks, 1, 1),
                &[
                    ptr(grads),
                    ptr(&p.chunk_off),
                    ptr(&p.chunk_len),
                    ptr(&p.gpart),
                ],
            )?;
            self.launch(
                "optim",
                "lamb_moments",
                blocks(p.nchunks, 1, 1),
                &[
                    ptr(params),
                    ptr(grads),
                    ptr(exp_avg),
                    ptr(exp_avg_sq),
                    ema_arg(),
                    ptr(&p.chunk_off),
                    ptr(&p.chunk_len),
                    ptr(&p.chunk_tensor),
                    ptr(&p.chunk_whole),
                    ptr(twd),
                    ptr(&p.gpart),
                    i32a(p.nchunks),
                    Arg::Lamb(c),
                    ptr(&p.pu),
                    ptr(&p.bad),
                ],
            )?;
            self.launch(
                "optim",
                "lamb_apply",
                blocks(p.nchunks, 1, 1),
                &[
                    ptr(params),
                    ptr(exp_avg),
                    ptr(exp_avg_sq),
                    ema_arg(),
                    ptr(&p.chunk_off),
                    ptr(&p.chunk_len),
                    ptr(&p.chunk_tensor),
                    ptr(&p.chunk_whole),
                    ptr(twd),
                    ptr(&p.tensor_chunk0),
                    ptr(&p.tensor_nchunks),
                    Arg::Lamb(c),
                    ptr(&p.pu),
                    ptr(&p.bad),
                ],
            )?;
        }
        ema.finish(self, params)
    }

    /// One fused pass over parameters, gradient, moments and EMA, after the global gradient
    /// norm when clipping is on.
    fn adamw_step(
        &self,
        plan: &mut OptimPlan,
        s: Step<'_, DBuf>,
        exp_avg: &mut DBuf,
        exp_avg_sq: &mut DBuf,
        k: &AdamWScalars,
    ) -> Result<()> {
        let (params, grads, ema) = plan.check("adamw", s)?;
        need("adamw exp_avg", exp_avg, plan.numel)?;
        need("adamw exp_avg_sq", exp_avg_sq, plan.numel)?;
        if plan.nchunks > 0 {
            let clip = plan.clip_factor(self, grads, k.max_grad_norm)?;
            let c = &*plan;
            self.launch(
                "optim",
                "adamw_step",
                per_chunk(c.nchunks, 256),
                &[
                    ptr(params),
                    ptr(grads),
                    ptr(exp_avg),
                    ptr(exp_avg_sq),
                    opt_ptr(ema.fused.as_deref()),
                    ptr(&c.chunk_off),
                    ptr(&c.chunk_len),
                    ptr(&c.chunk_tensor),
                    ptr(&c.tensor_decay),
                    clip,
                    Arg::F32(k.w1),
                    Arg::F32(k.b2),
                    Arg::F32(k.w2),
                    Arg::F32(k.neg_step),
                    Arg::F32(k.sqrt_bc2),
                    Arg::F32(k.eps),
                    Arg::F32(k.decay),
                    Arg::F32(ema.k.d),
                    Arg::F32(ema.k.w),
                    ptr(&c.bad),
                ],
            )?;
        }
        ema.finish(self, params)
    }

    /// One fused pass with the EMA; the momentum buffer holds the chunks back to back.
    fn sgd_step(
        &self,
        plan: &mut OptimPlan,
        s: Step<'_, DBuf>,
        momentum: Option<&mut DBuf>,
        k: &SgdScalars,
    ) -> Result<()> {
        let (params, grads, ema) = plan.check("sgd", s)?;
        if let Some(b) = momentum.as_deref() {
            need("sgd momentum buffer", b, plan.numel)?;
        }
        if plan.nchunks > 0 {
            let clip = plan.clip_factor(self, grads, k.max_grad_norm)?;
            let c = &*plan;
            self.launch(
                "optim",
                "sgd_step",
                per_chunk(c.nchunks, 256),
                &[
                    ptr(params),
                    ptr(grads),
                    opt_ptr(momentum.as_deref()),
                    opt_ptr(ema.fused.as_deref()),
                    ptr(&c.chunk_off),
                    ptr(&c.packed_off),
                    ptr(&c.chunk_len),
                    ptr(&c.chunk_tensor),
                    ptr(&c.tensor_decay),
                    clip,
                    Arg::F32(k.wd),
                    Arg::F32(k.momentum),
                    Arg::F32(k.neg_lr),
                    Arg::I32(k.nesterov as i32),
                    Arg::F32(ema.k.d),
                    Arg::F32(ema.k.w),
                    ptr(&c.bad),
                ],
            )?;
        }
        ema.finish(self, params)
    }

    fn ema_blend(&self, e: &mut DBuf, x: &DBuf, k: EmaCoef) -> Result<()> {
        self.ema_blend_f32(e, x, k)
    }

    /// A 4-byte read of the flag (it waits for the step's kernels); a 4-byte memset only when
    /// it was set.
    fn take_nonfinite(&self, plan: &mut OptimPlan) -> Result<bool> {
        let mut bad = [0i32];
        crate::backend::trace::record_d2h(4);
        crate::backend::trace::record_sync();
        self.ctx.bind_to_thread()?;
        let cu = self.stream.cu_stream();
        // SAFETY: the flag holds one i32; the stream is synchronized before `bad` is read.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut bad, plan.bad.device_ptr(), cu) }?;
        self.stream.synchronize()?;
        if bad[0] == 0 {
            return Ok(false);
        }
        crate::backend::trace::record("driver", "memset", 0, 4, 0);
        // SAFETY: 4 bytes at the flag's address; stream-ordered after the read above.
        unsafe { cudarc::driver::result::memset_d8_async(plan.bad.device_ptr(), 0, 4, cu) }?;
        Ok(true)
    }
}
