//! `Gpu` as a backend of `backend::api`: each method one launcher of this module's files.
//! (Device buffers hold f32 whatever the element type parameter is.)

use super::{DBuf, Gpu};
use crate::backend::api::{Activation, Backend, Elementwise, Unary};
use crate::backend::Elem;
use anyhow::Result;
use std::marker::PhantomData;
use std::ops::Deref;

/// The GPU as the backend of element type `T` (its buffers hold f32 whatever `T` is; the type
/// parameter only ties a call to the tensors it came from). Derefs to the [`Gpu`] launchers.
#[repr(transparent)]
pub struct Cuda<T>(Gpu, PhantomData<fn() -> T>);

impl<T> Cuda<T> {
    pub fn of(gpu: &Gpu) -> &Cuda<T> {
        // SAFETY: `Cuda<T>` is `repr(transparent)` over `Gpu` (the PhantomData is zero-sized).
        unsafe { &*(gpu as *const Gpu as *const Cuda<T>) }
    }
}

impl<T> Deref for Cuda<T> {
    type Target = Gpu;
    fn deref(&self) -> &Gpu {
        &self.0
    }
}

impl<T: Elem> Backend<T> for Cuda<T> {
    type Buf = DBuf;
    type Owned = DBuf;
    type Stats = super::DeviceStats;
    fn name(&self) -> &'static str {
        "cuda"
    }
}

impl<T: Elem> Activation<T> for Cuda<T> {
    fn unary(&self, op: Unary, x: &DBuf) -> Result<DBuf> {
        match op {
            Unary::Relu => self.0.relu(x),
            Unary::Relu6 => self.0.relu6(x),
            Unary::Sigmoid => self.0.sigmoid(x),
            Unary::HardSigmoid => self.0.hard_sigmoid(x),
        }
    }

    fn unary_backward(&self, op: Unary, x: &DBuf, y: &DBuf, gy: &DBuf) -> Result<DBuf> {
        match op {
            Unary::Relu => self.0.relu_backward(x, gy),
            Unary::Relu6 => self.0.relu6_backward(x, gy),
            Unary::Sigmoid => self.0.sigmoid_backward(y, gy),
            Unary::HardSigmoid => self.0.hard_sigmoid_backward(x, gy),
        }
    }
}

impl<T: Elem> Elementwise<T> for Cuda<T> {
    fn copy(&self, x: &DBuf) -> Result<DBuf> {
        let mut y = self.0.alloc(x.len())?;
        self.0.copy_into(x, &mut y)?;
        Ok(y)
    }

    fn add(&self, a: &DBuf, b: &DBuf) -> Result<DBuf> {
        self.0.add(a, b)
    }

    fn mul(&self, a: &DBuf, b: &DBuf) -> Result<DBuf> {
        self.0.mul(a, b)
    }

    fn scale(&self, x: &DBuf, a: f64) -> Result<DBuf> {
        self.0.scale(x, a as f32)
    }

    fn mul_channel(&self, x: &DBuf, s: &DBuf, hw: usize) -> Result<DBuf> {
        self.0.mul_channel(x, s, hw)
    }

    fn mul_channel_backward_scale(&self, gy: &DBuf, x: &DBuf, hw: usize) -> Result<DBuf> {
        self.0.mul_channel_backward_scale(gy, x, hw)
    }

    fn gather(&self, segments: &[(&DBuf, usize)], len: usize) -> Result<DBuf> {
        let mut flat = self.0.zeros(len)?;
        self.0.copy_segments(segments, &mut flat)?;
        Ok(flat)
    }
}
