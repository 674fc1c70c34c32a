//! Pooling and resampling on NCHW planes: 2x2 average pooling, global average pooling,
//! nearest upsample (PyTorch's legacy index rule, `backend::cpu::pool::nearest_indices`) and
//! max_pool2d with the argmax its gradient is routed by.

use super::Backend;
use crate::backend::Elem;
use anyhow::{ensure, Result};

/// NCHW sizes `(n, c, h, w)`.
pub type Dims4 = (usize, usize, usize, usize);

/// A max_pool2d window over [n, c, h, w]: `k` x `k`, stride `s`, padding `p` (PyTorch
/// semantics: padding counts as -inf, output size floor((H + 2p - k) / s) + 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPoolGeom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub s: usize,
    pub p: usize,
}

impl MaxPoolGeom {
    /// The output's (height, width).
    pub fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.p - self.k) / self.s + 1,
            (self.w + 2 * self.p - self.k) / self.s + 1,
        )
    }

    /// Whether the window fits: a positive kernel and stride, padding at most half the
    /// kernel, an input (with padding) at least one window large.
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.k > 0 && self.s > 0 && 2 * self.p <= self.k,
            "max_pool2d: kernel {}, stride {}, padding {}",
            self.k,
            self.s,
            self.p
        );
        ensure!(
            self.h + 2 * self.p >= self.k && self.w + 2 * self.p >= self.k,
            "max_pool2d: {}x{} input smaller than the {}x{} window",
            self.h,
            self.w,
            self.k,
            self.k
        );
        Ok(())
    }
}

pub trait Pool<T: Elem>: Backend<T> {
    /// Per max_pool2d output, the in-plane index of the input it took (what its backward
    /// routes the gradient by).
    type Argmax: Send + Sync + 'static;

    /// y [n, c, h/2, w/2]: the mean of each 2x2 window (stride 2, floor).
    fn avg_pool2x2(&self, x: &Self::Buf, dims: Dims4) -> Result<Self::Owned>;
    /// dx [n, c, h, w] from gy [n, c, h/2, w/2]: a quarter of each gradient to its window.
    fn avg_pool2x2_backward(&self, gy: &Self::Buf, dims: Dims4) -> Result<Self::Owned>;
    /// y[p] = the mean of plane p (`nc` planes of `hw` values).
    fn global_avg_pool(&self, x: &Self::Buf, nc: usize, hw: usize) -> Result<Self::Owned>;
    /// dx[p, i] = gy[p] / hw.
    fn global_avg_pool_backward(&self, gy: &Self::Buf, nc: usize, hw: usize)
        -> Result<Self::Owned>;
    /// Nearest-neighbour resize of x [n, c, h, w] to [n, c, out.0, out.1].
    fn upsample_nearest(
        &self,
        x: &Self::Buf,
        dims: Dims4,
        out: (usize, usize),
    ) -> Result<Self::Owned>;
    /// dx [n, c, h, w]: each source pixel's sum of the gradients of the outputs reading it.
    fn upsample_nearest_backward(
        &self,
        gy: &Self::Buf,
        dims: Dims4,
        out: (usize, usize),
    ) -> Result<Self::Owned>;
    /// The pooled output [n, c, ho, wo] and the argmax of each output (the first maximum of
    /// its window in row-major order; NaN wins).
    fn max_pool2d(&self, x: &Self::Buf, g: &MaxPoolGeom) -> Result<(Self::Owned, Self::Argmax)>;
    /// dx [n, c, h, w]: each output's gradient added to the input it took.
    fn max_pool2d_backward(
        &self,
        gy: &Self::Buf,
        arg: &Self::Argmax,
        g: &MaxPoolGeom,
    ) -> Result<Self::Owned>;
}
