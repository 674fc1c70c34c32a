//! ShuffleNetV2 as torchvision builds it (`shufflenet_v2_x0_5` ... `x2_0`), torchvision names:
//! conv1 (3x3 s2 + BN + ReLU), 3x3 max pool, stage2..4 of inverted residuals with channel split
//! and shuffle, conv5, global mean, fc. The block convs (depth-wise 3x3 and 1x1) can be trained
//! re-parameterized (`rep_branches`), folded back into the plain conv + BN.

use super::{pool_dropout_linear, rep_conv_bn, stem_max_pool, ModelOptions, Network};
use crate::autograd::Var;
use crate::nn::{BatchNorm2d, Builder, Conv2d, ConvBn, Ctx, Linear, RepConv, State};
use crate::ops::{self, Conv2dArgs};

const REPEATS: [usize; 3] = [4, 8, 4];
const STEM: usize = 24;

/// torchvision's InvertedResidual. Stride 2: both branches see the input,
/// branch1 = dw 3x3 s2 + BN, 1x1 + BN + ReLU. Stride 1: the input is split in halves and only
/// the second goes through branch2 = 1x1 + BN + ReLU, dw 3x3 + BN, 1x1 + BN + ReLU. Then concat and
/// channel shuffle (2 groups).
#[derive(Clone, Debug)]
pub struct ShuffleBlock {
    pub branch1: Option<[RepConv; 2]>,
    pub branch2: [RepConv; 3],
}

pub struct ShuffleNetV2 {
    pub opts: ModelOptions,
    pub state: State,
    pub stem: ConvBn,
    pub blocks: Vec<ShuffleBlock>,
    pub conv5: ConvBn,
    pub fc: Linear,
}

impl ShuffleNetV2 {
    /// `channels`: the output channels of stage2, stage3, stage4 and conv5.
    pub fn new(channels: [usize; 4], opts: &ModelOptions) -> Self {
        let form = opts.rep_form();
        let mut bld = Builder::new(opts.seed);
        let b = &mut bld;
        let conv_bn = |b: &mut Builder, p: &str, cin, cout, k, s| ConvBn {
            conv: Conv2d::new(
                b,
                &format!("{p}.0"),
                cin,
                cout,
                (k, k),
                Conv2dArgs::same(k, k, s, 1),
                false,
            ),
            bn: BatchNorm2d::new(b, &format!("{p}.1"), cout),
        };
        let stem = conv_bn(b, "conv1", 3, STEM, 3, 2);
        let mut inp = STEM;
        let mut blocks = Vec::new();
        for (si, &reps) in REPEATS.iter().enumerate() {
            let out = channels[si];
            let bf = out / 2;
            for bi in 0..reps {
                let stride = if bi == 0 { 2 } else { 1 };
                let p = format!("stage{}.{bi}", si + 2);
                // torchvision numbers the layers of each branch's Sequential, BNs included.
                let rc = |b: &mut Builder, br: usize, i: usize, cin, cout, k, s, g| {
                    rep_conv_bn(
                        b,
                        &format!("{p}.branch{br}.{i}"),
                        &format!("{p}.branch{br}.{}", i + 1),
                        cin,
                        cout,
                        k,
                        s,
                        g,
                        form,
                    )
                };
                let branch1 = (stride > 1).then(|| {
                    [
                        rc(b, 1, 0, inp, inp, 3, stride, inp),
                        rc(b, 1, 2, inp, bf, 1, 1, 1),
                    ]
                });
                let cin2 = if stride > 1 { inp } else { bf };
                let branch2 = [
                    rc(b, 2, 0, cin2, bf, 1, 1, 1),
                    rc(b, 2, 3, bf, bf, 3, stride, bf),
                    rc(b, 2, 5, bf, bf, 1, 1, 1),
                ];
                blocks.push(ShuffleBlock { branch1, branch2 });
                inp = out;
            }
        }
        let conv5 = conv_bn(b, "conv5", inp, channels[3], 1, 1);
        let fc = Linear::new(b, "fc", channels[3], opts.num_classes);
        ShuffleNetV2 {
            opts: *opts,
            state: bld.finish(),
            stem,
            blocks,
            conv5,
            fc,
        }
    }
}

impl Network for ShuffleNetV2 {
    state_field!();

    fn logits(&self, ctx: &mut Ctx, x: Var) -> Var {
        let mut h = stem_max_pool(ctx, &self.stem, x);
        for blk in &self.blocks {
            let (left, right) = match &blk.branch1 {
                Some([dw, pw]) => {
                    let mut l = dw.forward(ctx, h);
                    l = pw.forward(ctx, l);
                    (ops::relu(ctx.tape, l), h)
                }
                None => ops::split_channels(ctx.tape, h),
            };
            let [pw1, dw, pw2] = &blk.branch2;
            let mut r = pw1.forward(ctx, right);
            r = ops::relu(ctx.tape, r);
            r = dw.forward(ctx, r);
            r = pw2.forward(ctx, r);
            r = ops::relu(ctx.tape, r);
            h = ops::concat_channels(ctx.tape, left, r);
            h = ops::channel_shuffle(ctx.tape, h, 2);
        }
        h = self.conv5.forward(ctx, h);
        h = ops::relu(ctx.tape, h);
        // torchvision has no dropout here.
        pool_dropout_linear(ctx, h, 0.0, &self.fc)
    }

    fn rep_convs(&self) -> Vec<&RepConv> {
        self.blocks
            .iter()
            .flat_map(|b| b.branch1.iter().flatten().chain(b.branch2.iter()))
            .collect()
    }
}
