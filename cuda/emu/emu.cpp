// A CPU stand-in for libcuda and libcublas, for testing the CUDA backend without a GPU: the
// engine, cudarc and the tests run unchanged with this library first on LD_LIBRARY_PATH under
// the names libcuda.so.1 and libcublas.so.13 (see build.sh). NVRTC is the real one (the engine
// still compiles every kernel); the loaded image is ignored and each kernel runs from the same
// .cu source compiled by g++ with shim.h: blocks one after another, the threads of a block as
// real threads (so __syncthreads and warp shuffles are real barriers). Device pointers are host
// addresses. Only what the engine calls is here; anything else is a missing symbol.
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "shim.h"

thread_local emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {

using Tramp = void (*)(void**);
constexpr int kMaxThreads = 256;

struct BlockSync {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  double xch[kMaxThreads];
};

BlockSync* g_cur = nullptr;

// Persistent workers, one per thread of a block; the launching thread drives them block by block.
struct Pool {
  std::vector<std::thread> workers;
  std::barrier<> start{kMaxThreads + 1};
  std::barrier<> done{kMaxThreads + 1};
  Tramp fn = nullptr;
  void** params = nullptr;
  emu_dim3 grid{}, block{}, bidx{};
  unsigned nthreads = 0;
  bool quit = false;

  Pool() {
    for (int i = 0; i < kMaxThreads; ++i) workers.emplace_back([this, i] { work(i); });
  }
  ~Pool() {
    quit = true;
    start.arrive_and_wait();
    for (auto& t : workers) t.join();
  }
  void work(unsigned i) {
    for (;;) {
      start.arrive_and_wait();
      if (quit) return;
      if (i < nthreads) {
        threadIdx = {i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
        blockIdx = bidx;
        blockDim = block;
        gridDim = grid;
        fn(params);
        // This thread is done: the block's barriers stop waiting for it.
        g_cur->block->arrive_and_drop();
        g_cur->warps[i / 32]->arrive_and_drop();
      }
      done.arrive_and_wait();
    }
  }
};

std::mutex g_launch;

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: workers live as long as the process
  return *p;
}

}  // namespace

void emu_syncthreads() { g_cur->block->arrive_and_wait(); }

double emu_shfl_down(double v, int o) {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned lane = t & 31, w = t >> 5;
  g_cur->xch[t] = v;
  g_cur->warps[w]->arrive_and_wait();
  const unsigned n = blockDim.x * blockDim.y * blockDim.z;
  const double r = (lane + o < 32 && t + o < n) ? g_cur->xch[t + o] : v;
  g_cur->warps[w]->arrive_and_wait();
  return r;
}

extern "C" {

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

CUresult cuInit(unsigned) { return 0; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return 0; }
CUresult cuDeviceGet(int* d, int ordinal) { *d = ordinal; return ordinal == 0 ? 0 : 101; }
CUresult cuDeviceGetName(char* name, int len, int) {
  snprintf(name, len, "ghostv3 CPU emulator");
  return 0;
}
CUresult cuDeviceGetAttribute(int* v, int attrib, int) {
  switch (attrib) {
    case 16: *v = 1; break;   // multiprocessors: keeps grids small
    case 75: *v = 9; break;   // compute capability 9.0
    case 76: *v = 0; break;
    case 1: *v = kMaxThreads; break;
    default: *v = 0;          // incl. 115: no memory pools -> cuMemAlloc
  }
  return 0;
}
CUresult cuDeviceTotalMem_v2(size_t* b, int) { *b = size_t(8) << 30; return 0; }
CUresult cuMemGetInfo_v2(size_t* f, size_t* t) { *f = *t = size_t(8) << 30; return 0; }

thread_local void* t_ctx = nullptr;
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) { *ctx = (void*)0x1; return 0; }
CUresult cuDevicePrimaryCtxRelease_v2(int) { return 0; }
CUresult cuCtxGetCurrent(void** ctx) { *ctx = t_ctx; return 0; }
CUresult cuCtxSetCurrent(void* ctx) { t_ctx = ctx; return 0; }
CUresult cuCtxSynchronize() { return 0; }
CUresult cuStreamSynchronize(void*) { return 0; }

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
  void* m = aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
  if (!m) return 2;
  *p = (CUdeviceptr)m;
  return 0;
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) { return cuMemAlloc_v2(p, bytes); }
CUresult cuMemFree_v2(CUdeviceptr p) { free((void*)p); return 0; }
CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return cuMemFree_v2(p); }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t n, void*) { memcpy((void*)d, s, n); return 0; }
CUresult cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t n, void*) { memcpy(d, (void*)s, n); return 0; }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void*) { memmove((void*)d, (void*)s, n); return 0; }
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* s, size_t n) { memcpy((void*)d, s, n); return 0; }
CUresult cuMemcpyDtoH_v2(void* d, CUdeviceptr s, size_t n) { memcpy(d, (void*)s, n); return 0; }
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void*) { memset((void*)d, v, n); return 0; }

CUresult cuModuleLoadData(void** m, const void*) { *m = (void*)0x2; return 0; }
CUresult cuModuleUnload(void*) { return 0; }
CUresult cuModuleGetFunction(void** f, void*, const char* name) {
  // This library may be loaded RTLD_LOCAL (libloading does): look the kernel up in itself.
  static void* self = [] {
    Dl_info info;
    dladdr((void*)&cuInit, &info);
    return dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  }();
  std::string s = std::string("emu_tramp_") + name;
  void* p = self ? dlsym(self, s.c_str()) : nullptr;
  if (!p) return 500;  // CUDA_ERROR_NOT_FOUND
  *f = p;
  return 0;
}

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned, void*, void** params, void**) {
  const unsigned n = bx * by * bz;
  if (n == 0 || n > (unsigned)kMaxThreads || gx == 0 || gy == 0 || gz == 0) return 1;
  std::lock_guard<std::mutex> lock(g_launch);
  Pool& p = pool();
  p.fn = (Tramp)f;
  p.params = params;
  p.grid = {gx, gy, gz};
  p.block = {bx, by, bz};
  p.nthreads = n;
  for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
      for (unsigned x = 0; x < gx; ++x) {
        BlockSync s;
        s.block = std::make_unique<std::barrier<>>(n);
        for (unsigned w = 0; w * 32 < n; ++w)
          s.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - w * 32)));
        g_cur = &s;
        p.bidx = {x, y, z};
        p.start.arrive_and_wait();
        p.done.arrive_and_wait();
        g_cur = nullptr;
      }
  return 0;
}

// NVRTC itself opens libcuda.so.1 and asks for the driver's private export table: say there is
// none (it then compiles without the driver, as on a machine without a GPU).
CUresult cuGetExportTable(const void** table, const void*) {
  *table = nullptr;
  return 801;  // CUDA_ERROR_NOT_SUPPORTED
}

CUresult cuGetErrorString(int, const char** s) { *s = "error in the CPU emulator of CUDA"; return 0; }
CUresult cuGetErrorName(int, const char** s) { *s = "EMULATOR_ERROR"; return 0; }

// ---- cuBLAS: column-major sgemm, accumulated in double ----
typedef int cublasStatus_t;
cublasStatus_t cublasCreate_v2(void** h) { *h = (void*)0x3; return 0; }
cublasStatus_t cublasDestroy_v2(void*) { return 0; }
cublasStatus_t cublasSetStream_v2(void*, void*) { return 0; }
cublasStatus_t cublasSetMathMode(void*, int) { return 0; }
const char* cublasGetStatusString(int) { return "cuBLAS emulator error"; }

static void sgemm(int ta, int tb, int m, int n, int k, float alpha, const float* A, int lda,
                  const float* B, int ldb, float beta, float* C, int ldc) {
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      double acc = 0.0;
      for (int l = 0; l < k; ++l) {
        const float a = ta ? A[l + (long long)i * lda] : A[i + (long long)l * lda];
        const float b = tb ? B[j + (long long)l * ldb] : B[l + (long long)j * ldb];
        acc += (double)a * (double)b;
      }
      float& c = C[i + (long long)j * ldc];
      c = (float)(alpha * acc) + (beta == 0.0f ? 0.0f : beta * c);
    }
}

cublasStatus_t cublasSgemm_v2(void*, int ta, int tb, int m, int n, int k, const float* alpha,
                              const float* A, int lda, const float* B, int ldb, const float* beta,
                              float* C, int ldc) {
  sgemm(ta, tb, m, n, k, *alpha, A, lda, B, ldb, *beta, C, ldc);
  return 0;
}

cublasStatus_t cublasSgemmStridedBatched(void*, int ta, int tb, int m, int n, int k,
                                         const float* alpha, const float* A, int lda,
                                         long long sa, const float* B, int ldb, long long sb,
                                         const float* beta, float* C, int ldc, long long sc,
                                         int batch) {
  for (int i = 0; i < batch; ++i)
    sgemm(ta, tb, m, n, k, *alpha, A + i * sa, lda, B + i * sb, ldb, *beta, C + i * sc, ldc);
  return 0;
}

}  // extern "C"
