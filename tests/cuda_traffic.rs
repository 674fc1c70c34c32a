//! The traffic count of the CUDA backend (`backend::trace`, `train::traffic`): launches charged
//! with the bytes their declarations say they read and write, GEMM FLOPs, a whole step's
//! counts affine in the batch, and the emulator's count-only mode giving the counts of a run
//! that executes. Without a GPU each test prints `skipped: no CUDA device (...)`, and the last
//! test runs them all on the CPU emulator.

mod common;

use common::cuda::*;
use ghostv3::backend::trace::{self, Phase};
use ghostv3::models::{self, ModelOptions};
use ghostv3::tensor::Device;
use ghostv3::train::{bench, traffic};
use rand::rngs::StdRng;
use rand::SeedableRng;

#[test]
fn launches_are_charged_with_their_buffers() {
    let Some(g) = gpu() else { return };
    let n = 1000;
    let mut rng = StdRng::seed_from_u64(1);
    let a = g.upload(&rand_vec(&mut rng, n, -1.0, 1.0)).unwrap();
    let b = g.upload(&rand_vec(&mut rng, n, -1.0, 1.0)).unwrap();
    let mut c = g.upload(&rand_vec(&mut rng, n, -1.0, 1.0)).unwrap();
    trace::start();
    let y = g.add(&a, &b).unwrap();
    g.copy_into(&y, &mut c).unwrap();
    let segs = [(&a, 0usize), (&b, n)];
    let mut flat = g.alloc(2 * n).unwrap();
    g.copy_segments(&segs, &mut flat).unwrap();
    let host = g.download(&flat).unwrap();
    let t = trace::finish();
    let got: Vec<(&str, u64, u64)> = t
        .launches
        .iter()
        .map(|l| (l.kernel, l.read, l.written))
        .collect();
    let b4 = 4 * n as u64;
    assert_eq!(
        got,
        [
            ("add_fwd", 2 * b4, b4),
            ("copy_f32", b4, b4),
            // The pointer table (3 x 2 i64) and the two sources it points to.
            ("copy_segments", 48 + 2 * b4, 2 * b4),
        ]
    );
    assert_eq!((t.d2h_copies, t.d2h_bytes, t.syncs), (1, 2 * b4, 1));
    assert_eq!(t.h2d_copies, 1, "the copy_segments table goes up");
    assert_eq!(host.len(), 2 * n);
}

#[test]
fn gemm_counts_flops_and_a_shared_matrix_once() {
    let Some(g) = gpu() else { return };
    // conv2d 1x1 forward of a batch of 3: W [8, 5] shared (stride 0), X [3][5, 7] -> Y [3][8, 7].
    let geom = ghostv3::backend::api::ConvGeom {
        n: 3,
        cin: 5,
        h: 7,
        w: 1,
        cout: 8,
        kh: 1,
        kw: 1,
        sh: 1,
        sw: 1,
        ph: 0,
        pw: 0,
        groups: 1,
        ho: 7,
        wo: 1,
    };
    let mut rng = StdRng::seed_from_u64(2);
    let x = g.upload(&rand_vec(&mut rng, 3 * 5 * 7, -1.0, 1.0)).unwrap();
    let w = g.upload(&rand_vec(&mut rng, 8 * 5, -1.0, 1.0)).unwrap();
    trace::start();
    g.conv2d_forward(&geom, &x, &w, None).unwrap();
    let t = trace::finish();
    assert_eq!(t.launches.len(), 1, "{:?}", t.launches);
    let l = &t.launches[0];
    assert_eq!(
        (l.module, l.read, l.written),
        ("cublas", 4 * (40 + 105), 4 * 168)
    );
    assert_eq!(l.flops, 2 * 8 * 7 * 5 * 3);
}

/// The step of a small train-form GhostNetV3 counted on the device, as `ghostv3 bench
/// --profile` counts it: exactly affine in the batch, every launch labelled with its phase. On
/// the emulator the command runs in the count-only mode (kernels not run) and one executed step
/// here must give the same launches and bytes.
#[test]
fn step_counts_are_affine_and_the_count_only_mode_agrees() {
    let Some(_g) = dispatch_gpu() else { return };
    let json = std::env::temp_dir().join(format!("ghostv3-counts-{}.json", std::process::id()));
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ghostv3"));
    cmd.args([
        "bench",
        "--train",
        "--train-form",
        "--device",
        "cuda",
        "--profile",
        "--count-only",
        "--model",
        "ghostnetv3_050",
        "--classes",
        "10",
        "--size",
        "64",
        "--batch",
        "256",
        "--json",
    ])
    .arg(&json);
    let emulated = std::env::var_os("GHOSTV3_EMU_CHILD").is_some();
    if emulated {
        cmd.env("GHOSTV3_EMU_COUNT_ONLY", "1");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    let t: Counts = serde_json::from_value(v).unwrap();
    assert!(t.fit_error < 1e-2, "fit error {}", t.fit_error);
    let phase = |p: Phase| {
        t.phases
            .iter()
            .find(|r| r.name == p.name())
            .unwrap_or_else(|| panic!("no {} phase: {:?}", p.name(), t.phases))
    };
    assert!(phase(Phase::Forward).bytes.per_image > 0.0);
    assert!(phase(Phase::Backward).bytes.per_image > phase(Phase::Forward).bytes.per_image);
    // The optimizer pass moves the flat state once per step, nothing per image.
    let up = phase(Phase::Update);
    assert!(
        up.bytes.per_step > 0.0 && up.bytes.per_image.abs() < 1.0,
        "{up:?}"
    );
    assert!(
        !t.phases.iter().any(|r| r.name == Phase::Other.name()),
        "unlabelled launches: {:?}",
        t.phases
    );
    let sum: f64 = t.families.iter().map(|r| r.bytes.per_image).sum();
    assert!((sum - t.bytes.per_image).abs() <= 1e-6 * t.bytes.per_image);

    // One executed step at the first counted batch, in this process.
    let opts = ModelOptions {
        num_classes: 10,
        ..Default::default()
    };
    let mut m = models::create("ghostnetv3_050", &opts).unwrap();
    m.state_mut().place_on(Device::Cuda).unwrap();
    let mut runner = bench::StepRunner::new(&m).unwrap();
    runner.run(&mut m, 64, t.batches[0]).unwrap();
    trace::start();
    let r = runner.run(&mut m, 64, t.batches[0]);
    let tr = trace::finish();
    r.unwrap();
    let bytes: u64 = tr.launches.iter().map(|l| l.read + l.written).sum();
    assert_eq!(
        (tr.launches.len(), bytes),
        (t.launches, t.counted_bytes[0]),
        "executed (launches, bytes) vs the command's count{}",
        if emulated {
            " in the count-only mode"
        } else {
            ""
        }
    );
}

#[derive(serde::Deserialize)]
struct Row {
    name: String,
    bytes: Affine,
}

#[derive(serde::Deserialize, Debug)]
struct Affine {
    per_image: f64,
    per_step: f64,
}

#[derive(serde::Deserialize)]
struct Counts {
    batches: [usize; 3],
    launches: usize,
    bytes: Affine,
    counted_bytes: [u64; 3],
    fit_error: f64,
    families: Vec<Row>,
    phases: Vec<Row>,
}

impl std::fmt::Debug for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {:?}", self.name, self.bytes)
    }
}

#[test]
fn every_kernel_module_has_a_family() {
    for (m, _) in ghostv3::backend::cuda::sources::MODULES {
        assert_ne!(traffic::family(m, "x"), "other", "module {m} has no family");
    }
}

/// Without a GPU, every test above on the CPU emulator.
#[test]
fn cpu_emulator_runs_every_gpu_test() {
    run_on_emulator(&[]);
}
