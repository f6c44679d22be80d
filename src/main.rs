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
    /// Show the build's kernels, the CUDA devices found and the CPU threads.
    Info,
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time the loss's forward+backward: barlow's fused path beside the naive port of the
    /// reference code and a plain cuBLAS GEMM (GPU), or the CPU path.
    Loss(LossArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Device {
    /// The GPU when one works, else the CPU.
    Auto,
    Cpu,
    Cuda,
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
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => {
            info();
            Ok(())
        }
        Command::Bench(BenchCommand::Loss(args)) => bench_loss(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("barlow: {e}");
            ExitCode::FAILURE
        }
    }
}

fn info() {
    println!("barlow {}", env!("CARGO_PKG_VERSION"));
    let kernels = match barlow::cuda::fatbin::FATBIN {
        Some(f) => format!("embedded ({} bytes)", f.len()),
        None => "not built (no nvcc at build time)".to_string(),
    };
    println!("CUDA kernels: {kernels}");
    match barlow::cuda::device_count() {
        Ok(n) => println!("CUDA devices: {n}"),
        Err(e) => println!("CUDA devices: none ({e})"),
    }
    println!("CPU threads: {}", rayon::current_num_threads());
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
                    Some(s) => bench::bench_gpu(s, dims, math, reps, args.seed),
                    None => vec![bench::bench_cpu(dims, reps, args.seed)],
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
        let mut text = String::new();
        for r in &rows {
            text.push_str(&serde_json::to_string(r).map_err(|e| e.to_string())?);
            text.push('\n');
        }
        barlow::io::write_atomic(path, text.as_bytes())
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    for path in &args.with {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        rows.extend(bench::read_rows(&text).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    print!("{}", bench::render_table(&rows));
    Ok(())
}
