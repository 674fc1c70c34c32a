//! Launchers of cuda/rep_conv.cu: the fused re-parameterized depth-wise conv in training
//! (kxk branches, 1x1 scale branch and BN identity folded into one depth-wise kernel, which runs
//! as conv.cu's `dw_fwd`), forward and backward.

use super::alloc::DevBuf;
use super::backend::Cuda;
use super::device::{DBuf, Gpu};
use super::launch::{blocks, i32a, need, opt_ptr, ptr, Arg};
use super::DeviceStats;
use crate::backend::api::rep_conv::{FusedRepDw, RepGrads, RepOut};
use crate::backend::cpu::conv::ConvGeom;
use crate::backend::{trace, Elem};
use anyhow::{ensure, Result};
use std::sync::Arc;

pub use crate::backend::api::rep_conv::RepDwGeom;

/// The kernels' limits and arguments (the geometry itself is `backend::api`'s: weights stacked
/// [branches][C][kh*kw], scale [C]; BN parameters and statistics [NBT][C] in the order kxk
/// branches, scale, identity).
impl RepDwGeom {
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
    pub mean: Arc<DevBuf<f64>>,
    pub var: Arc<DevBuf<f64>>,
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

impl Gpu {
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
            mean: Arc::new(self.alloc_f64(nbt * g.c)?),
            var: Arc::new(self.alloc_f64(nbt * g.c)?),
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
                ptr(&*saved.mean),
                ptr(&*saved.var),
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
        trace::add_flops(2 * (total * g.kh * g.kw) as u64);
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
                ptr(&*saved.mean),
                ptr(&*saved.var),
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
        let (ho, wo) = g.out_hw();
        let branch_flops = 2 * (g.n * g.c * ho * wo * kk * g.branches) as u64;
        trace::add_flops(branch_flops);
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
        trace::add_flops(branch_flops);
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
}

impl Gpu {
    /// Each group's buffers one after another, all groups in one buffer, in one launch: a fused
    /// rep conv's stacked branch weights and BN parameters. Returns the buffer and each
    /// group's (offset, length) in it.
    pub(crate) fn stack(&self, groups: &[&[&DBuf]]) -> Result<(DBuf, Vec<(usize, usize)>)> {
        let mut segments = Vec::new();
        let mut at = Vec::with_capacity(groups.len());
        let mut off = 0;
        for g in groups {
            let start = off;
            for b in *g {
                segments.push((*b, off));
                off += b.len();
            }
            at.push((start, off - start));
        }
        let mut buf = self.alloc(off)?;
        self.copy_segments(&segments, &mut buf)?;
        Ok((buf, at))
    }

    /// Every branch's batch statistics (`branches` of `c` channels) of a fused rep conv's
    /// stacked f64 mean and variance (shared with its saved state).
    pub(crate) fn branch_stats(
        &self,
        mean: &Arc<DevBuf<f64>>,
        var: &Arc<DevBuf<f64>>,
        branches: usize,
        c: usize,
    ) -> Result<Vec<DeviceStats>> {
        (0..branches)
            .map(|b| self.batch_stats_device(mean, var, b * c, c))
            .collect()
    }
}

/// What the fused depth-wise backward needs: the forward's saved state and the stacked branch
/// weights and BN gammas it ran with.
pub struct RepDwState {
    saved: RepDwSaved,
    /// The stacked weights, gammas and betas, and where the weights and gammas are in it.
    stacked: DBuf,
    wk: (usize, usize),
    gamma: (usize, usize),
}

impl<T: Elem> FusedRepDw<T> for Cuda<T> {
    type RepDwSaved = RepDwState;

    fn fused_rep_dw(&self, g: &RepDwGeom) -> bool {
        // Its branch statistics are its own: under sync_bn the branches run as plain BNs.
        g.check().is_ok() && !super::sync_bn::active()
    }

    fn rep_dw_forward(
        &self,
        g: &RepDwGeom,
        x: &DBuf,
        kxk: &[&DBuf],
        scale: Option<&DBuf>,
        gamma: &[&DBuf],
        beta: &[&DBuf],
        eps: f64,
    ) -> Result<RepOut<DBuf, RepDwState, DeviceStats>> {
        let gpu: &Gpu = self;
        // Stacked [NB][C][kk] weights and [NBT][C] BN parameters (device copies).
        let (stacked, at) = gpu.stack(&[kxk, gamma, beta])?;
        let view = |i: usize| stacked.view(at[i].0, at[i].1);
        let (y, saved) = gpu.rep_dw_forward(g, x, &view(0), scale, &view(1), &view(2), eps)?;
        let stats = gpu.branch_stats(&saved.mean, &saved.var, g.nbt(), g.c)?;
        let state = RepDwState {
            saved,
            wk: at[0],
            gamma: at[1],
            stacked,
        };
        Ok((y, state, stats))
    }

    fn rep_dw_backward(
        &self,
        g: &RepDwGeom,
        x: &DBuf,
        scale: Option<&DBuf>,
        s: &RepDwState,
        gy: &DBuf,
        eps: f64,
    ) -> Result<RepGrads<DBuf>> {
        let gpu: &Gpu = self;
        let wk = s.stacked.view(s.wk.0, s.wk.1);
        let gamma = s.stacked.view(s.gamma.0, s.gamma.1);
        let r = gpu.rep_dw_backward(g, x, &wk, scale, &gamma, &s.saved, gy, eps)?;
        Ok(RepGrads {
            dx: r.dx,
            dw: r.dwk,
            dscale: r.dws,
            dgamma: r.dgamma,
            dbeta: r.dbeta,
        })
    }
}
