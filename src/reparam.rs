//! Re-parameterization: fold a trained GhostNetV3 into its deploy form.
//!
//! Every re-parameterized conv (N kxk conv+BN branches, the 1x1 scale branch, the BN identity)
//! becomes one kxk conv with bias (`RepConv::fold`); every other tensor is copied by name. The
//! deploy form in eval mode then gives the train form's eval outputs up to float rounding.

use crate::models::ghostnet::{GhostNet, GhostNetConfig};
use crate::nn::{Conv2d, Id, RepConv};
use anyhow::{bail, Result};

pub fn fold(train: &GhostNet) -> Result<GhostNet> {
    if train.cfg.deploy {
        bail!("the model is already in deploy (folded) form");
    }
    let cfg = GhostNetConfig {
        deploy: true,
        ..train.cfg
    };
    let mut deploy = GhostNet::new(cfg, 0)?;
    let mut written = vec![false; deploy.state.params.len()];
    // Folded convs.
    type Folded = Option<(Vec<f32>, Vec<f32>)>;
    let pairs: Vec<(Folded, Conv2d)> = train
        .rep_convs()
        .into_iter()
        .zip(deploy.rep_convs())
        .map(|(t, d)| match d {
            RepConv::Deploy(conv) => (t.fold(&train.state), conv.clone()),
            RepConv::Train { .. } => unreachable!("deploy model holds train-form convs"),
        })
        .collect();
    for (folded, conv) in pairs {
        let Some((w, b)) = folded else {
            bail!("a re-parameterized conv is already folded")
        };
        let bias = conv.bias.expect("deploy conv has a bias");
        deploy
            .state
            .params
            .slice_mut(conv.weight)
            .copy_from_slice(&w);
        deploy.state.params.slice_mut(bias).copy_from_slice(&b);
        written[conv.weight.0] = true;
        written[bias.0] = true;
    }
    // Everything else keeps its name.
    for (i, _) in written.iter().enumerate().filter(|(_, w)| !**w) {
        let e = deploy.state.params.entry(Id(i)).clone();
        let Some(src) = train.state.params.find(&e.name) else {
            bail!("deploy tensor {} has no source in the train form", e.name)
        };
        let v = train.state.params.slice(src).to_vec();
        deploy.state.params.slice_mut(Id(i)).copy_from_slice(&v);
    }
    for i in 0..deploy.state.buffers.len() {
        let name = deploy.state.buffers.entry(Id(i)).name.clone();
        let Some(src) = train.state.buffers.find(&name) else {
            bail!("deploy buffer {name} has no source")
        };
        let v = train.state.buffers.slice(src).to_vec();
        deploy.state.buffers.slice_mut(Id(i)).copy_from_slice(&v);
    }
    let counts: std::collections::HashMap<&str, i64> = train
        .state
        .counters
        .iter()
        .map(|(n, c)| (n.as_str(), *c))
        .collect();
    for (name, c) in deploy.state.counters.iter_mut() {
        *c = counts.get(name.as_str()).copied().unwrap_or(0);
    }
    Ok(deploy)
}
