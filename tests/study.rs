//! `ghostv3 study`: a tiny study trained in-process and as child processes, its results against
//! its runs' own logs, its resumption after the study process is killed with -9 in the middle
//! of a run (the runs end exactly as the uninterrupted study's), `--status`, bad study files,
//! and `ghostv3 plot`.

use ghostv3::study::results::mean_std;
use ghostv3::study::spec::Resolved;
use ghostv3::study::{Outcome, RunOptions, RunState, Study};
use ghostv3::train::curves::read_metrics;
use ghostv3::train::preempt::StopFlag;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_ghostv3");

/// Two variants x two seeds of 48 synthetic 40x40 images, 2 epochs of 3 steps each.
const STUDY: &str = r#"
[study]
name = "tiny"
description = "A test study."
seeds = [3, 4]
baseline = "n1"
sets = ["data.synthetic_train=48", "data.synthetic_val=32", "data.synthetic_size=40",
        "augment.size=40", "eval.size=40", "train.epochs=2", "schedule.epochs=2",
        "train.batch_size=16", "train.eval_batch_size=32", "data.workers=1"]

[[variant]]
name = "n2"
label = "N=2"
sets = ["model.rep_branches=2"]
paper = 77.3

[[variant]]
name = "n1"
sets = ["model.rep_branches=1"]
"#;

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ghostv3-study-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn study_file(d: &Path, text: &str) -> PathBuf {
    let p = d.join("tiny.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn quiet() -> RunOptions {
    RunOptions {
        jobs: 1,
        quiet: true,
        ..Default::default()
    }
}

/// Per run: its directory and per epoch (train loss, top-1, val loss, EMA top-1).
type Figures = Vec<(String, Vec<(f64, f64, f64, Option<f64>)>)>;

/// Every run's logged figures, timing fields left out: what must match across ways of running.
fn figures(s: &Study) -> Figures {
    s.plan
        .iter()
        .map(|r| {
            let ms = read_metrics(&s.run_dir(r)).unwrap();
            let f = ms
                .iter()
                .map(|m| (m.train_loss, m.top1, m.val_loss, m.ema_top1))
                .collect();
            (r.rel_dir.clone(), f)
        })
        .collect()
}

/// One in-process study, shared by the tests that compare against it.
fn reference() -> &'static (PathBuf, Figures) {
    static REF: std::sync::OnceLock<(PathBuf, Figures)> = std::sync::OnceLock::new();
    REF.get_or_init(|| {
        let d = dir("reference");
        let file = study_file(&d, STUDY);
        let out = d.join("study");
        let s = Study::create(&out, Resolved::load(&file, &[]).unwrap()).unwrap();
        let o = s.run(&quiet(), &StopFlag::new()).unwrap();
        assert_eq!(o, Outcome::Finished { failed: vec![] });
        (out, figures(&s))
    })
}

#[test]
fn a_study_trains_every_run_and_its_table_is_its_runs_figures() {
    let (out, figs) = reference();
    let s = Study::open(out).unwrap();
    assert_eq!(s.plan.len(), 4);
    for r in &s.plan {
        assert_eq!(s.state(r), RunState::Done, "{}", r.rel_dir);
        assert_eq!(r.cfg.train.seed, r.seed);
    }
    assert_eq!(figs.iter().map(|f| f.1.len()).collect::<Vec<_>>(), [2; 4]);
    // Variants differ in what they train: N=2 and N=1 of the same seed give other losses.
    assert_ne!(figs[0].1[0].0, figs[2].1[0].0);
    // Seeds differ too.
    assert_ne!(figs[0].1[0].0, figs[1].1[0].0);

    let r = s.report().unwrap();
    assert_eq!(r.baseline, 1);
    let n2 = &r.rows[0];
    let best = |i: usize| 100.0 * figs[i].1.iter().map(|f| f.1).fold(0.0, f64::max);
    let want = mean_std(&[best(0), best(1)]).unwrap();
    let got = n2.top1.unwrap();
    assert!((got.mean - want.mean).abs() < 1e-9 && (got.std - want.std).abs() < 1e-9);
    // The paired difference: per seed, N=2's best minus N=1's.
    let d = mean_std(&[best(0) - best(2), best(1) - best(3)]).unwrap();
    let p = n2.d_top1.unwrap();
    assert!((p.diff.mean - d.mean).abs() < 1e-9 && (p.diff.std - d.std).abs() < 1e-9);
    assert!(
        r.rows[1].d_top1.is_none(),
        "the baseline has no difference to itself"
    );
    // The deploy form is counted: both fold to the same network.
    assert!(n2.deploy_params > 1_000_000 && n2.deploy_macs > 1_000_000);
    assert_eq!(n2.deploy_params, r.rows[1].deploy_params);

    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("| N=2 |") && md.contains("| **n1** (base) |"),
        "{md}"
    );
    assert!(
        md.contains(&format!("{:.2} ± {:.2}", want.mean, want.std)),
        "{md}"
    );
    assert!(md.contains("77.30"), "the paper column: {md}");
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(
        csv.lines()
            .nth(1)
            .unwrap()
            .starts_with("n2,\"N=2\",false,2,2,"),
        "{csv}"
    );
    for png in ["curves.png", "final_top1.png", "n2/seed-3/curves.png"] {
        let img = image::open(out.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(img.width() >= 640, "{png}");
    }

    // Run again: nothing left, nothing retrained.
    let before = std::fs::metadata(out.join("n2/seed-3/metrics.jsonl"))
        .unwrap()
        .modified()
        .unwrap();
    let status = s.status();
    assert!(
        status.contains("4 of 4 runs done") && status.contains("nothing left"),
        "{status}"
    );
    s.run(&quiet(), &StopFlag::new()).unwrap();
    let after = std::fs::metadata(out.join("n2/seed-3/metrics.jsonl"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
    assert_eq!(&figures(&s), figs);
}

#[test]
fn a_study_killed_mid_run_resumes_to_the_uninterrupted_figures() {
    let (_, want) = reference();
    let d = dir("killed");
    // A checkpoint every step, so a kill lands inside an epoch with one to resume from.
    let text = STUDY.replace(
        "\"data.workers=1\"]",
        "\"data.workers=1\", \"train.checkpoint_every=\\\"1 steps\\\"\"]",
    );
    let file = study_file(&d, &text);
    let out = d.join("study");
    let mut child = Command::new(BIN)
        .args([
            "study",
            file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill once the second run has a mid-epoch checkpoint (its first epoch started).
    let second = out.join("n2/seed-4/checkpoint.safetensors");
    let t0 = Instant::now();
    while !second.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "the study never reached run 2"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the study ended before the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL: no handler runs
    child.wait().unwrap();

    let s = Study::open(&out).unwrap();
    let states: Vec<RunState> = s.plan.iter().map(|r| s.state(r)).collect();
    assert_eq!(states[0], RunState::Done);
    assert!(matches!(states[1], RunState::Partial { .. }), "{states:?}");
    assert_eq!(states[3], RunState::Pending);
    let status = String::from_utf8(
        common::run_ok(
            Command::new(BIN).args(["study", "--status"]).arg(&out),
            "status",
        )
        .stdout,
    )
    .unwrap();
    assert!(status.contains("1 of 4 runs done"), "{status}");
    assert!(
        status.contains("n2/seed-4") && status.contains("partial"),
        "{status}"
    );
    assert!(status.contains("epochs left: about"), "{status}");

    common::run_ok(
        Command::new(BIN).args(["study", "--resume"]).arg(&out),
        "study --resume",
    );
    let s = Study::open(&out).unwrap();
    assert!(s.plan.iter().all(|r| s.state(r) == RunState::Done));
    assert_eq!(
        &figures(&s),
        want,
        "the resumed study differs from the uninterrupted one"
    );
}

#[test]
fn child_processes_train_the_same_study() {
    let (_, want) = reference();
    let d = dir("jobs");
    let file = study_file(&d, STUDY);
    let out = d.join("study");
    let o = common::run_ok(
        Command::new(BIN)
            .args(["study", file.to_str().unwrap(), "--jobs", "2", "--out"])
            .arg(&out)
            // One thread per child, as the reference's in-process runs are not: figures
            // computed on another thread count agree to rounding only.
            .env("RAYON_NUM_THREADS", "1"),
        "study --jobs 2",
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("results:"), "{stdout}");
    let s = Study::open(&out).unwrap();
    assert!(s.plan.iter().all(|r| s.state(r) == RunState::Done));
    let got = figures(&s);
    for ((name, a), (_, b)) in got.iter().zip(want) {
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x.0 - y.0).abs() < 1e-3,
                "{name}: train loss {} vs {}",
                x.0,
                y.0
            );
        }
    }
    // Each child's log is in its run directory.
    let log = std::fs::read_to_string(out.join("n1/seed-3/train.log")).unwrap();
    assert!(log.contains("epoch 2/2"), "{log}");
    // Results and plots from the parent.
    assert!(out.join("results.md").exists() && out.join("curves.png").exists());

    // `ghostv3 plot` of two runs, and accuracy against latency.
    let png = d.join("two.png");
    common::run_ok(
        Command::new(BIN)
            .arg("plot")
            .arg(out.join("n1/seed-3"))
            .arg(out.join("n2/seed-3"))
            .arg("--out")
            .arg(&png),
        "plot",
    );
    assert!(image::open(&png).unwrap().width() >= 1280);
    let lat = d.join("latency.png");
    let o = common::run_ok(
        Command::new(BIN)
            .args(["plot", "--latency", "--threads", "1"])
            .arg(out.join("n1/seed-3"))
            .arg(out.join("n2/seed-4"))
            .arg("--out")
            .arg(&lat),
        "plot --latency",
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("ms median (batch 1)"), "{stdout}");
    assert!(image::open(&lat).is_ok());
}

#[test]
fn bad_study_files_are_refused_naming_the_fault() {
    let d = dir("bad");
    let err = |text: &str| {
        let f = study_file(&d, text);
        format!("{:#}", Resolved::load(&f, &[]).unwrap_err())
    };
    let e = err(&STUDY.replace("name = \"n1\"", "name = \"n2\""));
    assert!(e.contains("\"n2\" appears twice"), "{e}");
    let e = err(&STUDY.replace("baseline = \"n1\"", "baseline = \"n9\""));
    assert!(e.contains("baseline = \"n9\" is not a variant"), "{e}");
    let e = err(&STUDY.replace("seeds = [3, 4]", "seeds = []"));
    assert!(e.contains("seeds is empty"), "{e}");
    let e = err(&STUDY.replace("paper = 77.3", "paper = 773"));
    assert!(e.contains("not a top-1 in %"), "{e}");
    let e = err(&STUDY.replace("name = \"n1\"", "name = \"../n1\""));
    assert!(e.contains("names a directory"), "{e}");
    let e = err(&STUDY.replace("[[variant]]\nname = \"n1\"", "[[variant]]\nnmae = \"n1\""));
    assert!(e.contains("not a study file"), "{e}");
    // A variant's override is checked like `--set`.
    let e = err(&STUDY.replace("model.rep_branches=1", "model.rep_branchez=1"));
    assert!(
        e.contains("variant \"n1\"") && e.contains("rep_branchez"),
        "{e}"
    );
    let e = err(&STUDY.replace("[study]", "[study]\nbase = \"missing.toml\""));
    assert!(e.contains("missing.toml"), "{e}");

    // Another study in the same directory is refused, naming what differs.
    let f = study_file(&d, STUDY);
    let out = d.join("study");
    Study::create(&out, Resolved::load(&f, &[]).unwrap()).unwrap();
    let other = Resolved::load(&f, &["train.lr=0.5".to_string()]).unwrap();
    let e = format!("{:#}", Study::create(&out, other).err().unwrap());
    assert!(
        e.contains("holds another study") && e.contains("train.lr"),
        "{e}"
    );
}

#[test]
fn every_committed_study_file_resolves() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/studies");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let r = Resolved::load(&p, &["data.root=\"/data\"".to_string()])
                .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            assert!(r.plan().unwrap().len() >= 3, "{}", p.display());
            n += 1;
        }
    }
    assert!(n >= 10, "only {n} study files");
}
