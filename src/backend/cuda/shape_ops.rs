//! Launchers of the ops MobileNetV2, ShuffleNetV2 and ResNet add to the GhostNet set: relu6,
//! max_pool2d (with the argmax it routes the gradient by), channel slicing and channel shuffle.
//! Same argument conventions as [`super::ops`]: NCHW f32 buffers, `(n, c, h, w)` dims.

use super::device::{DBuf, Gpu};
use super::launch::{i32a, i64a, ptr};
use super::ops::need;
use super::pool::DevBuf;
use anyhow::{ensure, Result};

/// A max_pool2d window: `k` x `k`, stride `s`, padding `p` (PyTorch semantics, as
/// `ops::max_pool2d`).
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
    pub fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.p - self.k) / self.s + 1,
            (self.w + 2 * self.p - self.k) / self.s + 1,
        )
    }
    fn check(&self) -> Result<()> {
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

impl Gpu {
    /// min(max(x, 0), 6).
    pub fn relu6(&self, x: &DBuf) -> Result<DBuf> {
        let n = x.len();
        let y = self.alloc(n)?;
        self.launch(
            "elementwise",
            "relu6_fwd",
            self.grid(n),
            &[ptr(x), ptr(&y), i64a(n)],
        )?;
        Ok(y)
    }

    /// Gradient of relu6 from its input: gy strictly inside (0, 6), 0 elsewhere.
    pub fn relu6_backward(&self, x: &DBuf, gy: &DBuf) -> Result<DBuf> {
        self.binary("relu6_bwd", x, gy)
    }

    /// The pooled output and, per output, the in-plane index of the input it took.
    pub fn max_pool2d(&self, x: &DBuf, g: &MaxPoolGeom) -> Result<(DBuf, DevBuf<i32>)> {
        g.check()?;
        need("max_pool2d x", x, g.n * g.c * g.h * g.w)?;
        let (ho, wo) = g.out_hw();
        let total = g.n * g.c * ho * wo;
        let y = self.alloc(total)?;
        let arg = self.i32s.alloc(total)?;
        self.launch(
            "pool",
            "max_pool2d_fwd",
            self.grid(total),
            &[
                ptr(x),
                ptr(&y),
                ptr(&arg),
                i64a(g.n * g.c),
                i32a(g.h),
                i32a(g.w),
                i32a(ho),
                i32a(wo),
                i32a(g.k),
                i32a(g.s),
                i32a(g.p),
            ],
        )?;
        Ok((y, arg))
    }

    /// The input gradient: each output's gradient to the input it took (sums where windows
    /// overlap, in row-major output order).
    pub fn max_pool2d_backward(
        &self,
        gy: &DBuf,
        arg: &DevBuf<i32>,
        g: &MaxPoolGeom,
    ) -> Result<DBuf> {
        g.check()?;
        let (ho, wo) = g.out_hw();
        need("max_pool2d gy", gy, g.n * g.c * ho * wo)?;
        need("max_pool2d argmax", arg, g.n * g.c * ho * wo)?;
        let total = g.n * g.c * g.h * g.w;
        let dx = self.alloc(total)?;
        self.launch(
            "pool",
            "max_pool2d_bwd",
            self.grid(total),
            &[
                ptr(gy),
                ptr(arg),
                ptr(&dx),
                i64a(g.n * g.c),
                i32a(g.h),
                i32a(g.w),
                i32a(ho),
                i32a(wo),
                i32a(g.k),
                i32a(g.s),
                i32a(g.p),
            ],
        )?;
        Ok(dx)
    }

    /// Channels `start..start + len` of x [n, c, hw].
    pub fn slice_channels(
        &self,
        x: &DBuf,
        (n, c, hw): (usize, usize, usize),
        start: usize,
        len: usize,
    ) -> Result<DBuf> {
        ensure!(
            len > 0 && start + len <= c,
            "slice_channels {start}..{} of {c} channels",
            start + len
        );
        need("slice_channels x", x, n * c * hw)?;
        let total = n * len * hw;
        let y = self.alloc(total)?;
        self.launch(
            "channel",
            "slice_channels_fwd",
            self.grid(total),
            &[
                ptr(x),
                ptr(&y),
                i32a(n),
                i32a(c),
                i32a(start),
                i32a(len),
                i64a(hw),
            ],
        )?;
        Ok(y)
    }

    /// The gradient of [`Gpu::slice_channels`]: gy [n, len, hw] placed into zeros [n, c, hw].
    pub fn slice_channels_backward(
        &self,
        gy: &DBuf,
        (n, c, hw): (usize, usize, usize),
        start: usize,
        len: usize,
    ) -> Result<DBuf> {
        ensure!(
            len > 0 && start + len <= c,
            "slice_channels {start}..{} of {c} channels",
            start + len
        );
        need("slice_channels gy", gy, n * len * hw)?;
        let total = n * c * hw;
        let dx = self.alloc(total)?;
        self.launch(
            "channel",
            "slice_channels_bwd",
            self.grid(total),
            &[
                ptr(gy),
                ptr(&dx),
                i32a(n),
                i32a(c),
                i32a(start),
                i32a(len),
                i64a(hw),
            ],
        )?;
        Ok(dx)
    }

    /// torchvision's `channel_shuffle(x, groups)` on x [n, c, hw]. Its gradient is the
    /// shuffle with `c / groups` groups ([`Gpu::channel_shuffle_backward`]).
    pub fn channel_shuffle(
        &self,
        x: &DBuf,
        (n, c, hw): (usize, usize, usize),
        groups: usize,
    ) -> Result<DBuf> {
        ensure!(
            groups > 0 && c % groups == 0,
            "channel_shuffle: {c} channels in {groups} groups"
        );
        need("channel_shuffle x", x, n * c * hw)?;
        let total = n * c * hw;
        let y = self.alloc(total)?;
        self.launch(
            "channel",
            "channel_shuffle_fwd",
            self.grid(total),
            &[ptr(x), ptr(&y), i32a(n), i32a(c), i32a(groups), i64a(hw)],
        )?;
        Ok(y)
    }

    /// The gradient of [`Gpu::channel_shuffle`] with `groups` groups.
    pub fn channel_shuffle_backward(
        &self,
        gy: &DBuf,
        (n, c, hw): (usize, usize, usize),
        groups: usize,
    ) -> Result<DBuf> {
        ensure!(
            groups > 0 && c % groups == 0,
            "channel_shuffle: {c} channels in {groups} groups"
        );
        self.channel_shuffle(gy, (n, c, hw), c / groups)
    }
}
