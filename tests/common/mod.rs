//! Shared helpers for the integration tests: where the timm fixtures are.
#![allow(dead_code)]

use std::path::PathBuf;

pub mod cuda;

/// The fixtures folder: `$GHOSTV3_FIXTURES`, else `../shared/fixtures` beside the checkout.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("GHOSTV3_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
    }
}

/// A fixture folder, or None with a printed reason (the test then says it is skipped).
pub fn fixture(name: &str) -> Option<PathBuf> {
    let dir = fixtures_dir().join(name);
    if dir.join("reference.safetensors").is_file() {
        Some(dir)
    } else {
        println!(
            "skipped: fixture {} not found (set GHOSTV3_FIXTURES to the fixtures folder)",
            dir.display()
        );
        None
    }
}

/// max|a - b| / max|b|: the relative error measure of the issue.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let d = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    let s = b.iter().fold(0.0f64, |m, y| m.max((*y as f64).abs()));
    d / s.max(1e-30)
}
