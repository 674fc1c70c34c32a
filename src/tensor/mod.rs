//! Tensors: a shape and a shared, immutable-by-default storage.
//!
//! The storage ([`storage::Storage`]) is host memory or a device buffer, each with an offset,
//! so a tensor can be a zero-copy view into a flat parameter buffer (see `nn::params`) on either
//! device. Layout is always contiguous row-major (NCHW for images). Host accessors such as
//! `data()` refuse device tensors; `to_host`/`to_device` move values.

pub mod collective;
pub mod storage;

use std::fmt::Debug;
use std::sync::Arc;

pub use crate::backend::{DType, Elem};
pub use storage::{Device, Storage};

/// Number of elements of a shape.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

#[derive(Clone)]
pub struct Tensor<T = f32> {
    shape: Vec<usize>,
    storage: Storage<T>,
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
            storage: Storage::Host {
                data: Arc::new(data),
                offset: 0,
            },
        }
    }

    /// A view of `numel(shape)` elements of `storage` starting at `offset`, without copying.
    pub fn view_of(storage: &Arc<Vec<T>>, offset: usize, shape: &[usize]) -> Self {
        assert!(offset + numel(shape) <= storage.len(), "view out of range");
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Host {
                data: storage.clone(),
                offset,
            },
        }
    }

    /// A view of `numel(shape)` values of this tensor from element `offset` (either device).
    pub fn narrow(&self, offset: usize, shape: &[usize]) -> Self {
        assert!(
            offset + numel(shape) <= self.numel(),
            "narrow {offset}+{shape:?} of {:?}",
            self.shape
        );
        let storage = match &self.storage {
            Storage::Host { data, offset: o } => Storage::Host {
                data: data.clone(),
                offset: o + offset,
            },
            Storage::Cuda {
                buf,
                offset: o,
                dtype,
            } => Storage::Cuda {
                buf: buf.clone(),
                offset: o + offset,
                dtype: *dtype,
            },
        };
        Tensor {
            shape: shape.to_vec(),
            storage,
        }
    }

    pub fn storage(&self) -> &Storage<T> {
        &self.storage
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

    /// The values (host tensors only: copy a device tensor with `to_host` first).
    pub fn data(&self) -> &[T] {
        match &self.storage {
            Storage::Host { data, offset } => &data[*offset..*offset + self.numel()],
            Storage::Cuda { .. } => panic!(
                "tensor {:?} is on the CUDA device: copy it to the host first (to_host)",
                self.shape
            ),
        }
    }

    pub fn to_vec(&self) -> Vec<T> {
        self.data().to_vec()
    }

    /// The values of a host tensor as a vector (no copy when this tensor owns them alone).
    pub fn into_vec(self) -> Vec<T> {
        let n = self.numel();
        if !matches!(&self.storage, Storage::Host { data, offset: 0 } if data.len() == n) {
            return self.data().to_vec();
        }
        match self.storage {
            Storage::Host { data, .. } => Arc::try_unwrap(data).unwrap_or_else(|d| d.to_vec()),
            Storage::Cuda { .. } => unreachable!("checked above"),
        }
    }

    /// Mutable access to a host tensor; copies the storage first if it is shared or a view.
    pub fn data_mut(&mut self) -> &mut [T] {
        let n = self.numel();
        let unique = match &self.storage {
            Storage::Host { data, offset } => {
                *offset == 0 && data.len() == n && Arc::strong_count(data) == 1
            }
            Storage::Cuda { .. } => false,
        };
        if !unique {
            self.storage = Storage::Host {
                data: Arc::new(self.data().to_vec()),
                offset: 0,
            };
        }
        match &mut self.storage {
            Storage::Host { data, .. } => {
                Arc::get_mut(data).expect("unique storage").as_mut_slice()
            }
            Storage::Cuda { .. } => unreachable!("replaced by a host copy above"),
        }
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
        }
    }

    pub fn map(&self, f: impl Fn(T) -> T + Sync + Send) -> Self {
        Self::new(&self.shape, self.data().iter().map(|&v| f(v)).collect())
    }

    /// Elementwise sum (same shapes; on the device of the inputs).
    pub fn add(&self, other: &Self) -> Self {
        use crate::backend::api::Elementwise;
        use storage::Place;
        assert_eq!(self.shape, other.shape, "add: shapes differ");
        crate::on_backend!([self, other], |b| b
            .out(&self.shape, b.add(&b.get(self), &b.get(other))))
    }

    /// Every element times `a` (on the device of the input).
    pub fn scale(&self, a: f64) -> Self {
        use crate::backend::api::Elementwise;
        use storage::Place;
        crate::on_backend!([self], |b| b.out(&self.shape, b.scale(&b.get(self), a)))
    }

    /// A copy with storage of its own, on the same device.
    pub fn deep_copy(&self) -> Self {
        use crate::backend::api::Elementwise;
        use storage::Place;
        crate::on_backend!([self], |b| b.out(&self.shape, b.copy(&b.get(self))))
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
