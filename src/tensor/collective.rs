//! Data-parallel collectives on tensors, for the layers above that must not see the backend:
//! one communicator per process over NCCL (GPU tensors only), the device chosen per rank.

use super::Tensor;
use crate::backend::cuda::{self, nccl::Nccl};
use anyhow::{anyhow, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Picks the GPU of the rank with this local rank before any device tensor exists: GPU
/// `local_rank` of the node, or the one GPU the process sees (`srun --gpus-per-task=1` and
/// CUDA_VISIBLE_DEVICES give each rank its own device 0). Returns the ordinal.
pub fn select_gpu(local_rank: usize) -> Result<usize> {
    if let Some(why) = cuda::unavailable_reason() {
        anyhow::bail!("data-parallel training needs a GPU per rank: {why}");
    }
    let n = cuda::device_count()?;
    let ordinal = match n {
        1 => 0,
        _ if local_rank < n => local_rank,
        _ => anyhow::bail!(
            "local rank {local_rank} but this process sees {n} GPUs (CUDA_VISIBLE_DEVICES?)"
        ),
    };
    cuda::select_device(ordinal)?;
    Ok(ordinal)
}

/// Whether the NCCL library can be loaded.
pub fn available() -> bool {
    cuda::nccl::nccl_present()
}

/// A fresh communicator id (rank 0 makes it and hands it out).
pub fn unique_id() -> Result<[u8; 128]> {
    cuda::nccl::unique_id()
}

/// This process's communicator.
pub struct Collective {
    nccl: Arc<Nccl>,
    /// Milliseconds since `born` at the last [`Collective::alive`].
    last: Arc<AtomicU64>,
    born: Instant,
    done: Arc<AtomicBool>,
}

fn gpu() -> Result<&'static cuda::Gpu> {
    cuda::global().map_err(|e| anyhow!("{e}"))
}

impl Collective {
    /// Joins communicator `id` as `rank` of `world` on this process's GPU (blocks for all).
    pub fn join(rank: usize, world: usize, id: [u8; 128]) -> Result<Collective> {
        gpu()?; // the context first: NCCL binds the communicator to the current device
        Ok(Collective {
            nccl: Arc::new(Nccl::init(rank, world, id)?),
            last: Arc::new(AtomicU64::new(0)),
            born: Instant::now(),
            done: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn rank(&self) -> usize {
        self.nccl.rank()
    }

    pub fn world_size(&self) -> usize {
        self.nccl.world_size()
    }

    /// The mean of `t` over the ranks, in place (a device tensor; bit-identical on every rank).
    pub fn all_reduce_mean(&self, t: &Tensor<f32>) -> Result<()> {
        let (buf, offset) = t
            .cuda_parts()
            .ok_or_else(|| anyhow!("all-reduce of a host tensor: data-parallel runs on GPUs"))?;
        self.nccl.all_reduce_mean(gpu()?, buf, offset, t.numel())
    }

    /// Rank 0's values of `t` on every rank, in place (a device tensor).
    pub fn broadcast(&self, t: &Tensor<f32>) -> Result<()> {
        let (buf, offset) = t
            .cuda_parts()
            .ok_or_else(|| anyhow!("broadcast of a host tensor: data-parallel runs on GPUs"))?;
        self.nccl.broadcast(gpu()?, buf, offset, t.numel())
    }

    /// The element-wise sum of `values` over the ranks, in f64 (exact for counts below 2^53:
    /// the evaluation's top-1/top-5 counts, the ranks' stop requests). Synchronizes.
    pub fn all_reduce_sum(&self, values: &[f64]) -> Result<Vec<f64>> {
        let g = gpu()?;
        let buf = g.upload_f64(values)?;
        self.nccl.all_reduce_sum_f64(g, &buf, 0, values.len())?;
        let mut out = g.download_f64(&buf)?;
        out.truncate(values.len());
        self.nccl.async_error()?;
        Ok(out)
    }

    /// Rank 0's `words` on every rank (each 16 bits wide: exact in f32). Synchronizes.
    pub fn broadcast_words(&self, words: &[u16]) -> Result<Vec<u16>> {
        let t = Tensor::new(&[words.len()], words.iter().map(|&w| w as f32).collect());
        let t = t.to_device(crate::tensor::storage::Device::Cuda)?;
        self.broadcast(&t)?;
        self.sync()?;
        Ok(t.to_host().data().iter().map(|&v| v as u16).collect())
    }

    /// From now on every train-mode BatchNorm of this process uses the statistics of the
    /// global batch (the ranks' f64 partial sums all-reduced, forward and backward).
    pub fn sync_batch_norm(&self, on: bool) {
        cuda::sync_bn::set(on.then(|| self.nccl.clone()));
    }

    /// Waits for the collectives issued so far and reports a failed communicator.
    pub fn sync(&self) -> Result<()> {
        gpu()?.synchronize()?;
        self.nccl.async_error()
    }

    /// Aborts the communicator: a collective blocked on a lost peer returns.
    pub fn abort(&self) {
        self.nccl.abort()
    }

    /// Marks progress for the watchdog (call once per step).
    pub fn alive(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// A watchdog thread (NCCL collectives block forever on a peer that crashed or hangs): when
    /// no [`Collective::alive`] came for `timeout`, it prints why, aborts the communicator and
    /// ends the process with status 70; the last checkpoint on disk stays as it was.
    pub fn start_watchdog(&self, timeout: Duration) {
        self.alive();
        let (nccl, last, done, born) = (
            self.nccl.clone(),
            self.last.clone(),
            self.done.clone(),
            self.born,
        );
        let rank = self.rank();
        std::thread::Builder::new()
            .name("nccl-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(200));
                if done.load(Ordering::Relaxed) {
                    return;
                }
                let idle = born.elapsed().as_millis() as u64 - last.load(Ordering::Relaxed);
                if idle > timeout.as_millis() as u64 {
                    eprintln!(
                        "rank {rank}: no progress for {:.0} s (another rank crashed or hangs); \
                         aborting NCCL and stopping",
                        idle as f64 / 1e3
                    );
                    nccl.abort();
                    std::process::exit(70);
                }
            })
            .expect("spawn the NCCL watchdog");
    }
}

impl Drop for Collective {
    fn drop(&mut self) {
        cuda::sync_bn::set(None);
        self.done.store(true, Ordering::Relaxed);
    }
}
