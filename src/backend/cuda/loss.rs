//! Launchers of cuda/loss.cu: cross-entropy (label smoothing, soft targets) and the KD loss on
//! [N, C] logits, each row in f64 and the mean over rows.

use super::alloc::DevBuf;
use super::device::{DBuf, Gpu};
use super::launch::{blocks, i32a, need, ptr, Arg, NULL};
use super::Cuda;
use crate::backend::api::Loss;
use crate::backend::Elem;
use anyhow::{ensure, Result};

impl Gpu {
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
                NULL,
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
                NULL,
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
}

impl<T: Elem> Loss<T> for Cuda<T> {
    fn cross_entropy(
        &self,
        z: &DBuf,
        labels: &[usize],
        smoothing: f64,
        nc: (usize, usize),
    ) -> Result<(DBuf, DBuf)> {
        (**self).cross_entropy(z, labels, smoothing, nc, 1.0)
    }

    fn cross_entropy_soft(&self, z: &DBuf, q: &DBuf, nc: (usize, usize)) -> Result<(DBuf, DBuf)> {
        (**self).cross_entropy_soft(z, q, nc, 1.0)
    }

    fn kd_loss(&self, zs: &DBuf, zt: &DBuf, nc: (usize, usize), t: f64) -> Result<(DBuf, DBuf)> {
        (**self).kd_loss(zs, zt, nc, t, 1.0)
    }
}
