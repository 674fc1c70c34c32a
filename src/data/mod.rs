//! The data pipeline: datasets on disk (or drawn), timm-style transforms and augmentations, and a
//! threaded loader that yields normalized NCHW batches in a reproducible order.
//!
//! Everything random is seeded: the shuffle from (seed, epoch), each sample's augmentation from
//! (seed, epoch, dataset index), so a run can be resumed exactly and does not depend on how the
//! worker threads were scheduled. Semantics follow timm / torchvision with PIL images; where we
//! differ it is said in the item's docs.
//!
//! ```no_run
//! use std::sync::Arc;
//! use ghostv3::data::{ImageFolder, Loader, TransformConfig};
//! let train = Arc::new(ImageFolder::open("imagenette2-224/train")?);
//! let loader = Loader::new(train, TransformConfig::train(224), 64, true, true, 4, 42)?;
//! for batch in loader.epoch(0) {
//!     let batch = batch?; // batch.images: [B, 3, 224, 224], batch.labels: Vec<usize>
//! }
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod augment;
pub mod dataset;
pub mod loader;
pub mod ops;
pub mod synthetic;
pub mod transforms;

pub use augment::{one_hot_smoothed, AutoAugment, Mixup, MixupOutput, RandAugment, RandomErasing};
pub use dataset::{Cifar10, Dataset, ImageFolder, Subset};
pub use loader::{sample_rng, Batch, EpochIter, Loader};
pub use synthetic::Synthetic;
pub use transforms::{EraseMode, Interpolation, Transform, TransformConfig};

/// Folds several integers into one well-mixed 64-bit seed (splitmix64 finalizer over each part),
/// so that nearby (seed, epoch, index) triples give unrelated random streams.
pub(crate) fn mix_seed(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        h ^= p
            .wrapping_add(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(h << 6)
            .wrapping_add(h >> 2);
        h = splitmix64(h);
    }
    h
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
