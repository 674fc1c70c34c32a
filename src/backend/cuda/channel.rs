//! Launchers of cuda/channel.cu: channel slicing and torchvision's channel shuffle (NCHW f32
//! buffers, `(n, c, hw)` dims).

use super::device::{DBuf, Gpu};
use super::launch::{i32a, i64a, need, ptr};
use anyhow::{ensure, Result};

impl Gpu {
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

impl<T: crate::backend::Elem> crate::backend::api::Channel<T> for super::Cuda<T> {
    fn concat_channels(
        &self,
        a: &DBuf,
        b: &DBuf,
        dims: (usize, usize, usize, usize),
    ) -> Result<DBuf> {
        (**self).concat_channels(a, b, dims)
    }

    fn concat_channels_backward(
        &self,
        gy: &DBuf,
        dims: (usize, usize, usize, usize),
    ) -> Result<(DBuf, DBuf)> {
        (**self).concat_channels_backward(gy, dims)
    }

    fn slice_channels(
        &self,
        x: &DBuf,
        dims: (usize, usize, usize),
        start: usize,
        len: usize,
    ) -> Result<DBuf> {
        (**self).slice_channels(x, dims, start, len)
    }

    fn slice_channels_backward(
        &self,
        gy: &DBuf,
        dims: (usize, usize, usize),
        start: usize,
        len: usize,
    ) -> Result<DBuf> {
        (**self).slice_channels_backward(gy, dims, start, len)
    }

    fn channel_shuffle(
        &self,
        x: &DBuf,
        dims: (usize, usize, usize),
        groups: usize,
    ) -> Result<DBuf> {
        (**self).channel_shuffle(x, dims, groups)
    }

    fn channel_shuffle_backward(
        &self,
        gy: &DBuf,
        dims: (usize, usize, usize),
        groups: usize,
    ) -> Result<DBuf> {
        (**self).channel_shuffle_backward(gy, dims, groups)
    }
}
