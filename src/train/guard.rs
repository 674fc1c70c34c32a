//! The finite-state guard: a run stops at the first non-finite value in its parameters,
//! running statistics, optimizer state or EMA, naming the tensor, before any of it is written
//! as a checkpoint, best, last or deploy file (so "the last good checkpoint" is good).

use crate::io::TensorData;
use crate::nn::{FlatStore, State};
use anyhow::{bail, Result};
use std::collections::BTreeMap;

/// The first non-finite value of `values`: its index and value.
fn first_bad(values: &[f32]) -> Option<(usize, f32)> {
    values
        .iter()
        .position(|x| !x.is_finite())
        .map(|i| (i, values[i]))
}

/// The first non-finite value of a host store: (tensor name, index in the tensor, value).
fn first_bad_in(store: &FlatStore) -> Option<(String, usize, f32)> {
    let data = store.tensor().data();
    let (i, v) = first_bad(data)?;
    let e = store
        .entries()
        .iter()
        .find(|e| (e.offset..e.offset + e.numel()).contains(&i));
    Some(match e {
        Some(e) => (e.name.clone(), i - e.offset, v),
        None => ("(padding)".into(), i, v),
    })
}

/// Fails when a host state (`what`: "model", "EMA") holds a non-finite parameter or statistic.
pub fn check_state(state: &State, what: &str) -> Result<()> {
    for (kind, store) in [("parameter", &state.params), ("buffer", &state.buffers)] {
        if let Some((name, i, v)) = first_bad_in(store) {
            bail!("{what} {kind} {name} became {v} (element {i})");
        }
    }
    Ok(())
}

/// Fails when a named flat buffer (optimizer or EMA state) holds a non-finite value.
pub fn check_buffers(what: &str, buffers: &[(String, Vec<f32>)]) -> Result<()> {
    for (name, v) in buffers {
        if let Some((i, x)) = first_bad(v) {
            bail!("{what} state {name} became {x} (element {i})");
        }
    }
    Ok(())
}

/// Fails when a named tensor of a file about to be written holds a non-finite value.
pub fn check_tensors(tensors: &BTreeMap<String, TensorData>) -> Result<()> {
    for (name, t) in tensors {
        if let TensorData::F32(_, v) = t {
            if let Some((i, x)) = first_bad(v) {
                bail!("{name} became {x} (element {i})");
            }
        }
    }
    Ok(())
}
