//! `barlow bench loss` and `barlow bench train`.

use super::args::*;
use crate::Failure;
use barlow::bench::{self, Repeats, Row};
use barlow::{Dims, Math};
use clap::{Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
    /// Time the loss's forward+backward: barlow's fused path beside the naive port of the
    /// reference code and a plain cuBLAS GEMM (GPU), or the CPU path.
    Loss(LossArgs),
    /// Time the whole training step (two views, forward, loss, backward, LARS, upload) in
    /// images/s, with a per-phase breakdown; merge PyTorch's rows (benches/pytorch/train_bench.py)
    /// with --with to compare.
    Train(BenchTrainArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub(crate) enum PresetArg {
    /// ResNet-50, ImageNet stem, 224x224, batch 256, projector 8192-8192-8192.
    Paper,
    /// ResNet-18, small stem, 32x32, batch 256, projector 8192-8192-8192.
    Small,
}

#[derive(clap::Args)]
pub(crate) struct BenchTrainArgs {
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
    #[arg(long, value_parser = crop)]
    image: Option<usize>,
    #[arg(long, value_parser = batch)]
    batch: Option<usize>,
    /// First-stage width (64 in torchvision).
    #[arg(long, value_parser = positive)]
    width: Option<usize>,
    /// Projector widths, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = positive)]
    projector: Vec<usize>,
    /// Untimed steps first.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Timed steps (median and mean reported).
    #[arg(long, default_value_t = 30, value_parser = positive)]
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
    /// Also time this many GPUs of this machine together (data parallel, --batch images each):
    /// images per second per GPU and the scaling efficiency against one GPU in the same run.
    #[arg(long, default_value_t = 1, value_parser = positive)]
    gpus: usize,
}

#[derive(clap::Args)]
pub(crate) struct LossArgs {
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
    /// Precisions, comma-separated: f32, tf32, bf16 [default: all three on the GPU; the CPU
    /// computes in f32 only].
    #[arg(long, value_delimiter = ',', value_parser = math_arg)]
    math: Vec<String>,
    /// Loss paths to time, comma-separated: auto, direct, gram.
    #[arg(long, value_delimiter = ',', default_value = "auto", value_parser = path_arg)]
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

fn math_arg(s: &str) -> Result<String, String> {
    bench::parse_math(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

fn path_arg(s: &str) -> Result<String, String> {
    bench::parse_path(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// Refuses, before any work, a `--json` file that could not be written (its folder missing or
/// read-only) and `--with` files that cannot be read.
fn check_files(json: Option<&std::path::Path>, with: &[PathBuf]) -> Result<(), Failure> {
    if let Some(path) = json {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let probe = dir.join(format!(".barlow-write-test.{}", std::process::id()));
        match std::fs::File::create(&probe) {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
            }
            Err(e) => {
                return Err(Failure::Usage(format!(
                    "--json {}: cannot write into {}: {e}",
                    path.display(),
                    dir.display()
                )))
            }
        }
    }
    for p in with {
        std::fs::metadata(p).map_err(|e| Failure::Usage(format!("--with {}: {e}", p.display())))?;
    }
    Ok(())
}

/// Writes one JSON object per row, atomically.
pub(crate) fn write_json_lines<T: serde::Serialize>(
    path: &std::path::Path,
    rows: &[T],
) -> Result<(), String> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&serde_json::to_string(r).map_err(|e| e.to_string())?);
        text.push('\n');
    }
    barlow::io::write_atomic(path, text.as_bytes())
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

pub(crate) fn bench_train(a: BenchTrainArgs) -> Result<(), Failure> {
    use barlow::train::bench::{self as tb, TrainBench};
    if a.gpus > 1 && matches!(a.device, Device::Cpu) {
        return Err(Failure::Usage(format!(
            "--gpus {} times GPUs; it needs --device cuda or auto",
            a.gpus
        )));
    }
    check_files(a.json.as_deref(), &a.with)?;
    let mut rows = Vec::new();
    for p in &a.preset {
        let mut b = match p {
            PresetArg::Paper => TrainBench::paper(),
            PresetArg::Small => TrainBench::small(),
        };
        if let Some(x) = a.arch {
            b.arch = x.into();
        }
        if let Some(x) = a.stem {
            b.stem = x.into();
        }
        b.image = a.image.unwrap_or(b.image);
        b.batch = a.batch.unwrap_or(b.batch);
        b.width = a.width.unwrap_or(b.width);
        if !a.projector.is_empty() {
            b.projector = a.projector.clone();
        }
        b.device = a.device.into();
        b.precision = a.precision.into();
        b.cudnn = crate::env::cudnn_search();
        b.warmup = a.warmup;
        b.steps = a.steps;
        b.profile_steps = a.profile_steps;
        b.seed = a.seed;
        eprintln!(
            "barlow: bench train {:?} {}x{} batch {}",
            b.arch, b.image, b.image, b.batch
        );
        let row = tb::run(&b, &mut |m| eprintln!("  {m}")).map_err(|e| e.to_string())?;
        if a.gpus > 1 {
            let mut many =
                tb::run_gpus(&b, a.gpus, &mut |m| eprintln!("  {m}")).map_err(|e| e.to_string())?;
            tb::set_scaling(&row, &mut many);
            rows.push(row);
            rows.push(many);
        } else {
            rows.push(row);
        }
    }
    let mut table = rows.clone();
    for path in &a.with {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        table.extend(tb::read_rows(&text).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    // The table first: a file that cannot be written does not take the measurements with it.
    print!("{}", tb::render(&table));
    if let Some(path) = &a.json {
        write_json_lines(path, &rows)?;
    }
    Ok(())
}

pub(crate) fn bench_loss(args: LossArgs) -> Result<(), Failure> {
    check_files(args.json.as_deref(), &args.with)?;
    if args.device == Device::Cpu && args.math.iter().any(|m| m != "f32") {
        return Err(Failure::Usage(
            "--math other than f32 needs a GPU (the CPU computes in f32); leave --math out with \
             --device cpu"
                .into(),
        ));
    }
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
        let all = ["f32", "tf32", "bf16"].map(String::from).to_vec();
        (if args.math.is_empty() {
            &all
        } else {
            &args.math
        })
        .iter()
        .map(|m| bench::parse_math(m))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?
    } else {
        vec![Math::F32]
    };
    let paths: Vec<barlow::LossPath> = args
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
        dims.checked().map_err(|e| Failure::Usage(e.to_string()))?;
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
    let mut table = rows.clone();
    for path in &args.with {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        table.extend(bench::read_rows(&text).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    // The table first: a file that cannot be written does not take the measurements with it.
    print!("{}", bench::render_table(&table));
    if let Some(path) = &args.json {
        write_json_lines(path, &rows)?;
    }
    Ok(())
}
