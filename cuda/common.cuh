// Shared helpers, prepended to every kernel source before NVRTC compiles it (no #include: NVRTC
// has no system headers). f32 data, f64 for reductions that feed statistics or norms.

#define GS_LOOP(i, n)                                                                          \
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n);     \
       i += (long long)blockDim.x * gridDim.x)

// Largest number of branches of a fused rep_conv (kxk branches + 1x1 scale + BN identity) and
// largest kernel area the depth-wise kernels keep per-tap accumulators for.
#define MAXB 8
#define MAXKK 25

#ifdef GHOSTV3_EMU
// The CPU emulator (cuda/emu/shim.h) gives each lane the value of the shuffle tree below,
// computed in one barrier instead of ten switches of every thread.
__device__ __forceinline__ double warp_sum_d(double v) { return emu_warp_reduce(v, EMU_SUM_F64); }
__device__ __forceinline__ float warp_sum_f(float v) {
  return (float)emu_warp_reduce(v, EMU_SUM_F32);
}
__device__ __forceinline__ float warp_max_f(float v) {
  return (float)emu_warp_reduce(v, EMU_MAX_F32);
}
#else
__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_sum_f(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max_f(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
  return v;
}
#endif

// Sum over a 1-D block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// total. The order of additions is fixed for a given blockDim, so results are reproducible.
__device__ double block_sum_d(double v) {
  __shared__ double sh[33];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  v = warp_sum_d(v);
  __syncthreads();  // sh may still be read by a previous call
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  if (wid == 0) {
    const int nw = (blockDim.x + 31) >> 5;
    double t = lane < nw ? sh[lane] : 0.0;
    t = warp_sum_d(t);
    if (lane == 0) sh[32] = t;
  }
  __syncthreads();
  return sh[32];
}

__device__ float block_max_f(float v) {
  __shared__ float shm[33];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  v = warp_max_f(v);
  __syncthreads();
  if (lane == 0) shm[wid] = v;
  __syncthreads();
  if (wid == 0) {
    const int nw = (blockDim.x + 31) >> 5;
    float t = lane < nw ? shm[lane] : -3.402823466e38f;
    t = warp_max_f(t);
    if (lane == 0) shm[32] = t;
  }
  __syncthreads();
  return shm[32];
}

// Element range of split `s` of `S` over `m` items, in units of blockDim (coalesced strides).
// Threads of block (c, s) visit i = s*blockDim + tid, then step by S*blockDim.
#define SPLIT_LOOP(i, m)                                                                        \
  for (long long i = (long long)blockIdx.y * blockDim.x + threadIdx.x; i < (long long)(m);      \
       i += (long long)gridDim.y * blockDim.x)
