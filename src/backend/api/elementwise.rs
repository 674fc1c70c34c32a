//! add, elementwise mul, scaling by a constant, per-channel mul (the SE gate).

use super::Backend;
use crate::backend::Elem;
use anyhow::Result;

pub trait Elementwise<T: Elem>: Backend<T> {
    /// A copy of x (a buffer of its own).
    fn copy(&self, x: &Self::Buf) -> Result<Self::Owned>;
    /// a + b (same lengths)
    fn add(&self, a: &Self::Buf, b: &Self::Buf) -> Result<Self::Owned>;
    /// a * b (same lengths)
    fn mul(&self, a: &Self::Buf, b: &Self::Buf) -> Result<Self::Owned>;
    /// a * x for a constant a
    fn scale(&self, x: &Self::Buf, a: f64) -> Result<Self::Owned>;
    /// y[p, i] = x[p, i] * s[p] over planes p of `hw` values (s has one value per plane).
    fn mul_channel(&self, x: &Self::Buf, s: &Self::Buf, hw: usize) -> Result<Self::Owned>;
    /// ds[p] = sum_i gy[p, i] * x[p, i]: the scale's gradient of `mul_channel`.
    fn mul_channel_backward_scale(
        &self,
        gy: &Self::Buf,
        x: &Self::Buf,
        hw: usize,
    ) -> Result<Self::Owned>;
    /// A zero-filled buffer of `len` values with each segment copied in at its offset (the
    /// flat gradient gathered in one launch).
    fn gather(&self, segments: &[(&Self::Buf, usize)], len: usize) -> Result<Self::Owned>;
}
