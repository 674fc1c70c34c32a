//! GhostNet's DFC attention gate `out * upsample(sigmoid(BN(g)))` as one fused kernel, where a
//! backend has one. Backends without it (the CPU) keep the defaults: `fused_dfc` false, and the
//! op composes the gate from BN, sigmoid, nearest upsample and mul.

use super::batch_norm::{BatchNorm, BatchNormGrads};
use super::pool::Dims4;
use crate::backend::Elem;
use anyhow::{bail, Result};

/// Where the gate's BN takes its statistics from.
pub enum GateBn<'a, B: ?Sized> {
    /// Train mode: the batch statistics of g.
    Batch,
    /// Eval mode: the running mean and variance (`c` values each).
    Running(&'a B, &'a B),
}

/// The fused gate's forward: y, the BN's saved state and (train mode) the batch statistics.
pub type GateForward<O, S, St> = (O, S, Option<St>);

/// The fused gate's backward: d out, and (when asked for) the BN's gradients.
pub type GateBackward<O> = (O, Option<BatchNormGrads<O>>);

pub trait DfcGate<T: Elem>: BatchNorm<T> {
    /// Whether this backend runs the gate as one fused op (`dfc_gate`, `dfc_gate_backward`).
    fn fused_dfc(&self) -> bool {
        false
    }

    /// y [n, c, h, w] = out * upsample(sigmoid(BN(g))) for out [n, c, h, w], g [n, c, gh, gw]
    /// and the BN (gamma, beta, eps) with the statistics `bn` says; returns y, the BN's saved
    /// state and, in train mode, the batch statistics of g.
    #[allow(clippy::too_many_arguments)]
    fn dfc_gate(
        &self,
        out: &Self::Buf,
        g: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        bn: GateBn<'_, Self::Buf>,
        dims: Dims4,
        gate_hw: (usize, usize),
        eps: f64,
    ) -> Result<GateForward<Self::Owned, Self::BnSaved, Self::Stats>> {
        let _ = (out, g, gamma, beta, bn, dims, gate_hw, eps);
        bail!("{}: no fused DFC gate", self.name())
    }

    /// Backward of `dfc_gate`: d out, and when `need_bn` the BN's gradients (d g, dgamma,
    /// dbeta) through the gate.
    #[allow(clippy::too_many_arguments)]
    fn dfc_gate_backward(
        &self,
        gy: &Self::Buf,
        out: &Self::Buf,
        g: &Self::Buf,
        gamma: &Self::Buf,
        saved: &Self::BnSaved,
        dims: Dims4,
        gate_hw: (usize, usize),
        need_bn: bool,
    ) -> Result<GateBackward<Self::Owned>> {
        let _ = (gy, out, g, gamma, saved, dims, gate_hw, need_bn);
        bail!("{}: no fused DFC gate", self.name())
    }
}
