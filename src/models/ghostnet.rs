//! GhostNet V1/V2/V3 by config (timm `ghostnet_100`, `ghostnetv2_100`, `ghostnetv3_050`, ...).
//! GhostNetV3 comes in its re-parameterized training form or its folded deploy form (convs with
//! bias); V1/V2 in timm's plain form (conv + BN), or with the same re-parameterized branches for
//! training (`rep.branches > 0`), folded back into the plain form. Layer names and order follow
//! timm exactly (spec sections 2 and 7).

use super::Network;
use crate::autograd::{Tape, Var};
use crate::nn::ghost::{BottleneckCfg, GhostBottleneck};
use crate::nn::{
    BatchNorm2d, Builder, Conv2d, Ctx, Linear, Mode, RepConv, RepForm, RepOptions, State,
};
use crate::ops::{self, Conv2dArgs};
use crate::tensor::Tensor;
use anyhow::{bail, Result};

/// timm's make_divisible with divisor 4: round to the nearest multiple (halves up), never below
/// 4, and never more than 10% below `v`.
pub fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let mut n = (((v + d / 2.0) / d).floor() * d).max(d);
    if n < 0.9 * v {
        n += d;
    }
    n as usize
}

/// (kernel, expansion, out channels, SE ratio, stride) of one block.
type BlockArgs = (usize, usize, usize, f64, usize);

/// The blocks of each timm stage.
const STAGES: [&[BlockArgs]; 9] = [
    &[(3, 16, 16, 0.0, 1)],
    &[(3, 48, 24, 0.0, 2)],
    &[(3, 72, 24, 0.0, 1)],
    &[(5, 72, 40, 0.25, 2)],
    &[(5, 120, 40, 0.25, 1)],
    &[(3, 240, 80, 0.0, 2)],
    &[
        (3, 200, 80, 0.0, 1),
        (3, 184, 80, 0.0, 1),
        (3, 184, 80, 0.0, 1),
        (3, 480, 112, 0.25, 1),
        (3, 672, 112, 0.25, 1),
    ],
    &[(5, 672, 160, 0.25, 2)],
    &[
        (5, 960, 160, 0.0, 1),
        (5, 960, 160, 0.25, 1),
        (5, 960, 160, 0.0, 1),
        (5, 960, 160, 0.25, 1),
    ],
];

/// Which GhostNet: V1 (plain Ghost modules), V2 (+ DFC attention), V3 (V2 + re-parameterization,
/// deploy form with conv biases).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GhostVersion {
    V1,
    V2,
    #[default]
    V3,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GhostNetConfig {
    pub version: GhostVersion,
    pub width: f64,
    pub num_classes: usize,
    pub rep: RepOptions,
    /// Folded (inference) form: one conv with bias per re-parameterized conv.
    pub deploy: bool,
    /// Dropout before the classifier in training (timm default 0.2; official V3 has none).
    pub drop_rate: f64,
}

impl GhostNetConfig {
    pub fn new(width: f64, num_classes: usize) -> Self {
        GhostNetConfig {
            version: GhostVersion::V3,
            width,
            num_classes,
            rep: RepOptions::default(),
            deploy: false,
            drop_rate: 0.2,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.width > 0.0 && self.width <= 4.0) {
            bail!("width {} out of range (0, 4]", self.width);
        }
        if self.num_classes == 0 {
            bail!("num_classes must be at least 1");
        }
        // V1/V2 without branches (N = 0) is timm's plain network; V3 always has them.
        let lo = if self.version == GhostVersion::V3 {
            1
        } else {
            0
        };
        if !(lo..=5).contains(&self.rep.branches) {
            bail!(
                "rep branches N = {} out of range {lo}..=5 (the paper's Table 2)",
                self.rep.branches
            );
        }
        if !(0.0..1.0).contains(&self.drop_rate) {
            bail!("drop_rate {} not in [0, 1)", self.drop_rate);
        }
        Ok(())
    }

    /// Every block's channels, with the timm name `blocks.S.B`.
    pub fn blocks(&self) -> Vec<(String, BottleneckCfg)> {
        let w = self.width;
        let mut inp = make_divisible(16.0 * w, 4);
        let mut out = Vec::new();
        let mut layer = 0;
        for (s, stage) in STAGES.iter().enumerate() {
            for (bi, &(k, exp, c, se, stride)) in stage.iter().enumerate() {
                let mid = make_divisible(exp as f64 * w, 4);
                let oc = make_divisible(c as f64 * w, 4);
                let se_rd = (se > 0.0).then(|| make_divisible(mid as f64 * se, 4));
                out.push((
                    format!("blocks.{s}.{bi}"),
                    BottleneckCfg {
                        inp,
                        mid,
                        out: oc,
                        k,
                        stride,
                        se_rd,
                        dfc: layer > 1 && self.version != GhostVersion::V1,
                    },
                ));
                inp = oc;
                layer += 1;
            }
        }
        out
    }

    pub fn stem_channels(&self) -> usize {
        make_divisible(16.0 * self.width, 4)
    }

    pub fn final_channels(&self) -> usize {
        make_divisible(960.0 * self.width, 4)
    }

    /// The form of every re-parameterizable conv.
    pub fn rep_form(&self) -> RepForm {
        match (self.version, self.deploy) {
            (GhostVersion::V3, true) => RepForm::Deploy,
            (_, true) => RepForm::Plain,
            (_, false) if self.rep.branches == 0 => RepForm::Plain,
            (_, false) => RepForm::Train(self.rep),
        }
    }
}

pub const HEAD_CHANNELS: usize = 1280;

pub struct GhostNet {
    pub cfg: GhostNetConfig,
    pub state: State,
    pub stem: (Conv2d, BatchNorm2d),
    pub blocks: Vec<GhostBottleneck>,
    pub final_conv: (Conv2d, BatchNorm2d),
    pub conv_head: Conv2d,
    pub classifier: Linear,
}

impl GhostNet {
    /// A freshly initialized network (PyTorch default init, seeded).
    pub fn new(cfg: GhostNetConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let mut bld = Builder::new(seed);
        let b = &mut bld;
        let stem_c = cfg.stem_channels();
        let stem = (
            Conv2d::new(
                b,
                "conv_stem",
                3,
                stem_c,
                (3, 3),
                Conv2dArgs::same(3, 3, 2, 1),
                false,
            ),
            BatchNorm2d::new(b, "bn1", stem_c),
        );
        let blocks_cfg = cfg.blocks();
        let blocks = blocks_cfg
            .iter()
            .map(|(name, c)| GhostBottleneck::new(b, name, *c, cfg.rep_form()))
            .collect();
        let last = blocks_cfg.last().expect("blocks").1.out;
        let fc = cfg.final_channels();
        let final_conv = (
            Conv2d::new(
                b,
                "blocks.9.0.conv",
                last,
                fc,
                (1, 1),
                Conv2dArgs::same(1, 1, 1, 1),
                false,
            ),
            BatchNorm2d::new(b, "blocks.9.0.bn1", fc),
        );
        let conv_head = Conv2d::new(
            b,
            "conv_head",
            fc,
            HEAD_CHANNELS,
            (1, 1),
            Conv2dArgs::same(1, 1, 1, 1),
            true,
        );
        let classifier = Linear::new(b, "classifier", HEAD_CHANNELS, cfg.num_classes);
        Ok(GhostNet {
            cfg,
            state: bld.finish(),
            stem,
            blocks,
            final_conv,
            conv_head,
            classifier,
        })
    }

    /// Eval-mode logits of a batch, without recording gradients.
    pub fn predict(&mut self, x: &Tensor<f32>) -> Tensor<f32> {
        let mut tape = Tape::inference();
        let xv = tape.constant(x.clone());
        let (y, _) = self.forward(&mut tape, xv, Mode::Eval, None);
        tape.value(y).clone()
    }
}

impl Network for GhostNet {
    state_field!();

    fn logits(&self, ctx: &mut Ctx, x: Var) -> Var {
        let mut h = self.stem.0.forward(ctx, x);
        h = self.stem.1.forward(ctx, h);
        h = ops::relu(ctx.tape, h);
        for blk in &self.blocks {
            h = blk.forward(ctx, h);
        }
        h = self.final_conv.0.forward(ctx, h);
        h = self.final_conv.1.forward(ctx, h);
        h = ops::relu(ctx.tape, h);
        h = ops::global_avg_pool(ctx.tape, h);
        h = self.conv_head.forward(ctx, h);
        h = ops::relu(ctx.tape, h);
        let n = ctx.tape.shape(h)[0];
        h = ops::reshape(ctx.tape, h, &[n, HEAD_CHANNELS]);
        if let (Mode::Train { dropout: true }, Some(rng)) = (ctx.mode, ctx.rng.as_deref_mut()) {
            h = ops::dropout(ctx.tape, h, self.cfg.drop_rate, rng);
        }
        self.classifier.forward(ctx, h)
    }

    /// Every re-parameterizable conv, in a fixed order shared by the train and deploy forms.
    fn rep_convs(&self) -> Vec<&RepConv> {
        self.blocks.iter().flat_map(|b| b.rep_convs()).collect()
    }
}
