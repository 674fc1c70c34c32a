//! Launchers of cuda/channel.cu: channel slicing and torchvision's channel shuffle (NCHW f32
//! buffers, `(n, c, hw)` dims).

use super::device::{DBuf, Gpu};
use super::launch::{i32a, i64a, need, ptr};
use anyhow::{ensure, Result};

impl Gpu {
    /// Both directions of the slice take the same arguments: `src` is [n, c, hw] forward and
    /// [n, len, hw] backward, and the result the other one.
    fn slice_launch(
        &self,
        kernel: &'static str,
        src: &DBuf,
        (n, c, hw): (usize, usize, usize),
        start: usize,
        len: usize,
    ) -> Result<DBuf> {
        ensure!(
            len > 0 && start + len <= c,
            "slice_channels {start}..{} of {c} channels",
            start + len
        );
        let forward = kernel.ends_with("_fwd");
        let (from, to) = if forward { (c, len) } else { (len, c) };
        need(kernel, src, n * from * hw)?;
        let total = n * to * hw;
        let dst = self.alloc(total)?;
        self.launch(
            "channel",
            kernel,
            self.grid(total),
            &[
                ptr(src),
                ptr(&dst),
                i32a(n),
                i32a(c),
                i32a(start),
                i32a(len),
                i64a(hw),
            ],
        )?;
        Ok(dst)
    }
}

fn shuffle_groups(c: usize, groups: usize) -> Result<()> {
    ensure!(
        groups > 0 && c.is_multiple_of(groups),
        "channel_shuffle: {c} channels in {groups} groups"
    );
    Ok(())
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
        self.slice_launch("slice_channels_fwd", x, dims, start, len)
    }

    fn slice_channels_backward(
        &self,
        gy: &DBuf,
        dims: (usize, usize, usize),
        start: usize,
        len: usize,
    ) -> Result<DBuf> {
        self.slice_launch("slice_channels_bwd", gy, dims, start, len)
    }

    /// torchvision's `channel_shuffle(x, groups)` on x [n, c, hw]. Its gradient is the
    /// shuffle with `c / groups` groups (`channel_shuffle_backward`).
    fn channel_shuffle(
        &self,
        x: &DBuf,
        (n, c, hw): (usize, usize, usize),
        groups: usize,
    ) -> Result<DBuf> {
        shuffle_groups(c, groups)?;
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

    /// The gradient of `channel_shuffle` with `groups` groups.
    fn channel_shuffle_backward(
        &self,
        gy: &DBuf,
        (n, c, hw): (usize, usize, usize),
        groups: usize,
    ) -> Result<DBuf> {
        shuffle_groups(c, groups)?;
        self.channel_shuffle(gy, (n, c, hw), c / groups)
    }
}
