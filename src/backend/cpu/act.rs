//! Activations on the CPU: one parallel pass each, forward and backward.

use super::{par_map, par_map3, Cpu};
use crate::backend::api::{Activation, Unary};
use crate::backend::Elem;
use anyhow::Result;

fn f<T: Elem>(op: Unary, v: T) -> T {
    let (three, six) = (T::from_f64(3.0), T::from_f64(6.0));
    match op {
        Unary::Relu => v.max(T::zero()),
        Unary::Relu6 => v.max(T::zero()).min(six),
        Unary::Sigmoid => T::one() / (T::one() + (-v).exp()),
        Unary::HardSigmoid => (v + three).max(T::zero()).min(six) / six,
    }
}

/// f'(x) from x and y = f(x).
fn df<T: Elem>(op: Unary, x: T, y: T) -> T {
    let (three, six) = (T::from_f64(3.0), T::from_f64(6.0));
    let step = |inside: bool, v: T| if inside { v } else { T::zero() };
    match op {
        Unary::Relu => step(x > T::zero(), T::one()),
        Unary::Relu6 => step(x > T::zero() && x < six, T::one()),
        Unary::Sigmoid => y * (T::one() - y),
        Unary::HardSigmoid => step(x > -three && x < three, T::one() / six),
    }
}

impl<T: Elem> Activation<T> for Cpu {
    fn unary(&self, op: Unary, x: &[T]) -> Result<Vec<T>> {
        Ok(par_map(x, |v| f(op, v)))
    }

    fn unary_backward(&self, op: Unary, x: &[T], y: &[T], gy: &[T]) -> Result<Vec<T>> {
        Ok(par_map3(gy, x, y, |g, xv, yv| g * df(op, xv, yv)))
    }
}
