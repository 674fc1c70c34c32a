//! The executor: packs weights once, plans activation memory once per (batch, H, W), runs nodes.
//!
//! Threads: a batch of at least two images on two or more threads is split into one chunk per
//! thread, each running the whole network single-threaded on its own arena (no synchronization
//! between layers); a single image is split inside each layer (rows, pixels or weight panels).

use super::graph::{Graph, Op, Shape};
use super::kernels::{self, pad16, EwGeom, NhwcConvGeom, PwGeom};
use super::simd::Isa;
use crate::ops::pool::nearest_indices;
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Weights of one node in the layout its kernel reads.
enum Packed {
    None,
    /// Depth-wise [kh*kw][cp] or dense [kh][kw][cin][cp]; bias [cp].
    Direct {
        wt: Vec<f32>,
        bias: Vec<f32>,
        cp: usize,
    },
    /// Pointwise / linear: panels of `nr` output columns, each [k][nr]; bias padded to panels.
    Panels {
        wt: Vec<f32>,
        bias: Vec<f32>,
        nr: usize,
    },
}

fn pack_panels(weight: &[f32], bias: &[f32], cout: usize, cin: usize, nr: usize) -> Packed {
    let np = cout.div_ceil(nr);
    let mut wt = vec![0.0f32; np * cin * nr + 16];
    let mut b = vec![0.0f32; np * nr + 16];
    for o in 0..cout {
        let (p, j) = (o / nr, o % nr);
        for k in 0..cin {
            wt[(p * cin + k) * nr + j] = weight[o * cin + k];
        }
        b[o] = bias[o];
    }
    Packed::Panels { wt, bias: b, nr }
}

/// Panel width (1-3 vectors) for `n` output columns: the fewest padded columns, ties to the
/// wider panel (more work per loaded input).
fn panel_width(n: usize, isa: Isa) -> usize {
    let l = isa.lanes();
    let nv = (1..=3)
        .rev()
        .min_by_key(|&v| n.div_ceil(v * l) * v * l)
        .unwrap_or(1);
    nv * l
}

/// The ISA a node's kernel runs with (a narrower vector where it wastes fewer lanes).
fn node_isa(op: &Op, isa: Isa) -> Isa {
    match op {
        // Dense direct convs (the stem) broadcast each input once per output vector group:
        // more, narrower vectors per broadcast are faster.
        Op::Conv(c) if !c.is_pointwise() && !c.is_depthwise() => isa.narrow(),
        Op::Conv(c) => isa.for_channels(c.cout),
        Op::Linear { cout, .. } => isa.for_channels(*cout),
        Op::Add(_) | Op::UpsampleMul | Op::ChannelMul => isa,
        _ => isa,
    }
}

fn pack(op: &Op, isa: Isa) -> Packed {
    match op {
        Op::Conv(c) if c.is_pointwise() => {
            pack_panels(&c.weight, &c.bias, c.cout, c.cin, panel_width(c.cout, isa))
        }
        Op::Linear {
            cin,
            cout,
            weight,
            bias,
            ..
        } => pack_panels(weight, bias, *cout, *cin, panel_width(*cout, isa)),
        Op::Conv(c) if c.is_depthwise() => {
            let cp = pad16(c.cout);
            let kk = c.kh * c.kw;
            let mut wt = vec![0.0f32; kk * cp];
            for ch in 0..c.cout {
                for t in 0..kk {
                    wt[t * cp + ch] = c.weight[ch * kk + t];
                }
            }
            let mut bias = c.bias.clone();
            bias.resize(cp, 0.0);
            Packed::Direct { wt, bias, cp }
        }
        Op::Conv(c) => {
            assert_eq!(
                c.groups, 1,
                "grouped (non depth-wise) convs are not supported yet"
            );
            let cp = pad16(c.cout);
            let mut wt = vec![0.0f32; c.kh * c.kw * c.cin * cp];
            for o in 0..c.cout {
                for i in 0..c.cin {
                    for t in 0..c.kh * c.kw {
                        wt[(t * c.cin + i) * cp + o] = c.weight[(o * c.cin + i) * c.kh * c.kw + t];
                    }
                }
            }
            let mut bias = c.bias.clone();
            bias.resize(cp, 0.0);
            Packed::Direct { wt, bias, cp }
        }
        _ => Packed::None,
    }
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    /// Offset of channel 0 of pixel 0 of image 0 in the arena.
    base: usize,
    /// Pixel stride.
    ld: usize,
}

/// Activation memory for one (batch, H, W): one arena, every value a strided view into it.
struct Plan {
    nb: usize,
    shapes: Vec<Shape>,
    slots: Vec<Slot>,
    /// Concat nodes whose inputs were all written in place.
    skip: Vec<bool>,
    arena: Vec<f32>,
    /// Nearest-upsample source indices per gate node (rows, cols).
    tables: Vec<Option<(Vec<usize>, Vec<usize>)>>,
}

impl Plan {
    fn new(g: &Graph, nb: usize, h: usize, w: usize) -> Result<Plan> {
        let shapes = g.shapes(h, w).map_err(anyhow::Error::msg)?;
        let nv = g.num_values;
        // Concat elimination: inputs produced by a node write straight into their channel slice.
        let mut alias: Vec<Option<(usize, usize)>> = vec![None; nv];
        let mut skip = vec![false; g.nodes.len()];
        for (t, n) in g.nodes.iter().enumerate() {
            if let Op::Concat = n.op {
                let mut coff = 0;
                let mut all = true;
                let mut seen = std::collections::HashSet::new();
                for &v in &n.inputs {
                    if v != 0 && alias[v].is_none() && seen.insert(v) {
                        alias[v] = Some((n.output, coff));
                    } else {
                        all = false;
                    }
                    coff += shapes[v].0;
                }
                skip[t] = all;
            }
        }
        let root = |mut v: usize| {
            let mut coff = 0;
            while let Some((r, c)) = alias[v] {
                coff += c;
                v = r;
            }
            (v, coff)
        };
        // Lifetimes per root buffer, in node steps (value 0 is defined at step 0, node t at t+1).
        let mut def = vec![usize::MAX; nv];
        let mut last = vec![0usize; nv];
        let out = g.output();
        let steps = g.nodes.len() + 1;
        for v in 0..nv {
            let d = if v == 0 {
                0
            } else {
                g.nodes
                    .iter()
                    .position(|n| n.output == v)
                    .map_or(0, |t| t + 1)
            };
            let r = root(v).0;
            def[r] = def[r].min(d);
            last[r] = last[r].max(d);
        }
        for (t, n) in g.nodes.iter().enumerate() {
            for &v in &n.inputs {
                let r = root(v).0;
                last[r] = last[r].max(t + 1);
            }
        }
        last[root(out).0] = steps;
        let size = |v: usize| pad16(nb * shapes[v].0 * shapes[v].1 * shapes[v].2);
        let mut roots: Vec<usize> = (0..nv).filter(|&v| alias[v].is_none()).collect();
        roots.sort_by_key(|&v| (def[v], v));
        let mut offset = vec![0usize; nv];
        let mut live: Vec<(usize, usize, usize)> = Vec::new(); // (offset, size, last)
        let mut total = 0;
        for &v in &roots {
            live.retain(|&(_, _, l)| l >= def[v]);
            live.sort();
            let need = size(v);
            let mut at = 0;
            for &(o, s, _) in &live {
                if o >= at + need {
                    break;
                }
                at = at.max(o + s);
            }
            offset[v] = at;
            live.push((at, need, last[v]));
            total = total.max(at + need);
        }
        let slots = (0..nv)
            .map(|v| {
                let (r, coff) = root(v);
                Slot {
                    base: offset[r] + coff,
                    ld: shapes[r].0,
                }
            })
            .collect();
        let tables = g
            .nodes
            .iter()
            .map(|n| match n.op {
                Op::ChannelMul => {
                    let (_, h, w) = shapes[n.output];
                    Some((vec![0; h], vec![0; w]))
                }
                Op::UpsampleMul => {
                    let (_, h, w) = shapes[n.output];
                    let (_, gh, gw) = shapes[n.inputs[1]];
                    Some((nearest_indices(gh, h), nearest_indices(gw, w)))
                }
                _ => None,
            })
            .collect();
        Ok(Plan {
            nb,
            shapes,
            slots,
            skip,
            // Kernels may read one vector past a value's last channel.
            arena: vec![0.0; total + 64],
            tables,
        })
    }

    fn bytes(&self) -> usize {
        self.arena.len() * 4
    }
}

#[derive(Clone, Copy)]
struct Ptr(*mut f32);
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}
impl Ptr {
    fn at(self, off: usize) -> *mut f32 {
        // SAFETY: callers pass offsets inside the arena.
        unsafe { self.0.add(off) }
    }
}

/// Runs `f(start, end)` over [0, total) in chunks of at least `min_chunk`, on the rayon pool when
/// `par` is set.
fn split(par: bool, total: usize, min_chunk: usize, f: impl Fn(usize, usize) + Sync + Send) {
    let t = if par { rayon::current_num_threads() } else { 1 };
    let chunks = (total / min_chunk.max(1)).clamp(1, 4 * t);
    if t <= 1 || chunks <= 1 {
        f(0, total);
        return;
    }
    let per = total.div_ceil(chunks);
    (0..chunks).into_par_iter().for_each(|i| {
        let (a, b) = (i * per, ((i + 1) * per).min(total));
        if a < b {
            f(a, b);
        }
    });
}

/// Work per task below which splitting a layer across threads costs more than it saves.
const MIN_TASK: usize = 8192;
/// The same for memory-bound element-wise nodes (values per task): smaller tasks measured
/// slower on two threads than one.
const EW_TASK: usize = 65536;

/// A compiled inference engine for one graph.
pub struct Engine {
    pub graph: Graph,
    pub isa: Isa,
    /// Per node (see `node_isa`).
    isas: Vec<Isa>,
    packed: Vec<Packed>,
    plans: Mutex<HashMap<(usize, usize, usize), Vec<Plan>>>,
    peak_arena: Mutex<usize>,
    /// Images per plan run inside a thread's chunk of a batch (`GHOSTV3_SUB_BATCH`, default 2:
    /// measured fastest here; one image re-streams the head's weights, eight spill L2).
    pub sub_batch: usize,
}

/// Per-node time (seconds, summed over calls) from `Engine::run_profiled`.
pub type Profile = Vec<f64>;

impl Engine {
    pub fn new(graph: Graph) -> Engine {
        Self::with_isa(graph, Isa::detect())
    }

    pub fn with_isa(graph: Graph, isa: Isa) -> Engine {
        let isas: Vec<Isa> = graph.nodes.iter().map(|n| node_isa(&n.op, isa)).collect();
        let packed = graph
            .nodes
            .iter()
            .zip(&isas)
            .map(|(n, &i)| pack(&n.op, i))
            .collect();
        Engine {
            graph,
            isa,
            isas,
            packed,
            plans: Mutex::new(HashMap::new()),
            peak_arena: Mutex::new(0),
            sub_batch: std::env::var("GHOSTV3_SUB_BATCH")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&v: &usize| v > 0)
                .unwrap_or(2),
        }
    }

    /// Bytes of packed weights.
    pub fn weight_bytes(&self) -> usize {
        self.packed
            .iter()
            .map(|p| match p {
                Packed::None => 0,
                Packed::Direct { wt, bias, .. } | Packed::Panels { wt, bias, .. } => {
                    4 * (wt.len() + bias.len())
                }
            })
            .sum()
    }

    /// Largest total of activation arenas in use at once so far (bytes).
    pub fn peak_arena_bytes(&self) -> usize {
        *self.peak_arena.lock().unwrap()
    }

    /// Output values per image.
    pub fn out_len(&self, h: usize, w: usize) -> Result<usize> {
        let s = self.graph.shapes(h, w).map_err(anyhow::Error::msg)?;
        let (c, oh, ow) = s[self.graph.output()];
        Ok(c * oh * ow)
    }

    /// Runs a batch `x` [n, C, h, w] (NCHW) and returns the output [n, out_len] (for a classifier,
    /// the logits). Uses the current rayon pool's threads.
    pub fn run(&self, x: &[f32], n: usize, h: usize, w: usize) -> Result<Vec<f32>> {
        self.run_inner(x, n, h, w, None)
    }

    /// `run` on a tensor [n, C, h, w]; the output is [n, out_len] (logits for a classifier).
    pub fn predict(&self, x: &crate::Tensor<f32>) -> Result<crate::Tensor<f32>> {
        let s = x.shape();
        if s.len() != 4 {
            bail!("input must be [N, C, H, W], got {s:?}");
        }
        let y = self.run(x.data(), s[0], s[2], s[3])?;
        let per = y.len() / s[0].max(1);
        Ok(crate::Tensor::new(&[s[0], per], y))
    }

    /// Like `run`, adding each node's time to `profile` (indexed like `graph.nodes`).
    pub fn run_profiled(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        profile: &mut Profile,
    ) -> Result<Vec<f32>> {
        profile.resize(self.graph.nodes.len(), 0.0);
        self.run_inner(x, n, h, w, Some(profile))
    }

    fn take_plan(&self, nb: usize, h: usize, w: usize) -> Result<Plan> {
        let p = self
            .plans
            .lock()
            .unwrap()
            .get_mut(&(nb, h, w))
            .and_then(|v| v.pop());
        match p {
            Some(p) => Ok(p),
            None => Plan::new(&self.graph, nb, h, w),
        }
    }

    fn give_plan(&self, p: Plan, h: usize, w: usize) {
        let mut plans = self.plans.lock().unwrap();
        plans.entry((p.nb, h, w)).or_default().push(p);
        let total: usize = plans.values().flatten().map(|p| p.bytes()).sum();
        let mut peak = self.peak_arena.lock().unwrap();
        *peak = (*peak).max(total);
    }

    fn run_inner(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        profile: Option<&mut Profile>,
    ) -> Result<Vec<f32>> {
        let cin = self.graph.in_channels;
        if x.len() != n * cin * h * w {
            bail!("input has {} values, expected {n}x{cin}x{h}x{w}", x.len());
        }
        let ol = self.out_len(h, w)?;
        let mut out = vec![0.0f32; n * ol];
        if n == 0 {
            return Ok(out);
        }
        let t = rayon::current_num_threads();
        let img = cin * h * w;
        if n == 1 {
            let mut plan = self.take_plan(1, h, w)?;
            self.exec(&mut plan, x, &mut out, h, w, t > 1, profile);
            self.give_plan(plan, h, w);
        } else {
            // One chunk of the batch per thread, each run single-threaded a few images at a
            // time: activations of one image stay in L2, no synchronization between layers.
            let chunks = t.min(n);
            let per = n.div_ceil(chunks);
            let sub = self.sub_batch;
            let run_chunk = |o: &mut [f32], xi: &[f32], mut prof: Option<&mut Profile>| {
                for (os, xs) in o.chunks_mut(sub * ol).zip(xi.chunks(sub * img)) {
                    let mut plan = self.take_plan(xs.len() / img, h, w)?;
                    self.exec(&mut plan, xs, os, h, w, false, prof.as_deref_mut());
                    self.give_plan(plan, h, w);
                }
                Ok::<(), anyhow::Error>(())
            };
            if chunks == 1 {
                run_chunk(&mut out, x, profile)?;
            } else {
                out.par_chunks_mut(per * ol)
                    .zip(x.par_chunks(per * img))
                    .map(|(o, xi)| run_chunk(o, xi, None))
                    .collect::<Result<Vec<()>>>()?;
                if let Some(p) = profile {
                    // Threads run whole chunks; time one sub-batch alone instead.
                    let k = sub.min(n);
                    run_chunk(&mut out[..k * ol].to_vec(), &x[..k * img], Some(p))?;
                }
            }
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn exec(
        &self,
        plan: &mut Plan,
        x: &[f32],
        out: &mut [f32],
        h: usize,
        w: usize,
        par: bool,
        mut profile: Option<&mut Profile>,
    ) {
        let nb = plan.nb;
        let arena = Ptr(plan.arena.as_mut_ptr());
        // NCHW -> NHWC into value 0.
        {
            let s0 = plan.slots[0];
            let c = self.graph.in_channels;
            let hw = h * w;
            split(par, nb * h, MIN_TASK / (w * c).max(1), |r0, r1| {
                for r in r0..r1 {
                    let (img, y) = (r / h, r % h);
                    for xx in 0..w {
                        let p = img * hw + y * w + xx;
                        let dst = arena.at(s0.base + p * s0.ld);
                        for ch in 0..c {
                            // SAFETY: inside value 0's region.
                            unsafe { *dst.add(ch) = x[(img * c + ch) * hw + y * w + xx] };
                        }
                    }
                }
            });
        }
        for (t, node) in self.graph.nodes.iter().enumerate() {
            let t0 = profile.as_ref().map(|_| Instant::now());
            self.exec_node(plan, t, arena, nb, par);
            if let (Some(p), Some(t0)) = (profile.as_deref_mut(), t0) {
                p[t] += t0.elapsed().as_secs_f64();
            }
            let _ = node;
        }
        let so = plan.slots[self.graph.output()];
        let (c, oh, ow) = plan.shapes[self.graph.output()];
        for img in 0..nb {
            for p in 0..oh * ow {
                for ch in 0..c {
                    // SAFETY: inside the output value's region.
                    let v = unsafe { *arena.at(so.base + (img * oh * ow + p) * so.ld + ch) };
                    // NCHW output.
                    out[(img * c + ch) * oh * ow + p] = v;
                }
            }
        }
    }

    fn exec_node(&self, plan: &Plan, t: usize, arena: Ptr, nb: usize, par: bool) {
        let node = &self.graph.nodes[t];
        let isa = self.isas[t];
        let sh = &plan.shapes;
        let sl = &plan.slots;
        let (xin, yv) = (node.inputs[0], node.output);
        let (sx, sy) = (sl[xin], sl[yv]);
        let (c, h, w) = sh[xin];
        let (co, ho, wo) = sh[yv];
        match (&node.op, &self.packed[t]) {
            (Op::Conv(cs), Packed::Panels { wt, bias, nr }) => {
                let g = PwGeom {
                    k: c,
                    n: co,
                    ldx: sx.ld,
                    ldy: sy.ld,
                    nr: *nr,
                    act: cs.act,
                };
                run_pw(isa, par, &g, arena, sx.base, sy.base, nb * h * w, wt, bias);
            }
            (Op::Linear { act, .. }, Packed::Panels { wt, bias, nr }) => {
                let g = PwGeom {
                    k: c,
                    n: co,
                    ldx: sx.ld,
                    ldy: sy.ld,
                    nr: *nr,
                    act: *act,
                };
                run_pw(isa, par, &g, arena, sx.base, sy.base, nb, wt, bias);
            }
            (Op::Conv(cs), Packed::Direct { wt, bias, cp }) => {
                let g = NhwcConvGeom {
                    h,
                    w,
                    ho,
                    wo,
                    cin: c,
                    cout: co,
                    kh: cs.kh,
                    kw: cs.kw,
                    stride: cs.stride,
                    ph: cs.pad.0,
                    pw: cs.pad.1,
                    ldx: sx.ld,
                    ldy: sy.ld,
                    cp: *cp,
                    act: cs.act,
                };
                let dw = cs.is_depthwise();
                let per_row = wo * co * cs.kh * cs.kw * if dw { 1 } else { c };
                let rows = nb * ho;
                let threads = if par { rayon::current_num_threads() } else { 1 };
                if dw && threads > 1 && rows < 4 * threads && rows * per_row >= 4 * MIN_TASK {
                    // Few rows (7x7 maps): split channel groups instead (depth-wise channels are
                    // independent; whole 16-channel blocks keep the vectors full).
                    let blocks = co.div_ceil(16);
                    let groups = (2 * threads).min(blocks);
                    let per = blocks.div_ceil(groups) * 16;
                    (0..groups).into_par_iter().for_each(|i| {
                        let (c0, c1) = (i * per, ((i + 1) * per).min(co));
                        if c0 >= c1 {
                            return;
                        }
                        let gi = NhwcConvGeom { cout: c1 - c0, ..g };
                        // SAFETY: as below, on the channel range [c0, c1).
                        unsafe {
                            kernels::depthwise(
                                isa,
                                &gi,
                                arena.at(sx.base + c0),
                                arena.at(sy.base + c0),
                                wt.as_ptr().add(c0),
                                bias.as_ptr().add(c0),
                                0,
                                rows,
                            )
                        }
                    });
                    return;
                }
                split(par, rows, MIN_TASK * 4 / per_row.max(1), |r0, r1| {
                    let (xp, yp) = (arena.at(sx.base), arena.at(sy.base));
                    // SAFETY: slots lie in the arena, weights are padded to `cp`.
                    unsafe {
                        if dw {
                            kernels::depthwise(isa, &g, xp, yp, wt.as_ptr(), bias.as_ptr(), r0, r1)
                        } else {
                            kernels::dense(isa, &g, xp, yp, wt.as_ptr(), bias.as_ptr(), r0, r1)
                        }
                    }
                });
            }
            (Op::Add(act), _) => {
                let sb = sl[node.inputs[1]];
                let g = EwGeom {
                    c,
                    lda: sx.ld,
                    ldb: sb.ld,
                    ldy: sy.ld,
                };
                split(par, nb * h * w, EW_TASK / c.max(1), |p0, p1| unsafe {
                    kernels::add(
                        isa,
                        &g,
                        arena.at(sx.base),
                        arena.at(sb.base),
                        arena.at(sy.base),
                        *act,
                        p0,
                        p1,
                    )
                });
            }
            (Op::Concat, _) => {
                if plan.skip[t] {
                    return;
                }
                let mut coff = 0;
                for &v in &node.inputs {
                    let (cv, _, _) = sh[v];
                    let sv = sl[v];
                    if sv.base != sy.base + coff || sv.ld != sy.ld {
                        split(par, nb * h * w, MIN_TASK / cv.max(1), |p0, p1| {
                            for p in p0..p1 {
                                // SAFETY: both views lie in the arena and do not overlap.
                                unsafe {
                                    std::ptr::copy_nonoverlapping(
                                        arena.at(sv.base + p * sv.ld),
                                        arena.at(sy.base + coff + p * sy.ld),
                                        cv,
                                    )
                                }
                            }
                        });
                    }
                    coff += cv;
                }
            }
            (Op::UpsampleMul | Op::ChannelMul, _) => {
                let sg = sl[node.inputs[1]];
                let (_, gh, gw) = sh[node.inputs[1]];
                let (iy, ix) = plan.tables[t].as_ref().expect("gate tables");
                let e = EwGeom {
                    c,
                    lda: sx.ld,
                    ldb: sg.ld,
                    ldy: sy.ld,
                };
                split(par, nb * h, EW_TASK / (w * c).max(1), |r0, r1| unsafe {
                    kernels::gate(
                        isa,
                        &e,
                        h,
                        w,
                        (gh, gw),
                        iy.as_ptr(),
                        ix.as_ptr(),
                        arena.at(sx.base),
                        arena.at(sg.base),
                        arena.at(sy.base),
                        r0,
                        r1,
                    )
                });
            }
            (Op::AvgPool2x2, _) => {
                let e = EwGeom {
                    c,
                    lda: sx.ld,
                    ldb: 0,
                    ldy: sy.ld,
                };
                split(par, nb * ho, EW_TASK / (wo * c).max(1), |r0, r1| unsafe {
                    kernels::avgpool2x2(isa, &e, h, w, arena.at(sx.base), arena.at(sy.base), r0, r1)
                });
            }
            (Op::MaxPool { k, stride, pad }, _) => {
                let (k, s, pd) = (*k, *stride, *pad);
                split(par, nb * ho, MIN_TASK / (wo * c).max(1), |r0, r1| {
                    for r in r0..r1 {
                        let (img, oy) = (r / ho, r % ho);
                        for ox in 0..wo {
                            let dst = sy.base + (r * wo + ox) * sy.ld;
                            for ch in 0..c {
                                let mut m = f32::NEG_INFINITY;
                                for ky in 0..k {
                                    let iy = (oy * s + ky) as isize - pd as isize;
                                    if iy < 0 || iy >= h as isize {
                                        continue;
                                    }
                                    for kx in 0..k {
                                        let ix = (ox * s + kx) as isize - pd as isize;
                                        if ix < 0 || ix >= w as isize {
                                            continue;
                                        }
                                        let p = (img * h + iy as usize) * w + ix as usize;
                                        // SAFETY: inside the arena.
                                        m = m.max(unsafe { *arena.at(sx.base + p * sx.ld + ch) });
                                    }
                                }
                                unsafe { *arena.at(dst + ch) = m };
                            }
                        }
                    }
                });
            }
            (Op::GlobalAvgPool, _) => {
                let e = EwGeom {
                    c,
                    lda: sx.ld,
                    ldb: 0,
                    ldy: sy.ld,
                };
                // SAFETY: both values lie in the arena.
                unsafe {
                    kernels::global_avg_pool(
                        isa,
                        &e,
                        h * w,
                        arena.at(sx.base),
                        arena.at(sy.base),
                        0,
                        nb,
                    )
                }
            }
            (Op::ChannelShuffle { groups }, _) => {
                let g = *groups;
                let per = c / g;
                for p in 0..nb * h * w {
                    for gi in 0..g {
                        for k in 0..per {
                            // SAFETY: inside the arena.
                            unsafe {
                                *arena.at(sy.base + p * sy.ld + k * g + gi) =
                                    *arena.at(sx.base + p * sx.ld + gi * per + k)
                            };
                        }
                    }
                }
            }
            (Op::Slice { start, len }, _) => {
                for p in 0..nb * h * w {
                    // SAFETY: inside the arena; distinct values do not overlap.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            arena.at(sx.base + p * sx.ld + start),
                            arena.at(sy.base + p * sy.ld),
                            *len,
                        )
                    }
                }
            }
            (op, _) => panic!("{}: no kernel for {}", node.name, op.kind()),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_pw(
    isa: Isa,
    par: bool,
    g: &PwGeom,
    arena: Ptr,
    xb: usize,
    yb: usize,
    m: usize,
    wt: &[f32],
    bias: &[f32],
) {
    let np = g.n.div_ceil(g.nr);
    let t = if par { rayon::current_num_threads() } else { 1 };
    let work = m * g.k * g.n;
    let go = |m0: usize, m1: usize, p0: usize, p1: usize| unsafe {
        kernels::pointwise(
            isa,
            g,
            arena.at(xb),
            arena.at(yb),
            wt.as_ptr(),
            bias.as_ptr(),
            m0,
            m1,
            p0,
            p1,
        )
    };
    if t <= 1 || work < 64 * MIN_TASK {
        go(0, m, 0, np);
        return;
    }
    // A grid of row blocks (whole 12-row tiles) x panel groups, about two tasks per thread,
    // balanced: small maps (7x7 = 49 rows) split the weight panels instead of leaving one
    // thread a single leftover tile.
    let want = 2 * t;
    let tiles = m.div_ceil(12);
    let (rc, pc) = if tiles >= want {
        (want, 1)
    } else if np >= want {
        (1, want)
    } else {
        (tiles, (want / tiles).clamp(1, np))
    };
    let rows = tiles.div_ceil(rc) * 12;
    let panels = np.div_ceil(pc);
    (0..rc * pc).into_par_iter().for_each(|i| {
        let (ri, pi) = (i / pc, i % pc);
        let (m0, m1) = (ri * rows, ((ri + 1) * rows).min(m));
        let (p0, p1) = (pi * panels, ((pi + 1) * panels).min(np));
        if m0 < m1 && p0 < p1 {
            go(m0, m1, p0, p1)
        }
    });
}
