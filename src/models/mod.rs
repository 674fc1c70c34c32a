//! Model registry: one table maps timm (torchvision for ShuffleNetV2) names to architectures, and
//! `Model` wraps any of them behind one interface used by every command, the trainer (student,
//! EMA and KD teacher), folding, benches and tests.
//!
//! To add a model: a row in `REGISTRY` (and, for a new family, an `Arch` variant, a `Net` variant
//! and its constructor in `create`).

/// [`Network::state`] and [`Network::state_mut`] of a network that keeps its [`State`] in its
/// field `state` (all of them; defined before the model modules so that they can use it).
macro_rules! state_field {
    () => {
        fn state(&self) -> &State {
            &self.state
        }
        fn state_mut(&mut self) -> &mut State {
            &mut self.state
        }
    };
}

pub mod ghostnet;
pub mod mobilenetv2;
pub mod resnet;
pub mod shufflenetv2;

use crate::autograd::{Tape, Var};
use crate::nn::{Ctx, Mode, ParamLeaves, RepConv, RepForm, RepOptions, State};
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use ghostnet::{GhostNet, GhostNetConfig, GhostVersion};
use mobilenetv2::MobileNetV2;
use rand::rngs::StdRng;
use resnet::ResNet;
use shufflenetv2::ShuffleNetV2;

/// The architecture (and its size knob) behind a registered name.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arch {
    /// GhostNet V1/V2/V3 at a width multiplier.
    GhostNet(GhostVersion, f64),
    /// timm's MobileNetV2 at a channel multiplier.
    MobileNetV2(f64),
    /// torchvision's ShuffleNetV2: stage output channels [stage2, stage3, stage4, conv5].
    ShuffleNetV2([usize; 4]),
    /// timm's ResNet: blocks per stage, bottleneck (expansion 4) or basic blocks.
    ResNet([usize; 4], bool),
}

/// One registered model.
#[derive(Clone, Copy, Debug)]
pub struct ModelInfo {
    pub name: &'static str,
    pub arch: Arch,
    /// Whose parameter names the model uses.
    pub names_from: &'static str,
}

const fn entry(name: &'static str, arch: Arch, names_from: &'static str) -> ModelInfo {
    ModelInfo {
        name,
        arch,
        names_from,
    }
}

/// torchvision's ShuffleNetV2 of stage output channels `c`.
const fn shufflenet(name: &'static str, c: [usize; 4]) -> ModelInfo {
    entry(name, Arch::ShuffleNetV2(c), "torchvision")
}

use GhostVersion::{V1, V2, V3};

/// Every model the engine builds. The single place to add one.
pub const REGISTRY: &[ModelInfo] = &[
    entry("ghostnetv3_050", Arch::GhostNet(V3, 0.5), "timm"),
    entry("ghostnetv3_100", Arch::GhostNet(V3, 1.0), "timm"),
    entry("ghostnetv3_130", Arch::GhostNet(V3, 1.3), "timm"),
    entry("ghostnetv3_160", Arch::GhostNet(V3, 1.6), "timm"),
    entry("ghostnet_050", Arch::GhostNet(V1, 0.5), "timm"),
    entry("ghostnet_100", Arch::GhostNet(V1, 1.0), "timm"),
    entry("ghostnet_130", Arch::GhostNet(V1, 1.3), "timm"),
    entry("ghostnetv2_100", Arch::GhostNet(V2, 1.0), "timm"),
    entry("ghostnetv2_130", Arch::GhostNet(V2, 1.3), "timm"),
    entry("ghostnetv2_160", Arch::GhostNet(V2, 1.6), "timm"),
    entry("mobilenetv2_100", Arch::MobileNetV2(1.0), "timm"),
    entry("mobilenetv2_140", Arch::MobileNetV2(1.4), "timm"),
    shufflenet("shufflenet_v2_x0_5", [48, 96, 192, 1024]),
    shufflenet("shufflenet_v2_x1_0", [116, 232, 464, 1024]),
    shufflenet("shufflenet_v2_x1_5", [176, 352, 704, 1024]),
    shufflenet("shufflenet_v2_x2_0", [244, 488, 976, 2048]),
    entry("resnet18", Arch::ResNet([2, 2, 2, 2], false), "timm"),
    entry("resnet34", Arch::ResNet([3, 4, 6, 3], false), "timm"),
    entry("resnet50", Arch::ResNet([3, 4, 6, 3], true), "timm"),
    entry("resnet101", Arch::ResNet([3, 4, 23, 3], true), "timm"),
];

/// The GhostNetV3 models by timm name, with their width (kept for older callers).
pub const GHOSTNETV3: [(&str, f64); 4] = [
    ("ghostnetv3_050", 0.5),
    ("ghostnetv3_100", 1.0),
    ("ghostnetv3_130", 1.3),
    ("ghostnetv3_160", 1.6),
];

pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|m| m.name).collect()
}

pub fn lookup(name: &str) -> Result<&'static ModelInfo> {
    match REGISTRY.iter().find(|m| m.name == name) {
        Some(m) => Ok(m),
        None => bail!(
            "unknown model '{name}'; known models: {}",
            names().join(", ")
        ),
    }
}

/// How to build a model beyond its name.
#[derive(Clone, Copy, Debug)]
pub struct ModelOptions {
    pub num_classes: usize,
    /// The training branches of every re-parameterizable conv (`rep_branches = N`). For models
    /// other than GhostNetV3, N = 0 builds the plain network.
    pub rep: RepOptions,
    /// The folded form: GhostNetV3's deploy form, the plain (conv + BN) form of the others.
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

impl ModelOptions {
    /// The form of the re-parameterizable convs of a model that is not GhostNetV3.
    pub fn rep_form(&self) -> RepForm {
        if self.deploy || self.rep.branches == 0 {
            RepForm::Plain
        } else {
            RepForm::Train(self.rep)
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.num_classes == 0 {
            bail!("num_classes must be at least 1");
        }
        if self.rep.branches > 5 {
            bail!(
                "rep branches N = {} out of range 0..=5 (the paper's Table 2)",
                self.rep.branches
            );
        }
        if !(0.0..1.0).contains(&self.drop_rate) {
            bail!("drop_rate {} not in [0, 1)", self.drop_rate);
        }
        Ok(())
    }
}

/// What every network implements.
pub trait Network {
    fn state(&self) -> &State;
    fn state_mut(&mut self) -> &mut State;
    /// The logits [N, classes] of x [N, 3, H, W], the parameters and running statistics read
    /// (and in train mode, the statistics updated) through `ctx`.
    fn logits(&self, ctx: &mut Ctx, x: Var) -> Var;
    /// Every re-parameterizable conv, in an order shared by all forms of the network.
    fn rep_convs(&self) -> Vec<&RepConv>;

    /// Logits [N, classes] of x [N, 3, H, W] and the parameter leaves (for gradients). Train mode
    /// updates the BN running statistics; dropout draws from `rng` when given.
    fn forward(
        &mut self,
        tape: &mut Tape<f32>,
        x: Var,
        mode: Mode,
        rng: Option<&mut StdRng>,
    ) -> (Var, ParamLeaves) {
        // The pass reads the layers while it writes the state: the state is lent to it (moved
        // out and back, no copy).
        let mut state = std::mem::take(self.state_mut());
        let mut ctx = Ctx::new(tape, &mut state, mode, rng);
        let logits = self.logits(&mut ctx, x);
        let leaves = ctx.into_leaves();
        *self.state_mut() = state;
        (logits, leaves)
    }
}

/// A network of any registered architecture.
pub enum Net {
    GhostNet(GhostNet),
    MobileNetV2(MobileNetV2),
    ShuffleNetV2(ShuffleNetV2),
    ResNet(ResNet),
}

/// A built model: its registry name, the options it was built with, and the network.
pub struct Model {
    pub info: &'static ModelInfo,
    pub opts: ModelOptions,
    pub net: Net,
}

impl Model {
    pub fn name(&self) -> &'static str {
        self.info.name
    }

    pub fn options(&self) -> ModelOptions {
        self.opts
    }

    pub fn num_classes(&self) -> usize {
        self.opts.num_classes
    }

    /// The smallest square input the network runs on: GhostNet V2/V3's DFC attention pools its
    /// stride-32 maps 2x2, so they must be at least 2x2 (33 px and up).
    pub fn min_input_size(&self) -> usize {
        match self.info.arch {
            Arch::GhostNet(GhostVersion::V2 | GhostVersion::V3, _) => 33,
            _ => 1,
        }
    }

    pub fn network(&self) -> &dyn Network {
        match &self.net {
            Net::GhostNet(m) => m,
            Net::MobileNetV2(m) => m,
            Net::ShuffleNetV2(m) => m,
            Net::ResNet(m) => m,
        }
    }

    pub fn network_mut(&mut self) -> &mut dyn Network {
        match &mut self.net {
            Net::GhostNet(m) => m,
            Net::MobileNetV2(m) => m,
            Net::ShuffleNetV2(m) => m,
            Net::ResNet(m) => m,
        }
    }

    pub fn state(&self) -> &State {
        self.network().state()
    }

    pub fn state_mut(&mut self) -> &mut State {
        self.network_mut().state_mut()
    }

    pub fn forward(
        &mut self,
        tape: &mut Tape<f32>,
        x: Var,
        mode: Mode,
        rng: Option<&mut StdRng>,
    ) -> (Var, ParamLeaves) {
        self.network_mut().forward(tape, x, mode, rng)
    }

    /// Eval-mode logits of a batch, without recording gradients.
    pub fn predict(&mut self, x: &Tensor<f32>) -> Tensor<f32> {
        let mut tape = Tape::inference();
        let xv = tape.constant(x.clone());
        let (y, _) = self.forward(&mut tape, xv, Mode::Eval, None);
        tape.value(y).clone()
    }

    pub fn rep_convs(&self) -> Vec<&RepConv> {
        self.network().rep_convs()
    }

    /// True when no conv has training branches left (deploy or plain form): nothing to fold.
    pub fn is_deploy(&self) -> bool {
        !self
            .rep_convs()
            .iter()
            .any(|r| matches!(r, RepConv::Train { .. }))
    }

    /// A short description of the form, for logs.
    pub fn form(&self) -> String {
        if self.is_deploy() {
            match self.rep_convs().first() {
                Some(RepConv::Deploy(_)) => "deploy form".into(),
                _ => "plain form".into(),
            }
        } else {
            let r = self.opts.rep;
            format!(
                "train form (N={}, scale={}, identity={})",
                r.branches, r.scale, r.identity
            )
        }
    }

    pub fn ghostnet(&self) -> Option<&GhostNet> {
        match &self.net {
            Net::GhostNet(g) => Some(g),
            _ => None,
        }
    }

    pub fn into_ghostnet(self) -> Option<GhostNet> {
        match self.net {
            Net::GhostNet(g) => Some(g),
            _ => None,
        }
    }
}

/// Builds a registered model (freshly initialized, PyTorch default init, seeded).
pub fn create(name: &str, opts: &ModelOptions) -> Result<Model> {
    let info = lookup(name)?;
    if !matches!(info.arch, Arch::GhostNet(..)) {
        opts.validate()?; // GhostNetConfig::validate checks GhostNets (V3 needs N >= 1)
    }
    let net = match info.arch {
        Arch::GhostNet(version, width) => {
            let cfg = GhostNetConfig {
                version,
                width,
                num_classes: opts.num_classes,
                rep: opts.rep,
                deploy: opts.deploy,
                drop_rate: opts.drop_rate,
            };
            Net::GhostNet(GhostNet::new(cfg, opts.seed)?)
        }
        Arch::MobileNetV2(w) => Net::MobileNetV2(MobileNetV2::new(w, opts)),
        Arch::ShuffleNetV2(ch) => Net::ShuffleNetV2(ShuffleNetV2::new(ch, opts)),
        Arch::ResNet(layers, bottleneck) => Net::ResNet(ResNet::new(layers, bottleneck, opts)),
    };
    Ok(Model {
        info,
        opts: *opts,
        net,
    })
}

/// A GhostNet model as its concrete struct (for code that walks GhostNet's layers).
pub fn create_ghostnet(name: &str, opts: &ModelOptions) -> Result<GhostNet> {
    match create(name, opts)?.into_ghostnet() {
        Some(g) => Ok(g),
        None => bail!("{name} is not a GhostNet"),
    }
}

/// Reads a weights file's tensor names and shapes and infers what model options it was saved
/// with: the number of classes, train or folded form, and the re-parameterization branches.
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
    // timm's GhostNet and MobileNetV2 call the last layer `classifier`, ResNet and torchvision `fc`.
    let Some(cls) = tensors
        .iter()
        .find(|(k, _)| {
            crate::io::weights::canonical_name(k)
                .is_some_and(|n| n == "classifier.weight" || n == "fc.weight")
        })
        .map(|(_, i)| i.shape.clone())
    else {
        bail!(
            "{}: no classifier.weight or fc.weight tensor; is this a model checkpoint?",
            path.display()
        )
    };
    let branch = |n: &String| -> Option<usize> {
        let (_, rest) = n.split_once("_rpr_conv.")?;
        rest.split('.').next()?.parse::<usize>().ok()
    };
    let deploy = !names.iter().any(|n| n.contains("_rpr_"));
    let branches = names.iter().filter_map(branch).max().map_or(1, |m| m + 1);
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

/// A conv+BN that can be re-parameterized, named as in the plain network (`conv`, `bn`); the
/// training branches go under `<conv>_rpr_*`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rep_conv_bn(
    b: &mut crate::nn::Builder,
    conv: &str,
    bn: &str,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    groups: usize,
    form: RepForm,
) -> RepConv {
    RepConv::build(
        b,
        &crate::nn::rep_conv::RepSpec {
            train_prefix: conv,
            deploy_name: conv,
            bn_name: bn,
            cin,
            cout,
            k,
            stride,
            groups,
        },
        form,
    )
}

/// The convs of a block one after another, with `act` between them (not after the last).
pub(crate) fn conv_chain(
    ctx: &mut crate::nn::Ctx,
    convs: &[RepConv],
    mut h: Var,
    act: fn(&mut Tape<f32>, Var) -> Var,
) -> Var {
    for (i, c) in convs.iter().enumerate() {
        if i > 0 {
            h = act(ctx.tape, h);
        }
        h = c.forward(ctx, h);
    }
    h
}

/// The conv-BN-ReLU stem and its 3x3 stride-2 max pool (torchvision's ResNet and ShuffleNetV2).
pub(crate) fn stem_max_pool(ctx: &mut crate::nn::Ctx, stem: &crate::nn::ConvBn, x: Var) -> Var {
    use crate::ops;
    let h = stem.forward(ctx, x);
    let h = ops::relu(ctx.tape, h);
    ops::max_pool2d(ctx.tape, h, 3, 2, 1)
}

/// Global average pool, flatten, dropout in training, classifier: the head most models share.
pub(crate) fn pool_dropout_linear(
    ctx: &mut crate::nn::Ctx,
    h: Var,
    drop_rate: f64,
    classifier: &crate::nn::Linear,
) -> Var {
    use crate::ops;
    let mut h = ops::global_avg_pool(ctx.tape, h);
    let (n, c) = (ctx.tape.shape(h)[0], ctx.tape.shape(h)[1]);
    h = ops::reshape(ctx.tape, h, &[n, c]);
    if drop_rate > 0.0 {
        if let (Mode::Train { dropout: true }, Some(rng)) = (ctx.mode, ctx.rng.as_deref_mut()) {
            h = ops::dropout(ctx.tape, h, drop_rate, rng);
        }
    }
    classifier.forward(ctx, h)
}
