//! Basic layers (Conv2d, BatchNorm2d, ConvBn, Linear) and the forward context they run in.

use super::params::{Builder, Id, State};
use crate::autograd::{Grads, Tape, Var};
use crate::ops::{self, Conv2dArgs};
use crate::tensor::Tensor;
use rand::rngs::StdRng;
use std::sync::Arc;

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
        let value = match &self.state.cuda_params {
            Some(buf) => {
                let e = self.state.params.entry(id);
                Tensor::cuda_view(buf, e.offset, &e.shape)
            }
            None => self.state.params.view(id),
        };
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
    /// Gradients laid out like the flat parameter buffer (zeros for unused parameters).
    pub fn flat_grads(&self, state: &State, grads: &Grads<f32>) -> Vec<f32> {
        let mut flat = vec![0.0f32; state.params.numel()];
        for (i, leaf) in self.0.iter().enumerate() {
            let (Some(v), e) = (leaf, &state.params.entries()[i]) else {
                continue;
            };
            if let Some(g) = grads.get(*v) {
                flat[e.offset..e.offset + e.numel()].copy_from_slice(g.data());
            }
        }
        flat
    }

    /// The same on the CUDA device: gradients of device parameters, in one flat device buffer.
    pub fn flat_grads_cuda(
        &self,
        state: &State,
        grads: &Grads<f32>,
    ) -> anyhow::Result<crate::backend::cuda::DBuf> {
        let gpu = crate::backend::cuda::global().map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut flat = gpu.zeros(state.params.numel())?;
        let mut views = Vec::new();
        for (i, leaf) in self.0.iter().enumerate() {
            let (Some(v), e) = (leaf, &state.params.entries()[i]) else {
                continue;
            };
            if let Some(g) = grads.get(*v) {
                let d = g
                    .cuda()
                    .ok_or_else(|| anyhow::anyhow!("{}: gradient on the host", e.name))?;
                views.push((d.buf.view(d.offset, e.numel()), e.offset));
            }
        }
        let segments: Vec<(&crate::backend::cuda::DBuf, usize)> =
            views.iter().map(|(v, off)| (&**v, *off)).collect();
        gpu.copy_segments(&segments, &mut flat)?;
        Ok(flat)
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
        } else if let (Some(bufs), true) = (&ctx.state.cuda_buffers, ctx.tape.value(x).is_cuda()) {
            // Running statistics on the device: viewed there, no upload per call.
            let view = |id: Id| {
                let e = ctx.state.buffers.entry(id);
                Tensor::cuda_view(bufs, e.offset, &e.shape)
            };
            let (rm, rv) = (view(self.running_mean), view(self.running_var));
            ops::cuda::batch_norm_eval_dev(ctx.tape, x, g, b, &rm, &rv, BN_EPS)
        } else {
            let rm = ctx.state.buffers.slice(self.running_mean).to_vec();
            let rv = ctx.state.buffers.slice(self.running_var).to_vec();
            ops::batch_norm_eval(ctx.tape, x, g, b, &rm, &rv, BN_EPS)
        }
    }

    /// PyTorch's running-stat update from one batch (momentum, unbiased variance) and the
    /// batch counter. Statistics from the GPU update the device copy of the running statistics
    /// when the state has one (`State::place_on_cuda`), else they come to the host.
    pub fn update_running(&self, state: &mut State, stats: &ops::BatchStats) {
        let m = BN_MOMENTUM;
        state.counters[self.counter].1 += 1;
        if let (Some(d), Some(bufs)) = (&stats.device, state.cuda_buffers.as_mut()) {
            let gpu = crate::backend::cuda::global().expect("device statistics without a GPU");
            let bufs = Arc::get_mut(bufs).expect("running statistics still viewed by a tape");
            let (rm, rv) = (
                state.buffers.entry(self.running_mean),
                state.buffers.entry(self.running_var),
            );
            gpu.bn_running_update_at(bufs, (rm.offset, rv.offset, rm.numel()), d, stats.count, m)
                .unwrap_or_else(|e| panic!("CUDA: {e:#}"));
            return;
        }
        let host;
        let stats = if stats.device.is_some() {
            host = stats.to_host().unwrap_or_else(|e| panic!("CUDA: {e:#}"));
            &host
        } else {
            stats
        };
        let unbiased = stats.unbiased_var();
        let bufs = &mut state.buffers;
        for (r, &v) in bufs
            .slice_mut(self.running_mean)
            .iter_mut()
            .zip(&stats.mean)
        {
            *r = ((1.0 - m) * *r as f64 + m * v) as f32;
        }
        for (r, &v) in bufs.slice_mut(self.running_var).iter_mut().zip(&unbiased) {
            *r = ((1.0 - m) * *r as f64 + m * v) as f32;
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
