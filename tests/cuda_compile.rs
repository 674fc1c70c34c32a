//! Every CUDA kernel module compiles with NVRTC: for sm_80 and sm_90 with the CUDA 13 NVRTC and
//! for sm_70 (Volta, which CUDA 13 dropped) with the CUDA 12 NVRTC, each library loaded from its
//! own path. Needs no GPU. `.ci/run` installs both NVRTC wheels from PyPI and sets
//! GHOSTV3_REQUIRE_NVRTC=1, so there a missing NVRTC fails; elsewhere it prints `skipped: ...`.
//!
//! Libraries: `$GHOSTV3_NVRTC13` / `$GHOSTV3_NVRTC12` (paths), else libnvrtc.so.13 / .so.12 in a
//! folder of `$LD_LIBRARY_PATH`.

use ghostv3::backend::cuda::nvrtc::{pick_target, Nvrtc, Target};
use ghostv3::backend::cuda::sources;
use std::path::PathBuf;

fn find_lib(env: &str, file: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let dirs = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    dirs.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d).join(file))
        .find(|p| p.exists())
}

fn required() -> bool {
    std::env::var("GHOSTV3_REQUIRE_NVRTC").is_ok_and(|v| v == "1")
}

/// The kernel names a module defines (`extern "C" __global__ void NAME(`).
fn kernels_of(src: &str) -> Vec<String> {
    src.split("__global__ void ")
        .skip(1)
        .map(|s| s.split('(').next().unwrap().trim().to_string())
        .collect()
}

/// The (module, kernel) pairs the launchers use: `launch("module", "kernel", ...)`, and the
/// elementwise helpers `unary("kernel", ..)` / `binary("kernel", ..)`.
fn launched() -> Vec<(String, String)> {
    let text = [
        include_str!("../src/backend/cuda/elementwise.rs"),
        include_str!("../src/backend/cuda/batch_norm.rs"),
        include_str!("../src/backend/cuda/conv.rs"),
        include_str!("../src/backend/cuda/pool.rs"),
        include_str!("../src/backend/cuda/channel.rs"),
        include_str!("../src/backend/cuda/loss.rs"),
        include_str!("../src/backend/cuda/rep_conv.rs"),
        include_str!("../src/backend/cuda/rep_conv_1x1.rs"),
        include_str!("../src/backend/cuda/dfc.rs"),
        include_str!("../src/backend/cuda/optim.rs"),
    ]
    .concat();
    let mut out = Vec::new();
    for part in text.split("launch(").skip(1) {
        let lits: Vec<&str> = part.split('"').collect();
        // `launch(` then "module", then "kernel": only whitespace and a comma between.
        if lits.len() > 3 && lits[0].trim().is_empty() && lits[2].trim() == "," {
            out.push((lits[1].to_string(), lits[3].to_string()));
        }
    }
    for helper in ["self.unary(", "self.binary("] {
        for part in text.split(helper).skip(1) {
            let lits: Vec<&str> = part.split('"').collect();
            if lits.len() > 1 && lits[0].trim().is_empty() {
                out.push(("elementwise".to_string(), lits[1].to_string()));
            }
        }
    }
    out
}

#[test]
fn every_launched_kernel_exists() {
    let calls = launched();
    assert!(calls.len() > 40, "parsed only {} launches", calls.len());
    for (m, k) in &calls {
        let src = sources::MODULES
            .iter()
            .find(|(name, _)| name == m)
            .unwrap_or_else(|| panic!("launch of {k} names unknown module {m}"))
            .1;
        assert!(
            kernels_of(src).contains(k),
            "launch of {m}::{k}: no such kernel in cuda/{m}.cu"
        );
    }
}

#[test]
fn every_kernel_signature_parses() {
    for (module, src) in sources::MODULES {
        for k in kernels_of(src) {
            let p = sources::kernel_params(src, &k);
            assert!(
                p.as_ref().is_some_and(|p| !p.is_empty()),
                "{module}::{k}: parameters {p:?}"
            );
        }
    }
}

#[test]
fn target_follows_the_installed_nvrtc() {
    // CUDA 13's list has no Volta; CUDA 12's does.
    let cuda13 = [75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121];
    assert_eq!(pick_target(90, &cuda13), Some(Target::Cubin(90)));
    assert_eq!(pick_target(70, &cuda13), None);
    assert_eq!(
        pick_target(70, &[50, 52, 60, 70, 75, 80, 90]),
        Some(Target::Cubin(70))
    );
}

#[test]
fn kernels_compile_with_nvrtc() {
    let cases: [(&str, &str, &str, i32, &[u32]); 2] = [
        (
            "CUDA 13",
            "GHOSTV3_NVRTC13",
            "libnvrtc.so.13",
            13,
            &[80, 90],
        ),
        ("CUDA 12", "GHOSTV3_NVRTC12", "libnvrtc.so.12", 12, &[70]),
    ];
    let mut failures = Vec::new();
    for (what, env, file, major, archs) in cases {
        let Some(path) = find_lib(env, file) else {
            let msg =
                format!("NVRTC not found ({what}: set {env} or put {file} on LD_LIBRARY_PATH)");
            assert!(!required(), "{msg}, and GHOSTV3_REQUIRE_NVRTC=1");
            println!("skipped: {msg}");
            continue;
        };
        let nv = Nvrtc::open(&path).unwrap_or_else(|e| panic!("{e:#}"));
        let (ma, mi) = nv.version();
        assert_eq!(
            ma,
            major,
            "{} is NVRTC {ma}.{mi}, expected {what}",
            path.display()
        );
        let supported = nv.supported_archs().unwrap();
        for &arch in archs {
            assert!(
                supported.contains(&(arch as i32)),
                "NVRTC {ma}.{mi} does not list sm_{arch}: {supported:?}"
            );
            // What the engine would pick on such a device with this NVRTC.
            assert_eq!(pick_target(arch, &supported), Some(Target::Cubin(arch)));
            let target = Target::Cubin(arch);
            for (module, _) in sources::MODULES {
                let src = sources::program(module).unwrap();
                let t = std::time::Instant::now();
                match nv.compile(module, &src, target, &sources::options(target)) {
                    Ok(cubin) => {
                        assert_eq!(
                            &cubin[..4],
                            b"\x7fELF",
                            "{module} sm_{arch}: not an ELF cubin"
                        );
                        for k in kernels_of(&src) {
                            assert!(
                                cubin.windows(k.len()).any(|w| w == k.as_bytes()),
                                "{module} sm_{arch}: kernel {k} missing from the cubin"
                            );
                        }
                        println!(
                            "NVRTC {ma}.{mi} sm_{arch} {module}: {} bytes, {:.2} s",
                            cubin.len(),
                            t.elapsed().as_secs_f64()
                        );
                    }
                    Err(e) => failures.push(format!("{e:#}")),
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "kernels that do not compile:\n{}",
        failures.join("\n")
    );
}
