// LAMB (timm.optim.Lamb semantics, src/optim/lamb.rs) and the EMA of the weights in a fused
// pass over the flat parameter, gradient, moment and EMA buffers. The buffers are cut into the
// CPU optimizer's chunks (<= 16 Ki elements, never across tensors); one block per chunk.
//   launch 1  lamb_gnorm_partial: sum g^2 per chunk (global clip);
//   launch 2  lamb_moments: clip, moments, update; tensors without weight decay (no trust ratio)
//             and decayed tensors that fit in one chunk finish here (p and EMA written), the
//             others store their chunk's sums of p^2 and update^2;
//   launch 3  lamb_apply: decayed tensors over several chunks: trust ratio from their chunks'
//             sums, the update recomputed from the stored moments (same bits), p and EMA.
// Elementwise arithmetic uses explicit round-to-nearest intrinsics (no fused multiply-add) so
// that it rounds exactly as the CPU code does.
//
// Finite-state guard: every update kernel takes `bad`, one int of the plan, and stores 1 there
// when a parameter or moment it writes is NaN or +-Inf, checked on the values in registers (no
// pass of its own). Every writer stores the same 1, so the race is benign; the host reads and
// clears it (Optim::take_nonfinite).

struct LambCoef {
  float one_minus_b1, b2, one_minus_b2, bc1, sqrt_bc2, eps, neg_lr, ema_d, ema_w;
  float max_grad_norm;  // <= 0: no clipping
  int do_ema;
};

__device__ __forceinline__ float lamb_update(const LambCoef& k, float clip, float wd, float p,
                                             float g, float& m, float& v) {
  g = __fdiv_rn(g, clip);
  m = __fadd_rn(m, __fmul_rn(k.one_minus_b1, __fsub_rn(g, m)));
  v = __fadd_rn(__fmul_rn(k.b2, v), __fmul_rn(__fmul_rn(k.one_minus_b2, g), g));
  float u = __fdiv_rn(__fdiv_rn(m, k.bc1), __fadd_rn(__fdiv_rn(__fsqrt_rn(v), k.sqrt_bc2), k.eps));
  if (wd != 0.0f) u = __fadd_rn(u, __fmul_rn(wd, p));
  return u;
}

// The same update from already-updated moments (launch 3).
__device__ __forceinline__ float lamb_update_from(const LambCoef& k, float wd, float p, float m,
                                                  float v) {
  float u = __fdiv_rn(__fdiv_rn(m, k.bc1), __fadd_rn(__fdiv_rn(__fsqrt_rn(v), k.sqrt_bc2), k.eps));
  return __fadd_rn(u, __fmul_rn(wd, p));
}

__device__ __forceinline__ void lamb_write(const LambCoef& k, float* p, float* ema, long long j,
                                           float u, float trust, int* bad) {
  const float pn = __fadd_rn(p[j], __fmul_rn(k.neg_lr, __fmul_rn(u, trust)));
  p[j] = pn;
  if (!isfinite(pn)) *bad = 1;
  if (k.do_ema) ema[j] = __fadd_rn(__fmul_rn(k.ema_d, ema[j]), __fmul_rn(k.ema_w, pn));
}

__device__ __forceinline__ float trust_ratio(double sp, double su) {
  const float w = (float)sqrt(sp), u = (float)sqrt(su);
  return (w > 0.0f && u > 0.0f) ? w / u : 1.0f;
}

extern "C" __global__ void lamb_gnorm_partial(const float* __restrict__ g,
                                              const long long* __restrict__ chunk_off,
                                              const int* __restrict__ chunk_len,
                                              double* __restrict__ gpart) {
  const int ch = blockIdx.x;
  const float* gc = g + chunk_off[ch];
  double s = 0.0;
  for (int i = threadIdx.x; i < chunk_len[ch]; i += blockDim.x) s += (double)gc[i] * (double)gc[i];
  s = block_sum_d(s);
  if (threadIdx.x == 0) gpart[ch] = s;
}

// The clip divisor max(||g|| / max_grad_norm, 1), summed by every block in the same order.
__device__ float lamb_clip(const LambCoef& k, const double* gpart, int nchunks) {
  if (k.max_grad_norm <= 0.0f) return 1.0f;
  double s = 0.0;
  for (int i = threadIdx.x; i < nchunks; i += blockDim.x) s += gpart[i];
  s = block_sum_d(s);
  return fmaxf((float)sqrt(s) / k.max_grad_norm, 1.0f);
}

// chunk_tensor[ch]: tensor index; tensor_wd[t]: weight decay (0 for no-decay tensors);
// chunk_whole[ch]: the chunk is its tensor. pu[2*ch + {0,1}]: sums of p^2 and update^2.
extern "C" __global__ void lamb_moments(float* /*inout*/ __restrict__ p, const float* __restrict__ g,
                                        float* /*inout*/ __restrict__ m, float* /*inout*/ __restrict__ v,
                                        float* /*inout*/ __restrict__ ema, const long long* __restrict__ chunk_off,
                                        const int* __restrict__ chunk_len,
                                        const int* __restrict__ chunk_tensor,
                                        const int* __restrict__ chunk_whole,
                                        const float* __restrict__ tensor_wd,
                                        const double* __restrict__ gpart, int nchunks, LambCoef k,
                                        double* __restrict__ pu, int* __restrict__ bad) {
  const int ch = blockIdx.x;
  const float clip = lamb_clip(k, gpart, nchunks);
  const long long off = chunk_off[ch];
  const int len = chunk_len[ch];
  const float wd = tensor_wd[chunk_tensor[ch]];
  if (wd == 0.0f) {
    for (int i = threadIdx.x; i < len; i += blockDim.x) {
      const long long j = off + i;
      float mj = m[j], vj = v[j];
      const float u = lamb_update(k, clip, 0.0f, p[j], g[j], mj, vj);
      m[j] = mj;
      v[j] = vj;
      if (!isfinite(mj) || !isfinite(vj)) *bad = 1;
      lamb_write(k, p, ema, j, u, 1.0f, bad);
    }
    return;
  }
  double sp = 0.0, su = 0.0;
  for (int i = threadIdx.x; i < len; i += blockDim.x) {
    const long long j = off + i;
    float mj = m[j], vj = v[j];
    const float pj = p[j];
    const float u = lamb_update(k, clip, wd, pj, g[j], mj, vj);
    m[j] = mj;
    v[j] = vj;
    if (!isfinite(mj) || !isfinite(vj)) *bad = 1;
    sp += (double)pj * (double)pj;
    su += (double)u * (double)u;
  }
  sp = block_sum_d(sp);
  su = block_sum_d(su);
  if (chunk_whole[ch]) {
    const float trust = trust_ratio(sp, su);
    for (int i = threadIdx.x; i < len; i += blockDim.x) {
      const long long j = off + i;
      lamb_write(k, p, ema, j, lamb_update_from(k, wd, p[j], m[j], v[j]), trust, bad);
    }
  } else if (threadIdx.x == 0) {
    pu[2 * ch] = sp;
    pu[2 * ch + 1] = su;
  }
}

// tensor_chunk0[t], tensor_nchunks[t]: the chunks of tensor t.
extern "C" __global__ void lamb_apply(float* /*inout*/ __restrict__ p, const float* __restrict__ m,
                                      const float* __restrict__ v, float* /*inout*/ __restrict__ ema,
                                      const long long* __restrict__ chunk_off,
                                      const int* __restrict__ chunk_len,
                                      const int* __restrict__ chunk_tensor,
                                      const int* __restrict__ chunk_whole,
                                      const float* __restrict__ tensor_wd,
                                      const int* __restrict__ tensor_chunk0,
                                      const int* __restrict__ tensor_nchunks, LambCoef k,
                                      const double* __restrict__ pu, int* __restrict__ bad) {
  const int ch = blockIdx.x;
  const int t = chunk_tensor[ch];
  const float wd = tensor_wd[t];
  if (wd == 0.0f || chunk_whole[ch]) return;
  double sp = 0.0, su = 0.0;
  for (int c = tensor_chunk0[t]; c < tensor_chunk0[t] + tensor_nchunks[t]; ++c) {
    sp += pu[2 * c];
    su += pu[2 * c + 1];
  }
  const float trust = trust_ratio(sp, su);
  const long long off = chunk_off[ch];
  for (int i = threadIdx.x; i < chunk_len[ch]; i += blockDim.x) {
    const long long j = off + i;
    lamb_write(k, p, ema, j, lamb_update_from(k, wd, p[j], m[j], v[j]), trust, bad);
  }
}

// ---- AdamW and SGD (torch.optim.AdamW / torch.optim.SGD semantics, src/optim/adamw.rs and
// src/optim/sgd.rs) with the EMA of the weights in the same pass. Optional global clipping with
// PyTorch's clip_grad_norm_ factor min(max_norm / (||g|| + 1e-6), 1):
//   launch 1  torch_gnorm_partial: sum g^2 per chunk, in the order of the CPU's sum_sq (so the
//             norm, and then every result, has the CPU's bits);
//   launch 2  torch_clip_coef: one thread sums the chunks' partial sums in chunk order, f64;
//   launch 3  adamw_step / sgd_step: one block per chunk, the elementwise update.
// Without clipping only launch 3 runs (clip == nullptr: factor 1).

// sum_sq of src/optim/mod.rs over one chunk (<= 16 blocks of 1024): within a block of 1024, 8
// f32 lanes over the whole groups of 8 (lane i: elements i, i+8, ...), then the remainder summed
// in order, then the lanes added in order; f64 across blocks. 128 threads: thread 8b+i is lane i
// of block b.
extern "C" __global__ void torch_gnorm_partial(const float* __restrict__ g,
                                               const long long* __restrict__ chunk_off,
                                               const int* __restrict__ chunk_len,
                                               double* __restrict__ gpart) {
  __shared__ float lanes[128];
  __shared__ double blocks[16];
  const int ch = blockIdx.x;
  const float* gc = g + chunk_off[ch];
  const int len = chunk_len[ch];
  const int nb = (len + 1023) / 1024;
  const int b = threadIdx.x >> 3, lane = threadIdx.x & 7;
  const int blen = b >= nb ? 0 : (len - b * 1024 < 1024 ? len - b * 1024 : 1024);
  const float* gb = gc + b * 1024;
  float acc = 0.0f;
  for (int k = 0; k < blen / 8; ++k) {
    const float x = gb[8 * k + lane];
    acc = __fadd_rn(acc, __fmul_rn(x, x));
  }
  lanes[threadIdx.x] = acc;
  __syncthreads();
  if (lane == 0 && b < nb) {
    float s = 0.0f;
    for (int j = blen / 8 * 8; j < blen; ++j) s = __fadd_rn(s, __fmul_rn(gb[j], gb[j]));
    float a = 0.0f;
    for (int i = 0; i < 8; ++i) a = __fadd_rn(a, lanes[8 * b + i]);
    blocks[b] = (double)__fadd_rn(s, a);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int i = 0; i < nb; ++i) total += blocks[i];
    gpart[ch] = total;
  }
}

// torch_clip_coef of src/optim/mod.rs: the f32 norm of the f64 sum, then
// min(max_norm / (norm + 1e-6), 1) in f32. One thread.
extern "C" __global__ void torch_clip_coef(const double* __restrict__ gpart, int nchunks,
                                           float max_norm, float* __restrict__ coef) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double s = 0.0;
  for (int i = 0; i < nchunks; ++i) s += gpart[i];
  const float norm = (float)sqrt(s);
  coef[0] = fminf(__fdiv_rn(max_norm, __fadd_rn(norm, 1e-6f)), 1.0f);
}

// tensor_decay[t]: whether tensor t is in the weight-decay group. clip: the factor of
// torch_clip_coef, or nullptr for none. decay = 1 - lr wd (f32). ema: nullptr for none.
extern "C" __global__ void adamw_step(float* /*inout*/ __restrict__ p, const float* __restrict__ g,
                                      float* /*inout*/ __restrict__ m, float* /*inout*/ __restrict__ v,
                                      float* /*inout*/ __restrict__ ema,
                                      const long long* __restrict__ chunk_off,
                                      const int* __restrict__ chunk_len,
                                      const int* __restrict__ chunk_tensor,
                                      const int* __restrict__ tensor_decay,
                                      const float* __restrict__ clip, float w1, float b2, float w2,
                                      float neg_step, float sqrt_bc2, float eps, float decay,
                                      float ema_d, float ema_w, int* __restrict__ bad) {
  const int ch = blockIdx.x;
  const long long off = chunk_off[ch];
  const int len = chunk_len[ch];
  const float c = clip ? clip[0] : 1.0f;
  // p * 1 is exact: the no-decay group multiplies by 1, as on the CPU.
  const float dk = tensor_decay[chunk_tensor[ch]] ? decay : 1.0f;
  for (int i = threadIdx.x; i < len; i += blockDim.x) {
    const long long j = off + i;
    const float gj = __fmul_rn(g[j], c);
    float pj = __fmul_rn(p[j], dk);
    float mj = m[j], vj = v[j];
    mj = __fadd_rn(mj, __fmul_rn(w1, __fsub_rn(gj, mj)));
    vj = __fadd_rn(__fmul_rn(b2, vj), __fmul_rn(__fmul_rn(w2, gj), gj));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vj), sqrt_bc2), eps);
    pj = __fadd_rn(pj, __fmul_rn(neg_step, __fdiv_rn(mj, denom)));
    m[j] = mj;
    v[j] = vj;
    p[j] = pj;
    if (!isfinite(pj) || !isfinite(mj) || !isfinite(vj)) *bad = 1;
    if (ema) ema[j] = __fadd_rn(__fmul_rn(ema_d, ema[j]), __fmul_rn(ema_w, pj));
  }
}

// buf: the momentum buffer, nullptr without momentum; as optim::Sgd's, it holds the chunks back
// to back (chunk ch from buf_off[ch]; the same as chunk_off when the layout has no gaps).
// wd: L2 decay of the decay group.
extern "C" __global__ void sgd_step(float* /*inout*/ __restrict__ p, const float* __restrict__ g,
                                    float* /*inout*/ __restrict__ buf, float* /*inout*/ __restrict__ ema,
                                    const long long* __restrict__ chunk_off,
                                    const long long* __restrict__ buf_off,
                                    const int* __restrict__ chunk_len,
                                    const int* __restrict__ chunk_tensor,
                                    const int* __restrict__ tensor_decay,
                                    const float* __restrict__ clip, float wd, float mom,
                                    float neg_lr, int nesterov, float ema_d, float ema_w,
                                    int* __restrict__ bad) {
  const int ch = blockIdx.x;
  const long long off = chunk_off[ch];
  const int len = chunk_len[ch];
  const float c = clip ? clip[0] : 1.0f;
  const float wdk = tensor_decay[chunk_tensor[ch]] ? wd : 0.0f;
  for (int i = threadIdx.x; i < len; i += blockDim.x) {
    const long long j = off + i;
    float pj = p[j];
    const float gj = __fadd_rn(__fmul_rn(g[j], c), __fmul_rn(wdk, pj));
    float d = gj, bj = 0.0f;
    if (buf) {
      const long long jb = buf_off[ch] + i;
      bj = __fadd_rn(__fmul_rn(mom, buf[jb]), gj);
      buf[jb] = bj;
      d = nesterov ? __fadd_rn(gj, __fmul_rn(mom, bj)) : bj;
    }
    pj = __fadd_rn(pj, __fmul_rn(neg_lr, d));
    p[j] = pj;
    if (!isfinite(pj) || !isfinite(bj)) *bad = 1;
    if (ema) ema[j] = __fadd_rn(__fmul_rn(ema_d, ema[j]), __fmul_rn(ema_w, pj));
  }
}
