//! The architecture, checked: layers import downward only, no import circle anywhere, and the
//! device is decided in one place.
//!
//! Reads `src/**/*.rs` and collects every `crate::<module>` / `super::<file>` path of each
//! file (comments stripped). Edges between top-level modules and between the files of one
//! module must form no cycle; `backend` (the bottom) names no module above it; outside
//! `src/backend/` only the dispatcher (`src/tensor/storage.rs`) asks where a tensor lives.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source without `//` comments (doc comments mention other modules freely).
fn code(src: &str) -> String {
    src.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// (module path relative to src without extension, e.g. "backend/cuda/conv", source)
fn sources() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(&root).unwrap().with_extension("");
            let rel = rel.to_string_lossy().replace('\\', "/");
            let rel = rel.strip_suffix("/mod").unwrap_or(&rel).to_string();
            (rel, code(&std::fs::read_to_string(&p).unwrap()))
        })
        .collect()
}

/// Identifiers that follow `prefix` in `src` (e.g. the `x` of every `crate::x`), including
/// the names inside `prefix{a, b::c}` groups.
fn names_after(src: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in src.match_indices(prefix) {
        let before = src[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &src[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let n = ident(part.trim());
                if !n.is_empty() {
                    out.insert(n);
                }
            }
        } else {
            let n = ident(rest);
            if !n.is_empty() {
                out.insert(n);
            }
        }
    }
    out
}

fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap();
                    let mut c = stack[at..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(n, edges, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

const TOP: [&str; 15] = [
    "autograd", "backend", "data", "dist", "infer", "io", "models", "nn", "ops", "optim", "plot",
    "reparam", "study", "tensor", "train",
];

#[test]
fn charts_know_nothing_of_runs_and_nothing_imports_the_study() {
    let mut bad = Vec::new();
    for (rel, src) in sources() {
        let top = rel.split('/').next().unwrap().trim_end_matches(".rs");
        for m in names_after(&src, "crate::") {
            let upward = match top {
                "plot" => !matches!(m.as_str(), "io"),
                "study" => false,
                _ => m == "study",
            };
            if upward {
                bad.push(format!("{rel}: crate::{m}"));
            }
        }
    }
    assert!(bad.is_empty(), "imports against the layering: {bad:#?}");
}

#[test]
fn top_level_modules_form_no_cycle() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, src) in sources() {
        let top = rel.split('/').next().unwrap().to_string();
        if !TOP.contains(&top.as_str()) {
            continue; // lib.rs, main.rs
        }
        let e = edges.entry(top.clone()).or_default();
        for m in names_after(&src, "crate::") {
            if m != top && TOP.contains(&m.as_str()) {
                e.insert(m);
            }
        }
    }
    for (k, v) in &edges {
        println!("{k} -> {v:?}");
    }
    assert_eq!(find_cycle(&edges), None, "an import circle between modules");
}

#[test]
fn files_of_each_module_form_no_cycle() {
    // Edges `super::x` and `crate::<top>::x` between the files of one directory.
    let srcs = sources();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, src) in &srcs {
        let parts: Vec<&str> = rel.split('/').collect();
        if parts.len() < 2 {
            continue;
        }
        let dir = parts[..parts.len() - 1].join("/");
        let e = edges.entry(rel.clone()).or_default();
        let siblings = |n: &String| format!("{dir}/{n}");
        for n in names_after(src, "super::") {
            let target = siblings(&n);
            if srcs.iter().any(|(r, _)| *r == target) && target != *rel {
                e.insert(target);
            }
        }
        let abs = format!("crate::{}::", dir.replace('/', "::"));
        for n in names_after(src, &abs) {
            let target = siblings(&n);
            if srcs.iter().any(|(r, _)| *r == target) && target != *rel {
                e.insert(target);
            }
        }
    }
    assert_eq!(find_cycle(&edges), None, "an import circle between files");
}

#[test]
fn backend_imports_nothing_above_it() {
    let above = [
        "tensor", "autograd", "ops", "nn", "optim", "models", "train", "data", "io", "infer",
        "reparam",
    ];
    let mut bad = Vec::new();
    for (rel, src) in sources() {
        if !rel.starts_with("backend") {
            continue;
        }
        for m in names_after(&src, "crate::") {
            if above.contains(&m.as_str()) {
                bad.push(format!("{rel}: crate::{m}"));
            }
        }
        if src.contains("crate::Tensor") || src.contains("crate::Tape") {
            bad.push(format!("{rel}: a crate-root re-export of the tensor layer"));
        }
    }
    assert!(bad.is_empty(), "backend imports upward: {bad:#?}");
}

#[test]
fn only_the_dispatcher_asks_where_a_tensor_lives() {
    let checks = [
        "is_cuda()",
        "cuda_parts(",
        "Device::Cuda",
        "Storage::Cuda",
        "Storage::Host",
        "backend::cuda",
        "any_cuda",
    ];
    // What may: the backends themselves, the dispatcher, and the CLI/recipe code that turns a
    // user's `--device` choice into placement (main.rs picks the fast CPU path by it).
    // tensor/collective: the data-parallel collectives, NCCL on device tensors.
    let allowed = ["tensor/storage", "tensor", "tensor/collective", "main"];
    let mut bad = Vec::new();
    for (rel, src) in sources() {
        if rel.starts_with("backend") || allowed.contains(&rel.as_str()) {
            continue;
        }
        for c in checks {
            if src.contains(c) {
                bad.push(format!("{rel}: {c}"));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "device checks outside the dispatcher: {bad:#?}"
    );
}
