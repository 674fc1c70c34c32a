//! NHWC kernels of the inference engine, written once over `Vf` and dispatched per ISA.
//!
//! Feature maps are NHWC with a pixel stride `ld >= c` (a value can be a channel slice of a wider
//! buffer, which is how concatenation costs nothing). Each kernel computes a range of output rows
//! (or pixels) so the executor can split work across threads. Weights are packed with their
//! channel dimension padded to a multiple of 16 floats, so full-vector weight loads never leave
//! the buffer; activations may be read a vector past their last channel (the arena is padded)
//! and only the valid lanes are stored.

use super::graph::Act;
use super::simd::{simd_fn, Vf};

/// Rounds up to a multiple of 16 (the widest vector).
pub fn pad16(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// sigmoid(x) = 0.5 + 0.5 tanh(x / 2), tanh by a 13/6 rational approximation (Eigen's
/// `generic_fast_tanh_float`, max abs error ~1e-7 on f32).
///
/// # Safety
/// The ISA of `V` must be available.
#[inline(always)]
pub unsafe fn sigmoid_v<V: Vf>(x: V) -> V {
    let h = V::mul(x, V::splat(0.5));
    let c = 7.905_311;
    let t = V::min(V::max(h, V::splat(-c)), V::splat(c));
    let t2 = V::mul(t, t);
    let mut p = V::splat(-2.760_768_5e-16);
    for a in [
        2.000_188e-13,
        -8.604_672e-11,
        5.122_297e-8,
        1.485_722_4e-5,
        6.372_619_3e-4,
        4.893_524_6e-3,
    ] {
        p = V::fma(p, t2, V::splat(a));
    }
    p = V::mul(p, t);
    let mut q = V::splat(1.198_258_4e-6);
    for b in [1.185_347_1e-4, 2.268_434_6e-3, 4.893_525e-3] {
        q = V::fma(q, t2, V::splat(b));
    }
    V::fma(V::div(p, q), V::splat(0.5), V::splat(0.5))
}

/// # Safety
/// The ISA of `V` must be available.
#[inline(always)]
pub unsafe fn act_v<V: Vf>(v: V, act: Act) -> V {
    match act {
        Act::None => v,
        Act::Relu => V::max(v, V::zero()),
        Act::Relu6 => V::min(V::max(v, V::zero()), V::splat(6.0)),
        Act::HardSigmoid => V::min(
            V::max(V::fma(v, V::splat(1.0 / 6.0), V::splat(0.5)), V::zero()),
            V::splat(1.0),
        ),
        Act::Sigmoid => sigmoid_v(v),
    }
}

#[inline(always)]
unsafe fn store_act<V: Vf>(v: V, act: Act, p: *mut f32, n: usize) {
    let v = act_v(v, act);
    if n >= V::L {
        v.store(p)
    } else {
        v.store_n(p, n)
    }
}

/// Geometry of a depth-wise or dense direct conv over NHWC maps.
#[derive(Clone, Copy, Debug)]
pub struct NhwcConvGeom {
    pub h: usize,
    pub w: usize,
    pub ho: usize,
    pub wo: usize,
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub ph: usize,
    pub pw: usize,
    pub ldx: usize,
    pub ldy: usize,
    /// Padded channel stride of the packed weights (cout rounded up to 16).
    pub cp: usize,
    pub act: Act,
}

impl NhwcConvGeom {
    /// Output columns `lo..hi` whose `kw` taps all lie inside the input row (no padding checks
    /// needed there): the fast interior of a row.
    fn interior_cols(&self, kw: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = self.pw.div_ceil(s).min(self.wo);
        let hi = if self.w + self.pw >= kw {
            ((self.w + self.pw - kw) / s + 1).clamp(lo, self.wo)
        } else {
            lo
        };
        (lo, hi)
    }
}

/// Valid tap range [lo, hi) of a kernel of size `k` at input start `i0` over `n` inputs.
#[inline(always)]
fn taps(i0: isize, k: usize, n: usize) -> (usize, usize) {
    let lo = (-i0).max(0) as usize;
    let hi = (n as isize - i0).clamp(0, k as isize) as usize;
    (lo, hi.max(lo))
}

/// One output pixel of a depth-wise conv near a border (taps checked). A function, not a
/// closure: closures do not inherit `#[target_feature]`, and intrinsics that are not inlined
/// cost ~10x.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_px<V: Vf>(
    g: &NhwcConvGeom,
    kh: usize,
    kw: usize,
    xc: *const f32,
    wc: *const f32,
    b: V,
    yc: *mut f32,
    iy0: isize,
    ky_lo: usize,
    ky_hi: usize,
    ox: usize,
    n: usize,
) {
    let _ = kh;
    let ix0 = (ox * g.stride) as isize - g.pw as isize;
    let (kx_lo, kx_hi) = taps(ix0, kw, g.w);
    let mut acc = b;
    for ky in ky_lo..ky_hi {
        let xrow = xc.offset((iy0 + ky as isize) * (g.w * g.ldx) as isize);
        for kx in kx_lo..kx_hi {
            let xv = V::load(xrow.offset((ix0 + kx as isize) * g.ldx as isize));
            acc = V::fma(V::load(wc.add((ky * kw + kx) * g.cp)), xv, acc);
        }
    }
    store_act(acc, g.act, yc.add(ox * g.ldy), n);
}

/// P output pixels from column `ox` on, taps [ky.0, ky.1) x [0, kw) all inside the input;
/// `xrow0` points at input row `oy * stride - ph` (possibly outside the map), `wr` holds the
/// tap weights.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_run<V: Vf, const P: usize>(
    g: &NhwcConvGeom,
    kw: usize,
    xrow0: *const f32,
    wr: &[V; 25],
    b: V,
    yc: *mut f32,
    ox: usize,
    ky: (usize, usize),
    n: usize,
) {
    let ix0 = ox * g.stride - g.pw;
    let mut a = [b; P];
    for ky in ky.0..ky.1 {
        let xr = xrow0.wrapping_add((ky * g.w + ix0) * g.ldx);
        for kx in 0..kw {
            let wv = wr[ky * kw + kx];
            for (p, acc) in a.iter_mut().enumerate() {
                *acc = V::fma(wv, V::load(xr.add((kx + p * g.stride) * g.ldx)), *acc);
            }
        }
    }
    for (p, acc) in a.iter().enumerate() {
        store_act(*acc, g.act, yc.add((ox + p) * g.ldy), n);
    }
}

/// Depth-wise conv, output rows [r0, r1) (row = image * ho + oy). Weights `wt` [kh*kw][cp],
/// bias [cp]. `kh`, `kw` are passed separately so the callers' constants unroll the taps.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_rows_k<V: Vf>(
    g: &NhwcConvGeom,
    kh: usize,
    kw: usize,
    x: *const f32,
    y: *mut f32,
    wt: *const f32,
    bias: *const f32,
    r0: usize,
    r1: usize,
) {
    let (l, cp, s) = (V::L, g.cp, g.stride);
    let (ox_lo, ox_hi) = g.interior_cols(kw);
    for r in r0..r1 {
        let (img, oy) = (r / g.ho, r % g.ho);
        let xi = x.add(img * g.h * g.w * g.ldx);
        let yr = y.add(r * g.wo * g.ldy);
        let iy0 = (oy * s) as isize - g.ph as isize;
        let (ky_lo, ky_hi) = taps(iy0, kh, g.h);
        let full_rows = ky_lo == 0 && ky_hi == kh;
        let mut c0 = 0;
        while c0 < g.cout {
            let n = (g.cout - c0).min(l);
            let b = V::load(bias.add(c0));
            let wc = wt.add(c0);
            let xc = xi.add(c0);
            let yc = yr.add(c0);
            let kk = kh * kw;
            if kk > 25 {
                for ox in 0..g.wo {
                    dw_px::<V>(g, kh, kw, xc, wc, b, yc, iy0, ky_lo, ky_hi, ox, n);
                }
                c0 += l;
                continue;
            }
            // The taps' weights stay in registers along the row (up to 5x5).
            let mut wr = [V::zero(); 25];
            for (t, w) in wr.iter_mut().enumerate().take(kk) {
                *w = V::load(wc.add(t * cp));
            }
            for ox in 0..ox_lo {
                dw_px::<V>(g, kh, kw, xc, wc, b, yc, iy0, ky_lo, ky_hi, ox, n);
            }
            let xrow0 = xc.wrapping_offset(iy0 * (g.w * g.ldx) as isize);
            let mut ox = ox_lo;
            // Columns whose taps lie inside the row: four pixels share each weight. Rows with
            // every tap valid get the fully unrolled loop (constant bounds).
            let ky = if full_rows { (0, kh) } else { (ky_lo, ky_hi) };
            if full_rows {
                while ox + 4 <= ox_hi {
                    dw_run::<V, 4>(g, kw, xrow0, &wr, b, yc, ox, (0, kh), n);
                    ox += 4;
                }
            } else {
                while ox + 4 <= ox_hi {
                    dw_run::<V, 4>(g, kw, xrow0, &wr, b, yc, ox, ky, n);
                    ox += 4;
                }
            }
            while ox < ox_hi {
                dw_run::<V, 1>(g, kw, xrow0, &wr, b, yc, ox, ky, n);
                ox += 1;
            }
            for ox in ox_hi.max(ox_lo)..g.wo {
                dw_px::<V>(g, kh, kw, xc, wc, b, yc, iy0, ky_lo, ky_hi, ox, n);
            }
            c0 += l;
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_rows<V: Vf>(
    g: &NhwcConvGeom,
    x: *const f32,
    y: *mut f32,
    wt: *const f32,
    bias: *const f32,
    r0: usize,
    r1: usize,
) {
    match (g.kh, g.kw) {
        (3, 3) => dw_rows_k::<V>(g, 3, 3, x, y, wt, bias, r0, r1),
        (5, 5) => dw_rows_k::<V>(g, 5, 5, x, y, wt, bias, r0, r1),
        (1, 5) => dw_rows_k::<V>(g, 1, 5, x, y, wt, bias, r0, r1),
        (5, 1) => dw_rows_k::<V>(g, 5, 1, x, y, wt, bias, r0, r1),
        (7, 7) => dw_rows_k::<V>(g, 7, 7, x, y, wt, bias, r0, r1),
        (kh, kw) => dw_rows_k::<V>(g, kh, kw, x, y, wt, bias, r0, r1),
    }
}

simd_fn!(pub fn depthwise => dw_rows(g: &NhwcConvGeom, x: *const f32, y: *mut f32, wt: *const f32, bias: *const f32, r0: usize, r1: usize));

/// `NB` output vectors (channels c0..) of `P` pixels from column `ox`, taps [ky.0, ky.1) x all
/// kx inside the input row: each input value is broadcast once for all NB vectors.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dense_run<V: Vf, const P: usize, const NB: usize>(
    g: &NhwcConvGeom,
    xrow0: *const f32,
    wt: *const f32,
    bias: *const f32,
    yr: *mut f32,
    ox: usize,
    c0: usize,
    ky: (usize, usize),
) {
    let (l, cp, s) = (V::L, g.cp, g.stride);
    let mut acc = [[V::zero(); NB]; P];
    for j in 0..NB {
        let b = V::load(bias.add(c0 + j * l));
        for a in acc.iter_mut() {
            a[j] = b;
        }
    }
    let ix0 = ox * s - g.pw;
    for ky in ky.0..ky.1 {
        let xr = xrow0.wrapping_add((ky * g.w + ix0) * g.ldx);
        for kx in 0..g.kw {
            let wp = wt.add((ky * g.kw + kx) * g.cin * cp + c0);
            for ci in 0..g.cin {
                let mut wv = [V::zero(); NB];
                for (j, w) in wv.iter_mut().enumerate() {
                    *w = V::load(wp.add(ci * cp + j * l));
                }
                for (p, a) in acc.iter_mut().enumerate() {
                    let xv = V::splat(*xr.add((kx + p * s) * g.ldx + ci));
                    for j in 0..NB {
                        a[j] = V::fma(xv, wv[j], a[j]);
                    }
                }
            }
        }
    }
    for (p, a) in acc.iter().enumerate() {
        for (j, v) in a.iter().enumerate() {
            let c = c0 + j * l;
            if c < g.cout {
                store_act(*v, g.act, yr.add((ox + p) * g.ldy + c), (g.cout - c).min(l));
            }
        }
    }
}

/// Dense direct conv (groups 1, any kernel/stride), output rows [r0, r1). Weights packed
/// [kh][kw][cin][cp], bias [cp]. Used for the stem (3 input channels): four pixels and up to
/// three output vectors at a time where the taps lie inside the row, so independent FMA chains
/// hide the latency and each input value is broadcast once.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dense_rows<V: Vf>(
    g: &NhwcConvGeom,
    x: *const f32,
    y: *mut f32,
    wt: *const f32,
    bias: *const f32,
    r0: usize,
    r1: usize,
) {
    let (l, cp, s) = (V::L, g.cp, g.stride);
    let (ox_lo, ox_hi) = g.interior_cols(g.kw);
    for r in r0..r1 {
        let (img, oy) = (r / g.ho, r % g.ho);
        let xi = x.add(img * g.h * g.w * g.ldx);
        let yr = y.add(r * g.wo * g.ldy);
        let iy0 = (oy * s) as isize - g.ph as isize;
        let (ky_lo, ky_hi) = taps(iy0, g.kh, g.h);
        let xrow0 = xi.wrapping_offset(iy0 * (g.w * g.ldx) as isize);
        let ky = (ky_lo, ky_hi);
        let mut c0 = 0;
        while c0 < g.cout {
            let nb = (g.cout - c0).div_ceil(l).min(3);
            let mut ox = ox_lo;
            while ox + 4 <= ox_hi {
                match nb {
                    1 => dense_run::<V, 4, 1>(g, xrow0, wt, bias, yr, ox, c0, ky),
                    2 => dense_run::<V, 4, 2>(g, xrow0, wt, bias, yr, ox, c0, ky),
                    _ => dense_run::<V, 4, 3>(g, xrow0, wt, bias, yr, ox, c0, ky),
                }
                ox += 4;
            }
            while ox < ox_hi {
                match nb {
                    1 => dense_run::<V, 1, 1>(g, xrow0, wt, bias, yr, ox, c0, ky),
                    2 => dense_run::<V, 1, 2>(g, xrow0, wt, bias, yr, ox, c0, ky),
                    _ => dense_run::<V, 1, 3>(g, xrow0, wt, bias, yr, ox, c0, ky),
                }
                ox += 1;
            }
            c0 += nb * l;
        }
        // Border pixels: one pixel, one vector at a time, taps checked.
        for ox in (0..ox_lo).chain(ox_hi.max(ox_lo)..g.wo) {
            let ix0 = (ox * s) as isize - g.pw as isize;
            let (kx_lo, kx_hi) = taps(ix0, g.kw, g.w);
            let mut c0 = 0;
            while c0 < g.cout {
                let mut acc = V::load(bias.add(c0));
                for ky in ky_lo..ky_hi {
                    for kx in kx_lo..kx_hi {
                        let xp = xi.offset(
                            ((iy0 + ky as isize) * g.w as isize + ix0 + kx as isize)
                                * g.ldx as isize,
                        );
                        let wp = wt.add((ky * g.kw + kx) * g.cin * cp + c0);
                        for ci in 0..g.cin {
                            acc = V::fma(V::splat(*xp.add(ci)), V::load(wp.add(ci * cp)), acc);
                        }
                    }
                }
                store_act(acc, g.act, yr.add(ox * g.ldy + c0), (g.cout - c0).min(l));
                c0 += l;
            }
        }
    }
}

simd_fn!(pub fn dense => dense_rows(g: &NhwcConvGeom, x: *const f32, y: *mut f32, wt: *const f32, bias: *const f32, r0: usize, r1: usize));

/// A 1x1 conv / linear layer as a GEMM over pixels: y[m, :] = act(x[m, :] W + b).
#[derive(Clone, Copy, Debug)]
pub struct PwGeom {
    pub k: usize,
    pub n: usize,
    pub ldx: usize,
    pub ldy: usize,
    /// Panel width of the packed weights (1, 2 or 3 vectors of the ISA).
    pub nr: usize,
    pub act: Act,
}

/// MR rows x NV vectors of output, the whole K loop in registers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pw_tile<V: Vf, const MR: usize, const NV: usize>(
    g: &PwGeom,
    x: *const f32,
    bp: *const f32,
    bias: *const f32,
    y: *mut f32,
    ncols: usize,
) {
    let l = V::L;
    let mut acc = [[V::zero(); NV]; MR];
    for j in 0..NV {
        let b = V::load(bias.add(j * l));
        for row in acc.iter_mut() {
            row[j] = b;
        }
    }
    let mut xp = [x; MR];
    for (r, p) in xp.iter_mut().enumerate() {
        *p = x.add(r * g.ldx);
    }
    let mut b = bp;
    for kk in 0..g.k {
        let mut bv = [V::zero(); NV];
        for (j, v) in bv.iter_mut().enumerate() {
            *v = V::load(b.add(j * l));
        }
        for r in 0..MR {
            let a = V::splat(*xp[r].add(kk));
            for j in 0..NV {
                acc[r][j] = V::fma(a, bv[j], acc[r][j]);
            }
        }
        b = b.add(NV * l);
    }
    for (r, row) in acc.iter().enumerate() {
        let yr = y.add(r * g.ldy);
        for (j, &v) in row.iter().enumerate() {
            let c0 = j * l;
            if c0 < ncols {
                store_act(v, g.act, yr.add(c0), ncols - c0);
            }
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pw_block<V: Vf, const MR: usize, const NV: usize>(
    g: &PwGeom,
    x: *const f32,
    y: *mut f32,
    packed: *const f32,
    bias: *const f32,
    m0: usize,
    m1: usize,
    p0: usize,
    p1: usize,
) {
    let nr = NV * V::L;
    // Row blocks whose inputs stay in L1/L2 while every panel passes over them.
    let mb = (8192 / g.k.max(1)).max(MR).div_ceil(MR) * MR;
    let mut i0 = m0;
    while i0 < m1 {
        let i1 = (i0 + mb).min(m1);
        for p in p0..p1 {
            let bp = packed.add(p * g.k * nr);
            let bb = bias.add(p * nr);
            let ncols = (g.n - p * nr).min(nr);
            let yp = y.add(p * nr);
            let mut i = i0;
            while i + MR <= i1 {
                pw_tile::<V, MR, NV>(g, x.add(i * g.ldx), bp, bb, yp.add(i * g.ldy), ncols);
                i += MR;
            }
            // Remainder rows in smaller tiles (a one-row tile is one long dependency chain).
            if MR > 8 && i + 8 <= i1 {
                pw_tile::<V, 8, NV>(g, x.add(i * g.ldx), bp, bb, yp.add(i * g.ldy), ncols);
                i += 8;
            }
            if MR > 4 && i + 4 <= i1 {
                pw_tile::<V, 4, NV>(g, x.add(i * g.ldx), bp, bb, yp.add(i * g.ldy), ncols);
                i += 4;
            }
            if MR > 2 && i + 2 <= i1 {
                pw_tile::<V, 2, NV>(g, x.add(i * g.ldx), bp, bb, yp.add(i * g.ldy), ncols);
                i += 2;
            }
            if i < i1 {
                pw_tile::<V, 1, NV>(g, x.add(i * g.ldx), bp, bb, yp.add(i * g.ldy), ncols);
            }
        }
        i0 = i1;
    }
}

/// Rows [m0, m1) and weight panels [p0, p1) of a pointwise conv. Packed weights: panel p holds
/// columns [p*nr, (p+1)*nr) as [k][nr]; bias padded to the panels.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pw_rows<V: Vf>(
    g: &PwGeom,
    x: *const f32,
    y: *mut f32,
    packed: *const f32,
    bias: *const f32,
    m0: usize,
    m1: usize,
    p0: usize,
    p1: usize,
) {
    let nv = g.nr / V::L;
    // MR x NV accumulators + NV weight vectors + a broadcast must fit the register file.
    match (V::REGS >= 32, nv) {
        (true, 3) => pw_block::<V, 8, 3>(g, x, y, packed, bias, m0, m1, p0, p1),
        (true, 2) => pw_block::<V, 12, 2>(g, x, y, packed, bias, m0, m1, p0, p1),
        (true, _) => pw_block::<V, 8, 1>(g, x, y, packed, bias, m0, m1, p0, p1),
        (false, 3) => pw_block::<V, 4, 3>(g, x, y, packed, bias, m0, m1, p0, p1),
        (false, 2) => pw_block::<V, 6, 2>(g, x, y, packed, bias, m0, m1, p0, p1),
        _ => pw_block::<V, 8, 1>(g, x, y, packed, bias, m0, m1, p0, p1),
    }
}

simd_fn!(pub fn pointwise => pw_rows(g: &PwGeom, x: *const f32, y: *mut f32, packed: *const f32, bias: *const f32, m0: usize, m1: usize, p0: usize, p1: usize));

/// Elementwise over pixel ranges of strided maps.
#[derive(Clone, Copy, Debug)]
pub struct EwGeom {
    pub c: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldy: usize,
}

/// y = act(a + b) for pixels [p0, p1).
#[inline(always)]
unsafe fn add_px<V: Vf>(
    g: &EwGeom,
    a: *const f32,
    b: *const f32,
    y: *mut f32,
    act: Act,
    p0: usize,
    p1: usize,
) {
    for p in p0..p1 {
        let (ap, bp, yp) = (a.add(p * g.lda), b.add(p * g.ldb), y.add(p * g.ldy));
        let mut c0 = 0;
        while c0 < g.c {
            let v = V::add(V::load(ap.add(c0)), V::load(bp.add(c0)));
            store_act(v, act, yp.add(c0), (g.c - c0).min(V::L));
            c0 += V::L;
        }
    }
}

simd_fn!(pub fn add => add_px(g: &EwGeom, a: *const f32, b: *const f32, y: *mut f32, act: Act, p0: usize, p1: usize));

/// y[img, oy, ox, :] = x[img, oy, ox, :] * s(img, oy, ox) for output rows [r0, r1) of images of
/// `h x w`: s is `g` at the nearest source pixel (`iy`, `ix` index tables; `gh x gw` gate maps),
/// or a per-image channel vector when gh = gw = 1 (SE).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gate_rows<V: Vf>(
    e: &EwGeom,
    h: usize,
    w: usize,
    gate_hw: (usize, usize),
    iy: *const usize,
    ix: *const usize,
    x: *const f32,
    gt: *const f32,
    y: *mut f32,
    r0: usize,
    r1: usize,
) {
    let (gh, gw) = gate_hw;
    for r in r0..r1 {
        let (img, oy) = (r / h, r % h);
        let grow = gt.add((img * gh + *iy.add(oy)) * gw * e.ldb);
        for ox in 0..w {
            let p = r * w + ox;
            let (xp, yp) = (x.add(p * e.lda), y.add(p * e.ldy));
            let gp = grow.add(*ix.add(ox) * e.ldb);
            let mut c0 = 0;
            while c0 < e.c {
                let v = V::mul(V::load(xp.add(c0)), V::load(gp.add(c0)));
                store_act(v, Act::None, yp.add(c0), (e.c - c0).min(V::L));
                c0 += V::L;
            }
        }
    }
}

simd_fn!(pub fn gate => gate_rows(e: &EwGeom, h: usize, w: usize, gate_hw: (usize, usize), iy: *const usize, ix: *const usize, x: *const f32, gt: *const f32, y: *mut f32, r0: usize, r1: usize));

/// 2x2 average pool (stride 2) for output rows [r0, r1) of images `h x w` -> `h/2 x w/2`;
/// `e.lda` input pixel stride, `e.ldy` output pixel stride.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn avgpool_rows<V: Vf>(
    e: &EwGeom,
    h: usize,
    w: usize,
    x: *const f32,
    y: *mut f32,
    r0: usize,
    r1: usize,
) {
    let (ho, wo) = (h / 2, w / 2);
    let q = V::splat(0.25);
    for r in r0..r1 {
        let (img, oy) = (r / ho, r % ho);
        let row0 = x.add((img * h + 2 * oy) * w * e.lda);
        let row1 = row0.add(w * e.lda);
        for ox in 0..wo {
            let (a, b) = (row0.add(2 * ox * e.lda), row1.add(2 * ox * e.lda));
            let yp = y.add((r * wo + ox) * e.ldy);
            let mut c0 = 0;
            while c0 < e.c {
                let s = V::add(
                    V::add(V::load(a.add(c0)), V::load(a.add(e.lda + c0))),
                    V::add(V::load(b.add(c0)), V::load(b.add(e.lda + c0))),
                );
                store_act(V::mul(s, q), Act::None, yp.add(c0), (e.c - c0).min(V::L));
                c0 += V::L;
            }
        }
    }
}

simd_fn!(pub fn avgpool2x2 => avgpool_rows(e: &EwGeom, h: usize, w: usize, x: *const f32, y: *mut f32, r0: usize, r1: usize));

/// Mean over `hw` pixels of images [i0, i1): y[img, c] (pixel stride `e.ldy` per image).
#[inline(always)]
unsafe fn gap_images<V: Vf>(
    e: &EwGeom,
    hw: usize,
    x: *const f32,
    y: *mut f32,
    i0: usize,
    i1: usize,
) {
    let inv = V::splat(1.0 / hw as f32);
    for img in i0..i1 {
        let xi = x.add(img * hw * e.lda);
        let mut c0 = 0;
        while c0 < e.c {
            // Two accumulators: the adds of consecutive pixels do not wait on each other.
            let (mut a0, mut a1) = (V::zero(), V::zero());
            let mut p = 0;
            while p + 2 <= hw {
                a0 = V::add(a0, V::load(xi.add(p * e.lda + c0)));
                a1 = V::add(a1, V::load(xi.add((p + 1) * e.lda + c0)));
                p += 2;
            }
            if p < hw {
                a0 = V::add(a0, V::load(xi.add(p * e.lda + c0)));
            }
            let m = V::mul(V::add(a0, a1), inv);
            store_act(m, Act::None, y.add(img * e.ldy + c0), (e.c - c0).min(V::L));
            c0 += V::L;
        }
    }
}

simd_fn!(pub fn global_avg_pool => gap_images(e: &EwGeom, hw: usize, x: *const f32, y: *mut f32, i0: usize, i1: usize));
