//! MobileNetV2 as timm builds it (`mobilenetv2_100`, `mobilenetv2_140`: efficientnet.py's
//! `_gen_mobilenet_v2`), timm names. Every conv inside the blocks (depth-wise kxk and 1x1) can be
//! trained re-parameterized (`rep_branches`), folded back into the plain conv + BN.

use super::ghostnet::make_divisible;
use super::{pool_dropout_linear, rep_conv_bn, ModelOptions, Network};
use crate::autograd::{Tape, Var};
use crate::nn::{
    BatchNorm2d, Builder, Conv2d, ConvBn, Ctx, Linear, Mode, ParamLeaves, RepConv, State,
};
use crate::ops::{self, Conv2dArgs};
use rand::rngs::StdRng;

/// (block type is inverted residual, repeats, kernel, stride, expansion, out channels) per stage.
const STAGES: [(bool, usize, usize, usize, usize, usize); 7] = [
    (false, 1, 3, 1, 1, 16),
    (true, 2, 3, 2, 6, 24),
    (true, 3, 3, 2, 6, 32),
    (true, 4, 3, 2, 6, 64),
    (true, 3, 3, 1, 6, 96),
    (true, 3, 3, 2, 6, 160),
    (true, 1, 3, 1, 6, 320),
];

/// One block: `DepthwiseSeparableConv` (conv_dw, conv_pw) or `InvertedResidual` (conv_pw,
/// conv_dw, conv_pwl), with relu6 after every BN but the last, and a skip when shapes agree.
#[derive(Clone, Debug)]
pub struct MbBlock {
    /// The convs in order; the last has no activation.
    pub convs: Vec<RepConv>,
    pub skip: bool,
}

pub struct MobileNetV2 {
    pub opts: ModelOptions,
    pub state: State,
    pub stem: ConvBn,
    pub blocks: Vec<MbBlock>,
    pub head: ConvBn,
    pub classifier: Linear,
}

impl MobileNetV2 {
    pub fn new(multiplier: f64, opts: &ModelOptions) -> Self {
        let round = |c: usize| make_divisible(c as f64 * multiplier, 8);
        let form = opts.rep_form();
        let mut bld = Builder::new(opts.seed);
        let b = &mut bld;
        let conv_bn = |b: &mut Builder, conv: &str, bn: &str, cin, cout, k, s| ConvBn {
            conv: Conv2d::new(
                b,
                conv,
                cin,
                cout,
                (k, k),
                Conv2dArgs::same(k, k, s, 1),
                false,
            ),
            bn: BatchNorm2d::new(b, bn, cout),
        };
        let stem_c = round(32);
        let stem = conv_bn(b, "conv_stem", "bn1", 3, stem_c, 3, 2);
        let mut inp = stem_c;
        let mut blocks = Vec::new();
        for (si, &(ir, reps, k, stride, exp, c)) in STAGES.iter().enumerate() {
            let out = round(c);
            for bi in 0..reps {
                let s = if bi == 0 { stride } else { 1 };
                let p = format!("blocks.{si}.{bi}");
                let rc = |b: &mut Builder, conv: &str, bn: &str, cin, cout, k, s, g| {
                    rep_conv_bn(
                        b,
                        &format!("{p}.{conv}"),
                        &format!("{p}.{bn}"),
                        cin,
                        cout,
                        k,
                        s,
                        g,
                        form,
                    )
                };
                let convs = if ir {
                    let mid = make_divisible((inp * exp) as f64, 8);
                    vec![
                        rc(b, "conv_pw", "bn1", inp, mid, 1, 1, 1),
                        rc(b, "conv_dw", "bn2", mid, mid, k, s, mid),
                        rc(b, "conv_pwl", "bn3", mid, out, 1, 1, 1),
                    ]
                } else {
                    vec![
                        rc(b, "conv_dw", "bn1", inp, inp, k, s, inp),
                        rc(b, "conv_pw", "bn2", inp, out, 1, 1, 1),
                    ]
                };
                blocks.push(MbBlock {
                    convs,
                    skip: s == 1 && inp == out,
                });
                inp = out;
            }
        }
        let feat = 1280.max(round(1280));
        let head = conv_bn(b, "conv_head", "bn2", inp, feat, 1, 1);
        let classifier = Linear::new(b, "classifier", feat, opts.num_classes);
        MobileNetV2 {
            opts: *opts,
            state: bld.finish(),
            stem,
            blocks,
            head,
            classifier,
        }
    }
}

impl Network for MobileNetV2 {
    fn state(&self) -> &State {
        &self.state
    }

    fn state_mut(&mut self) -> &mut State {
        &mut self.state
    }

    fn forward(
        &mut self,
        tape: &mut Tape<f32>,
        x: Var,
        mode: Mode,
        rng: Option<&mut StdRng>,
    ) -> (Var, ParamLeaves) {
        let mut ctx = Ctx::new(tape, &mut self.state, mode, rng);
        let mut h = self.stem.forward(&mut ctx, x);
        h = ops::relu6(ctx.tape, h);
        for blk in &self.blocks {
            let input = h;
            let last = blk.convs.len() - 1;
            for (i, c) in blk.convs.iter().enumerate() {
                h = c.forward(&mut ctx, h);
                if i < last {
                    h = ops::relu6(ctx.tape, h);
                }
            }
            if blk.skip {
                h = ops::add(ctx.tape, h, input);
            }
        }
        h = self.head.forward(&mut ctx, h);
        h = ops::relu6(ctx.tape, h);
        let logits = pool_dropout_linear(&mut ctx, h, self.opts.drop_rate, &self.classifier);
        (logits, ctx.into_leaves())
    }

    fn rep_convs(&self) -> Vec<&RepConv> {
        self.blocks.iter().flat_map(|b| b.convs.iter()).collect()
    }
}
