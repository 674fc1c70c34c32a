//! add, mul, scale and the per-channel mul of the SE gate on the CPU.

use super::{min_len, par_map, par_map2, Cpu};
use crate::backend::api::Elementwise;
use crate::backend::Elem;
use anyhow::Result;
use rayon::prelude::*;

impl<T: Elem> Elementwise<T> for Cpu {
    fn copy(&self, x: &[T]) -> Result<Vec<T>> {
        Ok(x.to_vec())
    }

    fn add(&self, a: &[T], b: &[T]) -> Result<Vec<T>> {
        Ok(par_map2(a, b, |p, q| p + q))
    }

    fn mul(&self, a: &[T], b: &[T]) -> Result<Vec<T>> {
        Ok(par_map2(a, b, |p, q| p * q))
    }

    fn scale(&self, x: &[T], a: f64) -> Result<Vec<T>> {
        let a = T::from_f64(a);
        Ok(par_map(x, |v| v * a))
    }

    fn mul_channel(&self, x: &[T], s: &[T], hw: usize) -> Result<Vec<T>> {
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(hw)
            .enumerate()
            .with_min_len(min_len(hw))
            .for_each(|(nc, out)| {
                let sv = s[nc];
                out.iter_mut()
                    .zip(&x[nc * hw..(nc + 1) * hw])
                    .for_each(|(o, &v)| *o = v * sv);
            });
        Ok(y)
    }

    fn mul_channel_backward_scale(&self, gy: &[T], x: &[T], hw: usize) -> Result<Vec<T>> {
        let planes = gy.len() / hw.max(1);
        Ok((0..planes)
            .into_par_iter()
            .map(|nc| {
                gy[nc * hw..(nc + 1) * hw]
                    .iter()
                    .zip(&x[nc * hw..(nc + 1) * hw])
                    .map(|(&a, &b)| a * b)
                    .sum()
            })
            .collect())
    }

    fn gather(&self, segments: &[(&[T], usize)], len: usize) -> Result<Vec<T>> {
        let mut flat = vec![T::zero(); len];
        for (s, off) in segments {
            flat[*off..*off + s.len()].copy_from_slice(s);
        }
        Ok(flat)
    }
}
