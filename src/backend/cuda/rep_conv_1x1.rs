//! Launchers of the fused re-parameterized 1x1 conv in training (cuda/rep_conv_1x1.cu, whose
//! header has the math and the cost against the unfused branches): NB 1x1 branches (groups 1,
//! stride 1) each with its batch-statistics BN, plus an optional BN identity, computed as one
//! 1x1 conv whose kernel comes from the input's per-channel mean and covariance.

use super::alloc::DevBuf;
use super::backend::Cuda;
use super::device::{DBuf, Gpu};
use super::launch::{i32a, i64a, need, opt_ptr, ptr, Arg};
use super::DeviceStats;
use crate::backend::api::rep_conv::{FusedRep1x1, RepGrads, RepOut};
use crate::backend::Elem;
use anyhow::Result;
use cudarc::driver::LaunchConfig;
use std::sync::Arc;

/// Scratch (floats) of the batched GEMMs that reduce over the batch: as many batch entries per
/// GEMM as fit, each writing its own partial (the partials are then summed in f64), and the
/// chunks of the batch accumulated into them.
const SCRATCH: usize = 1 << 22;

pub use crate::backend::api::rep_conv::Rep1x1Geom;

/// What the backward needs from the forward.
pub struct Rep1x1Saved {
    /// [N, Cin + 1, HW]: the centred input and a row of ones.
    pub xc: DBuf,
    /// Per branch and output channel [NBT, Cout] (f64): batch mean, biased variance, 1/sqrt(var
    /// + eps), gamma * invstd.
    pub mean: Arc<DevBuf<f64>>,
    pub var: Arc<DevBuf<f64>>,
    pub invstd: DevBuf<f64>,
    pub a: DevBuf<f64>,
    /// The folded kernel K [Cout, Cin].
    pub k: DBuf,
    /// W_b Sigma [NB, Cout, Cin].
    pub ws: DBuf,
}

pub struct Rep1x1Grads {
    pub dx: DBuf,
    /// [NB, Cout, Cin]
    pub dw: DBuf,
    /// [NBT, Cout]
    pub dgamma: DBuf,
    pub dbeta: DBuf,
}

impl Gpu {
    /// `scale * sum_n A_n B_n^T` in f64 [m, k2] (and in f32 into `out32` when given), for
    /// A_n [m, p] at element `n * sa` of `a` and B_n [k2, p] at `n * sb` of `b`: batched f32
    /// GEMMs of up to `chunk` entries (0: as many as fit SCRATCH) write one partial each, later
    /// chunks accumulate into them, and the partials are summed in f64.
    fn r1_outer_sum(
        &self,
        (a, sa): (&DBuf, usize),
        (b, sb): (&DBuf, usize),
        (m, k2, p, n, chunk): (usize, usize, usize, usize, usize),
        scale: f64,
        out32: Option<&DBuf>,
    ) -> Result<DevBuf<f64>> {
        let fit = (SCRATCH / (m * k2)).max(1);
        let g = n.min(if chunk == 0 { fit } else { chunk });
        let part = self.alloc(g * m * k2)?;
        for (j, start) in (0..n).step_by(g).enumerate() {
            let cnt = g.min(n - start);
            let av = a.view(start * sa, (cnt - 1) * sa + m * p);
            let bv = b.view(start * sb, (cnt - 1) * sb + k2 * p);
            let beta = if j == 0 { 0.0 } else { 1.0 };
            self.gemm_rm(
                (m, k2, p),
                &av,
                false,
                sa,
                &bv,
                true,
                sb,
                &part,
                m * k2,
                beta,
                cnt,
            )?;
        }
        let out = self.alloc_f64(m * k2)?;
        self.launch(
            "rep_conv_1x1",
            "r1_sum_parts",
            self.grid(m * k2),
            &[
                ptr(&part),
                i32a(g),
                i64a(m * k2),
                Arg::F64(scale),
                ptr(&out),
                opt_ptr(out32),
            ],
        )?;
        Ok(out)
    }

    /// Train-mode forward: `x` [N, Cin, HW], `w` the stacked branch weights [NB, Cout, Cin],
    /// `gamma`/`beta` [NBT, Cout] (branches, then the identity). Returns y [N, Cout, HW].
    pub fn rep_1x1_forward(
        &self,
        g: &Rep1x1Geom,
        x: &DBuf,
        w: &DBuf,
        gamma: &DBuf,
        beta: &DBuf,
        eps: f64,
    ) -> Result<(DBuf, Rep1x1Saved)> {
        g.check()?;
        let (n, ci, co, hw, nb, nbt) = (g.n, g.cin, g.cout, g.hw, g.branches, g.nbt());
        let ca = ci + 1;
        need("rep_1x1 x", x, n * ci * hw)?;
        need("rep_1x1 w", w, nb * co * ci)?;
        need("rep_1x1 gamma", gamma, nbt * co)?;
        need("rep_1x1 beta", beta, nbt * co)?;
        let m = g.m();
        // Per-channel mean (f64), then the centred input with a row of ones.
        let s = self.splits(ci, m);
        let part = self.alloc_f64(ci * s)?;
        // Per-channel partial sums: the same kernel as `channel_sums` (bias gradients).
        self.launch(
            "elementwise",
            "chan_sum_partial",
            LaunchConfig {
                grid_dim: (ci as u32, s as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &[ptr(x), i32a(n), i32a(ci), i32a(hw), ptr(&part)],
        )?;
        let mu = self.alloc_f64(ci)?;
        self.launch(
            "rep_conv_1x1",
            "r1_mean_finalize",
            self.grid(ci),
            &[ptr(&part), i32a(s), i32a(ci), Arg::F64(m as f64), ptr(&mu)],
        )?;
        let total = n * ca * hw;
        let xc = self.alloc(total)?;
        self.launch(
            "rep_conv_1x1",
            "r1_center",
            self.grid(total),
            &[ptr(x), ptr(&mu), ptr(&xc), i32a(ci), i32a(hw), i64a(total)],
        )?;
        // Sigma = xc xc^T / M (f64, and f32 for the GEMM below).
        let cov32 = self.alloc(ci * ci)?;
        let cov = self.r1_outer_sum(
            (&xc, ca * hw),
            (&xc, ca * hw),
            (ci, ci, hw, n, g.chunk),
            1.0 / m as f64,
            Some(&cov32),
        )?;
        // W_b Sigma for every branch in one GEMM ([NB * Cout, Cin] x [Cin, Cin]).
        let ws = self.alloc(nb * co * ci)?;
        self.gemm_rm(
            (nb * co, ci, ci),
            w,
            false,
            0,
            &cov32,
            false,
            0,
            &ws,
            0,
            0.0,
            1,
        )?;
        let saved_stat = || self.alloc_f64(nbt * co);
        let (mean, var, invstd, a) = (saved_stat()?, saved_stat()?, saved_stat()?, saved_stat()?);
        self.launch(
            "rep_conv_1x1",
            "r1_branch_stats",
            self.grid(nbt * co),
            &[
                ptr(w),
                ptr(&ws),
                ptr(&mu),
                ptr(&cov),
                ptr(gamma),
                i32a(nb),
                i32a(g.identity as usize),
                i32a(co),
                i32a(ci),
                Arg::F64(eps),
                ptr(&mean),
                ptr(&var),
                ptr(&invstd),
                ptr(&a),
            ],
        )?;
        let k = self.alloc(co * ci)?;
        let kaug = self.alloc(co * ca)?;
        self.launch(
            "rep_conv_1x1",
            "r1_fold",
            self.grid(co * ca),
            &[
                ptr(w),
                ptr(&a),
                ptr(beta),
                i32a(nb),
                i32a(g.identity as usize),
                i32a(co),
                i32a(ci),
                ptr(&k),
                ptr(&kaug),
            ],
        )?;
        // y_n = [K | sum beta] [xc_n; 1]: the one activation-sized GEMM.
        let y = self.alloc(n * co * hw)?;
        self.gemm_rm(
            (co, hw, ca),
            &kaug,
            false,
            0,
            &xc,
            false,
            ca * hw,
            &y,
            co * hw,
            0.0,
            n,
        )?;
        Ok((
            y,
            Rep1x1Saved {
                xc,
                mean: Arc::new(mean),
                var: Arc::new(var),
                invstd,
                a,
                k,
                ws,
            },
        ))
    }

    /// Backward of [`Gpu::rep_1x1_forward`]: gradients of x, every branch weight and every BN's
    /// gamma and beta, for the output gradient `gy` [N, Cout, HW].
    pub fn rep_1x1_backward(
        &self,
        g: &Rep1x1Geom,
        w: &DBuf,
        saved: &Rep1x1Saved,
        gy: &DBuf,
    ) -> Result<Rep1x1Grads> {
        g.check()?;
        let (n, ci, co, hw, nb, nbt) = (g.n, g.cin, g.cout, g.hw, g.branches, g.nbt());
        let ca = ci + 1;
        need("rep_1x1 gy", gy, n * co * hw)?;
        need("rep_1x1 w", w, nb * co * ci)?;
        // R = sum_n gy_n [xc_n; 1]^T [Cout, Cin + 1] (f64); its last column is sum gy.
        let r = self.r1_outer_sum(
            (gy, co * hw),
            (&saved.xc, ca * hw),
            (co, ca, hw, n, g.chunk),
            1.0,
            None,
        )?;
        let (dgamma, dbeta) = (self.alloc(nbt * co)?, self.alloc(nbt * co)?);
        let e = self.alloc_f64(nbt * co)?;
        self.launch(
            "rep_conv_1x1",
            "r1_bwd_coef",
            self.grid(nbt * co),
            &[
                ptr(w),
                ptr(&r),
                ptr(&saved.invstd),
                ptr(&saved.a),
                i32a(nb),
                i32a(g.identity as usize),
                i32a(co),
                i32a(ci),
                ptr(&dgamma),
                ptr(&dbeta),
                ptr(&e),
            ],
        )?;
        let (dw, ew) = (self.alloc(nb * co * ci)?, self.alloc(nb * co * ci)?);
        self.launch(
            "rep_conv_1x1",
            "r1_bwd_dw",
            self.grid(nb * co * ci),
            &[
                ptr(w),
                ptr(&saved.ws),
                ptr(&r),
                ptr(&saved.a),
                ptr(&e),
                i32a(nb),
                i32a(co),
                i32a(ci),
                ptr(&dw),
                ptr(&ew),
            ],
        )?;
        // Q = sum_b W_b^T diag(e_b) W_b = W^T ew over the stacked [NB * Cout, Cin].
        let q = self.alloc(ci * ci)?;
        self.gemm_rm((ci, ci, nb * co), w, true, 0, &ew, false, 0, &q, 0, 0.0, 1)?;
        let am = self.alloc(ci * ca)?;
        self.launch(
            "rep_conv_1x1",
            "r1_dx_coef",
            self.grid(ci * ca),
            &[
                ptr(&q),
                ptr(&saved.k),
                ptr(&r),
                ptr(&e),
                i32a(nb),
                i32a(g.identity as usize),
                i32a(co),
                i32a(ci),
                Arg::F64(g.m() as f64),
                ptr(&am),
            ],
        )?;
        // dx_n = A [xc_n; 1] + K^T gy_n.
        let dx = self.alloc(n * ci * hw)?;
        self.gemm_rm(
            (ci, hw, ca),
            &am,
            false,
            0,
            &saved.xc,
            false,
            ca * hw,
            &dx,
            ci * hw,
            0.0,
            n,
        )?;
        self.gemm_rm(
            (ci, hw, co),
            &saved.k,
            true,
            0,
            gy,
            false,
            co * hw,
            &dx,
            ci * hw,
            1.0,
            n,
        )?;
        Ok(Rep1x1Grads {
            dx,
            dw,
            dgamma,
            dbeta,
        })
    }
}

/// What the fused 1x1 backward needs: the forward's saved state and the stacked branch weights
/// it ran with.
pub struct Rep1x1State {
    saved: Rep1x1Saved,
    /// The stacked weights (at `w`), gammas and betas.
    stacked: DBuf,
    w: (usize, usize),
}

impl<T: Elem> FusedRep1x1<T> for Cuda<T> {
    type Rep1x1Saved = Rep1x1State;

    fn fused_rep_1x1(&self, g: &Rep1x1Geom) -> bool {
        // Its branch statistics are its own: under sync_bn the branches run as plain BNs.
        g.check().is_ok() && !super::sync_bn::active()
    }

    fn rep_1x1_pays(&self, g: &Rep1x1Geom) -> bool {
        g.fused_pays()
    }

    fn rep_1x1_forward(
        &self,
        g: &Rep1x1Geom,
        x: &DBuf,
        w: &[&DBuf],
        gamma: &[&DBuf],
        beta: &[&DBuf],
        eps: f64,
    ) -> Result<RepOut<DBuf, Rep1x1State, DeviceStats>> {
        let gpu: &Gpu = self;
        // Stacked [NB, Cout, Cin] weights and [NBT, Cout] BN parameters (device copies).
        let (stacked, at) = gpu.stack(&[w, gamma, beta])?;
        let view = |i: usize| stacked.view(at[i].0, at[i].1);
        let (y, saved) = gpu.rep_1x1_forward(g, x, &view(0), &view(1), &view(2), eps)?;
        let stats = gpu.branch_stats(&saved.mean, &saved.var, g.nbt(), g.cout)?;
        let state = Rep1x1State {
            saved,
            w: at[0],
            stacked,
        };
        Ok((y, state, stats))
    }

    fn rep_1x1_backward(
        &self,
        g: &Rep1x1Geom,
        s: &Rep1x1State,
        gy: &DBuf,
    ) -> Result<RepGrads<DBuf>> {
        let gpu: &Gpu = self;
        let r = gpu.rep_1x1_backward(g, &s.stacked.view(s.w.0, s.w.1), &s.saved, gy)?;
        Ok(RepGrads {
            dx: r.dx,
            dw: r.dw,
            dscale: None,
            dgamma: r.dgamma,
            dbeta: r.dbeta,
        })
    }
}
