//! Tensors: a shape and a shared, immutable-by-default storage.
//!
//! Storage is an `Arc<Vec<T>>` plus an offset, so a tensor can be a zero-copy view into a flat
//! parameter buffer (see `nn::params`). Layout is always contiguous row-major (NCHW for images).
//! An f32 tensor can instead live on the CUDA device (an `Arc` of a device buffer plus an
//! offset, [`CudaData`]); ops dispatch on where their inputs are (`ops::cuda`), and host
//! accessors such as `data()` refuse device tensors.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, MulAssign, SubAssign};
use std::sync::Arc;

use crate::backend::cuda::DBuf;

/// The element types the CPU kernels are written for: f32 for the engine, f64 for gradient checks.
pub trait Elem:
    num_traits::Float
    + Default
    + Debug
    + Send
    + Sync
    + Sum
    + AddAssign
    + SubAssign
    + MulAssign
    + 'static
{
    fn from_f64(v: f64) -> Self;
    fn as_f64(self) -> f64;
}

impl Elem for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
}

impl Elem for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
    fn as_f64(self) -> f64 {
        self
    }
}

/// Number of elements of a shape.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

#[derive(Clone)]
pub struct Tensor<T = f32> {
    shape: Vec<usize>,
    storage: Arc<Vec<T>>,
    offset: usize,
    /// Set for a tensor on the CUDA device (f32 only); `storage` is then empty.
    cuda: Option<CudaData>,
}

/// Device storage of a tensor: `numel` f32 values from `offset` of a device buffer.
#[derive(Clone)]
pub struct CudaData {
    pub buf: Arc<DBuf>,
    pub offset: usize,
}

impl Tensor<f32> {
    /// The same values on the CUDA device (the process-wide GPU, `backend::cuda::global`).
    pub fn to_cuda(&self) -> anyhow::Result<Tensor<f32>> {
        if self.is_cuda() {
            return Ok(self.clone());
        }
        let gpu = crate::backend::cuda::global().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Tensor::from_cuda(&self.shape, gpu.upload(self.data())?))
    }
}

impl<T: Elem> Debug for Tensor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor{:?}", self.shape)
    }
}

impl<T: Elem> Tensor<T> {
    /// A tensor owning `data`; panics if the length does not match the shape (a programming error).
    pub fn new(shape: &[usize], data: Vec<T>) -> Self {
        assert_eq!(
            numel(shape),
            data.len(),
            "data length does not match shape {shape:?}"
        );
        Tensor {
            shape: shape.to_vec(),
            storage: Arc::new(data),
            offset: 0,
            cuda: None,
        }
    }

    /// A view of `numel(shape)` elements of `storage` starting at `offset`, without copying.
    pub fn view_of(storage: &Arc<Vec<T>>, offset: usize, shape: &[usize]) -> Self {
        assert!(offset + numel(shape) <= storage.len(), "view out of range");
        Tensor {
            shape: shape.to_vec(),
            storage: storage.clone(),
            offset,
            cuda: None,
        }
    }

    /// A tensor on the CUDA device: `numel(shape)` values of `buf` from `offset` (a view into a
    /// flat device buffer, or a whole buffer). Only f32 tensors live on the device.
    pub fn cuda_view(buf: &Arc<DBuf>, offset: usize, shape: &[usize]) -> Self {
        assert_eq!(
            std::any::TypeId::of::<T>(),
            std::any::TypeId::of::<f32>(),
            "only f32 tensors live on the CUDA device"
        );
        assert!(
            offset + numel(shape) <= buf.len(),
            "device view out of range"
        );
        Tensor {
            shape: shape.to_vec(),
            storage: Arc::new(Vec::new()),
            offset,
            cuda: Some(CudaData {
                buf: buf.clone(),
                offset,
            }),
        }
    }

    /// A tensor owning a device buffer.
    pub fn from_cuda(shape: &[usize], buf: DBuf) -> Self {
        assert_eq!(
            numel(shape),
            buf.len(),
            "device buffer does not match shape {shape:?}"
        );
        Self::cuda_view(&Arc::new(buf), 0, shape)
    }

    pub fn is_cuda(&self) -> bool {
        self.cuda.is_some()
    }

    /// The device storage of a CUDA tensor.
    pub fn cuda(&self) -> Option<&CudaData> {
        self.cuda.as_ref()
    }

    /// The same values on the host (a copy from the device, or a clone of a host tensor).
    pub fn to_host(&self) -> Self {
        let Some(d) = &self.cuda else {
            return self.clone();
        };
        let gpu = crate::backend::cuda::global().unwrap_or_else(|e| panic!("{e}"));
        let v = gpu
            .download(&d.buf.view(d.offset, self.numel()))
            .unwrap_or_else(|e| panic!("CUDA: {e:#}"));
        Tensor::new(
            &self.shape,
            v.into_iter().map(|x| T::from_f64(x as f64)).collect(),
        )
    }

    pub fn zeros(shape: &[usize]) -> Self {
        Self::new(shape, vec![T::zero(); numel(shape)])
    }

    pub fn full(shape: &[usize], v: T) -> Self {
        Self::new(shape, vec![v; numel(shape)])
    }

    pub fn scalar(v: T) -> Self {
        Self::new(&[1], vec![v])
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    pub fn data(&self) -> &[T] {
        assert!(
            self.cuda.is_none(),
            "tensor {:?} is on the CUDA device: copy it to the host first (to_host)",
            self.shape
        );
        &self.storage[self.offset..self.offset + self.numel()]
    }

    pub fn to_vec(&self) -> Vec<T> {
        self.data().to_vec()
    }

    /// Mutable access; copies the storage first if it is shared or a view.
    pub fn data_mut(&mut self) -> &mut [T] {
        let n = self.numel();
        if self.offset != 0 || self.storage.len() != n || Arc::strong_count(&self.storage) != 1 {
            self.storage = Arc::new(self.data().to_vec());
            self.offset = 0;
        }
        Arc::get_mut(&mut self.storage)
            .expect("unique storage")
            .as_mut_slice()
    }

    /// The same data under another shape with the same number of elements.
    pub fn reshape(&self, shape: &[usize]) -> Self {
        assert_eq!(
            numel(shape),
            self.numel(),
            "reshape {:?} -> {shape:?}",
            self.shape
        );
        Tensor {
            shape: shape.to_vec(),
            storage: self.storage.clone(),
            offset: self.offset,
            cuda: self.cuda.clone(),
        }
    }

    pub fn map(&self, f: impl Fn(T) -> T + Sync + Send) -> Self {
        Self::new(&self.shape, self.data().iter().map(|&v| f(v)).collect())
    }

    /// Elementwise sum (same shapes; both on the host or both on the CUDA device).
    pub fn add(&self, other: &Self) -> Self {
        assert_eq!(self.shape, other.shape, "add: shapes differ");
        if self.is_cuda() || other.is_cuda() {
            return crate::ops::cuda::add_tensors(self, other);
        }
        Self::new(
            &self.shape,
            self.data()
                .iter()
                .zip(other.data())
                .map(|(&a, &b)| a + b)
                .collect(),
        )
    }

    /// Converts the element type (f32 <-> f64).
    pub fn cast<U: Elem>(&self) -> Tensor<U> {
        Tensor::new(
            &self.shape,
            self.data()
                .iter()
                .map(|v| U::from_f64(v.as_f64()))
                .collect(),
        )
    }

    pub fn max_abs(&self) -> f64 {
        self.data()
            .iter()
            .fold(0.0f64, |m, v| m.max(v.as_f64().abs()))
    }

    /// max |a - b| over all elements (same shapes).
    pub fn max_abs_diff(&self, other: &Self) -> f64 {
        assert_eq!(self.shape, other.shape, "max_abs_diff: shapes differ");
        self.data()
            .iter()
            .zip(other.data())
            .fold(0.0f64, |m, (a, b)| m.max((a.as_f64() - b.as_f64()).abs()))
    }

    /// Dimensions of an NCHW tensor.
    pub fn dims4(&self) -> (usize, usize, usize, usize) {
        assert_eq!(
            self.shape.len(),
            4,
            "expected an NCHW tensor, got shape {:?}",
            self.shape
        );
        (self.shape[0], self.shape[1], self.shape[2], self.shape[3])
    }

    pub fn is_finite(&self) -> bool {
        self.data().iter().all(|v| v.is_finite())
    }
}
