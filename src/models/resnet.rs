//! ResNet-18/34/50/101 as timm builds them (`resnet18`, ...; the distillation teachers of the
//! paper's Table 3), timm names: conv1/bn1 stem, 3x3 max pool, layer1..4, fc. The block convs can
//! be trained re-parameterized (`rep_branches`), folded back into the plain conv + BN.

use super::{conv_chain, pool_dropout_linear, rep_conv_bn, stem_max_pool, ModelOptions, Network};
use crate::autograd::Var;
use crate::nn::{BatchNorm2d, Builder, Conv2d, ConvBn, Ctx, Linear, RepConv, State};
use crate::ops::{self, Conv2dArgs};

/// A BasicBlock (conv1 3x3, conv2 3x3) or Bottleneck (conv1 1x1, conv2 3x3 with the stride, conv3
/// 1x1 to 4x the width); ReLU after every BN but the last, then add the shortcut and ReLU.
#[derive(Clone, Debug)]
pub struct ResBlock {
    pub convs: Vec<RepConv>,
    /// 1x1 conv (with the stride) + BN when the shape changes (`downsample.0`, `downsample.1`).
    pub downsample: Option<ConvBn>,
}

pub struct ResNet {
    pub opts: ModelOptions,
    pub state: State,
    pub stem: ConvBn,
    pub blocks: Vec<ResBlock>,
    pub fc: Linear,
}

impl ResNet {
    pub fn new(layers: [usize; 4], bottleneck: bool, opts: &ModelOptions) -> Self {
        let form = opts.rep_form();
        let expansion = if bottleneck { 4 } else { 1 };
        let mut bld = Builder::new(opts.seed);
        let b = &mut bld;
        let stem = ConvBn {
            conv: Conv2d::new(
                b,
                "conv1",
                3,
                64,
                (7, 7),
                Conv2dArgs::same(7, 7, 2, 1),
                false,
            ),
            bn: BatchNorm2d::new(b, "bn1", 64),
        };
        let mut inp = 64;
        let mut blocks = Vec::new();
        for (li, &n) in layers.iter().enumerate() {
            let planes = 64 << li;
            let out = planes * expansion;
            for bi in 0..n {
                let stride = if bi == 0 && li > 0 { 2 } else { 1 };
                let p = format!("layer{}.{bi}", li + 1);
                let rc = |b: &mut Builder, i: usize, cin, cout, k, s| {
                    rep_conv_bn(
                        b,
                        &format!("{p}.conv{i}"),
                        &format!("{p}.bn{i}"),
                        cin,
                        cout,
                        k,
                        s,
                        1,
                        form,
                    )
                };
                let convs = if bottleneck {
                    vec![
                        rc(b, 1, inp, planes, 1, 1),
                        rc(b, 2, planes, planes, 3, stride),
                        rc(b, 3, planes, out, 1, 1),
                    ]
                } else {
                    vec![
                        rc(b, 1, inp, planes, 3, stride),
                        rc(b, 2, planes, out, 3, 1),
                    ]
                };
                let downsample = (stride != 1 || inp != out).then(|| ConvBn {
                    conv: Conv2d::new(
                        b,
                        &format!("{p}.downsample.0"),
                        inp,
                        out,
                        (1, 1),
                        Conv2dArgs::same(1, 1, stride, 1),
                        false,
                    ),
                    bn: BatchNorm2d::new(b, &format!("{p}.downsample.1"), out),
                });
                blocks.push(ResBlock { convs, downsample });
                inp = out;
            }
        }
        let fc = Linear::new(b, "fc", inp, opts.num_classes);
        ResNet {
            opts: *opts,
            state: bld.finish(),
            stem,
            blocks,
            fc,
        }
    }
}

impl Network for ResNet {
    state_field!();

    fn logits(&self, ctx: &mut Ctx, x: Var) -> Var {
        let mut h = stem_max_pool(ctx, &self.stem, x);
        for blk in &self.blocks {
            let input = h;
            h = conv_chain(ctx, &blk.convs, h, ops::relu);
            let sc = match &blk.downsample {
                Some(d) => d.forward(ctx, input),
                None => input,
            };
            h = ops::add(ctx.tape, h, sc);
            h = ops::relu(ctx.tape, h);
        }
        pool_dropout_linear(ctx, h, self.opts.drop_rate, &self.fc)
    }

    fn rep_convs(&self) -> Vec<&RepConv> {
        self.blocks.iter().flat_map(|b| b.convs.iter()).collect()
    }
}
