//! Hands rank 0's NCCL unique id (an opaque 128-byte blob) to every rank, over TCP to the
//! master or through a shared run directory. Both name the ranks that never arrived.

use super::world::World;
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub type NcclId = [u8; 128];

const MAGIC: &[u8; 4] = b"GV3R";
const VERSION: u16 = 1;
/// magic, version u16, rank u32, world size u32, run token u64 (little-endian).
const HELLO_LEN: usize = 4 + 2 + 4 + 4 + 8;
const POLL: Duration = Duration::from_millis(20);

/// How the ranks meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rendezvous {
    /// Rank 0 listens on MASTER_ADDR:MASTER_PORT.
    Tcp,
    /// A directory every rank sees (a shared filesystem).
    File(PathBuf),
}

impl Rendezvous {
    /// Rank 0 passes its id; the others pass `None` and get rank 0's.
    pub fn exchange(
        &self,
        world: &World,
        id_on_rank0: Option<NcclId>,
        timeout: Duration,
    ) -> Result<NcclId> {
        match self {
            Rendezvous::Tcp => tcp(world, id_on_rank0, timeout),
            Rendezvous::File(dir) => file(dir, world, id_on_rank0, timeout),
        }
    }
}

fn rank0_id(world: &World, id: Option<NcclId>) -> Result<NcclId> {
    id.with_context(|| {
        format!(
            "rendezvous: rank 0 of {} was given no NCCL id to share",
            world.world_size
        )
    })
}

/// "3, 5" for the ranks in 1..world_size not in `arrived`.
fn missing(world: &World, arrived: &BTreeSet<usize>) -> String {
    (1..world.world_size)
        .filter(|r| !arrived.contains(r))
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn plural(world: &World, arrived: &BTreeSet<usize>) -> &'static str {
    if world.world_size - 1 - arrived.len() == 1 {
        "rank"
    } else {
        "ranks"
    }
}

/// The id over TCP: rank 0 binds 0.0.0.0:MASTER_PORT and answers each peer's hello with the
/// id at once; it returns when all world_size-1 peers have been answered. Peers retry
/// connecting until `timeout` (the master may start later).
pub fn tcp(world: &World, id_on_rank0: Option<NcclId>, timeout: Duration) -> Result<NcclId> {
    if world.rank == 0 {
        let id = rank0_id(world, id_on_rank0)?;
        if world.world_size > 1 {
            serve(world, &id, timeout)?;
        }
        Ok(id)
    } else {
        fetch(world, timeout)
    }
}

fn serve(world: &World, id: &NcclId, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let listener = TcpListener::bind(("0.0.0.0", world.master_port))
        .with_context(|| format!("rendezvous: cannot listen on port {}", world.master_port))?;
    // Nonblocking, so the deadline is checked between connections.
    listener.set_nonblocking(true)?;
    let mut arrived = BTreeSet::new();
    while arrived.len() < world.world_size - 1 {
        let now = Instant::now();
        if now >= deadline {
            bail!(
                "rendezvous: {} {} of {} did not arrive at {} within {} s",
                plural(world, &arrived),
                missing(world, &arrived),
                world.world_size,
                world.master(),
                timeout.as_secs_f64()
            );
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Some(rank) = greet(world, id, stream, peer, deadline, &arrived)? {
                    arrived.insert(rank);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("rendezvous: accept failed"),
        }
    }
    Ok(())
}

/// One connection at the master: `Some(rank)` once answered; `None` for a connection that
/// is not one of ours (a port scanner, another job's peer: refused, the master goes on).
/// Our own job misconfigured (world size, duplicate rank) is an error on both sides.
fn greet(
    world: &World,
    id: &NcclId,
    mut s: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    arrived: &BTreeSet<usize>,
) -> Result<Option<usize>> {
    s.set_nonblocking(false)?;
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_millis(100), Duration::from_secs(5));
    s.set_read_timeout(Some(wait))?;
    s.set_write_timeout(Some(wait))?;
    let mut h = [0u8; HELLO_LEN];
    if s.read_exact(&mut h).is_err() || &h[..4] != MAGIC {
        return Ok(None);
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    let rank = u32::from_le_bytes(h[6..10].try_into().unwrap()) as usize;
    let size = u32::from_le_bytes(h[10..14].try_into().unwrap()) as usize;
    let token = u64::from_le_bytes(h[14..22].try_into().unwrap());
    let refuse = |mut s: TcpStream, why: &str| {
        let mut msg = vec![1u8];
        msg.extend_from_slice(&(why.len() as u16).to_le_bytes());
        msg.extend_from_slice(why.as_bytes());
        let _ = s.write_all(&msg);
    };
    if version != VERSION {
        let why = format!("protocol version {version}, the master speaks {VERSION}");
        refuse(s, &why);
        eprintln!("rendezvous: refused {peer}: {why}");
        return Ok(None);
    }
    if token != world.run_token {
        let why = format!(
            "run token {token:016x} is not this job's ({:016x}); another job uses {}",
            world.run_token,
            world.master()
        );
        refuse(s, &why);
        eprintln!("rendezvous: refused {peer} (rank {rank}): {why}");
        return Ok(None);
    }
    if size != world.world_size {
        let why = format!(
            "rank {rank} at {peer} has world size {size}, rank 0 has {}",
            world.world_size
        );
        refuse(s, &why);
        bail!("rendezvous: {why}");
    }
    if rank == 0 || rank >= size || arrived.contains(&rank) {
        let why = format!("rank {rank} at {peer} arrived twice (or is out of range)");
        refuse(s, &why);
        bail!("rendezvous: {why}");
    }
    let mut msg = vec![0u8];
    msg.extend_from_slice(id);
    s.write_all(&msg)
        .with_context(|| format!("rendezvous: cannot answer rank {rank} at {peer}"))?;
    Ok(Some(rank))
}

/// A peer: connect (retrying), say hello, read the id or the master's refusal.
fn fetch(world: &World, timeout: Duration) -> Result<NcclId> {
    let deadline = Instant::now() + timeout;
    let unreachable = || {
        anyhow::anyhow!(
            "rendezvous: cannot reach the master at {} within {} s (is rank 0 running?)",
            world.master(),
            timeout.as_secs_f64()
        )
    };
    let mut hello = Vec::with_capacity(HELLO_LEN);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&(world.rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world.world_size as u32).to_le_bytes());
    hello.extend_from_slice(&world.run_token.to_le_bytes());
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(unreachable());
        }
        // Resolved on each try: the master's name may appear in DNS late.
        let addr = (world.master_addr.as_str(), world.master_port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next());
        let Some(addr) = addr else {
            std::thread::sleep(Duration::from_millis(200).min(left));
            continue;
        };
        let Ok(mut s) = TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(2))) else {
            std::thread::sleep(Duration::from_millis(100).min(left));
            continue;
        };
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        s.set_write_timeout(Some(left.max(Duration::from_millis(1))))?;
        if s.write_all(&hello).is_err() {
            continue;
        }
        let mut status = [0u8; 1];
        match s.read_exact(&mut status) {
            Ok(()) => {}
            // A closed connection: not our master (yet); try again.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                std::thread::sleep(Duration::from_millis(100).min(left));
                continue;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!(
                    "rendezvous: the master at {} accepted but did not answer within {} s",
                    world.master(),
                    timeout.as_secs_f64()
                )
            }
            Err(_) => continue,
        }
        if status[0] == 0 {
            let mut id = [0u8; 128];
            s.read_exact(&mut id)
                .with_context(|| format!("rendezvous: short answer from {}", world.master()))?;
            return Ok(id);
        }
        let mut len = [0u8; 2];
        let mut why = vec![0u8; 0];
        if s.read_exact(&mut len).is_ok() {
            why.resize(u16::from_le_bytes(len) as usize, 0);
            let _ = s.read_exact(&mut why);
        }
        bail!(
            "rendezvous: the master at {} refused rank {}: {}",
            world.master(),
            world.rank,
            String::from_utf8_lossy(&why)
        );
    }
}

/// The id through a shared directory. Rank 0 writes `dir/nccl-id` atomically; every other
/// rank polls for it, then writes `dir/rank-<i>.arrived`; rank 0 returns once all arrived,
/// removing the files so a rerun into the same directory starts clean. Both files carry the
/// run token and world size: the id of an earlier run that died mid-rendezvous (another
/// token) is ignored by the peers, and rank 0 removes such leftovers before it writes. An
/// earlier run with the *same* token cannot be told apart, hence a token unique per run.
pub fn file(
    dir: &Path,
    world: &World,
    id_on_rank0: Option<NcclId>,
    timeout: Duration,
) -> Result<NcclId> {
    let deadline = Instant::now() + timeout;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("rendezvous: cannot create {}", dir.display()))?;
    let id_path = dir.join("nccl-id");
    let header = format!(
        "ghostv3 rendezvous v{VERSION} token {:016x} world_size {}",
        world.run_token, world.world_size
    );
    if world.rank == 0 {
        let id = rank0_id(world, id_on_rank0)?;
        remove_stale(dir)?;
        write_atomic(&id_path, format!("{header}\n{}\n", hex(&id)).as_bytes())?;
        let mut arrived = BTreeSet::new();
        loop {
            for r in 1..world.world_size {
                if !arrived.contains(&r)
                    && arrival_ok(&dir.join(format!("rank-{r}.arrived")), world)
                {
                    arrived.insert(r);
                }
            }
            if arrived.len() == world.world_size - 1 {
                // Every peer has read the id (it writes its arrival after): safe to clean.
                remove_stale(dir)?;
                return Ok(id);
            }
            if Instant::now() >= deadline {
                bail!(
                    "rendezvous: {} {} of {} did not arrive in {} within {} s",
                    plural(world, &arrived),
                    missing(world, &arrived),
                    world.world_size,
                    dir.display(),
                    timeout.as_secs_f64()
                );
            }
            std::thread::sleep(POLL);
        }
    }
    loop {
        if let Ok(text) = std::fs::read_to_string(&id_path) {
            if let Some(id) = parse_id(&text, world, &id_path)? {
                write_atomic(
                    &dir.join(format!("rank-{}.arrived", world.rank)),
                    format!("{header}\n").as_bytes(),
                )?;
                return Ok(id);
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "rendezvous: rank {} found no NCCL id from rank 0 at {} within {} s (is rank 0 running, and is the directory shared?)",
                world.rank,
                id_path.display(),
                timeout.as_secs_f64()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// (token, world size) of a rendezvous file's first line.
fn parse_header(line: &str) -> Option<(u64, usize)> {
    let w: Vec<&str> = line.split_whitespace().collect();
    match w.as_slice() {
        ["ghostv3", "rendezvous", v, "token", t, "world_size", n] if *v == "v1" => {
            Some((u64::from_str_radix(t, 16).ok()?, n.parse().ok()?))
        }
        _ => None,
    }
}

/// `None` for a stale id (another run's token: rank 0 will replace it).
fn parse_id(text: &str, world: &World, path: &Path) -> Result<Option<NcclId>> {
    let mut lines = text.lines();
    let Some((token, size)) = lines.next().and_then(parse_header) else {
        return Ok(None);
    };
    if token != world.run_token {
        return Ok(None);
    }
    if size != world.world_size {
        bail!(
            "rendezvous: {} has world size {size}, rank {} has {}",
            path.display(),
            world.rank,
            world.world_size
        );
    }
    let hexs = lines.next().unwrap_or("").trim();
    let bytes = unhex(hexs)
        .filter(|b| b.len() == 128)
        .with_context(|| format!("rendezvous: {} holds no 128-byte id", path.display()))?;
    Ok(Some(bytes.try_into().unwrap()))
}

fn arrival_ok(path: &Path, world: &World) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.lines().next().and_then(parse_header))
        .is_some_and(|(t, n)| t == world.run_token && n == world.world_size)
}

/// Removes the id and every arrival. At rank 0's start any arrival is an earlier run's: a
/// peer of this run writes its arrival only after reading this run's id.
fn remove_stale(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)
        .with_context(|| format!("rendezvous: cannot read {}", dir.display()))?
    {
        let p = e?.path();
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        if name == "nccl-id" || (name.starts_with("rank-") && name.ends_with(".arrived")) {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("rendezvous: cannot remove {}", p.display()))
                }
            }
        }
    }
    Ok(())
}

/// Temp file beside the target, then rename: a reader sees the old file or the whole new one.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}-{:?}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id(),
        std::thread::current().id()
    ));
    let mut f = std::fs::File::create(&tmp)
        .with_context(|| format!("rendezvous: cannot create {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("rendezvous: cannot rename to {}", path.display()))?;
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}
