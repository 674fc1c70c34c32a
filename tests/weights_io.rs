//! Weights I/O: timm names both ways, the official checkpoint spelling, and bad files that must
//! fail with an error naming the tensor while leaving the model untouched.

mod common;

use ghostv3::io::weights::state_tensors;
use ghostv3::io::{load_state, read_tensors, save_state, write_tensors, TensorData, CHECKSUMS_KEY};
use ghostv3::models::{self, Model, ModelOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ghostv3-io-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn model(seed: u64) -> Model {
    models::create(
        "ghostnetv3_050",
        &ModelOptions {
            num_classes: 10,
            seed,
            ..Default::default()
        },
    )
    .unwrap()
}

fn snapshot(m: &Model) -> (Vec<f32>, Vec<f32>, Vec<(String, i64)>) {
    (
        m.state().params.flat().to_vec(),
        m.state().buffers.flat().to_vec(),
        m.state().counters.clone(),
    )
}

/// Writes `tensors` after `edit`, tries to load into a fresh model; returns the error text and
/// checks that nothing was loaded.
fn load_error(tag: &str, edit: impl FnOnce(&mut BTreeMap<String, TensorData>)) -> String {
    let src = model(1);
    let mut t = state_tensors(src.state());
    edit(&mut t);
    let path = tmpdir(tag).join("w.safetensors");
    write_tensors(&path, &t, None).unwrap();
    let mut dst = model(2);
    let before = snapshot(&dst);
    let err = load_state(dst.state_mut(), &path).expect_err("load must fail");
    assert!(before == snapshot(&dst), "a failed load changed the model");
    format!("{err:#}")
}

#[test]
fn save_then_load_round_trips_exactly() {
    let mut a = model(1);
    a.state_mut().counters[0].1 = 42;
    let path = tmpdir("rt").join("w.safetensors");
    save_state(a.state(), &path, HashMap::new()).unwrap();
    let mut b = model(2);
    assert!(snapshot(&a) != snapshot(&b));
    load_state(b.state_mut(), &path).unwrap();
    assert!(snapshot(&a) == snapshot(&b));
    // No temp file is left beside the target.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn missing_tensor_is_named_and_nothing_is_loaded() {
    let e = load_error("missing", |t| {
        t.remove("blocks.3.0.ghost1.cheap_rpr_conv.1.conv.weight");
    });
    assert!(
        e.contains("missing tensor blocks.3.0.ghost1.cheap_rpr_conv.1.conv.weight"),
        "{e}"
    );
    assert!(
        e.contains("[20, 1, 3, 3]") || e.contains("[18, 1, 3, 3]"),
        "{e}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let e = load_error("unexpected", |t| {
        t.insert(
            "blocks.3.0.extra.weight".into(),
            TensorData::F32(vec![2], vec![1.0, 2.0]),
        );
    });
    assert!(
        e.contains("unexpected tensor blocks.3.0.extra.weight"),
        "{e}"
    );
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let e = load_error("shape", |t| {
        t.insert(
            "classifier.weight".into(),
            TensorData::F32(vec![1000, 1280], vec![0.0; 1_280_000]),
        );
    });
    assert!(e.contains("classifier.weight"), "{e}");
    assert!(
        e.contains("[1000, 1280]") && e.contains("[10, 1280]"),
        "{e}"
    );
}

#[test]
fn nan_weights_are_rejected() {
    let e = load_error("nan", |t| {
        if let Some(TensorData::F32(_, v)) = t.get_mut("bn1.weight") {
            v[0] = f32::NAN;
        }
    });
    assert!(e.contains("bn1.weight") && e.contains("NaN"), "{e}");
}

#[test]
fn not_a_safetensors_file_or_missing_file_is_a_clear_error() {
    let dir = tmpdir("bad");
    let p = dir.join("junk.safetensors");
    std::fs::write(&p, b"this is not a safetensors file").unwrap();
    let mut m = model(0);
    let e = format!("{:#}", load_state(m.state_mut(), &p).unwrap_err());
    assert!(e.contains("not a valid safetensors"), "{e}");
    let e = format!(
        "{:#}",
        load_state(m.state_mut(), &dir.join("nope.safetensors")).unwrap_err()
    );
    assert!(e.contains("nope.safetensors"), "{e}");
}

/// The official GhostNetV3 release spells branch BNs `.bn.`, carries thop's `total_ops` and
/// `total_params`, and may come from DDP (`module.`) in float64: all of it loads.
#[test]
fn official_checkpoint_spelling_loads() {
    let src = model(3);
    let mut raw: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = Vec::new();
    for (k, t) in state_tensors(src.state()) {
        let official = k.replace(".bn1.", ".bn.");
        let official = if official.contains(".ghost") || official.contains(".dw_rpr_") {
            official
        } else {
            k.clone()
        };
        match t {
            TensorData::F32(s, v) => {
                let v64: Vec<f64> = v.iter().map(|&x| x as f64).collect();
                raw.push((
                    format!("module.{official}"),
                    s,
                    bytemuck::cast_slice(&v64).to_vec(),
                    Dtype::F64,
                ));
            }
            TensorData::I64(s, v) => raw.push((
                format!("module.{official}"),
                s,
                bytemuck::cast_slice(&v).to_vec(),
                Dtype::I64,
            )),
        }
    }
    raw.push((
        "module.total_ops".into(),
        vec![1],
        bytemuck::cast_slice(&[1.0f64]).to_vec(),
        Dtype::F64,
    ));
    raw.push((
        "module.blocks.0.0.total_params".into(),
        vec![1],
        bytemuck::cast_slice(&[1.0f64]).to_vec(),
        Dtype::F64,
    ));
    assert!(raw
        .iter()
        .any(|(k, ..)| k.contains("primary_rpr_conv.0.bn.weight")));
    let views: Vec<(String, TensorView)> = raw
        .iter()
        .map(|(k, s, b, d)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    let path = tmpdir("official").join("official.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let mut dst = model(4);
    load_state(dst.state_mut(), &path).unwrap();
    assert!(snapshot(&src) == snapshot(&dst));
}

/// Our train-form names and shapes are exactly timm's (the fixture's train.safetensors).
#[test]
fn train_form_names_are_timms() {
    let Some(dir) = common::fixture("ghostnetv3_050-112") else {
        return;
    };
    let theirs = read_tensors(&dir.join("train.safetensors")).unwrap();
    let ours = state_tensors(model(0).state());
    let ours: BTreeMap<_, _> = ours
        .iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .collect();
    let a: Vec<(&String, &[usize])> = theirs.iter().map(|(k, t)| (k, t.shape())).collect();
    let b: Vec<(&String, &[usize])> = ours.iter().map(|(k, t)| (*k, t.shape())).collect();
    assert_eq!(a, b);
    println!(
        "{} train-form tensors, names and shapes equal to timm's",
        a.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Integrity checksums and headers

/// A few small tensors of both dtypes, as in a checkpoint.
fn small_tensors() -> BTreeMap<String, TensorData> {
    let f = |n: usize, k: f32| (0..n).map(|i| (i as f32 * k).sin()).collect::<Vec<f32>>();
    BTreeMap::from([
        (
            "conv.weight".to_string(),
            TensorData::F32(vec![4, 2, 3, 3], f(72, 0.37)),
        ),
        ("bn.bias".to_string(), TensorData::F32(vec![4], f(4, 1.3))),
        (
            "bn.num_batches_tracked".to_string(),
            TensorData::I64(vec![], vec![7]),
        ),
    ])
}

/// A file's header (JSON) and data region.
fn split(bytes: &[u8]) -> (serde_json::Map<String, serde_json::Value>, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// A file from a header and data region (the header padded to 8 bytes, as the crate does).
fn join(header: &serde_json::Map<String, serde_json::Value>, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// Where tensor `name`'s bytes lie in the file.
fn byte_range(bytes: &[u8], name: &str) -> std::ops::Range<usize> {
    let (n, meta) = SafeTensors::read_metadata(bytes).unwrap();
    let (s, e) = meta.info(name).unwrap().data_offsets;
    8 + n + s..8 + n + e
}

#[test]
fn written_files_carry_checksums_and_stay_plain_safetensors() {
    let path = tmpdir("sums").join("w.safetensors");
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    save_state(model(1).state(), &path, meta).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    // Any safetensors reader takes it: the checksums are one plain string entry.
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    assert_eq!(meta["format"], "pt", "the caller's metadata is kept");
    let sums: BTreeMap<String, String> = serde_json::from_str(&meta[CHECKSUMS_KEY]).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    assert_eq!(sums.keys().cloned().collect::<Vec<_>>(), names);
    for (name, v) in st.tensors() {
        let want = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(v.data()));
        assert_eq!(sums[&name], want, "{name}: XXH3-64 of its stored bytes");
    }
    // write_tensors without metadata adds the entry too.
    let p2 = tmpdir("sums").join("t.safetensors");
    write_tensors(&p2, &small_tensors(), None).unwrap();
    let bytes = std::fs::read(&p2).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    assert!(header
        .metadata()
        .as_ref()
        .unwrap()
        .contains_key(CHECKSUMS_KEY));
    assert_eq!(read_tensors(&p2).unwrap(), small_tensors());
}

#[test]
fn a_flipped_bit_in_a_tensor_is_an_error_naming_it() {
    let path = tmpdir("flip").join("flipped.safetensors");
    save_state(model(1).state(), &path, HashMap::new()).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let r = byte_range(&bytes, "conv_stem.weight");
    // The lowest mantissa bit of one weight: a change no plausibility check could see.
    bytes[r.start + 40] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let mut dst = model(2);
    let before = snapshot(&dst);
    let e = format!("{:#}", load_state(dst.state_mut(), &path).unwrap_err());
    assert!(
        e.contains("tensor conv_stem.weight fails its checksum")
            && e.contains("corrupt")
            && e.contains("flipped.safetensors"),
        "{e}"
    );
    assert!(before == snapshot(&dst), "a refused file changed the model");
    // Flipped back, it loads.
    bytes[r.start + 40] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    load_state(dst.state_mut(), &path).unwrap();
    assert!(snapshot(&model(1)) == snapshot(&dst));
}

/// 100 files with 1 to 3 random bits flipped (in the data region for half of them, anywhere
/// for the others): none loads with changed tensors. A flip in the header either breaks it
/// (refused) or lands where it changes nothing read (e.g. padding turned into other blanks).
#[test]
fn random_bit_flips_never_load_changed_tensors() {
    let dir = tmpdir("flips");
    let clean = dir.join("clean.safetensors");
    let want = small_tensors();
    write_tensors(&clean, &want, None).unwrap();
    let bytes = std::fs::read(&clean).unwrap();
    let data_start = 8 + SafeTensors::read_metadata(&bytes).unwrap().0;
    let mut rng = StdRng::seed_from_u64(7);
    let (mut data_flips, mut refused, mut loaded) = (0, 0, 0);
    for i in 0..100 {
        let mut b = bytes.clone();
        let lo = if i % 2 == 0 { data_start } else { 0 };
        for _ in 0..rng.random_range(1..=3) {
            let at = rng.random_range(lo..b.len());
            b[at] ^= 1 << rng.random_range(0..8);
        }
        // (Flips of the same bit cancel, so compare rather than count.)
        let in_data = b[data_start..] != bytes[data_start..];
        if b == bytes {
            continue;
        }
        let path = dir.join(format!("f{i}.safetensors"));
        std::fs::write(&path, &b).unwrap();
        match read_tensors(&path) {
            Ok(t) => {
                assert!(!in_data, "file {i}: a flip in the data region loaded");
                assert_eq!(t, want, "file {i}: loaded with changed tensors");
                loaded += 1;
            }
            Err(_) => refused += 1,
        }
        data_flips += in_data as usize;
        std::fs::remove_file(&path).unwrap();
    }
    println!("{refused} refused ({data_flips} with data flips), {loaded} harmless header flips");
    assert!(
        data_flips >= 50,
        "the data region was hit {data_flips} times"
    );
}

#[test]
fn files_without_checksums_load_as_before() {
    // timm / PyTorch's safetensors: {"format": "pt"} metadata and no checksums.
    let src = model(3);
    let raw: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = state_tensors(src.state())
        .into_iter()
        .map(|(k, t)| match t {
            TensorData::F32(s, v) => (k, s, bytemuck::cast_slice(&v).to_vec(), Dtype::F32),
            TensorData::I64(s, v) => (k, s, bytemuck::cast_slice(&v).to_vec(), Dtype::I64),
        })
        .collect();
    let views: Vec<(String, TensorView)> = raw
        .iter()
        .map(|(k, s, b, d)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let path = tmpdir("timm").join("timm.safetensors");
    std::fs::write(&path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
    let mut dst = model(4);
    load_state(dst.state_mut(), &path).unwrap();
    assert!(snapshot(&src) == snapshot(&dst));
}

/// Writes `small_tensors()` with its checksums entry edited by `edit`; the error reading it.
fn checksums_error(
    tag: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> String {
    let path = tmpdir("entry").join(format!("{tag}.safetensors"));
    write_tensors(&path, &small_tensors(), None).unwrap();
    let (mut header, data) = split(&std::fs::read(&path).unwrap());
    let meta = header["__metadata__"].as_object_mut().unwrap();
    let mut sums: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(meta[CHECKSUMS_KEY].as_str().unwrap()).unwrap();
    edit(&mut sums);
    meta.insert(
        CHECKSUMS_KEY.into(),
        serde_json::to_string(&sums).unwrap().into(),
    );
    std::fs::write(&path, join(&header, &data)).unwrap();
    // Still a valid safetensors file: only our check refuses it.
    SafeTensors::deserialize(&std::fs::read(&path).unwrap()).unwrap();
    format!("{:#}", read_tensors(&path).unwrap_err())
}

#[test]
fn checksums_entry_must_cover_exactly_the_tensors() {
    let e = checksums_error("extra", |s| {
        s.insert("ghost.weight".into(), "0123456789abcdef".into());
    });
    assert!(
        e.contains("names tensor ghost.weight, which is not in the file")
            && e.contains("extra.safetensors"),
        "{e}"
    );
    let e = checksums_error("missing", |s| {
        s.remove("bn.bias");
    });
    assert!(e.contains("tensor bn.bias has no checksum"), "{e}");
    let e = checksums_error("wrong", |s| {
        s.insert("conv.weight".into(), "0000000000000000".into());
    });
    assert!(e.contains("tensor conv.weight fails its checksum"), "{e}");
    // A flipped bit in the entry's key must not turn the file into one without checksums.
    let path = tmpdir("entry").join("key.safetensors");
    write_tensors(&path, &small_tensors(), None).unwrap();
    let mut b = std::fs::read(&path).unwrap();
    let at = b
        .windows(CHECKSUMS_KEY.len())
        .position(|w| w == CHECKSUMS_KEY.as_bytes())
        .unwrap();
    b[at + 3] ^= 4;
    let r = byte_range(&b, "conv.weight");
    b[r.start] ^= 1;
    std::fs::write(&path, &b).unwrap();
    let e = format!("{:#}", read_tensors(&path).unwrap_err());
    assert!(
        e.contains("is a damaged ghostv3.checksums") && e.contains("corrupt"),
        "{e}"
    );
    // An entry that is not a JSON object of strings.
    let path = tmpdir("entry").join("junk.safetensors");
    let mut meta = HashMap::new();
    meta.insert(CHECKSUMS_KEY.to_string(), "not json".to_string());
    let t = small_tensors();
    let views: Vec<(String, TensorView)> = [("bn.bias", &t["bn.bias"])]
        .iter()
        .map(|(k, v)| {
            let TensorData::F32(s, d) = v else {
                unreachable!()
            };
            (
                k.to_string(),
                TensorView::new(Dtype::F32, s.clone(), bytemuck::cast_slice(d)).unwrap(),
            )
        })
        .collect();
    std::fs::write(&path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
    let e = format!("{:#}", read_tensors(&path).unwrap_err());
    assert!(
        e.contains(CHECKSUMS_KEY) && e.contains("junk.safetensors"),
        "{e}"
    );
}

/// A header whose shape, dtype or offsets do not fit: the safetensors crate's error does not
/// always say which tensor; ours does.
#[test]
fn bad_header_entries_name_the_tensor() {
    let path = tmpdir("header").join("h.safetensors");
    write_tensors(&path, &small_tensors(), None).unwrap();
    let (header, data) = split(&std::fs::read(&path).unwrap());
    let error = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut h = header.clone();
        edit(&mut h);
        std::fs::write(&path, join(&h, &data)).unwrap();
        format!("{:#}", read_tensors(&path).unwrap_err())
    };
    let e = error(&|h| h["bn.bias"]["shape"] = serde_json::json!([5]));
    assert!(
        e.contains("not a valid safetensors")
            && e.contains("tensor bn.bias: shape [5] of F32 needs 20 bytes")
            && e.contains("invalid shape, data type, or offset"),
        "{e}"
    );
    let e = error(&|h| h["conv.weight"]["dtype"] = serde_json::json!("F16"));
    assert!(
        e.contains("tensor conv.weight: shape [4, 2, 3, 3] of F16 needs 144 bytes"),
        "{e}"
    );
    let e = error(&|h| h["conv.weight"]["dtype"] = serde_json::json!("F33"));
    assert!(e.contains("tensor conv.weight: bad header entry"), "{e}");
    // Two tensors swapping sizes: each alone fits its offsets, together they overlap.
    let e = error(&|h| {
        let s = h["bn.bias"]["data_offsets"][0].as_u64().unwrap();
        h["bn.bias"]["data_offsets"] = serde_json::json!([s - 8, s + 8]);
    });
    assert!(
        e.contains("bn.bias") && e.contains("bn.num_batches_tracked") && e.contains("overlap"),
        "{e}"
    );
    let e = error(&|h| {
        let s = h["bn.bias"]["data_offsets"][0].as_u64().unwrap();
        h["bn.bias"]["data_offsets"] = serde_json::json!([s + 4000, s + 4016]);
    });
    assert!(
        e.contains("tensor bn.bias") && e.contains("run past"),
        "{e}"
    );
}

#[test]
fn two_spellings_of_one_tensor_are_refused() {
    let e = load_error("alias", |t| {
        let v = t["blocks.7.0.ghost1.short_conv.2.weight"].clone();
        t.insert("module.blocks.7.0.ghost1.short_conv.2.weight".into(), v);
    });
    let k = "blocks.7.0.ghost1.short_conv.2.weight";
    assert!(
        e.contains(&format!("tensors {k} and module.{k} are both {k}")),
        "{e}"
    );
}
