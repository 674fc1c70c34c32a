//! Channel ops on NCHW buffers, each plane `hw` values: two-input concat (the Ghost module's
//! [primary, cheap] output), slicing (ShuffleNetV2's split) and torchvision's channel shuffle.

use super::Backend;
use crate::backend::Elem;
use anyhow::Result;

pub trait Channel<T: Elem>: Backend<T> {
    /// y [n, ca + cb, hw] = a [n, ca, hw] and b [n, cb, hw] one after the other per sample;
    /// `dims` = (n, ca, cb, hw).
    fn concat_channels(
        &self,
        a: &Self::Buf,
        b: &Self::Buf,
        dims: (usize, usize, usize, usize),
    ) -> Result<Self::Owned>;
    /// The gradients (da, db) of `concat_channels`: gy's two channel ranges.
    fn concat_channels_backward(
        &self,
        gy: &Self::Buf,
        dims: (usize, usize, usize, usize),
    ) -> Result<(Self::Owned, Self::Owned)>;
    /// Channels `start..start + len` of x [n, c, hw]; `dims` = (n, c, hw).
    fn slice_channels(
        &self,
        x: &Self::Buf,
        dims: (usize, usize, usize),
        start: usize,
        len: usize,
    ) -> Result<Self::Owned>;
    /// dx [n, c, hw]: gy [n, len, hw] at channels `start..start + len`, zeros elsewhere.
    fn slice_channels_backward(
        &self,
        gy: &Self::Buf,
        dims: (usize, usize, usize),
        start: usize,
        len: usize,
    ) -> Result<Self::Owned>;
    /// torchvision's `channel_shuffle(x, groups)` on x [n, c, hw]: output channel j is input
    /// channel (j % groups) * (c / groups) + j / groups.
    fn channel_shuffle(
        &self,
        x: &Self::Buf,
        dims: (usize, usize, usize),
        groups: usize,
    ) -> Result<Self::Owned>;
    /// The gradient of `channel_shuffle` (the inverse permutation).
    fn channel_shuffle_backward(
        &self,
        gy: &Self::Buf,
        dims: (usize, usize, usize),
        groups: usize,
    ) -> Result<Self::Owned>;
}
