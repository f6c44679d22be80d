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
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
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
    let command = Cli::command();
    let matches = command.clone().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The options typed on the command line (not defaults), for those that may not be combined.
    let given: Vec<String> = matches
        .subcommand()
        .and_then(|(name, m)| {
            let sub = command.find_subcommand(name)?;
            Some(
                sub.get_arguments()
                    .map(|a| a.get_id().as_str())
                    .filter(|id| m.value_source(id) == Some(ValueSource::CommandLine))
                    .map(str::to_string)
                    .collect(),
            )
        })
        .unwrap_or_default();
    env::install_logger();
    let result: Result<(), Failure> = match cli.command {
        Command::Info => {
            info::info();
            Ok(())
        }
        Command::Train(args) => {
            // Only a run stops gracefully (after its step, keeping its checkpoint); elsewhere
            // Ctrl-C ends the process at once.
            progress::install_interrupt_handler();
            train::train(*args, &given)
        }
        Command::Eval(EvalCommand::Knn(args)) => eval::eval_knn(args).map_err(Failure::Run),
        Command::Eval(EvalCommand::Linear(args)) => eval::eval_linear(args).map_err(Failure::Run),
        Command::Bench(BenchCommand::Loss(args)) => bench::bench_loss(args),
        Command::Bench(BenchCommand::Train(args)) => bench::bench_train(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("barlow: {e}");
            // As for options refused while parsing.
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("barlow: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Why a command failed: options that cannot go together (exit status 2, like an option refused
/// while parsing), or the work itself (exit status 1).
pub(crate) enum Failure {
    Usage(String),
    Run(String),
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Failure::Run(e)
    }
}
