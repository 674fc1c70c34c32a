//! Counting what a device does: every kernel launch and GEMM with the bytes its buffer
//! arguments span (read and written) and its FLOPs, the host synchronizations and the
//! host-device copies. A training step on a GPU is memory-bound, so these counts set its time
//! nearly as well as a timer, and they are exact on the emulator (`ghostv3 bench --train
//! --device cuda --profile`).
//!
//! The device records; the tape labels: after each op's forward (and each backward closure) it
//! calls [`label`], which names the op and phase of every record since the last label. Off
//! (one relaxed atomic load per launch) unless a [`start`] is active.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Which part of the training step a record belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    Forward,
    Backward,
    /// The optimizer pass with the EMA (and the gradient gather before it).
    Update,
    /// Not labelled (e.g. uploads before the forward).
    Other,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Update => "update",
            Phase::Other => "other",
        }
    }
}

/// One kernel launch or GEMM.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The kernel's source module (`cuda/<module>.cu`), or "cublas".
    pub module: &'static str,
    pub kernel: &'static str,
    /// Bytes of the buffers the kernel reads (const arguments, and in/out ones).
    pub read: u64,
    /// Bytes of the buffers it writes.
    pub written: u64,
    /// Floating-point operations (GEMMs and direct convs; 0 where not counted).
    pub flops: u64,
    /// The tape op that issued it, and the phase ("" / Other until labelled).
    pub op: &'static str,
    pub phase: Phase,
    /// The tape node (the layer's place in the network), when labelled by the tape.
    pub node: Option<usize>,
}

/// Everything recorded between [`start`] and [`finish`].
#[derive(Clone, Debug, Default)]
pub struct Trace {
    pub launches: Vec<Launch>,
    /// Stream synchronizations the host waited on (downloads included).
    pub syncs: usize,
    pub h2d_copies: usize,
    pub h2d_bytes: u64,
    pub d2h_copies: usize,
    pub d2h_bytes: u64,
    labelled: usize,
    /// Extra traffic of the next launch, for kernels that reach buffers through a table.
    pending: (u64, u64),
}

static ON: AtomicBool = AtomicBool::new(false);
static TRACE: Mutex<Option<Trace>> = Mutex::new(None);

fn with<R>(f: impl FnOnce(&mut Trace) -> R) -> Option<R> {
    if !ON.load(Ordering::Relaxed) {
        return None;
    }
    TRACE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
        .map(f)
}

/// Starts recording (dropping any trace in progress).
pub fn start() {
    *TRACE.lock().unwrap_or_else(|e| e.into_inner()) = Some(Trace::default());
    ON.store(true, Ordering::Relaxed);
}

/// Stops recording and returns what was recorded (empty if nothing was started).
pub fn finish() -> Trace {
    ON.store(false, Ordering::Relaxed);
    TRACE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default()
}

pub fn is_on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Records a launch (its `op`/`phase` come from the next [`label`]).
pub fn record(module: &'static str, kernel: &'static str, read: u64, written: u64, flops: u64) {
    with(|t| {
        let (xr, xw) = std::mem::take(&mut t.pending);
        t.launches.push(Launch {
            module,
            kernel,
            read: read + xr,
            written: written + xw,
            flops,
            op: "",
            phase: Phase::Other,
            node: None,
        });
    });
}

/// Adds traffic the next launch's arguments do not show (buffers reached through a pointer
/// table, as in `copy_segments`).
pub fn add_indirect(read: u64, written: u64) {
    with(|t| t.pending = (t.pending.0 + read, t.pending.1 + written));
}

/// Adds FLOPs to the last launch (launchers of direct convs know them, the arguments do not).
pub fn add_flops(flops: u64) {
    with(|t| {
        if let Some(l) = t.launches.last_mut() {
            l.flops += flops;
        }
    });
}

pub fn record_sync() {
    with(|t| t.syncs += 1);
}

pub fn record_h2d(bytes: u64) {
    with(|t| {
        t.h2d_copies += 1;
        t.h2d_bytes += bytes;
    });
}

pub fn record_d2h(bytes: u64) {
    with(|t| {
        t.d2h_copies += 1;
        t.d2h_bytes += bytes;
    });
}

/// Names the op, phase and tape node of every record since the last label.
pub fn label(op: &'static str, phase: Phase, node: Option<usize>) {
    with(|t| {
        for l in &mut t.launches[t.labelled..] {
            l.op = op;
            l.phase = phase;
            l.node = node;
        }
        t.labelled = t.launches.len();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_the_records_since_the_last_label() {
        start();
        record("m", "k1", 8, 4, 0);
        add_indirect(100, 100);
        record("m", "k2", 1, 1, 0);
        add_flops(10);
        label("conv2d", Phase::Forward, Some(3));
        record("m", "k3", 2, 2, 0);
        label("conv2d", Phase::Backward, Some(3));
        record_sync();
        let t = finish();
        assert!(!is_on());
        assert_eq!(t.launches.len(), 3);
        assert_eq!((t.launches[1].read, t.launches[1].written), (101, 101));
        assert_eq!(t.launches[1].flops, 10);
        assert_eq!(t.launches[0].phase, Phase::Forward);
        assert_eq!(t.launches[2].phase, Phase::Backward);
        assert_eq!(t.syncs, 1);
        // Nothing is recorded once finished.
        record("m", "k4", 1, 1, 0);
        assert!(finish().launches.is_empty());
    }
}
