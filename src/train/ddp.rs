//! What one rank of a data-parallel run adds to the training loop (`Trainer::data_parallel`):
//! the ranks decide together when to checkpoint and when to stop (a signal reaches them at
//! different steps; a rank that stopped alone would leave the others blocked in NCCL), add up
//! their epoch figures and their evaluation counts exactly, and check that their parameters
//! stay bit-identical. Rank 0 alone writes the run directory.

use super::{eval_counts, Eval, EvalCounts, Progress};
use crate::data::Loader;
use crate::tensor::collective::Collective;
use crate::Tensor;
use anyhow::{bail, ensure, Result};
use std::hash::Hasher;

/// What the ranks decided at an optimizer-step boundary.
pub(super) struct Decision {
    /// Some rank was asked to stop: every rank checkpoints (rank 0 writes) and stops here.
    pub stop: bool,
    /// Rank 0's `train.checkpoint_every` fell due (its clock decides for all).
    pub checkpoint: bool,
}

pub(super) fn decide(c: &Collective, stop: bool, due: bool) -> Result<Decision> {
    let v = c.all_reduce_sum(&[
        f64::from(u8::from(stop)),
        f64::from(u8::from(due && c.rank() == 0)),
    ])?;
    Ok(Decision {
        stop: v[0] > 0.0,
        checkpoint: v[1] > 0.0,
    })
}

/// The epoch's figures so far over all ranks (each rank counts its own micro-batches; after a
/// resume rank 0 carries the run's figures and the others start from zero).
pub(super) fn total_progress(c: &Collective, p: &Progress) -> Result<Progress> {
    let v = c.all_reduce_sum(&[p.loss_sum, p.images as f64, p.skipped as f64])?;
    Ok(Progress {
        loss_sum: v[0],
        images: v[1] as usize,
        skipped: v[2] as usize,
        ..p.clone()
    })
}

/// A mid-epoch checkpoint's position, written by `p.world` ranks, for this run of `world`
/// ranks: the same global batch of the epoch (`step * world` batches are done). The run's
/// figures stay with rank 0.
pub(super) fn adopt_progress(p: &mut Progress, rank: usize, world: usize) -> Result<()> {
    let done = p.step * p.world;
    ensure!(
        done.is_multiple_of(world),
        "the checkpoint stands after {done} batches of epoch's global order (step {} of {} \
         rank(s)): {world} ranks cannot start there; resume with a world size that divides \
         {done}",
        p.step,
        p.world
    );
    p.step = done / world;
    p.world = world;
    if rank != 0 {
        (p.loss_sum, p.images, p.skipped) = (0.0, 0, 0);
    }
    Ok(())
}

/// The evaluation of `loader` (sharded by batches) over all ranks: exact top-1/top-k counts,
/// the summed loss, the unreadable images counted (each rank warns of its own).
pub(super) fn evaluate(
    c: &Collective,
    loader: &Loader,
    mut predict: impl FnMut(&Tensor<f32>) -> Result<Tensor<f32>>,
) -> Result<(Eval, usize)> {
    // Progress for the watchdog: a long validation set is not a hang.
    let (n, c1, c5, loss, skipped) = eval_counts(loader, |x| {
        c.alive();
        predict(x)
    })?;
    let v = c.all_reduce_sum(&[n as f64, c1 as f64, c5 as f64, loss, skipped.len() as f64])?;
    let counts: EvalCounts = (v[0] as usize, v[1] as usize, v[2] as usize, v[3], skipped);
    Ok((Eval::from_counts(counts)?, v[4] as usize))
}

/// A 64-bit digest of the bits of `values`.
pub fn digest(values: &[f32]) -> u64 {
    // DefaultHasher::new() has fixed keys: the same bits give the same digest on every rank.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for v in values {
        h.write_u32(v.to_bits());
    }
    h.finish()
}

/// Checks that every rank holds rank 0's parameters, bit for bit (`when`: "after epoch 3");
/// returns the digest. A rank that differs stops the run (all ranks get the error, naming it).
pub(super) fn check_identical(c: &Collective, params: &Tensor<f32>, when: &str) -> Result<u64> {
    let mine = digest(params.to_host().data());
    let words: Vec<u16> = (0..4).map(|i| (mine >> (16 * i)) as u16).collect();
    let theirs = c.broadcast_words(&words)?;
    let rank0 = theirs
        .iter()
        .enumerate()
        .fold(0u64, |d, (i, &w)| d | (u64::from(w) << (16 * i)));
    let mut differs = vec![0.0; c.world_size()];
    differs[c.rank()] = f64::from(u8::from(rank0 != mine));
    let v = c.all_reduce_sum(&differs)?;
    let bad: Vec<String> = (0..v.len())
        .filter(|&r| v[r] > 0.0)
        .map(|r| r.to_string())
        .collect();
    if !bad.is_empty() {
        bail!(
            "the parameters of rank(s) {} differ from rank 0's {when} (a non-deterministic \
             kernel or a corrupted rank): the ranks no longer train one model",
            bad.join(", ")
        );
    }
    Ok(rank0)
}
