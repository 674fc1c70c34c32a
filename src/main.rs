//! The `ghostv3` command line: model info, forward passes against reference files, folding.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ghostv3::io::{load_state, read_tensors, save_state, write_tensors, TensorData};
use ghostv3::models::{self, Model, ModelOptions, Pass};
use ghostv3::nn::RepOptions;
use ghostv3::tensor::Device;
use ghostv3::train::step::{self, Targets};
use ghostv3::{infer, reparam, Tensor};
use rand::{Rng, SeedableRng};

/// mimalloc keeps freed activations for the next op (glibc unmaps large blocks: every op then
/// page-faults fresh memory, and the TLB shootdowns serialize the threads; 2 threads ran a
/// training step barely faster than 1).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (v2's option enum: between the crate's
/// `mi_option_eager_commit_delay`, 14, and `mi_option_use_numa_nodes`, 16).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never hand freed pages back to the OS (-1): with the default 10 ms delay each training step
/// still page-faulted its activations back in (clear_page was 19% of a step).
fn keep_freed_memory() {
    // SAFETY: sets a process-wide allocator option; any value is valid for this option.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "ghostv3",
    version,
    about = "GhostNetV3 training and deployment engine (CPU backend; CUDA kernels with NVRTC)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Parameters and multiply-adds of a model, in its train (re-parameterized) and deploy forms.
    Info(InfoArgs),
    /// Runs a model on tensors from a safetensors file and writes logits (and gradients).
    Forward(ForwardArgs),
    /// Folds a train-form checkpoint into the deploy form (timm `reparameterize_model` names).
    Fold(FoldArgs),
    /// Trains a model with a TOML recipe (default: a quick run on the built-in synthetic set).
    Train(TrainArgs),
    /// Top-1/top-5 accuracy of weights on an ImageFolder directory.
    Eval(EvalArgs),
    /// Top-5 classes with probabilities for image files.
    Predict(PredictArgs),
    /// Latency of the fast CPU inference path (deploy form; random weights unless given).
    Bench(BenchArgs),
    /// Exports the folded model to ONNX.
    Export(ExportArgs),
    /// Lists the models the engine can build.
    Models,
    /// Runs a study: every (variant, seed) of a study file, then results.md/csv and plots.
    Study(StudyArgs),
    /// Draws learning curves of run directories (or accuracy against latency: --latency).
    Plot(PlotArgs),
}

#[derive(Args)]
struct StudyArgs {
    /// The study file (see configs/studies/). Rerunning it with the same --out resumes it.
    #[arg(required_unless_present_any = ["status", "report", "resume"])]
    file: Option<PathBuf>,
    /// Study directory (default studies/<study name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a recipe entry in every run, e.g. --set data.root=/data/mine --set train.epochs=2.
    #[arg(long = "set", value_name = "TABLE.KEY=VALUE")]
    sets: Vec<String>,
    /// Continue the study stored in this directory.
    #[arg(long, conflicts_with_all = ["file", "out", "sets", "status", "report"])]
    resume: Option<PathBuf>,
    /// Print what is done, running and left in a study directory, with the time left.
    #[arg(long, conflicts_with_all = ["file", "out", "sets", "report"])]
    status: Option<PathBuf>,
    /// Write results.md, results.csv and the plots of a (partial) study directory now.
    #[arg(long, conflicts_with_all = ["file", "out", "sets"])]
    report: Option<PathBuf>,
    /// Check the study file and print its runs without training anything.
    #[arg(long, conflicts_with_all = ["resume", "status", "report"])]
    dry_run: bool,
    /// Runs at a time, each a child `ghostv3 train` with 1/jobs of the cores (default 1: one
    /// after another in this process).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Runs at a time on N GPUs, one per GPU (CUDA_VISIBLE_DEVICES), each with --device cuda.
    #[arg(long, conflicts_with = "jobs")]
    gpus: Option<usize>,
}

#[derive(Args)]
struct PlotArgs {
    /// Run directories (each with metrics.jsonl; with --latency, deploy.safetensors too).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// The PNG to write.
    #[arg(long, default_value = "curves.png")]
    out: PathBuf,
    /// Accuracy against CPU latency (the fast path, batch 1, the run's eval size) of every run's
    /// folded weights, like the paper's Figures 1 and 5.
    #[arg(long)]
    latency: bool,
    /// Threads for the latency measurement (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct TrainArgs {
    /// Recipe (TOML); see configs/. Without it: configs/synthetic_quick.toml, built in.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a recipe entry, e.g. --set train.epochs=5 --set optimizer.weight_decay=0.05.
    #[arg(long = "set", value_name = "TABLE.KEY=VALUE")]
    sets: Vec<String>,
    /// Continue the run in this directory from its last checkpoint (it keeps its directory and
    /// recipe: --set changes the recipe, and is written to its config.toml).
    #[arg(long, conflicts_with_all = ["config", "out"])]
    resume: Option<PathBuf>,
    /// Run directory for a new run (default runs/<model>-<time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// `cuda`: the whole step on GPU 0 (same as --set train.device=cuda; default: the recipe's).
    #[arg(long, value_enum)]
    device: Option<Device>,
    /// Data-parallel on N GPUs of this node: N worker processes (rank i on GPU i, NCCL),
    /// supervised; train.batch_size is per GPU. Under torchrun or srun, leave it out: each
    /// process reads its rank from RANK/WORLD_SIZE/LOCAL_RANK or SLURM_PROCID/NTASKS/LOCALID.
    /// With --resume: continue a run on N GPUs (any number whose share of the epoch's batches
    /// fits the checkpoint's position).
    #[arg(long)]
    gpus: Option<usize>,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Weights (safetensors; train or deploy form).
    #[arg(long)]
    weights: PathBuf,
    /// ImageFolder directory (class sub-folders), e.g. imagenette2-224/val.
    #[arg(long)]
    data: PathBuf,
    /// Input resolution.
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// Resize to size / crop_pct, then centre-crop (timm default 0.875).
    #[arg(long, default_value_t = 0.875)]
    crop_pct: f64,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Decoding threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// `cuda`: run on GPU 0 (the CUDA backend's kernels) instead of the CPU.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
}

#[derive(Args)]
struct PredictArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    weights: PathBuf,
    /// Input resolution.
    #[arg(long, default_value_t = 224)]
    size: usize,
    #[arg(long, default_value_t = 0.875)]
    crop_pct: f64,
    /// Image files (JPEG or PNG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// `cuda`: run on GPU 0 (the CUDA backend's kernels) instead of the CPU.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Weights (train or deploy form); random weights when not given.
    #[arg(long)]
    weights: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Input resolution (square).
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// Threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Start from the re-parameterized train form (folded at load) instead of the deploy form.
    #[arg(long)]
    train_form: bool,
    /// Also print a per-layer time breakdown.
    #[arg(long)]
    profile: bool,
    /// Time the tape-based `predict` (the engine core's path) instead, as a baseline.
    #[arg(long)]
    tape: bool,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Timed runs (at least; runs continue until --min-secs have passed).
    #[arg(long, default_value_t = 50)]
    runs: usize,
    #[arg(long, default_value_t = 3.0)]
    min_secs: f64,
    /// Time the whole training step instead (forward, loss, backward, LAMB + EMA of the default
    /// recipe): median step, images/s, peak RSS; with --profile, the time per op. The form is
    /// the deploy form unless --train-form (then trained as such, not folded).
    #[arg(long)]
    train: bool,
    /// `cuda`: the training step on GPU 0 (--train only). With --profile, the step's bytes,
    /// FLOPs and launches are counted too, by op family and layer, with the roofline floor on
    /// named GPUs (at --batch, fitted from counts at batches 2, 3 and 4).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// With --device cuda --profile: count only, no timing (the CPU emulator runs a step at
    /// batch 256 for hours; the counts need only small batches).
    #[arg(long)]
    count_only: bool,
    /// Write the counts as JSON here too (scripts/step_traffic_vs_torch.sh reads it).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct ExportArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output format (only onnx).
    #[arg(long, default_value = "onnx")]
    format: String,
    /// Weights (train or deploy form; folded before export). Random weights when not given.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// Input resolution written into the model's input shape (the batch is symbolic).
    #[arg(long, default_value_t = 224)]
    size: usize,
}

/// Options that shape a model beyond its name.
#[derive(Args, Clone)]
struct ModelArgs {
    /// Model name (timm; torchvision for ShuffleNetV2), see `ghostv3 models`: ghostnetv3_100,
    /// ghostnet_100, ghostnetv2_100, mobilenetv2_100, shufflenet_v2_x1_0, resnet50, ...
    #[arg(long)]
    model: String,
    /// Number of classes (default: 1000, or what the weights file holds).
    #[arg(long)]
    classes: Option<usize>,
    /// N, the repeated kxk branches of every re-parameterized conv (1..=5, the paper's Table 2;
    /// 0 = no re-parameterization, for models other than GhostNetV3).
    #[arg(long)]
    branches: Option<usize>,
    /// Train form without the 1x1 depth-wise scale branch.
    #[arg(long)]
    no_scale: bool,
    /// Train form without the BN identity branch.
    #[arg(long)]
    no_identity: bool,
}

impl ModelArgs {
    /// Options from the flags, starting from what a weights file holds when one is given.
    fn options(&self, weights: Option<&Path>, deploy: bool) -> Result<ModelOptions> {
        let mut o = match weights {
            Some(w) => models::detect_options(w)?,
            None => ModelOptions::default(),
        };
        if let Some(c) = self.classes {
            if weights.is_some() && c != o.num_classes {
                bail!(
                    "--classes {c} but the weights file has {} classes",
                    o.num_classes
                );
            }
            o.num_classes = c;
        }
        if weights.is_none() {
            o.rep = RepOptions {
                branches: self.branches.unwrap_or(3),
                scale: !self.no_scale,
                identity: !self.no_identity,
            };
        } else if let Some(n) = self.branches {
            if n != o.rep.branches {
                bail!(
                    "--branches {n} but the weights file has {} branches",
                    o.rep.branches
                );
            }
        }
        if deploy {
            o.deploy = true;
        }
        Ok(o)
    }
}

#[derive(Args)]
struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Input resolution (square).
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// Only the deploy (folded) form.
    #[arg(long)]
    deploy: bool,
    /// `cuda` also reports the GPU (NVML) and whether the CUDA kernels compile and load.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
}

#[derive(Args)]
struct ForwardArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Weights (safetensors, timm names, train or deploy form: detected from the names).
    #[arg(long)]
    weights: PathBuf,
    /// Inputs (safetensors): `input` [N,3,H,W] f32, and `labels` [N] int64 for --grads.
    #[arg(long)]
    inputs: PathBuf,
    /// Output file (safetensors).
    #[arg(long)]
    out: PathBuf,
    /// The weights are in deploy form (also detected from the names).
    #[arg(long)]
    deploy: bool,
    /// Also run one train-mode step (dropout off) and write its loss, logits, gradients and the
    /// BN running stats after it.
    #[arg(long)]
    grads: bool,
    /// `cuda`: run on GPU 0 (the CUDA backend's kernels) instead of the CPU.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
}

#[derive(Args)]
struct FoldArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Train-form weights (safetensors).
    #[arg(long)]
    weights: PathBuf,
    /// Where to write the deploy-form weights (safetensors).
    #[arg(long)]
    out: PathBuf,
}

/// stdout was closed under a command (`ghostv3 predict ... | head`): it ends quietly, exit 0.
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Writes to stdout (locked); a closed pipe is [`StdoutClosed`], not the panic of `println!`.
fn emit(args: std::fmt::Arguments<'_>, newline: bool) -> Result<()> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let r = o
        .write_fmt(args)
        .and_then(|()| if newline { o.write_all(b"\n") } else { Ok(()) });
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        r => r.context("cannot write to stdout"),
    }
}

/// `println!` that returns an error (`?`) instead of panicking when stdout is closed.
macro_rules! outln {
    ($($arg:tt)*) => { emit(format_args!($($arg)*), true)? };
}

/// `print!` that returns an error (`?`) instead of panicking when stdout is closed.
macro_rules! out {
    ($($arg:tt)*) => { emit(format_args!($($arg)*), false)? };
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Info(a) => info(a),
        Cmd::Forward(a) => forward(a),
        Cmd::Fold(a) => fold(a),
        Cmd::Train(a) => train(a),
        Cmd::Eval(a) => eval(a),
        Cmd::Predict(a) => predict(a),
        Cmd::Bench(a) => bench(a),
        Cmd::Export(a) => export(a),
        Cmd::Models => list_models(),
        Cmd::Study(a) => study(a),
        Cmd::Plot(a) => plot(a),
    };
    if let Err(e) = r {
        if e.downcast_ref::<StdoutClosed>().is_some() {
            std::process::exit(0); // the reader is gone (`| head`): nothing more to say
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn list_models() -> Result<()> {
    for m in models::REGISTRY {
        outln!("{:<20} {:?} ({} names)", m.name, m.arch, m.names_from);
    }
    Ok(())
}

/// `--size` as the errors name it.
fn size_flag(size: usize) -> String {
    format!("--size {size}")
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn info(a: InfoArgs) -> Result<()> {
    if a.size < 32 {
        bail!(
            "--size {} is too small: the network downsamples by 32",
            a.size
        );
    }
    let base = a.model.options(None, false)?;
    let forms: &[bool] = if a.deploy { &[true] } else { &[false, true] };
    let mut lines = vec![format!(
        "{} ({} classes) at {}x{}:",
        a.model.model, base.num_classes, a.size, a.size
    )];
    for &deploy in forms {
        if deploy && forms.len() == 2 && base.rep.branches == 0 {
            break; // --branches 0: the train form is the plain form, already printed
        }
        let mut m = models::create(&a.model.model, &ModelOptions { deploy, ..base })?;
        m.check_run(&size_flag(a.size), 1, a.size, a.size, Pass::Tape)?;
        let (params, macs) = m.params_and_macs(a.size);
        let form = m.form();
        lines.push(format!(
            "  {form:<44} {:>12} params  {:>7.1}M MACs  ({} tensors + {} BN buffers)",
            thousands(params),
            macs as f64 / 1e6,
            m.state().params.len(),
            m.state().buffers.len()
        ));
    }
    for l in &lines {
        outln!("{l}");
    }
    if a.device == Device::Cuda {
        let (report, ok) = ghostv3::backend::cuda::report();
        out!("{report}");
        if !ok {
            bail!("CUDA is not usable here (see above)");
        }
    }
    Ok(())
}

fn load_model(args: &ModelArgs, weights: &Path, deploy: bool) -> Result<Model> {
    let opts = args.options(Some(weights), deploy)?;
    let mut m = models::create(&args.model, &opts)?;
    load_state(m.state_mut(), weights)?;
    Ok(m)
}

/// Puts a model's parameters and running statistics on `device` (GPU 0 for `--device cuda`).
fn to_device(m: &mut Model, device: Device) -> Result<()> {
    device.check().with_context(|| {
        format!(
            "--device {}: not usable here (`ghostv3 info --device cuda` says why)",
            device.name()
        )
    })?;
    m.state_mut().place_on(device)
}

/// Eval-mode logits of a host batch on the model's device (a model placed by `to_device`).
fn predict_on(m: &mut Model, x: &Tensor<f32>) -> Result<Tensor<f32>> {
    let device = m.state().device();
    Ok(m.predict(&x.to_device(device)?).to_host())
}

fn forward(a: ForwardArgs) -> Result<()> {
    let mut m = load_model(&a.model, &a.weights, a.deploy)?;
    let inputs = read_tensors(&a.inputs)?;
    let x = match inputs.get("input") {
        Some(TensorData::F32(s, v)) if s.len() == 4 && s[1] == 3 => Tensor::new(s, v.clone()),
        Some(t) => bail!(
            "input tensor must be f32 [N, 3, H, W], got shape {:?}",
            t.shape()
        ),
        None => bail!("{} has no tensor named 'input'", a.inputs.display()),
    };
    if !x.is_finite() {
        bail!("the input holds NaN or Inf");
    }
    let (n, h, w) = (x.shape()[0], x.shape()[2], x.shape()[3]);
    let pass = if a.grads { Pass::TapeTrain } else { Pass::Tape };
    m.check_run(&format!("input {n}x3x{h}x{w}"), n, h, w, pass)?;
    to_device(&mut m, a.device)?;
    let mut out = BTreeMap::new();
    let logits = predict_on(&mut m, &x)?;
    out.insert(
        "logits".to_string(),
        TensorData::F32(logits.shape().to_vec(), logits.to_vec()),
    );
    if a.grads {
        let labels: Vec<usize> = match inputs.get("labels") {
            Some(TensorData::I64(_, v)) => v
                .iter()
                .map(|&l| {
                    if l < 0 || l as usize >= m.num_classes() {
                        bail!("label {l} out of range for {} classes", m.num_classes())
                    }
                    Ok(l as usize)
                })
                .collect::<Result<_>>()?,
            _ => bail!(
                "--grads needs an int64 tensor 'labels' [N] in {}",
                a.inputs.display()
            ),
        };
        if labels.len() != x.shape()[0] {
            bail!("{} labels for a batch of {}", labels.len(), x.shape()[0]);
        }
        let targets = Targets::Labels {
            labels: &labels,
            smoothing: 0.0,
        };
        let r = step::forward_backward(&mut m, &x, step::Loss::ce(targets), false, None)?;
        let (yv, lv) = (r.logits.to_host(), r.loss as f32);
        let flat = r
            .grads
            .with_context(|| format!("the train-mode loss is {lv}"))?
            .to_host()
            .into_vec();
        let state = m.state().to_host()?;
        out.insert(
            "train_logits".into(),
            TensorData::F32(yv.shape().to_vec(), yv.to_vec()),
        );
        out.insert("train_loss".into(), TensorData::F32(vec![1], vec![lv]));
        for e in state.params.entries() {
            let g = flat[e.offset..e.offset + e.numel()].to_vec();
            out.insert(
                format!("grad.{}", e.name),
                TensorData::F32(e.shape.clone(), g),
            );
        }
        for (i, e) in state.buffers.entries().iter().enumerate() {
            let v = state.buffers.slice(ghostv3::nn::Id(i)).to_vec();
            out.insert(
                format!("after_step.{}", e.name),
                TensorData::F32(e.shape.clone(), v),
            );
        }
        outln!("train loss {lv:.6}");
    }
    write_tensors(&a.out, &out, None)?;
    outln!("wrote {} tensors to {}", out.len(), a.out.display());
    Ok(())
}

fn fold(a: FoldArgs) -> Result<()> {
    let mut train = load_model(&a.model, &a.weights, false)?;
    if train.is_deploy() {
        bail!("{} is already in deploy form", a.weights.display());
    }
    // Both forms in eval mode must agree on a random input, checked BEFORE writing: a refused
    // fold leaves --out as it was (and save_state writes atomically: temp file, fsync, rename).
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let x = Tensor::new(
        &[2, 3, 128, 128],
        (0..2 * 3 * 128 * 128)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect(),
    );
    let (deploy, check) = reparam::fold_checked(&mut train, &x)
        .with_context(|| format!("folding {} failed; nothing written", a.weights.display()))?;
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("ghostv3.model".to_string(), a.model.model.clone()),
        ("ghostv3.form".to_string(), "deploy".to_string()),
    ]);
    save_state(deploy.state(), &a.out, meta)?;
    outln!(
        "folded {} tensors ({} params) into {} tensors ({} params); eval outputs agree: {check}",
        train.state().params.len() + train.state().buffers.len(),
        thousands(train.state().params.numel() as u64),
        deploy.state().params.len() + deploy.state().buffers.len(),
        thousands(deploy.state().params.numel() as u64),
    );
    outln!("wrote {}", a.out.display());
    Ok(())
}

/// Trains; SIGTERM/SIGINT stop it at the next step with a checkpoint, and the process exits with
/// `EXIT_PREEMPTED` so that a requeued job knows to `--resume`.
fn train(mut a: TrainArgs) -> Result<()> {
    use ghostv3::train::preempt::{StopFlag, EXIT_PREEMPTED};
    use ghostv3::train::{config::TrainConfig, Trainer};
    if let Some(d) = a.device {
        a.sets.push(format!("train.device=\"{}\"", d.name()));
    }
    let world = ghostv3::dist::World::from_env()?;
    if let Some(n) = a.gpus {
        if world.is_distributed() {
            bail!("--gpus inside a launched rank ({world}): give --gpus or use torchrun/srun, not both");
        }
        return launch_gpus(n);
    }
    if world.is_distributed() {
        // Before any device tensor: this rank's GPU.
        ghostv3::tensor::collective::select_gpu(world.local_rank)?;
        a.sets.push("train.device=\"cuda\"".into());
    }
    // Ranks other than 0 of a data-parallel run write nothing (rank 0 writes the run).
    let follower = world.is_distributed() && !world.is_main();
    let mut t = match &a.resume {
        Some(dir) if follower => Trainer::resume_follower(dir, &a.sets)?,
        Some(dir) => {
            let t = Trainer::resume(dir, &a.sets)?;
            outln!(
                "resuming {} {}",
                dir.display(),
                t.resumed_at().unwrap_or("from the start")
            );
            t
        }
        None => {
            let cfg = match &a.config {
                Some(p) => TrainConfig::load(p, &a.sets)?,
                None => TrainConfig::from_toml(
                    TrainConfig::default_recipe(),
                    &a.sets,
                    "built-in recipe",
                )?,
            };
            let dir = a.out.clone().unwrap_or_else(|| {
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                PathBuf::from("runs").join(format!("{}-{secs}", cfg.model.name))
            });
            match follower {
                true => Trainer::follower(cfg, &dir)?,
                false => Trainer::new(cfg, &dir)?,
            }
        }
    };
    if world.is_distributed() {
        use ghostv3::tensor::collective::{self, Collective};
        if !collective::available() {
            bail!("NCCL not found (libnccl.so.2 could not be loaded): data-parallel training needs it; install NCCL or put its folder on LD_LIBRARY_PATH");
        }
        let mine = if world.is_main() {
            Some(collective::unique_id()?)
        } else {
            None
        };
        let timeout = std::time::Duration::from_secs(
            std::env::var("GHOSTV3_RENDEZVOUS_TIMEOUT_S")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(300),
        );
        let id = ghostv3::dist::rendezvous::tcp(&world, mine, timeout)?;
        let c = Collective::join(world.rank, world.world_size, id)?;
        c.start_watchdog(std::time::Duration::from_secs(
            std::env::var("GHOSTV3_NCCL_TIMEOUT_S")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(600),
        ));
        outln!("{world}: NCCL communicator of {} ranks", world.world_size);
        t.data_parallel(c)?;
        if !world.is_main() {
            t.quiet = true;
        }
    }
    t.stop_on(StopFlag::on_signals()?);
    let summary = t.run()?;
    drop(t); // releases the run directory before the process ends
    if summary.stopped_by.is_some() {
        std::process::exit(EXIT_PREEMPTED);
    }
    Ok(())
}

/// `train --gpus N`: this command again as N ranks (the same arguments without --gpus), rank 0's
/// output passed through; one failing rank stops them all.
fn launch_gpus(n: usize) -> Result<()> {
    if n == 0 {
        bail!("--gpus takes at least 1");
    }
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut it = std::env::args_os().skip(1);
    while let Some(x) = it.next() {
        if x == "--gpus" {
            it.next();
        } else if !x.to_string_lossy().starts_with("--gpus=") {
            args.push(x);
        }
    }
    let exe = std::env::current_exe().context("cannot find this executable")?;
    ghostv3::dist::launch::launch_local(n, &exe, &args, 0)
}

fn eval(a: EvalArgs) -> Result<()> {
    use ghostv3::data::{ImageFolder, Loader, TransformConfig};
    use ghostv3::train::config::MAX_WORKERS;
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if a.workers > MAX_WORKERS {
        bail!("--workers must be in 0..={MAX_WORKERS}, got {}", a.workers);
    }
    let mut m = load_model(&a.model, &a.weights, false)?;
    m.check_run(
        &size_flag(a.size),
        a.batch,
        a.size,
        a.size,
        pass_of(&m, a.device),
    )?;
    let ds = std::sync::Arc::new(ImageFolder::open(&a.data)?);
    if ds.num_classes() != m.num_classes() {
        bail!(
            "{} has {} classes, the weights have {}",
            a.data.display(),
            ds.num_classes(),
            m.num_classes()
        );
    }
    let tf = TransformConfig {
        crop_pct: a.crop_pct,
        ..TransformConfig::eval(a.size)
    };
    let loader = Loader::new(ds.clone(), tf, a.batch, false, false, a.workers, 0)?;
    let t0 = std::time::Instant::now();
    to_device(&mut m, a.device)?;
    // The CPU's fast path for folded weights; on the GPU (and for train-form weights) the
    // engine's own forward pass.
    let fast = match a.device {
        Device::Cpu => fast_engine(&m)?,
        Device::Cuda => None,
    };
    let r = match &fast {
        Some(e) => ghostv3::train::evaluate_with(&loader, |x| e.predict(x))?,
        None => ghostv3::train::evaluate(&mut m, &loader)?,
    };
    let secs = t0.elapsed().as_secs_f64();
    for s in &r.skipped {
        eprintln!("warning: skipped unreadable image {s}");
    }
    outln!(
        "{} ({} form) on {} ({} images scored{}): top-1 {:.2}%, top-5 {:.2}%, loss {:.4}, {:.1} images/s",
        a.model.model,
        if m.is_deploy() { "deploy" } else { "train" },
        a.data.display(),
        r.images,
        r.skipped_note(),
        100.0 * r.top1,
        100.0 * r.top5,
        r.loss,
        ds.len() as f64 / secs
    );
    Ok(())
}

use ghostv3::data::Dataset as _;

fn predict(a: PredictArgs) -> Result<()> {
    use ghostv3::data::{Transform, TransformConfig};
    let mut m = load_model(&a.model, &a.weights, false)?;
    m.check_run(&size_flag(a.size), 1, a.size, a.size, pass_of(&m, a.device))?;
    let names: Option<Vec<String>> = {
        let bytes = std::fs::read(&a.weights)?;
        let (_, meta) =
            ghostv3::io::weights::read_header(&bytes, &a.weights.display().to_string())?;
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("ghostv3.classes"))
            .and_then(|s| serde_json::from_str(s).ok())
    };
    let tf = Transform::new(&TransformConfig {
        crop_pct: a.crop_pct,
        ..TransformConfig::eval(a.size)
    })?;
    to_device(&mut m, a.device)?;
    let fast = match a.device {
        Device::Cpu => fast_engine(&m)?,
        Device::Cuda => None,
    };
    for path in &a.images {
        let img = ghostv3::data::dataset::decode_rgb(path)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let x = tf.apply(&img, &mut rng)?;
        let x = Tensor::new(&[1, 3, a.size, a.size], x);
        let logits = match &fast {
            Some(e) => e.predict(&x)?,
            None => predict_on(&mut m, &x)?,
        };
        let z = logits.data();
        let mx = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let e: Vec<f64> = z.iter().map(|&v| ((v - mx) as f64).exp()).collect();
        let s: f64 = e.iter().sum();
        let mut order: Vec<usize> = (0..z.len()).collect();
        order.sort_by(|&i, &j| z[j].total_cmp(&z[i]));
        outln!("{}:", path.display());
        for &c in order.iter().take(5) {
            let name = names
                .as_ref()
                .and_then(|n| n.get(c))
                .cloned()
                .unwrap_or_else(|| format!("class {c}"));
            outln!("  {:6.2}%  {name}", 100.0 * e[c] / s);
        }
    }
    Ok(())
}

/// A model with its weights when given, else random in the chosen form (`bench`, `export`).
fn weights_or_random(args: &ModelArgs, weights: Option<&Path>, train_form: bool) -> Result<Model> {
    match weights {
        Some(w) => load_model(args, w, false),
        None => models::create(&args.model, &args.options(None, !train_form)?),
    }
}

/// How `eval` and `predict` run a model on `device`: the fast path when [`fast_engine`] has
/// one, else the engine's tape.
fn pass_of(m: &Model, device: Device) -> Pass {
    if device == Device::Cpu && m.is_deploy() && infer::lower::supports(m) {
        Pass::Engine
    } else {
        Pass::Tape
    }
}

/// The fast inference path for folded (deploy-form) weights of a model it lowers; None for
/// other models and for weights with training branches (those keep the engine core's path).
fn fast_engine(m: &Model) -> Result<Option<infer::Engine>> {
    if m.is_deploy() && infer::lower::supports(m) {
        Ok(Some(infer::model_engine(m)?))
    } else {
        Ok(None)
    }
}

/// Most timed (and warm-up) runs of `bench`: `time_runs` stops at this many anyway.
const MAX_BENCH_RUNS: usize = 100_000;
/// Longest `--min-secs` of `bench` (an hour).
const MAX_BENCH_SECS: f64 = 3600.0;
/// `bench --threads` is at most this many threads per core: past the core count threads only
/// take turns, and thousands of them make a run crawl.
const BENCH_THREADS_PER_CORE: usize = 8;

/// Checks the numbers of `bench` and returns the thread count.
fn bench_threads(a: &BenchArgs) -> Result<usize> {
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if !(1..=MAX_BENCH_RUNS).contains(&a.runs) {
        bail!("--runs must be in 1..={MAX_BENCH_RUNS}, got {}", a.runs);
    }
    if a.warmup > MAX_BENCH_RUNS {
        bail!("--warmup must be in 0..={MAX_BENCH_RUNS}, got {}", a.warmup);
    }
    if !(a.min_secs >= 0.0 && a.min_secs <= MAX_BENCH_SECS) {
        bail!(
            "--min-secs must be a number of seconds in [0, {MAX_BENCH_SECS}], got {}",
            a.min_secs
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max = BENCH_THREADS_PER_CORE * cores;
    match a.threads {
        None => Ok(cores),
        Some(0) => bail!("--threads must be at least 1"),
        Some(t) if t > max => bail!(
            "--threads {t} is too many: at most {max} ({BENCH_THREADS_PER_CORE} per core, {cores} \
             cores here)"
        ),
        Some(t) => Ok(t),
    }
}

fn bench(a: BenchArgs) -> Result<()> {
    use ghostv3::infer::bench::{
        bench_engine, peak_rss_bytes, profile_engine, time_runs, BenchConfig,
    };
    let num_threads = bench_threads(&a)?;
    let threads = rayon::ThreadPoolBuilder::new()
        .num_threads(num_threads)
        .build()?;
    let cfg = BenchConfig {
        batch: a.batch,
        size: a.size,
        warmup: a.warmup,
        min_runs: a.runs,
        min_time: std::time::Duration::try_from_secs_f64(a.min_secs)?,
    };
    if a.train {
        return threads.install(|| bench_train(&a, &cfg, num_threads));
    }
    if a.device != Device::Cpu {
        bail!(
            "bench: --device {} needs --train (inference is timed on the CPU)",
            a.device.name()
        );
    }
    threads.install(|| {
        let form = if a.train_form { "train form, folded at load" } else { "deploy form" };
        let mut m = weights_or_random(&a.model, a.weights.as_deref(), a.train_form)?;
        let pass = if a.tape { Pass::Tape } else { Pass::Engine };
        m.check_run(&size_flag(a.size), a.batch, a.size, a.size, pass)?;
        let (report, what) = if a.tape {
            let x = Tensor::new(
                &[a.batch, 3, a.size, a.size],
                ghostv3::infer::bench::random_input(a.batch, a.size, 0),
            );
            let r = time_runs(&cfg, || {
                m.predict(&x);
                Ok(())
            })?;
            (r, "tape predict".to_string())
        } else {
            let e = infer::model_engine(&m)?;
            drop(m);
            let r = bench_engine(&e, &cfg)?;
            if a.profile {
                out!("{}", profile_engine(&e, a.batch, a.size, 20)?);
            }
            outln!(
                "memory: packed weights {:.1} MB, activation arenas {:.1} MB",
                e.weight_bytes() as f64 / 1e6,
                e.peak_arena_bytes() as f64 / 1e6
            );
            (r, format!("fast path ({})", e.isa.name()))
        };
        outln!(
            "{} {form}, {what}, batch {}, {}x{}, {num_threads} threads: median {:.3} ms, p90 {:.3} ms, {:.1} images/s ({} runs); peak RSS {:.1} MB",
            a.model.model,
            a.batch,
            a.size,
            a.size,
            report.median_ms,
            report.p90_ms,
            report.images_per_s,
            report.times_ms.len(),
            peak_rss_bytes().unwrap_or(0) as f64 / 1e6
        );
        Ok(())
    })
}

/// `bench --train`: the training step of the default recipe, timed.
fn bench_train(
    a: &BenchArgs,
    cfg: &ghostv3::infer::bench::BenchConfig,
    num_threads: usize,
) -> Result<()> {
    use ghostv3::infer::bench::peak_rss_bytes;
    let mut m = weights_or_random(&a.model, a.weights.as_deref(), a.train_form)?;
    // Counting alone runs batches of at most 4 (--batch is where the counts are evaluated).
    let run_batch = if a.count_only {
        a.batch.min(4)
    } else {
        a.batch
    };
    m.check_run(&size_flag(a.size), run_batch, a.size, a.size, Pass::Tape)?;
    to_device(&mut m, a.device)?;
    let form = if m.is_deploy() {
        "deploy form"
    } else {
        "train form"
    };
    let counting = a.profile && a.device == Device::Cuda;
    if (a.count_only || a.json.is_some()) && !counting {
        bail!("bench: --count-only and --json go with --train --device cuda --profile");
    }
    if counting {
        let t = ghostv3::train::bench::count_step(&mut m, &a.model.model, a.size, [2, 3, 4])?;
        out!("{}", t.report(a.batch, 15));
        if let Some(p) = &a.json {
            ghostv3::io::atomic::write_atomic(p, serde_json::to_string_pretty(&t)?.as_bytes())?;
        }
        if a.count_only {
            return Ok(());
        }
    }
    let r = ghostv3::train::bench::bench_step(&mut m, cfg)?;
    if a.profile {
        out!("{}", r.profile.report());
        outln!("optimizer + EMA pass: {:.2} ms", r.update_ms);
    }
    let where_ = match a.device {
        Device::Cpu => format!("{num_threads} threads"),
        Device::Cuda => "cuda".to_string(),
    };
    outln!(
        "{} {form}, training step (LAMB + EMA), batch {}, {}x{}, {where_}: median {:.1} ms, p90 {:.1} ms, {:.1} images/s ({} runs); peak RSS {:.1} MB",
        a.model.model,
        a.batch,
        a.size,
        a.size,
        r.report.median_ms,
        r.report.p90_ms,
        r.report.images_per_s,
        r.report.times_ms.len(),
        peak_rss_bytes().unwrap_or(0) as f64 / 1e6
    );
    Ok(())
}

fn export(a: ExportArgs) -> Result<()> {
    if a.format != "onnx" {
        bail!("unknown --format {} (supported: onnx)", a.format);
    }
    let m = weights_or_random(&a.model, a.weights.as_deref(), false)?;
    m.check_input_size(&size_flag(a.size), a.size, a.size)?;
    let e = infer::model_engine(&m)?;
    let bytes = infer::onnx::export(&e.graph, a.size, a.size)?;
    ghostv3::io::atomic::write_atomic(&a.out, &bytes)?;
    outln!(
        "wrote {} ({} nodes, {:.1} MB)",
        a.out.display(),
        e.graph.nodes.len(),
        bytes.len() as f64 / 1e6
    );
    Ok(())
}

/// Runs (or resumes, reports, shows) a study; SIGTERM/SIGINT stop it with every live run
/// checkpointed, exiting with `EXIT_PREEMPTED` like `train`.
fn study(a: StudyArgs) -> Result<()> {
    use ghostv3::study::{spec::Resolved, Outcome, RunOptions, Study};
    use ghostv3::train::preempt::{StopFlag, EXIT_PREEMPTED};
    if let Some(dir) = &a.status {
        out!("{}", Study::open(dir)?.status());
        return Ok(());
    }
    if let Some(dir) = &a.report {
        Study::open(dir)?.report()?;
        outln!("wrote {}", dir.join("results.md").display());
        return Ok(());
    }
    let s = match (&a.resume, &a.file) {
        (Some(dir), _) => Study::open(dir)?,
        (None, Some(file)) => {
            let r = Resolved::load(file, &a.sets)?;
            let f = r.file()?;
            if a.dry_run {
                for run in r.plan()? {
                    let v = &f.variants[run.variant];
                    outln!("{:<36} {}: {}", run.rel_dir, v.label(), v.sets.join(" "));
                }
                outln!(
                    "{} runs; study file and recipes are valid",
                    f.variants.len() * f.study.seeds.len()
                );
                return Ok(());
            }
            let name = f.study.name;
            let dir = a
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("studies").join(name));
            Study::create(&dir, r)?
        }
        (None, None) => bail!("give a study file, or --resume/--status/--report DIR"),
    };
    if a.jobs == 0 || a.gpus == Some(0) {
        bail!("--jobs and --gpus take at least 1");
    }
    let opts = RunOptions {
        jobs: a.gpus.unwrap_or(a.jobs),
        gpus: a.gpus.is_some(),
        exe: None,
        quiet: false,
    };
    let outcome = s.run(&opts, &StopFlag::on_signals()?)?;
    outln!("results: {}", s.dir.join("results.md").display());
    match outcome {
        Outcome::Stopped(sig) => {
            eprintln!(
                "{sig}: study stopped, its runs checkpointed; continue with: ghostv3 study --resume {}",
                s.dir.display()
            );
            std::process::exit(EXIT_PREEMPTED);
        }
        Outcome::Finished { failed } if !failed.is_empty() => bail!(
            "{} run(s) failed: {} (their errors are in failed.txt; rerun the study to retry them)",
            failed.len(),
            failed.join(", ")
        ),
        Outcome::Finished { .. } => Ok(()),
    }
}

/// Learning curves of runs, or their best top-1 against the CPU latency of their folded weights.
fn plot(a: PlotArgs) -> Result<()> {
    use ghostv3::plot::{scatter, Point};
    use ghostv3::train::{config::TrainConfig, curves};
    let label = |d: &Path| {
        d.components()
            .rev()
            .take(2)
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("/")
    };
    let mut runs = Vec::new();
    for d in &a.runs {
        let ms = curves::read_metrics(d)?;
        if ms.is_empty() {
            bail!("{} has no logged epoch (metrics.jsonl)", d.display());
        }
        runs.push((label(d), ms));
    }
    if !a.latency {
        ghostv3::plot::panels(&a.out, &curves::run_panels(&runs))?;
        outln!("wrote {}", a.out.display());
        return Ok(());
    }
    use ghostv3::infer::bench::{bench_engine, BenchConfig};
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads.unwrap_or(0))
        .build()?;
    let mut pts = Vec::new();
    for (d, (label, ms)) in a.runs.iter().zip(&runs) {
        let cfg = TrainConfig::load(&d.join("config.toml"), &[])?;
        let w = d.join("deploy.safetensors");
        let mut m = models::create(&cfg.model.name, &models::detect_options(&w)?)?;
        load_state(m.state_mut(), &w)?;
        let size = cfg.eval.size;
        let bc = BenchConfig {
            batch: 1,
            size,
            warmup: 5,
            min_runs: 20,
            min_time: std::time::Duration::from_secs(1),
        };
        let r = pool.install(|| -> Result<_> { bench_engine(&infer::model_engine(&m)?, &bc) })?;
        let best = curves::best_top1(ms).unwrap_or(0.0);
        outln!(
            "{label}: {} at {size} px, best top-1 {:.2}%, {:.3} ms median (batch 1)",
            cfg.model.name,
            100.0 * best,
            r.median_ms
        );
        pts.push(Point {
            label: label.clone(),
            group: cfg.model.name.clone(),
            x: r.median_ms,
            y: 100.0 * best,
        });
    }
    scatter(
        &a.out,
        "top-1 against CPU latency (batch 1)",
        "latency (ms)",
        "best top-1 (%)",
        &pts,
    )?;
    outln!("wrote {}", a.out.display());
    Ok(())
}
