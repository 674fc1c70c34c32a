//! `ghostv3 train --gpus N`: one child per GPU on this machine, supervised. A failing rank
//! stops the others (a rank alone would hang in its next collective); a signal to the
//! supervisor reaches every rank so a preempted job can checkpoint.

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the other ranks get after SIGTERM before SIGKILL.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// [`launch_local_with`] with the default grace period.
pub fn launch_local(n: usize, exe: &Path, args: &[OsString], port: u16) -> Result<()> {
    launch_local_with(n, exe, args, port, DEFAULT_GRACE)
}

/// A port nobody listens on now: bind 127.0.0.1:0 and let it go (a small race with other
/// programs, which the rendezvous reports if lost).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// Runs `n` children of `exe args` as ranks 0..n with torchrun's variables (MASTER_ADDR
/// 127.0.0.1, MASTER_PORT `port`, 0 = a free one) and `GHOSTV3_LAUNCHER=1`. Rank 0's output
/// passes through; the others' lines come prefixed "[rank i] ". Ok when every rank exits 0.
pub fn launch_local_with(
    n: usize,
    exe: &Path,
    args: &[OsString],
    port: u16,
    grace: Duration,
) -> Result<()> {
    if n == 0 {
        bail!("launch: --gpus must be at least 1");
    }
    let port = if port == 0 { free_port()? } else { port };
    let token = format!("launcher {:016x}", rand::random::<u64>());

    // Flags first, children second: a signal between the two is not lost.
    let term = Arc::new(AtomicBool::new(false));
    let int = Arc::new(AtomicBool::new(false));
    let ids = [
        signal_hook::flag::register(libc::SIGTERM, term.clone())?,
        signal_hook::flag::register(libc::SIGINT, int.clone())?,
    ];
    let result = supervise(n, exe, args, port, &token, grace, &term, &int);
    for id in ids {
        signal_hook::low_level::unregister(id);
    }
    result
}

struct Rank {
    child: Child,
    status: Option<ExitStatus>,
    pumps: Vec<std::thread::JoinHandle<()>>,
}

#[allow(clippy::too_many_arguments)]
fn supervise(
    n: usize,
    exe: &Path,
    args: &[OsString],
    port: u16,
    token: &str,
    grace: Duration,
    term: &AtomicBool,
    int: &AtomicBool,
) -> Result<()> {
    let mut ranks: Vec<Rank> = Vec::with_capacity(n);
    for i in 0..n {
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env("RANK", i.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", i.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("GHOSTV3_LAUNCHER", "1")
            .env("GHOSTV3_RUN_TOKEN", token)
            // Their own process group: a terminal's Ctrl-C reaches the supervisor alone,
            // which forwards it once (not twice).
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGTERM the child
        // when the supervisor dies, so a killed supervisor leaves no orphaned ranks.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        if i > 0 {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let spawned = cmd
            .spawn()
            .with_context(|| format!("launch: cannot start rank {i}: {}", exe.display()));
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                stop(&mut ranks, grace);
                return Err(e);
            }
        };
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(pump(out, i, false));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(pump(err, i, true));
        }
        ranks.push(Rank {
            child,
            status: None,
            pumps,
        });
    }

    let mut forwarded: Option<&str> = None;
    loop {
        for (flag, sig, name) in [
            (term, libc::SIGTERM, "SIGTERM"),
            (int, libc::SIGINT, "SIGINT"),
        ] {
            if flag.swap(false, Ordering::SeqCst) {
                if forwarded.is_some() {
                    // A second signal: the user (or the scheduler) will not wait for the
                    // checkpoint.
                    eprintln!("launch: got {name} again; killing the ranks");
                    signal_all(&ranks, libc::SIGKILL);
                } else {
                    eprintln!("launch: got {name}; passing it to the ranks");
                    signal_all(&ranks, sig);
                    forwarded = Some(name);
                }
            }
        }
        let mut running = 0;
        for i in 0..ranks.len() {
            if ranks[i].status.is_some() {
                continue;
            }
            match ranks[i].child.try_wait() {
                Ok(Some(st)) => {
                    ranks[i].status = Some(st);
                    // After a forwarded signal the ranks are already stopping on their own.
                    if !st.success() && forwarded.is_none() {
                        eprintln!("launch: rank {i} exited with {st}; stopping the other ranks");
                        let t0 = Instant::now();
                        stop(&mut ranks, grace);
                        let took = t0.elapsed().as_secs_f64();
                        finish(&mut ranks);
                        bail!(
                            "launch: rank {i} exited with {st}; the other ranks stopped in {took:.2} s"
                        );
                    }
                }
                Ok(None) => running += 1,
                Err(e) => {
                    stop(&mut ranks, grace);
                    finish(&mut ranks);
                    return Err(e).context(format!("launch: cannot wait for rank {i}"));
                }
            }
        }
        if running == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    finish(&mut ranks);
    let bad: Vec<String> = ranks
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let st = r.status.unwrap();
            (!st.success()).then(|| format!("rank {i} {}", describe(st)))
        })
        .collect();
    match (forwarded, bad.is_empty()) {
        (None, true) => Ok(()),
        (Some(sig), true) => bail!("launch: stopped by {sig}; every rank exited cleanly"),
        (Some(sig), false) => bail!("launch: stopped by {sig}: {}", bad.join(", ")),
        (None, false) => bail!("launch: {}", bad.join(", ")),
    }
}

fn describe(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => format!("exited with {st}"),
    }
}

fn signal_all(ranks: &[Rank], sig: i32) {
    for r in ranks.iter().filter(|r| r.status.is_none()) {
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet (status None), so
        // the pid cannot have been reused.
        unsafe {
            libc::kill(r.child.id() as libc::pid_t, sig);
        }
    }
}

/// SIGTERM the running ranks, wait up to `grace`, SIGKILL what is left, reap all.
fn stop(ranks: &mut [Rank], grace: Duration) {
    signal_all(ranks, libc::SIGTERM);
    let t0 = Instant::now();
    loop {
        let mut running = false;
        for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
            match r.child.try_wait() {
                Ok(Some(st)) => r.status = Some(st),
                Ok(None) => running = true,
                Err(_) => {}
            }
        }
        if !running {
            return;
        }
        if t0.elapsed() >= grace {
            for (i, r) in ranks
                .iter_mut()
                .enumerate()
                .filter(|(_, r)| r.status.is_none())
            {
                eprintln!(
                    "launch: rank {i} still running after {:.0} s; killing it",
                    grace.as_secs_f64()
                );
                let _ = r.child.kill();
                r.status = r.child.wait().ok();
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (briefly) for the output pumps so the last lines of every rank are printed. Not
/// forever: a rank's orphaned grandchild may hold its pipe open.
fn finish(ranks: &mut [Rank]) {
    let t0 = Instant::now();
    for r in ranks.iter_mut() {
        for p in r.pumps.drain(..) {
            while !p.is_finished() && t0.elapsed() < Duration::from_secs(1) {
                std::thread::sleep(Duration::from_millis(5));
            }
            if p.is_finished() {
                let _ = p.join();
            }
        }
    }
}

/// Copies a child's stream line by line, prefixed with its rank.
fn pump(stream: impl Read + Send + 'static, rank: usize, err: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\n', '\r']);
            // One write per line, under the stream's lock, so ranks' lines do not interleave.
            let _ = if err {
                writeln!(std::io::stderr().lock(), "[rank {rank}] {text}")
            } else {
                writeln!(std::io::stdout().lock(), "[rank {rank}] {text}")
            };
        }
    })
}
