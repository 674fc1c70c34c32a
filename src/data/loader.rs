//! The loader: decodes and transforms batches on worker threads and yields them in order.
//!
//! Design (PyTorch DataLoader's): batch k of an epoch is built whole by worker k % W, and each
//! worker has its own bounded channel, so the consumer reads batch k from channel k % W and the
//! order is fixed without a reorder buffer. A worker runs at most `prefetch` batches ahead of
//! the consumer. All randomness is a function of (seed, epoch, dataset index) (the shuffle of
//! (seed, epoch)), never of which thread did the work, so results are reproducible and an
//! interrupted epoch can be resumed exactly with `epoch_from`.

use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, ensure, Result};
use crossbeam_channel::{bounded, Receiver};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::dataset::Dataset;
use super::random::mix_seed;
use super::transforms::{Transform, TransformConfig};
use crate::Tensor;

/// One batch, in the loader's order.
#[derive(Debug)]
pub struct Batch {
    /// Normalized images [B, 3, S, S].
    pub images: Tensor<f32>,
    pub labels: Vec<usize>,
    /// Dataset indices of the images, in batch order.
    pub indices: Vec<usize>,
    /// Samples left out because they could not be loaded: "description: reason". The batch is
    /// that much shorter (it can even be empty).
    pub skipped: Vec<String>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// The random stream of sample `index` in `epoch`: the same whichever thread transforms it.
pub fn sample_rng(seed: u64, epoch: usize, index: usize) -> StdRng {
    StdRng::seed_from_u64(mix_seed(&[seed, epoch as u64, index as u64]))
}

/// What the workers share.
struct Shared {
    dataset: Arc<dyn Dataset>,
    transform: Transform,
    seed: u64,
}

impl Shared {
    fn load_batch(&self, epoch: usize, indices: &[usize], strict: bool) -> Result<Batch> {
        let s = self.transform.size();
        let per = 3 * s * s;
        let mut data = vec![0.0f32; indices.len() * per];
        let mut labels = Vec::with_capacity(indices.len());
        let mut kept = Vec::with_capacity(indices.len());
        let mut skipped = Vec::new();
        for &i in indices {
            let slot = &mut data[labels.len() * per..(labels.len() + 1) * per];
            let mut rng = sample_rng(self.seed, epoch, i);
            let result = self
                .dataset
                .load(i)
                .and_then(|img| self.transform.apply_into(&img, &mut rng, slot));
            match result {
                Ok(()) => {
                    labels.push(self.dataset.label(i));
                    kept.push(i);
                }
                Err(e) if strict => {
                    return Err(e.context(format!(
                        "sample {i} ({}) could not be loaded",
                        self.dataset.describe(i)
                    )))
                }
                Err(e) => skipped.push(format!("{}: {}", self.dataset.describe(i), e.root_cause())),
            }
        }
        data.truncate(labels.len() * per);
        Ok(Batch {
            images: Tensor::new(&[labels.len(), 3, s, s], data),
            labels,
            indices: kept,
            skipped,
        })
    }
}

/// Batches a dataset through a transform on `workers` threads (0: on the calling thread).
pub struct Loader {
    shared: Arc<Shared>,
    batch_size: usize,
    shuffle: bool,
    drop_last: bool,
    workers: usize,
    prefetch: usize,
    strict: bool,
    /// (rank, world size): this process's share of every epoch (see [`Loader::shard`]).
    shard: (usize, usize),
    /// An evaluation shard: no batch is cut, the first ranks may get one more.
    shard_keeps_all: bool,
}

impl Loader {
    /// `shuffle` permutes the samples each epoch from (seed, epoch); `drop_last` drops a final
    /// partial batch (use it for training); `seed` also seeds every sample's augmentation.
    pub fn new(
        dataset: Arc<dyn Dataset>,
        transform: TransformConfig,
        batch_size: usize,
        shuffle: bool,
        drop_last: bool,
        workers: usize,
        seed: u64,
    ) -> Result<Self> {
        ensure!(batch_size > 0, "batch size must be positive");
        let transform = Transform::new(&transform)?;
        Ok(Loader {
            shared: Arc::new(Shared {
                dataset,
                transform,
                seed,
            }),
            batch_size,
            shuffle,
            drop_last,
            workers,
            prefetch: 2,
            strict: false,
            shard: (0, 1),
            shard_keeps_all: false,
        })
    }

    /// Strict: an unloadable image makes its batch an `Err` naming the file, instead of being
    /// skipped and listed in `Batch::skipped`.
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// How many finished batches each worker may queue ahead of the consumer (default 2).
    pub fn prefetch(mut self, batches_per_worker: usize) -> Self {
        self.prefetch = batches_per_worker.max(1);
        self
    }

    /// Data-parallel sharding (PyTorch's DistributedSampler, by batches): the epoch's
    /// permutation is the same for every world size; its batches are numbered globally and
    /// rank r of `world` gets batches r, r + world, r + 2 world, ... (the epoch cut to a multiple
    /// of `world` batches). So global step g is global batches g*world .. (g+1)*world: the
    /// samples a 1-process run with `accum_steps = world` puts in its step g.
    pub fn shard(mut self, rank: usize, world: usize) -> Result<Self> {
        self.set_shard(rank, world)?;
        Ok(self)
    }

    /// [`Loader::shard`] in place.
    pub fn set_shard(&mut self, rank: usize, world: usize) -> Result<()> {
        ensure!(
            world > 0 && rank < world,
            "shard: rank {rank} of world size {world}"
        );
        self.shard = (rank, world);
        self.shard_keeps_all = false;
        Ok(())
    }

    /// Sharding for evaluation: the same round-robin of batches as [`Loader::shard`] but no
    /// batch is dropped (rank r gets batches r, r + world, ... of all of them), so the ranks'
    /// counts add up to the whole set exactly.
    pub fn set_eval_shard(&mut self, rank: usize, world: usize) -> Result<()> {
        self.set_shard(rank, world)?;
        self.shard_keeps_all = true;
        Ok(())
    }

    /// (rank, world size) of [`Loader::shard`]; (0, 1) unsharded.
    pub fn shard_of(&self) -> (usize, usize) {
        self.shard
    }

    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.shared.dataset
    }

    pub fn transform(&self) -> &Transform {
        &self.shared.transform
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// This rank's batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let (rank, world) = self.shard;
        (self.global_batches() + world - 1 - rank) / world
    }

    /// Batches per epoch over all ranks (cut to a multiple of the world size unless an
    /// evaluation shard).
    fn global_batches(&self) -> usize {
        let n = self.shared.dataset.len();
        let b = if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        };
        match self.shard_keeps_all {
            true => b,
            false => b - b % self.shard.1,
        }
    }

    /// The sample order of `epoch`: a permutation from (seed, epoch) when shuffling, else 0..n.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.shared.dataset.len()).collect();
        if self.shuffle {
            // The trailing tag keeps this stream apart from the per-sample streams.
            let mut rng =
                StdRng::seed_from_u64(mix_seed(&[self.shared.seed, epoch as u64, u64::MAX, 1]));
            order.shuffle(&mut rng);
        }
        order
    }

    /// The dataset indices of each of this rank's batches of `epoch`.
    pub fn batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let order = self.order(epoch);
        let (rank, world) = self.shard;
        order
            .chunks(self.batch_size)
            .take(self.global_batches())
            .skip(rank)
            .step_by(world)
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// Builds batch `batch` of `epoch` on the calling thread.
    pub fn load_batch(&self, epoch: usize, batch: usize) -> Result<Batch> {
        let batches = self.batches(epoch);
        let indices = batches
            .get(batch)
            .ok_or_else(|| anyhow!("batch {batch} out of range ({} per epoch)", batches.len()))?;
        self.shared.load_batch(epoch, indices, self.strict)
    }

    /// Iterates over the batches of `epoch`, in order.
    pub fn epoch(&self, epoch: usize) -> EpochIter {
        self.epoch_from(epoch, 0)
    }

    /// Iterates over the batches of `epoch` from batch `first_batch` on: resuming mid-epoch
    /// gives exactly the batches an uninterrupted run would have.
    pub fn epoch_from(&self, epoch: usize, first_batch: usize) -> EpochIter {
        let batches: Vec<Vec<usize>> = self.batches(epoch).into_iter().skip(first_batch).collect();
        let batches = Arc::new(batches);
        let mut receivers = Vec::new();
        let mut handles = Vec::new();
        let workers = self.workers.min(batches.len());
        for w in 0..workers {
            let (tx, rx) = bounded(self.prefetch);
            let shared = Arc::clone(&self.shared);
            let batches = Arc::clone(&batches);
            let strict = self.strict;
            let handle = std::thread::Builder::new()
                .name(format!("loader-{w}"))
                .spawn(move || {
                    for indices in batches.iter().skip(w).step_by(workers) {
                        let batch = shared.load_batch(epoch, indices, strict);
                        if tx.send(batch).is_err() {
                            return; // the consumer is gone
                        }
                    }
                })
                .expect("spawn loader worker thread");
            receivers.push(rx);
            handles.push(handle);
        }
        EpochIter {
            shared: Arc::clone(&self.shared),
            epoch,
            strict: self.strict,
            batches,
            next: 0,
            receivers,
            handles,
        }
    }
}

/// The batches of one epoch (see `Loader::epoch`). Dropping it early stops the workers.
pub struct EpochIter {
    shared: Arc<Shared>,
    epoch: usize,
    strict: bool,
    batches: Arc<Vec<Vec<usize>>>,
    next: usize,
    receivers: Vec<Receiver<Result<Batch>>>,
    handles: Vec<JoinHandle<()>>,
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.batches.len() {
            return None;
        }
        let k = self.next;
        self.next += 1;
        if self.receivers.is_empty() {
            return Some(
                self.shared
                    .load_batch(self.epoch, &self.batches[k], self.strict),
            );
        }
        let w = k % self.receivers.len();
        match self.receivers[w].recv() {
            Ok(batch) => Some(batch),
            Err(_) => {
                // A worker only hangs up early if it panicked; stop the epoch.
                self.next = self.batches.len();
                Some(Err(anyhow!(
                    "loader worker {w} stopped before batch {k} of epoch {} (it panicked)",
                    self.epoch
                )))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.batches.len() - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for EpochIter {}

impl Drop for EpochIter {
    fn drop(&mut self) {
        // Hanging up first makes blocked workers return; then wait for their current batch.
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
