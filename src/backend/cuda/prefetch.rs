//! A device prefetcher: the next batch's images go host -> page-locked (pinned) host buffer ->
//! device on a copy stream of their own, while the GPU computes the current step.
//!
//! ```text
//! source iterator --(worker thread)--> pinned slot (ring of 3) --(caller thread, copy stream)
//!   --> device buffer from the pool --(compute stream waits on the copy's event)--> Tensor
//! ```
//!
//! * A worker thread pulls host batches from the source and copies each into a free pinned slot
//!   (grown when a batch is larger), after waiting for the event of the slot's previous
//!   host-to-device copy, so that a slot is never overwritten while a copy still reads it.
//! * The caller's thread, in `next()`, makes the CUDA calls of the copy: a device buffer from
//!   the [`Gpu`]'s caching pool, an event on the compute stream after that allocation which the
//!   copy stream waits for (the pool hands out a buffer as soon as the compute stream is done
//!   *enqueueing* work on it, so earlier kernels may still use it), `cuMemcpyHtoDAsync` on the
//!   copy stream (non-blocking, so the legacy default compute stream does not serialize with
//!   it), and an event after the copy. Handing the batch out makes the compute stream wait on
//!   that event: every later use of the buffer, including its reuse by the pool once the tensor
//!   is dropped, is stream-ordered after the copy.
//! * One batch is kept in flight ahead: when batch k is handed out, batch k+1's copy (if the
//!   worker has it) is already enqueued, and it waits only for the compute work enqueued before
//!   it, i.e. not for step k.
//! * Errors of the source come out unchanged, in order. Dropping the prefetcher makes the compute
//!   stream wait for copies still in flight, stops the worker and frees the pinned slots once no
//!   copy reads them.

use super::device::{DBuf, Gpu};
use anyhow::{anyhow, ensure, Context, Result};
use cudarc::driver::{result as cu, CudaContext, CudaEvent, CudaStream};
use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Pinned host buffers in the ring.
const SLOTS: usize = 3;
/// Batches whose copy is enqueued beyond the one handed out.
const AHEAD: usize = 1;

/// Counters of a [`DevicePrefetcher`] (tests, benches).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefetchStats {
    /// Batches copied to the device.
    pub batches: usize,
    /// Pinned host allocations (one per slot, plus one per grow).
    pub pinned_allocs: usize,
    /// Bytes of pinned host memory held now.
    pub pinned_bytes: usize,
}

/// A page-locked host buffer of f32 values, with the event of the last copy that reads it.
struct Pinned {
    ctx: Arc<CudaContext>,
    ptr: *mut f32,
    cap: usize,
    last_copy: Option<Arc<CudaEvent>>,
}

// SAFETY: the buffer is plain host memory owned by this value; the context and event are
// thread-safe, and every driver call binds the context to the calling thread first.
unsafe impl Send for Pinned {}

impl Pinned {
    fn empty(ctx: &Arc<CudaContext>) -> Self {
        Pinned {
            ctx: ctx.clone(),
            ptr: std::ptr::null_mut(),
            cap: 0,
            last_copy: None,
        }
    }

    /// Blocks until the last copy from this buffer is done.
    fn wait(&mut self) -> Result<()> {
        if let Some(e) = self.last_copy.take() {
            e.synchronize()
                .context("waiting for a host-to-device copy")?;
        }
        Ok(())
    }

    /// Waits for the last copy, grows the buffer to at least `x.len()` values and fills it.
    fn fill(&mut self, x: &[f32], stats: &Mutex<PrefetchStats>) -> Result<()> {
        self.wait()?;
        if self.cap < x.len() {
            self.free()?;
            self.ctx.bind_to_thread()?;
            let bytes = std::mem::size_of_val(x);
            // SAFETY: a fresh allocation of `bytes` bytes; written below before any read.
            let p = unsafe { cu::malloc_host(bytes, 0) }
                .with_context(|| format!("cuMemHostAlloc of {bytes} bytes of pinned memory"))?;
            self.ptr = p as *mut f32;
            self.cap = x.len();
            let mut s = stats.lock().expect("prefetch stats");
            s.pinned_allocs += 1;
            s.pinned_bytes += bytes;
        }
        if !x.is_empty() {
            // SAFETY: the buffer holds `cap >= x.len()` values and no copy reads it (waited).
            unsafe { std::ptr::copy_nonoverlapping(x.as_ptr(), self.ptr, x.len()) };
        }
        Ok(())
    }

    fn free(&mut self) -> Result<()> {
        self.wait()?;
        if !self.ptr.is_null() {
            self.ctx.bind_to_thread()?;
            // SAFETY: from cuMemHostAlloc, and no copy reads it any more (waited above).
            unsafe { cu::free_host(self.ptr as *mut std::ffi::c_void) }?;
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
        Ok(())
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if self.free().is_err() {
            // Leak rather than free memory a copy may still read.
            self.ptr = std::ptr::null_mut();
        }
    }
}

/// A host batch in a pinned slot, ready for its copy.
struct Staged<T> {
    slot: Pinned,
    len: usize,
    shape: Vec<usize>,
    payload: T,
}

/// A batch whose copy is enqueued on the copy stream.
struct InFlight<T> {
    buf: DBuf,
    shape: Vec<usize>,
    payload: T,
    /// Recorded on the copy stream after the copy (None for an empty batch).
    copied: Option<Arc<CudaEvent>>,
}

/// A batch of images on the host: its shape and values.
pub struct HostBatch {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Overlaps the host-to-device copy of the next batch with the GPU work of the current one (see
/// the module docs). Yields the source's items with the images on the device.
pub struct DevicePrefetcher<'g, T> {
    gpu: &'g Gpu,
    copy: Arc<CudaStream>,
    ready: Option<Receiver<Result<Staged<T>>>>,
    free: Option<Sender<Pinned>>,
    in_flight: VecDeque<Result<InFlight<T>>>,
    worker: Option<JoinHandle<()>>,
    stats: Arc<Mutex<PrefetchStats>>,
    finished: bool,
}

impl<T: Send + 'static> DevicePrefetcher<'static, T> {
    /// A prefetcher onto the process-wide GPU ([`super::global`]); without a usable GPU, the
    /// error says why in one line (no panic).
    pub fn on_global_gpu(
        src: impl Iterator<Item = Result<(HostBatch, T)>> + Send + 'static,
    ) -> Result<Self> {
        let gpu = super::global().map_err(|e| anyhow!("{e}"))?;
        DevicePrefetcher::new(gpu, src)
    }
}

impl<'g, T: Send + 'static> DevicePrefetcher<'g, T> {
    /// Starts the worker thread that pulls `src`. Nothing is copied until the first `next()`.
    pub fn new(
        gpu: &'g Gpu,
        src: impl Iterator<Item = Result<(HostBatch, T)>> + Send + 'static,
    ) -> Result<Self> {
        let copy = gpu
            .ctx
            .new_stream()
            .context("creating the copy stream of the prefetcher")?;
        let stats = Arc::new(Mutex::new(PrefetchStats::default()));
        let (ready_tx, ready_rx) = mpsc::sync_channel(SLOTS);
        let (free_tx, free_rx) = mpsc::channel();
        for _ in 0..SLOTS {
            free_tx
                .send(Pinned::empty(&gpu.ctx))
                .expect("the receiver is alive");
        }
        let st = stats.clone();
        let worker = std::thread::Builder::new()
            .name("device-prefetch".into())
            .spawn(move || stage_all(src, ready_tx, free_rx, st))
            .context("spawning the prefetch thread")?;
        Ok(DevicePrefetcher {
            gpu,
            copy,
            ready: Some(ready_rx),
            free: Some(free_tx),
            in_flight: VecDeque::new(),
            worker: Some(worker),
            stats,
            finished: false,
        })
    }

    pub fn stats(&self) -> PrefetchStats {
        *self.stats.lock().expect("prefetch stats")
    }

    /// Enqueues the copy of a staged batch and gives its slot back to the worker.
    fn issue(&mut self, staged: Result<Staged<T>>) -> Result<InFlight<T>> {
        let Staged {
            mut slot,
            len,
            shape,
            payload,
        } = staged?;
        let copied = self.enqueue_copy(&mut slot, len);
        if copied.is_err() {
            // Whatever was enqueued must finish before the worker refills the slot.
            let _ = self.copy.synchronize();
        }
        if let Some(free) = &self.free {
            let _ = free.send(slot);
        }
        let (buf, copied) = copied?;
        self.stats.lock().expect("prefetch stats").batches += 1;
        Ok(InFlight {
            buf,
            shape,
            payload,
            copied,
        })
    }

    fn enqueue_copy(
        &self,
        slot: &mut Pinned,
        len: usize,
    ) -> Result<(DBuf, Option<Arc<CudaEvent>>)> {
        let gpu = self.gpu;
        gpu.ctx.bind_to_thread()?;
        let buf = gpu.alloc(len)?;
        if len == 0 {
            return Ok((buf, None));
        }
        // The pooled buffer may still be used by compute work enqueued before now.
        let allocated = gpu.stream.record_event(None)?;
        self.copy.wait(&allocated)?;
        // SAFETY: `buf` holds `len` values; the slot holds `len` values that stay untouched until
        // `done` completes (the worker waits for it before refilling the slot).
        unsafe {
            cu::memcpy_htod_async(
                buf.device_ptr(),
                std::slice::from_raw_parts(slot.ptr, len),
                self.copy.cu_stream(),
            )
        }?;
        let done = Arc::new(self.copy.record_event(None)?);
        slot.last_copy = Some(done.clone());
        Ok((buf, Some(done)))
    }

    /// Issues staged batches without blocking while fewer than `want` are in flight; with
    /// `block`, waits for at least one. False when the source is exhausted.
    fn pump(&mut self, want: usize, block: bool) -> bool {
        while self.in_flight.len() < want {
            let Some(rx) = &self.ready else { return false };
            let msg = if block && self.in_flight.is_empty() {
                rx.recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                rx.try_recv()
            };
            match msg {
                Ok(staged) => {
                    let f = self.issue(staged);
                    self.in_flight.push_back(f);
                }
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => {
                    self.ready = None;
                    if let Some(h) = self.worker.take() {
                        if let Err(p) = h.join() {
                            let msg = p
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default();
                            self.in_flight.push_back(Err(anyhow!(
                                "the prefetch thread panicked (in the source iterator): {msg}"
                            )));
                        }
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Makes the compute stream wait for the batch's copy and hands out its buffer and shape.
    fn hand_out(&self, f: InFlight<T>) -> Result<(DBuf, Vec<usize>, T)> {
        if let Some(e) = &f.copied {
            if let Err(err) = self.gpu.stream.wait(e) {
                // The buffer goes back to the pool: its copy must be over first.
                let _ = self.copy.synchronize();
                return Err(err.into());
            }
        }
        Ok((f.buf, f.shape, f.payload))
    }
}

impl<T: Send + 'static> Iterator for DevicePrefetcher<'_, T> {
    type Item = Result<(DBuf, Vec<usize>, T)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        if self.in_flight.is_empty() {
            self.pump(1, true);
        }
        let Some(item) = self.in_flight.pop_front() else {
            self.finished = true;
            return None;
        };
        // Enqueue the next copy before this batch's step is enqueued, so that they overlap.
        self.pump(AHEAD, false);
        Some(item.and_then(|f| self.hand_out(f)))
    }
}

impl<T> Drop for DevicePrefetcher<'_, T> {
    fn drop(&mut self) {
        // Buffers still being copied into go back to the pool only after the compute stream
        // has waited for their copies.
        for f in self.in_flight.drain(..).flatten() {
            if let Some(e) = &f.copied {
                if self.gpu.stream.wait(e).is_err() {
                    let _ = self.copy.synchronize();
                }
            }
        }
        // The worker stops at its next send or slot request (after at most one source item).
        self.ready = None;
        self.free = None;
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
    }
}

/// The worker: source items into pinned slots, in order; errors pass through unchanged.
fn stage_all<T>(
    src: impl Iterator<Item = Result<(HostBatch, T)>>,
    ready: SyncSender<Result<Staged<T>>>,
    free: Receiver<Pinned>,
    stats: Arc<Mutex<PrefetchStats>>,
) {
    // A slot whose batch failed to stage, kept for the next one.
    let mut spare: Option<Pinned> = None;
    for item in src {
        let msg = match item {
            Err(e) => Err(e),
            Ok((images, payload)) => {
                let mut slot = match spare.take() {
                    Some(s) => s,
                    None => match free.recv() {
                        Ok(s) => s,
                        Err(_) => return, // the prefetcher is gone
                    },
                };
                match stage(&mut slot, &images, &stats) {
                    Ok(()) => Ok(Staged {
                        slot,
                        len: images.values.len(),
                        shape: images.shape,
                        payload,
                    }),
                    Err(e) => {
                        spare = Some(slot);
                        Err(e)
                    }
                }
            }
        };
        if ready.send(msg).is_err() {
            return; // the prefetcher is gone
        }
    }
}

fn stage(slot: &mut Pinned, images: &HostBatch, stats: &Mutex<PrefetchStats>) -> Result<()> {
    ensure!(
        images.values.len() == images.shape.iter().product::<usize>(),
        "DevicePrefetcher: {} values for a batch of shape {:?}",
        images.values.len(),
        images.shape
    );
    slot.fill(&images.values, stats)
}
