// BatchNorm2d over [N, C, HW] (src/ops/batch_norm.rs). Train mode: one pass over x gives every
// channel's sum and sum of squares in f64 (partials of S splits per channel, grid (C, S)), a
// per-channel finalize turns them into mean, biased variance and the affine coefficients, and
// one more pass applies y = (x - mean) * (gamma * invstd) + beta. Backward: one reduction pass
// (sum gy, sum gy * (x - mean)), a finalize, and one pass for dx.

extern "C" __global__ void bn_stats_partial(const float* __restrict__ x, int N, int C, int HW,
                                            double* __restrict__ partial) {
  const int c = blockIdx.x;
  const long long m = (long long)N * HW;
  double s1 = 0.0, s2 = 0.0;
  SPLIT_LOOP(i, m) {
    const long long n = i / HW, p = i - n * HW;
    const double v = (double)x[(n * C + c) * HW + p];
    s1 += v;
    s2 += v * v;
  }
  s1 = block_sum_d(s1);
  s2 = block_sum_d(s2);
  if (threadIdx.x == 0) {
    const long long o = ((long long)c * gridDim.y + blockIdx.y) * 2;
    partial[o] = s1;
    partial[o + 1] = s2;
  }
}

// mean, biased var, invstd (f64, kept for backward and the running stats) and the f32
// coefficients of the apply pass: center = mean, scale = gamma * invstd, shift = beta.
extern "C" __global__ void bn_stats_finalize(const double* __restrict__ partial, int S, int C,
                                             double count, double eps,
                                             const float* __restrict__ gamma,
                                             const float* __restrict__ beta,
                                             double* __restrict__ mean, double* __restrict__ var,
                                             double* __restrict__ invstd,
                                             float* __restrict__ center, float* __restrict__ scale,
                                             float* __restrict__ shift) {
  GS_LOOP(c, C) {
    double s1 = 0.0, s2 = 0.0;
    for (int s = 0; s < S; ++s) {
      s1 += partial[(c * S + s) * 2];
      s2 += partial[(c * S + s) * 2 + 1];
    }
    const double mu = s1 / count;
    const double v = fmax(s2 / count - mu * mu, 0.0);
    const double inv = 1.0 / sqrt(v + eps);
    mean[c] = mu;
    var[c] = v;
    invstd[c] = inv;
    center[c] = (float)mu;
    scale[c] = (float)((double)gamma[c] * inv);
    shift[c] = beta[c];
  }
}

// Eval mode: the affine map from the running statistics.
extern "C" __global__ void bn_eval_coef(const float* __restrict__ running_mean,
                                        const float* __restrict__ running_var, int C, double eps,
                                        const float* __restrict__ gamma,
                                        const float* __restrict__ beta, double* __restrict__ mean,
                                        double* __restrict__ invstd, float* __restrict__ center,
                                        float* __restrict__ scale, float* __restrict__ shift) {
  GS_LOOP(c, C) {
    const double inv = 1.0 / sqrt((double)running_var[c] + eps);
    mean[c] = (double)running_mean[c];
    invstd[c] = inv;
    center[c] = running_mean[c];
    scale[c] = (float)((double)gamma[c] * inv);
    shift[c] = beta[c];
  }
}

// y = (x - center[c]) * scale[c] + shift[c]; centering first keeps f32 precision.
extern "C" __global__ void bn_apply(const float* __restrict__ x, float* __restrict__ y,
                                    const float* __restrict__ center,
                                    const float* __restrict__ scale,
                                    const float* __restrict__ shift, int C, int HW, long long n) {
  GS_LOOP(i, n) {
    const int c = (int)((i / HW) % C);
    y[i] = (x[i] - center[c]) * scale[c] + shift[c];
  }
}

// PyTorch's running-stat update: r = (1 - momentum) r + momentum * stat, unbiased variance.
extern "C" __global__ void bn_running_update(float* /*inout*/ __restrict__ running_mean,
                                             float* /*inout*/ __restrict__ running_var,
                                             const double* __restrict__ mean,
                                             const double* __restrict__ var, int C,
                                             double momentum, double count) {
  GS_LOOP(c, C) {
    const double unb = count > 1.0 ? var[c] * count / (count - 1.0) : var[c];
    running_mean[c] = (float)((1.0 - momentum) * (double)running_mean[c] + momentum * mean[c]);
    running_var[c] = (float)((1.0 - momentum) * (double)running_var[c] + momentum * unb);
  }
}

// The same update of NB BNs in one launch (a fused rep_conv's branch BNs): BN b's running mean
// and variance at mean_at + b * stride and var_at + b * stride of `run` (a view of the flat
// buffers), its batch statistics at b * C of the stacked mean and var.
extern "C" __global__ void bn_running_update_strided(float* /*inout*/ __restrict__ run,
                                                     long long mean_at, long long var_at,
                                                     long long stride,
                                                     const double* __restrict__ mean,
                                                     const double* __restrict__ var, int C, int NB,
                                                     double momentum, double count) {
  GS_LOOP(i, (long long)C * NB) {
    const long long b = i / C, c = i % C;
    const double unb = count > 1.0 ? var[i] * count / (count - 1.0) : var[i];
    float* rm = run + mean_at + b * stride + c;
    float* rv = run + var_at + b * stride + c;
    *rm = (float)((1.0 - momentum) * (double)*rm + momentum * mean[i]);
    *rv = (float)((1.0 - momentum) * (double)*rv + momentum * unb);
  }
}

// Backward reduction: sum gy and sum gy * (x - mean) per channel.
extern "C" __global__ void bn_bwd_partial(const float* __restrict__ gy, const float* __restrict__ x,
                                          const double* __restrict__ mean, int N, int C, int HW,
                                          double* __restrict__ partial) {
  const int c = blockIdx.x;
  const long long m = (long long)N * HW;
  const double mu = mean[c];
  double sg = 0.0, sgx = 0.0;
  SPLIT_LOOP(i, m) {
    const long long n = i / HW, p = i - n * HW;
    const long long o = (n * C + c) * HW + p;
    const double g = (double)gy[o];
    sg += g;
    sgx += g * ((double)x[o] - mu);
  }
  sg = block_sum_d(sg);
  sgx = block_sum_d(sgx);
  if (threadIdx.x == 0) {
    const long long o = ((long long)c * gridDim.y + blockIdx.y) * 2;
    partial[o] = sg;
    partial[o + 1] = sgx;
  }
}

// dgamma = sum gy * xhat, dbeta = sum gy; and the dx coefficients
//   train: dx = a * gy + bx * (x - mean) + c0 with a = gamma * inv, bx = -a * inv * dgamma / M,
//          c0 = -a * dbeta / M;
//   eval:  dx = a * gy (bx = c0 = 0).
extern "C" __global__ void bn_bwd_finalize(const double* __restrict__ partial, int S, int C,
                                           double count, int train,
                                           const float* __restrict__ gamma,
                                           const double* __restrict__ invstd,
                                           float* __restrict__ dgamma, float* __restrict__ dbeta,
                                           float* __restrict__ ka, float* __restrict__ kb,
                                           float* __restrict__ kc) {
  GS_LOOP(c, C) {
    double sg = 0.0, sgx = 0.0;
    for (int s = 0; s < S; ++s) {
      sg += partial[(c * S + s) * 2];
      sgx += partial[(c * S + s) * 2 + 1];
    }
    const double inv = invstd[c];
    const double dg = sgx * inv;
    const double a = (double)gamma[c] * inv;
    dgamma[c] = (float)dg;
    dbeta[c] = (float)sg;
    ka[c] = (float)a;
    kb[c] = train ? (float)(-a * inv * dg / count) : 0.0f;
    kc[c] = train ? (float)(-a * sg / count) : 0.0f;
  }
}

extern "C" __global__ void bn_bwd_dx(const float* __restrict__ gy, const float* __restrict__ x,
                                     const float* __restrict__ center, const float* __restrict__ ka,
                                     const float* __restrict__ kb, const float* __restrict__ kc,
                                     float* __restrict__ dx, int C, int HW, long long n) {
  GS_LOOP(i, n) {
    const int c = (int)((i / HW) % C);
    dx[i] = ka[c] * gy[i] + kb[c] * (x[i] - center[c]) + kc[c];
  }
}
