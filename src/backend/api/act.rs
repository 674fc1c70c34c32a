//! Activations: relu, relu6, sigmoid, hard_sigmoid (relu6(x + 3) / 6, the SE gate).

use super::Backend;
use crate::backend::Elem;
use anyhow::Result;

/// The element-wise activations, each with a derivative computed from x and y = f(x).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unary {
    Relu,
    /// min(max(x, 0), 6) (MobileNetV2); gradient 1 strictly inside (0, 6) (PyTorch's hardtanh).
    Relu6,
    Sigmoid,
    /// PyTorch's hardsigmoid: gradient 1/6 strictly inside (-3, 3), 0 outside.
    HardSigmoid,
}

impl Unary {
    /// The op's name on the tape.
    pub fn name(self) -> &'static str {
        match self {
            Unary::Relu => "relu",
            Unary::Relu6 => "relu6",
            Unary::Sigmoid => "sigmoid",
            Unary::HardSigmoid => "hard_sigmoid",
        }
    }
}

pub trait Activation<T: Elem>: Backend<T> {
    /// y = f(x)
    fn unary(&self, op: Unary, x: &Self::Buf) -> Result<Self::Owned>;
    /// dx = gy * f'(x), from x, y = f(x) and gy.
    fn unary_backward(
        &self,
        op: Unary,
        x: &Self::Buf,
        y: &Self::Buf,
        gy: &Self::Buf,
    ) -> Result<Self::Owned>;
}
