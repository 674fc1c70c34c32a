//! The CUDA backend: hand-written kernels (`cuda/*.cu`) compiled at run time with NVRTC for the
//! device's own architecture and cached on disk, launched on one stream with device memory from
//! a caching pool, and cuBLAS for the GEMMs (1x1 convs, im2col convs, linear).
//!
//! Everything is loaded dynamically (cudarc's `dynamic-loading`): the crate builds and runs
//! without any CUDA library, and [`Gpu::new`] says in one line what is missing (driver, device,
//! NVRTC, cuBLAS) instead of panicking. The launchers (`impl Gpu` blocks, one file per kernel
//! source in `cuda/`) take the same arguments as the CPU kernels so that tests compare the two
//! one to one (tests/cuda_ops.rs): NCHW f32, weights [C_out, C_in/groups, kh, kw], `ConvGeom`
//! for convolutions, (n, c, hw) for BatchNorm, [N, C] logits for the losses.
//!
//! The machinery:
//! - `device`: [`Gpu`] (context, stream, cuBLAS, the loaded modules), uploads and downloads;
//! - [`alloc`]: the caching device allocator ([`DevBuf`], [`View`], [`ViewMut`], [`PoolStats`]);
//! - [`nvrtc`], [`sources`]: run-time compilation of `cuda/*.cu` and its disk cache;
//! - [`launch`]: kernel arguments, the checked launch, and the helpers every launcher shares
//!   (`need`, `blocks`);
//! - `backend`: [`Gpu`] as a backend of `backend::api` ([`Cuda`]);
//! - [`prefetch`]: host-to-device copies of the next batches on a second stream.
//!
//! The launchers, each file for the `cuda/` source of the same name:
//! - [`elementwise`] (elementwise.cu): copies, fills, activations, add/mul/scale, channel
//!   products and sums, row sums, the EMA blend;
//! - [`batch_norm`] (batch_norm.cu): BatchNorm forward, backward and running statistics
//!   ([`BnSaved`], [`DeviceStats`], [`BnGrads`]);
//! - [`conv`] (conv.cu + cuBLAS): conv2d forward and backward, linear ([`ConvGradsGpu`]);
//! - [`pool`] (pool.cu): average, global average and max pooling ([`MaxPoolGeom`]), nearest
//!   upsample, channel concat;
//! - [`channel`] (channel.cu): channel slicing and shuffle;
//! - [`loss`] (loss.cu): cross-entropy and the KD loss;
//! - [`rep_conv`] (rep_conv.cu): the fused re-parameterized depth-wise conv ([`RepDwGeom`]);
//! - [`rep_conv_1x1`] (rep_conv_1x1.cu): the fused re-parameterized 1x1 conv ([`Rep1x1Geom`]);
//! - [`dfc`] (dfc.cu): the DFC attention gate;
//! - [`optim`] (optim.cu): LAMB, AdamW and SGD on the device ([`OptimPlan`]), the EMA blend;
//! - [`nccl`]: the data-parallel collectives (NCCL) on the device's stream;
//! - [`sync_bn`]: BatchNorm statistics summed over the ranks (`train.sync_bn`).

pub mod alloc;
mod backend;
pub mod batch_norm;
pub mod channel;
pub mod conv;
mod device;
pub mod dfc;
pub mod elementwise;
pub mod launch;
pub mod loss;
pub mod nccl;
pub mod nvrtc;
pub mod optim;
pub mod pool;
pub mod prefetch;
pub mod rep_conv;
pub mod rep_conv_1x1;
pub mod sources;
pub mod sync_bn;

pub use alloc::{DevBuf, PoolStats, View, ViewMut};
pub use backend::Cuda;
pub use batch_norm::{BnGrads, BnSaved, DeviceStats};
pub use conv::ConvGradsGpu;
pub use device::{cublas_present, device_count, driver_present, unavailable_reason, DBuf, Gpu};
pub use optim::OptimPlan;
pub use pool::MaxPoolGeom;
pub use rep_conv::{RepDwGeom, RepDwGrads, RepDwSaved};
pub use rep_conv_1x1::{Rep1x1Geom, Rep1x1Grads, Rep1x1Saved};

static ORDINAL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static GPU: std::sync::OnceLock<Result<Gpu, String>> = std::sync::OnceLock::new();

/// Chooses the process's GPU (a data-parallel rank's local rank) before its first use.
pub fn select_device(ordinal: usize) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    let was = ORDINAL.swap(ordinal, Ordering::SeqCst);
    if GPU.get().is_some() && was != ordinal {
        ORDINAL.store(was, Ordering::SeqCst);
        anyhow::bail!(
            "GPU {was} is already in use by this process; cannot switch to GPU {ordinal}"
        );
    }
    Ok(())
}

/// The process-wide GPU (device 0, or the one [`select_device`] chose) that device tensors and
/// the dispatching ops use, opened on first call; the error says in one line why there is none.
pub fn global() -> Result<&'static Gpu, String> {
    GPU.get_or_init(|| {
        let ordinal = ORDINAL.load(std::sync::atomic::Ordering::SeqCst);
        Gpu::new(ordinal).map_err(|e| format!("{e:#}"))
    })
    .as_ref()
    .map_err(|e| e.clone())
}

/// What `ghostv3 info --device cuda` reports: the GPU through NVML, and whether the kernels
/// compile and load; and whether all of it works. Never panics; each missing piece is a line.
pub fn report() -> (String, bool) {
    let mut ok = false;
    let mut out = String::new();
    match nvml_summary() {
        Ok(s) => out += &s,
        Err(e) => out += &format!("NVML: {e}\n"),
    }
    match Gpu::new(0) {
        Err(e) => out += &format!("CUDA: {e:#}\n"),
        Ok(gpu) => {
            let (ma, mi) = gpu.compute_capability();
            let (va, vb) = gpu.nvrtc().version();
            out += &format!(
                "CUDA device 0: {} (sm_{ma}{mi}, {} SMs); NVRTC {va}.{vb} ({}), target {}\n",
                gpu.name(),
                gpu.multiprocessors(),
                gpu.nvrtc().path(),
                gpu.target().arch_flag()
            );
            let t = std::time::Instant::now();
            match gpu.load_all() {
                Ok(mods) => {
                    let cached = mods.iter().filter(|(_, hit)| *hit).count();
                    out += &format!(
                        "kernels: {} modules compile and load ({cached} from the disk cache, {:.1} s)\n",
                        mods.len(),
                        t.elapsed().as_secs_f64()
                    );
                    ok = true;
                }
                Err(e) => out += &format!("kernels: FAILED: {e:#}\n"),
            }
        }
    }
    (out, ok)
}

/// GPU name, memory and utilization through NVML (nvml-wrapper loads libnvidia-ml at run time
/// and returns an error when it is missing).
fn nvml_summary() -> anyhow::Result<String> {
    let nvml =
        nvml_wrapper::Nvml::init().map_err(|e| anyhow::anyhow!("no NVIDIA driver found ({e})"))?;
    let n = nvml.device_count()?;
    let mut s = format!(
        "NVIDIA driver {}, {n} GPU(s)\n",
        nvml.sys_driver_version().unwrap_or_else(|_| "?".into())
    );
    for i in 0..n {
        let d = nvml.device_by_index(i)?;
        let mem = d.memory_info()?;
        let util = d
            .utilization_rates()
            .map(|u| format!("{}% GPU, {}% memory", u.gpu, u.memory))
            .unwrap_or_else(|e| format!("utilization unavailable ({e})"));
        s += &format!(
            "GPU {i}: {}, {:.1} GiB total, {:.1} GiB used, {util}\n",
            d.name()?,
            mem.total as f64 / (1u64 << 30) as f64,
            mem.used as f64 / (1u64 << 30) as f64
        );
    }
    Ok(s)
}
