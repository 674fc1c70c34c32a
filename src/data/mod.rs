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
pub mod mixup;
pub mod ops;
mod random;
pub mod synthetic;
pub mod transforms;

pub use augment::{AutoAugment, EraseMode, RandAugment, RandomErasing};
pub use dataset::{Cifar10, Dataset, ImageFolder, Subset};
pub use loader::{sample_rng, Batch, EpochIter, Loader};
pub use mixup::{one_hot_smoothed, Mixup, MixupOutput};
pub use synthetic::Synthetic;
pub use transforms::{Interpolation, Transform, TransformConfig};
