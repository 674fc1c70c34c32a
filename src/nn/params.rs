//! Named flat storage for parameters and buffers.
//!
//! All parameters of a model live in ONE flat `Vec<f32>` with a table of (name, offset, shape);
//! so do the BatchNorm running statistics. A forward pass views them without copying, the
//! optimizer walks one buffer, and a checkpoint is one write (see DESIGN.md, "Flat buffers").

use crate::tensor::{numel, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
}

impl Entry {
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
}

/// Index of an entry in a `FlatStore`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Id(pub usize);

#[derive(Clone)]
pub struct FlatStore {
    entries: Vec<Entry>,
    /// All values, one 1-D tensor on the store's device; entries are views into it.
    data: Tensor<f32>,
    index: HashMap<String, usize>,
}

impl Default for FlatStore {
    fn default() -> Self {
        FlatStore {
            entries: Vec::new(),
            data: Tensor::new(&[0], Vec::new()),
            index: HashMap::new(),
        }
    }
}

impl FlatStore {
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.data.numel()
    }

    pub fn find(&self, name: &str) -> Option<Id> {
        self.index.get(name).map(|&i| Id(i))
    }

    pub fn entry(&self, id: Id) -> &Entry {
        &self.entries[id.0]
    }

    /// One entry's values (a host store).
    pub fn slice(&self, id: Id) -> &[f32] {
        let e = &self.entries[id.0];
        &self.data.data()[e.offset..e.offset + e.numel()]
    }

    /// Mutable access (copies the buffer first if a tape still views it).
    pub fn slice_mut(&mut self, id: Id) -> &mut [f32] {
        let e = &self.entries[id.0];
        let (o, n) = (e.offset, e.numel());
        &mut self.data.data_mut()[o..o + n]
    }

    /// A zero-copy tensor view of one entry, on the store's device.
    pub fn view(&self, id: Id) -> Tensor<f32> {
        let e = &self.entries[id.0];
        self.data.narrow(e.offset, &e.shape)
    }

    /// All values (a host store).
    pub fn flat(&self) -> &[f32] {
        self.data.data()
    }

    pub fn flat_mut(&mut self) -> &mut [f32] {
        self.data.data_mut()
    }

    /// All values as one 1-D tensor, on the store's device.
    pub fn tensor(&self) -> &Tensor<f32> {
        &self.data
    }

    /// The flat tensor, for in-place updates (the optimizer, running statistics).
    pub fn tensor_mut(&mut self) -> &mut Tensor<f32> {
        &mut self.data
    }

    /// Replaces all values (same length; the new values' device becomes the store's).
    pub fn set_tensor(&mut self, t: Tensor<f32>) {
        assert_eq!(t.numel(), self.numel(), "set_tensor: length");
        self.data = t.reshape(&[self.numel()]);
    }

    pub fn device(&self) -> Device {
        self.data.device()
    }

    /// Moves the values to `device` (views taken before keep the old copy).
    pub fn to_device(&mut self, device: Device) -> anyhow::Result<()> {
        self.data = self.data.to_device(device)?;
        Ok(())
    }

    fn push(&mut self, name: String, shape: Vec<usize>, values: Vec<f32>) -> Id {
        assert_eq!(
            values.len(),
            numel(&shape),
            "{name}: values do not match shape"
        );
        assert!(
            !self.index.contains_key(&name),
            "duplicate tensor name {name}"
        );
        let offset = self.data.numel();
        let mut all = std::mem::replace(&mut self.data, Tensor::new(&[0], Vec::new())).into_vec();
        all.extend_from_slice(&values);
        self.data = Tensor::new(&[all.len()], all);
        self.index.insert(name.clone(), self.entries.len());
        self.entries.push(Entry {
            name,
            shape,
            offset,
        });
        Id(self.entries.len() - 1)
    }
}

/// Everything a model learns or tracks: parameters, BN running stats, BN batch counters. The
/// two flat stores live on one device ([`State::place_on`]): forward passes view them there,
/// train-mode BNs update their running statistics there, the optimizer steps them there.
#[derive(Clone, Default)]
pub struct State {
    pub params: FlatStore,
    pub buffers: FlatStore,
    /// `<bn>.num_batches_tracked`, kept for timm/PyTorch compatibility of the state dict.
    pub counters: Vec<(String, i64)>,
}

impl State {
    /// Where the parameters and running statistics live.
    pub fn device(&self) -> Device {
        self.params.device()
    }

    /// Moves parameters and running statistics to `device`.
    pub fn place_on(&mut self, device: Device) -> anyhow::Result<()> {
        self.params.to_device(device)?;
        self.buffers.to_device(device)
    }

    /// The same state on the host (a copy when it lives on a device): what checkpoints,
    /// `fold` and the host-side readers take.
    pub fn to_host(&self) -> anyhow::Result<State> {
        let mut s = self.clone();
        s.place_on(Device::Cpu)?;
        Ok(s)
    }
}

/// Builds a `State` while modules are constructed; initializes as PyTorch does by default.
pub struct Builder {
    state: State,
    rng: StdRng,
}

impl Builder {
    pub fn new(seed: u64) -> Self {
        Builder {
            state: State::default(),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn uniform(&mut self, n: usize, bound: f64) -> Vec<f32> {
        (0..n)
            .map(|_| self.rng.random_range(-bound..bound) as f32)
            .collect()
    }

    /// A conv or linear weight, PyTorch's default kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), ..).
    /// fan_in is the product of all dims but the first.
    pub fn weight(&mut self, name: String, shape: &[usize]) -> Id {
        let fan_in: usize = shape[1..].iter().product();
        let v = self.uniform(numel(shape), 1.0 / (fan_in as f64).sqrt());
        self.state.params.push(name, shape.to_vec(), v)
    }

    /// A bias of a conv/linear layer with the given fan-in (PyTorch: U(-1/sqrt(fan_in), ..)).
    pub fn bias(&mut self, name: String, n: usize, fan_in: usize) -> Id {
        let v = self.uniform(n, 1.0 / (fan_in as f64).sqrt());
        self.state.params.push(name, vec![n], v)
    }

    pub fn param_const(&mut self, name: String, shape: &[usize], value: f32) -> Id {
        self.state
            .params
            .push(name, shape.to_vec(), vec![value; numel(shape)])
    }

    pub fn buffer_const(&mut self, name: String, shape: &[usize], value: f32) -> Id {
        self.state
            .buffers
            .push(name, shape.to_vec(), vec![value; numel(shape)])
    }

    /// Registers `<name>.num_batches_tracked`; returns its index.
    pub fn counter(&mut self, name: String) -> usize {
        self.state.counters.push((name, 0));
        self.state.counters.len() - 1
    }

    pub fn finish(self) -> State {
        self.state
    }
}
