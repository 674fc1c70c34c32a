//! The re-parameterized conv of GhostNetV3 in training (`nn::RepConv`'s train form) as one op:
//! N kxk conv + train-mode BN branches, an optional 1x1 "scale" conv + BN branch and an optional
//! BN-only identity, summed. One fused tape entry where the backend has the fused kernels for
//! the geometry (`backend::api::{FusedRepDw, FusedRep1x1}`: depth-wise convs; 1x1 convs with
//! groups 1 and stride 1 where the backend estimates that fusing pays), else the composed ops:
//! conv2d + batch_norm_train per branch, summed in timm's order (identity, scale, then the kxk
//! branches). Either way every branch's batch statistics come back for the caller's
//! running-statistics update.

use super::{add, batch_norm_train, conv2d, Conv2dArgs};
use crate::autograd::{Tape, Var};
use crate::backend::api::{ConvGeom, FusedRep1x1, FusedRepDw, Rep1x1Geom, RepDwGeom, RepGrads};
use crate::on_backend;
use crate::tensor::storage::{ok, placement, BatchStats, Place};
use crate::tensor::{numel, Elem, Tensor};

/// The branches of a train-form re-parameterized conv.
#[derive(Clone, Copy, Debug)]
pub struct RepBranches<'a> {
    /// The kxk branch weights [Cout, Cin/groups, kh, kw] (at least one).
    pub kxk: &'a [Var],
    /// The 1x1 scale branch weight [Cout, Cin/groups, 1, 1].
    pub scale: Option<Var>,
    /// The BN-only identity branch (input and output shapes agree).
    pub identity: bool,
    /// (gamma, beta) of every branch's BN: the kxk branches, the scale, the identity.
    pub bn: &'a [(Var, Var)],
}

impl RepBranches<'_> {
    /// Number of BN branches.
    fn nbt(&self) -> usize {
        self.kxk.len() + self.scale.is_some() as usize + self.identity as usize
    }
}

/// Which fused form, if any, a backend may run.
#[derive(Clone, Copy)]
enum Fusable {
    Dw(RepDwGeom),
    /// The 1x1 form, and whether the backend's cost estimate decides (else it runs wherever the
    /// backend has the kernel).
    Pw(Rep1x1Geom, bool),
    No,
}

/// A train-mode re-parameterized conv: y = sum over the branches of BN(branch(x)), each BN on
/// its batch statistics; `args` the kxk branches' conv arguments (the scale branch: the same
/// without padding). Returns y and every branch's batch statistics in the order of `br.bn`.
pub fn rep_conv<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    br: &RepBranches,
    args: Conv2dArgs,
    eps: f64,
) -> (Var, Vec<BatchStats>) {
    assert!(!br.kxk.is_empty(), "rep_conv: needs a kxk branch");
    assert_eq!(br.bn.len(), br.nbt(), "rep_conv: one BN per branch");
    let how = fusable(tape, x, br, args, true);
    run(tape, x, br, args, how, eps)
}

/// The fused re-parameterized depth-wise conv in training: `kxk` the branch weights
/// [C, 1, kh, kw] each (padding (k-1)/2), `scale` the 1x1 branch weight [C, 1, 1, 1], `bn` the
/// (gamma, beta) of every branch (kxk branches, scale, identity); one tape entry where the
/// backend has the kernels for this geometry, else the composed branches. Returns the output and
/// each branch's batch statistics, in that order.
#[allow(clippy::too_many_arguments)]
pub fn rep_conv_dw<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    kxk: &[Var],
    scale: Option<Var>,
    identity: bool,
    bn: &[(Var, Var)],
    stride: usize,
    eps: f64,
) -> (Var, Vec<BatchStats>) {
    let c = tape.shape(x)[1];
    let ws = tape.shape(kxk[0]).to_vec();
    assert!(
        ws[0] == c && ws[1] == 1,
        "rep_conv_dw: weight {ws:?} is not depth-wise for {c} channels"
    );
    let br = RepBranches {
        kxk,
        scale,
        identity,
        bn,
    };
    assert_eq!(bn.len(), br.nbt(), "rep_conv_dw: one BN per branch");
    let args = Conv2dArgs {
        stride: (stride, stride),
        padding: ((ws[2] - 1) / 2, (ws[3] - 1) / 2),
        groups: c,
    };
    let how = fusable(tape, x, &br, args, false);
    run(tape, x, &br, args, how, eps)
}

/// The fused re-parameterized 1x1 conv in training: `ws` the branch weights [Cout, Cin, 1, 1]
/// each (groups 1, stride 1), `identity` the BN-only identity branch (Cin == Cout), `bn` the
/// (gamma, beta) of every branch (the convs, then the identity); one tape entry where the
/// backend has the kernels for this geometry (whatever its cost estimate says), else the
/// composed branches. Returns the output and each branch's batch statistics, in that order.
pub fn rep_conv_1x1<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    ws: &[Var],
    identity: bool,
    bn: &[(Var, Var)],
    eps: f64,
) -> (Var, Vec<BatchStats>) {
    let cin = tape.shape(x)[1];
    let wshape = tape.shape(ws[0]).to_vec();
    assert!(
        wshape.len() == 4 && wshape[1] == cin && wshape[2] == 1 && wshape[3] == 1,
        "rep_conv_1x1: weight {wshape:?} is not a 1x1 kernel over {cin} channels"
    );
    let br = RepBranches {
        kxk: ws,
        scale: None,
        identity,
        bn,
    };
    assert_eq!(bn.len(), br.nbt(), "rep_conv_1x1: one BN per branch");
    let args = Conv2dArgs {
        stride: (1, 1),
        padding: (0, 0),
        groups: 1,
    };
    let how = fusable(tape, x, &br, args, false);
    run(tape, x, &br, args, how, eps)
}

/// The geometry of a fused form for these shapes, if one fits: every kxk weight of one shape,
/// the scale [Cout, Cin/groups, 1, 1], every BN of Cout values; then depth-wise with "same"
/// padding and a square stride, or a 1x1 conv with groups 1 and stride 1 (no scale branch).
/// Shapes that fit neither go to the composed ops, whose checks report what is wrong.
fn fusable<T: Elem>(
    tape: &Tape<T>,
    x: Var,
    br: &RepBranches,
    args: Conv2dArgs,
    cost: bool,
) -> Fusable {
    let xs = tape.shape(x);
    let ws = tape.shape(br.kxk[0]);
    let Ok(g) = ConvGeom::new(xs, ws, args.stride, args.padding, args.groups) else {
        return Fusable::No;
    };
    let cout = g.cout;
    let scale_shape = [cout, g.cin / g.groups, 1, 1];
    let fits = br.kxk.iter().all(|&w| tape.shape(w) == ws)
        && br.scale.is_none_or(|s| tape.shape(s) == scale_shape)
        && br
            .bn
            .iter()
            .all(|&(a, b)| tape.shape(a) == [cout] && tape.shape(b) == [cout]);
    if !fits {
        return Fusable::No;
    }
    if g.is_depthwise() && g.sh == g.sw && (g.ph, g.pw) == ((g.kh - 1) / 2, (g.kw - 1) / 2) {
        return Fusable::Dw(RepDwGeom {
            n: g.n,
            c: g.cin,
            h: g.h,
            w: g.w,
            kh: g.kh,
            kw: g.kw,
            stride: g.sh,
            branches: br.kxk.len(),
            scale: br.scale.is_some(),
            identity: br.identity,
        });
    }
    if g.groups == 1 && g.is_pointwise() && br.scale.is_none() {
        let geom = Rep1x1Geom {
            n: g.n,
            cin: g.cin,
            cout,
            hw: g.h * g.w,
            branches: br.kxk.len(),
            identity: br.identity,
            chunk: 0,
        };
        return Fusable::Pw(geom, cost);
    }
    Fusable::No
}

/// Runs on the backend of every input: the fused form where it has it (and, for a 1x1 decided by
/// cost, where it pays), else the composed ops.
fn run<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    br: &RepBranches,
    args: Conv2dArgs,
    how: Fusable,
    eps: f64,
) -> (Var, Vec<BatchStats>) {
    let vars = [x]
        .into_iter()
        .chain(br.kxk.iter().copied())
        .chain(br.scale)
        .chain(br.bn.iter().flat_map(|&(g, b)| [g, b]));
    let values: Vec<&Tensor<T>> = vars.map(|v| tape.value(v)).collect();
    let device = placement(&values);
    on_backend!(device, T, |b| on(b, tape, x, br, args, how, eps))
}

/// [`run`] on backend `b`.
fn on<T: Elem, B: Place<T> + FusedRepDw<T> + FusedRep1x1<T>>(
    b: &'static B,
    tape: &mut Tape<T>,
    x: Var,
    br: &RepBranches,
    args: Conv2dArgs,
    how: Fusable,
    eps: f64,
) -> (Var, Vec<BatchStats>) {
    match how {
        Fusable::Dw(g) if b.fused_rep_dw(&g) => fused_dw(b, tape, x, br, g, eps),
        Fusable::Pw(g, cost) if b.fused_rep_1x1(&g) && (!cost || b.rep_1x1_pays(&g)) => {
            fused_1x1(b, tape, x, br, g, eps)
        }
        _ => composed(tape, x, br, args, eps),
    }
}

/// The values of the tape variables.
fn values<T: Elem>(tape: &Tape<T>, vs: &[Var]) -> Vec<Tensor<T>> {
    vs.iter().map(|&v| tape.value(v).clone()).collect()
}

/// The (gamma, beta) variables of the BNs, each list in the branches' order.
fn bn_vars(bn: &[(Var, Var)]) -> (Vec<Var>, Vec<Var>) {
    bn.iter().copied().unzip()
}

/// The tensors as this backend's buffers.
fn refs<'a, T: Elem, B: Place<T>>(b: &B, ts: &'a [Tensor<T>]) -> Vec<B::Ref<'a>> {
    ts.iter().map(|t| b.get(t)).collect()
}

/// The buffers behind `refs`.
fn bufs<'a, 'r, T: Elem + 'r, B: Place<T>>(rs: &'a [B::Ref<'r>]) -> Vec<&'a B::Buf> {
    rs.iter().map(|r| &**r).collect()
}

/// `n` tensors of `shape` viewing one stacked result, one after another (no copies).
fn split<T: Elem, B: Place<T>>(
    b: &B,
    stacked: B::Owned,
    n: usize,
    shape: &[usize],
) -> Vec<Option<Tensor<T>>> {
    let len = numel(shape);
    let all = b.wrap(&[n * len], stacked);
    (0..n).map(|i| Some(all.narrow(i * len, shape))).collect()
}

/// The tape's gradients of a fused op: x, the weights (kxk, then the scale), the gammas, the
/// betas.
fn grads<T: Elem, B: Place<T>>(
    b: &B,
    r: RepGrads<B::Owned>,
    x_shape: &[usize],
    (nb, w_shape): (usize, &[usize]),
    scale: Option<&[usize]>,
    (nbt, c): (usize, usize),
) -> Vec<Option<Tensor<T>>> {
    // Each branch's gradient is a view into the stacked result, not a copy.
    let mut res = vec![Some(b.wrap(x_shape, r.dx))];
    res.extend(split(b, r.dw, nb, w_shape));
    if let Some(s) = scale {
        res.push(r.dscale.map(|d| b.wrap(s, d)));
    }
    res.extend(split(b, r.dgamma, nbt, &[c]));
    res.extend(split(b, r.dbeta, nbt, &[c]));
    res
}

/// The fused depth-wise form on `b`.
fn fused_dw<T: Elem, B: Place<T> + FusedRepDw<T>>(
    b: &'static B,
    tape: &mut Tape<T>,
    x: Var,
    br: &RepBranches,
    g: RepDwGeom,
    eps: f64,
) -> (Var, Vec<BatchStats>) {
    let xt = tape.value(x).clone();
    let wk = values(tape, br.kxk);
    let st = br.scale.map(|s| tape.value(s).clone());
    let (gammas, betas) = bn_vars(br.bn);
    let (gt, bt) = (values(tape, &gammas), values(tape, &betas));
    let (y, saved, stats) = {
        let (wr, gr, br_) = (refs(b, &wk), refs(b, &gt), refs(b, &bt));
        let sr = st.as_ref().map(|t| b.get(t));
        ok(b.rep_dw_forward(
            &g,
            &b.get(&xt),
            &bufs::<T, B>(&wr),
            sr.as_deref(),
            &bufs::<T, B>(&gr),
            &bufs::<T, B>(&br_),
            eps,
        ))
    };
    let (ho, wo) = g.out_hw();
    let count = g.n * ho * wo;
    let stats = stats.into_iter().map(|s| b.wrap_stats(s, count)).collect();
    let mut inputs = vec![x];
    inputs.extend(br.kxk);
    inputs.extend(br.scale);
    inputs.extend(&gammas);
    inputs.extend(&betas);
    let (nb, nbt, c) = (g.branches, g.nbt(), g.c);
    let v = tape.push(
        "rep_conv_dw",
        b.wrap(&[g.n, c, ho, wo], y),
        &inputs,
        Box::new(move |gy, _| {
            let sr = st.as_ref().map(|t| b.get(t));
            let r = ok(b.rep_dw_backward(&g, &b.get(&xt), sr.as_deref(), &saved, &b.get(gy), eps));
            drop(sr);
            let scale_shape = [c, 1, 1, 1];
            let scale = st.is_some().then_some(&scale_shape[..]);
            grads(b, r, xt.shape(), (nb, &[c, 1, g.kh, g.kw]), scale, (nbt, c))
        }),
    );
    (v, stats)
}

/// The fused 1x1 form on `b`.
fn fused_1x1<T: Elem, B: Place<T> + FusedRep1x1<T>>(
    b: &'static B,
    tape: &mut Tape<T>,
    x: Var,
    br: &RepBranches,
    g: Rep1x1Geom,
    eps: f64,
) -> (Var, Vec<BatchStats>) {
    let xt = tape.value(x).clone();
    let ws = values(tape, br.kxk);
    let (gammas, betas) = bn_vars(br.bn);
    let (gt, bt) = (values(tape, &gammas), values(tape, &betas));
    let (y, saved, stats) = {
        let (wr, gr, br_) = (refs(b, &ws), refs(b, &gt), refs(b, &bt));
        ok(b.rep_1x1_forward(
            &g,
            &b.get(&xt),
            &bufs::<T, B>(&wr),
            &bufs::<T, B>(&gr),
            &bufs::<T, B>(&br_),
            eps,
        ))
    };
    let count = g.m();
    let stats = stats.into_iter().map(|s| b.wrap_stats(s, count)).collect();
    let (cin, cout) = (g.cin, g.cout);
    tape.add_macs((count * (cin * cin + cout * (cin + 1))) as u64);
    let mut inputs = vec![x];
    inputs.extend(br.kxk);
    inputs.extend(&gammas);
    inputs.extend(&betas);
    let (n, h, w) = (xt.shape()[0], xt.shape()[2], xt.shape()[3]);
    let (nb, nbt) = (g.branches, g.nbt());
    let v = tape.push(
        "rep_conv_1x1",
        b.wrap(&[n, cout, h, w], y),
        &inputs,
        Box::new(move |gy, _| {
            let r = ok(b.rep_1x1_backward(&g, &saved, &b.get(gy)));
            grads(
                b,
                r,
                xt.shape(),
                (nb, &[cout, cin, 1, 1]),
                None,
                (nbt, cout),
            )
        }),
    );
    (v, stats)
}

/// The branches as separate ops: conv2d + batch_norm_train each, summed as timm does (the
/// identity, the scale, then the kxk branches).
fn composed<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    br: &RepBranches,
    args: Conv2dArgs,
    eps: f64,
) -> (Var, Vec<BatchStats>) {
    let (nb, nbt) = (br.kxk.len(), br.nbt());
    let mut stats: Vec<Option<BatchStats>> = vec![None; nbt];
    let mut acc: Option<Var> = None;
    let mut branch = |tape: &mut Tape<T>, i: usize, z: Var| {
        let (y, s) = batch_norm_train(tape, z, br.bn[i].0, br.bn[i].1, eps);
        stats[i] = Some(s);
        acc = Some(match acc {
            None => y,
            Some(a) => add(tape, a, y),
        });
    };
    if br.identity {
        branch(tape, nbt - 1, x);
    }
    if let Some(w) = br.scale {
        let args1 = Conv2dArgs {
            padding: (0, 0),
            ..args
        };
        let z = conv2d(tape, x, w, None, args1);
        branch(tape, nb, z);
    }
    for (i, &w) in br.kxk.iter().enumerate() {
        let z = conv2d(tape, x, w, None, args);
        branch(tape, i, z);
    }
    let y = acc.expect("a rep conv has at least one branch");
    (
        y,
        stats
            .into_iter()
            .map(|s| s.expect("every branch ran"))
            .collect(),
    )
}
