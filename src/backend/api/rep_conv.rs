//! The re-parameterized convs of GhostNetV3 in training (N kxk conv + train-mode BN branches,
//! an optional 1x1 "scale" branch and an optional BN-only identity, summed) as one fused op,
//! where a backend has the kernels: the branches are never materialized. Two geometries: the
//! depth-wise conv (the branches fold into one depth-wise kernel from their batch statistics)
//! and the 1x1 conv with groups 1 and stride 1 (one folded conv from the input's per-channel
//! mean and covariance): [`FusedRepDw`] and [`FusedRep1x1`]. Backends without them (the CPU)
//! keep the defaults (`fused_rep_dw` and `fused_rep_1x1` false) and the op composes the branches
//! from conv2d, BN and add.

use super::Backend;
use crate::backend::Elem;
use anyhow::{bail, ensure, Result};

/// A fused re-parameterized depth-wise conv: `branches` kxk branches (kh x kw, padding
/// (k-1)/2), the optional 1x1 scale branch and the optional BN identity (stride 1 only).
/// Weights: kxk [C, 1, kh, kw] each, scale [C, 1, 1, 1]; one BN (gamma, beta: C values each)
/// per branch in the order kxk branches, scale, identity.
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
}

/// A fused re-parameterized 1x1 conv: input [n, cin, hw], `branches` weights [cout, cin, 1, 1]
/// (groups 1, stride 1) and the BN identity (cin == cout); one BN (cout values) per branch in
/// the order 1x1 branches, identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rep1x1Geom {
    pub n: usize,
    pub cin: usize,
    pub cout: usize,
    pub hw: usize,
    pub branches: usize,
    pub identity: bool,
    /// Most batch entries per GEMM of the reductions over the batch (0: the backend's choice;
    /// tests set it to exercise the chunked accumulation).
    pub chunk: usize,
}

impl Rep1x1Geom {
    /// Branches with a BN: the 1x1 convs, then the identity.
    pub fn nbt(&self) -> usize {
        self.branches + self.identity as usize
    }

    /// The shape limits of the fused form (a clear error, not a wrong result).
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.n > 0 && self.cin > 0 && self.cout > 0 && self.hw > 0,
            "rep_1x1: empty shape {self:?}"
        );
        ensure!(self.branches >= 1, "rep_1x1: needs a conv branch");
        ensure!(
            !self.identity || self.cin == self.cout,
            "rep_1x1: identity branch needs Cin == Cout"
        );
        Ok(())
    }

    /// Positions per channel (the BN count).
    pub fn m(&self) -> usize {
        self.n * self.hw
    }

    /// Estimated cost per position of (fused, unfused) forward + backward in byte equivalents:
    /// floats moved x 4 + FLOPs / 10 (about a current GPU's f32 FLOP-per-byte ratio). Counts as
    /// in cuda/rep_conv_1x1.cu's header; the CPU and CUDA backends both decide by it.
    pub fn costs(&self) -> (f64, f64) {
        let (ci, co, nb) = (self.cin as f64, self.cout as f64, self.branches as f64);
        let id = f64::from(u8::from(self.identity));
        let ca = ci + 1.0;
        let sums = nb + id - 1.0;
        let fused_floats = (4.0 * ci + 2.0 * ca + co) + (co + ca) + (ca + ci) + (co + 2.0 * ci);
        let fused_flops = 2.0 * ci * ci + 4.0 * co * ca + 2.0 * ci * ca + 2.0 * ci * co;
        let unfused_floats = nb * (ci + 4.0 * co)
            + id * 3.0 * co
            + sums * 3.0 * co
            + nb * (7.0 * co + 2.0 * ci)
            + id * 5.0 * co
            + sums * 3.0 * ci;
        let unfused_flops = 6.0 * nb * ci * co;
        (
            4.0 * fused_floats + fused_flops / 10.0,
            4.0 * unfused_floats + unfused_flops / 10.0,
        )
    }

    /// Whether the fused form is estimated to cost less than the explicit branches.
    pub fn fused_pays(&self) -> bool {
        let (f, u) = self.costs();
        f < u
    }
}

/// The gradients of a fused rep conv.
pub struct RepGrads<O> {
    pub dx: O,
    /// The kxk (or 1x1) branch weights', one after another.
    pub dw: O,
    /// The scale branch weight's (depth-wise, when it exists).
    pub dscale: Option<O>,
    /// Every branch BN's, one after another (the branches' order).
    pub dgamma: O,
    pub dbeta: O,
}

/// The forward's result: the output, the state its backward needs, and every branch's batch
/// statistics (mean, biased variance) in the branches' order.
pub type RepOut<O, S, St> = (O, S, Vec<St>);

/// The fused re-parameterized depth-wise conv (cuda/rep_conv.cu).
pub trait FusedRepDw<T: Elem>: Backend<T> {
    /// What the fused depth-wise backward needs of its forward.
    type RepDwSaved: Send + Sync + 'static;

    /// Whether this backend has the fused depth-wise kernels for `g`.
    fn fused_rep_dw(&self, g: &RepDwGeom) -> bool {
        let _ = g;
        false
    }

    /// Train-mode forward: y [n, c, ho, wo] = the sum over the branches of BN(branch(x)) with
    /// each BN's batch statistics; `kxk` the branch weights, `gamma`/`beta` one per BN.
    #[allow(clippy::too_many_arguments)]
    fn rep_dw_forward(
        &self,
        g: &RepDwGeom,
        x: &Self::Buf,
        kxk: &[&Self::Buf],
        scale: Option<&Self::Buf>,
        gamma: &[&Self::Buf],
        beta: &[&Self::Buf],
        eps: f64,
    ) -> Result<RepOut<Self::Owned, Self::RepDwSaved, Self::Stats>> {
        let _ = (g, x, kxk, scale, gamma, beta, eps);
        bail!("{}: no fused depth-wise rep conv", self.name())
    }

    /// Backward of `rep_dw_forward` from gy: the gradients of x, every weight and every BN.
    fn rep_dw_backward(
        &self,
        g: &RepDwGeom,
        x: &Self::Buf,
        scale: Option<&Self::Buf>,
        saved: &Self::RepDwSaved,
        gy: &Self::Buf,
        eps: f64,
    ) -> Result<RepGrads<Self::Owned>> {
        let _ = (g, x, scale, saved, gy, eps);
        bail!("{}: no fused depth-wise rep conv", self.name())
    }
}

/// The fused re-parameterized 1x1 conv (cuda/rep_conv_1x1.cu).
pub trait FusedRep1x1<T: Elem>: Backend<T> {
    /// What the fused 1x1 backward needs of its forward.
    type Rep1x1Saved: Send + Sync + 'static;

    /// Whether this backend has the fused 1x1 kernels for `g`.
    fn fused_rep_1x1(&self, g: &Rep1x1Geom) -> bool {
        let _ = g;
        false
    }

    /// Whether the fused 1x1 form of `g` is estimated to cost less here than the composed
    /// branches (its cost model).
    fn rep_1x1_pays(&self, g: &Rep1x1Geom) -> bool {
        let _ = g;
        false
    }

    /// Train-mode forward: y [n, cout, hw] = the sum over the branches of BN(branch(x)) with
    /// each BN's batch statistics; `w` the branch weights, `gamma`/`beta` one per BN.
    fn rep_1x1_forward(
        &self,
        g: &Rep1x1Geom,
        x: &Self::Buf,
        w: &[&Self::Buf],
        gamma: &[&Self::Buf],
        beta: &[&Self::Buf],
        eps: f64,
    ) -> Result<RepOut<Self::Owned, Self::Rep1x1Saved, Self::Stats>> {
        let _ = (g, x, w, gamma, beta, eps);
        bail!("{}: no fused 1x1 rep conv", self.name())
    }

    /// Backward of `rep_1x1_forward` from gy: the gradients of x, every weight and every BN.
    fn rep_1x1_backward(
        &self,
        g: &Rep1x1Geom,
        saved: &Self::Rep1x1Saved,
        gy: &Self::Buf,
    ) -> Result<RepGrads<Self::Owned>> {
        let _ = (g, saved, gy);
        bail!("{}: no fused 1x1 rep conv", self.name())
    }
}
