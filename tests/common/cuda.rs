//! Helpers of the CUDA tests (tests/cuda_*.rs): the shared GPU, random tensors, the GPU-vs-CPU
//! comparison, and the run of a whole test binary on the CPU emulator of libcuda/libcublas
//! (cuda/emu) when there is no GPU.
//!
//! Tolerance of `close`: max |gpu - cpu| <= tol * max(1, max |cpu|); both are f32 with different
//! summation orders (the GPU reduces statistics in f64).

use ghostv3::backend::cuda::{unavailable_reason, DBuf, Gpu};
use ghostv3::nn::{ParamLeaves, State};
use ghostv3::{Tape, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::{Mutex, MutexGuard, OnceLock};

pub const TOL: f64 = 2e-4;

/// One GPU for all tests, used by one test at a time.
pub fn gpu() -> Option<std::sync::MutexGuard<'static, Gpu>> {
    static G: OnceLock<Option<Mutex<Gpu>>> = OnceLock::new();
    let g = G.get_or_init(|| {
        if unavailable_reason().is_some() {
            return None;
        }
        // A GPU is present: failing to set it up (NVRTC, cuBLAS, a kernel) is a test failure.
        let gpu = Gpu::new(0).unwrap_or_else(|e| panic!("CUDA device present but unusable: {e:#}"));
        gpu.set_poison(true);
        Some(Mutex::new(gpu))
    });
    match g {
        Some(m) => Some(m.lock().unwrap_or_else(|e| e.into_inner())),
        None => {
            println!(
                "skipped: no CUDA device ({})",
                unavailable_reason().unwrap_or_default()
            );
            None
        }
    }
}

/// For the tests of ops dispatched through the tape: the test GPU as `gpu()` gives it, and the
/// process-wide GPU those ops run on made to poison its pools like the test GPU.
pub fn dispatch_gpu() -> Option<MutexGuard<'static, Gpu>> {
    let g = gpu()?;
    ghostv3::backend::cuda::global().unwrap().set_poison(true);
    Some(g)
}

/// `x` as a tape leaf that requires a gradient: a device copy when `cuda`.
pub fn leaf_on(tape: &mut Tape, x: &Tensor, cuda: bool) -> Var {
    let x = if cuda {
        x.to_cuda().unwrap()
    } else {
        x.clone()
    };
    tape.leaf(x, true)
}

/// The end of a forward + backward on one side (the device when `cuda`): checks that the output
/// `y` is on that side, backpropagates `gy` and returns, on the host, the output, the gradient
/// of the input leaf `xv` and the flat parameter gradient of `state`'s `leaves`.
pub fn backward_to_host(
    what: &str,
    tape: &mut Tape,
    (y, xv): (Var, Var),
    gy: &Tensor,
    (leaves, state): (&ParamLeaves, &State),
    cuda: bool,
) -> (Tensor, Tensor, Vec<f32>) {
    assert_eq!(
        tape.value(y).is_cuda(),
        cuda,
        "{what}: forward ran on the wrong side"
    );
    let yt = tape.value(y).to_host();
    let grads = tape.backward_with(y, gy.clone());
    let dx = grads.get(xv).unwrap().to_host();
    let flat = leaves.flat_grads(state, &grads).to_host().into_vec();
    (yt, dx, flat)
}

pub fn rand_vec(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

pub fn rand_t(rng: &mut StdRng, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    Tensor::new(shape, rand_vec(rng, shape.iter().product(), lo, hi))
}

pub fn up(g: &Gpu, t: &Tensor) -> DBuf {
    g.upload(t.data()).unwrap()
}

pub fn down(g: &Gpu, b: &DBuf) -> Vec<f32> {
    g.download(b).unwrap()
}

/// Asserts the GPU values match the CPU ones; prints the error.
pub fn close(case: &str, gpu: &[f32], cpu: &[f32], tol: f64) {
    assert_eq!(gpu.len(), cpu.len(), "{case}: length");
    let scale = cpu.iter().fold(1.0f64, |m, &v| m.max((v as f64).abs()));
    let mut err = 0.0f64;
    for (i, (&a, &b)) in gpu.iter().zip(cpu).enumerate() {
        let e = (a as f64 - b as f64).abs();
        assert!(
            e.is_finite(),
            "{case}: element {i} is {a} (cpu {b}): unwritten or non-finite"
        );
        err = err.max(e);
    }
    println!("{case}: max err {err:.2e} (scale {scale:.2e})");
    assert!(
        err <= tol * scale,
        "{case}: max err {err:e} > {tol:e} x {scale:e}"
    );
}

/// CPU forward + backward of a one-input op with a random output gradient.
pub fn cpu_unary(
    x: &Tensor,
    gy_seed: u64,
    f: impl Fn(&mut Tape, Var) -> Var,
) -> (Tensor, Tensor, Tensor) {
    let mut tape = Tape::new();
    let xv = tape.leaf(x.clone(), true);
    let y = f(&mut tape, xv);
    let yt = tape.value(y).clone();
    let mut rng = StdRng::seed_from_u64(gy_seed);
    let gy = rand_t(&mut rng, yt.shape(), -1.0, 1.0);
    let grads = tape.backward_with(y, gy.clone());
    (yt, gy, grads.get(xv).unwrap().clone())
}

/// A model's state with random BN affine parameters and running statistics (the builder's are
/// 1, 0, 0, 1), so that every BN term matters.
pub fn randomize_bns(state: &mut ghostv3::nn::State, rng: &mut StdRng) {
    // The 1-D parameters: weights U[0.5, 1.5), biases U[-0.5, 0.5).
    randomize_entries(
        &mut state.params,
        rng,
        |e| e.shape.len() == 1,
        (".weight", 1.5),
    );
    // Every buffer: running_var U[0.5, 2.0), running_mean U[-0.5, 0.5).
    randomize_entries(&mut state.buffers, rng, |_| true, ("running_var", 2.0));
}

/// Redraws the entries of `store` that `pick` selects, in order: those named `*suffix` from
/// U[0.5, hi), the others from U[-0.5, 0.5).
fn randomize_entries(
    store: &mut ghostv3::nn::FlatStore,
    rng: &mut StdRng,
    pick: fn(&ghostv3::nn::params::Entry) -> bool,
    (suffix, hi): (&str, f32),
) {
    let entries = store.entries().to_vec();
    for e in entries.iter().filter(|e| pick(e)) {
        let id = store.find(&e.name).unwrap();
        let (lo, hi) = if e.name.ends_with(suffix) {
            (0.5, hi)
        } else {
            (-0.5, 0.5)
        };
        for v in store.slice_mut(id) {
            *v = rng.random_range(lo..hi);
        }
    }
}

/// Without a GPU: runs every other test of the calling test binary, in a child process, on the
/// CPU emulator of libcuda/libcublas (cuda/emu: the same kernel sources compiled by g++, CUDA
/// threads as fibers) with the real NVRTC compiling every kernel, so the tests above really
/// run. `slow` names tests left out unless GHOSTV3_EMU_FULL=1. Needs g++ and the CUDA 13 NVRTC
/// (`.ci/run` installs it; GHOSTV3_REQUIRE_NVRTC=1 there makes a missing one a failure). The
/// calling test must be named `cpu_emulator_runs_every_gpu_test`.
pub fn run_on_emulator(slow: &[&str]) {
    if std::env::var_os("GHOSTV3_EMU_CHILD").is_some() {
        return;
    }
    if unavailable_reason().is_none() {
        println!("skipped: a real CUDA device is present (the tests above ran on it)");
        return;
    }
    let required = std::env::var("GHOSTV3_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    let nvrtc = std::env::var_os("GHOSTV3_NVRTC13")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var("LD_LIBRARY_PATH")
                .unwrap_or_default()
                .split(':')
                .map(|d| std::path::Path::new(d).join("libnvrtc.so.13"))
                .find(|p| p.exists())
        });
    let Some(nvrtc) = nvrtc else {
        assert!(!required, "NVRTC 13 not found and GHOSTV3_REQUIRE_NVRTC=1");
        println!("skipped: NVRTC not found (set GHOSTV3_NVRTC13 or put libnvrtc.so.13 on LD_LIBRARY_PATH)");
        return;
    };
    let has_gxx = std::process::Command::new("g++")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_gxx {
        println!("skipped: g++ not found (needed to build the CUDA emulator)");
        return;
    }
    // Slow tests (minutes emulated) run only with GHOSTV3_EMU_FULL=1, and are named when left out.
    let skips: &[&str] = if std::env::var_os("GHOSTV3_EMU_FULL").is_some() {
        &[]
    } else {
        slow
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut build = std::process::Command::new("bash");
    super::run_ok(
        build.arg(root.join("cuda/emu/build.sh")),
        "building the CUDA emulator",
    );
    let emu = root.join("target/cuda-emu");
    let nvrtc_dir = nvrtc.parent().unwrap();
    let t = std::time::Instant::now();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--test-threads=1",
            "--skip",
            "cpu_emulator_runs_every_gpu_test",
        ])
        .args(skips.iter().flat_map(|t| ["--skip", t]))
        .env("GHOSTV3_EMU_CHILD", "1")
        .env(
            "LD_LIBRARY_PATH",
            format!("{}:{}", emu.display(), nvrtc_dir.display()),
        )
        .env("GHOSTV3_NVRTC", &nvrtc)
        .env("GHOSTV3_CACHE_DIR", emu.join("cache"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "tests on the CUDA emulator failed (output above)"
    );
    assert!(
        !text.contains("skipped: no CUDA device"),
        "the emulator was not picked up: the tests skipped"
    );
    println!(
        "all CUDA tests passed on the CPU emulator in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    for t in skips {
        println!("not run on the emulator: {t} (minutes emulated; GHOSTV3_EMU_FULL=1 runs it)");
    }
}
