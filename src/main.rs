//! The `barlow` command line.

use barlow::bench::{self, Repeats, Row};
use barlow::{Dims, Math};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "barlow",
    version,
    about = "Fast Barlow Twins: fused CUDA loss, CPU twin, trainer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train Barlow Twins (by default: a small ResNet-18 on the built-in Fashion-MNIST sample).
    Train(Box<TrainArgs>),
    /// Evaluate a checkpoint's backbone.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Show the build's kernels, the CUDA devices found and the CPU threads.
    Info,
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Dataset: builtin, fashion-mnist (/usr/share/datasets/fashion-mnist), or a folder
    /// (ImageFolder with train/ and test/ or val/, IDX files, or CIFAR-10 binary batches).
    #[arg(long, default_value = "builtin")]
    data: String,
    /// Backbone.
    #[arg(long, value_enum, default_value_t = ArchArg::Resnet18)]
    arch: ArchArg,
    /// Stem [default: small for images up to 64 pixels, imagenet otherwise].
    #[arg(long, value_enum)]
    stem: Option<StemArg>,
    /// Channels of the first stage (torchvision: 64); later stages double it.
    #[arg(long, default_value_t = 16, value_parser = positive)]
    width: usize,
    /// Projector widths, comma-separated (paper: 8192,8192,8192).
    #[arg(long, value_delimiter = ',', default_value = "512,512,512", value_parser = positive)]
    projector: Vec<usize>,
    /// Weight of the off-diagonal term.
    #[arg(long, default_value_t = 0.0051, value_parser = non_negative)]
    lambda: f32,
    /// Images per batch (each gives two views).
    #[arg(long, default_value_t = 256, value_parser = batch)]
    batch_size: usize,
    /// Passes over the training images.
    #[arg(long, default_value_t = 4, value_parser = positive)]
    epochs: usize,
    /// Linear warm-up epochs [default: 10, or a tenth of the run when shorter than 100 epochs].
    #[arg(long)]
    warmup_epochs: Option<usize>,
    /// Base learning rate of the weights (scaled by batch/256).
    #[arg(long, default_value_t = 0.2, value_parser = non_negative)]
    lr_weights: f32,
    /// Base learning rate of biases and norm parameters (scaled by batch/256).
    #[arg(long, default_value_t = 0.0048, value_parser = non_negative)]
    lr_biases: f32,
    /// Weight decay (weights only).
    #[arg(long, default_value_t = 1.5e-6, value_parser = non_negative)]
    weight_decay: f32,
    /// Crop size [default: the dataset's image size; 224 for large images].
    #[arg(long, value_parser = crop)]
    crop: Option<usize>,
    /// Train on at most this many images (0: all).
    #[arg(long, default_value_t = 0)]
    max_train: usize,
    /// Run the kNN monitor every this many epochs (0: only before and after training).
    #[arg(long, default_value_t = 1)]
    knn_every: usize,
    /// Seed of the initialization, the data order and the augmentations.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder [default: runs/<UTC timestamp>-<process id>]; a folder holding another run is
    /// refused (resume that run with --resume instead).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run saved in this checkpoint (its settings are kept; --epochs may extend it).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Compute device: auto picks the first GPU when one works (and says which), else the CPU.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Activations on the GPU: bf16 (fast; f32 master weights and accumulation) or f32 (exact,
    /// no tensor-core rounding; for checking).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Bf16)]
    precision: PrecisionArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum PrecisionArg {
    Bf16,
    F32,
}

#[derive(Clone, Copy, ValueEnum)]
enum ArchArg {
    Resnet18,
    Resnet50,
}

#[derive(Clone, Copy, ValueEnum)]
enum StemArg {
    Small,
    Imagenet,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// kNN top-1 (cosine, k = 20, temperature 0.1) of a checkpoint's backbone features.
    Knn(EvalArgs),
    /// Linear probe: a softmax classifier on frozen features, SGD with a cosine schedule.
    Linear(LinearArgs),
}

#[derive(clap::Args)]
struct EvalArgs {
    /// The checkpoint (a run's checkpoint.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Dataset [default: the one the run trained on].
    #[arg(long)]
    data: Option<String>,
    /// Neighbours.
    #[arg(long, default_value_t = 20, value_parser = positive)]
    k: usize,
    /// Temperature of the votes.
    #[arg(long, default_value_t = 0.1, value_parser = finite_positive)]
    t: f32,
    /// Where the features are computed: auto picks the first GPU when one works.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

#[derive(clap::Args)]
struct LinearArgs {
    /// The checkpoint (a run's checkpoint.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Dataset [default: the one the run trained on].
    #[arg(long)]
    data: Option<String>,
    /// Epochs over the frozen features.
    #[arg(long, default_value_t = 30, value_parser = positive)]
    epochs: usize,
    /// Peak learning rate (cosine decay to 0).
    #[arg(long, default_value_t = 0.1, value_parser = finite_positive)]
    lr: f32,
    /// Batch size.
    #[arg(long, default_value_t = 256, value_parser = batch)]
    batch_size: usize,
    /// Where the features are computed: auto picks the first GPU when one works.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time the loss's forward+backward: barlow's fused path beside the naive port of the
    /// reference code and a plain cuBLAS GEMM (GPU), or the CPU path.
    Loss(LossArgs),
    /// Time the whole training step (two views, forward, loss, backward, LARS, upload) in
    /// images/s, with a per-phase breakdown; merge PyTorch's rows (benches/pytorch/train_bench.py)
    /// with --with to compare.
    Train(BenchTrainArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum PresetArg {
    /// ResNet-50, ImageNet stem, 224x224, batch 256, projector 8192-8192-8192.
    Paper,
    /// ResNet-18, small stem, 32x32, batch 256, projector 8192-8192-8192.
    Small,
}

#[derive(clap::Args)]
struct BenchTrainArgs {
    /// Configurations, comma-separated (flags below override each).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "paper,small")]
    preset: Vec<PresetArg>,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    #[arg(long, value_enum, default_value_t = PrecisionArg::Bf16)]
    precision: PrecisionArg,
    #[arg(long, value_enum)]
    arch: Option<ArchArg>,
    #[arg(long, value_enum)]
    stem: Option<StemArg>,
    /// Image size (square).
    #[arg(long)]
    image: Option<usize>,
    #[arg(long)]
    batch: Option<usize>,
    /// First-stage width (64 in torchvision).
    #[arg(long)]
    width: Option<usize>,
    /// Projector widths, comma-separated.
    #[arg(long, value_delimiter = ',')]
    projector: Vec<usize>,
    /// Untimed steps first.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Timed steps (median and mean reported).
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Steps profiled per phase after the timed ones (GPU; 0: no breakdown).
    #[arg(long, default_value_t = 5)]
    profile_steps: usize,
    /// Write the rows as JSON lines to this file (atomically).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Merge rows from these JSON-lines files (benches/pytorch/train_bench.py's output).
    #[arg(long = "with")]
    with: Vec<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Device {
    /// The GPU when one works, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

impl From<Device> for barlow::train::run::DeviceChoice {
    fn from(d: Device) -> Self {
        match d {
            Device::Auto => Self::Auto,
            Device::Cpu => Self::Cpu,
            Device::Cuda => Self::Cuda,
        }
    }
}

impl From<PrecisionArg> for barlow::train::run::Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Bf16 => Self::Bf16,
            PrecisionArg::F32 => Self::F32,
        }
    }
}

#[derive(clap::Args)]
struct LossArgs {
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Batch sizes N, comma-separated [default: 256,512,1024,2048,4096 on the GPU, 256,1024 on the CPU].
    #[arg(long, value_delimiter = ',')]
    n: Vec<usize>,
    /// Feature dimensions D, comma-separated [default: 1024,2048,4096,8192,16384 on the GPU,
    /// 256,1024 on the CPU].
    #[arg(long, value_delimiter = ',')]
    d: Vec<usize>,
    /// Precisions, comma-separated: f32, tf32, bf16 (GPU only; the CPU computes in f32).
    #[arg(long, value_delimiter = ',', default_value = "f32,tf32,bf16")]
    math: Vec<String>,
    /// Loss paths to time, comma-separated: auto, direct, gram.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    path: Vec<String>,
    /// Skip the naive and plain-GEMM baselines (GPU).
    #[arg(long)]
    no_baselines: bool,
    /// Untimed warm-up calls per measurement.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed calls per measurement (the median is reported) [default: 20 on the GPU, 5 on the CPU].
    #[arg(long)]
    repeats: Option<usize>,
    /// Write every measured row as JSON lines to this file (atomically).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Merge rows from these JSON-lines files (e.g. benches/pytorch/loss.py's output) into the table.
    #[arg(long = "with")]
    with: Vec<PathBuf>,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> ExitCode {
    // Piped into `head`, end quietly like other command-line tools instead of failing a write.
    #[cfg(unix)]
    // SAFETY: restoring the default SIGPIPE disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    install_interrupt_handler();
    let result = match cli.command {
        Command::Info => {
            info();
            Ok(())
        }
        Command::Train(args) => train(*args),
        Command::Eval(EvalCommand::Knn(args)) => eval_knn(args),
        Command::Eval(EvalCommand::Linear(args)) => eval_linear(args),
        Command::Bench(BenchCommand::Loss(args)) => bench_loss(args),
        Command::Bench(BenchCommand::Train(args)) => bench_train(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("barlow: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Set by the first Ctrl-C; a run stops after its current step.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
    // A second Ctrl-C ends the process at once.
    // SAFETY: signal() is async-signal-safe; SIG_DFL restores the default action.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
    }
}

fn install_interrupt_handler() {
    #[cfg(unix)]
    // SAFETY: the handler only stores to an atomic and calls signal(), both async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

/// Parses a value and keeps it only when `ok` accepts it; clap adds the option's name to the
/// message.
fn checked<T>(s: &str, ok: impl Fn(&T) -> bool, need: &str) -> Result<T, String>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let v: T = s.parse().map_err(|e: T::Err| e.to_string())?;
    if ok(&v) {
        Ok(v)
    } else {
        Err(need.into())
    }
}

/// A count of at least 1.
fn positive(s: &str) -> Result<usize, String> {
    checked(s, |&v| v >= 1, "must be at least 1")
}

/// A batch size: the loss standardizes over the batch, so at least 2.
fn batch(s: &str) -> Result<usize, String> {
    checked(
        s,
        |&v| v >= 2,
        "must be at least 2 (Barlow Twins standardizes over the batch)",
    )
}

/// A crop size in pixels: at least 1 and no larger than any image worth training on.
fn crop(s: &str) -> Result<usize, String> {
    checked(
        s,
        |v| (1..=4096).contains(v),
        "must be between 1 and 4096 pixels",
    )
}

/// A finite number >= 0.
fn non_negative(s: &str) -> Result<f32, String> {
    checked(
        s,
        |v: &f32| v.is_finite() && *v >= 0.0,
        "must be a finite number >= 0",
    )
}

/// A finite number > 0.
fn finite_positive(s: &str) -> Result<f32, String> {
    checked(
        s,
        |v: &f32| v.is_finite() && *v > 0.0,
        "must be a finite number > 0",
    )
}

fn info() {
    println!("barlow {}", env!("CARGO_PKG_VERSION"));
    let kernels = match barlow::cuda::fatbin::FATBIN {
        Some(f) => format!("embedded ({} bytes)", f.len()),
        None => "not built (no nvcc at build time)".to_string(),
    };
    println!("CUDA kernels: {kernels}");
    match barlow::cuda::device_count() {
        Ok(n) => {
            println!("CUDA devices: {n}");
            for i in 0..n {
                let name = match barlow::cuda::open_stream(i) {
                    Ok(s) => s
                        .context()
                        .name()
                        .unwrap_or_else(|e| format!("unnamed ({e})")),
                    Err(e) => format!("unusable: {e}"),
                };
                let note = if name.starts_with(barlow::cuda::VIRTUAL_DEVICE) {
                    " — virtual: runs on the host to check launches, library calls and stream \
                     order; nothing timed on it is a GPU figure"
                } else {
                    ""
                };
                println!("  {i}: {name}{note}");
            }
        }
        Err(e) => println!("CUDA devices: none ({e})"),
    }
    match barlow::cuda::cudnn::check_cudnn() {
        Ok(()) => println!("cuDNN: found (the CUDA trainer can run)"),
        Err(e) => println!("cuDNN: none ({e})"),
    }
    println!("CPU threads: {}", rayon::current_num_threads());
}

/// Writes one JSON object per row, atomically.
fn write_json_lines<T: serde::Serialize>(path: &std::path::Path, rows: &[T]) -> Result<(), String> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&serde_json::to_string(r).map_err(|e| e.to_string())?);
        text.push('\n');
    }
    barlow::io::write_atomic(path, text.as_bytes())
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

fn bench_train(a: BenchTrainArgs) -> Result<(), String> {
    use barlow::nn::resnet::{Arch, Stem};
    use barlow::train::bench::{self as tb, TrainBench};
    let mut rows = Vec::new();
    for p in &a.preset {
        let mut b = match p {
            PresetArg::Paper => TrainBench::paper(),
            PresetArg::Small => TrainBench::small(),
        };
        if let Some(x) = a.arch {
            b.arch = match x {
                ArchArg::Resnet18 => Arch::Resnet18,
                ArchArg::Resnet50 => Arch::Resnet50,
            };
        }
        if let Some(x) = a.stem {
            b.stem = match x {
                StemArg::Small => Stem::Small,
                StemArg::Imagenet => Stem::Imagenet,
            };
        }
        b.image = a.image.unwrap_or(b.image);
        b.batch = a.batch.unwrap_or(b.batch);
        b.width = a.width.unwrap_or(b.width);
        if !a.projector.is_empty() {
            b.projector = a.projector.clone();
        }
        b.device = a.device.into();
        b.precision = a.precision.into();
        b.warmup = a.warmup;
        b.steps = a.steps;
        b.profile_steps = a.profile_steps;
        b.seed = a.seed;
        eprintln!(
            "barlow: bench train {:?} {}x{} batch {}",
            b.arch, b.image, b.image, b.batch
        );
        let row = tb::run(&b, &mut |m| eprintln!("  {m}")).map_err(|e| e.to_string())?;
        rows.push(row);
    }
    if let Some(path) = &a.json {
        write_json_lines(path, &rows)?;
    }
    for path in &a.with {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        rows.extend(tb::read_rows(&text).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    print!("{}", tb::render(&rows));
    Ok(())
}

fn bench_loss(args: LossArgs) -> Result<(), String> {
    let stream = match args.device {
        Device::Cpu => None,
        Device::Cuda => Some(
            barlow::cuda::check_available()
                .and_then(|_| barlow::cuda::open_stream(0))
                .map_err(|e| e.to_string())?,
        ),
        Device::Auto => {
            match barlow::cuda::check_available().and_then(|_| barlow::cuda::open_stream(0)) {
                Ok(s) => Some(s),
                Err(e) => {
                    eprintln!("barlow: no usable GPU ({e}); benchmarking the CPU path");
                    None
                }
            }
        }
    };
    let gpu = stream.is_some();
    if stream
        .as_ref()
        .is_some_and(|s| barlow::cuda::is_virtual(s.context()))
    {
        eprintln!(
            "barlow: on the virtual CUDA device (host emulation): rows are labelled vgpu and their \
             times are not GPU figures"
        );
    }
    let ns = if args.n.is_empty() {
        if gpu {
            vec![256, 512, 1024, 2048, 4096]
        } else {
            vec![256, 1024]
        }
    } else {
        args.n.clone()
    };
    let ds = if args.d.is_empty() {
        if gpu {
            vec![1024, 2048, 4096, 8192, 16384]
        } else {
            vec![256, 1024]
        }
    } else {
        args.d.clone()
    };
    let maths: Vec<Math> = if gpu {
        args.math
            .iter()
            .map(|m| bench::parse_math(m))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?
    } else {
        vec![Math::F32]
    };
    let paths: Vec<barlow::Path> = args
        .path
        .iter()
        .map(|p| bench::parse_path(p))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let reps = Repeats {
        warmup: args.warmup,
        timed: args.repeats.unwrap_or(if gpu { 20 } else { 5 }).max(1),
    };
    for dims in ns
        .iter()
        .flat_map(|&n| ds.iter().map(move |&d| Dims::new(n, d)))
    {
        dims.checked().map_err(|e| e.to_string())?;
    }

    let mut rows: Vec<Row> = Vec::new();
    let total = ns.len() * ds.len() * maths.len();
    let mut done = 0;
    for &n in &ns {
        for &d in &ds {
            for &math in &maths {
                done += 1;
                let dims = Dims::new(n, d);
                eprintln!("[{done}/{total}] N={n} D={d} {}", bench::math_name(math));
                let new = match &stream {
                    Some(s) => {
                        bench::bench_gpu(s, dims, math, reps, args.seed, &paths, !args.no_baselines)
                    }
                    None => paths
                        .iter()
                        .map(|&p| bench::bench_cpu(dims, reps, args.seed, p))
                        .collect(),
                };
                for r in &new {
                    eprintln!(
                        "    {:<12} {:>10} ms  {}",
                        r.path,
                        r.median_ms.map_or("-".into(), |m| format!("{m:.3}")),
                        r.status
                    );
                }
                rows.extend(new);
            }
        }
    }
    if let Some(path) = &args.json {
        write_json_lines(path, &rows)?;
    }
    for path in &args.with {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        rows.extend(bench::read_rows(&text).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    print!("{}", bench::render_table(&rows));
    Ok(())
}

/// A progress bar with images/s and the loss.
struct Bar {
    bar: Option<indicatif::ProgressBar>,
    batch: usize,
}

impl barlow::train::run::Progress for Bar {
    fn stop_requested(&self) -> bool {
        INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn start(&mut self, total: usize, first: usize) {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(first as u64);
        self.bar = Some(bar);
    }
    fn step(&mut self, step: usize, loss: f64, rate: f64) {
        if let Some(b) = &self.bar {
            b.set_position(step as u64);
            b.set_message(format!(
                "loss {loss:8.2}  {rate:6.0} pairs/s ({:.0} images/s)",
                2.0 * rate
            ));
        }
        let _ = self.batch;
    }
    fn message(&mut self, text: &str) {
        match &self.bar {
            // Drawn bars print above themselves; without a terminal the bar is hidden, and so
            // would its lines be.
            Some(b) if !b.is_hidden() => b.println(text),
            _ => eprintln!("{text}"),
        }
    }
    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}

fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn train(a: TrainArgs) -> Result<(), String> {
    use barlow::nn::resnet::{Arch, Stem};
    let cfg = barlow::train::run::TrainConfig {
        device: a.device.into(),
        precision: a.precision.into(),
        data: a.data,
        arch: match a.arch {
            ArchArg::Resnet18 => Arch::Resnet18,
            ArchArg::Resnet50 => Arch::Resnet50,
        },
        stem: a.stem.map(|s| match s {
            StemArg::Small => Stem::Small,
            StemArg::Imagenet => Stem::Imagenet,
        }),
        width: a.width,
        projector: a.projector,
        lambda: a.lambda,
        batch_size: a.batch_size,
        epochs: a.epochs,
        warmup_epochs: a.warmup_epochs,
        lr_weights: a.lr_weights,
        lr_biases: a.lr_biases,
        weight_decay: a.weight_decay,
        crop: a.crop,
        max_train: a.max_train,
        knn_every: a.knn_every,
        seed: a.seed,
        ..Default::default()
    };
    let out = match (&a.out, &a.resume) {
        (Some(o), _) => o.clone(),
        (None, Some(r)) => r
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| PathBuf::from(".")),
        // The process id keeps runs started in the same second apart.
        (None, None) => {
            PathBuf::from("runs").join(format!("{}-{}", timestamp(), std::process::id()))
        }
    };
    let mut bar = Bar {
        bar: None,
        batch: cfg.batch_size,
    };
    let s = match barlow::train::run::train(&cfg, &out, a.resume.as_deref(), &mut bar) {
        Ok(s) => s,
        Err(e @ barlow::Error::Interrupted { .. }) => {
            if let Some(b) = &bar.bar {
                b.abandon();
            }
            eprintln!("barlow: {e}");
            std::process::exit(130);
        }
        Err(e) => return Err(e.to_string()),
    };
    println!(
        "done: {} steps, final loss {:.2}, {:.0} pairs/s; kNN top-1 {} at init -> {:.2}% after training",
        s.steps,
        s.final_loss,
        s.images_per_second,
        if s.knn_initial.is_nan() { "-".to_string() } else { format!("{:.2}%", 100.0 * s.knn_initial) },
        100.0 * s.knn_final
    );
    println!(
        "wrote {}/checkpoint.safetensors, metrics.jsonl, curves.png",
        s.out_dir.display()
    );
    Ok(())
}

/// Loads a checkpoint's model and the dataset it names (or `data`).
fn load_for_eval(
    path: &std::path::Path,
    data: Option<String>,
) -> Result<
    (
        barlow::train::BarlowTwins,
        barlow::train::data::Splits,
        barlow::train::augment::AugmentConfig,
    ),
    String,
> {
    use barlow::train::{checkpoint, data as ds, BarlowTwins, ModelConfig};
    let l = checkpoint::load(path).map_err(|e| e.to_string())?;
    let mcfg: ModelConfig = serde_json::from_value(l.state["model"].clone())
        .map_err(|e| format!("{}: model configuration: {e}", path.display()))?;
    let aug = serde_json::from_value(l.state["augment"].clone())
        .map_err(|e| format!("{}: augment configuration: {e}", path.display()))?;
    let data = data.unwrap_or_else(|| {
        l.state["train"]["data"]
            .as_str()
            .unwrap_or("builtin")
            .to_string()
    });
    let mut model =
        BarlowTwins::new(mcfg, &mut barlow::rng::Rng::new(0)).map_err(|e| e.to_string())?;
    l.restore_model(&mut model).map_err(|e| e.to_string())?;
    let splits = ds::open(&data).map_err(|e| e.to_string())?;
    let (want, have) = (model.config.backbone.in_channels, splits.train.channels());
    if want != have {
        let name = |c| {
            if c == 1 {
                "gray (1 channel)"
            } else {
                "RGB (3 channels)"
            }
        };
        return Err(format!(
            "{}: the model takes {} images but {data} holds {} images; evaluate it on data like \
             what it was trained on",
            path.display(),
            name(want),
            name(have)
        ));
    }
    Ok((model, splits, aug))
}

/// Backbone features of both splits (evaluation mode) on the device asked for.
fn eval_features(
    model: &mut barlow::train::BarlowTwins,
    s: &barlow::train::data::Splits,
    aug: &barlow::train::augment::AugmentConfig,
    device: Device,
    unit: bool,
) -> Result<(Vec<f32>, Vec<f32>), String> {
    use barlow::train::eval::features_with;
    use barlow::train::run::{Engine, Precision};
    let choice = device.into();
    let opt = barlow::train::Lars::new(Default::default());
    // f32 without tensor-core rounding, so the figures match the CPU's; batches of 16 keep the
    // device buffers (a training step's, two views) small.
    let mut engine = Engine::open(
        choice,
        Precision::F32,
        model,
        &opt,
        16,
        (s.train.channels(), aug.size, aug.size),
        &mut |m| eprintln!("barlow: features: {m}"),
    )
    .map_err(|e| e.to_string())?;
    let mut f = |x: &barlow::nn::Tensor| engine.features(model, x);
    let train = features_with(&s.train, aug, 256, unit, &mut f).map_err(|e| e.to_string())?;
    let test = features_with(&s.test, aug, 256, unit, &mut f).map_err(|e| e.to_string())?;
    Ok((train, test))
}

fn eval_knn(a: EvalArgs) -> Result<(), String> {
    use barlow::train::eval::knn_top1;
    let (mut model, s, aug) = load_for_eval(&a.checkpoint, a.data)?;
    let dim = model.backbone.config.features();
    let classes = s.train.classes.len();
    let (fb, ft) = eval_features(&mut model, &s, &aug, a.device, true)?;
    let acc = knn_top1(
        &fb,
        &s.train.labels,
        &ft,
        &s.test.labels,
        dim,
        classes,
        a.k,
        a.t,
    )
    .map_err(|e| e.to_string())?;
    println!(
        "kNN top-1 (k = {}, t = {}): {:.2}% on {} test images against {} training images",
        a.k,
        a.t,
        100.0 * acc,
        s.test.len(),
        s.train.len()
    );
    Ok(())
}

fn eval_linear(a: LinearArgs) -> Result<(), String> {
    use barlow::train::eval::{linear_probe, ProbeConfig};
    let (mut model, s, aug) = load_for_eval(&a.checkpoint, a.data)?;
    let dim = model.backbone.config.features();
    let classes = s.train.classes.len();
    eprintln!(
        "extracting features of {} + {} images",
        s.train.len(),
        s.test.len()
    );
    let (ftr, fte) = eval_features(&mut model, &s, &aug, a.device, false)?;
    let cfg = ProbeConfig {
        epochs: a.epochs,
        lr: a.lr,
        batch: a.batch_size,
        ..Default::default()
    };
    let acc = linear_probe(
        &ftr,
        &s.train.labels,
        &fte,
        &s.test.labels,
        dim,
        classes,
        cfg,
        |e, loss| eprintln!("probe epoch {}: loss {loss:.4}", e + 1),
    )
    .map_err(|e| e.to_string())?;
    println!(
        "linear probe top-1: {:.2}% on {} test images",
        100.0 * acc,
        s.test.len()
    );
    Ok(())
}
