//! Launchers of cuda/conv.cu and the cuBLAS GEMMs: conv2d forward and backward (depth-wise
//! direct, 1x1 through a batched GEMM, other dense convs through im2col + GEMM) and linear.
//! Weights [C_out, C_in/groups, kh, kw], `ConvGeom` for the geometry, as the CPU kernels.

use super::device::{DBuf, Gpu};
use super::launch::{blocks, i32a, i64a, need, opt_ptr, ptr, Arg};
use super::Cuda;
use crate::backend::api::{Conv, ConvGeom, ConvGrads, LinearDims};
use crate::backend::{trace, Elem};
use anyhow::{ensure, Result};
use cudarc::cublas::sys::cublasOperation_t;

pub struct ConvGradsGpu {
    pub dx: Option<DBuf>,
    pub dw: Option<DBuf>,
    pub db: Option<DBuf>,
}

impl Gpu {
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
        r.map_err(|e| anyhow::anyhow!("cuBLAS sgemm: {e:?}"))?;
        if trace::is_on() {
            // Compulsory traffic: a matrix shared by the batch (stride 0) is read once.
            let mat = |s: usize, len: usize| 4 * len as u64 * if s == 0 { 1 } else { batch as u64 };
            let c_bytes = mat(sc, m * n);
            let read = mat(sa, m * k) + mat(sb, k * n) + if beta != 0.0 { c_bytes } else { 0 };
            let flops = 2 * (m * n * k * batch) as u64;
            trace::record("cublas", "sgemm", read, c_bytes, flops);
        }
        Ok(())
    }

    // ---- convolutions ----

    pub(super) fn geom_args(g: &ConvGeom) -> Vec<Arg> {
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
            trace::add_flops(2 * (total * g.kh * g.kw) as u64);
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
                trace::add_flops(2 * (g.n * g.cout * p * g.kh * g.kw) as u64);
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
                trace::add_flops(2 * (g.n * g.cout * p * g.kh * g.kw) as u64);
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
            let dw = if need_dw && pointwise_dw_by_transpose(g) {
                // One GEMM over all n*p positions, on channel-major copies of dy and x.
                let np = g.n * p;
                let (dyc, xc) = (self.alloc(g.cout * np)?, self.alloc(g.cin * np)?);
                for (src, dst, c) in [(dy, &dyc, g.cout), (x, &xc, g.cin)] {
                    self.launch(
                        "conv",
                        "ncp_to_cnp",
                        self.grid(c * np),
                        &[ptr(src), ptr(dst), i32a(g.n), i32a(c), i64a(p)],
                    )?;
                }
                let dw = self.alloc(g.cout * g.cin)?;
                self.gemm_rm(
                    (g.cout, g.cin, np),
                    &dyc,
                    false,
                    0,
                    &xc,
                    true,
                    0,
                    &dw,
                    0,
                    0.0,
                    1,
                )?;
                Some(dw)
            } else if need_dw {
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
}

impl<T: Elem> Conv<T> for Cuda<T> {
    fn conv2d(&self, g: &ConvGeom, x: &DBuf, w: &DBuf, bias: Option<&DBuf>) -> Result<DBuf> {
        (**self).conv2d_forward(g, x, w, bias)
    }

    fn conv2d_backward(
        &self,
        g: &ConvGeom,
        x: &DBuf,
        w: &DBuf,
        gy: &DBuf,
        need: (bool, bool, bool),
    ) -> Result<ConvGrads<DBuf>> {
        let ConvGradsGpu { dx, dw, db } = (**self).conv2d_backward(g, x, w, gy, need)?;
        Ok(ConvGrads { dx, dw, db })
    }

    fn linear(&self, x: &DBuf, w: &DBuf, bias: Option<&DBuf>, dims: LinearDims) -> Result<DBuf> {
        (**self).linear_forward(x, w, bias, dims)
    }

    /// Computes all three gradients (one launch each) and keeps those asked for.
    fn linear_backward(
        &self,
        x: &DBuf,
        w: &DBuf,
        gy: &DBuf,
        dims: LinearDims,
        need: (bool, bool, bool),
    ) -> Result<ConvGrads<DBuf>> {
        let (dx, dw, db) = (**self).linear_backward(x, w, gy, dims)?;
        Ok(ConvGrads {
            dx: need.0.then_some(dx),
            dw: need.1.then_some(dw),
            db: need.2.then_some(db),
        })
    }
}

/// Whether the weight gradient of a 1x1 conv goes through channel-major copies of dy and x and
/// one GEMM over all n*p positions (extra traffic 2 n p (cout + cin) values), rather than one
/// GEMM per image into per-image partials summed after (extra 2 n cout cin): the cheaper of
/// the two in bytes. The late layers (7x7 and 1x1 maps, hundreds of channels) take the first.
pub fn pointwise_dw_by_transpose(g: &ConvGeom) -> bool {
    g.ho * g.wo * (g.cout + g.cin) < g.cout * g.cin
}
