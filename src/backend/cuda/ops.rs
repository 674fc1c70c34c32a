//! Typed launchers: one method per kernel family, on device buffers, with the argument
//! conventions of the CPU kernels (`backend::cpu`, `ops`) so that the two compare one to one:
//! NCHW f32, weights [C_out, C_in/groups, kh, kw], `ConvGeom` for convolutions, (n, c, hw)
//! for BatchNorm, [N, C] logits for the losses.

use super::device::{DBuf, Gpu};
use super::launch::{i32a, i64a, opt_ptr, ptr, Arg, LambCoef};
use super::pool::DevBuf;
use crate::backend::cpu::conv::ConvGeom;
use crate::ops::pool::nearest_indices;
use crate::optim::{LambOptions, Layout};
use anyhow::{bail, ensure, Result};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::driver::LaunchConfig;

/// Fails unless the buffer (or view) holds at least `n` values (every launcher checks its
/// buffers before a kernel could read or write past them).
pub(crate) fn need<T>(what: &str, b: &DevBuf<T>, n: usize) -> Result<()> {
    ensure!(
        b.len() >= n,
        "{what}: buffer holds {} values, needs {n}",
        b.len()
    );
    Ok(())
}

/// Block-per-row / block-per-channel launch shapes (256 threads).
fn blocks(x: usize, y: usize, z: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x as u32, y as u32, z as u32),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Statistics of a BatchNorm on the device: f64 mean, biased variance (train mode only) and
/// 1/sqrt(var + eps); the f32 affine map y = (x - center) * scale + shift.
pub struct BnSaved {
    pub mean: DevBuf<f64>,
    pub var: Option<DevBuf<f64>>,
    pub invstd: DevBuf<f64>,
    pub center: DBuf,
    pub scale: DBuf,
    pub shift: DBuf,
    pub count: usize,
}

/// Batch statistics of a train-mode BN left on the device: f64 mean and biased variance.
pub struct DeviceStats {
    pub mean: DevBuf<f64>,
    pub var: DevBuf<f64>,
}

impl std::fmt::Debug for DeviceStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceStats[{}]", self.mean.len())
    }
}

pub struct BnGrads {
    pub dx: DBuf,
    pub dgamma: DBuf,
    pub dbeta: DBuf,
}

pub struct ConvGradsGpu {
    pub dx: Option<DBuf>,
    pub dw: Option<DBuf>,
    pub db: Option<DBuf>,
}

/// A fused re-parameterized depth-wise conv (see cuda/rep_conv.cu): `branches` kxk branches
/// (kh x kw, padding (k-1)/2), the optional 1x1 scale branch and the optional BN identity
/// (stride 1 only). Weights: kxk stacked [branches][C][kh*kw], scale [C]; BN parameters and
/// statistics [NBT][C] in the order kxk branches, scale, identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RepDwGeom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub branches: usize,
    pub scale: bool,
    pub identity: bool,
}

impl RepDwGeom {
    pub fn pads(&self) -> (usize, usize) {
        ((self.kh - 1) / 2, (self.kw - 1) / 2)
    }
    pub fn out_hw(&self) -> (usize, usize) {
        let (ph, pw) = self.pads();
        (
            (self.h + 2 * ph - self.kh) / self.stride + 1,
            (self.w + 2 * pw - self.kw) / self.stride + 1,
        )
    }
    /// Number of BN branches.
    pub fn nbt(&self) -> usize {
        self.branches + self.scale as usize + self.identity as usize
    }
    fn check(&self) -> Result<()> {
        ensure!(
            self.kh % 2 == 1 && self.kw % 2 == 1 && self.kw <= 5 && self.kh * self.kw <= 25,
            "rep_dw: kernel {}x{} (odd, kw <= 5, area <= 25)",
            self.kh,
            self.kw
        );
        ensure!(
            (1..=6).contains(&self.branches) && self.nbt() <= 8,
            "rep_dw: 1..=6 kxk branches"
        );
        ensure!(
            !self.identity || self.stride == 1,
            "rep_dw: the identity branch needs stride 1"
        );
        ensure!(self.stride >= 1, "rep_dw: stride 0");
        Ok(())
    }
    fn args(&self) -> Vec<Arg> {
        let (ho, wo) = self.out_hw();
        let (ph, pw) = self.pads();
        vec![
            i32a(self.n),
            i32a(self.c),
            i32a(self.h),
            i32a(self.w),
            i32a(ho),
            i32a(wo),
            i32a(self.kh),
            i32a(self.kw),
            i32a(self.stride),
            i32a(ph),
            i32a(pw),
            i32a(self.branches),
            i32a(self.scale as usize),
            i32a(self.identity as usize),
        ]
    }
}

/// Saved by the fused rep_conv forward: every branch's batch mean and biased variance
/// ([NBT][C], f64) and the folded kernel and bias it ran.
pub struct RepDwSaved {
    pub mean: DevBuf<f64>,
    pub var: DevBuf<f64>,
    pub weff: DBuf,
    pub beff: DBuf,
}

pub struct RepDwGrads {
    pub dx: DBuf,
    /// [branches][C][kh*kw]
    pub dwk: DBuf,
    /// [C] when the scale branch exists.
    pub dws: Option<DBuf>,
    /// [NBT][C]
    pub dgamma: DBuf,
    pub dbeta: DBuf,
}

/// Output ranges [r0[s], r1[s]) that read source index s under the nearest rule.
fn nearest_ranges(input: usize, output: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let idx = nearest_indices(input, output);
    let (mut r0, mut r1) = (vec![0i32; input], vec![0i32; input]);
    for (o, &s) in idx.iter().enumerate() {
        if r1[s] == 0 {
            r0[s] = o as i32;
        }
        r1[s] = o as i32 + 1;
    }
    (idx.iter().map(|&v| v as i32).collect(), r0, r1)
}

impl Gpu {
    fn unary(&self, name: &'static str, x: &DBuf) -> Result<DBuf> {
        let n = x.len();
        let y = self.alloc(n)?;
        self.launch(
            "elementwise",
            name,
            self.grid(n),
            &[ptr(x), ptr(&y), i64a(n)],
        )?;
        Ok(y)
    }

    /// An elementwise kernel `name(a, b, y, n)` of two equal-length inputs.
    pub(crate) fn binary(&self, name: &'static str, a: &DBuf, b: &DBuf) -> Result<DBuf> {
        ensure!(
            a.len() == b.len(),
            "{name}: lengths {} and {}",
            a.len(),
            b.len()
        );
        let n = a.len();
        let y = self.alloc(n)?;
        self.launch(
            "elementwise",
            name,
            self.grid(n),
            &[ptr(a), ptr(b), ptr(&y), i64a(n)],
        )?;
        Ok(y)
    }

    /// dst = src (same lengths; views included).
    pub fn copy_into(&self, src: &DBuf, dst: &mut DBuf) -> Result<()> {
        ensure!(
            src.len() == dst.len(),
            "copy of {} values into {}",
            src.len(),
            dst.len()
        );
        let n = src.len();
        self.launch(
            "elementwise",
            "copy_f32",
            self.grid(n),
            &[ptr(src), ptr(dst), i64a(n)],
        )
    }

    /// Copies many buffers (or views) into places of one buffer in a single launch:
    /// `dst[off..off + src.len()] = src` for every `(src, off)`. The flat gradient of a network
    /// of ~2,000 tensors is one launch, not one each.
    pub fn copy_segments(&self, segments: &[(&DBuf, usize)], dst: &mut DBuf) -> Result<()> {
        if segments.is_empty() {
            return Ok(());
        }
        let mut table = vec![0i64; 3 * segments.len()];
        let n = segments.len();
        for (i, (src, off)) in segments.iter().enumerate() {
            need("copy_segments destination", dst, off + src.len())?;
            table[i] = src.device_ptr() as i64;
            table[n + i] = *off as i64;
            table[2 * n + i] = src.len() as i64;
        }
        let t = self.upload_i64(&table)?;
        let blocks = n.min(self.multiprocessors() as usize * 16).max(1);
        self.launch(
            "elementwise",
            "copy_segments",
            LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                ptr(&t.view(0, n)),
                ptr(&t.view(n, n)),
                ptr(&t.view(2 * n, n)),
                ptr(dst),
                i32a(n),
            ],
        )
    }

    pub fn fill(&self, y: &mut DBuf, v: f32) -> Result<()> {
        let n = y.len();
        self.launch(
            "elementwise",
            "fill_f32",
            self.grid(n),
            &[ptr(y), Arg::F32(v), i64a(n)],
        )
    }

    pub fn relu(&self, x: &DBuf) -> Result<DBuf> {
        self.unary("relu_fwd", x)
    }
    /// Gradient of relu from its input.
    pub fn relu_backward(&self, x: &DBuf, gy: &DBuf) -> Result<DBuf> {
        self.binary("relu_bwd", x, gy)
    }
    pub fn sigmoid(&self, x: &DBuf) -> Result<DBuf> {
        self.unary("sigmoid_fwd", x)
    }
    /// Gradient of sigmoid from its output.
    pub fn sigmoid_backward(&self, y: &DBuf, gy: &DBuf) -> Result<DBuf> {
        self.binary("sigmoid_bwd", y, gy)
    }
    pub fn hard_sigmoid(&self, x: &DBuf) -> Result<DBuf> {
        self.unary("hard_sigmoid_fwd", x)
    }
    pub fn hard_sigmoid_backward(&self, x: &DBuf, gy: &DBuf) -> Result<DBuf> {
        self.binary("hard_sigmoid_bwd", x, gy)
    }
    pub fn add(&self, a: &DBuf, b: &DBuf) -> Result<DBuf> {
        self.binary("add_fwd", a, b)
    }
    /// Elementwise product; also both gradients of `mul` (gy * other).
    pub fn mul(&self, a: &DBuf, b: &DBuf) -> Result<DBuf> {
        self.binary("mul_fwd", a, b)
    }
    /// y += x
    pub fn add_assign(&self, y: &mut DBuf, x: &DBuf) -> Result<()> {
        ensure!(y.len() == x.len(), "add_assign: lengths differ");
        let n = y.len();
        self.launch(
            "elementwise",
            "add_inplace",
            self.grid(n),
            &[ptr(y), ptr(x), i64a(n)],
        )
    }
    pub fn scale(&self, x: &DBuf, a: f32) -> Result<DBuf> {
        let n = x.len();
        let y = self.alloc(n)?;
        self.launch(
            "elementwise",
            "scale_fwd",
            self.grid(n),
            &[ptr(x), Arg::F32(a), ptr(&y), i64a(n)],
        )?;
        Ok(y)
    }

    /// `y = x * s[n, c]` broadcast over each plane of `hw` values; with x := gy it is also the
    /// input gradient.
    pub fn mul_channel(&self, x: &DBuf, s: &DBuf, hw: usize) -> Result<DBuf> {
        ensure!(
            hw > 0 && x.len() == s.len() * hw,
            "mul_channel: {} values vs {} scales x {hw}",
            x.len(),
            s.len()
        );
        let n = x.len();
        let y = self.alloc(n)?;
        self.launch(
            "elementwise",
            "mul_channel_fwd",
            self.grid(n),
            &[ptr(x), ptr(s), ptr(&y), i64a(hw), i64a(n)],
        )?;
        Ok(y)
    }

    /// The scale gradient of `mul_channel`: per plane sum of gy * x.
    pub fn mul_channel_backward_scale(&self, gy: &DBuf, x: &DBuf, hw: usize) -> Result<DBuf> {
        ensure!(
            hw > 0 && gy.len() == x.len() && x.len().is_multiple_of(hw),
            "mul_channel backward shapes"
        );
        let planes = x.len() / hw;
        let ds = self.alloc(planes)?;
        self.launch(
            "elementwise",
            "mul_channel_bwd_ds",
            blocks(planes, 1, 1),
            &[ptr(gy), ptr(x), ptr(&ds), i32a(hw)],
        )?;
        Ok(ds)
    }

    /// Per-channel sums of an [N, C, HW] tensor (bias gradients).
    pub fn channel_sums(&self, a: &DBuf, (n, c, hw): (usize, usize, usize)) -> Result<DBuf> {
        need("channel_sums", a, n * c * hw)?;
        let s = self.splits(c, n * hw);
        let part = self.alloc_f64(c * s)?;
        self.launch(
            "elementwise",
            "chan_sum_partial",
            blocks(c, s, 1),
            &[ptr(a), i32a(n), i32a(c), i32a(hw), ptr(&part)],
        )?;
        let out = self.alloc(c)?;
        self.launch(
            "elementwise",
            "chan_sum_finalize",
            self.grid(c),
            &[ptr(&part), i32a(s), i32a(c), ptr(&out)],
        )?;
        Ok(out)
    }

    /// out[k] = sum_r a[r, k] for an [R, K] matrix.
    pub fn sum_rows(&self, a: &DBuf, r: usize, k: usize) -> Result<DBuf> {
        need("sum_rows", a, r * k)?;
        let out = self.alloc(k)?;
        self.launch(
            "elementwise",
            "sum_rows",
            self.grid(k),
            &[ptr(a), i32a(r), i64a(k), ptr(&out)],
        )?;
        Ok(out)
    }

    /// EMA of a flat buffer: e = d e + (1 - d) x (d and 1 - d rounded to f32 as on the CPU).
    pub fn ema_blend(&self, e: &mut DBuf, x: &DBuf, d: f64) -> Result<()> {
        ensure!(e.len() == x.len(), "ema_blend: lengths differ");
        let n = e.len();
        self.launch(
            "elementwise",
            "ema_blend",
            self.grid(n),
            &[
                ptr(e),
                ptr(x),
                Arg::F32(d as f32),
                Arg::F32((1.0 - d) as f32),
                i64a(n),
            ],
        )
    }

    // ---- BatchNorm ----

    /// Train-mode statistics and the affine map, without applying it.
    pub fn batch_norm_stats(
        &self,
        x: &DBuf,
        gamma: &DBuf,
        beta: &DBuf,
        (n, c, hw): (usize, usize, usize),
        eps: f64,
    ) -> Result<BnSaved> {
        need("batch_norm x", x, n * c * hw)?;
        need("batch_norm gamma", gamma, c)?;
        need("batch_norm beta", beta, c)?;
        let s = self.splits(c, n * hw);
        let part = self.alloc_f64(2 * c * s)?;
        self.launch(
            "batch_norm",
            "bn_stats_partial",
            blocks(c, s, 1),
            &[ptr(x), i32a(n), i32a(c), i32a(hw), ptr(&part)],
        )?;
        let saved = BnSaved {
            mean: self.alloc_f64(c)?,
            var: Some(self.alloc_f64(c)?),
            invstd: self.alloc_f64(c)?,
            center: self.alloc(c)?,
            scale: self.alloc(c)?,
            shift: self.alloc(c)?,
            count: n * hw,
        };
        self.launch(
            "batch_norm",
            "bn_stats_finalize",
            self.grid(c),
            &[
                ptr(&part),
                i32a(s),
                i32a(c),
                Arg::F64((n * hw) as f64),
                Arg::F64(eps),
                ptr(gamma),
                ptr(beta),
                ptr(&saved.mean),
                opt_ptr(saved.var.as_ref()),
                ptr(&saved.invstd),
                ptr(&saved.center),
                ptr(&saved.scale),
                ptr(&saved.shift),
            ],
        )?;
        Ok(saved)
    }

    /// y = (x - center) * scale + shift per channel.
    pub fn batch_norm_apply(
        &self,
        x: &DBuf,
        saved: &BnSaved,
        (n, c, hw): (usize, usize, usize),
    ) -> Result<DBuf> {
        need("batch_norm x", x, n * c * hw)?;
        let total = n * c * hw;
        let y = self.alloc(total)?;
        self.launch(
            "batch_norm",
            "bn_apply",
            self.grid(total),
            &[
                ptr(x),
                ptr(&y),
                ptr(&saved.center),
                ptr(&saved.scale),
                ptr(&saved.shift),
                i32a(c),
                i32a(hw),
                i64a(total),
            ],
        )?;
        Ok(y)
    }

    /// Train-mode BN (`ops::batch_norm_train`).
    pub fn batch_norm_train(
        &self,
        x: &DBuf,
        gamma: &DBuf,
        beta: &DBuf,
        dims: (usize, usize, usize),
        eps: f64,
    ) -> Result<(DBuf, BnSaved)> {
        let saved = self.batch_norm_stats(x, gamma, beta, dims, eps)?;
        let y = self.batch_norm_apply(x, &saved, dims)?;
        Ok((y, saved))
    }

    /// Eval-mode BN with running statistics (`ops::batch_norm_eval`).
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_eval(
        &self,
        x: &DBuf,
        gamma: &DBuf,
        beta: &DBuf,
        running_mean: &DBuf,
        running_var: &DBuf,
        dims: (usize, usize, usize),
        eps: f64,
    ) -> Result<(DBuf, BnSaved)> {
        let (n, c, hw) = dims;
        need("batch_norm running_mean", running_mean, c)?;
        need("batch_norm running_var", running_var, c)?;
        let saved = BnSaved {
            mean: self.alloc_f64(c)?,
            var: None,
            invstd: self.alloc_f64(c)?,
            center: self.alloc(c)?,
            scale: self.alloc(c)?,
            shift: self.alloc(c)?,
            count: n * hw,
        };
        self.launch(
            "batch_norm",
            "bn_eval_coef",
            self.grid(c),
            &[
                ptr(running_mean),
                ptr(running_var),
                i32a(c),
                Arg::F64(eps),
                ptr(gamma),
                ptr(beta),
                ptr(&saved.mean),
                ptr(&saved.invstd),
                ptr(&saved.center),
                ptr(&saved.scale),
                ptr(&saved.shift),
            ],
        )?;
        let y = self.batch_norm_apply(x, &saved, dims)?;
        Ok((y, saved))
    }

    /// Gradients of BN (train mode: through the batch statistics; eval: the affine map).
    pub fn batch_norm_backward(
        &self,
        gy: &DBuf,
        x: &DBuf,
        gamma: &DBuf,
        saved: &BnSaved,
        (n, c, hw): (usize, usize, usize),
        train: bool,
    ) -> Result<BnGrads> {
        need("batch_norm gy", gy, n * c * hw)?;
        need("batch_norm x", x, n * c * hw)?;
        let s = self.splits(c, n * hw);
        let part = self.alloc_f64(2 * c * s)?;
        self.launch(
            "batch_norm",
            "bn_bwd_partial",
            blocks(c, s, 1),
            &[
                ptr(gy),
                ptr(x),
                ptr(&saved.mean),
                i32a(n),
                i32a(c),
                i32a(hw),
                ptr(&part),
            ],
        )?;
        let (dgamma, dbeta) = (self.alloc(c)?, self.alloc(c)?);
        let (ka, kb, kc) = (self.alloc(c)?, self.alloc(c)?, self.alloc(c)?);
        self.launch(
            "batch_norm",
            "bn_bwd_finalize",
            self.grid(c),
            &[
                ptr(&part),
                i32a(s),
                i32a(c),
                Arg::F64((n * hw) as f64),
                Arg::I32(train as i32),
                ptr(gamma),
                ptr(&saved.invstd),
                ptr(&dgamma),
                ptr(&dbeta),
                ptr(&ka),
                ptr(&kb),
                ptr(&kc),
            ],
        )?;
        let total = n * c * hw;
        let dx = self.alloc(total)?;
        self.launch(
            "batch_norm",
            "bn_bwd_dx",
            self.grid(total),
            &[
                ptr(gy),
                ptr(x),
                ptr(&saved.center),
                ptr(&ka),
                ptr(&kb),
                ptr(&kc),
                ptr(&dx),
                i32a(c),
                i32a(hw),
                i64a(total),
            ],
        )?;
        Ok(BnGrads { dx, dgamma, dbeta })
    }

    /// PyTorch's running-stat update from train-mode statistics.
    pub fn batch_norm_update_running(
        &self,
        running_mean: &mut DBuf,
        running_var: &mut DBuf,
        saved: &BnSaved,
        momentum: f64,
    ) -> Result<()> {
        let c = saved.center.len();
        let Some(var) = saved.var.as_ref() else {
            bail!("running-stat update needs train-mode statistics");
        };
        self.launch(
            "batch_norm",
            "bn_running_update",
            self.grid(c),
            &[
                ptr(running_mean),
                ptr(running_var),
                ptr(&saved.mean),
                ptr(var),
                i32a(c),
                Arg::F64(momentum),
                Arg::F64(saved.count as f64),
            ],
        )
    }

    /// The batch statistics on the host (the CPU op's `BatchStats`).
    pub fn batch_stats(&self, saved: &BnSaved) -> Result<crate::ops::BatchStats> {
        let Some(var) = saved.var.as_ref() else {
            bail!("eval-mode BN has no batch statistics");
        };
        Ok(crate::ops::BatchStats {
            mean: self.download_f64(&saved.mean)?,
            var: self.download_f64(var)?,
            count: saved.count,
            device: None,
        })
    }

    /// The batch statistics, kept on the device (`BatchStats::device`): copies of `c` channels
    /// from channel `at` of the saved f64 mean and variance (a BN's own, or one branch of a fused
    /// rep_conv's stacked statistics), so they outlive the saved buffers' backward closure.
    pub fn batch_stats_device(
        &self,
        mean: &DevBuf<f64>,
        var: &DevBuf<f64>,
        at: usize,
        c: usize,
        count: usize,
    ) -> Result<crate::ops::BatchStats> {
        ensure!(
            mean.len() >= at + c && var.len() >= at + c,
            "batch statistics: channels {at}..{} of {}",
            at + c,
            mean.len()
        );
        let copy = |src: &DevBuf<f64>| -> Result<DevBuf<f64>> {
            let dst = self.alloc_f64(c)?;
            if c > 0 {
                // SAFETY: both buffers hold c f64 from these addresses; same stream as every use.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        dst.device_ptr(),
                        src.view(at, c).device_ptr(),
                        c * std::mem::size_of::<f64>(),
                        self.stream.cu_stream(),
                    )
                }?;
            }
            Ok(dst)
        };
        let device = DeviceStats {
            mean: copy(mean)?,
            var: copy(var)?,
        };
        Ok(crate::ops::BatchStats {
            mean: Vec::new(),
            var: Vec::new(),
            count,
            device: Some(std::sync::Arc::new(device)),
        })
    }

    /// PyTorch's running-stat update (momentum, unbiased variance) of one BN whose running mean
    /// and variance are `c` values at `mean_at` and `var_at` of the flat device buffers.
    pub fn bn_running_update_at(
        &self,
        buffers: &mut DBuf,
        (mean_at, var_at, c): (usize, usize, usize),
        stats: &DeviceStats,
        count: usize,
        momentum: f64,
    ) -> Result<()> {
        need("running statistics", buffers, mean_at.max(var_at) + c)?;
        ensure!(stats.mean.len() == c, "running-stat update: {c} channels");
        self.launch(
            "batch_norm",
            "bn_running_update",
            self.grid(c),
            &[
                ptr(&buffers.view(mean_at, c)),
                ptr(&buffers.view(var_at, c)),
                ptr(&stats.mean),
                ptr(&stats.var),
                i32a(c),
                Arg::F64(momentum),
                Arg::F64(count as f64),
            ],
        )
    }

    // ---- GEMM (row-major, through column-major cuBLAS) ----

    /// Row-major `C[m, n] = op(A)[m, k] · op(B)[k, n] + beta C` for `batch` matrices at the
    /// given element strides (0: the same matrix for every batch entry).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_rm(
        &self,
        (m, n, k): (usize, usize, usize),
        a: &DBuf,
        ta: bool,
        sa: usize,
        b: &DBuf,
        tb: bool,
        sb: usize,
        c: &DBuf,
        sc: usize,
        beta: f32,
        batch: usize,
    ) -> Result<()> {
        // Every matrix of the batch must lie inside its buffer.
        let span = |s: usize, rows: usize, cols: usize| s * (batch - 1) + rows * cols;
        ensure!(
            a.len() >= span(sa, m, k) && b.len() >= span(sb, k, n) && c.len() >= span(sc, m, n),
            "GEMM {m}x{n}x{k} (batch {batch}) does not fit its buffers"
        );
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let d = |v: usize| i32::try_from(v).expect("GEMM size fits i32");
        let (alpha, beta_) = (1.0f32, beta);
        let (pa, pb, pc) = (
            a.device_ptr() as *const f32,
            b.device_ptr() as *const f32,
            c.device_ptr() as *mut f32,
        );
        let h = *self.blas.handle();
        // C^T = op(B)^T op(A)^T in column-major terms: cuBLAS's A is our B and vice versa.
        let (lda, ldb) = (d(if tb { k } else { n }), d(if ta { m } else { k }));
        // SAFETY: the buffers hold the matrices (checked above); the handle runs on our stream.
        let r = unsafe {
            if batch == 1 {
                cudarc::cublas::result::sgemm(
                    h,
                    op(tb),
                    op(ta),
                    d(n),
                    d(m),
                    d(k),
                    &alpha,
                    pb,
                    lda,
                    pa,
                    ldb,
                    &beta_,
                    pc,
                    d(n),
                )
            } else {
                cudarc::cublas::result::sgemm_strided_batched(
                    h,
                    op(tb),
                    op(ta),
                    d(n),
                    d(m),
                    d(k),
                    &alpha,
                    pb,
                    lda,
                    sb as i64,
                    pa,
                    ldb,
                    sa as i64,
                    &beta_,
                    pc,
                    d(n),
                    sc as i64,
                    d(batch),
                )
            }
        };
        r.map_err(|e| anyhow::anyhow!("cuBLAS sgemm: {e:?}"))
    }

    // ---- convolutions ----

    fn geom_args(g: &ConvGeom) -> Vec<Arg> {
        vec![
            i32a(g.n),
            i32a(g.cin),
            i32a(g.h),
            i32a(g.w),
            i32a(g.ho),
            i32a(g.wo),
            i32a(g.kh),
            i32a(g.kw),
            i32a(g.sh),
            i32a(g.sw),
            i32a(g.ph),
            i32a(g.pw),
        ]
    }

    /// `conv2d_forward` of the CPU backend: depth-wise direct, 1x1 stride 1 through a batched
    /// GEMM, other dense convs through im2col + GEMM. Grouped non-depth-wise convs are not
    /// supported (GhostNet has none).
    pub fn conv2d_forward(
        &self,
        g: &ConvGeom,
        x: &DBuf,
        w: &DBuf,
        bias: Option<&DBuf>,
    ) -> Result<DBuf> {
        need("conv2d x", x, g.n * g.cin * g.h * g.w)?;
        need("conv2d w", w, g.cout * (g.cin / g.groups) * g.kh * g.kw)?;
        let p = g.ho * g.wo;
        let total = g.n * g.cout * p;
        if g.is_depthwise() {
            let y = self.alloc(total)?;
            let mut args = vec![ptr(x), ptr(w), opt_ptr(bias), ptr(&y)];
            args.extend(Self::geom_args(g));
            self.launch("conv", "dw_fwd", self.grid(total), &args)?;
            return Ok(y);
        }
        ensure!(
            g.groups == 1,
            "CUDA conv2d: groups={} is only supported depth-wise",
            g.groups
        );
        if g.is_pointwise() {
            let y = self.alloc(total)?;
            self.gemm_rm(
                (g.cout, p, g.cin),
                w,
                false,
                0,
                x,
                false,
                g.cin * p,
                &y,
                g.cout * p,
                0.0,
                g.n,
            )?;
            if let Some(b) = bias {
                need("conv2d bias", b, g.cout)?;
                self.launch(
                    "elementwise",
                    "add_channel_bias",
                    self.grid(total),
                    &[ptr(&y), ptr(b), i32a(g.cout), i64a(p), i64a(total)],
                )?;
            }
            return Ok(y);
        }
        let kdim = g.cin * g.kh * g.kw;
        let np = g.n * p;
        let col = self.alloc(kdim * np)?;
        let mut args = vec![ptr(x), ptr(&col)];
        args.extend(Self::geom_args(g));
        self.launch("conv", "im2col", self.grid(kdim * np), &args)?;
        let ycnp = self.alloc(g.cout * np)?;
        self.gemm_rm(
            (g.cout, np, kdim),
            w,
            false,
            0,
            &col,
            false,
            0,
            &ycnp,
            0,
            0.0,
            1,
        )?;
        let y = self.alloc(total)?;
        self.launch(
            "conv",
            "cnp_to_ncp",
            self.grid(total),
            &[
                ptr(&ycnp),
                opt_ptr(bias),
                ptr(&y),
                i32a(g.n),
                i32a(g.cout),
                i64a(p),
            ],
        )?;
        Ok(y)
    }

    /// `conv2d_backward` of the CPU backend; `need` = (dx, dw, db).
    pub fn conv2d_backward(
        &self,
        g: &ConvGeom,
        x: &DBuf,
        w: &DBuf,
        dy: &DBuf,
        need_: (bool, bool, bool),
    ) -> Result<ConvGradsGpu> {
        let p = g.ho * g.wo;
        need("conv2d dy", dy, g.n * g.cout * p)?;
        let (need_dx, need_dw, need_db) = need_;
        let db = if need_db {
            Some(self.channel_sums(dy, (g.n, g.cout, p))?)
        } else {
            None
        };
        let xs = g.n * g.cin * g.h * g.w;
        if g.is_depthwise() {
            let dx = if need_dx {
                let dx = self.alloc(xs)?;
                let mut args = vec![ptr(dy), ptr(w), ptr(&dx)];
                args.extend(Self::geom_args(g));
                self.launch("conv", "dw_bwd_dx", self.grid(xs), &args)?;
                Some(dx)
            } else {
                None
            };
            let dw = if need_dw {
                ensure!(
                    g.kh * g.kw <= 25,
                    "CUDA depth-wise weight gradient: kernel area {} > 25",
                    g.kh * g.kw
                );
                let kk = g.kh * g.kw;
                let s = self.splits(g.cin, g.n * p);
                let part = self.alloc_f64(g.cin * s * kk)?;
                let mut args = vec![ptr(dy), ptr(x)];
                args.extend(Self::geom_args(g));
                args.push(ptr(&part));
                self.launch("conv", "dw_bwd_dw_partial", blocks(g.cin, s, 1), &args)?;
                let dw = self.alloc(g.cin * kk)?;
                self.launch(
                    "conv",
                    "dw_bwd_dw_finalize",
                    self.grid(g.cin * kk),
                    &[ptr(&part), i32a(s), i32a(g.cin), i32a(kk), ptr(&dw)],
                )?;
                Some(dw)
            } else {
                None
            };
            return Ok(ConvGradsGpu { dx, dw, db });
        }
        ensure!(
            g.groups == 1,
            "CUDA conv2d: groups={} is only supported depth-wise",
            g.groups
        );
        if g.is_pointwise() {
            let dx = if need_dx {
                let dx = self.alloc(xs)?;
                self.gemm_rm(
                    (g.cin, p, g.cout),
                    w,
                    true,
                    0,
                    dy,
                    false,
                    g.cout * p,
                    &dx,
                    g.cin * p,
                    0.0,
                    g.n,
                )?;
                Some(dx)
            } else {
                None
            };
            let dw = if need_dw {
                let wsz = g.cout * g.cin;
                let per = self.alloc(g.n * wsz)?;
                self.gemm_rm(
                    (g.cout, g.cin, p),
                    dy,
                    false,
                    g.cout * p,
                    x,
                    true,
                    g.cin * p,
                    &per,
                    wsz,
                    0.0,
                    g.n,
                )?;
                Some(self.sum_rows(&per, g.n, wsz)?)
            } else {
                None
            };
            return Ok(ConvGradsGpu { dx, dw, db });
        }
        let kdim = g.cin * g.kh * g.kw;
        let np = g.n * p;
        let dycnp = self.alloc(g.cout * np)?;
        self.launch(
            "conv",
            "ncp_to_cnp",
            self.grid(g.cout * np),
            &[ptr(dy), ptr(&dycnp), i32a(g.n), i32a(g.cout), i64a(p)],
        )?;
        let dw = if need_dw {
            let col = self.alloc(kdim * np)?;
            let mut args = vec![ptr(x), ptr(&col)];
            args.extend(Self::geom_args(g));
            self.launch("conv", "im2col", self.grid(kdim * np), &args)?;
            let dw = self.alloc(g.cout * kdim)?;
            self.gemm_rm(
                (g.cout, kdim, np),
                &dycnp,
                false,
                0,
                &col,
                true,
                0,
                &dw,
                0,
                0.0,
                1,
            )?;
            Some(dw)
        } else {
            None
        };
        let dx = if need_dx {
            let dcol = self.alloc(kdim * np)?;
            self.gemm_rm(
                (kdim, np, g.cout),
                w,
                true,
                0,
                &dycnp,
                false,
                0,
                &dcol,
                0,
                0.0,
                1,
            )?;
            let dx = self.alloc(xs)?;
            let mut args = vec![ptr(&dcol), ptr(&dx)];
            args.extend(Self::geom_args(g));
            self.launch("conv", "col2im", self.grid(xs), &args)?;
            Some(dx)
        } else {
            None
        };
        Ok(ConvGradsGpu { dx, dw, db })
    }

    // ---- linear ----

    /// `y = x · W^T + b`, x [N, F], W [O, F].
    pub fn linear_forward(
        &self,
        x: &DBuf,
        w: &DBuf,
        b: Option<&DBuf>,
        (n, f, o): (usize, usize, usize),
    ) -> Result<DBuf> {
        need("linear x", x, n * f)?;
        need("linear w", w, o * f)?;
        let y = self.alloc(n * o)?;
        self.gemm_rm((n, o, f), x, false, 0, w, true, 0, &y, 0, 0.0, 1)?;
        if let Some(b) = b {
            need("linear b", b, o)?;
            self.launch(
                "elementwise",
                "add_bias_rows",
                self.grid(n * o),
                &[ptr(&y), ptr(b), i64a(o), i64a(n * o)],
            )?;
        }
        Ok(y)
    }

    /// (dx, dW, db) of `linear_forward`.
    pub fn linear_backward(
        &self,
        x: &DBuf,
        w: &DBuf,
        gy: &DBuf,
        (n, f, o): (usize, usize, usize),
    ) -> Result<(DBuf, DBuf, DBuf)> {
        need("linear gy", gy, n * o)?;
        let dx = self.alloc(n * f)?;
        self.gemm_rm((n, f, o), gy, false, 0, w, false, 0, &dx, 0, 0.0, 1)?;
        let dw = self.alloc(o * f)?;
        self.gemm_rm((o, f, n), gy, true, 0, x, false, 0, &dw, 0, 0.0, 1)?;
        let db = self.sum_rows(gy, n, o)?;
        Ok((dx, dw, db))
    }

    // ---- pooling, upsample, concat ----

    pub fn avg_pool2x2(
        &self,
        x: &DBuf,
        (n, c, h, w): (usize, usize, usize, usize),
    ) -> Result<DBuf> {
        need("avg_pool2x2 x", x, n * c * h * w)?;
        let out = n * c * (h / 2) * (w / 2);
        ensure!(out > 0, "avg_pool2x2 on a {h}x{w} input");
        let y = self.alloc(out)?;
        self.launch(
            "pool",
            "avg_pool2x2_fwd",
            self.grid(out),
            &[ptr(x), ptr(&y), i64a(n * c), i32a(h), i32a(w)],
        )?;
        Ok(y)
    }

    pub fn avg_pool2x2_backward(
        &self,
        gy: &DBuf,
        (n, c, h, w): (usize, usize, usize, usize),
    ) -> Result<DBuf> {
        need("avg_pool2x2 gy", gy, n * c * (h / 2) * (w / 2))?;
        let dx = self.alloc(n * c * h * w)?;
        self.launch(
            "pool",
            "avg_pool2x2_bwd",
            self.grid(n * c * h * w),
            &[ptr(gy), ptr(&dx), i64a(n * c), i32a(h), i32a(w)],
        )?;
        Ok(dx)
    }

    pub fn global_avg_pool(&self, x: &DBuf, nc: usize, hw: usize) -> Result<DBuf> {
        need("global_avg_pool x", x, nc * hw)?;
        let y = self.alloc(nc)?;
        let inv = (1.0 / hw as f64) as f32;
        let warps_per_block = 8;
        let cfg = LaunchConfig {
            grid_dim: (nc.div_ceil(warps_per_block) as u32, 1, 1),
            block_dim: (32 * warps_per_block as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "pool",
            "global_avg_pool_fwd",
            cfg,
            &[ptr(x), ptr(&y), i64a(nc), i32a(hw), Arg::F32(inv)],
        )?;
        Ok(y)
    }

    pub fn global_avg_pool_backward(&self, gy: &DBuf, nc: usize, hw: usize) -> Result<DBuf> {
        need("global_avg_pool gy", gy, nc)?;
        let dx = self.alloc(nc * hw)?;
        let inv = (1.0 / hw as f64) as f32;
        self.launch(
            "pool",
            "global_avg_pool_bwd",
            self.grid(nc * hw),
            &[ptr(gy), ptr(&dx), i64a(nc), i32a(hw), Arg::F32(inv)],
        )?;
        Ok(dx)
    }

    pub fn upsample_nearest(
        &self,
        x: &DBuf,
        (n, c, h, w): (usize, usize, usize, usize),
        (ho, wo): (usize, usize),
    ) -> Result<DBuf> {
        need("upsample x", x, n * c * h * w)?;
        let (iy, _, _) = nearest_ranges(h, ho);
        let (ix, _, _) = nearest_ranges(w, wo);
        let (iy, ix) = (self.upload_i32(&iy)?, self.upload_i32(&ix)?);
        let total = n * c * ho * wo;
        let y = self.alloc(total)?;
        self.launch(
            "pool",
            "upsample_nearest_fwd",
            self.grid(total),
            &[
                ptr(x),
                ptr(&y),
                ptr(&iy),
                ptr(&ix),
                i64a(n * c),
                i32a(h),
                i32a(w),
                i32a(ho),
                i32a(wo),
            ],
        )?;
        Ok(y)
    }

    pub fn upsample_nearest_backward(
        &self,
        gy: &DBuf,
        (n, c, h, w): (usize, usize, usize, usize),
        (ho, wo): (usize, usize),
    ) -> Result<DBuf> {
        need("upsample gy", gy, n * c * ho * wo)?;
        let (_, ry0, ry1) = nearest_ranges(h, ho);
        let (_, rx0, rx1) = nearest_ranges(w, wo);
        let b = [
            self.upload_i32(&ry0)?,
            self.upload_i32(&ry1)?,
            self.upload_i32(&rx0)?,
            self.upload_i32(&rx1)?,
        ];
        let total = n * c * h * w;
        let dx = self.alloc(total)?;
        self.launch(
            "pool",
            "upsample_nearest_bwd",
            self.grid(total),
            &[
                ptr(gy),
                ptr(&dx),
                ptr(&b[0]),
                ptr(&b[1]),
                ptr(&b[2]),
                ptr(&b[3]),
                i64a(n * c),
                i32a(h),
                i32a(w),
                i32a(ho),
                i32a(wo),
            ],
        )?;
        Ok(dx)
    }

    pub fn concat_channels(
        &self,
        a: &DBuf,
        b: &DBuf,
        (n, ca, cb, hw): (usize, usize, usize, usize),
    ) -> Result<DBuf> {
        need("concat a", a, n * ca * hw)?;
        need("concat b", b, n * cb * hw)?;
        let total = n * (ca + cb) * hw;
        let y = self.alloc(total)?;
        self.launch(
            "pool",
            "concat2_fwd",
            self.grid(total),
            &[
                ptr(a),
                ptr(b),
                ptr(&y),
                i32a(n),
                i32a(ca),
                i32a(cb),
                i64a(hw),
            ],
        )?;
        Ok(y)
    }

    pub fn concat_channels_backward(
        &self,
        gy: &DBuf,
        (n, ca, cb, hw): (usize, usize, usize, usize),
    ) -> Result<(DBuf, DBuf)> {
        let total = n * (ca + cb) * hw;
        need("concat gy", gy, total)?;
        let (ga, gb) = (self.alloc(n * ca * hw)?, self.alloc(n * cb * hw)?);
        self.launch(
            "pool",
            "concat2_bwd",
            self.grid(total),
            &[
                ptr(gy),
                ptr(&ga),
                ptr(&gb),
                i32a(n),
                i32a(ca),
                i32a(cb),
                i64a(hw),
            ],
        )?;
        Ok((ga, gb))
    }

    // ---- losses ----

    fn loss_mean(&self, rows: &DevBuf<f64>, n: usize) -> Result<DBuf> {
        let out = self.alloc(1)?;
        self.launch(
            "loss",
            "mean_rows",
            blocks(1, 1, 1),
            &[ptr(rows), i32a(n), ptr(&out)],
        )?;
        Ok(out)
    }

    /// Mean cross-entropy with label smoothing; returns (loss [1], dlogits scaled by `gscale`).
    pub fn cross_entropy(
        &self,
        z: &DBuf,
        labels: &[usize],
        smoothing: f64,
        (n, c): (usize, usize),
        gscale: f32,
    ) -> Result<(DBuf, DBuf)> {
        need("cross_entropy logits", z, n * c)?;
        ensure!(
            labels.len() == n,
            "cross_entropy: {} labels for {n} rows",
            labels.len()
        );
        ensure!(
            labels.iter().all(|&l| l < c),
            "cross_entropy: label out of range for {c} classes"
        );
        let lab: Vec<i32> = labels.iter().map(|&l| l as i32).collect();
        let lab = self.upload_i32(&lab)?;
        // The CPU builds the targets in f32: off = e / C, on = off + (1 - e).
        let q_off = (smoothing / c as f64) as f32;
        let q_on = q_off + (1.0 - smoothing) as f32;
        let rows = self.alloc_f64(n)?;
        let grad = self.alloc(n * c)?;
        self.launch(
            "loss",
            "xent_rows",
            blocks(n, 1, 1),
            &[
                ptr(z),
                Arg::Ptr(0),
                ptr(&lab),
                Arg::F32(q_off),
                Arg::F32(q_on),
                i32a(n),
                i32a(c),
                Arg::F32(gscale),
                ptr(&rows),
                ptr(&grad),
            ],
        )?;
        Ok((self.loss_mean(&rows, n)?, grad))
    }

    /// Mean cross-entropy against soft targets q [N, C].
    pub fn cross_entropy_soft(
        &self,
        z: &DBuf,
        q: &DBuf,
        (n, c): (usize, usize),
        gscale: f32,
    ) -> Result<(DBuf, DBuf)> {
        need("cross_entropy logits", z, n * c)?;
        need("cross_entropy targets", q, n * c)?;
        let rows = self.alloc_f64(n)?;
        let grad = self.alloc(n * c)?;
        self.launch(
            "loss",
            "xent_rows",
            blocks(n, 1, 1),
            &[
                ptr(z),
                ptr(q),
                Arg::Ptr(0),
                Arg::F32(0.0),
                Arg::F32(0.0),
                i32a(n),
                i32a(c),
                Arg::F32(gscale),
                ptr(&rows),
                ptr(&grad),
            ],
        )?;
        Ok((self.loss_mean(&rows, n)?, grad))
    }

    /// KD loss `t^2 KL(p_t || p_s)` (mean over rows) and its student gradient.
    pub fn kd_loss(
        &self,
        zs: &DBuf,
        zt: &DBuf,
        (n, c): (usize, usize),
        t: f64,
        gscale: f32,
    ) -> Result<(DBuf, DBuf)> {
        ensure!(t > 0.0, "KD temperature must be positive");
        need("kd student", zs, n * c)?;
        need("kd teacher", zt, n * c)?;
        let rows = self.alloc_f64(n)?;
        let grad = self.alloc(n * c)?;
        self.launch(
            "loss",
            "kd_rows",
            blocks(n, 1, 1),
            &[
                ptr(zs),
                ptr(zt),
                i32a(n),
                i32a(c),
                Arg::F64(t),
                Arg::F32(gscale),
                ptr(&rows),
                ptr(&grad),
            ],
        )?;
        Ok((self.loss_mean(&rows, n)?, grad))
    }

    // ---- fused rep_conv (depth-wise) ----

    /// Train-mode forward of a re-parameterized depth-wise conv without materializing branches.
    #[allow(clippy::too_many_arguments)]
    pub fn rep_dw_forward(
        &self,
        g: &RepDwGeom,
        x: &DBuf,
        wk: &DBuf,
        ws: Option<&DBuf>,
        gamma: &DBuf,
        beta: &DBuf,
        eps: f64,
    ) -> Result<(DBuf, RepDwSaved)> {
        g.check()?;
        ensure!(
            ws.is_some() == g.scale,
            "rep_dw: scale weight given iff the scale branch exists"
        );
        let (ho, wo) = g.out_hw();
        let kk = g.kh * g.kw;
        let nbt = g.nbt();
        need("rep_dw x", x, g.n * g.c * g.h * g.w)?;
        need("rep_dw wk", wk, g.branches * g.c * kk)?;
        need("rep_dw gamma", gamma, nbt * g.c)?;
        need("rep_dw beta", beta, nbt * g.c)?;
        let m = g.n * ho * wo;
        let s = self.splits(g.c, m);
        let part = self.alloc_f64(g.c * s * 8 * 2)?;
        let mut args = vec![ptr(x), ptr(wk), opt_ptr(ws)];
        args.extend(g.args());
        args.push(ptr(&part));
        self.launch("rep_conv", "repdw_stats_partial", blocks(g.c, s, 1), &args)?;
        let saved = RepDwSaved {
            mean: self.alloc_f64(nbt * g.c)?,
            var: self.alloc_f64(nbt * g.c)?,
            weff: self.alloc(g.c * kk)?,
            beff: self.alloc(g.c)?,
        };
        self.launch(
            "rep_conv",
            "repdw_fold",
            self.grid(g.c),
            &[
                ptr(&part),
                i32a(s),
                i32a(g.c),
                i32a(g.kh),
                i32a(g.kw),
                i32a(g.branches),
                i32a(g.scale as usize),
                i32a(g.identity as usize),
                Arg::F64(m as f64),
                Arg::F64(eps),
                ptr(gamma),
                ptr(beta),
                ptr(wk),
                opt_ptr(ws),
                ptr(&saved.mean),
                ptr(&saved.var),
                ptr(&saved.weff),
                ptr(&saved.beff),
            ],
        )?;
        let (ph, pw) = g.pads();
        let geom = ConvGeom {
            n: g.n,
            cin: g.c,
            h: g.h,
            w: g.w,
            cout: g.c,
            kh: g.kh,
            kw: g.kw,
            sh: g.stride,
            sw: g.stride,
            ph,
            pw,
            groups: g.c,
            ho,
            wo,
        };
        let total = g.n * g.c * ho * wo;
        let y = self.alloc(total)?;
        let mut args = vec![ptr(x), ptr(&saved.weff), ptr(&saved.beff), ptr(&y)];
        args.extend(Self::geom_args(&geom));
        self.launch("conv", "dw_fwd", self.grid(total), &args)?;
        Ok((y, saved))
    }

    /// Backward of [`Gpu::rep_dw_forward`]: input, branch weight and BN parameter gradients.
    #[allow(clippy::too_many_arguments)]
    pub fn rep_dw_backward(
        &self,
        g: &RepDwGeom,
        x: &DBuf,
        wk: &DBuf,
        ws: Option<&DBuf>,
        gamma: &DBuf,
        saved: &RepDwSaved,
        gy: &DBuf,
        eps: f64,
    ) -> Result<RepDwGrads> {
        g.check()?;
        let (ho, wo) = g.out_hw();
        let kk = g.kh * g.kw;
        let nbt = g.nbt();
        need("rep_dw gy", gy, g.n * g.c * ho * wo)?;
        let m = g.n * ho * wo;
        let s = self.splits(g.c, m);
        let part = self.alloc_f64(g.c * s * 9)?;
        let mut args = vec![ptr(gy), ptr(x), ptr(wk), opt_ptr(ws)];
        args.extend(g.args());
        args.push(ptr(&part));
        self.launch("rep_conv", "repdw_bwd_partial", blocks(g.c, s, 1), &args)?;
        let (dgamma, dbeta) = (self.alloc(nbt * g.c)?, self.alloc(nbt * g.c)?);
        let (ka, kb, kc, km) = (
            self.alloc(nbt * g.c)?,
            self.alloc(nbt * g.c)?,
            self.alloc(nbt * g.c)?,
            self.alloc(nbt * g.c)?,
        );
        self.launch(
            "rep_conv",
            "repdw_bwd_coef",
            self.grid(g.c),
            &[
                ptr(&part),
                i32a(s),
                i32a(g.c),
                i32a(g.branches),
                i32a(g.scale as usize),
                i32a(g.identity as usize),
                Arg::F64(m as f64),
                Arg::F64(eps),
                ptr(gamma),
                ptr(&saved.mean),
                ptr(&saved.var),
                ptr(&dgamma),
                ptr(&dbeta),
                ptr(&ka),
                ptr(&kb),
                ptr(&kc),
                ptr(&km),
            ],
        )?;
        let xs = g.n * g.c * g.h * g.w;
        let dx = self.alloc(xs)?;
        let mut args = vec![ptr(gy), ptr(x), ptr(wk), opt_ptr(ws)];
        args.extend(g.args());
        args.extend([ptr(&ka), ptr(&kb), ptr(&kc), ptr(&km), ptr(&dx)]);
        self.launch("rep_conv", "repdw_bwd_dx", self.grid(xs), &args)?;
        let per = g.branches * kk + 1;
        let part2 = self.alloc_f64(g.c * s * per)?;
        let mut args = vec![ptr(gy), ptr(x), ptr(wk), opt_ptr(ws)];
        args.extend(g.args());
        args.extend([ptr(&ka), ptr(&kb), ptr(&kc), ptr(&km), ptr(&part2)]);
        self.launch(
            "rep_conv",
            "repdw_bwd_dw_partial",
            blocks(g.c, s, g.kh),
            &args,
        )?;
        let dwk = self.alloc(g.branches * g.c * kk)?;
        let dws = if g.scale {
            Some(self.alloc(g.c)?)
        } else {
            None
        };
        self.launch(
            "rep_conv",
            "repdw_bwd_dw_finalize",
            self.grid(g.c * per),
            &[
                ptr(&part2),
                i32a(s),
                i32a(g.c),
                i32a(g.branches),
                i32a(kk),
                i32a(g.scale as usize),
                ptr(&dwk),
                opt_ptr(dws.as_ref()),
            ],
        )?;
        Ok(RepDwGrads {
            dx,
            dwk,
            dws,
            dgamma,
            dbeta,
        })
    }

    // ---- DFC gate ----

    /// `out * upsample(sigmoid(BN(g)))` with the BN map of `bn` (from `batch_norm_stats` on g):
    /// out [N, C, H, W], g [N, C, gh, gw].
    pub fn dfc_gate(
        &self,
        out: &DBuf,
        g: &DBuf,
        bn: &BnSaved,
        (n, c, h, w): (usize, usize, usize, usize),
        (gh, gw): (usize, usize),
    ) -> Result<DBuf> {
        need("dfc out", out, n * c * h * w)?;
        need("dfc g", g, n * c * gh * gw)?;
        let (iy, _, _) = nearest_ranges(gh, h);
        let (ix, _, _) = nearest_ranges(gw, w);
        let (iy, ix) = (self.upload_i32(&iy)?, self.upload_i32(&ix)?);
        let total = n * c * h * w;
        let y = self.alloc(total)?;
        self.launch(
            "dfc",
            "dfc_gate_fwd",
            self.grid(total),
            &[
                ptr(out),
                ptr(g),
                ptr(&bn.center),
                ptr(&bn.scale),
                ptr(&bn.shift),
                ptr(&iy),
                ptr(&ix),
                ptr(&y),
                i32a(n),
                i32a(c),
                i32a(h),
                i32a(w),
                i32a(gh),
                i32a(gw),
            ],
        )?;
        Ok(y)
    }

    /// Backward of [`Gpu::dfc_gate`]: (d out, d BN(g)) — the second feeds `batch_norm_backward`.
    #[allow(clippy::too_many_arguments)]
    pub fn dfc_gate_backward(
        &self,
        gy: &DBuf,
        out: &DBuf,
        g: &DBuf,
        bn: &BnSaved,
        (n, c, h, w): (usize, usize, usize, usize),
        (gh, gw): (usize, usize),
    ) -> Result<(DBuf, DBuf)> {
        need("dfc gy", gy, n * c * h * w)?;
        let (_, ry0, ry1) = nearest_ranges(gh, h);
        let (_, rx0, rx1) = nearest_ranges(gw, w);
        let r = [
            self.upload_i32(&ry0)?,
            self.upload_i32(&ry1)?,
            self.upload_i32(&rx0)?,
            self.upload_i32(&rx1)?,
        ];
        let d_out = self.alloc(n * c * h * w)?;
        let d_a = self.alloc(n * c * gh * gw)?;
        self.launch(
            "dfc",
            "dfc_gate_bwd",
            self.grid(n * c * gh * gw),
            &[
                ptr(gy),
                ptr(out),
                ptr(g),
                ptr(&bn.center),
                ptr(&bn.scale),
                ptr(&bn.shift),
                ptr(&r[0]),
                ptr(&r[1]),
                ptr(&r[2]),
                ptr(&r[3]),
                ptr(&d_out),
                ptr(&d_a),
                i32a(n),
                i32a(c),
                i32a(h),
                i32a(w),
                i32a(gh),
                i32a(gw),
            ],
        )?;
        // Outputs past the last source row/column (none for the 2x upsample of DFC, whose
        // ranges cover the output) would stay unwritten: check the ranges cover it.
        ensure!(
            ry1.last().copied() == Some(h as i32) && rx1.last().copied() == Some(w as i32),
            "dfc gate: upsample ranges do not cover the output"
        );
        Ok((d_out, d_a))
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
