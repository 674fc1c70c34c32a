//! A procedurally drawn 10-class dataset: the default when no data is given, and a dataset
//! every test and CI run has. Each image is a function of (seed, index) only.
//!
//! Classes are shapes and textures at a random position, scale, small rotation and colour on a
//! noisy gradient background; a small CNN learns them in a couple of epochs, but colour, size and
//! position carry no label information, so it has to look at shape.

use anyhow::{bail, Result};
use image::RgbImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::dataset::Dataset;
use super::random::mix_seed;

pub const SYNTHETIC_CLASSES: [&str; 10] = [
    "circle",
    "square",
    "triangle",
    "cross",
    "horizontal_stripes",
    "vertical_stripes",
    "diagonal_stripes",
    "checkerboard",
    "ring",
    "dots",
];

/// `len` images of `size` x `size`; sample `i` has label `i % 10`, so classes are balanced.
pub struct Synthetic {
    len: usize,
    size: usize,
    seed: u64,
}

impl Synthetic {
    pub fn new(len: usize, size: usize, seed: u64) -> Self {
        Synthetic { len, size, seed }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Draws sample `i` (any index; `load` checks the range).
    pub fn draw(&self, i: usize) -> RgbImage {
        draw(self.seed, i, self.size)
    }
}

impl Dataset for Synthetic {
    fn len(&self) -> usize {
        self.len
    }
    fn num_classes(&self) -> usize {
        SYNTHETIC_CLASSES.len()
    }
    fn class_names(&self) -> Vec<String> {
        SYNTHETIC_CLASSES.iter().map(|s| s.to_string()).collect()
    }
    fn label(&self, i: usize) -> usize {
        i % SYNTHETIC_CLASSES.len()
    }
    fn load(&self, i: usize) -> Result<RgbImage> {
        if i >= self.len {
            bail!("synthetic index {i} out of range (len {})", self.len);
        }
        Ok(self.draw(i))
    }
    fn describe(&self, i: usize) -> String {
        format!(
            "synthetic[{i}] ({})",
            SYNTHETIC_CLASSES[i % SYNTHETIC_CLASSES.len()]
        )
    }
}

fn random_colour(rng: &mut StdRng) -> [f64; 3] {
    [
        rng.random_range(0.0..256.0),
        rng.random_range(0.0..256.0),
        rng.random_range(0.0..256.0),
    ]
}

fn draw(seed: u64, index: usize, size: usize) -> RgbImage {
    // A tag keeps this stream apart from the loader's per-sample streams with the same seed.
    let mut rng = StdRng::seed_from_u64(mix_seed(&[seed, index as u64, 0x5917]));
    let label = index % SYNTHETIC_CLASSES.len();
    let s = size as f64;

    let bg0 = random_colour(&mut rng);
    let bg1 = random_colour(&mut rng);
    // The foreground must stand out from the background, or the label is invisible.
    let mut fg = random_colour(&mut rng);
    for _ in 0..32 {
        let dist: f64 = fg.iter().zip(&bg0).map(|(a, b)| (a - b).abs()).sum();
        if dist >= 180.0 {
            break;
        }
        fg = random_colour(&mut rng);
    }
    let grad_angle = rng.random_range(0.0..std::f64::consts::TAU);
    let grad_strength = rng.random_range(0.0..0.5);
    let noise = rng.random_range(4.0..28.0);

    let cx = s * rng.random_range(0.3..0.7);
    let cy = s * rng.random_range(0.3..0.7);
    let r = s * rng.random_range(0.17..0.33);
    // Small rotations only: a square turned 45 degrees is a diamond, a cross an "x".
    let theta: f64 = rng.random_range(-0.3..0.3);
    let (sin, cos) = theta.sin_cos();
    let period = (r * rng.random_range(0.3..0.55)).max(3.0);
    let phase = rng.random_range(0.0..period);
    let diag_sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
    let sqrt3 = 3f64.sqrt();

    let inside = |u: f64, v: f64| -> bool {
        let d = (u * u + v * v).sqrt();
        let in_box = u.abs() <= r && v.abs() <= r;
        let band = |t: f64| ((t + phase) / period).floor().rem_euclid(2.0) == 0.0;
        match label {
            0 => d <= r,
            1 => u.abs() <= 0.8 * r && v.abs() <= 0.8 * r,
            2 => v <= 0.5 * r && sqrt3 * u - v <= r && -sqrt3 * u - v <= r,
            3 => {
                let w = 0.28 * r;
                (u.abs() <= w && v.abs() <= r) || (v.abs() <= w && u.abs() <= r)
            }
            4 => in_box && band(v),
            5 => in_box && band(u),
            6 => in_box && band((u + diag_sign * v) / std::f64::consts::SQRT_2),
            7 => in_box && (band(u) == band(v)),
            8 => d <= r && d >= 0.55 * r,
            _ => {
                let qu = (u + phase).rem_euclid(period) - period / 2.0;
                let qv = (v + phase).rem_euclid(period) - period / 2.0;
                in_box && qu * qu + qv * qv <= (0.3 * period) * (0.3 * period)
            }
        }
    };

    let (gx, gy) = (grad_angle.cos(), grad_angle.sin());
    let mut img = RgbImage::new(size as u32, size as u32);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (fx, fy) = (x as f64 + 0.5, y as f64 + 0.5);
        let (dx, dy) = (fx - cx, fy - cy);
        let (u, v) = (dx * cos + dy * sin, -dx * sin + dy * cos);
        let t = grad_strength * (((fx / s - 0.5) * gx + (fy / s - 0.5) * gy) + 0.5);
        let base = if inside(u, v) {
            fg
        } else {
            [0, 1, 2].map(|c| bg0[c] * (1.0 - t) + bg1[c] * t)
        };
        // One 64-bit draw gives the three channels' noise (21 bits each): drawing is the
        // synthetic set's "decode", so keep it cheap.
        let bits = rng.random::<u64>();
        for (c, (out, v)) in px.0.iter_mut().zip(base).enumerate() {
            let u = ((bits >> (21 * c)) & 0x1F_FFFF) as f64 / 0x1F_FFFF as f64;
            *out = (v + noise * (2.0 * u - 1.0)).clamp(0.0, 255.0) as u8;
        }
    }
    img
}
