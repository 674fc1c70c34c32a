// Convolutions (src/backend/cpu/conv.rs; weight [C_out, C_in/groups, kh, kw], NCHW).
// Depth-wise (groups == C): direct kernels for any kh x kw, stride and padding: forward and
// input gradient one thread per element (the input gradient gathers, no atomics), weight
// gradient as per-channel block reductions over S splits (grid (C, S)) and a fixed-order sum.
// Dense convs (the stem): im2col over the whole batch into [K, N*P], one cuBLAS GEMM, and a
// permute back to NCHW; backward through the same layout and a gathering col2im.

extern "C" __global__ void dw_fwd(const float* __restrict__ x, const float* __restrict__ w,
                                  const float* __restrict__ bias, float* __restrict__ y, int N,
                                  int C, int H, int W, int Ho, int Wo, int kh, int kw, int sh,
                                  int sw, int ph, int pw) {
  const long long total = (long long)N * C * Ho * Wo;
  const int kk = kh * kw;
  GS_LOOP(i, total) {
    const int ox = (int)(i % Wo);
    const int oy = (int)((i / Wo) % Ho);
    const long long nc = i / ((long long)Ho * Wo);
    const int c = (int)(nc % C);
    const float* xp = x + nc * H * W;
    const float* wc = w + (long long)c * kk;
    float acc = 0.0f;
    const int iy0 = oy * sh - ph, ix0 = ox * sw - pw;
    for (int ky = 0; ky < kh; ++ky) {
      const int iy = iy0 + ky;
      if (iy < 0 || iy >= H) continue;
      for (int kx = 0; kx < kw; ++kx) {
        const int ix = ix0 + kx;
        if (ix < 0 || ix >= W) continue;
        acc += wc[ky * kw + kx] * xp[iy * W + ix];
      }
    }
    y[i] = bias ? acc + bias[c] : acc;
  }
}

// dx[n,c,iy,ix] = sum over taps whose output (oy, ox) exists of w[ky,kx] * gy[oy, ox].
extern "C" __global__ void dw_bwd_dx(const float* __restrict__ gy, const float* __restrict__ w,
                                     float* __restrict__ dx, int N, int C, int H, int W, int Ho,
                                     int Wo, int kh, int kw, int sh, int sw, int ph, int pw) {
  const long long total = (long long)N * C * H * W;
  const int kk = kh * kw;
  GS_LOOP(i, total) {
    const int ix = (int)(i % W);
    const int iy = (int)((i / W) % H);
    const long long nc = i / ((long long)H * W);
    const int c = (int)(nc % C);
    const float* gp = gy + nc * Ho * Wo;
    const float* wc = w + (long long)c * kk;
    float acc = 0.0f;
    for (int ky = 0; ky < kh; ++ky) {
      const int ty = iy + ph - ky;
      if (ty < 0 || ty % sh) continue;
      const int oy = ty / sh;
      if (oy >= Ho) continue;
      for (int kx = 0; kx < kw; ++kx) {
        const int tx = ix + pw - kx;
        if (tx < 0 || tx % sw) continue;
        const int ox = tx / sw;
        if (ox >= Wo) continue;
        acc += wc[ky * kw + kx] * gp[oy * Wo + ox];
      }
    }
    dx[i] = acc;
  }
}

// Partial weight gradients: block (c, s) sums gy[oy,ox] * x[tap] over its share of the
// channel's N*Ho*Wo outputs, for every tap at once (kk <= MAXKK accumulators per thread).
extern "C" __global__ void dw_bwd_dw_partial(const float* __restrict__ gy,
                                             const float* __restrict__ x, int N, int C, int H,
                                             int W, int Ho, int Wo, int kh, int kw, int sh,
                                             int sw, int ph, int pw,
                                             double* __restrict__ partial) {
  const int c = blockIdx.x;
  const int kk = kh * kw;
  const long long P = (long long)Ho * Wo;
  const long long m = (long long)N * P;
  float acc[MAXKK];
#pragma unroll
  for (int t = 0; t < MAXKK; ++t) acc[t] = 0.0f;
  SPLIT_LOOP(i, m) {
    const long long n = i / P;
    const int p = (int)(i - n * P);
    const int oy = p / Wo, ox = p - (p / Wo) * Wo;
    const long long nc = n * C + c;
    const float g = gy[nc * P + p];
    const float* xp = x + nc * H * W;
    const int iy0 = oy * sh - ph, ix0 = ox * sw - pw;
#pragma unroll
    for (int t = 0; t < MAXKK; ++t) {
      if (t < kk) {
        const int ky = t / kw, kx = t - (t / kw) * kw;
        const int iy = iy0 + ky, ix = ix0 + kx;
        if (iy >= 0 && iy < H && ix >= 0 && ix < W) acc[t] += g * xp[iy * W + ix];
      }
    }
  }
  const long long o = ((long long)c * gridDim.y + blockIdx.y) * kk;
#pragma unroll
  for (int t = 0; t < MAXKK; ++t) {
    if (t < kk) {
      const double s = block_sum_d((double)acc[t]);
      if (threadIdx.x == 0) partial[o + t] = s;
    }
  }
}

// dw[c, t] = sum over the S splits (fixed order).
extern "C" __global__ void dw_bwd_dw_finalize(const double* __restrict__ partial, int S, int C,
                                              int kk, float* __restrict__ dw) {
  GS_LOOP(i, (long long)C * kk) {
    const long long c = i / kk, t = i - c * kk;
    double s = 0.0;
    for (int j = 0; j < S; ++j) s += partial[(c * S + j) * kk + t];
    dw[i] = (float)s;
  }
}

// col[(ci*kh + ky)*kw + kx, n*P + oy*Wo + ox] = x[n, ci, oy*sh + ky - ph, ox*sw + kx - pw] (0 outside).
extern "C" __global__ void im2col(const float* __restrict__ x, float* __restrict__ col, int N,
                                  int C, int H, int W, int Ho, int Wo, int kh, int kw, int sh,
                                  int sw, int ph, int pw) {
  const long long P = (long long)Ho * Wo;
  const long long NP = N * P;
  const long long total = (long long)C * kh * kw * NP;
  GS_LOOP(i, total) {
    const long long q = i % NP;
    const long long k = i / NP;
    const long long n = q / P;
    const int p = (int)(q - n * P);
    const int oy = p / Wo, ox = p - (p / Wo) * Wo;
    const int kx = (int)(k % kw), ky = (int)((k / kw) % kh), ci = (int)(k / ((long long)kh * kw));
    const int iy = oy * sh + ky - ph, ix = ox * sw + kx - pw;
    col[i] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? x[((n * C + ci) * H + iy) * W + ix] : 0.0f;
  }
}

// The adjoint of im2col as a gather: dx[n, ci, iy, ix] = sum of the col entries that read it.
extern "C" __global__ void col2im(const float* __restrict__ col, float* __restrict__ dx, int N,
                                  int C, int H, int W, int Ho, int Wo, int kh, int kw, int sh,
                                  int sw, int ph, int pw) {
  const long long P = (long long)Ho * Wo;
  const long long NP = N * P;
  const long long total = (long long)N * C * H * W;
  GS_LOOP(i, total) {
    const int ix = (int)(i % W);
    const int iy = (int)((i / W) % H);
    const long long nc = i / ((long long)H * W);
    const int ci = (int)(nc % C);
    const long long n = nc / C;
    float acc = 0.0f;
    for (int ky = 0; ky < kh; ++ky) {
      const int ty = iy + ph - ky;
      if (ty < 0 || ty % sh) continue;
      const int oy = ty / sh;
      if (oy >= Ho) continue;
      for (int kx = 0; kx < kw; ++kx) {
        const int tx = ix + pw - kx;
        if (tx < 0 || tx % sw) continue;
        const int ox = tx / sw;
        if (ox >= Wo) continue;
        const long long k = ((long long)ci * kh + ky) * kw + kx;
        acc += col[k * NP + n * P + oy * Wo + ox];
      }
    }
    dx[i] = acc;
  }
}

// [C, N, P] -> [N, C, P], plus an optional per-channel bias.
extern "C" __global__ void cnp_to_ncp(const float* __restrict__ src, const float* __restrict__ bias,
                                      float* __restrict__ dst, int N, int C, long long P) {
  const long long total = (long long)N * C * P;
  GS_LOOP(i, total) {
    const long long p = i % P;
    const long long nc = i / P;
    const int c = (int)(nc % C);
    const long long n = nc / C;
    const float v = src[((long long)c * N + n) * P + p];
    dst[i] = bias ? v + bias[c] : v;
  }
}

// [N, C, P] -> [C, N, P].
extern "C" __global__ void ncp_to_cnp(const float* __restrict__ src, float* __restrict__ dst,
                                      int N, int C, long long P) {
  const long long total = (long long)N * C * P;
  GS_LOOP(i, total) {
    const long long p = i % P;
    const long long cn = i / P;
    const long long n = cn % N;
    const int c = (int)(cn / N);
    dst[i] = src[(n * C + c) * P + p];
  }
}
