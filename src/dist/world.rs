//! Where this process sits in the job: its rank, the world size, its place on the node and
//! the master to rendezvous with, read from torchrun's, Slurm's or our launcher's environment.

use anyhow::{bail, Context, Result};
use std::fmt;

/// Who described the topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// No distributed environment: rank 0 of 1.
    Single,
    Torchrun,
    Slurm,
    /// `ghostv3 train --gpus N` (torchrun's variables plus `GHOSTV3_LAUNCHER=1`).
    Launcher,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Single => "a single process",
            Source::Torchrun => "torchrun",
            Source::Slurm => "Slurm",
            Source::Launcher => "the local launcher",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub source: Source,
    /// Identifies this run so a rendezvous refuses peers (or stale files) of another job:
    /// `GHOSTV3_RUN_TOKEN`, else torchrun's run id, else the Slurm job and step, else the
    /// master address and world size; hashed to 64 bits.
    pub run_token: u64,
}

/// The default port when nothing names one (torchrun's).
pub const DEFAULT_PORT: u16 = 29500;

const TORCHRUN_VARS: [&str; 6] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
];

impl World {
    /// Rank 0 of 1 on this machine.
    pub fn single() -> World {
        World {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_PORT,
            source: Source::Single,
            run_token: fnv1a(b"single"),
        }
    }

    pub fn from_env() -> Result<World> {
        World::from_vars(|k| std::env::var(k).ok())
    }

    /// The topology from an environment lookup (injectable so the rules are testable).
    /// torchrun's variables win over Slurm's; without either, a single process.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<World> {
        // An empty variable counts as unset (`RANK= cmd` is a common way to clear one).
        let get = |k: &str| {
            get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let world = if ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"]
            .iter()
            .any(|k| get(k).is_some())
        {
            torchrun(&get)?
        } else if get("SLURM_PROCID").is_some() {
            slurm(&get)?
        } else {
            let mut w = World::single();
            if let Some(a) = get("MASTER_ADDR") {
                w.master_addr = a;
            }
            if let Some(p) = get("MASTER_PORT") {
                w.master_port = num("MASTER_PORT", &p)?;
            }
            w
        };
        world.validate()?;
        Ok(world)
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Whether this process is one rank of a data-parallel run (NCCL): more than one rank, or
    /// `--gpus 1` (the NCCL path on one GPU). A lone torchrun/Slurm task trains as one process.
    pub fn is_distributed(&self) -> bool {
        self.world_size > 1 || self.source == Source::Launcher
    }

    /// `host:port` of the master.
    pub fn master(&self) -> String {
        if self.master_addr.contains(':') {
            format!("[{}]:{}", self.master_addr, self.master_port) // IPv6 literal
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }

    fn validate(&self) -> Result<()> {
        let vars = match self.source {
            Source::Slurm => [
                "SLURM_PROCID",
                "SLURM_NTASKS",
                "SLURM_LOCALID",
                "SLURM_NTASKS_PER_NODE",
            ],
            _ => ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"],
        };
        if self.world_size == 0 {
            bail!("{} is 0; it must be at least 1", vars[1]);
        }
        if self.local_world_size == 0 {
            bail!("{} is 0; it must be at least 1", vars[3]);
        }
        if self.rank >= self.world_size {
            bail!(
                "{}={} is not below {}={}",
                vars[0],
                self.rank,
                vars[1],
                self.world_size
            );
        }
        if self.local_rank >= self.local_world_size {
            bail!(
                "{}={} is not below {}={}",
                vars[2],
                self.local_rank,
                vars[3],
                self.local_world_size
            );
        }
        if self.local_world_size > self.world_size {
            bail!(
                "{}={} is above {}={}",
                vars[3],
                self.local_world_size,
                vars[1],
                self.world_size
            );
        }
        Ok(())
    }
}

impl fmt::Display for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rank {}/{} (local {}/{}) via {}, master {}",
            self.rank,
            self.world_size,
            self.local_rank,
            self.local_world_size,
            self.source,
            self.master()
        )
    }
}

fn num<T: std::str::FromStr>(var: &str, v: &str) -> Result<T> {
    v.parse()
        .ok()
        .with_context(|| format!("{var}={v:?} is not a non-negative integer"))
}

fn torchrun(get: &impl Fn(&str) -> Option<String>) -> Result<World> {
    let missing: Vec<&str> = TORCHRUN_VARS
        .iter()
        .copied()
        .filter(|k| get(k).is_none())
        .collect();
    if !missing.is_empty() {
        let set: Vec<&str> = TORCHRUN_VARS
            .iter()
            .copied()
            .filter(|k| get(k).is_some())
            .collect();
        bail!(
            "torchrun environment incomplete: {} set but {} missing",
            set.join(", "),
            missing.join(", ")
        );
    }
    let var = |k: &str| get(k).unwrap();
    let launcher = get("GHOSTV3_LAUNCHER").is_some_and(|v| v == "1");
    let master_addr = var("MASTER_ADDR");
    let world_size: usize = num("WORLD_SIZE", &var("WORLD_SIZE"))?;
    let master_port: u16 = num("MASTER_PORT", &var("MASTER_PORT"))?;
    let token = get("GHOSTV3_RUN_TOKEN")
        .or_else(|| get("TORCHELASTIC_RUN_ID").filter(|v| v != "none"))
        .unwrap_or_else(|| format!("{master_addr}:{master_port}/{world_size}"));
    Ok(World {
        rank: num("RANK", &var("RANK"))?,
        world_size,
        local_rank: num("LOCAL_RANK", &var("LOCAL_RANK"))?,
        local_world_size: num("LOCAL_WORLD_SIZE", &var("LOCAL_WORLD_SIZE"))?,
        master_addr,
        master_port,
        source: if launcher {
            Source::Launcher
        } else {
            Source::Torchrun
        },
        run_token: fnv1a(token.as_bytes()),
    })
}

fn slurm(get: &impl Fn(&str) -> Option<String>) -> Result<World> {
    let need = |k: &str| get(k).with_context(|| format!("Slurm environment without {k}"));
    let rank: usize = num("SLURM_PROCID", &need("SLURM_PROCID")?)?;
    let (ntasks_var, ntasks) = match get("SLURM_NTASKS") {
        Some(v) => ("SLURM_NTASKS", v),
        None => (
            "SLURM_NPROCS",
            need("SLURM_NPROCS").context("Slurm environment without SLURM_NTASKS")?,
        ),
    };
    let world_size: usize = num(ntasks_var, &ntasks)?;
    let local_rank: usize = num("SLURM_LOCALID", &need("SLURM_LOCALID")?)?;
    let local_world_size = slurm_local_world_size(get, world_size)?;
    let nodelist = [
        "SLURM_STEP_NODELIST",
        "SLURM_JOB_NODELIST",
        "SLURM_NODELIST",
    ]
    .iter()
    .find_map(|k| get(k).map(|v| (*k, v)));
    let master_addr = match (get("MASTER_ADDR"), nodelist) {
        (Some(a), _) => a,
        (None, Some((k, list))) => first_host(&list).with_context(|| format!("{k}={list:?}"))?,
        (None, None) if world_size == 1 => "127.0.0.1".into(),
        (None, None) => {
            bail!("Slurm environment without MASTER_ADDR or SLURM_JOB_NODELIST to find the master")
        }
    };
    let job_id = get("SLURM_JOB_ID").or_else(|| get("SLURM_JOBID"));
    let master_port = match (get("MASTER_PORT"), &job_id) {
        (Some(p), _) => num("MASTER_PORT", &p)?,
        (None, Some(j)) => {
            let j: u64 = num("SLURM_JOB_ID", j)?;
            // Two jobs sharing a node get different ports; above the usual ephemeral floor
            // of well-known services, below Linux's ephemeral range (32768+).
            20000 + (j % 20000) as u16
        }
        (None, None) => DEFAULT_PORT,
    };
    let token = match (get("GHOSTV3_RUN_TOKEN"), &job_id) {
        (Some(t), _) => t,
        (None, Some(j)) => format!(
            "slurm {j}.{}",
            get("SLURM_STEP_ID")
                .or_else(|| get("SLURM_STEPID"))
                .unwrap_or_default()
        ),
        (None, None) => format!("{master_addr}:{master_port}/{world_size}"),
    };
    Ok(World {
        rank,
        world_size,
        local_rank,
        local_world_size,
        master_addr,
        master_port,
        source: Source::Slurm,
        run_token: fnv1a(token.as_bytes()),
    })
}

/// Tasks on this node: SLURM_NTASKS_PER_NODE, else SLURM_TASKS_PER_NODE ("4(x2),3": one
/// count per node, this node's picked by SLURM_NODEID), else the tasks spread over the nodes.
fn slurm_local_world_size(
    get: &impl Fn(&str) -> Option<String>,
    world_size: usize,
) -> Result<usize> {
    let node: Option<usize> = match get("SLURM_NODEID") {
        Some(v) => Some(num("SLURM_NODEID", &v)?),
        None => None,
    };
    for k in ["SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"] {
        if let Some(v) = get(k) {
            let counts = tasks_per_node(&v).with_context(|| format!("{k}={v:?}"))?;
            let pick = match node {
                Some(n) if n < counts.len() => counts[n],
                _ if counts.iter().all(|&c| c == counts[0]) => counts[0],
                _ => bail!("{k}={v:?} differs between nodes and SLURM_NODEID is not set"),
            };
            return Ok(pick);
        }
    }
    let nodes = ["SLURM_JOB_NUM_NODES", "SLURM_NNODES"]
        .iter()
        .find_map(|k| get(k).map(|v| (*k, v)));
    match nodes {
        Some((k, v)) => {
            let n: usize = num(k, &v)?;
            if n == 0 {
                bail!("{k} is 0");
            }
            Ok(world_size.div_ceil(n))
        }
        None => Ok(world_size),
    }
}

/// Slurm's per-node task counts: "4(x2),3" -> [4, 4, 3]; "4,4" -> [4, 4]; "8" -> [8].
pub fn tasks_per_node(s: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let (count, times) = match part.split_once('(') {
            Some((c, rest)) => {
                let t = rest
                    .strip_prefix('x')
                    .and_then(|r| r.strip_suffix(')'))
                    .with_context(|| format!("{part:?} is not of the form N(xM)"))?;
                (
                    c,
                    t.parse::<usize>()
                        .ok()
                        .with_context(|| format!("bad repeat in {part:?}"))?,
                )
            }
            None => (part, 1),
        };
        let c: usize = count
            .parse()
            .ok()
            .with_context(|| format!("{part:?} is not a task count"))?;
        out.extend(std::iter::repeat_n(c, times));
    }
    if out.is_empty() {
        bail!("no task counts");
    }
    Ok(out)
}

/// The first host of a Slurm hostlist without expanding the whole list.
pub fn first_host(list: &str) -> Result<String> {
    let first = split_top(list)
        .into_iter()
        .find(|p| !p.is_empty())
        .with_context(|| format!("empty hostlist {list:?}"))?;
    Ok(expand_one(first, true)?.swap_remove(0))
}

/// Slurm's compressed hostlist expanded: "gpu[003-005,010],login1" -> gpu003, gpu004,
/// gpu005, gpu010, login1. Zero padding follows the range's lower bound, as Slurm does;
/// several brackets in one name ("r[1-2]n[1-2]") give their product.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for part in split_top(list) {
        if !part.is_empty() {
            out.extend(expand_one(part, false)?);
        }
    }
    Ok(out)
}

/// Splits at the commas outside brackets.
fn split_top(list: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(list[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(list[start..].trim());
    parts
}

/// One name with brackets expanded; `first_only` stops at the first of each bracket.
fn expand_one(name: &str, first_only: bool) -> Result<Vec<String>> {
    let Some(open) = name.find('[') else {
        if name.contains(']') {
            bail!("unbalanced ']' in {name:?}");
        }
        return Ok(vec![name.to_string()]);
    };
    let close = open
        + name[open..]
            .find(']')
            .with_context(|| format!("unclosed '[' in {name:?}"))?;
    let (prefix, body, rest) = (&name[..open], &name[open + 1..close], &name[close + 1..]);
    let mut items = Vec::new();
    for r in body.split(',').map(str::trim) {
        let (lo, hi) = r.split_once('-').unwrap_or((r, r));
        let (a, b): (u64, u64) = match (lo.parse(), hi.parse()) {
            (Ok(a), Ok(b)) if a <= b => (a, b),
            _ => bail!("bad range {r:?} in {name:?}"),
        };
        let width = lo.len();
        for v in a..=b {
            items.push(format!("{v:0width$}"));
            if first_only {
                break;
            }
        }
        if first_only {
            break;
        }
    }
    let tails = expand_one(rest, first_only)?;
    let mut out = Vec::with_capacity(items.len() * tails.len());
    for i in &items {
        for t in &tails {
            out.push(format!("{prefix}{i}{t}"));
        }
    }
    Ok(out)
}

/// FNV-1a: a stable 64-bit hash (the same in every process and Rust version).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
