//! Basic layers (Conv2d, BatchNorm2d, ConvBn, Linear) and the forward context they run in.

use super::params::{Builder, Id, State};
use crate::autograd::{Grads, Tape, Var};
use crate::ops::{self, Conv2dArgs};
use crate::tensor::Tensor;
use rand::rngs::StdRng;

pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

/// How a forward pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// BN on running statistics, no dropout.
    Eval,
    /// BN on batch statistics (running stats updated); dropout on when `dropout` is true.
    Train { dropout: bool },
}

/// The state a forward pass needs: the tape, the model state (running stats are updated in
/// train mode) and the parameter leaves created so far (one per parameter, made on first use).
pub struct Ctx<'a> {
    pub tape: &'a mut Tape<f32>,
    pub state: &'a mut State,
    pub mode: Mode,
    pub rng: Option<&'a mut StdRng>,
    leaves: Vec<Option<Var>>,
}

impl<'a> Ctx<'a> {
    pub fn new(
        tape: &'a mut Tape<f32>,
        state: &'a mut State,
        mode: Mode,
        rng: Option<&'a mut StdRng>,
    ) -> Self {
        let n = state.params.len();
        Ctx {
            tape,
            state,
            mode,
            rng,
            leaves: vec![None; n],
        }
    }

    pub fn train(&self) -> bool {
        matches!(self.mode, Mode::Train { .. })
    }

    /// The tape variable of a parameter (a zero-copy view of the flat buffer).
    pub fn param(&mut self, id: Id) -> Var {
        if let Some(v) = self.leaves[id.0] {
            return v;
        }
        let grad = self.tape.grad_enabled();
        let value = self.state.params.view(id);
        let v = self.tape.leaf(value, grad);
        self.leaves[id.0] = Some(v);
        v
    }

    pub fn into_leaves(self) -> ParamLeaves {
        ParamLeaves(self.leaves)
    }
}

/// Which tape variable each parameter became, to gather gradients after backward.
pub struct ParamLeaves(Vec<Option<Var>>);

impl ParamLeaves {
    /// Gradients laid out like the flat parameter buffer (zeros for unused parameters), in
    /// one launch on the parameters' device.
    pub fn flat_grads(&self, state: &State, grads: &Grads<f32>) -> Tensor<f32> {
        let segments: Vec<(&Tensor<f32>, usize)> = self
            .0
            .iter()
            .zip(state.params.entries())
            .filter_map(|(leaf, e)| Some((grads.get((*leaf)?)?, e.offset)))
            .collect();
        ops::gather(state.params.device(), &segments, state.params.numel())
    }
}

#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Id,
    pub bias: Option<Id>,
    pub args: Conv2dArgs,
}

impl Conv2d {
    /// `name.weight` [cout, cin/groups, kh, kw] (+ `name.bias` [cout]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &mut Builder,
        name: &str,
        cin: usize,
        cout: usize,
        k: (usize, usize),
        args: Conv2dArgs,
        bias: bool,
    ) -> Self {
        let shape = [cout, cin / args.groups, k.0, k.1];
        let weight = b.weight(format!("{name}.weight"), &shape);
        let fan_in = shape[1] * k.0 * k.1;
        let bias = bias.then(|| b.bias(format!("{name}.bias"), cout, fan_in));
        Conv2d { weight, bias, args }
    }

    pub fn forward(&self, ctx: &mut Ctx, x: Var) -> Var {
        let w = ctx.param(self.weight);
        let b = self.bias.map(|b| ctx.param(b));
        ops::conv2d(ctx.tape, x, w, b, self.args)
    }
}

#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    pub weight: Id,
    pub bias: Id,
    pub running_mean: Id,
    pub running_var: Id,
    pub counter: usize,
}

impl BatchNorm2d {
    pub fn new(b: &mut Builder, name: &str, c: usize) -> Self {
        BatchNorm2d {
            weight: b.param_const(format!("{name}.weight"), &[c], 1.0),
            bias: b.param_const(format!("{name}.bias"), &[c], 0.0),
            running_mean: b.buffer_const(format!("{name}.running_mean"), &[c], 0.0),
            running_var: b.buffer_const(format!("{name}.running_var"), &[c], 1.0),
            counter: b.counter(format!("{name}.num_batches_tracked")),
        }
    }

    pub fn forward(&self, ctx: &mut Ctx, x: Var) -> Var {
        let (g, b) = (ctx.param(self.weight), ctx.param(self.bias));
        if ctx.train() {
            let (y, stats) = ops::batch_norm_train(ctx.tape, x, g, b, BN_EPS);
            self.update_running(ctx.state, &stats);
            y
        } else {
            // Views of the running statistics where the state lives (nothing is copied).
            let rm = ctx.state.buffers.view(self.running_mean);
            let rv = ctx.state.buffers.view(self.running_var);
            ops::batch_norm_eval(ctx.tape, x, g, b, &rm, &rv, BN_EPS)
        }
    }

    /// PyTorch's running-stat update from one batch (momentum, unbiased variance) and the
    /// batch counter, on the device the statistics were taken on (where the state lives).
    pub fn update_running(&self, state: &mut State, stats: &ops::BatchStats) {
        state.counters[self.counter].1 += 1;
        let (rm, rv) = (
            state.buffers.entry(self.running_mean),
            state.buffers.entry(self.running_var),
        );
        let at = (rm.offset, rv.offset, rm.numel());
        ops::batch_norm::update_running(state.buffers.tensor_mut(), at, stats, BN_MOMENTUM);
    }

    /// [`Self::update_running`] of several BNs (a re-parameterized layer's branches): each run
    /// of consecutive BNs whose running statistics lie evenly spaced in the flat buffers at
    /// once (on a device, one launch), e.g. the kxk and scale branches, then the identity BN
    /// that timm registers first.
    pub fn update_running_all(bns: &[&BatchNorm2d], state: &mut State, stats: &[ops::BatchStats]) {
        assert_eq!(bns.len(), stats.len(), "one batch statistic per BN");
        let at: Vec<(usize, usize, usize)> = bns
            .iter()
            .map(|b| {
                let (rm, rv) = (
                    state.buffers.entry(b.running_mean),
                    state.buffers.entry(b.running_var),
                );
                (rm.offset, rv.offset, rm.numel())
            })
            .collect();
        for b in bns {
            state.counters[b.counter].1 += 1;
        }
        let mut i = 0;
        while i < at.len() {
            // The run [i, j): BN k's statistics at at[i] + (k - i) * stride.
            let stride = match at.get(i + 1) {
                Some(n) if n.0 > at[i].0 && n.2 == at[i].2 => n.0 - at[i].0,
                _ => 0,
            };
            let mut j = i + 1;
            while stride > 0
                && j < at.len()
                && at[j].2 == at[i].2
                && at[j].0 == at[i].0 + (j - i) * stride
                && at[j].1 == at[i].1 + (j - i) * stride
            {
                j += 1;
            }
            let refs: Vec<&ops::BatchStats> = stats[i..j].iter().collect();
            ops::batch_norm::update_running_strided(
                state.buffers.tensor_mut(),
                at[i],
                stride,
                &refs,
                BN_MOMENTUM,
            );
            i = j;
        }
    }

    /// The eval-mode affine map y = t * x + s per channel: (t, s), in f64.
    pub fn affine(&self, state: &State) -> (Vec<f64>, Vec<f64>) {
        let g = state.params.slice(self.weight);
        let b = state.params.slice(self.bias);
        let m = state.buffers.slice(self.running_mean);
        let v = state.buffers.slice(self.running_var);
        let t: Vec<f64> = g
            .iter()
            .zip(v)
            .map(|(&g, &v)| g as f64 / (v as f64 + BN_EPS).sqrt())
            .collect();
        let s = b
            .iter()
            .zip(m)
            .zip(&t)
            .map(|((&b, &m), &t)| b as f64 - m as f64 * t)
            .collect();
        (t, s)
    }
}

/// A conv (no bias) followed by its BN; timm names `<name>.conv` and `<name>.bn1`.
#[derive(Clone, Debug)]
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: BatchNorm2d,
}

impl ConvBn {
    pub fn forward(&self, ctx: &mut Ctx, x: Var) -> Var {
        let y = self.conv.forward(ctx, x);
        self.bn.forward(ctx, y)
    }
}

#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Id,
    pub bias: Id,
}

impl Linear {
    pub fn new(b: &mut Builder, name: &str, fin: usize, fout: usize) -> Self {
        Linear {
            weight: b.weight(format!("{name}.weight"), &[fout, fin]),
            bias: b.bias(format!("{name}.bias"), fout, fin),
        }
    }

    pub fn forward(&self, ctx: &mut Ctx, x: Var) -> Var {
        let (w, b) = (ctx.param(self.weight), ctx.param(self.bias));
        ops::linear(ctx.tape, x, w, Some(b))
    }
}

/// Copies `values` into a tensor shaped like the parameter `id` (handy for tests and folding).
pub fn param_tensor(state: &State, id: Id) -> Tensor<f32> {
    state.params.view(id)
}
