//! Channel concat, slicing and shuffle on the CPU: plane copies.

use super::Cpu;
use crate::backend::api::Channel;
use crate::backend::Elem;
use anyhow::Result;

/// The source channel of each output channel of a shuffle with `groups` groups:
/// view [N, g, C/g, H, W] -> transpose(1, 2) -> flatten, so out j = in (j % g) * (C/g) + j / g.
fn shuffle_src(c: usize, groups: usize) -> Vec<usize> {
    let per = c / groups;
    (0..c).map(|j| (j % groups) * per + j / groups).collect()
}

impl<T: Elem> Channel<T> for Cpu {
    fn concat_channels(
        &self,
        ad: &[T],
        bd: &[T],
        (n, ca, cb, hw): (usize, usize, usize, usize),
    ) -> Result<Vec<T>> {
        let (pa, pb) = (ca * hw, cb * hw);
        let mut y = Vec::with_capacity(n * (pa + pb));
        for i in 0..n {
            y.extend_from_slice(&ad[i * pa..(i + 1) * pa]);
            y.extend_from_slice(&bd[i * pb..(i + 1) * pb]);
        }
        Ok(y)
    }

    fn concat_channels_backward(
        &self,
        g: &[T],
        (n, ca, cb, hw): (usize, usize, usize, usize),
    ) -> Result<(Vec<T>, Vec<T>)> {
        let (pa, pb) = (ca * hw, cb * hw);
        let split = |off: usize, len: usize| {
            let mut d = Vec::with_capacity(n * len);
            for i in 0..n {
                d.extend_from_slice(&g[i * (pa + pb) + off..][..len]);
            }
            d
        };
        Ok((split(0, pa), split(pa, pb)))
    }

    fn slice_channels(
        &self,
        xd: &[T],
        (n, c, hw): (usize, usize, usize),
        start: usize,
        len: usize,
    ) -> Result<Vec<T>> {
        let mut y = Vec::with_capacity(n * len * hw);
        for i in 0..n {
            y.extend_from_slice(&xd[(i * c + start) * hw..(i * c + start + len) * hw]);
        }
        Ok(y)
    }

    fn slice_channels_backward(
        &self,
        g: &[T],
        (n, c, hw): (usize, usize, usize),
        start: usize,
        len: usize,
    ) -> Result<Vec<T>> {
        let mut dx = vec![T::zero(); n * c * hw];
        for i in 0..n {
            dx[(i * c + start) * hw..(i * c + start + len) * hw]
                .copy_from_slice(&g[i * len * hw..(i + 1) * len * hw]);
        }
        Ok(dx)
    }

    fn channel_shuffle(
        &self,
        xd: &[T],
        (n, c, hw): (usize, usize, usize),
        groups: usize,
    ) -> Result<Vec<T>> {
        let src = shuffle_src(c, groups);
        let mut y = vec![T::zero(); n * c * hw];
        for i in 0..n {
            for (j, &s) in src.iter().enumerate() {
                y[(i * c + j) * hw..(i * c + j + 1) * hw]
                    .copy_from_slice(&xd[(i * c + s) * hw..(i * c + s + 1) * hw]);
            }
        }
        Ok(y)
    }

    fn channel_shuffle_backward(
        &self,
        g: &[T],
        (n, c, hw): (usize, usize, usize),
        groups: usize,
    ) -> Result<Vec<T>> {
        let src = shuffle_src(c, groups);
        let mut dx = vec![T::zero(); n * c * hw];
        for i in 0..n {
            for (j, &s) in src.iter().enumerate() {
                dx[(i * c + s) * hw..(i * c + s + 1) * hw]
                    .copy_from_slice(&g[(i * c + j) * hw..(i * c + j + 1) * hw]);
            }
        }
        Ok(dx)
    }
}
