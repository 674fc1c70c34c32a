//! Reading and writing model state in safetensors with timm's parameter names.
//!
//! Loading accepts timm files and the official GhostNetV3 spelling (`.bn.` for branch BNs,
//! thop's `total_ops`/`total_params` keys, a DDP `module.` prefix), converts f64/f16/bf16 to f32,
//! and checks every name and shape BEFORE touching the model: a missing, unexpected or wrongly
//! shaped tensor is an error naming it (and both shapes), and nothing is loaded half-way.
//!
//! Every file we write carries a checksum of each tensor's bytes in its metadata
//! ([`CHECKSUMS_KEY`]); reading verifies them, so a flipped bit is an error naming the tensor
//! instead of a silently different model.

use super::atomic::write_atomic;
use crate::nn::State;
use anyhow::{bail, Context, Result};
use safetensors::tensor::{TensorInfo, TensorView};
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

/// The metadata key of the per-tensor checksums we write: a JSON object, tensor name -> the
/// XXH3-64 of the tensor's bytes as stored (little-endian), as 16 lowercase hex digits. Plain
/// string metadata, so other safetensors readers load the file as usual and ignore it.
pub const CHECKSUMS_KEY: &str = "ghostv3.checksums";

/// The checksum of a tensor's stored bytes, as written under [`CHECKSUMS_KEY`].
pub fn checksum(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// The header of a safetensors file (its length and the parsed metadata), with errors that name
/// the tensor at fault; `origin` names the file.
pub fn read_header(bytes: &[u8], origin: &str) -> Result<(usize, safetensors::tensor::Metadata)> {
    SafeTensors::read_metadata(bytes).map_err(|e| {
        // Some of the crate's errors ("invalid shape, data type, or offset for tensor") do not
        // say which tensor: find it ourselves.
        let e = anyhow::Error::new(e);
        let e = match header_problem(bytes) {
            Some(why) => e.context(why),
            None => e,
        };
        e.context(format!("{origin} is not a valid safetensors file"))
    })
}

/// Reads every tensor of a safetensors file (floats as f32, integers as i64), verifying the
/// checksums our files carry (files without them, e.g. timm's, load as they are).
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, TensorData>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_tensors(&bytes, &path.display().to_string())
}

/// [`read_tensors`] of a file's bytes; `origin` names the file in errors.
pub fn parse_tensors(bytes: &[u8], origin: &str) -> Result<BTreeMap<String, TensorData>> {
    let (n, meta) = read_header(bytes, origin)?;
    // read_metadata checked that the tensors tile the data region exactly: the slices are in range.
    let data = &bytes[8 + n..];
    let mut views = Vec::new();
    for (name, info) in meta.tensors() {
        let (s, e) = info.data_offsets;
        let v = TensorView::new(info.dtype, info.shape.clone(), &data[s..e])
            .with_context(|| format!("{origin}: tensor {name}"))?;
        views.push((name, v));
    }
    verify_checksums(meta.metadata().as_ref(), &views, origin)?;
    let mut out = BTreeMap::new();
    for (name, v) in views {
        let shape = v.shape().to_vec();
        let t = match v.dtype() {
            Dtype::I64 | Dtype::I32 => TensorData::I64(shape, to_i64(&name, &v)?),
            _ => TensorData::F32(shape, to_f32(&name, &v)?),
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Checks the [`CHECKSUMS_KEY`] entry, if any, against the tensors: every tensor must have a
/// checksum, every checksum a tensor, and each must match. Every problem is named.
fn verify_checksums(
    meta: Option<&HashMap<String, String>>,
    views: &[(String, TensorView)],
    origin: &str,
) -> Result<()> {
    let meta = match meta {
        Some(m) => m,
        None => return Ok(()),
    };
    // A flipped bit in the key itself would make the file look like one without checksums (and
    // let a flip in the data through): a key a few bits away from ours is refused.
    if let Some(k) = meta.keys().find(|k| is_damaged_checksums_key(k)) {
        bail!(
            "{origin}: metadata key {k:?} is a damaged {CHECKSUMS_KEY}: the file is corrupt \
             (a flipped bit?)"
        );
    }
    let Some(entry) = meta.get(CHECKSUMS_KEY) else {
        return Ok(());
    };
    let sums: BTreeMap<String, String> = serde_json::from_str(entry).with_context(|| {
        format!("{origin}: its {CHECKSUMS_KEY} metadata is not a JSON object of strings")
    })?;
    let mut problems = Vec::new();
    let mut sorted: Vec<&(String, TensorView)> = views.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, v) in sorted {
        match sums.get(name) {
            None => problems.push(format!("tensor {name} has no checksum in {CHECKSUMS_KEY}")),
            Some(want) if !want.eq_ignore_ascii_case(&checksum(v.data())) => problems.push(
                format!("tensor {name} fails its checksum: the file is corrupt (a flipped bit?)"),
            ),
            Some(_) => {}
        }
    }
    for name in sums.keys() {
        if !views.iter().any(|(n, _)| n == name) {
            problems.push(format!(
                "{CHECKSUMS_KEY} names tensor {name}, which is not in the file"
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    problems.truncate(10);
    bail!(
        "{origin}: {}{}",
        problems.join("; "),
        if n > 10 {
            format!("; and {} more", n - 10)
        } else {
            String::new()
        }
    )
}

/// True for a key of the same length as [`CHECKSUMS_KEY`] that differs from it in 1 to 4 bits.
fn is_damaged_checksums_key(key: &str) -> bool {
    key.len() == CHECKSUMS_KEY.len() && {
        let bits: u32 = key
            .bytes()
            .zip(CHECKSUMS_KEY.bytes())
            .map(|(a, b)| (a ^ b).count_ones())
            .sum();
        (1..=4).contains(&bits)
    }
}

/// What is wrong with a header the safetensors crate refused, naming the tensor where one is
/// at fault (None when the header is not even JSON: the crate's error says enough then).
fn header_problem(bytes: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header = bytes.get(8..8usize.checked_add(n)?)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    let data_len = bytes.len() - 8 - n;
    let mut infos = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        match serde_json::from_value::<TensorInfo>(v) {
            Ok(i) => infos.push((name, i)),
            Err(e) => return Some(format!("tensor {name}: bad header entry ({e})")),
        }
    }
    // Each tensor alone: its shape and dtype give its size, which its offsets must span.
    for (name, i) in &infos {
        let (s, e) = i.data_offsets;
        let what = format!("tensor {name}: shape {:?} of {:?}", i.shape, i.dtype);
        if e < s {
            return Some(format!("{what}: data_offsets [{s}, {e}] run backwards"));
        }
        let bits = i
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|k| k.checked_mul(i.dtype.bitsize()));
        match bits {
            None => return Some(format!("{what} overflows the size computation")),
            Some(b) if b % 8 != 0 => return Some(format!("{what} is not a whole number of bytes")),
            Some(b) if b / 8 != e - s => {
                return Some(format!(
                    "{what} needs {} bytes, its data_offsets [{s}, {e}] span {}",
                    b / 8,
                    e - s
                ))
            }
            Some(_) => {}
        }
        if e > data_len {
            return Some(format!(
                "{what}: data_offsets [{s}, {e}] run past the {data_len} data bytes of the file"
            ));
        }
    }
    // All together: back to back from byte 0 to the end of the data.
    infos.sort_by_key(|(_, i)| i.data_offsets);
    let (mut end, mut prev) = (0, "the start of the data".to_string());
    for (name, i) in &infos {
        let (s, e) = i.data_offsets;
        if s != end {
            let how = if s < end {
                "overlap"
            } else {
                "leave a gap after"
            };
            return Some(format!(
                "tensor {name}: data_offsets [{s}, {e}] {how} {prev} (ending at {end})"
            ));
        }
        (end, prev) = (e, format!("tensor {name}"));
    }
    if end != data_len {
        let last = infos.last().map_or("(none)", |(n, _)| n.as_str());
        return Some(format!(
            "the tensors (the last is {last}) cover {end} of the file's {data_len} data bytes"
        ));
    }
    None
}

/// Writes tensors atomically; f32 and i64 tensors, with optional string metadata, to which a
/// [`CHECKSUMS_KEY`] entry is added (replacing any given one).
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
    // safetensors stores little-endian; so do our bytes (the crate's serialize copies them as
    // they are), so the checksum covers exactly what lands in the file.
    let sums: BTreeMap<&str, String> = bytes
        .iter()
        .map(|(k, b, ..)| (k.as_str(), checksum(b)))
        .collect();
    let mut meta = meta.unwrap_or_default();
    meta.insert(CHECKSUMS_KEY.to_string(), serde_json::to_string(&sums)?);
    let views = bytes
        .iter()
        .map(|(k, b, d, s)| Ok((k.as_str(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::serialize(views, Some(meta)).context("cannot serialize tensors")?;
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
pub(crate) fn implausible(name: &str, vals: &[f32]) -> Option<String> {
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
    let mut spelled: HashMap<String, &str> = HashMap::new();
    let mut errors = Vec::new();
    for (key, v) in tensors {
        if let Some(name) = canonical_name(key) {
            // Two spellings of one tensor (`module.x` beside `x`, `.bn.` beside `.bn1.`): which
            // one would win is arbitrary, so neither does.
            if let Some(other) = spelled.insert(name.clone(), key) {
                errors.push(format!(
                    "tensors {other} and {key} are both {name} (two spellings of one tensor)"
                ));
            }
            file.insert(name, v);
        }
    }
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
