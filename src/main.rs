//! The `barlow` command line: one module per subcommand under `src/cli/`.

#[path = "cli/args.rs"]
mod args;
#[path = "cli/bench.rs"]
mod bench;
#[path = "cli/env.rs"]
mod env;
#[path = "cli/eval.rs"]
mod eval;
#[path = "cli/info.rs"]
mod info;
#[path = "cli/plot.rs"]
mod plot;
#[path = "cli/progress.rs"]
mod progress;
#[path = "cli/train.rs"]
mod train;

use bench::BenchCommand;
use clap::{Parser, Subcommand};
use eval::EvalCommand;
use std::process::ExitCode;
use train::TrainArgs;

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

fn main() -> ExitCode {
    // Piped into `head`, end quietly like other command-line tools instead of failing a write.
    #[cfg(unix)]
    // SAFETY: restoring the default SIGPIPE disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    env::install_logger();
    progress::install_interrupt_handler();
    let result = match cli.command {
        Command::Info => {
            info::info();
            Ok(())
        }
        Command::Train(args) => train::train(*args),
        Command::Eval(EvalCommand::Knn(args)) => eval::eval_knn(args),
        Command::Eval(EvalCommand::Linear(args)) => eval::eval_linear(args),
        Command::Bench(BenchCommand::Loss(args)) => bench::bench_loss(args),
        Command::Bench(BenchCommand::Train(args)) => bench::bench_train(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("barlow: {e}");
            ExitCode::FAILURE
        }
    }
}
