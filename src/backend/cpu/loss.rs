//! The losses on the CPU: each row's log-softmax in f64, the loss and its gradient (for an
//! upstream gradient of 1) in one pass over the rows.

use super::Cpu;
use crate::backend::api::Loss;
use crate::backend::Elem;
use anyhow::{ensure, Result};

/// Row-wise log-softmax of `z / t`, in f64.
fn log_softmax(z: &[f64], t: f64) -> Vec<f64> {
    let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b / t));
    let lse = z.iter().map(|&v| (v / t - m).exp()).sum::<f64>().ln() + m;
    z.iter().map(|&v| v / t - lse).collect()
}

fn to_f64<T: Elem>(v: &[T]) -> Vec<f64> {
    v.iter().map(|v| v.as_f64()).collect()
}

/// Smoothed one-hot targets [labels.len(), classes] in `T`: (1 - smoothing) at the label plus
/// smoothing / classes everywhere.
pub fn smoothed_targets<T: Elem>(
    labels: &[usize],
    classes: usize,
    smoothing: f64,
) -> Result<Vec<T>> {
    let mut q = vec![T::from_f64(smoothing / classes as f64); labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        ensure!(l < classes, "label {l} out of range for {classes} classes");
        q[i * classes + l] += T::from_f64(1.0 - smoothing);
    }
    Ok(q)
}

impl<T: Elem> Loss<T> for Cpu {
    fn cross_entropy(
        &self,
        z: &[T],
        labels: &[usize],
        smoothing: f64,
        (n, c): (usize, usize),
    ) -> Result<(Vec<T>, Vec<T>)> {
        ensure!(
            labels.len() == n,
            "cross_entropy: {} labels for {n} rows",
            labels.len()
        );
        let q = smoothed_targets::<T>(labels, c, smoothing)?;
        self.cross_entropy_soft(z, &q, (n, c))
    }

    fn cross_entropy_soft(
        &self,
        z: &[T],
        q: &[T],
        (n, c): (usize, usize),
    ) -> Result<(Vec<T>, Vec<T>)> {
        ensure!(
            z.len() == n * c && q.len() == n * c,
            "cross_entropy: {} logits and {} targets for [{n}, {c}]",
            z.len(),
            q.len()
        );
        let (z, q) = (to_f64(z), to_f64(q));
        let mut loss = 0.0;
        let mut grad = vec![0.0; n * c];
        for i in 0..n {
            let ls = log_softmax(&z[i * c..(i + 1) * c], 1.0);
            let qsum: f64 = q[i * c..(i + 1) * c].iter().sum();
            for j in 0..c {
                let qv = q[i * c + j];
                loss -= qv * ls[j];
                // d/dz of -sum q log softmax(z) = softmax(z) * sum(q) - q
                grad[i * c + j] = (ls[j].exp() * qsum - qv) / n as f64;
            }
        }
        Ok((
            vec![T::from_f64(loss / n as f64)],
            grad.iter().map(|&g| T::from_f64(g)).collect(),
        ))
    }

    fn kd_loss(
        &self,
        zs: &[T],
        zt: &[T],
        (n, c): (usize, usize),
        t: f64,
    ) -> Result<(Vec<T>, Vec<T>)> {
        ensure!(t > 0.0, "KD temperature must be positive");
        ensure!(
            zs.len() == n * c && zt.len() == n * c,
            "kd_loss: {} student and {} teacher logits for [{n}, {c}]",
            zs.len(),
            zt.len()
        );
        let (zs, zt) = (to_f64(zs), to_f64(zt));
        let mut loss = 0.0;
        let mut grad = vec![0.0; n * c];
        for i in 0..n {
            let ls = log_softmax(&zs[i * c..(i + 1) * c], t);
            let lt = log_softmax(&zt[i * c..(i + 1) * c], t);
            for j in 0..c {
                let pt = lt[j].exp();
                loss += pt * (lt[j] - ls[j]);
                grad[i * c + j] = t * (ls[j].exp() - pt) / n as f64;
            }
        }
        Ok((
            vec![T::from_f64(t * t * loss / n as f64)],
            grad.iter().map(|&g| T::from_f64(g)).collect(),
        ))
    }
}
