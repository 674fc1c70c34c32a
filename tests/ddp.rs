//! Data-parallel training over NCCL, as real processes (`ghostv3 train --gpus 2`: one rank per
//! GPU): the ranks end with bit-identical parameters, and the 2-rank run equals a 1-process run
//! with `train.accum_steps = 2` over the same samples. Without a GPU the test runs on the CPU
//! emulator, whose build also gives an NCCL stand-in (libnccl.so.2 across processes through
//! shared memory) and several devices.

mod common;

use common::cuda::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// The parameters (not the BN running statistics, which each rank keeps from its own batches,
/// as DDP without buffer broadcasts) of a weights file.
fn params(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(n, _)| !n.contains("running_") && !n.contains("num_batches"))
        .map(|(n, t)| {
            let v: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (n, v)
        })
        .collect()
}

fn max_diff(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .flat_map(|(n, x)| x.iter().zip(&b[n]).map(|(p, q)| (p - q).abs() as f64))
        .fold(0.0, f64::max)
}

#[test]
fn two_ranks_equal_one_process_accumulating_two() {
    let Some(_g) = gpu() else { return };
    let root = std::env::temp_dir().join(format!("ghostv3-ddp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    // 8 images in batches of 2: one process with accum_steps = 2 makes 2 optimizer steps of 2
    // micro-batches; 2 ranks make the same 2 steps, one micro-batch each.
    let sets = [
        "data.synthetic_train=8",
        "data.synthetic_val=2",
        "data.synthetic_size=40",
        "augment.size=40",
        "eval.size=40",
        "train.epochs=1",
        "schedule.epochs=1",
        "train.batch_size=2",
        "train.eval_batch_size=2",
    ];
    let run = |dir: &Path, extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ghostv3"));
        c.args(["train", "--device", "cuda", "--out", dir.to_str().unwrap()]);
        for s in sets {
            c.args(["--set", s]);
        }
        c.args(extra).env("TMPDIR", root.join("tmp"));
        let t = std::time::Instant::now();
        let o = c.output().unwrap();
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "train {extra:?}: {out}");
        println!("train {extra:?}: {:.1} s", t.elapsed().as_secs_f64());
        out
    };
    let (one, two) = (root.join("accum2"), root.join("ranks2"));
    run(&one, &["--set", "train.accum_steps=2"]);
    let out = run(&two, &["--gpus", "2"]);
    assert!(out.contains("NCCL communicator of 2 ranks"), "{out}");
    let rank0 = params(&two.join("last.safetensors"));
    let rank1 = params(&root.join("tmp/ghostv3-ranks2-rank1/last.safetensors"));
    assert!(
        max_diff(&rank0, &rank1) == 0.0,
        "ranks 0 and 1 differ after training"
    );
    let accum = params(&one.join("last.safetensors"));
    let d = max_diff(&rank0, &accum);
    println!("2 ranks vs 1 process with accum_steps = 2: max |diff| of the parameters {d:.3e}");
    assert!(d <= 1e-5, "2 ranks vs accum_steps = 2: {d:.3e}");
    // Rank 0 alone wrote the run directory.
    assert!(two.join("checkpoint.safetensors").is_file());
    let _ = std::fs::remove_dir_all(&root);
}

/// Without a GPU: the test above on the CPU emulator (its NCCL stand-in and 4 devices).
#[test]
fn cpu_emulator_runs_every_gpu_test() {
    run_on_emulator(&[]);
}
