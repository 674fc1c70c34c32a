//! The process-topology layer: the environment rules, the NCCL-id rendezvous (ranks as
//! threads) and the local launcher (ranks as re-executions of this test binary).

use ghostv3::dist::{self, Rendezvous, Source, World};
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| m.get(k).cloned()
}

fn err(pairs: &[(&str, &str)]) -> String {
    format!("{:#}", World::from_vars(vars(pairs)).unwrap_err())
}

const TORCHRUN: [(&str, &str); 6] = [
    ("RANK", "2"),
    ("WORLD_SIZE", "8"),
    ("LOCAL_RANK", "2"),
    ("LOCAL_WORLD_SIZE", "4"),
    ("MASTER_ADDR", "10.0.0.1"),
    ("MASTER_PORT", "29400"),
];

#[test]
fn single_without_environment() {
    let w = World::from_vars(vars(&[])).unwrap();
    assert_eq!((w.rank, w.world_size, w.source), (0, 1, Source::Single));
    assert!(w.is_main() && !w.is_distributed());
}

#[test]
fn torchrun_wins_over_slurm() {
    let mut env = TORCHRUN.to_vec();
    env.extend([("SLURM_PROCID", "5"), ("SLURM_NTASKS", "16")]);
    let w = World::from_vars(vars(&env)).unwrap();
    assert_eq!(
        (w.rank, w.world_size, w.local_rank, w.local_world_size),
        (2, 8, 2, 4)
    );
    assert_eq!((w.master_addr.as_str(), w.master_port), ("10.0.0.1", 29400));
    assert_eq!(w.source, Source::Torchrun);
    assert!(!w.is_main() && w.is_distributed());
    assert_eq!(
        w.to_string(),
        "rank 2/8 (local 2/4) via torchrun, master 10.0.0.1:29400"
    );
    env.push(("GHOSTV3_LAUNCHER", "1"));
    assert_eq!(
        World::from_vars(vars(&env)).unwrap().source,
        Source::Launcher
    );
}

#[test]
fn torchrun_errors_name_the_variable() {
    let e = err(&[("RANK", "1"), ("WORLD_SIZE", "4")]);
    assert!(
        e.contains("LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT missing"),
        "{e}"
    );
    let mut env = TORCHRUN.to_vec();
    env[0] = ("RANK", "two");
    let e = err(&env);
    assert!(e.contains("RANK=\"two\""), "{e}");
    env[0] = ("RANK", "8");
    let e = err(&env);
    assert!(e.contains("RANK=8 is not below WORLD_SIZE=8"), "{e}");
    env[0] = ("RANK", "1");
    env[2] = ("LOCAL_RANK", "4");
    let e = err(&env);
    assert!(
        e.contains("LOCAL_RANK=4 is not below LOCAL_WORLD_SIZE=4"),
        "{e}"
    );
    env[2] = ("LOCAL_RANK", "1");
    env[5] = ("MASTER_PORT", "70000");
    assert!(err(&env).contains("MASTER_PORT=\"70000\""));
}

#[test]
fn slurm_topology_and_master() {
    let base = [
        ("SLURM_PROCID", "6"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "2"),
        ("SLURM_NODEID", "1"),
        ("SLURM_JOB_ID", "123456"),
        ("SLURM_STEP_NODELIST", "gpu[003-005,010],login1"),
        ("SLURM_JOB_NODELIST", "other1"),
    ];
    let mut env = base.to_vec();
    env.push(("SLURM_NTASKS_PER_NODE", "4"));
    let w = World::from_vars(vars(&env)).unwrap();
    assert_eq!(
        (w.rank, w.world_size, w.local_rank, w.local_world_size),
        (6, 8, 2, 4)
    );
    assert_eq!(w.source, Source::Slurm);
    assert_eq!(w.master_addr, "gpu003");
    assert_eq!(w.master_port, 20000 + (123456 % 20000) as u16);
    assert_eq!(
        w.to_string(),
        "rank 6/8 (local 2/4) via Slurm, master gpu003:23456"
    );

    // SLURM_TASKS_PER_NODE's compressed forms; this node's count by SLURM_NODEID.
    for tpn in ["4(x2)", "4,4", "5,4"] {
        let mut env = base.to_vec();
        env.push(("SLURM_TASKS_PER_NODE", tpn));
        let w = World::from_vars(vars(&env)).unwrap();
        assert_eq!(w.local_world_size, 4, "{tpn}");
    }
    // Neither: computed from the node count.
    let mut env = base.to_vec();
    env.push(("SLURM_NNODES", "2"));
    assert_eq!(World::from_vars(vars(&env)).unwrap().local_world_size, 4);

    // MASTER_ADDR / MASTER_PORT win; without a job id the port is torchrun's default.
    let env = [
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_TASKS_PER_NODE", "1(x2)"),
        ("SLURM_NODELIST", "node-[1-4]"),
    ];
    let w = World::from_vars(vars(&env)).unwrap();
    assert_eq!((w.master_addr.as_str(), w.master_port), ("node-1", 29500));
    let mut env = env.to_vec();
    env.extend([("MASTER_ADDR", "head"), ("MASTER_PORT", "1234")]);
    let w = World::from_vars(vars(&env)).unwrap();
    assert_eq!((w.master_addr.as_str(), w.master_port), ("head", 1234));
}

#[test]
fn slurm_errors_name_the_variable() {
    let e = err(&[("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0")]);
    assert!(e.contains("SLURM_NTASKS"), "{e}");
    let e = err(&[
        ("SLURM_PROCID", "x"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_LOCALID", "0"),
    ]);
    assert!(e.contains("SLURM_PROCID=\"x\""), "{e}");
    let e = err(&[
        ("SLURM_PROCID", "3"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_NODELIST", "a"),
    ]);
    assert!(
        e.contains("SLURM_PROCID=3 is not below SLURM_NTASKS=2"),
        "{e}"
    );
    let e = err(&[
        ("SLURM_PROCID", "1"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_NODELIST", "gpu[1-"),
    ]);
    assert!(e.contains("SLURM_NODELIST"), "{e}");
}

#[test]
fn hostlists() {
    assert_eq!(
        dist::expand_hostlist("gpu[003-005,010],login1").unwrap(),
        ["gpu003", "gpu004", "gpu005", "gpu010", "login1"]
    );
    assert_eq!(
        dist::expand_hostlist("r[1-2]n[01-02]").unwrap(),
        ["r1n01", "r1n02", "r2n01", "r2n02"]
    );
    assert_eq!(
        dist::first_host("gpu[003-005,010],login1").unwrap(),
        "gpu003"
    );
    assert_eq!(dist::first_host("node-[1-4]").unwrap(), "node-1");
    assert_eq!(dist::first_host("host1,host2").unwrap(), "host1");
    assert_eq!(dist::first_host("a[08-11].x").unwrap(), "a08.x");
    assert!(dist::first_host("gpu[5-3]").is_err());
    assert!(dist::expand_hostlist("gpu[1-2").is_err());
    assert_eq!(dist::tasks_per_node("4(x2),3").unwrap(), [4, 4, 3]);
}

fn world(rank: usize, n: usize, port: u16, token: u64) -> World {
    World {
        rank,
        world_size: n,
        local_rank: rank,
        local_world_size: n,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        source: Source::Torchrun,
        run_token: token,
    }
}

fn id() -> [u8; 128] {
    std::array::from_fn(|i| (i * 7 + 3) as u8)
}

/// Runs ranks `ranks` of an `n`-rank job as threads, rank 0 (if listed) after `master_delay`.
fn run_ranks(
    how: Rendezvous,
    ranks: &[usize],
    n: usize,
    port: u16,
    timeout: Duration,
    master_delay: Duration,
) -> Vec<anyhow::Result<[u8; 128]>> {
    let hs: Vec<_> = ranks
        .iter()
        .map(|&r| {
            let how = how.clone();
            std::thread::spawn(move || {
                let w = world(r, n, port, 7);
                if r == 0 {
                    std::thread::sleep(master_delay);
                }
                how.exchange(&w, (r == 0).then(id), timeout)
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn tcp_all_ranks_get_rank0_id() {
    let port = dist::free_port().unwrap();
    let t0 = Instant::now();
    for r in run_ranks(
        Rendezvous::Tcp,
        &[0, 1, 2, 3],
        4,
        port,
        Duration::from_secs(10),
        Duration::ZERO,
    ) {
        assert_eq!(r.unwrap(), id());
    }
    assert!(t0.elapsed() < Duration::from_secs(3));
}

#[test]
fn tcp_peers_retry_until_the_master_starts() {
    let port = dist::free_port().unwrap();
    for r in run_ranks(
        Rendezvous::Tcp,
        &[0, 1, 2],
        3,
        port,
        Duration::from_secs(10),
        Duration::from_millis(500),
    ) {
        assert_eq!(r.unwrap(), id());
    }
}

#[test]
fn tcp_timeout_names_the_missing_ranks() {
    let port = dist::free_port().unwrap();
    let res = run_ranks(
        Rendezvous::Tcp,
        &[0, 1, 2, 4],
        6,
        port,
        Duration::from_secs(1),
        Duration::ZERO,
    );
    let e = format!("{:#}", res[0].as_ref().unwrap_err());
    assert_eq!(
        e,
        format!("rendezvous: ranks 3, 5 of 6 did not arrive at 127.0.0.1:{port} within 1 s")
    );
    for r in &res[1..] {
        assert_eq!(*r.as_ref().unwrap(), id());
    }
    // A peer alone.
    let port = dist::free_port().unwrap();
    let t0 = Instant::now();
    let e = dist::tcp(&world(1, 2, port, 7), None, Duration::from_millis(500)).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "rendezvous: cannot reach the master at 127.0.0.1:{port} within 0.5 s (is rank 0 running?)"
        )
    );
    assert!(t0.elapsed() < Duration::from_secs(2));
}

#[test]
fn tcp_refuses_a_mismatched_world_size_and_another_job() {
    let port = dist::free_port().unwrap();
    let master = std::thread::spawn(move || {
        dist::tcp(&world(0, 3, port, 7), Some(id()), Duration::from_secs(5))
    });
    let e = dist::tcp(&world(1, 4, port, 7), None, Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("world size 4, rank 0 has 3"), "{e}");
    let e = master.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("world size 4, rank 0 has 3"), "{e}");

    // Another job's peer is refused, and the master goes on waiting for its own.
    let port = dist::free_port().unwrap();
    let master = std::thread::spawn(move || {
        dist::tcp(&world(0, 2, port, 7), Some(id()), Duration::from_secs(1))
    });
    let e = dist::tcp(&world(1, 2, port, 8), None, Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("is not this job's"), "{e}");
    let e = master.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("rank 1 of 2 did not arrive"), "{e}");
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ghostv3-dist-{name}-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn file_all_ranks_get_rank0_id_despite_stale_files() {
    let dir = temp_dir("file");
    // An earlier run's id and arrival (another token) must be neither used nor counted.
    std::fs::write(
        dir.join("nccl-id"),
        format!(
            "ghostv3 rendezvous v1 token {:016x} world_size 4\n{}\n",
            99,
            "00".repeat(128)
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("rank-3.arrived"),
        "ghostv3 rendezvous v1 token 0000000000000063 world_size 4\n",
    )
    .unwrap();
    let res = run_ranks(
        Rendezvous::File(dir.clone()),
        &[0, 1, 2, 3],
        4,
        0,
        Duration::from_secs(10),
        Duration::from_millis(200),
    );
    for r in res {
        assert_eq!(r.unwrap(), id());
    }
    // Rank 0 cleans up once all have the id, so a rerun into the directory starts clean.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn file_timeouts_name_what_is_missing() {
    let dir = temp_dir("file-timeout");
    let res = run_ranks(
        Rendezvous::File(dir.clone()),
        &[0, 2],
        4,
        0,
        Duration::from_millis(500),
        Duration::ZERO,
    );
    let e = res[0].as_ref().unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "rendezvous: ranks 1, 3 of 4 did not arrive in {} within 0.5 s",
            dir.display()
        )
    );
    let dir2 = temp_dir("file-alone");
    let e = dist::file(&dir2, &world(1, 2, 0, 7), None, Duration::from_millis(300)).unwrap_err();
    assert!(
        e.to_string()
            .contains("rank 1 found no NCCL id from rank 0"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&dir2).unwrap();
}

/// The child of the launcher tests; does nothing unless started by them.
#[test]
fn launch_child() {
    let Ok(mode) = std::env::var("GHOSTV3_DIST_TEST_CHILD") else {
        return;
    };
    let w = World::from_env().unwrap();
    assert_eq!(w.source, Source::Launcher);
    match mode.as_str() {
        "ok" => {
            let got = dist::tcp(&w, w.is_main().then(id), Duration::from_secs(10)).unwrap();
            assert_eq!(got, id());
            eprintln!("rank {} has the id", w.rank);
            std::process::exit(0);
        }
        "fail1" if w.rank == 1 => {
            std::thread::sleep(Duration::from_millis(200));
            std::process::exit(3);
        }
        _ => {
            std::thread::sleep(Duration::from_secs(60));
            std::process::exit(0);
        }
    }
}

fn child_args() -> (PathBuf, Vec<OsString>) {
    let exe = std::env::current_exe().unwrap();
    let args = ["--exact", "launch_child", "--nocapture", "--test-threads=1"]
        .iter()
        .map(OsString::from)
        .collect();
    (exe, args)
}

/// Both launcher tests share the environment variable for their children; one at a time.
static CHILD_ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn launch_local_ranks_rendezvous_and_succeed() {
    let _g = CHILD_ENV.lock().unwrap();
    let (exe, args) = child_args();
    std::env::set_var("GHOSTV3_DIST_TEST_CHILD", "ok");
    let t0 = Instant::now();
    let r = dist::launch_local(3, &exe, &args, 0);
    std::env::remove_var("GHOSTV3_DIST_TEST_CHILD");
    r.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(8));
}

#[test]
fn launch_local_failing_rank_stops_the_others() {
    let _g = CHILD_ENV.lock().unwrap();
    let (exe, args) = child_args();
    std::env::set_var("GHOSTV3_DIST_TEST_CHILD", "fail1");
    let t0 = Instant::now();
    let r = dist::launch_local_with(3, &exe, &args, 0, Duration::from_secs(10));
    std::env::remove_var("GHOSTV3_DIST_TEST_CHILD");
    let e = r.unwrap_err().to_string();
    assert!(
        e.starts_with("launch: rank 1 exited with exit status: 3; the other ranks stopped in"),
        "{e}"
    );
    // SIGTERM ends the sleeping ranks at once, far inside the 10 s grace.
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[test]
fn launch_local_forwards_sigterm_to_the_ranks() {
    let _g = CHILD_ENV.lock().unwrap();
    let (exe, args) = child_args();
    std::env::set_var("GHOSTV3_DIST_TEST_CHILD", "sleep");
    // The supervisor is preempted a second in (its handlers are installed by then).
    let pid = std::process::id() as i32;
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        // SAFETY: a signal to this very process, whose SIGTERM the launcher now catches.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    });
    let t0 = Instant::now();
    let r = dist::launch_local(2, &exe, &args, 0);
    std::env::remove_var("GHOSTV3_DIST_TEST_CHILD");
    killer.join().unwrap();
    let e = r.unwrap_err().to_string();
    // The test child has no handler, so SIGTERM ends it (a trainer would checkpoint first).
    assert_eq!(
        e,
        "launch: stopped by SIGTERM: rank 0 was killed by signal 15, rank 1 was killed by signal 15"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}
