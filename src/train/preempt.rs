//! Preemption: a run that is told to stop loses (almost) nothing.
//!
//! SIGTERM (what Slurm sends before it kills a job) or SIGINT (^C) asks the trainer to stop: it
//! finishes the step it is in, writes a checkpoint and exits with [`EXIT_PREEMPTED`], so a requeued
//! job resumes where it stopped. A second signal ends the process at once. Against a kill -9
//! nothing helps but checkpointing often: `train.checkpoint_every` bounds what one can lose.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// The exit status of a run stopped by a signal after writing its checkpoint (BSD `EX_TEMPFAIL`:
/// "try again later"), apart from 0 (done), 1 (error) and 128 + n (killed by signal n).
pub const EXIT_PREEMPTED: i32 = 75;

/// A request to stop, set by a signal handler (or by a test): 0 = run on, else the signal.
#[derive(Clone, Debug, Default)]
pub struct StopFlag(Arc<AtomicUsize>);

impl StopFlag {
    /// A flag nothing sets but [`StopFlag::request`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A flag set by SIGTERM and SIGINT; a second such signal exits at once (status 128 + n).
    pub fn on_signals() -> Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        use signal_hook::flag;
        let flag = StopFlag::new();
        let seen = Arc::new(AtomicBool::new(false));
        for sig in [SIGTERM, SIGINT] {
            // Registered first, so it runs before `seen` is set: only a second signal exits.
            flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&seen))
                .context("cannot install the signal handlers")?;
            flag::register(sig, Arc::clone(&seen)).context("cannot install the signal handlers")?;
            flag::register_usize(sig, Arc::clone(&flag.0), sig as usize)
                .context("cannot install the signal handlers")?;
        }
        Ok(flag)
    }

    /// Asks the trainer to stop as `signal` would.
    pub fn request(&self, signal: i32) {
        self.0.store(signal as usize, Ordering::SeqCst);
    }

    /// The signal that asked to stop, by name, if one did.
    pub fn requested(&self) -> Option<&'static str> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            s if s == signal_hook::consts::SIGTERM as usize => Some("SIGTERM"),
            s if s == signal_hook::consts::SIGINT as usize => Some("SIGINT"),
            _ => Some("a signal"),
        }
    }
}

/// How often a checkpoint is written inside an epoch (one is always written at its end).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum CheckpointEvery {
    /// At epoch ends only.
    Epoch,
    /// After every n training steps.
    Steps(usize),
    /// After the first step that ends at least this many minutes after the last checkpoint.
    Minutes(f64),
}

impl Default for CheckpointEvery {
    /// Ten minutes: a kill costs at most that, for a checkpoint write every ten minutes.
    fn default() -> Self {
        CheckpointEvery::Minutes(10.0)
    }
}

impl TryFrom<String> for CheckpointEvery {
    type Error = anyhow::Error;

    /// `"epoch"`, `"500 steps"` or `"10 min"`.
    fn try_from(s: String) -> Result<Self> {
        let bad = || {
            format!(
                "train.checkpoint_every = {s:?}: expected \"epoch\", \"<n> steps\" or \"<m> min\""
            )
        };
        let t = s.trim();
        if t == "epoch" {
            return Ok(CheckpointEvery::Epoch);
        }
        let (num, unit) = t.split_once(' ').with_context(bad)?;
        match unit.trim() {
            "step" | "steps" => {
                let n: usize = num.parse().ok().with_context(bad)?;
                if n == 0 {
                    bail!("train.checkpoint_every = {s:?}: the number of steps must be positive");
                }
                Ok(CheckpointEvery::Steps(n))
            }
            "min" | "mins" | "minutes" => {
                let m: f64 = num.parse().ok().with_context(bad)?;
                if !(m > 0.0 && m.is_finite()) {
                    bail!("train.checkpoint_every = {s:?}: the minutes must be positive");
                }
                Ok(CheckpointEvery::Minutes(m))
            }
            _ => bail!("{}", bad()),
        }
    }
}

impl From<CheckpointEvery> for String {
    fn from(c: CheckpointEvery) -> String {
        match c {
            CheckpointEvery::Epoch => "epoch".to_string(),
            CheckpointEvery::Steps(n) => format!("{n} steps"),
            CheckpointEvery::Minutes(m) => format!("{m} min"),
        }
    }
}

impl CheckpointEvery {
    /// Whether a checkpoint is due after `steps_since` steps and `secs_since` seconds since the
    /// last one.
    pub fn due(&self, steps_since: usize, secs_since: f64) -> bool {
        match *self {
            CheckpointEvery::Epoch => false,
            CheckpointEvery::Steps(n) => steps_since >= n,
            CheckpointEvery::Minutes(m) => secs_since >= 60.0 * m,
        }
    }
}
