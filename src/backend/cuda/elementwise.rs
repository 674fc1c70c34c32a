//! Launchers of cuda/elementwise.cu: copies and fills, the activations and their gradients,
//! add/mul/scale, per-channel products and sums, row sums and the EMA blend. NCHW f32 buffers,
//! the argument conventions of the CPU kernels (`backend::cpu`), so that tests compare the two
//! one to one.

use super::device::{DBuf, Gpu};
use super::launch::{blocks, i32a, i64a, need, ptr, Arg};
use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;

impl Gpu {
    fn unary(&self, name: &'static str, x: &DBuf) -> Result<DBuf> {
        let n = x.len();
        let y = self.alloc(n)?;
        self.launch(
            "elementwise",
            name,
            self.grid(n),
            &[ptr(x), ptr(&y), i64a(n)],
        )?;
        Ok(y)
    }

    /// An elementwise kernel `name(a, b, y, n)` of two equal-length inputs.
    pub(crate) fn binary(&self, name: &'static str, a: &DBuf, b: &DBuf) -> Result<DBuf> {
        ensure!(
            a.len() == b.len(),
            "{name}: lengths {} and {}",
            a.len(),
            b.len()
        );
        let n = a.len();
        let y = self.alloc(n)?;
        self.launch(
            "elementwise",
            name,
            self.grid(n),
            &[ptr(a), ptr(b), ptr(&y), i64a(n)],
        )?;
        Ok(y)
    }

    /// dst = src (same lengths; views included).
    pub fn copy_into(&self, src: &DBuf, dst: &mut DBuf) -> Result<()> {
        ensure!(
            src.len() == dst.len(),
            "copy of {} values into {}",
            src.len(),
            dst.len()
        );
        let n = src.len();
        self.launch(
            "elementwise",
            "copy_f32",
            self.grid(n),
            &[ptr(src), ptr(dst), i64a(n)],
        )
    }

    /// Copies many buffers (or views) into places of one buffer in a single launch:
    /// `dst[off..off + src.len()] = src` for every `(src, off)`. The flat gradient of a network
    /// of ~2,000 tensors is one launch, not one each.
    pub fn copy_segments(&self, segments: &[(&DBuf, usize)], dst: &mut DBuf) -> Result<()> {
        if segments.is_empty() {
            return Ok(());
        }
        let mut table = vec![0i64; 3 * segments.len()];
        let n = segments.len();
        for (i, (src, off)) in segments.iter().enumerate() {
            need("copy_segments destination", dst, off + src.len())?;
            table[i] = src.device_ptr() as i64;
            table[n + i] = *off as i64;
            table[2 * n + i] = src.len() as i64;
        }
        let t = self.upload_i64(&table)?;
        let blocks = n.min(self.multiprocessors() as usize * 16).max(1);
        let src_bytes: usize = segments.iter().map(|(s, _)| 4 * s.len()).sum();
        crate::backend::trace::add_indirect(src_bytes as u64, 0);
        self.launch(
            "elementwise",
            "copy_segments",
            LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                ptr(&t.view(0, n)),
                ptr(&t.view(n, n)),
                ptr(&t.view(2 * n, n)),
                ptr(dst),
                i32a(n),
            ],
        )
    }

    pub fn fill(&self, y: &mut DBuf, v: f32) -> Result<()> {
        let n = y.len();
        self.launch(
            "elementwise",
            "fill_f32",
            self.grid(n),
            &[ptr(y), Arg::F32(v), i64a(n)],
        )
    }

    pub fn relu(&self, x: &DBuf) -> Result<DBuf> {
        self.unary("relu_fwd", x)
    }
    /// Gradient of relu from its input.
    pub fn relu_backward(&self, x: &DBuf, gy: &DBuf) -> Result<DBuf> {
        self.binary("relu_bwd", x, gy)
    }
    pub fn sigmoid(&self, x: &DBuf) -> Result<DBuf> {
        self.unary("sigmoid_fwd", x)
    }
    /// Gradient of sigmoid from its output.
    pub fn sigmoid_backward(&self, y: &DBuf, gy: &DBuf) -> Result<DBuf> {
        self.binary("sigmoid_bwd", y, gy)
    }
    pub fn hard_sigmoid(&self, x: &DBuf) -> Result<DBuf> {
        self.unary("hard_sigmoid_fwd", x)
    }
    pub fn hard_sigmoid_backward(&self, x: &DBuf, gy: &DBuf) -> Result<DBuf> {
        self.binary("hard_sigmoid_bwd", x, gy)
    }
    pub fn add(&self, a: &DBuf, b: &DBuf) -> Result<DBuf> {
        self.binary("add_fwd", a, b)
    }
    /// Elementwise product; also both gradients of `mul` (gy * other).
    pub fn mul(&self, a: &DBuf, b: &DBuf) -> Result<DBuf> {
        self.binary("mul_fwd", a, b)
    }
    /// y += x
    pub fn add_assign(&self, y: &mut DBuf, x: &DBuf) -> Result<()> {
        ensure!(y.len() == x.len(), "add_assign: lengths differ");
        let n = y.len();
        self.launch(
            "elementwise",
            "add_inplace",
            self.grid(n),
            &[ptr(y), ptr(x), i64a(n)],
        )
    }
    pub fn scale(&self, x: &DBuf, a: f32) -> Result<DBuf> {
        let n = x.len();
        let y = self.alloc(n)?;
        self.launch(
            "elementwise",
            "scale_fwd",
            self.grid(n),
            &[ptr(x), Arg::F32(a), ptr(&y), i64a(n)],
        )?;
        Ok(y)
    }

    /// `y = x * s[n, c]` broadcast over each plane of `hw` values; with x := gy it is also the
    /// input gradient.
    pub fn mul_channel(&self, x: &DBuf, s: &DBuf, hw: usize) -> Result<DBuf> {
        ensure!(
            hw > 0 && x.len() == s.len() * hw,
            "mul_channel: {} values vs {} scales x {hw}",
            x.len(),
            s.len()
        );
        let n = x.len();
        let y = self.alloc(n)?;
        self.launch(
            "elementwise",
            "mul_channel_fwd",
            self.grid(n),
            &[ptr(x), ptr(s), ptr(&y), i64a(hw), i64a(n)],
        )?;
        Ok(y)
    }

    /// The scale gradient of `mul_channel`: per plane sum of gy * x.
    pub fn mul_channel_backward_scale(&self, gy: &DBuf, x: &DBuf, hw: usize) -> Result<DBuf> {
        ensure!(
            hw > 0 && gy.len() == x.len() && x.len().is_multiple_of(hw),
            "mul_channel backward shapes"
        );
        let planes = x.len() / hw;
        let ds = self.alloc(planes)?;
        self.launch(
            "elementwise",
            "mul_channel_bwd_ds",
            blocks(planes, 1, 1),
            &[ptr(gy), ptr(x), ptr(&ds), i32a(hw)],
        )?;
        Ok(ds)
    }

    /// Per-channel sums of an [N, C, HW] tensor (bias gradients).
    pub fn channel_sums(&self, a: &DBuf, (n, c, hw): (usize, usize, usize)) -> Result<DBuf> {
        need("channel_sums", a, n * c * hw)?;
        let s = self.splits(c, n * hw);
        let part = self.alloc_f64(c * s)?;
        self.launch(
            "elementwise",
            "chan_sum_partial",
            blocks(c, s, 1),
            &[ptr(a), i32a(n), i32a(c), i32a(hw), ptr(&part)],
        )?;
        let out = self.alloc(c)?;
        self.launch(
            "elementwise",
            "chan_sum_finalize",
            self.grid(c),
            &[ptr(&part), i32a(s), i32a(c), ptr(&out)],
        )?;
        Ok(out)
    }

    /// out[k] = sum_r a[r, k] for an [R, K] matrix.
    pub fn sum_rows(&self, a: &DBuf, r: usize, k: usize) -> Result<DBuf> {
        need("sum_rows", a, r * k)?;
        let out = self.alloc(k)?;
        self.launch(
            "elementwise",
            "sum_rows",
            self.grid(k),
            &[ptr(a), i32a(r), i64a(k), ptr(&out)],
        )?;
        Ok(out)
    }

    /// EMA of a flat buffer: e = d e + (1 - d) x (d and 1 - d rounded to f32 as on the CPU).
    pub fn ema_blend(&self, e: &mut DBuf, x: &DBuf, d: f64) -> Result<()> {
        ensure!(e.len() == x.len(), "ema_blend: lengths differ");
        let n = e.len();
        self.launch(
            "elementwise",
            "ema_blend",
            self.grid(n),
            &[
                ptr(e),
                ptr(x),
                Arg::F32(d as f32),
                Arg::F32((1.0 - d) as f32),
                i64a(n),
            ],
        )
    }

    /// min(max(x, 0), 6).
    pub fn relu6(&self, x: &DBuf) -> Result<DBuf> {
        let n = x.len();
        let y = self.alloc(n)?;
        self.launch(
            "elementwise",
            "relu6_fwd",
            self.grid(n),
            &[ptr(x), ptr(&y), i64a(n)],
        )?;
        Ok(y)
    }

    /// Gradient of relu6 from its input: gy strictly inside (0, 6), 0 elsewhere.
    pub fn relu6_backward(&self, x: &DBuf, gy: &DBuf) -> Result<DBuf> {
        self.binary("relu6_bwd", x, gy)
    }
}
