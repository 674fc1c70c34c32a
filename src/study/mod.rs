//! `ghostv3 study`: the paper's kind of ablation as one command. A study file (`spec`) names a
//! base recipe, variants and seeds; every (variant, seed) is a run directory
//! `<study dir>/<variant>/seed-<seed>` trained by the ordinary trainer. The study resumes: a
//! finished run is skipped, an interrupted one continues from its checkpoint (the trainer's
//! exact resume). Runs go one after another in this process, or `jobs` at a time as child
//! `ghostv3 train` processes (one per GPU with `--gpus N`). After every run `results.md`,
//! `results.csv` and the plots are rewritten (`results`).

pub mod results;
pub mod spec;

use crate::io::atomic::write_atomic;
use crate::train::config::TrainConfig;
use crate::train::preempt::{StopFlag, EXIT_PREEMPTED};
use crate::train::run_dir::RunLock;
use crate::train::{curves, recipe_diff, Trainer};
use anyhow::{bail, Context, Result};
use spec::{PlannedRun, Resolved, StudyFile};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const STUDY_JSON: &str = "study.json";
const FAILED: &str = "failed.txt";

/// Whether the run in `dir` has finished: every epoch logged and its deploy weights written.
pub fn is_done(dir: &Path, cfg: &TrainConfig) -> bool {
    dir.join("deploy.safetensors").exists()
        && curves::read_metrics(dir).is_ok_and(|m| m.len() >= cfg.train.epochs)
}

/// Where a run of the study stands.
#[derive(Clone, Debug, PartialEq)]
pub enum RunState {
    Done,
    /// Another process holds its lock (this study in another terminal, or a child).
    Running,
    /// Started, not finished: `epochs` logged; `failed` holds the last error, if it failed.
    Partial {
        epochs: usize,
        failed: Option<String>,
    },
    Pending,
}

/// How `run` runs the runs.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Runs at a time; above 1 each is a child `ghostv3 train` process.
    pub jobs: usize,
    /// Give each child one GPU (CUDA_VISIBLE_DEVICES = its slot) and `--device cuda`.
    pub gpus: bool,
    /// The `ghostv3` binary for child runs (None: this process's executable).
    pub exe: Option<PathBuf>,
    /// No progress bar and no per-run lines (tests).
    pub quiet: bool,
}

/// How `run` ended.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Every run finished (the failed ones listed).
    Finished { failed: Vec<String> },
    /// A signal stopped the study; its runs checkpointed.
    Stopped(&'static str),
}

pub struct Study {
    pub dir: PathBuf,
    pub resolved: Resolved,
    pub file: StudyFile,
    pub plan: Vec<PlannedRun>,
}

impl Study {
    /// The study of `resolved` in `dir` (created). A directory holding another study is refused,
    /// so two recipes never mix in one table.
    pub fn create(dir: &Path, resolved: Resolved) -> Result<Study> {
        let path = dir.join(STUDY_JSON);
        if path.exists() {
            let stored = Study::open(dir)?;
            if stored.resolved != resolved {
                let new_plan = resolved.plan()?;
                let diff = stored
                    .plan
                    .iter()
                    .zip(&new_plan)
                    .find_map(|(a, b)| {
                        let d = recipe_diff(&a.cfg.to_toml().ok()?, &b.cfg.to_toml().ok()?);
                        (!d.is_empty()).then(|| format!("{}: {}", a.rel_dir, d.join(", ")))
                    })
                    .unwrap_or_else(|| "its variants or seeds differ".to_string());
                bail!(
                    "{} holds another study ({diff}); continue that one with `ghostv3 study \
                     --resume {}`, or choose another --out",
                    dir.display(),
                    dir.display()
                );
            }
            return Ok(stored);
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the study directory {}", dir.display()))?;
        write_atomic(&path, serde_json::to_string_pretty(&resolved)?.as_bytes())?;
        Study::from_resolved(dir, resolved)
    }

    /// The study stored in `dir` (its `study.json`).
    pub fn open(dir: &Path) -> Result<Study> {
        let path = dir.join(STUDY_JSON);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} is not a study directory (no {STUDY_JSON})",
                dir.display()
            )
        })?;
        let resolved: Resolved = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged", path.display()))?;
        Study::from_resolved(dir, resolved)
    }

    fn from_resolved(dir: &Path, resolved: Resolved) -> Result<Study> {
        Ok(Study {
            dir: dir.to_path_buf(),
            file: resolved.file()?,
            plan: resolved.plan()?,
            resolved,
        })
    }

    pub fn run_dir(&self, r: &PlannedRun) -> PathBuf {
        self.dir.join(&r.rel_dir)
    }

    pub fn state(&self, r: &PlannedRun) -> RunState {
        let dir = self.run_dir(r);
        if !dir.exists() {
            return RunState::Pending;
        }
        if is_done(&dir, &r.cfg) {
            return RunState::Done;
        }
        // The lock is held while a trainer lives (and dropped by the kernel if it is killed).
        if dir.join("config.toml").exists() && RunLock::acquire(&dir).is_err() {
            return RunState::Running;
        }
        let epochs = curves::read_metrics(&dir).map_or(0, |m| m.len());
        let failed = std::fs::read_to_string(dir.join(FAILED)).ok();
        if epochs == 0 && failed.is_none() && !dir.join("config.toml").exists() {
            return RunState::Pending;
        }
        RunState::Partial { epochs, failed }
    }

    fn total_epochs(&self) -> usize {
        self.plan.iter().map(|r| r.cfg.train.epochs).sum()
    }

    fn logged_epochs(&self) -> usize {
        self.plan
            .iter()
            .map(|r| {
                curves::read_metrics(&self.run_dir(r))
                    .map_or(0, |m| m.len().min(r.cfg.train.epochs))
            })
            .sum()
    }

    /// What `ghostv3 study --status` prints: every run's state, and the time left estimated
    /// from the seconds per epoch logged so far (one run at a time).
    pub fn status(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let (mut done, mut running, mut partial, mut pending, mut failed) = (0, 0, 0, 0, 0);
        let (mut secs, mut logged) = (0.0, 0usize);
        let mut lines = Vec::new();
        for r in &self.plan {
            let dir = self.run_dir(r);
            let ms = curves::read_metrics(&dir).unwrap_or_default();
            secs += ms.iter().map(|m| m.epoch_seconds).sum::<f64>();
            logged += ms.len();
            let best = curves::best_top1(&ms)
                .map_or(String::new(), |b| format!(", best top-1 {:.2}%", 100.0 * b));
            let epochs = r.cfg.train.epochs;
            let what = match self.state(r) {
                RunState::Done => {
                    done += 1;
                    format!("done      {epochs}/{epochs} epochs{best}")
                }
                RunState::Running => {
                    running += 1;
                    format!("running   {}/{epochs} epochs{best}", ms.len())
                }
                RunState::Partial {
                    epochs: e,
                    failed: f,
                } => {
                    partial += 1;
                    let why = f.map_or(String::new(), |f| {
                        failed += 1;
                        format!(" (failed: {})", f.lines().next().unwrap_or("").trim())
                    });
                    format!("partial   {e}/{epochs} epochs{best}{why}")
                }
                RunState::Pending => {
                    pending += 1;
                    format!("pending   0/{epochs} epochs")
                }
            };
            lines.push(format!("  {:<32} {what}", r.rel_dir));
        }
        let _ = writeln!(
            s,
            "study {} in {}: {done} of {} runs done, {running} running, {partial} partial{}, {pending} pending",
            self.file.study.name,
            self.dir.display(),
            self.plan.len(),
            if failed > 0 { format!(" ({failed} failed)") } else { String::new() },
        );
        for l in lines {
            let _ = writeln!(s, "{l}");
        }
        let left = self.total_epochs().saturating_sub(self.logged_epochs());
        if left == 0 {
            let _ = writeln!(s, "nothing left to train");
        } else if logged > 0 {
            let per = secs / logged as f64;
            let _ = writeln!(
                s,
                "{left} epochs left: about {:.0} min at {per:.1} s per epoch (the mean so far, one run at a time)",
                left as f64 * per / 60.0
            );
        } else {
            let _ = writeln!(s, "{left} epochs left (no epoch timed yet)");
        }
        s
    }

    /// Writes results.md, results.csv and the plots from what the runs have logged.
    pub fn report(&self) -> Result<results::Results> {
        let r = results::collect(&self.dir, &self.file, &self.plan)?;
        r.write(&self.dir)?;
        Ok(r)
    }

    /// Trains every run not yet finished; `stop` stops it (every live run checkpoints).
    pub fn run(&self, opts: &RunOptions, stop: &StopFlag) -> Result<Outcome> {
        let bar = if opts.quiet {
            indicatif::ProgressBar::hidden()
        } else {
            let b = indicatif::ProgressBar::new(self.total_epochs() as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "study {prefix} [{bar:30}] {pos}/{len} epochs {msg} eta {eta}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            b.set_prefix(self.file.study.name.clone());
            b
        };
        bar.set_position(self.logged_epochs() as u64);
        let say = |s: String| {
            if !opts.quiet {
                bar.suspend(|| println!("{s}"));
            }
        };
        let mut todo = VecDeque::new();
        for r in &self.plan {
            match self.state(r) {
                RunState::Done => {}
                RunState::Running => say(format!(
                    "{}: another process is training it; skipped",
                    r.rel_dir
                )),
                _ => todo.push_back(r),
            }
        }
        say(format!(
            "study {}: {} runs, {} to train, in {}",
            self.file.study.name,
            self.plan.len(),
            todo.len(),
            self.dir.display()
        ));
        let outcome = if opts.jobs <= 1 && !opts.gpus {
            self.run_here(todo, &bar, &say, stop)?
        } else {
            self.run_children(todo, opts, &bar, &say, stop)?
        };
        bar.finish_and_clear();
        self.report()?;
        Ok(outcome)
    }

    fn check_recipe(&self, r: &PlannedRun) -> Result<()> {
        let stored = self.run_dir(r).join("config.toml");
        if stored.exists() {
            let have = TrainConfig::load(&stored, &[])?.to_toml()?;
            let diff = recipe_diff(&have, &r.cfg.to_toml()?);
            if !diff.is_empty() {
                bail!(
                    "{}: its recipe is not the study's ({}); delete the run directory to retrain it",
                    self.run_dir(r).display(),
                    diff.join(", ")
                );
            }
        }
        Ok(())
    }

    fn finished_run(&self, r: &PlannedRun, res: &Result<()>, say: &dyn Fn(String)) -> Result<()> {
        let dir = self.run_dir(r);
        match res {
            Ok(()) => {
                let _ = std::fs::remove_file(dir.join(FAILED));
                let ms = curves::read_metrics(&dir)?;
                let best = curves::best_top1(&ms).unwrap_or(0.0);
                say(format!(
                    "{}: done, best top-1 {:.2}% (model or EMA), {:.1} min",
                    r.rel_dir,
                    100.0 * best,
                    ms.iter().map(|m| m.epoch_seconds).sum::<f64>() / 60.0
                ));
            }
            Err(e) => {
                std::fs::create_dir_all(&dir)?;
                write_atomic(&dir.join(FAILED), format!("{e:#}\n").as_bytes())?;
                say(format!("{}: FAILED: {e:#}", r.rel_dir));
            }
        }
        // Results after every run, so a long study can be read while it goes.
        self.report().map(|_| ())
    }

    /// One run after another in this process.
    fn run_here(
        &self,
        todo: VecDeque<&PlannedRun>,
        bar: &indicatif::ProgressBar,
        say: &dyn Fn(String),
        stop: &StopFlag,
    ) -> Result<Outcome> {
        let mut failed = Vec::new();
        for r in todo {
            if let Some(sig) = stop.requested() {
                return Ok(Outcome::Stopped(sig));
            }
            bar.set_message(r.rel_dir.clone());
            let dir = self.run_dir(r);
            let mut stopped = None;
            let res = (|| -> Result<()> {
                self.check_recipe(r)?;
                let mut t = if dir.join("config.toml").exists() {
                    Trainer::resume(&dir, &[])?
                } else {
                    Trainer::new(r.cfg.clone(), &dir)?
                };
                t.quiet = true;
                t.stop_on(stop.clone());
                let s = t.run_with(&mut |m| {
                    bar.inc(1);
                    bar.set_message(format!(
                        "{} epoch {}: top-1 {:.1}%",
                        r.rel_dir,
                        m.epoch,
                        100.0 * m.top1
                    ));
                })?;
                stopped = s.stopped_by;
                Ok(())
            })();
            if let Some(sig) = stopped {
                return Ok(Outcome::Stopped(sig));
            }
            if res.is_err() {
                failed.push(r.rel_dir.clone());
            }
            self.finished_run(r, &res, say)?;
        }
        Ok(Outcome::Finished { failed })
    }

    /// `jobs` runs at a time, each a child `ghostv3 train` (its log in the run's `train.log`).
    /// A child dies with the study (SIGTERM from the kernel), checkpointing as on any signal.
    fn run_children(
        &self,
        mut todo: VecDeque<&PlannedRun>,
        opts: &RunOptions,
        bar: &indicatif::ProgressBar,
        say: &dyn Fn(String),
        stop: &StopFlag,
    ) -> Result<Outcome> {
        let exe = match &opts.exe {
            Some(e) => e.clone(),
            // The running binary itself, even if a rebuild has replaced the file since: every
            // run of a study trains with the same code.
            None if Path::new("/proc/self/exe").exists() => PathBuf::from("/proc/self/exe"),
            None => std::env::current_exe().context("cannot find the ghostv3 binary")?,
        };
        let jobs = opts.jobs.max(1);
        let threads = (std::thread::available_parallelism().map_or(1, |n| n.get()) / jobs).max(1);
        let plans = self.dir.join(".plans");
        let mut slots: Vec<Option<(&PlannedRun, std::process::Child)>> =
            (0..jobs).map(|_| None).collect();
        let mut failed = Vec::new();
        let mut stopped = None;
        loop {
            if stopped.is_none() {
                stopped = stop.requested();
                if stopped.is_some() {
                    for (_, c) in slots.iter().flatten() {
                        // SIGTERM: the child checkpoints and exits with EXIT_PREEMPTED.
                        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
                    }
                }
            }
            for (slot, entry) in slots.iter_mut().enumerate() {
                if entry.is_some() || stopped.is_some() {
                    continue;
                }
                let Some(r) = todo.pop_front() else { break };
                match self.spawn(r, &exe, &plans, slot, opts.gpus, threads) {
                    Ok(c) => *entry = Some((r, c)),
                    Err(e) => {
                        failed.push(r.rel_dir.clone());
                        self.finished_run(r, &Err(e), say)?;
                    }
                }
            }
            for entry in slots.iter_mut() {
                let Some((r, c)) = entry else { continue };
                let Some(status) = c.try_wait()? else {
                    continue;
                };
                let r = *r;
                *entry = None;
                let res = match status.code() {
                    Some(0) => Ok(()),
                    Some(EXIT_PREEMPTED) => {
                        stopped.get_or_insert("SIGTERM");
                        continue;
                    }
                    _ => Err(anyhow::anyhow!(
                        "ghostv3 train exited with {status}; its log: {}\n{}",
                        self.run_dir(r).join("train.log").display(),
                        log_tail(&self.run_dir(r).join("train.log"))
                    )),
                };
                if res.is_err() {
                    failed.push(r.rel_dir.clone());
                }
                self.finished_run(r, &res, say)?;
            }
            let live: Vec<&str> = slots
                .iter()
                .flatten()
                .map(|(r, _)| r.rel_dir.as_str())
                .collect();
            if live.is_empty() && (todo.is_empty() || stopped.is_some()) {
                break;
            }
            bar.set_position(self.logged_epochs() as u64);
            bar.set_message(live.join(" "));
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(match stopped {
            Some(sig) => Outcome::Stopped(sig),
            None => Outcome::Finished { failed },
        })
    }

    fn spawn(
        &self,
        r: &PlannedRun,
        exe: &Path,
        plans: &Path,
        slot: usize,
        gpu: bool,
        threads: usize,
    ) -> Result<std::process::Child> {
        use std::os::unix::process::CommandExt;
        self.check_recipe(r)?;
        let dir = self.run_dir(r);
        std::fs::create_dir_all(&dir)?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("train");
        if dir.join("config.toml").exists() {
            cmd.arg("--resume").arg(&dir);
        } else {
            std::fs::create_dir_all(plans)?;
            let plan = plans.join(format!("{}.toml", r.rel_dir.replace('/', ".")));
            write_atomic(&plan, r.cfg.to_toml()?.as_bytes())?;
            cmd.arg("--config").arg(plan).arg("--out").arg(&dir);
        }
        if gpu {
            cmd.arg("--device").arg("cuda");
            cmd.env("CUDA_VISIBLE_DEVICES", slot.to_string());
        } else {
            cmd.env("RAYON_NUM_THREADS", threads.to_string());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("train.log"))?;
        cmd.stdout(log.try_clone()?).stderr(log);
        // SAFETY: prctl is async-signal-safe; the closure touches nothing else between fork and
        // exec. It makes the kernel send SIGTERM to the child when the study process dies.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn()
            .with_context(|| format!("cannot start {} for {}", exe.display(), r.rel_dir))
    }
}

/// The last lines of a log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}
