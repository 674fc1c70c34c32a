//! Reductions written with 8 independent accumulators, so the compiler vectorizes them (a single
//! running sum is a serial dependency chain that float semantics forbid reordering).

use crate::backend::Elem;

const LANES: usize = 8;

fn fold_lanes<T: Elem>(n: usize, f: impl Fn(usize) -> T) -> T {
    let mut acc = [T::zero(); LANES];
    let full = n / LANES * LANES;
    for base in (0..full).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(base + l);
        }
    }
    let mut tail = T::zero();
    for i in full..n {
        tail += f(i);
    }
    acc.iter().copied().sum::<T>() + tail
}

fn fold_lanes_f64(n: usize, f: impl Fn(usize) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let full = n / LANES * LANES;
    for base in (0..full).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(base + l);
        }
    }
    let tail: f64 = (full..n).map(&f).sum();
    acc.iter().sum::<f64>() + tail
}

/// sum of x, accumulated in f64 (for batch statistics, where f32 sums drift)
pub fn sum_f64<T: Elem>(x: &[T]) -> f64 {
    fold_lanes_f64(x.len(), |i| x[i].as_f64())
}

/// sum of (x - c)^2, accumulated in f64
pub fn sq_dev_f64<T: Elem>(x: &[T], c: f64) -> f64 {
    fold_lanes_f64(x.len(), |i| {
        let d = x[i].as_f64() - c;
        d * d
    })
}

/// sum of a * (b - c), accumulated in f64
pub fn dot_centered_f64<T: Elem>(a: &[T], b: &[T], c: f64) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    fold_lanes_f64(n, |i| a[i].as_f64() * (b[i].as_f64() - c))
}

/// sum of x
pub fn sum<T: Elem>(x: &[T]) -> T {
    fold_lanes(x.len(), |i| x[i])
}

/// sum of a * b
pub fn dot<T: Elem>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    fold_lanes(n, |i| a[i] * b[i])
}

/// sum of (x - c)^2
pub fn sq_dev<T: Elem>(x: &[T], c: T) -> T {
    fold_lanes(x.len(), |i| (x[i] - c) * (x[i] - c))
}

/// sum of a * (b - c)
pub fn dot_centered<T: Elem>(a: &[T], b: &[T], c: T) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    fold_lanes(n, |i| a[i] * (b[i] - c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_match_naive_sums() {
        for n in [0, 1, 7, 8, 9, 31, 100] {
            let a: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
            let b: Vec<f64> = (0..n).map(|i| (i as f64 * 0.11).cos()).collect();
            let close = |x: f64, y: f64| (x - y).abs() <= 1e-12 * (1.0 + y.abs());
            assert!(close(sum(&a), a.iter().sum()));
            assert!(close(sum_f64(&a), a.iter().sum()));
            assert!(close(
                sq_dev_f64(&a, 0.3),
                a.iter().map(|x| (x - 0.3) * (x - 0.3)).sum()
            ));
            assert!(close(
                dot_centered_f64(&a, &b, 0.3),
                a.iter().zip(&b).map(|(x, y)| x * (y - 0.3)).sum()
            ));
            assert!(close(
                dot(&a, &b),
                a.iter().zip(&b).map(|(x, y)| x * y).sum()
            ));
            assert!(close(
                sq_dev(&a, 0.3),
                a.iter().map(|x| (x - 0.3) * (x - 0.3)).sum()
            ));
            assert!(close(
                dot_centered(&a, &b, 0.3),
                a.iter().zip(&b).map(|(x, y)| x * (y - 0.3)).sum()
            ));
        }
    }
}
