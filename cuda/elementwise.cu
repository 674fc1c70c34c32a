// Elementwise and broadcast ops (forward and backward), one thread per element, grid-stride.
// Same arithmetic as src/ops (act.rs, elementwise.rs): f32, IEEE division and expf.

extern "C" __global__ void fill_f32(float* y, float v, long long n) {
  GS_LOOP(i, n) y[i] = v;
}

extern "C" __global__ void copy_f32(const float* __restrict__ x, float* __restrict__ y, long long n) {
  GS_LOOP(i, n) y[i] = x[i];
}

extern "C" __global__ void relu_fwd(const float* __restrict__ x, float* __restrict__ y, long long n) {
  GS_LOOP(i, n) y[i] = fmaxf(x[i], 0.0f);
}

extern "C" __global__ void relu_bwd(const float* __restrict__ x, const float* __restrict__ gy,
                                    float* __restrict__ gx, long long n) {
  GS_LOOP(i, n) gx[i] = x[i] > 0.0f ? gy[i] : 0.0f;
}

extern "C" __global__ void sigmoid_fwd(const float* __restrict__ x, float* __restrict__ y, long long n) {
  GS_LOOP(i, n) y[i] = 1.0f / (1.0f + expf(-x[i]));
}

// From the output y: dy/dx = y (1 - y).
extern "C" __global__ void sigmoid_bwd(const float* __restrict__ y, const float* __restrict__ gy,
                                       float* __restrict__ gx, long long n) {
  GS_LOOP(i, n) gx[i] = gy[i] * (y[i] * (1.0f - y[i]));
}

// PyTorch's hardsigmoid relu6(x + 3) / 6.
extern "C" __global__ void hard_sigmoid_fwd(const float* __restrict__ x, float* __restrict__ y, long long n) {
  GS_LOOP(i, n) y[i] = fminf(fmaxf(x[i] + 3.0f, 0.0f), 6.0f) / 6.0f;
}

// Gradient 1/6 strictly inside (-3, 3), 0 outside.
extern "C" __global__ void hard_sigmoid_bwd(const float* __restrict__ x, const float* __restrict__ gy,
                                            float* __restrict__ gx, long long n) {
  const float sixth = 1.0f / 6.0f;
  GS_LOOP(i, n) gx[i] = (x[i] > -3.0f && x[i] < 3.0f) ? gy[i] * sixth : 0.0f;
}

// relu6 = min(max(x, 0), 6) (MobileNetV2).
extern "C" __global__ void relu6_fwd(const float* __restrict__ x, float* __restrict__ y, long long n) {
  GS_LOOP(i, n) y[i] = fminf(fmaxf(x[i], 0.0f), 6.0f);
}

// PyTorch's hardtanh backward: gradient 1 strictly inside (0, 6), 0 elsewhere (also at the kinks).
extern "C" __global__ void relu6_bwd(const float* __restrict__ x, const float* __restrict__ gy,
                                     float* __restrict__ gx, long long n) {
  GS_LOOP(i, n) gx[i] = (x[i] > 0.0f && x[i] < 6.0f) ? gy[i] : 0.0f;
}

extern "C" __global__ void add_fwd(const float* __restrict__ a, const float* __restrict__ b,
                                   float* __restrict__ y, long long n) {
  GS_LOOP(i, n) y[i] = a[i] + b[i];
}

// y += x (gradient accumulation).
extern "C" __global__ void add_inplace(float* /*inout*/ __restrict__ y, const float* __restrict__ x, long long n) {
  GS_LOOP(i, n) y[i] += x[i];
}

extern "C" __global__ void mul_fwd(const float* __restrict__ a, const float* __restrict__ b,
                                   float* __restrict__ y, long long n) {
  GS_LOOP(i, n) y[i] = a[i] * b[i];
}

extern "C" __global__ void scale_fwd(const float* __restrict__ x, float a, float* __restrict__ y, long long n) {
  GS_LOOP(i, n) y[i] = x[i] * a;
}

// y[n,c,h,w] = x[n,c,h,w] * s[n,c] (the SE gate); also its input gradient (x := gy).
extern "C" __global__ void mul_channel_fwd(const float* __restrict__ x, const float* __restrict__ s,
                                           float* __restrict__ y, long long hw, long long n) {
  GS_LOOP(i, n) y[i] = x[i] * s[i / hw];
}

// ds[nc] = sum_hw gy * x: one block per (n, c) plane.
extern "C" __global__ void mul_channel_bwd_ds(const float* __restrict__ gy, const float* __restrict__ x,
                                              float* __restrict__ ds, int hw) {
  const long long base = (long long)blockIdx.x * hw;
  double acc = 0.0;
  for (int i = threadIdx.x; i < hw; i += blockDim.x) acc += (double)(gy[base + i] * x[base + i]);
  acc = block_sum_d(acc);
  if (threadIdx.x == 0) ds[blockIdx.x] = (float)acc;
}

// Per-channel sums of an [N, C, HW] tensor in two launches: partial sums of S splits per
// channel (grid (C, S)), then a fixed-order sum over the splits. Used for bias gradients.
extern "C" __global__ void chan_sum_partial(const float* __restrict__ a, int N, int C, int HW,
                                            double* __restrict__ partial) {
  const int c = blockIdx.x;
  const long long m = (long long)N * HW;
  double acc = 0.0;
  SPLIT_LOOP(i, m) {
    const long long n = i / HW, p = i - n * HW;
    acc += (double)a[(n * C + c) * HW + p];
  }
  acc = block_sum_d(acc);
  if (threadIdx.x == 0) partial[(long long)c * gridDim.y + blockIdx.y] = acc;
}

extern "C" __global__ void chan_sum_finalize(const double* __restrict__ partial, int S, int C,
                                             float* __restrict__ out) {
  GS_LOOP(c, C) {
    double t = 0.0;
    for (int s = 0; s < S; ++s) t += partial[c * S + s];
    out[c] = (float)t;
  }
}

// Sum over rows of an [R, K] matrix: out[k] = sum_r a[r, k] (linear bias gradient, and the
// per-sample dW partials of batched GEMMs). Fixed order over r.
extern "C" __global__ void sum_rows(const float* __restrict__ a, int R, long long K,
                                    float* __restrict__ out) {
  GS_LOOP(k, K) {
    float t = 0.0f;
    for (int r = 0; r < R; ++r) t += a[(long long)r * K + k];
    out[k] = t;
  }
}

// y[r, k] += b[k] (linear bias).
extern "C" __global__ void add_bias_rows(float* /*inout*/ __restrict__ y, const float* __restrict__ b,
                                         long long K, long long n) {
  GS_LOOP(i, n) y[i] += b[i % K];
}

// y[n, c, p] += b[c] over [N, C, P] (conv bias).
extern "C" __global__ void add_channel_bias(float* /*inout*/ __restrict__ y, const float* __restrict__ b,
                                            int C, long long P, long long n) {
  GS_LOOP(i, n) y[i] += b[(i / P) % C];
}

// EMA of a flat buffer: e = d * e + w * x, rounded as the CPU does (no fused multiply-add).
extern "C" __global__ void ema_blend(float* /*inout*/ __restrict__ e, const float* __restrict__ x, float d,
                                     float w, long long n) {
  GS_LOOP(i, n) e[i] = __fadd_rn(__fmul_rn(d, e[i]), __fmul_rn(w, x[i]));
}

// Many small copies in one launch (e.g. every parameter's gradient into the flat gradient
// buffer): segment s copies len[s] floats from the address src[s] to dst + off[s]; one block per
// segment at a time.
extern "C" __global__ void copy_segments(const long long* __restrict__ src,
                                         const long long* __restrict__ off,
                                         const long long* __restrict__ len,
                                         float* __restrict__ dst, int nseg) {
  for (int s = blockIdx.x; s < nseg; s += gridDim.x) {
    const float* p = (const float*)src[s];
    float* q = dst + off[s];
    for (long long i = threadIdx.x; i < len[s]; i += blockDim.x) q[i] = p[i];
  }
}
