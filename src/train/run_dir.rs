//! A run directory owned by one trainer at a time: an advisory lock (`.lock`, holding the
//! owner's PID) for as long as the trainer lives, and the clean-up a resumed run needs
//! (temp files of interrupted atomic writes, `metrics.jsonl` lines past the checkpoint).

use anyhow::{bail, Context, Result};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

const LOCK: &str = ".lock";
use super::curves::METRICS;
/// The run's identity, written once when the run starts; its checkpoints carry the same id.
const IDENTITY: &str = "run.json";

/// The lock on a run directory; released when dropped (also when the process dies: the
/// kernel drops the lock with the file descriptor, so a killed run never leaves it stuck).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Locks `dir` (which must exist) for this process, or fails naming the PID holding it.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        let path = dir.join(LOCK);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the run lock {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                bail!(
                    "{} is in use by another trainer (PID {}); one run directory takes one \
                     writer: wait for it, stop it, or choose another --out",
                    dir.display(),
                    pid.trim()
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(RunLock { _file: file })
    }
}

/// Why a fresh run may not start in `dir`: it holds what a run writes (a run that never
/// finished its first epoch, whose files a new run would mix with its own).
pub fn check_fresh(dir: &Path) -> Result<()> {
    for name in [
        "config.toml",
        IDENTITY,
        METRICS,
        "best.safetensors",
        "last.safetensors",
    ] {
        if dir.join(name).exists() {
            bail!(
                "{} holds {name} from an earlier run; continue it with --resume {} (a run \
                 stopped before its first checkpoint restarts from its recipe), or delete the \
                 directory, or choose another --out",
                dir.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Removes the temp files of atomic writes an interrupted run left (`.NAME.tmp-PID`); returns
/// what it removed. Only the lock holder may call it (no other writer is running).
pub fn remove_leftovers(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') && name.contains(".tmp-") && path.is_file() {
            fs::remove_file(&path)
                .with_context(|| format!("cannot remove the leftover {}", path.display()))?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Keeps the lines of `metrics.jsonl` for epochs `1..=epochs` (those the checkpoint has): a run
/// killed after logging an epoch but before its checkpoint logs that epoch again on resume.
/// Rewritten atomically; returns how many lines were dropped.
pub fn truncate_metrics(dir: &Path, epochs: usize) -> Result<usize> {
    let path = dir.join(METRICS);
    let Ok(text) = fs::read_to_string(&path) else {
        return Ok(0);
    };
    let mut kept = String::new();
    let (mut dropped, mut last) = (0, 0);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let epoch = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["epoch"].as_u64());
        match epoch {
            Some(e) if e as usize <= epochs && e as usize > last => {
                last = e as usize;
                kept.push_str(line);
                kept.push('\n');
            }
            // A torn line (killed mid-write), a repeated epoch or one past the checkpoint.
            _ => dropped += 1,
        }
    }
    if dropped > 0 {
        crate::io::write_atomic(&path, kept.as_bytes())?;
    }
    Ok(dropped)
}

/// A 64-bit digest (xxh3) of `bytes`, as 16 hex digits: stable across platforms and versions.
pub fn digest(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// Gives a fresh run in `dir` its identity (`run.json`) and returns it.
pub fn create_identity(dir: &Path) -> Result<String> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = format!("{nanos}-{}-{}", std::process::id(), dir.display());
    let id = digest(seed.as_bytes());
    let text = serde_json::json!({ "run_id": id }).to_string();
    crate::io::write_atomic(&dir.join(IDENTITY), text.as_bytes())?;
    Ok(id)
}

/// The identity of the run in `dir` (None for a directory of a run older than identities).
pub fn identity(dir: &Path) -> Result<Option<String>> {
    let path = dir.join(IDENTITY);
    let Ok(text) = fs::read_to_string(&path) else {
        return Ok(None);
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))?;
    let id = v["run_id"]
        .as_str()
        .with_context(|| format!("{} has no run_id", path.display()))?;
    Ok(Some(id.to_string()))
}
