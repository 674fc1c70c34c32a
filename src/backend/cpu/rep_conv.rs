//! The fused re-parameterized convs on the CPU: none yet (the fused CPU kernels are a later
//! issue), so `fused_rep_dw` and `fused_rep_1x1` keep their defaults (false) and `ops::rep_conv`
//! composes the branches from conv2d, batch_norm_train and add.

use super::Cpu;
use crate::backend::api::{FusedRep1x1, FusedRepDw};
use crate::backend::Elem;

impl<T: Elem> FusedRepDw<T> for Cpu {
    type RepDwSaved = ();
}

impl<T: Elem> FusedRep1x1<T> for Cpu {
    type Rep1x1Saved = ();
}
