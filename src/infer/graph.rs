//! The inference IR: a list of fused nodes in execution order over per-image feature maps.
//!
//! Every node produces one value; a value is a feature map of `c` channels at `h x w` per image
//! (the batch is implicit). Weights are kept in PyTorch layout here (OIHW, BN already folded), so
//! the ONNX exporter can write them as they are; the executor packs them for its kernels.

/// Activation fused into a node's epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    Relu6,
    Sigmoid,
    /// timm's hard_sigmoid: min(max(x + 3, 0), 6) / 6.
    HardSigmoid,
}

impl Act {
    #[inline(always)]
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Act::None => v,
            Act::Relu => v.max(0.0),
            Act::Relu6 => v.clamp(0.0, 6.0),
            Act::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            Act::HardSigmoid => (v + 3.0).clamp(0.0, 6.0) / 6.0,
        }
    }
}

/// A convolution with its BatchNorm folded in: y = act(conv(x, weight) + bias).
#[derive(Clone, Debug)]
pub struct ConvSpec {
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    /// (top/bottom, left/right) zero padding.
    pub pad: (usize, usize),
    pub groups: usize,
    /// [cout, cin/groups, kh, kw]
    pub weight: Vec<f32>,
    /// [cout]
    pub bias: Vec<f32>,
    pub act: Act,
}

impl ConvSpec {
    pub fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.cin && self.cin == self.cout
    }

    pub fn is_pointwise(&self) -> bool {
        self.groups == 1 && self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == (0, 0)
    }

    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (
            (h + 2 * self.pad.0 - self.kh) / self.stride + 1,
            (w + 2 * self.pad.1 - self.kw) / self.stride + 1,
        )
    }
}

#[derive(Clone, Debug)]
pub enum Op {
    Conv(ConvSpec),
    /// act(a + b), same shapes.
    Add(Act),
    /// Channel concatenation of every input (same spatial size).
    Concat,
    /// x * nearest_upsample(g) (inputs x, g): the DFC attention gate (g already through its
    /// sigmoid). g has x's channels and any spatial size; upsampling uses PyTorch's legacy
    /// nearest rule (source = floor(dst * in / out)).
    UpsampleMul,
    /// x * s per channel (inputs x [c,h,w], s [c,1,1]): the SE excitation.
    ChannelMul,
    /// Average pool, kernel 2, stride 2, no padding (floor).
    AvgPool2x2,
    /// Max pool, square kernel, stride, padding (ResNet's stem pool).
    MaxPool {
        k: usize,
        stride: usize,
        pad: usize,
    },
    /// Mean over space: [c,h,w] -> [c,1,1].
    GlobalAvgPool,
    /// Fully connected on a [c,1,1] value: y = act(W x + b), W [out, in].
    Linear {
        cin: usize,
        cout: usize,
        weight: Vec<f32>,
        bias: Vec<f32>,
        act: Act,
    },
    /// ShuffleNet's channel shuffle: view as [groups, c/groups], transpose.
    ChannelShuffle {
        groups: usize,
    },
    /// Channels [start, start+len) of the input.
    Slice {
        start: usize,
        len: usize,
    },
}

impl Op {
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Conv(c) if c.is_pointwise() => "conv1x1",
            Op::Conv(c) if c.is_depthwise() => "dwconv",
            Op::Conv(_) => "conv",
            Op::Add(_) => "add",
            Op::Concat => "concat",
            Op::UpsampleMul => "dfc_gate",
            Op::ChannelMul => "se_scale",
            Op::AvgPool2x2 => "avgpool2x2",
            Op::MaxPool { .. } => "maxpool",
            Op::GlobalAvgPool => "global_pool",
            Op::Linear { .. } => "linear",
            Op::ChannelShuffle { .. } => "shuffle",
            Op::Slice { .. } => "slice",
        }
    }
}

pub type ValueId = usize;

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub output: ValueId,
}

/// Value 0 is the network input ([in_channels, H, W] per image, NCHW on the API); the value of the
/// last node is the output.
#[derive(Clone, Debug)]
pub struct Graph {
    pub name: String,
    pub in_channels: usize,
    pub nodes: Vec<Node>,
    pub num_values: usize,
}

/// Shape of a value per image: (channels, height, width).
pub type Shape = (usize, usize, usize);

impl Graph {
    pub fn new(name: &str, in_channels: usize) -> Self {
        Graph {
            name: name.to_string(),
            in_channels,
            nodes: Vec::new(),
            num_values: 1,
        }
    }

    pub fn input(&self) -> ValueId {
        0
    }

    pub fn output(&self) -> ValueId {
        self.nodes.last().map_or(0, |n| n.output)
    }

    /// Appends a node and returns its output value.
    pub fn push(&mut self, name: impl Into<String>, op: Op, inputs: &[ValueId]) -> ValueId {
        let output = self.num_values;
        self.num_values += 1;
        self.nodes.push(Node {
            name: name.into(),
            op,
            inputs: inputs.to_vec(),
            output,
        });
        output
    }

    /// The shape of every value for an input of `h x w`; an error names the node that does not fit.
    pub fn shapes(&self, h: usize, w: usize) -> Result<Vec<Shape>, String> {
        let mut s = vec![(0, 0, 0); self.num_values];
        s[0] = (self.in_channels, h, w);
        for n in &self.nodes {
            let i0 = s[n.inputs[0]];
            let bad = |why: String| format!("{} ({}): {why}", n.name, n.op.kind());
            s[n.output] = match &n.op {
                Op::Conv(c) => {
                    if i0.0 != c.cin {
                        return Err(bad(format!("input has {} channels, not {}", i0.0, c.cin)));
                    }
                    if i0.1 + 2 * c.pad.0 < c.kh || i0.2 + 2 * c.pad.1 < c.kw {
                        return Err(bad(format!("input {}x{} smaller than kernel", i0.1, i0.2)));
                    }
                    let (ho, wo) = c.out_hw(i0.1, i0.2);
                    (c.cout, ho, wo)
                }
                Op::Add(_) => {
                    if s[n.inputs[1]] != i0 {
                        return Err(bad(format!("{:?} + {:?}", i0, s[n.inputs[1]])));
                    }
                    i0
                }
                Op::Concat => {
                    let mut c = 0;
                    for &v in &n.inputs {
                        if (s[v].1, s[v].2) != (i0.1, i0.2) {
                            return Err(bad("spatial sizes differ".into()));
                        }
                        c += s[v].0;
                    }
                    (c, i0.1, i0.2)
                }
                Op::UpsampleMul => {
                    if s[n.inputs[1]].0 != i0.0 {
                        return Err(bad("gate channels differ".into()));
                    }
                    i0
                }
                Op::ChannelMul => {
                    if s[n.inputs[1]] != (i0.0, 1, 1) {
                        return Err(bad("scale must be [c,1,1]".into()));
                    }
                    i0
                }
                Op::AvgPool2x2 => {
                    if i0.1 < 2 || i0.2 < 2 {
                        return Err(bad(format!("input {}x{} below 2x2", i0.1, i0.2)));
                    }
                    (i0.0, i0.1 / 2, i0.2 / 2)
                }
                Op::MaxPool { k, stride, pad } => {
                    if i0.1 + 2 * pad < *k || i0.2 + 2 * pad < *k {
                        return Err(bad("input smaller than the pool".into()));
                    }
                    (
                        i0.0,
                        (i0.1 + 2 * pad - k) / stride + 1,
                        (i0.2 + 2 * pad - k) / stride + 1,
                    )
                }
                Op::GlobalAvgPool => (i0.0, 1, 1),
                Op::Linear { cin, cout, .. } => {
                    if i0 != (*cin, 1, 1) {
                        return Err(bad(format!("input {i0:?}, expected [{cin},1,1]")));
                    }
                    (*cout, 1, 1)
                }
                Op::ChannelShuffle { groups } => {
                    if !i0.0.is_multiple_of(*groups) {
                        return Err(bad("channels not divisible by groups".into()));
                    }
                    i0
                }
                Op::Slice { start, len } => {
                    if start + len > i0.0 {
                        return Err(bad("slice out of range".into()));
                    }
                    (*len, i0.1, i0.2)
                }
            };
        }
        Ok(s)
    }

    /// Multiply-adds per image at `h x w` (convs and linears).
    pub fn macs(&self, h: usize, w: usize) -> Result<u64, String> {
        let s = self.shapes(h, w)?;
        Ok(self
            .nodes
            .iter()
            .map(|n| match &n.op {
                Op::Conv(c) => {
                    let (co, ho, wo) = s[n.output];
                    (co * ho * wo * (c.cin / c.groups) * c.kh * c.kw) as u64
                }
                Op::Linear { cin, cout, .. } => (cin * cout) as u64,
                _ => 0,
            })
            .sum())
    }
}
