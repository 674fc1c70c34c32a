//! Lowering models into the inference IR: every BatchNorm is folded into the conv before it
//! (stem, DFC, shortcut, final 1x1 as well as the re-parameterized convs), activations are fused.
//!
//! Lowering reads only a model's pub layer structs and its `State` (flat params and buffers), so a
//! model registry can wrap `GhostNet` without touching this file.

use super::graph::{Act, ConvSpec, Graph, Op, ValueId};
use crate::models::ghostnet::GhostNet;
use crate::models::mobilenetv2::MobileNetV2;
use crate::models::shufflenetv2::ShuffleNetV2;
use crate::models::{Model, Net, Network};
use crate::nn::ghost::{GhostBottleneck, GhostModule};
use crate::nn::{BatchNorm2d, Conv2d, Linear, RepConv, State};
use anyhow::{bail, Result};

/// A conv (optionally followed by a BN, folded into it) as an IR conv with a fused activation.
pub fn conv_bn(state: &State, conv: &Conv2d, bn: Option<&BatchNorm2d>, act: Act) -> ConvSpec {
    let shape = state.params.entry(conv.weight).shape.clone();
    let (cout, cig, kh, kw) = (shape[0], shape[1], shape[2], shape[3]);
    let a = conv.args;
    assert_eq!(a.stride.0, a.stride.1, "non-square strides are not lowered");
    let mut weight: Vec<f64> = state
        .params
        .slice(conv.weight)
        .iter()
        .map(|&v| v as f64)
        .collect();
    let mut bias: Vec<f64> = match conv.bias {
        Some(b) => state.params.slice(b).iter().map(|&v| v as f64).collect(),
        None => vec![0.0; cout],
    };
    if let Some(bn) = bn {
        // BN(conv(x) + b) = t * conv(x) + (t * b + s)
        let (t, s) = bn.affine(state);
        let per = cig * kh * kw;
        for o in 0..cout {
            weight[o * per..(o + 1) * per]
                .iter_mut()
                .for_each(|w| *w *= t[o]);
            bias[o] = t[o] * bias[o] + s[o];
        }
    }
    ConvSpec {
        cin: cig * a.groups,
        cout,
        kh,
        kw,
        stride: a.stride.0,
        pad: a.padding,
        groups: a.groups,
        weight: weight.into_iter().map(|v| v as f32).collect(),
        bias: bias.into_iter().map(|v| v as f32).collect(),
        act,
    }
}

pub fn linear(state: &State, l: &Linear, act: Act) -> Op {
    let shape = &state.params.entry(l.weight).shape;
    Op::Linear {
        cin: shape[1],
        cout: shape[0],
        weight: state.params.slice(l.weight).to_vec(),
        bias: state.params.slice(l.bias).to_vec(),
        act,
    }
}

fn rep_conv(state: &State, rc: &RepConv, act: Act) -> Result<ConvSpec> {
    match rc {
        RepConv::Deploy(conv) => Ok(conv_bn(state, conv, None, act)),
        RepConv::Plain(cb) => Ok(conv_bn(state, &cb.conv, Some(&cb.bn), act)),
        RepConv::Train { .. } => bail!("lowering needs the folded (deploy) form"),
    }
}

fn ghost_module(
    g: &mut Graph,
    state: &State,
    m: &GhostModule,
    name: &str,
    x: ValueId,
) -> Result<ValueId> {
    let act = if m.relu { Act::Relu } else { Act::None };
    let x1 = g.push(
        format!("{name}.primary"),
        Op::Conv(rep_conv(state, &m.primary, act)?),
        &[x],
    );
    let x2 = g.push(
        format!("{name}.cheap"),
        Op::Conv(rep_conv(state, &m.cheap, act)?),
        &[x1],
    );
    let out = g.push(format!("{name}.concat"), Op::Concat, &[x1, x2]);
    let Some(dfc) = &m.dfc else { return Ok(out) };
    let mut a = g.push(format!("{name}.dfc.pool"), Op::AvgPool2x2, &[x]);
    for (i, (conv, bn)) in dfc.convs.iter().enumerate() {
        // The gate's sigmoid runs at half resolution, before the upsample (same values).
        let act = if i == 2 { Act::Sigmoid } else { Act::None };
        a = g.push(
            format!("{name}.dfc.conv{i}"),
            Op::Conv(conv_bn(state, conv, Some(bn), act)),
            &[a],
        );
    }
    Ok(g.push(format!("{name}.dfc.gate"), Op::UpsampleMul, &[out, a]))
}

fn bottleneck(
    g: &mut Graph,
    state: &State,
    b: &GhostBottleneck,
    name: &str,
    x: ValueId,
) -> Result<ValueId> {
    let mut h = ghost_module(g, state, &b.ghost1, &format!("{name}.ghost1"), x)?;
    if let Some(dw) = &b.dw {
        h = g.push(
            format!("{name}.conv_dw"),
            Op::Conv(rep_conv(state, dw, Act::None)?),
            &[h],
        );
    }
    if let Some(se) = &b.se {
        let p = g.push(format!("{name}.se.pool"), Op::GlobalAvgPool, &[h]);
        let r = g.push(
            format!("{name}.se.reduce"),
            Op::Conv(conv_bn(state, &se.reduce, None, Act::Relu)),
            &[p],
        );
        let e = g.push(
            format!("{name}.se.expand"),
            Op::Conv(conv_bn(state, &se.expand, None, Act::HardSigmoid)),
            &[r],
        );
        h = g.push(format!("{name}.se.scale"), Op::ChannelMul, &[h, e]);
    }
    h = ghost_module(g, state, &b.ghost2, &format!("{name}.ghost2"), h)?;
    let sc = match &b.shortcut {
        None => x,
        Some(layers) => {
            let mut s = x;
            for (i, (conv, bn)) in layers.iter().enumerate() {
                s = g.push(
                    format!("{name}.shortcut.{i}"),
                    Op::Conv(conv_bn(state, conv, Some(bn), Act::None)),
                    &[s],
                );
            }
            s
        }
    };
    Ok(g.push(format!("{name}.add"), Op::Add(Act::None), &[h, sc]))
}

fn has_branches(convs: &[&RepConv]) -> bool {
    convs.iter().any(|r| matches!(r, RepConv::Train { .. }))
}

/// Whether `lower::model` handles this architecture.
pub fn supports(m: &Model) -> bool {
    matches!(
        m.net,
        Net::GhostNet(_) | Net::MobileNetV2(_) | Net::ShuffleNetV2(_)
    )
}

/// Any supported registered model, in either form (a model trained with branches is folded
/// first). GhostNet V1/V2/V3, MobileNetV2 and ShuffleNetV2; ResNet is not lowered yet (its
/// dense 3x3 convs would need an im2col/GEMM kernel to be fast).
pub fn model(m: &Model) -> Result<Graph> {
    if has_branches(&m.rep_convs()) {
        let folded = crate::reparam::fold(m)?;
        return model(&folded);
    }
    match &m.net {
        Net::GhostNet(g) => ghostnet_deploy(g, &g.state, m.name()),
        Net::MobileNetV2(mb) => mobilenetv2(mb, &mb.state, m.name()),
        Net::ShuffleNetV2(sn) => shufflenetv2(sn, &sn.state, m.name()),
        _ => bail!(
            "{}: the fast inference path lowers GhostNet, MobileNetV2 and ShuffleNetV2 only",
            m.name()
        ),
    }
}

/// MobileNetV2 in its plain (folded) form.
pub fn mobilenetv2(net: &MobileNetV2, state: &State, name: &str) -> Result<Graph> {
    let mut g = Graph::new(name, 3);
    let mut h = g.push(
        "conv_stem",
        Op::Conv(conv_bn(
            state,
            &net.stem.conv,
            Some(&net.stem.bn),
            Act::Relu6,
        )),
        &[g.input()],
    );
    for (i, blk) in net.blocks.iter().enumerate() {
        let x = h;
        let last = blk.convs.len() - 1;
        for (j, c) in blk.convs.iter().enumerate() {
            let act = if j < last { Act::Relu6 } else { Act::None };
            h = g.push(
                format!("blocks.{i}.conv{j}"),
                Op::Conv(rep_conv(state, c, act)?),
                &[h],
            );
        }
        if blk.skip {
            h = g.push(format!("blocks.{i}.add"), Op::Add(Act::None), &[h, x]);
        }
    }
    h = g.push(
        "conv_head",
        Op::Conv(conv_bn(
            state,
            &net.head.conv,
            Some(&net.head.bn),
            Act::Relu6,
        )),
        &[h],
    );
    h = g.push("global_pool", Op::GlobalAvgPool, &[h]);
    g.push(
        "classifier",
        linear(state, &net.classifier, Act::None),
        &[h],
    );
    Ok(g)
}

/// torchvision's ShuffleNetV2 in its plain (folded) form.
pub fn shufflenetv2(net: &ShuffleNetV2, state: &State, name: &str) -> Result<Graph> {
    let mut g = Graph::new(name, 3);
    let mut h = g.push(
        "conv1",
        Op::Conv(conv_bn(
            state,
            &net.stem.conv,
            Some(&net.stem.bn),
            Act::Relu,
        )),
        &[g.input()],
    );
    h = g.push(
        "maxpool",
        Op::MaxPool {
            k: 3,
            stride: 2,
            pad: 1,
        },
        &[h],
    );
    for (i, blk) in net.blocks.iter().enumerate() {
        let p = format!("blocks.{i}");
        let c = |r: &RepConv, act| rep_conv(state, r, act);
        let (left, right) = match &blk.branch1 {
            Some([dw, pw]) => {
                let l = g.push(format!("{p}.branch1.0"), Op::Conv(c(dw, Act::None)?), &[h]);
                let l = g.push(format!("{p}.branch1.1"), Op::Conv(c(pw, Act::Relu)?), &[l]);
                (l, h)
            }
            None => {
                let ch = c(&blk.branch2[0], Act::None)?.cin;
                let l = g.push(format!("{p}.left"), Op::Slice { start: 0, len: ch }, &[h]);
                let r = g.push(format!("{p}.right"), Op::Slice { start: ch, len: ch }, &[h]);
                (l, r)
            }
        };
        let [pw1, dw, pw2] = &blk.branch2;
        let mut r = g.push(
            format!("{p}.branch2.0"),
            Op::Conv(c(pw1, Act::Relu)?),
            &[right],
        );
        r = g.push(format!("{p}.branch2.1"), Op::Conv(c(dw, Act::None)?), &[r]);
        r = g.push(format!("{p}.branch2.2"), Op::Conv(c(pw2, Act::Relu)?), &[r]);
        h = g.push(format!("{p}.concat"), Op::Concat, &[left, r]);
        h = g.push(
            format!("{p}.shuffle"),
            Op::ChannelShuffle { groups: 2 },
            &[h],
        );
    }
    h = g.push(
        "conv5",
        Op::Conv(conv_bn(
            state,
            &net.conv5.conv,
            Some(&net.conv5.bn),
            Act::Relu,
        )),
        &[h],
    );
    h = g.push("global_pool", Op::GlobalAvgPool, &[h]);
    g.push("fc", linear(state, &net.fc, Act::None), &[h]);
    Ok(g)
}

/// GhostNet in either form: the train form is folded first (`reparam::fold`).
pub fn ghostnet(net: &GhostNet, name: &str) -> Result<Graph> {
    if has_branches(&net.rep_convs()) {
        let folded = crate::reparam::fold(net)?;
        return ghostnet_deploy(&folded, &folded.state, name);
    }
    ghostnet_deploy(net, &net.state, name)
}

/// GhostNet in deploy form, from its layers and a state holding their values.
pub fn ghostnet_deploy(net: &GhostNet, state: &State, name: &str) -> Result<Graph> {
    let mut g = Graph::new(name, 3);
    let mut h = g.push(
        "conv_stem",
        Op::Conv(conv_bn(state, &net.stem.0, Some(&net.stem.1), Act::Relu)),
        &[g.input()],
    );
    let names = net.cfg.blocks();
    if names.len() != net.blocks.len() {
        bail!(
            "config lists {} blocks, the model has {}",
            names.len(),
            net.blocks.len()
        );
    }
    for ((bname, _), b) in names.iter().zip(&net.blocks) {
        h = bottleneck(&mut g, state, b, bname, h)?;
    }
    h = g.push(
        "blocks.9.0",
        Op::Conv(conv_bn(
            state,
            &net.final_conv.0,
            Some(&net.final_conv.1),
            Act::Relu,
        )),
        &[h],
    );
    h = g.push("global_pool", Op::GlobalAvgPool, &[h]);
    let head = conv_bn(state, &net.conv_head, None, Act::Relu);
    h = g.push(
        "conv_head",
        Op::Linear {
            cin: head.cin,
            cout: head.cout,
            weight: head.weight,
            bias: head.bias,
            act: Act::Relu,
        },
        &[h],
    );
    g.push(
        "classifier",
        linear(state, &net.classifier, Act::None),
        &[h],
    );
    Ok(g)
}
