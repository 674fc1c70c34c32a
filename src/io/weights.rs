//! Reading and writing model state in safetensors with timm's parameter names.
//!
//! Loading accepts timm files and the official GhostNetV3 spelling (`.bn.` for branch BNs,
//! thop's `total_ops`/`total_params` keys, a DDP `module.` prefix), converts f64/f16/bf16 to f32,
//! and checks every name and shape BEFORE touching the model: a missing, unexpected or wrongly
//! shaped tensor is an error naming it (and both shapes), and nothing is loaded half-way.

use super::atomic::write_atomic;
use crate::nn::State;
use anyhow::{bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A tensor read from a file: f32 values (or i64 for integer tensors) and its shape.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<usize>, Vec<f32>),
    I64(Vec<usize>, Vec<i64>),
}

impl TensorData {
    pub fn shape(&self) -> &[usize] {
        match self {
            TensorData::F32(s, _) | TensorData::I64(s, _) => s,
        }
    }
}

fn to_f32(name: &str, v: &TensorView) -> Result<Vec<f32>> {
    let d = v.data();
    Ok(match v.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => bail!("tensor {name}: dtype {other:?} is not a float type"),
    })
}

fn to_i64(name: &str, v: &TensorView) -> Result<Vec<i64>> {
    let d = v.data();
    Ok(match v.dtype() {
        Dtype::I64 => d
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect(),
        Dtype::I32 => d
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
            .collect(),
        other => bail!("tensor {name}: dtype {other:?} is not an integer type"),
    })
}

/// Reads every tensor of a safetensors file (floats as f32, integers as i64).
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, TensorData>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, v) in st.tensors() {
        let shape = v.shape().to_vec();
        let t = match v.dtype() {
            Dtype::I64 | Dtype::I32 => TensorData::I64(shape, to_i64(&name, &v)?),
            _ => TensorData::F32(shape, to_f32(&name, &v)?),
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Writes tensors atomically; f32 and i64 tensors, with optional string metadata.
pub fn write_tensors(
    path: &Path,
    tensors: &BTreeMap<String, TensorData>,
    meta: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Dtype, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| match t {
            TensorData::F32(s, v) => (
                k.clone(),
                bytemuck::cast_slice::<f32, u8>(v).to_vec(),
                Dtype::F32,
                s.clone(),
            ),
            TensorData::I64(s, v) => (
                k.clone(),
                bytemuck::cast_slice::<i64, u8>(v).to_vec(),
                Dtype::I64,
                s.clone(),
            ),
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, b, d, s)| Ok((k.as_str(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::serialize(views, meta).context("cannot serialize tensors")?;
    write_atomic(path, &data)
}

/// The name a key of a timm/official checkpoint has in our (timm) naming, or None to skip it.
pub fn canonical_name(key: &str) -> Option<String> {
    let key = key.strip_prefix("module.").unwrap_or(key);
    // thop's profiling counters in the official release checkpoints.
    if key.ends_with("total_ops") || key.ends_with("total_params") {
        return None;
    }
    // Official GhostNetV3 names a branch BN `.bn.`; timm names it `.bn1.` (timm's filter rule).
    if key.contains(".bn.") && (key.contains(".ghost") || key.contains(".dw_rpr_")) {
        return Some(key.replace(".bn.", ".bn1."));
    }
    Some(key.to_string())
}

/// Every tensor of a model's state as it goes into a file (timm's state_dict entries).
pub fn state_tensors(state: &State) -> BTreeMap<String, TensorData> {
    let mut out = BTreeMap::new();
    for store in [&state.params, &state.buffers] {
        for (i, e) in store.entries().iter().enumerate() {
            let v = store.slice(crate::nn::Id(i)).to_vec();
            out.insert(e.name.clone(), TensorData::F32(e.shape.clone(), v));
        }
    }
    for (name, n) in &state.counters {
        out.insert(name.clone(), TensorData::I64(vec![], vec![*n]));
    }
    out
}

/// Saves the model state atomically (timm names; BN `num_batches_tracked` as int64 scalars).
pub fn save_state(state: &State, path: &Path, meta: HashMap<String, String>) -> Result<()> {
    write_tensors(path, &state_tensors(state), Some(meta))
}

/// Loads a checkpoint into `state`, all or nothing.
pub fn load_state(state: &mut State, path: &Path) -> Result<()> {
    let tensors =
        read_tensors(path).with_context(|| format!("cannot load weights {}", path.display()))?;
    load_state_from(state, &tensors, &path.display().to_string())
}

/// No trained weight comes near this magnitude; a value past it (3e38, an edited 1e30) would
/// overflow to Inf within a few layers, so it is refused at load like NaN.
pub const MAX_ABS_WEIGHT: f32 = 1e20;

/// Why the values of tensor `name` cannot be a model's (None when they can).
fn implausible(name: &str, vals: &[f32]) -> Option<String> {
    let bad = |pred: &dyn Fn(f32) -> bool| vals.iter().position(|&x| pred(x));
    if let Some(i) = bad(&|x| !x.is_finite()) {
        return Some(format!("holds NaN or Inf ({} at element {i})", vals[i]));
    }
    if let Some(i) = bad(&|x| x.abs() > MAX_ABS_WEIGHT) {
        return Some(format!(
            "holds {:e} at element {i} (over {MAX_ABS_WEIGHT:e}: not a trained weight)",
            vals[i]
        ));
    }
    if name.ends_with("running_var") {
        if let Some(i) = bad(&|x| x < 0.0) {
            return Some(format!(
                "a variance of {} at element {i} (negative)",
                vals[i]
            ));
        }
    }
    None
}

/// Loads named tensors (timm or official names) into `state`, all or nothing; `origin` names the
/// source in errors.
pub fn load_state_from(
    state: &mut State,
    tensors: &BTreeMap<String, TensorData>,
    origin: &str,
) -> Result<()> {
    let mut file: HashMap<String, &TensorData> = HashMap::new();
    for (key, v) in tensors {
        if let Some(name) = canonical_name(key) {
            file.insert(name, v);
        }
    }
    let mut errors = Vec::new();
    let mut planned: Vec<(bool, usize, &[f32])> = Vec::new(); // (is_param, entry, values)
    for (is_param, store) in [(true, &state.params), (false, &state.buffers)] {
        for (i, e) in store.entries().iter().enumerate() {
            match file.get(&e.name) {
                None => errors.push(format!(
                    "missing tensor {} (expected shape {:?})",
                    e.name, e.shape
                )),
                Some(t) if t.shape() != e.shape.as_slice() => errors.push(format!(
                    "tensor {}: shape {:?} in the file, the model expects {:?}",
                    e.name,
                    t.shape(),
                    e.shape
                )),
                Some(TensorData::F32(_, vals)) => match implausible(&e.name, vals) {
                    None => planned.push((is_param, i, vals)),
                    Some(why) => errors.push(format!("tensor {}: {why}", e.name)),
                },
                Some(TensorData::I64(..)) => {
                    errors.push(format!("tensor {}: integer dtype, expected float", e.name))
                }
            }
        }
    }
    let mut counters = Vec::new();
    for (i, (name, _)) in state.counters.iter().enumerate() {
        match file.get(name) {
            None => {}
            Some(TensorData::I64(_, n)) if n.len() == 1 => counters.push((i, n[0])),
            Some(TensorData::F32(_, n)) if n.len() == 1 => counters.push((i, n[0] as i64)),
            Some(_) => errors.push(format!("tensor {name}: expected a scalar")),
        }
    }
    let known: std::collections::HashSet<&str> = state
        .params
        .entries()
        .iter()
        .chain(state.buffers.entries())
        .map(|e| e.name.as_str())
        .chain(state.counters.iter().map(|(n, _)| n.as_str()))
        .collect();
    let mut unexpected: Vec<&String> = file
        .keys()
        .filter(|k| !known.contains(k.as_str()) && !k.ends_with("num_batches_tracked"))
        .collect();
    unexpected.sort();
    for k in unexpected {
        errors.push(format!(
            "unexpected tensor {k} (shape {:?}) not in the model",
            file[k].shape()
        ));
    }
    if !errors.is_empty() {
        let n = errors.len();
        let shown: Vec<String> = errors.into_iter().take(20).collect();
        bail!(
            "{origin} does not fit the model ({n} problem{}; nothing was loaded):\n  {}{}",
            if n == 1 { "" } else { "s" },
            shown.join("\n  "),
            if n > 20 {
                format!("\n  ... and {} more", n - 20)
            } else {
                String::new()
            }
        );
    }
    for (is_param, i, vals) in planned {
        let store = if is_param {
            &mut state.params
        } else {
            &mut state.buffers
        };
        store.slice_mut(crate::nn::Id(i)).copy_from_slice(vals);
    }
    for (i, n) in counters {
        state.counters[i].1 = n;
    }
    Ok(())
}
