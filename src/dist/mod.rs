//! Data-parallel process topology, PyTorch-DDP style: one process per GPU.
//!
//! - [`world`]: where this process sits (rank, world size, node-local rank, the master),
//!   read from torchrun's, Slurm's or our launcher's environment.
//! - [`rendezvous`]: rank 0 hands its NCCL unique id (an opaque 128 bytes here; this layer
//!   makes no CUDA or NCCL call) to every rank, over TCP or a shared directory, naming the
//!   ranks that never arrived.
//! - [`launch`]: `ghostv3 train --gpus N`, which starts and supervises one child per GPU on
//!   this machine.
//!
//! Only std and crates below it: the training loop builds on this, never the reverse.

pub mod launch;
pub mod rendezvous;
pub mod world;

pub use launch::{free_port, launch_local, launch_local_with, DEFAULT_GRACE};
pub use rendezvous::{file, tcp, NcclId, Rendezvous};
pub use world::{expand_hostlist, first_host, tasks_per_node, Source, World, DEFAULT_PORT};
