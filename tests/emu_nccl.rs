//! The CPU emulator's NCCL stand-in (cuda/emu/nccl.cpp, built into target/cuda-emu with
//! libnccl.so.2 linking to it) and its several devices, as real NCCL is used: one process per
//! rank. Each test re-runs this test binary as its ranks (`--exact <child test>`, the role in
//! GHOSTV3_EMU_NCCL_ROLE, the ncclUniqueId in hex in GHOSTV3_EMU_NCCL_ID), with the emulator
//! first on LD_LIBRARY_PATH; every rank opens device `rank` with cudarc and talks through
//! `cudarc::nccl`. Checked: all-reduce (sum, f32; max, i32, in place), broadcast (out of place and
//! in place), all-gather and reduce-scatter give exactly the rank-order results (each rank
//! recomputes every rank's deterministic input), bit-identical on every rank, buffers larger than
//! the shared-memory slot included; a rank that exits before an all-reduce makes the others'
//! all-reduce fail (stream synchronize and ncclCommGetAsyncError) well within the timeout; no
//! segment is left in /dev/shm. The emulator is built by cuda/emu/build.sh (g++, seconds; no
//! NVRTC needed); without g++ the tests print `skipped: ...`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const ROLE: &str = "GHOSTV3_EMU_NCCL_ROLE";
const ID: &str = "GHOSTV3_EMU_NCCL_ID";
const RANK: &str = "GHOSTV3_EMU_NCCL_RANK";
const NRANKS: &str = "GHOSTV3_EMU_NCCL_NRANKS";
/// Elements of the per-rank buffers: 4 slots of the children's slot size and a bit, so that
/// every collective goes through the segment in several chunks.
const SLOT_BYTES: usize = 64 * 1024;
const COUNT: usize = 4 * SLOT_BYTES / 4 + 123;

fn is_child() -> bool {
    std::env::var_os(ROLE).is_some()
}

fn env_usize(name: &str) -> usize {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} not set"))
        .parse()
        .unwrap()
}

/// The emulator folder, built once per test process (None: no g++, the test skips).
fn emulator() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("target/cuda-emu");
        let has_gxx = Command::new("g++")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if has_gxx {
            let o = Command::new("bash")
                .arg(root.join("cuda/emu/build.sh"))
                .output()
                .expect("running cuda/emu/build.sh");
            assert!(
                o.status.success(),
                "building the CUDA emulator failed:\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        if !dir.join("libnccl.so.2").exists() {
            eprintln!(
                "skipped: emulator not built ({} missing; g++ is needed to build it)",
                dir.join("libnccl.so.2").display()
            );
            return None;
        }
        Some(dir)
    })
    .as_deref()
}

/// A fresh ncclUniqueId from the emulator's ncclGetUniqueId, in hex. The test process itself
/// does not have the emulator on its library path, so it loads it by path.
fn new_id_hex(emu: &Path) -> String {
    unsafe {
        let lib = libloading::Library::new(emu.join("libnccl.so.2")).unwrap();
        let get: libloading::Symbol<unsafe extern "C" fn(*mut [u8; 128]) -> i32> =
            lib.get(b"ncclGetUniqueId").unwrap();
        let mut id = [0u8; 128];
        assert_eq!(get(&mut id), 0, "ncclGetUniqueId");
        id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn id_from_hex(hex: &str) -> [std::ffi::c_char; 128] {
    let mut id = [0 as std::ffi::c_char; 128];
    for (i, v) in id.iter_mut().enumerate() {
        *v = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap() as std::ffi::c_char;
    }
    id
}

/// The shared-memory segment an id names (it must be gone once the ranks are up).
fn shm_path(hex: &str) -> PathBuf {
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .take_while(|&b| b != 0)
        .collect();
    let name = String::from_utf8(bytes).unwrap();
    Path::new("/dev/shm").join(name.trim_start_matches('/'))
}

/// Starts rank `rank` of `n`: this binary, running only the child test `child`.
fn spawn_rank(
    emu: &Path,
    child: &str,
    id: &str,
    rank: usize,
    n: usize,
    extra: &[(&str, &str)],
) -> Child {
    let lib_path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", emu.display()),
        _ => emu.display().to_string(),
    };
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", child, "--nocapture", "--test-threads=1"])
        .env(ROLE, child)
        .env(ID, id)
        .env(RANK, rank.to_string())
        .env(NRANKS, n.to_string())
        .env("LD_LIBRARY_PATH", lib_path)
        .env("GHOSTV3_EMU_NCCL_SLOT_BYTES", SLOT_BYTES.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

/// Waits for a rank (killed after `limit`); its exit success and stdout + stderr.
fn finish(mut c: Child, limit: Duration) -> (bool, String) {
    let t = Instant::now();
    while c.try_wait().unwrap().is_none() {
        if t.elapsed() > limit {
            let _ = c.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = c.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

/// Deterministic input of rank `rank`: f32 of mixed signs and magnitudes (so that the order of
/// a sum shows in its bits).
fn input(rank: usize, salt: u64, n: usize) -> Vec<f32> {
    let mut s = (rank as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let m = (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            m * f32::powi(2.0, (z % 17) as i32 - 8)
        })
        .collect()
}

fn digest<T: Copy>(v: &[T]) -> u64 {
    let bytes =
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) };
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{what}: element {i}: got {:e}, want {:e}", got[i], want[i]);
    }
}

/// Child: one rank of the collectives test. Prints `digest <hex>` of all its results.
#[test]
fn child_rank_collectives() {
    if std::env::var(ROLE).as_deref() != Ok("child_rank_collectives") {
        return;
    }
    use cudarc::driver::CudaContext;
    use cudarc::nccl::safe::{Comm, Id, ReduceOp};
    let (rank, n) = (env_usize(RANK), env_usize(NRANKS));
    let id = Id::uninit(id_from_hex(&std::env::var(ID).unwrap()));
    let ctx = CudaContext::new(rank).unwrap();
    assert_eq!(ctx.ordinal(), rank);
    let stream = ctx.new_stream().unwrap();
    let comm = Comm::from_rank(stream.clone(), rank, n, id).unwrap();
    assert_eq!((comm.rank(), comm.world_size()), (rank, n));
    let inputs: Vec<Vec<f32>> = (0..n).map(|r| input(r, 1, COUNT)).collect();
    let mut all = Vec::new();

    // All-reduce, sum: exactly the rank-order sum (x0 + x1) + x2 ...
    let send = stream.clone_htod(&inputs[rank]).unwrap();
    let mut recv = stream.alloc_zeros::<f32>(COUNT).unwrap();
    comm.all_reduce(&send, &mut recv, &ReduceOp::Sum).unwrap();
    let got = stream.clone_dtoh(&recv).unwrap();
    let mut want = inputs[0].clone();
    for x in &inputs[1..] {
        want.iter_mut().zip(x).for_each(|(a, b)| *a += b);
    }
    assert_bits_eq("all_reduce sum", &got, &want);
    all.extend_from_slice(&got);

    // All-reduce in place, max, i32.
    let ints = |r: usize| -> Vec<i32> {
        (0..1000)
            .map(|i| ((i * 7919 + r * 104_729) % 2001) as i32 - 1000)
            .collect()
    };
    let mut buf = stream.clone_htod(&ints(rank)).unwrap();
    comm.all_reduce_in_place(&mut buf, &ReduceOp::Max).unwrap();
    let got_i = stream.clone_dtoh(&buf).unwrap();
    let want_i: Vec<i32> = (0..1000)
        .map(|i| (0..n).map(|r| ints(r)[i]).max().unwrap())
        .collect();
    assert_eq!(got_i, want_i, "all_reduce_in_place max i32");

    // Broadcast from rank 0 (out of place), then in place from the last rank.
    let src = stream.clone_htod(&input(rank, 2, COUNT)).unwrap();
    let mut dst = stream.alloc_zeros::<f32>(COUNT).unwrap();
    comm.broadcast(Some(&src), &mut dst, 0).unwrap();
    let got = stream.clone_dtoh(&dst).unwrap();
    assert_bits_eq("broadcast from 0", &got, &input(0, 2, COUNT));
    all.extend_from_slice(&got);
    let mut buf = stream.clone_htod(&input(rank, 3, COUNT)).unwrap();
    comm.broadcast_in_place(&mut buf, (n - 1) as i32).unwrap();
    let got = stream.clone_dtoh(&buf).unwrap();
    assert_bits_eq(
        "broadcast_in_place from last",
        &got,
        &input(n - 1, 3, COUNT),
    );

    // All-gather: rank r's buffer at r * COUNT.
    let mut gathered = stream.alloc_zeros::<f32>(COUNT * n).unwrap();
    comm.all_gather(&send, &mut gathered).unwrap();
    let got = stream.clone_dtoh(&gathered).unwrap();
    assert_bits_eq("all_gather", &got, &inputs.concat());
    all.extend_from_slice(&got);

    // Reduce-scatter, sum: rank r gets the rank-order sum of block r of every rank's input.
    let block = COUNT / n;
    let mut part = stream.alloc_zeros::<f32>(block).unwrap();
    comm.reduce_scatter(&send.slice(0..block * n), &mut part, &ReduceOp::Sum)
        .unwrap();
    let got = stream.clone_dtoh(&part).unwrap();
    let want: Vec<f32> = (0..block)
        .map(|i| {
            let mut a = inputs[0][rank * block + i];
            for x in &inputs[1..] {
                a += x[rank * block + i];
            }
            a
        })
        .collect();
    assert_bits_eq("reduce_scatter sum", &got, &want);
    stream.synchronize().unwrap();
    drop(comm);
    println!("rank {rank}/{n}: ok, digest {:016x}", digest(&all));
}

/// Child: one rank of the fault test. Rank 1 exits right after joining; rank 0's all-reduce must
/// fail. Prints `detected after <s> s`.
#[test]
fn child_rank_fault() {
    if std::env::var(ROLE).as_deref() != Ok("child_rank_fault") {
        return;
    }
    use cudarc::driver::CudaContext;
    use cudarc::nccl::{result, sys};
    let (rank, n) = (env_usize(RANK), env_usize(NRANKS));
    let ctx = CudaContext::new(rank).unwrap();
    let stream = ctx.new_stream().unwrap();
    let id = sys::ncclUniqueId {
        internal: id_from_hex(&std::env::var(ID).unwrap()),
    };
    let mut comm = std::ptr::null_mut();
    unsafe { result::comm_init_rank(&mut comm, n as i32, id, rank as i32) }.unwrap();
    if rank == 1 {
        println!("rank 1: exiting before the all-reduce");
        std::process::exit(0);
    }
    let send = stream.clone_htod(&input(rank, 1, COUNT)).unwrap();
    let mut recv = stream.alloc_zeros::<f32>(COUNT).unwrap();
    std::thread::sleep(Duration::from_millis(200)); // rank 1 is gone by now
    let t = Instant::now();
    {
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let (s, _rs) = send.device_ptr(&stream);
        let (r, _rr) = recv.device_ptr_mut(&stream);
        let queued = unsafe {
            result::all_reduce(
                s as _,
                r as _,
                COUNT,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                comm,
                stream.cu_stream() as _,
            )
        };
        println!("rank 0: all_reduce queued: {:?}", queued.err());
    }
    let synced = stream.synchronize();
    let secs = t.elapsed().as_secs_f64();
    let mut async_err = sys::ncclResult_t::ncclSuccess;
    unsafe { sys::ncclCommGetAsyncError(comm, &mut async_err) };
    println!("rank 0: synchronize: {synced:?}; async error {async_err:?}");
    assert!(synced.is_err(), "the stream synchronize did not fail");
    assert_ne!(async_err, sys::ncclResult_t::ncclSuccess, "no async error");
    unsafe { result::comm_abort(comm) }.unwrap();
    println!("rank 0: detected after {secs:.3} s");
    // Leave without cudarc's drops (the context saw an error).
    std::process::exit(0);
}

fn collectives(n: usize) {
    if is_child() {
        return;
    }
    let Some(emu) = emulator() else { return };
    let id = new_id_hex(emu);
    let t = Instant::now();
    let kids: Vec<Child> = (0..n)
        .map(|r| {
            spawn_rank(
                emu,
                "child_rank_collectives",
                &id,
                r,
                n,
                &[("GHOSTV3_EMU_NCCL_TIMEOUT_S", "60")],
            )
        })
        .collect();
    let outs: Vec<(bool, String)> = kids
        .into_iter()
        .map(|c| finish(c, Duration::from_secs(180)))
        .collect();
    let mut digests = Vec::new();
    for (r, (ok, text)) in outs.iter().enumerate() {
        println!("--- rank {r}:\n{text}");
        assert!(ok, "rank {r} of {n} failed (output above)");
        let d = text
            .lines()
            .find_map(|l| {
                l.split_once(": ok, digest ")
                    .map(|(_, d)| d.trim().to_string())
            })
            .unwrap_or_else(|| panic!("rank {r}: no digest line (did the child test run?)"));
        digests.push(d);
    }
    assert!(
        digests.iter().all(|d| *d == digests[0]),
        "ranks differ: {digests:?}"
    );
    assert!(
        !shm_path(&id).exists(),
        "{} left behind",
        shm_path(&id).display()
    );
    println!(
        "{n} ranks: all collectives exact and bit-identical ({} elements per rank) in {:.2} s",
        COUNT,
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn two_ranks_collectives() {
    collectives(2);
}

#[test]
fn four_ranks_collectives() {
    collectives(4);
}

#[test]
fn dead_rank_fails_the_all_reduce() {
    if is_child() {
        return;
    }
    let Some(emu) = emulator() else { return };
    let id = new_id_hex(emu);
    let timeout = 5.0;
    let env = [("GHOSTV3_EMU_NCCL_TIMEOUT_S", "5")];
    let t = Instant::now();
    let r0 = spawn_rank(emu, "child_rank_fault", &id, 0, 2, &env);
    let r1 = spawn_rank(emu, "child_rank_fault", &id, 1, 2, &env);
    // Rank 0 first: rank 1 stays a zombie meanwhile (it must count as dead all the same).
    let (ok0, out0) = finish(r0, Duration::from_secs(60));
    let (ok1, out1) = finish(r1, Duration::from_secs(10));
    println!("--- rank 0:\n{out0}--- rank 1:\n{out1}");
    assert!(ok1, "rank 1 failed");
    assert!(ok0, "rank 0 did not see its all-reduce fail (output above)");
    let secs: f64 = out0
        .lines()
        .find_map(|l| l.strip_prefix("rank 0: detected after "))
        .and_then(|s| s.trim_end_matches(" s").parse().ok())
        .expect("no detection time in rank 0's output");
    assert!(
        out0.contains("nccl-emu: rank 1 (pid "),
        "rank 0's error does not name rank 1"
    );
    println!(
        "dead rank 1 detected by rank 0's all-reduce after {secs:.3} s (timeout {timeout} s); \
         whole test {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert!(
        secs < timeout,
        "detection took {secs} s, the timeout is {timeout} s"
    );
    assert!(
        !shm_path(&id).exists(),
        "{} left behind",
        shm_path(&id).display()
    );
}
