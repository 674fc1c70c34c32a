//! Kernel arguments and the launch call. Buffers are passed as raw device pointers: every
//! kernel runs on the one stream of its `Gpu`, so stream order alone keeps a buffer alive and
//! unchanged until the kernels that read it have run (also after it went back to the pool).

use super::alloc::DevBuf;
use super::device::Gpu;
use super::sources::{self, Access, ParamKind};
use crate::backend::trace;
use anyhow::{anyhow, ensure, Result};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

/// LAMB's per-step scalars, laid out as `struct LambCoef` in cuda/optim.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LambCoef {
    pub one_minus_b1: f32,
    pub b2: f32,
    pub one_minus_b2: f32,
    pub bc1: f32,
    pub sqrt_bc2: f32,
    pub eps: f32,
    pub neg_lr: f32,
    pub ema_d: f32,
    pub ema_w: f32,
    pub max_grad_norm: f32,
    pub do_ema: i32,
}

// SAFETY: plain-old-data with the C layout of the kernel's struct.
unsafe impl DeviceRepr for LambCoef {}

/// One kernel argument.
#[derive(Clone, Copy)]
pub enum Arg {
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    /// A device pointer (0 for a kernel's optional null argument) and the bytes of the
    /// buffer or view behind it (what the traffic count charges the kernel).
    Ptr(u64, u64),
    Lamb(LambCoef),
}

/// The device pointer of a buffer.
pub fn ptr<T>(b: &DevBuf<T>) -> Arg {
    Arg::Ptr(b.device_ptr(), (b.len() * std::mem::size_of::<T>()) as u64)
}

/// The null pointer of an absent optional argument.
pub const NULL: Arg = Arg::Ptr(0, 0);

/// The device pointer of an optional buffer, null when absent.
pub fn opt_ptr<T>(b: Option<&DevBuf<T>>) -> Arg {
    b.map_or(NULL, ptr)
}

pub fn i32a(v: usize) -> Arg {
    Arg::I32(i32::try_from(v).expect("size fits a 32-bit kernel argument"))
}

pub fn i64a(v: usize) -> Arg {
    Arg::I64(v as i64)
}

impl Arg {
    pub fn kind(&self) -> ParamKind {
        match self {
            Arg::I32(_) => ParamKind::I32,
            Arg::I64(_) => ParamKind::I64,
            Arg::F32(_) => ParamKind::F32,
            Arg::F64(_) => ParamKind::F64,
            Arg::Ptr(..) => ParamKind::Ptr,
            Arg::Lamb(_) => ParamKind::Lamb,
        }
    }
}

/// Checks an argument list against the kernel's declaration in its source: a wrong count or
/// type would otherwise be read as garbage by the kernel, silently.
pub fn check_args(module: &str, name: &str, args: &[Arg]) -> Result<()> {
    let src = sources::MODULES
        .iter()
        .find(|(m, _)| *m == module)
        .ok_or_else(|| anyhow!("no kernel module {module}"))?
        .1;
    let want = sources::kernel_params(src, name).ok_or_else(|| {
        anyhow!("no kernel {name} with known parameter types in cuda/{module}.cu")
    })?;
    let got: Vec<ParamKind> = args.iter().map(Arg::kind).collect();
    if want != got {
        return Err(anyhow!(
            "launch of {module}::{name}: kernel takes {want:?}, launcher passes {got:?}"
        ));
    }
    Ok(())
}

impl Gpu {
    /// Launches `module::name` with `args` (in the kernel's parameter order).
    pub(crate) fn launch(
        &self,
        module: &'static str,
        name: &'static str,
        cfg: LaunchConfig,
        args: &[Arg],
    ) -> Result<()> {
        let (f, want) = self.func(module, name)?;
        if want.len() != args.len() || want.iter().zip(args).any(|(w, a)| *w != a.kind()) {
            // The slow path only to build the message.
            check_args(module, name, args)?;
        }
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            match a {
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::F64(v) => b.arg(v),
                Arg::Ptr(v, _) => b.arg(v),
                Arg::Lamb(v) => b.arg(v),
            };
        }
        // SAFETY: argument lists mirror the kernels' signatures in cuda/*.cu, and every launcher
        // checks that its buffers hold the elements the kernel indexes.
        unsafe { b.launch(cfg) }.map_err(|e| anyhow!("launch of {name}: {e}"))?;
        if trace::is_on() {
            record_traffic(module, name, args)?;
        }
        Ok(())
    }
}

/// Charges a launch with the bytes of its buffer arguments, read or written as the kernel's
/// declaration says (`sources::Access`).
fn record_traffic(module: &'static str, name: &'static str, args: &[Arg]) -> Result<()> {
    let src = sources::MODULES
        .iter()
        .find(|(m, _)| *m == module)
        .ok_or_else(|| anyhow!("no kernel module {module}"))?
        .1;
    let access = sources::kernel_access(src, name)
        .ok_or_else(|| anyhow!("no kernel {name} in cuda/{module}.cu"))?;
    let (mut read, mut written) = (0, 0);
    for (a, acc) in args.iter().zip(access) {
        if let Arg::Ptr(_, bytes) = a {
            match acc {
                Access::Read => read += bytes,
                Access::Write => written += bytes,
                Access::ReadWrite => {
                    read += bytes;
                    written += bytes;
                }
                Access::Value => {}
            }
        }
    }
    trace::record(module, name, read, written, 0);
    Ok(())
}

/// Fails unless the buffer (or view) holds at least `n` values (every launcher checks its
/// buffers before a kernel could read or write past them).
pub(crate) fn need<T>(what: &str, b: &DevBuf<T>, n: usize) -> Result<()> {
    ensure!(
        b.len() >= n,
        "{what}: buffer holds {} values, needs {n}",
        b.len()
    );
    Ok(())
}

/// Block-per-row / block-per-channel launch shapes (256 threads).
pub(crate) fn blocks(x: usize, y: usize, z: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x as u32, y as u32, z as u32),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}
