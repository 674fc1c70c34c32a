//! Ghost module (with DFC attention), squeeze-and-excitation and the Ghost bottleneck, as in
//! timm's `ghostnet.py`: V1 (no DFC), V2 (DFC on ghost1 past the first two blocks) and V3 (= V2
//! topology with re-parameterized convs). Spec sections 3-5.

use super::layers::{BatchNorm2d, Conv2d, Ctx, BN_EPS};
use super::params::Builder;
use super::rep_conv::{RepConv, RepForm, RepSpec};
use crate::autograd::Var;
use crate::ops::{self, Conv2dArgs};

/// DFC attention: avgpool 2x2 -> 1x1 conv+BN -> dw 1x5 conv+BN -> dw 5x1 conv+BN (`short_conv`).
/// Returns the pre-sigmoid gate at half resolution.
#[derive(Clone, Debug)]
pub struct Dfc {
    pub convs: [(Conv2d, BatchNorm2d); 3],
}

impl Dfc {
    pub fn new(b: &mut Builder, prefix: &str, inp: usize, oup: usize) -> Self {
        let p = format!("{prefix}.short_conv");
        let c0 = Conv2d::new(
            b,
            &format!("{p}.0"),
            inp,
            oup,
            (1, 1),
            Conv2dArgs::same(1, 1, 1, 1),
            false,
        );
        let b0 = BatchNorm2d::new(b, &format!("{p}.1"), oup);
        let c1 = Conv2d::new(
            b,
            &format!("{p}.2"),
            oup,
            oup,
            (1, 5),
            Conv2dArgs::same(1, 5, 1, oup),
            false,
        );
        let b1 = BatchNorm2d::new(b, &format!("{p}.3"), oup);
        let c2 = Conv2d::new(
            b,
            &format!("{p}.4"),
            oup,
            oup,
            (5, 1),
            Conv2dArgs::same(5, 1, 1, oup),
            false,
        );
        let b2 = BatchNorm2d::new(b, &format!("{p}.5"), oup);
        Dfc {
            convs: [(c0, b0), (c1, b1), (c2, b2)],
        }
    }

    pub fn forward(&self, ctx: &mut Ctx, x: Var) -> Var {
        let mut a = ops::avg_pool2x2(ctx.tape, x);
        for (conv, bn) in &self.convs {
            a = conv.forward(ctx, a);
            a = bn.forward(ctx, a);
        }
        a
    }

    /// The DFC up to its last conv (the gate before the last BN), for [`Dfc::gate`].
    fn forward_to_last_conv(&self, ctx: &mut Ctx, x: Var) -> Var {
        let mut a = ops::avg_pool2x2(ctx.tape, x);
        let [(c0, b0), (c1, b1), (c2, _)] = &self.convs;
        a = c0.forward(ctx, a);
        a = b0.forward(ctx, a);
        a = c1.forward(ctx, a);
        a = b1.forward(ctx, a);
        c2.forward(ctx, a)
    }

    /// `out * upsample(sigmoid(BN(g)))` with `g` from [`Dfc::forward_to_last_conv`] and the
    /// last BN (`ops::dfc_gate`: one fused op where the backend has it). Train mode: the BN
    /// normalizes with batch statistics and its running statistics are updated exactly as
    /// `BatchNorm2d::forward` does; eval mode: its running statistics.
    fn gate(&self, ctx: &mut Ctx, out: Var, g: Var) -> Var {
        let bn = &self.convs[2].1;
        let (gamma, beta) = (ctx.param(bn.weight), ctx.param(bn.bias));
        if ctx.train() {
            let (y, stats) =
                ops::dfc_gate(ctx.tape, (out, g), (gamma, beta), ops::DfcBn::Batch, BN_EPS);
            bn.update_running(ctx.state, &stats.expect("train-mode statistics"));
            y
        } else {
            // Views of the running statistics where the state lives, as BatchNorm2d reads them.
            let rm = ctx.state.buffers.view(bn.running_mean);
            let rv = ctx.state.buffers.view(bn.running_var);
            let bn = ops::DfcBn::Running(&rm, &rv);
            ops::dfc_gate(ctx.tape, (out, g), (gamma, beta), bn, BN_EPS).0
        }
    }
}

/// GhostModuleV3: x1 = act(primary(x)), x2 = act(cheap(x1)), out = [x1, x2], optionally gated by
/// DFC attention computed from x: out * upsample(sigmoid(dfc(x))).
#[derive(Clone, Debug)]
pub struct GhostModule {
    pub primary: RepConv,
    pub cheap: RepConv,
    pub dfc: Option<Dfc>,
    pub relu: bool,
}

impl GhostModule {
    /// `prefix` like `blocks.3.0.ghost1`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &mut Builder,
        prefix: &str,
        inp: usize,
        oup: usize,
        relu: bool,
        dfc: bool,
        form: RepForm,
    ) -> Self {
        let init = oup.div_ceil(2);
        assert_eq!(
            2 * init,
            oup,
            "{prefix}: Ghost modules here need an even output width, got {oup}"
        );
        let primary = RepConv::build(
            b,
            &RepSpec {
                train_prefix: &format!("{prefix}.primary"),
                deploy_name: &format!("{prefix}.primary_conv.0"),
                bn_name: &format!("{prefix}.primary_conv.1"),
                cin: inp,
                cout: init,
                k: 1,
                stride: 1,
                groups: 1,
            },
            // The primary conv is 1x1: no scale branch; and never an identity (inp != init).
            form,
        );
        let cheap = RepConv::build(
            b,
            &RepSpec {
                train_prefix: &format!("{prefix}.cheap"),
                deploy_name: &format!("{prefix}.cheap_operation.0"),
                bn_name: &format!("{prefix}.cheap_operation.1"),
                cin: init,
                cout: init,
                k: 3,
                stride: 1,
                groups: init,
            },
            form,
        );
        let dfc = dfc.then(|| Dfc::new(b, prefix, inp, oup));
        GhostModule {
            primary,
            cheap,
            dfc,
            relu,
        }
    }

    pub fn forward(&self, ctx: &mut Ctx, x: Var) -> Var {
        // The gate's last BN, sigmoid, upsample and product are one op (`Dfc::gate`).
        let gate = self.dfc.as_ref().map(|d| d.forward_to_last_conv(ctx, x));
        let mut x1 = self.primary.forward(ctx, x);
        if self.relu {
            x1 = ops::relu(ctx.tape, x1);
        }
        let mut x2 = self.cheap.forward(ctx, x1);
        if self.relu {
            x2 = ops::relu(ctx.tape, x2);
        }
        let out = ops::concat_channels(ctx.tape, x1, x2);
        match (gate, &self.dfc) {
            (Some(g), Some(d)) => d.gate(ctx, out, g),
            _ => out,
        }
    }
}

/// Squeeze-and-excitation with a hard-sigmoid gate (timm's SqueezeExcite as GhostNet uses it).
#[derive(Clone, Debug)]
pub struct SqueezeExcite {
    pub reduce: Conv2d,
    pub expand: Conv2d,
}

impl SqueezeExcite {
    pub fn new(b: &mut Builder, prefix: &str, c: usize, rd: usize) -> Self {
        let a = Conv2dArgs::same(1, 1, 1, 1);
        SqueezeExcite {
            reduce: Conv2d::new(b, &format!("{prefix}.conv_reduce"), c, rd, (1, 1), a, true),
            expand: Conv2d::new(b, &format!("{prefix}.conv_expand"), rd, c, (1, 1), a, true),
        }
    }

    pub fn forward(&self, ctx: &mut Ctx, x: Var) -> Var {
        let s = ops::global_avg_pool(ctx.tape, x);
        let s = self.reduce.forward(ctx, s);
        let s = ops::relu(ctx.tape, s);
        let s = self.expand.forward(ctx, s);
        let s = ops::hard_sigmoid(ctx.tape, s);
        ops::mul_channel(ctx.tape, x, s)
    }
}

/// One Ghost bottleneck's configuration (spec section 2).
#[derive(Clone, Copy, Debug)]
pub struct BottleneckCfg {
    pub inp: usize,
    pub mid: usize,
    pub out: usize,
    pub k: usize,
    pub stride: usize,
    /// SE reduced width, if the block has SE.
    pub se_rd: Option<usize>,
    pub dfc: bool,
}

#[derive(Clone, Debug)]
pub struct GhostBottleneck {
    pub ghost1: GhostModule,
    pub dw: Option<RepConv>,
    pub se: Option<SqueezeExcite>,
    pub ghost2: GhostModule,
    pub shortcut: Option<[(Conv2d, BatchNorm2d); 2]>,
}

impl GhostBottleneck {
    pub fn new(b: &mut Builder, prefix: &str, c: BottleneckCfg, form: RepForm) -> Self {
        let ghost1 = GhostModule::new(
            b,
            &format!("{prefix}.ghost1"),
            c.inp,
            c.mid,
            true,
            c.dfc,
            form,
        );
        let dw = (c.stride > 1).then(|| {
            RepConv::build(
                b,
                &RepSpec {
                    train_prefix: &format!("{prefix}.dw"),
                    deploy_name: &format!("{prefix}.conv_dw"),
                    bn_name: &format!("{prefix}.bn_dw"),
                    cin: c.mid,
                    cout: c.mid,
                    k: c.k,
                    stride: c.stride,
                    groups: c.mid,
                },
                form,
            )
        });
        let se = c
            .se_rd
            .map(|rd| SqueezeExcite::new(b, &format!("{prefix}.se"), c.mid, rd));
        let ghost2 = GhostModule::new(
            b,
            &format!("{prefix}.ghost2"),
            c.mid,
            c.out,
            false,
            false,
            form,
        );
        let shortcut = (c.inp != c.out || c.stride != 1).then(|| {
            let p = format!("{prefix}.shortcut");
            let dw_args = Conv2dArgs {
                stride: (c.stride, c.stride),
                padding: ((c.k - 1) / 2, (c.k - 1) / 2),
                groups: c.inp,
            };
            let dw = Conv2d::new(
                b,
                &format!("{p}.0"),
                c.inp,
                c.inp,
                (c.k, c.k),
                dw_args,
                false,
            );
            let bn0 = BatchNorm2d::new(b, &format!("{p}.1"), c.inp);
            let pw = Conv2d::new(
                b,
                &format!("{p}.2"),
                c.inp,
                c.out,
                (1, 1),
                Conv2dArgs::same(1, 1, 1, 1),
                false,
            );
            let bn1 = BatchNorm2d::new(b, &format!("{p}.3"), c.out);
            [(dw, bn0), (pw, bn1)]
        });
        GhostBottleneck {
            ghost1,
            dw,
            se,
            ghost2,
            shortcut,
        }
    }

    pub fn forward(&self, ctx: &mut Ctx, x: Var) -> Var {
        let mut h = self.ghost1.forward(ctx, x);
        if let Some(dw) = &self.dw {
            h = dw.forward(ctx, h);
        }
        if let Some(se) = &self.se {
            h = se.forward(ctx, h);
        }
        h = self.ghost2.forward(ctx, h);
        let sc = match &self.shortcut {
            None => x,
            Some(layers) => {
                let mut s = x;
                for (conv, bn) in layers {
                    s = conv.forward(ctx, s);
                    s = bn.forward(ctx, s);
                }
                s
            }
        };
        ops::add(ctx.tape, h, sc)
    }

    /// The re-parameterizable convs of this block in a fixed order (for folding).
    pub fn rep_convs(&self) -> Vec<&RepConv> {
        let mut v = vec![&self.ghost1.primary, &self.ghost1.cheap];
        v.extend(self.dw.as_ref());
        v.extend([&self.ghost2.primary, &self.ghost2.cheap]);
        v
    }
}
