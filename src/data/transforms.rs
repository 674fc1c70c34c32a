//! The per-sample transform pipeline, timm's `create_transform` for ImageNet-style data:
//!
//! - train: RandomResizedCrop -> flips -> RandAugment / AutoAugment (or ColorJitter when no
//!   auto-augment is set) -> ToTensor + Normalize -> RandomErasing
//! - eval:  Resize(shorter side to floor(size / crop_pct)) -> CenterCrop(size) -> ToTensor +
//!   Normalize
//!
//! Image stages work on 8-bit RGB with PIL semantics (see `ops`); the output is CHW f32.

use anyhow::{bail, ensure, Result};
use image::RgbImage;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::augment::{AugmentHparams, AutoAugment, EraseMode, RandAugment, RandomErasing};
use super::ops::{self, Resample};
use super::random::{random_resample, uniform};

pub const IMAGENET_DEFAULT_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_DEFAULT_STD: [f64; 3] = [0.229, 0.224, 0.225];
/// timm's DEFAULT_CROP_PCT.
pub const DEFAULT_CROP_PCT: f64 = 0.875;

/// Resampling for the crop/resize (timm's `interpolation` / `train_interpolation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Bilinear,
    Bicubic,
    /// Training only: bilinear or bicubic chosen per image (timm's `train_interpolation`
    /// default). Eval transforms treat it as bilinear, timm's eval default.
    Random,
}

/// Describes a train or eval transform with timm's option names and defaults. Deserializes from
/// a TOML/JSON table in which every field is optional.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransformConfig {
    /// Output side length (timm `img_size`); outputs are square.
    pub size: usize,
    /// Train transforms (random crop, flips, augmentation, erasing) or eval (resize + centre crop).
    pub is_training: bool,
    /// RandomResizedCrop area fraction range.
    pub scale: (f64, f64),
    /// RandomResizedCrop aspect-ratio range (sampled in log space).
    pub ratio: (f64, f64),
    /// Horizontal flip probability.
    pub hflip: f64,
    /// Vertical flip probability.
    pub vflip: f64,
    /// ColorJitter strength for brightness, contrast and saturation; like timm, applied only when
    /// `auto_augment` is not set. 0 disables it.
    pub color_jitter: f64,
    pub interpolation: Interpolation,
    /// Eval: resize the shorter side to floor(size / crop_pct), then centre-crop `size`.
    pub crop_pct: f64,
    pub mean: [f64; 3],
    pub std: [f64; 3],
    /// timm auto-augment string: "rand-m9-mstd0.5-inc1" (RandAugment; keys m, n, mstd, mmax, inc,
    /// p, w) or an AutoAugment ImageNet policy "original", "originalr", "v0", "v0r" ("autoaug" is
    /// "original"), optionally with "-mstd0.5".
    pub auto_augment: Option<String>,
    /// RandomErasing probability (0 disables it).
    pub re_prob: f64,
    pub re_mode: EraseMode,
    /// Maximum number of erased boxes per image.
    pub re_count: usize,
}

impl Default for TransformConfig {
    /// timm's eval transform at 224 with timm's training defaults in the training fields.
    fn default() -> Self {
        TransformConfig {
            size: 224,
            is_training: false,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip: 0.5,
            vflip: 0.0,
            color_jitter: 0.4,
            interpolation: Interpolation::Bilinear,
            crop_pct: DEFAULT_CROP_PCT,
            mean: IMAGENET_DEFAULT_MEAN,
            std: IMAGENET_DEFAULT_STD,
            auto_augment: None,
            re_prob: 0.0,
            re_mode: EraseMode::Pixel,
            re_count: 1,
        }
    }
}

impl TransformConfig {
    /// timm's default training transform at `size` (RandomResizedCrop, flip, ColorJitter 0.4).
    pub fn train(size: usize) -> Self {
        TransformConfig {
            size,
            is_training: true,
            ..Default::default()
        }
    }

    /// timm's default eval transform at `size` (resize to size / 0.875, centre crop).
    pub fn eval(size: usize) -> Self {
        TransformConfig {
            size,
            ..Default::default()
        }
    }

    /// The fill colour of geometric augmentations: the mean pixel, as timm's
    /// `img_mean=tuple([min(255, round(255 * x)) for x in mean])` ((124, 116, 104) for ImageNet).
    pub fn fill(&self) -> [u8; 3] {
        self.mean
            .map(|m| (255.0 * m).round_ties_even().clamp(0.0, 255.0) as u8)
    }

    /// The eval resize target: floor(size / crop_pct).
    pub fn scale_size(&self) -> usize {
        (self.size as f64 / self.crop_pct).floor() as usize
    }

    /// Checks every field (NaN fails every check): sizes, ranges, probabilities, the
    /// normalization and the auto-augment string. [`Transform::new`] runs it first.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        let max = crate::models::MAX_INPUT_SIZE;
        ensure!(
            (1..=max).contains(&c.size),
            "size must be in 1..={max} px, got {}",
            c.size
        );
        ensure!(
            0.0 < c.scale.0 && c.scale.0 <= c.scale.1 && c.scale.1.is_finite(),
            "scale must satisfy 0 < min <= max (area fractions, timm's default (0.08, 1.0)), \
             got {:?}",
            c.scale
        );
        ensure!(
            0.0 < c.ratio.0 && c.ratio.0 <= c.ratio.1 && c.ratio.1.is_finite(),
            "ratio must satisfy 0 < min <= max (aspect ratios, timm's default (0.75, 1.33)), \
             got {:?}",
            c.ratio
        );
        for (name, p) in [
            ("hflip", c.hflip),
            ("vflip", c.vflip),
            ("re_prob", c.re_prob),
        ] {
            ensure!(
                (0.0..=1.0).contains(&p),
                "{name} must be a probability in [0, 1], got {p}"
            );
        }
        ensure!(
            c.color_jitter >= 0.0 && c.color_jitter.is_finite(),
            "color_jitter must be a finite strength >= 0, got {}",
            c.color_jitter
        );
        // The eval resize floor(size / crop_pct) must be a real image: at least 1 px and at
        // most MAX_RESIZE px on its shorter side.
        let min_crop = c.size as f64 / MAX_RESIZE as f64;
        ensure!(
            c.crop_pct >= min_crop && c.crop_pct <= 1.0,
            "crop_pct must be in [{min_crop:.4}, 1] for size {} (the eval resize is \
             floor(size / crop_pct) px, at most {MAX_RESIZE}; timm's default {DEFAULT_CROP_PCT}), \
             got {}",
            c.size,
            c.crop_pct
        );
        ensure!(
            c.mean.iter().all(|m| m.is_finite()),
            "mean must be finite, got {:?}",
            c.mean
        );
        ensure!(
            c.std.iter().all(|&s| s > 0.0 && s.is_finite()),
            "std must be finite and > 0, got {:?}",
            c.std
        );
        ensure!(
            (1..=MAX_ERASE_COUNT).contains(&c.re_count),
            "re_count must be in 1..={MAX_ERASE_COUNT}, got {}",
            c.re_count
        );
        if let Some(s) = c.auto_augment.as_deref().map(str::trim) {
            let hp = AugmentHparams::default();
            match s {
                "" | "none" => {}
                s if s.starts_with("rand") => {
                    RandAugment::from_config_str(s, hp)?;
                }
                s if s.starts_with("augmix") => {
                    bail!("auto_augment '{s}': AugMix is not supported")
                }
                s => {
                    AutoAugment::from_config_str(s, hp)?;
                }
            }
        }
        Ok(())
    }
}

/// The largest eval resize (shorter side, px) a `crop_pct` may ask for.
pub const MAX_RESIZE: usize = 16384;

/// The most boxes RandomErasing may erase per image (`re_count`; timm's default 1).
pub const MAX_ERASE_COUNT: usize = 100;

/// Either kind of auto-augmentation.
pub enum AutoAugmentKind {
    Rand(RandAugment),
    Auto(AutoAugment),
}

/// brightness, contrast, saturation jitter like torchvision's `ColorJitter(b, c, s)` on PIL images.
#[derive(Clone, Debug)]
pub struct ColorJitter {
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
}

impl ColorJitter {
    /// Factors are drawn first, then applied in a random order (torchvision's `get_params`).
    pub fn apply(&self, img: &RgbImage, rng: &mut StdRng) -> RgbImage {
        let mut order = [0usize, 1, 2, 3];
        order.shuffle(rng);
        let factor = |rng: &mut StdRng, v: f64| -> Option<f64> {
            (v > 0.0).then(|| uniform(rng, (1.0 - v).max(0.0), 1.0 + v))
        };
        let b = factor(rng, self.brightness);
        let c = factor(rng, self.contrast);
        let s = factor(rng, self.saturation);
        let mut out = img.clone();
        for k in order {
            out = match (k, b, c, s) {
                (0, Some(f), _, _) => ops::enhance_brightness(&out, f),
                (1, _, Some(f), _) => ops::enhance_contrast(&out, f),
                (2, _, _, Some(f)) => ops::enhance_color(&out, f),
                _ => out, // hue is not supported (timm's scalar color_jitter leaves it off)
            };
        }
        out
    }
}

/// A built transform: the config, validated, with its augmentations parsed.
pub struct Transform {
    cfg: TransformConfig,
    auto_augment: Option<AutoAugmentKind>,
    color_jitter: Option<ColorJitter>,
    erasing: Option<RandomErasing>,
}

impl Transform {
    pub fn new(cfg: &TransformConfig) -> Result<Self> {
        let c = cfg;
        c.validate()?;

        let hparams = AugmentHparams {
            fill: c.fill(),
            interpolation: match c.interpolation {
                Interpolation::Bilinear => Some(Resample::Bilinear),
                Interpolation::Bicubic => Some(Resample::Bicubic),
                Interpolation::Random => None,
            },
            translate_const: (c.size as f64 * 0.45).floor(),
            ..Default::default()
        };
        let auto_augment = match c.auto_augment.as_deref().map(str::trim) {
            None | Some("") | Some("none") => None,
            Some(s) if s.starts_with("rand") => Some(AutoAugmentKind::Rand(
                RandAugment::from_config_str(s, hparams)?,
            )),
            Some(s) if s.starts_with("augmix") => {
                bail!("auto_augment '{s}': AugMix is not supported")
            }
            Some(s) => Some(AutoAugmentKind::Auto(AutoAugment::from_config_str(
                s, hparams,
            )?)),
        };
        // timm disables color jitter whenever an auto-augment policy is set.
        let color_jitter =
            (auto_augment.is_none() && c.color_jitter > 0.0).then_some(ColorJitter {
                brightness: c.color_jitter,
                contrast: c.color_jitter,
                saturation: c.color_jitter,
            });
        let erasing = (c.re_prob > 0.0).then(|| RandomErasing {
            probability: c.re_prob,
            mode: c.re_mode,
            max_count: c.re_count,
            ..Default::default()
        });
        Ok(Transform {
            cfg: cfg.clone(),
            auto_augment,
            color_jitter,
            erasing,
        })
    }

    pub fn config(&self) -> &TransformConfig {
        &self.cfg
    }

    /// Output side length.
    pub fn size(&self) -> usize {
        self.cfg.size
    }

    /// The image stage: everything before ToTensor. Train: crop, flips, augmentation; eval:
    /// resize and centre crop. Returns a `size` x `size` image.
    pub fn apply_image(&self, img: &RgbImage, rng: &mut StdRng) -> Result<RgbImage> {
        ensure!(
            img.width() > 0 && img.height() > 0,
            "cannot transform an empty image"
        );
        let c = &self.cfg;
        if !c.is_training {
            let resample = match c.interpolation {
                Interpolation::Bicubic => Resample::Bicubic,
                _ => Resample::Bilinear,
            };
            let resized = ops::resize_shorter(img, c.scale_size(), resample)?;
            return Ok(ops::center_crop(&resized, c.size, c.size));
        }
        let (top, left, h, w) = random_resized_crop_params(
            img.width() as usize,
            img.height() as usize,
            c.scale,
            c.ratio,
            rng,
        );
        let resample = match c.interpolation {
            Interpolation::Bilinear => Resample::Bilinear,
            Interpolation::Bicubic => Resample::Bicubic,
            Interpolation::Random => random_resample(rng),
        };
        // torchvision crops first, then resizes, so the filter never reads outside the crop.
        let cropped = ops::crop(img, top as i64, left as i64, h, w);
        let mut out = ops::resize(&cropped, c.size, c.size, resample)?;
        // torchvision's RandomHorizontalFlip: flip if rand < p.
        if c.hflip > 0.0 && rng.random::<f64>() < c.hflip {
            out = ops::hflip(&out);
        }
        if c.vflip > 0.0 && rng.random::<f64>() < c.vflip {
            out = ops::vflip(&out);
        }
        match &self.auto_augment {
            Some(AutoAugmentKind::Rand(ra)) => out = ra.apply(&out, rng),
            Some(AutoAugmentKind::Auto(aa)) => out = aa.apply(&out, rng),
            None => {}
        }
        if let Some(cj) = &self.color_jitter {
            out = cj.apply(&out, rng);
        }
        Ok(out)
    }

    /// The whole transform into `out` (3 x size x size, CHW, normalized).
    pub fn apply_into(&self, img: &RgbImage, rng: &mut StdRng, out: &mut [f32]) -> Result<()> {
        let s = self.cfg.size;
        ensure!(
            out.len() == 3 * s * s,
            "output buffer holds {} values, expected 3x{s}x{s}",
            out.len()
        );
        let img = self.apply_image(img, rng)?;
        to_tensor_normalize(&img, self.cfg.mean, self.cfg.std, out);
        if let Some(re) = &self.erasing {
            re.apply(out, 3, s, s, rng);
        }
        Ok(())
    }

    /// The whole transform: CHW f32 of 3 x size x size.
    pub fn apply(&self, img: &RgbImage, rng: &mut StdRng) -> Result<Vec<f32>> {
        let mut out = vec![0.0; 3 * self.cfg.size * self.cfg.size];
        self.apply_into(img, rng, &mut out)?;
        Ok(out)
    }
}

/// torchvision `RandomResizedCrop.get_params` on a `width` x `height` image: returns
/// (top, left, height, width) of the crop. Ten tries at a random area fraction in `scale` and a
/// log-uniform aspect ratio in `ratio`; if none fits, the centre crop of the whole image clamped
/// to the ratio range.
pub fn random_resized_crop_params(
    width: usize,
    height: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut StdRng,
) -> (usize, usize, usize, usize) {
    let area = (width * height) as f64;
    let log_ratio = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, log_ratio.0, log_ratio.1).exp();
        // Python's round() is half-to-even.
        let w = (target_area * aspect).sqrt().round_ties_even() as usize;
        let h = (target_area / aspect).sqrt().round_ties_even() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return (top, left, h, w);
        }
    }
    // Fallback to a central crop.
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio.0 {
        (width, (width as f64 / ratio.0).round_ties_even() as usize)
    } else if in_ratio > ratio.1 {
        ((height as f64 * ratio.1).round_ties_even() as usize, height)
    } else {
        (width, height)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// torchvision `ToTensor` + `Normalize(mean, std)`: HWC u8 -> CHW f32 of (v / 255 - mean) / std,
/// computed in f32 as torch does.
pub fn to_tensor_normalize(img: &RgbImage, mean: [f64; 3], std: [f64; 3], out: &mut [f32]) {
    let hw = (img.width() * img.height()) as usize;
    assert_eq!(out.len(), 3 * hw, "output buffer size");
    let mean = mean.map(|m| m as f32);
    let std = std.map(|s| s as f32);
    for (p, px) in img.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * hw + p] = (px[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
}
