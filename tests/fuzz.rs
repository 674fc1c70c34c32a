//! Seeded, time-bounded fuzzing of the loaders, in-process through the library API.
//!
//! Starts from valid inputs the crate writes or accepts and pushes a few thousand mutations of
//! them through the same code paths the commands use:
//!
//! - weight files: a model state written by `io::save_state` (GhostNetV3-0.5x, train form) and a
//!   checkpoint-like file (`io::write_tensors`: the state of a small plain ShuffleNetV2 +
//!   LAMB's `optim.*` + `ema.*` after one real step), truncated,
//!   bit-flipped (header and data), with edited header length fields and header JSON (dtype,
//!   shape, offsets, entries, metadata), with removed/aliased/retyped tensors and with NaN, Inf
//!   or huge values re-serialized correctly. Each one goes through `io::read_tensors`,
//!   `io::load_state` into a fresh model (for the checkpoint: the split `Trainer::resume` does,
//!   then `load_state_from`, `Optimizer::load_state`, `Ema::load_state`) and
//!   `models::detect_options`.
//! - TOML recipes: every file of `configs/` with deleted keys, changed types, NaN / Inf /
//!   negative / huge numbers, unknown keys, random byte edits, `--set` overrides and fuzzed
//!   `auto_augment` strings, through `TrainConfig::from_toml` (and `TrainConfig::load` for the
//!   byte edits). A recipe that parses is also used the way the trainer starts: its transforms
//!   built (and applied to a small image), its optimizer built, its schedule and EMA decay
//!   evaluated, and written and re-read with `to_toml`/`from_toml` as `resume` does.
//! - images: small PNG and JPEG files made in-process, truncated, bit-flipped, with edited
//!   dimensions (PNG CRCs fixed), corrupted compressed data and spliced bytes, read through
//!   `ImageFolder::load` (the loader's decode path) and, when they decode, the eval and train
//!   transforms.
//!
//! Every call runs under `catch_unwind` with the panic hook silenced (restored afterwards); the
//! outcome is ok / clean error / panic, per input kind, mutation and call. For weight files, a
//! bit flip in the DATA region that still loads Ok with different values is a silent corruption;
//! in a file that carries per-tensor checksums in its metadata it must instead be an error that
//! names the tensor (asserted). With `--nocapture` the test prints markdown tables of inputs x
//! outcomes, every distinct panic (message, location, first input; the first input of each is
//! kept under the temp dir for reproduction), the silent corruptions and other suspect outcomes.
//!
//! Asserts: no panic; the files the crate writes carry per-tensor checksums, and no data flip of
//! them loads Ok with other values or fails with an error that does not name a flipped tensor;
//! at least a minimum number of inputs of each kind. Suspect outcomes (an implausible value or
//! two spellings of one tensor accepted, a validated recipe whose schedule gives a NaN lr) are
//! reported, not asserted. The slowest inputs are listed too. The seed is fixed
//! (`GHOSTV3_FUZZ_SEED` overrides it); mutating stops after `GHOSTV3_FUZZ_SECS` seconds (20 by
//! default) once each kind has had its minimum count.

use ghostv3::data::{Dataset, ImageFolder, Transform, TransformConfig};
use ghostv3::io::{self, TensorData};
use ghostv3::models::{self, ModelOptions};
use ghostv3::nn::{RepOptions, State};
use ghostv3::optim::{Ema, EmaConfig, Layout, Optimizer, OptimizerConfig, OptimizerKind};
use ghostv3::train::config::TrainConfig;
use ghostv3::Tensor;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const DEFAULT_SEED: u64 = 0x6057_0533_f022;
const DEFAULT_SECS: f64 = 20.0;
/// Inputs each kind gets even past the time budget (a quiet 2-core machine does 2-4x these).
const MIN_STATE: usize = 100;
const MIN_CKPT: usize = 150;
const MIN_RECIPE: usize = 1000;
const MIN_IMAGE: usize = 800;

// ---------------------------------------------------------------------------------------------
// Panics: a quiet hook that remembers where the last one happened.

static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);
/// The last panic's message and location.
static LAST_TEXT: Mutex<Option<String>> = Mutex::new(None);
/// The input being run, for the hook to name when a panic cannot unwind (the process aborts).
static CURRENT: Mutex<String> = Mutex::new(String::new());

/// Set while a guarded call runs: its panics are recorded silently, all others reported as usual.
static GUARDED: AtomicBool = AtomicBool::new(false);

type Hook = Box<dyn Fn(&panic::PanicHookInfo<'_>) + Sync + Send + 'static>;

/// While alive, panics inside [`guard`] are silent (their location recorded); any other panic
/// (of the harness itself) goes to the previous hook. The previous hook is back on drop.
struct QuietPanics {
    prev: Option<std::sync::Arc<Hook>>,
}

impl QuietPanics {
    fn install() -> Self {
        let prev = std::sync::Arc::new(panic::take_hook());
        let inner = prev.clone();
        panic::set_hook(Box::new(move |info| {
            if !GUARDED.load(Ordering::SeqCst) {
                return inner(info);
            }
            let loc = info.location().map_or("unknown location".to_string(), |l| {
                format!("{}:{}:{}", l.file(), l.line(), l.column())
            });
            // Panics that cannot unwind (std's `unsafe precondition(s) violated` checks, a panic
            // in a destructor while unwinding) abort the process: say what and where first.
            let p = info.payload();
            let msg = p
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| p.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("");
            if msg.contains("precondition") || msg.contains("unwind") || msg.contains("destructor")
            {
                let cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let first = LAST_TEXT.lock().unwrap_or_else(|e| e.into_inner()).clone();
                eprintln!(
                    "fuzz: non-unwinding panic at {loc}: {msg}\nfuzz: the panic before it: {}\nfuzz: input: {cur}",
                    first.as_deref().unwrap_or("(none)")
                );
            }
            *LAST_TEXT.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{msg} at {loc}"));
            *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(loc);
        }));
        QuietPanics { prev: Some(prev) }
    }
}

impl Drop for QuietPanics {
    fn drop(&mut self) {
        // The hook cannot be changed while panicking; it delegates to the previous one then.
        if std::thread::panicking() {
            return;
        }
        let _ = panic::take_hook();
        if let Some(p) = self.prev.take() {
            // The closure's clone went with the hook just taken: this one is the last.
            if let Ok(h) = std::sync::Arc::try_unwrap(p) {
                panic::set_hook(h)
            }
        }
    }
}

/// The outcome of one call.
enum Out<T> {
    Ok(T),
    Err(String),
    Panic { msg: String, loc: String },
}

impl<T> Out<T> {
    fn idx(&self) -> usize {
        match self {
            Out::Ok(_) => 0,
            Out::Err(_) => 1,
            Out::Panic { .. } => 2,
        }
    }
    fn ok(&self) -> Option<&T> {
        match self {
            Out::Ok(v) => Some(v),
            _ => None,
        }
    }
    fn err(&self) -> Option<&str> {
        match self {
            Out::Err(e) => Some(e),
            _ => None,
        }
    }
}

fn guard<T>(f: impl FnOnce() -> anyhow::Result<T>) -> Out<T> {
    *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = None;
    GUARDED.store(true, Ordering::SeqCst);
    let r = panic::catch_unwind(AssertUnwindSafe(f));
    GUARDED.store(false, Ordering::SeqCst);
    match r {
        Ok(Ok(v)) => Out::Ok(v),
        Ok(Err(e)) => Out::Err(format!("{e:#}")),
        Err(payload) => {
            let msg = if let Some(s) = payload.downcast_ref::<&str>() {
                s.to_string()
            } else if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else {
                "(non-string panic payload)".to_string()
            };
            let loc = LAST_PANIC
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .unwrap_or_else(|| "unknown location".to_string());
            Out::Panic { msg, loc }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bookkeeping and the report.

#[derive(Default)]
struct Row {
    n: usize,
    calls: BTreeMap<&'static str, [usize; 3]>,
    flags: BTreeMap<&'static str, usize>,
    time: Duration,
}

struct Finding {
    group: &'static str,
    mutation: String,
    call: &'static str,
    iter: usize,
    input: String,
    detail: String,
    repro: Option<PathBuf>,
}

struct Fuzz {
    seed: u64,
    rows: BTreeMap<(&'static str, String), Row>,
    panics: Vec<Finding>,
    silent: Vec<Finding>,
    suspects: Vec<Finding>,
    kept: HashSet<String>,
    repro_dir: PathBuf,
    counts: BTreeMap<&'static str, usize>,
    open: Option<((&'static str, String), Instant, String)>,
    /// The slowest inputs: (time, what).
    slowest: Vec<(Duration, String)>,
}

/// What one input is, for the findings: group, mutation, iteration, description, its file.
struct Input<'a> {
    group: &'static str,
    mutation: String,
    iter: usize,
    desc: String,
    file: &'a Path,
}

impl Fuzz {
    fn row(&mut self, inp: &Input) -> &mut Row {
        self.rows
            .entry((inp.group, inp.mutation.clone()))
            .or_default()
    }

    /// Ends the timing of the input begun last.
    fn finish(&mut self) {
        if let Some((key, t, what)) = self.open.take() {
            let d = t.elapsed();
            self.rows.entry(key).or_default().time += d;
            self.slowest.push((d, what));
            self.slowest.sort_by_key(|b| std::cmp::Reverse(b.0));
            self.slowest.truncate(8);
        }
    }

    fn begin(&mut self, inp: &Input) {
        self.finish();
        let what = format!(
            "{} / {} iter {}: {}",
            inp.group,
            inp.mutation,
            inp.iter,
            short(&inp.desc, 300)
        );
        self.open = Some((
            (inp.group, inp.mutation.clone()),
            Instant::now(),
            what.clone(),
        ));
        self.row(inp).n += 1;
        *self.counts.entry(inp.group).or_default() += 1;
        if std::env::var_os("GHOSTV3_FUZZ_TRACE").is_some() {
            eprintln!("fuzz: {what}");
        }
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = what;
    }

    fn flag(&mut self, inp: &Input, flag: &'static str) {
        *self.row(inp).flags.entry(flag).or_default() += 1;
    }

    /// Counts `out` under `call`; a panic is recorded with the input (kept on disk the first
    /// time its location is seen).
    fn record<T>(&mut self, inp: &Input, call: &'static str, out: &Out<T>) {
        self.row(inp).calls.entry(call).or_default()[out.idx()] += 1;
        if let Out::Panic { msg, loc } = out {
            let key = format!("{call} {loc}");
            let repro = if self.kept.insert(key) {
                let _ = std::fs::create_dir_all(&self.repro_dir);
                let name = format!(
                    "{}-{}-{}-{}",
                    inp.group.replace(['/', ' '], "_"),
                    inp.mutation.replace(['/', ' '], "_"),
                    inp.iter,
                    inp.file
                        .file_name()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default()
                );
                let dst = self.repro_dir.join(name);
                std::fs::copy(inp.file, &dst).ok().map(|_| dst)
            } else {
                None
            };
            self.panics.push(Finding {
                group: inp.group,
                mutation: inp.mutation.clone(),
                call,
                iter: inp.iter,
                input: inp.desc.clone(),
                detail: format!("{msg} at {loc}"),
                repro,
            });
        }
    }

    fn finding(&mut self, silent: bool, inp: &Input, call: &'static str, detail: String) {
        let f = Finding {
            group: inp.group,
            mutation: inp.mutation.clone(),
            call,
            iter: inp.iter,
            input: inp.desc.clone(),
            detail,
            repro: None,
        };
        if silent {
            self.silent.push(f)
        } else {
            self.suspects.push(f)
        }
    }

    fn table(&self, title: &str, group: &'static str, calls: &[&'static str], flags: &[&str]) {
        println!("\n### {title}\n");
        let mut head = vec![
            "mutation".to_string(),
            "inputs".to_string(),
            "ms / input".to_string(),
        ];
        head.extend(calls.iter().map(|c| format!("{c} ok / err / **panic**")));
        head.extend(flags.iter().map(|f| f.to_string()));
        println!("| {} |", head.join(" | "));
        println!("|{}", "---|".repeat(head.len()));
        let mut n_all = 0;
        let mut t_all = Duration::ZERO;
        let mut calls_all: BTreeMap<&str, [usize; 3]> = BTreeMap::new();
        let mut flags_all: BTreeMap<&str, usize> = BTreeMap::new();
        for ((g, m), r) in &self.rows {
            if *g != group {
                continue;
            }
            n_all += r.n;
            t_all += r.time;
            let ms = 1e3 * r.time.as_secs_f64() / r.n.max(1) as f64;
            let mut cells = vec![m.clone(), r.n.to_string(), format!("{ms:.1}")];
            for c in calls {
                match r.calls.get(c) {
                    Some(v) => {
                        let t = calls_all.entry(c).or_default();
                        (0..3).for_each(|i| t[i] += v[i]);
                        cells.push(cell(v));
                    }
                    None => cells.push("-".into()),
                }
            }
            for fl in flags {
                let n = r.flags.get(fl).copied().unwrap_or(0);
                *flags_all.entry(fl).or_default() += n;
                cells.push(n.to_string());
            }
            println!("| {} |", cells.join(" | "));
        }
        let ms = 1e3 * t_all.as_secs_f64() / n_all.max(1) as f64;
        let mut cells = vec![
            "**all**".to_string(),
            format!("**{n_all}**"),
            format!("{ms:.1}"),
        ];
        for c in calls {
            cells.push(calls_all.get(c).map_or("-".into(), cell));
        }
        for fl in flags {
            cells.push(flags_all.get(fl).copied().unwrap_or(0).to_string());
        }
        println!("| {} |", cells.join(" | "));
    }
}

fn cell(v: &[usize; 3]) -> String {
    if v[2] > 0 {
        format!("{} / {} / **{}**", v[0], v[1], v[2])
    } else {
        format!("{} / {} / 0", v[0], v[1])
    }
}

fn short(s: &str, n: usize) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() <= n {
        s
    } else {
        format!("{}...", s.chars().take(n).collect::<String>())
    }
}

/// Runs `one(i)` for i = 0.. while under `min` inputs, or before `deadline` and under `max`.
fn run_for(min: usize, max: usize, deadline: Instant, mut one: impl FnMut(usize)) -> usize {
    let mut i = 0;
    while i < min || (Instant::now() < deadline && i < max) {
        one(i);
        i += 1;
    }
    i
}

// ---------------------------------------------------------------------------------------------
// Weight files.

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    State,
    Checkpoint,
}

/// A valid file the crate wrote, and what loading it must give.
struct Source {
    group: &'static str,
    kind: Kind,
    bytes: Vec<u8>,
    header_end: usize,
    header: Map<String, Value>,
    tensors: BTreeMap<String, TensorData>,
    /// The file's metadata without checksum-like entries (for re-serialized mutations).
    meta: HashMap<String, String>,
    checksum_keys: Vec<String>,
    /// Absolute byte range of each tensor's data.
    ranges: Vec<(usize, usize, String)>,
    /// The load target: the same model, seeded differently.
    fresh: State,
    orig: State,
    orig_opt: Vec<(String, Vec<f32>)>,
    orig_ema: Vec<(String, Vec<f32>)>,
    path: PathBuf,
}

impl Source {
    fn checksummed(&self) -> bool {
        !self.checksum_keys.is_empty()
    }
}

fn is_checksum_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    ["crc", "checksum", "sha", "hash", "digest", "xxh", "sums"]
        .iter()
        .any(|w| k.contains(w))
}

fn split_header(bytes: &[u8]) -> (usize, Map<String, Value>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (8 + n, header)
}

fn assemble_raw(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

fn assemble(header: &Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    assemble_raw(&h, data)
}

fn tensor_keys(h: &Map<String, Value>) -> Vec<String> {
    h.keys().filter(|k| *k != "__metadata__").cloned().collect()
}

fn same_f32(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn same_tensor(a: &TensorData, b: &TensorData) -> bool {
    match (a, b) {
        (TensorData::F32(sa, va), TensorData::F32(sb, vb)) => sa == sb && same_f32(va, vb),
        (TensorData::I64(sa, va), TensorData::I64(sb, vb)) => sa == sb && va == vb,
        _ => false,
    }
}

fn same_tensors(a: &BTreeMap<String, TensorData>, b: &BTreeMap<String, TensorData>) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, ta), (kb, tb))| ka == kb && same_tensor(ta, tb))
}

fn same_state(a: &State, b: &State) -> bool {
    same_f32(a.params.flat(), b.params.flat())
        && same_f32(a.buffers.flat(), b.buffers.flat())
        && a.counters == b.counters
}

fn same_named(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && same_f32(va, vb))
}

fn model_state(name: &str, opts: &ModelOptions, seed: u64) -> State {
    let opts = ModelOptions { seed, ..*opts };
    models::create(name, &opts).unwrap().state().clone()
}

/// A fresh optimizer (LAMB, the recipe's) and EMA for `state`, as `Trainer` builds them.
fn fresh_update(state: &State) -> (Box<dyn Optimizer>, Ema) {
    let layout = Layout::from_store(&state.params);
    let opt = OptimizerConfig::new(OptimizerKind::Lamb)
        .build(&layout)
        .unwrap();
    let ema = Ema::new(
        EmaConfig::default(),
        state.params.tensor(),
        state.buffers.tensor(),
    )
    .unwrap();
    (opt, ema)
}

fn make_source(group: &'static str, kind: Kind, dir: &Path) -> Source {
    let path = dir.join(match kind {
        Kind::State => "state.safetensors",
        Kind::Checkpoint => "checkpoint.safetensors",
    });
    let (name, opts) = match kind {
        // The crate's default: GhostNetV3-0.5x, train form (N = 3), 1000 classes.
        Kind::State => ("ghostnetv3_050", ModelOptions::default()),
        // The checkpoint holds the model 4 times over (weights, two moments, EMA): a small
        // plain ShuffleNetV2-0.5x with 10 classes keeps it fast to mutate and reload (the
        // split and the loaders do not depend on the architecture).
        Kind::Checkpoint => (
            "shufflenet_v2_x0_5",
            ModelOptions {
                num_classes: 10,
                deploy: true,
                rep: RepOptions {
                    branches: 0,
                    ..Default::default()
                },
                ..Default::default()
            },
        ),
    };
    let mut orig = model_state(name, &opts, 0);
    for (i, c) in orig.counters.iter_mut().enumerate() {
        c.1 = 1000 + i as i64;
    }
    let fresh = model_state(name, &opts, 1);
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("ghostv3.model".to_string(), name.to_string()),
        ("ghostv3.form".to_string(), "train".to_string()),
        ("ghostv3.epoch".to_string(), "3".to_string()),
    ]);
    let (mut orig_opt, mut orig_ema) = (Vec::new(), Vec::new());
    match kind {
        Kind::State => io::save_state(&orig, &path, meta).unwrap(),
        Kind::Checkpoint => {
            // One real optimizer + EMA step so that the moments and the average are not zeros.
            let (mut opt, mut ema) = fresh_update(&orig);
            let mut rng = StdRng::seed_from_u64(7);
            let n = orig.params.numel();
            let mut p = Tensor::new(&[n], orig.params.flat().to_vec());
            let g = Tensor::new(
                &[n],
                (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
            );
            let buffers = orig.buffers.tensor().clone();
            opt.step(&mut p, &g, 1e-3, Some((&mut ema, &buffers)))
                .unwrap();
            orig.params.flat_mut().copy_from_slice(p.data());
            orig_opt = opt.state();
            orig_ema = ema.state();
            let mut t = io::weights::state_tensors(&orig);
            for (k, v) in &orig_opt {
                t.insert(
                    format!("optim.{k}"),
                    TensorData::F32(vec![v.len()], v.clone()),
                );
            }
            for (k, v) in &orig_ema {
                t.insert(
                    format!("ema.{k}"),
                    TensorData::F32(vec![v.len()], v.clone()),
                );
            }
            let mut meta = meta;
            meta.insert(
                "ghostv3.trainer".to_string(),
                r#"{"epoch":3,"best_top1":0.25}"#.to_string(),
            );
            io::write_tensors(&path, &t, Some(meta)).unwrap();
        }
    }
    let bytes = std::fs::read(&path).unwrap();
    let (header_end, header) = split_header(&bytes);
    let mut file_meta: HashMap<String, String> = HashMap::new();
    let mut checksum_keys = Vec::new();
    if let Some(Value::Object(m)) = header.get("__metadata__") {
        for (k, v) in m {
            if is_checksum_key(k) {
                checksum_keys.push(k.clone());
            } else if let Value::String(s) = v {
                file_meta.insert(k.clone(), s.clone());
            }
        }
    }
    let mut ranges: Vec<(usize, usize, String)> = tensor_keys(&header)
        .into_iter()
        .map(|k| {
            let o = &header[&k]["data_offsets"];
            let (a, b) = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            (header_end + a, header_end + b, k)
        })
        .collect();
    ranges.sort();
    let tensors = io::read_tensors(&path).unwrap();
    Source {
        group,
        kind,
        bytes,
        header_end,
        header,
        tensors,
        meta: file_meta,
        checksum_keys,
        ranges,
        fresh,
        orig,
        orig_opt,
        orig_ema,
        path,
    }
}

/// `Trainer::resume`'s reading of a checkpoint (its model / optim. / ema. split, then each
/// part's loader), into a fresh model state, LAMB and EMA; Ok(true) when everything loaded
/// equals what was saved.
fn resume_like(src: &Source) -> anyhow::Result<bool> {
    let tensors = io::read_tensors(&src.path)?;
    let mut model_t = BTreeMap::new();
    let (mut optim_t, mut ema_t) = (Vec::new(), Vec::new());
    for (k, v) in tensors {
        if let Some(name) = k.strip_prefix("optim.") {
            let TensorData::F32(_, d) = v else {
                anyhow::bail!("optimizer state {k} is not f32")
            };
            optim_t.push((name.to_string(), d));
        } else if let Some(name) = k.strip_prefix("ema.") {
            let TensorData::F32(_, d) = v else {
                anyhow::bail!("EMA state {k} is not f32")
            };
            ema_t.push((name.to_string(), d));
        } else {
            model_t.insert(k, v);
        }
    }
    let mut state = src.fresh.clone();
    let (mut opt, mut ema) = fresh_update(&state);
    io::load_state_from(&mut state, &model_t, &src.path.display().to_string())?;
    opt.load_state(&optim_t)?;
    ema.load_state(&ema_t)?;
    Ok(same_state(&state, &src.orig)
        && same_named(&opt.state(), &src.orig_opt)
        && same_named(&ema.state(), &src.orig_ema))
}

const WEIGHT_MUTATIONS: &[&str] = &[
    "none",
    "truncate",
    "header-bitflip",
    "data-bitflip",
    "header-len",
    "json-dtype",
    "json-shape",
    "json-offsets",
    "json-entries",
    "json-junk",
    "reser-remove",
    "reser-alias",
    "reser-nonfinite",
    "reser-retype",
    "random-bytes",
];

/// A mutated weight input: raw bytes, or tensors to write with `io::write_tensors`.
enum WBody {
    Raw(Vec<u8>),
    Tensors(BTreeMap<String, TensorData>),
}

struct WInput {
    body: WBody,
    desc: String,
    /// Tensors whose data bytes were flipped (data-bitflip).
    flipped: Vec<String>,
    /// A value no model can hold was planted (the loaders must refuse it).
    implausible: bool,
}

fn pick<'a, T>(rng: &mut StdRng, v: &'a [T]) -> &'a T {
    v.choose(rng).expect("non-empty")
}

fn flip_bits(rng: &mut StdRng, b: &mut [u8], lo: usize, hi: usize, k: usize) -> Vec<usize> {
    let mut at = Vec::new();
    if hi <= lo {
        return at;
    }
    while at.len() < k.min(hi - lo) {
        let p = rng.random_range(lo..hi);
        if !at.contains(&p) {
            b[p] ^= 1 << rng.random_range(0..8);
            at.push(p);
        }
    }
    at
}

/// The classifier's weight (what `detect_options` reads the number of classes from).
fn classifier(src: &Source) -> String {
    ["classifier.weight", "fc.weight"]
        .into_iter()
        .find(|k| src.tensors.contains_key(*k))
        .expect("a classifier")
        .to_string()
}

fn mutate_weights(src: &Source, m: &str, cycle: usize, rng: &mut StdRng) -> WInput {
    let raw = |body: Vec<u8>, desc: String| WInput {
        body: WBody::Raw(body),
        desc,
        flipped: vec![],
        implausible: false,
    };
    let b = &src.bytes;
    let len = b.len();
    let he = src.header_end;
    let data = &b[he..];
    let keys = tensor_keys(&src.header);
    match m {
        "none" => raw(b.clone(), "unmodified".into()),
        "truncate" => {
            let cut = match cycle % 4 {
                0 => rng.random_range(0..=he.min(len - 1)),
                1 => rng.random_range(0..len),
                2 => {
                    let r = pick(rng, &src.ranges);
                    let at = if rng.random_bool(0.5) { r.0 } else { r.1 } as i64;
                    (at + rng.random_range(-3..=3)).clamp(0, len as i64 - 1) as usize
                }
                _ => len - rng.random_range(1..=64),
            };
            raw(
                b[..cut].to_vec(),
                format!("truncated to {cut} of {len} bytes"),
            )
        }
        "header-bitflip" => {
            let mut v = b.clone();
            let k = rng.random_range(1..=4);
            let at = flip_bits(rng, &mut v, 8, he, k);
            let ctx: Vec<String> = at
                .iter()
                .map(|&p| format!("{p} ({:?}->{:?})", b[p] as char, v[p] as char))
                .collect();
            raw(v, format!("header bytes flipped at {}", ctx.join(", ")))
        }
        "data-bitflip" => {
            let mut v = b.clone();
            let k = rng.random_range(1..=3);
            let at = flip_bits(rng, &mut v, he, len, k);
            let mut flipped = Vec::new();
            for &p in &at {
                if let Some(r) = src.ranges.iter().find(|r| r.0 <= p && p < r.1) {
                    if !flipped.contains(&r.2) {
                        flipped.push(r.2.clone());
                    }
                }
            }
            WInput {
                desc: format!("data bytes flipped at {at:?} (tensors {flipped:?})"),
                body: WBody::Raw(v),
                flipped,
                implausible: false,
            }
        }
        "header-len" => {
            let n = (he - 8) as u64;
            let l = len as u64;
            let choices = [
                0,
                1,
                7,
                n - 1,
                n + 1,
                n - 8,
                n + 8,
                n + rng.random_range(1..1_000_000),
                l - 8,
                l - 7,
                l,
                u64::MAX,
                u64::MAX - 7,
                1 << 63,
                (1 << 32) + n,
                100_000_001,
                rng.random(),
                rng.random_range(0..n),
                n ^ (1 << rng.random_range(0..64)),
            ];
            let new = *pick(rng, &choices);
            let mut v = b.clone();
            v[..8].copy_from_slice(&new.to_le_bytes());
            raw(v, format!("header length {n} -> {new}"))
        }
        "json-dtype" => {
            let mut h = src.header.clone();
            let k = pick(rng, &keys).clone();
            let dtypes = [
                json!("F32"),
                json!("F16"),
                json!("BF16"),
                json!("F64"),
                json!("I64"),
                json!("I32"),
                json!("I16"),
                json!("I8"),
                json!("U8"),
                json!("U16"),
                json!("U32"),
                json!("U64"),
                json!("BOOL"),
                json!("F8_E4M3"),
                json!("F8_E5M2"),
                json!("F4"),
                json!("E8M0"),
                json!("C64"),
                json!("f32"),
                json!(""),
                json!("X"),
                json!(32),
                json!(null),
                json!(["F32"]),
            ];
            let d = pick(rng, &dtypes).clone();
            h[&k]["dtype"] = d.clone();
            raw(assemble(&h, data), format!("{k}: dtype -> {d}"))
        }
        "json-shape" => {
            let mut h = src.header.clone();
            let k = pick(rng, &keys).clone();
            let shape: Vec<u64> = h[&k]["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            let numel: u64 = shape.iter().product();
            let mut s: Vec<Value> = shape.iter().map(|&d| json!(d)).collect();
            let new: Value = match cycle % 9 {
                0 if !s.is_empty() => {
                    let i = rng.random_range(0..s.len());
                    let d = shape[i];
                    let vals = [
                        0,
                        1,
                        d + 1,
                        d.saturating_sub(1),
                        1 << 32,
                        1 << 63,
                        u64::MAX,
                        rng.random::<u32>() as u64,
                    ];
                    s[i] = json!(*pick(rng, &vals));
                    Value::Array(s)
                }
                1 => {
                    s.push(json!(1));
                    Value::Array(s)
                }
                2 => {
                    s.push(json!(0));
                    Value::Array(s)
                }
                3 => {
                    s.pop();
                    Value::Array(s)
                }
                4 => json!([]),
                5 => {
                    s.reverse();
                    Value::Array(s)
                }
                6 => json!([numel]),
                7 => pick(
                    rng,
                    &[
                        json!([-1]),
                        json!([1.5]),
                        json!(["3"]),
                        json!(null),
                        json!([[1]]),
                        json!("[1]"),
                        json!([numel, 18446744073709551615u64, 2]),
                    ],
                )
                .clone(),
                _ if numel.is_multiple_of(2) && numel > 0 => json!([numel / 2, 2]),
                _ => json!([numel, 1]),
            };
            h[&k]["shape"] = new.clone();
            raw(assemble(&h, data), format!("{k}: shape {shape:?} -> {new}"))
        }
        "json-offsets" => {
            let mut h = src.header.clone();
            let k = pick(rng, &keys).clone();
            let o = &h[&k]["data_offsets"];
            let (a, e) = (o[0].as_u64().unwrap(), o[1].as_u64().unwrap());
            let dl = data.len() as u64;
            let sh = rng.random_range(1..=16u64);
            let new: Value = match cycle % 9 {
                0 => json!([e, a]),
                1 => json!([a + sh, e + sh]),
                2 => json!([a.saturating_sub(sh), e.saturating_sub(sh)]),
                3 => json!([a, e + sh]),
                4 => json!([a, u64::MAX]),
                5 => json!([a, a]),
                6 => json!([0, dl]),
                7 => pick(
                    rng,
                    &[
                        json!([a]),
                        json!([a, e, e]),
                        json!([-1, e]),
                        json!([a as f64 + 0.5, e]),
                        json!(null),
                        json!({"a": a}),
                    ],
                )
                .clone(),
                _ => {
                    // Exchange with another tensor of the same byte size: a consistent header
                    // whose values are swapped.
                    let size = e - a;
                    let same: Vec<&String> = keys
                        .iter()
                        .filter(|j| {
                            let oj = &src.header[*j]["data_offsets"];
                            *j != &k && oj[1].as_u64().unwrap() - oj[0].as_u64().unwrap() == size
                        })
                        .collect();
                    match same.choose(rng) {
                        Some(j) => {
                            let j = (*j).clone();
                            let oj = h[&j]["data_offsets"].clone();
                            h[&j]["data_offsets"] = json!([a, e]);
                            let d = format!("{k} <-> {j}: data_offsets exchanged");
                            h[&k]["data_offsets"] = oj;
                            return raw(assemble(&h, data), d);
                        }
                        None => json!([a, e + 4]),
                    }
                }
            };
            h[&k]["data_offsets"] = new.clone();
            raw(
                assemble(&h, data),
                format!("{k}: data_offsets [{a}, {e}] -> {new}"),
            )
        }
        "json-entries" => {
            let mut h = src.header.clone();
            let k = pick(rng, &keys).clone();
            let desc = match cycle % 6 {
                0 => {
                    h.remove(&k);
                    format!("entry {k} removed (its data left)")
                }
                1 => {
                    let dup = format!("{k}.dup");
                    let v = h[&k].clone();
                    h.insert(dup.clone(), v);
                    format!("entry {k} duplicated as {dup} (same offsets)")
                }
                2 => {
                    let v = h.remove(&k).unwrap();
                    let new = match rng.random_range(0..6) {
                        0 => format!("module.{k}"),
                        1 => k.replace(".bn1.", ".bn."),
                        2 => String::new(),
                        3 => format!("{k}\u{0}"),
                        4 => "x".repeat(10_000),
                        _ => {
                            let mut c: Vec<char> = k.chars().collect();
                            let i = rng.random_range(0..c.len());
                            c[i] = *pick(rng, &['_', '.', 'Z', 'é', '0']);
                            c.into_iter().collect()
                        }
                    };
                    let d = format!("entry {k} renamed to {}", short(&new, 60));
                    h.insert(new, v);
                    d
                }
                3 => {
                    h.remove("__metadata__");
                    "__metadata__ removed".into()
                }
                4 => {
                    let mut md = match h.get("__metadata__") {
                        Some(Value::Object(m)) => m.clone(),
                        _ => Map::new(),
                    };
                    let mk: Vec<String> = md.keys().cloned().collect();
                    let key = pick(rng, &mk).clone();
                    let new = pick(
                        rng,
                        &[
                            json!(3),
                            json!(null),
                            json!({"a": "b"}),
                            json!(""),
                            json!("0000"),
                            json!("x".repeat(100_000)),
                        ],
                    )
                    .clone();
                    md.insert(key.clone(), new.clone());
                    h.insert("__metadata__".into(), Value::Object(md));
                    format!("__metadata__.{key} -> {}", short(&new.to_string(), 30))
                }
                _ => {
                    // Tamper with a checksum-like entry when there is one, else drop a key.
                    let mut md = match h.get("__metadata__") {
                        Some(Value::Object(m)) => m.clone(),
                        _ => Map::new(),
                    };
                    let d = match src.checksum_keys.choose(rng) {
                        Some(ck) => {
                            let v = md[ck].as_str().unwrap_or("").to_string();
                            let mut c: Vec<char> = v.chars().collect();
                            if !c.is_empty() {
                                let i = rng.random_range(0..c.len());
                                c[i] = if c[i] == '0' { '1' } else { '0' };
                            }
                            md.insert(ck.clone(), json!(c.into_iter().collect::<String>()));
                            format!("__metadata__.{ck}: one character changed")
                        }
                        None => {
                            let mk: Vec<String> = md.keys().cloned().collect();
                            let key = pick(rng, &mk).clone();
                            md.remove(&key);
                            format!("__metadata__.{key} removed")
                        }
                    };
                    h.insert("__metadata__".into(), Value::Object(md));
                    d
                }
            };
            raw(assemble(&h, data), desc)
        }
        "json-junk" => {
            let hj = serde_json::to_vec(&src.header).unwrap();
            let (hb, d): (Vec<u8>, String) = match cycle % 7 {
                0 => {
                    let mut x = hj.clone();
                    x.extend_from_slice(b"xyz}");
                    (x, "trailing garbage after the header JSON".into())
                }
                1 => {
                    let s = *pick(rng, &["[]", "null", "1", "\"s\"", "{}", "{", "", "   "]);
                    (s.as_bytes().to_vec(), format!("header JSON is {s:?}"))
                }
                2 => {
                    let depth = rng.random_range(100..20_000);
                    let s = format!("{{\"a\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
                    (s.into_bytes(), format!("header nested {depth} deep"))
                }
                3 => {
                    let mut x = vec![0u8; hj.len()];
                    rng.fill(&mut x[..]);
                    (x, "header replaced by random bytes".into())
                }
                4 => {
                    let mut x = hj.clone();
                    let i = rng.random_range(0..x.len());
                    x[i] = *pick(rng, &[0xff, 0xc3, 0x80, 0x00]);
                    (x, format!("header byte {i} -> invalid UTF-8/NUL"))
                }
                5 => {
                    let k = pick(rng, &keys);
                    let s = String::from_utf8(hj.clone()).unwrap().replacen(
                        &format!("\"{k}\":{{"),
                        &format!("\"{k}\":{{\"data_offsets\":[1e400,1e400],"),
                        1,
                    );
                    (s.into_bytes(), format!("{k}: extra data_offsets 1e400"))
                }
                _ => {
                    let s = r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#.to_string();
                    (s.into_bytes(), "duplicate JSON key with two entries".into())
                }
            };
            let body = if d.starts_with("duplicate") {
                assemble_raw(&hb, &[0u8; 8])
            } else {
                assemble_raw(&hb, data)
            };
            raw(body, d)
        }
        "reser-remove" => {
            let mut t = src.tensors.clone();
            let n = rng.random_range(1..=3);
            let mut gone = Vec::new();
            for _ in 0..n {
                let k = if rng.random_bool(0.2) {
                    let cls = classifier(src);
                    let special = [cls.as_str(), "optim.step", "ema.updates", "ema.params"];
                    pick(rng, &special).to_string()
                } else {
                    pick(rng, &keys).clone()
                };
                if t.remove(&k).is_some() {
                    gone.push(k);
                }
            }
            WInput {
                body: WBody::Tensors(t),
                desc: format!("removed {gone:?}"),
                flipped: vec![],
                implausible: false,
            }
        }
        "reser-alias" => {
            let mut t = src.tensors.clone();
            let official: Vec<&String> = keys
                .iter()
                .filter(|n| n.contains(".bn1.") && (n.contains(".ghost") || n.contains(".dw_rpr_")))
                .collect();
            let variant = cycle % 5;
            let k = if variant == 1 && !official.is_empty() {
                (*pick(rng, &official)).clone()
            } else {
                pick(rng, &keys).clone()
            };
            let perturbed = match &t[&k] {
                TensorData::F32(s, v) => {
                    TensorData::F32(s.clone(), v.iter().map(|x| x + 1.0).collect())
                }
                TensorData::I64(s, v) => {
                    TensorData::I64(s.clone(), v.iter().map(|x| x + 1).collect())
                }
            };
            let (name, d) = match variant {
                1 if !official.is_empty() => (
                    k.replace(".bn1.", ".bn."),
                    "official `.bn.` spelling beside timm's (values + 1)",
                ),
                0 | 1 => (format!("module.{k}"), "conflicting alias (values + 1)"),
                2 => ("extra.weight".to_string(), "unknown tensor"),
                3 => (format!("{k}.total_ops"), "thop counter (skipped)"),
                _ => (
                    format!("{k}.num_batches_tracked"),
                    "stray num_batches_tracked",
                ),
            };
            t.insert(name.clone(), perturbed);
            WInput {
                body: WBody::Tensors(t),
                desc: format!("added {name} beside {k}: {d}"),
                flipped: vec![],
                implausible: false,
            }
        }
        "reser-nonfinite" => {
            let mut t = src.tensors.clone();
            let is_counter = |k: &str| k.ends_with(".step") || k.ends_with(".updates");
            let floats: Vec<String> = t
                .iter()
                .filter(|(_, v)| matches!(v, TensorData::F32(_, d) if !d.is_empty()))
                .map(|(k, _)| k.clone())
                .collect();
            let var: Vec<String> = floats
                .iter()
                .filter(|k| k.ends_with("running_var"))
                .cloned()
                .collect();
            let (k, val, implausible) = match cycle % 10 {
                0..=6 => {
                    let bad = [
                        f32::NAN,
                        f32::INFINITY,
                        f32::NEG_INFINITY,
                        f32::MAX,
                        -f32::MAX,
                        1e30,
                        2e20,
                        -1e21,
                    ];
                    // A third of the time on the tensors the trainer keeps beside the model.
                    let special: Vec<String> = floats
                        .iter()
                        .filter(|k| {
                            k.starts_with("optim.")
                                || k.starts_with("ema.")
                                || **k == classifier(src)
                        })
                        .cloned()
                        .collect();
                    let k = if cycle.is_multiple_of(3) {
                        pick(rng, &special).clone()
                    } else {
                        pick(rng, &floats).clone()
                    };
                    (k, *pick(rng, &bad), true)
                }
                7 => (pick(rng, &var).clone(), -0.5, true),
                _ => {
                    // Unusual but valid values: the loaders must take them.
                    let plain: Vec<&String> = floats.iter().filter(|k| !is_counter(k)).collect();
                    let k = (*pick(rng, &plain)).clone();
                    let nonneg = k.ends_with("running_var") || k.ends_with("exp_avg_sq");
                    let benign: &[f32] = if nonneg {
                        &[-0.0, 1e-45, 1e19, 0.0]
                    } else {
                        &[-0.0, 1e-45, 1e19, -3.0]
                    };
                    (k, *pick(rng, benign), false)
                }
            };
            let Some(TensorData::F32(_, v)) = t.get_mut(&k) else {
                unreachable!("{k} is a float tensor")
            };
            let nel = v.len();
            let i = rng.random_range(0..nel);
            v[i] = val;
            WInput {
                body: WBody::Tensors(t),
                desc: format!("{k}[{i}] = {val:e} ({nel} values)"),
                flipped: vec![],
                implausible,
            }
        }
        "reser-retype" => {
            let mut t = src.tensors.clone();
            // Every variant in turn, on the classifier (what detect_options reads) a third of
            // the time.
            let k = if (cycle / 6).is_multiple_of(3) {
                classifier(src)
            } else {
                pick(rng, &keys).clone()
            };
            let old = t[&k].clone();
            let (new, d) = match cycle % 6 {
                0 => (TensorData::F32(vec![], vec![0.5]), "a scalar"),
                1 => (TensorData::F32(vec![0], vec![]), "an empty [0] tensor"),
                2 => (
                    match &old {
                        TensorData::F32(s, v) => {
                            TensorData::I64(s.clone(), v.iter().map(|x| *x as i64).collect())
                        }
                        TensorData::I64(s, v) => {
                            TensorData::F32(s.clone(), v.iter().map(|x| *x as f32).collect())
                        }
                    },
                    "the other dtype (int64 <-> f32)",
                ),
                3 => (
                    match &old {
                        TensorData::F32(_, v) => TensorData::F32(vec![v.len()], v.clone()),
                        TensorData::I64(_, v) => TensorData::I64(vec![v.len()], v.clone()),
                    },
                    "flattened",
                ),
                4 => (
                    match &old {
                        TensorData::F32(_, v) => {
                            let mut v = v.clone();
                            v.truncate(v.len() / 2);
                            TensorData::F32(vec![v.len()], v)
                        }
                        TensorData::I64(_, _) => TensorData::I64(vec![2], vec![1, 2]),
                    },
                    "half its values",
                ),
                _ => (
                    match &old {
                        TensorData::F32(s, v) => {
                            let mut s = s.clone();
                            s.insert(0, 1);
                            TensorData::F32(s, v.clone())
                        }
                        TensorData::I64(_, v) => TensorData::I64(vec![1, v.len()], v.clone()),
                    },
                    "with a leading 1 dim",
                ),
            };
            t.insert(k.clone(), new);
            WInput {
                body: WBody::Tensors(t),
                desc: format!("{k} ({:?}) replaced by {d}", old.shape()),
                flipped: vec![],
                implausible: false,
            }
        }
        "random-bytes" => match cycle % 5 {
            0 => {
                let mut v = vec![0u8; rng.random_range(0..4096)];
                rng.fill(&mut v[..]);
                raw(v, "random bytes".into())
            }
            1 => {
                let mut h = vec![0u8; rng.random_range(0..256)];
                rng.fill(&mut h[..]);
                raw(
                    assemble_raw(&h, data),
                    "valid length, random header bytes".into(),
                )
            }
            2 => {
                let mut v = b.clone();
                let a = rng.random_range(0..len);
                let e = (a + rng.random_range(1..4096)).min(len);
                v[a..e].fill(0);
                raw(v, format!("bytes {a}..{e} zeroed"))
            }
            3 => {
                let mut v = b.clone();
                let mut extra = vec![0u8; rng.random_range(1..64)];
                rng.fill(&mut extra[..]);
                v.extend_from_slice(&extra);
                raw(v, format!("{} bytes appended", extra.len()))
            }
            _ => {
                let mut v = vec![0u8; rng.random_range(1..16)];
                rng.fill(&mut v[..]);
                let d = format!("{} bytes prepended", v.len());
                v.extend_from_slice(b);
                raw(v, d)
            }
        },
        other => panic!("unknown mutation {other}"),
    }
}

fn fuzz_weights(f: &mut Fuzz, src: &Source, min: usize, max: usize, deadline: Instant) {
    let mut rng = StdRng::seed_from_u64(f.seed ^ src.group.len() as u64 ^ 0x57);
    let calls: [&'static str; 2] = match src.kind {
        Kind::State => ["load_state", "detect_options"],
        Kind::Checkpoint => ["resume", "detect_options"],
    };
    run_for(min, max, deadline, |i| {
        let m = WEIGHT_MUTATIONS[i % WEIGHT_MUTATIONS.len()];
        let wi = mutate_weights(src, m, i / WEIGHT_MUTATIONS.len(), &mut rng);
        let inp = Input {
            group: src.group,
            mutation: m.to_string(),
            iter: i,
            desc: wi.desc.clone(),
            file: &src.path,
        };
        f.begin(&inp);
        match &wi.body {
            WBody::Raw(bytes) => std::fs::write(&src.path, bytes).unwrap(),
            WBody::Tensors(t) => {
                let mut meta = src.meta.clone();
                meta.insert("fuzz.iter".into(), i.to_string());
                let w = guard(|| io::write_tensors(&src.path, t, Some(meta)));
                f.record(&inp, "write_tensors", &w);
                if w.ok().is_none() {
                    return;
                }
            }
        }
        // read_tensors
        let r = guard(|| io::read_tensors(&src.path));
        f.record(&inp, "read_tensors", &r);
        let read_diff = r.ok().is_some_and(|t| !same_tensors(t, &src.tensors));
        if read_diff {
            f.flag(&inp, "read Ok≠");
        }
        // load_state into a fresh model / resume-like
        let (l, load_diff) = match src.kind {
            Kind::State => {
                let mut st = src.fresh.clone();
                let l = guard(|| io::load_state(&mut st, &src.path));
                let diff = l.ok().is_some() && !same_state(&st, &src.orig);
                (l, diff)
            }
            Kind::Checkpoint => {
                let l = guard(|| resume_like(src));
                let diff = l.ok().is_some_and(|same| !same);
                (l.map_ok(), diff)
            }
        };
        f.record(&inp, calls[0], &l);
        if load_diff {
            f.flag(&inp, "load Ok≠");
        }
        let d = guard(|| models::detect_options(&src.path));
        f.record(&inp, calls[1], &d);

        if m == "data-bitflip" && (read_diff || load_diff) {
            let what = match (read_diff, load_diff) {
                (true, true) => "read_tensors and the load returned Ok with the flipped values",
                (true, false) => "read_tensors returned Ok with the flipped values",
                _ => "the load returned Ok with the flipped values",
            };
            if src.checksummed() {
                f.flag(&inp, "silent (checksummed)");
                f.finding(true, &inp, calls[0], what.to_string());
            } else {
                f.flag(&inp, "silent (no checksum)");
                f.finding(
                    true,
                    &inp,
                    calls[0],
                    format!("{what} (file has no checksums)"),
                );
            }
        }
        if m == "data-bitflip" && src.checksummed() && !wi.flipped.is_empty() {
            for (call, e) in [("read_tensors", r.err()), (calls[0], l.err())] {
                if let Some(e) = e {
                    if !wi.flipped.iter().any(|t| e.contains(t.as_str())) {
                        f.flag(&inp, "unnamed err");
                        f.finding(
                            true,
                            &inp,
                            call,
                            format!("error does not name the flipped tensor: {}", short(e, 200)),
                        );
                    }
                }
            }
        }
        if wi.implausible && l.ok().is_some() {
            f.flag(&inp, "suspect");
            f.finding(
                false,
                &inp,
                calls[0],
                "an implausible value (NaN/Inf/huge/negative variance) loaded without error".into(),
            );
        }
        if m == "reser-alias" && l.ok().is_some() && wi.desc.contains("values + 1") {
            f.flag(&inp, "suspect");
            f.finding(
                false,
                &inp,
                calls[0],
                "two tensors for one parameter (with different values) loaded without error".into(),
            );
        }
        if m == "json-offsets" && load_diff {
            f.flag(&inp, "suspect");
            f.finding(
                false,
                &inp,
                calls[0],
                "edited data_offsets loaded without error, with other values".into(),
            );
        }
    });
}

trait MapOk {
    fn map_ok(self) -> Out<()>;
}

impl MapOk for Out<bool> {
    fn map_ok(self) -> Out<()> {
        match self {
            Out::Ok(_) => Out::Ok(()),
            Out::Err(e) => Out::Err(e),
            Out::Panic { msg, loc } => Out::Panic { msg, loc },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TOML recipes.

#[derive(Clone, Debug)]
enum Seg {
    K(String),
    I(usize),
}

fn toml_paths(v: &toml::Value, cur: &mut Vec<Seg>, out: &mut Vec<(Vec<Seg>, bool)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, x) in t {
                cur.push(Seg::K(k.clone()));
                out.push((cur.clone(), !x.is_table()));
                toml_paths(x, cur, out);
                cur.pop();
            }
        }
        toml::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                cur.push(Seg::I(i));
                out.push((cur.clone(), !x.is_table() && !x.is_array()));
                toml_paths(x, cur, out);
                cur.pop();
            }
        }
        _ => {}
    }
}

fn toml_at<'a>(v: &'a mut toml::Value, p: &[Seg]) -> Option<&'a mut toml::Value> {
    let mut v = v;
    for s in p {
        v = match (s, v) {
            (Seg::K(k), toml::Value::Table(t)) => t.get_mut(k)?,
            (Seg::I(i), toml::Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(v)
}

fn toml_remove(v: &mut toml::Value, p: &[Seg]) {
    let Some((last, parent)) = p.split_last() else {
        return;
    };
    match (toml_at(v, parent), last) {
        (Some(toml::Value::Table(t)), Seg::K(k)) => {
            t.remove(k);
        }
        (Some(toml::Value::Array(a)), Seg::I(i)) if *i < a.len() => {
            a.remove(*i);
        }
        _ => {}
    }
}

fn path_str(p: &[Seg]) -> String {
    p.iter()
        .map(|s| match s {
            Seg::K(k) => k.clone(),
            Seg::I(i) => format!("[{i}]"),
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn special_numbers() -> Vec<toml::Value> {
    use toml::Value::{Float as F, Integer as I};
    vec![
        F(f64::NAN),
        F(f64::INFINITY),
        F(f64::NEG_INFINITY),
        F(-1.0),
        I(-1),
        I(0),
        F(0.0),
        F(-0.0),
        F(1e308),
        F(-1e308),
        I(i64::MAX),
        I(i64::MIN),
        F(5e-324),
        F(1e-300),
        F(1e20),
        I(1 << 40),
        F(0.5),
        I(1),
        F(1.0000001),
        F(0.99999999),
        F(2.0),
    ]
}

fn other_types() -> Vec<toml::Value> {
    use toml::Value as V;
    let mut t = toml::Table::new();
    t.insert("a".into(), V::Integer(1));
    vec![
        V::String("x".into()),
        V::String(String::new()),
        V::String("nan".into()),
        V::Integer(3),
        V::Float(2.5),
        V::Boolean(true),
        V::Array(vec![]),
        V::Array(vec![V::Integer(1), V::String("a".into())]),
        V::Array(vec![V::Float(0.5), V::Float(f64::NAN)]),
        V::Array(vec![V::Float(0.1); 3]),
        V::Table(toml::Table::new()),
        V::Table(t),
        V::Datetime("1979-05-27T07:32:00Z".parse().unwrap()),
    ]
}

const TOML_MUTATIONS: &[&str] = &[
    "none",
    "delete-key",
    "type-change",
    "numbers",
    "unknown-key",
    "text-bytes",
    "set-override",
    "numeric-fields",
    "auto-augment",
];

fn random_aa(rng: &mut StdRng) -> String {
    let prefix = *pick(
        rng,
        &[
            "rand",
            "rand",
            "rand",
            "original",
            "originalr",
            "v0",
            "v0r",
            "autoaug",
            "augmix",
            "3a",
            "",
            "none",
            "rand-",
            "randx",
        ],
    );
    let nums = [
        "9",
        "0",
        "-1",
        "nan",
        "inf",
        "1e308",
        "30",
        "31",
        "100",
        "0.5",
        "-0.5",
        "18446744073709551616",
        "4294967296",
        "1e-300",
        "10",
        "2",
    ];
    let mut s = prefix.to_string();
    for _ in 0..rng.random_range(0..5) {
        let key = *pick(
            rng,
            &["m", "n", "mstd", "mmax", "inc", "p", "w", "x", "", "m"],
        );
        let v = if rng.random_bool(0.85) {
            *pick(rng, &nums)
        } else {
            ""
        };
        s.push('-');
        s.push_str(key);
        s.push_str(v);
    }
    s
}

/// Builds what the trainer builds from a parsed recipe; Ok(suspect findings).
fn use_recipe(cfg: &TrainConfig, rng: &mut StdRng) -> anyhow::Result<Vec<String>> {
    let mut sus = Vec::new();
    let tr = Transform::new(&cfg.augment)?;
    let ev = Transform::new(&cfg.eval)?;
    let layout = Layout::from_shapes(&[("w", vec![2, 2]), ("b", vec![2])]);
    let _opt = cfg.optimizer.build(&layout)?;
    let s = &cfg.schedule;
    let epochs = cfg.train.epochs as f64;
    for e in [
        0.0,
        1e-9,
        s.warmup_epochs / 2.0,
        s.warmup_epochs,
        0.5,
        1.0,
        epochs / 2.0,
        epochs - 1e-9,
        epochs,
    ] {
        let lr = s.lr_at(cfg.train.lr, e);
        if !(lr.is_finite() && lr >= 0.0) {
            sus.push(format!(
                "a validated recipe gives lr_at(epoch {e}) = {lr} (the optimizer step panics on it)"
            ));
            break;
        }
    }
    if let Some(ema) = &cfg.ema {
        for t in [0u64, 1, 10, 1000, u32::MAX as u64] {
            let d = ema.decay_at(t);
            if !(0.0..=1.0).contains(&d) {
                sus.push(format!("a validated recipe gives EMA decay_at({t}) = {d}"));
                break;
            }
        }
    }
    let img = image::RgbImage::from_fn(37, 29, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 9) as u8, ((x + y) * 3) as u8])
    });
    // Only transforms of a test-sized output: a recipe may legitimately ask for 1024 px.
    for t in [&tr, &ev] {
        if t.size() <= 64 && t.config().scale_size() <= 512 {
            t.apply(&img, rng)?;
        }
    }
    Ok(sus)
}

fn mutate_toml(
    seed: &str,
    m: &str,
    cycle: usize,
    rng: &mut StdRng,
) -> (String, Vec<String>, Option<Vec<u8>>, String) {
    let doc: toml::Table = toml::from_str(seed).unwrap();
    let mut v = toml::Value::Table(doc);
    let mut paths = Vec::new();
    toml_paths(&v, &mut Vec::new(), &mut paths);
    let leaves: Vec<&Vec<Seg>> = paths.iter().filter(|(_, l)| *l).map(|(p, _)| p).collect();
    let ser = |v: &toml::Value| toml::to_string(v).unwrap_or_default();
    match m {
        "none" => (seed.to_string(), vec![], None, "unmodified".into()),
        "delete-key" => {
            let n = rng.random_range(1..=2);
            let mut gone = Vec::new();
            for _ in 0..n {
                let (p, _) = pick(rng, &paths).clone();
                toml_remove(&mut v, &p);
                gone.push(path_str(&p));
            }
            (ser(&v), vec![], None, format!("deleted {gone:?}"))
        }
        "type-change" | "numbers" => {
            let p = (*pick(rng, &leaves)).clone();
            let new = if m == "numbers" {
                pick(rng, &special_numbers()).clone()
            } else {
                pick(rng, &other_types()).clone()
            };
            let d = format!("{} -> {new}", path_str(&p));
            if let Some(x) = toml_at(&mut v, &p) {
                *x = new;
            }
            (ser(&v), vec![], None, d)
        }
        "unknown-key" => {
            let tables: Vec<&Vec<Seg>> = paths
                .iter()
                .filter(|(p, l)| !*l && matches!(p.last(), Some(Seg::K(_))))
                .map(|(p, _)| p)
                .collect();
            let key = pick(
                rng,
                &[
                    "lrr",
                    "",
                    "name2",
                    "é",
                    "epochs ",
                    "train",
                    "x".repeat(300).as_str(),
                ],
            )
            .to_string();
            let at = if rng.random_bool(0.3) || tables.is_empty() {
                vec![]
            } else {
                (*pick(rng, &tables)).clone()
            };
            if let Some(toml::Value::Table(t)) = toml_at(&mut v, &at) {
                t.insert(key.clone(), toml::Value::Integer(1));
            }
            (
                ser(&v),
                vec![],
                None,
                format!("added {}.{}", path_str(&at), short(&key, 20)),
            )
        }
        "text-bytes" => {
            let mut b = seed.as_bytes().to_vec();
            let d = match cycle % 7 {
                0 => {
                    let k = rng.random_range(1..=4);
                    let len = b.len();
                    let at = flip_bits(rng, &mut b, 0, len, k);
                    format!("bits flipped at {at:?}")
                }
                1 => {
                    let i = rng.random_range(0..=b.len());
                    let mut x = vec![0u8; rng.random_range(1..8)];
                    rng.fill(&mut x[..]);
                    b.splice(i..i, x.iter().copied());
                    format!("{} random bytes inserted at {i}", x.len())
                }
                2 => {
                    let i = rng.random_range(0..b.len());
                    let e = (i + rng.random_range(1..40)).min(b.len());
                    b.drain(i..e);
                    format!("bytes {i}..{e} deleted")
                }
                3 => {
                    let i = rng.random_range(0..b.len());
                    b.truncate(i);
                    format!("truncated at {i}")
                }
                4 => {
                    let lines: Vec<&str> = seed.lines().collect();
                    let l = *pick(rng, &lines);
                    b.extend_from_slice(format!("\n{l}\n").as_bytes());
                    format!("line {l:?} repeated at the end")
                }
                5 => {
                    let i = rng.random_range(0..b.len());
                    let c = *pick(
                        rng,
                        &[b'[', b']', b'"', b'=', b'\n', b'#', 0xff, 0x00, b'\'', b'{'],
                    );
                    b[i] = c;
                    format!("byte {i} -> {c:#x}")
                }
                _ => {
                    let mut x = vec![0u8; rng.random_range(0..512)];
                    rng.fill(&mut x[..]);
                    b = x;
                    "random bytes".into()
                }
            };
            (String::from_utf8_lossy(&b).into_owned(), vec![], Some(b), d)
        }
        "set-override" => {
            let keys: Vec<String> = paths
                .iter()
                .filter(|(p, _)| p.iter().all(|s| matches!(s, Seg::K(_))))
                .map(|(p, _)| path_str(p))
                .collect();
            let junk_keys = [
                "",
                ".",
                "..",
                "a..b",
                ".train",
                "train.",
                "train.lr.x",
                "model",
                "train",
                "train . lr",
                "ééé",
                "\u{0}",
                "augment.scale.0",
            ];
            let vals = [
                "nan",
                "inf",
                "-inf",
                "-1",
                "0",
                "1e308",
                "1e999",
                "-0.0",
                "9223372036854775808",
                "true",
                "\"s\"",
                "[1, 2]",
                "[0.5]",
                "[]",
                "{}",
                "{ a = 1 }",
                "bicubic",
                "lamb",
                "cosine",
                "rand-m9-mstd0.5",
                "",
                " ",
                "=",
                "[",
                "\"unterminated",
                "1979-05-27",
                "5e-324",
                "1\nv = 2",
                "[nan, inf]",
                "0.1",
            ];
            let n = rng.random_range(1..=3);
            let mut sets = Vec::new();
            for _ in 0..n {
                let key = if rng.random_bool(0.8) {
                    pick(rng, &keys).clone()
                } else if rng.random_bool(0.9) {
                    pick(rng, &junk_keys).to_string()
                } else {
                    "x".repeat(1000)
                };
                let val = if rng.random_bool(0.9) {
                    pick(rng, &vals).to_string()
                } else {
                    let mut x = vec![0u8; rng.random_range(0..12)];
                    rng.fill(&mut x[..]);
                    String::from_utf8_lossy(&x).into_owned()
                };
                sets.push(if rng.random_bool(0.97) {
                    format!("{key}={val}")
                } else {
                    key
                });
            }
            let d = format!(
                "--set {}",
                sets.iter()
                    .map(|s| short(s, 40))
                    .collect::<Vec<_>>()
                    .join(" --set ")
            );
            (seed.to_string(), sets, None, d)
        }
        "numeric-fields" => {
            // The numbers validation is about, set to edge values with `--set`.
            let fields = [
                "train.lr",
                "train.epochs",
                "train.batch_size",
                "train.eval_batch_size",
                "train.label_smoothing",
                "train.seed",
                "schedule.epochs",
                "schedule.warmup_epochs",
                "schedule.warmup_lr",
                "schedule.min_lr",
                "schedule.decay_epochs",
                "schedule.decay_rate",
                "ema.decay",
                "ema.warmup_gamma",
                "ema.warmup_power",
                "optimizer.weight_decay",
                "optimizer.eps",
                "optimizer.max_grad_norm",
                "optimizer.betas",
                "mixup.mixup_alpha",
                "mixup.cutmix_alpha",
                "mixup.prob",
                "model.drop_rate",
                "model.rep_branches",
                "data.synthetic_size",
                "data.workers",
            ];
            let vals = [
                "nan",
                "inf",
                "-inf",
                "-1",
                "0",
                "0.0",
                "-0.0",
                "1e308",
                "-1e308",
                "5e-324",
                "1e-300",
                "1e-9",
                "1",
                "0.5",
                "0.9999999",
                "1.0000001",
                "2",
                "1000000",
                "9223372036854775807",
                "-9223372036854775808",
                "[0.9, 0.999]",
                "[1.0, 1.0]",
                "[nan, 0.5]",
                "[-0.1, 1e308]",
            ];
            let n = 1 + cycle % 3;
            let sets: Vec<String> = (0..n)
                .map(|_| format!("{}={}", pick(rng, &fields), pick(rng, &vals)))
                .collect();
            let d = format!("--set {}", sets.join(" --set "));
            (seed.to_string(), sets, None, d)
        }
        "auto-augment" => {
            let aa = random_aa(rng);
            let size = rng.random_range(1..=48);
            let mut sets = vec![
                format!("augment.auto_augment=\"{aa}\""),
                format!("augment.size={size}"),
                "augment.is_training=true".to_string(),
                format!("eval.size={}", rng.random_range(1..=48)),
            ];
            let knobs = [
                (
                    "augment.scale",
                    &[
                        "[0.08, 1.0]",
                        "[1e-300, 1.0]",
                        "[0.5, inf]",
                        "[1.0, 1.0]",
                        "[0.9, 1e308]",
                    ][..],
                ),
                (
                    "augment.ratio",
                    &[
                        "[0.75, 1.33]",
                        "[1e-300, 1e300]",
                        "[1.0, 1.0]",
                        "[5e-324, inf]",
                    ][..],
                ),
                ("augment.re_prob", &["0.0", "1.0", "0.5"][..]),
                ("augment.re_count", &["1", "3", "1000"][..]),
                ("augment.color_jitter", &["0.0", "0.4", "1e308", "inf"][..]),
                ("augment.interpolation", &["\"random\"", "\"bicubic\""][..]),
                (
                    "eval.crop_pct",
                    &["0.875", "1.0", "0.2", "1e308", "inf"][..],
                ),
                (
                    "augment.mean",
                    &["[0.5, 0.5, 0.5]", "[1e308, -1e308, nan]"][..],
                ),
                (
                    "augment.std",
                    &["[0.5, 0.5, 0.5]", "[1e-308, -1.0, inf]"][..],
                ),
            ];
            for (k, vs) in knobs {
                if rng.random_bool(0.3) {
                    sets.push(format!("{k}={}", pick(rng, vs)));
                }
            }
            let d = format!("--set {}", sets.join(" --set "));
            (seed.to_string(), sets, None, d)
        }
        other => panic!("unknown mutation {other}"),
    }
}

fn fuzz_toml(f: &mut Fuzz, dir: &Path, min: usize, max: usize, deadline: Instant) {
    let mut seeds: Vec<(String, String)> = vec![(
        "default_recipe".to_string(),
        TrainConfig::default_recipe().to_string(),
    )];
    let cfg_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&cfg_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    for p in files {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        seeds.push((name, std::fs::read_to_string(&p).unwrap()));
    }
    for (name, text) in &seeds {
        assert!(
            TrainConfig::from_toml(text, &[], name).is_ok(),
            "seed recipe {name} does not parse"
        );
    }
    let file = dir.join("recipe.toml");
    let mut rng = StdRng::seed_from_u64(f.seed ^ 0x70_4d_4c);
    run_for(min, max, deadline, |i| {
        let m = TOML_MUTATIONS[i % TOML_MUTATIONS.len()];
        let (sname, seed) = &seeds[(i / TOML_MUTATIONS.len()) % seeds.len()];
        let (text, sets, raw, desc) = mutate_toml(seed, m, i / TOML_MUTATIONS.len(), &mut rng);
        std::fs::write(&file, raw.as_deref().unwrap_or(text.as_bytes())).unwrap();
        let inp = Input {
            group: "recipe",
            mutation: m.to_string(),
            iter: i,
            desc: format!("{sname}: {desc}"),
            file: &file,
        };
        f.begin(&inp);
        let p = guard(|| TrainConfig::from_toml(&text, &sets, "fuzz"));
        f.record(&inp, "from_toml", &p);
        if raw.is_some() {
            let l = guard(|| TrainConfig::load(&file, &sets));
            f.record(&inp, "load(file)", &l);
        }
        if let Some(cfg) = p.ok() {
            let mut trng = StdRng::seed_from_u64(i as u64);
            let u = guard(|| use_recipe(cfg, &mut trng));
            f.record(&inp, "use", &u);
            if let Some(sus) = u.ok() {
                for s in sus {
                    f.flag(&inp, "suspect");
                    f.finding(false, &inp, "use", s.clone());
                }
            }
            let rt = guard(|| {
                let text = cfg.to_toml()?;
                TrainConfig::from_toml(&text, &[], "round trip")
            });
            f.record(&inp, "round trip", &rt);
            if let Some(e) = rt.err() {
                f.flag(&inp, "suspect");
                f.finding(
                    false,
                    &inp,
                    "round trip",
                    format!(
                        "a validated recipe does not survive to_toml/from_toml (resume re-reads config.toml): {}",
                        short(e, 160)
                    ),
                );
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Images.

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// PNG chunks: (offset of the length field, data length, type).
fn png_chunks(b: &[u8]) -> Vec<(usize, usize, [u8; 4])> {
    let mut out = Vec::new();
    let mut p = 8;
    while p + 12 <= b.len() {
        let n = u32::from_be_bytes(b[p..p + 4].try_into().unwrap()) as usize;
        if p + 12 + n > b.len() {
            break;
        }
        out.push((p, n, b[p + 4..p + 8].try_into().unwrap()));
        p += 12 + n;
    }
    out
}

fn png_fix_crc(b: &mut [u8], chunk: (usize, usize, [u8; 4])) {
    let (p, n, _) = chunk;
    let c = crc32(&b[p + 4..p + 8 + n]);
    b[p + 8 + n..p + 12 + n].copy_from_slice(&c.to_be_bytes());
}

fn encode(img: image::DynamicImage, fmt: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, fmt).unwrap();
    out.into_inner()
}

fn image_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use image::{DynamicImage as D, ImageBuffer, ImageFormat as F, Luma, Rgb, Rgba};
    let rgb = |w: u32, h: u32| {
        image::RgbImage::from_fn(w, h, |x, y| {
            Rgb([(x * 13) as u8, (y * 17) as u8, ((x * y) % 251) as u8])
        })
    };
    vec![
        ("png", encode(D::ImageRgb8(rgb(20, 14)), F::Png)),
        (
            "png",
            encode(
                D::ImageRgba8(ImageBuffer::from_fn(9, 7, |x, y| {
                    Rgba([x as u8 * 20, y as u8 * 30, 77, (x * y) as u8])
                })),
                F::Png,
            ),
        ),
        (
            "png",
            encode(
                D::ImageLuma16(ImageBuffer::from_fn(11, 5, |x, y| {
                    Luma([(x * 5000 + y * 300) as u16])
                })),
                F::Png,
            ),
        ),
        ("png", encode(D::ImageRgb8(rgb(1, 1)), F::Png)),
        ("jpeg", encode(D::ImageRgb8(rgb(24, 16)), F::Jpeg)),
        (
            "jpeg",
            encode(
                D::ImageLuma8(ImageBuffer::from_fn(16, 16, |x, y| Luma([(x * y) as u8]))),
                F::Jpeg,
            ),
        ),
        ("jpeg", encode(D::ImageRgb8(rgb(1, 37)), F::Jpeg)),
    ]
}

const IMAGE_MUTATIONS: &[&str] = &[
    "none",
    "truncate",
    "bitflip",
    "header-flip",
    "dims",
    "compressed-data",
    "splice",
    "random-bytes",
];

fn mutate_image(fmt: &str, b: &[u8], m: &str, cycle: usize, rng: &mut StdRng) -> (Vec<u8>, String) {
    let mut v = b.to_vec();
    let len = v.len();
    let d = match m {
        "none" => "unmodified".into(),
        "truncate" => {
            let cut = rng.random_range(0..len);
            v.truncate(cut);
            format!("truncated to {cut} of {len}")
        }
        "bitflip" => {
            let k = rng.random_range(1..=8);
            let at = flip_bits(rng, &mut v, 0, len, k);
            format!("bits flipped at {at:?}")
        }
        "header-flip" => {
            let k = rng.random_range(1..=3);
            let at = flip_bits(rng, &mut v, 0, len.min(64), k);
            format!("header bits flipped at {at:?}")
        }
        "dims" if fmt == "png" => {
            let ch = png_chunks(&v);
            let ihdr = ch[0];
            let p = ihdr.0 + 8;
            let vals = [
                0u32,
                1,
                2,
                65535,
                65536,
                1 << 20,
                (1 << 31) - 1,
                1 << 31,
                u32::MAX,
                rng.random(),
            ];
            let w = *pick(rng, &vals);
            let h = *pick(rng, &vals);
            let which = rng.random_range(0..4);
            if which != 1 {
                v[p..p + 4].copy_from_slice(&w.to_be_bytes());
            }
            if which != 0 {
                v[p + 4..p + 8].copy_from_slice(&h.to_be_bytes());
            }
            let mut d = format!(
                "IHDR {} x {} (CRC fixed)",
                if which != 1 {
                    w.to_string()
                } else {
                    "=".into()
                },
                if which != 0 {
                    h.to_string()
                } else {
                    "=".into()
                }
            );
            if which == 3 {
                // bit depth and colour type too
                v[p + 8] = *pick(rng, &[0u8, 1, 2, 3, 4, 8, 16, 32]);
                v[p + 9] = *pick(rng, &[0u8, 1, 2, 3, 4, 6, 7]);
                d.push_str(&format!(", depth {} colour {}", v[p + 8], v[p + 9]));
            }
            png_fix_crc(&mut v, ihdr);
            d
        }
        "dims" => {
            // SOF0/SOF2 segment: FF C0|C2, len(2), precision, height(2), width(2), components.
            match (0..len.saturating_sub(10))
                .find(|&i| v[i] == 0xff && (v[i + 1] == 0xc0 || v[i + 1] == 0xc2))
            {
                Some(i) => {
                    let vals = [0u16, 1, 2, 8, 255, 16384, 65535, rng.random()];
                    let (h, mut w) = (*pick(rng, &vals), *pick(rng, &vals));
                    // Both sides large decode for seconds (a 362-byte JPEG declaring
                    // 16384 x 16384 gray takes ~4.6 s and 268 MB, under the decoder's 512 MB
                    // limit): keep the budget for many inputs, one large side at a time.
                    if h >= 4096 && w >= 4096 {
                        w = *pick(rng, &[1u16, 8, 255]);
                    }
                    v[i + 5..i + 7].copy_from_slice(&h.to_be_bytes());
                    v[i + 7..i + 9].copy_from_slice(&w.to_be_bytes());
                    let mut d = format!("SOF {w} x {h}");
                    if rng.random_bool(0.3) {
                        v[i + 9] = *pick(rng, &[0u8, 2, 4, 5, 255]);
                        v[i + 4] = *pick(rng, &[8u8, 12, 16, 0]);
                        d.push_str(&format!(
                            ", {} components, precision {}",
                            v[i + 9],
                            v[i + 4]
                        ));
                    }
                    d
                }
                None => "no SOF found".into(),
            }
        }
        "compressed-data" if fmt == "png" => {
            let ch = png_chunks(&v);
            let idat = *ch.iter().find(|c| &c.2 == b"IDAT").unwrap();
            let k = rng.random_range(1..=4);
            let at = flip_bits(rng, &mut v, idat.0 + 8, idat.0 + 8 + idat.1, k);
            png_fix_crc(&mut v, idat);
            format!("IDAT bits flipped at {at:?} (CRC fixed)")
        }
        "compressed-data" => {
            // Entropy-coded data after SOS (FF DA): decoders may legitimately show garbage.
            let sos = (0..len - 1)
                .find(|&i| v[i] == 0xff && v[i + 1] == 0xda)
                .unwrap_or(0);
            let k = rng.random_range(1..=4);
            let at = flip_bits(rng, &mut v, sos + 14, len - 2, k);
            format!("scan bits flipped at {at:?}")
        }
        "splice" => match cycle % 3 {
            0 => {
                let i = rng.random_range(0..len);
                let e = (i + rng.random_range(1..32)).min(len);
                v.drain(i..e);
                format!("bytes {i}..{e} deleted")
            }
            1 => {
                let i = rng.random_range(0..len);
                let e = (i + rng.random_range(1..64)).min(len);
                let x: Vec<u8> = b[i..e].to_vec();
                let at = rng.random_range(0..len);
                v.splice(at..at, x);
                format!("bytes {i}..{e} duplicated at {at}")
            }
            _ => {
                let i = rng.random_range(0..len);
                let mut x = vec![0u8; rng.random_range(1..16)];
                rng.fill(&mut x[..]);
                v.splice(i..i, x.iter().copied());
                format!("{} random bytes inserted at {i}", x.len())
            }
        },
        "random-bytes" => {
            let magic: &[u8] = if fmt == "png" {
                &b[..16]
            } else {
                &[0xff, 0xd8, 0xff]
            };
            let mut x = vec![0u8; rng.random_range(0..2048)];
            rng.fill(&mut x[..]);
            v = magic.to_vec();
            v.extend_from_slice(&x);
            format!("{fmt} magic + {} random bytes", x.len())
        }
        other => panic!("unknown mutation {other}"),
    };
    (v, d)
}

fn fuzz_images(f: &mut Fuzz, dir: &Path, min: usize, max: usize, deadline: Instant) {
    let seeds = image_seeds();
    let root = dir.join("images");
    std::fs::create_dir_all(root.join("a")).unwrap();
    let file = root.join("a").join("x.png");
    std::fs::write(&file, &seeds[0].1).unwrap();
    let ds = ImageFolder::open(&root).unwrap();
    for (fmt, b) in &seeds {
        std::fs::write(&file, b).unwrap();
        assert!(ds.load(0).is_ok(), "seed {fmt} image does not decode");
    }
    let tr = Transform::new(&TransformConfig::train(32)).unwrap();
    let ev = Transform::new(&TransformConfig::eval(32)).unwrap();
    let mut rng = StdRng::seed_from_u64(f.seed ^ 0x1_3a9e);
    run_for(min, max, deadline, |i| {
        let m = IMAGE_MUTATIONS[i % IMAGE_MUTATIONS.len()];
        let si = (i / IMAGE_MUTATIONS.len()) % seeds.len();
        let (fmt, b) = &seeds[si];
        let (bytes, desc) = mutate_image(fmt, b, m, i / IMAGE_MUTATIONS.len(), &mut rng);
        std::fs::write(&file, &bytes).unwrap();
        let inp = Input {
            group: "image",
            mutation: format!("{fmt}/{m}"),
            iter: i,
            desc: format!("seed {si} ({fmt}, {} bytes): {desc}", b.len()),
            file: &file,
        };
        f.begin(&inp);
        let d = guard(|| ds.load(0));
        f.record(&inp, "ImageFolder::load", &d);
        if let Some(img) = d.ok() {
            let mut trng = StdRng::seed_from_u64(i as u64);
            let t = guard(|| {
                let a = ev.apply(img, &mut trng)?;
                let b = tr.apply(img, &mut trng)?;
                anyhow::ensure!(
                    a.iter().chain(&b).all(|x| x.is_finite()),
                    "non-finite transform output"
                );
                Ok(())
            });
            f.record(&inp, "transforms", &t);
        }
    });
}

// ---------------------------------------------------------------------------------------------

#[test]
fn fuzz_loaders() {
    let seed = std::env::var("GHOSTV3_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let secs = std::env::var("GHOSTV3_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(DEFAULT_SECS);
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("ghostv3-fuzz-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = Fuzz {
        seed,
        rows: BTreeMap::new(),
        panics: Vec::new(),
        silent: Vec::new(),
        suspects: Vec::new(),
        kept: HashSet::new(),
        repro_dir: std::env::temp_dir().join(format!("ghostv3-fuzz-{pid}-repro")),
        counts: BTreeMap::new(),
        open: None,
        slowest: Vec::new(),
    };

    let t0 = Instant::now();
    let state = make_source("weights: state (save_state)", Kind::State, &dir);
    let ckpt = make_source(
        "weights: checkpoint (write_tensors)",
        Kind::Checkpoint,
        &dir,
    );
    let setup = t0.elapsed();
    // The unmodified files load back exactly (the fuzz's reference).
    for src in [&state, &ckpt] {
        std::fs::write(&src.path, &src.bytes).unwrap();
        match src.kind {
            Kind::State => {
                let mut st = src.fresh.clone();
                io::load_state(&mut st, &src.path).unwrap();
                assert!(
                    same_state(&st, &src.orig),
                    "{}: round trip differs",
                    src.group
                );
            }
            Kind::Checkpoint => assert!(resume_like(src).unwrap(), "checkpoint round trip differs"),
        }
        models::detect_options(&src.path).unwrap();
    }

    // Time split and minimum inputs of each kind (a 2-core machine does several times these).
    let budget = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let at = |frac: f64| start + budget.mul_f64(frac);
    let quiet = QuietPanics::install();
    let mut phases = Vec::new();
    let mut phase = |name: &str, t: Instant| phases.push((name.to_string(), t.elapsed()));
    let t = Instant::now();
    fuzz_weights(&mut f, &state, MIN_STATE, 50_000, at(0.40));
    f.finish();
    phase(state.group, t);
    let t = Instant::now();
    fuzz_weights(&mut f, &ckpt, MIN_CKPT, 50_000, at(0.60));
    f.finish();
    phase(ckpt.group, t);
    let t = Instant::now();
    fuzz_toml(&mut f, &dir, MIN_RECIPE, 200_000, at(0.75));
    f.finish();
    phase("recipe", t);
    let t = Instant::now();
    fuzz_images(&mut f, &dir, MIN_IMAGE, 200_000, at(1.0));
    f.finish();
    phase("image", t);
    drop(quiet);
    let elapsed = start.elapsed();
    let _ = std::fs::remove_dir_all(&dir);

    // ---- report
    let total: usize = f.counts.values().sum();
    println!(
        "\n## Loader fuzz: seed {seed:#x}, {total} inputs in {:.1} s (budget {secs} s; setup {:.1} s)",
        elapsed.as_secs_f64(),
        setup.as_secs_f64()
    );
    for (g, d) in &phases {
        let n = f.counts.get(g.as_str()).copied().unwrap_or(0);
        println!(
            "- {g}: {n} inputs in {:.1} s ({:.0} / s)",
            d.as_secs_f64(),
            n as f64 / d.as_secs_f64().max(1e-9)
        );
    }
    for src in [&state, &ckpt] {
        println!(
            "- {}: {} bytes, {} tensors, checksums in metadata: {}",
            src.group,
            src.bytes.len(),
            src.ranges.len(),
            if src.checksummed() {
                format!("yes ({})", src.checksum_keys.join(", "))
            } else {
                "no".into()
            }
        );
    }
    let wflags = [
        "read Ok≠",
        "load Ok≠",
        "silent (checksummed)",
        "silent (no checksum)",
        "unnamed err",
        "suspect",
    ];
    f.table(
        "weights: state file (save_state), calls: read_tensors, load_state into a fresh model, detect_options",
        state.group,
        &["write_tensors", "read_tensors", "load_state", "detect_options"],
        &wflags,
    );
    f.table(
        "weights: checkpoint (model + optim.* + ema.*), calls: read_tensors, resume (load_state_from + Optimizer/Ema::load_state), detect_options",
        ckpt.group,
        &["write_tensors", "read_tensors", "resume", "detect_options"],
        &wflags,
    );
    f.table(
        "TOML recipes (configs/*.toml), calls: from_toml (+ --set), load(file), use (transforms, optimizer, schedule), round trip",
        "recipe",
        &["from_toml", "load(file)", "use", "round trip"],
        &["suspect"],
    );
    f.table(
        "images (PNG/JPEG made in-process), calls: ImageFolder::load (decode), eval+train transforms",
        "image",
        &["ImageFolder::load", "transforms"],
        &[],
    );
    println!("\n`a / b / c` = ok / clean error / panic. `read Ok≠` / `load Ok≠`: Ok with values other than the file we wrote. `silent`: a data-region bit flip that loaded Ok with other values.");

    println!("\n### slowest inputs\n");
    for (d, what) in &f.slowest {
        println!("- {:.0} ms: {}", d.as_secs_f64() * 1e3, short(what, 200));
    }

    // Panics, grouped by call and location.
    let mut by_loc: BTreeMap<(String, String), Vec<&Finding>> = BTreeMap::new();
    for p in &f.panics {
        let loc = p.detail.rsplit(" at ").next().unwrap_or("").to_string();
        by_loc.entry((p.call.to_string(), loc)).or_default().push(p);
    }
    println!(
        "\n### panics: {} in {} distinct places\n",
        f.panics.len(),
        by_loc.len()
    );
    for ((call, loc), v) in &by_loc {
        let p = v[0];
        println!(
            "- **{call}** at `{loc}`: {} input(s), mutations {:?}\n  - first: {} / {} iter {}: {}\n  - message: {}\n  - input kept at: {}",
            v.len(),
            v.iter().map(|p| p.mutation.as_str()).collect::<std::collections::BTreeSet<_>>(),
            p.group,
            p.mutation,
            p.iter,
            short(&p.input, 200),
            short(&p.detail, 300),
            p.repro.as_ref().map_or("-".into(), |r| r.display().to_string()),
        );
    }
    let checked_silent: Vec<&Finding> = f
        .silent
        .iter()
        .filter(|s| !s.detail.contains("no checksums"))
        .collect();
    let unchecked = f.silent.len() - checked_silent.len();
    println!(
        "\n### silent corruptions of data flips: {} in checksummed files, {} in files without checksums\n",
        checked_silent.len(),
        unchecked
    );
    let mut shown = BTreeMap::<&str, usize>::new();
    for s in &f.silent {
        let n = shown.entry(s.group).or_default();
        *n += 1;
        if *n <= 5 {
            println!(
                "- {} iter {} [{}]: {}: {}",
                s.group,
                s.iter,
                s.call,
                short(&s.input, 160),
                s.detail
            );
        }
    }
    let mut sus: BTreeMap<(&str, &str, String), Vec<&Finding>> = BTreeMap::new();
    for s in &f.suspects {
        sus.entry((s.group, s.call, short(&s.detail, 90)))
            .or_default()
            .push(s);
    }
    println!(
        "\n### suspect outcomes (not asserted): {}\n",
        f.suspects.len()
    );
    for ((g, call, d), v) in &sus {
        println!("- {g} [{call}] x{}: {d}", v.len());
        for s in v.iter().take(3) {
            println!(
                "  - iter {} {}: {}",
                s.iter,
                s.mutation,
                short(&s.input, 160)
            );
        }
    }

    // ---- asserts
    for src in [&state, &ckpt] {
        assert!(
            src.checksummed(),
            "{}: the file the crate wrote carries no per-tensor checksums in its metadata",
            src.group
        );
    }
    let mins = [
        (state.group, MIN_STATE),
        (ckpt.group, MIN_CKPT),
        ("recipe", MIN_RECIPE),
        ("image", MIN_IMAGE),
    ];
    for (g, min) in mins {
        let n = f.counts.get(g).copied().unwrap_or(0);
        assert!(n >= min, "{g}: only {n} inputs (minimum {min})");
    }
    let min_total = MIN_STATE + MIN_CKPT + MIN_RECIPE + MIN_IMAGE;
    assert!(
        total >= min_total,
        "only {total} inputs (minimum {min_total})"
    );
    if let Some(p) = f.panics.first() {
        panic!(
            "{} panic(s) in {} places; first: {} / {} (iter {}) in {}: {}\ninput: {}\nkept at: {}",
            f.panics.len(),
            by_loc.len(),
            p.group,
            p.mutation,
            p.iter,
            p.call,
            p.detail,
            p.input,
            p.repro
                .as_ref()
                .map_or("-".into(), |r| r.display().to_string())
        );
    }
    if let Some(s) = checked_silent.first() {
        panic!(
            "{} silent corruption(s) / unnamed errors of data flips in checksummed files; first: {} iter {}: {}: {}",
            checked_silent.len(),
            s.group,
            s.iter,
            s.input,
            s.detail
        );
    }
}
