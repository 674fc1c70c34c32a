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

/// The largest input side (px) any command or recipe takes. Past it one activation of one
/// image is gigabytes (GhostNetV3-1.0x's widest layer holds 12 values per input pixel, its
/// train-form pass about 900), and a typo like `--size 100000` would ask for terabytes.
pub const MAX_INPUT_SIZE: usize = 4096;

/// The most classes a model may have (ImageNet-21k has 21,843).
pub const MAX_CLASSES: usize = 100_000;

/// Which way a batch goes through a model, for [`Model::check_run`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// The engine's tape in eval mode (`predict`, `evaluate`): every activation is kept.
    Tape,
    /// A train-mode pass with backward: the activations and their gradients.
    TapeTrain,
    /// The fast inference path (`infer::Engine`): activation arenas reused layer to layer.
    Engine,
}

impl Pass {
    fn describe(self) -> &'static str {
        match self {
            Pass::Tape => "the tape, eval mode",
            Pass::TapeTrain => "the tape, forward and backward",
            Pass::Engine => "the fast path",
        }
    }
}

/// What a forward pass of one image holds, per input pixel ([`Model::footprint`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Footprint {
    /// Values of all activations of the pass (a tape keeps every one until it is dropped).
    pub tape_values_per_pixel: f64,
    /// Values of the widest single activation.
    pub widest_values_per_pixel: f64,
}

impl Footprint {
    /// Bytes (f32) of a tape pass over `batch` images of `h` x `w` px, the input included;
    /// `train` counts as much again for the gradients of the backward.
    pub fn tape_bytes(&self, batch: usize, h: usize, w: usize, train: bool) -> f64 {
        let px = batch as f64 * h as f64 * w as f64;
        let values = px * (3.0 + self.tape_values_per_pixel);
        4.0 * values * if train { 2.0 } else { 1.0 }
    }

    /// Bytes (f32) of the fast path over `batch` images: the input batch and, per image, about
    /// three of its widest activations (the live values of its arena).
    pub fn engine_bytes(&self, batch: usize, h: usize, w: usize) -> f64 {
        let px = batch as f64 * h as f64 * w as f64;
        4.0 * px * (3.0 + 3.0 * self.widest_values_per_pixel)
    }
}

/// The memory this process can still allocate: Linux's `MemAvailable` (None elsewhere).
pub fn available_memory_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Refuses `what` when its estimated `bytes` exceed the memory available (an allocation that
/// large would abort the process or bring in the OOM killer instead of a clear error).
pub fn check_memory(what: &str, bytes: f64) -> Result<()> {
    if let Some(avail) = available_memory_bytes() {
        if bytes.is_nan() || bytes > avail as f64 {
            bail!(
                "{what} needs about {:.1} GB of memory, more than the {:.1} GB available; use a \
                 smaller batch or input size",
                bytes / 1e9,
                avail as f64 / 1e9
            );
        }
    }
    Ok(())
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

    /// Checks an input of `h` x `w` px against [`Model::min_input_size`] and
    /// [`MAX_INPUT_SIZE`]; `what` names the value in the message (`--size 8`, `input 1x1`).
    pub fn check_input_size(&self, what: &str, h: usize, w: usize) -> Result<()> {
        let min = self.min_input_size();
        if h.min(w) < min {
            bail!(
                "{what} is too small for {}: it needs inputs of at least {min}x{min} px",
                self.name()
            );
        }
        if h.max(w) > MAX_INPUT_SIZE {
            bail!("{what} is too large: inputs are at most {MAX_INPUT_SIZE}x{MAX_INPUT_SIZE} px");
        }
        Ok(())
    }

    /// Parameters (trainable, BN affine included, buffers excluded) and MACs of one image at
    /// `size` x `size`, counted by an eval-mode pass on the tape.
    pub fn params_and_macs(&mut self, size: usize) -> (u64, u64) {
        let mut tape = Tape::inference();
        let x = tape.constant(Tensor::zeros(&[1, 3, size, size]));
        self.forward(&mut tape, x, Mode::Eval, None);
        (self.state().params.numel() as u64, tape.macs())
    }

    /// What a forward pass holds per input pixel, measured by one eval-mode pass of two images
    /// at the smallest multiple of 32 px the model takes (32 or 64: every stride divides it, so
    /// the figures scale with the pixel count; other sizes round their maps up a little).
    pub fn footprint(&mut self) -> Footprint {
        const PROBE_BATCH: usize = 2;
        let p = self.min_input_size().max(32).next_multiple_of(32);
        let mut tape = Tape::inference();
        let x = tape.constant(Tensor::zeros(&[PROBE_BATCH, 3, p, p]));
        self.forward(&mut tape, x, Mode::Eval, None);
        let (mut total, mut widest) = (0usize, 0usize);
        for i in 0..tape.len() {
            let s = tape.shape(Var(i));
            // Activations are [batch, C, H, W]; parameters and the logits are not counted.
            if s.len() == 4 && s[0] == PROBE_BATCH {
                let n: usize = s.iter().product();
                total += n;
                widest = widest.max(n);
            }
        }
        let px = (PROBE_BATCH * p * p) as f64;
        Footprint {
            tape_values_per_pixel: total as f64 / px,
            widest_values_per_pixel: widest as f64 / px,
        }
    }

    /// Checks that `batch` inputs of `h` x `w` px can run on this model: the input size
    /// ([`Model::check_input_size`]) and the memory the pass needs (estimated from
    /// [`Model::footprint`], against the memory available; skipped where that is unknown).
    pub fn check_run(
        &mut self,
        what: &str,
        batch: usize,
        h: usize,
        w: usize,
        pass: Pass,
    ) -> Result<()> {
        self.check_input_size(what, h, w)?;
        if batch == 0 {
            bail!("{what}: the batch is empty");
        }
        let f = self.footprint();
        let bytes = match pass {
            Pass::Tape => f.tape_bytes(batch, h, w, false),
            Pass::TapeTrain => f.tape_bytes(batch, h, w, true),
            Pass::Engine => f.engine_bytes(batch, h, w),
        };
        check_memory(
            &format!(
                "a batch of {batch} at {h}x{w} through {} ({})",
                self.name(),
                pass.describe()
            ),
            bytes,
        )
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
    if opts.num_classes > MAX_CLASSES {
        bail!(
            "{} classes is too many: at most {MAX_CLASSES} (the classifier alone would need \
             gigabytes)",
            opts.num_classes
        );
    }
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
    let (_, meta) = crate::io::weights::read_header(&bytes, &path.display().to_string())?;
    let tensors = meta.tensors();
    let names: Vec<String> = tensors
        .keys()
        .filter_map(|k| crate::io::weights::canonical_name(k))
        .collect();
    // timm's GhostNet and MobileNetV2 call the last layer `classifier`, ResNet and torchvision `fc`.
    let Some((cls_name, cls)) = tensors
        .iter()
        .find(|(k, _)| {
            crate::io::weights::canonical_name(k)
                .is_some_and(|n| n == "classifier.weight" || n == "fc.weight")
        })
        .map(|(k, i)| (k.to_string(), i.shape.clone()))
    else {
        bail!(
            "{}: no classifier.weight or fc.weight tensor; is this a model checkpoint?",
            path.display()
        )
    };
    if cls.len() != 2 || cls[0] == 0 {
        bail!(
            "{}: {cls_name} has shape {cls:?}; a classifier weight is [classes, features] with \
             at least one class",
            path.display()
        );
    }
    // The largest branch index: N = index + 1 branches, at most 5 (the paper's Table 2).
    let mut max_branch: Option<usize> = None;
    for n in &names {
        let Some((_, rest)) = n.split_once("_rpr_conv.") else {
            continue;
        };
        let idx = rest.split('.').next().unwrap_or("");
        if idx.is_empty() || !idx.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let i = idx.parse::<usize>().unwrap_or(usize::MAX);
        if i >= 5 {
            bail!(
                "{}: tensor {n} has branch index {idx}; re-parameterized convs have at most 5 \
                 branches (N = 1..=5, indices 0..=4)",
                path.display()
            );
        }
        max_branch = max_branch.max(Some(i));
    }
    let deploy = !names.iter().any(|n| n.contains("_rpr_"));
    let branches = max_branch.map_or(1, |m| m + 1);
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
