//! Model registry: one place that maps timm names to constructors, used by every command.

pub mod ghostnet;

use crate::nn::RepOptions;
use anyhow::{bail, Result};
use ghostnet::{GhostNet, GhostNetConfig};

/// The models the engine can build, by timm name, with their GhostNetV3 width.
pub const GHOSTNETV3: [(&str, f64); 4] = [
    ("ghostnetv3_050", 0.5),
    ("ghostnetv3_100", 1.0),
    ("ghostnetv3_130", 1.3),
    ("ghostnetv3_160", 1.6),
];

pub fn names() -> Vec<&'static str> {
    GHOSTNETV3.iter().map(|(n, _)| *n).collect()
}

/// How to build a model beyond its name.
#[derive(Clone, Copy, Debug)]
pub struct ModelOptions {
    pub num_classes: usize,
    pub rep: RepOptions,
    pub deploy: bool,
    pub drop_rate: f64,
    pub seed: u64,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            num_classes: 1000,
            rep: RepOptions::default(),
            deploy: false,
            drop_rate: 0.2,
            seed: 0,
        }
    }
}

pub fn create(name: &str, opts: &ModelOptions) -> Result<GhostNet> {
    let Some(&(_, width)) = GHOSTNETV3.iter().find(|(n, _)| *n == name) else {
        bail!(
            "unknown model '{name}'; known models: {}",
            names().join(", ")
        )
    };
    let cfg = GhostNetConfig {
        width,
        num_classes: opts.num_classes,
        rep: opts.rep,
        deploy: opts.deploy,
        drop_rate: opts.drop_rate,
    };
    GhostNet::new(cfg, opts.seed)
}
