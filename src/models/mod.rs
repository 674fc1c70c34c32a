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

/// Reads a weights file's tensor names and shapes and infers what model options it was saved
/// with: the number of classes, train or deploy form, and the re-parameterization branches.
pub fn detect_options(path: &std::path::Path) -> Result<ModelOptions> {
    use anyhow::Context;
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read weights {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let tensors = meta.tensors();
    let names: Vec<String> = tensors
        .keys()
        .filter_map(|k| crate::io::weights::canonical_name(k))
        .collect();
    let Some(cls) = tensors
        .iter()
        .find(|(k, _)| k.ends_with("classifier.weight"))
        .map(|(_, i)| i.shape.clone())
    else {
        bail!(
            "{}: no classifier.weight tensor; is this a GhostNet checkpoint?",
            path.display()
        )
    };
    let deploy = names.iter().any(|n| n.contains(".primary_conv.0.weight"));
    let branches = names
        .iter()
        .filter_map(|n| n.strip_prefix("blocks.0.0.ghost1.primary_rpr_conv."))
        .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(1, |m| m + 1);
    let rep = RepOptions {
        branches,
        scale: names.iter().any(|n| n.contains("_rpr_scale.")),
        identity: names.iter().any(|n| n.contains("_rpr_skip.")),
    };
    Ok(ModelOptions {
        num_classes: cls[0],
        rep,
        deploy,
        ..Default::default()
    })
}
