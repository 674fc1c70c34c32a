//! Named flat storage for parameters and buffers.
//!
//! All parameters of a model live in ONE flat `Vec<f32>` with a table of (name, offset, shape);
//! so do the BatchNorm running statistics. A forward pass views them without copying, the
//! optimizer walks one buffer, and a checkpoint is one write (see DESIGN.md, "Flat buffers").

use crate::tensor::{numel, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::Arc;

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

#[derive(Clone, Default)]
pub struct FlatStore {
    entries: Vec<Entry>,
    data: Arc<Vec<f32>>,
    index: HashMap<String, usize>,
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
        self.data.len()
    }

    pub fn find(&self, name: &str) -> Option<Id> {
        self.index.get(name).map(|&i| Id(i))
    }

    pub fn entry(&self, id: Id) -> &Entry {
        &self.entries[id.0]
    }

    pub fn slice(&self, id: Id) -> &[f32] {
        let e = &self.entries[id.0];
        &self.data[e.offset..e.offset + e.numel()]
    }

    /// Mutable access (copies the buffer first if a tape still views it).
    pub fn slice_mut(&mut self, id: Id) -> &mut [f32] {
        let e = &self.entries[id.0];
        let (o, n) = (e.offset, e.numel());
        &mut Arc::make_mut(&mut self.data)[o..o + n]
    }

    /// A zero-copy tensor view of one entry.
    pub fn view(&self, id: Id) -> Tensor<f32> {
        let e = &self.entries[id.0];
        Tensor::view_of(&self.data, e.offset, &e.shape)
    }

    pub fn flat(&self) -> &[f32] {
        &self.data
    }

    pub fn flat_mut(&mut self) -> &mut [f32] {
        Arc::make_mut(&mut self.data).as_mut_slice()
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
        let offset = self.data.len();
        Arc::make_mut(&mut self.data).extend_from_slice(&values);
        self.index.insert(name.clone(), self.entries.len());
        self.entries.push(Entry {
            name,
            shape,
            offset,
        });
        Id(self.entries.len() - 1)
    }
}

/// Everything a model learns or tracks: parameters, BN running stats, BN batch counters.
#[derive(Clone, Default)]
pub struct State {
    pub params: FlatStore,
    pub buffers: FlatStore,
    /// `<bn>.num_batches_tracked`, kept for timm/PyTorch compatibility of the state dict.
    pub counters: Vec<(String, i64)>,
    /// The parameters on the CUDA device (same layout as `params`) when training there: the
    /// forward pass then views these, and the device optimizer updates them in place.
    pub cuda_params: Option<Arc<crate::backend::cuda::DBuf>>,
    /// The BN running statistics on the device (same layout as `buffers`), set by
    /// [`State::place_on_cuda`]: train-mode BNs update them there, eval-mode BNs read them there.
    pub cuda_buffers: Option<Arc<crate::backend::cuda::DBuf>>,
}

impl State {
    /// Copies the parameters to the CUDA device; forward passes use them from then on.
    pub fn params_to_cuda(&mut self) -> anyhow::Result<()> {
        let gpu = crate::backend::cuda::global().map_err(|e| anyhow::anyhow!("{e}"))?;
        self.cuda_params = Some(Arc::new(gpu.upload(self.params.flat())?));
        Ok(())
    }

    /// Copies the device parameters back into `params` (before saving or evaluating on the CPU).
    pub fn params_from_cuda(&mut self) -> anyhow::Result<()> {
        if let Some(buf) = &self.cuda_params {
            let gpu = crate::backend::cuda::global().map_err(|e| anyhow::anyhow!("{e}"))?;
            let v = gpu.download(buf)?;
            self.params.flat_mut().copy_from_slice(&v);
        }
        Ok(())
    }

    /// Parameters and BN running statistics to the device: the whole state lives there from
    /// then on (forward passes view it, BNs update their statistics there).
    pub fn place_on_cuda(&mut self) -> anyhow::Result<()> {
        let gpu = crate::backend::cuda::global().map_err(|e| anyhow::anyhow!("{e}"))?;
        self.params_to_cuda()?;
        self.cuda_buffers = Some(Arc::new(gpu.upload(self.buffers.flat())?));
        Ok(())
    }

    /// Copies the device parameters and running statistics back to the host copies (which
    /// checkpoints, `fold` and the CPU paths read); the device copies stay.
    pub fn sync_from_cuda(&mut self) -> anyhow::Result<()> {
        self.params_from_cuda()?;
        if let Some(buf) = &self.cuda_buffers {
            let gpu = crate::backend::cuda::global().map_err(|e| anyhow::anyhow!("{e}"))?;
            let v = gpu.download(buf)?;
            self.buffers.flat_mut().copy_from_slice(&v);
        }
        Ok(())
    }

    /// Uploads the host parameters and running statistics into the existing device copies
    /// (after the host copies changed, e.g. loading a checkpoint or the EMA weights).
    pub fn sync_to_cuda(&mut self) -> anyhow::Result<()> {
        let gpu = crate::backend::cuda::global().map_err(|e| anyhow::anyhow!("{e}"))?;
        for (dev, host) in [
            (&mut self.cuda_params, &self.params),
            (&mut self.cuda_buffers, &self.buffers),
        ] {
            if let Some(buf) = dev {
                let buf = Arc::get_mut(buf)
                    .ok_or_else(|| anyhow::anyhow!("device state is still in use by a tape"))?;
                gpu.upload_into(host.flat(), buf)?;
            }
        }
        Ok(())
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
