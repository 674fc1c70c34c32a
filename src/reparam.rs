//! Re-parameterization: fold a model trained with branches into its deploy (or plain) form.
//!
//! Every re-parameterized conv (N kxk conv+BN branches, the 1x1 scale branch, the BN identity)
//! becomes one kxk conv with bias (`RepConv::fold`); every other tensor is copied by name. Works
//! for any registered model: the train and deploy forms list their `rep_convs()` in the same order.
//! Where the deploy form is plain conv + BN (every model but GhostNetV3), the folded kernel goes
//! into the conv and the bias into a BN that is the identity in eval mode. The deploy form in eval
//! mode then gives the train form's eval outputs up to float rounding.

use crate::models::ghostnet::{GhostNet, GhostNetConfig};
use crate::models::{self, Model, ModelOptions, Network};
use crate::nn::layers::BN_EPS;
use crate::nn::{Id, RepConv};
use anyhow::{bail, Result};

/// A network that can be folded: `Model` (any registered model) and `GhostNet` itself.
pub trait Foldable: Sized {
    /// The deploy (or plain) form with the folded weights.
    fn folded(&self) -> Result<Self>;
}

/// Folds a model trained with branches; an error if nothing is left to fold.
pub fn fold<M: Foldable>(train: &M) -> Result<M> {
    train.folded()
}

fn has_branches(n: &dyn Network) -> bool {
    n.rep_convs()
        .iter()
        .any(|r| matches!(r, RepConv::Train { .. }))
}

impl Foldable for Model {
    fn folded(&self) -> Result<Model> {
        if self.is_deploy() {
            bail!("the model is already in deploy (folded) form");
        }
        let opts = ModelOptions {
            deploy: true,
            ..self.options()
        };
        let mut deploy = models::create(self.name(), &opts)?;
        fold_into(self.network(), deploy.network_mut())?;
        Ok(deploy)
    }
}

impl Foldable for GhostNet {
    fn folded(&self) -> Result<GhostNet> {
        if !has_branches(self) {
            bail!("the model is already in deploy (folded) form");
        }
        let cfg = GhostNetConfig {
            deploy: true,
            ..self.cfg
        };
        let mut deploy = GhostNet::new(cfg, 0)?;
        fold_into(self, &mut deploy)?;
        Ok(deploy)
    }
}

/// Writes the folded weights of `train` into `deploy` (built in its deploy form).
fn fold_into(train: &dyn Network, deploy: &mut dyn Network) -> Result<()> {
    let ts = train.state();
    let mut written_p = vec![false; deploy.state().params.len()];
    let mut written_b = vec![false; deploy.state().buffers.len()];
    // (folded kernel and bias, the deploy conv or conv + BN to write them to)
    let mut pairs = Vec::new();
    let (tr, dr) = (train.rep_convs(), deploy.rep_convs());
    if tr.len() != dr.len() {
        bail!(
            "train form has {} re-parameterizable convs, deploy form {}",
            tr.len(),
            dr.len()
        );
    }
    for (t, d) in tr.into_iter().zip(dr) {
        let Some(folded) = t.fold(ts) else {
            bail!("a re-parameterized conv is already folded")
        };
        pairs.push((folded, d.clone()));
    }
    let ds = deploy.state_mut();
    for ((w, b), d) in pairs {
        match d {
            RepConv::Deploy(conv) => {
                let bias = conv.bias.expect("deploy conv has a bias");
                ds.params.slice_mut(conv.weight).copy_from_slice(&w);
                ds.params.slice_mut(bias).copy_from_slice(&b);
                written_p[conv.weight.0] = true;
                written_p[bias.0] = true;
            }
            RepConv::Plain(cb) => {
                // Eval BN y = (x - m) g / sqrt(v + eps) + b is the identity plus bias for m = 0,
                // v = 1 - eps, g = 1.
                ds.params.slice_mut(cb.conv.weight).copy_from_slice(&w);
                ds.params.slice_mut(cb.bn.bias).copy_from_slice(&b);
                ds.params.slice_mut(cb.bn.weight).fill(1.0);
                ds.buffers.slice_mut(cb.bn.running_mean).fill(0.0);
                ds.buffers
                    .slice_mut(cb.bn.running_var)
                    .fill((1.0 - BN_EPS) as f32);
                for id in [cb.conv.weight, cb.bn.weight, cb.bn.bias] {
                    written_p[id.0] = true;
                }
                for id in [cb.bn.running_mean, cb.bn.running_var] {
                    written_b[id.0] = true;
                }
            }
            RepConv::Train { .. } => bail!("the deploy form holds a train-form conv"),
        }
    }
    // Everything else keeps its name.
    for (i, _) in written_p.iter().enumerate().filter(|(_, w)| !**w) {
        let name = ds.params.entry(Id(i)).name.clone();
        let Some(src) = ts.params.find(&name) else {
            bail!("deploy tensor {name} has no source in the train form")
        };
        ds.params
            .slice_mut(Id(i))
            .copy_from_slice(ts.params.slice(src));
    }
    for (i, _) in written_b.iter().enumerate().filter(|(_, w)| !**w) {
        let name = ds.buffers.entry(Id(i)).name.clone();
        let Some(src) = ts.buffers.find(&name) else {
            bail!("deploy buffer {name} has no source")
        };
        ds.buffers
            .slice_mut(Id(i))
            .copy_from_slice(ts.buffers.slice(src));
    }
    let counts: std::collections::HashMap<&str, i64> =
        ts.counters.iter().map(|(n, c)| (n.as_str(), *c)).collect();
    for (name, c) in ds.counters.iter_mut() {
        *c = counts.get(name.as_str()).copied().unwrap_or(0);
    }
    Ok(())
}
