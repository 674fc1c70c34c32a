//! What LAMB, AdamW and SGD share, written once: the layout, the moment buffers (named as in
//! the checkpoint, moved to the parameters' device at a step), the backend's plan, the step
//! counter and the checkpoint state. An optimizer is its options type implementing [`Rule`]:
//! the moment names, the f32 scalars of a step and the backend call; `Lamb` is
//! `Flat<LambOptions>`.

use super::ema::run_step;
use super::{check_lr, decode_step, encode_step, host, match_state, place, Ema, Layout, Optimizer};
use crate::backend::api::optim::{Optim, PlanSlot, Step};
use crate::on_backend;
use crate::tensor::storage::Place;
use crate::tensor::{Device, Tensor};
use anyhow::Result;

/// One optimizer's update rule; implemented by its options.
pub trait Rule: Clone + Send + 'static {
    /// The scalars of one step, as the backend takes them.
    type Scalars;
    /// The optimizer's name, in messages.
    const NAME: &'static str;
    fn validate(&self) -> Result<()>;
    /// The moment buffers (each of the layout's length), by their checkpoint names.
    fn moments(&self) -> &'static [&'static str];
    /// The f32 scalars of step number `step` (1 for the first) with learning rate `lr`.
    fn scalars(&self, step: u64, lr: f64) -> Self::Scalars;
    /// The backend's pass; `moments` in [`Rule::moments`] order.
    fn run<B: Optim>(
        b: &B,
        plan: &mut B::Plan,
        s: Step<'_, B::Buf>,
        moments: &mut [&mut B::Buf],
        k: &Self::Scalars,
    ) -> Result<()>;
}

/// An optimizer over flat buffers following rule `R`.
pub struct Flat<R: Rule> {
    layout: Layout,
    opts: R,
    moments: Vec<Tensor<f32>>,
    /// The backend's tables for this layout (on the CPU also the update scratch).
    plan: PlanSlot,
    /// Where the last step ran (the backend of `plan`); `None` before the first.
    device: Option<Device>,
    step: u64,
}

impl<R: Rule> Flat<R> {
    /// Zeroed moments; panics on invalid options (the config layer validates them first).
    pub fn new(layout: Layout, opts: R) -> Flat<R> {
        if let Err(e) = opts.validate() {
            panic!("invalid {} options: {e}", R::NAME);
        }
        let n = layout.numel();
        Flat {
            moments: opts.moments().iter().map(|_| Tensor::zeros(&[n])).collect(),
            layout,
            opts,
            plan: PlanSlot::default(),
            device: None,
            step: 0,
        }
    }

    pub fn options(&self) -> &R {
        &self.opts
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The moment buffer `name` (a 1-D tensor on the device of the last step's parameters).
    pub fn moment(&self, name: &str) -> Option<&Tensor<f32>> {
        let i = self.opts.moments().iter().position(|&n| n == name)?;
        Some(&self.moments[i])
    }

    fn step_on<B: Place<f32> + Optim>(
        &mut self,
        b: &B,
        params: &mut Tensor<f32>,
        grads: &Tensor<f32>,
        k: &R::Scalars,
        ema: Option<(&mut Ema, &Tensor<f32>)>,
    ) -> Result<()> {
        for m in &mut self.moments {
            place(m, b.device())?;
        }
        let plan = self.plan.get(b, self.layout.table())?;
        self.device = Some(b.device());
        let mut refs: Vec<B::RefMut<'_>> = self.moments.iter_mut().map(|m| b.get_mut(m)).collect();
        let mut moments: Vec<&mut B::Buf> = refs.iter_mut().map(|r| &mut **r).collect();
        run_step(b, params, grads, ema, |s| {
            R::run(b, plan, s, &mut moments, k)
        })
    }
}

impl<R: Rule> Optimizer for Flat<R> {
    /// The flag of the plan of the last step's backend.
    fn take_nonfinite(&mut self) -> Result<bool> {
        let Some(device) = self.device else {
            return Ok(false);
        };
        let plan = &mut self.plan;
        on_backend!(device, f32, |b| plan.take_nonfinite(b))
    }

    fn step(
        &mut self,
        params: &mut Tensor<f32>,
        grads: &Tensor<f32>,
        lr: f64,
        ema: Option<(&mut Ema, &Tensor<f32>)>,
    ) -> Result<()> {
        self.layout.check(R::NAME, params.numel(), grads.numel());
        check_lr(R::NAME, lr);
        self.step += 1;
        let k = self.opts.scalars(self.step, lr);
        on_backend!([&*params], |b| self.step_on(b, params, grads, &k, ema))
    }

    fn state(&self) -> Vec<(String, Vec<f32>)> {
        let names = self.opts.moments().iter();
        let mut s: Vec<(String, Vec<f32>)> = names
            .zip(&self.moments)
            .map(|(n, m)| (n.to_string(), m.to_host().into_vec()))
            .collect();
        s.push(("step".into(), encode_step(self.step)));
        s
    }

    fn load_state(&mut self, state: &[(String, Vec<f32>)]) -> Result<()> {
        let n = self.layout.numel();
        let mut expected: Vec<(&str, usize)> =
            self.opts.moments().iter().map(|&name| (name, n)).collect();
        expected.push(("step", 2));
        let b = match_state(R::NAME, state, &expected)?;
        let (step, moments) = b.split_last().expect("the step is expected");
        for (name, v) in self.opts.moments().iter().zip(moments) {
            // A second moment is a mean of squares: a negative one (an edited file) gives NaN.
            let bad = v
                .iter()
                .position(|x| !x.is_finite() || (name.ends_with("_sq") && *x < 0.0));
            if let Some(i) = bad {
                anyhow::bail!(
                    "{} state: buffer `{name}` holds {} at element {i}",
                    R::NAME,
                    v[i]
                );
            }
        }
        self.step = decode_step("step", step)?;
        self.moments = moments.iter().map(|v| host(v)).collect();
        Ok(())
    }

    fn name(&self) -> &str {
        R::NAME
    }

    fn steps(&self) -> u64 {
        self.step
    }
}
