//! timm's per-image augmentations: RandAugment and AutoAugment (`timm/data/auto_augment.py`)
//! and RandomErasing (`random_erasing.py`). The batch-level Mixup / CutMix are in `mixup`.
//!
//! Names, magnitude scales and the order of random decisions follow timm; the random numbers
//! themselves come from our seeded `StdRng`, so results match timm in distribution, not draw
//! for draw.

use anyhow::{bail, ensure, Context, Result};
use image::RgbImage;
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use super::ops::{self, Resample};
use super::random::{random_resample, uniform};

/// timm's `_LEVEL_DENOM`: magnitude `m` maps to the fraction `m / 10` of each op's range.
pub const LEVEL_DENOM: f64 = 10.0;

/// timm's `_FILL`, used when no dataset mean is known.
pub const DEFAULT_FILL: [u8; 3] = [128, 128, 128];

/// The augmentation ops of `auto_augment.py`, by timm's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpName {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    PosterizeIncreasing,
    PosterizeOriginal,
    Solarize,
    SolarizeIncreasing,
    SolarizeAdd,
    Color,
    ColorIncreasing,
    Contrast,
    ContrastIncreasing,
    Brightness,
    BrightnessIncreasing,
    Sharpness,
    SharpnessIncreasing,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    TranslateXRel,
    TranslateYRel,
}

/// timm's `_RAND_TRANSFORMS`: the RandAugment op list.
pub const RAND_TRANSFORMS: [OpName; 15] = [
    OpName::AutoContrast,
    OpName::Equalize,
    OpName::Invert,
    OpName::Rotate,
    OpName::Posterize,
    OpName::Solarize,
    OpName::SolarizeAdd,
    OpName::Color,
    OpName::Contrast,
    OpName::Brightness,
    OpName::Sharpness,
    OpName::ShearX,
    OpName::ShearY,
    OpName::TranslateXRel,
    OpName::TranslateYRel,
];

/// timm's `_RAND_INCREASING_TRANSFORMS` ("inc1"): severity grows with magnitude for every op.
pub const RAND_INCREASING_TRANSFORMS: [OpName; 15] = [
    OpName::AutoContrast,
    OpName::Equalize,
    OpName::Invert,
    OpName::Rotate,
    OpName::PosterizeIncreasing,
    OpName::SolarizeIncreasing,
    OpName::SolarizeAdd,
    OpName::ColorIncreasing,
    OpName::ContrastIncreasing,
    OpName::BrightnessIncreasing,
    OpName::SharpnessIncreasing,
    OpName::ShearX,
    OpName::ShearY,
    OpName::TranslateXRel,
    OpName::TranslateYRel,
];

/// timm's `_RAND_CHOICE_WEIGHTS_0` ("w0"), in `RAND_TRANSFORMS` order (normalized when used).
const RAND_CHOICE_WEIGHTS_0: [f64; 15] = [
    0.025, 0.005, 0.0, 0.3, 0.0, 0.005, 0.005, 0.025, 0.005, 0.005, 0.025, 0.2, 0.2, 0.1, 0.1,
];

/// timm's `hparams` for the ops.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AugmentHparams {
    /// Fill colour of geometric ops (`img_mean`).
    pub fill: [u8; 3],
    /// Resampling of geometric ops; `None` picks bilinear or bicubic per call, as timm does
    /// when `interpolation` is 'random' or unset.
    pub interpolation: Option<Resample>,
    /// Absolute translate range in pixels at magnitude 10 (`translate_const`).
    pub translate_const: f64,
    /// Relative translate range at magnitude 10 (`translate_pct`).
    pub translate_pct: f64,
    /// Std of Gaussian magnitude noise (`magnitude_std`); infinity means uniform in [0, m].
    pub magnitude_std: f64,
    /// Upper clip of the noisy magnitude (`magnitude_max`, default `LEVEL_DENOM`).
    pub magnitude_max: Option<f64>,
}

impl Default for AugmentHparams {
    /// timm's `_HPARAMS_DEFAULT`.
    fn default() -> Self {
        AugmentHparams {
            fill: DEFAULT_FILL,
            interpolation: None,
            translate_const: 250.0,
            translate_pct: 0.45,
            magnitude_std: 0.0,
            magnitude_max: None,
        }
    }
}

/// One op with its probability and magnitude (timm's `AugmentOp`).
#[derive(Clone, Debug)]
pub struct AugmentOp {
    pub name: OpName,
    pub prob: f64,
    pub magnitude: f64,
    pub hparams: AugmentHparams,
}

/// timm's `_randomly_negate`: -v with probability 1/2.
fn randomly_negate(v: f64, rng: &mut StdRng) -> f64 {
    if rng.random::<f64>() > 0.5 {
        -v
    } else {
        v
    }
}

impl AugmentOp {
    pub fn new(name: OpName, prob: f64, magnitude: f64, hparams: AugmentHparams) -> Self {
        AugmentOp {
            name,
            prob,
            magnitude,
            hparams,
        }
    }

    /// timm's `AugmentOp.__call__`: skip with probability 1 - prob, add magnitude noise, clip to
    /// [0, magnitude_max], then apply the op at that level.
    pub fn apply(&self, img: &RgbImage, rng: &mut StdRng) -> RgbImage {
        if self.prob < 1.0 && rng.random::<f64>() > self.prob {
            return img.clone();
        }
        let mut magnitude = self.magnitude;
        let std = self.hparams.magnitude_std;
        if std == f64::INFINITY {
            magnitude = uniform(rng, 0.0, magnitude);
        } else if std > 0.0 {
            let noise: f64 = rng.sample(StandardNormal);
            magnitude += std * noise;
        }
        let upper = self.hparams.magnitude_max.unwrap_or(LEVEL_DENOM);
        let magnitude = magnitude.clamp(0.0, upper);
        apply_op(self.name, img, magnitude, &self.hparams, rng)
    }
}

/// Applies op `name` at `magnitude` (on timm's 0..10 scale, already noised and clipped).
/// `rng` decides the random sign of signed ops and, when `hparams.interpolation` is `None`, the
/// resampling of geometric ops.
pub fn apply_op(
    name: OpName,
    img: &RgbImage,
    magnitude: f64,
    hp: &AugmentHparams,
    rng: &mut StdRng,
) -> RgbImage {
    use OpName::*;
    let level = magnitude / LEVEL_DENOM;
    // timm's _enhance_level_to_arg: [0.1, 1.9].
    let enhance = || level * 1.8 + 0.1;
    // timm's _enhance_increasing_level_to_arg: 1 -/+ up to 0.9, kept >= 0.1.
    let enhance_inc = |rng: &mut StdRng| (1.0 + randomly_negate(level * 0.9, rng)).max(0.1);
    // Python's int() truncates toward zero.
    let posterize_bits = (level * 4.0) as u32;
    let solarize_thresh = (level * 256.0) as u32;
    match name {
        AutoContrast => ops::auto_contrast(img),
        Equalize => ops::equalize(img),
        Invert => ops::invert(img),
        Rotate => {
            let degrees = randomly_negate(level * 30.0, rng);
            ops::rotate(img, degrees, resample(hp, rng), hp.fill)
        }
        Posterize => ops::posterize(img, posterize_bits),
        PosterizeIncreasing => ops::posterize(img, 4 - posterize_bits.min(4)),
        PosterizeOriginal => ops::posterize(img, posterize_bits + 4),
        Solarize => ops::solarize(img, solarize_thresh),
        SolarizeIncreasing => ops::solarize(img, 256 - solarize_thresh.min(256)),
        SolarizeAdd => ops::solarize_add(img, (level * 110.0) as i32, 128),
        Color => ops::enhance_color(img, enhance()),
        ColorIncreasing => ops::enhance_color(img, enhance_inc(rng)),
        Contrast => ops::enhance_contrast(img, enhance()),
        ContrastIncreasing => ops::enhance_contrast(img, enhance_inc(rng)),
        Brightness => ops::enhance_brightness(img, enhance()),
        BrightnessIncreasing => ops::enhance_brightness(img, enhance_inc(rng)),
        Sharpness => ops::enhance_sharpness(img, enhance()),
        SharpnessIncreasing => ops::enhance_sharpness(img, enhance_inc(rng)),
        ShearX => {
            let f = randomly_negate(level * 0.3, rng);
            ops::shear_x(img, f, resample(hp, rng), hp.fill)
        }
        ShearY => {
            let f = randomly_negate(level * 0.3, rng);
            ops::shear_y(img, f, resample(hp, rng), hp.fill)
        }
        TranslateX => {
            let px = randomly_negate(level * hp.translate_const, rng);
            ops::translate(img, px, 0.0, resample(hp, rng), hp.fill)
        }
        TranslateY => {
            let px = randomly_negate(level * hp.translate_const, rng);
            ops::translate(img, 0.0, px, resample(hp, rng), hp.fill)
        }
        TranslateXRel => {
            let pct = randomly_negate(level * hp.translate_pct, rng);
            let px = pct * img.width() as f64;
            ops::translate(img, px, 0.0, resample(hp, rng), hp.fill)
        }
        TranslateYRel => {
            let pct = randomly_negate(level * hp.translate_pct, rng);
            let px = pct * img.height() as f64;
            ops::translate(img, 0.0, px, resample(hp, rng), hp.fill)
        }
    }
}

fn resample(hp: &AugmentHparams, rng: &mut StdRng) -> Resample {
    hp.interpolation.unwrap_or_else(|| random_resample(rng))
}

/// Splits a timm config section like "mstd0.5" into ("mstd", "0.5") at its first digit
/// (timm's `re.split(r'(\d.*)', c)`); sections without a digit are ignored, as in timm.
fn split_section(section: &str) -> Option<(&str, &str)> {
    let at = section.find(|c: char| c.is_ascii_digit())?;
    Some((&section[..at], &section[at..]))
}

fn parse_num(key: &str, val: &str, config: &str) -> Result<f64> {
    val.parse::<f64>()
        .with_context(|| format!("auto_augment '{config}': bad value '{val}' for '{key}'"))
}

/// The largest magnitude (`m`, `mmax`) a config string may give: timm's scale tops out at 10
/// (`LEVEL_DENOM`, the strongest level of every op); up to 30 is accepted for noisy magnitudes
/// (`mstd`) clipped by a raised `mmax`.
pub const MAX_MAGNITUDE: f64 = 30.0;

/// The most RandAugment ops per image (`n`): timm's recipes use 2 or 3 of the 15 ops.
pub const MAX_RAND_OPS: usize = 16;

fn parse_magnitude(key: &str, v: f64, config: &str) -> Result<f64> {
    ensure!(
        (0.0..=MAX_MAGNITUDE).contains(&v),
        "auto_augment '{config}': {key}{v} out of range: magnitudes are 0..={MAX_MAGNITUDE} \
         (timm's scale; 10 is the strongest level)"
    );
    Ok(v)
}

/// `mstd`: the std of the magnitude noise, >= 0; past 100 it means uniform in [0, m] (timm).
fn parse_mstd(v: f64, config: &str) -> Result<f64> {
    ensure!(
        v >= 0.0 && v.is_finite(),
        "auto_augment '{config}': mstd{v} must be a finite std >= 0 (> 100: uniform magnitudes)"
    );
    Ok(if v > 100.0 { f64::INFINITY } else { v })
}

/// timm's RandAugment: `num_layers` ops drawn from the list (with replacement, or by weight
/// without replacement), each applied with probability `prob`.
#[derive(Clone, Debug)]
pub struct RandAugment {
    pub ops: Vec<AugmentOp>,
    pub num_layers: usize,
    /// Normalized op weights (the "w0" set); `None` draws uniformly with replacement.
    pub choice_weights: Option<Vec<f64>>,
}

impl RandAugment {
    /// Parses timm's `rand_augment_transform` string, e.g. "rand-m9-mstd0.5-inc1": sections
    /// m (magnitude, default 10), n (ops per image, default 2), mstd (magnitude noise std; > 100
    /// means uniform), mmax (magnitude clip, default 10), inc (1: the increasing op set),
    /// p (op probability, default 0.5), w (0: timm's op weights).
    pub fn from_config_str(config: &str, mut hparams: AugmentHparams) -> Result<Self> {
        let mut sections = config.split('-');
        ensure!(
            sections.next() == Some("rand"),
            "RandAugment config '{config}' must start with 'rand'"
        );
        let mut magnitude = LEVEL_DENOM;
        let mut num_layers = 2;
        let mut prob = 0.5;
        let mut increasing = false;
        let mut weights = None;
        for section in sections {
            let Some((key, val)) = split_section(section) else {
                continue;
            };
            let v = parse_num(key, val, config)?;
            match key {
                "mstd" => hparams.magnitude_std = parse_mstd(v, config)?,
                "mmax" => hparams.magnitude_max = Some(parse_magnitude("mmax", v, config)?),
                "inc" => increasing = v != 0.0,
                "m" => magnitude = parse_magnitude("m", v, config)?,
                "n" => {
                    ensure!(
                        v.fract() == 0.0 && (0.0..=MAX_RAND_OPS as f64).contains(&v),
                        "auto_augment '{config}': n{val} (ops per image) must be a whole number \
                         in 0..={MAX_RAND_OPS}"
                    );
                    num_layers = v as usize;
                }
                "p" => {
                    ensure!(
                        (0.0..=1.0).contains(&v),
                        "auto_augment '{config}': p{val} (op probability) must be in [0, 1]"
                    );
                    prob = v;
                }
                "w" => {
                    ensure!(
                        v == 0.0,
                        "auto_augment '{config}': only weight set w0 exists"
                    );
                    let sum: f64 = RAND_CHOICE_WEIGHTS_0.iter().sum();
                    weights = Some(RAND_CHOICE_WEIGHTS_0.iter().map(|w| w / sum).collect());
                }
                _ => bail!("auto_augment '{config}': unknown RandAugment section '{section}'"),
            }
        }
        let names = if increasing {
            RAND_INCREASING_TRANSFORMS
        } else {
            RAND_TRANSFORMS
        };
        Ok(RandAugment {
            ops: names
                .iter()
                .map(|&n| AugmentOp::new(n, prob, magnitude, hparams))
                .collect(),
            num_layers,
            choice_weights: weights,
        })
    }

    /// The op indices for one image (numpy's `np.random.choice(ops, n, replace=weights is None,
    /// p=weights)`).
    pub fn choose(&self, rng: &mut StdRng) -> Vec<usize> {
        match &self.choice_weights {
            None => (0..self.num_layers)
                .map(|_| rng.random_range(0..self.ops.len()))
                .collect(),
            Some(w) => {
                // Weighted sampling without replacement: draw, remove, renormalize.
                let mut w = w.clone();
                let mut chosen = Vec::new();
                for _ in 0..self.num_layers.min(w.iter().filter(|&&x| x > 0.0).count()) {
                    let total: f64 = w.iter().sum();
                    let mut r = rng.random::<f64>() * total;
                    let mut pick = w.len() - 1;
                    for (i, &wi) in w.iter().enumerate() {
                        if r < wi {
                            pick = i;
                            break;
                        }
                        r -= wi;
                    }
                    chosen.push(pick);
                    w[pick] = 0.0;
                }
                chosen
            }
        }
    }

    pub fn apply(&self, img: &RgbImage, rng: &mut StdRng) -> RgbImage {
        let mut out = img.clone();
        for k in self.choose(rng) {
            out = self.ops[k].apply(&out, rng);
        }
        out
    }
}

/// One AutoAugment sub-policy entry: (op, probability, magnitude).
type PolicyEntry = (OpName, f64, f64);

/// timm's `auto_augment_policy_original`: the ImageNet policy of the AutoAugment paper.
fn policy_original(posterize: OpName) -> Vec<[PolicyEntry; 2]> {
    use OpName::*;
    let p = posterize;
    vec![
        [(p, 0.4, 8.0), (Rotate, 0.6, 9.0)],
        [(Solarize, 0.6, 5.0), (AutoContrast, 0.6, 5.0)],
        [(Equalize, 0.8, 8.0), (Equalize, 0.6, 3.0)],
        [(p, 0.6, 7.0), (p, 0.6, 6.0)],
        [(Equalize, 0.4, 7.0), (Solarize, 0.2, 4.0)],
        [(Equalize, 0.4, 4.0), (Rotate, 0.8, 8.0)],
        [(Solarize, 0.6, 3.0), (Equalize, 0.6, 7.0)],
        [(p, 0.8, 5.0), (Equalize, 1.0, 2.0)],
        [(Rotate, 0.2, 3.0), (Solarize, 0.6, 8.0)],
        [(Equalize, 0.6, 8.0), (p, 0.4, 6.0)],
        [(Rotate, 0.8, 8.0), (Color, 0.4, 0.0)],
        [(Rotate, 0.4, 9.0), (Equalize, 0.6, 2.0)],
        [(Equalize, 0.0, 7.0), (Equalize, 0.8, 8.0)],
        [(Invert, 0.6, 4.0), (Equalize, 1.0, 8.0)],
        [(Color, 0.6, 4.0), (Contrast, 1.0, 8.0)],
        [(Rotate, 0.8, 8.0), (Color, 1.0, 2.0)],
        [(Color, 0.8, 8.0), (Solarize, 0.8, 7.0)],
        [(Sharpness, 0.4, 7.0), (Invert, 0.6, 8.0)],
        [(ShearX, 0.6, 5.0), (Equalize, 1.0, 9.0)],
        [(Color, 0.4, 0.0), (Equalize, 0.6, 3.0)],
        [(Equalize, 0.4, 7.0), (Solarize, 0.2, 4.0)],
        [(Solarize, 0.6, 5.0), (AutoContrast, 0.6, 5.0)],
        [(Invert, 0.6, 4.0), (Equalize, 1.0, 8.0)],
        [(Color, 0.6, 4.0), (Contrast, 1.0, 8.0)],
        [(Equalize, 0.8, 8.0), (Equalize, 0.6, 3.0)],
    ]
}

/// timm's `auto_augment_policy_v0`: the ImageNet policy of the TPU EfficientNet code.
fn policy_v0(posterize: OpName) -> Vec<[PolicyEntry; 2]> {
    use OpName::*;
    vec![
        [(Equalize, 0.8, 1.0), (ShearY, 0.8, 4.0)],
        [(Color, 0.4, 9.0), (Equalize, 0.6, 3.0)],
        [(Color, 0.4, 1.0), (Rotate, 0.6, 8.0)],
        [(Solarize, 0.8, 3.0), (Equalize, 0.4, 7.0)],
        [(Solarize, 0.4, 2.0), (Solarize, 0.6, 2.0)],
        [(Color, 0.2, 0.0), (Equalize, 0.8, 8.0)],
        [(Equalize, 0.4, 8.0), (SolarizeAdd, 0.8, 3.0)],
        [(ShearX, 0.2, 9.0), (Rotate, 0.6, 8.0)],
        [(Color, 0.6, 1.0), (Equalize, 1.0, 2.0)],
        [(Invert, 0.4, 9.0), (Rotate, 0.6, 0.0)],
        [(Equalize, 1.0, 9.0), (ShearY, 0.6, 3.0)],
        [(Color, 0.4, 7.0), (Equalize, 0.6, 0.0)],
        [(posterize, 0.4, 6.0), (AutoContrast, 0.4, 7.0)],
        [(Solarize, 0.6, 8.0), (Color, 0.6, 9.0)],
        [(Solarize, 0.2, 4.0), (Rotate, 0.8, 9.0)],
        [(Rotate, 1.0, 7.0), (TranslateYRel, 0.8, 9.0)],
        [(ShearX, 0.0, 0.0), (Solarize, 0.8, 4.0)],
        [(ShearY, 0.8, 0.0), (Color, 0.6, 4.0)],
        [(Color, 1.0, 0.0), (Rotate, 0.6, 2.0)],
        [(Equalize, 0.8, 4.0), (Equalize, 0.0, 8.0)],
        [(Equalize, 1.0, 4.0), (AutoContrast, 0.6, 2.0)],
        [(ShearY, 0.4, 7.0), (SolarizeAdd, 0.6, 7.0)],
        [(posterize, 0.8, 2.0), (Solarize, 0.6, 10.0)],
        [(Solarize, 0.6, 8.0), (Equalize, 0.6, 1.0)],
        [(Color, 0.8, 6.0), (Rotate, 0.4, 5.0)],
    ]
}

/// timm's AutoAugment: one sub-policy chosen uniformly per image, its two ops applied in order.
#[derive(Clone, Debug)]
pub struct AutoAugment {
    pub policy: Vec<Vec<AugmentOp>>,
}

impl AutoAugment {
    /// Parses timm's `auto_augment_transform` string: a policy name ("original", "originalr",
    /// "v0", "v0r"; "autoaug" is an alias of "original") and optional "-mstd0.5".
    pub fn from_config_str(config: &str, mut hparams: AugmentHparams) -> Result<Self> {
        let mut sections = config.split('-');
        let name = sections.next().unwrap_or("");
        for section in sections {
            let Some((key, val)) = split_section(section) else {
                continue;
            };
            match key {
                "mstd" => {
                    let v = parse_num(key, val, config)?;
                    ensure!(
                        v >= 0.0 && v.is_finite(),
                        "auto_augment '{config}': mstd{v} must be a finite std >= 0"
                    );
                    hparams.magnitude_std = v;
                }
                _ => bail!("auto_augment '{config}': unknown AutoAugment section '{section}'"),
            }
        }
        let policy = match name {
            "original" | "autoaug" => policy_original(OpName::PosterizeOriginal),
            "originalr" => policy_original(OpName::PosterizeIncreasing),
            "v0" => policy_v0(OpName::Posterize),
            "v0r" => policy_v0(OpName::PosterizeIncreasing),
            _ => bail!(
                "auto_augment '{config}': unknown policy '{name}' (expected rand-..., original, \
                 originalr, v0, v0r or autoaug)"
            ),
        };
        Ok(AutoAugment {
            policy: policy
                .into_iter()
                .map(|sub| {
                    sub.iter()
                        .map(|&(n, p, m)| AugmentOp::new(n, p, m, hparams))
                        .collect()
                })
                .collect(),
        })
    }

    pub fn apply(&self, img: &RgbImage, rng: &mut StdRng) -> RgbImage {
        let sub = &self.policy[rng.random_range(0..self.policy.len())];
        let mut out = img.clone();
        for op in sub {
            out = op.apply(&out, rng);
        }
        out
    }
}

/// What RandomErasing writes into the erased box (timm's `re_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EraseMode {
    /// Per-pixel N(0, 1) noise (timm train.py's default).
    Pixel,
    /// Zero, i.e. the dataset mean after normalization.
    Const,
    /// One N(0, 1) colour per channel for the whole box.
    Rand,
}

/// timm's `RandomErasing`, applied to one normalized CHW image: with `probability`, erase
/// 1..=`max_count` boxes, each of area in [min_area, max_area] / count of the image and
/// log-uniform aspect ratio in [min_aspect, 1 / min_aspect] (10 tries per box).
#[derive(Clone, Debug)]
pub struct RandomErasing {
    pub probability: f64,
    pub min_area: f64,
    pub max_area: f64,
    pub min_aspect: f64,
    pub max_aspect: Option<f64>,
    pub mode: EraseMode,
    pub min_count: usize,
    pub max_count: usize,
}

impl Default for RandomErasing {
    /// timm's defaults (probability 0.5, area 0.02..1/3, aspect 0.3..1/0.3, one box), with
    /// train.py's 'pixel' mode.
    fn default() -> Self {
        RandomErasing {
            probability: 0.5,
            min_area: 0.02,
            max_area: 1.0 / 3.0,
            min_aspect: 0.3,
            max_aspect: None,
            mode: EraseMode::Pixel,
            min_count: 1,
            max_count: 1,
        }
    }
}

impl RandomErasing {
    /// Erases in place; `img` is C x H x W. Returns the boxes erased as (top, left, h, w).
    pub fn apply(
        &self,
        img: &mut [f32],
        chan: usize,
        img_h: usize,
        img_w: usize,
        rng: &mut StdRng,
    ) -> Vec<(usize, usize, usize, usize)> {
        assert_eq!(img.len(), chan * img_h * img_w, "RandomErasing: image size");
        let mut boxes = Vec::new();
        if rng.random::<f64>() > self.probability {
            return boxes;
        }
        let area = (img_h * img_w) as f64;
        let count = if self.min_count >= self.max_count {
            self.min_count
        } else {
            rng.random_range(self.min_count..=self.max_count)
        };
        let max_aspect = self.max_aspect.unwrap_or(1.0 / self.min_aspect);
        let log_ratio = (self.min_aspect.ln(), max_aspect.ln());
        for _ in 0..count {
            for _ in 0..10 {
                let target_area = uniform(rng, self.min_area, self.max_area) * area / count as f64;
                let aspect = uniform(rng, log_ratio.0, log_ratio.1).exp();
                let h = (target_area * aspect).sqrt().round_ties_even() as usize;
                let w = (target_area / aspect).sqrt().round_ties_even() as usize;
                if w < img_w && h < img_h {
                    let top = rng.random_range(0..=img_h - h);
                    let left = rng.random_range(0..=img_w - w);
                    self.fill_box(img, chan, img_h, img_w, (top, left, h, w), rng);
                    boxes.push((top, left, h, w));
                    break;
                }
            }
        }
        boxes
    }

    fn fill_box(
        &self,
        img: &mut [f32],
        chan: usize,
        img_h: usize,
        img_w: usize,
        (top, left, h, w): (usize, usize, usize, usize),
        rng: &mut StdRng,
    ) {
        for c in 0..chan {
            let colour: f32 = match self.mode {
                EraseMode::Rand => rng.sample(StandardNormal),
                _ => 0.0,
            };
            for y in top..top + h {
                let row = &mut img[(c * img_h + y) * img_w + left..][..w];
                for v in row {
                    *v = match self.mode {
                        EraseMode::Pixel => rng.sample(StandardNormal),
                        _ => colour,
                    };
                }
            }
        }
    }
}
