//! Launchers of cuda/dfc.cu: the DFC attention gate `out * upsample(sigmoid(BN(g)))` and its
//! backward.

use super::batch_norm::{BnSaved, DeviceStats};
use super::device::{DBuf, Gpu};
use super::launch::{i32a, need, ptr};
use super::pool::nearest_ranges;
use anyhow::{ensure, Result};

impl Gpu {
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

impl<T: crate::backend::Elem> crate::backend::api::DfcGate<T> for super::Cuda<T> {
    fn fused_dfc(&self) -> bool {
        true
    }

    /// The BN's statistics (train: of g, kept on the device) or its eval coefficients from the
    /// running ones, then the BN apply, sigmoid, upsample and product in one pass.
    fn dfc_gate(
        &self,
        out: &DBuf,
        g: &DBuf,
        gamma: &DBuf,
        beta: &DBuf,
        bn: crate::backend::api::GateBn<'_, DBuf>,
        dims: crate::backend::api::Dims4,
        gate_hw: (usize, usize),
        eps: f64,
    ) -> Result<(DBuf, BnSaved, Option<DeviceStats>)> {
        let (n, c, _, _) = dims;
        let bdims = (n, c, gate_hw.0 * gate_hw.1);
        let (saved, stats) = match bn {
            crate::backend::api::GateBn::Batch => {
                let s = self.batch_norm_stats(g, gamma, beta, bdims, eps)?;
                let Some(var) = s.var.as_ref() else {
                    anyhow::bail!("train-mode BN without batch statistics");
                };
                let mut st = self.batch_stats_device(&s.mean, var, 0, c)?;
                st.ranks = s.ranks;
                (s, Some(st))
            }
            crate::backend::api::GateBn::Running(rm, rv) => {
                // The eval coefficients; the applied BN (a quarter-size tensor) is not needed.
                let (_, s) = (**self).batch_norm_eval(g, gamma, beta, rm, rv, bdims, eps)?;
                (s, None)
            }
        };
        let y = (**self).dfc_gate(out, g, &saved, dims, gate_hw)?;
        Ok((y, saved, stats))
    }

    /// The fused gate backward, then (when asked for) the BN backward from its d BN(g).
    fn dfc_gate_backward(
        &self,
        gy: &DBuf,
        out: &DBuf,
        g: &DBuf,
        gamma: &DBuf,
        saved: &BnSaved,
        dims: crate::backend::api::Dims4,
        gate_hw: (usize, usize),
        need_bn: bool,
    ) -> Result<(DBuf, Option<crate::backend::api::BatchNormGrads<DBuf>>)> {
        let (d_out, d_a) = (**self).dfc_gate_backward(gy, out, g, saved, dims, gate_hw)?;
        if !need_bn {
            return Ok((d_out, None));
        }
        let (n, c, _, _) = dims;
        let bdims = (n, c, gate_hw.0 * gate_hw.1);
        let train = saved.var.is_some();
        let b = (**self).batch_norm_backward(&d_a, g, gamma, saved, bdims, train)?;
        let grads = crate::backend::api::BatchNormGrads {
            dx: Some(b.dx),
            dgamma: b.dgamma,
            dbeta: b.dbeta,
        };
        Ok((d_out, Some(grads)))
    }
}
