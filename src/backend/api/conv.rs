//! Convolutions and the linear layer: conv2d (dense, grouped and depth-wise; any kernel,
//! stride and padding; optional bias) on NCHW buffers with weights [C_out, C_in/groups, kh, kw],
//! and `y = x · W^T + b` with x [N, F], W [O, F], b [O] (PyTorch's nn.Linear layout).

use super::Backend;
use crate::backend::Elem;
use anyhow::Result;

/// The geometry of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub ph: usize,
    pub pw: usize,
    pub groups: usize,
    pub ho: usize,
    pub wo: usize,
}

impl ConvGeom {
    /// Checks shapes and derives the output size; the error names what does not fit.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        x: &[usize],
        wt: &[usize],
        stride: (usize, usize),
        padding: (usize, usize),
        groups: usize,
    ) -> Result<Self, String> {
        if x.len() != 4 || wt.len() != 4 {
            return Err(format!(
                "conv2d needs NCHW input and 4-D weight, got {x:?} and {wt:?}"
            ));
        }
        let (n, cin, h, w) = (x[0], x[1], x[2], x[3]);
        let (cout, cig, kh, kw) = (wt[0], wt[1], wt[2], wt[3]);
        if groups == 0 || cin % groups != 0 || cout % groups != 0 || cin / groups != cig {
            return Err(format!(
                "conv2d: input {x:?} and weight {wt:?} do not fit groups={groups}"
            ));
        }
        if stride.0 == 0 || stride.1 == 0 {
            return Err("conv2d: stride must be positive".into());
        }
        if h + 2 * padding.0 < kh || w + 2 * padding.1 < kw {
            return Err(format!("conv2d: input {x:?} smaller than kernel {wt:?}"));
        }
        let ho = (h + 2 * padding.0 - kh) / stride.0 + 1;
        let wo = (w + 2 * padding.1 - kw) / stride.1 + 1;
        Ok(ConvGeom {
            n,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            sh: stride.0,
            sw: stride.1,
            ph: padding.0,
            pw: padding.1,
            groups,
            ho,
            wo,
        })
    }

    pub fn is_depthwise(&self) -> bool {
        self.groups == self.cin && self.cout == self.cin && self.groups > 1
    }

    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.sh == 1 && self.sw == 1 && self.ph == 0 && self.pw == 0
    }

    /// The tape's name for this conv (the profiler groups by it): which kernel family runs it.
    pub fn op_name(&self) -> &'static str {
        if self.is_depthwise() {
            "conv2d_depthwise"
        } else if self.is_pointwise() {
            "conv2d_1x1"
        } else {
            "conv2d_im2col"
        }
    }

    pub fn out_shape(&self) -> [usize; 4] {
        [self.n, self.cout, self.ho, self.wo]
    }

    /// Multiply-adds of the forward pass.
    pub fn macs(&self) -> u64 {
        (self.n * self.cout * self.ho * self.wo * (self.cin / self.groups) * self.kh * self.kw)
            as u64
    }
}

/// The gradients of a conv2d or a linear layer (input, weight, bias), each present when asked
/// for.
pub struct ConvGrads<O> {
    pub dx: Option<O>,
    pub dw: Option<O>,
    pub db: Option<O>,
}

/// Linear sizes `(n, f, o)`: x [n, f], W [o, f], y [n, o].
pub type LinearDims = (usize, usize, usize);

pub trait Conv<T: Elem>: Backend<T> {
    /// y [n, cout, ho, wo] = conv(x, w) + bias (bias: `cout` values).
    fn conv2d(
        &self,
        g: &ConvGeom,
        x: &Self::Buf,
        w: &Self::Buf,
        bias: Option<&Self::Buf>,
    ) -> Result<Self::Owned>;
    /// The gradients of `conv2d` from gy; `need` = (dx, dw, db).
    fn conv2d_backward(
        &self,
        g: &ConvGeom,
        x: &Self::Buf,
        w: &Self::Buf,
        gy: &Self::Buf,
        need: (bool, bool, bool),
    ) -> Result<ConvGrads<Self::Owned>>;
    /// y [n, o] = x · W^T + bias (bias: `o` values).
    fn linear(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        bias: Option<&Self::Buf>,
        dims: LinearDims,
    ) -> Result<Self::Owned>;
    /// The gradients of `linear` from gy; `need` = (dx, dw, db).
    fn linear_backward(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        gy: &Self::Buf,
        dims: LinearDims,
        need: (bool, bool, bool),
    ) -> Result<ConvGrads<Self::Owned>>;
}
