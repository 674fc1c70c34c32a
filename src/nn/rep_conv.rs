//! The re-parameterizable conv of GhostNetV3 (paper section 3, spec section 6).
//!
//! Training form: N kxk conv+BN branches, an optional 1x1 conv+BN "scale" branch (only when
//! k > 1) and an optional BN-only identity branch (only when C_in == C_out and stride 1), summed.
//! Deploy form: one kxk conv with bias. `fold` turns the first into the second exactly (eval-mode
//! BN), so the two give the same outputs up to float rounding.
//! Plain form: one kxk conv (no bias) + BN under the model's own names (timm/torchvision), for the
//! models that ship that way (MobileNetV2, ResNet, ShuffleNetV2, GhostNetV1/V2); a fold writes the
//! folded kernel into the conv and the bias into an identity BN.

use super::layers::{BatchNorm2d, Conv2d, ConvBn, Ctx, BN_EPS};
use super::params::{Builder, State};
use crate::autograd::Var;
use crate::ops::{self, Conv2dArgs};

/// Which branches a re-parameterized conv has in training (the paper's Table 2 knobs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RepOptions {
    /// N, the number of repeated kxk conv+BN branches (1..=5; the paper uses 3).
    pub branches: usize,
    /// The 1x1 depth-wise "scale" branch (added only where the kernel is larger than 1x1).
    pub scale: bool,
    /// The BN-only identity branch (added only where input and output shapes agree).
    pub identity: bool,
}

impl Default for RepOptions {
    fn default() -> Self {
        RepOptions {
            branches: 3,
            scale: true,
            identity: true,
        }
    }
}

impl RepOptions {
    /// The network without re-parameterization (the paper's "w/o Rep" rows).
    pub fn none() -> Self {
        RepOptions {
            branches: 1,
            scale: false,
            identity: false,
        }
    }
}

/// Where a RepConv sits and how it is named in timm.
pub struct RepSpec<'a> {
    /// Train-form prefix, e.g. `blocks.3.0.ghost1.cheap` -> `..._rpr_conv.{i}`, `..._rpr_scale`,
    /// `..._rpr_skip`.
    pub train_prefix: &'a str,
    /// Deploy-form conv name, e.g. `blocks.3.0.ghost1.cheap_operation.0` (also the conv of the
    /// plain form).
    pub deploy_name: &'a str,
    /// The BN of the plain form, e.g. `blocks.3.0.ghost1.cheap_operation.1` (unused otherwise).
    pub bn_name: &'a str,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub groups: usize,
}

#[derive(Clone, Debug)]
pub enum RepConv {
    Train {
        kxk: Vec<ConvBn>,
        scale: Option<ConvBn>,
        skip: Option<BatchNorm2d>,
        cin: usize,
        groups: usize,
    },
    Deploy(Conv2d),
    /// conv (no bias) + BN, the form of networks trained without re-parameterization.
    Plain(ConvBn),
}

/// Which form a RepConv is built in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepForm {
    /// Branches to train (re-parameterized).
    Train(RepOptions),
    /// One conv with bias (GhostNetV3's deploy form).
    Deploy,
    /// conv + BN under the plain network's names.
    Plain,
}

impl RepConv {
    pub fn new(b: &mut Builder, s: &RepSpec, opts: RepOptions, deploy: bool) -> Self {
        let form = if deploy {
            RepForm::Deploy
        } else {
            RepForm::Train(opts)
        };
        Self::build(b, s, form)
    }

    pub fn build(b: &mut Builder, s: &RepSpec, form: RepForm) -> Self {
        let args = Conv2dArgs {
            stride: (s.stride, s.stride),
            padding: ((s.k - 1) / 2, (s.k - 1) / 2),
            groups: s.groups,
        };
        let opts = match form {
            RepForm::Train(o) => o,
            RepForm::Plain => {
                return RepConv::Plain(ConvBn {
                    conv: Conv2d::new(b, s.deploy_name, s.cin, s.cout, (s.k, s.k), args, false),
                    bn: BatchNorm2d::new(b, s.bn_name, s.cout),
                })
            }
            RepForm::Deploy => {
                return RepConv::Deploy(Conv2d::new(
                    b,
                    s.deploy_name,
                    s.cin,
                    s.cout,
                    (s.k, s.k),
                    args,
                    true,
                ))
            }
        };
        assert!(
            opts.branches >= 1,
            "a RepConv needs at least one kxk branch"
        );
        let p = s.train_prefix;
        let conv_bn = |b: &mut Builder, name: String, k: usize, args: Conv2dArgs| ConvBn {
            conv: Conv2d::new(
                b,
                &format!("{name}.conv"),
                s.cin,
                s.cout,
                (k, k),
                args,
                false,
            ),
            bn: BatchNorm2d::new(b, &format!("{name}.bn1"), s.cout),
        };
        // timm registers the identity BN first, then the kxk branches, then the scale branch.
        let skip = (opts.identity && s.cin == s.cout && s.stride == 1)
            .then(|| BatchNorm2d::new(b, &format!("{p}_rpr_skip"), s.cout));
        let kxk = (0..opts.branches)
            .map(|i| conv_bn(b, format!("{p}_rpr_conv.{i}"), s.k, args))
            .collect();
        let args1 = Conv2dArgs {
            padding: (0, 0),
            ..args
        };
        let scale = (opts.scale && s.k > 1).then(|| conv_bn(b, format!("{p}_rpr_scale"), 1, args1));
        RepConv::Train {
            kxk,
            scale,
            skip,
            cin: s.cin,
            groups: s.groups,
        }
    }

    pub fn forward(&self, ctx: &mut Ctx, x: Var) -> Var {
        match self {
            RepConv::Deploy(conv) => conv.forward(ctx, x),
            RepConv::Plain(cb) => cb.forward(ctx, x),
            RepConv::Train {
                kxk, scale, skip, ..
            } if ctx.train() => {
                // One op: fused where the backend has the kernels, else the branches composed;
                // then every branch BN's running statistics.
                let ws: Vec<Var> = kxk.iter().map(|cb| ctx.param(cb.conv.weight)).collect();
                let wscale = scale.as_ref().map(|cb| ctx.param(cb.conv.weight));
                let bns: Vec<&BatchNorm2d> = kxk
                    .iter()
                    .map(|cb| &cb.bn)
                    .chain(scale.as_ref().map(|cb| &cb.bn))
                    .chain(skip.as_ref())
                    .collect();
                let bn: Vec<(Var, Var)> = bns
                    .iter()
                    .map(|b| (ctx.param(b.weight), ctx.param(b.bias)))
                    .collect();
                let branches = ops::RepBranches {
                    kxk: &ws,
                    scale: wscale,
                    identity: skip.is_some(),
                    bn: &bn,
                };
                let args = kxk[0].conv.args;
                let (y, stats) = ops::rep_conv(ctx.tape, x, &branches, args, BN_EPS);
                BatchNorm2d::update_running_all(&bns, ctx.state, &stats);
                y
            }
            RepConv::Train {
                kxk, scale, skip, ..
            } => {
                // Eval mode: the branches on the running statistics, in timm's summation order
                // (identity + scale, then the kxk branches).
                let mut acc: Option<Var> = None;
                let mut add = |ctx: &mut Ctx, y: Var| {
                    acc = Some(match acc {
                        None => y,
                        Some(a) => ops::add(ctx.tape, a, y),
                    })
                };
                if let Some(bn) = skip {
                    let y = bn.forward(ctx, x);
                    add(ctx, y);
                }
                if let Some(cb) = scale {
                    let y = cb.forward(ctx, x);
                    add(ctx, y);
                }
                for cb in kxk {
                    let y = cb.forward(ctx, x);
                    add(ctx, y);
                }
                acc.expect("a RepConv has at least one branch")
            }
        }
    }

    /// The deploy-form kernel [cout, cin/g, k, k] and bias [cout] of a train-form RepConv, from its
    /// eval-mode BN statistics (computed in f64). None for a conv already in deploy form.
    pub fn fold(&self, state: &State) -> Option<(Vec<f32>, Vec<f32>)> {
        let RepConv::Train {
            kxk,
            scale,
            skip,
            cin,
            groups,
        } = self
        else {
            return None;
        };
        let shape = &state.params.entry(kxk[0].conv.weight).shape;
        let (cout, cig, k) = (shape[0], shape[1], shape[2]);
        let kk = k * k;
        let mut w = vec![0.0f64; cout * cig * kk];
        let mut bias = vec![0.0f64; cout];
        // conv+BN: W' = t * W, b' = s with (t, s) the BN's eval affine map.
        let add_conv_bn = |cb: &ConvBn, w: &mut [f64], bias: &mut [f64]| {
            let (t, s) = cb.bn.affine(state);
            let src = state.params.slice(cb.conv.weight);
            let ks = state.params.entry(cb.conv.weight).shape[2];
            let off = (k - ks) / 2; // a 1x1 kernel lands on the centre tap
            for o in 0..cout {
                for i in 0..cig {
                    for y in 0..ks {
                        for x in 0..ks {
                            let v = src[((o * cig + i) * ks + y) * ks + x] as f64;
                            w[(o * cig + i) * kk + (y + off) * k + (x + off)] += t[o] * v;
                        }
                    }
                }
                bias[o] += s[o];
            }
        };
        for cb in kxk {
            add_conv_bn(cb, &mut w, &mut bias);
        }
        if let Some(cb) = scale {
            add_conv_bn(cb, &mut w, &mut bias);
        }
        if let Some(bn) = skip {
            // Identity kernel: I[c, c mod (C/g), centre] = 1, then folded with this BN.
            let (t, s) = bn.affine(state);
            let per_group = cin / groups;
            for c in 0..cout {
                w[(c * cig + c % per_group) * kk + (k / 2) * k + k / 2] += t[c];
                bias[c] += s[c];
            }
        }
        Some((
            w.into_iter().map(|v| v as f32).collect(),
            bias.into_iter().map(|v| v as f32).collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::Tape;
    use crate::nn::layers::Mode;
    use crate::nn::Id;
    use crate::tensor::Tensor;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// One RepConv alone: its eval output equals the folded conv's, for every kernel, stride,
    /// grouping and branch option (random weights and BN statistics).
    #[test]
    fn fold_of_one_rep_conv_is_exact() {
        let mut rng = StdRng::seed_from_u64(7);
        for (k, stride, depthwise) in [
            (1, 1, false),
            (3, 1, true),
            (5, 2, true),
            (3, 2, true),
            (3, 1, false),
        ] {
            for branches in 1..=5 {
                for (scale, identity) in
                    [(true, true), (false, false), (true, false), (false, true)]
                {
                    let c = 6;
                    let groups = if depthwise { c } else { 1 };
                    let mut b = Builder::new(rng.random());
                    let spec = RepSpec {
                        train_prefix: "x",
                        deploy_name: "y",
                        bn_name: "z",
                        cin: c,
                        cout: c,
                        k,
                        stride,
                        groups,
                    };
                    let rc = RepConv::new(
                        &mut b,
                        &spec,
                        RepOptions {
                            branches,
                            scale,
                            identity,
                        },
                        false,
                    );
                    let mut state = b.finish();
                    for i in 0..state.params.len() {
                        let v = state.params.slice_mut(Id(i));
                        v.iter_mut().for_each(|x| *x = rng.random_range(-1.0..1.0));
                    }
                    for i in 0..state.buffers.len() {
                        let mean = state.buffers.entry(Id(i)).name.ends_with("mean");
                        let v = state.buffers.slice_mut(Id(i));
                        v.iter_mut().for_each(|x| {
                            *x = if mean {
                                rng.random_range(-0.5..0.5)
                            } else {
                                rng.random_range(0.5..1.5)
                            }
                        });
                    }
                    let x = Tensor::new(
                        &[2, c, 9, 7],
                        (0..2 * c * 63)
                            .map(|_| rng.random_range(-2.0..2.0))
                            .collect(),
                    );
                    let mut tape = Tape::inference();
                    let xv = tape.constant(x);
                    let mut ctx = Ctx::new(&mut tape, &mut state, Mode::Eval, None);
                    let y = rc.forward(&mut ctx, xv);
                    let (w, bias) = rc.fold(&state).unwrap();
                    let wv = tape.constant(Tensor::new(&[c, c / groups, k, k], w));
                    let bv = tape.constant(Tensor::new(&[c], bias));
                    let pad = (k - 1) / 2;
                    let args = Conv2dArgs {
                        stride: (stride, stride),
                        padding: (pad, pad),
                        groups,
                    };
                    let yf = ops::conv2d(&mut tape, xv, wv, Some(bv), args);
                    let (a, f) = (tape.value(y), tape.value(yf));
                    let rel = f.max_abs_diff(a) / a.max_abs();
                    assert!(rel < 1e-6, "k={k} s={stride} dw={depthwise} N={branches} scale={scale} id={identity}: {rel:e}");
                }
            }
        }
    }
}
