// Pooling, nearest upsample and channel concat (src/ops/pool.rs, concat.rs). Backward passes
// gather (one thread per input element), so no atomics and reproducible sums.

extern "C" __global__ void avg_pool2x2_fwd(const float* __restrict__ x, float* __restrict__ y,
                                           long long NC, int H, int W) {
  const int Ho = H / 2, Wo = W / 2;
  const long long total = NC * Ho * Wo;
  GS_LOOP(i, total) {
    const int ox = (int)(i % Wo);
    const int oy = (int)((i / Wo) % Ho);
    const long long nc = i / ((long long)Ho * Wo);
    const float* r0 = x + (nc * H + 2 * oy) * W;
    const float* r1 = r0 + W;
    y[i] = (r0[2 * ox] + r0[2 * ox + 1] + r1[2 * ox] + r1[2 * ox + 1]) * 0.25f;
  }
}

// Rows/columns past 2*(H/2) (odd sizes) get no gradient, as in the CPU op.
extern "C" __global__ void avg_pool2x2_bwd(const float* __restrict__ gy, float* __restrict__ dx,
                                           long long NC, int H, int W) {
  const int Ho = H / 2, Wo = W / 2;
  const long long total = NC * H * W;
  GS_LOOP(i, total) {
    const int ix = (int)(i % W);
    const int iy = (int)((i / W) % H);
    const long long nc = i / ((long long)H * W);
    const int oy = iy / 2, ox = ix / 2;
    dx[i] = (oy < Ho && ox < Wo) ? gy[(nc * Ho + oy) * Wo + ox] * 0.25f : 0.0f;
  }
}

// Mean over each plane: one warp per (n, c).
extern "C" __global__ void global_avg_pool_fwd(const float* __restrict__ x, float* __restrict__ y,
                                               long long NC, int HW, float inv) {
  const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= NC) return;
  const float* p = x + warp * HW;
  float s = 0.0f;
  for (int i = lane; i < HW; i += 32) s += p[i];
  s = warp_sum_f(s);
  if (lane == 0) y[warp] = s * inv;
}

extern "C" __global__ void global_avg_pool_bwd(const float* __restrict__ gy, float* __restrict__ dx,
                                               long long NC, int HW, float inv) {
  GS_LOOP(i, NC * HW) dx[i] = gy[i / HW] * inv;
}

// Nearest upsample with precomputed source indices (PyTorch's legacy rule, computed on the host).
extern "C" __global__ void upsample_nearest_fwd(const float* __restrict__ x, float* __restrict__ y,
                                                const int* __restrict__ iy,
                                                const int* __restrict__ ix, long long NC, int H,
                                                int W, int Ho, int Wo) {
  const long long total = NC * Ho * Wo;
  GS_LOOP(i, total) {
    const int ox = (int)(i % Wo);
    const int oy = (int)((i / Wo) % Ho);
    const long long nc = i / ((long long)Ho * Wo);
    y[i] = x[(nc * H + iy[oy]) * W + ix[ox]];
  }
}

// The source indices are non-decreasing, so the outputs that read input row sy are the range
// [ry0[sy], ry1[sy]) (same for columns): each input sums its own block of gy.
extern "C" __global__ void upsample_nearest_bwd(const float* __restrict__ gy, float* __restrict__ dx,
                                                const int* __restrict__ ry0,
                                                const int* __restrict__ ry1,
                                                const int* __restrict__ rx0,
                                                const int* __restrict__ rx1, long long NC, int H,
                                                int W, int Ho, int Wo) {
  const long long total = NC * H * W;
  GS_LOOP(i, total) {
    const int sx = (int)(i % W);
    const int sy = (int)((i / W) % H);
    const long long nc = i / ((long long)H * W);
    const float* gp = gy + nc * Ho * Wo;
    float acc = 0.0f;
    for (int oy = ry0[sy]; oy < ry1[sy]; ++oy)
      for (int ox = rx0[sx]; ox < rx1[sx]; ++ox) acc += gp[oy * Wo + ox];
    dx[i] = acc;
  }
}

// y = [a, b] along channels: a [N, ca, HW], b [N, cb, HW].
extern "C" __global__ void concat2_fwd(const float* __restrict__ a, const float* __restrict__ b,
                                       float* __restrict__ y, int N, int ca, int cb, long long HW) {
  const long long pa = ca * HW, pb = cb * HW;
  GS_LOOP(i, (long long)N * (pa + pb)) {
    const long long n = i / (pa + pb), r = i - n * (pa + pb);
    y[i] = r < pa ? a[n * pa + r] : b[n * pb + (r - pa)];
  }
}

extern "C" __global__ void concat2_bwd(const float* __restrict__ gy, float* __restrict__ ga,
                                       float* __restrict__ gb, int N, int ca, int cb, long long HW) {
  const long long pa = ca * HW, pb = cb * HW;
  GS_LOOP(i, (long long)N * (pa + pb)) {
    const long long n = i / (pa + pb), r = i - n * (pa + pb);
    if (r < pa) {
      if (ga) ga[n * pa + r] = gy[i];
    } else if (gb) {
      gb[n * pb + (r - pa)] = gy[i];
    }
  }
}

// max_pool2d (src/ops/max_pool.rs): k x k windows, stride s, padding p (padding counts as
// -inf). Each output keeps the flat in-plane index of its window's first maximum in row-major
// order (a NaN always takes over), the CPU op's rule, so the backward routes the same way.
extern "C" __global__ void max_pool2d_fwd(const float* __restrict__ x, float* __restrict__ y,
                                          int* __restrict__ arg, long long NC, int H, int W,
                                          int Ho, int Wo, int k, int s, int p) {
  const long long total = NC * Ho * Wo;
  GS_LOOP(i, total) {
    const int ox = (int)(i % Wo);
    const int oy = (int)((i / Wo) % Ho);
    const long long nc = i / ((long long)Ho * Wo);
    const float* plane = x + nc * H * W;
    const int y0 = oy * s - p, x0 = ox * s - p;
    // `at < 0` takes the first in-bounds value, so best needs no -inf start.
    float best = 0.0f;
    int at = -1;
    for (int ky = 0; ky < k; ++ky) {
      const int iy = y0 + ky;
      if (iy < 0 || iy >= H) continue;
      for (int kx = 0; kx < k; ++kx) {
        const int ix = x0 + kx;
        if (ix < 0 || ix >= W) continue;
        const int j = iy * W + ix;
        const float v = plane[j];
        if (v > best || v != v || at < 0) {
          best = v;
          at = j;
        }
      }
    }
    y[i] = best;
    arg[i] = at;
  }
}

// Gather: one thread per input element sums gy over the outputs whose window holds it and
// chose it, in row-major output order (the CPU op's order of additions).
extern "C" __global__ void max_pool2d_bwd(const float* __restrict__ gy, const int* __restrict__ arg,
                                          float* __restrict__ dx, long long NC, int H, int W,
                                          int Ho, int Wo, int k, int s, int p) {
  const long long total = NC * H * W;
  GS_LOOP(i, total) {
    const int ix = (int)(i % W);
    const int iy = (int)((i / W) % H);
    const long long nc = i / ((long long)H * W);
    const int j = iy * W + ix;
    // Outputs o with o*s - p <= i <= o*s - p + k - 1.
    // ceil((i + p - k + 1) / s) clamped at 0 (C division truncates: only a negative start,
    // clamped anyway, differs from the ceiling), and floor((i + p) / s) clamped at Ho - 1.
    int oy0 = (iy + p - k + s) / s, oy1 = (iy + p) / s;
    int ox0 = (ix + p - k + s) / s, ox1 = (ix + p) / s;
    oy0 = oy0 < 0 ? 0 : oy0;
    ox0 = ox0 < 0 ? 0 : ox0;
    oy1 = oy1 > Ho - 1 ? Ho - 1 : oy1;
    ox1 = ox1 > Wo - 1 ? Wo - 1 : ox1;
    const long long base = nc * Ho * Wo;
    float acc = 0.0f;
    for (int oy = oy0; oy <= oy1; ++oy)
      for (int ox = ox0; ox <= ox1; ++ox) {
        const long long o = base + (long long)oy * Wo + ox;
        if (arg[o] == j) acc += gy[o];
      }
    dx[i] = acc;
  }
}
