//! Data-parallel training over NCCL, as real processes (`ghostv3 train --gpus N`: one rank per
//! GPU):
//! - the ranks hold bit-identical parameters after every step, and a 2-rank run equals a
//!   1-process run with `train.accum_steps = 2` over the same samples;
//! - `train.sync_bn` on 2 ranks equals one process on the global batch (running statistics
//!   included);
//! - a killed rank ends the others within seconds, the last checkpoint stays intact, and the
//!   run resumes on 4 ranks to the result of an uninterrupted run.
//!
//! Without a GPU the tests run on the CPU emulator, whose build also gives an NCCL stand-in
//! (libnccl.so.2 across processes through shared memory) and several devices.

mod common;

use common::cuda::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The parameters (not the BN running statistics, which each rank keeps from its own batches,
/// as DDP without buffer broadcasts) of a weights file.
fn params(path: &Path) -> BTreeMap<String, Vec<f32>> {
    tensors(path, false)
}

/// Every f32 tensor of a weights file; the BN running statistics only when `running`.
fn tensors(path: &Path, running: bool) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(n, _)| !n.contains("num_batches") && (running || !n.contains("running_")))
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

/// A scratch root for one test's runs (its own TMPDIR for the ranks).
fn scratch(name: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("ghostv3-ddp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    root
}

/// `ghostv3 train --device cuda` with these `--set`s and extra arguments.
fn train_cmd(root: &Path, sets: &[&str], extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ghostv3"));
    c.args(["train", "--device", "cuda"]);
    for s in sets {
        c.args(["--set", s]);
    }
    c.args(extra).env("TMPDIR", root.join("tmp"));
    c
}

/// Runs it to success; returns stdout + stderr.
fn run(root: &Path, sets: &[&str], extra: &[&str]) -> String {
    let t = Instant::now();
    let o = train_cmd(root, sets, extra).output().unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "train {extra:?}: {out}");
    println!("train {extra:?}: {:.1} s", t.elapsed().as_secs_f64());
    out
}

/// 40-pixel synthetic images, one epoch unless overridden.
const TINY: [&str; 8] = [
    "data.synthetic_val=3",
    "data.synthetic_size=40",
    "augment.size=40",
    "eval.size=40",
    "train.batch_size=2",
    "train.eval_batch_size=2",
    "train.epochs=1",
    "schedule.epochs=1",
];

fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    TINY.iter().copied().chain(extra.iter().copied()).collect()
}

/// The largest max |a - b| of a tensor over max(1, max |b|) of it.
fn max_rel(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f64 {
    a.iter()
        .map(|(n, x)| {
            let scale = b[n].iter().fold(1.0f64, |m, &v| m.max(v.abs() as f64));
            let d = x
                .iter()
                .zip(&b[n])
                .map(|(p, q)| (p - q).abs() as f64)
                .fold(0.0, f64::max);
            d / scale
        })
        .fold(0.0, f64::max)
}

#[test]
fn two_ranks_equal_one_process_accumulating_two() {
    let Some(_g) = gpu() else { return };
    let root = scratch("accum");
    // 8 images in batches of 2: one process with accum_steps = 2 makes 2 optimizer steps of 2
    // micro-batches; 2 ranks make the same 2 steps, one micro-batch each.
    let sets = with(&["data.synthetic_train=8"]);
    let (one, two) = (root.join("accum2"), root.join("ranks2"));
    let mut accum = sets.clone();
    accum.push("train.accum_steps=2");
    run(&root, &accum, &["--out", one.to_str().unwrap()]);
    let mut ranks = sets.clone();
    ranks.push("train.check_ranks_each_step=true");
    let out = run(
        &root,
        &ranks,
        &["--out", two.to_str().unwrap(), "--gpus", "2"],
    );
    assert!(out.contains("NCCL communicator of 2 ranks"), "{out}");
    // Every step's digests agreed (a differing rank stops the run), and the epoch's.
    assert!(
        out.contains("ranks: parameters bit-identical on 2 ranks after epoch 1"),
        "{out}"
    );
    // The validation set (3 images in batches of 2: 2 batches, one per rank) counted whole.
    let m = std::fs::read_to_string(two.join("metrics.jsonl")).unwrap();
    let m: serde_json::Value = serde_json::from_str(m.lines().next().unwrap()).unwrap();
    let top1 = m["top1"].as_f64().unwrap();
    assert!(
        [0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0]
            .iter()
            .any(|v| (v - top1).abs() < 1e-12),
        "top-1 {top1} is not a count of 3 images"
    );
    let d = max_diff(
        &params(&two.join("last.safetensors")),
        &params(&one.join("last.safetensors")),
    );
    println!("2 ranks vs 1 process with accum_steps = 2: max |diff| of the parameters {d:.3e}");
    assert!(d <= 1e-5, "2 ranks vs accum_steps = 2: {d:.3e}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn sync_bn_on_two_ranks_equals_one_process_on_the_global_batch() {
    let Some(_g) = gpu() else { return };
    let root = scratch("syncbn");
    // 2 ranks x batch 2 with synchronized BN against one process with batch 4: the same
    // samples per step, BN over the same 4 images.
    // SGD: its update is linear in the gradient, so the float rounding of the two ways of
    // summing the statistics stays rounding (LAMB's first steps, ~lr * sign(g), turn a
    // rounding-sized change of a near-zero gradient into a step of 2 lr).
    let sets = with(&["data.synthetic_train=8", "optimizer.kind=\"sgd\""]);
    let (one, two) = (root.join("batch4"), root.join("sync2"));
    let mut global = sets.clone();
    global.push("train.batch_size=4");
    run(&root, &global, &["--out", one.to_str().unwrap()]);
    let mut sync = sets.clone();
    sync.push("train.sync_bn=true");
    run(
        &root,
        &sync,
        &["--out", two.to_str().unwrap(), "--gpus", "2"],
    );
    let (a, b) = (
        tensors(&two.join("last.safetensors"), true),
        tensors(&one.join("last.safetensors"), true),
    );
    let (pa, pb) = (
        params(&two.join("last.safetensors")),
        params(&one.join("last.safetensors")),
    );
    let d = max_diff(&pa, &pb);
    let r = max_rel(&a, &b);
    println!(
        "sync_bn on 2 ranks vs 1 process on the global batch: max |diff| of the parameters \
         {d:.3e}; of every tensor (running statistics too) relative to its largest value {r:.3e}"
    );
    assert!(d <= 1e-5, "sync_bn vs the global batch: parameters {d:.3e}");
    assert!(r <= 1e-5, "sync_bn vs the global batch: {r:.3e}");
    // Without sync_bn the running statistics are rank 0's own batches: they differ.
    let plain = root.join("plain2");
    run(
        &root,
        &sets,
        &["--out", plain.to_str().unwrap(), "--gpus", "2"],
    );
    let p = tensors(&plain.join("last.safetensors"), true);
    let running = |m: &BTreeMap<String, Vec<f32>>| -> BTreeMap<String, Vec<f32>> {
        m.iter()
            .filter(|(n, _)| n.contains("running_var"))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    };
    let dp = max_diff(&running(&p), &running(&b));
    assert!(
        dp > 1e-4,
        "per-rank BN should differ from the global batch's: {dp:.3e}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// The pid of the process whose environment holds `tag` and `RANK=<rank>` exactly.
fn find_rank(tag: &str, rank: usize) -> Option<i32> {
    let want = format!("RANK={rank}");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        if vars.contains(&tag.as_bytes()) && vars.contains(&want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// Starts `train --gpus 2` into `dir` (with `env` set), waits for its first checkpoint, sends
/// `signal` to rank 1 and waits for the launcher; checks that no rank is left. Returns the
/// launcher's exit status, its output and the seconds from the signal to its end.
fn signal_rank1_after_checkpoint(
    root: &Path,
    sets: &[&str],
    dir: &Path,
    env: &[(&str, &str)],
    signal: i32,
) -> (std::process::ExitStatus, String, f64) {
    let tag = format!("{}-{signal}", std::process::id());
    let mut cmd = train_cmd(root, sets, &["--out", dir.to_str().unwrap(), "--gpus", "2"]);
    cmd.env("GHOSTV3_TEST_TAG", &tag).envs(env.iter().copied());
    let mut launcher = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !dir.join("checkpoint.safetensors").exists() {
        assert!(t.elapsed().as_secs() < 600, "no checkpoint after 600 s");
        assert!(
            launcher.try_wait().unwrap().is_none(),
            "the run ended before the signal"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let tag = format!("GHOSTV3_TEST_TAG={tag}");
    let victim = find_rank(&tag, 1).expect("rank 1's process");
    let sent = Instant::now();
    unsafe { libc::kill(victim, signal) };
    let o = launcher.wait_with_output().unwrap();
    let secs = sent.elapsed().as_secs_f64();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    std::thread::sleep(Duration::from_millis(200));
    for rank in [0, 1] {
        assert_eq!(find_rank(&tag, rank), None, "rank {rank} still runs");
    }
    (o.status, out, secs)
}

#[test]
fn a_killed_rank_stops_the_run_which_resumes_on_four_ranks() {
    let Some(_g) = gpu() else { return };
    let root = scratch("fault");
    // 16 images in batches of 2: 8 global batches, 4 to an optimizer step (2 ranks x
    // accum_steps 2, then 4 ranks x 1, and 1 process x 4 for the reference). Killed after the
    // checkpoint of the first step, resumed for the second. SGD: the three ways of adding up
    // 4 gradients differ in rounding only, which LAMB's first steps would amplify.
    let sets = with(&[
        "data.synthetic_train=16",
        "train.checkpoint_every=\"1 steps\"",
        "optimizer.kind=\"sgd\"",
    ]);
    let reference = root.join("reference");
    let mut one = sets.clone();
    one.push("train.accum_steps=4");
    run(&root, &one, &["--out", reference.to_str().unwrap()]);

    let dir = root.join("ranks");
    let mut two = sets.clone();
    two.push("train.accum_steps=2");
    let (status, out, stopped) =
        signal_rank1_after_checkpoint(&root, &two, &dir, &[], libc::SIGKILL);
    println!("rank 1 killed: the run stopped {stopped:.2} s later: {status}");
    assert!(!status.success(), "the run survived a killed rank: {out}");
    assert!(
        out.contains("rank 1"),
        "the failure does not name rank 1: {out}"
    );
    let tail: Vec<&str> = out.lines().rev().take(4).collect();
    println!("its last lines:");
    for l in tail.iter().rev() {
        println!("  {l}");
    }
    assert!(stopped < 30.0, "{stopped:.1} s until the others stopped");

    // The checkpoint is intact: resumed on 4 ranks (4 global batches a step again).
    let out = run(
        &root,
        &["train.accum_steps=1"],
        &["--resume", dir.to_str().unwrap(), "--gpus", "4"],
    );
    assert!(out.contains("NCCL communicator of 4 ranks"), "{out}");
    assert!(out.contains("resuming"), "{out}");
    let d = max_diff(
        &params(&dir.join("last.safetensors")),
        &params(&reference.join("last.safetensors")),
    );
    println!("killed on 2 ranks, resumed on 4 vs 1 process uninterrupted: max |diff| {d:.3e}");
    assert!(d <= 1e-5, "resumed run vs uninterrupted: {d:.3e}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_hung_rank_is_stopped_by_the_watchdog() {
    let Some(_g) = gpu() else { return };
    let root = scratch("hang");
    let sets = with(&[
        "data.synthetic_train=16",
        "train.checkpoint_every=\"1 steps\"",
        "train.accum_steps=2",
    ]);
    let dir = root.join("ranks");
    // Rank 1 hangs (stopped, alive): no error reaches rank 0, only its watchdog can act. Its
    // timeout is longer than an emulated step (~12 s) with room; the emulator's NCCL would give
    // up at 120 s.
    let env = [
        ("GHOSTV3_NCCL_TIMEOUT_S", "40"),
        ("GHOSTV3_EMU_NCCL_TIMEOUT_S", "120"),
    ];
    let (status, out, stopped) =
        signal_rank1_after_checkpoint(&root, &sets, &dir, &env, libc::SIGSTOP);
    println!("rank 1 hung: the run stopped {stopped:.1} s later: {status}");
    for l in out
        .lines()
        .filter(|l| l.contains("launch:") || l.contains("no progress"))
    {
        println!("  {l}");
    }
    assert!(!status.success(), "the run survived a hung rank: {out}");
    assert!(
        out.contains("no progress for"),
        "the watchdog did not fire: {out}"
    );
    assert!(out.contains("rank 0 exited with exit status: 70"), "{out}");
    assert!(stopped < 90.0, "{stopped:.1} s until the run stopped");
    // The last checkpoint is whole.
    let bytes = std::fs::read(dir.join("checkpoint.safetensors")).unwrap();
    safetensors::SafeTensors::deserialize(&bytes).expect("an intact checkpoint");
    let _ = std::fs::remove_dir_all(&root);
}

/// Without a GPU: the test above on the CPU emulator (its NCCL stand-in and 4 devices).
#[test]
fn cpu_emulator_runs_every_gpu_test() {
    run_on_emulator(&[]);
}
