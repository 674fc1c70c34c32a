//! NCCL collectives on the device's stream (cudarc's `nccl`, loaded at run time like the rest
//! of CUDA): one communicator per process (one process per GPU), the gradient all-reduce in
//! buckets, the broadcast of the initial state from rank 0. The CPU emulator ships an NCCL
//! stand-in (`cuda/emu`) so the same calls run in CI across processes.

use super::device::{DBuf, Gpu};
use anyhow::{bail, Result};
use cudarc::nccl::{result, sys};
use std::sync::atomic::{AtomicBool, Ordering};

/// DDP's bucket sizes: a small first bucket (its all-reduce starts early), then 25 MB.
pub const FIRST_BUCKET_BYTES: usize = 1 << 20;
pub const BUCKET_BYTES: usize = 25 << 20;

/// Whether libnccl can be loaded (checked before any NCCL call: cudarc panics when a library
/// is missing).
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { sys::is_culib_present() }
}

fn missing() -> anyhow::Error {
    anyhow::anyhow!(
        "NCCL not found (libnccl.so.2 could not be loaded; install NCCL or put its folder on \
         LD_LIBRARY_PATH): data-parallel training needs it"
    )
}

fn check(r: Result<result::NcclStatus, result::NcclError>, what: &str) -> Result<()> {
    r.map(|_| ()).map_err(|e| {
        // SAFETY: ncclGetErrorString returns a static string.
        let msg = unsafe {
            let p = sys::ncclGetErrorString(e.0);
            if p.is_null() {
                String::new()
            } else {
                std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        anyhow::anyhow!("NCCL {what}: {:?} {msg}", e.0)
    })
}

/// A fresh NCCL unique id (rank 0 makes it; the rendezvous hands it to the others).
pub fn unique_id() -> Result<[u8; 128]> {
    if !nccl_present() {
        return Err(missing());
    }
    let id = result::get_uniqueid().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {:?}", e.0))?;
    Ok(id.internal.map(|c| c as u8))
}

/// One rank's communicator.
pub struct Nccl {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    aborted: AtomicBool,
}

// SAFETY: an NCCL communicator may be used from any thread; ncclCommAbort is documented to be
// callable from another thread (the watchdog) while a collective is pending.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl Nccl {
    /// Joins the communicator `id` as `rank` of `world` (blocks until every rank has joined).
    pub fn init(rank: usize, world: usize, id: [u8; 128]) -> Result<Nccl> {
        if !nccl_present() {
            return Err(missing());
        }
        let id = sys::ncclUniqueId {
            internal: id.map(|b| b as ::core::ffi::c_char),
        };
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by a successful init.
        let comm = unsafe {
            check(
                result::comm_init_rank(comm.as_mut_ptr(), world as i32, id, rank as i32),
                "init",
            )?;
            comm.assume_init()
        };
        Ok(Nccl {
            comm,
            rank,
            world,
            aborted: AtomicBool::new(false),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Averages `len` f32 values of `buf` from `offset` over the ranks, in place, on the
    /// device's stream, in DDP's buckets (1 MB first, then 25 MB). Every rank gets the same bits.
    pub fn all_reduce_mean(&self, gpu: &Gpu, buf: &DBuf, offset: usize, len: usize) -> Result<()> {
        assert!(offset + len <= buf.len(), "all-reduce out of range");
        let mut at = 0;
        let mut bucket = FIRST_BUCKET_BYTES / 4;
        while at < len {
            let n = bucket.min(len - at);
            let p = buf.device_ptr() + ((offset + at) * 4) as u64;
            // SAFETY: p..p+4n lies in `buf`; the op runs in stream order after its producers.
            check(
                unsafe {
                    result::all_reduce(
                        p as *const _,
                        p as *mut _,
                        n,
                        sys::ncclDataType_t::ncclFloat32,
                        sys::ncclRedOp_t::ncclAvg,
                        self.comm,
                        gpu.stream.cu_stream() as _,
                    )
                },
                "all-reduce",
            )?;
            at += n;
            bucket = BUCKET_BYTES / 4;
        }
        Ok(())
    }

    /// Sums `len` f64 values of `buf` from `offset` over the ranks, in place.
    pub fn all_reduce_sum_f64(
        &self,
        gpu: &Gpu,
        buf: &super::DevBuf<f64>,
        offset: usize,
        len: usize,
    ) -> Result<()> {
        assert!(offset + len <= buf.len(), "all-reduce out of range");
        let p = buf.device_ptr() + (offset * 8) as u64;
        // SAFETY: as in all_reduce_mean.
        check(
            unsafe {
                result::all_reduce(
                    p as *const _,
                    p as *mut _,
                    len,
                    sys::ncclDataType_t::ncclFloat64,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm,
                    gpu.stream.cu_stream() as _,
                )
            },
            "all-reduce",
        )
    }

    /// Rank 0's `len` f32 values of `buf` from `offset` to every rank, in place.
    pub fn broadcast(&self, gpu: &Gpu, buf: &DBuf, offset: usize, len: usize) -> Result<()> {
        assert!(offset + len <= buf.len(), "broadcast out of range");
        let p = buf.device_ptr() + (offset * 4) as u64;
        // SAFETY: as in all_reduce_mean.
        check(
            unsafe {
                result::broadcast(
                    p as *const _,
                    p as *mut _,
                    len,
                    sys::ncclDataType_t::ncclFloat32,
                    0,
                    self.comm,
                    gpu.stream.cu_stream() as _,
                )
            },
            "broadcast",
        )
    }

    /// The communicator's asynchronous error (a peer gone, a timeout), if any.
    pub fn async_error(&self) -> Result<()> {
        let mut e = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `e` is a valid out pointer.
        check(
            unsafe { sys::ncclCommGetAsyncError(self.comm, &mut e) }.result(),
            "async error query",
        )?;
        if e != sys::ncclResult_t::ncclSuccess {
            bail!("NCCL communicator failed: {e:?}");
        }
        Ok(())
    }

    /// Aborts pending collectives (from a watchdog thread): the blocked rank returns an error
    /// instead of hanging.
    pub fn abort(&self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: the communicator is valid until drop; abort once.
            let _ = unsafe { result::comm_abort(self.comm) };
        }
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        if !self.aborted.load(Ordering::SeqCst) {
            // SAFETY: the communicator is valid and destroyed once.
            let _ = unsafe { result::comm_destroy(self.comm) };
        }
    }
}
