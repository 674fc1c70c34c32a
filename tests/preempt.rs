//! Preemption and checkpoint identity: a run stopped by a signal inside an epoch, or killed with
//! -9 at random moments, resumes to exactly the weights of the uninterrupted run; a checkpoint of
//! another run, an edited one or one under another recipe is refused.

use ghostv3::io::{read_tensors, TensorData};
use ghostv3::train::config::TrainConfig;
use ghostv3::train::preempt::{CheckpointEvery, StopFlag, EXIT_PREEMPTED};
use ghostv3::train::{Trainer, CHECKPOINT};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// 96 images of 64x64 in batches of 32: three steps an epoch.
const SETS: &[&str] = &[
    "data.synthetic_train=96",
    "data.synthetic_val=32",
    "data.workers=2",
    "train.epochs=2",
    "schedule.epochs=2",
    "train.batch_size=32",
    "train.lr=0.01",
    "train.eval_batch_size=32",
    "model.rep_branches=2",
    "model.drop_rate=0.2",
    "augment.re_prob=0.25",
];

fn sets(extra: &[&str]) -> Vec<String> {
    SETS.iter().chain(extra).map(|s| s.to_string()).collect()
}

fn tiny(extra: &[&str]) -> TrainConfig {
    TrainConfig::from_toml(TrainConfig::default_recipe(), &sets(extra), "test").unwrap()
}

fn run_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ghostv3-preempt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn tensors(path: &Path) -> BTreeMap<String, TensorData> {
    read_tensors(path).unwrap()
}

/// The train losses logged per epoch.
fn losses(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["epoch"].as_u64().unwrap(),
                v["train_loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn quiet(mut t: Trainer) -> Trainer {
    t.quiet = true;
    t
}

#[test]
fn checkpoint_every_parses_and_round_trips() {
    for (s, want) in [
        ("epoch", CheckpointEvery::Epoch),
        ("500 steps", CheckpointEvery::Steps(500)),
        ("1 step", CheckpointEvery::Steps(1)),
        ("2.5 min", CheckpointEvery::Minutes(2.5)),
    ] {
        let got = CheckpointEvery::try_from(s.to_string()).unwrap();
        assert_eq!(got, want, "{s}");
        assert_eq!(CheckpointEvery::try_from(String::from(got)).unwrap(), want);
    }
    for bad in ["0 steps", "-1 min", "nan min", "10", "10 hours", "often"] {
        let e = CheckpointEvery::try_from(bad.to_string()).unwrap_err();
        assert!(e.to_string().contains("checkpoint_every"), "{bad}: {e}");
    }
    let e = TrainConfig::from_toml(
        TrainConfig::default_recipe(),
        &["train.checkpoint_every=\"5 hours\"".to_string()],
        "test",
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("checkpoint_every"), "{e:#}");
}

/// A stop request (what SIGTERM sets) ends the run after the step in progress with a checkpoint
/// inside the epoch; resuming from there, twice, gives the uninterrupted run bit for bit.
#[test]
fn a_stop_inside_an_epoch_resumes_to_the_uninterrupted_run() {
    let (a, b) = (run_dir("straight"), run_dir("stopped"));
    let mut t = quiet(Trainer::new(tiny(&[]), &a).unwrap());
    t.run().unwrap();
    drop(t);

    let stop = |t: &mut Trainer, signal| {
        let flag = StopFlag::new();
        t.stop_on(flag.clone());
        flag.request(signal);
    };
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut t = quiet(Trainer::new(tiny(&[]), &b).unwrap());
    // Asked to stop before it starts: it stops at once, nothing trained, nothing written.
    stop(&mut t, SIGTERM);
    let s = t.run().unwrap();
    assert_eq!(s.stopped_by, Some("SIGTERM"));
    assert!(!b.join(CHECKPOINT).exists());
    // Asked during a step: that step finishes, then a checkpoint at epoch 1 step 1.
    assert!(t.run_epoch().unwrap().is_none());
    assert!(!b.join("metrics.jsonl").exists());
    drop(t);
    let mut t = quiet(Trainer::resume(&b, &[]).unwrap());
    assert_eq!(t.resumed_at(), Some("at epoch 1 step 1"));
    stop(&mut t, SIGINT);
    assert!(t.run_epoch().unwrap().is_none());
    drop(t);
    let mut t = quiet(Trainer::resume(&b, &[]).unwrap());
    assert_eq!(t.resumed_at(), Some("at epoch 1 step 2"));
    // Through the epoch's end (evaluation, metrics, checkpoint) and one step into the next.
    assert_eq!(t.run_epoch().unwrap().unwrap().epoch, 1);
    stop(&mut t, SIGTERM);
    assert!(t.run_epoch().unwrap().is_none());
    drop(t);
    let mut t = quiet(Trainer::resume(&b, &[]).unwrap());
    assert_eq!(t.resumed_at(), Some("at epoch 2 step 1"));
    let s = t.run().unwrap();
    assert_eq!(s.stopped_by, None);
    drop(t);
    assert_eq!(losses(&a), losses(&b), "train losses per epoch");
    for f in ["last.safetensors", CHECKPOINT, "deploy.safetensors"] {
        let (x, y) = (tensors(&a.join(f)), tensors(&b.join(f)));
        assert!(x == y, "{f} differs from the uninterrupted run's");
    }
}

#[test]
fn a_checkpoint_of_another_run_or_an_edited_one_is_refused() {
    let (a, b) = (run_dir("owner"), run_dir("other"));
    for d in [&a, &b] {
        let mut t = quiet(Trainer::new(tiny(&["train.epochs=1"]), d).unwrap());
        t.run().unwrap();
    }
    // Another run's checkpoint copied in.
    std::fs::copy(a.join(CHECKPOINT), b.join(CHECKPOINT)).unwrap();
    let e = format!("{:#}", Trainer::resume(&b, &[]).err().unwrap());
    assert!(e.contains("belongs to run"), "{e}");

    // The epoch edited in the metadata: the digest no longer fits.
    let ck = a.join(CHECKPOINT);
    let original = std::fs::read(&ck).unwrap();
    std::fs::write(
        &ck,
        edit_metadata(&original, "\"epoch\":1", "\"epoch\":1000"),
    )
    .unwrap();
    let e = format!("{:#}", Trainer::resume(&a, &[]).err().unwrap());
    assert!(e.contains("digest"), "{e}");
    std::fs::write(&ck, &original).unwrap();

    // config.toml edited by hand after the checkpoint: refused, naming the key; the same change
    // given with --set is accepted, and written to config.toml.
    let cfg = a.join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("lr = 0.01", "lr = 0.02")).unwrap();
    let e = format!("{:#}", Trainer::resume(&a, &[]).err().unwrap());
    assert!(e.contains("train.lr: 0.01 -> 0.02"), "{e}");
    let t = Trainer::resume(&a, &["train.lr=0.02".into(), "train.epochs=3".into()]).unwrap();
    assert_eq!(t.epoch, 1);
    drop(t);
    let written = std::fs::read_to_string(&cfg).unwrap();
    assert!(written.contains("epochs = 3"), "{written}");
}

/// A safetensors file with `from` replaced by `to` in its metadata (header re-serialized, data
/// untouched).
fn edit_metadata(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta = header["__metadata__"].as_object_mut().unwrap();
    let info = meta["ghostv3.trainer"].as_str().unwrap().to_string();
    assert!(info.contains(from), "{info}");
    meta.insert(
        "ghostv3.trainer".into(),
        serde_json::Value::String(info.replace(from, to)),
    );
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

fn train_cmd(dir: &Path, fresh: bool) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ghostv3"));
    c.arg("train");
    if fresh {
        c.arg("--out").arg(dir);
        for s in sets(&["train.epochs=3", "schedule.epochs=3"]) {
            c.arg("--set").arg(s);
        }
        c.arg("--set").arg("train.checkpoint_every=\"1 steps\"");
    } else {
        c.arg("--resume").arg(dir);
    }
    c.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    c
}

/// The process killed with -9 at five random moments (seeded), resumed after each kill: the end
/// result is the uninterrupted run's, bit for bit. Then SIGTERM: exit status 75, and the resume
/// redoes no finished step.
#[test]
fn kill_9_at_random_moments_then_resume_gives_the_uninterrupted_run() {
    let (a, b) = (run_dir("kill-ref"), run_dir("kill"));
    let t0 = Instant::now();
    let ok = train_cmd(&a, true).output().unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let whole = t0.elapsed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let mut kills = Vec::new();
    while kills.len() < 5 {
        let fresh = !b.join("config.toml").exists();
        let mut child = train_cmd(&b, fresh).spawn().unwrap();
        let at = whole.mul_f64(rng.random_range(0.08..0.25));
        std::thread::sleep(at);
        if child.try_wait().unwrap().is_some() {
            break; // finished before the kill: nothing left to interrupt
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills.push(at);
    }
    eprintln!(
        "uninterrupted run {:.1} s; killed after {:?}",
        whole.as_secs_f64(),
        kills
    );
    assert!(kills.len() >= 3, "too few kills landed: {kills:?}");
    // The last part runs to the end, interrupted once more by SIGTERM.
    let child = train_cmd(&b, !b.join("config.toml").exists())
        .spawn()
        .unwrap();
    std::thread::sleep(whole.mul_f64(0.2));
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.code() == Some(EXIT_PREEMPTED) {
        assert!(err.contains("SIGTERM: stopped at"), "{err}");
        assert!(err.contains("--resume"), "{err}");
    } else {
        assert!(out.status.success(), "{err}");
    }
    let done = train_cmd(&b, false).output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(losses(&a), losses(&b), "train losses per epoch");
    for f in ["last.safetensors", "deploy.safetensors"] {
        assert!(
            tensors(&a.join(f)) == tensors(&b.join(f)),
            "{f} differs from the uninterrupted run's"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(&b)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_run_killed_before_its_first_checkpoint_restarts_on_resume() {
    let d = run_dir("early");
    let t = quiet(Trainer::new(tiny(&["train.epochs=1"]), &d).unwrap());
    drop(t); // as if killed during the first steps: config.toml and run.json, no checkpoint
    let e = format!("{:#}", Trainer::new(tiny(&[]), &d).err().unwrap());
    assert!(e.contains("--resume"), "{e}");
    let mut t = quiet(Trainer::resume(&d, &[]).unwrap());
    assert_eq!(t.epoch, 0);
    assert_eq!(t.resumed_at(), None);
    t.run().unwrap();
    assert!(d.join("deploy.safetensors").exists());
}

#[test]
fn resume_keeps_its_directory() {
    let o = Command::new(env!("CARGO_BIN_EXE_ghostv3"))
        .args(["train", "--resume", "runs/a", "--out", "runs/b"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("cannot be used with"),
        "{e}"
    );
}
