//! A caching device allocator: freed buffers go back to a free list keyed by a rounded size and
//! are handed out again, so a training loop that allocates the same shapes every step stops
//! calling cuMemAlloc after its first step.

use anyhow::Result;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, DeviceRepr};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

/// Rounded capacity for a request of `n` elements: powers of two up to 4096, then steps of an
/// eighth of the power of two below (at most 12.5% slack), so similar sizes share a list.
pub fn bin(n: usize) -> usize {
    let n = n.max(1);
    if n <= 4096 {
        return n.next_power_of_two();
    }
    let step = (1usize << (usize::BITS - 1 - n.leading_zeros())) / 8;
    n.div_ceil(step) * step
}

/// Allocation counters (for the benches and to check that a loop stops allocating).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Buffers taken from the driver.
    pub device_allocs: usize,
    /// Requests served from the free lists.
    pub reuses: usize,
    /// Bytes held by the pool (in use or free).
    pub bytes: usize,
}

struct Inner<T> {
    free: HashMap<usize, Vec<CudaSlice<T>>>,
    stats: PoolStats,
    /// Fill every handed-out buffer with 0xFF bytes (NaN as f32 and f64), so that a test sees
    /// any output element a kernel failed to write.
    poison: bool,
}

/// The pool of one element type on one stream.
pub struct Pool<T> {
    stream: Arc<CudaStream>,
    inner: Arc<Mutex<Inner<T>>>,
}

impl<T: DeviceRepr> Pool<T> {
    pub fn new(stream: Arc<CudaStream>) -> Self {
        Pool {
            stream,
            inner: Arc::new(Mutex::new(Inner {
                free: HashMap::new(),
                stats: PoolStats::default(),
                poison: false,
            })),
        }
    }

    /// A buffer of `len` elements with unspecified contents.
    pub fn alloc(&self, len: usize) -> Result<DevBuf<T>> {
        let cap = bin(len);
        let (reused, poison) = {
            let mut g = self.inner.lock().expect("pool lock");
            let s = g.free.get_mut(&cap).and_then(|v| v.pop());
            if s.is_some() {
                g.stats.reuses += 1;
            }
            (s, g.poison)
        };
        let mut slice = match reused {
            Some(s) => s,
            None => {
                // SAFETY: contents are unspecified until a kernel or copy writes them; every
                // launcher writes its outputs in full.
                let s = unsafe { self.stream.alloc::<T>(cap) }?;
                let mut g = self.inner.lock().expect("pool lock");
                g.stats.device_allocs += 1;
                g.stats.bytes += cap * std::mem::size_of::<T>();
                s
            }
        };
        let ptr = {
            let (p, _sync) = slice.device_ptr_mut(&self.stream);
            p
        };
        if poison {
            let bytes = cap * std::mem::size_of::<T>();
            // SAFETY: ptr is a live allocation of `bytes` bytes, written on this pool's stream.
            unsafe {
                cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes, self.stream.cu_stream())
            }?;
        }
        Ok(DevBuf {
            slice: Some(slice),
            ptr,
            len,
            pool: Some(self.inner.clone()),
        })
    }

    /// Turns poisoning of new buffers on or off (tests).
    pub fn set_poison(&self, on: bool) {
        self.inner.lock().expect("pool lock").poison = on;
    }

    pub fn stats(&self) -> PoolStats {
        self.inner.lock().expect("pool lock").stats
    }

    /// Returns every free buffer to the driver.
    pub fn trim(&self) {
        let mut g = self.inner.lock().expect("pool lock");
        let freed: usize = g
            .free
            .iter()
            .map(|(cap, v)| cap * v.len() * std::mem::size_of::<T>())
            .sum();
        g.free.clear();
        g.stats.bytes -= freed;
    }
}

/// A device buffer of `len` elements (its capacity may be larger) that returns to its pool
/// when dropped; or a view of part of another buffer (see [`DevBuf::view`]).
pub struct DevBuf<T> {
    slice: Option<CudaSlice<T>>,
    /// Device address of element 0.
    ptr: u64,
    len: usize,
    /// None for a view.
    pool: Option<Arc<Mutex<Inner<T>>>>,
}

impl<T> DevBuf<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address of the first element (kernel arguments, cuBLAS, copies).
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// The whole underlying allocation of an owning buffer (None for a view).
    pub fn slice_mut(&mut self) -> Option<&mut CudaSlice<T>> {
        self.slice.as_mut()
    }

    /// Elements `offset..offset + len` as a buffer that every launcher accepts, borrowed from
    /// this one (e.g. one parameter of a flat parameter buffer). Writes through it land here.
    pub fn view(&self, offset: usize, len: usize) -> View<'_, T> {
        assert!(
            offset + len <= self.len,
            "view {offset}..{} of a buffer of {}",
            offset + len,
            self.len
        );
        View(
            DevBuf {
                slice: None,
                ptr: self.ptr + (offset * std::mem::size_of::<T>()) as u64,
                len,
                pool: None,
            },
            PhantomData,
        )
    }
}

impl<T> Drop for DevBuf<T> {
    fn drop(&mut self) {
        if let (Some(s), Some(pool)) = (self.slice.take(), self.pool.as_ref()) {
            if let Ok(mut g) = pool.lock() {
                let cap = s.len();
                g.free.entry(cap).or_default().push(s);
            }
        }
    }
}

impl<T> DevBuf<T> {
    /// A writable view of elements `offset..offset + len` (the buffer is borrowed exclusively).
    pub fn view_mut(&mut self, offset: usize, len: usize) -> ViewMut<'_, T> {
        let v = self.view(offset, len).0;
        // Re-wrap: the DevBuf inside a view owns nothing, so moving it out is free.
        ViewMut(
            DevBuf {
                slice: None,
                ptr: v.ptr,
                len: v.len,
                pool: None,
            },
            PhantomData,
        )
    }
}

/// A writable view into a [`DevBuf`]; cannot outlive the exclusive borrow of it.
pub struct ViewMut<'a, T>(DevBuf<T>, PhantomData<&'a mut DevBuf<T>>);

impl<T> Deref for ViewMut<'_, T> {
    type Target = DevBuf<T>;
    fn deref(&self) -> &DevBuf<T> {
        &self.0
    }
}

impl<T> DerefMut for ViewMut<'_, T> {
    fn deref_mut(&mut self) -> &mut DevBuf<T> {
        &mut self.0
    }
}

/// A view into a [`DevBuf`]; cannot outlive it. Dereferences to a `DevBuf` that owns nothing.
pub struct View<'a, T>(DevBuf<T>, PhantomData<&'a DevBuf<T>>);

impl<T> Deref for View<'_, T> {
    type Target = DevBuf<T>;
    fn deref(&self) -> &DevBuf<T> {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::bin;

    #[test]
    fn bins_cover_requests_with_bounded_slack() {
        for n in [
            1,
            3,
            4096,
            4097,
            5000,
            1 << 20,
            (1 << 20) + 1,
            51_380_224,
            12_345_678,
        ] {
            let b = bin(n);
            assert!(b >= n, "{n} -> {b}");
            assert!(n <= 4096 || (b - n) as f64 <= n as f64 / 8.0, "{n} -> {b}");
        }
        assert_eq!(bin(5000), bin(5100));
    }
}
