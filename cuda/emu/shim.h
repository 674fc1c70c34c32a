// Lets the kernel sources in cuda/*.cu compile as C++ for the CPU emulator (see emu.cpp): CUDA
// qualifiers become plain C++, built-in variables are thread-locals set by the emulator, and
// __syncthreads / warp shuffles are barriers among the threads emulating one block.
#pragma once
#include <math.h>

struct emu_dim3 {
  unsigned x, y, z;
};
extern thread_local emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__ static inline
#define __forceinline__
#define __restrict__ __restrict
#define __shared__ static

void emu_syncthreads();
double emu_shfl_down(double v, int offset);
// common.cuh's warp reductions in one barrier (GHOSTV3_EMU): the shuffle tree's result per lane.
enum { EMU_SUM_F64, EMU_SUM_F32, EMU_MAX_F32 };
double emu_warp_reduce(double v, int op);
#define GHOSTV3_EMU 1
#define __syncthreads() emu_syncthreads()

static inline float __shfl_down_sync(unsigned, float v, int o) { return (float)emu_shfl_down(v, o); }
static inline double __shfl_down_sync(unsigned, double v, int o) { return emu_shfl_down(v, o); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
