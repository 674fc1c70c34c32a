//! Where a tensor's values live, and the one place that decides which backend runs an op.
//!
//! A tensor's storage is host memory (`Arc<Vec<T>>`) or a device buffer (`Arc<DBuf>`, with its
//! element type), each with an offset so that a tensor can view a flat buffer. An op runs on
//! the device of its inputs ([`placement`]: the CUDA device when any input is there, and then
//! host inputs such as targets are copied up); [`on_backend!`] expands an op's body once per
//! backend with `$b` the backend (`&Cpu` or `&Gpu`), whose [`Place::get`] gives each input as
//! that backend's buffer and [`Place::out`] wraps a result as a tensor. No other file outside
//! `backend/` looks at where a tensor lives.

use super::Tensor;
use crate::backend::api::{Backend, HostStats};
use crate::backend::cpu::Cpu;
use crate::backend::cuda::{self, Cuda, DBuf, DeviceStats, Gpu, View};
use crate::backend::{DType, Elem};
use std::borrow::Cow;
use std::ops::Deref;
use std::sync::Arc;

/// A compute device: the CPU or the (process-wide) CUDA GPU. Spelled `cpu` / `cuda` in recipes
/// (`train.device`) and on the command line (`--device`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }

    /// Whether the device can be used here (the CUDA GPU opens on first use); the error says
    /// in one line what is missing.
    pub fn check(self) -> anyhow::Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda => cuda::global()
                .map(|_| ())
                .map_err(|e| anyhow::anyhow!("{e}")),
        }
    }
}

/// One line on the device for logs: the GPU's name and architecture.
pub fn describe(device: Device) -> String {
    match (device, cuda::global()) {
        (Device::Cuda, Ok(g)) => {
            let (ma, mi) = g.compute_capability();
            format!("CUDA {} (sm_{ma}{mi})", g.name())
        }
        (d, _) => d.name().to_string(),
    }
}

/// Batches of (images, payload) on a device.
pub type Batches<P> = Box<dyn Iterator<Item = anyhow::Result<(Tensor<f32>, P)>>>;

/// Batches of (images, payload) moved to `device`: on the GPU through the pinned-buffer
/// prefetcher (the copy of batch k+1 queued on a copy stream before batch k is handed out).
pub fn batches_to<P: Send + 'static>(
    device: Device,
    src: impl Iterator<Item = anyhow::Result<(Tensor<f32>, P)>> + Send + 'static,
) -> anyhow::Result<Batches<P>> {
    Ok(match device {
        Device::Cpu => Box::new(src),
        Device::Cuda => {
            let host = src.map(|r| r.and_then(|(t, p)| Ok((HostBatch::try_from(t)?, p))));
            let dev = cuda::prefetch::DevicePrefetcher::on_global_gpu(host)?;
            Box::new(dev.map(|r| r.map(|(buf, shape, p)| (Tensor::from_cuda(&shape, buf), p))))
        }
    })
}

/// A host batch as the prefetcher takes it.
pub use cuda::prefetch::HostBatch;

impl TryFrom<Tensor<f32>> for HostBatch {
    type Error = anyhow::Error;
    /// A host tensor's values (a device tensor is an error: the source must yield host batches).
    fn try_from(t: Tensor<f32>) -> anyhow::Result<HostBatch> {
        anyhow::ensure!(
            t.device() == Device::Cpu,
            "batch {:?} is already on the CUDA device (the source must yield host tensors)",
            t.shape()
        );
        Ok(HostBatch {
            shape: t.shape().to_vec(),
            values: t.into_vec(),
        })
    }
}

/// The values of a tensor.
#[derive(Clone)]
pub enum Storage<T> {
    /// Host memory: `numel` values of `data` from `offset`.
    Host { data: Arc<Vec<T>>, offset: usize },
    /// A device buffer of `dtype` values (f32 today), from `offset`.
    Cuda {
        buf: Arc<DBuf>,
        offset: usize,
        dtype: DType,
    },
}

impl<T: Elem> Storage<T> {
    pub fn device(&self) -> Device {
        match self {
            Storage::Host { .. } => Device::Cpu,
            Storage::Cuda { .. } => Device::Cuda,
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Storage::Host { .. } => T::DTYPE,
            Storage::Cuda { dtype, .. } => *dtype,
        }
    }
}

/// The device an op on these tensors runs on: CUDA when any of them is there.
pub fn placement<T: Elem>(ts: &[&Tensor<T>]) -> Device {
    if ts.iter().any(|t| t.device() == Device::Cuda) {
        Device::Cuda
    } else {
        Device::Cpu
    }
}

/// The process-wide GPU; a device tensor exists only after it opened.
pub fn gpu() -> &'static Gpu {
    cuda::global().unwrap_or_else(|e| panic!("a CUDA tensor without a usable GPU: {e}"))
}

/// The GPU as the backend for the element type of `ts` (what `on_backend!` binds).
pub fn cuda_for<T: Elem>(_ts: &[&Tensor<T>]) -> &'static Cuda<T> {
    Cuda::of(gpu())
}

/// The GPU as the backend for element type `T`.
pub fn cuda<T: Elem>() -> &'static Cuda<T> {
    Cuda::of(gpu())
}

/// A backend's result, or the panic an op raises on a backend error (a device fault is not
/// recoverable inside a tape).
pub fn ok<R>(r: anyhow::Result<R>) -> R {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

/// Runs `$body` with `$b` bound to the backend of the given tensors' [`placement`]: the body is
/// written once and compiled once per backend.
#[macro_export]
macro_rules! on_backend {
    ([$($t:expr),+ $(,)?], |$b:ident| $body:expr) => {
        match $crate::tensor::storage::placement(&[$($t),+]) {
            $crate::tensor::Device::Cpu => {
                let $b = &$crate::backend::cpu::CPU;
                $body
            }
            $crate::tensor::Device::Cuda => {
                let $b = $crate::tensor::storage::cuda_for(&[$($t),+]);
                $body
            }
        }
    };
    ($dev:expr, $T:ty, |$b:ident| $body:expr) => {
        match $dev {
            $crate::tensor::Device::Cpu => {
                let $b = &$crate::backend::cpu::CPU;
                $body
            }
            $crate::tensor::Device::Cuda => {
                let $b = $crate::tensor::storage::cuda::<$T>();
                $body
            }
        }
    };
}
pub use on_backend;

/// A backend seen from the tensor layer: tensors in, tensors out.
pub trait Place<T: Elem>: Backend<T> {
    /// An input as this backend's buffer: a view, or a copy when it lives elsewhere.
    type Ref<'a>: Deref<Target = Self::Buf>
    where
        T: 'a;
    /// An input updated in place (a whole flat buffer that nothing else views).
    type RefMut<'a>: std::ops::DerefMut<Target = Self::Buf>
    where
        T: 'a;
    fn device(&self) -> Device;
    fn get_mut<'a>(&self, t: &'a mut Tensor<T>) -> Self::RefMut<'a>;
    fn get<'a>(&self, t: &'a Tensor<T>) -> Self::Ref<'a>;
    /// A tensor of `shape` owning a kernel's result.
    fn wrap(&self, shape: &[usize], out: Self::Owned) -> Tensor<T>;
    /// `wrap` of a result, panicking with the backend's message on error.
    fn out(&self, shape: &[usize], out: anyhow::Result<Self::Owned>) -> Tensor<T> {
        self.wrap(shape, ok(out))
    }
    /// A host slice as this backend's buffer (e.g. running statistics read on the host).
    fn put<'a>(&self, v: &'a [T]) -> Self::Ref<'a>;
    /// Batch statistics as this backend's (the host takes device statistics by a download;
    /// the device panics on host statistics: they are used where they were taken).
    type StatsRef<'a>: Deref<Target = Self::Stats>;
    fn stats<'a>(&self, s: &'a BatchStats) -> Self::StatsRef<'a>;
    /// Batch statistics of `count` values per channel from this backend's kernels.
    fn wrap_stats(&self, s: Self::Stats, count: usize) -> BatchStats;
}

/// Per-channel batch statistics of a train-mode BN (mean and biased variance, f64) and the
/// number of values per channel, on the device where they were taken (on the GPU they stay
/// there, so the running statistics update without a round trip per BN).
#[derive(Clone, Debug)]
pub struct BatchStats {
    pub count: usize,
    values: StatsStorage,
}

#[derive(Clone, Debug)]
enum StatsStorage {
    Host(Arc<HostStats>),
    Cuda(Arc<DeviceStats>),
}

impl BatchStats {
    /// Statistics computed on the host.
    pub fn host(mean: Vec<f64>, var: Vec<f64>, count: usize) -> BatchStats {
        BatchStats {
            count,
            values: StatsStorage::Host(Arc::new(HostStats { mean, var })),
        }
    }

    pub fn device(&self) -> Device {
        match self.values {
            StatsStorage::Host(_) => Device::Cpu,
            StatsStorage::Cuda(_) => Device::Cuda,
        }
    }

    /// The mean and biased variance on the host (downloaded from the device).
    pub fn to_host(&self) -> anyhow::Result<HostStats> {
        match &self.values {
            StatsStorage::Host(h) => Ok((**h).clone()),
            StatsStorage::Cuda(d) => {
                let g = cuda::global().map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok(HostStats {
                    mean: g.download_f64(&d.mean())?,
                    var: g.download_f64(&d.var())?,
                })
            }
        }
    }

    /// The per-channel mean (a host copy).
    pub fn mean(&self) -> Vec<f64> {
        ok(self.to_host()).mean
    }

    /// The per-channel biased variance (a host copy).
    pub fn var(&self) -> Vec<f64> {
        ok(self.to_host()).var
    }

    /// The unbiased variance PyTorch puts into `running_var`.
    pub fn unbiased_var(&self) -> Vec<f64> {
        let m = self.count as f64;
        let f = if self.count > 1 { m / (m - 1.0) } else { 1.0 };
        self.var().iter().map(|v| v * f).collect()
    }
}

impl<T: Elem> Place<T> for Cpu {
    type Ref<'a> = Cow<'a, [T]>;
    type RefMut<'a> = &'a mut [T];
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn get_mut<'a>(&self, t: &'a mut Tensor<T>) -> &'a mut [T] {
        t.data_mut()
    }
    fn get<'a>(&self, t: &'a Tensor<T>) -> Cow<'a, [T]> {
        match &t.storage {
            Storage::Host { .. } => Cow::Borrowed(t.data()),
            Storage::Cuda { .. } => Cow::Owned(t.to_host().to_vec()),
        }
    }
    fn wrap(&self, shape: &[usize], out: Vec<T>) -> Tensor<T> {
        Tensor::new(shape, out)
    }
    fn put<'a>(&self, v: &'a [T]) -> Cow<'a, [T]> {
        Cow::Borrowed(v)
    }
    type StatsRef<'a> = Cow<'a, HostStats>;
    fn stats<'a>(&self, s: &'a BatchStats) -> Cow<'a, HostStats> {
        match &s.values {
            StatsStorage::Host(h) => Cow::Borrowed(h),
            StatsStorage::Cuda(_) => Cow::Owned(ok(s.to_host())),
        }
    }
    fn wrap_stats(&self, s: HostStats, count: usize) -> BatchStats {
        BatchStats {
            count,
            values: StatsStorage::Host(Arc::new(s)),
        }
    }
}

/// A device input: a view of a device tensor, or a host tensor copied up.
pub enum DevRef<'a> {
    View(View<'a, f32>),
    Copy(DBuf),
}

impl Deref for DevRef<'_> {
    type Target = DBuf;
    fn deref(&self) -> &DBuf {
        match self {
            DevRef::View(v) => v,
            DevRef::Copy(b) => b,
        }
    }
}

fn upload<T: Elem>(g: &Gpu, v: &[T]) -> DBuf {
    let f: Vec<f32> = v.iter().map(|x| x.as_f64() as f32).collect();
    ok(g.upload(&f))
}

impl<T: Elem> Place<T> for Cuda<T> {
    type Ref<'a> = DevRef<'a>;
    type RefMut<'a> = &'a mut DBuf;
    fn device(&self) -> Device {
        Device::Cuda
    }
    fn get_mut<'a>(&self, t: &'a mut Tensor<T>) -> &'a mut DBuf {
        let n = t.numel();
        let shape = t.shape.clone();
        match &mut t.storage {
            Storage::Cuda { buf, offset: 0, .. } if buf.len() == n => Arc::get_mut(buf)
                .unwrap_or_else(|| panic!("device tensor {shape:?} is still viewed (by a tape?)")),
            _ => panic!("in-place update of {shape:?}: needs a whole device buffer"),
        }
    }
    fn get<'a>(&self, t: &'a Tensor<T>) -> DevRef<'a> {
        match &t.storage {
            Storage::Cuda { buf, offset, .. } => DevRef::View(buf.view(*offset, t.numel())),
            Storage::Host { .. } => DevRef::Copy(upload(self, t.data())),
        }
    }
    fn wrap(&self, shape: &[usize], out: DBuf) -> Tensor<T> {
        Tensor::from_cuda(shape, out)
    }
    fn put<'a>(&self, v: &'a [T]) -> DevRef<'a> {
        DevRef::Copy(upload(self, v))
    }
    type StatsRef<'a> = &'a DeviceStats;
    fn stats<'a>(&self, s: &'a BatchStats) -> &'a DeviceStats {
        match &s.values {
            StatsStorage::Cuda(d) => d,
            StatsStorage::Host(_) => panic!("host batch statistics used on the device"),
        }
    }
    fn wrap_stats(&self, s: DeviceStats, count: usize) -> BatchStats {
        BatchStats {
            count,
            values: StatsStorage::Cuda(Arc::new(s)),
        }
    }
}

impl<T: Elem> Tensor<T> {
    /// Where the tensor's values are.
    pub fn device(&self) -> Device {
        self.storage.device()
    }

    /// Whether the values are on the CUDA device.
    pub fn is_cuda(&self) -> bool {
        self.device() == Device::Cuda
    }

    /// `to_device(Device::Cuda)`.
    pub fn to_cuda(&self) -> anyhow::Result<Tensor<T>> {
        self.to_device(Device::Cuda)
    }

    /// The element type of the stored values.
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    /// The same values on `device` (a clone when they are there already).
    pub fn to_device(&self, device: Device) -> anyhow::Result<Tensor<T>> {
        match (self.device(), device) {
            (a, b) if a == b => Ok(self.clone()),
            (_, Device::Cpu) => Ok(self.to_host()),
            (_, Device::Cuda) => {
                let g = cuda::global().map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok(Tensor::from_cuda(&self.shape, upload(g, self.data())))
            }
        }
    }

    /// The same values on the host (a copy from the device, or a clone of a host tensor).
    pub fn to_host(&self) -> Self {
        let Storage::Cuda { buf, offset, .. } = &self.storage else {
            return self.clone();
        };
        let v = ok(gpu().download(&buf.view(*offset, self.numel())));
        Tensor::new(
            &self.shape,
            v.into_iter().map(|x| T::from_f64(x as f64)).collect(),
        )
    }

    /// A tensor on the CUDA device: `numel(shape)` values of `buf` from `offset` (a view into a
    /// flat device buffer, or a whole buffer). Only f32 values live on the device.
    pub fn cuda_view(buf: &Arc<DBuf>, offset: usize, shape: &[usize]) -> Self {
        assert_eq!(
            T::DTYPE,
            DType::F32,
            "only f32 tensors live on the CUDA device"
        );
        assert!(
            offset + super::numel(shape) <= buf.len(),
            "device view out of range"
        );
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cuda {
                buf: buf.clone(),
                offset,
                dtype: DType::F32,
            },
        }
    }

    /// A tensor owning a device buffer.
    pub fn from_cuda(shape: &[usize], buf: DBuf) -> Self {
        assert_eq!(
            super::numel(shape),
            buf.len(),
            "device buffer does not match shape {shape:?}"
        );
        Self::cuda_view(&Arc::new(buf), 0, shape)
    }

    /// The device buffer and offset of a device tensor (for backend code that takes whole
    /// flat buffers, e.g. the optimizers).
    pub fn cuda_parts(&self) -> Option<(&Arc<DBuf>, usize)> {
        match &self.storage {
            Storage::Cuda { buf, offset, .. } => Some((buf, *offset)),
            Storage::Host { .. } => None,
        }
    }
}
