//! timm's batch-level mixing (`timm/data/mixup.py`): Mixup and CutMix in 'batch' mode, with
//! their label-smoothed soft targets.

use anyhow::{bail, ensure, Context, Result};
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Beta, Distribution};
use serde::{Deserialize, Serialize};

use crate::Tensor;

/// Soft targets [B, C]: `1 - smoothing + smoothing / C` on the label, `smoothing / C` elsewhere
/// (timm's `one_hot` with on/off values, as `mixup_target` builds them).
pub fn one_hot_smoothed(labels: &[usize], num_classes: usize, smoothing: f64) -> Tensor<f32> {
    let off = smoothing / num_classes as f64;
    let on = 1.0 - smoothing + off;
    let mut data = vec![off as f32; labels.len() * num_classes];
    for (row, &l) in labels.iter().enumerate() {
        assert!(l < num_classes, "label {l} >= num_classes {num_classes}");
        data[row * num_classes + l] = on as f32;
    }
    Tensor::new(&[labels.len(), num_classes], data)
}

/// timm's `mixup_target`: lam * onehot(y) + (1 - lam) * onehot(flip(y)), both smoothed.
pub fn mixup_target(labels: &[usize], num_classes: usize, lam: f64, smoothing: f64) -> Tensor<f32> {
    let y1 = one_hot_smoothed(labels, num_classes, smoothing);
    let flipped: Vec<usize> = labels.iter().rev().copied().collect();
    let y2 = one_hot_smoothed(&flipped, num_classes, smoothing);
    let (a, b) = (lam as f32, (1.0 - lam) as f32);
    let data = y1
        .data()
        .iter()
        .zip(y2.data())
        .map(|(&p, &q)| p * a + q * b)
        .collect();
    Tensor::new(y1.shape(), data)
}

/// timm's `rand_bbox`: a box of sides int(H sqrt(1 - lam)) x int(W sqrt(1 - lam)) centred at a
/// uniform random pixel, clipped to the image. Returns (yl, yh, xl, xh).
pub fn rand_bbox(
    img_h: usize,
    img_w: usize,
    lam: f64,
    rng: &mut StdRng,
) -> (usize, usize, usize, usize) {
    let ratio = (1.0 - lam).sqrt();
    let (cut_h, cut_w) = ((img_h as f64 * ratio) as i64, (img_w as f64 * ratio) as i64);
    let cy = rng.random_range(0..img_h) as i64;
    let cx = rng.random_range(0..img_w) as i64;
    let clip_h = |v: i64| v.clamp(0, img_h as i64) as usize;
    let clip_w = |v: i64| v.clamp(0, img_w as i64) as usize;
    (
        clip_h(cy - cut_h / 2),
        clip_h(cy + cut_h / 2),
        clip_w(cx - cut_w / 2),
        clip_w(cx + cut_w / 2),
    )
}

/// timm's `rand_bbox_minmax`: box sides uniform in [min, max) of each image side.
pub fn rand_bbox_minmax(
    img_h: usize,
    img_w: usize,
    minmax: (f64, f64),
    rng: &mut StdRng,
) -> (usize, usize, usize, usize) {
    let side = |n: usize, rng: &mut StdRng| {
        let (lo, hi) = (
            (n as f64 * minmax.0) as usize,
            (n as f64 * minmax.1) as usize,
        );
        if hi > lo {
            rng.random_range(lo..hi)
        } else {
            lo
        }
    };
    let cut_h = side(img_h, rng).min(img_h.saturating_sub(1));
    let cut_w = side(img_w, rng).min(img_w.saturating_sub(1));
    let yl = rng.random_range(0..img_h - cut_h);
    let xl = rng.random_range(0..img_w - cut_w);
    (yl, yl + cut_h, xl, xl + cut_w)
}

/// timm's `cutmix_bbox_and_lam`: the box, and lam corrected to 1 - box area / image area when
/// `correct_lam` (the box may have been clipped at the border) or when min/max boxes are used.
pub fn cutmix_bbox_and_lam(
    img_h: usize,
    img_w: usize,
    lam: f64,
    minmax: Option<(f64, f64)>,
    correct_lam: bool,
    rng: &mut StdRng,
) -> ((usize, usize, usize, usize), f64) {
    let bbox = match minmax {
        Some(mm) => rand_bbox_minmax(img_h, img_w, mm, rng),
        None => rand_bbox(img_h, img_w, lam, rng),
    };
    let (yl, yh, xl, xh) = bbox;
    let lam = if correct_lam || minmax.is_some() {
        1.0 - ((yh - yl) * (xh - xl)) as f64 / (img_h * img_w) as f64
    } else {
        lam
    };
    (bbox, lam)
}

/// The result of `Mixup::apply`.
#[derive(Debug)]
pub struct MixupOutput {
    /// Soft targets [B, num_classes].
    pub targets: Tensor<f32>,
    /// The weight of each image's own label (after cutmix area correction); 1 means unmixed.
    pub lam: f64,
    /// The pasted box (yl, yh, xl, xh) when CutMix was used.
    pub cutmix_box: Option<(usize, usize, usize, usize)>,
}

/// timm's `Mixup` in 'batch' mode: one lam per batch; image i is mixed with image B-1-i.
/// (timm asserts an even batch; with an odd one, as after a skipped image, the middle image is
/// mixed with itself, which leaves it unchanged.)
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mixup {
    /// Mixup is active if > 0.
    pub mixup_alpha: f64,
    /// CutMix is active if > 0.
    pub cutmix_alpha: f64,
    /// CutMix box side range as fractions of the image; when set, CutMix uses it instead of
    /// alpha (and timm forces cutmix_alpha to 1).
    pub cutmix_minmax: Option<(f64, f64)>,
    /// Probability of mixing a batch at all.
    pub prob: f64,
    /// Probability of CutMix rather than Mixup when both are active.
    pub switch_prob: f64,
    /// Correct lam by the clipped box area.
    pub correct_lam: bool,
    pub label_smoothing: f64,
    pub num_classes: usize,
}

impl Default for Mixup {
    /// timm's `Mixup()` defaults, with `num_classes` still to set.
    fn default() -> Self {
        Mixup {
            mixup_alpha: 1.0,
            cutmix_alpha: 0.0,
            cutmix_minmax: None,
            prob: 1.0,
            switch_prob: 0.5,
            correct_lam: true,
            label_smoothing: 0.0,
            num_classes: 0,
        }
    }
}

impl Mixup {
    pub fn new(num_classes: usize) -> Self {
        Mixup {
            num_classes,
            ..Default::default()
        }
    }

    fn cutmix_alpha(&self) -> f64 {
        if self.cutmix_minmax.is_some() {
            1.0
        } else {
            self.cutmix_alpha
        }
    }

    /// Whether `apply` can change anything.
    pub fn is_active(&self) -> bool {
        self.prob > 0.0 && (self.mixup_alpha > 0.0 || self.cutmix_alpha() > 0.0)
    }

    /// timm's `_params_per_batch`: (lam, use_cutmix); lam is 1 when the batch is not mixed.
    pub fn params_per_batch(&self, rng: &mut StdRng) -> Result<(f64, bool)> {
        let (mix_a, cut_a) = (self.mixup_alpha, self.cutmix_alpha());
        if rng.random::<f64>() >= self.prob {
            return Ok((1.0, false));
        }
        let beta = |a: f64, rng: &mut StdRng| -> Result<f64> {
            Ok(Beta::new(a, a)
                .context("bad mixup/cutmix alpha")?
                .sample(rng))
        };
        if mix_a > 0.0 && cut_a > 0.0 {
            let use_cutmix = rng.random::<f64>() < self.switch_prob;
            let lam = if use_cutmix {
                beta(cut_a, rng)?
            } else {
                beta(mix_a, rng)?
            };
            Ok((lam, use_cutmix))
        } else if mix_a > 0.0 {
            Ok((beta(mix_a, rng)?, false))
        } else if cut_a > 0.0 {
            Ok((beta(cut_a, rng)?, true))
        } else {
            bail!("Mixup needs mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax")
        }
    }

    /// Mixes `images` [B, C, H, W] in place and returns the soft targets for `labels`.
    pub fn apply(
        &self,
        images: &mut Tensor<f32>,
        labels: &[usize],
        rng: &mut StdRng,
    ) -> Result<MixupOutput> {
        ensure!(self.num_classes > 0, "Mixup: num_classes must be set");
        let (b, _, h, w) = images.dims4();
        ensure!(
            labels.len() == b,
            "Mixup: {} labels for a batch of {b}",
            labels.len()
        );
        if let Some(&bad) = labels.iter().find(|&&l| l >= self.num_classes) {
            bail!("Mixup: label {bad} >= num_classes {}", self.num_classes);
        }
        let (mut lam, use_cutmix) = self.params_per_batch(rng)?;
        let mut cutmix_box = None;
        if lam != 1.0 {
            if use_cutmix {
                let (bbox, corrected) =
                    cutmix_bbox_and_lam(h, w, lam, self.cutmix_minmax, self.correct_lam, rng);
                cut_from_flipped(images, bbox);
                lam = corrected;
                cutmix_box = Some(bbox);
            } else {
                mix_with_flipped(images, lam);
            }
        }
        Ok(MixupOutput {
            targets: mixup_target(labels, self.num_classes, lam, self.label_smoothing),
            lam,
            cutmix_box,
        })
    }
}

/// Mixup's blend: x = lam x + (1 - lam) flip(x), in f32 as torch computes it.
pub fn mix_with_flipped(images: &mut Tensor<f32>, lam: f64) {
    let b = images.shape()[0];
    let per = images.numel() / b.max(1);
    let orig = images.to_vec();
    let (a, c) = (lam as f32, (1.0 - lam) as f32);
    let data = images.data_mut();
    for i in 0..b {
        let j = b - 1 - i;
        for k in 0..per {
            data[i * per + k] = orig[i * per + k] * a + orig[j * per + k] * c;
        }
    }
}

/// CutMix's paste: image i gets image B-1-i's pixels inside (yl, yh, xl, xh), all channels.
pub fn cut_from_flipped(images: &mut Tensor<f32>, (yl, yh, xl, xh): (usize, usize, usize, usize)) {
    let (b, ch, h, w) = images.dims4();
    let orig = images.to_vec();
    let data = images.data_mut();
    for i in 0..b {
        let j = b - 1 - i;
        for c in 0..ch {
            for y in yl..yh {
                let dst = ((i * ch + c) * h + y) * w;
                let src = ((j * ch + c) * h + y) * w;
                data[dst + xl..dst + xh].copy_from_slice(&orig[src + xl..src + xh]);
            }
        }
    }
}
