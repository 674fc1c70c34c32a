// A CPU stand-in for libnccl (built into the emulator's library, so a collective joins the same
// stream queues as the kernels of emu.cpp; build.sh links libnccl.so.2 to it). One process per
// rank, as with real NCCL; the ranks meet in a POSIX shared-memory segment whose name is in the
// ncclUniqueId. Each collective is queued on its stream like a kernel and exchanges when it runs
// (stream order): every rank copies its part into its own slot of the segment (large buffers in
// chunks of one slot), all ranks wait for all, read what they need, and wait until all have read
// before the slots are reused. Reductions go in rank order 0..n-1 on every rank, so every rank
// gets bit-identical results.
//
// Every wait times out after GHOSTV3_EMU_NCCL_TIMEOUT_S seconds (default 60), and notices a peer
// process that died (its pid is in the segment), a peer that aborted or destroyed its
// communicator, and ncclCommAbort of this communicator from another thread: the collective then
// fails, ncclCommGetAsyncError reports ncclRemoteError (a dead/departed peer) or
// ncclSystemError (timeout, abort), the stream's next synchronize returns
// CUDA_ERROR_LAUNCH_FAILED (719), and one line on stderr names the missing rank. A failed
// communicator fails every later collective at once (as NCCL's: abort it).
//
// ncclGroupStart/End do nothing (each operation is queued at its call, in order), so a group
// with several communicators of one process (ncclCommInitAll) is not supported.
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <functional>
#include <memory>
#include <signal.h>
#include <string>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>
#include <vector>
#include <algorithm>

typedef int CUresult;
CUresult emu_enqueue(void* stream, std::function<void()> op);
void emu_fail_op(CUresult e);
int emu_current_device();
void emu_flush_all();

namespace {

enum Result {
  ncclSuccess = 0,
  ncclUnhandledCudaError = 1,
  ncclSystemError = 2,
  ncclInternalError = 3,
  ncclInvalidArgument = 4,
  ncclInvalidUsage = 5,
  ncclRemoteError = 6,
  ncclInProgress = 7,
  ncclTimeout = 8,
};
enum DataType { I8 = 0, U8, I32, U32, I64, U64, F16, F32, F64, BF16 };
enum RedOp { SUM = 0, PROD, MAX, MIN, AVG };

constexpr uint64_t kMagic = 0x67687374336e636cull;  // "ghst3ncl"
constexpr int kMaxRanks = 64;
constexpr size_t kSlotDefault = 1 << 20;
constexpr CUresult kLaunchFailed = 719;

struct Shared {
  std::atomic<uint64_t> magic;
  std::atomic<int> nranks;
  std::atomic<int> arrived;
  std::atomic<uint64_t> slot_bytes;
  struct alignas(64) Rank {
    std::atomic<int> pid;
    std::atomic<int> left;  // 1: aborted or destroyed its communicator
    std::atomic<uint64_t> posted, consumed;  // generation of the latest write / read of slots
  } rank[kMaxRanks];
};
static_assert(std::atomic<uint64_t>::is_always_lock_free && std::atomic<int>::is_always_lock_free);

size_t slot_bytes_setting() {
  const char* v = getenv("GHOSTV3_EMU_NCCL_SLOT_BYTES");
  long long n = v ? atoll(v) : 0;
  return n >= 64 ? size_t(n) / 64 * 64 : kSlotDefault;
}

double timeout_s() {
  const char* v = getenv("GHOSTV3_EMU_NCCL_TIMEOUT_S");
  double t = v ? atof(v) : 0;
  return t > 0 ? t : 60.0;
}

struct Comm {
  std::string name;
  Shared* sh = nullptr;
  char* slots = nullptr;
  size_t map_bytes = 0, slot = 0;
  int rank = 0, n = 0, device = 0;
  uint64_t gen = 0;  // generations so far (the same on every rank)
  std::atomic<bool> aborted{false};
  std::atomic<int> async_err{ncclSuccess};
  std::string last_error;
  ~Comm() {
    if (sh) munmap(sh, map_bytes);
  }
  char* slot_of(int r) const { return slots + size_t(r) * slot; }
};

// What a handle (ncclComm_t) points to: queued operations keep the Comm alive past destroy.
struct Handle {
  std::shared_ptr<Comm> c;
};

thread_local std::string t_last_error;

void set_error(Comm* c, const std::string& msg) {
  fprintf(stderr, "nccl-emu: %s\n", msg.c_str());
  t_last_error = msg;
  if (c) c->last_error = msg;
}

// Is process `pid` gone (or a zombie nobody has reaped yet)?
bool process_dead(int pid) {
  if (pid <= 0) return false;
  if (kill(pid, 0) != 0 && errno == ESRCH) return true;
  char path[64], buf[256];
  snprintf(path, sizeof path, "/proc/%d/stat", pid);
  int fd = open(path, O_RDONLY);
  if (fd < 0) return false;
  ssize_t k = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (k <= 0) return false;
  buf[k] = 0;
  const char* p = strrchr(buf, ')');
  return p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X');
}

// Waits until ready() for every rank; the failure cases above otherwise. `what` names the wait.
// Returns ncclSuccess, or the error (also stored as the comm's async error).
template <class Ready>
Result wait_all(Comm* c, Ready ready, const char* what) {
  using clk = std::chrono::steady_clock;
  const auto t0 = clk::now();
  const double limit = timeout_s();
  for (unsigned it = 0;; ++it) {
    int missing = -1;
    for (int r = 0; r < c->n; ++r)
      if (!ready(r)) {
        missing = r;
        break;
      }
    if (missing < 0) return ncclSuccess;
    if (it < 64) {
      std::this_thread::yield();
      continue;
    }
    usleep(it < 1000 ? 50 : 500);
    if (it % 8 != 0) continue;
    // Failures, each checked before a last look at the condition (a peer that finished and then
    // left or exited is not a failure).
    Result err = ncclSuccess;
    std::string msg;
    char b[256];
    if (c->aborted.load(std::memory_order_acquire)) {
      snprintf(b, sizeof b, "rank %d: communicator aborted during %s", c->rank, what);
      err = ncclSystemError;
    } else {
      for (int r = 0; r < c->n && !err; ++r) {
        const int pid = c->sh->rank[r].pid.load(std::memory_order_acquire);
        if (r == c->rank) continue;
        if (c->sh->rank[r].left.load(std::memory_order_acquire)) {
          snprintf(b, sizeof b, "rank %d (pid %d) left the communicator (abort/destroy) during %s",
                   r, pid, what);
          err = ncclRemoteError;
        } else if (process_dead(pid)) {
          snprintf(b, sizeof b, "rank %d (pid %d) died during %s", r, pid, what);
          err = ncclRemoteError;
        }
      }
      const double el = std::chrono::duration<double>(clk::now() - t0).count();
      if (!err && el > limit) {
        const int pid = c->sh->rank[missing].pid.load();
        snprintf(b, sizeof b,
                 "rank %d (pid %d) missing: rank %d timed out after %.0f s waiting for it in %s "
                 "(GHOSTV3_EMU_NCCL_TIMEOUT_S)",
                 missing, pid, c->rank, el, what);
        err = ncclSystemError;
      }
    }
    if (!err) continue;
    bool all = true;
    for (int r = 0; r < c->n && all; ++r) all = ready(r);
    if (all) return ncclSuccess;
    msg = b;
    set_error(c, msg);
    int expected = ncclSuccess;
    c->async_err.compare_exchange_strong(expected, err);
    return err;
  }
}

// One exchange step: this rank has written its slot; all post, then `read` runs, then all
// confirm they read (so the slots may be rewritten).
template <class Read>
Result step(Comm* c, Read read, const char* what) {
  const uint64_t g = ++c->gen;
  Shared::Rank* rk = c->sh->rank;
  rk[c->rank].posted.store(g, std::memory_order_release);
  if (Result e = wait_all(c, [&](int r) { return rk[r].posted.load(std::memory_order_acquire) >= g; }, what))
    return e;
  read();
  rk[c->rank].consumed.store(g, std::memory_order_release);
  return wait_all(c, [&](int r) { return rk[r].consumed.load(std::memory_order_acquire) >= g; }, what);
}

size_t type_size(int t) {
  switch (t) {
    case I8: case U8: return 1;
    case F16: case BF16: return 2;
    case I32: case U32: case F32: return 4;
    case I64: case U64: case F64: return 8;
    default: return 0;
  }
}

template <class T>
void reduce_typed(T* acc, const T* x, size_t k, int op) {
  for (size_t i = 0; i < k; ++i) switch (op) {
      case SUM: case AVG: acc[i] = T(acc[i] + x[i]); break;
      case PROD: acc[i] = T(acc[i] * x[i]); break;
      case MAX: acc[i] = x[i] > acc[i] ? x[i] : acc[i]; break;
      case MIN: acc[i] = x[i] < acc[i] ? x[i] : acc[i]; break;
    }
}

template <class T>
void divide_typed(T* acc, size_t k, int n) {
  for (size_t i = 0; i < k; ++i) acc[i] = T(acc[i] / T(n));
}

// dst = src_0 op src_1 op ... op src_{n-1} (in that order), elements [0, k).
void reduce_ranks(Comm* c, char* dst, size_t off_bytes, size_t k, int t, int op) {
  std::memcpy(dst, c->slot_of(0) + off_bytes, k * type_size(t));
  for (int r = 1; r < c->n; ++r) {
    const char* x = c->slot_of(r) + off_bytes;
    switch (t) {
      case I8: reduce_typed((int8_t*)dst, (const int8_t*)x, k, op); break;
      case U8: reduce_typed((uint8_t*)dst, (const uint8_t*)x, k, op); break;
      case I32: reduce_typed((int32_t*)dst, (const int32_t*)x, k, op); break;
      case U32: reduce_typed((uint32_t*)dst, (const uint32_t*)x, k, op); break;
      case I64: reduce_typed((int64_t*)dst, (const int64_t*)x, k, op); break;
      case U64: reduce_typed((uint64_t*)dst, (const uint64_t*)x, k, op); break;
      case F32: reduce_typed((float*)dst, (const float*)x, k, op); break;
      case F64: reduce_typed((double*)dst, (const double*)x, k, op); break;
    }
  }
  if (op == AVG) switch (t) {
      case I8: divide_typed((int8_t*)dst, k, c->n); break;
      case U8: divide_typed((uint8_t*)dst, k, c->n); break;
      case I32: divide_typed((int32_t*)dst, k, c->n); break;
      case U32: divide_typed((uint32_t*)dst, k, c->n); break;
      case I64: divide_typed((int64_t*)dst, k, c->n); break;
      case U64: divide_typed((uint64_t*)dst, k, c->n); break;
      case F32: divide_typed((float*)dst, k, c->n); break;
      case F64: divide_typed((double*)dst, k, c->n); break;
    }
}

enum Kind { ALL_REDUCE, REDUCE, BROADCAST, ALL_GATHER, REDUCE_SCATTER };
const char* kind_name(Kind k) {
  static const char* n[] = {"ncclAllReduce", "ncclReduce", "ncclBroadcast", "ncclAllGather",
                            "ncclReduceScatter"};
  return n[k];
}

// Runs one collective (when its turn on the stream comes). `count`: elements per rank's part
// (AllReduce/Reduce/Broadcast: the buffer; AllGather: the send buffer; ReduceScatter: the receive
// buffer). Chunks are staged in a local buffer so that in-place operations read their input
// before anything is written back.
Result run_collective(Comm* c, Kind kind, const char* send, char* recv, size_t count, int t,
                      int op, int root) {
  if (int e = c->async_err.load()) return Result(e);
  if (c->aborted.load()) return ncclSystemError;
  const size_t es = type_size(t);
  const int n = c->n;
  // Elements of one rank's part per step.
  const size_t per = std::max<size_t>(1, kind == REDUCE_SCATTER ? c->slot / (es * n) : c->slot / es);
  if (per * es * (kind == REDUCE_SCATTER ? n : 1) > c->slot) return ncclInvalidUsage;
  std::vector<char> tmp;
  for (size_t off = 0; off < count; off += per) {
    const size_t k = std::min(per, count - off);
    char* mine = c->slot_of(c->rank);
    switch (kind) {
      case ALL_REDUCE: case REDUCE: case ALL_GATHER:
        std::memcpy(mine, send + off * es, k * es);
        break;
      case BROADCAST:
        if (c->rank == root) std::memcpy(mine, send + off * es, k * es);
        break;
      case REDUCE_SCATTER:
        for (int r = 0; r < n; ++r)
          std::memcpy(mine + size_t(r) * k * es, send + (size_t(r) * count + off) * es, k * es);
        break;
    }
    Result e = step(
        c,
        [&] {
          switch (kind) {
            case ALL_REDUCE:
              tmp.resize(k * es);
              reduce_ranks(c, tmp.data(), 0, k, t, op);
              std::memcpy(recv + off * es, tmp.data(), k * es);
              break;
            case REDUCE:
              if (c->rank == root) {
                tmp.resize(k * es);
                reduce_ranks(c, tmp.data(), 0, k, t, op);
                std::memcpy(recv + off * es, tmp.data(), k * es);
              }
              break;
            case BROADCAST:
              std::memcpy(recv + off * es, c->slot_of(root), k * es);
              break;
            case ALL_GATHER:
              for (int r = 0; r < n; ++r)
                std::memcpy(recv + (size_t(r) * count + off) * es, c->slot_of(r), k * es);
              break;
            case REDUCE_SCATTER:
              tmp.resize(k * es);
              reduce_ranks(c, tmp.data(), size_t(c->rank) * k * es, k, t, op);
              std::memcpy(recv + off * es, tmp.data(), k * es);
              break;
          }
        },
        kind_name(kind));
    if (e) return e;
  }
  return ncclSuccess;
}

Result enqueue_collective(void* comm, void* stream, Kind kind, const void* send, void* recv,
                          size_t count, int t, int op, int root) {
  if (!comm) return ncclInvalidArgument;
  std::shared_ptr<Comm> c = ((Handle*)comm)->c;
  if (type_size(t) == 0 || t == F16 || t == BF16) {
    set_error(c.get(), "unsupported data type " + std::to_string(t) + " (the emulator has no f16)");
    return ncclInvalidArgument;
  }
  if (op < SUM || op > AVG) return ncclInvalidArgument;
  if ((kind == BROADCAST || kind == REDUCE) && (root < 0 || root >= c->n)) return ncclInvalidArgument;
  if (count && (!recv || (!send && !(kind == BROADCAST && c->rank != root))))
    return ncclInvalidArgument;
  if (int e = c->async_err.load()) return Result(e);
  CUresult r = emu_enqueue(stream, [c, kind, send, recv, count, t, op, root] {
    if (run_collective(c.get(), kind, (const char*)send, (char*)recv, count, t, op, root))
      emu_fail_op(kLaunchFailed);
  });
  if (r == kLaunchFailed) return Result(c->async_err.load() ? c->async_err.load() : ncclSystemError);
  return r ? ncclUnhandledCudaError : ncclSuccess;
}

}  // namespace

extern "C" {

struct ncclUniqueId {
  char internal[128];
};

int ncclGetVersion(int* v) {
  if (!v) return ncclInvalidArgument;
  *v = 23000;  // 2.30.0, the API cudarc's nccl-02030 binds
  return ncclSuccess;
}

// The id is the name of a shared-memory segment not created yet: "/ghostv3-nccl-<random hex>".
int ncclGetUniqueId(ncclUniqueId* id) {
  if (!id) return ncclInvalidArgument;
  unsigned char rnd[12];
  if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) return ncclSystemError;
  memset(id->internal, 0, sizeof id->internal);
  int k = snprintf(id->internal, sizeof id->internal, "/ghostv3-nccl-%d-", (int)getpid());
  for (unsigned char b : rnd) k += snprintf(id->internal + k, sizeof id->internal - k, "%02x", b);
  return ncclSuccess;
}

int ncclCommInitRank(void** out, int nranks, ncclUniqueId id, int rank) {
  if (!out || nranks < 1 || nranks > kMaxRanks || rank < 0 || rank >= nranks)
    return ncclInvalidArgument;
  std::string name(id.internal, strnlen(id.internal, sizeof id.internal));
  if (name.rfind("/ghostv3-nccl-", 0) != 0) {
    set_error(nullptr, "ncclCommInitRank: not an id from this emulator's ncclGetUniqueId");
    return ncclInvalidArgument;
  }
  auto c = std::make_shared<Comm>();
  c->name = name;
  c->rank = rank;
  c->n = nranks;
  c->device = std::max(0, emu_current_device());
  c->slot = slot_bytes_setting();
  c->map_bytes = (sizeof(Shared) + 4095) / 4096 * 4096 + c->slot * nranks;
  int fd = shm_open(name.c_str(), O_CREAT | O_RDWR, 0600);
  if (fd < 0) {
    set_error(nullptr, "shm_open " + name + ": " + strerror(errno));
    return ncclSystemError;
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || (size_t(st.st_size) < c->map_bytes && ftruncate(fd, c->map_bytes) != 0)) {
    set_error(nullptr, "ftruncate " + name + ": " + strerror(errno));
    close(fd);
    return ncclSystemError;
  }
  void* m = mmap(nullptr, c->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (m == MAP_FAILED) {
    set_error(nullptr, "mmap " + name + ": " + strerror(errno));
    return ncclSystemError;
  }
  c->sh = (Shared*)m;
  c->slots = (char*)m + (sizeof(Shared) + 4095) / 4096 * 4096;
  Shared* sh = c->sh;
  // The first rank to come sets the shape; the others must agree.
  int expect_n = 0;
  uint64_t expect_slot = 0;
  sh->nranks.compare_exchange_strong(expect_n, nranks);
  sh->slot_bytes.compare_exchange_strong(expect_slot, c->slot);
  char b[256];
  int expect_pid = 0;
  if ((expect_n != 0 && expect_n != nranks) || (expect_slot != 0 && expect_slot != c->slot)) {
    snprintf(b, sizeof b, "ncclCommInitRank: rank %d says %d ranks / slot %zu bytes, another said %d / %llu",
             rank, nranks, c->slot, expect_n, (unsigned long long)expect_slot);
    set_error(nullptr, b);
    return ncclInvalidArgument;
  }
  if (!sh->rank[rank].pid.compare_exchange_strong(expect_pid, (int)getpid())) {
    snprintf(b, sizeof b, "ncclCommInitRank: rank %d already taken by pid %d", rank, expect_pid);
    set_error(nullptr, b);
    return ncclInvalidUsage;
  }
  sh->magic.store(kMagic);
  sh->arrived.fetch_add(1, std::memory_order_acq_rel);
  // Every rank has the segment mapped once its pid is in.
  Result e = wait_all(
      c.get(), [&](int r) { return sh->rank[r].pid.load(std::memory_order_acquire) != 0; },
      "ncclCommInitRank");
  if (e) {
    shm_unlink(name.c_str());  // no leak in /dev/shm (a late rank then times out on its own)
    return e;
  }
  // Everyone has it mapped: the name is no longer needed.
  if (rank == 0) shm_unlink(name.c_str());
  *out = new Handle{c};
  return ncclSuccess;
}

static Comm* comm_of(void* comm) { return comm ? ((Handle*)comm)->c.get() : nullptr; }

// Abort and destroy: this rank leaves (peers waiting for it fail at once); operations still
// queued keep the segment mapped until they have run (they fail after an abort).
static int leave(void* comm, bool abort) {
  Comm* c = comm_of(comm);
  if (!c) return ncclInvalidArgument;
  if (abort) c->aborted.store(true, std::memory_order_release);
  c->sh->rank[c->rank].left.store(1, std::memory_order_release);
  if (c->rank == 0) shm_unlink(c->name.c_str());  // ENOENT after init, harmless
  delete (Handle*)comm;
  return ncclSuccess;
}

// Destroy first runs the queued work (NCCL's destroy waits for uncompleted operations).
int ncclCommDestroy(void* comm) {
  if (!comm) return ncclInvalidArgument;
  emu_flush_all();
  return leave(comm, false);
}
int ncclCommAbort(void* comm) { return leave(comm, true); }
int ncclCommFinalize(void* comm) { return comm ? ncclSuccess : ncclInvalidArgument; }

int ncclCommCount(void* comm, int* n) {
  Comm* c = comm_of(comm);
  if (!c || !n) return ncclInvalidArgument;
  *n = c->n;
  return ncclSuccess;
}
int ncclCommUserRank(void* comm, int* r) {
  Comm* c = comm_of(comm);
  if (!c || !r) return ncclInvalidArgument;
  *r = c->rank;
  return ncclSuccess;
}
int ncclCommCuDevice(void* comm, int* d) {
  Comm* c = comm_of(comm);
  if (!c || !d) return ncclInvalidArgument;
  *d = c->device;
  return ncclSuccess;
}
int ncclCommGetAsyncError(void* comm, int* e) {
  Comm* c = comm_of(comm);
  if (!c || !e) return ncclInvalidArgument;
  *e = c->async_err.load();
  return ncclSuccess;
}

const char* ncclGetErrorString(int r) {
  switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
    case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
    case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
    case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
    case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    case ncclTimeout: return "NCCL operation timed out";
    default: return "unknown result code";
  }
}
const char* ncclGetLastError(void* comm) {
  Comm* c = comm_of(comm);
  return c && !c->last_error.empty() ? c->last_error.c_str() : t_last_error.c_str();
}

int ncclGroupStart() { return ncclSuccess; }
int ncclGroupEnd() { return ncclSuccess; }

int ncclAllReduce(const void* s, void* r, size_t count, int t, int op, void* comm, void* stream) {
  return enqueue_collective(comm, stream, ALL_REDUCE, s, r, count, t, op, 0);
}
int ncclReduce(const void* s, void* r, size_t count, int t, int op, int root, void* comm,
               void* stream) {
  return enqueue_collective(comm, stream, REDUCE, s, r, count, t, op, root);
}
int ncclBroadcast(const void* s, void* r, size_t count, int t, int root, void* comm, void* stream) {
  return enqueue_collective(comm, stream, BROADCAST, s, r, count, t, SUM, root);
}
int ncclBcast(void* buf, size_t count, int t, int root, void* comm, void* stream) {
  return enqueue_collective(comm, stream, BROADCAST, buf, buf, count, t, SUM, root);
}
int ncclAllGather(const void* s, void* r, size_t sendcount, int t, void* comm, void* stream) {
  return enqueue_collective(comm, stream, ALL_GATHER, s, r, sendcount, t, SUM, 0);
}
int ncclReduceScatter(const void* s, void* r, size_t recvcount, int t, int op, void* comm,
                      void* stream) {
  return enqueue_collective(comm, stream, REDUCE_SCATTER, s, r, recvcount, t, op, 0);
}

}  // extern "C"
