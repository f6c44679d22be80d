//! The `barlow` command line. For now it reports what this build and machine offer.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("info") | None => {
            info();
            ExitCode::SUCCESS
        }
        Some("--help") | Some("-h") | Some("help") => {
            println!("usage: barlow info    show the build's kernels and the CUDA devices found");
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("barlow: unknown command `{other}` (try `barlow --help`)");
            ExitCode::from(2)
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
