// Losses on [N, C] logits (src/ops/loss.rs), one block per row, row math in f64 as on the CPU:
// per-row losses and the gradient (already divided by N and multiplied by the upstream scale),
// then one fixed-order block sum for the batch mean.

// Soft targets q [N, C] (Mixup/CutMix), or hard labels with label smoothing when q is null:
// q_j = q_off, and q_on at the label (both f32 values from the host, as the CPU builds them).
extern "C" __global__ void xent_rows(const float* __restrict__ z, const float* __restrict__ q,
                                     const int* __restrict__ labels, float q_off, float q_on,
                                     int N, int C, float gscale, double* __restrict__ loss_rows,
                                     float* __restrict__ grad) {
  const int r = blockIdx.x;
  const float* zr = z + (long long)r * C;
  float mx = -3.402823466e38f;
  for (int j = threadIdx.x; j < C; j += blockDim.x) mx = fmaxf(mx, zr[j]);
  const double m = (double)block_max_f(mx);
  double se = 0.0;
  for (int j = threadIdx.x; j < C; j += blockDim.x) se += exp((double)zr[j] - m);
  const double lse = log(block_sum_d(se)) + m;
  const int lab = labels ? labels[r] : -1;
  double lq = 0.0, qs = 0.0;
  for (int j = threadIdx.x; j < C; j += blockDim.x) {
    const double qv = q ? (double)q[(long long)r * C + j] : (double)(j == lab ? q_on : q_off);
    lq += qv * ((double)zr[j] - lse);
    qs += qv;
  }
  lq = block_sum_d(lq);
  qs = block_sum_d(qs);
  for (int j = threadIdx.x; j < C; j += blockDim.x) {
    const double qv = q ? (double)q[(long long)r * C + j] : (double)(j == lab ? q_on : q_off);
    const double ls = (double)zr[j] - lse;
    grad[(long long)r * C + j] = (float)((exp(ls) * qs - qv) / (double)N) * gscale;
  }
  if (threadIdx.x == 0) loss_rows[r] = -lq;
}

// KD: t^2 KL(softmax(zt / t) || softmax(zs / t)) per row; gradient t (p_s - p_t) / N * gscale.
extern "C" __global__ void kd_rows(const float* __restrict__ zs, const float* __restrict__ zt,
                                   int N, int C, double t, float gscale,
                                   double* __restrict__ loss_rows, float* __restrict__ grad) {
  const int r = blockIdx.x;
  const float* s = zs + (long long)r * C;
  const float* te = zt + (long long)r * C;
  double ms = -1e300, mt = -1e300;
  for (int j = threadIdx.x; j < C; j += blockDim.x) {
    ms = fmax(ms, (double)s[j] / t);
    mt = fmax(mt, (double)te[j] / t);
  }
  // The max is only a shift for stability (it cancels exactly in the math), so rounding it to
  // f32 for the block reduction changes nothing but the last bits.
  const double Ms = (double)block_max_f((float)ms);
  const double Mt = (double)block_max_f((float)mt);
  double es = 0.0, et = 0.0;
  for (int j = threadIdx.x; j < C; j += blockDim.x) {
    es += exp((double)s[j] / t - Ms);
    et += exp((double)te[j] / t - Mt);
  }
  const double lses = log(block_sum_d(es)) + Ms;
  const double lset = log(block_sum_d(et)) + Mt;
  double kl = 0.0;
  for (int j = threadIdx.x; j < C; j += blockDim.x) {
    const double ls = (double)s[j] / t - lses, lt = (double)te[j] / t - lset;
    const double pt = exp(lt);
    kl += pt * (lt - ls);
    grad[(long long)r * C + j] = (float)(t * (exp(ls) - pt) / (double)N) * gscale;
  }
  kl = block_sum_d(kl);
  if (threadIdx.x == 0) loss_rows[r] = kl * t * t;
}

// out[0] = sum(rows) / N, one block.
extern "C" __global__ void mean_rows(const double* __restrict__ rows, int N, float* __restrict__ out) {
  double s = 0.0;
  for (int i = threadIdx.x; i < N; i += blockDim.x) s += rows[i];
  s = block_sum_d(s);
  if (threadIdx.x == 0) out[0] = (float)(s / (double)N);
}
