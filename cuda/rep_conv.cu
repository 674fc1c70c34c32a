// The fused re-parameterized depth-wise conv of GhostNetV3 in training (src/nn/rep_conv.rs):
//   y = sum_b BN_b(z_b),  z_b = conv_b(x)  for NB kxk depth-wise branches (weights wk [NB][C][kk]),
//   the 1x1 depth-wise "scale" branch (ws [C], optional) and the BN identity (optional, stride 1),
// each BN with its own batch statistics. DESIGN.md's way 1: branch outputs are recomputed in
// registers from x and never written.
//
// Forward: (1) one pass over x reduces every branch's per-channel sum and sum of squares
// (f64, S splits per channel); (2) a per-channel finalize gives the statistics and folds the
// branches into one kernel: BN is affine per channel, so
//   y = conv(x, sum_b s_b W_b) + sum_b (beta_b - s_b mean_b),  s_b = gamma_b / sigma_b,
// with the scale and identity branches on the centre tap; (3) dw_fwd (conv.cu) with that
// kernel and bias writes y once.
// Backward: dz_b = A_b gy + B_b (z_b - mean_b) + C_b per channel (BN backward), so
// (4) one reduction pass gives sum gy and sum gy z_b, (5) a finalize gives dgamma_b, dbeta_b and
// A, B, C, (6) dx gathers sum_b W_b^T dz_b recomputing z_b at the outputs each input feeds, and
// (7) the weight gradients sum dz_b * x per tap (grid (C, S, kh): one kernel row per block).
//
// Branch order everywhere: b < NB the kxk branches, then the scale branch, then the identity.
// Statistics and coefficient arrays are [NBT][C] with NBT = NB + has_scale + has_id <= MAXB.

struct RepGeom {
  int N, C, H, W, Ho, Wo, kh, kw, s, ph, pw, NB, has_scale, has_id;
};

// The NB kxk branch outputs at output (oy, ox) of plane xp (channel c).
__device__ __forceinline__ void rep_kxk(const RepGeom& g, const float* __restrict__ xp,
                                        const float* __restrict__ wk, int c, int oy, int ox,
                                        float* z) {
  const int kk = g.kh * g.kw;
#pragma unroll
  for (int b = 0; b < MAXB; ++b) z[b] = 0.0f;
  const int iy0 = oy * g.s - g.ph, ix0 = ox * g.s - g.pw;
  for (int ky = 0; ky < g.kh; ++ky) {
    const int iy = iy0 + ky;
    if (iy < 0 || iy >= g.H) continue;
    for (int kx = 0; kx < g.kw; ++kx) {
      const int ix = ix0 + kx;
      if (ix < 0 || ix >= g.W) continue;
      const float v = xp[iy * g.W + ix];
      const int t = ky * g.kw + kx;
#pragma unroll
      for (int b = 0; b < MAXB; ++b)
        if (b < g.NB) z[b] += wk[((long long)b * g.C + c) * kk + t] * v;
    }
  }
}

// All branch outputs at (oy, ox): kxk, then scale (ws * centre), then identity (centre).
__device__ __forceinline__ void rep_all(const RepGeom& g, const float* __restrict__ xp,
                                        const float* __restrict__ wk,
                                        const float* __restrict__ ws, int c, int oy, int ox,
                                        float* z) {
  rep_kxk(g, xp, wk, c, oy, ox, z);
  const float xc = xp[(oy * g.s) * g.W + ox * g.s];
  int b = g.NB;
  if (g.has_scale) z[b++] = ws[c] * xc;
  if (g.has_id) z[b] = xc;
}

#define REP_ARGS                                                                               \
  int N, int C, int H, int W, int Ho, int Wo, int kh, int kw, int s, int ph, int pw, int NB,   \
      int has_scale, int has_id
#define REP_GEOM {N, C, H, W, Ho, Wo, kh, kw, s, ph, pw, NB, has_scale, has_id}

// (1) partial[((c*S + split)*MAXB + b)*2 + {0,1}] = sum z_b, sum z_b^2 over the split.
extern "C" __global__ void repdw_stats_partial(const float* __restrict__ x,
                                               const float* __restrict__ wk,
                                               const float* __restrict__ ws, REP_ARGS,
                                               double* __restrict__ partial) {
  const RepGeom g = REP_GEOM;
  const int c = blockIdx.x;
  const int nbt = NB + has_scale + has_id;
  const long long P = (long long)Ho * Wo;
  double s1[MAXB], s2[MAXB];
#pragma unroll
  for (int b = 0; b < MAXB; ++b) s1[b] = s2[b] = 0.0;
  float z[MAXB];
  SPLIT_LOOP(i, (long long)N * P) {
    const long long n = i / P;
    const int p = (int)(i - n * P);
    const int oy = p / Wo, ox = p - (p / Wo) * Wo;
    rep_all(g, x + (n * C + c) * H * W, wk, ws, c, oy, ox, z);
#pragma unroll
    for (int b = 0; b < MAXB; ++b) {
      if (b < nbt) {
        s1[b] += (double)z[b];
        s2[b] += (double)z[b] * (double)z[b];
      }
    }
  }
  const long long o = ((long long)c * gridDim.y + blockIdx.y) * MAXB * 2;
#pragma unroll
  for (int b = 0; b < MAXB; ++b) {
    if (b < nbt) {
      const double a = block_sum_d(s1[b]);
      const double q = block_sum_d(s2[b]);
      if (threadIdx.x == 0) {
        partial[o + 2 * b] = a;
        partial[o + 2 * b + 1] = q;
      }
    }
  }
}

// (2) Per channel: statistics of every branch ([NBT][C], f64: mean, biased var) and the folded
// kernel weff [C][kk] and bias beff [C].
extern "C" __global__ void repdw_fold(const double* __restrict__ partial, int S, int C, int kh,
                                      int kw, int NB, int has_scale, int has_id, double count,
                                      double eps, const float* __restrict__ gamma,
                                      const float* __restrict__ beta,
                                      const float* __restrict__ wk, const float* __restrict__ ws,
                                      double* __restrict__ mean, double* __restrict__ var,
                                      float* __restrict__ weff, float* __restrict__ beff) {
  const int nbt = NB + has_scale + has_id;
  const int kk = kh * kw;
  GS_LOOP(c, C) {
    double sc[MAXB];
    double bias = 0.0;
    for (int b = 0; b < nbt; ++b) {
      double s1 = 0.0, s2 = 0.0;
      for (int j = 0; j < S; ++j) {
        s1 += partial[((c * S + j) * MAXB + b) * 2];
        s2 += partial[((c * S + j) * MAXB + b) * 2 + 1];
      }
      const double mu = s1 / count;
      const double v = fmax(s2 / count - mu * mu, 0.0);
      mean[b * C + c] = mu;
      var[b * C + c] = v;
      sc[b] = (double)gamma[b * C + c] / sqrt(v + eps);
      bias += (double)beta[b * C + c] - sc[b] * mu;
    }
    const int centre = (kh / 2) * kw + kw / 2;
    for (int t = 0; t < kk; ++t) {
      double w = 0.0;
      for (int b = 0; b < NB; ++b) w += sc[b] * (double)wk[((long long)b * C + c) * kk + t];
      if (t == centre) {
        int b = NB;
        if (has_scale) w += sc[b++] * (double)ws[c];
        if (has_id) w += sc[b];
      }
      weff[c * kk + t] = (float)w;
    }
    beff[c] = (float)bias;
  }
}

// (4) partial[(c*S + split)*(MAXB+1) + {b: sum gy z_b, MAXB: sum gy}].
extern "C" __global__ void repdw_bwd_partial(const float* __restrict__ gy,
                                             const float* __restrict__ x,
                                             const float* __restrict__ wk,
                                             const float* __restrict__ ws, REP_ARGS,
                                             double* __restrict__ partial) {
  const RepGeom g = REP_GEOM;
  const int c = blockIdx.x;
  const int nbt = NB + has_scale + has_id;
  const long long P = (long long)Ho * Wo;
  double sgz[MAXB];
  double sg = 0.0;
#pragma unroll
  for (int b = 0; b < MAXB; ++b) sgz[b] = 0.0;
  float z[MAXB];
  SPLIT_LOOP(i, (long long)N * P) {
    const long long n = i / P;
    const int p = (int)(i - n * P);
    const int oy = p / Wo, ox = p - (p / Wo) * Wo;
    const long long nc = n * C + c;
    rep_all(g, x + nc * H * W, wk, ws, c, oy, ox, z);
    const double gv = (double)gy[nc * P + p];
    sg += gv;
#pragma unroll
    for (int b = 0; b < MAXB; ++b)
      if (b < nbt) sgz[b] += gv * (double)z[b];
  }
  const long long o = ((long long)c * gridDim.y + blockIdx.y) * (MAXB + 1);
#pragma unroll
  for (int b = 0; b < MAXB; ++b) {
    if (b < nbt) {
      const double t = block_sum_d(sgz[b]);
      if (threadIdx.x == 0) partial[o + b] = t;
    }
  }
  sg = block_sum_d(sg);
  if (threadIdx.x == 0) partial[o + MAXB] = sg;
}

// (5) dgamma_b = sum gy (z_b - mean_b) * inv_b, dbeta_b = sum gy, and the BN backward
// dz_b = A gy + B (z_b - mean_b) + Cc with k = gamma_b inv_b: A = k, B = -k inv_b dgamma_b / M,
// Cc = -k dbeta_b / M. z_b is centred before the product (as the CPU BN backward does): with a
// large mean next to a small spread, B z_b and B mean_b would cancel to a few digits.
extern "C" __global__ void repdw_bwd_coef(const double* __restrict__ partial, int S, int C,
                                          int NB, int has_scale, int has_id, double count,
                                          double eps, const float* __restrict__ gamma,
                                          const double* __restrict__ mean,
                                          const double* __restrict__ var,
                                          float* __restrict__ dgamma, float* __restrict__ dbeta,
                                          float* __restrict__ ka, float* __restrict__ kb,
                                          float* __restrict__ kc, float* __restrict__ km) {
  const int nbt = NB + has_scale + has_id;
  GS_LOOP(c, C) {
    double sg = 0.0;
    for (int j = 0; j < S; ++j) sg += partial[(c * S + j) * (MAXB + 1) + MAXB];
    for (int b = 0; b < nbt; ++b) {
      double sgz = 0.0;
      for (int j = 0; j < S; ++j) sgz += partial[(c * S + j) * (MAXB + 1) + b];
      const int o = b * C + c;
      const double mu = mean[o];
      const double inv = 1.0 / sqrt(var[o] + eps);
      const double dg = (sgz - mu * sg) * inv;
      const double k = (double)gamma[o] * inv;
      const double B = -k * inv * dg / count;
      dgamma[o] = (float)dg;
      dbeta[o] = (float)sg;
      ka[o] = (float)k;
      kb[o] = (float)B;
      kc[o] = (float)(-k * sg / count);
      km[o] = (float)mu;
    }
  }
}

// (6) dx[n,c,iy,ix] = sum_b sum_taps W_b[tap] dz_b(out) over the outputs this input feeds,
// plus the scale and identity branches at the output whose centre it is.
extern "C" __global__ void repdw_bwd_dx(const float* __restrict__ gy, const float* __restrict__ x,
                                        const float* __restrict__ wk,
                                        const float* __restrict__ ws, REP_ARGS,
                                        const float* __restrict__ ka,
                                        const float* __restrict__ kb,
                                        const float* __restrict__ kc,
                                        const float* __restrict__ km, float* __restrict__ dx) {
  const RepGeom g = REP_GEOM;
  const int kk = kh * kw;
  const long long total = (long long)N * C * H * W;
  float z[MAXB];
  GS_LOOP(i, total) {
    const int ix = (int)(i % W);
    const int iy = (int)((i / W) % H);
    const long long nc = i / ((long long)H * W);
    const int c = (int)(nc % C);
    const float* xp = x + nc * H * W;
    const float* gp = gy + nc * Ho * Wo;
    float acc = 0.0f;
    for (int ky = 0; ky < kh; ++ky) {
      const int ty = iy + ph - ky;
      if (ty < 0 || ty % s) continue;
      const int oy = ty / s;
      if (oy >= Ho) continue;
      for (int kx = 0; kx < kw; ++kx) {
        const int tx = ix + pw - kx;
        if (tx < 0 || tx % s) continue;
        const int ox = tx / s;
        if (ox >= Wo) continue;
        rep_kxk(g, xp, wk, c, oy, ox, z);
        const float gv = gp[oy * Wo + ox];
        const int t = ky * kw + kx;
#pragma unroll
        for (int b = 0; b < MAXB; ++b) {
          if (b < NB) {
            const int o = b * C + c;
            acc += wk[((long long)b * C + c) * kk + t] * (ka[o] * gv + kb[o] * (z[b] - km[o]) + kc[o]);
          }
        }
      }
    }
    if ((has_scale || has_id) && iy % s == 0 && ix % s == 0 && iy / s < Ho && ix / s < Wo) {
      const float gv = gp[(iy / s) * Wo + ix / s];
      const float xc = xp[iy * W + ix];
      int b = NB;
      if (has_scale) {
        const int o = b * C + c;
        acc += ws[c] * (ka[o] * gv + kb[o] * (ws[c] * xc - km[o]) + kc[o]);
        ++b;
      }
      if (has_id) {
        const int o = b * C + c;
        acc += ka[o] * gv + kb[o] * (xc - km[o]) + kc[o];
      }
    }
    dx[i] = acc;
  }
}

// (7) Weight-gradient partials: block (c, split, ky) sums dz_b(out) * x[tap] for the taps of
// kernel row ky of every kxk branch; blocks with ky == 0 also do the scale branch.
// partial[(c*S + split) * (NB*kk + 1) + {b*kk + t, NB*kk}].
extern "C" __global__ void repdw_bwd_dw_partial(const float* __restrict__ gy,
                                                const float* __restrict__ x,
                                                const float* __restrict__ wk,
                                                const float* __restrict__ ws, REP_ARGS,
                                                const float* __restrict__ ka,
                                                const float* __restrict__ kb,
                                                const float* __restrict__ kc,
                                                const float* __restrict__ km,
                                                double* __restrict__ partial) {
  const RepGeom g = REP_GEOM;
  const int c = blockIdx.x;
  const int ky = blockIdx.z;
  const int kk = kh * kw;
  const long long P = (long long)Ho * Wo;
  // kw <= 5 columns of the row, for at most MAXB - 2 kxk branches.
  float acc[MAXB - 2][5];
  float accs = 0.0f;
#pragma unroll
  for (int b = 0; b < MAXB - 2; ++b)
#pragma unroll
    for (int t = 0; t < 5; ++t) acc[b][t] = 0.0f;
  float z[MAXB];
  SPLIT_LOOP(i, (long long)N * P) {
    const long long n = i / P;
    const int p = (int)(i - n * P);
    const int oy = p / Wo, ox = p - (p / Wo) * Wo;
    const long long nc = n * C + c;
    const float* xp = x + nc * H * W;
    rep_kxk(g, xp, wk, c, oy, ox, z);
    const float gv = gy[nc * P + p];
    const int iy = oy * s - ph + ky;
    const bool row_in = iy >= 0 && iy < H;
#pragma unroll
    for (int kx = 0; kx < 5; ++kx) {
      const int ix = ox * s - pw + kx;
      const float xv = (kx < kw && row_in && ix >= 0 && ix < W) ? xp[iy * W + ix] : 0.0f;
#pragma unroll
      for (int b = 0; b < MAXB - 2; ++b) {
        if (b < NB) {
          const int o = b * C + c;
          acc[b][kx] += (ka[o] * gv + kb[o] * (z[b] - km[o]) + kc[o]) * xv;
        }
      }
    }
    if (has_scale && ky == 0) {
      const int o = NB * C + c;
      const float xc = xp[(oy * s) * W + ox * s];
      accs += (ka[o] * gv + kb[o] * (ws[c] * xc - km[o]) + kc[o]) * xc;
    }
  }
  const long long o = ((long long)c * gridDim.y + blockIdx.y) * (NB * kk + 1);
#pragma unroll
  for (int b = 0; b < MAXB - 2; ++b) {
#pragma unroll
    for (int kx = 0; kx < 5; ++kx) {
      if (b < NB && kx < kw) {
        const double t = block_sum_d((double)acc[b][kx]);
        if (threadIdx.x == 0) partial[o + b * kk + ky * kw + kx] = t;
      }
    }
  }
  if (has_scale && ky == 0) {
    const double t = block_sum_d((double)accs);
    if (threadIdx.x == 0) partial[o + NB * kk] = t;
  }
}

// Sums the splits: dwk [NB][C][kk] and dws [C] (when has_scale).
extern "C" __global__ void repdw_bwd_dw_finalize(const double* __restrict__ partial, int S,
                                                 int C, int NB, int kk, int has_scale,
                                                 float* __restrict__ dwk,
                                                 float* __restrict__ dws) {
  const int per = NB * kk + 1;
  GS_LOOP(i, (long long)C * per) {
    const long long c = i / per;
    const int j = (int)(i - c * per);
    double t = 0.0;
    for (int s = 0; s < S; ++s) t += partial[(c * S + s) * per + j];
    if (j < NB * kk) {
      const int b = j / kk, tap = j - (j / kk) * kk;
      dwk[((long long)b * C + c) * kk + tap] = (float)t;
    } else if (has_scale) {
      dws[c] = (float)t;
    }
  }
}
