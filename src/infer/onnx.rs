//! ONNX export of an inference graph (opset 13, standard ops only), with a small hand-written
//! protobuf encoder for the few ONNX messages needed (no protoc, no generated code).
//!
//! Mapping: Conv (+ Relu / Clip / Sigmoid / HardSigmoid), Add, Concat, AveragePool, MaxPool,
//! GlobalAveragePool, the DFC gate as Shape + Resize (nearest, asymmetric, floor: PyTorch's legacy
//! nearest) + Mul, the SE scale as a broadcast Mul, Linear as Flatten + Gemm. The batch dimension
//! is symbolic (`batch`); the spatial size is fixed at export.

use super::graph::{Act, Graph, Op, ValueId};
use anyhow::{bail, Result};

/// Protobuf message under construction (fields appended in any order).
#[derive(Default)]
struct Pb(Vec<u8>);

impl Pb {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn key(&mut self, field: u32, wire: u32) {
        self.varint(((field << 3) | wire) as u64);
    }
    fn int(&mut self, field: u32, v: i64) -> &mut Self {
        self.key(field, 0);
        self.varint(v as u64);
        self
    }
    fn bytes(&mut self, field: u32, b: &[u8]) -> &mut Self {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }
    fn str(&mut self, field: u32, s: &str) -> &mut Self {
        self.bytes(field, s.as_bytes())
    }
    fn msg(&mut self, field: u32, m: &Pb) -> &mut Self {
        self.bytes(field, &m.0)
    }
    fn float(&mut self, field: u32, v: f32) -> &mut Self {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

// onnx.proto field numbers and enums.
const ATTR_FLOAT: i64 = 1;
const ATTR_INT: i64 = 2;
const ATTR_STRING: i64 = 3;
const ATTR_INTS: i64 = 7;
const DT_FLOAT: i64 = 1;
const DT_INT64: i64 = 7;

enum Attr<'a> {
    Int(i64),
    Ints(&'a [i64]),
    Float(f32),
    Str(&'a str),
}

struct Builder {
    nodes: Vec<Pb>,
    inits: Vec<Pb>,
    count: usize,
}

impl Builder {
    fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: &[(&str, Attr)],
    ) {
        let mut n = Pb::default();
        for i in inputs {
            n.str(1, i);
        }
        for o in outputs {
            n.str(2, o);
        }
        n.str(3, name).str(4, op);
        for (an, a) in attrs {
            let mut m = Pb::default();
            m.str(1, an);
            match a {
                Attr::Int(v) => {
                    m.int(3, *v).int(20, ATTR_INT);
                }
                Attr::Ints(vs) => {
                    for v in *vs {
                        m.int(8, *v);
                    }
                    m.int(20, ATTR_INTS);
                }
                Attr::Float(v) => {
                    m.float(2, *v).int(20, ATTR_FLOAT);
                }
                Attr::Str(s) => {
                    m.str(4, s).int(20, ATTR_STRING);
                }
            }
            n.msg(5, &m);
        }
        self.nodes.push(n);
    }

    fn tensor_f32(&mut self, name: &str, dims: &[usize], data: &[f32]) {
        let mut t = Pb::default();
        for &d in dims {
            t.int(1, d as i64);
        }
        t.int(2, DT_FLOAT).str(8, name);
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        t.bytes(9, &raw);
        self.inits.push(t);
    }

    fn tensor_i64(&mut self, name: &str, data: &[i64]) {
        let mut t = Pb::default();
        t.int(1, data.len() as i64).int(2, DT_INT64).str(8, name);
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        t.bytes(9, &raw);
        self.inits.push(t);
    }

    fn tmp(&mut self, base: &str) -> String {
        self.count += 1;
        format!("{base}.t{}", self.count)
    }

    /// Appends the activation node from `x` to `out` (or an Identity when none).
    fn act(&mut self, act: Act, name: &str, x: &str, out: &str) {
        match act {
            Act::None => self.node("Identity", name, &[x], &[out], &[]),
            Act::Relu => self.node("Relu", name, &[x], &[out], &[]),
            Act::Sigmoid => self.node("Sigmoid", name, &[x], &[out], &[]),
            Act::HardSigmoid => self.node(
                "HardSigmoid",
                name,
                &[x],
                &[out],
                &[
                    ("alpha", Attr::Float(1.0 / 6.0)),
                    ("beta", Attr::Float(0.5)),
                ],
            ),
            Act::Relu6 => {
                let (lo, hi) = (format!("{name}.min"), format!("{name}.max"));
                let mut t = Pb::default();
                t.int(2, DT_FLOAT).str(8, &lo).bytes(9, &0f32.to_le_bytes());
                self.inits.push(t);
                let mut t = Pb::default();
                t.int(2, DT_FLOAT).str(8, &hi).bytes(9, &6f32.to_le_bytes());
                self.inits.push(t);
                self.node("Clip", name, &[x, &lo, &hi], &[out], &[])
            }
        }
    }
}

fn value_info(name: &str, dims: &[Result<usize, &str>]) -> Pb {
    let mut shape = Pb::default();
    for d in dims {
        let mut dim = Pb::default();
        match d {
            Ok(v) => dim.int(1, *v as i64),
            Err(p) => dim.str(2, p),
        };
        shape.msg(1, &dim);
    }
    let mut tt = Pb::default();
    tt.int(1, DT_FLOAT).msg(2, &shape);
    let mut ty = Pb::default();
    ty.msg(1, &tt);
    let mut vi = Pb::default();
    vi.str(1, name).msg(2, &ty);
    vi
}

/// The ONNX model (serialized ModelProto) of `g` for inputs [batch, C, h, w].
pub fn export(g: &Graph, h: usize, w: usize) -> Result<Vec<u8>> {
    let shapes = g.shapes(h, w).map_err(anyhow::Error::msg)?;
    let out_id = g.output();
    let vname = |v: ValueId| -> String {
        if v == 0 {
            "input".into()
        } else if v == out_id {
            "output".into()
        } else {
            format!("v{v}")
        }
    };
    let mut b = Builder {
        nodes: Vec::new(),
        inits: Vec::new(),
        count: 0,
    };
    // Values that are 2-D [batch, c] (after a Linear) rather than 4-D.
    let mut flat = vec![false; g.num_values];
    for n in &g.nodes {
        let nm = n.name.as_str();
        let x = vname(n.inputs[0]);
        let y = vname(n.output);
        if flat[n.inputs[0]] && !matches!(n.op, Op::Linear { .. }) {
            bail!("{nm}: {} after a linear layer is not exported", n.op.kind());
        }
        match &n.op {
            Op::Conv(c) => {
                let (wn, bn) = (format!("{nm}.weight"), format!("{nm}.bias"));
                b.tensor_f32(&wn, &[c.cout, c.cin / c.groups, c.kh, c.kw], &c.weight);
                b.tensor_f32(&bn, &[c.cout], &c.bias);
                let conv_out = if c.act == Act::None {
                    y.clone()
                } else {
                    b.tmp(nm)
                };
                let (ph, pw) = (c.pad.0 as i64, c.pad.1 as i64);
                b.node(
                    "Conv",
                    nm,
                    &[&x, &wn, &bn],
                    &[&conv_out],
                    &[
                        ("kernel_shape", Attr::Ints(&[c.kh as i64, c.kw as i64])),
                        ("strides", Attr::Ints(&[c.stride as i64, c.stride as i64])),
                        ("pads", Attr::Ints(&[ph, pw, ph, pw])),
                        ("group", Attr::Int(c.groups as i64)),
                    ],
                );
                if c.act != Act::None {
                    b.act(c.act, &format!("{nm}.act"), &conv_out, &y);
                }
            }
            Op::Add(act) => {
                let a2 = vname(n.inputs[1]);
                let sum = if *act == Act::None {
                    y.clone()
                } else {
                    b.tmp(nm)
                };
                b.node("Add", nm, &[&x, &a2], &[&sum], &[]);
                if *act != Act::None {
                    b.act(*act, &format!("{nm}.act"), &sum, &y);
                }
            }
            Op::Concat => {
                let ins: Vec<String> = n.inputs.iter().map(|&v| vname(v)).collect();
                let refs: Vec<&str> = ins.iter().map(|s| s.as_str()).collect();
                b.node("Concat", nm, &refs, &[&y], &[("axis", Attr::Int(1))]);
            }
            Op::UpsampleMul => {
                let gate = vname(n.inputs[1]);
                let (sizes, up) = (b.tmp(nm), b.tmp(nm));
                b.node("Shape", &format!("{nm}.shape"), &[&x], &[&sizes], &[]);
                b.node(
                    "Resize",
                    &format!("{nm}.resize"),
                    &[&gate, "", "", &sizes],
                    &[&up],
                    &[
                        ("mode", Attr::Str("nearest")),
                        ("coordinate_transformation_mode", Attr::Str("asymmetric")),
                        ("nearest_mode", Attr::Str("floor")),
                    ],
                );
                b.node("Mul", nm, &[&x, &up], &[&y], &[]);
            }
            Op::ChannelMul => {
                let s = vname(n.inputs[1]);
                b.node("Mul", nm, &[&x, &s], &[&y], &[]);
            }
            Op::AvgPool2x2 => b.node(
                "AveragePool",
                nm,
                &[&x],
                &[&y],
                &[
                    ("kernel_shape", Attr::Ints(&[2, 2])),
                    ("strides", Attr::Ints(&[2, 2])),
                ],
            ),
            Op::MaxPool { k, stride, pad } => {
                let (k, s, p) = (*k as i64, *stride as i64, *pad as i64);
                b.node(
                    "MaxPool",
                    nm,
                    &[&x],
                    &[&y],
                    &[
                        ("kernel_shape", Attr::Ints(&[k, k])),
                        ("strides", Attr::Ints(&[s, s])),
                        ("pads", Attr::Ints(&[p, p, p, p])),
                    ],
                )
            }
            Op::GlobalAvgPool => b.node("GlobalAveragePool", nm, &[&x], &[&y], &[]),
            Op::Linear {
                cin,
                cout,
                weight,
                bias,
                act,
            } => {
                let xin = if flat[n.inputs[0]] {
                    x.clone()
                } else {
                    let f = b.tmp(nm);
                    b.node(
                        "Flatten",
                        &format!("{nm}.flatten"),
                        &[&x],
                        &[&f],
                        &[("axis", Attr::Int(1))],
                    );
                    f
                };
                let (wn, bn) = (format!("{nm}.weight"), format!("{nm}.bias"));
                b.tensor_f32(&wn, &[*cout, *cin], weight);
                b.tensor_f32(&bn, &[*cout], bias);
                let gout = if *act == Act::None {
                    y.clone()
                } else {
                    b.tmp(nm)
                };
                b.node(
                    "Gemm",
                    nm,
                    &[&xin, &wn, &bn],
                    &[&gout],
                    &[("transB", Attr::Int(1))],
                );
                if *act != Act::None {
                    b.act(*act, &format!("{nm}.act"), &gout, &y);
                }
                flat[n.output] = true;
            }
            Op::ChannelShuffle { groups } => {
                let (c, hh, ww) = shapes[n.inputs[0]];
                let gi = *groups as i64;
                let (s5, s4) = (format!("{nm}.shape5"), format!("{nm}.shape4"));
                b.tensor_i64(&s5, &[0, gi, c as i64 / gi, hh as i64, ww as i64]);
                b.tensor_i64(&s4, &[0, c as i64, hh as i64, ww as i64]);
                let (r, t) = (b.tmp(nm), b.tmp(nm));
                b.node("Reshape", &format!("{nm}.r1"), &[&x, &s5], &[&r], &[]);
                b.node(
                    "Transpose",
                    &format!("{nm}.t"),
                    &[&r],
                    &[&t],
                    &[("perm", Attr::Ints(&[0, 2, 1, 3, 4]))],
                );
                b.node("Reshape", nm, &[&t, &s4], &[&y], &[]);
            }
            Op::Slice { start, len } => {
                let (st, en, ax) = (
                    format!("{nm}.starts"),
                    format!("{nm}.ends"),
                    format!("{nm}.axes"),
                );
                b.tensor_i64(&st, &[*start as i64]);
                b.tensor_i64(&en, &[(start + len) as i64]);
                b.tensor_i64(&ax, &[1]);
                b.node("Slice", nm, &[&x, &st, &en, &ax], &[&y], &[]);
            }
        }
    }
    let mut graph = Pb::default();
    for n in &b.nodes {
        graph.msg(1, n);
    }
    graph.str(2, &g.name);
    for t in &b.inits {
        graph.msg(5, t);
    }
    let batch: Result<usize, &str> = Err("batch");
    graph.msg(
        11,
        &value_info("input", &[batch, Ok(g.in_channels), Ok(h), Ok(w)]),
    );
    let (oc, oh, ow) = shapes[out_id];
    let out_dims: Vec<Result<usize, &str>> = if flat[out_id] {
        vec![batch, Ok(oc)]
    } else {
        vec![batch, Ok(oc), Ok(oh), Ok(ow)]
    };
    graph.msg(12, &value_info("output", &out_dims));
    let mut opset = Pb::default();
    opset.str(1, "").int(2, 13);
    let mut model = Pb::default();
    model
        .int(1, 7)
        .str(2, "ghostv3")
        .str(3, env!("CARGO_PKG_VERSION"))
        .msg(7, &graph)
        .msg(8, &opset);
    Ok(model.0)
}
