//! MobileNetV2 as timm builds it (`mobilenetv2_100`, `mobilenetv2_140`: efficientnet.py's
//! `_gen_mobilenet_v2`), timm names. Every conv inside the blocks (depth-wise kxk and 1x1) can be
//! trained re-parameterized (`rep_branches`), folded back into the plain conv + BN.

use super::ghostnet::make_divisible;
use super::{conv_chain, pool_dropout_linear, rep_conv_bn, ModelOptions, Network};
use crate::autograd::Var;
use crate::nn::{BatchNorm2d, Builder, Conv2d, ConvBn, Ctx, Linear, RepConv, State};
use crate::ops::{self, Conv2dArgs};

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
    state_field!();

    fn logits(&self, ctx: &mut Ctx, x: Var) -> Var {
        let mut h = self.stem.forward(ctx, x);
        h = ops::relu6(ctx.tape, h);
        for blk in &self.blocks {
            let input = h;
            h = conv_chain(ctx, &blk.convs, h, ops::relu6);
            if blk.skip {
                h = ops::add(ctx.tape, h, input);
            }
        }
        h = self.head.forward(ctx, h);
        h = ops::relu6(ctx.tape, h);
        pool_dropout_linear(ctx, h, self.opts.drop_rate, &self.classifier)
    }

    fn rep_convs(&self) -> Vec<&RepConv> {
        self.blocks.iter().flat_map(|b| b.convs.iter()).collect()
    }
}
