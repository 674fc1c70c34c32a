//! Launchers of cuda/pool.cu: 2x2 average pooling, global average pooling, nearest upsample,
//! two-input channel concat and max_pool2d (with the argmax it routes the gradient by).

use super::alloc::DevBuf;
use super::device::{DBuf, Gpu};
use super::launch::{i32a, i64a, need, ptr, Arg};
use crate::backend::cpu::pool::nearest_indices;
use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;

/// Output ranges [r0[s], r1[s]) that read source index s under the nearest rule.
pub(super) fn nearest_ranges(input: usize, output: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let idx = nearest_indices(input, output);
    let (mut r0, mut r1) = (vec![0i32; input], vec![0i32; input]);
    for (o, &s) in idx.iter().enumerate() {
        if r1[s] == 0 {
            r0[s] = o as i32;
        }
        r1[s] = o as i32 + 1;
    }
    (idx.iter().map(|&v| v as i32).collect(), r0, r1)
}

pub use crate::backend::api::MaxPoolGeom;

/// The sizes both upsample kernels take after their buffers.
fn upsample_dims((n, c, h, w): (usize, usize, usize, usize), (ho, wo): (usize, usize)) -> [Arg; 5] {
    [i64a(n * c), i32a(h), i32a(w), i32a(ho), i32a(wo)]
}

impl Gpu {
    // ---- pooling, upsample, concat ----

    pub fn avg_pool2x2(
        &self,
        x: &DBuf,
        (n, c, h, w): (usize, usize, usize, usize),
    ) -> Result<DBuf> {
        need("avg_pool2x2 x", x, n * c * h * w)?;
        let out = n * c * (h / 2) * (w / 2);
        ensure!(out > 0, "avg_pool2x2 on a {h}x{w} input");
        let y = self.alloc(out)?;
        self.launch(
            "pool",
            "avg_pool2x2_fwd",
            self.grid(out),
            &[ptr(x), ptr(&y), i64a(n * c), i32a(h), i32a(w)],
        )?;
        Ok(y)
    }

    pub fn avg_pool2x2_backward(
        &self,
        gy: &DBuf,
        (n, c, h, w): (usize, usize, usize, usize),
    ) -> Result<DBuf> {
        need("avg_pool2x2 gy", gy, n * c * (h / 2) * (w / 2))?;
        let dx = self.alloc(n * c * h * w)?;
        self.launch(
            "pool",
            "avg_pool2x2_bwd",
            self.grid(n * c * h * w),
            &[ptr(gy), ptr(&dx), i64a(n * c), i32a(h), i32a(w)],
        )?;
        Ok(dx)
    }

    pub fn global_avg_pool(&self, x: &DBuf, nc: usize, hw: usize) -> Result<DBuf> {
        need("global_avg_pool x", x, nc * hw)?;
        let y = self.alloc(nc)?;
        let inv = (1.0 / hw as f64) as f32;
        let warps_per_block = 8;
        let cfg = LaunchConfig {
            grid_dim: (nc.div_ceil(warps_per_block) as u32, 1, 1),
            block_dim: (32 * warps_per_block as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "pool",
            "global_avg_pool_fwd",
            cfg,
            &[ptr(x), ptr(&y), i64a(nc), i32a(hw), Arg::F32(inv)],
        )?;
        Ok(y)
    }

    pub fn global_avg_pool_backward(&self, gy: &DBuf, nc: usize, hw: usize) -> Result<DBuf> {
        need("global_avg_pool gy", gy, nc)?;
        let dx = self.alloc(nc * hw)?;
        let inv = (1.0 / hw as f64) as f32;
        self.launch(
            "pool",
            "global_avg_pool_bwd",
            self.grid(nc * hw),
            &[ptr(gy), ptr(&dx), i64a(nc), i32a(hw), Arg::F32(inv)],
        )?;
        Ok(dx)
    }

    pub fn upsample_nearest(
        &self,
        x: &DBuf,
        (n, c, h, w): (usize, usize, usize, usize),
        (ho, wo): (usize, usize),
    ) -> Result<DBuf> {
        need("upsample x", x, n * c * h * w)?;
        let (iy, _, _) = nearest_ranges(h, ho);
        let (ix, _, _) = nearest_ranges(w, wo);
        let (iy, ix) = (self.upload_i32(&iy)?, self.upload_i32(&ix)?);
        let total = n * c * ho * wo;
        let y = self.alloc(total)?;
        self.launch(
            "pool",
            "upsample_nearest_fwd",
            self.grid(total),
            &[
                &[ptr(x), ptr(&y), ptr(&iy), ptr(&ix)],
                &upsample_dims((n, c, h, w), (ho, wo))[..],
            ]
            .concat(),
        )?;
        Ok(y)
    }

    pub fn upsample_nearest_backward(
        &self,
        gy: &DBuf,
        (n, c, h, w): (usize, usize, usize, usize),
        (ho, wo): (usize, usize),
    ) -> Result<DBuf> {
        need("upsample gy", gy, n * c * ho * wo)?;
        let (_, ry0, ry1) = nearest_ranges(h, ho);
        let (_, rx0, rx1) = nearest_ranges(w, wo);
        let b = [
            self.upload_i32(&ry0)?,
            self.upload_i32(&ry1)?,
            self.upload_i32(&rx0)?,
            self.upload_i32(&rx1)?,
        ];
        let total = n * c * h * w;
        let dx = self.alloc(total)?;
        self.launch(
            "pool",
            "upsample_nearest_bwd",
            self.grid(total),
            &[
                &[ptr(gy), ptr(&dx)],
                &b.each_ref().map(ptr)[..],
                &upsample_dims((n, c, h, w), (ho, wo))[..],
            ]
            .concat(),
        )?;
        Ok(dx)
    }

    pub fn concat_channels(
        &self,
        a: &DBuf,
        b: &DBuf,
        (n, ca, cb, hw): (usize, usize, usize, usize),
    ) -> Result<DBuf> {
        need("concat a", a, n * ca * hw)?;
        need("concat b", b, n * cb * hw)?;
        let total = n * (ca + cb) * hw;
        let y = self.alloc(total)?;
        self.launch(
            "pool",
            "concat2_fwd",
            self.grid(total),
            &[
                ptr(a),
                ptr(b),
                ptr(&y),
                i32a(n),
                i32a(ca),
                i32a(cb),
                i64a(hw),
            ],
        )?;
        Ok(y)
    }

    pub fn concat_channels_backward(
        &self,
        gy: &DBuf,
        (n, ca, cb, hw): (usize, usize, usize, usize),
    ) -> Result<(DBuf, DBuf)> {
        let total = n * (ca + cb) * hw;
        need("concat gy", gy, total)?;
        let (ga, gb) = (self.alloc(n * ca * hw)?, self.alloc(n * cb * hw)?);
        self.launch(
            "pool",
            "concat2_bwd",
            self.grid(total),
            &[
                ptr(gy),
                ptr(&ga),
                ptr(&gb),
                i32a(n),
                i32a(ca),
                i32a(cb),
                i64a(hw),
            ],
        )?;
        Ok((ga, gb))
    }

    /// The pooled output and, per output, the in-plane index of the input it took.
    pub fn max_pool2d(&self, x: &DBuf, g: &MaxPoolGeom) -> Result<(DBuf, DevBuf<i32>)> {
        g.check()?;
        need("max_pool2d x", x, g.n * g.c * g.h * g.w)?;
        let (ho, wo) = g.out_hw();
        let total = g.n * g.c * ho * wo;
        let y = self.alloc(total)?;
        let arg = self.i32s.alloc(total)?;
        self.launch(
            "pool",
            "max_pool2d_fwd",
            self.grid(total),
            &[
                ptr(x),
                ptr(&y),
                ptr(&arg),
                i64a(g.n * g.c),
                i32a(g.h),
                i32a(g.w),
                i32a(ho),
                i32a(wo),
                i32a(g.k),
                i32a(g.s),
                i32a(g.p),
            ],
        )?;
        Ok((y, arg))
    }

    /// The input gradient: each output's gradient to the input it took (sums where windows
    /// overlap, in row-major output order).
    pub fn max_pool2d_backward(
        &self,
        gy: &DBuf,
        arg: &DevBuf<i32>,
        g: &MaxPoolGeom,
    ) -> Result<DBuf> {
        g.check()?;
        let (ho, wo) = g.out_hw();
        need("max_pool2d gy", gy, g.n * g.c * ho * wo)?;
        need("max_pool2d argmax", arg, g.n * g.c * ho * wo)?;
        let total = g.n * g.c * g.h * g.w;
        let dx = self.alloc(total)?;
        self.launch(
            "pool",
            "max_pool2d_bwd",
            self.grid(total),
            &[
                ptr(gy),
                ptr(arg),
                ptr(&dx),
                i64a(g.n * g.c),
                i32a(g.h),
                i32a(g.w),
                i32a(ho),
                i32a(wo),
                i32a(g.k),
                i32a(g.s),
                i32a(g.p),
            ],
        )?;
        Ok(dx)
    }
}

impl<T: crate::backend::Elem> crate::backend::api::Pool<T> for super::Cuda<T> {
    type Argmax = DevBuf<i32>;

    fn avg_pool2x2(&self, x: &DBuf, dims: crate::backend::api::Dims4) -> Result<DBuf> {
        (**self).avg_pool2x2(x, dims)
    }

    fn avg_pool2x2_backward(&self, gy: &DBuf, dims: crate::backend::api::Dims4) -> Result<DBuf> {
        (**self).avg_pool2x2_backward(gy, dims)
    }

    fn global_avg_pool(&self, x: &DBuf, nc: usize, hw: usize) -> Result<DBuf> {
        (**self).global_avg_pool(x, nc, hw)
    }

    fn global_avg_pool_backward(&self, gy: &DBuf, nc: usize, hw: usize) -> Result<DBuf> {
        (**self).global_avg_pool_backward(gy, nc, hw)
    }

    fn upsample_nearest(
        &self,
        x: &DBuf,
        dims: crate::backend::api::Dims4,
        out: (usize, usize),
    ) -> Result<DBuf> {
        (**self).upsample_nearest(x, dims, out)
    }

    fn upsample_nearest_backward(
        &self,
        gy: &DBuf,
        dims: crate::backend::api::Dims4,
        out: (usize, usize),
    ) -> Result<DBuf> {
        (**self).upsample_nearest_backward(gy, dims, out)
    }

    fn max_pool2d(&self, x: &DBuf, g: &MaxPoolGeom) -> Result<(DBuf, DevBuf<i32>)> {
        (**self).max_pool2d(x, g)
    }

    fn max_pool2d_backward(&self, gy: &DBuf, arg: &DevBuf<i32>, g: &MaxPoolGeom) -> Result<DBuf> {
        (**self).max_pool2d_backward(gy, arg, g)
    }
}
