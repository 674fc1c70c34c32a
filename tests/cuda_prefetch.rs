//! The device prefetcher (backend::cuda::prefetch): every batch arrives on the device exactly as
//! it left the host, with its payload, in order, errors of the source included, while GPU work on
//! the earlier batches goes on. On the emulator, work on the copy stream runs only when something
//! waits for it (cuda/emu/emu.cpp), so a missing event wait or a pinned buffer refilled too early
//! shows up as wrong (poisoned NaN or stale) values. Without a GPU each test prints
//! `skipped: no CUDA device (...)`, and the last test runs them all on the CPU emulator.

mod common;

use anyhow::anyhow;
use common::cuda::*;
use ghostv3::backend::cuda::prefetch::{DevicePrefetcher, PrefetchStats};
use ghostv3::tensor::storage::HostBatch;

/// The prefetcher with tensors in and out (as `tensor::storage::batches_to` wraps it).
struct Pf<'g, T>(DevicePrefetcher<'g, T>);

impl<'g, T: Send + 'static> Pf<'g, T> {
    fn new(
        g: &'g Gpu,
        src: impl Iterator<Item = anyhow::Result<(Tensor, T)>> + Send + 'static,
    ) -> anyhow::Result<Self> {
        let src = src.map(|r| r.and_then(|(t, p)| Ok((HostBatch::try_from(t)?, p))));
        Ok(Pf(DevicePrefetcher::new(g, src)?))
    }

    fn stats(&self) -> PrefetchStats {
        self.0.stats()
    }
}

impl<T: Send + 'static> Pf<'static, T> {
    fn on_global_gpu(
        src: impl Iterator<Item = anyhow::Result<(Tensor, T)>> + Send + 'static,
    ) -> anyhow::Result<Self> {
        let src = src.map(|r| r.and_then(|(t, p)| Ok((HostBatch::try_from(t)?, p))));
        Ok(Pf(DevicePrefetcher::on_global_gpu(src)?))
    }
}

impl<T: Send + 'static> Iterator for Pf<'_, T> {
    type Item = anyhow::Result<(Tensor, T)>;
    fn next(&mut self) -> Option<Self::Item> {
        let r = self.0.next()?;
        Some(r.map(|(buf, shape, p)| (Tensor::from_cuda(&shape, buf), p)))
    }
}
use ghostv3::backend::cuda::{unavailable_reason, Gpu};
use ghostv3::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;

type Payload = (usize, Vec<usize>);
type Item = anyhow::Result<(Tensor, Payload)>;

/// Host batches [b, 3, h, w] of fresh random values (None: the source fails at that position),
/// with labels as the payload.
fn host_batches(seed: u64, sizes: &[Option<usize>], h: usize, w: usize) -> Vec<Option<Tensor>> {
    let mut rng = StdRng::seed_from_u64(seed);
    sizes
        .iter()
        .map(|b| b.map(|b| rand_t(&mut rng, &[b, 3, h, w], -3.0, 3.0)))
        .collect()
}

fn labels(i: usize, t: &Tensor) -> Vec<usize> {
    (0..t.shape()[0]).map(|j| i * 100 + j).collect()
}

fn source(batches: &[Option<Tensor>]) -> impl Iterator<Item = Item> + Send + 'static {
    let batches = batches.to_vec();
    batches.into_iter().enumerate().map(|(i, b)| match b {
        Some(t) => {
            let l = labels(i, &t);
            Ok((t, (i, l)))
        }
        None => Err(anyhow!("source error at batch {i}")),
    })
}

fn host_relu(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| v.max(0.0)).collect()
}

/// Downloads a device batch and compares it exactly with its host batch, and the relu computed on
/// the device meanwhile with the host relu.
fn check(g: &Gpu, i: usize, dev: &Tensor, y: &ghostv3::backend::cuda::DBuf, host: &Tensor) {
    assert!(dev.is_cuda(), "batch {i} is not on the device");
    assert_eq!(dev.shape(), host.shape(), "batch {i}: shape");
    let (buf, offset) = dev.cuda_parts().unwrap();
    assert_eq!(offset, 0);
    let got = g.download(buf).unwrap();
    assert!(
        got == host.data(),
        "batch {i}: device values differ from the host batch (first bad element {:?})",
        got.iter().zip(host.data()).position(|(a, b)| a != b)
    );
    assert!(
        g.download(y).unwrap() == host_relu(host.data()),
        "batch {i}: relu on the device differs"
    );
}

/// Runs the prefetcher over `sizes` like a training loop: after each `next()` a kernel reads the
/// new batch (enqueued, not waited for), and only then is the previous batch downloaded and
/// checked, while the next batch's copy is in flight. Returns the batches seen (Ok index / Err
/// message, in order) and the prefetcher's statistics.
fn run(
    g: &Gpu,
    seed: u64,
    sizes: &[Option<usize>],
) -> (
    Vec<Result<usize, String>>,
    ghostv3::backend::cuda::prefetch::PrefetchStats,
) {
    let host = host_batches(seed, sizes, 5, 7);
    let mut pf = Pf::new(g, source(&host)).unwrap();
    let mut seen = Vec::new();
    let mut prev: Option<(usize, Tensor, ghostv3::backend::cuda::DBuf)> = None;
    for item in pf.by_ref() {
        match item {
            Ok((t, (i, l))) => {
                let hb = host[i].as_ref().expect("a batch where the source failed");
                assert_eq!(l, labels(i, hb), "batch {i}: payload");
                let y = g.relu(t.cuda_parts().unwrap().0).unwrap();
                if let Some((j, pt, py)) = prev.take() {
                    check(g, j, &pt, &py, host[j].as_ref().unwrap());
                }
                prev = Some((i, t, y));
                seen.push(Ok(i));
            }
            Err(e) => seen.push(Err(format!("{e}"))),
        }
    }
    if let Some((j, pt, py)) = prev.take() {
        check(g, j, &pt, &py, host[j].as_ref().unwrap());
    }
    assert!(
        pf.next().is_none(),
        "the prefetcher yields nothing after its end"
    );
    (seen, pf.stats())
}

fn expected(sizes: &[Option<usize>]) -> Vec<Result<usize, String>> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, b)| match b {
            Some(_) => Ok(i),
            None => Err(format!("source error at batch {i}")),
        })
        .collect()
}

#[test]
fn batches_arrive_exactly_in_order_with_payloads_and_errors() {
    let Some(g) = gpu() else { return };
    // Varying batch sizes, a source error in the middle, a larger batch that no slot of the ring
    // fits (the ring has grown past one allocation per slot), and a last smaller batch.
    let sizes = [
        Some(3),
        Some(5),
        Some(4),
        None,
        Some(2),
        Some(9),
        Some(4),
        Some(4),
        None,
        Some(1),
    ];
    let (seen, stats) = run(&g, 1, &sizes);
    assert_eq!(seen, expected(&sizes));
    assert_eq!(stats.batches, 8);
    assert!(
        stats.pinned_allocs > 3,
        "a batch larger than every slot grows one: {stats:?}"
    );
    println!("{stats:?}");
}

#[test]
fn errors_only_and_empty_sources() {
    let Some(g) = gpu() else { return };
    let (seen, stats) = run(&g, 2, &[]);
    assert!(seen.is_empty());
    assert_eq!(stats.pinned_allocs, 0);
    let sizes = [None, None, None, None, Some(2)];
    let (seen, _) = run(&g, 3, &sizes);
    assert_eq!(seen, expected(&sizes));
}

#[test]
fn many_batches_through_the_ring_stop_allocating() {
    let Some(g) = gpu() else { return };
    let sizes = vec![Some(6); 12];
    let (seen, stats) = run(&g, 4, &sizes);
    assert_eq!(seen, expected(&sizes));
    assert_eq!(stats.batches, 12);
    assert_eq!(
        stats.pinned_allocs, 3,
        "one pinned buffer per slot: {stats:?}"
    );
}

#[test]
fn dropping_mid_stream_is_clean() {
    let Some(g) = gpu() else { return };
    // An endless source: dropping the prefetcher must stop its thread, and leave no copy in flight
    // into a buffer the pool hands out again.
    let mut rng = StdRng::seed_from_u64(5);
    let src = std::iter::repeat_with(move || {
        let t = rand_t(&mut rng, &[2, 3, 4, 4], -1.0, 1.0);
        let data = t.data().to_vec();
        Ok((t, data))
    });
    let mut pf = Pf::new(&g, src).unwrap();
    for _ in 0..3 {
        let (t, host) = pf.next().unwrap().unwrap();
        assert!(g.download(t.cuda_parts().unwrap().0).unwrap() == host);
    }
    drop(pf);
    let mut rng = StdRng::seed_from_u64(6);
    for _ in 0..4 {
        let x = rand_vec(&mut rng, 96, -1.0, 1.0);
        assert!(g.download(&g.upload(&x).unwrap()).unwrap() == x);
    }
}

#[test]
fn a_panicking_source_is_an_error_then_the_end() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(7);
    let src = (0..4).map(move |i| {
        assert!(i < 2, "source broke at {i}");
        Ok((rand_t(&mut rng, &[1, 3, 2, 2], -1.0, 1.0), i))
    });
    let mut pf = Pf::new(&g, src).unwrap();
    assert_eq!(pf.next().unwrap().unwrap().1, 0);
    assert_eq!(pf.next().unwrap().unwrap().1, 1);
    let e = pf.next().unwrap().unwrap_err();
    assert!(format!("{e}").contains("source broke at 2"), "{e}");
    assert!(pf.next().is_none());
}

#[test]
fn device_tensors_from_the_source_are_an_error() {
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(8);
    let host = rand_t(&mut rng, &[1, 3, 2, 2], -1.0, 1.0);
    let dev = Tensor::from_cuda(host.shape(), g.upload(host.data()).unwrap());
    let src = vec![Ok((dev, 0)), Ok((host.clone(), 1))].into_iter();
    let mut pf = Pf::new(&g, src).unwrap();
    let e = pf.next().unwrap().unwrap_err();
    assert!(format!("{e}").contains("already on the CUDA device"), "{e}");
    let (t, i) = pf.next().unwrap().unwrap();
    assert_eq!(i, 1);
    assert!(g.download(t.cuda_parts().unwrap().0).unwrap() == host.data());
    assert!(pf.next().is_none());
}

/// The way the trainer feeds it: the loader's epoch iterator, labels and indices as the payload.
#[test]
fn loader_epochs_through_the_prefetcher() {
    use ghostv3::data::{Dataset, Loader, Synthetic, TransformConfig};
    use std::sync::Arc;
    let Some(g) = gpu() else { return };
    let ds: Arc<dyn Dataset> = Arc::new(Synthetic::new(23, 24, 0));
    let loader = Loader::new(ds, TransformConfig::eval(16), 5, false, false, 2, 0).unwrap();
    let host: Vec<_> = loader.epoch(0).map(|b| b.unwrap()).collect();
    let src = loader
        .epoch(0)
        .map(|b| b.map(|b| (b.images, (b.labels, b.indices))));
    let mut pf = Pf::new(&g, src).unwrap();
    let mut k = 0;
    for item in pf.by_ref() {
        let (images, (labels, indices)) = item.unwrap();
        let h = &host[k];
        assert_eq!((&labels, &indices), (&h.labels, &h.indices), "batch {k}");
        assert_eq!(images.shape(), h.images.shape());
        assert!(g.download(images.cuda_parts().unwrap().0).unwrap() == h.images.data());
        k += 1;
    }
    assert_eq!(k, 5);
}

/// The emulator's stream semantics that the tests above rely on: a copy on a created stream from
/// page-locked memory has not happened until something waits for it, and then it reads the host
/// bytes as they are at that time. (On a GPU only the waited-for result is checked.)
#[test]
fn copy_stream_work_happens_only_once_waited_for() {
    use cudarc::driver::result as cu;
    let Some(g) = gpu() else { return };
    let emulated = std::env::var_os("GHOSTV3_EMU_CHILD").is_some();
    let ctx = g.stream().context().clone();
    ctx.bind_to_thread().unwrap();
    let copy = ctx.new_stream().unwrap();
    let n = 64;
    let dst = g.alloc(n).unwrap(); // poisoned: NaN bytes
                                   // SAFETY: a fresh pinned buffer of n f32, freed below after the copy has completed.
    let pinned = unsafe { cu::malloc_host(n * 4, 0) }.unwrap() as *mut f32;
    let host = unsafe { std::slice::from_raw_parts_mut(pinned, n) };
    host.fill(1.0);
    unsafe { cu::memcpy_htod_async(dst.device_ptr(), &host[..], copy.cu_stream()) }.unwrap();
    let done = copy.record_event(None).unwrap();
    if emulated {
        assert!(
            g.download(&dst).unwrap().iter().all(|v| v.is_nan()),
            "the copy ran before anything waited for it"
        );
    }
    host.fill(2.0); // a refill before the wait: the copy reads these bytes on the emulator
    if emulated {
        // A query says "not ready" (and makes progress, so that polling ends).
        assert!(
            !done.is_complete(),
            "the event of a queued copy is complete"
        );
    }
    g.stream().wait(&done).unwrap();
    let got = g.download(&dst).unwrap();
    let ok = |v: f32| {
        if emulated {
            v == 2.0
        } else {
            v == 1.0 || v == 2.0
        }
    };
    assert!(got.iter().all(|&v| ok(v)), "{:?}", &got[..4]);
    done.synchronize().unwrap();
    // SAFETY: the copy is complete.
    unsafe { cu::free_host(pinned as *mut std::ffi::c_void) }.unwrap();
}

#[test]
fn without_cuda_constructing_is_an_error_not_a_panic() {
    let Some(why) = unavailable_reason() else {
        println!("skipped: a CUDA device (or the emulator) is present");
        return;
    };
    let src = std::iter::empty::<anyhow::Result<(Tensor, ())>>();
    match Pf::on_global_gpu(src) {
        Ok(_) => panic!("a prefetcher without CUDA"),
        Err(e) => {
            println!("error: {e:#}");
            assert!(format!("{e:#}").contains(&why), "{e:#} vs {why}");
        }
    }
}

#[test]
fn cpu_emulator_runs_every_gpu_test() {
    run_on_emulator(&[]);
}
