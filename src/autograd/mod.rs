//! The tape: every op computes its output eagerly and records a backward closure holding what it
//! saved. `Tape::backward` walks the records in reverse and accumulates input gradients.

use crate::backend::trace::{self, Phase};
use crate::tensor::{Elem, Tensor};

/// A handle to a value recorded on a tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(pub(crate) usize);

impl Var {
    pub fn index(self) -> usize {
        self.0
    }
}

/// Computes the gradients of an op's inputs from the gradient of its output. `needs[i]` says
/// whether input `i` wants a gradient; the closure returns `None` where it does not.
pub type BackwardFn<T> = Box<dyn FnOnce(&Tensor<T>, &[bool]) -> Vec<Option<Tensor<T>>> + Send>;

struct Node<T> {
    op: &'static str,
    value: Tensor<T>,
    inputs: Vec<usize>,
    requires_grad: bool,
    backward: Option<BackwardFn<T>>,
}

pub struct Tape<T = f32> {
    nodes: Vec<Node<T>>,
    grad_enabled: bool,
    macs: u64,
    profile: Option<Profile>,
}

/// Time spent per op kind, forward and backward (enabled with `Tape::enable_profile`).
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// op -> (calls, forward seconds, backward seconds)
    pub ops: std::collections::BTreeMap<&'static str, (usize, f64, f64)>,
    last: Option<std::time::Instant>,
}

impl Profile {
    /// One line per op, slowest first.
    pub fn report(&self) -> String {
        let mut rows: Vec<_> = self.ops.iter().collect();
        rows.sort_by(|a, b| (b.1 .1 + b.1 .2).total_cmp(&(a.1 .1 + a.1 .2)));
        let total: f64 = rows.iter().map(|(_, v)| v.1 + v.2).sum();
        let mut s = format!(
            "{:<20} {:>7} {:>10} {:>10} {:>6}\n",
            "op", "calls", "fwd ms", "bwd ms", "%"
        );
        for (op, (n, f, b)) in rows {
            s += &format!(
                "{op:<20} {n:>7} {:>10.2} {:>10.2} {:>5.1}%\n",
                f * 1e3,
                b * 1e3,
                100.0 * (f + b) / total
            );
        }
        s
    }
}

impl<T: Elem> Default for Tape<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Elem> Tape<T> {
    pub fn new() -> Self {
        Tape {
            nodes: Vec::new(),
            grad_enabled: true,
            macs: 0,
            profile: None,
        }
    }

    /// A tape that records no backward closures (inference): ops only compute values.
    pub fn inference() -> Self {
        Tape {
            nodes: Vec::new(),
            grad_enabled: false,
            macs: 0,
            profile: None,
        }
    }

    pub fn grad_enabled(&self) -> bool {
        self.grad_enabled
    }

    /// Starts timing ops: forward time is measured between consecutive records, so call this
    /// right before the forward pass.
    pub fn enable_profile(&mut self) {
        self.profile = Some(Profile {
            last: Some(std::time::Instant::now()),
            ..Default::default()
        });
    }

    pub fn profile(&self) -> Option<&Profile> {
        self.profile.as_ref()
    }

    /// Multiply-adds of the convs and linear layers recorded so far (the figure `info` reports).
    pub fn macs(&self) -> u64 {
        self.macs
    }

    pub fn add_macs(&mut self, n: u64) {
        self.macs += n;
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A leaf: an input or a parameter. `requires_grad` leaves receive gradients.
    pub fn leaf(&mut self, value: Tensor<T>, requires_grad: bool) -> Var {
        self.nodes.push(Node {
            op: "leaf",
            value,
            inputs: Vec::new(),
            requires_grad: requires_grad && self.grad_enabled,
            backward: None,
        });
        Var(self.nodes.len() - 1)
    }

    /// A leaf that never receives a gradient.
    pub fn constant(&mut self, value: Tensor<T>) -> Var {
        self.leaf(value, false)
    }

    pub fn value(&self, v: Var) -> &Tensor<T> {
        &self.nodes[v.0].value
    }

    pub fn shape(&self, v: Var) -> &[usize] {
        self.nodes[v.0].value.shape()
    }

    pub fn requires_grad(&self, v: Var) -> bool {
        self.nodes[v.0].requires_grad
    }

    /// Records an op's output. The backward closure is kept only if some input requires a gradient.
    pub fn push(
        &mut self,
        op: &'static str,
        value: Tensor<T>,
        inputs: &[Var],
        backward: BackwardFn<T>,
    ) -> Var {
        if let Some(p) = self.profile.as_mut() {
            let now = std::time::Instant::now();
            let dt = p.last.map_or(0.0, |t| (now - t).as_secs_f64());
            let e = p.ops.entry(op).or_default();
            e.0 += 1;
            e.1 += dt;
            p.last = Some(now);
        }
        // The device work since the last op was this op's forward.
        trace::label(op, Phase::Forward, Some(self.nodes.len()));
        let requires_grad =
            self.grad_enabled && inputs.iter().any(|v| self.nodes[v.0].requires_grad);
        self.nodes.push(Node {
            op,
            value,
            inputs: inputs.iter().map(|v| v.0).collect(),
            requires_grad,
            backward: if requires_grad { Some(backward) } else { None },
        });
        Var(self.nodes.len() - 1)
    }

    /// Backward from a scalar (one-element) output, seeded with 1.
    pub fn backward(&mut self, out: Var) -> Grads<T> {
        assert_eq!(
            self.value(out).numel(),
            1,
            "backward() needs a scalar; use backward_with"
        );
        let seed = Tensor::full(self.shape(out), T::one());
        self.backward_with(out, seed)
    }

    /// Backward from `out` with an explicit output gradient. Consumes the recorded closures, so a
    /// tape is differentiated once.
    pub fn backward_with(&mut self, out: Var, seed: Tensor<T>) -> Grads<T> {
        assert_eq!(seed.shape(), self.shape(out), "seed gradient shape");
        let mut grads: Vec<Option<Tensor<T>>> = vec![None; self.nodes.len()];
        grads[out.0] = Some(seed);
        for i in (0..=out.0).rev() {
            let Some(g) = grads[i].clone() else { continue };
            let Some(bw) = self.nodes[i].backward.take() else {
                continue;
            };
            let inputs = self.nodes[i].inputs.clone();
            let needs: Vec<bool> = inputs
                .iter()
                .map(|&j| self.nodes[j].requires_grad)
                .collect();
            let t0 = self.profile.is_some().then(std::time::Instant::now);
            let input_grads = bw(&g, &needs);
            if let (Some(p), Some(t0)) = (self.profile.as_mut(), t0) {
                p.ops.entry(self.nodes[i].op).or_default().2 += t0.elapsed().as_secs_f64();
            }
            trace::label(self.nodes[i].op, Phase::Backward, Some(i));
            assert_eq!(
                input_grads.len(),
                inputs.len(),
                "backward returned wrong arity"
            );
            // Free intermediate gradients as soon as they are consumed (leaves keep theirs).
            if !self.nodes[i].inputs.is_empty() {
                grads[i] = None;
            }
            for (j, gi) in inputs.into_iter().zip(input_grads) {
                let Some(gi) = gi else { continue };
                if !self.nodes[j].requires_grad {
                    continue;
                }
                debug_assert_eq!(gi.shape(), self.nodes[j].value.shape(), "gradient shape");
                grads[j] = Some(match grads[j].take() {
                    None => gi,
                    Some(acc) => acc.add(&gi),
                });
            }
            trace::label("grad_sum", Phase::Backward, Some(i));
        }
        Grads { grads }
    }
}

/// Gradients by tape position.
pub struct Grads<T> {
    grads: Vec<Option<Tensor<T>>>,
}

impl<T: Elem> Grads<T> {
    pub fn get(&self, v: Var) -> Option<&Tensor<T>> {
        self.grads.get(v.0).and_then(|g| g.as_ref())
    }

    pub fn take(&mut self, v: Var) -> Option<Tensor<T>> {
        self.grads.get_mut(v.0).and_then(|g| g.take())
    }
}
