//! conv2d: dense, grouped and depth-wise, any kernel/stride/padding, optional bias.

use crate::autograd::{Tape, Var};
use crate::backend::api::{Conv, ConvGeom};
use crate::on_backend;
use crate::tensor::storage::{ok, Place};
use crate::tensor::Elem;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dArgs {
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub groups: usize,
}

impl Conv2dArgs {
    /// Square stride, "same" padding k//2 per axis for a kh x kw kernel, given groups.
    pub fn same(kh: usize, kw: usize, stride: usize, groups: usize) -> Self {
        Conv2dArgs {
            stride: (stride, stride),
            padding: (kh / 2, kw / 2),
            groups,
        }
    }
}

/// `y = conv(x, w) + b`; x [N,C,H,W], w [C_out, C/groups, kh, kw], b [C_out].
pub fn conv2d<T: Elem>(
    tape: &mut Tape<T>,
    x: Var,
    w: Var,
    b: Option<Var>,
    args: Conv2dArgs,
) -> Var {
    let geom = ConvGeom::new(
        tape.shape(x),
        tape.shape(w),
        args.stride,
        args.padding,
        args.groups,
    )
    // Callers check inputs first (`Model::check_input_size`); reaching this is a bug.
    .unwrap_or_else(|e| panic!("conv2d: {e} (a model input below Model::min_input_size?)"));
    if let Some(b) = b {
        assert_eq!(tape.shape(b), [geom.cout], "conv2d bias shape");
    }
    let xt = tape.value(x).clone();
    let wt = tape.value(w).clone();
    let bt = b.map(|b| tape.value(b).clone());
    let out = on_backend!([&xt, &wt], |be| {
        let bias = bt.as_ref().map(|t| be.get(t));
        be.out(
            &geom.out_shape(),
            be.conv2d(&geom, &be.get(&xt), &be.get(&wt), bias.as_deref()),
        )
    });
    tape.add_macs(geom.macs());
    let mut inputs = vec![x, w];
    inputs.extend(b);
    let has_bias = b.is_some();
    let op = geom.op_name();
    tape.push(
        op,
        out,
        &inputs,
        Box::new(move |gy, needs| {
            let need = (needs[0], needs[1], has_bias && needs[2]);
            on_backend!([&xt, &wt, gy], |be| {
                let g =
                    ok(be.conv2d_backward(&geom, &be.get(&xt), &be.get(&wt), &be.get(gy), need));
                let mut r = vec![
                    g.dx.map(|d| be.wrap(xt.shape(), d)),
                    g.dw.map(|d| be.wrap(wt.shape(), d)),
                ];
                if has_bias {
                    r.push(g.db.map(|d| be.wrap(&[geom.cout], d)));
                }
                r
            })
        }),
    )
}
