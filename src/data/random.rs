//! The random draws shared by the per-image stages (`augment`, `transforms`) and the seed mixing
//! behind every per-epoch and per-sample stream (`loader`, `synthetic`).

use rand::rngs::StdRng;
use rand::Rng;

use super::ops::Resample;

/// Uniform in [lo, hi); lo == hi is allowed (returns lo), unlike `random_range`.
pub(crate) fn uniform(rng: &mut StdRng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// timm's 'random' interpolation: bilinear or bicubic with equal odds.
pub(crate) fn random_resample(rng: &mut StdRng) -> Resample {
    if rng.random::<bool>() {
        Resample::Bilinear
    } else {
        Resample::Bicubic
    }
}

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
