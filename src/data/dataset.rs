//! Datasets: an indexable list of (image, label) pairs. Images are decoded on demand (by the
//! loader's worker threads), always as 8-bit RGB.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use image::RgbImage;

/// A labelled image dataset. `load` is called from several worker threads at once.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn num_classes(&self) -> usize;

    /// Class names in label order (index `k` is label `k`).
    fn class_names(&self) -> Vec<String>;

    /// Label of sample `i`, known without decoding the image.
    fn label(&self, i: usize) -> usize;

    /// Decodes sample `i` as 8-bit RGB (HWC). A file that cannot be read or decoded is an `Err`
    /// naming the file.
    fn load(&self, i: usize) -> Result<RgbImage>;

    /// A human-readable name of sample `i` for warnings (a file path, a record number).
    fn describe(&self, i: usize) -> String;
}

/// The longest image side the loaders decode (px).
pub const MAX_IMAGE_SIDE: u32 = 16384;

/// Decodes an image file of any supported format (detected from its content, like PIL) to RGB.
/// Grayscale, gray+alpha and RGBA become RGB (alpha dropped, as PIL's `convert('RGB')` does);
/// CMYK JPEGs are converted to RGB by the JPEG decoder.
pub fn decode_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    // A few hundred bytes may declare a 65535-px side: bounded before decoding, far past photos.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    let mut reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?;
    reader.limits(limits);
    let img = reader
        .decode()
        .with_context(|| format!("cannot decode image {}", path.display()))?;
    Ok(img.to_rgb8())
}

/// Extensions that `ImageFolder` picks up (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// The torchvision / timm ImageFolder layout: `root/<class>/**/<image>`. Class sub-folders
/// sorted by name give the labels; images are found recursively, sorted by path within a class.
/// Symlinks are followed, without loops: see `Walk`.
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    samples: Vec<(PathBuf, usize)>,
}

impl ImageFolder {
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        ensure!(
            root.is_dir(),
            "image folder {} does not exist or is not a directory",
            root.display()
        );
        let mut classes: Vec<String> = fs::read_dir(&root)
            .with_context(|| format!("cannot list {}", root.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        classes.sort();
        ensure!(
            !classes.is_empty(),
            "no class sub-folders in {} (expected root/<class>/<image>.jpg)",
            root.display()
        );
        let canonical = |p: &Path| {
            fs::canonicalize(p).with_context(|| format!("cannot resolve {}", p.display()))
        };
        let canon_root = canonical(&root)?;
        let class_dirs = classes
            .iter()
            .map(|c| canonical(&root.join(c)))
            .collect::<Result<Vec<_>>>()?;
        let mut samples = Vec::new();
        let mut empty = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let own = &class_dirs[label];
            ensure!(
                !canon_root.starts_with(own),
                "class folder {} links to {}, which holds the dataset itself (a loop)",
                root.join(class).display(),
                own.display()
            );
            let mut walk = Walk {
                root: &canon_root,
                classes: &class_dirs,
                own,
                dirs: HashSet::from([own.clone()]),
                files: HashSet::new(),
            };
            let mut files = Vec::new();
            walk.collect(&root.join(class), &mut files)?;
            files.sort();
            if files.is_empty() {
                empty.push(class.as_str());
            }
            samples.extend(files.into_iter().map(|f| (f, label)));
        }
        ensure!(
            !samples.is_empty(),
            "no images (jpg, jpeg, png) in the class folders of {}",
            root.display()
        );
        // torchvision refuses a class without images too: its label would never be seen.
        ensure!(
            empty.is_empty(),
            "class folder(s) without images in {}: {}",
            root.display(),
            empty.join(", ")
        );
        Ok(ImageFolder {
            root,
            classes,
            samples,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path and label of sample `i`.
    pub fn sample(&self, i: usize) -> (&Path, usize) {
        (&self.samples[i].0, self.samples[i].1)
    }
}

/// The walk of one class folder, following symlinks: each directory is entered once (by
/// canonical path) and never one that holds the dataset root (`ln -s .. cat/loop`) or belongs to
/// another class, so links neither loop nor relabel images; each image file (by canonical path)
/// is taken once.
struct Walk<'a> {
    /// The dataset root, canonical.
    root: &'a Path,
    /// Every class folder, canonical.
    classes: &'a [PathBuf],
    /// This class's folder, canonical.
    own: &'a Path,
    dirs: HashSet<PathBuf>,
    files: HashSet<PathBuf>,
}

impl Walk<'_> {
    /// Appends the images under `dir` (paths as reached from the class folder) to `out`.
    fn collect(&mut self, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries = fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<Vec<_>>>()
            .with_context(|| format!("cannot list {}", dir.display()))?;
        // Sorted, so that which of two paths to one file is kept does not depend on the OS.
        entries.sort();
        for path in entries {
            if path.is_dir() {
                let canon = fs::canonicalize(&path)
                    .with_context(|| format!("cannot resolve {}", path.display()))?;
                if self.may_enter(&canon) && self.dirs.insert(canon) {
                    self.collect(&path, out)?;
                }
            } else if has_image_extension(&path) {
                // A dangling link stays in, under its own path: loading it names it.
                let key = fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
                if self.files.insert(key) {
                    out.push(path);
                }
            }
        }
        Ok(())
    }

    /// False for the root or a folder above it, and for a folder of another class (the class
    /// folder that is its longest prefix, so nested class folders each keep their own).
    fn may_enter(&self, dir: &Path) -> bool {
        if self.root.starts_with(dir) {
            return false;
        }
        let owner = self
            .classes
            .iter()
            .filter(|c| dir.starts_with(c))
            .max_by_key(|c| c.as_os_str().len());
        owner.is_none_or(|c| c == self.own)
    }
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn num_classes(&self) -> usize {
        self.classes.len()
    }
    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }
    fn label(&self, i: usize) -> usize {
        self.samples[i].1
    }
    fn load(&self, i: usize) -> Result<RgbImage> {
        decode_rgb(&self.samples[i].0)
    }
    fn describe(&self, i: usize) -> String {
        self.samples[i].0.display().to_string()
    }
}

/// CIFAR-10 in its binary form: `data_batch_1.bin` .. `data_batch_5.bin` (train) or
/// `test_batch.bin` (test), each record a label byte and 3072 bytes of 32x32 CHW pixels.
/// `dir` may be the folder holding the files or its parent (`cifar-10-batches-bin/` inside).
pub struct Cifar10 {
    /// Each file and how many records it holds.
    files: Vec<(PathBuf, usize)>,
    classes: Vec<String>,
    labels: Vec<u8>,
    /// All records' pixels, CHW per record (50,000 x 3,072 bytes for the train split).
    pixels: Vec<u8>,
}

pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

const CIFAR_RECORD: usize = 1 + 3 * 32 * 32;

impl Cifar10 {
    pub fn open(dir: impl AsRef<Path>, train: bool) -> Result<Self> {
        let mut dir = dir.as_ref().to_path_buf();
        ensure!(
            dir.is_dir(),
            "CIFAR-10 folder {} does not exist",
            dir.display()
        );
        if !dir.join("batches.meta.txt").exists() && dir.join("cifar-10-batches-bin").is_dir() {
            dir = dir.join("cifar-10-batches-bin");
        }
        let names: Vec<String> = if train {
            (1..=5).map(|k| format!("data_batch_{k}.bin")).collect()
        } else {
            vec!["test_batch.bin".to_string()]
        };
        let files: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
        let missing: Vec<&str> = names
            .iter()
            .zip(&files)
            .filter(|(_, f)| !f.is_file())
            .map(|(n, _)| n.as_str())
            .collect();
        ensure!(
            missing.is_empty(),
            "CIFAR-10 file(s) missing in {}: {}",
            dir.display(),
            missing.join(", ")
        );
        let mut labels = Vec::new();
        let mut pixels = Vec::new();
        let mut counts = Vec::new();
        for f in &files {
            let bytes = fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
            ensure!(
                !bytes.is_empty() && bytes.len() % CIFAR_RECORD == 0,
                "{} is {} bytes, not a whole number of {CIFAR_RECORD}-byte CIFAR-10 records",
                f.display(),
                bytes.len()
            );
            for (r, rec) in bytes.chunks_exact(CIFAR_RECORD).enumerate() {
                ensure!(
                    rec[0] < 10,
                    "{}: record {r} has label {}, CIFAR-10 labels are 0..9",
                    f.display(),
                    rec[0]
                );
                labels.push(rec[0]);
                pixels.extend_from_slice(&rec[1..]);
            }
            counts.push(bytes.len() / CIFAR_RECORD);
        }
        let meta = dir.join("batches.meta.txt");
        let classes = if meta.is_file() {
            let text = fs::read_to_string(&meta)
                .with_context(|| format!("cannot read {}", meta.display()))?;
            let names: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            ensure!(
                names.len() == 10,
                "{} lists {} class names, expected 10",
                meta.display(),
                names.len()
            );
            names
        } else {
            CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect()
        };
        Ok(Cifar10 {
            files: files.into_iter().zip(counts).collect(),
            classes,
            labels,
            pixels,
        })
    }

    /// Which file and record within it hold sample `i`.
    fn locate(&self, i: usize) -> (&Path, usize) {
        let mut rest = i;
        for (f, n) in &self.files {
            if rest < *n {
                return (f, rest);
            }
            rest -= n;
        }
        (&self.files[0].0, i)
    }
}

impl Dataset for Cifar10 {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn num_classes(&self) -> usize {
        10
    }
    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }
    fn label(&self, i: usize) -> usize {
        self.labels[i] as usize
    }
    fn load(&self, i: usize) -> Result<RgbImage> {
        if i >= self.len() {
            bail!("CIFAR-10 index {i} out of range (len {})", self.len());
        }
        let chw = &self.pixels[i * 3072..(i + 1) * 3072];
        let mut hwc = vec![0u8; 3072];
        for p in 0..1024 {
            for c in 0..3 {
                hwc[p * 3 + c] = chw[c * 1024 + p];
            }
        }
        Ok(RgbImage::from_raw(32, 32, hwc).expect("32x32x3 buffer"))
    }
    fn describe(&self, i: usize) -> String {
        let (f, r) = self.locate(i);
        format!("{} record {r}", f.display())
    }
}

/// A view of some samples of another dataset, in the given order (e.g. the first N images,
/// or every k-th for a quick benchmark).
pub struct Subset {
    inner: Arc<dyn Dataset>,
    indices: Vec<usize>,
}

impl Subset {
    pub fn new(inner: Arc<dyn Dataset>, indices: Vec<usize>) -> Result<Self> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= inner.len()) {
            bail!(
                "subset index {bad} out of range (dataset has {})",
                inner.len()
            );
        }
        Ok(Subset { inner, indices })
    }

    /// `n` samples spread evenly over the dataset (all of them if it has fewer), so that
    /// every class is represented in a sorted ImageFolder.
    pub fn evenly_spaced(inner: Arc<dyn Dataset>, n: usize) -> Self {
        let len = inner.len();
        let n = n.min(len);
        let indices = (0..n).map(|k| k * len / n.max(1)).collect();
        Subset { inner, indices }
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn class_names(&self) -> Vec<String> {
        self.inner.class_names()
    }
    fn label(&self, i: usize) -> usize {
        self.inner.label(self.indices[i])
    }
    fn load(&self, i: usize) -> Result<RgbImage> {
        self.inner.load(self.indices[i])
    }
    fn describe(&self, i: usize) -> String {
        self.inner.describe(self.indices[i])
    }
}
